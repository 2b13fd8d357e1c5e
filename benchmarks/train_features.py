"""Benchmark: where the training window's features live, against a bare single-process loop, in one run.

    python -m benchmarks.train_features [--entities 8] [--days 4,16] [--epochs 2] [--store-mb 96]
                                        [--baseline REV] [--out DIR]

For each training window (`--days`), the synthetic fleet (`--entities` pumps, images 16x16) is generated;
`dmafn train --address` runs through the CLI on a standing local cluster of 2 CPUs whose object store (`--store-mb`) is
smaller than the window's features - a window larger than the cluster's memory, at a size this machine can run;
two windows show what grows with the window's length.
With `--baseline REV`, the same command of the project at git revision REV (a worktree of this repository, run
with its own modules) runs first on a fresh cluster of the same size: before 2026-12-02 the features were
materialized in the object store (`9865f48`). Sampled four times a second: the CLI driver's RSS, the largest
Ray worker's own private memory (`benchmarks.scale.PeakRss`), the pages the object store has taken in /dev/shm,
the objects spilled to disk at once and the training's staged feature files at once; after each run, what the
store spilled in all (`ray memory`). The bare loop, in one process: every training shard read, aligned and
featurized with statistics fitted on the same shards, the window's features held at once, then the same epochs
of `train_step` over shuffled batches; its peak RSS is the window in memory. Prints seconds, peaks and ratios;
writes `train_features.json`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.common import write_json
from benchmarks.scale import PeakRss, run_sampled, standing_cluster

MB = 1 << 20
PROJECT = Path(__file__).resolve().parent.parent


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` now (0 when it does not exist)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:                    # deleted while walking
            continue
    return total


class DiskPeaks:
    """Peaks, sampled four times a second, of the bytes used in /dev/shm above the start (the object store's
    pages: plasma keeps what it has touched), of the objects spilled to disk under the cluster's temp folder
    (spill files are deleted once their objects are freed) and of the files under the staging folder (the
    training's feature files): what a run needs at once."""

    def __init__(self, temp: str, staging: Path):
        self.temp, self.staging, self.base = Path(temp), staging, psutil.disk_usage("/dev/shm").used
        self.shm = self.spill = self.staged = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.shm = max(self.shm, psutil.disk_usage("/dev/shm").used - self.base)
            self.spill = max(self.spill, sum(folder_bytes(f) for f in self.temp.glob("session_*/ray_spilled_objects*")))
            self.staged = max(self.staged, folder_bytes(self.staging))
            time.sleep(0.25)

    def stop(self) -> "DiskPeaks":
        self._stop.set()
        self._thread.join()
        return self


def bare_loop(spec_path: str, epochs: int) -> None:
    """The same steps in this process, the window's features held at once; prints seconds and ticks."""
    import numpy as np
    import torch

    from dmafn.features import StatisticsFitter, featurize
    from dmafn.model import build_model, model_config
    from dmafn.spec import load_spec
    from dmafn.training import seed_everything, train_step
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage
    from pipelines.train import aligned_batches, split_dates

    started = time.perf_counter()
    spec, storage = load_spec(spec_path), Storage()
    train_days, _ = split_dates(spec)
    shards = plan_shards(spec, train_days, list_inputs(spec, train_days, storage))
    fitter, aligned = StatisticsFitter(spec), []
    for shard in shards:
        batches, _, decoded = aligned_batches(shard, spec, storage)[:3]
        for batch in batches:
            fitter.add(batch.to_arrow())
            aligned.append((batch, decoded))
    stats = fitter.result()
    parts = [featurize(batch.to_arrow(), spec, stats, decoded) for batch, decoded in aligned]
    features = [p.rows(np.flatnonzero(p.mask.any(1))) for p in parts]
    inputs = {m: np.concatenate([f.inputs[m] for f in features]) for m in spec.modalities}
    mask = np.concatenate([f.mask for f in features])
    window = type(features[0])(inputs, mask, tuple(spec.modalities))
    ticks = len(mask)
    seed_everything(spec.train.seed)
    torch.set_num_threads(2)
    model = build_model(spec.modalities, model_config(spec.model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.learning_rate, weight_decay=1e-5)
    rng = np.random.default_rng(spec.train.seed)
    for _ in range(epochs):
        order = rng.permutation(ticks)
        for start in range(0, ticks, spec.train.batch_size):
            train_step(model, optimizer, window.rows(order[start:start + spec.train.batch_size]), None,
                       torch.device("cpu"), 1.0)
    print(f"BARE {time.perf_counter() - started:.2f} {ticks}")


def spilled_mb(address: str, env: dict[str, str]) -> float:
    """MiB the cluster's object store has spilled to disk so far (`ray memory --stats-only`)."""
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), "memory", "--stats-only", f"--address={address}"],
                         env=env, capture_output=True, text=True).stdout
    found = re.search(r"Spilled (\d+) MiB", out)
    return float(found.group(1)) if found else 0.0


def train_once(label: str, spec_path: Path, staging: Path, store_mb: int, env: dict[str, str],
               code: Path = PROJECT) -> dict:
    """`dmafn train --address` of the project at `code` on a fresh standing cluster; its figures."""
    env = {**env, "PYTHONPATH": str(code)}
    with standing_cluster(env, 2, store_mb * MB) as (address, cluster_env, head, temp):
        disks, workers = DiskPeaks(temp, staging), PeakRss(head, private=True)
        seconds, memory, out = run_sampled(["-m", "jobs.cli", "train", str(spec_path), "--address", address],
                                           cluster_env, cwd=code)
        disks.stop(), workers.stop()
        spilled = spilled_mb(address, cluster_env)
    line = next((ln for ln in out.splitlines() if "training " in ln and " ticks" in ln), "")
    row = {"seconds": seconds, "driver_mb": memory.driver / MB, "worker_own_mb": workers.worker_own / MB,
           "object_store_pages_mb": disks.shm / MB, "spilled_mb": spilled, "spill_peak_mb": disks.spill / MB,
           "staged_peak_mb": disks.staged / MB, "log": line.split("pipelines.train: ")[-1].strip()}
    print(f"{label:<14} {seconds:6.1f} s | driver {row['driver_mb']:5.0f} MB | largest worker's own "
          f"{row['worker_own_mb']:5.0f} MB | object store pages {row['object_store_pages_mb']:5.0f} MB | spilled "
          f"{spilled:5.0f} MiB in all, {row['spill_peak_mb']:5.0f} MB on disk at once | feature files "
          f"{row['staged_peak_mb']:5.0f} MB at once | {row['log']}", flush=True)
    return row


def one_window(days: int, a: argparse.Namespace, runs: list[tuple[str, Path]], env: dict[str, str]) -> dict:
    """Generate the fleet with `days` training days and train it every way; the window's row of results."""
    from dmafn.synthetic import SyntheticConfig
    from pipelines.generate import write_synthetic

    row: dict = {"days": days}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = SyntheticConfig(entities=a.entities, days=days + 1, clean_days=days, image_size=16)
        spec_path = write_synthetic(root, cfg, train_days=days)
        data = yaml.safe_load(spec_path.read_text())
        data["train"].update(epochs=a.epochs, workers=2)
        staging = Path(data["score"]["output"] + "_staging")
        for label, code in runs:
            data["registry"] = str(root / f"models_{label}")
            path = root / f"spec_{label}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            row[label] = train_once(f"[{days}d] {label}", path, staging, a.store_mb, env, code)
        seconds, memory, out = run_sampled(["-m", "benchmarks.train_features", "--bare", str(spec_path),
                                            str(a.epochs)], env)
    bare_s, ticks = (float(x) for x in next(ln for ln in out.splitlines() if ln.startswith("BARE")).split()[1:])
    row["bare"] = {"seconds": bare_s, "process_seconds": seconds, "rss_mb": memory.driver / MB, "ticks": int(ticks)}
    print(f"[{days}d] bare loop {bare_s:6.1f} s ({int(ticks)} ticks) | peak RSS {memory.driver / MB:5.0f} MB",
          flush=True)
    c, b = row["current"], row["bare"]
    ratios = {"seconds_to_bare": c["seconds"] / b["seconds"],
              "worker_own_to_bare_rss": c["worker_own_mb"] / b["rss_mb"]}
    if "baseline" in row:
        base = row["baseline"]
        ratios.update(seconds_to_baseline=c["seconds"] / base["seconds"],
                      baseline_seconds_to_bare=base["seconds"] / b["seconds"],
                      disk_at_once_to_baseline=(c["spill_peak_mb"] + c["staged_peak_mb"])
                      / max(base["spill_peak_mb"] + base["staged_peak_mb"], 1))
    row["ratios"] = ratios
    print(f"[{days}d] ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=8)
    parser.add_argument("--days", default="4,16", help="training windows in days, comma-separated (the last day "
                                                        "of each is its validation day)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--store-mb", type=int, default=96, help="the standing cluster's object store")
    parser.add_argument("--baseline", help="a git revision of this repository to run first, the same way")
    parser.add_argument("--out", default="benchmarks/results")
    a = parser.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    results: dict = {"entities": a.entities, "epochs": a.epochs, "object_store_mb": a.store_mb, "windows": []}
    runs = [("current", PROJECT)]
    with tempfile.TemporaryDirectory() as tmp:
        if a.baseline:
            worktree = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(PROJECT), "worktree", "add", "--detach", "-q", str(worktree),
                            a.baseline], check=True)
            runs.insert(0, ("baseline", worktree))
            results["baseline_revision"] = subprocess.run(["git", "-C", str(worktree), "rev-parse", "--short",
                                                           "HEAD"], capture_output=True, text=True).stdout.strip()
        try:
            for days in (int(d) for d in a.days.split(",")):
                results["windows"].append(one_window(days, a, runs, env))
        finally:
            if a.baseline:
                subprocess.run(["git", "-C", str(PROJECT), "worktree", "remove", "--force", str(worktree)])
    results["measured"] = dt.datetime.now().isoformat(timespec="minutes")
    write_json(Path(a.out) / "train_features.json", results)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        bare_loop(sys.argv[2], int(sys.argv[3]))
    else:
        main()
