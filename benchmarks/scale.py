"""Benchmark: how training and backfill grow with the data, against a bare single-process loop, in one run.

    python -m benchmarks.scale [--scales 1,8,32] [--repeats 3] [--skab PATH/TO/skab] [--out benchmarks/results]

For each scale the synthetic fleet is generated (entities x days grow together; the demo's size is 1x:
4 pumps, 2 training days, 2 scored days), then, through the public CLI with a local Ray on this machine's CPUs:
`dmafn train` (1 epoch) and `dmafn backfill`. While each command runs, the RSS of its driver process and of
every Ray worker process is sampled twice a second (peak driver, peak of the largest worker). Then a bare loop
scores the same dates with the same model version in one process pinned to one CPU (so Polars', Arrow's and
torch's threads share one core): per date, pyarrow read -> the project's `align` -> `featurize` -> the model
-> `write_deltalake`; its scores are checked against the backfill's. Prints ticks/s of both and the ratio, and
how the RSS figures grow from scale to scale; writes `scale.json` (`ratio` = backfill ticks/s / bare
single-core ticks/s at the largest scale, the backfill's time counting the CLI's start, Ray's start and stop).
At the largest scale the backfill (again with `--force`) and the bare loop take `--repeats` turns each and the
ratio is that of the medians: on this 2-vCPU machine one run's figure swings by ~5 %.
At the largest scale the backfill runs once more with `--address` on a standing local cluster (`ray start
--head`, with the images' allocator setting), as a job on a running cluster does: `ratio_standing_cluster`;
and the bare loop once more with the allocator setting DMAFN's workers run with
(`pipelines.ray_runtime.WORKER_JEMALLOC_CONF`): `ratio_vs_bare_with_worker_allocator`.

With `--skab`, also sparse data of SKAB's shape (34 runs of ~20 minutes at 1 Hz spread over a month, grain
1 s): its files as a lake (`benchmarks.skab.write_lake`), `dmafn train` (1 epoch) and `dmafn backfill` over
every date through the CLI, timed against its number of rows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import psutil
import yaml

from benchmarks.common import write_json
from pipelines.ray_runtime import WORKER_JEMALLOC_CONF

SCALES = {1: (4, 2, 2), 8: (8, 8, 8), 32: (16, 8, 16)}       # scale: (entities, training-window days, scored days)


class PeakRss:
    """Samples a process tree twice a second: peak RSS of the root (the driver) and of the largest `ray::` worker;
    with `private`, also the largest peaks of what a worker holds itself (its private pages outside the object
    store) and of the object store's pages only it has touched (objects it wrote that no other process has read
    yet: the store's memory, not the task's)."""

    def __init__(self, pid: int, private: bool = False):
        self.root, self.private = psutil.Process(pid), private
        self.driver = self.worker = self.worker_own = self.worker_store = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample_worker(self, worker: psutil.Process) -> None:
        self.worker = max(self.worker, worker.memory_info().rss)
        if self.private:
            own = store = 0
            for mapping in worker.memory_maps(grouped=True):
                pages = mapping.private_clean + mapping.private_dirty
                if mapping.path.startswith("/dev/shm/plasma"):
                    store += pages
                else:
                    own += pages
            self.worker_own, self.worker_store = max(self.worker_own, own), max(self.worker_store, store)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.root.memory_info().rss)
                for child in self.root.children(recursive=True):
                    try:
                        if child.name().startswith("ray::") or "default_worker" in " ".join(child.cmdline()[:3]):
                            self._sample_worker(child)
                    except psutil.Error:
                        continue
            except psutil.Error:
                pass
            time.sleep(0.5)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.driver, self.worker


def run_sampled(args: list[str], env: dict[str, str] | None = None, private: bool = False,
                cwd: Path | None = None) -> tuple[float, PeakRss, str]:
    """Run `python ARGS` from `cwd` (default the project's folder); (seconds, its memory sampler, stopped, its
    output)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=cwd or Path(__file__).resolve().parent.parent)
    memory = PeakRss(proc.pid, private)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - started     # before the sampler's last half-second nap
    memory.stop()
    if proc.returncode:
        raise RuntimeError(f"python {' '.join(args)} exited {proc.returncode}:\n{out[-3000:]}")
    return seconds, memory, out


def run_python(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, str]:
    """Run `python ARGS` from the project's folder; (seconds, peak RSS of the process, peak RSS of its largest
    Ray worker, its output)."""
    seconds, memory, out = run_sampled(args, env)
    return seconds, memory.driver, memory.worker, out


def cli(args: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Run `dmafn ARGS`; (seconds, peak driver RSS, peak largest worker RSS)."""
    return run_python(["-m", "jobs.cli", *args], env)[:3]


def bare_loop(spec_path: Path, version: str, dates: list[dt.date], out: str) -> tuple[float, int, float]:
    """The same steps in this process, one date at a time, one torch thread; (seconds, ticks, CPU seconds of all
    the process's threads). `bare_on_one_core` runs it pinned to one CPU."""
    import torch
    from deltalake import write_deltalake

    from dmafn.spec import load_spec
    from pipelines.align import align, data_ticks
    from pipelines.ingest import read_shard
    from pipelines.registry import Registry
    from pipelines.score import reading_spec
    from pipelines.score_steps import REASON, Scorer, finalize
    from pipelines.shards import Shard, list_inputs
    from pipelines.storage import Storage

    torch.set_num_threads(1)
    spec, storage = load_spec(spec_path), Storage()
    mv = Registry(spec.registry, storage).load(version)
    model_spec, scorer = reading_spec(mv, spec), Scorer(mv)
    started, cpu, ticks_total = time.perf_counter(), time.process_time(), 0
    for date in dates:
        files = tuple(list_inputs(model_spec, [date], storage))
        inputs = read_shard(Shard((date,), 0, 1, files, model_spec.lookback_days), model_spec, storage,
                            row_intervals=True)                                   # as scoring reads
        ticks = data_ticks(inputs.tables, inputs.present, model_spec, [date])
        scored = pl.from_arrow(scorer(align(ticks, inputs.tables, model_spec).to_arrow(), inputs.decoded))
        rows = finalize(scored.filter(pl.col(REASON).is_null()).drop(REASON), mv.spec, mv.calibration,
                        version=mv.version, run_id="bare", modalities=list(mv.spec.modalities),
                        scored_at=dt.datetime.now(dt.timezone.utc))
        write_deltalake(out, rows.to_arrow(), mode="overwrite", predicate=f"date = '{date.isoformat()}'",
                        partition_by=["date"])
        ticks_total += ticks.height
    return time.perf_counter() - started, ticks_total, time.process_time() - cpu


def bare_on_one_core(spec_path: Path, version: str, dates: list[dt.date], out: str,
                     env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """`bare_loop` in a child process pinned to one CPU before anything is imported, so Polars', Arrow's and
    torch's thread pools all share that core: a single-core loop. (seconds, ticks, CPU seconds of the loop).
    `env`: the child's environment (default: this process's)."""
    code = ("import datetime as dt, json, sys; from pathlib import Path; from benchmarks.scale import bare_loop; "
            "a = json.loads(sys.argv[1]); "
            "s, n, c = bare_loop(Path(a['spec']), a['version'], [dt.date.fromisoformat(d) for d in a['dates']], a['out']); "
            "print(json.dumps({'seconds': s, 'ticks': n, 'cpu': c}))")
    args = {"spec": str(spec_path), "version": version, "dates": [d.isoformat() for d in dates], "out": out}
    cpu = min(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env,
                          preexec_fn=lambda: os.sched_setaffinity(0, {cpu}), cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise RuntimeError(f"bare loop exited {done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["ticks"], result["cpu"]


@contextlib.contextmanager
def standing_cluster(env: dict[str, str], num_cpus: int, object_store_bytes: int | None = None):
    """A local cluster started as the project's images start one (`ray start --head --block`, token auth, the
    workers' allocator setting), stopped on exit; yields (address, the environment to reach it with, the head
    process's pid, its temp folder)."""
    import secrets
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0",
           "_RJEM_MALLOC_CONF": WORKER_JEMALLOC_CONF}         # as the project's images start a cluster
    temp = tempfile.mkdtemp(prefix="ray-bench-")
    store = [f"--object-store-memory={object_store_bytes}"] if object_store_bytes else []
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--num-cpus={num_cpus}", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={temp}", "--disable-usage-stats", *store], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:            # ready once a driver can connect: `ray status` answers
            probe = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address=127.0.0.1:{port}"],
                                   env=env, capture_output=True)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError("the local Ray head did not start")
            time.sleep(1)
        yield f"127.0.0.1:{port}", env, head.pid, temp
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def on_running_cluster(args: list[str], env: dict[str, str], num_cpus: int) -> tuple[float, int, int]:
    """`dmafn ARGS --address` against a local cluster already started (`standing_cluster`): the CLI without
    Ray's start and stop, as a job on a standing cluster runs."""
    with standing_cluster(env, num_cpus) as (address, cluster_env, _, _):
        return cli([*args, "--address", address], cluster_env)


def run_scale(scale: int, root: Path, num_cpus: int, env: dict[str, str], standing: bool = False,
              repeats: int = 1) -> dict:
    """One scale through the CLI and the bare loop; with `standing`, the backfill again on a standing cluster.
    With `repeats` > 1 the backfill (`--force`) and the bare loop run that many times each, taking turns, and
    the ratio is that of their medians (this machine's timings swing by several % from run to run)."""
    entities, train_days, scored_days = SCALES[scale]
    from dmafn.synthetic import SyntheticConfig
    from pipelines.generate import write_synthetic

    cfg = SyntheticConfig(entities=entities, days=train_days + scored_days, clean_days=train_days, image_size=16)
    t0 = time.perf_counter()
    spec_path = write_synthetic(root, cfg, train_days=train_days)
    data = yaml.safe_load(spec_path.read_text())
    data["train"].update(epochs=1, workers=2)
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"[{scale}x] generated {entities} entities x {train_days + scored_days} days in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    train_s, train_driver, train_worker = cli(["train", str(spec_path)], env)
    version = (root / "models" / "LATEST").read_text().strip()
    first = cfg.start + dt.timedelta(days=train_days)
    dates = [first + dt.timedelta(days=i) for i in range(scored_days)]
    back_s, back_driver, back_worker = cli(["backfill", str(spec_path), "--start", dates[0].isoformat(),
                                            "--end", dates[-1].isoformat()], env)
    ticks = int(pl.read_delta(str(root / "scores_runs"))["ticks_in"].sum())
    bare_s, bare_ticks, bare_cpu = bare_on_one_core(spec_path, version, dates, str(root / "bare_scores"))
    back_runs, bare_runs = [back_s], [bare_s]
    for turn in range(1, repeats):
        back_runs.append(cli(["backfill", str(spec_path), "--start", dates[0].isoformat(), "--end",
                              dates[-1].isoformat(), "--force"], env)[0])
        bare_runs.append(bare_on_one_core(spec_path, version, dates, str(root / f"bare_scores_{turn}"))[0])
    same_allocator = None
    if repeats > 1:
        # the bare loop once more with the allocator setting the backfill's workers run with
        same_allocator = bare_on_one_core(spec_path, version, dates, str(root / "bare_scores_allocator"),
                                          env={**env, "_RJEM_MALLOC_CONF": WORKER_JEMALLOC_CONF})[0]
        print(f"[{scale}x] {repeats} turns: backfill " + ", ".join(f"{t:.1f}" for t in back_runs) + " s; bare loop "
              + ", ".join(f"{t:.1f}" for t in bare_runs) + " s", flush=True)
        back_s, bare_s = statistics.median(back_runs), statistics.median(bare_runs)
    ours = pl.read_delta(str(root / "scores")).sort("machine_id", "ts")
    bare = pl.read_delta(str(root / "bare_scores")).sort("machine_id", "ts")
    same = ours.select("machine_id", "ts", "is_anomaly").equals(bare.select("machine_id", "ts", "is_anomaly"))
    diff = float((ours["score"] - bare["score"]).abs().max()) if ours.height == bare.height else float("inf")
    row = {"scale": scale, "entities": entities, "train_days": train_days, "scored_days": scored_days,
           "ticks": ticks, "bare_ticks": bare_ticks, "train_seconds": round(train_s, 1),
           "backfill_seconds": round(back_s, 1), "bare_seconds": round(bare_s, 1),
           "backfill_ticks_per_s": ticks / back_s, "bare_ticks_per_s": bare_ticks / bare_s,
           "bare_cpu_seconds": round(bare_cpu, 1),
           "backfill_seconds_runs": [round(t, 1) for t in back_runs], "bare_seconds_runs": [round(t, 1) for t in bare_runs],
           "ratio": (ticks / back_s) / (bare_ticks / bare_s), "same_rows": same, "max_score_diff": diff,
           "train_driver_rss_mb": train_driver / 1e6, "train_largest_worker_rss_mb": train_worker / 1e6,
           "backfill_driver_rss_mb": back_driver / 1e6, "backfill_largest_worker_rss_mb": back_worker / 1e6}
    if same_allocator is not None:
        row.update(bare_seconds_worker_allocator=round(same_allocator, 1),
                   ratio_vs_bare_with_worker_allocator=(ticks / back_s) / (bare_ticks / same_allocator))
        print(f"[{scale}x] bare loop with the workers' allocator setting: {same_allocator:.1f} s, ratio "
              f"{row['ratio_vs_bare_with_worker_allocator']:.2f}", flush=True)
    if standing:
        seconds, _, _ = on_running_cluster(["backfill", str(spec_path), "--start", dates[0].isoformat(), "--end",
                                            dates[-1].isoformat(), "--force"], env, num_cpus)
        row.update(backfill_standing_cluster_seconds=round(seconds, 1),
                   ratio_standing_cluster=(ticks / seconds) / (bare_ticks / bare_s))
        print(f"[{scale}x] backfill on a standing cluster: {seconds:.1f} s, ratio "
              f"{row['ratio_standing_cluster']:.2f}", flush=True)
    print(f"[{scale}x] {ticks} ticks: backfill {row['backfill_ticks_per_s']:.0f} ticks/s (CLI, {num_cpus} CPUs, "
          f"Ray start included), bare loop {row['bare_ticks_per_s']:.0f} ticks/s (pinned to 1 core): ratio {row['ratio']:.2f}; "
          f"same rows {same}, largest score difference {diff:.1e}; train {train_s:.0f} s; peak RSS MB train "
          f"driver {row['train_driver_rss_mb']:.0f} / worker {row['train_largest_worker_rss_mb']:.0f}, backfill "
          f"driver {row['backfill_driver_rss_mb']:.0f} / worker {row['backfill_largest_worker_rss_mb']:.0f}",
          flush=True)
    return row


def run_skab(path: Path, root: Path, env: dict[str, str]) -> dict:
    """SKAB-shaped sparse data through the CLI: many short runs a day at 1 Hz."""
    from benchmarks.skab import load_files, write_lake

    files = load_files(path)
    spec_path = write_lake(files, root, window_s=10)
    rows = sum(len(df) for df in files.values())
    days = sorted({d for df in files.values() for d in df["datetime"].dt.date.unique()})
    data = yaml.safe_load(spec_path.read_text())
    data["train"] = {"start": days[0].isoformat(), "end": days[-1].isoformat(), "epochs": 1, "workers": 2,
                     "validation_days": 1}
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    train_s, train_driver, _ = cli(["train", str(spec_path)], env)
    back_s, back_driver = 0.0, 0
    for first, last in _runs_of_days(days):          # a date without data is an error: backfill where data is
        seconds, driver, _ = cli(["backfill", str(spec_path), "--start", first.isoformat(), "--end",
                                  last.isoformat()], env)
        back_s, back_driver = back_s + seconds, max(back_driver, driver)
    ticks = int(pl.read_delta(str(root / "scores_runs"))["ticks_in"].sum())
    row = {"files": len(files), "rows": rows, "dates": len(days), "ticks": ticks, "train_seconds": round(train_s, 1),
           "backfill_seconds": round(back_s, 1), "train_driver_rss_mb": train_driver / 1e6,
           "backfill_driver_rss_mb": back_driver / 1e6}
    print(f"[skab] {len(files)} files, {rows} rows on {len(days)} dates: train {train_s:.0f} s, backfill "
          f"{back_s:.0f} s for {ticks} ticks (ticks follow the data: about one per row, not "
          f"{len(files)} x 86400 a day)", flush=True)
    return row


def _runs_of_days(days: list[dt.date]) -> list[tuple[dt.date, dt.date]]:
    runs: list[list[dt.date]] = []
    for d in days:
        if runs and (d - runs[-1][-1]).days == 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    return [(r[0], r[-1]) for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1,8,32", help=f"comma-separated, of {sorted(SCALES)}")
    parser.add_argument("--skab", default=None, help="also run SKAB-shaped sparse data from this folder")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=3,
                        help="at the largest scale, backfill and bare loop this many times each, ratio of the medians")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    num_cpus = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in scales:
            largest = scale == max(scales)
            rows.append(run_scale(scale, Path(tmp) / f"x{scale}", num_cpus, env, standing=largest,
                                  repeats=args.repeats if largest else 1))
        skab = run_skab(Path(args.skab), Path(tmp) / "skab", env) if args.skab else None
    base = rows[0]
    print("\nscale  ticks    backfill t/s  bare t/s  ratio  train drv MB  train wkr MB  bf drv MB  bf wkr MB")
    for r in rows:
        print(f"{r['scale']:>4}x  {r['ticks']:>7}  {r['backfill_ticks_per_s']:>12.0f}  {r['bare_ticks_per_s']:>8.0f}  "
              f"{r['ratio']:>5.2f}  {r['train_driver_rss_mb']:>12.0f}  {r['train_largest_worker_rss_mb']:>12.0f}  "
              f"{r['backfill_driver_rss_mb']:>9.0f}  {r['backfill_largest_worker_rss_mb']:>9.0f}")
    growth = {f"{r['scale']}x_over_{base['scale']}x": {
        k: r[k] / base[k] for k in ("train_driver_rss_mb", "train_largest_worker_rss_mb", "backfill_driver_rss_mb",
                                    "backfill_largest_worker_rss_mb")} for r in rows[1:]}
    for name, g in growth.items():
        print(f"RSS growth {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in g.items()))
    write_json(f"{args.out}/scale.json", {"ratio": rows[-1]["ratio"],
                                          "ratio_standing_cluster": rows[-1].get("ratio_standing_cluster"),
                                          "ratio_vs_bare_with_worker_allocator":
                                              rows[-1].get("ratio_vs_bare_with_worker_allocator"),
                                          "scales": rows, "rss_growth": growth,
                                          "skab_shaped": skab, "num_cpus": num_cpus, "repeats": args.repeats,
                                          "date": dt.date.today().isoformat()})


if __name__ == "__main__":
    main()
