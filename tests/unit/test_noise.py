"""Issue 15 #6: no warnings on every run that a user can do nothing about — each silenced at its
source or filtered by its exact words, and nothing else with it."""

from __future__ import annotations

import inspect
import logging
import warnings

import numpy as np
import pytest

from canaryml import tracking
from canaryml.cli import setup_logging
from canaryml.models.scorer import _ecdf_apply

CLOUDPICKLE = ("Passing a Python object as `python_model` causes it to be serialized using "
               "CloudPickle, it requires exercising caution")
TIP = ("💡 Tip: For seamless cloud logging and experiment tracking, try installing "
       "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger")


def test_ecdf_tail_does_not_overflow_and_keeps_its_values() -> None:
    knots = np.linspace(0.0, 1.0, 50)
    tau = 0.01
    x = np.array([-1e6, -5.0, 0.3, 1.0, 1.02, 1.5, np.nan, np.inf])
    n = len(knots)
    with np.errstate(all="raise"):  # an overflow in a masked branch raised before the fix
        p = _ecdf_apply(x, knots, np.arange(1, n + 1) / (n + 1), tau)
    assert p[0] == 0.0 and p[1] == 0.0
    assert p[2] == pytest.approx(np.interp(0.3, knots, np.arange(1, n + 1) / (n + 1)))
    assert p[4] == pytest.approx(1.0 - (1.0 / (n + 1)) * np.exp(-0.02 / tau))
    assert np.isnan(p[6]) and np.isnan(p[7])  # non-finite ticks stay NaN


def test_cloudpickle_warning_dropped_only_inside_log_scorer(
        caplog: pytest.LogCaptureFixture) -> None:
    import mlflow.pyfunc

    # the words filtered are still MLflow's (an upgrade that rewords them fails here)
    assert "Passing a Python object as `python_model`" in inspect.getsource(mlflow.pyfunc)
    logger = logging.getLogger("mlflow.pyfunc")
    with caplog.at_level(logging.INFO, logger="mlflow.pyfunc"):
        with tracking._quiet_cloudpickle_warning():
            logger.warning(CLOUDPICKLE)
            logger.warning("another MLflow warning")
        logger.warning(CLOUDPICKLE)
    assert [r.getMessage() for r in caplog.records] == ["another MLflow warning", CLOUDPICKLE]
    assert not logger.filters


def test_cli_logging_drops_the_litlogger_tip_only(caplog: pytest.LogCaptureFixture) -> None:
    from pytorch_lightning.trainer.connectors.logger_connector import logger_connector

    assert "💡 Tip: For seamless cloud logging" in inspect.getsource(logger_connector)
    setup_logging()
    setup_logging()  # idempotent: one filter
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info(TIP)
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_cli_warning_filter_is_precise() -> None:
    setup_logging()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        setup_logging()  # re-installs the precise filter on top of "always"
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning,
                               "_pytree.py", 21, module="pytorch_lightning.utilities._pytree")
        warnings.warn_explicit("something else is deprecated", DeprecationWarning,
                               "_pytree.py", 22, module="pytorch_lightning.utilities._pytree")
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
