"""Training: align the training days, fit preprocessing statistics, train with Ray Train, calibrate, register.

    read + align (Ray Data) -> statistics on training days only -> features (Ray Data map_batches)
    -> TorchTrainer (DDP; gloo on CPU, nccl + bf16 autocast on GPU; checkpoint every epoch)
    -> calibrate contributions and threshold on the validation days -> model version in the registry
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import ray
import torch

from dmafn.features import StatisticsFitter, featurize, features_from_columns, features_to_columns
from dmafn.model import PRESETS, ModelConfig, build_model
from dmafn.scoring import fit_calibration, raw_scores, to_record
from dmafn.spec import Spec
from dmafn.training import positive_weight, seed_everything, train_step
from pipelines.align import label_ticks
from pipelines.ingest import DayInputs, aligned_dataset, read_inputs
from pipelines.labels import read_labels
from pipelines.postprocess import calibrate_threshold
from pipelines.ray_runtime import Resources, ordered_datasets
from pipelines.registry import Registry
from pipelines.storage import DataError, Storage, is_s3, join

log = logging.getLogger(__name__)


def model_config(spec: Spec) -> ModelConfig:
    """The network config a spec asks for: a named preset plus the spec's model options."""
    m = spec.model
    return PRESETS[m.preset](fusion=m.fusion, detector=m.detector, series_encoder=m.series_encoder,
                             text_encoder=m.text_encoder, modality_dropout=m.modality_dropout,
                             cross_modal=m.cross_modal_scoring)


def split_dates(spec: Spec) -> tuple[list[dt.date], list[dt.date]]:
    """Training days and validation days (the last `validation_days` of the training window)."""
    days = [spec.train.start + dt.timedelta(days=i) for i in range((spec.train.end - spec.train.start).days + 1)]
    n_val = min(spec.train.validation_days, len(days) - 1)
    return (days[:-n_val], days[-n_val:]) if n_val > 0 else (days, days)


class FeatureBuilder:
    """Ray Data callable: aligned rows -> model input tensor columns (+ label when labels are given)."""

    def __init__(self, spec: Spec, stats: dict[str, Any], labels: pl.DataFrame | None = None):
        self.spec, self.stats, self.labels = spec, stats, labels

    def __call__(self, aligned: pa.Table) -> dict[str, np.ndarray]:
        cols = features_to_columns(featurize(aligned, self.spec, self.stats))
        if self.labels is not None:
            lab = self.spec.labels
            labelled = label_ticks(pl.from_arrow(aligned), self.labels, self.spec, lab.start, lab.end)
            cols["label"] = labelled["label"].to_numpy().astype(np.float32)
        return cols


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
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:                                   # resume after a failure
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
    shard = ray.train.get_dataset_shard("train")
    modalities = tuple(spec.modalities)
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(start_epoch, config["epochs"]):
        losses = []
        # a seeded shuffle per (seed, epoch, rank): same data and seed -> same batches, same weights
        shuffle_seed = (config["seed"] * 1_000_003 + epoch * 1_009 + rank) % 2**32
        for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy",
                                        local_shuffle_buffer_size=4 * config["batch_size"],
                                        local_shuffle_seed=shuffle_seed):
            feats = features_from_columns(batch, modalities)
            labels = batch.get("label")
            losses.append(train_step(model, optimizer, feats, labels, device, config["pos_weight"],
                                     bf16=config["gpu"], loss_model=wrapped))
        metrics = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan")}
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                           os.path.join(d, "state.pt"))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)   # every rank reports (Ray Train V2)


def _fit(spec: Spec, train_ds, cfg: ModelConfig, pos_weight: float, storage: Storage, run_root: str) -> dict:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = Resources.current()
    workers = spec.train.workers
    per_worker = {"CPU": res.train_worker_cpus(workers)}
    if spec.train.gpu:
        per_worker["GPU"] = 1
    run_config = RunConfig(
        name=f"{spec.name}-{int(time.time())}", storage_path=storage.fs_path(run_root) if is_s3(run_root) else run_root,
        storage_filesystem=storage.filesystem(run_root) if is_s3(run_root) else None,
        checkpoint_config=CheckpointConfig(num_to_keep=2), failure_config=FailureConfig(max_failures=2))
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True                     # each worker's shard is the same rows in the same order
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"spec": spec, "model": asdict(cfg), "epochs": spec.train.epochs, "seed": spec.train.seed,
                           "lr": spec.train.learning_rate, "batch_size": spec.train.batch_size,
                           "pos_weight": pos_weight, "gpu": spec.train.gpu},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=spec.train.gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if spec.train.gpu else "gloo"),
        run_config=run_config, datasets={"train": train_ds}, dataset_config=DataConfig(execution_options=ingest))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training of '{spec.name}' produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    return {"state": state["model"], "loss": result.metrics.get("loss"), "epochs": state["epoch"] + 1}


def _calibrate(spec: Spec, model, stats, inputs: DayInputs, val_days: list[dt.date]) -> tuple[dict, dict]:
    """Contribution normalisation and threshold from the validation days (the one scoring path)."""
    ticks = inputs.ticks.filter(pl.col("_t").is_between(*_range_us(val_days), closed="left"))
    val = aligned_dataset(spec, DayInputs(inputs.tables, inputs.quarantined, ticks))
    tables, raws = [], []
    for batch in val.iter_batches(batch_format="pyarrow", batch_size=None):
        feats = featurize(batch, spec, stats)
        raws.append(raw_scores(model, feats))
        tables.append(batch.select([*spec.entity, "ts"]))
    from dmafn.scoring import RawScores

    raw = RawScores(errors=np.concatenate([r.errors for r in raws]),
                    latent=None if raws[0].latent is None else np.concatenate([r.latent for r in raws]),
                    mask=np.concatenate([r.mask for r in raws]))
    modalities = tuple(spec.modalities)
    calib = fit_calibration(raw, modalities, spec.model.detector, spec.model.vote)
    record = to_record(raw, calib, modalities)
    keys = pl.from_arrow(pa.concat_tables(tables))
    calib["threshold"], validation = calibrate_threshold(keys, record.score, spec)
    return calib, validation


def _range_us(days: list[dt.date]) -> tuple[int, int]:
    from pipelines.align import date_start_us

    return date_start_us(min(days)), date_start_us(max(days) + dt.timedelta(days=1))


def train(spec: Spec, *, run_root: str | None = None) -> str:
    """Train a model version for `spec` over its training window; returns the version id."""
    storage = Storage.from_spec(spec.storage)
    train_days, val_days = split_dates(spec)
    t0 = time.time()
    inputs = read_inputs(spec, sorted(set(train_days) | set(val_days)), storage)
    train_ticks = inputs.ticks.filter(pl.col("_t").is_between(*_range_us(train_days), closed="left"))
    labels = read_labels(spec, storage) if spec.model.detector == "classifier" else None
    with ordered_datasets():                         # same data + seed -> same model version, run after run
        aligned = aligned_dataset(spec, DayInputs(inputs.tables, inputs.quarantined, train_ticks)).materialize()
        fitter = StatisticsFitter(spec)
        for batch in aligned.iter_batches(batch_format="pyarrow", batch_size=None):
            fitter.add(batch)
        stats = fitter.result()
        features = aligned.map_batches(FeatureBuilder, fn_constructor_kwargs={"spec": spec, "stats": stats,
                                                                              "labels": labels},
                                       batch_format="pyarrow", batch_size=None,
                                       compute=ray.data.ActorPoolStrategy(size=1),
                                       num_cpus=Resources.current().actor_cpus(1)).materialize()
    pos_weight = 1.0
    if labels is not None:
        pos_weight = positive_weight(np.concatenate([b["label"] for b in features.iter_batches(
            batch_format="numpy", batch_size=None)]))
        if pos_weight == float(features.count()):
            raise DataError(f"labels at {spec.labels.path}: no labelled anomaly inside the training days")
    cfg = model_config(spec)
    run_root = run_root or join(spec.registry, "_train_runs")
    log.info("training %s on %d ticks (%s..%s), %d workers", spec.name, features.count(), train_days[0],
             train_days[-1], spec.train.workers)
    fitted = _fit(spec, features, cfg, pos_weight, storage, run_root if is_s3(run_root) else os.path.abspath(run_root))
    model = build_model(spec.modalities, cfg)
    model.load_state_dict(fitted["state"])
    with ordered_datasets():
        calibration, validation = _calibrate(spec, model, stats, inputs, val_days)
    manifest = {"spec": spec.to_dict(), "statistics": stats, "calibration": calibration,
                "training_window": {"train_days": [d.isoformat() for d in train_days],
                                    "validation_days": [d.isoformat() for d in val_days]},
                "metrics": {"train_loss": fitted["loss"], "epochs": fitted["epochs"], **validation,
                            "seconds": round(time.time() - t0, 1)},
                "input_quarantine": {m: q.height for m, q in inputs.quarantined.items()}}
    version = Registry(spec.registry, storage).save(model, manifest)
    log.info("model version %s saved under %s", version, spec.registry)
    return version
