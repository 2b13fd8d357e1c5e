"""Training that streams shards: nothing on the driver grows with the training window.

    shards of the training days -> partial statistics per shard (Ray tasks): the fleet's parts merged on the
       driver, the per-entity parts per entity bucket (a Ray task each, which writes its entities' rows)
    -> features per shard (a Ray task each; ticks with no modality dropped) written to a feature file in the
       run's staging folder (`pipelines.feature_files`) -> TorchTrainer (DDP; gloo on CPU, nccl + bf16 autocast
       on GPU; checkpoint every epoch; each epoch every worker streams its equal part of the files' rows)
    -> (spec `encoding_distance`) the trained encoders over the feature files, twice (a Ray task each): summed
       encodings, a Gaussian per modality fitted on the driver, refitted without what it calls atypical
       (`dmafn.density`)
    -> raw scores of the validation days' shards (Ray tasks) -> calibration -> model version in the registry
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import math
import os
import re
import tempfile
import time
import uuid
from dataclasses import asdict
from typing import Any, Iterator, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import ray
import torch

from dmafn.features import (NoUsableRows, StatisticsFitter, StatisticsTotals, featurize, features_from_columns,
                            features_to_columns, refit_relations_on_typical_ticks, relation_lines,
                            relation_warnings, relations_left_out, validation_warnings, with_left_out)
from dmafn.model import ModelConfig, build_model, model_config
from dmafn.calibration import OUTLIER_MIN_TICKS, OUTLIER_SHARE, Calibration
from dmafn.spec import CLASSIFIER_THRESHOLD, TAIL_METHODS, Spec, format_duration, voting_modalities
from dmafn.density import EncodingSums, add_sums
from dmafn.training import (encoding_sums, fit_densities_in_two_passes, positive_weight, seed_everything,
                            train_step)
from pipelines.align import (KnownIncidents, align, data_ticks, date_end_us, date_start_us, label_intervals,
                             label_ticks, local_date_text)
from pipelines.entity_keys import (entity_modalities, merge_entity_modalities, unmatched_label_lines,
                                   unmet_entity_lines)
from pipelines.feature_files import FeatureFile, Piece, epoch_batches, read_piece, worker_blocks, write_features
from pipelines.ingest import (LEFT_OUT, TRAINED_COLOUR, TRAINED_FORMATS, TRAINED_INTERVALS, count_row_intervals,
                              entity_casts, merge_counts, read_shard, require_columns)
from pipelines.labels import read_labels
from pipelines.progress import BoardWatcher, ProgressBoard, ProgressDisplay, Throttle
from pipelines.ray_runtime import Resources, raise_task_error
from pipelines.registry import Registry, train_runs_path
from pipelines.score_steps import tick_batches
from pipelines.shards import Shard, bucket_of, list_inputs, plan_shards, require_data, require_each_modality
from pipelines.staging import Staging
from pipelines.statistics import BucketStatistics, EntityStatistics, entity_rows, entity_table, keys_sliceable
from pipelines.storage import DataError, Storage, is_s3, join

log = logging.getLogger(__name__)


def split_dates(spec: Spec) -> tuple[list[dt.date], list[dt.date]]:
    """Training days and validation days (the last `validation_days` of the training window)."""
    return spec.train.split_days()


class AlignedShard(NamedTuple):
    """`aligned_batches`' answer."""

    batches: Iterator[pl.DataFrame]     # the shard's aligned rows, a slice of ticks at a time
    counts: dict[str, int]              # its input quarantine counts per modality (and each file left out)
    decoded: dict[str, dict[bytes, np.ndarray | None]]   # the image frames its check decoded
    payload_formats: dict[str, dict[str, int]]           # per image or audio modality, its own dates' payloads per
                                                         # stored format (a frame's size, a clip's sample rate)
    row_intervals: dict[str, dict[str, dict[str, int]]]  # per date, non-text modality and entity, its
                                                         # median interval between rows (`ingest.daily_intervals`)


def aligned_batches(shard: Shard, spec: Spec, storage: Storage, incidents: KnownIncidents | None = None, *,
                    row_intervals: bool = False) -> AlignedShard:
    """A shard's aligned rows, a slice of ticks at a time (its ticks follow the data), its input quarantine counts per
    modality (and, under the reason, 1 for each file left out as no Parquet or row group left out as damaged:
    `unreadable_files: skip`, `left_out_files`), the image frames its check decoded (for `featurize(..., decoded=)`) and
    per image or audio modality its own dates' usable payloads per stored format (`ingest.count_payload_formats`). With
    `incidents`, the slices come without the ticks in or just after a known one (counted there), and a slice they empty
    is skipped. With `row_intervals`, its entities' median row intervals per date too (`read_shard`)."""
    inputs = read_shard(shard, spec, storage, row_intervals=row_intervals)
    ticks = data_ticks(inputs.tables, inputs.present, spec, shard.dates)
    counts = dict(inputs.quarantined.group_by("source").agg(pl.col("rows").sum()).iter_rows())
    counts.update((why, 1) for why in inputs.quarantined.filter(
        pl.any_horizontal(pl.col("reason").str.starts_with(kind) for kind in LEFT_OUT))["reason"])
    batches = (align(batch, tables, spec) for batch, tables in tick_batches(ticks, inputs.tables, spec))
    if incidents is not None:
        batches = (kept for kept in (incidents.without(aligned, spec) for aligned in batches) if kept.height)
    formats: dict[str, dict[str, int]] = {}
    for day in inputs.payload_formats.values():
        merge_counts(formats, day)
    return AlignedShard(batches, counts, inputs.decoded, formats, inputs.row_intervals)


AROUND = re.compile(r" of \d{4}-\d\d-\d\d \(read around the date\)")   # a look-back day's note, as its own date's


def left_out_files(counts: dict[str, int], days: str) -> dict[str, int]:
    """`aligned_batches`' counts over some shards with each input file left out as no Parquet, and each row group
    left out as damaged (`unreadable_files: skip`), warned of once - nothing is left out silently - and taken out: the
    counts per modality."""
    by_file: dict[str, str] = {}        # a file read for its own date and around the next one: named once
    for why in sorted(k for k in counts if k.startswith(LEFT_OUT)):
        what = AROUND.sub("", why)
        by_file[what] = why if what not in by_file or "(read around the date)" in by_file[what] else by_file[what]
    for why in by_file.values():
        log.warning("%s: %s", days, why)
    return {k: n for k, n in counts.items() if not k.startswith(LEFT_OUT)}



STATISTICS_BUCKETS = 16   # at most: the entity buckets training's per-entity statistics are fitted in


@ray.remote(num_cpus=1)
def _shard_statistics(shard: Shard, spec: Spec, buckets: int, trim_from: dict[str, Any] | None = None,
                      incidents: KnownIncidents | None = None) -> tuple:
    """Partial statistics of one training shard: the fleet's part, the input quarantine counts, its entities' days
    per median row interval (`ingest.count_row_intervals`; none in a refit), then one part per entity bucket
    (`StatisticsFitter.split`), each its own object for the bucket's task. `trim_from`: the statistics fitted
    before for the shard's entities, whose relations are refitted on their typical ticks; `incidents`: the known
    ones its ticks are fitted without."""
    fitter = StatisticsFitter(spec, trim_from)
    shard_inputs = aligned_batches(shard, spec, Storage.from_spec(spec.storage), incidents,
                                   row_intervals=trim_from is None)     # a refit reads the same rows again
    for aligned in shard_inputs.batches:
        fitter.add(aligned.to_arrow())
    fleet, parts = fitter.split(buckets, lambda key: bucket_of(key, buckets))
    return (fleet, shard_inputs.counts, count_row_intervals({}, shard_inputs.row_intervals), *parts)


class FittedStatistics(NamedTuple):
    """`fit_statistics`' answer."""

    statistics: EntityStatistics
    quarantined: dict[str, int]                          # the input quarantine counts per modality (and file left out)
    row_intervals: dict[str, dict[str, dict[str, int]]]  # per non-text modality and entity, its days per median row
                                                         # interval (`ingest.count_row_intervals`)


@ray.remote(num_cpus=1, num_returns=2)
def _merge_bucket_statistics(spec: Spec, parts: list["ray.ObjectRef"]) -> tuple[StatisticsTotals, StatisticsFitter]:
    """One entity bucket's parts of every shard merged (read one at a time): what the fleet's part needs from its
    entities, and the merged per-entity state (left in the object store for `_bucket_entity_rows`)."""
    merged = StatisticsFitter(spec)
    for ref in parts:
        merged.merge(ray.get(ref))
    return merged.totals(), merged


@ray.remote(num_cpus=1)
def _bucket_entity_rows(merged: StatisticsFitter, fleet: dict[str, Any]) -> pa.Table:
    """One entity bucket's statistics under the fleet's part, as entity file rows (`pipelines.statistics`)."""
    return entity_table(merged.entity_statistics(fleet))


def shard_feature_parts(shard: Shard, spec: Spec, storage: Storage, stats: dict[str, Any],
                        labels: pl.DataFrame | None, incidents: KnownIncidents | None = None,
                        seen: dict[str, int] | None = None, formats: dict[str, dict[str, int]] | None = None):
    """A shard's model input columns (`x__<m>`, `mask`, `label` with labels), a tick slice at a time, of its
    ticks that have at least one modality present (and, with `incidents`, none in or just after a known one);
    `seen`, when given, gets each entity's modalities present at them (`entity_modalities`), `formats` its image and
    audio modalities' payloads per stored format (`ingest.count_payload_formats`)."""
    batches, _, decoded, payload_formats = aligned_batches(shard, spec, storage, incidents)[:4]
    if formats is not None:
        merge_counts(formats, payload_formats)
    for aligned in batches:
        if seen is not None:
            merge_entity_modalities(seen, entity_modalities(aligned, spec))
        cols = features_to_columns(featurize(aligned.to_arrow(), spec, stats, decoded))
        if labels is not None:
            lab = spec.labels
            cols["label"] = label_ticks(aligned, labels, spec, lab.start, lab.end)["label"].to_numpy() \
                .astype(np.float32)
        keep = cols["mask"].any(1)
        yield {k: v[keep] for k, v in cols.items()}


@ray.remote(num_cpus=1)
def _write_shard_features(shard: Shard, spec: Spec, stats: dict[str, Any], labels: pl.DataFrame | None,
                          path: str, incidents: KnownIncidents | None = None
                          ) -> tuple[tuple[int, ...], int, int, np.ndarray, dict[str, int],
                                     dict[str, dict[str, int]]]:
    """One training shard's features written to its feature file; returns (the rows of each of its record batches,
    labelled positives, ticks left out in or just after a known incident, the rows each modality is present at - in
    the spec's order, 0 for a context view that speaks only through its relations -, each entity's modalities,
    `entity_modalities`, and its image and audio modalities' payloads per stored format)."""
    storage, positives, present = Storage.from_spec(spec.storage), 0, np.zeros(len(spec.modalities), np.int64)
    seen: dict[str, int] = {}
    formats: dict[str, dict[str, int]] = {}

    def parts():
        nonlocal positives, present
        for part in shard_feature_parts(shard, spec, storage, stats, labels, incidents, seen, formats):
            if "label" in part:
                positives += int(part["label"].sum())
            present = present + part["mask"].sum(0)
            yield part

    batches = write_features(storage, path, parts())
    return batches, positives, 0 if incidents is None else incidents.left_out, present, seen, formats


class TrainingFeatures(NamedTuple):
    """The training shards' feature files (in shard order, with their rows) and what the driver keeps of them."""

    files: list[FeatureFile]
    positives: int                      # labelled positives in all
    left_out: int                       # ticks left out in or just after a known incident
    present: dict[str, int]             # per modality, the ticks it is present at
    entities: dict[str, int]            # per entity key, its modalities present at any tick (`entity_modalities`)
    payload_formats: dict[str, dict[str, int]]   # per image or audio modality, its usable payloads per stored format


def write_training_features(spec: Spec, shards: list[Shard], stats: BucketStatistics, labels: pl.DataFrame | None,
                            folder: str, incidents: KnownIncidents | None = None) -> TrainingFeatures:
    """The training shards' features written by Ray tasks to `folder/<i>.arrow` (`pipelines.feature_files`), each
    task with its entity bucket's statistics (and the known incidents of its dates). The driver holds the
    counts only."""
    labels_ref = ray.put(labels)                                     # once for every task
    paths = [join(folder, f"{i:06d}.arrow") for i in range(len(shards))]
    refs = [_write_shard_features.remote(s, spec, stats.ref(s), labels_ref, p,
                                         None if incidents is None else incidents.for_dates(s.dates))
            for s, p in zip(shards, paths)]
    display, counts, written = ProgressDisplay("features", len(refs), "shards"), [], 0
    for ref in refs:
        counts.append(raise_task_error(ref))
        written += sum(counts[-1][0])                 # the shard's rows, over its record batches
        display.update(len(counts), ticks=written)
    display.close()
    present = sum((c[3] for c in counts), np.zeros(len(spec.modalities), np.int64))
    entities: dict[str, int] = {}
    formats: dict[str, dict[str, int]] = {}
    for c in counts:
        merge_entity_modalities(entities, c[4])
        merge_counts(formats, c[5])
    return TrainingFeatures([FeatureFile(p, c[0]) for p, c in zip(paths, counts)], sum(c[1] for c in counts),
                            sum(c[2] for c in counts), dict(zip(spec.modalities, (int(n) for n in present))), entities,
                            formats)


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    spec: Spec = config["spec"]
    seed_everything(config["seed"] + ray.train.get_context().get_world_rank())
    model = build_model(spec.modalities, ModelConfig(**config["model"]))
    device = ray.train.torch.get_device()
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-5)
    start_epoch, resumed_at = 0, []
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:                                   # resume after a failure
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=True)
    # Ray Train may restart a worker group without a checkpoint it had already persisted (seen when a worker
    # died right after the first one): take the newest complete one in the run's folder if it is further on
    on_disk = latest_checkpoint_state(Storage.from_spec(spec.storage), config["run_dir"], device)
    if on_disk is not None and (state is None or on_disk["epoch"] > state["epoch"]):
        state = on_disk
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        resumed_at = [*state.get("resumed_at", []), start_epoch]
    modalities = tuple(spec.modalities)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    storage = Storage.from_spec(spec.storage)
    blocks = worker_blocks(config["files"], rank, context.get_world_size())
    board, throttle = (config.get("progress") if rank == 0 else None), Throttle(1.0)
    for epoch in range(start_epoch, config["epochs"]):
        losses = []
        # a seeded order and shuffle per (seed, epoch, rank): same data and seed -> same batches, same weights
        rng = np.random.default_rng((config["seed"] * 1_000_003 + epoch * 1_009 + rank) % 2**32)
        for batch in epoch_batches(storage, blocks, config["batch_size"], rng):
            feats = features_from_columns(batch, modalities)
            labels = batch.get("label")
            losses.append(train_step(model, optimizer, feats, labels, device, config["pos_weight"],
                                     bf16=config["gpu"], loss_model=wrapped))
            if board is not None and throttle():          # rank 0 only: epoch, batch and running loss
                board.post.remote("rank0", epoch=epoch, batch=len(losses), loss=float(np.mean(losses)))
        metrics = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan")}
        if board is not None:
            board.post.remote("rank0", epoch=epoch + 1, batch=0, loss=metrics["loss"])
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "resumed_at": resumed_at}, os.path.join(d, "state.pt"))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)   # every rank reports (Ray Train V2)


def latest_checkpoint_state(storage: Storage, run_dir: str, device) -> dict | None:
    """The newest `checkpoint_*/state.pt` under a Ray Train run's folder that loads completely (one cut off by
    a dying worker is skipped); None when there is none yet."""
    import pyarrow.fs as pafs

    fs = storage.filesystem(run_dir)
    root = storage.fs_path(run_dir)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    for entry in sorted((e for e in entries if e.base_name.startswith("checkpoint_")), key=lambda e: e.base_name,
                        reverse=True):
        try:
            with fs.open_input_stream(f"{entry.path}/state.pt") as f:
                return torch.load(io.BytesIO(f.read()), map_location=device, weights_only=True)
        except Exception:  # noqa: BLE001 - missing or cut off: try the one before
            continue
    return None


def _fit(spec: Spec, files: list[FeatureFile], cfg: ModelConfig, pos_weight: float, storage: Storage,
         run_root: str) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = Resources.current()
    workers = spec.train.workers
    per_worker = {"CPU": res.train_worker_cpus(workers)}
    if spec.train.gpu:
        per_worker["GPU"] = 1
    name = f"{spec.name}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
    run_config = RunConfig(
        name=name, storage_path=storage.fs_path(run_root) if is_s3(run_root) else run_root,
        storage_filesystem=storage.filesystem(run_root) if is_s3(run_root) else None,
        checkpoint_config=CheckpointConfig(num_to_keep=2), failure_config=FailureConfig(max_failures=2))
    board = ProgressBoard.remote()
    # per worker and epoch
    batches = max(1, math.ceil(sum(f.rows for f in files) // workers / spec.train.batch_size))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"spec": spec, "model": asdict(cfg), "epochs": spec.train.epochs, "seed": spec.train.seed,
                           "lr": spec.train.learning_rate, "batch_size": spec.train.batch_size,
                           "pos_weight": pos_weight, "gpu": spec.train.gpu, "run_dir": join(run_root, name),
                           "files": files, "progress": board},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=spec.train.gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if spec.train.gpu else "gloo"),
        run_config=run_config)
    display = ProgressDisplay("training", spec.train.epochs * batches, "batches")

    def show(posts: dict) -> None:
        p = posts.get("rank0")
        if p:
            display.update(min(p["epoch"] * batches + p["batch"], spec.train.epochs * batches),
                           epoch=f"{min(p['epoch'] + 1, spec.train.epochs)}/{spec.train.epochs}", loss=p["loss"])

    try:
        with BoardWatcher(board, show):
            result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training of '{spec.name}' produced no checkpoint: {result.error}")
        with result.checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    finally:
        display.close()
        ray.kill(board)
        _remove_run_folder(storage, join(run_root, name))
    return {"state": state["model"], "loss": result.metrics.get("loss"), "epochs": state["epoch"] + 1,
            "resumed_at": state.get("resumed_at", [])}


def _remove_run_folder(storage: Storage, run_dir: str) -> None:
    """Delete a training's checkpoints once it has ended: they serve only to resume it after a worker loss, and a
    registry trained in every week would otherwise keep two checkpoints of each training for good."""
    fs = storage.filesystem(run_dir)
    try:
        fs.delete_dir(storage.fs_path(run_dir))
    except FileNotFoundError:
        pass
    except OSError as exc:                  # the version is saved either way; `dmafn maintain` removes it later
        log.warning("%s: the training's checkpoints could not be removed (%s); dmafn maintain removes them once "
                    "they are older than its retention", run_dir, exc)


@ray.remote(num_cpus=1)
def _file_encoding_sums(spec: Spec, file: FeatureFile, model, typical_only: bool) -> dict[str, EncodingSums]:
    """One feature file's encodings summed per modality with a density, a record batch at a time."""
    total: dict[str, EncodingSums] = {}
    for columns in read_piece(Storage.from_spec(spec.storage), Piece(file.path, 0, file.rows)):
        add_sums(total, encoding_sums(model, features_from_columns(columns, tuple(spec.modalities)),
                                      typical_only=typical_only))
    return total


class TrainingWarnings:
    """The warnings one training run gives, kept in order for the version's manifest (`warnings`), where `dmafn
    report` shows them: inside `capturing()`, every warning a `pipelines` module logs on this process - a glitch
    that sets a channel's std, a level float32 holds only coarsely, relations refitted without many ticks,
    validation outliers, a short tail, and the data layer's (label rows left out, files not named *.parquet)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        """Give a warning: logged, so kept inside `capturing()`."""
        log.warning("%s", line)

    @contextlib.contextmanager
    def capturing(self) -> Iterator["TrainingWarnings"]:
        """Keep every WARNING or worse that a `pipelines` module logs in this process inside the block, each
        distinct line once (a folder listed twice warns twice); the handler is removed on leaving."""
        handler = _KeptWarnings(self.lines)
        logger = logging.getLogger("pipelines")
        logger.addHandler(handler)
        try:
            yield self
        finally:
            logger.removeHandler(handler)


class _KeptWarnings(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line not in self.lines:
            self.lines.append(line)


def fit_encoding_densities(spec: Spec, model, files: list[FeatureFile]) -> tuple[dict[str, int], dict[str, int]]:
    """Fit the trained model's encoding densities (spec `encoding_distance`) on the training feature files
    (`dmafn.training.fit_densities_in_two_passes`): each pass a Ray task per file sums its encodings and the driver
    adds the sums up (a d x d matrix per modality) in file order. Returns the ticks each density was fitted on and
    those the second pass left out; ({}, {}) when no modality asks for one."""
    if not len(model.densities):
        return {}, {}
    display = ProgressDisplay("encoding densities", 2 * len(files), "feature file passes")

    def pass_sums(typical_only: bool) -> dict[str, EncodingSums]:
        model_ref = ray.put(model)                                  # with the first pass's fit for the second
        refs = [_file_encoding_sums.remote(spec, f, model_ref, typical_only) for f in files]
        total: dict[str, EncodingSums] = {}
        for done, ref in enumerate(refs, 1):
            add_sums(total, raise_task_error(ref))
            display.update(done + typical_only * len(files))
        return total

    result = fit_densities_in_two_passes(model, pass_sums)
    display.close()
    return result


def classifier_threshold_lines(spec: Spec, days: list[dt.date]) -> list[str]:
    """A line when a classifier's threshold is fitted by a tail method (`TAIL_METHODS`) on `days`, which hold its
    labelled incidents: the threshold sits among them (`dmafn train` and `dmafn recalibrate` warn)."""
    method = spec.score.threshold.method
    if spec.model.detector != "classifier" or method not in TAIL_METHODS or not days:
        return []
    return [f"detector 'classifier' with score.threshold method '{method}': fitted on the upper tail of the validation "
            f"days' logits ({days[0]}..{days[-1]}) as if they were normal ticks, it sits among the labelled incidents "
            f"there and misses most alarms; leave the method out (a classifier's default: fixed at logit "
            f"{CLASSIFIER_THRESHOLD:g}, P(anomaly) 0.5 under its class-weighted loss) or give {{method: fixed, value: "
            "V}"]


def fit_calibration(spec: Spec, model, stats: BucketStatistics, shards: list[Shard],
                    incidents: KnownIncidents | None = None, days: list[dt.date] | None = None
                    ) -> tuple[Calibration, int]:
    """The calibration (contribution normalisation, the spec's smoothing per entity, the threshold) fitted on
    the validation days' raw scores - the one scoring path - where the shards' tasks leave them
    (`pipelines.calibrate`): the driver gets counts and a few values, not the ticks. With `incidents`, the
    validation ticks in or just after a known one are left out; returns the calibration and their count. Warns of
    what the fit shows (outliers, a modality rare among the validation `days` - default: the shards' -, a short
    tail); a modality at none of them is a DataError (`rare_modality_lines`)."""
    from pipelines.calibrate import ShardTicks

    ticks = ShardTicks.score(spec, model, stats, shards, incidents)
    if spec.model.detector != "classifier":      # a classifier's validation days hold its labelled incidents
        for line in validation_warnings(ticks.relation_outliers, ticks.count()):
            log.warning("%s", line)
    calibration = Calibration.fit_from(ticks, tuple(spec.modalities),
                                       detector=spec.model.detector, vote=spec.model.vote,
                                       scale=spec.model.contribution_scale, smoothing=spec.score.smoothing,
                                       threshold=spec.score.threshold, voting=voting_modalities(spec.modalities),
                                       state_baseline=spec.model.state_baseline,
                                       outlier_limit=spec.train.validation_outlier_limit,
                                       outlier_after=outlier_reach_ticks(spec))
    if spec.train.validation_outlier_limit is not None and spec.model.detector != "classifier":
        kept = calibration.outliers_kept
        log.info("calibration: %d of %d validation ticks left out as outliers (a voting modality over %g IQRs above "
                 "its median, and the %d ticks after one; train.validation_outlier_limit)%s",
                 calibration.outliers_left_out, calibration.outliers_left_out + ticks.count(),
                 spec.train.validation_outlier_limit, outlier_reach_ticks(spec),
                 f"; {kept} flagged but kept - at most {100 * OUTLIER_SHARE:g} % of the ticks or {OUTLIER_MIN_TICKS} "
                 "over the limit (the ticks after each not counted), a clean day's own tail" if kept else "")
    for line in calibration.outlier_warnings():
        log.warning("%s", line)
    if spec.model.detector != "classifier":
        days = days or sorted({d for s in shards for d in s.dates})
        validation = calibration.validation
        for line in rare_modality_lines(spec, validation["validation_present_ticks"], validation["validation_ticks"],
                                        f"validation ticks of {days[0]}..{days[-1]}", "calibrate"):
            log.warning("%s", line)
    for line in calibration.tail_warnings():
        log.warning("%s", line)
    return calibration, ticks.left_out


RARE_MODALITY_SHARE = 0.01     # a modality present at fewer of the training (validation) ticks is warned of


def rare_modality_lines(spec: Spec, present: dict[str, int], ticks: int, where: str, task: str) -> list[str]:
    """A warning line for each modality with a table of its own present at fewer than `RARE_MODALITY_SHARE` of
    `ticks` (`where`: which ticks); DataError for the first present at none (its files there hold no usable row, or
    none within a tick's window or tolerance), as the model could not do its `task` with it ("learn", "calibrate")."""
    lines = []
    for name in voting_modalities(spec.modalities):
        n = present.get(name, 0)
        if not n:
            raise DataError(f"modality '{name}' ({spec.modalities[name].path}): present at none of the {ticks:,} "
                            f"{where} (its files there hold no usable row, or none within a tick's window or "
                            f"tolerance), so the model could not {task} it: train on days that hold it, or leave it "
                            "out of the spec")
        if n < RARE_MODALITY_SHARE * ticks:
            lines.append(f"modality '{name}': present at only {n:,} of the {ticks:,} {where} "
                         f"({100 * n / ticks:.2f} %), so the model can {task} it from those alone - train on days "
                         "that hold more of it")
    return lines


def outlier_reach_ticks(spec: Spec) -> int:
    """The ticks after a validation outlier that the calibration leaves out with it: as far as its evidence can
    stay in the later ticks' inputs (`Spec.evidence_reach_us`), in grains."""
    return -(-spec.evidence_reach_us // spec.grain_us)


def fit_statistics(spec: Spec, shards: list[Shard], sliceable: bool, incidents: KnownIncidents | None = None,
                   under: dict[str, Any] | None = None) -> FittedStatistics:
    """Normalisation statistics of the training shards (with the input quarantine counts and the entities' row
    intervals, `FittedStatistics`): fitted per shard in Ray tasks; the fleet's parts merged
    here, the per-entity parts by entity bucket in a task each, which sends back only what the fleet's part needs
    (`StatisticsTotals`) and then its entities' rows (so the driver never holds every entity's Python objects: a
    fleet of 100,000 machines). A channel whose variance one value holds (`StatisticsFitter.outlier_warnings`) is
    logged as a warning. The channel relations are then refitted on their typical ticks, a pass over the shards
    per refit, each task given the fit before for its entities only (`refit_relations_on_typical_ticks`,
    `BucketStatistics`; `sliceable`: `keys_sliceable` there). With `incidents`, each task fits its ticks without
    the known incidents of its dates.

    `under`: a fleet's part fitted before (a model version's): only the entities' parts are fitted, under it (its
    transforms, its relations' weights), as `dmafn enroll` does for machines new to the version; the result's
    fleet part is `under` with the relations' left-out counts of this fit's last pass."""
    buckets = max(1, min(STATISTICS_BUCKETS, len(shards)))

    def fit(before: EntityStatistics | None) -> FittedStatistics:
        fits_before = None if before is None else BucketStatistics(before, sliceable)
        outs = [_shard_statistics.options(num_returns=buckets + 3).remote(
            s, spec, buckets, None if fits_before is None else fits_before.ref(s),
            None if incidents is None else incidents.for_dates(s.dates)) for s in shards]
        return gather_statistics(spec, outs, buckets, refit=before is not None, under=under)

    first = fit(None)                   # a refit reads the same rows: its counts and intervals again
    refitted = refit_relations_on_typical_ticks(first.statistics, lambda before: fit(before)[0], lambda s: s.fleet)
    return first._replace(statistics=refitted)


def gather_statistics(spec: Spec, outs: list[list["ray.ObjectRef"]], buckets: int, refit: bool = False,
                      under: dict[str, Any] | None = None) -> FittedStatistics:
    """`fit_statistics` from its shard tasks' objects (each the fleet's part, the quarantine counts, the row
    intervals, then one part per entity bucket of `buckets`); `outs` is emptied once read, so the parts go when their
    merges are done.
    `refit`: a refit of the relations (shown as such; the first pass has given the outlier warnings); `under`: the
    fleet's part to fit the entities' parts under instead of this fit's (see `fit_statistics`)."""
    merges = [_merge_bucket_statistics.remote(spec, [out[3 + b] for out in outs]) for b in range(buckets)]
    fitter, quarantined, intervals = StatisticsFitter(spec), {}, {}
    display = ProgressDisplay("relations refit" if refit else "statistics", len(outs) + buckets, "shards and buckets")
    for i, out in enumerate(outs):                  # in shard order: the same fit on every run
        fitter.merge(raise_task_error(out[0]))
        for name, n in raise_task_error(out[1]).items():
            quarantined[name] = quarantined.get(name, 0) + n
        merge_counts(intervals, raise_task_error(out[2]))
        display.update(i + 1)
    done = len(outs)
    outs.clear()                                    # the buckets' parts go once their merges have read them
    totals = StatisticsTotals()
    for i, (totals_ref, _) in enumerate(merges):
        totals.merge(raise_task_error(totals_ref))
        display.update(done + i + 1)
    display.close()
    for line in () if refit or under is not None else fitter.outlier_warnings():
        log.warning("%s", line)
    try:
        fleet = fitter.fleet_result(totals) if under is None else with_left_out(under, fitter.left_out_)
    except NoUsableRows as exc:
        m = spec.modalities[exc.modality]
        added = f" - added_columns: {', '.join(m.added_columns)}" if m.added_columns else ""
        if exc.dead:         # a dead channel: the others are there, that column never is
            raise DataError(
                f"modality '{m.name}' ({m.path}): column {', '.join(map(repr, exc.dead))} holds no usable value at "
                f"any of the {exc.present:,} training ticks its other columns have one, so its statistics cannot be "
                "fitted (a dead channel for the whole training window, or a column added to the table after its "
                f"files were written, which reads null there{added}); train on days where it has values, or leave "
                "the column out of the spec's columns") from None
        raise DataError(f"modality '{m.name}' ({m.path}): present at none of the training ticks - no tick holds a "
                        f"usable value of each of its columns ({', '.join(m.value_columns)}) within its window or "
                        "tolerance, so the model could not learn it (its files there hold no usable row, or lack a "
                        f"column: one added to the table after they were written reads null there{added}); train on "
                        "days that hold it, or leave it (or the column) out of the spec") from None
    fleet_ref = ray.put(fleet)
    row_refs = [_bucket_entity_rows.remote(merged, fleet_ref) for _, merged in merges]   # all started, then read
    return FittedStatistics(EntityStatistics(fleet, rows=entity_rows([raise_task_error(ref) for ref in row_refs])),
                            quarantined, intervals)


def known_incidents(spec: Spec, storage: Storage) -> KnownIncidents | None:
    """The labelled intervals training leaves out (`train.exclude_labelled`, on by default; a spec with labels
    and any detector but the classifier, which trains on them); None otherwise."""
    if spec.labels is None or not spec.train.exclude_labelled or spec.model.detector == "classifier":
        return None
    try:
        labels = read_labels(spec, storage)
    except DataError as exc:
        raise DataError(f"{exc} - training reads the labels to leave known incidents out of its ticks "
                        "(train.exclude_labelled); fix the labels or set train.exclude_labelled: false") from None
    return KnownIncidents.of(labels, spec)


def no_labelled_training_days(spec: Spec, labels: pl.DataFrame, train_days: list[dt.date], where: str = "in") -> str:
    """Why a classifier cannot train: no labelled anomaly `where` ('in', 'at a tick of') its training days - where
    the labels' events lie, and what to do."""
    named = label_intervals(labels, spec, spec.labels.start, spec.labels.end).drop_nulls(["_s", "_e"])
    first, last = named.select(local_date_text(pl.col("_s").min(), spec.timezone),
                               local_date_text(pl.col("_e").max(), spec.timezone).alias("last")).row(0)
    lies = f"its {named.height} labelled event(s) lie in {first}..{last}" if named.height else \
        "it holds no labelled event"
    return (f"labels at {spec.labels.path}: no labelled anomaly {where} the training days {train_days[0]}.."
            f"{train_days[-1]}; {lies} - detector 'classifier' learns from the labelled incidents of its training "
            "days: train on days that hold some (train.start, train.end), or choose a detector that learns normal "
            "operation (autoencoder, vae, adversarial, svdd)")


def require_labelled_training_days(spec: Spec, labels: pl.DataFrame, train_days: list[dt.date]) -> None:
    """A classifier learns from the labelled incidents of its training days: a DataError before any data is read
    when no labelled event overlaps them (`no_labelled_training_days`)."""
    named = label_intervals(labels, spec, spec.labels.start, spec.labels.end)
    start, end = date_start_us(train_days[0], spec.timezone), date_end_us(train_days[-1], spec.timezone)
    if named.filter((pl.col("_e") >= start) & (pl.col("_s") < end)).is_empty():
        raise DataError(no_labelled_training_days(spec, labels, train_days))


def train(spec: Spec, *, run_root: str | None = None, promote: bool = True) -> str:
    """Train a model version for `spec` over its training window; returns the version id. With `promote` (the
    default) LATEST names it; without, it is a candidate (`Registry.promote` names it later)."""
    storage = Storage.from_spec(spec.storage)
    train_days, val_days = split_dates(spec)
    t0, warned = time.time(), TrainingWarnings()
    with warned.capturing():
        return _train(spec, storage, train_days, val_days, t0, warned, run_root, promote)


def _train(spec: Spec, storage: Storage, train_days: list[dt.date], val_days: list[dt.date], t0: float,
           warned: TrainingWarnings, run_root: str | None, promote: bool = True) -> str:
    labels = read_labels(spec, storage) if spec.model.detector == "classifier" else None
    if labels is not None:                         # before any data is listed or read: none there, none to learn from
        require_labelled_training_days(spec, labels, train_days)
    files = list_inputs(spec, sorted(set(train_days) | set(val_days)), storage)
    require_data(spec, files, train_days, storage)
    require_each_modality(spec, files, train_days, "training")
    require_each_modality(spec, files, val_days, "validation")
    schemas = require_columns(spec, storage, files)
    # enough shards to keep a cluster busy, from the spec (not the cluster): the same spec plans the same shards
    slots = 4 * spec.train.workers
    key_casts = entity_casts(spec, schemas)
    train_shards = plan_shards(spec, train_days, files, min_shards=slots, key_casts=key_casts)
    val_shards = plan_shards(spec, val_days, files, min_shards=slots, key_casts=key_casts)
    staging = Staging(spec, storage, train_shards + val_shards, [*train_days, *val_days], uuid.uuid4().hex[:12])
    try:                                           # files that mix entities: split by bucket once, read from there
        train_shards, val_shards = staging.resolve(train_shards), staging.resolve(val_shards)
        incidents = known_incidents(spec, storage)
        sliceable = keys_sliceable(spec, schemas)
        statistics, quarantined, row_intervals = fit_statistics(spec, train_shards, sliceable, incidents)
        quarantined = left_out_files(quarantined, f"training days {train_days[0]}..{train_days[-1]}")
        stats = statistics.fleet                    # the fleet's part: each entity's are rows (`pipelines.statistics`)
        for line in relation_lines(stats, spec):
            log.info("%s", line)
        for name, entry in stats["modalities"].items():
            if "channel_transforms" in entry:
                log.info("modality '%s': transform auto -> %s", name, ", ".join(
                    f"{c} {t} (drift {d:.2f})" for c, t, d in zip(spec.modalities[name].columns,
                                                                   entry["channel_transforms"], entry["drift"])))
        # each shard's task gets its entity bucket's per-entity statistics only (`pipelines.statistics`)
        bucket_stats = BucketStatistics(statistics, sliceable)
        files, positives, train_left_out, present, entities, payload_formats = write_training_features(
            spec, train_shards, bucket_stats, labels, join(staging.folder, "features"), incidents)
        ticks = sum(f.rows for f in files)
        if not ticks:
            raise DataError(f"spec '{spec.name}': no tick of the training days {train_days[0]}..{train_days[-1]} "
                            "has a modality present" + (f" outside the labelled incidents of {spec.labels.path} "
                                                        "(train.exclude_labelled)" if train_left_out else ""))
        for line in rare_modality_lines(spec, present, ticks, f"training ticks of {train_days[0]}..{train_days[-1]}",
                                        "learn"):
            warned(line)
        for line in unmet_entity_lines(spec, entities, f"training ticks of {train_days[0]}..{train_days[-1]}"):
            warned(line)
        if incidents is not None or labels is not None:    # an incident under a key the input spells otherwise
            span = (date_start_us(train_days[0], spec.timezone), date_end_us(train_days[-1], spec.timezone))
            named = incidents.index.started if incidents is not None else \
                label_intervals(labels, spec, spec.labels.start, spec.labels.end)   # a classifier's positives
            for line in unmatched_label_lines(named, spec, entities, span,
                                              f"training days {train_days[0]}..{train_days[-1]}", spec.labels.path):
                warned(line)
        if spec.model.detector != "classifier":     # a classifier's training window holds its labelled incidents
            for line in relation_warnings(stats, ticks):
                warned(line)
        for line in classifier_threshold_lines(spec, val_days):
            warned(line)
        pos_weight = 1.0
        if labels is not None:
            if not positives:                    # labelled there, but at no tick of the data (a key spelt otherwise)
                raise DataError(no_labelled_training_days(spec, labels, train_days, "at a tick of"))
            pos_weight = positive_weight(np.r_[np.zeros(ticks - positives), np.ones(positives)])
        cfg = model_config(spec.model)
        run_root = run_root or train_runs_path(spec)
        log.info("training %s on %d ticks (%s..%s, %d shard(s)), %d workers", spec.name, ticks, train_days[0],
                 train_days[-1], len(train_shards), spec.train.workers)
        fitted = _fit(spec, files, cfg, pos_weight, storage,
                      run_root if is_s3(run_root) else os.path.abspath(run_root))
        model = build_model(spec.modalities, cfg)
        model.load_state_dict(fitted["state"])
        densities, left_out = fit_encoding_densities(spec, model, files)
        for name, fitted_ticks in densities.items():
            log.info("modality '%s': encoding distance (weight %g) fitted on %d training ticks (%d beyond the "
                     "first fit's 99.9 %% limit left out)%s", name, spec.modalities[name].encoding_distance,
                     fitted_ticks, left_out[name], "" if fitted_ticks else " - too few, so its error is not weighed")
        calibration, validation_left_out = fit_calibration(spec, model, bucket_stats, val_shards, incidents, val_days)
        if incidents is not None:
            log.info("known incidents (labels at %s; train.exclude_labelled): %d training and %d validation ticks "
                     "inside a labelled interval or within %s of its end left out", spec.labels.path, train_left_out,
                     validation_left_out, format_duration(incidents.after_us))
        for line in calibration.baseline_lines():
            log.info("%s", line)
        manifest = {"spec": spec.to_dict(), "calibration": calibration.to_dict(),
                    "training_window": {"train_days": [d.isoformat() for d in train_days],
                                        "validation_days": [d.isoformat() for d in val_days]},
                    "metrics": {"train_loss": fitted["loss"], "epochs": fitted["epochs"], "train_ticks": ticks,
                                **({"encoding_density_ticks": densities, "encoding_density_left_out": left_out}
                                   if densities else {}),
                                **({"relation_left_out": relations_left_out(stats)} if stats.get("relations") else {}),
                                **({"labelled_left_out": {"train": train_left_out, "validation": validation_left_out}}
                                   if incidents is not None else {}),
                                "validation_outliers_left_out": calibration.outliers_left_out,
                                "resumed_at_epochs": fitted["resumed_at"], "seconds": round(time.time() - t0, 1)},
                    "input_quarantine": quarantined, "warnings": list(warned.lines),
                    **({TRAINED_FORMATS: payload_formats, TRAINED_COLOUR: True} if payload_formats else {}),
                    **({TRAINED_INTERVALS: row_intervals} if row_intervals else {})}
    finally:
        staging.close()
    version = Registry(spec.registry, storage).save(model, manifest, statistics, promote=promote)
    log.info("model version %s saved under %s%s", version, spec.registry,
             f"; its {len(manifest['warnings'])} training warning(s) are kept in its manifest ('warnings') and shown "
             "by dmafn report" if manifest["warnings"] else "")
    return version
