from __future__ import annotations

import pytest

from models.priority import priority_score, severity_band


@pytest.mark.parametrize(
    ("severity", "band"),
    [(0.0, 0), (0.01, 1), (24.9, 1), (25.0, 2), (49.99, 2), (50.0, 3), (74.9, 3), (75.0, 4), (100.0, 4)],
)
def test_moscow_bands(severity: float, band: int) -> None:
    assert severity_band(severity) == band


def test_band_dominates_identification() -> None:
    assert priority_score(30.0, 0.0) > priority_score(24.0, 1.0)
    assert priority_score(80.0, None) > priority_score(74.0, 0.99)


def test_identification_orders_within_band_and_unknown_is_neutral() -> None:
    assert priority_score(30.0, 0.9) > priority_score(30.0, None) > priority_score(30.0, 0.1)


def test_severity_breaks_ties() -> None:
    assert priority_score(40.0, 0.5) > priority_score(30.0, 0.5)


def test_configurable_edges() -> None:
    assert severity_band(15.0, edges=(0.0, 10.0, 20.0, 30.0)) == 2


def test_queue_priority_policy() -> None:
    from app.priority import queue_priority

    assert queue_priority("settled", None) == 3  # first time: arrival order
    assert queue_priority("settled", 4) == 0  # re-scan of an urgent study first
    assert queue_priority("settled", 1) == 3
    assert queue_priority("rescore", 2) == 6  # already on the worklist with scores
    assert queue_priority("rescore", None) == 3  # e.g. a failed study


def test_a_lower_bound_severity_ranks_at_least_ct3() -> None:
    """Never rank the sickest low without saying so: a lower-bound 10 % sorts with CT-3 studies."""
    from models.priority import LOWER_BOUND_MIN_BAND, effective_band

    assert LOWER_BOUND_MIN_BAND == 3
    assert effective_band(10.0, lower_bound=True) == 3 and effective_band(10.0, lower_bound=False) == 1
    assert effective_band(0.0, lower_bound=True) == 3  # no lesions found in a mask that may miss them
    assert effective_band(80.0, lower_bound=True) == 4  # a floor, never a ceiling
    floored = priority_score(10.0, None, lower_bound=True)
    assert priority_score(74.0, None) > floored > priority_score(49.0, 1.0)
    assert 3000 <= floored < 4000
    assert priority_score(10.0, None) == priority_score(10.0, None, lower_bound=False) < 2000
