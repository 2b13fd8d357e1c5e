"""Ingest: a shard's files read straight from storage, the contract checked on every file, unusable rows
kept for quarantine with a reason, usable rows in the form `pipelines.align.align` takes.

Plain functions (pyarrow + Polars, no Ray): a shard's task (`pipelines.score`, `pipelines.train`) calls
`read_shard`; nothing here gathers rows on the driver.
"""
from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import math
import re
import zoneinfo
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dmafn.features import COLOUR_FRAME, GREY_FRAME, decode_pixels, decode_wav, frame_size, wav_format
from dmafn.spec import ModalitySpec, Spec, other_names, with_stored_names
from pipelines.align import TIME, date_end_us, date_start_us, day_number, local_date_text, local_day, to_micros
from pipelines.parquet_files import (ABSENT, DamagedRowGroup, UnreadableFile, each_row_group_part, each_schema,
                                     field_of, file_values, in_file, open_parquet, row_groups_before,
                                     row_groups_between, row_groups_since, time_bounds, with_path_fields)
from pipelines.payload_files import fetched_payloads
from pipelines.row_digests import ROW_HASH, RowDigest, row_hashes
from pipelines.shards import Shard, bucket_of, in_bucket, row_group_entity, row_groups_in_bucket
from pipelines.storage import DataError, Storage
from pipelines.stored_times import formats_shown, is_count, times_from_stored

REASON = "_reason"
PARTLY = "_partly"      # why a row was kept for some of its values only (`with_reasons`)
BAD_TEXT = "_bad_text"
UNREAD = "_unread_"     # + what: the reason a stored value (the time, an audio clip) could not be read, per row
# what a frame's bytes start with, per format Pillow decodes: PNG, JPEG, TIFF (both byte orders), BMP, GIF, WebP
# (a RIFF container; other RIFF payloads fail to decode, `undecodable_images`)
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"II*\x00", b"MM\x00*", b"BM", b"GIF8", b"RIFF")


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_list_of_numbers(t: pa.DataType) -> bool:
    return _is_list(t) and _is_numeric(t.value_type)


def _is_number_or_text(t: pa.DataType) -> bool:
    return _is_numeric(t) or pa.types.is_boolean(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes_or_text(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


_DATA_URI = re.compile(r"^\s*data:[^,]*;base64,")


def base64_payloads(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Frames or clips kept as base64 text (JSON events landed in Parquet carry bytes so; a `data:...;base64,` URI
    too, and MIME's lines of 76 characters) as their bytes; a text that is no base64 as its own bytes, which are no image or WAV (its row quarantined
    as such bytes are)."""
    def decoded(text: str | None) -> bytes | None:
        if text is None:
            return None
        try:
            return base64.b64decode("".join(_DATA_URI.sub("", text).split()), validate=True)   # MIME: lines
        except (binascii.Error, ValueError):
            return text.encode()
    return pa.array([decoded(v) for v in column.to_pylist()],
                    pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())


_EXPECTED = {
    "tabular": (_is_number_or_text, "a number (or its text, or true/false)"),
    "timeseries": (_is_number_or_text, "a number (or its text, or true/false)"),
    "image": (_is_bytes_or_text, "binary (PNG, JPEG, TIFF, BMP, GIF or WebP bytes, or their base64 text)"),
    "text": (_is_bytes_or_text, "a string (or UTF-8 bytes)"),
    "audio": (lambda t: _is_list_of_numbers(t) or _is_bytes_or_text(t), "a list of floats (or WAV bytes, or their "
              "base64 text)"),
    "file": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),     # `payload: file`
             "a string (payload: file - where each payload lies: an s3:// URI, an absolute path or a path under "
             "payload_root)"),
}


def check_columns(schema: pa.Schema, modality: str, columns: list[str], time: str, where: str,
                  time_unit: str | None = None, keys: list[str] | tuple[str, ...] = ()) -> None:
    """Raise DataError naming the table and column when one of `columns` is missing, an entity column of `keys` holds
    nested values (a struct, a list: no key) or `time` is neither a timestamp nor text (ISO 8601, read by
    `read_times`) - nor, with `time_unit` (the modality's), a count of it since the epoch, integer or float (what
    `dmafn profile` needs of a file; `check_schema` checks the value types too)."""
    for col in columns:
        if field_of(schema, col) is None:
            raise DataError(f"modality '{modality}' ({where}): column '{col}' not found; "
                            f"columns are {sorted(schema.names)}")
    for key in keys:
        stored = field_of(schema, key).type
        if pa.types.is_nested(stored.value_type if pa.types.is_dictionary(stored) else stored):
            raise DataError(f"modality '{modality}' ({where}): entity column '{key}' is {stored}, expected text or a "
                            "number - a key inside a struct is read by its dotted name (entity: machine.id)")
    stored = field_of(schema, time).type
    kind = stored.value_type if pa.types.is_dictionary(stored) else stored
    number = is_count(stored)
    if pa.types.is_timestamp(stored) or pa.types.is_date(stored) or pa.types.is_null(stored) \
            or pa.types.is_string(kind) or pa.types.is_large_string(kind) or (time_unit and number):
        return          # text: ISO 8601 (`read_times`); Arrow's null type: no time in the file, every row quarantined
    expected = f"a timestamp, ISO 8601 text or a count of {time_unit} since the epoch (time_unit)" \
        if time_unit else "a timestamp or ISO 8601 text" + (
            "; a count of seconds, milliseconds, microseconds or nanoseconds since the epoch (an integer or a float) "
            "is read as such with time_unit: s, ms, us or ns" if number else "")
    raise DataError(f"modality '{modality}' ({where}): time column '{time}' is {stored}, expected {expected}")


def read_times(table: pa.Table, time: str, time_unit: str | None, naive_zone: str | None = None,
               time_format: str | None = None, entity: list[str] | tuple[str, ...] = ()
               ) -> tuple[pa.Table, pl.Series | None]:
    """`table` with its time column as timestamps in microseconds (naive: UTC, as a naive timestamp column is read)
    where it is stored otherwise: numbers counting the modality's `time_unit` since the epoch, ISO 8601 text (or with
    `time_unit` digits; or, with `time_format`, text as that format writes it), a date (its midnight), Arrow's null
    type (no time in the file: all null) - and, with
    `naive_zone` (`naive_times: local`), naive timestamps and text without an offset as that zone's wall clock
    (an hour the clocks showed twice told apart by the order each entity's rows are stored in, where `table` holds
    its `entity` columns: `stored_times.times_from_wall_clock`).
    Beside it `_unread_time`, for each stored value it could not read (a count no timestamp holds, a text that is no
    time, a wall-clock time the zone's clocks skipped or showed twice), the reason its row is quarantined, naming
    the value (null elsewhere; their time null). A timestamp column that needs no reading is returned as it is,
    with None."""
    i = table.schema.get_field_index(time)
    stored = table.column(i)
    kind = stored.type.value_type if pa.types.is_dictionary(stored.type) else stored.type
    if pa.types.is_null(kind):
        return table.set_column(i, time, stored.cast(pa.timestamp("us"))), None
    if pa.types.is_date(kind):          # a date alone (a daily table): its midnight, naive as a date is
        stored, kind = stored.cast(pa.timestamp("us")), pa.timestamp("us")
        table = table.set_column(i, time, stored)
    if (pa.types.is_timestamp(kind) and (kind.tz is not None or naive_zone is None)) \
            or (read := times_from_stored(pl.from_arrow(stored), time_unit, naive_zone, time_format,
                                          writers(table, entity) if naive_zone else None)) is None:
        return table, None
    times, unread = read
    clock = f"a wall-clock time {naive_zone}'s clocks skipped or showed twice (a daylight-saving change)"
    why = (f"time column '{time}' holds {{}}, which as {time_unit} since the epoch no timestamp can hold"
           if is_count(kind)
           else f"time column '{time}' holds {{}}, {clock}" if pa.types.is_timestamp(kind)
           else f"time column '{time}' holds '{{}}', not a time in {formats_shown(time_format)} (time_format)"
           + (f", or {clock}" if naive_zone else "") if time_format is not None
           else f"time column '{time}' holds '{{}}', not an ISO 8601 time"
           + (f" nor a count of {time_unit} since the epoch" if time_unit else "")
           + (f", or {clock}" if naive_zone else ""))
    reasons = pl.DataFrame({"v": unread}).select(pl.format(why, pl.col("v").str.slice(0, 40))).to_series()
    return table.set_column(i, time, times.to_arrow()), reasons.alias(f"{UNREAD}time")


def writers(table: pa.Table, entity: list[str] | tuple[str, ...]) -> pl.Series | None:
    """Each row's entity key as text (several keys joined), the writer whose order tells a repeated wall-clock hour's
    passes apart; None where `table` lacks an entity column."""
    if not entity or any(k not in table.column_names for k in entity):
        return None
    return pl.from_arrow(table.select(list(entity))).select(entity_string(entity)).to_series()


# what a value column that holds no value at all (Arrow's null type) is read as, by kind
_PLAIN = {"tabular": pa.float64(), "timeseries": pa.float64(), "image": pa.binary(), "text": pa.string(),
          "audio": pa.list_(pa.float64())}


def stored_names(schema: pa.Schema, spec: Spec, m: ModalitySpec) -> dict[str, str]:
    """The columns a job reads of a file of `m` with this schema: the name the file stores each under -> the name it
    is read as (`Spec.columns_read`'s; a value column under one of its `former_names` where the file lacks it)."""
    return spec.stored_columns(m, lambda name: field_of(schema, name) is not None)


def schema_as_read(schema: pa.Schema, spec: Spec, m: ModalitySpec) -> pa.Schema:
    """A file's schema with the columns a job reads under the names they are read as (`stored_names`): what the key
    casts and the checks of stored types go by."""
    names = {stored: read for stored, read in stored_names(schema, spec, m).items() if stored != read}
    return pa.schema([f.with_name(names.get(f.name, f.name)) for f in schema]) if names else schema


def as_read(table: pa.Table, names: dict[str, str]) -> pa.Table:
    """`table`, read by `names`' keys (`stored_names`), with its columns under the names they are read as."""
    if all(stored == read for stored, read in names.items()):
        return table
    return table.rename_columns([names.get(c, c) for c in table.column_names])


def check_schema(schema: pa.Schema, spec: Spec, m: ModalitySpec, where: str) -> None:
    """Raise DataError naming the table and column when the contract does not hold. A value column may be
    dictionary-encoded (a categorical's values are checked), or of Arrow's null type (a writer that saw no value in
    the file: its rows are quarantined as unusable, see `plain_values`), and stored under one of its `former_names`."""
    time, stored_as = spec.time_in(m), {read: stored for stored, read in stored_names(schema, spec, m).items()}
    for col in spec.columns_read(m):
        others = other_names(m.former_names, col)
        if field_of(schema, stored_as[col]) is None and (others or col in m.value_columns):
            raise DataError(f"modality '{m.name}' ({where}): column '{col}' not found" + (
                f", nor under its other names {others} (former_names)" if others else "")
                + f"; columns are {sorted(schema.names)}" + ("" if others else " - a column renamed upstream is read "
                                                             "under either name with the modality's former_names")
                + (", one added to the table since this file was written reads null here with its added_columns"
                   if m.kind in ("tabular", "timeseries") and col in m.value_columns else ""))
    check_columns(schema, m.name, [stored_as[c] for c in spec.columns_read(m)], stored_as[time], where,
                  spec.time_unit_in(m), [stored_as[k] for k in spec.entity_in(m)])
    check, expected = _EXPECTED["file" if m.payload == "file" else m.kind]
    for col in m.value_columns:
        stored = field_of(schema, stored_as[col]).type
        if pa.types.is_null(stored):
            continue
        if not check(stored.value_type if pa.types.is_dictionary(stored) else stored):
            raise DataError(f"modality '{m.name}' ({where}): column '{stored_as[col]}' is {stored}, "
                            f"expected {expected}{_list_hint(stored, m)}")


def _list_hint(stored: pa.DataType, m: ModalitySpec) -> str:
    """What to do with a list per row where the kind reads one value: a block of samples (a waveform) is a clip of
    `kind: audio`; a text's tokens are one string."""
    if m.payload == "file":
        return ""
    if m.kind in ("tabular", "timeseries") and _is_list_of_numbers(stored):
        return (" - a row holding a block of samples (a waveform) is read as a clip by `kind: audio` (`sample_rate`, "
                "`clip`: its spectrogram), one such modality per column; a timeseries reads one sample per row")
    if m.kind == "text" and _is_list(stored) and _is_bytes_or_text(stored.value_type):
        return " - a list of strings (lines, tokens) per row: join it into one string per row upstream"
    return ""


def plain_values(table: pa.Table, m: ModalitySpec) -> pa.Table:
    """`table` (checked by `check_schema`) with each of `m`'s value columns that is dictionary-encoded decoded to its
    values, each of Arrow's null type typed as the kind's values (`_PLAIN`: every row then holds a null, which
    `with_reasons` calls unusable), text stored as bytes (Parquet BINARY without the UTF8 annotation, as Impala
    and older Hive write strings) read as strings unchecked - `valid_text` then quarantines what is not UTF-8 -,
    numbers stored as text (a CSV loaded as strings) parsed, a text that is no number read as null (unusable), and
    a true/false state read as 1/0, decimals (Spark's DECIMAL(p, s), up to 76 digits) as floats, and frames or clips
    kept as base64 text as their bytes (`base64_payloads`), so files that store a column either way read like the
    others."""
    for col in m.value_columns:
        i = table.schema.get_field_index(col)
        column = stored = table.column(i)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if pa.types.is_null(column.type):
            column = column.cast(pa.string() if m.payload == "file" else _PLAIN[m.kind])
        elif m.kind == "text" and (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            column = pc.cast(column, pa.large_string() if pa.types.is_large_binary(column.type) else pa.string(),
                             safe=False)
        elif m.kind in ("tabular", "timeseries") and (pa.types.is_string(column.type)
                                                      or pa.types.is_large_string(column.type)):
            column = pl.from_arrow(column).str.strip_chars().cast(pl.Float64, strict=False).to_arrow()
        elif m.kind in ("tabular", "timeseries") and pa.types.is_boolean(column.type):
            column = column.cast(pa.float64())                   # a state (a valve open, a pump running): 1 or 0
        elif m.kind in ("image", "audio") and m.payload != "file" and (pa.types.is_string(column.type)
                                                                      or pa.types.is_large_string(column.type)):
            column = base64_payloads(column)            # frames or clips kept as base64 text: their bytes
        elif m.kind in ("tabular", "timeseries") and pa.types.is_decimal(column.type):
            column = pc.cast(column, pa.float64())     # Polars has no 256-bit decimals (a panic): every width alike
        if column is not stored:
            table = table.set_column(i, col, column)
    return table


def decoded_audio(table: pa.Table, m: ModalitySpec) -> tuple[pa.Table, pl.Series | None]:
    """An audio modality's clips stored as WAV bytes decoded to float samples at its `sample_rate` (`decode_wav`);
    beside them `_unread_audio`, the reason for each clip that does not decode (its row quarantined; null
    elsewhere). Clips stored as lists of numbers, and other kinds, are returned as they are, with None."""
    if m.kind != "audio":
        return table, None
    i = table.schema.get_field_index(m.column)
    stored = table.column(i)
    if not (pa.types.is_binary(stored.type) or pa.types.is_large_binary(stored.type)):
        return table, None
    data = stored.to_pylist()
    clips = [None if b is None else decode_wav(b, m.sample_rate) for b in data]
    unread = [None if b is None or clip is not None else f"undecodable audio in column '{m.column}'"
              for b, clip in zip(data, clips)]
    return (table.set_column(i, m.column, pa.array(clips, pa.list_(pa.float32()))),
            pl.Series(f"{UNREAD}audio", unread, pl.String))


def check_rows(table: pa.Table, spec: Spec, m: ModalitySpec) -> pa.Table:
    """Add `_reason`: null for a usable row, else why the row cannot be used (first problem found)."""
    return with_reasons(pl.from_arrow(table), spec, m).to_arrow()


def _bad_value(m: ModalitySpec, col: str) -> pl.Expr:
    """True where `col`'s value cannot be used: null, a number that is not finite or that its writer stores for a
    missing value (`missing_values`), bytes that are no image, an empty clip or one with a missing or non-finite
    sample."""
    bad = pl.col(col).is_null()
    if m.payload == "file":             # where the payload lies: its bytes are checked once read (`fetched_payloads`)
        bad = bad | (pl.col(col).str.strip_chars() == "")
    elif m.kind in ("tabular", "timeseries"):
        bad = bad | ~pl.col(col).cast(pl.Float64).is_finite()
        markers = dict(m.missing_values).get(col)
        if markers:                     # the writer's number for a missing value (`missing_values`): as a null
            bad = bad | pl.col(col).cast(pl.Float64).is_in(list(markers))
    elif m.kind == "image":
        bad = bad | ~pl.any_horizontal(pl.col(col).bin.starts_with(magic) for magic in IMAGE_MAGIC)
    elif m.kind == "audio":
        bad = bad | (pl.col(col).list.len() == 0) | pl.col(col).list.eval(
            ~pl.element().cast(pl.Float64).is_finite().fill_null(False)).list.any()
    return bad.fill_null(True)


PARTLY_USED = "the row's other columns used"     # a reason's end where a row was kept for its other values


def partly_reason(column: str) -> str:
    """The reason of a row of numbers kept for its other values, `column`'s unusable (`with_reasons`)."""
    return f"unusable value in column '{column}' ({PARTLY_USED})"


def lacked_column(column: str, path: str, rows: int) -> str:
    """The one reason noted for the rows of a file that lacks `column`, a column its table gained since it was
    written (`file_values`: a Delta table's, `added_columns`) - not one per row, as a value of a row is noted."""
    return (f"column '{column}' is not in file '{path}' (added to its table since it was written): {rows} row(s) "
            f"read without it ({PARTLY_USED})")


def noted_partly(partly: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """Rows of numbers kept for their other values (entity columns, `_t`, `_partly`) as counts per entity and
    reason: `entity`, `_partly`, `rows`, `_first` and `_last` (their earliest and latest times)."""
    return partly.group_by(entity_string(spec.entity).alias("entity"), PARTLY).agg(
        pl.len().cast(pl.Int64).alias("rows"), pl.col(TIME).min().alias("_first"), pl.col(TIME).max().alias("_last"))


def _utc_text(micros: int) -> str:
    return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=micros)).isoformat()


def partly_rows(noted: list[pl.DataFrame], lacked: dict[str, str], path: str, source: str,
                date: dt.date) -> pl.DataFrame:
    """The quarantine rows of a file's rows kept for their other values (`noted_partly` of each part read): a column
    the file lacks (`lacked`: its rows' reason -> the column, `file_values`' `ABSENT`) noted once for the file
    (`lacked_column`, counting 1); any other unusable column once per entity - a dead channel of a high-rate series
    would otherwise copy each of its rows into the quarantine table -, timed at the first such row, its reason saying
    how many rows of the file, from when to when (`rows` counts them); a value unusable in one row alone is noted as
    that row, as before."""
    counts = pl.concat(noted).group_by("entity", PARTLY).agg(
        pl.col("rows").sum(), pl.col("_first").min(), pl.col("_last").max()).sort("entity", PARTLY)
    absent = pl.col(PARTLY).is_in(list(lacked))
    files = [file_row(lacked_column(lacked[why], path, n), source, date) for why, n in
             counts.filter(absent).group_by(PARTLY).agg(pl.col("rows").sum()).sort(PARTLY).iter_rows()]
    counts = counts.filter(~absent)
    reasons = [why if n == 1 else f"{why}: {n} rows of file '{path}', {_utc_text(a)} to {_utc_text(b)}"
               for why, n, a, b in counts.select(PARTLY, "rows", "_first", "_last").iter_rows()]
    return pl.concat([*files, counts.select(
        pl.col("entity"), pl.col("_first").alias(TIME), pl.lit(date.isoformat()).alias("date"),
        pl.lit(source).alias("source"), pl.Series("reason", reasons, pl.String), pl.col("rows")).cast(QUARANTINED)])


def with_reasons(df: pl.DataFrame, spec: Spec, m: ModalitySpec) -> pl.DataFrame:
    """`df` (`m`'s columns as its files name them) with `_reason` added (see `check_rows`); a true `_bad_text`
    column (from `valid_text`) marks text that was not valid UTF-8, each `_unread_*` one (from `read_times`,
    `decoded_audio`) gives the reason a stored value could not be read; they are dropped. A row of numbers
    (tabular, time series) with an unusable value in some of its columns but not all is usable for the others:
    no `_reason`, the unusable values null, and `_partly` (present for those kinds) names the first such column."""
    bad_text = pl.col(BAD_TEXT) if BAD_TEXT in df.columns else pl.lit(False)
    df = df.with_columns(bad_text.fill_null(False).alias(BAD_TEXT))
    unread = [c for c in df.columns if c.startswith(UNREAD)]
    conditions = [(pl.col(k).is_null(), f"null entity column '{k}'") for k in spec.entity_in(m)]
    conditions.append((pl.col(BAD_TEXT), f"invalid UTF-8 in column '{m.column}'"))
    conditions += [(pl.col(c).is_not_null(), pl.col(c)) for c in unread]
    conditions.append((pl.col(spec.time_in(m)).is_null(), f"null time column '{spec.time_in(m)}'"))
    columns = list(dict.fromkeys(m.value_columns))
    partial = m.kind in ("tabular", "timeseries") and len(columns) > 1
    bad = {col: _bad_value(m, col) for col in columns}
    if partial:                          # unusable only when every value is; the first column named
        conditions.append((pl.all_horizontal(bad.values()), f"unusable value in column '{columns[0]}'"))
    else:
        conditions += [(bad[col], f"unusable value in column '{col}'") for col in columns]
    said = lambda reason: reason if isinstance(reason, pl.Expr) else pl.lit(reason)   # noqa: E731
    expr = pl.when(conditions[0][0]).then(said(conditions[0][1]))
    for cond, reason in conditions[1:]:
        expr = expr.when(cond).then(said(reason))
    df = df.with_columns(expr.otherwise(None).alias(REASON))
    if partial:
        first_bad = pl.coalesce(pl.when(bad[col]).then(pl.lit(partly_reason(col))) for col in columns)
        df = df.with_columns(pl.when(pl.col(REASON).is_null()).then(first_bad).alias(PARTLY),
                             *[pl.when(bad[col]).then(None).otherwise(pl.col(col)).alias(col) for col in columns])
    return df.drop(BAD_TEXT, *unread)


def valid_text(table: pa.Table, m: ModalitySpec) -> tuple[pa.Table, np.ndarray]:
    """A text modality's column with every value that is not valid UTF-8 replaced by null, and the mask of those
    rows (all false for other kinds). Valid columns, the usual case, are checked in one pass."""
    bad = np.zeros(table.num_rows, bool)
    if m.kind != "text":
        return table, bad
    column = table.column(m.column)
    try:
        column.validate(full=True)
        return table, bad
    except pa.ArrowInvalid:
        pass
    raw = column.cast(pa.binary()).to_pylist()
    for i, value in enumerate(raw):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
    fixed = pa.array([None if b else v for v, b in zip(raw, bad)], pa.binary()).cast(pa.string())
    return table.set_column(table.schema.get_field_index(m.column), m.column, fixed), bad


MISPLACED = "timed outside its date partition"     # the reason's start: `misplaced` adds the date (and the zone)


def partition_span_us(date, zone: str = "UTC", lateness_us: int = 0) -> tuple[int, int]:
    """The times (microseconds since the epoch, `[lo, hi)`) a row of the `date` partition may have: on `date` as
    time zone `zone` counts dates, or up to `lateness_us` before its start (a row filed late)."""
    return date_start_us(date, zone) - lateness_us, date_end_us(date, zone)


def timed_outside(micros: pl.Expr, date, zone: str = "UTC", lateness_us: int = 0) -> pl.Expr:
    """True where a time (microseconds since the epoch) does not belong in the `date` partition
    (`partition_span_us`); null where there is no time."""
    lo, hi = partition_span_us(date, zone, lateness_us)
    return (micros < lo) | (micros >= hi)


def of_listed_date(table: pa.Table, time: str, time_unit: str | None, naive_zone: str | None,
                   time_format: str | tuple[str, ...] | None, zone: str, date, span,
                   entity: list[str] | tuple[str, ...] = ()) -> pa.Table:
    """`table` (rows of a file as stored; `time` its time column as the file names it) less its rows of other dates
    than `date`, where the file was listed under each date its rows span (a Delta table not partitioned by date:
    `InputFile.span`, its first and last date; rows whose time cannot be read count on the first); `table` itself
    for any other file."""
    if span is None:
        return table
    held = [k for k in entity if k in table.column_names and k != time]       # the rows' writers, as read_shard's
    timed, _ = read_times(table.select([time, *held]), time, time_unit, naive_zone, time_format, held)
    keep = pl.from_arrow(timed).select((~timed_outside(to_micros(pl.col(time)), date, zone)).fill_null(date == span[0]))
    return table.filter(keep.to_series().to_arrow())


def misplaced(rows: pl.DataFrame, date, zone: str = "UTC", lateness_us: int = 0) -> pl.DataFrame:
    """Rows of the `date` partition timed on another date (in the spec's `timezone`; before it by more than the
    spec's `lateness`) get a reason (they are quarantined, never used)."""
    outside = pl.col(REASON).is_null() & timed_outside(pl.col(TIME), date, zone, lateness_us)
    reason = f"{MISPLACED} {date.isoformat()}" + ("" if zone == "UTC" else f" ({zone})")
    return rows.with_columns(pl.when(outside).then(pl.lit(reason)).otherwise(pl.col(REASON)).alias(REASON))


def reason_kind(reason: pl.Expr) -> pl.Expr:
    """A quarantine reason as its kind: the stored value it names (a text, a count, a wall-clock time) as `a value`, a
    payload file that cannot be read (`payload: file`), an input file left out as no Parquet (`UNREADABLE`) and a row
    group left out as damaged (`DAMAGED`; a look-back day's: `DAMAGED_AROUND`) without its name and error, a file's
    note of a column it lacks or of its rows kept for their other values (`partly_rows`) as the reason of such a
    row."""
    return (reason.str.replace(f"^{UNREADABLE} '.*$", UNREADABLE)
            .str.replace(rf"^{DAMAGED} in '.* \(read around the date\): .*$", DAMAGED_AROUND)
            .str.replace(rf"^{DAMAGED} in '.* \(its rows counted under [0-9-]+\): .*$", DAMAGED_ELSEWHERE)
            .str.replace(f"^{DAMAGED} in '.*$", DAMAGED)
            .str.replace(r"^(column '[^']*') is not in file '.*' \(added to its table since it was written\).*$",
                         "${1} is not in files written before it was added to their table")
            .str.replace(rf"^(.* \({PARTLY_USED}\)): \d+ rows of file '.*', \S+ to \S+$", "${1}")
            .str.replace(r" holds (?:'.*'|[-\d]+|\d{4}-\d\d-\d\d[ T][\d:.]+), ", " holds a value, ")
            .str.replace(r" file '.*' in column ", " file in column ").str.replace(r" cannot be read \(.*\)$",
                                                                                 " cannot be read"))


def unusable_reasons(quarantined: pl.DataFrame) -> dict[str, int]:
    """How many of a date's quarantined input rows (`source`, `reason`, `rows`) other than those timed outside their
    partition (`MISPLACED`, counted on their own) each modality and kind of reason (`reason_kind`) took -
    `vibration: unusable value in column 'ax'`."""
    kinds = quarantined.filter(~pl.col("reason").str.starts_with(MISPLACED)).select(pl.format(
        "{}: {}", pl.col("source"), reason_kind(pl.col("reason"))).alias("kind"), "rows")
    counted = kinds.group_by("kind").agg(pl.col("rows").sum()).sort("kind")
    return dict(zip(counted["kind"].to_list(), counted["rows"].to_list()))


def with_payloads(rows: pl.DataFrame, m: ModalitySpec, storage: Storage) -> pl.DataFrame:
    """`rows` of a `payload: file` modality with each usable row's payload read from the file its column names
    (`payload_files.fetched_payloads`: a file that cannot be read is the row's reason) and, for audio, its WAV bytes
    decoded and checked as a clip stored in the table is (`decoded_audio`, `_bad_value`); images are decoded and
    checked by `undecodable_images`."""
    rows = fetched_payloads(rows, m, storage, REASON)
    if m.kind != "audio":
        return rows
    stored = replace(m, payload="bytes")        # the clips as a table storing them holds them
    payloads = rows.select(m.column).to_arrow()
    clips, unread = decoded_audio(payloads, stored)
    formats = clip_formats(payloads, stored)    # each WAV file's stored rate, before it is resampled
    rows = rows.with_columns(pl.from_arrow(clips.column(0)).alias(m.column), *([] if formats is None else [formats]),
                             (unread if unread is not None else pl.Series([None] * rows.height, dtype=pl.String))
                             .alias(UNREAD_CLIP))
    usable = pl.col(REASON).is_null()
    reason = pl.when(usable & pl.col(UNREAD_CLIP).is_not_null()).then(pl.col(UNREAD_CLIP)).when(
        usable & _bad_value(stored, m.column)).then(pl.lit(f"unusable value in column '{m.column}'")) \
        .otherwise(pl.col(REASON))
    return rows.with_columns(reason.alias(REASON)).drop(UNREAD_CLIP)


UNREAD_CLIP = "_unread_clip"    # why a clip read from its file does not decode (`with_payloads`)


TRAINED_FORMATS = "input_payload_formats"   # a version's manifest: per image or audio modality its training
                                            # frames per stored size, clips per stored sample rate
TRAINED_COLOUR = "input_payload_formats_colour"   # ... true where a grey modality's frames with colour were counted
                                                  # apart (`frame_formats`; versions since 2026-12-06)
FORMAT = "_format"      # an audio row's stored format (`clip_formats`), counted with its date's usable rows


def frame_formats(frames: list[bytes], formats_of: dict[bytes, str | None], colour: bool = False) -> list[str | None]:
    """Each frame's stored size (`frame_size`: '<width>x<height>'), as `undecodable_images` keeps it in `formats_of`
    by the frame's bytes (one not read before is opened here), followed by what sets it apart from the modality's
    frames: for a `colour` modality (`channels: 3`) a frame without colour's by `GREY_FRAME` (since 2026-12-05),
    for a grey one a frame with colour's by `COLOUR_FRAME` (since 2026-12-06) - a camera replaced by one of the other
    kind. A version trained before either recorded sizes alone, as its own kind of frames still give them
    (`pipelines.score.new_payload_formats` reads a grey modality's by size alone for a version without
    `TRAINED_COLOUR`)."""
    found = [formats_of[f] if f in formats_of else formats_of.setdefault(f, frame_size(f)) for f in frames]
    if colour:
        return found
    return [None if f is None else f.removesuffix(GREY_FRAME) if f.endswith(GREY_FRAME) else f + COLOUR_FRAME
            for f in found]


def clip_formats(table: pa.Table, m: ModalitySpec) -> pl.Series | None:
    """An audio modality's clips as `FORMAT`: stored as WAV bytes, each one's stored sample rate (`wav_format`:
    '<rate> Hz'; null where none is read); stored as lists of numbers (no rate of their own, read as at the
    modality's `sample_rate`), each one's length ('<n> samples': a device recording at another rate, or clips of
    another length, write other lengths; null for a null clip). None for other kinds."""
    if m.kind != "audio":
        return None
    stored = table.column(m.column)
    if _is_list_of_numbers(stored.type):
        lengths = pc.list_value_length(stored).to_pylist()
        return pl.Series(FORMAT, [None if n is None else f"{n} samples" for n in lengths], pl.String)
    if not (pa.types.is_binary(stored.type) or pa.types.is_large_binary(stored.type)):
        return None
    return pl.Series(FORMAT, [wav_format(b) for b in stored.to_pylist()], pl.String)


def count_payload_formats(formats: list[str | None], into: dict[str, int]) -> dict[str, int]:
    """`into` with each of `formats` (a frame's size, a clip's rate or length) counted; None (none read) left out."""
    for found in formats:
        if found is not None:
            into[found] = into.get(found, 0) + 1
    return into


def merge_counts(into: dict, more: dict) -> dict:
    """`into`'s counts with `more`'s added, at any depth of nesting: per modality, its payloads per stored format
    (`count_payload_formats`), or its entities' training days per row interval (`count_row_intervals`)."""
    for key, n in more.items():
        if isinstance(n, dict):
            merge_counts(into.setdefault(key, {}), n)
        else:
            into[key] = into.get(key, 0) + n
    return into


CADENCED = ("timeseries", "tabular", "image", "audio")    # kinds whose rows come at a cadence (not text's lines):
                                                          # their row intervals are followed
TRAINED_INTERVALS = "input_row_intervals"   # a version's manifest: per such modality and entity, its training days
                                            # per median row interval (`count_row_intervals`)
INTERVAL_GAPS = 10        # an entity's date with fewer intervals between its rows than this: none taken
INTERVAL_STEPS = 32       # interval bins per doubling (`interval_bin`): about 2 % apart


def daily_intervals(table: pl.DataFrame, spec: Spec, dates: list[dt.date]) -> dict[str, dict[str, int]]:
    """Per date of `dates` (as `YYYY-MM-DD`) and entity of a non-text modality's usable rows (`table`: entity columns,
    `_t`; look-back rows too), the median interval between its consecutive rows in microseconds - rows at the same
    time not counted, an interval given to the date of its later row (the spec's `timezone`); an entity's date with
    fewer than `INTERVAL_GAPS` intervals has none. A source sampled or written at another rate moves it, jitter and
    outages do not."""
    keys = list(spec.entity)
    gaps = (table.select(*keys, TIME).sort([*keys, TIME])
            .with_columns(pl.col(TIME).diff().over(keys).alias("_gap")).filter(pl.col("_gap") > 0))
    out: dict[str, dict[str, int]] = {}
    for date in dates:                  # bounds per date, not a calendar per row
        start, end = date_start_us(date, spec.timezone), date_end_us(date, spec.timezone)
        medians = (gaps.filter(pl.col(TIME).is_between(start, end, closed="left")).group_by(keys)
                   .agg(pl.col("_gap").median().alias("_median"), pl.len().alias("_gaps"))
                   .filter(pl.col("_gaps") >= INTERVAL_GAPS))
        if medians.height:
            out[date.isoformat()] = dict(zip(medians.select(entity_string(keys)).to_series().to_list(),
                                             (round(m) for m in medians["_median"].to_list())))
    return out


def interval_bin(us: float) -> int:
    """An interval's bin (`INTERVAL_STEPS` per doubling): round(steps * log2(microseconds))."""
    return round(INTERVAL_STEPS * math.log2(max(us, 1)))


def count_row_intervals(into: dict[str, dict[str, dict[str, int]]],
                        per_date: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, dict[str, int]]]:
    """`into` (per modality and entity, its days per interval bin - `interval_bin`, as text) with the dates of
    `per_date` (`ShardInputs.row_intervals`: date -> modality -> entity -> median interval) counted."""
    for modalities in per_date.values():
        for m, entities in modalities.items():
            held = into.setdefault(m, {})
            for entity, us in entities.items():
                bins = held.setdefault(entity, {})
                bins[str(interval_bin(us))] = bins.get(str(interval_bin(us)), 0) + 1
    return into


def undecodable_images(rows: pl.DataFrame, m: ModalitySpec, decoded: dict[bytes, np.ndarray | None] | None = None,
                       formats_of: dict[bytes, str | None] | None = None) -> pl.DataFrame:
    """Usable image rows whose bytes do not decode (a PNG header followed by garbage) get a reason. The
    decoded frames are kept in `decoded` (keyed by their bytes) for featurize, which then decodes none again, and
    with `formats_of` their stored sizes (`frame_size`), keyed by the same bytes objects (no second copy of a
    frame)."""
    decoded = {} if decoded is None else decoded
    usable = rows[REASON].is_null().to_numpy()
    frames = rows[m.column].to_list()
    broken = []
    for ok, frame in zip(usable, frames):
        if ok and frame not in decoded:
            decoded[frame] = decode_pixels(frame, m)
            if formats_of is not None:
                formats_of[frame] = frame_size(frame)
        broken.append(bool(ok) and decoded[frame] is None)
    reason = pl.lit(f"undecodable image in column '{m.column}'")
    return rows.with_columns(pl.when(pl.Series(broken, dtype=pl.Boolean)).then(reason).otherwise(pl.col(REASON))
                             .alias(REASON))


CONFLICT = "conflicting rows: another row of this entity at the same time holds other values"


def conflicting(table: pl.DataFrame, spec: Spec, m: ModalitySpec) -> np.ndarray:
    """Boolean mask of the rows of an as-of modality (tabular, image, audio) whose entity and time repeat in a
    row with other values: which one a tick should read cannot be told, and a choice would follow the order the
    files were read in. Exact repeats are kept (whichever is read, it is the same), and so are rows that differ
    only where one holds no value (a row kept for its other columns: alignment takes each column's value from the
    row that holds it). Time series average their rows per period and text keeps every line, in an order that does
    not depend on the files (`pipelines.align`): neither has to choose. A context view reads its parent's rows and
    drops the same ones."""
    clash = np.zeros(table.height, bool)
    kind = spec.modalities[m.context_of].kind if m.context_of else m.kind
    if kind in ("timeseries", "text") or table.is_empty():
        return clash
    keys = [*spec.entity, TIME]
    repeated = table.select(pl.struct(keys).is_duplicated()).to_series()
    if not repeated.any():
        return clash
    columns = list(dict.fromkeys(m.value_columns))    # where a row holds no value (kept for its others) it agrees
    groups = (table.with_row_index("_row").filter(repeated).group_by(keys)
              .agg(pl.col("_row"), pl.max_horizontal(pl.col(c).drop_nulls().n_unique() for c in columns)
                   .alias("_values"))
              .filter(pl.col("_values") > 1))
    clash[groups["_row"].explode().to_numpy()] = True
    return clash


REDELIVERED = "repeat of a row in another file: entity, time and text alike (a file delivered twice)"
FILE = "_file"


def redelivered(table: pl.DataFrame, spec: Spec, m: ModalitySpec) -> np.ndarray:
    """Boolean mask of a text modality's rows (with `_file`, the index of the file each was read from - a staged
    piece counts as its source file) that repeat a row of an earlier file exactly - entity, time and message: a file
    delivered twice (a sink that retried, a copy uploaded again) would otherwise double every line of its windows.
    Repeats within one file are kept (a burst of one message in one second); the other kinds need no such rule (an
    exact repeat reads the same, `conflicting`)."""
    if m.kind != "text" or table.is_empty():
        return np.zeros(table.height, bool)
    keys = [*spec.entity, TIME, m.column]
    return table.select(pl.col(FILE) != pl.col(FILE).min().over(keys)).to_series().fill_null(False).to_numpy()


UNREADABLE = "unreadable Parquet file"   # the reason of a file left out by `unreadable_files: skip`
DAMAGED = "damaged Parquet pages"         # ... and of a row group whose pages do not decode from its bytes
DAMAGED_AROUND = f"{DAMAGED} read around the date"   # ... a look-back or look-ahead day's (its kind, 1 a row group)
DAMAGED_ELSEWHERE = f"{DAMAGED} counted under another date"  # ... a file's spanning several dates, counted on one
LEFT_OUT = (UNREADABLE, DAMAGED)          # what `unreadable_files: skip` leaves out, each named in the quarantine
# a shard's quarantined input rows (`ShardInputs.quarantined`)
QUARANTINED = {"entity": pl.String, TIME: pl.Int64, "date": pl.String, "source": pl.String, "reason": pl.String,
               "rows": pl.Int64}       # `rows`: the input rows a quarantine row counts for (`partly_rows`)


def unreadable_file(exc: UnreadableFile, source: str, date: dt.date, dates: list[dt.date]) -> pl.DataFrame:
    """The quarantine row of an input file of `source` (a modality) whose bytes are no Parquet, left out under
    `unreadable_files: skip` (no entity, no time): under its own date, or - a look-back or look-ahead day's - under
    the first of the shard's `dates`, whose ticks it would have fed."""
    own = date in dates
    reason = (f"{UNREADABLE} '{exc.path}'" + ("" if own else f" of {date.isoformat()} (read around the date)")
              + f": {exc.reason} - left out (unreadable_files: skip)")
    return file_row(reason, source, date if own else min(dates))


def damaged_row_group(exc: DamagedRowGroup, source: str, date: dt.date, dates: list[dt.date],
                      counted_under: dt.date | None = None) -> pl.DataFrame:
    """The quarantine row of an input file's row group whose pages do not decode from its bytes (`DamagedRowGroup`),
    left out under `unreadable_files: skip` (no entity, no time): under its own date, counting the row group's rows,
    or - a look-back or look-ahead day's - under the first of the shard's `dates`, whose ticks it would have fed,
    counting 1 (its rows are not the date's; `reason_kind` folds it as `DAMAGED_AROUND`). A row group of a file
    listed under each date its rows span, read for `date` but counted under another (`counted_under`,
    `damaged_owner_date`: its rows cannot be told apart by date), is noted under `date` counting 1 (folded as
    `DAMAGED_ELSEWHERE`)."""
    own = date in dates
    elsewhere = own and counted_under is not None and counted_under != date
    reason = (f"{DAMAGED} in '{exc.path}' row group {exc.row_group}"
              + (f", column '{exc.column}'" if exc.column else "")
              + ("" if own else f" of {date.isoformat()} (read around the date)")
              + (f" (its rows counted under {counted_under.isoformat()})" if elsewhere else "")
              + f": {exc.reason} - its {exc.rows} rows left out (unreadable_files: skip)")
    return file_row(reason, source, date if own else min(dates), exc.rows if own and not elsewhere else 1)


def damaged_owner_date(parquet, time_column: str, row_group: int, span: tuple[dt.date, dt.date], zone: str,
                       time_unit: str | None = None, naive_zone: str | None = None) -> dt.date:
    """The date that counts the rows of a damaged row group of a file listed under each date its rows span
    (`InputFile.span`; each date reads the row groups its times may reach, so one across midnight is read by two):
    the date in `zone` of its earliest time by the time column's statistics, held within the span; the span's
    first date where the statistics do not say. Its rows do not decode, so they cannot be counted by their dates."""
    bounds = time_bounds(parquet, time_column, time_unit, naive_zone)
    if bounds is None:
        return span[0]
    try:
        tz = dt.timezone.utc if zone == "UTC" else zoneinfo.ZoneInfo(zone)
        day = dt.datetime.fromtimestamp(bounds[row_group][0] / 1e6, tz).date()
    except (OverflowError, OSError, ValueError):        # statistics beyond any calendar
        return span[0]
    return min(max(day, span[0]), span[1])


def noting_bucket(parquet, keys: list[str], row_group: int, buckets: int, values: dict[str, str | None]) -> int:
    """The entity bucket (of `buckets`) that names a damaged row group: the one that owns its entity where its
    statistics (or the file's folders) show one, else the first - every bucket whose entities it may hold reads it."""
    key = row_group_entity(parquet, keys, row_group, values) if buckets > 1 else None
    return 0 if key is None else bucket_of(key, buckets)


def file_row(reason: str, source: str, date: dt.date, rows: int = 1) -> pl.DataFrame:
    """A quarantine row about a file, not a row of it (no entity, no time): `source` its modality, `date` the date
    it is noted under, `rows` the input rows it counts for (a file whose bytes are no Parquet: 1)."""
    return pl.DataFrame({"entity": [None], TIME: [None], "date": [date.isoformat()], "source": [source],
                         "reason": [reason], "rows": [rows]}, schema=QUARANTINED)


def quarantined_input(rows: pl.DataFrame, spec: Spec, source: str, date: pl.Expr, reason: pl.Expr) -> pl.DataFrame:
    """`rows` (entity columns, `_t`) as a shard's quarantined input rows: `entity`, `_t`, `date`, `source`,
    `reason`, `rows` (1 each)."""
    return rows.select(entity_string(spec.entity).alias("entity"), pl.col(TIME), date.alias("date"),
                       pl.lit(source).alias("source"), reason.alias("reason"), pl.lit(1, pl.Int64).alias("rows"))


@dataclass
class ShardInputs:
    """What a shard read: per modality its usable rows (entity columns, `_t`, value columns; look-back rows
    only within the modality's window or tolerance of the shard's first tick; a value that could not be used null),
    the unusable rows of the shard's own dates (`entity`, `_t`, `date`, `source`, `reason`) - and, beside them,
    the rows kept for their other values, a reason naming the value that was not (`PARTLY_USED`) -, and the
    (entity, `_day`) pairs with a usable row timed inside one of its dates (`_day` = days since the epoch, of the
    date in the spec's `timezone`), the image frames the check decoded (uint8, by their bytes: `featurize(...,
    decoded=)` reuses them), and how many input rows each of its dates' partitions held (its entity bucket's; a context
    view's rows are its parent's, counted once) and, per modality, how many of them were usable in every column (a dead
    channel leaves none) and the digest of them all as stored (`pipelines.row_digests`), and per image modality its
    usable payloads per stored format (`count_payload_formats`: a frame's size, a clip's rate or length), and per
    non-text modality its entities' median interval between rows on each date (`daily_intervals`; when asked)."""

    tables: dict[str, pl.DataFrame]
    quarantined: pl.DataFrame
    present: pl.DataFrame
    decoded: dict[str, dict[bytes, np.ndarray | None]] = field(default_factory=dict)   # image frames, for featurize
    rows_read: dict[str, int] = field(default_factory=dict)                            # date -> input rows
    usable_rows: dict[str, dict[str, int]] = field(default_factory=dict)   # date -> modality -> usable input rows
    row_digests: dict[str, dict[str, RowDigest]] = field(default_factory=dict)   # date -> modality -> its rows'
                                                                                  # digest (`row_digests`)
    payload_formats: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)   # date -> image or audio
                                        # modality -> its usable payloads per stored format (`count_payload_formats`)
    row_intervals: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)   # date -> non-text
                            # modality -> entity -> its median interval between rows, us (`daily_intervals`)


def entity_string(keys: tuple[str, ...] | list[str]) -> pl.Expr:
    """The entity key column(s) as one string ('|' between several)."""
    return pl.concat_str([pl.col(k).cast(pl.String) for k in keys], separator="|")


def both(first: list[int] | None, second: list[int] | None) -> list[int] | None:
    """The row groups two selections keep (None: every row group)."""
    if first is None or second is None:
        return second if first is None else first
    return sorted(set(first) & set(second))


def read_shard(shard: Shard, spec: Spec, storage: Storage, *, row_intervals: bool = False) -> ShardInputs:
    """Read, check and split the rows of one shard (its entity bucket of every file it lists); with `row_intervals`,
    also take its entities' median interval between rows per date (`daily_intervals`: a sort of each non-text
    table's keys and times - what scoring and training's first statistics pass use, not every pass)."""
    zone = spec.timezone
    days = [day_number(d) for d in shard.dates]
    first, end = date_start_us(min(shard.dates), zone), date_end_us(max(shard.dates), zone)
    tables, quarantined, present, decoded, rows_read, usable_rows, row_digests = {}, [], [], {}, {}, {}, {}
    payload_formats: dict[str, dict[str, dict[str, int]]] = {}
    intervals: dict[str, dict[str, dict[str, int]]] = {}
    formats_of: dict[bytes, str | None] = {}        # a frame's stored size, by its bytes (`frame_formats`)
    for name, m in spec.modalities.items():
        fs = storage.filesystem(m.path)
        time, keys, names = spec.time_in(m), list(spec.entity_in(m)), spec.names_read(m)  # as m's files name them
        unit, wall_clock, written = spec.time_unit_in(m), spec.naive_zone_in(m), spec.time_format_in(m)
        usable, sources = [], {}
        for f in (f for f in shard.files if f.modality == name):
            index = sources.setdefault((f.date, f.name or f.path), len(sources))   # a staged piece: its source's
            stored_as = with_stored_names(m, f.stored_names)    # a Delta table's column mapping: physical names
            try:
                opened = open_parquet(fs, f.path)
            except UnreadableFile as exc:       # its bytes are no Parquet: fails the date, or left out of it
                if spec.unreadable_files != "skip":
                    raise
                if shard.bucket == 0 and not m.context_of:      # named once, by the date's first bucket
                    quarantined.append(unreadable_file(exc, name, f.date, shard.dates))
                continue
            with opened as parquet:
                # a column in the file's folders only (Hive, Spark), or added to its Delta table since: null
                with in_file(name, f.path):     # a column it holds twice: named with the file
                    values = file_values(f, parquet.schema_arrow, m.former_names)
                    schema = with_path_fields(parquet.schema_arrow, values)
                    check_schema(schema, spec, stored_as, f.path)
                lacked = {partly_reason(c): c for c, v in values.items() if v is ABSENT}   # noted once per file
                noted: list[pl.DataFrame] = []      # rows kept for their other values, counted per entity
                own_date, ahead = f.date in shard.dates, f.date > max(shard.dates)
                stored = stored_names(schema, spec, stored_as)   # a column renamed upstream: read as named now
                as_stored = {read: name for name, read in stored.items()}
                # a look-back day: only the row groups that can hold what the first ticks read (by their statistics);
                # a look-ahead day (`lateness`): only those that can hold rows of the shard's dates filed late;
                # and of an entity bucket, only the row groups that may hold its entities
                at = as_stored[time]
                by_time = (None if own_date else row_groups_before(parquet, at, end, unit, wall_clock) if ahead
                           else row_groups_since(parquet, at, first - m.lookback_us, unit, wall_clock))
                if f.span is not None:      # a file of every date its rows span: only its rows of `f.date` are read
                    lo, hi = date_start_us(f.date, zone), date_end_us(f.date, zone)
                    by_time = both(by_time, row_groups_between(parquet, at, lo, hi, unit, wall_clock))
                groups = both(by_time, row_groups_in_bucket(parquet, [as_stored[k] for k in keys], shard.bucket,
                                                            shard.buckets, values))
                groups = both(groups, None if f.row_groups is None else list(f.row_groups))
                counted = own_date and not m.context_of   # a context view reads its parent's rows: counted once
                # peak: a row group (or a part of a big one, `PART_BYTES`) beside the kept rows
                group, before = None, None      # under `skip`, what was gathered before a row group: undone if
                for r, part in each_row_group_part(parquet, f.path, list(stored), groups, fs, f.deleted, values):
                    if r != group and spec.unreadable_files == "skip":      # it turns out damaged
                        group, before = r, _Kept(usable, quarantined, noted, rows_read, usable_rows, row_digests,
                                                 payload_formats)
                    if isinstance(part, DamagedRowGroup):   # its pages do not decode from its bytes
                        if spec.unreadable_files != "skip":
                            raise part
                        before.restore(usable, quarantined, noted, rows_read, usable_rows, row_digests,
                                       payload_formats)
                        if not m.context_of and shard.bucket == noting_bucket(
                                parquet, [as_stored[k] for k in keys], r, shard.buckets, values):  # named once
                            owner = f.date if f.span is None else damaged_owner_date(
                                parquet, at, r, f.span, zone, unit, wall_clock)   # a file of several dates: one
                            quarantined.append(damaged_row_group(part, name, f.date, shard.dates, owner))
                            if counted and owner == f.date:
                                rows_read[f.date.isoformat()] = rows_read.get(f.date.isoformat(), 0) + part.rows
                        continue
                    part = as_read(part, stored)
                    hashes = [row_hashes(part)] if counted else []    # each row as stored (`row_digests`)
                    table, unread_time = read_times(part, time, unit, wall_clock, written, keys)
                    plain = plain_values(table, m)
                    formats = clip_formats(plain, m)        # a WAV clip's stored rate, before it is resampled
                    table, unread_audio = decoded_audio(plain, m)
                    table, bad_text = valid_text(table, m)
                    beside = [u for u in (unread_time, unread_audio, formats) if u is not None]
                    rows = same_keys(with_reasons(pl.from_arrow(table).with_columns(
                        pl.Series(BAD_TEXT, bad_text), *beside, *hashes), spec, m).rename(names), spec, shard.key_casts)
                    rows = in_bucket(rows, list(spec.entity), shard.bucket, shard.buckets) \
                        .with_columns(to_micros(pl.col(spec.time)).alias(TIME))
                    if f.span is not None:  # its rows of `f.date` (those without a time: of its first date)
                        rows = rows.filter(~timed_outside(pl.col(TIME), f.date, zone)
                                           | (pl.col(TIME).is_null() & (f.date == f.span[0])))
                    if ahead:         # a look-ahead day: only rows of the shard's dates (filed late) are kept
                        rows = rows.filter(pl.col(TIME) < end)
                    elif not own_date:  # a look-back day: only what the first ticks can read is checked and kept
                        rows = rows.filter(pl.col(TIME) >= first - m.lookback_us)
                    rows = misplaced(rows, f.date, zone, spec.lateness_us)
                    if m.payload == "file":     # the payload files of the rows kept, read now; a clip decoded
                        rows = with_payloads(rows, m, storage)
                    if m.kind == "image":
                        rows = undecodable_images(rows, m, decoded.setdefault(name, {}), formats_of)
                    good = rows.filter(pl.col(REASON).is_null())
                    if counted:
                        rows_read[f.date.isoformat()] = rows_read.get(f.date.isoformat(), 0) + rows.height
                        row_digests.setdefault(f.date.isoformat(), {}).setdefault(name, RowDigest()).add(rows[ROW_HASH])
                        day_usable = usable_rows.setdefault(f.date.isoformat(), {})
                        partly = good.filter(pl.col(PARTLY).is_not_null()) if PARTLY in good.columns else None
                        # usable in at least one column: a dead channel leaves the modality its others (align)
                        day_usable[name] = day_usable.get(name, 0) + good.height
                        quarantined.append(quarantined_input(rows.filter(pl.col(REASON).is_not_null()), spec, name,
                                                             pl.lit(f.date.isoformat()), pl.col(REASON)))
                        if partly is not None and partly.height:    # kept for its other values: noted per file
                            noted.append(noted_partly(partly, spec))
                        if m.kind == "image" or FORMAT in good.columns:     # frames' sizes, clips' rates or lengths
                            count_payload_formats(
                                frame_formats(good[m.column].to_list(), formats_of, colour=m.channels == 3)
                                if m.kind == "image" else good[FORMAT].to_list(),
                                payload_formats.setdefault(f.date.isoformat(), {}).setdefault(name, {}))
                    usable.append(good.select([*spec.entity, TIME, *m.value_columns]).with_columns(
                        pl.lit(index, pl.Int32).alias(FILE)))
                if noted:                       # a staged piece's notes name the file it was split from
                    quarantined.append(partly_rows(noted, lacked, f.source or f.path, name, f.date))
        table = pl.concat(usable, how="vertical_relaxed") if usable else pl.DataFrame()
        if table.is_empty():
            continue
        again = pl.Series(redelivered(table, spec, m))
        if again.any():                 # a file delivered twice: its rows once, the copy's quarantined
            quarantined.append(quarantined_input(
                table.filter(again & local_day(pl.col(TIME), zone).is_in(days)), spec, name,
                local_date_text(pl.col(TIME), zone), pl.lit(REDELIVERED)))
            table = table.filter(~again)
        table = table.drop(FILE)
        clash = pl.Series(conflicting(table, spec, m))
        if clash.any():                 # rows of one key can sit in different files: checked on the whole table
            if not m.context_of:
                quarantined.append(quarantined_input(
                    table.filter(clash & local_day(pl.col(TIME), zone).is_in(days)), spec, name,
                    local_date_text(pl.col(TIME), zone), pl.lit(CONFLICT)))
            table = table.filter(~clash)
        tables[name] = table
        if row_intervals and m.kind in CADENCED and not m.context_of:
            for day, entities in daily_intervals(table, spec, list(shard.dates)).items():
                intervals.setdefault(day, {})[name] = entities
        present.append(table.select(*spec.entity, local_day(pl.col(TIME), zone).alias("_day"))
                       .filter(pl.col("_day").is_in(days)).unique())
    return ShardInputs(
        tables=tables,
        quarantined=pl.concat(quarantined, how="vertical_relaxed") if quarantined else pl.DataFrame(schema=QUARANTINED),
        present=pl.concat(present, how="vertical_relaxed").unique() if present else pl.DataFrame(),
        decoded=decoded, rows_read=rows_read, usable_rows=usable_rows, row_digests=row_digests,
        payload_formats=payload_formats, row_intervals=intervals)


class _Kept:
    """What `read_shard` had gathered before a row group, to undo what its parts added when it turns out damaged:
    the lengths of its lists, copies of its counts."""

    def __init__(self, usable: list, quarantined: list, noted: list, *counts: dict) -> None:
        self.lengths = (len(usable), len(quarantined), len(noted))
        self.counts = copy.deepcopy(counts)

    def restore(self, usable: list, quarantined: list, noted: list, *counts: dict) -> None:
        for kept, length in zip((usable, quarantined, noted), self.lengths):
            del kept[length:]
        for now, before in zip(counts, self.counts):
            now.clear()
            now.update(copy.deepcopy(before))


def same_keys(rows: pl.DataFrame, spec: Spec, key_casts: tuple[tuple[str, str], ...] = ()) -> pl.DataFrame:
    """`rows` (the time and entity named as the spec names them) with entity keys every table stores alike: a
    dictionary-encoded key (pandas' and Polars' categorical) as its strings, and each key of `key_casts` (see
    `entity_casts`) as text or as a 64-bit integer."""
    casts = {k: pl.String for k in spec.entity if rows.schema[k] in (pl.Categorical, pl.Enum)}
    casts.update((k, pl.String if kind == "text" else pl.Int64) for k, kind in key_casts)
    return rows.with_columns(pl.col(k).cast(t) for k, t in casts.items() if rows.schema[k] != t)


def _key_kind(t: pa.DataType) -> str:
    t = t.value_type if pa.types.is_dictionary(t) else t
    return "text" if pa.types.is_string(t) or pa.types.is_large_string(t) else \
        "integer" if pa.types.is_integer(t) else str(t)


def entity_casts(spec: Spec, schemas: dict[str, pa.Schema | list[pa.Schema]]) -> tuple[tuple[str, str], ...]:
    """How to read the spec's entity keys that the modalities' files (`schemas`: one or several per modality,
    `require_columns`) store differently, so that every table's meet on the ticks (`Shard.key_casts`): a key stored
    as integers in one table or file and as text (or another type) in another is read as `text` in each - machine
    17 and machine '17' are one machine, as they are to the model, whose per-entity statistics are keyed by the key's
    text -, one stored as integers of different widths as `integer` (64-bit). Keys stored alike, or as strings
    plain, large or dictionary-encoded (read as strings), are not listed."""
    casts = []
    for i, key in enumerate(spec.entity):
        types = {field_of(schema, spec.entity_in(spec.modalities[name])[i]).type
                 for name, held in schemas.items() for schema in each_schema(held)}
        kinds = {_key_kind(t) for t in types}
        if len(kinds) > 1:
            casts.append((key, "text"))
        elif kinds == {"integer"} and len(types) > 1:
            casts.append((key, "integer"))
    return tuple(casts)


def require_columns(spec: Spec, storage: Storage, files) -> dict[str, list[pa.Schema]]:
    """Check the schema of each modality's first file on the driver (fail fast before any task starts); every
    file is checked again where it is read. Returns by modality that schema and, where it reads, the newest file's
    (a lake whose writer changed stores its keys otherwise there): what `entity_casts` and `keys_sliceable` go by.
    A newest file that cannot be read is left to its date's task, so that it fails its date alone; under
    `unreadable_files: skip` so is a first file whose bytes are no Parquet (the next one is checked instead)."""
    listed: dict[str, list] = {}
    for f in files:
        listed.setdefault(f.modality, []).append(f)
    def checked(m: ModalitySpec, f) -> pa.Schema:
        """The file's schema (its folders' columns too) checked, under the names read (`schema_as_read`)."""
        former, m = m.former_names, with_stored_names(m, f.stored_names)    # a Delta table's column mapping
        with open_parquet(storage.filesystem(m.path), f.path) as parquet, in_file(m.name, f.path):
            schema = with_path_fields(parquet.schema_arrow, file_values(f, parquet.schema_arrow, former))
            check_schema(schema, spec, m, f.path)
            return schema_as_read(schema, spec, m)

    seen: dict[str, list[pa.Schema]] = {}
    for name, held in listed.items():
        m, newest = spec.modalities[name], held[0]
        for f in held:
            newest = f if f.date >= newest.date else newest
        for first in held:
            try:
                seen[name] = [checked(m, first)]
                break
            except UnreadableFile:
                if spec.unreadable_files != "skip":
                    raise
        else:
            continue                    # none readable: each left out (and named) by its date's tasks
        if newest.path != first.path:
            try:
                seen[name].append(checked(m, newest))
            except DataError:
                pass
    return seen

