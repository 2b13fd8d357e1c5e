"""Benchmark 3: backfill throughput, date by date against several dates per pass, in one run.

    python -m benchmarks.backfill [--entities 4] [--days 10] [--days-per-pass 7] [--num-cpus 2] [--out benchmarks/results]

Generates the synthetic fleet, trains one small model, then backfills the same dates twice into separate
output tables with the same model version: `--days-per-pass 1` (one read and one actor pool per date)
and `--days-per-pass N` (one read and one pool per N dates, each date still committed alone). Prints
seconds per date for both, their ratio, and checks that both wrote the same rows and scores.
"""
from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import polars as pl

from benchmarks.common import write_json
from dmafn.spec import load_spec
from dmafn.synthetic import SyntheticConfig
from pipelines.generate import write_synthetic
from pipelines.ray_runtime import ray_session
from pipelines.score import backfill
from pipelines.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=4)
    parser.add_argument("--days", type=int, default=10, help="days generated; the first 2 train the model")
    parser.add_argument("--days-per-pass", type=int, default=7)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray started for the run")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    cfg = SyntheticConfig(entities=args.entities, days=args.days, clean_days=2, image_size=16)
    first, last = cfg.start + dt.timedelta(days=cfg.clean_days), cfg.start + dt.timedelta(days=cfg.days - 1)
    n_dates = (last - first).days + 1
    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=args.num_cpus):
        spec = load_spec(write_synthetic(Path(tmp), cfg))
        spec = replace(spec, train=replace(spec.train, epochs=1))
        version = train(spec)
        timings, tables = {}, {}
        for per_pass in (1, args.days_per_pass):
            out = replace(spec, score=replace(spec.score, output=f"{tmp}/scores_{per_pass}"))
            start = time.perf_counter()
            results = backfill(out, first, last, version=version, days_per_pass=per_pass, parallel=1)
            timings[per_pass] = time.perf_counter() - start
            assert len(results) == n_dates, f"{len(results)} of {n_dates} dates scored"
            tables[per_pass] = pl.read_delta(out.score.output).sort("machine_id", "ts")
            print(f"{per_pass} date(s) per pass: {timings[per_pass]:7.1f} s for {n_dates} dates, "
                  f"{timings[per_pass] / n_dates:5.2f} s per date", flush=True)
        alone, together = tables[1], tables[args.days_per_pass]
        same_rows = alone.select("machine_id", "ts", "is_anomaly").equals(together.select("machine_id", "ts",
                                                                                           "is_anomaly"))
        max_diff = float((alone["score"] - together["score"]).abs().max())
    ratio = timings[1] / timings[args.days_per_pass]
    print(f"\nbackfill of {n_dates} dates x {args.entities} entities on {args.num_cpus} CPUs: "
          f"{args.days_per_pass} dates per pass is {ratio:.2f}x as fast as date by date "
          f"(same rows and alarms: {same_rows}; largest score difference {max_diff:.1e})")
    write_json(f"{args.out}/backfill.json", {"args": vars(args), "dates": n_dates, "seconds": timings,
                                             "speedup": ratio, "same_rows": same_rows, "max_score_diff": max_diff,
                                             "date": dt.date.today().isoformat()})


if __name__ == "__main__":
    main()
