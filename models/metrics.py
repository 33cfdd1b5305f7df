"""The paper's quality metrics (section 2.5) and the triage ones, on plain arrays.

Written with numpy/scipy rather than pulled from scikit-learn (not a dependency of the
service); each definition matches the usual one, tested against hand-computed values.
Undefined values (one class only, constant input) are NaN, never a silent 0 or 1.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties 1/2.

    Computed as the Mann-Whitney U statistic from average ranks; NaN without both classes.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError("labels and scores must be 1D arrays of the same length")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the step precision-recall curve: sum over thresholds of (R_k - R_{k-1}) * P_k.

    Thresholds are the distinct scores, highest first; tied scores enter together (the
    scikit-learn definition). NaN without positives.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_group]
    predicted = last_of_group + 1
    precision = tp / predicted
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def spearman_rho(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of average ranks (ties averaged); NaN when either side is constant."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("inputs must be 1D arrays of the same length")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    denom = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2|A n B| / (|A| + |B|) of two boolean masks; 1 when both are empty (nothing to miss)."""
    p, t = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(p & t)) / total


def worklist_positions(priority: np.ndarray) -> np.ndarray:
    """1-based position of each study on a worklist sorted by descending priority; studies
    with equal priority share the mean of the positions they occupy (no arbitrary tie order)."""
    return rankdata(-np.asarray(priority, dtype=float), method="average")


def mean_worklist_position(priority: np.ndarray, selected: np.ndarray) -> float:
    """Mean position of the ``selected`` studies (NaN if none): lower is earlier reading."""
    chosen = np.asarray(selected, dtype=bool)
    if not chosen.any():
        return float("nan")
    return float(worklist_positions(priority)[chosen].mean())


def ideal_mean_position(count: int) -> float:
    """Mean position of ``count`` studies if they were all at the top of the worklist."""
    return (count + 1) / 2 if count > 0 else float("nan")
