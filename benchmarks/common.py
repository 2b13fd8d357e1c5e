"""Helpers shared by the benchmarks: aligned synthetic features in memory (the pure pipeline steps, no Ray)."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from dmafn.features import Features, featurize, fit_training_statistics, state_owner
from dmafn.metrics import pr_auc, roc_auc
from dmafn.model import ModelConfig, model_config
from dmafn.postprocess import smooth_by_group
from dmafn.spec import ModelSpec, Spec, parse_spec
from dmafn.synthetic import SyntheticConfig, generate, synthetic_spec
from pipelines.align import align, alignment_input, label_ticks, make_ticks


@dataclass
class Split:
    train: Features
    test: Features
    labels: np.ndarray
    kinds: np.ndarray
    groups: np.ndarray
    spec: Spec
    train_within: Features | None = None    # the same, each relation within its own modality (no peers' values):
    test_within: Features | None = None     # what a modality alone, or a tick without the peer, may see


def within_modality(stats: dict) -> dict:
    """The statistics without their cross-modal relation fits (`peers`, `cross_channels`)."""
    relations = {ctx: {k: v for k, v in fitted.items() if k not in ("peers", "cross_channels")}
                 for ctx, fitted in stats.get("relations", {}).items()}
    return {**stats, "relations": relations} if relations else stats


def synthetic_split(cfg: SyntheticConfig) -> Split:
    """Generate, align every day (the same `align` the pipeline's shard tasks call), split train / test."""
    data = generate(cfg)
    spec = parse_spec(synthetic_spec("/unused", cfg))
    # a slow `context` view reads its parent modality's rows, as the pipeline's ingest does
    tables = {m: alignment_input(pl.from_arrow(data.tables[ms.context_of or m]), spec, ms)
              for m, ms in spec.modalities.items()}
    ents = pl.DataFrame({"machine_id": [f"pump-{i:02d}" for i in range(cfg.entities)]})
    days = [align(make_ticks(ents, cfg.start + dt.timedelta(days=d), spec.grain_us), tables, spec)
            for d in range(cfg.days)]
    aligned = label_ticks(pl.concat(days), pl.from_arrow(data.labels), spec, "start_ts", "end_ts")
    first_test = (cfg.start + dt.timedelta(days=cfg.clean_days)).isoformat()
    train = aligned.filter(pl.col("date") < first_test).sort(["machine_id", "_t"])
    test = aligned.filter(pl.col("date") >= first_test).sort(["machine_id", "_t"])
    stats = fit_training_statistics(spec, train.to_arrow())     # as `dmafn train`: relations refitted
    within = within_modality(stats)
    parts = {}
    for name, rows in (("train", train.to_arrow()), ("test", test.to_arrow())):
        decoded: dict = {}                                      # frames decoded once for both
        parts[name] = featurize(rows, spec, stats, decoded)
        parts[f"{name}_within"] = parts[name] if within is stats else \
            replace(parts[name], relation_errors=featurize(rows, spec, within, decoded).relation_errors)
    return Split(parts["train"], parts["test"], test["label"].to_numpy().astype(int),
                 test["label_kind"].fill_null("").to_numpy(), test["machine_id"].to_numpy(), spec,
                 parts["train_within"], parts["test_within"])


def pipeline_model_config(**choices) -> ModelConfig:
    """The network config `dmafn train` builds for a spec's default `model` section, with `choices` (fusion,
    detector, ...) changed: a benchmark's models get every capability the pipeline's versions have - a flag
    `model_config` turns on reaches them without an edit here (a hand-built config missed the held payloads once)."""
    return replace(model_config(ModelSpec()), **choices)


def subset(features: Features, modalities: tuple[str, ...]) -> Features:
    """The features of some modalities, with the operating-state columns they own (a modality alone then has
    none to scale its error by: its own levels never enter its baseline), their channels held and their payloads'
    row times (`Features.taken`, with the ticks' groups)."""
    idx = [features.modalities.index(m) for m in modalities]
    relations = None if features.relation_errors is None else features.relation_errors[:, idx]
    keep = [] if features.state is None else [j for j, owner in enumerate(features.state_owners)
                                               if state_owner(owner) in modalities]
    return Features({m: features.inputs[m] for m in modalities}, features.mask[:, idx], modalities, relations,
                    features.state[:, keep] if keep else None, tuple(features.state_owners[j] for j in keep),
                    {m: c for m, c in features.channels.items() if m in modalities},
                    {m: r for m, r in features.relation_channels.items() if m in modalities},
                    {m: t for m, t in features.taken.items() if m in modalities}, features.groups)


def auc_by_kind(scores: np.ndarray, split: Split, smooth: float | None = 0.3) -> dict[str, dict[str, float]]:
    """ROC-AUC and PR-AUC overall and per anomaly kind (kind vs. normal ticks), after per-entity EWMA."""
    if smooth:
        scores = smooth_by_group(np.asarray(scores, float), split.groups, "ewma", smooth)
    y, kinds = split.labels, split.kinds
    out = {"overall": {"roc_auc": roc_auc(scores, y), "pr_auc": pr_auc(scores, y)}}
    for kind in sorted(k for k in set(kinds) if k):
        sel = (kinds == kind) | (y == 0)
        out[kind] = {"roc_auc": roc_auc(scores[sel], y[sel]), "pr_auc": pr_auc(scores[sel], y[sel])}
    return out


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def print_table(rows: dict[str, dict[str, dict[str, float]]], metric: str = "roc_auc") -> None:
    kinds = list(next(iter(rows.values())))
    width = max(len(r) for r in rows) + 2
    print(f"{metric:<{width}}" + "".join(f"{k:>13}" for k in kinds))
    for name, res in rows.items():
        print(f"{name:<{width}}" + "".join(f"{res[k][metric]:>13.3f}" for k in kinds), flush=True)
