"""`canaryml tune` registers a challenger only when its best trial strictly beats the incumbents."""

from __future__ import annotations

import json

import pytest

from canaryml.errors import ConfigError
from canaryml.tasks.tune import _register_mode
from canaryml.tune.gate import (
    KEY_TAG,
    VALUE_TAG,
    Contender,
    beats,
    decide,
    objective_key,
    tagged_values,
)

MAX = ("maximize",)
MULTI = ("maximize", "minimize")


def test_beats_is_strict_in_the_objective_direction() -> None:
    assert beats([0.6], [0.5], MAX)
    assert not beats([0.5], [0.5], MAX)  # a tie does not beat
    assert not beats([0.5 + 1e-12], [0.5], MAX)  # nor does float noise
    assert not beats([0.4], [0.5], MAX)
    assert beats([0.10], [0.12], ("minimize",))
    assert not beats([0.12], [0.10], ("minimize",))
    assert beats([0.3], [float("nan")], MAX) and not beats([float("nan")], [0.3], MAX)


def test_beats_on_two_objectives_needs_pareto_domination() -> None:
    assert beats([0.7, 0.01], [0.6, 0.01], MULTI)  # more caught, same false rollbacks
    assert beats([0.6, 0.00], [0.6, 0.01], MULTI)  # fewer false rollbacks
    assert not beats([0.7, 0.02], [0.6, 0.01], MULTI)  # a trade-off is not a win
    assert not beats([0.6, 0.01], [0.6, 0.01], MULTI)


def test_decide_refuses_a_tie_with_any_incumbent_and_names_it() -> None:
    best = Contender("best trial 3", (0.5,))
    default = Contender("the untuned default, trial 0", (0.5,))
    champion = Contender("@champion v2", (0.4,))
    d = decide(best, [default, champion], MAX)
    assert not d.register
    assert d.reason == "best trial 3 (0.5) only ties the untuned default, trial 0 (0.5)"
    d = decide(best, [Contender("@challenger v4", (0.6,))], MAX)
    assert not d.register and "does not beat @challenger v4 (0.6)" in d.reason
    d = decide(best, [Contender("the untuned default, trial 0", (0.3,)), champion], MAX)
    assert d.register and "beats" in d.reason and "@champion v2 (0.4)" in d.reason
    d = decide(Contender("best trial 5", (0.7, 0.02)), [Contender("@champion v2", (0.6, 0.01))],
               MULTI)
    assert d.reason == "best trial 5 (0.7, 0.02) does not beat @champion v2 (0.6, 0.01)"
    assert decide(best, [], MAX).register  # nothing to beat: the first challenger


def test_tagged_values_only_for_the_same_objective_data_and_holdout() -> None:
    key = objective_key("replay", 0.01, "abc", ["d2", "d1"])
    assert key == objective_key("replay", 0.01, "abc", ["d1", "d2"])  # order does not matter
    assert key != objective_key("replay", 0.01, "abc", ["d1", "d3"])
    assert key != objective_key("replay", 0.05, "abc", ["d1", "d2"])
    assert key != objective_key("val_loss", 0.01, "abc", ["d1", "d2"])
    assert key != objective_key("replay", 0.01, "xyz", ["d1", "d2"])
    tags = {KEY_TAG: key, VALUE_TAG: json.dumps([0.75])}
    assert tagged_values(tags, key) == (0.75,)
    assert tagged_values(tags, "other") is None
    assert tagged_values({KEY_TAG: key}, key) is None
    assert tagged_values({KEY_TAG: key, VALUE_TAG: "[0.5, 0.01]"}, key) == (0.5, 0.01)
    assert tagged_values({KEY_TAG: key, VALUE_TAG: "junk"}, key) is None


def test_register_mode() -> None:
    assert _register_mode(True) == "gate"
    assert _register_mode(False) == "off"
    assert _register_mode("force") == "force"
    with pytest.raises(ConfigError, match=r"tune\.register='maybe'"):
        _register_mode("maybe")
