"""Benchmark: what an entity bucket of a big date reads - row groups pruned by their entity statistics against
every bucket reading every row group (how shards read before 2026-12-02), in one run.

    python -m benchmarks.shard_reads [--rows 16] [--rows-per-entity 250000] [--out benchmarks/results]

One date of 3-axis vibration (`benchmarks.profile_day.write_day`: ~`--rows-per-entity` rows per machine) in three
layouts: a file per machine; files of 16 machines sorted by machine (row groups of 100,000 rows); files of 16
machines sorted by time (every row group holds all 16: nothing can be pruned). The date is cut into entity
buckets as `dmafn backfill` cuts it (`plan_shards`, 64 MB of Parquet per shard), and every bucket is read in this
process by `pipelines.ingest.read_shard` (pyarrow read, checks, bucket filter): as it reads now, and with every
row group read (`row_groups_in_bucket` answering "all"), two turns each, alternating (the faster of each is
kept: the first turn warms the page cache), checking both give the same rows. Prints the seconds of each, their
ratio and the row groups read; `shard_reads.json`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import polars as pl
import yaml

from benchmarks.common import write_json
from benchmarks.profile_day import DATE, spec_dict, write_day

LAYOUTS = {"a file per machine": {"per_file": 1, "row_group_rows": 1_000_000},
           "16 machines a file, by machine": {"per_file": 16, "row_group_rows": 100_000},
           "16 machines a file, by time": {"per_file": 16, "row_group_rows": 100_000, "by_time": True}}


def read_every_bucket(spec, shards, prune: bool) -> tuple[float, int, list[pl.DataFrame]]:
    """Seconds to read every shard, row groups read, each shard's usable rows (sorted)."""
    import pipelines.ingest as ingest
    from pipelines.storage import Storage

    pruning, read_columns, groups = ingest.row_groups_in_bucket, ingest.read_columns, [0]

    def counting(parquet, path, columns, row_groups=None):
        groups[0] += parquet.metadata.num_row_groups if row_groups is None else len(row_groups)
        return read_columns(parquet, path, columns, row_groups)

    ingest.read_columns = counting
    ingest.row_groups_in_bucket = pruning if prune else (lambda *a: None)
    try:
        started = time.perf_counter()
        tables = [ingest.read_shard(s, spec, Storage()).tables.get("vibration") for s in shards]
        seconds = time.perf_counter() - started
    finally:
        ingest.row_groups_in_bucket, ingest.read_columns = pruning, read_columns
    return seconds, groups[0], [t.sort(["machine_id", "_t"]) if t is not None else None for t in tables]


def main() -> None:
    from dmafn.spec import load_spec
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=float, default=16, help="millions of rows in the date")
    parser.add_argument("--rows-per-entity", type=int, default=250_000)
    parser.add_argument("--out", default="benchmarks/results")
    a = parser.parse_args()
    rows = int(a.rows * 1e6)
    entities = max(1, rows // a.rows_per_entity)
    results = {}
    for name, layout in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_day(root, entities, rows, **layout)
            (root / "spec.yaml").write_text(yaml.safe_dump(spec_dict(root)))
            spec = load_spec(root / "spec.yaml")
            shards = plan_shards(spec, [DATE], list_inputs(spec, [DATE], Storage()))
            # the look-back day has no files: every file read is the date's own
            turns = [read_every_bucket(spec, shards, prune) for prune in (False, True, False, True)]
            whole_s, whole_groups, whole = min(turns[0::2], key=lambda t: t[0])
            pruned_s, pruned_groups, pruned = min(turns[1::2], key=lambda t: t[0])
            if any((p is None) != (w is None) or (p is not None and not p.equals(w)) for p, w in zip(pruned, whole)):
                raise SystemExit(f"{name}: a bucket's rows differ when its row groups are pruned")
            parquet_mb = sum(p.stat().st_size for p in (root / "raw").rglob("*.parquet")) / 1e6
            results[name] = {"rows": sum(t.height for t in pruned if t is not None), "entities": entities,
                             "parquet_mb": parquet_mb, "buckets": shards[0].buckets, "pruned_s": pruned_s,
                             "pruned_row_groups_read": pruned_groups, "every_row_group_s": whole_s,
                             "every_row_group_read": whole_groups, "ratio": pruned_s / whole_s}
            r = results[name]
            print(f"{name:<32} {r['rows']:>10} rows, {parquet_mb:5.0f} MB, {r['buckets']} buckets: pruned "
                  f"{pruned_s:6.1f} s ({pruned_groups} row groups read) | every row group {whole_s:6.1f} s "
                  f"({whole_groups}) | time ratio {r['ratio']:.2f} (same rows)", flush=True)
    write_json(Path(a.out) / "shard_reads.json", {"layouts": results,
                                                  "measured": dt.datetime.now().isoformat(timespec="minutes")})


if __name__ == "__main__":
    main()
