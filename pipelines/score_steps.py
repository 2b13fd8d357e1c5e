"""Scoring steps as plain functions (no Ray): one shard read, aligned, featurized and scored, its rows smoothed
and thresholded per entity and date, and written as Parquet data files of the output and quarantine tables.
`pipelines.score` runs `score_shard_steps` in Ray tasks and commits each date once all its shards are written.

Output table (`score.output`, partitioned by `date`): entity column(s), ts, date, score, threshold,
is_anomaly, score_<modality> (null where absent), modalities, model_version, run_id, scored_at.
Ticks with no usable modality go to the quarantine table with a reason; for every date
ticks in = rows scored + rows quarantined (also recorded in the runs table).
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dmafn.features import (Features, entity_key, entity_keys, featurize, level_spec, relation_peers_read,
                            smoothing_groups)
from dmafn.calibration import Calibration
from dmafn.scoring import (ScoreRecord, cause_names, channel_names, line_names, occlusion_contributions,
                           occlusion_groups, raw_scores, voting_mask)
from dmafn.spec import Spec, voting_modalities
from pipelines.align import TIME, align, data_ticks, day_number, local_day
from pipelines.delta_sink import CAUSE, write_data_file
from pipelines.entity_keys import respelled_keys, scored_entity_modalities
from pipelines.ingest import MISPLACED, REASON, entity_string, read_shard, unusable_reasons
from pipelines.postprocess import smooth_columns
from pipelines.registry import ModelVersion
from pipelines.row_digests import RowDigest
from pipelines.shards import UNSEEN_NAMED, DateCounts, Shard, ShardScores, UnseenEntities
from pipelines.storage import Storage

NO_MODALITY = "no modality present at the tick"
CHANNEL = "channel_"        # + a modality's name: the output column naming the channel that drives its error
BATCH_TICKS = 8192          # ticks aligned, featurized and scored at once inside a shard
_OLDEST = pl.CompatLevel.oldest()     # large_string, not string_view: what Delta's schema takes


class Scorer:
    """Scores the aligned batches of one shard, in order (ticks sorted by entity and time), with one loaded model
    version; `__call__(aligned batch)` carries only the relations' smoothing state (the cause's views' too), the
    payloads' held errors and the channel parts' smoothing state from batch to batch."""

    def __init__(self, mv: ModelVersion):
        self.version, self.model, self.spec = mv.version, mv.model, mv.spec
        self.stats, self.calibration = mv.stats, mv.calibration
        self.carry: dict = {}       # the relations' smoothing state per entity and date, batch to batch (`featurize`)
        self.hold: dict = {}        # each payload's held error per entity and date, batch to batch (`raw_scores`)
        self.parts: dict = {}       # each channel part's smoothing state per entity and date, batch to batch
        self.parts_smoothing = self.calibration.parts_smoothing()
        self.occluded = occlusion_groups(self.spec.modalities)   # what hiding a voting modality hides (`cause`)
        self.naming = len(self.occluded) > 1 and self.calibration.normalisation["detector"] != "classifier"
        # the modalities others' cross-modal relations read: hidden, they are hidden from those relations too - a
        # view of each batch featurized without them, its relations' smoothing carried from batch to batch; with
        # smoothing every batch is viewed (the carry), else only a batch with a tick over the threshold
        peers = relation_peers_read(self.stats)
        self.relayed = {m: group for m, group in self.occluded.items() if self.naming and set(group) & peers}
        self.view_carry: dict[str, dict] = {m: {} for m in self.relayed}
        self.view_spec = level_spec(self.spec)           # the views need the relations alone: no image, clip or text
        self.view_every_batch = bool(self.relayed) and any(f.get("smoothing")
                                                           for f in self.stats.get("relations", {}).values())

    def __call__(self, aligned: pa.Table, decoded: dict | None = None) -> pa.Table:
        """`decoded`: image frames the shard's ingest check decoded already (`ShardInputs.decoded`)."""
        spec = self.spec
        feats = featurize(aligned, spec, self.stats, decoded, self.carry)
        raw = self.calibration.settle(raw_scores(self.model, feats, hold=self.hold))   # held or fresh, per tick
        record = self.calibration.record(raw)      # smoothed later, per entity and date
        names = np.asarray(feats.modalities, object)
        present = [list(names[row]) for row in feats.mask]
        cols: dict[str, Any] = {k: aligned.column(k) for k in spec.entity}
        cols.update(ts=aligned.column("ts"), date=aligned.column("date"),
                    score=pa.array(record.score, pa.float64(), mask=~np.isfinite(record.score)))
        for i, m in enumerate(feats.modalities):
            c = record.contributions[:, i]
            cols[f"score_{m}"] = pa.array(c, pa.float64(), mask=~np.isfinite(c))
        for m, named in channel_names(raw, spec.modalities, self._smoothed_parts(aligned, feats)).items():
            cols[f"{CHANNEL}{m}"] = pa.array(named, pa.string())
        for m, lines in line_names(feats, spec.modalities).items():     # a text modality: its window's unseen line
            cols[f"{CHANNEL}{m}"] = pa.array(lines, pa.string())
        views = self._views(aligned) if self.view_every_batch else None
        cols[CAUSE] = pa.array(self._causes(aligned, feats, record, views), pa.string())
        cols["modalities"] = pa.array(present, pa.list_(pa.string()))
        cols[REASON] = pa.array([None if p else NO_MODALITY for p in present], pa.string())
        return pa.table(cols)

    def _views(self, aligned: pa.Table) -> dict[str, Features]:
        """The batch's tabular and series modalities featurized once per modality other modalities' relations read,
        with it (and its context views) absent: the relations `occlusion_contributions` reads when it hides it."""
        return {m: featurize(aligned, self.view_spec, self.stats, None, self.view_carry[m], absent=group)
                for m, group in self.relayed.items()}

    def _causes(self, aligned: pa.Table, feats: Features, record: ScoreRecord,
                views: dict[str, Features] | None = None) -> np.ndarray:
        """(N,) object: at each tick whose unsmoothed fused score (normalised per entity, as the smoothed one is) is
        over the threshold, the voting modality with the largest contribution no other modality explains, each
        hidden in turn from the model and from the others' relations (`dmafn.scoring.cause_names`; `views`, made here
        when not given); None elsewhere and for a classifier."""
        causes = np.full(len(record.score), None, object)
        score = record.score
        if self.calibration.entity_scale:
            score = self.calibration.normalise(score, np.asarray(entity_key(aligned, self.spec.entity), str))
        over = np.flatnonzero(np.nan_to_num(score, nan=-np.inf) > float(self.calibration.threshold))
        if len(over) and self.naming:
            views = views if views is not None else self._views(aligned)
            hidden = occlusion_contributions(self.model, feats.rows(over), self.calibration.record, self.occluded,
                                             views={m: view.rows(over) for m, view in views.items()})
            causes[over] = cause_names(record.contributions[over], hidden,
                                       voting_mask(record.mask[over], self.calibration.normalisation), feats.modalities)
        return causes

    def _smoothed_parts(self, aligned: pa.Table, feats: Features) -> Callable[[str, np.ndarray], np.ndarray] | None:
        """How `channel_names` smooths a modality's channel parts in this batch: per entity and date, carried from the
        batch before (each channel alone, exactly as the whole date at once); None without smoothing."""
        calibration = self.parts_smoothing
        if calibration.smoothing.method == "none":
            return None
        found: list[np.ndarray] = [] if feats.groups is None else [feats.groups]

        def smooth(m: str, parts: np.ndarray) -> np.ndarray:
            if not found:                       # each tick's entity and date, once per batch and only when asked
                found.append(smoothing_groups(aligned, entity_key(aligned, self.spec.entity))[0])
            groups = found[0]
            carry = self.parts.setdefault(m, {})
            columns = []
            for j in range(parts.shape[1]):
                column, carry[j] = calibration.smooth_carried(parts[:, j], groups, carry.get(j, {}))
                columns.append(column)
            return np.stack(columns, 1) if columns else parts
        return smooth


def tick_batches(ticks: pl.DataFrame, tables: dict[str, pl.DataFrame], spec: Spec,
                 batch_ticks: int = BATCH_TICKS) -> Iterator[tuple[pl.DataFrame, dict[str, pl.DataFrame]]]:
    """Slices of at most `batch_ticks` ticks (sorted by entity and time) with the rows each slice can read: its
    entities' rows from each modality's look-back before its first tick to its last tick. Each table is split
    by entity once, so a shard's rows are visited once, not once per slice."""
    keys = list(spec.entity)
    by_entity = {name: t.partition_by(keys, as_dict=True, maintain_order=True) for name, t in tables.items()}
    for start in range(0, ticks.height, batch_ticks):
        batch = ticks.slice(start, batch_ticks)
        first, last = batch[TIME].min(), batch[TIME].max()
        ents = batch.select(keys).unique(maintain_order=True).rows()
        rows = {}
        for name, t in tables.items():
            parts = [by_entity[name][e] for e in ents if e in by_entity[name]]
            rows[name] = ((pl.concat(parts, rechunk=False) if parts else t.clear())
                          .filter(pl.col(TIME).is_between(first - spec.modalities[name].lookback_us, last)))
        yield batch, rows


def finalize(scored: pl.DataFrame, spec: Spec, calibration: Calibration, *, version: str, run_id: str,
             modalities: list[str], scored_at: dt.datetime) -> pl.DataFrame:
    """The calibration's smoothing per entity and date and its threshold (as `Calibration.apply`, in Polars
    window expressions), then the provenance columns: the output table's schema."""
    score_cols = ["score", *[f"score_{m}" for m in modalities]]
    channel_cols = [f"{CHANNEL}{m}" for m in modalities if f"{CHANNEL}{m}" in scored.columns]
    df = smooth_columns(scored, score_cols, spec, by=("date",), smoothing=calibration.smoothing)
    if calibration.entity_scale:                    # per-entity normalisation of the smoothed fused score
        groups = df.select(entity_string(spec.entity)).to_series().to_numpy()
        score = calibration.normalise(df["score"].cast(pl.Float64).fill_null(np.nan).to_numpy(), groups)
        df = df.with_columns(pl.Series("score", score).fill_nan(None))
    threshold = float(calibration.threshold)
    return df.select([
        *spec.entity, pl.col("ts"), pl.col("date"), pl.col("score").cast(pl.Float64),
        pl.lit(threshold, pl.Float64).alias("threshold"),
        (pl.col("score") > threshold).fill_null(False).alias("is_anomaly"),
        *[pl.col(c).cast(pl.Float64) for c in score_cols[1:]], *[pl.col(c).cast(pl.String) for c in channel_cols],
        *([pl.col(CAUSE).cast(pl.String)] if CAUSE in scored.columns else []),
        pl.col("modalities"), pl.lit(version).alias("model_version"), pl.lit(run_id).alias("run_id"),
        pl.lit(scored_at, pl.Datetime("us", "UTC")).alias("scored_at")])


def score_position(score: pa.ChunkedArray, calibration: Calibration) -> tuple[int, int]:
    """(ticks with a score, those above the calibration's validation median score): on days like the validation
    days about half are above it. (0, 0) for a version that did not record the median."""
    return _above(score, calibration.validation.get("validation_score_p50"))


def contribution_positions(out: pa.Table, calibration: Calibration) -> dict[str, tuple[int, int]]:
    """`score_position` of each modality's contribution (smoothed, as the output's `score_<m>`) against its
    validation median; none for a version that did not record the medians."""
    return {m: _above(out.column(f"score_{m}"), median)
            for m, median in calibration.validation.get("validation_contribution_p50", {}).items()
            if f"score_{m}" in out.column_names}


def _above(column: pa.ChunkedArray, median: float | None) -> tuple[int, int]:
    """(values in `column`, those above `median`); (0, 0) without a median."""
    if median is None:
        return 0, 0
    return len(column) - column.null_count, int(pc.sum(pc.greater(column, median)).as_py() or 0)


def entity_alarms(out: pa.Table, entity: tuple[str, ...] | list[str],
                  modalities: tuple[str, ...] | list[str] = ()) -> pl.DataFrame:
    """Scored rows `out` per entity: its key column(s), `ticks`, `anomalies` and, for each of `modalities`, whether it
    was present at any of the entity's ticks (`_has_<m>`, from the `modalities` column; one row per scored entity)."""
    rows = pl.from_arrow(out.select([*entity, "is_anomaly", *(["modalities"] if modalities else [])]))
    return rows.group_by(list(entity)).agg(pl.len().alias("ticks"), pl.col("is_anomaly").sum().alias("anomalies"),
                                           *(_has(m).any().alias(f"_has_{m}") for m in modalities))


def _has(modality: str) -> pl.Expr:
    """True at a scored tick `modality` was present at (the output's `modalities` column)."""
    return pl.col("modalities").list.contains(modality)


def unseen_entities(per_entity: pl.DataFrame, keys: list[str], known: set[str]) -> UnseenEntities | None:
    """The entities of `per_entity` (`entity_alarms`; `keys`: its rows' keys, `entity_key`) whose keys are not in
    `known` (the version's entities with statistics of their own, `dmafn.features.entity_keys`), with their ticks and
    alarms; None when the version keeps
    no per-entity statistics at all (every entity scores by the fleet's alike). Those spelled like a known key but
    for case, spaces, separators or padding zeros are counted and named with it (`entity_keys.respelled_keys`)."""
    if not known:
        return None
    keys = np.asarray(keys, object)
    new = np.fromiter((k not in known for k in keys), bool, len(keys))
    rows = per_entity.filter(pl.Series(new))
    respelled = respelled_keys(list(keys[new]), known)
    return UnseenEntities(rows.height, int(rows["ticks"].sum()), int(rows["anomalies"].sum()),
                          sorted(keys[new])[:UNSEEN_NAMED], len(respelled), sorted(respelled)[:UNSEEN_NAMED])


def modality_presence(out: pa.Table, per_entity: pl.DataFrame, entity: tuple[str, ...] | list[str],
                      modalities: list[str]) -> tuple[dict[str, int], dict[str, UnseenEntities]]:
    """Per modality of `modalities`, the scored ticks of `out` it was present at (the `modalities` column), and the
    scored entities it was absent at every tick of (from `per_entity`, `entity_alarms` with the same `modalities`),
    with their ticks and alarms (`UnseenEntities`; none without such entities): a sensor, camera or log shipper gone
    dark for the whole date is scored around, not silently."""
    present = pl.from_arrow(out.select(["modalities"])).select(_has(m).sum().alias(m) for m in modalities).row(0)
    without = {}
    for m in modalities:
        dark = per_entity.filter(~pl.col(f"_has_{m}"))
        if dark.height:
            keys = entity_key(dark.select(entity).to_arrow(), entity)
            without[m] = UnseenEntities(dark.height, int(dark["ticks"].sum()), int(dark["anomalies"].sum()),
                                        sorted(keys)[:UNSEEN_NAMED])
    return {m: int(n or 0) for m, n in zip(modalities, present)}, without


def quarantine_rows(bad_ticks: pl.DataFrame, ingest: pl.DataFrame, spec: Spec, *, run_id: str, version: str,
                    at: dt.datetime) -> pl.DataFrame:
    """Quarantine table rows: ticks no modality could serve (`stage = score`) and unusable input rows
    (`stage = ingest`), each with its reason and the input rows it counts for (`rows`: 1, or a file's rows kept for
    their other values noted as one, `ingest.partly_rows`)."""
    ts = pl.from_epoch(TIME, time_unit="us").dt.replace_time_zone("UTC").alias("ts")
    ticks = bad_ticks.select(pl.col("date"), pl.lit("score").alias("stage"), pl.lit("tick").alias("source"),
                             entity_string(spec.entity).alias("entity"), pl.col("ts").cast(pl.Datetime("us", "UTC")),
                             pl.col(REASON).alias("reason"), pl.lit(1, pl.Int64).alias("rows"))
    rows = ingest.select(pl.col("date"), pl.lit("ingest").alias("stage"), pl.col("source"), pl.col("entity"), ts,
                         pl.col("reason"), pl.col("rows"))
    return pl.concat([ticks, rows], how="vertical_relaxed").with_columns(
        pl.lit(run_id).alias("run_id"), pl.lit(version).alias("model_version"),
        pl.lit(at, pl.Datetime("us", "UTC")).alias("quarantined_at"))


def score_shard_steps(shard: Shard, spec: Spec, mv: ModelVersion, storage: Storage, *, run_id: str,
                      scored_at: dt.datetime, batch_ticks: int = BATCH_TICKS
                      ) -> Iterator[tuple[int, int] | ShardScores]:
    """Read, align, featurize and score one shard, then write each of its dates' output and quarantine rows as
    data files of the output tables (not committed: the driver commits each date). `spec` names where the data
    is and the model version's modalities (see `pipelines.score.reading_spec`). Yields (ticks done, ticks
    total) after each batch of ticks, then the shard's `ShardScores` last (a Ray task streams these to the
    driver: progress without an actor)."""
    inputs = read_shard(shard, spec, storage, row_intervals=True)
    ticks = data_ticks(inputs.tables, inputs.present, spec, shard.dates)
    scorer = Scorer(mv)
    known = entity_keys(mv.stats)
    own_modalities = list(voting_modalities(mv.spec.modalities))     # each reads a table of its own
    parts, done = [], 0
    for batch, tables in tick_batches(ticks, inputs.tables, spec, batch_ticks):
        parts.append(pl.from_arrow(scorer(align(batch, tables, spec).to_arrow(), inputs.decoded)))
        done += parts[-1].height
        yield done, ticks.height
    scored = pl.concat(parts) if parts else _no_ticks(spec)
    result = ShardScores(shard.name, {}, None, None)
    out_uri, q_uri = spec.score.output, spec.score.quarantine_path
    for date in shard.dates:
        day = date.isoformat()
        counts = result.dates.setdefault(day, DateCounts())
        counts.ticks_in = ticks.filter(local_day(pl.col(TIME), spec.timezone) == day_number(date)).height
        rows = scored.filter(pl.col("date") == day)
        good, bad = rows.filter(pl.col(REASON).is_null()).drop(REASON), rows.filter(pl.col(REASON).is_not_null())
        ingest = inputs.quarantined.filter(pl.col("date") == day)
        counts.input_rows_quarantined = int(ingest["rows"].sum())      # a note of a file's rows counts them all
        counts.input_rows = inputs.rows_read.get(day, 0)
        counts.input_rows_misplaced = int(ingest.filter(pl.col("reason").str.starts_with(MISPLACED))["rows"].sum())
        counts.unusable_reasons = unusable_reasons(ingest)
        counts.modality_rows = {m: inputs.usable_rows.get(day, {}).get(m, 0) for m in own_modalities}
        counts.row_digests = {m: inputs.row_digests.get(day, {}).get(m, RowDigest()) for m in own_modalities}
        counts.payload_formats = inputs.payload_formats.get(day, {})
        counts.row_intervals = inputs.row_intervals.get(day, {})
        if good.height:
            out = finalize(good, mv.spec, mv.calibration, version=mv.version, run_id=run_id,
                           modalities=list(mv.spec.modalities), scored_at=scored_at).to_arrow(compat_level=_OLDEST)
            counts.rows_scored, counts.anomalies = out.num_rows, int(pc.sum(out.column("is_anomaly")).as_py() or 0)
            counts.with_score, counts.above_validation_median = score_position(out.column("score"), mv.calibration)
            counts.modality_above = contribution_positions(out, mv.calibration)
            per_entity = entity_alarms(out, spec.entity, own_modalities)
            keys = entity_key(per_entity.select(spec.entity).to_arrow(), spec.entity)     # in its rows' order
            counts.entities, counts.unseen = per_entity.height, unseen_entities(per_entity, keys, known)
            counts.modality_present, counts.without_modality = modality_presence(out, per_entity, spec.entity,
                                                                                 own_modalities)
            counts.entity_modalities = scored_entity_modalities(per_entity, keys, own_modalities)
            counts.output_files.append(_write(storage, out_uri, out, day, f"{run_id}-{shard.bucket}"))
            result.output_schema = out.schema
        quarantine = quarantine_rows(bad, ingest, spec, run_id=run_id, version=mv.version,
                                     at=scored_at).to_arrow(compat_level=_OLDEST)
        counts.rows_quarantined = bad.height
        if quarantine.num_rows:
            counts.quarantine_files.append(_write(storage, q_uri, quarantine, day, f"{run_id}-{shard.bucket}"))
            result.quarantine_schema = quarantine.schema
    yield result


def _no_ticks(spec: Spec) -> pl.DataFrame:
    """Scored rows of a shard with no tick (the columns `quarantine_rows` reads)."""
    return pl.DataFrame(schema={**{k: pl.String for k in spec.entity}, "ts": pl.Datetime("us", "UTC"),
                                "date": pl.String, REASON: pl.String})


def _write(storage: Storage, uri: str, table: pa.Table, day: str, name: str) -> dict:
    return write_data_file(storage.delta_uri(uri), table, date=day, name=name, filesystem=storage.filesystem(uri),
                           root=storage.fs_path(uri))
