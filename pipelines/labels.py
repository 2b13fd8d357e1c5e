"""Reading the optional labels table (entity, start, end[, kind]) named in the spec: a Delta table as its log holds it,
or a Parquet file, or a folder's Parquet files read one by one (`parquet_files.read_parquet_files`: `key=value`
folders' values as columns, each file's times read by its own types, then combined).

A column of the wrong type is a DataError naming the path and the column; start and end stored as ISO 8601 text, or
as integers counting the spec's `time_unit` since the epoch, are read as the modalities' times are. Rows that cannot
be used - an entity, start or end missing, beyond any timestamp or no time, an end before its start, or a repeat of
an earlier row's event (entity, start, end and kind alike: a table exported twice would count each event twice) -
are left out, counted per reason in a warning that names the path, and kept (`Labels.unusable`, with their `reason`):
`evaluate` reports them beside its metrics and writes them to `labels_unusable.parquet` in its report folder, the
report page counts them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import polars as pl

from dmafn.spec import Spec
from pipelines.parquet_files import read_parquet_files, read_whole_delta_table
from pipelines.storage import DataError, Storage
from pipelines.stored_times import formats_shown, is_count, times_from_stored

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labels:
    """The labels' usable rows, and the unusable ones with a `reason` each."""
    path: str
    usable: pl.DataFrame
    unusable: pl.DataFrame

    def summary(self) -> dict[str, object]:
        """Rows read, used, and the unusable ones per reason (for `metrics.json` and the page)."""
        reasons = dict(self.unusable.group_by("reason").len().sort("reason").iter_rows()) if self.unusable.height else {}
        return {"path": self.path, "rows": self.usable.height + self.unusable.height, "used": self.usable.height,
                "unusable": reasons}


    def keyed_as(self, spec: Spec, types: dict[str, pl.DataType]) -> "Labels":
        """The labels with their entity columns cast to `types` (the scored table's): a label's `17` finds the
        ticks of entity `"17"`. DataError naming the path and the column where some value cannot be cast."""
        return replace(self, usable=cast_keys(self.usable, types, list(spec.entity), f"labels {self.path}"))


def cast_keys(labels: pl.DataFrame, types: dict[str, pl.DataType], keys: list[str], where: str) -> pl.DataFrame:
    """`labels` with their entity columns `keys` cast to `types` (those of the rows they label) where they differ;
    a DataError naming `where` and the column where some value cannot be read as that type."""
    for key in keys:
        want, have = types.get(key), labels.schema[key]
        if want is None or have == want:
            continue
        try:
            labels = labels.with_columns(pl.col(key).cast(want, strict=True))
        except pl.exceptions.PolarsError:
            raise DataError(f"{where}: entity column '{key}' is {have} and some of its values cannot be read as "
                            f"{want}, the type of the rows they label") from None
    return labels


def load_labels(spec: Spec, storage: Storage) -> Labels:
    """The labels, checked: DataError naming the path (the file, where they are plain files) and column when a column
    is missing or of the wrong type; unusable rows set aside with their reason (and a warning)."""
    if spec.labels is None:
        raise DataError(f"{spec.source}: the spec has no 'labels' section")
    path = spec.labels.path
    try:                                # a Delta table as its log holds it now; else each Parquet file
        table = read_whole_delta_table(storage, path)
        tables = [(path, table)] if table is not None else read_parquet_files(storage, path)
    except OSError as exc:
        raise DataError(f"labels {path}: cannot be read ({exc})") from None
    except DataError as exc:
        raise DataError(f"labels {exc}") from None
    if not tables:
        raise DataError(f"labels {path}: holds no Parquet file")
    try:                                # files that store a column as different types: their common type
        df = pl.concat([_times_read(pl.from_arrow(t), spec, where) for where, t in tables], how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"labels {path}: its files store a column as types that do not combine ({exc})") from None
    start, end = spec.labels.start, spec.labels.end
    missing = [(pl.col(c).is_null(), f"null {c}") for c in [*spec.entity, start, end]]
    event = [*spec.entity, start, end, *(["kind"] if "kind" in df.columns else [])]   # what a row says of its event
    repeated = (~pl.struct(event).is_first_distinct(), f"repeats an earlier row (same {', '.join(event)})")
    reason = pl.lit(None, pl.String)
    for test, why in reversed([*missing, (pl.col(end) < pl.col(start), f"{end} before {start}"), repeated]):
        reason = pl.when(test).then(pl.lit(why)).otherwise(reason)
    marked = df.with_columns(pl.coalesce(pl.col(_UNREAD), reason).alias("reason")).drop(_UNREAD)
    unusable = marked.filter(pl.col("reason").is_not_null())
    if unusable.height:
        counts = ", ".join(f"{n} {why}" for why, n in unusable.group_by("reason").len().sort("reason").iter_rows())
        log.warning("labels %s: %d of %d rows left out (%s)", path, unusable.height, df.height, counts)
    return Labels(path, marked.filter(pl.col("reason").is_null()).drop("reason"), unusable)


_UNREAD = "_unread"     # why a label's stored start or end could not be read (null where both were)


def _times_read(df: pl.DataFrame, spec: Spec, where: str) -> pl.DataFrame:
    """One labels file's rows (or a Delta table's) with start and end as timestamps in microseconds, UTC, and
    `_UNREAD`: the reason a stored time could not be read, naming the value (its time null). DataError naming
    `where` and the column where an entity, start or end column is missing or a column is of the wrong type."""
    start, end = spec.labels.start, spec.labels.end
    for col in [*spec.entity, start, end]:
        if col not in df.columns:
            raise DataError(f"labels {where}: column '{col}' not found; columns are {df.columns}")
    unread = []                     # the reason for each stored time that could not be read
    local = spec.naive_zone_in()    # `naive_times: local`: the zone whose wall clock naive times show
    written = spec.time_format_in()  # the spec's `time_format`: how a time stored as text is written
    for col in (start, end):
        if df.schema[col] in (pl.Date, pl.Null):    # a date alone: its midnight, naive as a date is; no value at all
            df = df.with_columns(pl.col(col).cast(pl.Datetime("us")))
        stored = df.schema[col]
        if (read := times_from_stored(df.get_column(col), spec.time_unit, local, written)) is not None:
            times, bad = read           # counts of the spec's time_unit since the epoch, ISO 8601 text, a clock
            df = df.with_columns(times, bad.alias(f"_unread_{col}"))
            unread.append(pl.format(
                f"{col} {{}} out of range as {spec.time_unit} since the epoch" if is_count(stored) else
                f"{col} {{}}: a wall-clock time {local}'s clocks skipped or showed twice"
                if isinstance(stored, pl.Datetime) else
                (f"{col} '{{}}' not a time in {formats_shown(written)} (time_format)" if written
                 else f"{col} '{{}}' not an ISO 8601 time")
                + (f" (or a wall-clock time {local}'s clocks skipped or showed twice)" if local else ""),
                pl.col(f"_unread_{col}").str.slice(0, 40)))
        elif not isinstance(stored, pl.Datetime):
            raise DataError(f"labels {where}: column '{col}' is {stored}; a timestamp (or date, or ISO 8601 text) is "
                            "needed" + (" - or, with the spec's time_unit (s, ms, us or ns), a count of it since the "
                                        "epoch" if is_count(stored) else ""))
    # one instant type for both ends (naive = UTC, another time zone converted): a naive start beside a zoned end,
    # or files that differ, otherwise cannot be compared (it once ended `evaluate` with an unexpected SchemaError)
    df = df.with_columns(_utc(c, df.schema[c]) for c in (start, end))
    if "kind" in df.columns and df.schema["kind"] == pl.Null:
        df = df.with_columns(pl.col("kind").cast(pl.String))
    if "kind" in df.columns and df.schema["kind"] != pl.String:
        raise DataError(f"labels {where}: column 'kind' is {df.schema['kind']}; text is needed")
    helpers = [f"_unread_{c}" for c in (start, end) if f"_unread_{c}" in df.columns]
    return df.with_columns(pl.coalesce(*unread, pl.lit(None, pl.String)).alias(_UNREAD)).drop(helpers)


def _utc(column: str, dtype: pl.Datetime) -> pl.Expr:
    """A timestamp column as microseconds in UTC: naive ones read as UTC, zoned ones converted."""
    col = pl.col(column).dt.cast_time_unit("us")
    utc = col.dt.replace_time_zone("UTC") if dtype.time_zone is None else col.dt.convert_time_zone("UTC")
    return utc.alias(column)


def read_labels(spec: Spec, storage: Storage) -> pl.DataFrame:
    """The usable labels as a Polars table (`load_labels`)."""
    return load_labels(spec, storage).usable
