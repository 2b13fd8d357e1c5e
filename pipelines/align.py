"""Alignment: one row per entity per tick, each modality joined as of the tick, never after it.

Plain functions over Polars tables; the shards' tasks call them on what `pipelines.ingest` read.

Conventions of the tables passed in: entity column(s), `_t` (event time as Int64 microseconds since the
epoch, UTC) and the modality's value columns. Output columns per modality `m`:
  `m__present`                     bool, the modality had a usable row for that tick (tabular, timeseries: a
                                   value in at least one of its columns)
  tabular     `m__<col>`           float64: latest row with  tick - tolerance <= t <= tick (a column it holds
                                   no value in: the latest row's within tolerance that does; null if none)
  timeseries  `m__<col>`           list[f32] of window/period steps, mean per period bin ending at the tick,
                                   gaps filled from neighbouring bins inside the window (per column; null for
                                   a column with no value in the window)
  image/audio `m__<column>`        the payload of the latest row within tolerance
  tabular, image, audio `m__taken` Int64, the time (`_t`) of the latest row within tolerance: the row a payload
                                   came from, so that a tick can tell a new one from one it read before
  text        `m__<column>`        list[str]: messages with  tick - window < t <= tick, oldest first
"""
from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass

import polars as pl

from dmafn.spec import DAY_US, TICK_TIME, ModalitySpec, Spec
from pipelines.labels import cast_keys

TIME = TICK_TIME


def to_micros(expr: pl.Expr) -> pl.Expr:
    """A datetime column as Int64 microseconds since the epoch, UTC: a naive column is read as UTC, a column
    with a time zone is converted from it."""
    return expr.dt.epoch("us")


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def date_start_us(date: dt.date, zone: str = "UTC") -> int:
    """The instant `date` begins in time zone `zone` (its local midnight), as microseconds since the epoch."""
    tz = dt.timezone.utc if zone == "UTC" else zoneinfo.ZoneInfo(zone)
    return (dt.datetime(date.year, date.month, date.day, tzinfo=tz) - _EPOCH) // dt.timedelta(microseconds=1)


def date_end_us(date: dt.date, zone: str = "UTC") -> int:
    """The instant `date` ends in `zone` (the next date's start): a day is 24 h in UTC, 23 or 25 h in a zone on the
    days its clocks change."""
    return date_start_us(date + dt.timedelta(days=1), zone)


def day_number(date: dt.date) -> int:
    """A calendar date as days since 1970-01-01 (what `local_day` gives the times of that date)."""
    return (date - _EPOCH.date()).days


def local_day(micros: pl.Expr, zone: str = "UTC") -> pl.Expr:
    """The calendar date in `zone` of times given as microseconds since the epoch, as days since 1970-01-01
    (Int64)."""
    if zone == "UTC":
        return micros // DAY_US
    return (pl.from_epoch(micros, time_unit="us").dt.replace_time_zone("UTC").dt.convert_time_zone(zone)
            .dt.date().cast(pl.Int32).cast(pl.Int64))


def local_date_text(micros: pl.Expr, zone: str = "UTC") -> pl.Expr:
    """The calendar date in `zone` of times given as microseconds since the epoch, as `YYYY-MM-DD`."""
    ts = pl.from_epoch(micros, time_unit="us").dt.replace_time_zone("UTC")
    return (ts if zone == "UTC" else ts.dt.convert_time_zone(zone)).dt.strftime("%Y-%m-%d")


def make_ticks(entities: pl.DataFrame, date: dt.date, grain_us: int, zone: str = "UTC") -> pl.DataFrame:
    """Every entity x every tick of one day (`k * grain` since the epoch, from the date's start in `zone`): the
    grid `data_ticks` keeps a part of."""
    start, end = date_start_us(date, zone), date_end_us(date, zone)
    first = -(-start // grain_us) * grain_us
    ticks = pl.DataFrame({TIME: pl.int_range(first, end, grain_us, eager=True).cast(pl.Int64)})
    return entities.unique().join(ticks, how="cross").sort([*entities.columns, TIME])


def reach(m: ModalitySpec, grain_us: int) -> pl.Expr:
    """For each row of modality m (`_t`): the first and last tick index (tick / grain) that can read it -
    exactly the ticks at which `align` finds m present through this row."""
    t = pl.col(TIME)
    if m.kind == "timeseries":                     # its period bin b is read by ticks b .. b + window - period
        b = (t + m.period_us - 1) // m.period_us * m.period_us
        first, last = (b + grain_us - 1) // grain_us, (b + m.window_us - m.period_us) // grain_us
    elif m.kind == "text":                         # tick - window < t <= tick
        first, last = (t + grain_us - 1) // grain_us, (t + m.window_us + grain_us - 1) // grain_us - 1
    else:                                          # tick - tolerance <= t <= tick
        first, last = (t + grain_us - 1) // grain_us, (t + (m.tolerance_us or 0)) // grain_us
    return pl.struct(first.alias("_lo"), last.alias("_hi"))


def data_ticks(tables: dict[str, pl.DataFrame], present: pl.DataFrame, spec: Spec,
               dates: list[dt.date] | tuple[dt.date, ...]) -> pl.DataFrame:
    """The ticks that follow the data: an entity gets a tick of a date only when it has a usable row timed
    inside that date (`present`: entity columns and `_day`), and only where some modality has a row the tick can
    read (within that modality's window or tolerance before the tick). Ticks are `k * grain` since the epoch
    (`00:00 + k * grain` UTC), a date's those from its start in the spec's `timezone` to its end; returns the
    entity columns and `_t`, sorted."""
    keys, g = list(spec.entity), spec.grain_us
    schema = {**{k: present.schema[k] for k in keys}, TIME: pl.Int64} if not present.is_empty() else None
    spans = [t.select(*keys, reach(spec.modalities[name], g).alias("_r")).unnest("_r").unique()
             for name, t in tables.items() if not t.is_empty()]
    if not spans or present.is_empty():
        return pl.DataFrame(schema=schema or {TIME: pl.Int64})
    zone = spec.timezone
    first, last = -(-date_start_us(min(dates), zone) // g), (date_end_us(max(dates), zone) - 1) // g
    spans = (pl.concat(spans, how="vertical_relaxed")
             .with_columns(pl.col("_lo").clip(first, None), pl.col("_hi").clip(None, last))
             .filter(pl.col("_hi") >= pl.col("_lo")).sort([*keys, "_lo"]))
    # merge overlapping or touching spans per entity: a new span starts past the furthest end so far
    prev_end = pl.col("_hi").cum_max().shift(1).over(keys)
    spans = spans.with_columns(((pl.col("_lo") > prev_end + 1).fill_null(True)).cum_sum().over(keys).alias("_span"))
    merged = spans.group_by([*keys, "_span"]).agg(pl.col("_lo").min(), pl.col("_hi").max())
    ticks = (merged.select(*keys, (pl.int_ranges("_lo", pl.col("_hi") + 1) * g).alias(TIME)).explode(TIME)
             .with_columns(pl.col(TIME).cast(pl.Int64)).with_columns(local_day(pl.col(TIME), zone).alias("_day")))
    return (ticks.join(present.select(*keys, pl.col("_day").cast(pl.Int64)), on=[*keys, "_day"], how="semi")
            .select(*keys, TIME).sort([*keys, TIME]))


def _asof(ticks: pl.DataFrame, table: pl.DataFrame, m: ModalitySpec, keys: list[str]) -> pl.DataFrame:
    """Each column's latest value within tolerance: the latest row's, or where a row holds no value in a column (a
    row kept for its other values, `ingest.with_reasons`) the latest earlier row's that does - present when any
    column has one (a channel with none is null: a dead channel leaves the modality's others in use)."""
    cols = list(m.value_columns)
    right = table.select([*keys, pl.col(TIME).alias("_rt"), *cols]).sort([*keys, "_rt"])
    gaps = [c for c in cols if right[c].null_count()]
    if gaps:                            # carry each column's last value forward, with the time it was taken at;
        # rows of one entity and time as one (they agree where both hold a value: `ingest.conflicting`)
        right = right.group_by([*keys, "_rt"]).agg(pl.col(c).drop_nulls().first() for c in cols).sort([*keys, "_rt"])
        right = right.with_columns(
            *[pl.col(c).forward_fill().over(keys) for c in gaps],
            *[pl.when(pl.col(c).is_not_null()).then(pl.col("_rt")).forward_fill().over(keys).alias(f"_rt_{c}")
              for c in gaps])
    joined = ticks.sort(TIME).join_asof(right.sort("_rt"), left_on=TIME, right_on="_rt", by=keys,
                                        strategy="backward", tolerance=m.tolerance_us, check_sortedness=False)
    if gaps:                            # a value taken longer than the tolerance before the tick is none
        joined = joined.with_columns(pl.when(pl.col(f"_rt_{c}") >= pl.col(TIME) - m.tolerance_us)
                                     .then(pl.col(c)).otherwise(None).alias(c) for c in gaps)
    present = pl.col("_rt").is_not_null() & pl.any_horizontal(pl.col(c).is_not_null() for c in cols)
    return joined.select([*keys, TIME, present.alias(f"{m.name}__present"),
                          *[pl.col(c).alias(f"{m.name}__{c}") for c in cols], pl.col("_rt").alias(f"{m.name}__taken")])


def _series(ticks: pl.DataFrame, table: pl.DataFrame, m: ModalitySpec, keys: list[str]) -> pl.DataFrame:
    period, steps, cols = m.period_us, m.steps, list(m.columns)
    binned = (table.with_columns(((pl.col(TIME) + period - 1) // period * period).alias("_bin"))
              .group_by([*keys, "_bin"]).agg([pl.col(c).cast(pl.Float64).mean() for c in cols]))
    grid = (ticks.select([*keys, TIME]).with_columns(pl.int_ranges(0, steps).alias("_k")).explode("_k")
            .with_columns((pl.col(TIME) - (steps - 1 - pl.col("_k")) * period).alias("_bin")))
    group = [*keys, TIME]
    joined = grid.join(binned, on=[*keys, "_bin"], how="left").sort([*group, "_k"])
    filled = joined.with_columns([pl.col(c).fill_null(strategy="forward").fill_null(strategy="backward")
                                  .over(group).cast(pl.Float32) for c in cols])
    out = filled.group_by(group, maintain_order=True).agg([pl.col(c).alias(f"{m.name}__{c}") for c in cols])
    # a channel with no value in the window is null (filled within the window, a list is all values or all
    # nulls); the modality is present while any channel has one
    held = {c: pl.col(f"{m.name}__{c}").list.first().is_not_null() for c in cols}
    out = out.with_columns([pl.when(held[c]).then(pl.col(f"{m.name}__{c}")).otherwise(None).alias(f"{m.name}__{c}")
                            for c in cols] + [pl.any_horizontal(held.values()).alias(f"{m.name}__present")])
    return out.select([*group, f"{m.name}__present", *[f"{m.name}__{c}" for c in cols]])


def _text(ticks: pl.DataFrame, table: pl.DataFrame, m: ModalitySpec, keys: list[str], grain_us: int) -> pl.DataFrame:
    col, window = m.column, m.window_us
    first = (pl.col(TIME) + grain_us - 1) // grain_us                 # first tick at or after the message
    last = (pl.col(TIME) + window + grain_us - 1) // grain_us - 1      # last tick with tick - window < t
    # lines in time order, and lines at the same microsecond by their text: the window's order never depends on
    # the order the files were read in (the staging split and the direct read give the same windows)
    spread = (table.select([*keys, TIME, col]).sort([TIME, col])
              .with_columns(pl.int_ranges(first, last + 1).alias("_tick"))
              .explode("_tick").drop_nulls("_tick").with_columns((pl.col("_tick") * grain_us).alias("_tick")))
    grouped = (spread.group_by([*keys, "_tick"], maintain_order=True)
               .agg(pl.col(col).alias(f"{m.name}__{col}")).rename({"_tick": TIME}))
    joined = ticks.select([*keys, TIME]).join(grouped, on=[*keys, TIME], how="left")
    return joined.with_columns(pl.col(f"{m.name}__{col}").is_not_null().alias(f"{m.name}__present"))


def align_modality(ticks: pl.DataFrame, table: pl.DataFrame, m: ModalitySpec, keys: list[str],
                   grain_us: int) -> pl.DataFrame:
    """One modality joined onto the ticks; see the module docstring for the columns."""
    if m.kind == "timeseries":
        return _series(ticks, table, m, keys)
    if m.kind == "text":
        return _text(ticks, table, m, keys, grain_us)
    return _asof(ticks, table, m, keys)


def align(ticks: pl.DataFrame, tables: dict[str, pl.DataFrame], spec: Spec) -> pl.DataFrame:
    """All modalities joined onto the ticks. An absent modality is a mask (`m__present` false), not a lost tick.

    `ticks` holds the entity columns and `_t`; `tables[m]` holds the entity columns, `_t` and m's columns.
    A modality missing from `tables` is absent on every tick.
    """
    keys = list(spec.entity)
    out = ticks.select([*keys, TIME]).sort([*keys, TIME])
    for name, m in spec.modalities.items():
        table = tables.get(name)
        if table is None:
            table = empty_modality_table(spec, m, out.schema)
        part = align_modality(out.select([*keys, TIME]), table, m, keys, spec.grain_us)
        out = out.join(part, on=[*keys, TIME], how="left")
    return out.with_columns(
        pl.from_epoch(TIME, time_unit="us").dt.replace_time_zone("UTC").alias("ts"),
        local_date_text(pl.col(TIME), spec.timezone).alias("date")).sort([*keys, TIME])


_PAYLOAD_TYPES = {"image": pl.Binary, "text": pl.String, "audio": pl.List(pl.Float32)}


def empty_modality_table(spec: Spec, m: ModalitySpec, entity_schema: pl.Schema) -> pl.DataFrame:
    """A table with m's columns and no rows (for a modality with no data in range)."""
    schema = {k: entity_schema[k] for k in spec.entity}
    schema[TIME] = pl.Int64
    for c in m.value_columns:
        schema[c] = _PAYLOAD_TYPES.get(m.kind, pl.Float64)
    return pl.DataFrame(schema=schema)


def alignment_input(table: pl.DataFrame, spec: Spec, m: ModalitySpec) -> pl.DataFrame:
    """A modality's raw rows (entity, spec.time, value columns) in the form `align` takes."""
    return table.select([*spec.entity, to_micros(pl.col(spec.time)).alias(TIME), *m.value_columns])


def label_intervals(labels: pl.DataFrame, spec: Spec, start: str, end: str) -> pl.DataFrame:
    """The labelled intervals as the entity column(s), `_s` and `_e` (microseconds) and `_kind` ("anomaly"
    where the labels have no `kind` column)."""
    return labels.select([*spec.entity, to_micros(pl.col(start)).alias("_s"), to_micros(pl.col(end)).alias("_e"),
                          (pl.col("kind") if "kind" in labels.columns else pl.lit("anomaly")).alias("_kind")])


@dataclass(frozen=True)
class LabelIndex:
    """Labels prepared for `attach_labels` once, for many batches of ticks. `started`: per entity, in order of
    start (ties: as listed), each interval with the latest end so far, `_cover`, sorted by it. The first interval
    whose `_cover` reaches a tick is the earliest-starting one that can cover it, and does exactly when it started
    at or before the tick - one as-of join per tick, overlapping intervals included: the cost grows with ticks +
    intervals, not ticks x intervals. A tick two intervals cover takes the kind of the one that started first.
    `ends`: every interval's end, sorted."""
    started: pl.DataFrame
    ends: pl.DataFrame

    @classmethod
    def build(cls, labels: pl.DataFrame, spec: Spec, start: str, end: str) -> "LabelIndex":
        keys = list(spec.entity)
        intervals = label_intervals(labels, spec, start, end)
        started = (intervals.sort("_s", maintain_order=True)
                   .with_columns(pl.col("_e").cum_max().over(keys).alias("_cover"))
                   .sort("_cover", maintain_order=True))
        return cls(started, intervals.select([*keys, pl.col("_e").alias("_end")]).sort("_end"))

    def window(self, lo_us: int, hi_us: int, reach_us: int) -> "LabelIndex":
        """The index for ticks from `lo_us` to `hi_us` only (a task's dates): the intervals that can cover one of
        them and the ends from `reach_us` before `lo_us` on. Such ticks get the same `label` and `label_kind` as
        from the whole index, and the same `since_event_us` up to `reach_us` (null where the entity's last event
        ended earlier). An interval that started after `hi_us`, or whose `_cover` ends before `lo_us`, can decide
        no such tick: `_cover` grows with the start, so a tick's first match keeps its place."""
        started = self.started.filter((pl.col("_s") <= hi_us) & (pl.col("_cover") >= lo_us))
        first, last = self.ends["_end"].search_sorted(pl.Series([lo_us - reach_us, hi_us]), side="left").to_list()
        return LabelIndex(started, self.ends.slice(first, last - first))

    def keyed_as(self, ticks: pl.DataFrame, keys: list[str]) -> "LabelIndex":
        """The index with its entity columns of the ticks' types (a label's `17` finds the ticks of `"17"`); a
        DataError naming the column where a label's key cannot be read as the ticks' type."""
        if all(self.started.schema[k] == ticks.schema[k] for k in keys):
            return self
        types = dict(ticks.schema)
        return LabelIndex(cast_keys(self.started, types, keys, "labels"), cast_keys(self.ends, types, keys, "labels"))


@dataclass
class KnownIncidents:
    """The labels as training reads them (`train.exclude_labelled`): a tick inside a labelled interval of its
    entity, or less than `after_us` after one ended (the longest reach of a modality that is not a context view:
    its windows and latest frames still hold the incident's rows), is left out of the training and validation
    days - known incidents neither teach the detector what normal is nor set its threshold. `left_out` counts
    the ticks `without` has left out (per process: each task returns its own)."""
    index: LabelIndex
    after_us: int
    left_out: int = 0
    zone: str = "UTC"                   # the spec's timezone: where a date begins and ends

    @classmethod
    def of(cls, labels: pl.DataFrame, spec: Spec) -> "KnownIncidents":
        return cls(LabelIndex.build(labels, spec, spec.labels.start, spec.labels.end), spec.evidence_reach_us,
                   zone=spec.timezone)

    def for_dates(self, dates: tuple[dt.date, ...] | list[dt.date]) -> "KnownIncidents":
        """Only what ticks of `dates` need (a shard's task gets this, not every label of the window)."""
        lo, hi = date_start_us(min(dates), self.zone), date_end_us(max(dates), self.zone)
        return KnownIncidents(self.index.window(lo, hi, self.after_us), self.after_us, zone=self.zone)

    def without(self, aligned: pl.DataFrame, spec: Spec) -> pl.DataFrame:
        """`aligned` without its ticks in or just after a known incident (counted in `left_out`)."""
        if aligned.height == 0:
            return aligned
        labelled = attach_labels(aligned.select([*spec.entity, TIME]), self.index, spec)
        near = (labelled["label"] == 1) | (labelled["since_event_us"].fill_null(self.after_us) < self.after_us)
        self.left_out += int(near.sum())
        return aligned.filter(~near)


def label_ticks(aligned: pl.DataFrame, labels: pl.DataFrame, spec: Spec, start: str, end: str) -> pl.DataFrame:
    """Add `label` (1 where the tick lies inside a labelled interval of its entity), `label_kind` and
    `since_event_us` (microseconds since the end of the entity's latest interval that ended before the tick;
    null where none has). Rows keep their order."""
    return attach_labels(aligned, LabelIndex.build(labels, spec, start, end), spec)


def attach_labels(aligned: pl.DataFrame, index: LabelIndex, spec: Spec) -> pl.DataFrame:
    """`label_ticks` with the labels already prepared (`LabelIndex.build`)."""
    keys = list(spec.entity)
    index = index.keyed_as(aligned, keys)
    out = (aligned.with_row_index("_row").sort(TIME)
           .join_asof(index.started, left_on=TIME, right_on="_cover", by=keys, strategy="forward",
                      check_sortedness=False)
           .with_columns(pl.when(pl.col("_s") <= pl.col(TIME)).then(pl.col("_kind")).otherwise(None).alias("label_kind"))
           .drop("_s", "_e", "_kind", "_cover")
           # time since the end of the entity's latest labelled interval that ended before the tick (null: none yet)
           .join_asof(index.ends, left_on=TIME, right_on="_end", by=keys, strategy="backward",
                      allow_exact_matches=False, check_sortedness=False)
           .sort("_row").with_columns((pl.col(TIME) - pl.col("_end")).alias("since_event_us")).drop("_end", "_row"))
    return out.with_columns(pl.col("label_kind").is_not_null().cast(pl.Int8).alias("label"))
