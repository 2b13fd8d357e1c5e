"""Profile the raw modality history with Dask (on the Ray cluster through dask-on-ray):
per modality and day - rows, entities, median sampling period, gaps, nulls, duplicate keys, and rows
whose time falls outside their date partition (late or misfiled rows)."""
from __future__ import annotations

import datetime as dt
import logging

import dask.dataframe as dd
import pandas as pd
import polars as pl

from dmafn.spec import ModalitySpec, Spec
from pipelines.storage import DataError, Storage, is_s3, list_partitions

log = logging.getLogger(__name__)
GAP_FACTOR = 3.0     # a gap: consecutive rows of one entity further apart than 3x the median period

_META = pd.DataFrame({"date": pd.Series(dtype="str"), "rows": pd.Series(dtype="int64"),
                      "entities": pd.Series(dtype="int64"), "median_period_s": pd.Series(dtype="float64"),
                      "gaps": pd.Series(dtype="int64"), "nulls": pd.Series(dtype="int64"),
                      "duplicate_keys": pd.Series(dtype="int64"), "outside_partition": pd.Series(dtype="int64")})


def profile_day(day: pd.DataFrame, keys: list[str], time: str, partition: str, value_columns: list[str]) -> pd.DataFrame:
    """One day's rows of one modality -> one profile row (a plain pandas function, tested without Dask)."""
    ts = pd.to_datetime(day[time], utc=True)
    ordered = day.assign(_ts=ts).sort_values([*keys, "_ts"])
    diffs = ordered.groupby(keys, observed=True)["_ts"].diff().dt.total_seconds().dropna()
    median = float(diffs.median()) if len(diffs) else float("nan")
    gaps = int((diffs > GAP_FACTOR * median).sum()) if len(diffs) and median > 0 else 0
    date = str(day[partition].iloc[0])
    return pd.DataFrame({
        "date": [date], "rows": [len(day)], "entities": [int(day[keys].drop_duplicates().shape[0])],
        "median_period_s": [median], "gaps": [gaps], "nulls": [int(day[value_columns].isna().sum().sum())],
        "duplicate_keys": [int(ordered.duplicated([*keys, "_ts"]).sum())],
        "outside_partition": [int((ts.dt.strftime("%Y-%m-%d") != date).sum())]})


def _modality_frame(spec: Spec, m: ModalitySpec, storage: Storage, dates: list[dt.date]) -> dd.DataFrame:
    parts = list_partitions(storage, m.path, spec.partition)
    found = [d for d in dates if d in parts]
    if not found:
        raise DataError(f"modality '{m.name}' ({m.path}): no partitions in {dates[0]}..{dates[-1]}")
    columns = list(dict.fromkeys([*spec.entity, spec.time, *m.value_columns]))
    s3 = is_s3(m.path)
    opts = {"filesystem": storage.filesystem(m.path)} if s3 else {}
    frames = [dd.read_parquet(("s3://" + parts[d]) if s3 else parts[d], columns=columns, **opts)
              .assign(**{spec.partition: d.isoformat()}) for d in found]
    return dd.concat(frames)


def profile(spec: Spec, start: dt.date, end: dt.date, *, use_ray: bool = True) -> pl.DataFrame:
    """Profile every modality over [start, end]; one row per modality and day."""
    storage = Storage.from_spec(spec.storage)
    dates = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    scheduler = None
    if use_ray:
        from ray.util.dask import ray_dask_get

        scheduler = ray_dask_get
    results = []
    for name, m in spec.modalities.items():
        if m.context_of:                  # a slow view reads its parent's rows: profiled once, as the parent
            continue
        frame = _modality_frame(spec, m, storage, dates)
        summary = frame.assign(_day=frame[spec.partition]).groupby("_day").apply(   # the key column stays in each group
            profile_day, keys=list(spec.entity), time=spec.time, partition=spec.partition,
            value_columns=list(m.value_columns), meta=_META)
        out = summary.compute(scheduler=scheduler) if scheduler else summary.compute()
        results.append(pl.from_pandas(out.reset_index(drop=True)).with_columns(pl.lit(name).alias("modality")))
    table = pl.concat(results).select(["modality", *_META.columns]).sort(["modality", "date"])
    return table.with_columns(pl.col("median_period_s").fill_nan(None))
