"""Evaluating a triage method on labelled series: the paper's Table 3, plus triage metrics.

For every series, a predictor (``models.predictor``: the threshold method, or the networks, as the
worker runs them) gives lungs, lesions, identification and severity on its scoring grid; ground truth comes from the
series' masks (severity: lesion/lung per lung, max) or from labels.csv. Then, per method:

* ROC AUC of identification, COVID-19 against each negative cohort (normal, bacterial
  pneumonia, nodules) and against all negatives. A method without identification (threshold)
  is scored by its severity instead, as the paper does for segmentation-based methods;
* Spearman's rho of predicted against true severity, positives only;
* Dice of lesions (positives with masks) and of lungs (series with lung masks);
* average precision of identification against all negatives;
* triage: mean position, on a worklist ordered by the service's priority
  (``models.priority.priority_score``), of the positives and of the severe positives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from models.datasets import SeriesData, SeriesRecord
from models.lungs_threshold import split_lungs
from models.metrics import average_precision, dice, ideal_mean_position, mean_worklist_position, roc_auc, spearman_rho
from models.phantom_cohorts import NEGATIVE_COHORTS
from models.predictor import Predictor
from models.priority import priority_score
from models.severity import lung_severity
from models.threshold_method import threshold_lungs
from models.training_samples import resample_mask

#: Positives at or above this true severity (%) count as severe (Moscow CT-3 and CT-4).
DEFAULT_SEVERE_PERCENT = 50.0

LungLabels = Callable[[np.ndarray, tuple[float, float, float]], tuple[np.ndarray, tuple[float, float, float]]]


@dataclass(frozen=True)
class LungTruth:
    """Ground-truth lungs where a series has no lung mask: (HU, spacing) -> (labels 1/2, their spacing)."""

    how: str
    lungs: LungLabels


def _threshold_lung_labels(hu: np.ndarray, spacing: tuple[float, float, float]
                           ) -> tuple[np.ndarray, tuple[float, float, float]]:
    return threshold_lungs(hu.astype(np.float32, copy=False), spacing).lung_labels, spacing


#: Right/left lungs of the threshold method (dense lung along the pleura included), native grid.
THRESHOLD_LUNG_TRUTH = LungTruth("threshold lungs", _threshold_lung_labels)


def network_lung_truth(networks: Any, inplane_spacing_mm: float = 2.0) -> LungTruth:
    """The lungs network of a loaded bundle (``models.inference.TriageNetworks``), on its 2 mm grid."""
    def lungs(hu: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[float, float, float]]:
        hu_t, image, grid = networks.preprocess(hu, spacing, inplane_spacing_mm)
        return networks.lung_labels(image, hu_t.cpu().numpy(), grid), grid

    return LungTruth("lungs network", lungs)


@dataclass(frozen=True)
class StudyOutcome:
    id: str
    cohort: str
    covid: bool | None
    identification: float | None
    severity: float
    severity_true: float | None
    lung_dice: float | None
    lesion_dice: float | None
    seconds: float
    error: str | None = None
    #: Where severity_true came from: masks, derived lungs (<how>), labels.csv, negative, or None.
    severity_truth: str | None = None


def true_lung_labels(data: SeriesData) -> np.ndarray | None:
    """The ground-truth lungs as a right/left partition (re-split when the mask is binary)."""
    if data.lungs is None:
        return None
    values = set(np.unique(data.lungs).tolist()) - {0}
    if len(values) == 2:
        a, b = sorted(values)
        out = np.zeros(data.lungs.shape, dtype=np.uint8)
        out[data.lungs == a], out[data.lungs == b] = 1, 2
        return out
    return split_lungs(data.lungs > 0, data.spacing)


def true_severity(record: SeriesRecord, data: SeriesData) -> float | None:
    """Max-lung severity of the ground-truth masks; else labels.csv's ``severity``; negatives 0."""
    return true_severity_with_source(record, data, None)[0]


def true_severity_with_source(
    record: SeriesRecord, data: SeriesData, truth_lungs: LungTruth | None
) -> tuple[float | None, str | None]:
    """(true severity, where it came from). A lesion mask without a lung mask is measured against
    ``truth_lungs``' lungs (the paper's way for Mosmed); without it, labels.csv or nothing."""
    labels = true_lung_labels(data)
    if labels is not None and data.lesions is not None:
        return lung_severity(labels, data.lesions, data.spacing).severity, "masks"
    if data.lesions is not None and truth_lungs is not None and record.covid is not False:
        derived, grid = truth_lungs.lungs(data.hu, data.spacing)
        lesions = data.lesions if derived.shape == data.lesions.shape else resample_mask(
            data.lesions, data.spacing, grid[1:])
        return lung_severity(derived, lesions, grid).severity, f"derived: {truth_lungs.how}"
    if record.severity is not None:
        return record.severity, "labels.csv"
    return (0.0, "negative") if record.covid is False else (None, None)


def _failed(record: SeriesRecord, error: str, seconds: float = 0.0) -> StudyOutcome:
    return StudyOutcome(record.id, record.cohort, record.covid, None, 0.0, None, None, None, seconds, error=error)


def evaluate_record(record: SeriesRecord, predictor: Predictor, truth_lungs: LungTruth | None = None) -> StudyOutcome:
    """Predict one series and compare with its ground truth; a failure (unreadable files too) is kept,
    not raised."""
    try:
        data = record.load()
    except Exception as exc:  # an unreadable series is one failure, not the end of the evaluation
        return _failed(record, f"unreadable: {type(exc).__name__}: {exc}")
    start = time.perf_counter()
    try:
        p = predictor.predict(data.hu, data.spacing)
    except Exception as exc:  # one bad series must not hide the others' results
        return _failed(record, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    lung_dice = lesion_dice = None
    if data.lungs is not None:
        lung_dice = dice(p.lung_labels > 0, resample_mask(data.lungs > 0, data.spacing, p.spacing[1:]))
    if data.lesions is not None and record.covid:
        lesion_dice = dice(p.lesions, resample_mask(data.lesions, data.spacing, p.spacing[1:]))
    severity_true, source = true_severity_with_source(record, data, truth_lungs)
    return StudyOutcome(
        id=record.id, cohort=record.cohort, covid=record.covid, identification=p.identification,
        severity=p.severity.severity, severity_true=severity_true,
        lung_dice=lung_dice, lesion_dice=lesion_dice, seconds=seconds, severity_truth=source,
    )


def evaluate(records: Sequence[SeriesRecord], predictor: Predictor,
             progress: Callable[[str], None] | None = None,
             truth_lungs: LungTruth | None = THRESHOLD_LUNG_TRUTH) -> list[StudyOutcome]:
    outcomes = []
    for i, record in enumerate(records):
        outcomes.append(evaluate_record(record, predictor, truth_lungs))
        if progress is not None:
            o = outcomes[-1]
            progress(f"[{i + 1}/{len(records)}] {o.id} ({o.cohort}): severity {o.severity:.1f}"
                     + (f", identification {o.identification:.3f}" if o.identification is not None else "")
                     + (f", ERROR {o.error}" if o.error else ""))
    return outcomes


def _mean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else float("nan")


def summarize(
    outcomes: Sequence[StudyOutcome],
    severe_percent: float = DEFAULT_SEVERE_PERCENT,
    band_edges: Sequence[float] = (0.0, 25.0, 50.0, 75.0),
) -> dict[str, Any]:
    """The metrics of one method over the labelled, successfully scored series."""
    scored = [o for o in outcomes if o.error is None and o.covid is not None]
    uses_identification = bool(scored) and all(o.identification is not None for o in scored)
    score = np.array([(o.identification if uses_identification else o.severity) for o in scored], dtype=float)
    positive = np.array([bool(o.covid) for o in scored], dtype=bool)
    cohorts = np.array([o.cohort for o in scored])
    aucs = {"all": roc_auc(positive, score)}
    for cohort in NEGATIVE_COHORTS:
        keep = positive | (cohorts == cohort)
        aucs[cohort] = roc_auc(positive[keep], score[keep]) if (cohorts == cohort).any() else float("nan")
    # (true, scored) severity of each COVID-19 study with a reference severity
    pairs = [(true, o.severity) for o in scored if o.covid and (true := o.severity_true) is not None]
    rho = spearman_rho(np.array([t for t, _ in pairs]), np.array([s for _, s in pairs])) \
        if len(pairs) >= 2 else float("nan")
    mae = float(np.mean([abs(s - t) for t, s in pairs])) if pairs else float("nan")
    priority = np.array([priority_score(o.severity, o.identification, band_edges) for o in scored])
    severe = np.array([bool(o.covid) and (o.severity_true or 0.0) >= severe_percent for o in scored])
    lesion_dices = [o.lesion_dice for o in scored if o.lesion_dice is not None]
    return {
        "series": len(outcomes),
        "scored": len(scored),
        "failed": sum(o.error is not None for o in outcomes),
        "failed_series": {o.id: o.error for o in outcomes if o.error is not None},
        "severity_truth": _counts(o.severity_truth for o in scored if o.covid and o.severity_truth),
        "positives": int(positive.sum()),
        "negatives": {c: int((cohorts == c).sum()) for c in (*NEGATIVE_COHORTS, "other")},
        "identification_score": "identification" if uses_identification else "severity",
        "roc_auc": aucs,
        "average_precision": average_precision(positive, score) if positive.any() else float("nan"),
        "spearman_rho": rho,
        "severity_mae": mae,
        "lesion_dice": _mean(lesion_dices),
        "lesion_dice_std": float(np.std(lesion_dices)) if lesion_dices else float("nan"),
        "lung_dice": _mean([o.lung_dice for o in scored]),
        "worklist": {
            "mean_position_positive": mean_worklist_position(priority, positive),
            "ideal_position_positive": ideal_mean_position(int(positive.sum())),
            "severe_percent": severe_percent,
            "severe": int(severe.sum()),
            "mean_position_severe": mean_worklist_position(priority, severe),
            "ideal_position_severe": ideal_mean_position(int(severe.sum())),
        },
        "seconds_per_series": _mean([o.seconds for o in outcomes]),
    }


def _counts(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _cell(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table in the layout of the paper's Table 3, one row per method."""
    head = (f"{'':36} {'ROC AUC (COVID-19 vs .)':^31} {'Spearman':>8} {'Dice':>7} {'Dice':>6} {'AP':>5} "
            f"{'worklist position':^21}")
    cols = (f"{'method':36} {'All':>7} {'Normal':>7} {'Bac.Pn':>7} {'Nodules':>7} {'rho':>8} {'lesions':>7} "
            f"{'lungs':>6} {'':>5} {'positive':>10} {'severe':>10} {'scored/series':>13} {'failed':>6}")
    lines = [head, cols, "-" * len(cols)]
    for name, s in summaries.items():
        auc, wl = s["roc_auc"], s["worklist"]
        lines.append(
            f"{name[:36]:36} {_cell(auc['all']):>7} {_cell(auc['normal']):>7} {_cell(auc['bacterial_pneumonia']):>7} "
            f"{_cell(auc['nodules']):>7} {_cell(s['spearman_rho']):>8} {_cell(s['lesion_dice']):>7} "
            f"{_cell(s['lung_dice']):>6} {_cell(s['average_precision']):>5} "
            f"{_cell(wl['mean_position_positive'], 1) + '/' + _cell(wl['ideal_position_positive'], 1):>10} "
            f"{_cell(wl['mean_position_severe'], 1) + '/' + _cell(wl['ideal_position_severe'], 1):>10}"
            f" {str(s['scored']) + '/' + str(s['series']):>13} {s.get('failed', 0):>6}"
        )
    for name, s in summaries.items():
        for ident, error in s.get("failed_series", {}).items():
            lines.append(f"FAILED ({name[:36]}): {ident}: {error}")
    lines.append("worklist position: mean position of the studies / mean if they were all first; "
                 "severe: true severity >= the severe threshold. Without identification (threshold), "
                 "ROC AUC and AP rank by severity. Failed series (unreadable or not scorable) are in no metric.")
    return "\n".join(lines)


def outcomes_json(outcomes: Sequence[StudyOutcome]) -> list[dict[str, Any]]:
    return [asdict(o) for o in outcomes]
