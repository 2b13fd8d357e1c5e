"""Reading the optional labels table (entity, start, end[, kind]) named in the spec."""
from __future__ import annotations

import polars as pl
import pyarrow.dataset as pads

from dmafn.spec import Spec
from pipelines.storage import DataError, Storage


def read_labels(spec: Spec, storage: Storage) -> pl.DataFrame:
    """The labels as a Polars table; DataError naming the path or column when unusable."""
    if spec.labels is None:
        raise DataError(f"{spec.source}: the spec has no 'labels' section")
    path = spec.labels.path
    try:
        table = pads.dataset(storage.fs_path(path), filesystem=storage.filesystem(path), format="parquet").to_table()
    except (OSError, FileNotFoundError) as exc:
        raise DataError(f"labels {path}: cannot be read ({exc})") from None
    df = pl.from_arrow(table)
    for col in [*spec.entity, spec.labels.start, spec.labels.end]:
        if col not in df.columns:
            raise DataError(f"labels {path}: column '{col}' not found; columns are {df.columns}")
    return df
