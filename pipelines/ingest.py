"""Ingest: read modality tables with partition pruning, check the contract, quarantine bad rows, align.

Steps are plain functions (`check_schema`, `check_rows`, `pipelines.align.align`); the Ray Data wiring
(`read_modality` over `DatePartitionedParquet`, `aligned_dataset`) is thin. Alignment broadcasts the day's modality tables to a few
aligner actors (`ray.put`) and maps them over the tick table, the pattern measured in STACK.md.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from functools import partial

import polars as pl
import pyarrow as pa
import ray

from dmafn.spec import DAY_US, ModalitySpec, Spec
from pipelines.align import TIME, align, alignment_input, date_start_us, make_ticks
from pipelines.parquet_source import DatePartitionedParquet, list_parquet_files
from pipelines.ray_runtime import Resources
from pipelines.storage import DataError, Storage, list_partitions

log = logging.getLogger(__name__)
REASON = "_reason"
_PNG, _JPEG = b"\x89PNG", b"\xff\xd8"


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_list_of_numbers(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
        and _is_numeric(t.value_type)


_EXPECTED = {
    "tabular": (_is_numeric, "a number"), "timeseries": (_is_numeric, "a number"),
    "image": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary (PNG/JPEG bytes)"),
    "text": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "a string"),
    "audio": (_is_list_of_numbers, "a list of floats"),
}


def check_schema(schema: pa.Schema, spec: Spec, m: ModalitySpec, where: str) -> None:
    """Raise DataError naming the table and column when the contract does not hold."""
    names = set(schema.names)
    for col in [*spec.entity, spec.time, *m.value_columns]:
        if col not in names:
            raise DataError(f"modality '{m.name}' ({where}): column '{col}' not found; "
                            f"columns are {sorted(names)}")
    if not pa.types.is_timestamp(schema.field(spec.time).type):
        raise DataError(f"modality '{m.name}' ({where}): time column '{spec.time}' is "
                        f"{schema.field(spec.time).type}, expected a timestamp")
    check, expected = _EXPECTED[m.kind]
    for col in m.value_columns:
        if not check(schema.field(col).type):
            raise DataError(f"modality '{m.name}' ({where}): column '{col}' is {schema.field(col).type}, "
                            f"expected {expected}")


def check_rows(table: pa.Table, spec: Spec, m: ModalitySpec) -> pa.Table:
    """Add `_reason`: null for a usable row, else why the row cannot be used (first problem found).
    The `date` column (the partition the row came from) is kept as it is."""
    df = pl.from_arrow(table)
    conditions = [(pl.col(k).is_null(), f"null entity column '{k}'") for k in spec.entity]
    conditions.append((pl.col(spec.time).is_null(), f"null time column '{spec.time}'"))
    for col in m.value_columns:
        bad = pl.col(col).is_null()
        if m.kind in ("tabular", "timeseries"):
            bad = bad | ~pl.col(col).cast(pl.Float64).is_finite()
        elif m.kind == "image":
            bad = bad | ~(pl.col(col).bin.starts_with(_PNG) | pl.col(col).bin.starts_with(_JPEG))
        elif m.kind == "audio":
            bad = bad | (pl.col(col).list.len() == 0)
        conditions.append((bad, f"unusable value in column '{col}'"))
    expr = pl.when(conditions[0][0]).then(pl.lit(conditions[0][1]))
    for cond, reason in conditions[1:]:
        expr = expr.when(cond).then(pl.lit(reason))
    df = df.with_columns(expr.otherwise(None).alias(REASON))
    return df.to_arrow()


@dataclass
class ModalityRows:
    """A modality's rows for a date range: usable rows (alignment input) and quarantined raw rows."""

    valid: pl.DataFrame
    quarantined: pl.DataFrame
    dates_found: list[dt.date] = field(default_factory=list)


def read_modality(spec: Spec, m: ModalitySpec, dates: list[dt.date], storage: Storage) -> ModalityRows | None:
    """Read the partitions of `dates` that exist (Ray Data, pruned to those folders); None when none exist."""
    parts = list_partitions(storage, m.path, spec.partition)
    found = [d for d in dates if d in parts]
    if not found:
        return None
    columns = list(dict.fromkeys([*spec.entity, spec.time, *m.value_columns]))
    source = DatePartitionedParquet(
        {d: parts[d] for d in found}, storage.filesystem(m.path), columns,
        check_schema=partial(_check_file_schema, spec=spec, m=m), transform=partial(check_rows, spec=spec, m=m))
    # one block per read task: left alone, Ray Data splits the output into >= 200 blocks (its
    # read_op_min_num_blocks), which cost ~5 s for 8 days of a small series here (0.8 s with this)
    tasks = max(1, min(len(source.files), int(4 * Resources.current().cpus)))
    reads = ray.data.read_datasource(source, num_cpus=0.5, override_num_blocks=tasks)
    try:
        blocks = [b for b in ray.get(reads.to_arrow_refs()) if b.num_rows]
    except ray.exceptions.RayTaskError as exc:       # a read task's DataError names the file: raise it as is
        if isinstance(exc.cause, DataError):
            raise exc.cause from None
        raise
    if not blocks:
        return ModalityRows(pl.DataFrame(), pl.DataFrame(), found)
    table = pl.from_arrow(pa.concat_tables(blocks, promote_options="permissive"))
    valid = table.filter(pl.col(REASON).is_null()).drop(REASON)
    quarantined = table.filter(pl.col(REASON).is_not_null())
    return ModalityRows(alignment_input(valid, spec, m), quarantined, found)


def _check_file_schema(schema: pa.Schema, path: str, *, spec: Spec, m: ModalitySpec) -> None:
    check_schema(schema, spec, m, path)


class Aligner:
    """Ray Data callable: a batch of ticks -> aligned rows. The modality tables arrive once, by reference."""

    def __init__(self, spec: Spec, table_refs: dict):
        self.spec = spec
        self.tables = {m: pl.from_arrow(ray.get(ref)).sort(TIME) for m, ref in table_refs["refs"].items()}

    def __call__(self, ticks: pa.Table) -> pa.Table:
        tick_df = pl.from_arrow(ticks)
        if tick_df.is_empty():
            return align(tick_df, {m: t.head(0) for m, t in self.tables.items()}, self.spec).to_arrow()
        ents = tick_df.select(list(self.spec.entity)).unique()
        first, last = tick_df[TIME].min(), tick_df[TIME].max()
        tables = {}
        for m, table in self.tables.items():
            # only the rows these ticks can read: from the modality's look-back before the first tick
            # to the last tick (a pass holds several days; a batch covers a few hours of them)
            back = self.spec.modalities[m].lookback_us
            start = table[TIME].search_sorted(first - back, side="left") if back > 0 else 0
            end = table[TIME].search_sorted(last, side="right")
            tables[m] = table.slice(start, end - start).join(ents, on=list(self.spec.entity), how="semi")
        return align(tick_df, tables, self.spec).to_arrow()


@dataclass
class DayInputs:
    """Everything read for a set of dates: per-modality usable rows, quarantined rows, and the ticks."""

    tables: dict[str, pl.DataFrame]
    quarantined: dict[str, pl.DataFrame]
    ticks: pl.DataFrame


def input_bytes_by_date(spec: Spec, dates: list[dt.date], storage: Storage) -> dict[dt.date, int]:
    """The on-disk bytes of every modality's Parquet files of each date (a backfill sizes its passes by
    it). A table or folder that cannot be listed counts as 0 here: reading it reports the error."""
    sizes = dict.fromkeys(dates, 0)
    for m in spec.modalities.values():
        try:
            parts = list_partitions(storage, m.path, spec.partition)
            files = list_parquet_files(storage.filesystem(m.path), {d: parts[d] for d in dates if d in parts})
        except DataError:
            continue
        for day, _, size in files:
            sizes[dt.date.fromisoformat(day)] += size
    return sizes


def read_inputs(spec: Spec, dates: list[dt.date], storage: Storage) -> DayInputs:
    """Read every modality for `dates` (plus the look-back days that feed each date's first ticks) and build
    the ticks: every entity with a usable row timed inside a date gets every tick of that date.

    Raises DataError before anything is written when no modality has data for any of the dates; a date
    of several with no data gets no ticks (the caller reports it).
    """
    dates = sorted(set(dates))
    lookback = {d - dt.timedelta(days=i) for d in dates for i in range(1, spec.lookback_days + 1)}
    wanted = {date_start_us(d) // DAY_US: d for d in dates}
    tables, quarantined, entity_days = {}, {}, []
    for name, m in spec.modalities.items():
        rows = read_modality(spec, m, sorted(lookback.union(dates)), storage)
        if rows is None or rows.valid.is_empty():
            log.warning("modality '%s': no data for %s..%s under %s; it is absent there", name, dates[0],
                        dates[-1], m.path)
            if rows is not None and not rows.quarantined.is_empty():
                quarantined[name] = rows.quarantined
            continue
        tables[name], quarantined[name] = rows.valid, rows.quarantined
        entity_days.append(rows.valid.select(*spec.entity, (pl.col(TIME) // DAY_US).alias("_day"))
                           .filter(pl.col("_day").is_in(list(wanted))).unique())
    present = pl.concat(entity_days).unique() if entity_days else pl.DataFrame()
    if present.is_empty():
        raise DataError(f"no modality of spec '{spec.name}' has data for {dates[0]}..{dates[-1]}")
    ticks = pl.concat([make_ticks(present.filter(pl.col("_day") == day).drop("_day"), d, spec.grain_us)
                       for day, d in wanted.items()])
    return DayInputs(tables=tables, quarantined=quarantined, ticks=ticks)


def tick_dataset(spec: Spec, ticks: pl.DataFrame) -> "ray.data.Dataset":
    """The ticks as a Ray Data dataset of about half a day per block, each block holding whole entities where
    it can (an aligner then joins only those entities' rows). Built from in-memory blocks, so no task runs."""
    ticks = ticks.sort([*spec.entity, TIME])
    per_day = ticks.select(list(spec.entity)).n_unique() * (86_400_000_000 // spec.grain_us)
    n = max(1, min(64, ticks.height // max(per_day // 2, 1)))
    step = -(-ticks.height // n)
    return ray.data.from_arrow([ticks.slice(i, step).to_arrow() for i in range(0, ticks.height, step)])


def broadcast_tables(inputs: DayInputs) -> dict:
    """The modality tables put in the object store once; aligner actors resolve the references."""
    return {"refs": {m: ray.put(t.to_arrow()) for m, t in inputs.tables.items()}}


def aligned_dataset(spec: Spec, inputs: DayInputs) -> "ray.data.Dataset":
    """Ray Data: the ticks mapped through aligner actors that hold the broadcast modality tables."""
    res = Resources.current()
    pool = res.actor_pool()
    return tick_dataset(spec, inputs.ticks).map_batches(
        Aligner, fn_constructor_kwargs={"spec": spec, "table_refs": broadcast_tables(inputs)},
        batch_format="pyarrow", batch_size=None, compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=res.actor_cpus(pool))
