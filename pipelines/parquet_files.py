"""Parquet files of date-partitioned tables: listing (`key=YYYY-MM-DD` folders) and opening, with errors that
name the file. Plain pyarrow, no Ray: a shard's task reads its files with these."""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import math
import zoneinfo
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from typing import Iterator, NamedTuple
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dmafn.partition_layout import parse_layout
from dmafn.spec import DAY_US, other_names
from pipelines.delta_sink import DeletedRows, DeltaFiles, live_data_files
from pipelines.storage import DataError, DateFolder, Storage, list_partitions, relative
from pipelines.stored_times import MICROS_PER_UNIT, micros_of

PARTITION_COLUMN = "date"
log = logging.getLogger(__name__)


class UnreadableFile(DataError):
    """A file whose bytes are no Parquet (`open_parquet`: truncated, empty, another format) - not a file that could
    not be fetched. `path`: the file; `reason`: what the reader said."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: not a readable Parquet file ({reason})")
        self.path, self.reason = path, reason

    def __reduce__(self):           # pickled whole: a Ray task's error reaches the driver as this class
        return type(self), (self.path, self.reason)


class DamagedRowGroup(DataError):
    """A row group whose pages do not decode or verify from its bytes fetched anew into memory (`read_columns`): the
    file's bytes are damaged there - not a read that failed on the way (a network error), which is a plain DataError.
    `path`, `row_group`, `rows` (the row group's, less those a deletion vector removes), `column` (the one that fails
    alone, '' when not one) and `reason` (what the reader said)."""

    def __init__(self, path: str, row_group: int, rows: int, column: str, reason: str) -> None:
        where = f"row group {row_group}" + (f", column '{column}'" if column else "")
        super().__init__(f"{path}: not a readable Parquet file ({where}: {reason})")
        self.path, self.row_group, self.rows, self.column, self.reason = path, row_group, rows, column, reason

    def __reduce__(self):           # pickled whole: a Ray task's error reaches the driver as this class
        return type(self), (self.path, self.row_group, self.rows, self.column, self.reason)


class RepeatedColumn(DataError):
    """A column a job reads that a file holds more than once under the same name (`field_of`): which holds its values
    cannot be told. `in_file` names the file."""

    def __init__(self, name: str, count: int) -> None:
        super().__init__(f"column '{name}' appears {count} times in the file, so which of them holds its values "
                         "cannot be told - write it once")
        self.name, self.count = name, count

    def __reduce__(self):
        return type(self), (self.name, self.count)


@contextlib.contextmanager
def in_file(modality: str, path: str) -> Iterator[None]:
    """A `RepeatedColumn` raised inside as a DataError naming the modality and the file."""
    try:
        yield
    except RepeatedColumn as exc:
        raise DataError(f"modality '{modality}' ({path}): {exc}") from None


def open_parquet(filesystem: pafs.FileSystem, path: str) -> pq.ParquetFile:
    """The Parquet file at `path` (footer read); DataError naming the file when it cannot be opened - an
    `UnreadableFile` when its bytes are no Parquet (the spec's `unreadable_files` may leave it out). Its pages are
    read with their checksums verified where the writer stored them (Spark's and every parquet-java writer's default):
    a page damaged in storage fails its read (`read_columns`) instead of yielding other numbers."""
    try:
        source = filesystem.open_input_file(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    try:
        return pq.ParquetFile(source, page_checksum_verification=True)
    except pa.ArrowInvalid as exc:
        source.close()
        raise UnreadableFile(path, str(exc)) from None
    except OSError as exc:
        source.close()
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def column_chunk(parquet: pq.ParquetFile, row_group: int, column: str) -> pq.ColumnChunkMetaData | None:
    """The metadata (statistics, physical type) of `column`'s chunk in `row_group`; None when the file has no
    flat column of that name."""
    meta = parquet.metadata.row_group(row_group)
    return next((meta.column(j) for j in range(meta.num_columns) if meta.column(j).path_in_schema == column), None)


def time_bounds(parquet: pq.ParquetFile, time_column: str, time_unit: str | None = None,
                naive_zone: str | None = None) -> list[tuple[int, int]] | None:
    """Each row group's earliest and latest time (microseconds since the epoch; a naive column's values as UTC,
    as they are read; a date's as its midnight; a numeric column's as counts of `time_unit`, the modality's, a
    float's widened to whole microseconds; with `naive_zone`, a naive timestamp's or a date's as that zone's wall
    clock, widened over a clock change) by
    the time column's min/max statistics; None when the file has none to go by (no row group, a column that is
    neither a timestamp nor, with `time_unit`, a number, a row group without statistics)."""
    kind = field_of(parquet.schema_arrow, time_column).type
    if pa.types.is_timestamp(kind):
        raw, stored_as = True, ("INT64",)               # a timestamp's raw statistics: INT64 only
    elif pa.types.is_date(kind):
        raw, stored_as = True, ("INT32",)               # Parquet stores any date as days (INT32)
    elif time_unit and pa.types.is_integer(kind):
        raw, stored_as = False, ("INT64", "INT32")
    elif time_unit and pa.types.is_floating(kind):
        raw, stored_as = False, ("DOUBLE", "FLOAT")
    else:
        return None
    bounds = []
    for r in range(parquet.metadata.num_row_groups):
        chunk = column_chunk(parquet, r, time_column)
        if chunk is None:
            return None
        stats = chunk.statistics
        if chunk.physical_type not in stored_as or stats is None or not stats.has_min_max:
            return None
        low, high = (stats.min_raw, stats.max_raw) if raw else (stats.min, stats.max)   # integers: signedness kept
        if (found := micros_bounds(low, high, kind, time_unit, naive_zone)) is None:
            return None
        bounds.append(found)
    return bounds or None


def micros_bounds(low: int | float, high: int | float, kind: pa.DataType, time_unit: str | None = None,
                  naive_zone: str | None = None) -> tuple[int, int] | None:
    """A time column's least and greatest value (of Arrow type `kind`: a timestamp's as integers of its unit, a date's
    as days, a number's as stored) as microseconds since the epoch, as its rows are read: a naive timestamp's as UTC,
    a date's as its midnight, a number's as counts of `time_unit`, a float's widened to whole microseconds; with
    `naive_zone`, a naive timestamp's or a date's as that zone's wall clock, widened over a clock change. None for any
    other type (text) or a float beyond any time."""
    if pa.types.is_timestamp(kind):
        low, high = micros_of(low, kind.unit), micros_of(high, kind.unit)
    elif pa.types.is_date(kind):
        low, high = low * DAY_US, high * DAY_US
    elif time_unit and pa.types.is_integer(kind):
        low, high = micros_of(low, time_unit), micros_of(high, time_unit)
    elif time_unit and pa.types.is_floating(kind):
        per_us = 1 / 1000 if time_unit == "ns" else MICROS_PER_UNIT[time_unit]
        if not (math.isfinite(low * per_us) and math.isfinite(high * per_us)):
            return None
        low, high = math.floor(low * per_us), math.ceil(high * per_us)
    else:
        return None
    if naive_zone and (pa.types.is_date(kind) or pa.types.is_timestamp(kind) and kind.tz is None):
        low, high = _wall_clock_us(low, naive_zone, min), _wall_clock_us(high, naive_zone, max)
    return low, high


def _wall_clock_us(micros: int, zone: str, pick) -> int:
    """A wall-clock time of `zone` (microseconds as if UTC) as the instant it shows, microseconds since the epoch:
    of the two readings a clock change allows (`fold`), the earlier (`pick=min`) or the later (`max`)."""
    try:
        wall = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=micros)
    except OverflowError:                           # beyond any calendar: as far as any zone's offset reaches
        return micros + pick(-14, 12) * 3_600_000_000
    tz = zoneinfo.ZoneInfo(zone)
    return pick(micros - int(wall.replace(tzinfo=tz, fold=fold).utcoffset() / dt.timedelta(microseconds=1))
                for fold in (0, 1))


def row_groups_since(parquet: pq.ParquetFile, time_column: str, since_us: int, time_unit: str | None = None,
                     naive_zone: str | None = None) -> list[int] | None:
    """The row groups that may hold rows timed at or after `since_us` (microseconds since the epoch), by the
    time column's min/max statistics; None when the file has none to go by (then every row group is read)."""
    bounds = time_bounds(parquet, time_column, time_unit, naive_zone)
    return None if bounds is None else [r for r, (_, hi) in enumerate(bounds) if hi >= since_us]


def row_groups_before(parquet: pq.ParquetFile, time_column: str, until_us: int, time_unit: str | None = None,
                      naive_zone: str | None = None) -> list[int] | None:
    """The row groups that may hold rows timed before `until_us`, by the time column's statistics; None when the
    file has none to go by."""
    bounds = time_bounds(parquet, time_column, time_unit, naive_zone)
    return None if bounds is None else [r for r, (lo, _) in enumerate(bounds) if lo < until_us]


def row_groups_between(parquet: pq.ParquetFile, time_column: str, lo_us: int, hi_us: int,
                       time_unit: str | None = None, naive_zone: str | None = None) -> list[int] | None:
    """The row groups that may hold rows timed from `lo_us` to before `hi_us` (a date of a file listed under each
    date its rows span), by the time column's statistics read once; None when the file has none to go by."""
    bounds = time_bounds(parquet, time_column, time_unit, naive_zone)
    return None if bounds is None else [r for r, (lo, hi) in enumerate(bounds) if hi >= lo_us and lo < hi_us]


def each_schema(held: pa.Schema | list[pa.Schema]) -> list[pa.Schema]:
    """A modality's schema, or its several (`ingest.require_columns`), as a list."""
    return held if isinstance(held, list) else [held]


def field_of(schema: pa.Schema, name: str) -> pa.Field | None:
    """The field a spec's column name reads: a top-level column of that name, else a field inside struct columns
    by its dotted path (`payload.temperature`: the `temperature` of struct `payload`, as JSON landed in Parquet
    nests it), named `name`; None when there is neither. `RepeatedColumn` when the file holds it more than once."""
    if name in schema.names:
        return _only(schema, name)
    parts = name.split(".")
    for i in range(1, len(parts)):
        head = ".".join(parts[:i])
        if head in schema.names and pa.types.is_struct(_only(schema, head).type):
            inner = field_of(pa.schema(list(schema.field(head).type)), ".".join(parts[i:]))
            if inner is not None:
                return inner.with_name(name)
    return None


def _only(schema: pa.Schema, name: str) -> pa.Field:
    """The one field of `schema` named `name` (`RepeatedColumn` when there are several)."""
    found = schema.get_all_field_indices(name)
    if len(found) > 1:
        raise RepeatedColumn(name, len(found))
    return schema.field(found[0])


VIEW_TYPES = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}


def flat_columns(table: pa.Table, columns: list[str]) -> pa.Table:
    """`columns` of a table read from Parquet, those inside struct columns lifted out under their dotted path, and a
    column of Arrow's view types (string_view, binary_view: as delta-rs writes the files an UPDATE or MERGE rewrites)
    as the plain large type, which every kernel takes (pyarrow's take and filter have none for views)."""
    while any(pa.types.is_struct(t) for t in table.schema.types) and not set(columns) <= set(table.column_names):
        table = table.flatten()
    table = table.select(columns)
    if any(t in VIEW_TYPES for t in table.schema.types):
        table = table.cast(pa.schema([f.with_type(VIEW_TYPES.get(f.type, f.type)) for f in table.schema]))
    return table


def read_columns(parquet: pq.ParquetFile, path: str, columns: list[str], row_groups: list[int] | None = None,
                 filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """The file's `columns` (of `row_groups` only, when given; a dotted name reads a field inside struct columns,
    `field_of`); DataError naming the file and the row groups when its pages cannot be read, decoded or verified.
    With `filesystem` (the file's) and one row group, a read that fails is tried once more from the row group's bytes
    fetched anew into memory (`_read_again`): the rows when they decode (the first read failed on the way),
    `DamagedRowGroup` when they do not (the bytes are damaged)."""
    try:
        if row_groups is None:
            return flat_columns(parquet.read(columns=columns), columns)
        if not row_groups:
            return flat_columns(parquet.schema_arrow.empty_table(), columns)
        return flat_columns(parquet.read_row_groups(row_groups, columns=columns), columns)
    except (OSError, pa.ArrowException, KeyError) as exc:
        if filesystem is not None and row_groups is not None and len(row_groups) == 1:
            again = _read_again(parquet, path, columns, row_groups[0], filesystem, exc, keep=True)
            if isinstance(again, pa.Table):
                return flat_columns(again, columns)
            if again is not None:
                raise again from None
        raise _read_failure(parquet, path, columns, row_groups, exc) from None


def _read_failure(parquet: pq.ParquetFile, path: str, columns: list[str], row_groups: list[int] | None,
                  exc: BaseException) -> DataError:
    """The DataError of a failed read: the file, the row groups, the column that fails alone, what the reader said."""
    where = _groups(row_groups) + _failing_columns(parquet, row_groups, columns)
    return DataError(f"{path}: not a readable Parquet file ({where}{': ' if where else ''}{exc})")


DECODE_ERRORS = (OSError, pa.ArrowInvalid)     # what a page that does not decode or verify raises (as a failed fetch)
CHUNK_PADDING = 100       # bytes past a column chunk's end that a reader may ask for (old parquet-mr files' headers)


class _FetchedChunks(io.RawIOBase):
    """A file of `size` bytes of which only `pieces` ((offset, bytes), fetched beforehand) are held: what a reader of
    one row group asks for. A read elsewhere gives zeros and sets `outside` (what it then says proves nothing)."""

    def __init__(self, pieces: list[tuple[int, bytes]], size: int) -> None:
        super().__init__()
        self.pieces, self.size, self.position, self.outside = pieces, size, 0, False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = offset + (0 if whence == io.SEEK_SET else self.position if whence == io.SEEK_CUR else self.size)
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.position))
        held = next((data[self.position - at:self.position - at + count] for at, data in self.pieces
                     if at <= self.position and self.position + count <= at + len(data)), None)
        if held is None:
            self.outside, held = True, bytes(count)
        buffer[:count] = held
        self.position += count
        return count


def _read_again(parquet: pq.ParquetFile, path: str, columns: list[str], row_group: int, filesystem: pafs.FileSystem,
                exc: BaseException, keep: bool) -> pa.Table | DamagedRowGroup | None:
    """After a read of `row_group` failed with `exc`: its column chunks fetched anew and decoded from memory, where no
    network is in the way - the table when they decode (`keep`; else an empty one, decoded batch by batch and let go),
    a `DamagedRowGroup` when they do not (the bytes are damaged), None when `exc` is not a decode error, the bytes
    cannot be fetched, or the reader asked for bytes beyond the chunks (nothing is proven)."""
    if not isinstance(exc, DECODE_ERRORS):
        return None
    group = parquet.metadata.row_group(row_group)
    chunks = [group.column(j) for j in range(group.num_columns)]
    chunks = [c for c in chunks if any(c.path_in_schema == n or c.path_in_schema.startswith(n + ".") for n in columns)]
    try:
        with filesystem.open_input_file(path) as source:
            size = source.size()
            starts = [c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset
                      else c.data_page_offset for c in chunks]
            pieces = [(at, source.read_at(min(c.total_compressed_size + CHUNK_PADDING, size - at), at))
                      for at, c in zip(starts, chunks)]
    except (OSError, pa.ArrowException):
        return None
    held = _FetchedChunks(pieces, size)
    with pq.ParquetFile(held, metadata=parquet.metadata, page_checksum_verification=True, pre_buffer=False) as again:
        try:
            if keep:
                return None if held.outside else again.read_row_groups([row_group], columns=columns)
            rows = max(1, group.num_rows * PART_BYTES // max(1, uncompressed_bytes(parquet, row_group, columns)))
            for _ in again.iter_batches(batch_size=rows, row_groups=[row_group], columns=columns):
                pass
            return None if held.outside else parquet.schema_arrow.empty_table()
        except DECODE_ERRORS as damage:
            reason = str(damage)
        failing = [] if held.outside else _columns_failing(again, [row_group], columns)
    if held.outside:
        return None
    return DamagedRowGroup(path, row_group, group.num_rows, failing[0] if len(failing) == 1 else "", reason)


def _groups(row_groups: list[int] | None) -> str:
    """Which row groups a failed read asked for ('' for the whole file)."""
    if row_groups is None:
        return ""
    return f"row group {row_groups[0]}" if len(row_groups) == 1 else f"row groups {row_groups}"


def _failing_columns(parquet: pq.ParquetFile, row_groups: list[int] | None, columns: list[str]) -> str:
    """Of a read of `columns` that failed, the columns whose pages fail when each is read alone (', column ...' or
    ', columns ...'; '' where none or all of several do: the failure is not one column's)."""
    failing = _columns_failing(parquet, row_groups, columns)
    if not failing:
        return ""
    return (", column " if len(failing) == 1 else ", columns ") + ", ".join(f"'{c}'" for c in failing)


def _columns_failing(parquet: pq.ParquetFile, row_groups: list[int] | None, columns: list[str]) -> list[str]:
    """Of a read of `columns` that failed, the columns whose pages fail when each is read alone; none where all of
    several do (the failure is not one column's)."""
    if len(columns) < 2:
        return []
    failing = []
    for c in columns:
        try:
            parquet.read(columns=[c]) if row_groups is None else parquet.read_row_groups(row_groups, columns=[c])
        except (OSError, pa.ArrowException, KeyError):
            failing.append(c)
    return [] if len(failing) == len(columns) else failing


PART_BYTES = 16_000_000   # a row group whose columns hold more than this, uncompressed, is read in parts of about this
STREAM_BUFFER = 8 << 20  # through a stream buffered this much per column: pages as they are decoded, not whole chunks


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"   # the folder value Hive and Spark write for a null partition value
# a column a file lacks that its table has (`absent_columns`): null of no type, as a writer that saw no value stores
# it - each kind's checks and reads take it (`ingest.plain_values` types it), a frame's or a clip's as a number's
ABSENT = pa.scalar(None, pa.null())


def path_values(name: str) -> dict[str, str | None]:
    """The partition values in the folders of a file below its date partition (`name`: its path inside the date's
    folder, `ListedFile.name`): `machine_id=pump-01/part-0.parquet` -> {'machine_id': 'pump-01'} (unescaped as Hive
    escapes them; its null folder None). A writer partitioned by the date and more columns - Spark's
    `partitionBy("date", "machine_id")` - keeps those columns in the folder names only, not in the files."""
    out = {}
    for folder in name.split("/")[:-1]:
        key, sep, value = folder.partition("=")
        if sep and key:
            value = unquote(value)
            out[unquote(key)] = None if value == HIVE_NULL else value
    return out


def file_values(file, schema: pa.Schema,
                former_names: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> dict[str, str | pa.Scalar | None]:
    """What the rows of a listed file (`ListedFile`, `shards.InputFile` or profile's `FilePart`: its `name`,
    `table_columns` and `stored_names`) hold for columns the file itself (`schema`) does not: its partition values
    (`path_values` of its name) and null for each of its table's columns it lacks (`absent_columns`; under none of
    its names, `former_names` the modality's) - a column added since it was written (a Delta table's ALTER TABLE ADD
    COLUMNS or MERGE with schema evolution, which every Delta reader reads as null there; a plain table's
    `added_columns`) - `ABSENT`, null of Arrow's null type."""
    return {**absent_columns(schema, file.table_columns, file.stored_names, former_names), **path_values(file.name)}


def absent_columns(schema: pa.Schema, table_columns: tuple[str, ...], stored_names: tuple[tuple[str, str], ...] = (),
                   former_names: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> dict[str, pa.Scalar]:
    """Each of a table's columns (`table_columns`: a Delta table's, or a plain table's `added_columns`) that a file
    (`schema`) lacks under the name it would store it under (`stored_names`) and under each of its other names
    (`former_names`: a file holding the column under a name it was renamed from reads it there), as `ABSENT`
    (`file_values`)."""
    stored = dict(stored_names)
    return {c: ABSENT for c in table_columns
            if all(field_of(schema, stored.get(n, n)) is None for n in (c, *other_names(former_names, c)))}


def with_path_fields(schema: pa.Schema, values: dict[str, str | pa.Scalar | None]) -> pa.Schema:
    """`schema` with a field for each of a file's `file_values` the file does not hold - a string for a partition
    value (`path_values`), Arrow's null type for a column it lacks (`ABSENT`): what a reader of its columns finds
    (`each_row_group(..., values=)`)."""
    missing = [k for k in values if field_of(schema, k) is None]
    return pa.schema([*schema, *(pa.field(k, _scalar(values[k]).type) for k in missing)]) if missing else schema


def _scalar(value: str | pa.Scalar | None) -> pa.Scalar:
    """A `file_values` value as the scalar each of the file's rows holds: a partition value as text."""
    return value if isinstance(value, pa.Scalar) else pa.scalar(value, pa.string())


def each_row_group(parquet: pq.ParquetFile, path: str, columns: list[str], row_groups: list[int] | None = None,
                   filesystem: pafs.FileSystem | None = None, deleted: DeletedRows | None = None,
                   values: dict[str, str | None] | None = None) -> Iterator[pa.Table]:
    """The file's `columns` one row group at a time (of `row_groups` only, when given): a reader holds one row
    group's decoded columns beside what it keeps of them. With `filesystem` (the file's), a row group whose columns
    hold more than `PART_BYTES` uncompressed - a writer that put a day of camera frames, or of a whole fleet, in one
    row group - is read in parts of about that size through a buffered stream, so that a reader's peak is set by
    `PART_BYTES`, not by the rows its writer put in a row group. `deleted`: the rows a Delta deletion vector removes
    from the file (`ListedFile.deleted`), left out by their positions. `values`: the file's partition values
    (`path_values`); a column the file does not hold and they do is each row's value from there."""
    for _, part in _row_group_parts(parquet, path, columns, row_groups, filesystem, deleted, values, False):
        yield part


def each_row_group_part(parquet: pq.ParquetFile, path: str, columns: list[str], row_groups: list[int] | None = None,
                        filesystem: pafs.FileSystem | None = None, deleted: DeletedRows | None = None,
                        values: dict[str, str | None] | None = None
                        ) -> Iterator[tuple[int, pa.Table | DamagedRowGroup]]:
    """`each_row_group`'s parts, each with its row group's number - and a row group whose pages do not decode from
    its bytes (`filesystem` given) as its `DamagedRowGroup` in place of its further parts, the next read on."""
    yield from _row_group_parts(parquet, path, columns, row_groups, filesystem, deleted, values, True)


def _row_group_parts(parquet: pq.ParquetFile, path: str, columns: list[str], row_groups: list[int] | None,
                     filesystem: pafs.FileSystem | None, deleted: DeletedRows | None,
                     values: dict[str, str | None] | None, past_damage: bool
                     ) -> Iterator[tuple[int, pa.Table | DamagedRowGroup]]:
    """`each_row_group`'s parts with their row group's number; with `past_damage`, a damaged row group yielded as
    its `DamagedRowGroup` and the next read on (else raised)."""
    from_path = {c: values[c] for c in columns if values and c in values and field_of(parquet.schema_arrow, c) is None}
    if from_path:
        stored = [c for c in columns if c not in from_path]
        for r, part in _row_group_parts(parquet, path, stored, row_groups, filesystem, deleted, None, past_damage):
            yield r, part if isinstance(part, DamagedRowGroup) else pa.Table.from_arrays(
                [pa.repeat(_scalar(from_path[c]), part.num_rows) if c in from_path else part[c] for c in columns],
                names=columns)
        return
    streamed = None
    starts = _row_group_starts(parquet) if deleted is not None else None
    try:
        for r in range(parquet.metadata.num_row_groups) if row_groups is None else row_groups:
            start = starts[r] if starts else 0
            try:
                rows, size = parquet.metadata.row_group(r).num_rows, uncompressed_bytes(parquet, r, columns)
                if filesystem is None or size <= PART_BYTES or rows < 2:
                    yield r, _without(read_columns(parquet, path, columns, [r], filesystem), deleted, start)
                    continue
                try:
                    if streamed is None:
                        streamed = pq.ParquetFile(filesystem.open_input_file(path), metadata=parquet.metadata,
                                                  buffer_size=STREAM_BUFFER, pre_buffer=False,
                                                  page_checksum_verification=True)
                    parts = streamed.iter_batches(batch_size=max(1, rows * PART_BYTES // size), row_groups=[r],
                                                  columns=columns)
                    batch, at = next(parts, None), start
                    while batch is not None:
                        yield r, _without(flat_columns(pa.Table.from_batches([batch]), columns), deleted, at)
                        at += batch.num_rows
                        batch = next(parts, None)
                except (OSError, pa.ArrowException, KeyError) as exc:
                    again = _read_again(parquet, path, columns, r, filesystem, exc, keep=False)
                    if isinstance(again, DamagedRowGroup):
                        raise again from None
                    raise DataError(f"{path}: not a readable Parquet file ({_groups([r])}: {exc})") from None
            except DamagedRowGroup as damage:
                if not past_damage:
                    raise _less_deleted(damage, deleted, start) from None
                yield r, _less_deleted(damage, deleted, start)
    finally:
        if streamed is not None:
            streamed.close()


def _less_deleted(damage: DamagedRowGroup, deleted: DeletedRows | None, start: int) -> DamagedRowGroup:
    """`damage` counting only the rows of its row group (from position `start` in the file) that `deleted` keeps."""
    keep = None if deleted is None else deleted.kept(start, damage.rows)
    return damage if keep is None else DamagedRowGroup(damage.path, damage.row_group, int(sum(keep)), damage.column,
                                                       damage.reason)


def _row_group_starts(parquet: pq.ParquetFile) -> list[int]:
    """Each row group's first row's position in the file."""
    sizes = [parquet.metadata.row_group(r).num_rows for r in range(parquet.metadata.num_row_groups)]
    return list(accumulate(sizes, initial=0))[:-1]


def _without(table: pa.Table, deleted: DeletedRows | None, start: int) -> pa.Table:
    """`table`, the file's rows from position `start` on, less those `deleted` removes."""
    keep = None if deleted is None else deleted.kept(start, table.num_rows)
    return table if keep is None else table.filter(pa.array(keep))


def uncompressed_bytes(parquet: pq.ParquetFile, row_group: int, columns: list[str]) -> int:
    """How many bytes `columns` (a dotted name: a field inside struct columns) hold in `row_group`, uncompressed."""
    meta = parquet.metadata.row_group(row_group)
    chunks = (meta.column(j) for j in range(meta.num_columns))
    return sum(c.total_uncompressed_size for c in chunks
               if any(c.path_in_schema == name or c.path_in_schema.startswith(name + ".") for name in columns))


class TableFiles(NamedTuple):
    """A modality table's date folders and the Parquet files read there (`list_table_files`); of a Delta table
    (`delta`), also the files its folders still hold that its log no longer does (`replaced`: not read)."""

    folders: dict[dt.date, list[DateFolder]]
    files: list["ListedFile"]
    delta: bool = False
    replaced: tuple["ListedFile", ...] = ()


WHOLE_LISTING_DATES = 31  # more dates than this (or all): a `key=*`-first layout's value folders listed whole, once


class RowTimes(NamedTuple):
    """How a modality's files keep their rows' times, for listing a Delta table not partitioned by date by its time
    statistics: the time column as the files name it, what a number there counts (`time_unit`), whose wall clock a
    naive time shows (None: UTC) and the zone whose calendar the dates are (the spec's `timezone`)."""

    column: str
    unit: str | None = None
    naive_zone: str | None = None
    zone: str = "UTC"

    @classmethod
    def of(cls, spec, m) -> "RowTimes":
        return cls(spec.time_in(m), spec.time_unit_in(m), spec.naive_zone_in(m), spec.timezone)

    def bounds(self, times: tuple[int | float, int | float] | None, kind: pa.DataType | None) -> tuple[int, int] | None:
        """The least and greatest time of a file's rows (microseconds since the epoch) by the Delta log's statistics
        (`LoggedFile.times`, of type `kind`, read as `micros_bounds` reads a footer's; a timestamp's kept to the
        millisecond, so its greatest widened by one); None where they say nothing of it (none kept, a text time)."""
        found = None if times is None or kind is None else micros_bounds(*times, kind, self.unit, self.naive_zone)
        if found is None or not pa.types.is_timestamp(kind):
            return found
        return found[0], found[1] + 999

    def dates(self, low: int, high: int) -> tuple[dt.date, dt.date]:
        """The first and last date (in `zone`) of times from `low` to `high` (microseconds since the epoch)."""
        tz, lowest, highest = zoneinfo.ZoneInfo(self.zone), dt.datetime.min, dt.datetime.max
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        def date_of(us: int) -> dt.date:
            try:
                return (epoch + dt.timedelta(microseconds=us)).astimezone(tz).date()
            except OverflowError:
                return (lowest if us < 0 else highest).date()
        return date_of(low), date_of(high)


def list_table_files(storage: Storage, path: str, partition: str, dates: list[dt.date] | None = None,
                     times: RowTimes | None = None, added: tuple[str, ...] = ()) -> TableFiles:
    """A modality table's date folders (`list_partitions`; of `dates` only, when given) and their Parquet files
    (`list_parquet_files`; `added`: the columns a plain table gained after some of its files were written, the
    modality's `added_columns` - each file's `table_columns`, null where it lacks one, as a Delta table's are);
    where the table is a Delta table, only the files its log holds now
    (`delta_sink.live_data_files`, read first: files a compaction or a DELETE/MERGE replaced are not read, and each
    file keeps the rows its deletion vector removes, `ListedFile.deleted`). A Delta table with column mapping, or
    not partitioned by the date (`times`: by its files' time statistics), is listed from its log alone
    (`files_in_log`)."""
    live = live_data_files(storage, path, times.column if times else None, _date_keys(partition))
    if live is not None and (live.stored_names or not _dated_by_partitions(live, partition)):
        return files_in_log(storage, path, partition, live, dates, times)
    # a layout with a folder per machine first: over many dates, each machine's folder listed once, whole
    folders = list_partitions(storage, path, partition, (min(dates), max(dates)) if dates else None,
                              whole=dates is None or len(dates) > WHOLE_LISTING_DATES)
    if dates is not None:
        folders = {d: folders[d] for d in dates if d in folders}
    files = list_parquet_files(storage.filesystem(path), folders)
    if live is None:
        return TableFiles(folders, [f._replace(table_columns=added) for f in files] if added else files)
    root = storage.fs_path(path)
    held = [relative(f.path, root) in live.live for f in files]
    columns = live.columns
    return TableFiles(folders, [f._replace(deleted=live.live[relative(f.path, root)], table_columns=columns)
                                for f, h in zip(files, held) if h],
                      True, tuple(f for f, h in zip(files, held) if not h))


def _date_keys(partition: str) -> list[str | None]:
    """The partition column each date level of a layout names (None: a level without one, `%Y/%m/%d`)."""
    layout = parse_layout(partition)
    return [level.split("=", 1)[0] if "=" in level else None
            for i, level in enumerate(layout.levels) if not layout.any_value(i)]


def _dated_by_partitions(live: DeltaFiles, partition: str) -> bool:
    """Whether a Delta table's partition columns hold each date level of the layout `partition`."""
    return all(key in live.partition_columns for key in _date_keys(partition))


def files_in_log(storage: Storage, path: str, partition: str, live: DeltaFiles, dates: list[dt.date] | None = None,
                 times: RowTimes | None = None) -> TableFiles:
    """The files of a Delta table as its log lists them (`live.logged`) by date, as `list_table_files` gives a
    table's. A table partitioned by the date: a file's date is what its partition values say at each level of the
    spec's `partition` (a key: that partition column holds the date; a layout `year=%Y/month=%m/day=%d`: its columns
    year, month and day; a `key=*` level: the column `key`); a file whose values name no date of the layout is not
    read, with a warning naming it. A table that is not (partitioned otherwise, or not at all: liquid clustering):
    each file is listed under every date of `dates` from its least to its greatest time by the log's statistics
    (`times`; `ListedFile.span`: its readers keep the rows of the date listed) - with `dates` None once, under its
    first date, the dates of the table (`TableFiles.folders`) being every date a file spans. Either way its
    partition values are named as Hive folders before its name (`ListedFile.name`, so a reader takes a column its
    file lacks from there, `path_values`) and each file carries its columns' physical names
    (`ListedFile.stored_names`, column mapping).
    DataError naming the table where it is not partitioned by the date and `times` is not given, or where the log
    keeps no time statistics of a file to list it by."""
    layout = parse_layout(partition)
    keys = [level.split("=", 1)[0] if "=" in level else None for level in layout.levels]
    by_partitions = _dated_by_partitions(live, partition)
    if not by_partitions and times is None:
        missing = next(level for i, (key, level) in enumerate(zip(keys, layout.levels))
                       if not layout.any_value(i) and key not in live.partition_columns)
        raise DataError(f"{path}: a Delta table with no partition column for the level {missing!r} of its partition "
                        f"{layout.text!r} (its partition columns: {', '.join(live.partition_columns) or 'none'}) - "
                        "set the modality's partition to the column that holds the date (a key: partition: day)")
    date_keys = set(_date_keys(partition)) if by_partitions else set()
    root, wanted = storage.fs_path(path).rstrip("/"), None if dates is None else set(dates)
    columns = live.columns
    folders: dict[dt.date, list[DateFolder]] = {}
    files, other, spans = [], [], []
    for f in live.logged:
        span = None
        if by_partitions:
            values, fields = dict(f.partition), {}
            for level, key in enumerate(keys):
                if not layout.any_value(level):
                    text = values[key] or ""
                    got = layout.match(level, f"{key}={text}")
                    if got is None and text.isdigit() and len(text) == 1:     # an integer month or day: 1 for 01
                        got = layout.match(level, f"{key}=0{text}")
                    if got is None:
                        break
                    fields.update(got)
            day = layout.date(fields) if len(fields) == 3 else None
            if day is None:
                other.append(f.path)
                continue
            days = [day]
        else:
            if (bounds := times.bounds(f.times, live.time_type)) is None:
                raise DataError(f"{path}: a Delta table not partitioned by the date ({layout.text}) is listed by the "
                                f"statistics its log keeps of its time column '{times.column}', and it keeps none "
                                f"that give a time for {f.path}" + (
                                    " (a time stored as text)" if pa.types.is_string(live.time_type or pa.null())
                                    else " (a writer that left statistics out: Delta keeps them for the first 32 "
                                         "columns unless delta.dataSkippingNumIndexedCols says more)"))
            first, last = times.dates(*bounds)
            span = (first.isoformat(), last.isoformat())
            if wanted is None:                  # every date: the file once, its dates among the table's
                spans.append((first, last))
                days = [first]
            else:
                days = sorted(d for d in wanted if first <= d <= last)
        above = "".join(f"{quote(k, safe='')}={HIVE_NULL if v is None else quote(v, safe='')}/"
                        for k, v in f.partition if k not in date_keys)
        for day in days:
            if wanted is not None and day not in wanted:
                continue
            folders.setdefault(day, [DateFolder(root)])
            files.append(ListedFile(day.isoformat(), f"{root}/{f.path}", f.size, above + f.path, f.mtime_ns,
                                    f.deleted, live.stored_names, span, columns))
    if other:
        log.warning("%s: %d file(s) of the Delta table whose partition values name no date as %s are not read (%s%s)",
                    path, len(other), layout.text, ", ".join(sorted(other)[:3]), ", ..." if len(other) > 3 else "")
    reach = None
    for first, last in sorted(spans):           # the dates the files span, once each (their union, run by run)
        start = first if reach is None or first > reach else reach + dt.timedelta(days=1)
        for i in range((last - start).days + 1):
            folders.setdefault(start + dt.timedelta(days=i), [DateFolder(root)])
        reach = last if reach is None else max(reach, last)
    return TableFiles(dict(sorted(folders.items())), sorted(files, key=lambda f: (f.date, f.path)), True)


def read_whole_delta_table(storage: Storage, path: str) -> pa.Table | None:
    """Every row of the Delta table at `path` as its log holds them now - its live files only, the rows a deletion
    vector removes left out, columns stored under physical names (column mapping) read under the table's names and
    its partition values as text columns -, or None where `path` holds no Delta table. For a small input table read
    whole (the labels: an incident table kept in Delta and updated by MERGE holds the replaced files in its folders
    until VACUUM). DataError naming the table or file that cannot be read."""
    live = live_data_files(storage, path)
    if live is None:
        return None
    filesystem, root = storage.filesystem(path), storage.fs_path(path).rstrip("/")
    named = {stored: column for column, stored in live.stored_names if "." not in column}   # top-level columns
    parts = []
    for f in live.logged:       # its partition columns: text, as a Hive folder's
        part = read_whole_file(filesystem, f"{root}/{f.path}", dict(f.partition), f.deleted)
        parts.append(part.rename_columns([named.get(c, c) for c in part.column_names]))
    return pa.concat_tables(parts, promote_options="permissive") if parts else live.schema.empty_table()


def read_whole_file(filesystem: pafs.FileSystem, path: str, values: dict[str, str | None],
                    deleted: DeletedRows | None = None) -> pa.Table:
    """Every row and column of the Parquet file at `path` (its schema kept where it holds no row), with a text
    column for each of its partition values (`values`) it does not hold itself, the rows `deleted` removes left
    out. DataError naming the file where it cannot be read."""
    with open_parquet(filesystem, path) as parquet:
        held = with_path_fields(parquet.schema_arrow, values)
        return pa.concat_tables([flat_columns(held.empty_table(), held.names),
                                 *each_row_group(parquet, path, held.names, filesystem=filesystem, deleted=deleted,
                                                 values=values)])


def read_parquet_files(storage: Storage, path: str) -> list[tuple[str, pa.Table]]:
    """The Parquet file at `path`, or each one under the folder `path` (`parquet_files_under`: side files skipped,
    other files skipped with a warning), as the path the filesystem names it by and its rows read whole, each with
    the values of the `key=value` folders between `path` and it as text columns it does not hold (Spark's
    `partitionBy`, `path_values`), in order of path: a small input table (the labels) kept as plain files. DataError
    naming a folder that cannot be listed or a file that cannot be read."""
    filesystem, root = storage.filesystem(path), storage.fs_path(path).rstrip("/")
    try:
        kind = filesystem.get_file_info(root).type
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if kind == pafs.FileType.NotFound:
        raise DataError(f"{path}: cannot be read (no such file or folder)")
    if kind == pafs.FileType.File:
        return [(root, read_whole_file(filesystem, root, {}))]
    return [(i.path, read_whole_file(filesystem, i.path, path_values(relative(i.path, root))))
            for i in parquet_files_under(filesystem, root)]


class ListedFile(NamedTuple):
    """A Parquet file of a date partition as listed: its date (ISO text), its path as the filesystem names it, its name
    inside the date's folder (after the `key=value/` folders of a layout's `key=*` levels), its size, when it was last
    written (nanoseconds since the epoch; None where the filesystem does not say) and, in a Delta table, the rows a
    deletion vector removes from it (None: none) and, with column mapping, its columns' physical names (a file listed
    from the log: its name is its path inside the table after its partition values as Hive folders)."""

    date: str
    path: str
    size: int
    name: str
    mtime_ns: int | None
    deleted: DeletedRows | None = None
    stored_names: tuple[tuple[str, str], ...] = ()   # a Delta table's column mapping: column -> its files' name
    span: tuple[str, str] | None = None     # a Delta table not partitioned by date: the first and last date of the
                                            # file's rows (listed under each; its rows of `date` are the date's)
    table_columns: tuple[str, ...] = ()     # a Delta table's columns, a plain table's `added_columns`: one the file
                                            # lacks is null (`file_values`)


FOLDER_LISTERS = 16     # date folders listed at once (on S3 each listing is a round trip of tens of milliseconds)


def list_parquet_files(filesystem: pafs.FileSystem,
                       folders: dict[dt.date, list[DateFolder]]) -> list[ListedFile]:
    """The Parquet files under each date's folders, by date then path (each named inside its folder, after the
    `key=value/` folders above it, `DateFolder.above`); the folders are listed `FOLDER_LISTERS` at a time. Files whose
    names start with `.` or `_`, or that lie in a folder so named, are skipped (Spark/Hive side files, a failed job's
    attempts: `_hidden`); other files not named `*.parquet` (a Hive table's `000000_0`) are skipped with a warning
    naming them, never silently; DataError names a folder that cannot be listed."""
    items = [(date, folder) for date, held in sorted(folders.items()) for folder in held]
    if len(items) <= 1:
        return [f for date, folder in items for f in _list_folder(filesystem, date, folder)]
    with ThreadPoolExecutor(min(FOLDER_LISTERS, len(items))) as pool:     # results in date order
        found = [f for listed in pool.map(lambda item: _list_folder(filesystem, *item), items) for f in listed]
    return sorted(found, key=lambda f: (f.date, f.path))        # a date's folders per value listed in any order


def _hidden(name: str) -> bool:
    """Whether a path inside a date folder is a side file, or lies in a side folder, of the writer that made it: a
    part starting with `.` or `_` (`_SUCCESS`, `.part-0.parquet.crc`, Spark's `_temporary/0/...` of attempts not
    committed, Hive's `.hive-staging_*`, Impala's `_impala_insert_staging`), as Hive, Spark and pyarrow's datasets
    skip them."""
    return any(part.startswith((".", "_")) for part in name.split("/"))


def _list_folder(filesystem: pafs.FileSystem, date: dt.date, at: DateFolder) -> list[ListedFile]:
    return [ListedFile(date.isoformat(), i.path, i.size or 0, at.above + relative(i.path, at.path), i.mtime_ns)
            for i in parquet_files_under(filesystem, at.path, at.files)]


def parquet_files_under(filesystem: pafs.FileSystem, folder: str,
                        infos: tuple[pafs.FileInfo, ...] | None = None) -> list[pafs.FileInfo]:
    """The files named `*.parquet` anywhere under `folder` (`infos`: what a listing already read of it), by path:
    side files skipped (`_hidden`), other files skipped with a warning naming them. DataError naming the folder
    where it cannot be listed."""
    try:
        infos = infos if infos is not None else filesystem.get_file_info(pafs.FileSelector(folder, recursive=True))
    except OSError as exc:
        raise DataError(f"{folder}: cannot be listed ({exc})") from None
    shown = sorted((i for i in infos if i.is_file and not _hidden(relative(i.path, folder))), key=lambda i: i.path)
    other = [i.base_name for i in shown if not i.base_name.endswith(".parquet")]
    if other:
        log.warning("%s: %d file(s) not named *.parquet are not read (%s%s); name them *.parquet to have them "
                    "read", folder, len(other), ", ".join(other[:3]), ", ..." if len(other) > 3 else "")
    return [i for i in shown if i.base_name.endswith(".parquet")]
