"""Worklist priority: one documented function of both triage scores, computed here only (the
worker stores it, the evaluation ranks by it).

Order of urgency, most urgent first:

1. The severity band of the worse lung, after the Moscow CT-0..CT-4 grading used for Mosmed-1110
   (Goncharov et al. 2021, section 3.1): CT-0 = 0 %, CT-1 = (0, 25) %, CT-2 = [25, 50) %,
   CT-3 = [50, 75) %, CT-4 = [75, 100] %. Band edges are configurable (``severity_band_edges``).
2. Within a band, the identification probability (COVID-19 likely first). Where identification
   is unknown (the threshold method gives none), it counts as 0.5: neither pushed up nor down.
3. Within equal scores, the exact severity percentage.

Never rank the sickest low without saying so: a scoring whose severity is only a lower bound
(a quality flag with ``lower_bound``, e.g. a lung mask that left dense lung out, see
``models.findings``) puts the study at least in band CT-3 (``LOWER_BOUND_MIN_BAND``). The floored
band is the band: it is what the study row stores, what the band filter matches and what the
priority sorts on; the pages mark it as floored. :func:`effective_band` is the one place that
decides it.

Worsening first (``worsening``, configurable: ``CTTRIAGE_PRIORITY_WORSENING_FIRST``): a patient
whose max-lung severity rose since the prior study by at least the trend threshold
(``CTTRIAGE_TREND_POINTS``, decided in ``app.priors``) goes first within its band, whatever its
identification: ``WORSENING_BONUS`` is added inside the band's 1000-point range.

``priority = band * 1000 + worsening * 500 + identification * 100 + severity / 100`` keeps the
levels apart (identification * 100 <= 100 < 500; 500 + 100 + 1 < 1000, so the bonus never
crosses bands), and a single indexed float column sorts the worklist. Studies without scores
have no priority and sort after scored ones, oldest first.
"""

from __future__ import annotations

from collections.abc import Sequence

UNKNOWN_IDENTIFICATION = 0.5
#: The least band of a study whose severity is a lower bound (the severity may under-read it).
LOWER_BOUND_MIN_BAND = 3
DEFAULT_EDGES = (0.0, 25.0, 50.0, 75.0)
#: Added within the band for a patient worse than at the prior study (below 1000 - 101).
WORSENING_BONUS = 500.0


def severity_band(severity_percent: float, edges: Sequence[float] = DEFAULT_EDGES) -> int:
    """CT-0..CT-4 band of a max-lung severity in percent (0 only for exactly no lesions)."""
    zero, *upper_edges = edges
    if severity_percent <= zero:
        return 0
    band = 1
    for edge in upper_edges:
        if severity_percent >= edge:
            band += 1
    return band


def effective_band(severity_percent: float, lower_bound: bool, edges: Sequence[float] = DEFAULT_EDGES) -> int:
    """The band the worklist uses: the severity's band, floored at CT-3 when it is a lower bound."""
    band = severity_band(severity_percent, edges)
    return max(band, LOWER_BOUND_MIN_BAND) if lower_bound else band


def priority_score(
    severity_percent: float,
    identification: float | None,
    edges: Sequence[float] = DEFAULT_EDGES,
    *,
    lower_bound: bool = False,
    worsening: bool = False,
) -> float:
    """The worklist's sort key (see the module docstring); ``lower_bound``: the severity is one;
    ``worsening``: worse than at the prior study (first within the band)."""
    band = effective_band(severity_percent, lower_bound, edges)
    ident = UNKNOWN_IDENTIFICATION if identification is None else min(max(identification, 0.0), 1.0)
    bonus = WORSENING_BONUS if worsening else 0.0
    return band * 1000.0 + bonus + ident * 100.0 + min(max(severity_percent, 0.0), 100.0) / 100.0
