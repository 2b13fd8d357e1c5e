"""Benchmark: a wide table's channel relations while some of its tags are dead (`conditional_residuals`).

    python -m benchmarks.dead_tag_relations [--tags 10 40] [--ticks 3000] [--out benchmarks/results]

A historian's table of `--tags` tags with an hour's context, each tag a linear mix of two slowly moving hidden loads
plus each machine's own offset and noise - alone, then beside a peer (a 3-step series reading the first load) -,
goes through the real statistics pass (`StatisticsFitter`, 8 machines, 6,000 training ticks) and `featurize` on
aligned rows. Every tenth test tick has
one live tag off its relation by `SHIFT` of its noise's standard deviation; 0, 1, 3 and a fifth of the tags are dead
(null now and over their context window, as `align` gives a dead tag). Per dead count it prints and writes the
ROC-AUC of the table's relation error for the anomalous ticks and the normal ticks' mean error (about 1: the unit
holds), each with the covariance kept (`conditional`, `cross_conditional`, since 2026-12-06) and without it - what
scoring did before: alone, no relation error at all while any tag was dead (ROC-AUC 0.5); beside the peer, each tag
read against the peer alone (`peer_channels`) -, and `featurize`'s seconds (the fastest of 3) for the test ticks
against the same ticks with every tag (the fitted relations' path: the ratio is what reading the rest costs).
`dead_tag_relations.json`.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pyarrow as pa

from benchmarks.common import write_json
from dmafn.features import StatisticsFitter, featurize
from dmafn.metrics import roc_auc
from dmafn.spec import parse_spec

SHIFT = 4.0          # how far an anomalous tag leaves its relation, in its noise's standard deviations
NOISE = 0.1
MACHINES = 8
REPEATS = 3          # `featurize` timed this many times each way, the fastest kept


def wide_spec(tags: int, peer: bool = False):
    """A spec of one tabular modality `hist` of `tags` columns with a one-hour context at a 1-minute grain; with
    `peer`, a series `vib` (one channel, 3 steps) beside it."""
    modalities = {"hist": {"kind": "tabular", "path": "/tmp/none/hist", "tolerance": "2min",
                           "columns": [f"t{i:02d}" for i in range(tags)], "context": {"window": "1h"}}}
    if peer:
        modalities["vib"] = {"kind": "timeseries", "path": "/tmp/none/vib", "columns": ["a"], "period": "20s",
                             "window": "1min"}
    return parse_spec({"name": "wide", "entity": "machine_id", "time": "ts", "grain": "1min", "partition": "date",
                       "modalities": modalities,
                       "train": {"start": "2024-01-01", "end": "2024-01-02"}, "registry": "/tmp/none/models",
                       "score": {"output": "/tmp/none/scores"}})


def aligned(spec, n: int, seed: int, mixes: np.ndarray, dead: np.ndarray | None = None,
            shifted: np.ndarray | None = None) -> pa.Table:
    """Aligned rows of `hist` and its context; `shifted` (n,) the tag moved by SHIFT noise stds at each tick (-1:
    none); `dead`: the tags null now and over the context window."""
    rng = np.random.default_rng(seed)
    tags, steps = mixes.shape[1], spec.modalities["hist_context"].steps
    keys = np.arange(n) % MACHINES
    offsets = np.random.default_rng(99).normal(0, 2, (MACHINES, tags))[keys]
    loads = np.cumsum(rng.normal(0, 0.1, (n, steps, 2)), 1) + rng.normal(0, 1, (n, 1, 2))
    values = loads @ mixes + offsets[:, None, :] + rng.normal(0, NOISE, (n, steps, tags))
    current = values[:, -1, :].astype(np.float64)
    if shifted is not None:
        moved = shifted >= 0
        current[np.flatnonzero(moved), shifted[moved]] += SHIFT * NOISE
    table = {"machine_id": [f"m{k}" for k in keys], "hist__present": [True] * n, "hist_context__present": [True] * n}
    if "vib" in spec.modalities:
        vib = loads[:, -1:, 0] + rng.normal(0, NOISE, (n, 3))
        table.update({"vib__present": [True] * n, "vib__a": pa.array(vib.astype(np.float32).tolist(),
                                                                      pa.list_(pa.float32()))})
    gone = set() if dead is None else set(dead.tolist())
    for j in range(tags):
        table[f"hist__t{j:02d}"] = pa.array([None] * n if j in gone else current[:, j], pa.float64())
        table[f"hist_context__t{j:02d}"] = pa.array(
            [None] * n if j in gone else values[:, :, j].astype(np.float32).tolist(), pa.list_(pa.float32()))
    return pa.table(table)


def timed(step) -> float:
    """Seconds one call of `step` takes."""
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def run(tags: int, ticks: int, peer: bool = False) -> dict[str, dict[str, float]]:
    """dead count -> ROC-AUC and normal ticks' mean error with and without the kept covariance, and the cost."""
    spec = wide_spec(tags, peer)
    mixes = np.random.default_rng(0).normal(size=(2, tags))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = StatisticsFitter(spec).add(aligned(spec, 6000, 1, mixes)).result()
    relation = stats["relations"]["hist_context"]
    without = {**stats, "relations": {"hist_context": {k: v for k, v in relation.items()
                                                       if k not in ("conditional", "cross_conditional")}}}
    anomalous = np.arange(ticks) % 10 == 0
    draw = np.random.default_rng(2)
    out = {}
    for count in sorted({0, 1, 3, max(5, tags // 5)}):
        dead = draw.choice(tags, count, replace=False)
        live = np.setdiff1d(np.arange(tags), dead)
        shifted = np.where(anomalous, live[draw.integers(0, len(live), ticks)], -1)
        rows = aligned(spec, ticks, 3 + count, mixes, dead, shifted)
        whole = aligned(spec, ticks, 3 + count, mixes, None, shifted)
        errors = featurize(rows, spec, stats).relation_errors[:, 0]
        seconds, baseline = (min(timed(lambda t=table: featurize(t, spec, stats)) for _ in range(REPEATS))
                             for table in (rows, whole))
        before = featurize(rows, spec, without).relation_errors[:, 0]
        out[str(count)] = {"roc_auc": roc_auc(errors, anomalous), "normal_mean_error": float(errors[~anomalous].mean()),
                           "roc_auc_before": roc_auc(before, anomalous),
                           "normal_mean_error_before": float(before[~anomalous].mean()),
                           "featurize_s": seconds, "featurize_all_tags_s": baseline,
                           "ratio": seconds / baseline,
                           "kept_covariance": "cross_conditional" in relation if peer else "conditional" in relation}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--ticks", type=int, default=3000)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {"alone": {}, "with_peer": {}}
    for (beside, peer), tags in ((b, t) for b in (("alone", False), ("with_peer", True)) for t in args.tags):
        results[beside][str(tags)] = run(tags, args.ticks, peer)
        for count, r in results[beside][str(tags)].items():
            print(f"{tags} tags {beside.replace('_', ' ')}, {count} dead: relation ROC-AUC {r['roc_auc']:.3f} "
                  f"(before {r['roc_auc_before']:.3f}), "
                  f"normal ticks' mean error {r['normal_mean_error']:.2f} (before {r['normal_mean_error_before']:.2f}); "
                  f"featurize {r['featurize_s']:.2f} s vs {r['featurize_all_tags_s']:.2f} s with every tag "
                  f"({r['ratio']:.2f}x)", flush=True)
    write_json(f"{args.out}/dead_tag_relations.json",
               {"config": vars(args) | {"shift_noise_stds": SHIFT, "noise": NOISE, "machines": MACHINES},
                "results": results})


if __name__ == "__main__":
    main()
