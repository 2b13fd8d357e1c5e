"""Benchmark: `dmafn profile` as a day grows - the largest worker's memory, against a bare loop, in one run.

    python -m benchmarks.profile_day [--rows 2,8,32] [--rows-per-entity 250000] [--out benchmarks/results]

One modality of one date: 3-axis vibration (float32) of machines at their own rates (each ~`--rows-per-entity`
readings a day, so the fleet grows with the day), with gaps, repeated ticks and NaN; one Parquet file per 16
machines (row groups of 1 M rows); `--rows` millions of rows per day. For each size:
- `pipelines.profile.profile` on a local Ray (this machine's CPUs; this process is the driver), as `dmafn
  profile` runs it (shuffled partitions of `PARTITION_ROWS`, 2 M rows: 1, 4 and 16 partitions at the defaults);
- a bare loop of the same steps in one process, the shape `profile` had before 2026-12-02: every file of the
  day read into one frame, the same counts (`file_counts`' sums) and per-entity periods (`entity_periods`).
Checks both give the same row; prints seconds, the driver's peak RSS, the largest Ray worker's own peak memory
(its private pages outside the object store; beside it, the object store's pages only it has touched: objects
it wrote for the shuffle, held by the store - spilled to disk past its size - not by the task) and the bare
process's peak RSS, and how each grows with the day; `profile_day.json`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from benchmarks.common import write_json
from benchmarks.scale import run_sampled

DATE = dt.date(2024, 1, 1)
PER_FILE = 16


def spec_dict(root: Path) -> dict:
    return {"name": "profile-day", "entity": "machine_id", "time": "ts", "grain": "1min", "partition": "date",
            "modalities": {"vibration": {"kind": "timeseries", "path": str(root / "raw" / "vibration"),
                                         "columns": ["ax", "ay", "az"], "period": "1s", "window": "1min"}},
            "train": {"start": "2023-12-01", "end": "2023-12-02"},
            "registry": str(root / "models"), "score": {"output": str(root / "scores")}}


def write_day(root: Path, entities: int, rows: int, seed: int = 0, *, per_file: int = PER_FILE,
              row_group_rows: int = 1_000_000, by_time: bool = False) -> None:
    """`rows` rows of one date over `entities` machines, one file per `per_file` machines, its rows sorted by
    machine then time (`by_time`: by time, the machines interleaved)."""
    rng = np.random.default_rng(seed)
    folder = root / "raw" / "vibration" / f"date={DATE.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    rates = rng.uniform(1, 3, entities)
    counts = np.floor(rows * rates / rates.sum()).astype(int)
    t0 = int(dt.datetime(DATE.year, DATE.month, DATE.day, tzinfo=dt.timezone.utc).timestamp() * 1e6)
    for first in range(0, entities, per_file):
        frames = []
        for e in range(first, min(first + per_file, entities)):
            n = counts[e]
            step = 86_400e6 / n
            ts = t0 + (np.arange(n) * step + rng.uniform(0, step * 0.2, n)).astype(np.int64)
            ts[rng.choice(n, 2, replace=False)] = ts[0]                       # repeated ticks
            keep = np.ones(n, bool)
            for start in rng.choice(n - 20, 3, replace=False):                 # gaps of 10 readings
                keep[start:start + 10] = False
            values = rng.normal(size=(3, n)).astype(np.float32)
            values[0, rng.choice(n, 5, replace=False)] = np.nan                # nulls
            frames.append(pl.DataFrame({"machine_id": f"m-{e:05d}", "ts": np.sort(ts)[keep],
                                        "ax": values[0][keep], "ay": values[1][keep], "az": values[2][keep]}))
        day = pl.concat(frames).with_columns(pl.from_epoch("ts", "us").dt.replace_time_zone("UTC"))
        day = day.sort("ts") if by_time else day
        day.write_parquet(folder / f"part-{first // per_file:04d}.parquet", row_group_size=row_group_rows)


def on_ray(spec_path: str) -> None:
    from dmafn.spec import load_spec
    from pipelines.profile import profile
    from pipelines.ray_runtime import ray_session

    with ray_session(None, verbose=False):
        table = profile(load_spec(spec_path), DATE, DATE)
    print(json.dumps(table.row(0, named=True)))


def bare_loop(spec_path: str) -> None:
    """The same steps on the whole day in one frame, one process."""
    from dmafn.spec import load_spec
    from pipelines.align import to_micros
    from pipelines.profile import Columns, entity_periods, file_counts, modality_files
    from pipelines.storage import Storage

    spec = load_spec(spec_path)
    m = spec.modalities["vibration"]
    files = modality_files(spec, m, Storage(), [DATE])
    counts = [file_counts(f).iloc[0] for f in files]
    cols = Columns.of(spec, m)
    day = pl.concat([pl.read_parquet(f.path, columns=cols.key_and_time + list(cols.values)) for f in files])
    per_entity = entity_periods(day.select(*cols.keys, to_micros(pl.col(cols.time)).alias("_us")), list(cols.keys))
    row = {"modality": m.name, "date": DATE.isoformat(), "rows": int(sum(c["rows"] for c in counts)),
           "entities": per_entity.height, "median_period_s": per_entity["period_s"].median(),
           "gaps": int(per_entity["gaps"].sum()), "nulls": int(sum(c["nulls"] for c in counts)),
           "duplicate_keys": int(per_entity["duplicate_keys"].sum()),
           "outside_partition": int(sum(c["outside_partition"] for c in counts))}
    print(json.dumps(row))


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="2,8,32", help="millions of rows per day, comma-separated")
    parser.add_argument("--rows-per-entity", type=int, default=250_000)
    parser.add_argument("--out", default="benchmarks/results")
    a = parser.parse_args()
    results = []
    for millions in [float(r) for r in a.rows.split(",")]:
        rows = int(millions * 1e6)
        entities = max(1, rows // a.rows_per_entity)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_day(root, entities, rows)
            spec_path = root / "spec.yaml"
            spec_path.write_text(yaml.safe_dump(spec_dict(root)))
            disk = sum(p.stat().st_size for p in (root / "raw").rglob("*.parquet"))
            secs, ray_memory, out = run_sampled(
                ["-c", "import sys; from benchmarks.profile_day import on_ray; on_ray(*sys.argv[1:])",
                 str(spec_path)], private=True)
            bare_secs, bare_memory, bare_out = run_sampled(
                ["-c", "import sys; from benchmarks.profile_day import bare_loop; bare_loop(*sys.argv[1:])",
                 str(spec_path)])
            got, want = _last_json(out), _last_json(bare_out)
            same = all(got[k] == want[k] for k in want if k != "median_period_s")
            if not same or abs(got["median_period_s"] - want["median_period_s"]) > 1e-9:
                raise SystemExit(f"{millions} M rows: the profile differs from the bare loop's: {got} vs {want}")
            row = {"rows": got["rows"], "entities": entities, "parquet_mb": disk / 1e6, "profile_s": secs,
                   "driver_peak_rss_mb": ray_memory.driver / 1e6,
                   "largest_worker_peak_own_mb": ray_memory.worker_own / 1e6,
                   "largest_worker_peak_object_store_mb": ray_memory.worker_store / 1e6,
                   "bare_s": bare_secs, "bare_peak_rss_mb": bare_memory.driver / 1e6, "profile": got}
            results.append(row)
            print(f"{row['rows']:>10} rows, {entities:>4} entities ({row['parquet_mb']:5.0f} MB of Parquet): "
                  f"profile on Ray {secs:6.1f} s, driver {row['driver_peak_rss_mb']:5.0f} MB, largest worker "
                  f"{row['largest_worker_peak_own_mb']:5.0f} MB (+ object store "
                  f"{row['largest_worker_peak_object_store_mb']:4.0f} MB) | bare "
                  f"loop, the day in one frame {bare_secs:6.1f} s {row['bare_peak_rss_mb']:5.0f} MB | time ratio "
                  f"{secs / bare_secs:.2f} (same profile)", flush=True)
    first, last = results[0], results[-1]
    growth = {k: last[k] / first[k] for k in ("driver_peak_rss_mb", "largest_worker_peak_own_mb", "bare_peak_rss_mb")}
    print(f"day x{last['rows'] / first['rows']:.0f}: peak RSS of the driver x{growth['driver_peak_rss_mb']:.2f}, the "
          f"largest worker's own peak x{growth['largest_worker_peak_own_mb']:.2f}, peak RSS of the bare loop "
          f"x{growth['bare_peak_rss_mb']:.2f}")
    write_json(Path(a.out) / "profile_day.json", {"rows_per_entity": a.rows_per_entity, "sizes": results,
                                                   "growth": growth,
                                                   "measured": dt.datetime.now().isoformat(timespec="minutes")})


if __name__ == "__main__":
    main()
