"""Post-processing: smoothing, score normalisation, thresholds, binary labels and alarm events.

Thresholds are named, versioned calibrations fitted on validation scores (no hidden contamination rate):
- quantile: the q-quantile of validation scores;
- rate: the score a given share of validation scores exceeds (an alarm budget, e.g. 1 % of ticks);
- pot: peaks over threshold (Siffer et al., SPOT): a generalised Pareto fit to the excesses over an
  initial high level, giving the score exceeded with probability `risk`;
- fixed: a value given in the spec;
- best_f1: the threshold maximising F1 on labelled data, an oracle, only for reports.
"""
from __future__ import annotations

import math

import numpy as np

from dmafn.validation import Values, as_values, excess_moments


def ewma(scores: np.ndarray, alpha: float) -> np.ndarray:
    """Causal exponentially weighted moving average; NaNs are skipped (the state carries over)."""
    out = np.empty(len(scores))
    state = math.nan
    for i, value in enumerate(scores):
        if not math.isnan(value):
            state = value if math.isnan(state) else alpha * value + (1 - alpha) * state
        out[i] = state if not math.isnan(value) else math.nan
    return out


def rolling_mean(scores: np.ndarray, window: int) -> np.ndarray:
    """Causal rolling mean over the last `window` values (NaN-aware)."""
    valid = ~np.isnan(scores)
    csum = np.concatenate([[0.0], np.cumsum(np.where(valid, scores, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(valid)])
    idx = np.arange(1, len(scores) + 1)
    lo = np.maximum(idx - window, 0)
    total, count = csum[idx] - csum[lo], ccount[idx] - ccount[lo]
    return np.where(valid, total / np.maximum(count, 1), np.nan)


def soften(scores: np.ndarray, knee: float | None) -> np.ndarray:
    """Each value over `knee` counts only by the log of its excess: knee + ln(1 + value - knee); the rest (and
    every value with `knee` None) as it is. Monotone, so the order of the ticks is kept; what it bounds is how
    long one tick of overwhelming evidence (a tail surprise of 50, one in 10^50) holds a smoothed score up after
    the evidence is gone."""
    scores = np.asarray(scores, float)
    if knee is None:
        return scores
    return np.where(scores > knee, knee + np.log1p(np.maximum(scores - knee, 0.0)), scores)


def smooth(scores: np.ndarray, method: str, alpha: float = 0.3, window: int = 5,
           knee: float | None = None) -> np.ndarray:
    """Smooth one time-ordered series: none | ewma | rolling; with `knee`, each value `soften`ed first (not with
    none: nothing is carried from tick to tick there)."""
    if method == "none":
        return np.asarray(scores, float)
    if method == "ewma":
        return ewma(soften(scores, knee), alpha)
    if method == "rolling":
        return rolling_mean(soften(scores, knee), window)
    raise ValueError(f"unknown smoothing {method!r} (none, ewma, rolling)")


EWMA_SERIES_AT_ONCE = 16    # from this many series (groups x columns) `smooth_by_group` steps their EWMAs together
EWMA_MAX_PADDING = 4        # ... unless their lengths differ so much that the padded steps are over 4x the values


def smooth_by_group(scores: np.ndarray, groups: np.ndarray, method: str, alpha: float = 0.3,
                    window: int = 5, knee: float | None = None) -> np.ndarray:
    """Smooth each group's series separately (one sort, not a scan per group); rows must already be in time
    order within each group. `scores` (N,) or (N, k): each column smoothed on its own. An EWMA of many series
    steps them all at once (`_ewma_together`: one array operation per time step, not a Python step per value),
    with the same arithmetic as `ewma`, so the same values to the bit."""
    scores = np.asarray(scores, float)
    out = np.empty(scores.shape)
    if out.size == 0:
        return out
    groups = np.asarray(groups)
    if groups.dtype.kind in "iu" and (np.diff(groups) >= 0).all():    # numbered in order already: no sort
        order = np.arange(len(groups))
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    else:
        _, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    columns = scores.reshape(len(scores), -1)
    lengths = np.diff(np.r_[starts, len(order)])
    if (method == "ewma" and len(starts) * columns.shape[1] >= EWMA_SERIES_AT_ONCE
            and len(starts) * lengths.max() <= EWMA_MAX_PADDING * len(order)):
        out.reshape(len(scores), -1)[order] = _ewma_together(soften(columns[order], knee), lengths, alpha)
        return out
    for rows in np.split(order, starts[1:]):
        out.reshape(len(scores), -1)[rows] = np.stack(
            [smooth(columns[rows, j], method, alpha, window, knee) for j in range(columns.shape[1])], 1)
    return out


def _ewma_together(values: np.ndarray, lengths: np.ndarray, alpha: float) -> np.ndarray:
    """`ewma` of consecutive series (`values` (N, k), rows grouped into series of `lengths`, each column its own
    series too), stepping every series at once: the t-th values of all of them per array operation - the same
    arithmetic per value as `ewma` (NaNs skipped, the state carried over them)."""
    held = np.arange(int(lengths.max())) < lengths[:, None]              # (series, steps): the steps each has
    padded = np.full((*held.shape, values.shape[1]), np.nan)
    padded[held] = values                                               # row-major: series by series, in order
    state = np.full((len(lengths), values.shape[1]), np.nan)
    smoothed = np.empty(padded.shape)
    for t in range(held.shape[1]):
        value = padded[:, t]
        seen = ~np.isnan(value)
        blended = np.where(np.isnan(state), value, alpha * value + (1 - alpha) * state)
        state = np.where(seen, blended, state)
        smoothed[:, t] = np.where(seen, state, np.nan)
    return smoothed[held]


def gpd_fit(excesses: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto (shape gamma, scale sigma) by probability-weighted moments (Hosking & Wallis 1987)."""
    return gpd_from_moments(*excess_moments(excesses))


def gpd_from_moments(n: int, b0: float, b1: float) -> tuple[float, float]:
    """`gpd_fit` from n excesses' probability-weighted moments b0 = E[X] and b1 = E[X F(X)]
    (`dmafn.validation.excess_moments`)."""
    if n < 3:
        return 0.0, float(max(b0 if n else 1.0, 1e-9))
    # With a0 = E[X] and a1 = E[X (1 - F)] = b0 - b1: k = a0 / (a0 - 2 a1) - 2, sigma = 2 a0 a1 / (a0 - 2 a1)
    a0, a1 = b0, b0 - b1
    denom = a0 - 2 * a1
    if denom <= 0:
        return 0.0, float(max(b0, 1e-9))
    k = a0 / denom - 2
    sigma = 2 * a0 * a1 / denom
    return float(-k), float(max(sigma, 1e-9))             # gamma = -k in the usual GPD parameterisation


POT_MIN_PEAKS = 20     # fewer values over `level`: an exponential tail over the highest 20 (a quarter at most)


def pot_threshold(scores: np.ndarray | Values, risk: float, level: float = 0.98) -> float:
    """Score exceeded with probability `risk`: z_q = t + sigma/gamma * ((risk * n / N_t) ** -gamma - 1).
    `scores`: an array or `dmafn.validation.Values` (the finite ones count). Where `risk` lies inside the
    values (risk * n at least the values over `level`), their (1 - risk) quantile. Where fewer than
    `POT_MIN_PEAKS` values lie over `level` (under 1,000 values at 0.98), too few for the GPD's shape, the tail
    over the highest `POT_MIN_PEAKS` (a quarter of the values at most) is fitted as exponential (the GPD of shape
    0: its scale the mean excess) - before 2026-12-08, with fewer than 3 the (1 - risk) quantile was taken, which
    for under 1 / risk values is their largest, whatever the risk asked."""
    values = as_values(scores)
    n = values.count()
    if n < 10:
        raise ValueError(f"POT needs at least 10 validation scores, got {n}")
    t = float(values.quantiles([level])[0])
    n_t, b0, b1 = values.excess_moments(t)           # where the values lie, not the excesses themselves
    if risk * n >= n_t:
        return float(values.quantiles([1 - risk])[0])
    if n_t < POT_MIN_PEAKS:
        return _exponential_tail_threshold(values, n, risk)
    gamma, sigma = gpd_from_moments(n_t, b0, b1)
    ratio = risk * n / n_t
    if abs(gamma) < 1e-6:
        return t - sigma * math.log(ratio)
    return t + sigma / gamma * (ratio ** (-gamma) - 1)


def _exponential_tail_threshold(values: Values, n: int, risk: float) -> float:
    """`pot_threshold` for few peaks: over t, the quantile with k = min(POT_MIN_PEAKS, n // 4) values above it
    (3 at least), t + mean excess * ln(k / (risk * n)); the (1 - risk) quantile where ties leave no excess."""
    k = max(3, min(POT_MIN_PEAKS, n // 4))
    t = float(values.quantiles([1.0 - k / n])[0])
    n_t, mean_excess = values.excess_mean(t)
    if n_t < 3 or mean_excess <= 0 or risk * n >= n_t:
        return float(values.quantiles([1 - risk])[0])
    return t + mean_excess * math.log(n_t / (risk * n))


def fit_threshold(scores: np.ndarray | Values, method: str, *, risk: float = 1e-3, quantile: float = 0.99,
                  value: float | None = None, level: float = 0.98, rate: float = 0.01) -> float:
    """A threshold from validation scores by a named method: pot | quantile | rate (the share of validation
    scores that may exceed it: an alarm budget) | fixed. `scores`: an array or `dmafn.validation.Values`
    (the finite ones count)."""
    if method == "fixed":
        if value is None:
            raise ValueError("threshold method 'fixed' needs a value")
        return float(value)
    values = as_values(scores)
    if values.count() == 0:
        raise ValueError("no finite validation scores to fit a threshold on")
    if method == "quantile":
        return float(values.quantiles([quantile])[0])
    if method == "rate":
        return float(values.quantiles([1.0 - rate])[0])
    if method == "pot":
        return pot_threshold(values, risk, level)
    raise ValueError(f"unknown threshold method {method!r} (pot, quantile, rate, fixed)")


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray, max_far: float | None = None) -> float:
    """Oracle: the threshold with the best point-wise F1 on labelled scores (report only, never deploy).

    Used as `score > threshold`, it flags exactly the best set of top-scored ticks. With `max_far`, only
    thresholds whose false-alarm rate (FP / negatives) is at most `max_far` are considered."""
    finite = np.isfinite(scores)
    s, y = scores[finite], labels[finite].astype(bool)
    if s.size == 0:
        raise ValueError("no finite scores to choose a threshold on")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)                                     # flagging the top i+1 ticks
    fp = np.cumsum(~y)
    f1 = 2 * tp / np.maximum(tp + fp + y.sum(), 1)
    allowed = np.r_[s[1:] != s[:-1], True]                # cut only between distinct scores
    if max_far is not None:
        allowed &= fp <= max_far * max((~y).sum(), 1)
    if not allowed.any():
        return float(s[0])                                # nothing may be flagged
    best = int(np.argmax(np.where(allowed, f1, -1)))
    return float(np.nextafter(s[best], -np.inf))          # > this flags s[best] and everything above


def to_labels(scores: np.ndarray, threshold: float) -> np.ndarray:
    """0/1 per tick: 1 where score > threshold (NaN scores are 0)."""
    return (np.nan_to_num(scores, nan=-np.inf) > threshold).astype(np.int8)


def events(binary: np.ndarray, max_gap: int = 0) -> list[tuple[int, int]]:
    """Group consecutive 1s into (start, end) index ranges, inclusive; gaps of <= max_gap zeros are bridged."""
    idx = np.flatnonzero(np.asarray(binary).astype(bool))
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)               # an event ends at idx[b], the next starts after
    starts, ends = idx[np.r_[0, breaks + 1]], idx[np.r_[breaks, idx.size - 1]]
    return [(int(a), int(b)) for a, b in zip(starts, ends)]
