"""Honest metrics: point-wise precision / recall / F1 / FAR / MAR, ROC-AUC, PR-AUC, event-wise (range)
precision / recall / F1. Point-adjusted F1 exists only inside `report`, next to the point-wise F1.
"""
from __future__ import annotations

import numpy as np

from dmafn.postprocess import events


def _clean(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    keep = np.isfinite(scores)
    return scores[keep], labels[keep]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count half), NaN when only one class is present."""
    s, y = _clean(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step-wise), NaN without positives."""
    s, y = _clean(scores, labels)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(~y)[distinct]
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def point_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Point-wise precision, recall, F1, false alarm rate (FP / negatives) and missed alarm rate (FN / positives)."""
    p, y = np.asarray(predicted).astype(bool), np.asarray(labels).astype(bool)
    tp, fp, fn, tn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum()), int((~p & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "far": fp / (fp + tn) if fp + tn else 0.0, "mar": fn / (fn + tp) if fn + tp else 0.0}


def event_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Event-wise: recall = share of labelled events with at least one alarm inside; precision = share of
    alarm events that overlap a labelled event."""
    p, y = np.asarray(predicted).astype(bool), np.asarray(labels).astype(bool)
    true_events, alarm_events = events(y), events(p)
    hit = sum(bool(p[s:e + 1].any()) for s, e in true_events)
    good = sum(bool(y[s:e + 1].any()) for s, e in alarm_events)
    recall = hit / len(true_events) if true_events else 0.0
    precision = good / len(alarm_events) if alarm_events else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"event_precision": precision, "event_recall": recall, "event_f1": f1,
            "events": len(true_events), "alarms": len(alarm_events)}


def point_adjust(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Point adjustment: a labelled event counts as fully detected if any point in it is. Inflates scores;
    only ever reported next to the point-wise numbers."""
    p, y = np.asarray(predicted).astype(bool).copy(), np.asarray(labels).astype(bool)
    for s, e in events(y):
        if p[s:e + 1].any():
            p[s:e + 1] = True
    return p


def report(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """All metrics for one score series and a threshold (series in time order for event metrics)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    predicted = np.nan_to_num(scores, nan=-np.inf) > threshold
    out = {"roc_auc": roc_auc(scores, labels), "pr_auc": pr_auc(scores, labels)}
    out.update(point_metrics(predicted, labels))
    out.update(event_metrics(predicted, labels))
    out["f1_point_adjusted"] = point_metrics(point_adjust(predicted, labels), labels)["f1"]
    return out
