"""Parquet files of date-partitioned tables: listing (`key=YYYY-MM-DD` folders) and opening, with errors that
name the file. Plain pyarrow, no Ray: a shard's task reads its files with these."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.storage import DataError

PARTITION_COLUMN = "date"


def open_parquet(filesystem: pafs.FileSystem, path: str) -> pq.ParquetFile:
    """The Parquet file at `path` (footer read); DataError naming the file when it is not Parquet."""
    try:
        return pq.ParquetFile(filesystem.open_input_file(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def read_columns(parquet: pq.ParquetFile, path: str, columns: list[str]) -> pa.Table:
    """The file's `columns`; DataError naming the file when its pages cannot be read or decoded."""
    try:
        return parquet.read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def list_parquet_files(filesystem: pafs.FileSystem, folders: dict[dt.date, str]) -> list[tuple[str, str, int]]:
    """(date, path, bytes) of the Parquet files under each date's folder, by date then path. Files whose
    names start with `.` or `_` are skipped (Spark/Delta side files); DataError names a folder that cannot
    be listed."""
    files: list[tuple[str, str, int]] = []
    for date, folder in sorted(folders.items()):
        try:
            infos = filesystem.get_file_info(pafs.FileSelector(folder, recursive=True))
        except OSError as exc:
            raise DataError(f"{folder}: cannot be listed ({exc})") from None
        files += [(date.isoformat(), i.path, i.size or 0) for i in sorted(infos, key=lambda i: i.path)
                  if i.is_file and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))]
    return files
