"""Scoring: ticks -> Ray Data actor pool (`DayScorer`: align, then score) -> post-processing -> Delta Lake,
one date a commit (a backfill reads and scores several dates in one pass, then commits each alone).

Alignment and scoring share one actor so that a date's pipeline needs exactly one kind of actor and no
other task: several dates (or jobs) on a small cluster then queue for CPUs instead of each holding part
of what it needs (the hold-and-wait that can stall a 2-CPU cluster).

Output table (`score.output`, partitioned by `date`): entity column(s), ts, date, score, threshold,
is_anomaly, score_<modality> (null where absent), modalities, model_version, run_id, scored_at.
Ticks with no usable modality go to the quarantine table with a reason; for every date
ticks in = rows scored + rows quarantined (also recorded in the runs table).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import ray

from dmafn.features import featurize
from dmafn.scoring import raw_scores, to_record
from dmafn.spec import DAY_US, Spec
from pipelines.align import TIME, date_start_us
from pipelines.delta_sink import read_table, write_partition
from pipelines.ingest import Aligner, DayInputs, broadcast_tables, input_bytes_by_date, read_inputs, tick_dataset
from pipelines.postprocess import smooth_columns
from pipelines.ray_runtime import Resources, machine_memory_bytes
from pipelines.registry import ModelVersion, Registry
from pipelines.storage import BackfillError, DataError, Storage

log = logging.getLogger(__name__)
NO_MODALITY = "no modality present at the tick"
DAYS_PER_PASS = 7       # backfill: dates read and scored together (one actor pool), each still committed alone
# backfill: a pass's input files (Parquet bytes on disk) may total at most this share of the driver machine's
# memory, divided by the passes in flight: the driver decodes a pass's tables (~3x the Parquet bytes) and
# puts them in the object store, so 1/32 keeps all passes in flight to about a fifth of the memory
PASS_MEMORY_SHARE = 1 / 32


class Scorer:
    """Scores aligned batches with one loaded model version; `__call__(aligned batch)` is pure."""

    def __init__(self, mv: ModelVersion):
        self.version, self.model, self.spec = mv.version, mv.model, mv.spec
        self.stats, self.calibration = mv.stats, mv.calibration

    def __call__(self, aligned: pa.Table) -> pa.Table:
        spec = self.spec
        feats = featurize(aligned, spec, self.stats)
        record = to_record(raw_scores(self.model, feats), self.calibration, feats.modalities)
        names = np.asarray(feats.modalities, object)
        present = [list(names[row]) for row in feats.mask]
        cols: dict[str, Any] = {k: aligned.column(k) for k in spec.entity}
        cols.update(ts=aligned.column("ts"), date=aligned.column("date"),
                    score=pa.array(record.score, pa.float64(), mask=~np.isfinite(record.score)))
        for i, m in enumerate(feats.modalities):
            c = record.contributions[:, i]
            cols[f"score_{m}"] = pa.array(c, pa.float64(), mask=~np.isfinite(c))
        cols["modalities"] = pa.array(present, pa.list_(pa.string()))
        cols["_reason"] = pa.array([None if p else NO_MODALITY for p in present], pa.string())
        return pa.table(cols)


class DayScorer:
    """Ray Data callable: a batch of ticks -> aligned against the broadcast modality tables -> scored
    with the model version the driver loaded and put in the object store once (no registry read per actor)."""

    def __init__(self, spec: Spec, table_refs: dict, model_ref: dict):
        self.aligner = Aligner(spec, table_refs)
        self.scorer = Scorer(ray.get(model_ref["ref"]))

    def __call__(self, ticks: pa.Table) -> pa.Table:
        return self.scorer(self.aligner(ticks))


@dataclass
class DateResult:
    date: str
    ticks_in: int
    rows_scored: int
    rows_quarantined: int
    anomalies: int
    seconds: float


def finalize(scored: pl.DataFrame, spec: Spec, calibration: dict[str, Any], *, version: str, run_id: str,
             modalities: list[str]) -> pl.DataFrame:
    """Smooth per entity, apply the calibrated threshold, add provenance columns (output table schema)."""
    score_cols = ["score", *[f"score_{m}" for m in modalities]]
    df = smooth_columns(scored, score_cols, spec)
    threshold = float(calibration["threshold"])
    now = dt.datetime.now(dt.timezone.utc)
    return df.select([
        *spec.entity, pl.col("ts"), pl.col("date"), pl.col("score").cast(pl.Float64),
        pl.lit(threshold, pl.Float64).alias("threshold"),
        (pl.col("score") > threshold).fill_null(False).alias("is_anomaly"),
        *[pl.col(c).cast(pl.Float64) for c in score_cols[1:]],
        pl.col("modalities"), pl.lit(version).alias("model_version"), pl.lit(run_id).alias("run_id"),
        pl.lit(now, pl.Datetime("us", "UTC")).alias("scored_at")])


def _quarantine_rows(ticks: pl.DataFrame, inputs: DayInputs, spec: Spec, date: str, run_id: str,
                     version: str) -> pl.DataFrame:
    now = dt.datetime.now(dt.timezone.utc)
    entity = pl.concat_str([pl.col(k).cast(pl.String) for k in spec.entity], separator="|")
    parts = [ticks.select(pl.lit(date).alias("date"), pl.lit("score").alias("stage"), pl.lit("tick").alias("source"),
                          entity.alias("entity"), pl.col("ts"), pl.col("_reason").alias("reason"))]
    for name, rows in inputs.quarantined.items():
        if rows.is_empty() or "date" not in rows.columns:
            continue
        rows = rows.filter(pl.col("date").cast(pl.String) == date)
        parts.append(rows.select(pl.lit(date).alias("date"), pl.lit("ingest").alias("stage"),
                                 pl.lit(name).alias("source"), entity.alias("entity"),
                                 pl.col(spec.time).dt.replace_time_zone(None).dt.cast_time_unit("us")
                                 .dt.replace_time_zone("UTC").alias("ts"), pl.col("_reason").alias("reason")))
    out = pl.concat([p.with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC"))) for p in parts])
    return out.with_columns(pl.lit(run_id).alias("run_id"), pl.lit(version).alias("model_version"),
                            pl.lit(now, pl.Datetime("us", "UTC")).alias("quarantined_at"))


def score_date(spec: Spec, date: dt.date, *, version: str | None = None, run_id: str | None = None,
               loaded: ModelVersion | None = None) -> DateResult:
    """Score one date with a model version (default LATEST) and replace that date in the output tables."""
    storage = Storage.from_spec(spec.storage)
    mv = loaded or Registry(spec.registry, storage).load(version)
    done, failed = score_dates(spec, [date], mv, run_id=run_id or uuid.uuid4().hex[:12])
    if failed:
        raise failed[0][1]
    return done[0]


def score_dates(spec: Spec, dates: list[dt.date], mv: ModelVersion, *, run_id: str
                ) -> tuple[list[DateResult], list[tuple[dt.date, Exception]]]:
    """Score several dates in one pass (one read, one actor pool), then commit each date on its own.

    Each date's rows are smoothed, thresholded, checked (ticks in = scored + quarantined) and committed
    separately, exactly as if it had been scored alone, and recorded in the runs table. Returns the dates
    done and the dates that failed with their error (a date with no data, a failed commit); an error of
    the shared pass itself (a read, the cluster) is raised.
    """
    t0 = time.time()
    storage = Storage.from_spec(spec.storage)
    model_spec = reading_spec(mv, spec)
    inputs = read_inputs(model_spec, dates, storage)
    rows = _score_ticks(model_spec, inputs, mv)
    shared = (time.time() - t0) / len(dates)                 # the pass's time, shared out over its dates
    ticks_per_day = dict(inputs.ticks.group_by(pl.col(TIME) // DAY_US).len().iter_rows())
    done, failed = [], []
    for date in sorted(dates):
        t1 = time.time()
        day = date.isoformat()
        try:
            ticks_in = ticks_per_day.get(date_start_us(date) // DAY_US, 0)
            if not ticks_in:
                raise DataError(f"no modality of spec '{model_spec.name}' has data for {day}")
            result = _commit_date(spec, storage, mv, rows.filter(pl.col("date") == day), inputs, day, ticks_in,
                                  run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - the other dates of the pass still commit
            failed.append((date, exc))
            continue
        result.seconds = round(shared + time.time() - t1, 2)
        record_run(spec, storage, result, run_id=run_id, version=mv.version, status="succeeded")
        done.append(result)
    return done, failed


def reading_spec(mv: ModelVersion, spec: Spec) -> Spec:
    """The model version's modalities, columns and windows, read from where `spec` says the data lives now
    (its modality paths and partition key): moving the data does not need a new model."""
    missing = sorted(set(mv.spec.modalities) - set(spec.modalities))
    if missing:
        raise DataError(f"model version {mv.version} reads modalities {missing} that spec '{spec.name}' does not "
                        "define; add them back or score with a model trained on this spec")
    modalities = {name: replace(m, path=spec.modalities[name].path) for name, m in mv.spec.modalities.items()}
    return replace(mv.spec, modalities=modalities, partition=spec.partition)


def _score_ticks(model_spec: Spec, inputs: DayInputs, mv: ModelVersion) -> pl.DataFrame:
    """Ray Data: every tick aligned and scored by a pool of `DayScorer` actors; rows back on the driver."""
    res = Resources.current()
    pool = res.actor_pool()
    scored_ds = tick_dataset(model_spec, inputs.ticks).map_batches(
        DayScorer, fn_constructor_kwargs={"spec": model_spec, "table_refs": broadcast_tables(inputs),
                                          "model_ref": {"ref": ray.put(mv)}},   # in a dict: actors resolve it
        batch_format="pyarrow", batch_size=None, compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=res.actor_cpus(pool))
    blocks = [b for b in scored_ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pl.from_arrow(pa.concat_tables(blocks))


def _commit_date(spec: Spec, storage: Storage, mv: ModelVersion, rows: pl.DataFrame, inputs: DayInputs, day: str,
                 ticks_in: int, *, run_id: str) -> DateResult:
    """One date's scored rows -> smoothed and thresholded output rows + quarantine rows, both committed."""
    model_spec = mv.spec
    good, bad = rows.filter(pl.col("_reason").is_null()), rows.filter(pl.col("_reason").is_not_null())
    out = finalize(good.drop("_reason"), model_spec, mv.calibration, version=mv.version, run_id=run_id,
                   modalities=list(model_spec.modalities))
    quarantine = _quarantine_rows(bad, inputs, model_spec, day, run_id, mv.version)
    q_ticks = quarantine.filter(pl.col("stage") == "score").height
    if out.height + q_ticks != ticks_in:
        raise RuntimeError(f"{day}: {ticks_in} ticks in but {out.height} scored + {q_ticks} quarantined")
    write_partition(storage.delta_uri(spec.score.quarantine_path), quarantine.to_arrow(), date=day,
                    mode="replace_date", storage_options=storage.delta_options(spec.score.quarantine_path))
    write_partition(storage.delta_uri(spec.score.output), out.to_arrow(), date=day, mode="replace_date",
                    storage_options=storage.delta_options(spec.score.output))
    return DateResult(date=day, ticks_in=ticks_in, rows_scored=out.height, rows_quarantined=q_ticks,
                      anomalies=int(out["is_anomaly"].sum()), seconds=0.0)


def record_run(spec: Spec, storage: Storage, result: DateResult, *, run_id: str, version: str, status: str) -> None:
    """Append one row to the run audit table (`score.runs`, default `<output>_runs`)."""
    row = pa.table({"run_id": [run_id], "date": [result.date], "model_version": [version],
                    "ticks_in": pa.array([result.ticks_in], pa.int64()),
                    "rows_scored": pa.array([result.rows_scored], pa.int64()),
                    "rows_quarantined": pa.array([result.rows_quarantined], pa.int64()),
                    "anomalies": pa.array([result.anomalies], pa.int64()),
                    "duration_s": [float(result.seconds)], "status": [status],
                    "finished_at": pa.array([dt.datetime.now(dt.timezone.utc)], pa.timestamp("us", tz="UTC"))})
    write_partition(storage.delta_uri(spec.score.runs_path), row, date=None, mode="append",
                    storage_options=storage.delta_options(spec.score.runs_path))


def scored_dates(spec: Spec, storage: Storage, version: str, dates: list[str]) -> set[str]:
    """Dates whose rows in the output table were all written by model `version`."""
    uri = storage.delta_uri(spec.score.output)
    if read_table(uri, storage.delta_options(spec.score.output)) is None:
        return set()
    done = (pl.scan_delta(uri, storage_options=storage.delta_options(spec.score.output))
            .filter(pl.col("date").is_in(dates)).group_by("date")
            .agg((pl.col("model_version") == version).all().alias("same")).collect())
    return set(done.filter(pl.col("same"))["date"].to_list())


def _progress(done: int, total: int, started: float, r: DateResult) -> None:
    elapsed = time.time() - started
    eta = elapsed / done * (total - done)
    log.info("[%d/%d] %s: %d ticks, %d scored, %d quarantined, %d anomalies (%.1fs) - elapsed %s, ETA %s",
             done, total, r.date, r.ticks_in, r.rows_scored, r.rows_quarantined, r.anomalies, r.seconds,
             _clock(elapsed), _clock(eta))


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):d}:{int(seconds % 60):02d}"


def plan_passes(dates: list[dt.date], input_bytes: dict[dt.date, int], days_per_pass: int,
                max_pass_bytes: int) -> list[list[dt.date]]:
    """Consecutive dates grouped into passes of at most `days_per_pass` dates whose input bytes total at
    most `max_pass_bytes`; a date larger than that on its own is a pass alone."""
    passes: list[list[dt.date]] = []
    size = 0
    for date in dates:
        date_bytes = input_bytes.get(date, 0)
        if not passes or len(passes[-1]) == days_per_pass or size + date_bytes > max_pass_bytes:
            passes.append([])
            size = 0
        passes[-1].append(date)
        size += date_bytes
    return passes


def backfill(spec: Spec, start: dt.date, end: dt.date, *, version: str | None = None, force: bool = False,
             parallel: int | None = None, days_per_pass: int = DAYS_PER_PASS,
             max_pass_bytes: int | None = None) -> list[DateResult]:
    """Score every date in [start, end], one commit per date, with one model version.

    Resumable: dates already scored by that version are skipped unless `force`. Dates go through the
    cluster `days_per_pass` at a time (one read and one actor pool per pass; each date still smoothed and
    committed on its own), `parallel` passes in flight (default: CPUs / 2 / days_per_pass); a pass holds
    fewer dates when their Parquet files would exceed `max_pass_bytes` (default: PASS_MEMORY_SHARE of this
    machine's memory / parallel). When a pass fails as a whole (e.g. an unreadable file), its dates are
    retried one by one, so one bad date fails alone. A date that fails is recorded as failed in the runs
    table and the error is raised once the other passes have finished.
    """
    if end < start:
        raise ValueError(f"backfill: end {end} is before start {start}")
    if days_per_pass < 1:
        raise ValueError(f"backfill: days_per_pass must be at least 1, got {days_per_pass}")
    if max_pass_bytes is not None and max_pass_bytes <= 0:
        raise ValueError(f"backfill: max_pass_bytes must be positive, got {max_pass_bytes}")
    storage = Storage.from_spec(spec.storage)
    mv = Registry(spec.registry, storage).load(version)
    run_id = uuid.uuid4().hex[:12]
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    skip = set() if force else scored_dates(spec, storage, mv.version, [d.isoformat() for d in days])
    todo = [d for d in days if d.isoformat() not in skip]
    if skip:
        log.info("skipping %d date(s) already scored by model %s (use --force to rescore)", len(skip), mv.version)
    # default: about half the cluster's CPUs in dates in flight, as when every date was its own pass
    parallel = parallel or max(1, int(Resources.current().cpus // 2) // days_per_pass)
    if max_pass_bytes is None:
        max_pass_bytes = int(machine_memory_bytes() * PASS_MEMORY_SHARE / parallel)
    sizes = input_bytes_by_date(reading_spec(mv, spec), todo, storage) if days_per_pass > 1 else {}
    passes = plan_passes(todo, sizes, days_per_pass, max_pass_bytes)
    if passes:
        log.info("backfill: %d date(s) in %d pass(es) of at most %d date(s) and %.0f MB of input files, "
                 "%d in flight", len(todo), len(passes), days_per_pass, max_pass_bytes / 1e6, parallel)
    started, results, errors = time.time(), [], []

    def one_pass(dates: list[dt.date]) -> tuple[list[DateResult], list[tuple[dt.date, Exception]]]:
        try:
            done, failed = score_dates(spec, dates, mv, run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - the pass as a whole failed: retry its dates alone
            if len(dates) > 1:
                log.warning("pass %s..%s failed (%s); scoring its dates one by one", dates[0], dates[-1], exc)
                alone = [one_pass([d]) for d in dates]
                return [r for ok, _ in alone for r in ok], [f for _, bad in alone for f in bad]
            done, failed = [], [(dates[0], exc)]
        for day, _ in failed:
            record_run(spec, storage, DateResult(day.isoformat(), 0, 0, 0, 0, 0.0), run_id=run_id,
                       version=mv.version, status="failed")
        return done, failed

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in as_completed([pool.submit(one_pass, p) for p in passes]):
            done, failed = future.result()
            for r in done:
                results.append(r)
                _progress(len(results), len(todo), started, r)
            errors += failed
    if errors:
        error = BackfillError(errors)
        raise error from error.failed[0][1]
    return sorted(results, key=lambda r: r.date)
