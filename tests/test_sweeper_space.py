"""The Optuna sweeper's search space from Hydra's sweep grammar (pure: no Ray, no Optuna study)."""

from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.orchestrator_sweeper.optuna_search import _distribution


def _dist(line: str):
    return _distribution(OverridesParser.create().parse_overrides([line])[0])


@pytest.mark.parametrize("line, low, high, step", [
    ("x=range(0, 50, 10)", 0, 40, 10),    # stop excluded, on the grid
    ("x=range(0, 45, 10)", 0, 40, 10),    # a span that is no multiple of step: the last grid point below stop
    ("x=range(1, 2, 5)", 1, 1, 5),
])
def test_int_range_high_is_the_last_grid_point_below_stop(line, low, high, step):
    d = _dist(line)
    assert (d.low, d.high, d.step) == (low, high, step)


def test_float_range_and_log_interval_and_choice():
    d = _dist("x=range(0.1, 0.45, 0.1)")
    assert d.low == pytest.approx(0.1) and d.high == pytest.approx(0.4) and d.step == pytest.approx(0.1)
    d = _dist("optim.lr=tag(log, interval(1e-4, 1e-2))")
    assert d.log and (d.low, d.high) == (1e-4, 1e-2)
    assert list(_dist("engine=zero1,zero2").choices) == ["zero1", "zero2"]


def test_empty_range_is_refused_naming_the_override():
    with pytest.raises(ValueError, match="x=range"):
        _dist("x=range(5, 5, 1)")
