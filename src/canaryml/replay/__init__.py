"""Replay: past deployments through the same Controller.step, on a simulated clock (DESIGN §7)."""

# `canaryml.replay(...)` is the Python API function (canaryml.api): the package is callable
from canaryml.api import callable_package as _callable_package

_callable_package(__name__)
