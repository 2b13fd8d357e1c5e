"""Benchmark: what the entity buckets of a big date read - every bucket reading every row group (how shards read
before 2026-12-02), row groups pruned by their entity statistics, and staged (row groups of several machines
split by bucket once, `pipelines.staging`, then pruned reads), in one run.

    python -m benchmarks.shard_reads [--rows 16] [--rows-per-entity 250000] [--shard-mb 64] [--out DIR]

One date of 3-axis vibration (`benchmarks.profile_day.write_day`: ~`--rows-per-entity` rows per machine) in three
layouts: a file per machine; files of 16 machines sorted by machine (row groups of 100,000 rows); files of 16
machines sorted by time (every row group holds all 16: nothing can be pruned - an hourly file landed from a
stream looks like this). The date is cut into entity buckets as `dmafn backfill` cuts it (`plan_shards`,
`--shard-mb` of Parquet per shard), and every bucket is read in this process by `pipelines.ingest.read_shard`
(pyarrow read a row group at a time, checks, bucket filter): the bare loop of the same steps. Staged, each file
is first split in this process (`pipelines.staging.split_file`, writing its pieces to a temporary folder; the
split's time is counted) and each bucket reads its pieces. Two turns of each way, alternating (the faster is
kept: the first turn warms the page cache), checking all three give the same rows. Prints seconds, ratios to
every-row-group and the row groups read (by the split too); `shard_reads[_<shard-mb>mb].json`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
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
WAYS = ("every row group", "pruned", "staged")


def read_every_bucket(spec, shards, way: str, stage: Path) -> tuple[float, int, list[pl.DataFrame | None]]:
    """Seconds to read every shard `way`, row groups read (the split's included), each shard's rows (sorted)."""
    import pipelines.ingest as ingest
    import pipelines.parquet_files as parquet_files
    from pipelines.staging import split_file, with_pieces
    from pipelines.storage import Storage

    pruning, read_columns, groups = ingest.row_groups_in_bucket, parquet_files.read_columns, [0]

    def counting(parquet, path, columns, row_groups=None, filesystem=None):
        groups[0] += parquet.metadata.num_row_groups if row_groups is None else len(row_groups)
        return read_columns(parquet, path, columns, row_groups, filesystem)

    parquet_files.read_columns = counting
    ingest.row_groups_in_bucket = (lambda *a: None) if way == "every row group" else pruning
    try:
        started = time.perf_counter()
        if way == "staged":
            own = sorted({f for s in shards for f in s.files if f.date == DATE}, key=lambda f: f.path)
            splits = [split_file(f, spec, Storage(), shards[0].buckets, str(stage / str(i)))
                      for i, f in enumerate(own)]
            shards = [with_pieces(s, splits) for s in shards]
        tables = [ingest.read_shard(s, spec, Storage()).tables.get("vibration") for s in shards]
        seconds = time.perf_counter() - started
    finally:
        ingest.row_groups_in_bucket, parquet_files.read_columns = pruning, read_columns
        shutil.rmtree(stage, ignore_errors=True)
    # all columns: a machine's repeated ticks come in another order when pieces follow a file's kept row groups
    return seconds, groups[0], [t.sort(t.columns) if t is not None else None for t in tables]


def main() -> None:
    from dmafn.spec import load_spec
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=float, default=16, help="millions of rows in the date")
    parser.add_argument("--rows-per-entity", type=int, default=250_000)
    parser.add_argument("--shard-mb", type=float, default=64, help="Parquet MB per shard (dmafn backfill --shard-mb)")
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
            shards = plan_shards(spec, [DATE], list_inputs(spec, [DATE], Storage()),
                                 shard_bytes=int(a.shard_mb * 1e6))
            # the look-back day has no files: every file read is the date's own
            turns: dict[str, list] = {way: [] for way in WAYS}
            for _ in range(2):
                for way in WAYS:
                    turns[way].append(read_every_bucket(spec, shards, way, root / "stage"))
            best = {way: min(t, key=lambda turn: turn[0]) for way, t in turns.items()}
            whole = best["every row group"][2]
            for way in ("pruned", "staged"):
                if any((p is None) != (w is None) or (p is not None and not p.equals(w))
                       for p, w in zip(best[way][2], whole)):
                    raise SystemExit(f"{name}: a bucket's rows differ when read {way}")
            parquet_mb = sum(p.stat().st_size for p in (root / "raw").rglob("*.parquet")) / 1e6
            every_s = best["every row group"][0]
            r = results[name] = {"rows": sum(t.height for t in whole if t is not None), "entities": entities,
                                 "parquet_mb": parquet_mb, "buckets": shards[0].buckets,
                                 **{f"{way.replace(' ', '_')}_s": best[way][0] for way in WAYS},
                                 **{f"{way.replace(' ', '_')}_row_groups_read": best[way][1] for way in WAYS},
                                 "pruned_ratio": best["pruned"][0] / every_s,
                                 "staged_ratio": best["staged"][0] / every_s}
            print(f"{name:<32} {r['rows']:>10} rows, {parquet_mb:5.0f} MB, {r['buckets']} buckets: "
                  + " | ".join(f"{way} {best[way][0]:6.1f} s ({best[way][1]} row groups read)" for way in WAYS)
                  + f" | ratios to every row group: pruned {r['pruned_ratio']:.2f}, staged {r['staged_ratio']:.2f}"
                  " (same rows)", flush=True)
    suffix = "" if a.shard_mb == 64 else f"_{a.shard_mb:g}mb"
    write_json(Path(a.out) / f"shard_reads{suffix}.json",
               {"layouts": results, "shard_mb": a.shard_mb, "measured": dt.datetime.now().isoformat(timespec="minutes")})


if __name__ == "__main__":
    main()
