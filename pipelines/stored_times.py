"""Event times as files store them, read as naive UTC timestamps in microseconds: a timestamp column needs nothing
(`pipelines.align.to_micros`); these read the others - counts of the spec's `time_unit` since the epoch, integers
(an event stream's sink) or floats (a log shipper's epoch seconds with a fraction), ISO 8601 text (a CSV or JSON
loaded without a schema) and a plant's wall clock (`naive_times: local`). Each returns the times and, beside them,
the stored values it could not read (as text; null elsewhere), so that the caller can say why."""
from __future__ import annotations

import polars as pl
import pyarrow as pa

from dmafn.spec import DAY_US, ISO_8601

MICROS_PER_UNIT = {"s": 1_000_000, "ms": 1_000, "us": 1}       # ns: divided by 1,000 (floor)
# ISO 8601 as data writes it: a date, optionally a time to the minute, second or fraction, optionally Z or an offset
ISO_TIME = (r"^(?P<date>\d{4}-\d{2}-\d{2})(?:[T ](?P<hour>\d{2}):(?P<minute>\d{2})"
            r"(?::(?P<second>\d{2})(?:[.,](?P<fraction>\d{1,9}))?)?)?\s*(?P<zone>Z|[+-]\d{2}(?::?\d{2})?)?$")
_MINUTE_US, _HOUR_US = 60_000_000, 3_600_000_000


def micros_of(value: int, unit: str) -> int:
    """An integer count of `unit` (s, ms, us, ns) since the epoch as microseconds (exact; ns floored)."""
    return value // 1000 if unit == "ns" else value * MICROS_PER_UNIT[unit]


def is_count(dtype: pl.DataType | pa.DataType) -> bool:
    """Whether a stored time of this type (Polars' or Arrow's) is read as a count of `time_unit` since the epoch:
    integers and floats."""
    if isinstance(dtype, pa.DataType):
        return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)
    return dtype.is_integer() or dtype.is_float()


def times_from_counts(counts: pl.Series, unit: str) -> tuple[pl.Series, pl.Series]:
    """Counts of `unit` (s, ms, us, ns) since the epoch as naive (UTC) timestamps in microseconds - integers exactly
    (ns floored), floats to the nearest microsecond -, and the counts no such timestamp can hold (beyond +-292,000
    years; a uint64 beyond int64; NaN or infinite) as text, null elsewhere - their time is null."""
    per_unit = MICROS_PER_UNIT.get(unit, 1)
    limit = (2 ** 63 - 1) // per_unit
    raw = pl.col("raw")
    if counts.dtype.is_float():
        scaled = raw / 1000 if unit == "ns" else raw * per_unit
        out = raw.is_not_null() & (~raw.is_finite() | (scaled.abs() >= 2.0 ** 63))
        micros = pl.when(out).then(None).otherwise(scaled).round(0).cast(pl.Int64)
    else:
        whole = raw.cast(pl.Int64, strict=False)
        out = (whole.is_null() & raw.is_not_null()) | (whole > limit) | (whole < -limit)
        micros = whole // 1000 if unit == "ns" else whole * per_unit
    converted = pl.DataFrame({"raw": counts}).select(
        pl.when(out).then(None).otherwise(micros).cast(pl.Datetime("us")).alias("times"),
        pl.when(out).then(raw.cast(pl.String)).otherwise(None).alias("unread"))
    return converted.get_column("times").alias(counts.name), converted.get_column("unread")


def times_from_stored(values: pl.Series, unit: str | None, naive_zone: str | None = None,
                      time_format: str | tuple[str, ...] | None = None, sequence: pl.Series | None = None
                      ) -> tuple[pl.Series, pl.Series] | None:
    """Times stored otherwise than as zoned timestamps, read: numbers as counts of `unit` (`times_from_counts`;
    only with a unit), text as ISO 8601 (`times_from_text`) or, with `time_format`, as that format writes them
    (`times_from_format`), and - with `naive_zone` - naive timestamps as that zone's wall clock
    (`times_from_wall_clock`, which tells a repeated hour's passes apart by `sequence`, each row's writer); the
    times and the stored values not read (see those). None where nothing needs reading (zoned timestamps and dates,
    naive ones without `naive_zone`; the rest is no time)."""
    if is_count(values.dtype):
        return None if unit is None else times_from_counts(values, unit)
    if values.dtype in (pl.String, pl.Categorical) and time_format is not None:
        return times_from_format(values, time_format, naive_zone, sequence)
    if values.dtype in (pl.String, pl.Categorical):
        return times_from_text(values, unit, naive_zone, sequence)
    if naive_zone and isinstance(values.dtype, pl.Datetime) and values.dtype.time_zone is None:
        return times_from_wall_clock(values, naive_zone, sequence)
    return None


def times_from_wall_clock(times: pl.Series, zone: str, sequence: pl.Series | None = None
                          ) -> tuple[pl.Series, pl.Series]:
    """Naive timestamps that show the wall clock of `zone` (a plant's historian writing local time) as naive UTC
    timestamps in microseconds, and as text those the zone's clocks skipped or showed twice (a daylight-saving
    change) that cannot be read - null elsewhere; their time is null. A time the clocks skipped names no instant.
    One they showed twice (the hour repeated when they go back) is told apart by the order it was written in where
    `sequence` gives each row's writer (its entity key; rows in stored order): among a writer's times of one such
    repeat, those before its clock stepped back by half the change or more are the first pass (summer time),
    those after it the second - as a historian logs the repeated hour twice, in order (`pandas`' `ambiguous='infer'`
    reads it alike). A writer whose repeat shows no such step, or more than one, is not read there."""
    wall = times.dt.cast_time_unit("us")
    utc = _as_utc(wall, zone, "null")
    unknown = utc.is_null() & wall.is_not_null()        # skipped or shown twice (the few rows of a clock change)
    if sequence is not None and unknown.any():
        at = unknown.arg_true()
        utc = utc.scatter(at, _told_apart(wall.gather(at), zone, sequence.gather(at)))
    unread = pl.select(pl.when(utc.is_null() & times.is_not_null()).then(times.dt.to_string("%Y-%m-%d %H:%M:%S%.f"))
                       .otherwise(None)).to_series()
    return utc.alias(times.name), unread


def _as_utc(wall: pl.Series, zone: str, ambiguous: str) -> pl.Series:
    """Naive wall-clock timestamps of `zone` as naive UTC ones; a time the clocks skipped null, one they showed
    twice as `ambiguous` says (`null`, `earliest`, `latest`)."""
    return (wall.dt.replace_time_zone(zone, ambiguous=ambiguous, non_existent="null")
            .dt.convert_time_zone("UTC").dt.replace_time_zone(None))


def _told_apart(wall: pl.Series, zone: str, sequence: pl.Series) -> pl.Series:
    """Wall-clock times of `zone` the clocks skipped or showed twice, with their writers (`sequence`), in stored
    order, as naive UTC timestamps where they can be told apart (`times_from_wall_clock`), null elsewhere: per
    writer and repeat (its wall date), the first pass the earlier instant, the second the later, where exactly one
    step back of half the change or more parts them; a skipped time is null."""
    first, second = _as_utc(wall, zone, "earliest"), _as_utc(wall, zone, "latest")
    rows = pl.DataFrame({"key": sequence.cast(pl.String), "wall": wall, "first": first, "second": second})
    repeat = [pl.col("key"), pl.col("wall").dt.date()]
    back = (pl.col("wall").diff().over(repeat) <= -(pl.col("second") - pl.col("first")) / 2).fill_null(False)
    passes = rows.with_columns(back.cast(pl.Int32).alias("back")).with_columns(
        pl.col("back").cum_sum().over(repeat).alias("pass"), pl.col("back").sum().over(repeat).alias("steps"))
    return passes.select(pl.when(pl.col("first").is_null() | (pl.col("steps") != 1)).then(None)
                         .when(pl.col("pass") == 0).then(pl.col("first")).otherwise(pl.col("second"))).to_series()


def time_formats(time_format: str | tuple[str, ...]) -> tuple[str, ...]:
    """A spec's `time_format` as the formats it lists, in order (one: a tuple of one)."""
    return (time_format,) if isinstance(time_format, str) else tuple(time_format)


def formats_shown(time_format: str | tuple[str, ...]) -> str:
    """How a reason names a `time_format`: `the format '%d/%m/%Y'`, `the formats '%d/%m/%Y' or ISO 8601`."""
    formats = time_formats(time_format)
    named = " or ".join("ISO 8601" if f == ISO_8601 else f"'{f}'" for f in formats)
    return f"the format{'s' if len(formats) > 1 else ''} {named}"


def times_from_format(texts: pl.Series, time_format: str | tuple[str, ...], naive_zone: str | None = None,
                      sequence: pl.Series | None = None) -> tuple[pl.Series, pl.Series]:
    """Times written as text in `time_format` (a strftime format as Polars reads it - `%d/%m/%Y %H:%M:%S%.f`,
    `%b %d %Y %I:%M:%S %p`; the spec checks that it holds the date - or several, tried in order: a value is read by the
    first that reads it, `ISO_8601` standing for ISO 8601 text; a writer that changed its format) as naive (UTC)
    timestamps in microseconds: with an offset in the format (`%z`) each value converted by its own, else UTC - or,
    with `naive_zone`, that zone's wall clock (`times_from_wall_clock`). Spaces around a value are ignored. Returns
    the times and the texts no format reads (another shape, an impossible date; a wall-clock time the zone skipped or
    showed twice), null elsewhere; their time is null."""
    text = texts.cast(pl.String).str.strip_chars()
    times = taken = None
    for written in time_formats(time_format):
        if written == ISO_8601:
            got, _ = times_from_text(texts, None, naive_zone, sequence)
            read = got.is_not_null()
        else:
            parsed = text.str.strptime(pl.Datetime("us"), written, strict=False)
            read = parsed.is_not_null()          # read by this format: taken from it, a clock change's time too
            if isinstance(parsed.dtype, pl.Datetime) and parsed.dtype.time_zone is not None:
                got = parsed.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
            elif naive_zone is not None:
                got, _ = times_from_wall_clock(parsed, naive_zone, sequence)
            else:
                got = parsed
        got = got.cast(pl.Datetime("us"))
        times = got if times is None else pl.select(pl.when(taken).then(times).otherwise(got)).to_series()
        taken = read if taken is None else taken | read
    unread = pl.select(pl.when(times.is_null() & text.is_not_null()).then(texts.cast(pl.String))).to_series()
    return times.alias(texts.name), unread


def times_from_text(texts: pl.Series, unit: str | None = None, naive_zone: str | None = None,
                    sequence: pl.Series | None = None) -> tuple[pl.Series, pl.Series]:
    """Times stored as text as naive (UTC) timestamps in microseconds: ISO 8601 - `2024-01-05T10:00:00Z`,
    `2024-01-05 10:00:00.250`, `2024-01-05T11:00+01:00` (an offset converted, none read as UTC - or, with
    `naive_zone`, as that zone's wall clock, `times_from_wall_clock`), a date alone its midnight - or, with `unit`, a
    whole number (a count of it since the epoch, as `times_from_counts`). Spaces around a value are ignored. Returns
    the times and the texts that are neither (a day-first `05/01/2024`, an impossible `2024-02-30`, an hour 24; a
    wall-clock time the zone skipped or showed twice), null elsewhere; their time is null. Each value is read by its
    own shape, never by a format guessed from another row."""
    text = texts.cast(pl.String).str.strip_chars()
    parts = pl.DataFrame({"text": text}).select(pl.col("text"), pl.col("text").str.extract_groups(ISO_TIME)
                                                .alias("iso")).unnest("iso")
    number = lambda name, default: pl.col(name).cast(pl.Int64, strict=False).fill_null(default)  # noqa: E731
    zone = pl.col("zone").str.replace_all(":", "")
    offset_us = (pl.when(pl.col("zone").is_null() | (pl.col("zone") == "Z")).then(0).otherwise(
        (zone.str.slice(1, 2).cast(pl.Int64) * _HOUR_US + zone.str.slice(3, 2).str.pad_end(2, "0").cast(pl.Int64)
         * _MINUTE_US) * pl.when(zone.str.starts_with("-")).then(-1).otherwise(1)))
    day = pl.col("date").str.to_date("%Y-%m-%d", strict=False)
    clock_ok = (number("hour", 0) < 24) & (number("minute", 0) < 60) & (number("second", 0) < 60)
    micros = (day.cast(pl.Int64) * DAY_US + number("hour", 0) * _HOUR_US + number("minute", 0) * _MINUTE_US
              + number("second", 0) * 1_000_000
              + pl.col("fraction").str.pad_end(9, "0").str.slice(0, 6).cast(pl.Int64, strict=False).fill_null(0)
              - offset_us)
    read = parts.select(pl.col("text"), pl.when(day.is_not_null() & clock_ok).then(micros).alias("micros"))
    if naive_zone is not None:       # the values without a zone: that zone's wall clock
        naive = parts.get_column("zone").is_null()      # (a zoned value is no wall clock: left out of the order)
        wall = pl.select(pl.when(naive).then(read.get_column("micros"))).to_series().cast(pl.Datetime("us"))
        local, _ = times_from_wall_clock(wall, naive_zone, sequence)
        read = read.with_columns(pl.when(naive).then(local.cast(pl.Int64))
                                 .otherwise(pl.col("micros")).alias("micros"))
    if unit is not None:
        digits = pl.col("text").str.contains(r"^[+-]?\d+$")
        counts, _ = times_from_counts(read.get_column("text").str.to_integer(strict=False), unit)
        read = read.with_columns(pl.when(digits & pl.col("micros").is_null())
                                 .then(counts.cast(pl.Int64)).otherwise(pl.col("micros")).alias("micros"))
    read = read.select(pl.col("micros").cast(pl.Datetime("us")).alias("times"),
                       pl.when(pl.col("micros").is_null() & pl.col("text").is_not_null()).then(texts.cast(pl.String))
                       .alias("unread"))
    return read.get_column("times").alias(texts.name), read.get_column("unread")
