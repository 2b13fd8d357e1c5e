"""Benchmark: a model version's per-entity statistics for a large fleet - the scoring driver's load and cut.

    python -m benchmarks.entity_statistics [--entities 100000] [--buckets 64,512] [--out benchmarks/results]

Statistics are fitted on a small generated fleet (the demo's modalities: normalisation, the process context's
relations and ranges), then every per-entity part is repeated for `--entities` machines. Two versions are saved
in a temporary registry: as `Registry.save` writes them now (the fleet's part in `manifest.json`, one row per
entity in `entity_statistics.parquet`) and as versions were written before 2026-12-02 (every entity inside the
manifest). Each way is measured in its own process (seconds, peak RSS sampled twice a second) doing what a
scoring job's driver does before its shards run: load the version, then cut the statistics into one copy per
entity bucket and serialise each (what `ray.put` does):
- `registry`: `Registry.load` + `ModelVersion.statistics.for_keys` per bucket, as
  `pipelines.statistics.BucketStatistics`;
- `bare`: a bare loop of the same steps on the same files - read the Parquet, group the rows by bucket, make
  each bucket's rows Python objects and fill the fleet's empty mappings by hand;
- `before`: the old layout and the old cut - parse the whole manifest, then for each bucket filter every
  per-entity mapping by each key's bucket.
Checks that all three give the same statistics for every bucket; prints sizes, seconds, peak RSS and the
ratios; `entity_statistics.json`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from benchmarks.common import write_json
from benchmarks.scale import run_python


def fitted_statistics() -> tuple[dict[str, Any], dict[str, Any]]:
    """The demo spec (as a dict) and statistics fitted on two of its machines' first day."""
    import polars as pl

    from dmafn.features import StatisticsFitter
    from dmafn.spec import parse_spec
    from dmafn.synthetic import SyntheticConfig, generate, synthetic_spec
    from pipelines.align import align, alignment_input, make_ticks

    cfg = SyntheticConfig(entities=2, days=1, clean_days=1, seed=3)
    data, spec_dict = generate(cfg), synthetic_spec("/unused", cfg)
    spec = parse_spec(spec_dict)
    tables = {m: alignment_input(pl.from_arrow(data.tables[ms.context_of or m]), spec, ms)
              for m, ms in spec.modalities.items()}
    ents = pl.DataFrame({"machine_id": ["pump-00", "pump-01"]})
    aligned = align(make_ticks(ents, cfg.start, spec.grain_us), tables, spec).sort(["machine_id", "_t"])
    return spec_dict, StatisticsFitter(spec).add(aligned.to_arrow()).result()


def fleet_statistics(entities: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec and statistics with `entities` machines: pump-00's per-entity parts for each, every number moved
    by a random 0.1 % (machines differ, so the files compress as real ones do; no two share an object)."""
    import numpy as np

    from dmafn.features import join_entity_statistics, split_entity_statistics

    spec_dict, stats = fitted_statistics()
    fleet, parts = split_entity_statistics(stats)
    rng = np.random.default_rng(0)

    def moved(value: Any) -> Any:
        if isinstance(value, float):
            return value * (1.0 + 1e-3 * float(rng.standard_normal()))
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        return value

    one = parts["pump-00"]
    return spec_dict, join_entity_statistics(fleet, ((f"pump-{i:06d}", moved(one)) for i in range(entities)))


def save_versions(root: Path, entities: int) -> dict[str, Any]:
    """Two versions under `root`: `now` (Registry.save) and `before` (every entity inside the manifest)."""
    from dmafn.model import ModelConfig, build_model
    from dmafn.spec import parse_spec
    from pipelines.registry import MANIFEST_SHA256, Registry
    from pipelines.storage import Storage

    spec_dict, stats = fleet_statistics(entities)
    spec = parse_spec(spec_dict)
    model = build_model(spec.modalities, ModelConfig(fusion="attention", detector="autoencoder"))
    manifest = {"spec": spec.to_dict(), "statistics": stats, "calibration": {}}
    registry = Registry(str(root / "now"), Storage())
    now = registry.save(model, manifest)
    folder = root / "now" / now
    old = json.loads((folder / "manifest.json").read_text())
    del old["entity_statistics"]
    old["statistics"] = stats
    body = json.dumps(old, indent=2, default=str).encode()
    before = root / "before" / now
    before.mkdir(parents=True)
    (before / "weights.pt").write_bytes((folder / "weights.pt").read_bytes())
    (before / "manifest.json").write_bytes(body)
    (before / MANIFEST_SHA256).write_text(hashlib.sha256(body).hexdigest())
    (root / "before" / "LATEST").write_text(now)
    return {"version": now, "manifest_mb": round((folder / "manifest.json").stat().st_size / 1e6, 2),
            "entity_file_mb": round((folder / "entity_statistics.parquet").stat().st_size / 1e6, 2),
            "before_manifest_mb": round(len(body) / 1e6, 1)}


def serialised(cuts: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Each bucket's statistics pickled as it comes (as `ray.put` would), then let go; their bytes in all and a
    digest of each."""
    size, digests = 0, []
    for cut in cuts:
        size += len(pickle.dumps(cut))
        digests.append(hashlib.sha256(json.dumps(cut, sort_keys=True).encode()).hexdigest()[:16])
    return {"bytes": size, "digests": digests}


def run_registry(root: Path, buckets: int) -> dict[str, Any]:
    from pipelines.registry import Registry
    from pipelines.shards import bucket_of
    from pipelines.storage import Storage

    mv = Registry(str(root / "now"), Storage()).load(build=False)
    members: dict[int, list[str]] = {}
    for key in mv.statistics.keys():
        members.setdefault(bucket_of(key, buckets), []).append(key)
    return serialised(mv.statistics.for_keys(members.get(b, [])) for b in range(buckets))


def run_bare(root: Path, buckets: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from pipelines.shards import bucket_of

    version = (root / "now" / "LATEST").read_text()
    manifest = json.loads((root / "now" / version / "manifest.json").read_text())
    table = pq.read_table(root / "now" / version / "entity_statistics.parquet")
    assert table.schema.metadata[b"dmafn.json_columns"] == b"[]"          # every place in Arrow's own types
    grouped: dict[int, list[int]] = {}
    for i, key in enumerate(table.column("key").to_pylist()):
        grouped.setdefault(bucket_of(key, buckets), []).append(i)
    def cuts() -> Iterator[dict[str, Any]]:
        for b in range(buckets):
            rows = table.take(grouped.get(b, [])).to_pydict()
            by_place = {place: {key: value for key, value in zip(rows["key"], values) if value is not None}
                        for place, values in rows.items() if place != "key"}
            cut = json.loads(json.dumps(manifest["statistics"]))          # a fresh copy of the fleet's part
            for where, mapping in by_place.items():
                node: Any = cut
                for step in where.split("/"):
                    node = node[int(step)] if isinstance(node, list) else node[step]
                node.update(mapping)
            yield cut

    return serialised(cuts())


def run_before(root: Path, buckets: int) -> dict[str, Any]:
    from pipelines.shards import bucket_of

    version = (root / "before" / "LATEST").read_text()
    stats = json.loads((root / "before" / version / "manifest.json").read_text())["statistics"]

    def cut(keep):                         # the per-bucket filter scoring used before (every map, every key)
        def only(mapping):
            return {k: v for k, v in mapping.items() if keep(k)}
        modalities = {n: {**e, "entity": only(e["entity"])} if "entity" in e else e
                      for n, e in stats["modalities"].items()}
        relations = {}
        for ctx, fitted in stats.get("relations", {}).items():
            fitted = dict(fitted)
            for key in ("channels", "cross_channels", "peer_channels"):
                if fitted.get(key) is not None:
                    fitted[key] = [None if ch is None else
                                   {**ch, "entity_intercepts": only(ch["entity_intercepts"]),
                                    **({"entity_ranges": only(ch["entity_ranges"])} if "entity_ranges" in ch else {})}
                                   for ch in fitted[key]]
            for key in ("ranges", "cross_ranges"):
                if fitted.get(key):
                    fitted[key] = {**fitted[key], "entities": only(fitted[key]["entities"])}
            relations[ctx] = fitted
        return {**stats, "modalities": modalities, **({"relations": relations} if "relations" in stats else {})}

    return serialised(cut(lambda k, b=b: bucket_of(k, buckets) == b) for b in range(buckets))


RUNS = {"registry": run_registry, "bare": run_bare, "before": run_before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entities", type=int, default=100_000)
    ap.add_argument("--buckets", default="64,512", help="bucket counts, comma-separated: one row each")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--run", choices=tuple(RUNS), help=argparse.SUPPRESS)     # one measured process
    ap.add_argument("--root", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run:
        print("RESULT " + json.dumps(RUNS[a.run](Path(a.root), int(a.buckets))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sizes = save_versions(Path(tmp), a.entities)
        print(f"{a.entities:,} entities: manifest {sizes['manifest_mb']} MB + entity file {sizes['entity_file_mb']} "
              f"MB (before: manifest {sizes['before_manifest_mb']} MB)", flush=True)
        for buckets in [int(b) for b in a.buckets.split(",")]:
            measured = {}
            for run in RUNS:
                secs, rss, _, out = run_python(["-m", "benchmarks.entity_statistics", "--run", run, "--root", tmp,
                                                "--buckets", str(buckets)])
                result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
                measured[run] = {"seconds": round(secs, 2), "peak_rss_mb": round(rss / 2**20), **result}
            digests = {run: m.pop("digests") for run, m in measured.items()}
            if not digests["registry"] == digests["bare"] == digests["before"]:
                sys.exit(f"{buckets} buckets: the three ways cut different statistics")
            r, b, o = measured["registry"], measured["bare"], measured["before"]
            ratios = {"registry_over_bare_seconds": round(r["seconds"] / b["seconds"], 2),
                      "registry_over_before_seconds": round(r["seconds"] / o["seconds"], 3),
                      "registry_over_before_rss": round(r["peak_rss_mb"] / o["peak_rss_mb"], 2)}
            rows.append({"buckets": buckets, "runs": measured, "ratios": ratios})
            print(f"{buckets} buckets ({r['bytes'] / 1e6:.1f} MB pickled in all, the same statistics each way): "
                  + "; ".join(f"{name} {m['seconds']:.1f} s, {m['peak_rss_mb']} MB" for name, m in measured.items())
                  + f" | registry / bare x{ratios['registry_over_bare_seconds']} time; registry / before "
                  f"x{ratios['registry_over_before_seconds']} time, x{ratios['registry_over_before_rss']} peak RSS",
                  flush=True)
    write_json(Path(a.out) / "entity_statistics.json",
               {"entities": a.entities, "sizes": sizes, "rows": rows,
                "measured": dt.datetime.now(dt.timezone.utc).isoformat()})


if __name__ == "__main__":
    main()
