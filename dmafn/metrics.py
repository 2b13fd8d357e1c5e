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
    return count_metrics(int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum()), int((~p & ~y).sum()))


def f1_of(precision: float, recall: float) -> float:
    """The harmonic mean of precision and recall (0 where both are 0)."""
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def count_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """`point_metrics` from the confusion counts."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = f1_of(precision, recall)
    return {"precision": precision, "recall": recall, "f1": f1,
            "far": fp / (fp + tn) if fp + tn else 0.0, "mar": fn / (fn + tp) if fn + tp else 0.0}


def event_metrics(predicted: np.ndarray, labels: np.ndarray, min_ticks: int = 1) -> dict[str, float]:
    """Event-wise: recall = share of labelled events with at least one alarm inside; precision = share of
    alarm events that overlap a labelled event. With `min_ticks` N only the alarm events (runs of alarm ticks) of
    N ticks or more count, as `dmafn alarms --min-ticks N` lists them: a labelled event is caught when one of those
    overlaps it (the run may reach outside it)."""
    p, y = np.asarray(predicted).astype(bool), np.asarray(labels).astype(bool)
    true_events = events(y)
    alarm_events = [(s, e) for s, e in events(p) if e - s + 1 >= min_ticks]
    p = np.zeros_like(p)
    for s, e in alarm_events:
        p[s:e + 1] = True
    hit = sum(bool(p[s:e + 1].any()) for s, e in true_events)
    good = sum(bool(y[s:e + 1].any()) for s, e in alarm_events)
    recall = hit / len(true_events) if true_events else 0.0
    precision = good / len(alarm_events) if alarm_events else 0.0
    f1 = f1_of(precision, recall)
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


class RankingTally:
    """ROC-AUC, PR-AUC and the oracle best-F1 threshold of a score column read in chunks, exactly as `roc_auc`,
    `pr_auc` and `postprocess.best_f1_threshold` give them on the whole column, holding only the positives.

    Two passes over the chunks: `add_positives` keeps the finite scores of the labelled ticks (with an integer
    group each, e.g. the anomaly kind); after `freeze`, `add_negatives` counts for each positive the negatives
    scored below it and equal to it - or `count_negatives` counts a chunk's where it lies (a copy of the frozen
    tally), and `add_counts` adds the counts, summed in any order. Memory: the positives plus one chunk, whatever
    the number of negatives."""

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self.positives = np.empty(0)             # ascending, after freeze
        self.groups = np.empty(0, np.int64)
        self._below = np.zeros(1, np.int64)       # difference arrays over the sorted positives
        self._equal = np.zeros(1, np.int64)
        self._cumulative: tuple[np.ndarray, np.ndarray] | None = None    # their cumulative sums, when asked
        self.negatives = 0
        self.max_score = -np.inf                  # of the finite negatives, for an oracle without positives
        self._at_max = 0                          # negatives scored max_score

    def add_positives(self, scores: np.ndarray, groups: np.ndarray | None = None) -> None:
        s = np.asarray(scores, float)
        g = np.zeros(len(s), np.int64) if groups is None else np.asarray(groups, np.int64)
        keep = np.isfinite(s)
        if keep.any():
            self._chunks.append((s[keep], g[keep]))

    def freeze(self) -> None:
        """End of the first pass: sort the positives."""
        s = np.concatenate([c[0] for c in self._chunks]) if self._chunks else np.empty(0)
        g = np.concatenate([c[1] for c in self._chunks]) if self._chunks else np.empty(0, np.int64)
        order = np.argsort(s, kind="stable")
        self.positives, self.groups, self._chunks = s[order], g[order], []
        self._below = np.zeros(len(s) + 1, np.int64)
        self._equal = np.zeros(len(s) + 1, np.int64)
        self._cumulative = None

    def count_negatives(self, scores: np.ndarray) -> "NegativeCounts":
        """What `add_negatives` adds for these negatives, as a `NegativeCounts` (computed where they lie; added up
        with `+` and into a tally with `add_counts`, in any order)."""
        s = np.asarray(scores, float)
        s = np.sort(s[np.isfinite(s)])           # sorted queries: the searches below run ~3x faster
        n = len(self.positives) + 1
        if not s.size:
            return NegativeCounts(np.zeros(n, np.int64), np.zeros(n, np.int64), 0, -np.inf, 0)
        above = np.bincount(np.searchsorted(self.positives, s, "right"), minlength=n)   # first positive > x
        from_ = np.bincount(np.searchsorted(self.positives, s, "left"), minlength=n)   # first positive >= x
        top = float(s[-1])
        return NegativeCounts(above, from_ - above, int(s.size), top, int((s == top).sum()))

    def add_counts(self, counts: "NegativeCounts") -> None:
        """Add negatives counted by `count_negatives` (of this tally's positives)."""
        if len(counts.below) != len(self._below):
            raise ValueError(f"negatives counted against {len(counts.below) - 1} positives, "
                             f"this tally holds {len(self._below) - 1}")
        self._below = self._below + counts.below        # new arrays: a tally read from shared memory is read-only
        self._equal = self._equal + counts.equal
        self._cumulative = None
        self.negatives += counts.n
        self.max_score, self._at_max = _top((self.max_score, self._at_max), (counts.max_score, counts.at_max))

    def add_negatives(self, scores: np.ndarray) -> None:
        self.add_counts(self.count_negatives(scores))

    def _counts(self, group: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The positives of `group` (all: None), ascending, with the negatives below and equal to each."""
        if self._cumulative is None:                  # once per state of the counts, not per metric and group
            self._cumulative = np.cumsum(self._below)[:-1], np.cumsum(self._equal)[:-1]
        below, equal = self._cumulative
        if group is None:
            return self.positives, below, equal
        sel = self.groups == group
        return self.positives[sel], below[sel], equal[sel]

    def roc_auc(self, group: int | None = None) -> float:
        s, below, equal = self._counts(group)
        if not s.size or not self.negatives:
            return float("nan")
        return float((below.sum() + 0.5 * equal.sum()) / (s.size * self.negatives))

    def count_pairs(self, scores: np.ndarray) -> "PairCounts":
        """Some negatives (a part of those counted) against the frozen positives, as pairs: how many (positive,
        negative) pairs rank the negative above and level - their part of `shortfall_of_pairs`."""
        s = np.asarray(scores, float)
        s = s[np.isfinite(s)]
        under = np.searchsorted(self.positives, s, "left")                  # positives strictly below each negative
        level = np.searchsorted(self.positives, s, "right") - under
        return PairCounts(int(under.sum()), int(level.sum()), int(s.size))

    def shortfall(self, group: int | None = None) -> float:
        """The part of 1 - ROC-AUC (over all positives) that the positives of `group` carry: the pairs in which a
        negative outranks one of them (a tie half), over all pairs. Summed over the groups: 1 - `roc_auc()`."""
        s, below, equal = self._counts(group)
        if not self.positives.size or not self.negatives:
            return float("nan")
        return float((s.size * self.negatives - below.sum() - 0.5 * equal.sum())
                     / (self.positives.size * self.negatives))

    def shortfall_of_pairs(self, pairs: "PairCounts") -> float:
        """The part of 1 - ROC-AUC that some negatives carry (`count_pairs`, after every negative was counted):
        the pairs in which one of them outranks a positive (a tie half), over all pairs. Summed over negatives
        that split all of them: 1 - `roc_auc()`."""
        if not self.positives.size or not self.negatives:
            return float("nan")
        return float((pairs.above + 0.5 * pairs.level) / (self.positives.size * self.negatives))

    def _cuts(self, group: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per distinct positive score, descending: the score, positives and negatives at or above it."""
        s, below, _ = self._counts(group)
        s, below = s[::-1], below[::-1]
        last = np.r_[s[1:] != s[:-1], True][:s.size]               # the last of each run of equal scores
        return s[last], np.arange(1, s.size + 1)[last], self.negatives - below[last]

    def pr_auc(self, group: int | None = None) -> float:
        value, tp, fp = self._cuts(group)
        if not value.size:
            return float("nan")
        return float(np.sum(np.diff(np.r_[0, tp]) / tp[-1] * (tp / (tp + fp))))

    def best_f1(self) -> tuple[float, int, int]:
        """The oracle cut, `postprocess.best_f1_threshold`'s: (threshold, flagged positives, flagged negatives);
        `score > threshold` flags them."""
        value, tp, fp = self._cuts(None)
        if not value.size:                                   # nothing to find: the top-scored ticks
            return float(np.nextafter(self.max_score, -np.inf)), 0, self._at_max
        f1 = 2 * tp / np.maximum(tp + fp + len(self.positives), 1)
        best = int(np.argmax(f1))
        return float(np.nextafter(value[best], -np.inf)), int(tp[best]), int(fp[best])

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, precision, recall) at each distinct positive score, from the strictest cut to flagging every
        tick: the corners of the ROC and PR curves (between them only negatives or only positives join)."""
        _, tp, fp = self._cuts(None)
        pos, neg = max(len(self.positives), 1), max(self.negatives, 1)
        fpr, tpr = np.r_[0.0, fp / neg, 1.0], np.r_[0.0, tp / pos, 1.0 if len(self.positives) else 0.0]
        precision = np.r_[1.0, tp / np.maximum(tp + fp, 1)]
        recall = np.r_[0.0, tp / pos]
        return fpr, tpr, np.r_[precision, precision[-1]], np.r_[recall, recall[-1]]


def _top(a: tuple[float, int], b: tuple[float, int]) -> tuple[float, int]:
    """The higher of two (max score, how many scored it), the counts added where they are equal."""
    if a[0] == b[0]:
        return a[0], a[1] + b[1]
    return a if a[0] > b[0] else b


class NegativeCounts:
    """Negatives counted against a `RankingTally`'s positives: for each positive (difference arrays over the sorted
    positives) how many score below it and equal to it, their number and their top score with its count. Two add
    up with `+`."""

    def __init__(self, below: np.ndarray, equal: np.ndarray, n: int, max_score: float, at_max: int) -> None:
        self.below, self.equal, self.n, self.max_score, self.at_max = below, equal, n, max_score, at_max

    def __add__(self, other: "NegativeCounts") -> "NegativeCounts":
        top, at = _top((self.max_score, self.at_max), (other.max_score, other.at_max))
        return NegativeCounts(self.below + other.below, self.equal + other.equal, self.n + other.n, top, at)


class PairCounts:
    """Negatives counted against a `RankingTally`'s positives as pairs (`RankingTally.count_pairs`): the (positive,
    negative) pairs that rank the negative above, those level, and the negatives' number. Two add up with `+`."""

    def __init__(self, above: int, level: int, n: int) -> None:
        self.above, self.level, self.n = above, level, n

    def __add__(self, other: "PairCounts") -> "PairCounts":
        return PairCounts(self.above + other.above, self.level + other.level, self.n + other.n)
