"""Benchmark: a shard's reader on a file whose writer put a whole day in one row group - read in parts of about
`PART_BYTES` through a buffered stream (`pipelines.parquet_files.each_row_group`), against a bare loop of the same
steps that reads the whole row group at once (how every row group was read before 2026-12-04), in one run.

    python -m benchmarks.row_group_reads [--rows 8] [--buckets 4] [--out benchmarks/results]

One date of 3-axis vibration (`benchmarks.profile_day.write_day`) of 16 machines, `--rows` million rows in one
file with one row group. Each of `--buckets` entity buckets is read by `pipelines.ingest.read_shard` (the check,
the bucket filter, the rows kept) in a process of its own, twice: as the jobs read it, and with `PART_BYTES` set
beyond the row group (the bare loop: the same steps, the row group read whole); two turns of each way, alternating
(the faster kept). Prints, per way, the seconds summed over the buckets, the largest Arrow allocation peak and peak
RSS of a bucket's process, their ratios, and checks both keep the same rows (row digests alike);
`row_group_reads[_<buckets>].json`.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import write_json
from benchmarks.profile_day import DATE, spec_dict, write_day

WAYS = {"in parts (as the jobs read)": None, "whole row group (bare loop)": 10**18}
TURNS = 2


def child(root: Path, bucket: int, buckets: int, part_bytes: int | None) -> dict:
    """One bucket's read in this process: seconds, the Arrow pool's peak, peak RSS, rows kept and their digest."""
    import pyarrow as pa

    import pipelines.parquet_files as parquet_files
    from dmafn.spec import load_spec
    from pipelines.ingest import read_shard
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage

    if part_bytes is not None:
        parquet_files.PART_BYTES = part_bytes
    spec = load_spec(root / "spec.yaml")
    files = list_inputs(spec, [DATE], Storage())
    size = sum(f.size for f in files if f.date == DATE)
    shards = plan_shards(spec, [DATE], files, shard_bytes=-(-size // buckets))
    shard = next(s for s in shards if s.bucket == bucket)
    started = time.perf_counter()
    inputs = read_shard(shard, spec, Storage())
    seconds = time.perf_counter() - started
    digest = inputs.row_digests.get(DATE.isoformat(), {}).get("vibration")
    return {"seconds": seconds, "arrow_peak_mb": pa.default_memory_pool().max_memory() / 1e6,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
            "rows": inputs.tables["vibration"].height if "vibration" in inputs.tables else 0,
            "digest": None if digest is None else digest.to_dict(), "buckets": shard.buckets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=float, default=8, help="millions of rows in the one row group")
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=4, metavar=("ROOT", "BUCKET", "BUCKETS", "PART_BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, bucket, buckets, part = args.child
        print(json.dumps(child(Path(root), int(bucket), int(buckets), None if part == "none" else int(part))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = int(args.rows * 1e6)
        write_day(root, 16, rows, per_file=16, row_group_rows=rows)
        (root / "spec.yaml").write_text(yaml.safe_dump(spec_dict(root)))
        results = {}
        for turn in range(TURNS):                   # alternating; the faster turn kept (the first warms the cache)
            for way, part in WAYS.items():
                runs = []
                for bucket in range(args.buckets):
                    out = subprocess.run([sys.executable, "-m", "benchmarks.row_group_reads", "--child", str(root),
                                          str(bucket), str(args.buckets), "none" if part is None else str(part)],
                                         check=True, capture_output=True, text=True).stdout
                    runs.append(json.loads(out.strip().splitlines()[-1]))
                seconds = sum(r["seconds"] for r in runs)
                if way not in results or seconds < results[way]["seconds"]:
                    results[way] = {"seconds": seconds, "arrow_peak_mb": max(r["arrow_peak_mb"] for r in runs),
                                    "rss_peak_mb": max(r["rss_peak_mb"] for r in runs),
                                    "rows": [r["rows"] for r in runs], "digests": [r["digest"] for r in runs],
                                    "buckets": runs[0]["buckets"]}
    ours, bare = results.values()
    assert ours["rows"] == bare["rows"] and ours["digests"] == bare["digests"], "the two ways kept other rows"
    print(f"one date, {args.rows:g} M rows of vibration in one row group, read as {ours['buckets']} entity buckets "
          f"(a process each; rows kept per bucket {ours['rows']})")
    for way, r in results.items():
        print(f"  {way:30s} {r['seconds']:7.2f} s  Arrow peak {r['arrow_peak_mb']:8.1f} MB  peak RSS "
              f"{r['rss_peak_mb']:8.1f} MB")
    ratios = {"seconds": ours["seconds"] / bare["seconds"], "arrow_peak": ours["arrow_peak_mb"] / bare["arrow_peak_mb"],
              "rss_peak": ours["rss_peak_mb"] / bare["rss_peak_mb"]}
    print("  ratios, in parts / whole: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.out:
        name = "row_group_reads.json" if args.buckets == 4 else f"row_group_reads_{args.buckets}.json"
        write_json(args.out / name, {"rows_millions": args.rows, "buckets": ours["buckets"],
                                                      "ways": {w: {k: v for k, v in r.items() if k != "digests"}
                                                               for w, r in results.items()}, "ratios": ratios})


if __name__ == "__main__":
    main()
