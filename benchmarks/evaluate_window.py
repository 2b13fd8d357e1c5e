"""Benchmark: `dmafn evaluate` over longer and longer windows - memory bounded by a date, not by the window.

    python -m benchmarks.evaluate_window [--entities 16] [--days 4,32,128] [--out benchmarks/results]

Writes a scored-output Delta table of the pipeline's schema (one date partition per day, a tick a minute per
entity; the fused score and four contributions: noise, raised inside labelled events of four kinds) and its
labels, then for each window length runs, each in its own process and sampled twice a second for peak RSS:
- `dmafn evaluate` through the CLI: a local Ray, each date read and tallied by tasks (`pipelines.evaluate_tasks`);
  peak RSS of the driver and of the largest Ray worker;
- `evaluate` called without Ray: a date at a time, twice, in one process (`pipelines.evaluate.MetricsTally`);
- a bare loop of the same steps on the whole window in one process: read every date at once, attach the
  labels, the same metrics, alarm rates and detection on the whole arrays (how `evaluate` worked before);
- `dmafn report` through the CLI (the page: the same metrics, curves, the 4 busiest entities' timelines, the
  top alarm events; a date at a time, twice, on the same tasks as `evaluate`; peak RSS of its driver).
Checks all three give the same metrics and prints seconds and peak RSS of each and their ratios; writes
`evaluate_window.json`. No model is trained: the scores are made up, what is measured is the evaluation.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from benchmarks.common import write_json
from benchmarks.scale import run_python

FIRST = dt.date(2024, 1, 1)
MODALITIES = ("process", "vibration", "camera", "logs")
KINDS = ("process", "vibration", "camera", "logs")       # each kind raises its modality's contribution


def spec_dict(root: Path) -> dict:
    """A spec whose scored output and labels are the made-up ones (the inputs are never read)."""
    return {"name": "evaluate-window", "entity": "machine_id", "time": "ts", "grain": "1min", "partition": "date",
            "modalities": {m: {"kind": "tabular", "path": str(root / "raw" / m), "columns": ["x"],
                               "tolerance": "2min"} for m in MODALITIES},
            "labels": {"path": str(root / "labels"), "start": "start_ts", "end": "end_ts"},
            "train": {"start": "2023-12-01", "end": "2023-12-02"},
            "registry": str(root / "models"), "score": {"output": str(root / "scores")}}


def write_window(root: Path, entities: int, days: int, seed: int = 0) -> int:
    """The scored table and labels of `days` dates from FIRST; returns the number of ticks."""
    from deltalake import write_deltalake

    rng = np.random.default_rng(seed)
    names = [f"pump-{i:03d}" for i in range(entities)]
    labels, ticks = [], 0
    for day in range(days):
        date = FIRST + dt.timedelta(days=day)
        t0 = np.datetime64(date.isoformat(), "us")
        minutes = np.arange(1440)
        frames = []
        for name in names:
            contrib = rng.gamma(2.0, 0.25, (4, 1440))
            kind = np.full(1440, -1)
            for start in rng.choice(1380, 3, replace=False):   # three events a day, 10-60 minutes
                length, k = int(rng.integers(10, 60)), int(rng.integers(0, 4))
                ramp = np.linspace(0.2, 2.0, min(length, 1440 - start))
                contrib[k, start:start + ramp.size] += ramp
                kind[start:start + ramp.size] = k
                labels.append({"machine_id": name, "start_ts": int((t0 + np.timedelta64(int(start), "m")).astype(int)),
                               "end_ts": int((t0 + np.timedelta64(int(start + ramp.size - 1), "m")).astype(int)),
                               "kind": KINDS[k]})
            score = contrib.max(axis=0) + 0.1 * rng.normal(size=1440)
            frames.append(pl.DataFrame({
                "machine_id": name, "ts": (t0 + minutes.astype("timedelta64[m]")).astype("datetime64[us]"),
                "date": date.isoformat(), "score": score, "threshold": 1.6, "is_anomaly": score > 1.6,
                **{f"score_{m}": contrib[i] for i, m in enumerate(MODALITIES)},
                "model_version": "v-made-up"}).with_columns(pl.col("ts").dt.replace_time_zone("UTC")))
        day_rows = pl.concat(frames)
        ticks += day_rows.height
        write_deltalake(str(root / "scores"), day_rows.to_arrow(), mode="append", partition_by=["date"])
    (root / "labels").mkdir(parents=True, exist_ok=True)
    pl.DataFrame(labels).with_columns(pl.from_epoch(c, "us").dt.replace_time_zone("UTC") for c in ("start_ts", "end_ts")).write_parquet(
        root / "labels" / "part-0.parquet")
    return ticks


def whole_window(spec_path: str, start: str, end: str) -> dict:
    """The bare loop: the same metrics on the whole window read at once."""
    from dmafn.spec import load_spec
    from pipelines.align import TIME, label_ticks, to_micros
    from pipelines.evaluate import alarm_rates, detection, metrics_table
    from pipelines.labels import read_labels
    from pipelines.storage import Storage

    spec, storage = load_spec(spec_path), Storage()
    labels = read_labels(spec, storage)
    scores = pl.read_delta(spec.score.output).filter(pl.col("date").is_between(pl.lit(start), pl.lit(end)))
    df = label_ticks(scores.with_columns(to_micros(pl.col("ts")).alias(TIME)), labels, spec, spec.labels.start,
                     spec.labels.end).sort([*spec.entity, "ts"])
    result = metrics_table(df, spec) | alarm_rates(df, spec, storage)
    result["detection"] = detection(df, labels, spec)
    return result


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9
    return a == b


def one_process(spec_path: str, start: str, end: str, out: str) -> None:
    """`evaluate` without Ray: a date at a time in this process (as a Python caller without Ray gets it)."""
    import datetime as dt_

    from dmafn.spec import load_spec
    from pipelines.evaluate import evaluate

    evaluate(load_spec(spec_path), start=dt_.date.fromisoformat(start), end=dt_.date.fromisoformat(end),
             report_dir=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=16)
    parser.add_argument("--days", default="4,32,128", help="window lengths in dates, comma-separated")
    parser.add_argument("--out", default="benchmarks/results")
    a = parser.parse_args()
    lengths = [int(d) for d in a.days.split(",")]
    rows = []
    keys = ("overall", "by_kind", "detection", "alarm_rate", "false_alarm_rate", "false_alarm_rate_clear")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ticks_all = write_window(root, a.entities, max(lengths))
        spec_path = root / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec_dict(root)))
        print(f"{a.entities} entities x {max(lengths)} dates: {ticks_all} scored ticks written")
        for days in lengths:
            start, end = FIRST.isoformat(), (FIRST + dt.timedelta(days=days - 1)).isoformat()
            out = root / f"eval-{days}"
            secs, peak, worker, _ = run_python(["-m", "jobs.cli", "evaluate", str(spec_path), "--start", start,
                                                "--end", end, "--report", str(out / "tasks"), "-q"])
            here_secs, here_peak, _, _ = run_python(
                ["-c", "import sys; from benchmarks.evaluate_window import one_process; one_process(*sys.argv[1:])",
                 str(spec_path), start, end, str(out / "here")])
            report_secs, report_peak, _, _ = run_python(["-m", "jobs.cli", "report", str(spec_path), "--start", start,
                                                        "--end", end, "--out", str(out / "report.html"), "-q"])
            code = ("import json, sys; from benchmarks.evaluate_window import whole_window; "
                    "print(json.dumps(whole_window(*sys.argv[1:]), default=float))")
            bare_secs, bare_peak, _, text = run_python(["-c", code, str(spec_path), start, end])
            whole = json.loads(text.strip().splitlines()[-1])
            for way in ("tasks", "here"):
                got = json.loads((out / way / "metrics.json").read_text())
                if not all(same(got[k], whole[k]) for k in keys):
                    raise SystemExit(f"{days} dates: the metrics of evaluate ({way}) differ from the whole window's")
            ticks = whole["ticks"]
            rows.append({"dates": days, "ticks": ticks, "evaluate_s": secs, "evaluate_peak_rss_mb": peak / 2**20,
                         "evaluate_worker_peak_rss_mb": worker / 2**20,
                         "one_process_s": here_secs, "one_process_peak_rss_mb": here_peak / 2**20,
                         "whole_s": bare_secs, "whole_peak_rss_mb": bare_peak / 2**20,
                         "report_s": report_secs, "report_peak_rss_mb": report_peak / 2**20})
            print(f"{days:>4} dates {ticks:>9} ticks: evaluate on tasks {secs:6.1f} s, driver {peak / 2**20:5.0f} MB, "
                  f"largest worker {worker / 2**20:5.0f} MB | a date at a time in one process {here_secs:6.1f} s "
                  f"{here_peak / 2**20:5.0f} MB | whole window in one process {bare_secs:6.1f} s "
                  f"{bare_peak / 2**20:5.0f} MB | time ratio to the whole window: tasks {secs / bare_secs:.2f}, one "
                  f"process {here_secs / bare_secs:.2f} (same metrics) | report {report_secs:6.1f} s "
                  f"{report_peak / 2**20:5.0f} MB")
    first, last = rows[0], rows[-1]
    growth = {k: last[k] / first[k] for k in ("evaluate_peak_rss_mb", "evaluate_worker_peak_rss_mb",
                                              "one_process_peak_rss_mb", "whole_peak_rss_mb", "report_peak_rss_mb")}
    print(f"window x{last['dates'] / first['dates']:.0f}: peak RSS of evaluate's driver x"
          f"{growth['evaluate_peak_rss_mb']:.2f} (largest worker x{growth['evaluate_worker_peak_rss_mb']:.2f}), "
          f"of one process a date at a time x{growth['one_process_peak_rss_mb']:.2f}, of the whole window x"
          f"{growth['whole_peak_rss_mb']:.2f}, of the report page x{growth['report_peak_rss_mb']:.2f}")
    write_json(Path(a.out) / "evaluate_window.json", {"entities": a.entities, "rows": rows,
                                                       "measured": dt.datetime.now().isoformat(timespec="minutes")})


if __name__ == "__main__":
    main()
