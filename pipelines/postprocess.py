"""Smoothing of scored ticks per entity in time order with Polars window expressions (O(rows)): the same
values as `dmafn.postprocess.smooth`, which `dmafn.calibration.Calibration` uses."""
from __future__ import annotations

import polars as pl

from dmafn.spec import SmoothingSpec, Spec


def smoothed(column: str, method: str, *, alpha: float, window: int, over: list[str],
             knee: float | None = None) -> pl.Expr:
    """Causal smoothing of `column` within each `over` group (rows already in time order): NaN/null ticks are
    skipped (the state carries over them) and stay null; with `knee`, each value over it counts by the log of its
    excess - the same values as `dmafn.postprocess.smooth`."""
    values = pl.col(column).cast(pl.Float64).fill_nan(None)
    carried = values if knee is None or method == "none" else (
        pl.when(values > knee).then(knee + (values - knee).log1p()).otherwise(values))
    if method == "none":
        out = values
    elif method == "ewma":
        out = carried.ewm_mean(alpha=alpha, adjust=False, ignore_nulls=True, min_samples=1)
    elif method == "rolling":
        out = carried.rolling_mean(window_size=window, min_samples=1)
    else:
        raise ValueError(f"unknown smoothing {method!r} (none, ewma, rolling)")
    return pl.when(values.is_not_null()).then(out.over(over)).otherwise(None).alias(column)


def run_number(flag: str, over: str) -> pl.Expr:
    """Numbers the runs of equal values of `flag` within each `over` group (rows in time order): consecutive
    flagged ticks share a number, as `dmafn.postprocess.events` groups them."""
    return (pl.col(flag) != pl.col(flag).shift(1)).fill_null(True).cum_sum().over(over)


def mark_runs(rows: pl.DataFrame, flag: str, over: str) -> pl.DataFrame:
    """`rows` (in time order within each `over` group, a group's rows in one block or spread: they are grouped
    stably) with `_run` (`run_number`), `_last` (the group's last run: it may go on in the next chunk of a window
    read in chunks) and `_end` (the group's last row)."""
    return (rows.with_row_index("_i").sort(over, maintain_order=True)
            .with_columns(run_number(flag, over).alias("_run"))
            .with_columns((pl.col("_run") == pl.col("_run").max().over(over)).alias("_last"),
                          (pl.col("_i") == pl.col("_i").max().over(over)).alias("_end")))


def open_runs(marked: pl.DataFrame, flag: str) -> pl.DataFrame:
    """The rows of `mark_runs` output that the next chunk needs: each group's last run where `flag` is set (it may
    go on), else the group's last row (whether the next chunk's first row starts a run); helper columns dropped."""
    return marked.filter(pl.col("_last") & (pl.col(flag) | pl.col("_end"))).drop("_i", "_run", "_last", "_end")


def smooth_columns(df: pl.DataFrame, columns: list[str], spec: Spec, *, by: tuple[str, ...] = (),
                   smoothing: SmoothingSpec | None = None) -> pl.DataFrame:
    """Smooth score columns per entity (and per each `by` column, e.g. the date), causally, in tick order
    (`smoothing`, default the spec's `score.smoothing`)."""
    sm: SmoothingSpec = smoothing or spec.score.smoothing
    df = df.sort([*spec.entity, *by, "ts"])
    if sm.method == "none" or df.is_empty():
        return df
    over = [*spec.entity, *by]
    return df.with_columns([smoothed(c, sm.method, alpha=sm.alpha, window=sm.window, over=over, knee=sm.knee)
                            for c in columns])
