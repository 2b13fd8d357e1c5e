"""Benchmark: training's per-entity statistics for a large fleet - what the training driver holds while it fits them.

    python -m benchmarks.train_statistics [--entities 100000] [--buckets 16] [--days 4] [--out benchmarks/results]

Each training shard's task fits partial statistics (`StatisticsFitter`) of one entity bucket's machines on one
day. Here the partial fits are made without reading data: statistics fitted on two machines of the generated
demo fleet (normalisation moments, the process context's relations and ranges, the trends of an 'auto'
modality where the spec has one) and pump-00's per-entity state copied to each machine of the shard, every
number moved by a random 0.1 % (no two machines alike). `--buckets` x `--days` shards of `--entities` machines.
Each way runs in its own process (seconds, peak RSS of the process and of its largest Ray worker - with the
largest of what a worker holds itself and of the object store's pages only it has touched - sampled):
- `buckets`: as `dmafn train` now - each shard's task splits its fit by entity bucket
  (`StatisticsFitter.split`), `pipelines.train.gather_statistics` merges each bucket in a task of its own and
  joins the buckets' entity rows; the driver holds the fleet's part and the rows;
- `before`: as training did before 2026-12-03 - each task sends its whole partial fit, the driver merges them
  all, makes the statistics (`result`) and cuts them into the entity file's rows (what `Registry.save` did);
- `bare`: a bare loop of the same fits in one process without Ray - make each partial fit, merge, `result`,
  the rows.
Checks that the three give the same statistics (to 1e-6: the relations' within-machine cross products are the
fleet's centred ones minus the scatter of each machine's means, and the buckets add those parts in another order;
to 1e-11 on the generated fleet's own rows, see the tests), prints seconds, peak RSS and ratios;
`train_statistics.json`.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import write_json
from benchmarks.scale import run_sampled

TEMPLATE = "pump-00"


def template_fitter():
    """The demo spec and a `StatisticsFitter` of two of its machines' first day."""
    import polars as pl

    from dmafn.features import StatisticsFitter
    from dmafn.spec import parse_spec
    from dmafn.synthetic import SyntheticConfig, generate, synthetic_spec
    from pipelines.align import align, alignment_input, make_ticks

    cfg = SyntheticConfig(entities=2, days=1, clean_days=1, seed=3)
    data, spec = generate(cfg), parse_spec(synthetic_spec("/unused", cfg))
    tables = {m: alignment_input(pl.from_arrow(data.tables[ms.context_of or m]), spec, ms)
              for m, ms in spec.modalities.items()}
    ents = pl.DataFrame({"machine_id": [TEMPLATE, "pump-01"]})
    aligned = align(make_ticks(ents, cfg.start, spec.grain_us), tables, spec).sort(["machine_id", "_t"])
    return spec, StatisticsFitter(spec).add(aligned.to_arrow())


def _moved(part: Any, rng) -> Any:
    """A copy of one entity's state object with every float moved by a random 0.1 % (counts kept)."""
    import numpy as np

    out = copy.copy(part)
    for name, value in vars(part).items():
        if name == "n":
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            setattr(out, name, value * (1.0 + 1e-3 * rng.standard_normal(value.shape)))
        elif isinstance(value, float):
            setattr(out, name, value * (1.0 + 1e-3 * float(rng.standard_normal())))
    return out


def partial_fit(template, keys: list[str], seed: int):
    """A shard's partial fit with `keys`' machines: pump-00's per-entity state copied to each, moved, and the
    template's fleet-wide sums scaled to them (a relation's cross products made of the template's within-machine
    part and the copies' own)."""
    import numpy as np

    from dmafn.features import StatisticsFitter, _Comoments, _EntityTotals, _Regression

    rng = np.random.default_rng(seed)
    fitter, scale = StatisticsFitter(template.spec), len(keys) / 2
    fitter.templates_ = template.templates_
    for name, views in template.global_.items():
        for view, moments in views.items():
            fitter.global_[name][view] = copy.deepcopy(moments)
            fitter.global_[name][view].n *= scale
    for name, views in template.entity_.items():
        for view, per_entity in views.items():          # (audio keeps no per-entity moments)
            if TEMPLATE in per_entity:
                fitter.entity_[name][view] = {key: _moved(per_entity[TEMPLATE], rng) for key in keys}
    for name, trends in template.trend_.items():
        fitter.trend_[name] = {key: _moved(trends[TEMPLATE], rng) for key in keys}
    for kind in ("relations_", "cross_relations_"):
        for ctx, fit in getattr(template, kind).items():
            mine = getattr(fitter, kind)[ctx]
            reg = fit.quantities                        # every quantity's cross products (`_RelationFit`)
            copied = _Regression(reg.d, target=False)
            copied.entities = {key: _moved(reg.entities[TEMPLATE], rng) for key in keys}
            # the centred cross products: the template's within-machine part for each machine plus the scatter
            # of the copies' own means (as a fit over those rows would have them)
            within = reg.moments.scatter - _EntityTotals.of(reg).between.about(reg.moments.mean)
            means = _EntityTotals.of(copied).between
            copied.moments = _Comoments(reg.d)
            copied.moments.n, copied.moments.mean = means.n, means.mean
            copied.moments.scatter = within * scale + means.scatter
            mine.quantities, mine.width, mine.peers = copied, fit.width, fit.peers
            mine.ranges = {key: _moved(fit.ranges[TEMPLATE], rng) for key in keys}
    return fitter


def shards(entities: int, buckets: int, days: int) -> list[tuple[int, list[str]]]:
    """(seed, machine keys) of each shard: one per entity bucket and day."""
    from pipelines.shards import bucket_of

    members: dict[int, list[str]] = {}
    for i in range(entities):
        key = f"pump-{i:06d}"
        members.setdefault(bucket_of(key, buckets), []).append(key)
    return [(day * buckets + b, members.get(b, [])) for day in range(days) for b in range(buckets)]


def _write(out: Path, fleet: dict[str, Any], rows) -> None:
    import pyarrow.parquet as pq

    (out / "fleet.json").write_text(json.dumps(fleet, default=str))
    pq.write_table(rows, out / "rows.parquet")


def run_buckets(a: argparse.Namespace, out: Path) -> None:
    import ray

    from pipelines.ray_runtime import ray_session
    from pipelines.train import STATISTICS_BUCKETS, gather_statistics

    spec, template = template_fitter()
    plan = shards(a.entities, a.buckets, a.days)
    buckets = max(1, min(STATISTICS_BUCKETS, len(plan)))

    @ray.remote(num_cpus=1)
    def shard_task(template, keys, seed):            # as pipelines.train._shard_statistics, without reading data
        from pipelines.shards import bucket_of

        fleet, parts = partial_fit(template, keys, seed).split(buckets, lambda key: bucket_of(key, buckets))
        return (fleet, {}, {}, *parts)

    with ray_session(num_cpus=2):
        template_ref = ray.put(template)
        outs = [shard_task.options(num_returns=buckets + 3).remote(template_ref, keys, seed) for seed, keys in plan]
        statistics = gather_statistics(spec, outs, buckets).statistics
        _write(out, statistics.fleet, statistics.table())


def run_before(a: argparse.Namespace, out: Path) -> None:
    import ray

    from dmafn.features import StatisticsFitter, split_entity_statistics
    import pipelines.train  # noqa: F401 - the training driver's modules (torch among them), as in `buckets`
    from pipelines.ray_runtime import raise_task_error, ray_session
    from pipelines.statistics import entity_table

    spec, template = template_fitter()

    @ray.remote(num_cpus=1)
    def shard_task(template, keys, seed):
        return partial_fit(template, keys, seed), {}

    with ray_session(num_cpus=2):
        template_ref = ray.put(template)
        refs = [shard_task.remote(template_ref, keys, seed) for seed, keys in shards(a.entities, a.buckets, a.days)]
        fitter = StatisticsFitter(spec)
        for partial, _ in (raise_task_error(r) for r in refs):
            fitter.merge(partial)
        fleet, entities = split_entity_statistics(fitter.result())
        _write(out, fleet, entity_table(entities))


def run_bare(a: argparse.Namespace, out: Path) -> None:
    from dmafn.features import StatisticsFitter, split_entity_statistics
    from pipelines.statistics import entity_table

    spec, template = template_fitter()
    fitter = StatisticsFitter(spec)
    for seed, keys in shards(a.entities, a.buckets, a.days):
        fitter.merge(partial_fit(template, keys, seed))
    fleet, entities = split_entity_statistics(fitter.result())
    _write(out, fleet, entity_table(entities))


RUNS = {"buckets": run_buckets, "before": run_before, "bare": run_bare}


def _close(a: Any, b: Any, where: str = "") -> str | None:
    """Where `a` and `b` differ beyond 1e-6 (relative), else None."""
    import math

    if isinstance(a, dict):
        if set(a) != set(b):
            return f"{where}: keys differ"
        return next((d for k in a if (d := _close(a[k], b[k], f"{where}/{k}"))), None)
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return f"{where}: lengths differ"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _close(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-300)
        return None if same else f"{where}: {a} vs {b}"
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def same_statistics(first: Path, second: Path) -> str | None:
    import pyarrow.parquet as pq

    from pipelines.statistics import entity_parts

    fleets = [json.loads((p / "fleet.json").read_text()) for p in (first, second)]
    if (d := _close(*fleets, "fleet")):
        return d
    tables = [pq.read_table(p / "rows.parquet") for p in (first, second)]
    if tables[0].column("key").to_pylist() != tables[1].column("key").to_pylist():
        return "entity keys differ"
    for (key, x), (_, y) in zip(entity_parts(tables[0]), entity_parts(tables[1])):
        if (d := _close(x, y, key)):
            return d
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entities", type=int, default=100_000)
    ap.add_argument("--buckets", type=int, default=16, help="the staging's entity buckets (shards per day)")
    ap.add_argument("--days", type=int, default=4, help="training days (shards per bucket)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--run", choices=tuple(RUNS), help=argparse.SUPPRESS)     # one measured process
    ap.add_argument("--to", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run:
        RUNS[a.run](a, Path(a.to))
        return
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in RUNS:
            folder = Path(tmp) / run
            folder.mkdir()
            secs, memory, _ = run_sampled(["-m", "benchmarks.train_statistics", "--run", run, "--to", str(folder),
                                           "--entities", str(a.entities), "--buckets", str(a.buckets),
                                           "--days", str(a.days)], private=True)
            measured[run] = {"seconds": round(secs, 2), "peak_rss_mb": round(memory.driver / 2**20),
                             "largest_worker_rss_mb": round(memory.worker / 2**20),
                             "largest_worker_own_mb": round(memory.worker_own / 2**20),
                             "largest_worker_store_pages_mb": round(memory.worker_store / 2**20)}
            print(f"{run}: {measured[run]}", flush=True)
        for other in ("before", "bare"):
            if (d := same_statistics(Path(tmp) / "buckets", Path(tmp) / other)):
                sys.exit(f"buckets and {other} fitted different statistics: {d}")
        rows_mb = round((Path(tmp) / "buckets" / "rows.parquet").stat().st_size / 1e6, 1)
    n, o, b = measured["buckets"], measured["before"], measured["bare"]
    ratios = {"buckets_over_bare_seconds": round(n["seconds"] / b["seconds"], 2),
              "buckets_over_before_seconds": round(n["seconds"] / o["seconds"], 2),
              "buckets_over_before_driver_rss": round(n["peak_rss_mb"] / o["peak_rss_mb"], 2)}
    print(f"{a.entities:,} machines, {a.buckets} buckets x {a.days} days, the same statistics each way "
          f"(entity rows {rows_mb} MB as Parquet): "
          + "; ".join(f"{name} {m['seconds']:.1f} s, driver {m['peak_rss_mb']} MB, largest worker "
                      f"{m['largest_worker_rss_mb']} MB (own {m['largest_worker_own_mb']} MB, object store pages only "
                      f"it touched {m['largest_worker_store_pages_mb']} MB)" for name, m in measured.items())
          + f" | buckets / bare x{ratios['buckets_over_bare_seconds']} time; buckets / before "
          f"x{ratios['buckets_over_before_seconds']} time, x{ratios['buckets_over_before_driver_rss']} driver RSS")
    write_json(Path(a.out) / "train_statistics.json",
               {"entities": a.entities, "buckets": a.buckets, "days": a.days, "runs": measured, "ratios": ratios,
                "entity_rows_mb": rows_mb, "measured": dt.datetime.now(dt.timezone.utc).isoformat()})


if __name__ == "__main__":
    main()
