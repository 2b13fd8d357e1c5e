"""Delta Lake writes, one way per kind of sink:
- the scored tables: workers write a date's Parquet data files (`write_data_file`), the driver commits each
  date atomically (`commit_date`: add the new files, remove the date's old ones), so no scored row passes
  through the driver and re-running a date leaves one copy;
- small tables written from the driver (the runs audit table): `write_partition`.
Both retry on concurrent-commit conflicts and merge schemas (a new `score_<modality>` column appears, old rows
keep null). A path that holds a table dmafn did not write is refused before either runs (`require_own_tables`)."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence
from urllib.parse import unquote

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction

from dmafn.spec import ScoreSpec
from pipelines.storage import DataError, Storage, partition_date

log = logging.getLogger(__name__)


class OpenTables:
    """The Delta tables one job commits to, each opened once and brought up to date (`update_incremental`: the
    commits since, ~2 ms) before each use, instead of replaying its log on every commit (~35 ms each; a
    backfill's driver commits three tables per date)."""

    def __init__(self) -> None:
        self._tables: dict[str, DeltaTable] = {}

    def get(self, uri: str, storage_options: dict[str, str] | None = None) -> DeltaTable | None:
        """The table at `uri` as of now, or None when none exists yet."""
        table = self._tables.get(uri)
        if table is not None:
            table.update_incremental()
            return table
        table = read_table(uri, storage_options)
        if table is not None:
            self._tables[uri] = table
        return table


def write_partition(uri: str, data: pa.Table, *, date: str | None, mode: Literal["replace_date", "append"],
                    storage_options: dict[str, str] | None = None, partition_by: tuple[str, ...] = ("date",),
                    retries: int = 8, tables: OpenTables | None = None) -> None:
    """Write `data` to the Delta table at `uri`.

    mode="replace_date": atomically replace every row of `date` (re-running leaves one copy);
    mode="append": add rows (the run audit table). `tables`: reuse the job's open tables.
    """
    if mode == "replace_date" and not date:
        raise ValueError("mode 'replace_date' needs a date")
    for attempt in range(retries + 1):
        try:
            target = (tables.get(uri, storage_options) if tables is not None else None) or uri
            if mode == "replace_date":
                write_deltalake(target, data, mode="overwrite", predicate=f"date = '{date}'",
                                partition_by=list(partition_by), storage_options=storage_options,
                                schema_mode="merge")
            else:
                write_deltalake(target, data, mode="append", partition_by=list(partition_by),
                                storage_options=storage_options, schema_mode="merge")
            return
        except CommitFailedError as exc:
            if attempt == retries:
                raise
            wait = min(0.2 * 2 ** attempt, 5.0) * (0.5 + random.random())
            log.warning("Delta commit to %s conflicted (%s); retrying in %.1fs", uri, exc, wait)
            time.sleep(wait)


def table_mismatch(table: DeltaTable, columns: Sequence[str], partition_by: Sequence[str] = ("date",)) -> list[str]:
    """Why `table` is not one a writer of `columns`, partitioned by `partition_by`, may replace dates in: the columns
    it lacks and its partitioning when it differs (empty: it is one)."""
    names = set(pa.schema(table.schema().to_arrow()).names)
    missing = [c for c in columns if c not in names]
    partitions = list(table.metadata().partition_columns)
    problems = [f"no column {', '.join(missing)}"] if missing else []
    if partitions != list(partition_by):
        problems.append(f"partitioned by {', '.join(partitions) or 'nothing'}, not {', '.join(partition_by)}")
    return problems


# columns every table of each kind that dmafn wrote holds (since its first version), by which it knows its own
OUTPUT_COLUMNS = ("ts", "date", "score", "threshold", "is_anomaly", "model_version", "run_id")   # and the entity's
SCORED_COLUMNS = ("ts", "date", "score", "threshold", "is_anomaly")   # of those, what `evaluate` and `report` read
CAUSE = "cause"     # the output's column naming the modality behind an over-threshold tick (`score_steps.Scorer`)
QUARANTINE_COLUMNS = ("date", "stage", "entity", "ts", "reason", "run_id")
RUNS_COLUMNS = ("run_id", "date", "model_version", "status", "finished_at")


def require_own_tables(score: ScoreSpec, entity: tuple[str, ...] | list[str], storage: Storage,
                       tables: OpenTables | None = None) -> None:
    """Before anything is written: each of `score`'s output, quarantine and runs tables that exists already must be
    one dmafn wrote for entity key `entity` (its columns, partitioned by date) - scoring replaces whole dates there,
    so a `score.output` pointed at another team's table (or at the output of a spec with another entity key) would
    lose its rows. DataError naming the spec key, the path and what differs."""
    tables = tables or OpenTables()
    for key, path, columns in (("score.output", score.output, (*entity, *OUTPUT_COLUMNS)),
                               ("score.quarantine", score.quarantine_path, QUARANTINE_COLUMNS),
                               ("score.runs", score.runs_path, RUNS_COLUMNS)):
        table = tables.get(storage.delta_uri(path), storage.delta_options(path))
        if table is not None and (problems := table_mismatch(table, columns)):
            raise DataError(f"{key} {path} is a Delta table dmafn did not write for this spec ({'; '.join(problems)}): "
                            "dmafn replaces whole dates in its tables, so it writes nothing there - point "
                            f"{key} at a new path, or at the table dmafn wrote")
        if table is None and (other := _other_entries(storage, path)):
            raise DataError(f"{key} {path} holds files but no Delta table ({', '.join(other[:3])}"
                            f"{', ...' if len(other) > 3 else ''}): dmafn maintain's vacuum deletes the files its "
                            f"table does not list, so dmafn writes nothing there - point {key} at a new path or an "
                            "empty folder")


def _other_entries(storage: Storage, path: str) -> list[str]:
    """The names in the folder at `path` (no Delta table there) other than `date=YYYY-MM-DD` folders - what a job
    killed before its first commit leaves - and names starting with `.` or `_`; empty when it cannot be listed (the
    commit then says why)."""
    try:
        entries = storage.filesystem(path).get_file_info(pafs.FileSelector(storage.fs_path(path), allow_not_found=True))
    except OSError:
        return []
    return sorted(e.base_name for e in entries if not e.base_name.startswith((".", "_"))
                  and not (e.type == pafs.FileType.Directory and partition_date(e.base_name, "date")))


_PLAIN_LOCATION = re.compile(r"[A-Za-z0-9/._\-=:~+]*")    # what a table's file URIs spell as it is


def scan_table(source: str | DeltaTable, storage_options: dict[str, str] | None = None) -> pl.LazyFrame:
    """`pl.scan_delta` of a table (a URI with its options, or an open `DeltaTable`) - through deltalake's pyarrow
    dataset where the table lies under a name its file URIs percent-encode (a space, a letter beyond ASCII: `/data/
    Pumpen Daten/scores`), as Polars opens those URIs as spelled and finds no such file (its own tables' too). There a
    bare `select(pl.len())` counts 0 (Polars asks the dataset for no column): count by a column or a group."""
    location = unquote(source.table_uri if isinstance(source, DeltaTable) else source).split("://", 1)[-1]
    return pl.scan_delta(source, storage_options=None if isinstance(source, DeltaTable) else storage_options,
                         use_pyarrow=not _PLAIN_LOCATION.fullmatch(location))


def read_table(uri: str, storage_options: dict[str, str] | None = None) -> DeltaTable | None:
    """The Delta table at `uri`, or None when none exists yet."""
    try:
        return DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        return None


def write_data_file(uri: str, data: pa.Table, *, date: str, name: str, filesystem, root: str) -> dict:
    """Write one Parquet data file of `date` under the table at `uri` (not yet committed) and return its add
    action as plain data for `commit_date`. `root` is the table's path as `filesystem` names it. The partition
    column is not stored in the file (Delta keeps it in the log)."""
    relative = f"date={date}/part-{name}-{uuid.uuid4().hex[:12]}.parquet"
    path = f"{root.rstrip('/')}/{relative}"
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    body = data.drop_columns(["date"]) if "date" in data.column_names else data
    pq.write_table(body, path, filesystem=filesystem)
    size = filesystem.get_file_info(path).size
    return {"path": relative, "size": int(size), "partition_values": {"date": date},
            "modification_time": int(time.time() * 1000), "data_change": True,
            "stats": json.dumps(file_stats(body))}


STATS_MAX_CHARS = 32     # a longer string column gets no statistics: a truncated bound would mislead readers


def file_stats(data: pa.Table) -> dict:
    """A data file's Delta statistics: its row count and, for each text column whose values are at most
    `STATS_MAX_CHARS` long (entity keys, `model_version`, `run_id`), its null count, lowest and highest value -
    exact, so that any Delta reader may skip files by them (a filter on an entity or a model version) and
    `dates_written_by` reads them instead of the rows. Other columns get none; readers then read the file."""
    lows, highs, nulls = {}, {}, {}
    for name in data.column_names:
        column = data.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_string_view(column.type)):
            continue
        column = column.cast(pa.large_string())
        longest = pc.max(pc.utf8_length(column)).as_py()
        if longest is not None and longest > STATS_MAX_CHARS:
            continue
        nulls[name] = column.null_count
        if column.null_count < len(column):
            bounds = pc.min_max(column)
            lows[name], highs[name] = bounds["min"].as_py(), bounds["max"].as_py()
    return {"numRecords": data.num_rows, "minValues": lows, "maxValues": highs, "nullCount": nulls}


def dates_written_by(uri: str, storage_options: dict[str, str] | None, column: str, value: str,
                     dates: list[str]) -> set[str]:
    """The `dates` of the table at `uri` (partitioned by `date`) all of whose rows have `column` == `value`. Read
    off the Delta log where every data file of the date has statistics of `column` (`file_stats`: metadata only,
    however many rows); a date with a file written without them (before 2026-12-02) is read, that one column,
    streaming."""
    table = read_table(uri, storage_options)
    if table is None:
        return set()
    files = pl.DataFrame(table.get_add_actions(flatten=True))
    low, high, nulls = f"min.{column}", f"max.{column}", f"null_count.{column}"
    absent = {low: pl.String, high: pl.String, nulls: pl.Int64}                  # no file has statistics of it
    files = files.with_columns(pl.lit(None, t).alias(c) for c, t in absent.items() if c not in files.columns)
    per_date = (files.filter(pl.col("partition.date").is_in(dates)).group_by("partition.date")
                .agg((pl.col(low).is_not_null() & pl.col(high).is_not_null() & pl.col(nulls).is_not_null()).all()
                     .alias("known"),
                     ((pl.col(low) == value) & (pl.col(high) == value) & (pl.col(nulls) == 0)).all().alias("same")))
    done = set(per_date.filter(pl.col("known") & pl.col("same"))["partition.date"].to_list())
    unknown = per_date.filter(~pl.col("known"))["partition.date"].to_list()
    if unknown:
        read = (scan_table(uri, storage_options).filter(pl.col("date").is_in(unknown))
                .group_by("date").agg((pl.col(column) == value).all().alias("same")).collect(engine="streaming"))
        done |= set(read.filter(pl.col("same"))["date"].to_list())
    return done


def commit_date(uri: str, files: list[dict], *, date: str, schema: pa.Schema,
                storage_options: dict[str, str] | None = None, retries: int = 8,
                tables: OpenTables | None = None) -> None:
    """Atomically replace every row of `date` in the table at `uri` by the already written `files` (one Delta
    commit: their add actions and the removal of the date's old files). The table is created when missing,
    and columns of `schema` it lacks are added (older rows read them as null). Retries conflicting commits, so
    two jobs committing the same date end with one copy. `tables`: reuse the job's open tables."""
    for attempt in range(retries + 1):
        try:
            table = tables.get(uri, storage_options) if tables is not None else read_table(uri, storage_options)
            if table is None:
                table = DeltaTable.create(uri, schema, mode="ignore", partition_by=["date"],
                                          storage_options=storage_options)
            table.create_write_transaction([AddAction(**f) for f in files], "overwrite", merged_schema(table, schema),
                                           partition_by=["date"], partition_filters=[("date", "=", date)])
            return
        except CommitFailedError as exc:
            if attempt == retries:
                raise
            wait = min(0.2 * 2 ** attempt, 5.0) * (0.5 + random.random())
            log.warning("Delta commit of %s to %s conflicted (%s); retrying in %.1fs", date, uri, exc, wait)
            time.sleep(wait)


def merged_schema(table: DeltaTable, schema: pa.Schema) -> pa.Schema:
    """The table's columns in their order, then the columns of `schema` it does not have yet."""
    current = pa.schema(table.schema().to_arrow())
    return pa.schema([*current, *[f for f in schema if f.name not in current.names]])


@dataclass(frozen=True)
class DeletedRows:
    """The rows of a data file that a Delta deletion vector removes: their positions in the file (0: its first row)
    as runs - sorted, disjoint `[start, stop)` pairs of little-endian int64 bytes, a value, so a listing holding it
    stays hashable and pickles small. A DELETE of a time range or an entity marks rows that lie together, so the
    driver holds 16 bytes per run of deleted rows, not 8 per row (a table with a billion rows deleted in place held
    8 GB in its listing)."""

    runs: bytes

    @classmethod
    def of(cls, positions: np.ndarray) -> "DeletedRows":
        """From the deleted rows' positions (any order; a position given twice counts once)."""
        at = np.unique(np.asarray(positions, dtype=np.int64))
        if not len(at):
            return cls(b"")
        breaks = np.flatnonzero(np.diff(at) != 1)
        starts, stops = at[np.r_[0, breaks + 1]], at[np.r_[breaks, len(at) - 1]] + 1
        return cls(np.stack([starts, stops], 1).astype("<i8").tobytes())

    @classmethod
    def of_mask(cls, deleted: np.ndarray) -> "DeletedRows":
        """From a bool per row of the file (True: deleted), as a deletion vector decodes - without listing them."""
        edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(deleted, dtype=np.int8), [0]])))
        return cls(edges.astype("<i8").tobytes())           # alternate: a run's start, then its stop

    def _pairs(self) -> np.ndarray:
        return np.frombuffer(self.runs, dtype="<i8").reshape(-1, 2)

    @property
    def count(self) -> int:
        pairs = self._pairs()
        return int((pairs[:, 1] - pairs[:, 0]).sum())

    def token(self) -> str:
        """Which rows, in short (a listing's digest line: another DELETE changes it). The hash of the positions
        themselves, as listings before the runs gave it (so an upgrade re-reads no date), taken a chunk at a time."""
        digest = hashlib.sha256()
        pairs = self._pairs()
        lengths = pairs[:, 1] - pairs[:, 0]
        ends = np.cumsum(lengths)                               # the deleted rows' count up to each run's end
        total = int(ends[-1]) if len(ends) else 0
        for done in range(0, total, TOKEN_CHUNK_ROWS):          # the done-th .. deleted rows, in the file's order
            nth = np.arange(done, min(done + TOKEN_CHUNK_ROWS, total))
            run = np.searchsorted(ends, nth, "right")
            digest.update((pairs[run, 0] + nth - (ends[run] - lengths[run])).astype("<i8").tobytes())
        return f"{total}:{digest.hexdigest()[:16]}"

    def kept(self, start: int, rows: int) -> np.ndarray | None:
        """Which of the file's rows `start` .. `start + rows` are not deleted (a bool per row), None where none is."""
        pairs = self._pairs()
        inside = pairs[np.searchsorted(pairs[:, 1], start, "right"):np.searchsorted(pairs[:, 0], start + rows)]
        if not len(inside):
            return None
        edges = np.clip(inside - start, 0, rows)
        depth = np.bincount(edges[:, 0], minlength=rows + 1) - np.bincount(edges[:, 1], minlength=rows + 1)
        return np.cumsum(depth[:rows]) == 0


TOKEN_CHUNK_ROWS = 1 << 20      # positions hashed at a time by `DeletedRows.token` (8 MiB)


class LoggedFile(NamedTuple):
    """A data file of a Delta table as its log lists it: its path inside the table's folder, its size, when it was
    written (nanoseconds since the epoch), its partition values (column -> value as text, None: null), the rows a
    deletion vector removes from it (None: none) and its least and greatest time by the log's statistics."""

    path: str
    size: int
    mtime_ns: int
    partition: tuple[tuple[str, str | None], ...]
    deleted: DeletedRows | None = None
    times: tuple[int | float, int | float] | None = None   # its least and greatest time by the log's statistics


class DeltaFiles(NamedTuple):
    """What the log of a modality's Delta table holds now (`live_data_files`): its data files (paths inside its
    folder) with the rows a deletion vector removes from each; with column mapping each column's name in its files
    (`stored_names`: a column - a dotted path for a field inside a struct - and the physical name its files give
    it); its partition columns and its files as the log lists them (`logged`: a table with column mapping lies in
    folders of random names, one not partitioned by date in none, so those are listed from the log)."""

    live: dict[str, DeletedRows | None]
    stored_names: tuple[tuple[str, str], ...] = ()
    partition_columns: tuple[str, ...] = ()
    logged: tuple[LoggedFile, ...] = ()
    time_type: pa.DataType | None = None     # the type of the time statistics (`LoggedFile.times`; None: none kept)
    schema: pa.Schema | None = None          # the table's columns, by their names (not the physical ones)

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns its data files hold (not its partition columns): a file written before one was added (ALTER
        TABLE ADD COLUMNS, schema evolution) lacks it, and Delta reads it there as null."""
        return tuple(c for c in self.schema.names if c not in self.partition_columns) if self.schema else ()


def live_data_files(storage: Storage, path: str, time_column: str | None = None,
                    dated_by: list[str | None] | None = None) -> DeltaFiles | None:
    """The data files the Delta table at `path` holds by its log now (`DeltaFiles`), or None where `path` holds no Delta
    table (no `_delta_log`): a modality table kept as Delta is read as its log says - files an OPTIMIZE, DELETE, UPDATE
    or MERGE replaced and VACUUM has not yet removed are not its rows, nor are the rows a DELETE, UPDATE or MERGE marked
    deleted in place (deletion vectors: delta-rs decodes them, here, a file at a time, and the listing keeps each file's
    runs of deleted rows, `DeletedRows`). A table with column mapping (`delta.columnMapping.mode` name or id, which
    Databricks sets to rename or drop a column) names its columns in its files by their physical names: those come with
    the files. With `time_column` (as the table names it), each file's least and greatest time by the log's statistics
    comes with it (`LoggedFile.times`): what a table not partitioned by date is listed by. `dated_by`: the partition
    columns that hold a date (the layout's date levels); a table without column mapping partitioned by them all is
    listed by its folders, so no `logged` is built for it (an object per file of the table). DataError naming the table
    where its log or a deletion vector cannot be read, or where its column mapping gives a column the physical name of
    another column."""
    log_folder = storage.fs_path(path).rstrip("/") + "/_delta_log"
    try:
        if storage.filesystem(path).get_file_info(log_folder).type != pafs.FileType.Directory:
            return None
        table = DeltaTable(storage.delta_uri(path), storage_options=storage.delta_options(path))
        mapping = table.metadata().configuration.get("delta.columnMapping.mode", "none")
        deleted: dict[str, DeletedRows] = {}
        if "deletionVectors" in (table.protocol().reader_features or []):
            root = table.table_uri.rstrip("/") + "/"
            for batch in table.deletion_vectors():
                batch = pa.record_batch(batch)
                for uri, keep in zip(batch.column("filepath").to_pylist(), batch.column("selection_vector")):
                    if not uri.startswith(root):
                        raise DataError(f"{path}: a deletion vector of {uri}, a file outside the table's folder")
                    gone = DeletedRows.of_mask(~keep.values.to_numpy(zero_copy_only=False))
                    if gone.runs:
                        deleted[unquote(uri[len(root):])] = gone
        actions = pa.table(table.get_add_actions(flatten=False))
        live = [unquote(p) for p in actions.column("path").to_pylist()]
        files = {p: deleted.get(p) for p in live}
        stored = _physical_names(path, table.schema().fields) if mapping != "none" else ()
        partitioned_by = tuple(table.metadata().partition_columns)
        schema = pa.schema(table.schema().to_arrow())
        if not stored and dated_by is not None and all(key in partitioned_by for key in dated_by):
            return DeltaFiles(files, (), partitioned_by, schema=schema)       # listed by its date folders
        values = (actions.column("partition").to_pylist() if "partition" in actions.column_names
                  else [{}] * len(live))
        times, kind = _time_statistics(actions, dict(stored).get(time_column, time_column), len(live))
        logged = tuple(LoggedFile(p, size, ms * 1_000_000, tuple((k, _partition_text(v)) for k, v in held.items()),
                                  files[p], low_high)
                       for p, size, ms, held, low_high in zip(live, actions.column("size_bytes").to_pylist(),
                                                              actions.column("modification_time").to_pylist(), values,
                                                              times))
        return DeltaFiles(files, stored, partitioned_by, logged, kind, schema)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure: say which table
        raise DataError(f"{path}: holds a Delta log (_delta_log) that cannot be read ({exc})") from None


def _physical_names(path: str, fields, prefix: str = "", physical_prefix: str = "") -> tuple[tuple[str, str], ...]:
    """Each column of a Delta schema with column mapping (dotted paths into structs) and its physical name (the
    name its data files give it). DataError naming the table where a column's physical name is another column's
    name: a file's column would be read as the wrong one (a reader looks a column up by its own name first)."""
    out: list[tuple[str, str]] = []
    for f in fields:
        physical = (f.metadata or {}).get("delta.columnMapping.physicalName", f.name)
        out.append((prefix + f.name, physical_prefix + physical))
        inner = getattr(f.type, "fields", None)           # a struct: its fields are mapped too
        if inner:
            out += _physical_names(path, inner, f"{prefix}{f.name}.", f"{physical_prefix}{physical}.")
    if not prefix:
        names = dict(out)
        if clash := next(((c, p) for c, p in out if p != c and p in names), None):
            raise DataError(f"{path}: a Delta table whose column mapping stores column '{clash[0]}' under the name "
                            f"of its column '{clash[1]}' (columns renamed into each other's names): not read - "
                            "rewrite the table (e.g. CREATE TABLE ... AS SELECT) to read it")
    return tuple(out)


def _time_statistics(actions: pa.Table, column: str | None, files: int) -> tuple[list, pa.DataType | None]:
    """Each add action's least and greatest value of `column` by the statistics the log keeps (a timestamp's or a
    date's as integers of its unit - microseconds, days -, a number's as it is; None where the log keeps none for the
    file), and the column's type (None where the log keeps no statistics of it)."""
    found = [actions.column(end).combine_chunks() for end in ("min", "max") if end in actions.column_names]
    if column is None or len(found) < 2 or any(column not in [f.name for f in a.type] for a in found):
        return [None] * files, None
    low, high = (a.field(column) for a in found)
    kind = low.type
    if pa.types.is_timestamp(kind):
        low, high = low.cast(pa.int64()), high.cast(pa.int64())
    elif pa.types.is_date(kind):                        # days (pyarrow casts a date to int32 only)
        kind = pa.date32()
        low, high = low.cast(kind).cast(pa.int32()), high.cast(kind).cast(pa.int32())
    return [None if lo is None or hi is None else (lo, hi) for lo, hi in zip(low.to_pylist(), high.to_pylist())], kind


def _partition_text(value) -> str | None:
    """A partition value as a Hive folder would name it (a date as YYYY-MM-DD, a bool as true/false)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
