"""Profile the raw modality history with Dask (on the Ray cluster through dask-on-ray): per modality and day -
rows, entities, median sampling period, gaps, nulls, duplicate keys, and rows whose time falls outside their
date partition (late or misfiled rows).

Two passes; a task holds a few row groups or one shuffled partition, never a day or the window, and the
driver holds a row per file and per modality and day:
1. per file (`file_counts`), a row group at a time: rows, null cells, rows outside the partition and its row
   groups (a column's nulls come from the Parquet statistics where those are exact and the column cannot hold
   NaN: images are not read);
2. per few row groups (`key_rows`): the entity (a 64-bit hash of its key columns' text) and time, numbers only,
   shuffled by Dask on (modality and day, entity) into partitions of about `PARTITION_ROWS` rows, so that each
   entity's rows of a day are together; per entity its median period, gaps and repeated keys
   (`entity_periods`). The data is read once: the shuffle moves 20 bytes a row.
Dask's group-by merges the entities per modality and day.

Every shuffle on Ray is Dask's task shuffle (`_compute`): its disk shuffle (which Dask picks for a group-by
median) writes a partd folder on one worker's local disk, which another node cannot read and which is left
behind in its temp folder.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, replace

import dask
import dask.dataframe as dd
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dmafn.spec import ModalitySpec, Spec, held_name, with_stored_names
from pipelines.align import date_end_us, date_start_us, to_micros
from pipelines.delta_sink import DeletedRows
from pipelines.ingest import check_columns, entity_string, of_listed_date, read_times, timed_outside
from pipelines.parquet_files import (RowTimes, column_chunk, each_row_group, field_of, file_values, in_file,
                                     list_table_files, open_parquet, row_groups_between, with_path_fields)
from pipelines.storage import DataError, Storage
from pipelines.stored_times import is_count

log = logging.getLogger(__name__)
GAP_FACTOR = 3.0                # a gap: rows of one entity further apart than 3x its median period that day
PARTITION_ROWS = 2_000_000      # rows per shuffled partition of pass 2 (~40 MB shuffled, ~0.5 GB to work on)
PART_ROWS = 2_000_000           # rows read by one pass-2 task (whole row groups; at least one)
COLUMNS = ["modality", "date", "rows", "entities", "median_period_s", "gaps", "nulls", "duplicate_keys",
           "outside_partition"]

_FILE_META = pd.DataFrame({"path": pd.Series(dtype="str"), "modality": pd.Series(dtype="str"),
                           "date": pd.Series(dtype="str"),
                           "rows": pd.Series(dtype="int64"), "nulls": pd.Series(dtype="int64"),
                           "outside_partition": pd.Series(dtype="int64"), "row_groups": pd.Series(dtype="int64")})
_KEY_META = pd.DataFrame({"_day": pd.Series(dtype="int32"), "_entity": pd.Series(dtype="uint64"),
                          "_us": pd.Series(dtype="int64")})
_PERIODS_META = pd.DataFrame({"_day": pd.Series(dtype="int32"), "period_s": pd.Series(dtype="float64"),
                              "gaps": pd.Series(dtype="int64"), "duplicate_keys": pd.Series(dtype="int64")})


@dataclass(frozen=True)
class Columns:
    """What a modality's files must hold: entity columns, the time column (a timestamp, or integers counting the
    spec's `time_unit`), value columns."""

    modality: str
    keys: tuple[str, ...]
    time: str
    values: tuple[str, ...]
    time_unit: str | None = None
    naive_zone: str | None = None       # `naive_times: local`: the zone whose wall clock a naive time shows
    time_format: str | tuple[str, ...] | None = None   # how a time stored as text is written, when not ISO 8601
    former_names: tuple[tuple[str, tuple[str, ...]], ...] = ()   # columns renamed upstream (the modality's)
    missing_values: tuple[tuple[str, tuple[float, ...]], ...] = ()   # their writer's numbers for a missing value

    @classmethod
    def of(cls, spec: Spec, m: ModalitySpec) -> "Columns":
        keys, time = spec.entity_in(m), spec.time_in(m)                 # as the modality's files name them
        values = tuple(c for c in dict.fromkeys(m.value_columns) if c not in (*keys, time))
        return cls(m.name, keys, time, values, spec.time_unit_in(m), spec.naive_zone_in(m), spec.time_format_in(m),
                   m.former_names, m.missing_values)

    def in_file(self, schema: pa.Schema) -> "Columns":
        """The same columns as a file with this schema names them: a column it lacks under the first of its other
        names (`former_names`) it holds."""
        def stored(c: str) -> str:
            return held_name(self.former_names, c, lambda n: field_of(schema, n) is not None)
        return replace(self, keys=tuple(map(stored, self.keys)), time=stored(self.time),
                       values=tuple(map(stored, self.values)))

    @property
    def key_and_time(self) -> list[str]:
        return [*self.keys, self.time]

    def check(self, schema: pa.Schema, path: str) -> None:
        """DataError naming the file and the column when a column is missing or the time is not a timestamp."""
        check_columns(schema, self.modality, [*self.key_and_time, *self.values], self.time, path, self.time_unit,
                      self.keys)

    def times(self, table: pa.Table) -> tuple[pl.DataFrame, int, int]:
        """`table`'s key and time columns, the time as a timestamp (`read_times`), and how many of its stored
        times could not be read (their time null): integer counts no timestamp holds (beyond any date), texts that
        are no time (as good as none)."""
        stored = table.schema.field(self.time).type
        table, bad = read_times(table.select(self.key_and_time), self.time, self.time_unit, self.naive_zone,
                                self.time_format, self.keys)
        unread = 0 if bad is None else bad.is_not_null().sum()
        return (pl.from_arrow(table), *((unread, 0) if is_count(stored) else (0, unread)))


@dataclass(frozen=True)
class FilePart:
    """Pass 1's unit: one Parquet file of a modality's date partition."""

    columns: Columns
    date: dt.date
    path: str
    storage: Storage
    table: str                      # the modality's path: which filesystem the file is on
    zone: str = "UTC"               # the spec's timezone: where the partition's date begins and ends
    lateness_us: int = 0            # the spec's lateness: rows filed up to this long after their time are in place
    deleted: DeletedRows | None = None   # the rows a Delta deletion vector removes from the file: not counted
    name: str = ""                  # its name inside its date's folder (`ListedFile.name`: its folders' values)
    span: tuple[dt.date, dt.date] | None = None   # a file listed under each date its rows span: their first and
                                                  # last (`InputFile.span`); its rows of `date` are counted
    table_columns: tuple[str, ...] = ()           # a table's columns a file may lack (`InputFile.table_columns`), their
    stored_names: tuple[tuple[str, str], ...] = ()  # physical names: one the file lacks is null (`file_values`)

    def row_groups_of_date(self, parquet, cols: "Columns") -> list[int]:
        """The file's row groups that may hold rows of `date` by their time statistics: of a file listed under
        each date its rows span (`span`), those whose times reach into the date; of any other file, all."""
        kept = None if self.span is None else row_groups_between(
            parquet, cols.time, date_start_us(self.date, self.zone), date_end_us(self.date, self.zone), cols.time_unit,
            cols.naive_zone)
        return list(range(parquet.metadata.num_row_groups)) if kept is None else kept

    def of_date(self, table: pa.Table, cols: "Columns") -> pa.Table:
        """`table` (rows of the file, as `cols` names its columns) less its rows of other dates (`span`)."""
        return of_listed_date(table, cols.time, cols.time_unit, cols.naive_zone, cols.time_format, self.zone,
                              self.date, self.span, cols.keys)


@dataclass(frozen=True)
class RowGroupsPart:
    """Pass 2's unit: consecutive row groups of a file (their entity and time columns are read)."""

    file: FilePart
    row_groups: tuple[int, ...]
    day: int                        # its (modality, date), numbered by the driver


def row_group_parts(files: list[FilePart], per_file: pl.DataFrame, days: dict[tuple[str, str], int],
                    part_rows: int = PART_ROWS) -> list[RowGroupsPart]:
    """Pass 2's parts: each file's row groups (`per_file`: pass 1's rows) in runs of about `part_rows` rows (at
    least one row group)."""
    counted = {(row["path"], row["date"]): (row["row_groups"], row["rows"]) for row in per_file.iter_rows(named=True)}
    parts = []
    for f in files:                         # (a file listed under several dates: counted for each, `FilePart.span`)
        groups, n = counted[(f.path, f.date.isoformat())]
        per_part = max(1, part_rows * groups // max(n, 1))
        day = days[(f.columns.modality, f.date.isoformat())]
        parts += [RowGroupsPart(f, tuple(range(g, min(g + per_part, groups))), day) for g in range(0, groups, per_part)]
    return parts


def _null_cells(column: pa.ChunkedArray, markers: tuple[float, ...] | None = None) -> int:
    """Null cells of a column, NaN counted as null in a float column, and so is each of `markers` (the column's
    `missing_values`: the numbers its writer stores for a missing value)."""
    nulls = column.null_count
    if pa.types.is_floating(column.type):
        nulls += int(pc.sum(pc.is_nan(column)).as_py() or 0)
    if markers:
        nulls += int(pl.from_arrow(column).cast(pl.Float64, strict=False).is_in(list(markers)).sum())
    return nulls


def _nulls_from_statistics(parquet, row_group: int, column: str) -> int | None:
    """The column chunk's null count when the file's statistics give it exactly for a flat column that cannot
    hold NaN; None when the column must be read."""
    field = field_of(parquet.schema_arrow, column)
    if field is None or pa.types.is_floating(field.type) or pa.types.is_nested(field.type):
        return None
    chunk = column_chunk(parquet, row_group, column)
    stats = None if chunk is None else chunk.statistics
    return stats.null_count if stats is not None and stats.has_null_count else None


def file_counts(part: FilePart) -> pd.DataFrame:
    """Pass 1: one file -> one row: rows, null cells (entity, time and value columns; NaN counts), rows whose
    time is outside the partition's date, and its row groups."""
    parquet = open_parquet(part.storage.filesystem(part.table), part.path)
    with in_file(part.columns.modality, part.path):
        values = file_values(part, parquet.schema_arrow, part.columns.former_names)  # in its folders, or added
        schema = with_path_fields(parquet.schema_arrow, values)
        cols = part.columns.in_file(schema)
        cols.check(schema, part.path)
    markers = dict(zip(cols.values, map(dict(part.columns.missing_values).get, part.columns.values)))
    rows = nulls = outside = 0
    for r in part.row_groups_of_date(parquet, cols):         # of a file spanning dates: those reaching its date
        # a footer's statistics count the rows a deletion vector removed too: such a file's values are read
        # and a column's missing-value markers are counted from its values
        from_stats = {c: None if part.deleted or markers.get(c) else _nulls_from_statistics(parquet, r, c)
                      for c in cols.values}
        read = [*cols.key_and_time, *(c for c, n in from_stats.items() if n is None)]
        table = part.of_date(pa.concat_tables(each_row_group(parquet, part.path, read, [r], deleted=part.deleted,
                                                             values=values)), cols)
        rows += table.num_rows
        nulls += sum(_null_cells(table.column(c), markers.get(c)) for c in read) \
            + sum(n for n in from_stats.values() if n)
        timed, beyond, no_time = cols.times(table)  # rows without a time are nulls; one beyond any date is outside
        nulls += no_time
        outside += beyond + timed.select(
            timed_outside(to_micros(pl.col(cols.time)), part.date, part.zone, part.lateness_us).sum()).item()
    return pd.DataFrame({"path": [part.path], "modality": [cols.modality], "date": [part.date.isoformat()],
                         "rows": [rows], "nulls": [nulls], "outside_partition": [outside],
                         "row_groups": [parquet.metadata.num_row_groups]})


def entity_periods(rows: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Rows (`keys` and `_us`, the time in microseconds) holding every row of each of their entities (for one
    day) -> one row per entity: its median period (`period_s`, seconds between consecutive rows; null with one
    row), its `gaps` (further apart than `GAP_FACTOR` x that median) and its `duplicate_keys` (rows repeating
    an earlier row's time). Rows without an entity or a time are left out (pass 1 counts them as nulls)."""
    diffs = (rows.drop_nulls([*keys, "_us"]).sort([*keys, "_us"])
             .with_columns(pl.col("_us").diff().over(keys).alias("_diff")))
    median = pl.col("_diff").median()
    return diffs.group_by(keys).agg(
        (median / 1e6).cast(pl.Float64).alias("period_s"),
        pl.when(median > 0).then((pl.col("_diff") > GAP_FACTOR * median).sum()).otherwise(0)
        .cast(pl.Int64).alias("gaps"),
        (pl.col("_diff") == 0).sum().cast(pl.Int64).alias("duplicate_keys"))


def key_rows(part: RowGroupsPart) -> pd.DataFrame:
    """Pass 2's read, in a Dask task on a worker: the part's (modality, date) number, entity (a 64-bit hash of
    its key columns' text) and time (microseconds) of each row with both, as the pandas frame Dask shuffles."""
    path = part.file.path
    parquet = open_parquet(part.file.storage.filesystem(part.file.table), path)
    values = file_values(part.file, parquet.schema_arrow, part.file.columns.former_names)
    cols = part.file.columns.in_file(with_path_fields(parquet.schema_arrow, values))
    groups = sorted(set(part.row_groups) & set(part.file.row_groups_of_date(parquet, cols)))
    if not groups:                          # a file spanning dates: none of these reaches the part's date
        return _KEY_META.copy()
    read = each_row_group(parquet, path, cols.key_and_time, groups, deleted=part.file.deleted, values=values)
    rows = cols.times(part.file.of_date(pa.concat_tables(read), cols))[0].drop_nulls()
    entity = entity_string(cols.keys).hash(seed=0)
    return rows.select(pl.lit(part.day, pl.Int32).alias("_day"), entity.alias("_entity"),
                       to_micros(pl.col(cols.time)).alias("_us")).to_pandas()


def partition_periods(rows: pd.DataFrame) -> pd.DataFrame:
    """In a Dask task on a worker: a shuffled partition (every row of each of its (day, entity)) -> `entity_periods`
    per day and entity, as the pandas frame Dask's group-by merges (the driver gets a row per day)."""
    periods = entity_periods(pl.from_pandas(rows), ["_day", "_entity"]).drop("_entity")
    return periods.to_pandas().astype(_PERIODS_META.dtypes.to_dict())[list(_PERIODS_META.columns)]


def modality_files(spec: Spec, m: ModalitySpec, storage: Storage, dates: list[dt.date]) -> list[FilePart]:
    """Pass 1's parts: every Parquet file of the modality's date partitions among `dates` (a listing; of a Delta
    table, the files its log holds); DataError
    naming the modality's path when none of the dates has a partition."""
    found, files, *_ = list_table_files(storage, m.path, spec.partition_in(m), dates, RowTimes.of(spec, m),
                                        m.added_columns)
    if not found:
        raise DataError(f"modality '{m.name}' ({m.path}): no partitions in {dates[0]}..{dates[-1]}")
    cols = Columns.of(spec, m)
    return [FilePart(Columns.of(spec, with_stored_names(m, f.stored_names)) if f.stored_names else cols,
                     dt.date.fromisoformat(f.date), f.path, storage, m.path, spec.timezone, spec.lateness_us,
                     f.deleted, f.name,
                     None if f.span is None else tuple(map(dt.date.fromisoformat, f.span)), f.table_columns,
                     f.stored_names) for f in files]


def profile(spec: Spec, start: dt.date, end: dt.date, *, use_ray: bool = True,
            partition_rows: int = PARTITION_ROWS) -> pl.DataFrame:
    """Profile every modality over [start, end]; one row per modality and day that has files.

    `median_period_s` is the median over the day's entities of each entity's median period; a gap is two
    consecutive rows of one entity further apart than 3x that entity's median period of the day.
    """
    if end < start:
        raise DataError(f"profile: the window ends ({end}) before it starts ({start})")
    storage = Storage.from_spec(spec.storage)
    dates = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    files = [f for m in spec.modalities.values() if not m.context_of    # a slow view reads its parent's rows:
             for f in modality_files(spec, m, storage, dates)]          # profiled once, as the parent
    if not files:
        raise DataError(f"spec '{spec.name}': no Parquet files in {start}..{end}")
    per_file = pl.from_pandas(_compute(dd.from_map(file_counts, files, meta=_FILE_META), use_ray))
    counts = (per_file.group_by("modality", "date").agg(pl.col("rows", "nulls", "outside_partition").sum())
              .sort("modality", "date").with_row_index("_day").with_columns(pl.col("_day").cast(pl.Int32)))
    days = {(m, d): i for i, m, d in counts.select("_day", "modality", "date").iter_rows()}
    parts = row_group_parts(files, per_file, days)
    periods = pl.DataFrame(schema={"_day": pl.Int32, "entities": pl.Int64, "period_s": pl.Float64,
                                   "gaps": pl.Int64, "duplicate_keys": pl.Int64})
    if parts:
        partitions = max(1, -(-int(per_file["rows"].sum()) // partition_rows))
        log.info("profile: %d files, %d reads of row groups, %d partitions", len(files), len(parts), partitions)
        keys = dd.from_map(key_rows, parts, meta=_KEY_META)
        shuffled = keys.shuffle(on=["_day", "_entity"], npartitions=partitions, shuffle_method="tasks")
        per_entity = shuffled.map_partitions(partition_periods, meta=_PERIODS_META).assign(entities=1)
        periods = pl.from_pandas(_compute(per_entity.groupby("_day").agg(
            {"entities": "sum", "period_s": "median", "gaps": "sum", "duplicate_keys": "sum"}), use_ray).reset_index())
    table = (counts.join(periods.with_columns(pl.col("_day").cast(pl.Int32)), on="_day", how="left")
             .rename({"period_s": "median_period_s"})
             .with_columns(pl.col("entities", "gaps", "duplicate_keys").fill_null(0).cast(pl.Int64),
                           pl.col("median_period_s").cast(pl.Float64).fill_nan(None)))
    return table.select(COLUMNS).sort(["modality", "date"])


def _compute(collection, use_ray: bool):
    """`collection.compute()` on the Ray cluster (dask-on-ray) or, with `use_ray=False`, on Dask's own threads;
    a task's own error (a DataError naming a file) is raised as itself. On Ray every shuffle moves its pieces
    as task results (Dask's disk shuffle keeps them in a partd folder on one worker's local disk)."""
    if not use_ray:
        return collection.compute()
    from ray.util.dask import ray_dask_get

    from pipelines.ray_runtime import task_error_as_itself

    with task_error_as_itself(), dask.config.set({"dataframe.shuffle.method": "tasks"}):
        return collection.compute(scheduler=ray_dask_get)
