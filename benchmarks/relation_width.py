"""Benchmark: the statistics pass's channel relations on a wide tabular modality (a historian's many tags).

    python -m benchmarks.relation_width [--channels 25 50 100] [--ticks 20000] [--entities 20] [--out benchmarks/results]

A relation of a parent of C channels reads P = C x (1 + blocks) + K quantities (`relation_quantities`: each
channel's current value and block means over an hour's context, the peers' values); each channel's design is
nearly all of them. For each width, the same synthetic ticks (`--ticks`, in batches of 2,000 over `--entities`
machines; the channels linear in two loads plus noise) are fitted three ways, each timed and its peak Python
memory taken (`tracemalloc`):
- `shared`: as `dmafn train` now - one `_RelationFit` (a P x P accumulator), each channel's regression taken from
  it and fitted (`channel`, `fit_relation`);
- `per_channel`: as before 2026-12-05 - a `_Regression` per channel on its own design (C accumulators);
- `bare`: a bare loop of the same arithmetic in numpy - the quantities' Gram matrix, each channel's normal
  equations cut from it and solved (no per-entity intercepts, no merging).
Checks that `shared` and `per_channel` give the same weights (to 1e-6), prints seconds, peak MB and the ratios
shared / bare and per_channel / shared; `relation_width.json`.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.common import write_json

BATCH = 2_000
STEPS = 60          # an hour's context at a 1-minute grain: blocks 1, 2-3, 4-10, 11-30, 31-60
PEERS = 6


def batches(channels: int, ticks: int, entities: int, seed: int = 0):
    """(current (N, C), history (N, T, C), keys (N,), peers (N, K)) batches of synthetic ticks."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(2, channels))
    for start in range(0, ticks, BATCH):
        n = min(BATCH, ticks - start)
        keys = np.array([f"m{i % entities:03d}" for i in range(start, start + n)])
        load = rng.normal(size=(n, STEPS, 2)).cumsum(1) * 0.1
        history = (load @ mix + rng.normal(0, 0.3, size=(n, STEPS, channels))).astype(np.float32)
        peers = np.concatenate([load[:, -1], rng.normal(size=(n, PEERS - 2))], 1)
        yield history[:, -1].astype(np.float64), history, keys, peers


def run_shared(channels: int, a: argparse.Namespace) -> list[np.ndarray]:
    from dmafn.features import _EntityTotals, _RelationFit, fit_relation

    fit = _RelationFit()
    for current, history, keys, peers in batches(channels, a.ticks, a.entities):
        fit.add(current, history, keys, peers)
    totals = _EntityTotals.of(fit.quantities)
    return [np.asarray(fit_relation(fit.channel(c), totals.channel(fit.design(c), c))["weights"])
            for c in range(channels)]


def run_per_channel(channels: int, a: argparse.Namespace) -> list[np.ndarray]:
    from dmafn.features import _EntityTotals, _Regression, design_index, fit_relation, group_rows, relation_quantities

    regs: list[_Regression] = []
    for current, history, keys, peers in batches(channels, a.ticks, a.entities):
        quantities = relation_quantities(current, history, peers)
        blocks = (quantities.shape[1] - PEERS) // channels - 1
        designs = [design_index(channels, blocks, c, PEERS) for c in range(channels)]
        regs = regs or [_Regression(len(d)) for d in designs]
        for key, rows in group_rows(keys):
            for c, (reg, design) in enumerate(zip(regs, designs)):
                reg.add(key, quantities[rows][:, design], current[rows, c])
    return [np.asarray(fit_relation(reg, _EntityTotals.of(reg))["weights"]) for reg in regs]


def run_bare(channels: int, a: argparse.Namespace) -> list[np.ndarray]:
    from dmafn.features import design_index, relation_quantities

    gram, sums, n = None, None, 0
    for current, history, _, peers in batches(channels, a.ticks, a.entities):
        q = relation_quantities(current, history, peers)
        gram = q.T @ q if gram is None else gram + q.T @ q
        sums, n = (q.sum(0) if sums is None else sums + q.sum(0)), n + len(q)
    mean = sums / n
    scatter = gram - n * np.outer(mean, mean)
    blocks = (len(mean) - PEERS) // channels - 1
    out = []
    for c in range(channels):
        d = design_index(channels, blocks, c, PEERS)
        out.append(np.linalg.lstsq(scatter[np.ix_(d, d)], scatter[d, c], rcond=None)[0])
    return out


def measured(run, channels: int, a: argparse.Namespace) -> tuple[list[np.ndarray], dict[str, float]]:
    tracemalloc.start()
    t0 = time.perf_counter()
    weights = run(channels, a)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return weights, {"seconds": round(seconds, 2), "peak_mb": round(peak / 1e6, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--ticks", type=int, default=20_000)
    ap.add_argument("--entities", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    rows = []
    for channels in a.channels:
        shared, s = measured(run_shared, channels, a)
        before, p = measured(run_per_channel, channels, a)
        _, b = measured(run_bare, channels, a)
        worst = max(float(np.abs(x - y).max()) for x, y in zip(shared, before))
        assert worst < 1e-6, f"{channels} channels: shared and per-channel weights differ by {worst}"
        row = {"channels": channels, "quantities": channels * 6 + PEERS, "shared": s, "per_channel": p, "bare": b,
               "largest_weight_difference": worst,
               "shared_over_bare_time": round(s["seconds"] / max(b["seconds"], 1e-9), 2),
               "per_channel_over_shared_time": round(p["seconds"] / max(s["seconds"], 1e-9), 2),
               "per_channel_over_shared_memory": round(p["peak_mb"] / max(s["peak_mb"], 1e-9), 2)}
        rows.append(row)
        print(f"{channels} channels ({row['quantities']} quantities), {a.ticks} ticks: shared {s['seconds']} s "
              f"{s['peak_mb']} MB; per channel {p['seconds']} s {p['peak_mb']} MB; bare {b['seconds']} s "
              f"{b['peak_mb']} MB | shared / bare x{row['shared_over_bare_time']} time; per channel / shared "
              f"x{row['per_channel_over_shared_time']} time, x{row['per_channel_over_shared_memory']} memory; "
              f"weights within {worst:.1e}")
    result = {"ticks": a.ticks, "entities": a.entities, "rows": rows}
    write_json(Path(a.out) / "relation_width.json", result)
    return result


if __name__ == "__main__":
    main()
