"""Post-processing of scored ticks, shared by calibration and scoring: smoothing per entity in time
order, then the calibrated threshold."""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from dmafn.postprocess import fit_threshold, smooth_by_group
from dmafn.spec import Spec


def _groups(df: pl.DataFrame, spec: Spec) -> np.ndarray:
    return df.select(pl.concat_str([pl.col(k).cast(pl.String) for k in spec.entity], separator="|")).to_series() \
        .to_numpy()


def smooth_columns(df: pl.DataFrame, columns: list[str], spec: Spec) -> pl.DataFrame:
    """Smooth score columns per entity, causally, in tick order (the spec's `score.smoothing`)."""
    sm = spec.score.smoothing
    df = df.sort([*spec.entity, "ts"])
    if sm.method == "none" or df.is_empty():
        return df
    groups = _groups(df, spec)
    return df.with_columns([
        pl.Series(c, smooth_by_group(df[c].cast(pl.Float64).fill_null(np.nan).to_numpy(), groups, sm.method,
                                     sm.alpha, sm.window)).fill_nan(None)
        for c in columns])


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
