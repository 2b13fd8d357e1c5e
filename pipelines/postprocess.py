"""Post-processing of scored ticks, shared by calibration and scoring: smoothing per entity in time
order (Polars window expressions, O(rows)), then the calibrated threshold."""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from dmafn.postprocess import fit_threshold
from dmafn.spec import SmoothingSpec, Spec


def smoothed(column: str, method: str, *, alpha: float, window: int, over: list[str]) -> pl.Expr:
    """Causal smoothing of `column` within each `over` group (rows already in time order): NaN/null ticks are
    skipped (the state carries over them) and stay null - the same values as `dmafn.postprocess.smooth`."""
    values = pl.col(column).cast(pl.Float64).fill_nan(None)
    if method == "none":
        out = values
    elif method == "ewma":
        out = values.ewm_mean(alpha=alpha, adjust=False, ignore_nulls=True, min_samples=1)
    elif method == "rolling":
        out = values.rolling_mean(window_size=window, min_samples=1)
    else:
        raise ValueError(f"unknown smoothing {method!r} (none, ewma, rolling)")
    return pl.when(values.is_not_null()).then(out.over(over)).otherwise(None).alias(column)


def smooth_columns(df: pl.DataFrame, columns: list[str], spec: Spec, *, by: tuple[str, ...] = ()) -> pl.DataFrame:
    """Smooth score columns per entity (and per each `by` column, e.g. the date), causally, in tick order (the
    spec's `score.smoothing`)."""
    sm: SmoothingSpec = spec.score.smoothing
    df = df.sort([*spec.entity, *by, "ts"])
    if sm.method == "none" or df.is_empty():
        return df
    over = [*spec.entity, *by]
    return df.with_columns([smoothed(c, sm.method, alpha=sm.alpha, window=sm.window, over=over) for c in columns])


def calibrate_threshold(keys: pl.DataFrame, scores: np.ndarray, spec: Spec) -> tuple[float, dict[str, Any]]:
    """Fit the spec's threshold on smoothed validation scores; returns (threshold, validation summary)."""
    df = smooth_columns(keys.with_columns(pl.Series("score", scores)), ["score"], spec)
    smoothed = df["score"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    thr = spec.score.threshold
    threshold = fit_threshold(smoothed, thr.method, risk=thr.risk, quantile=thr.quantile, value=thr.value,
                              level=thr.level)
    finite = smoothed[np.isfinite(smoothed)]
    summary = {"validation_ticks": int(len(smoothed)), "validation_scored": int(finite.size),
               "validation_alarm_rate": float((finite > threshold).mean()) if finite.size else 0.0,
               "validation_score_p50": float(np.median(finite)) if finite.size else None,
               "validation_score_p99": float(np.quantile(finite, 0.99)) if finite.size else None,
               "threshold_method": thr.method}
    return float(threshold), summary
