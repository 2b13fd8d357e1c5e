"""Benchmark: fitting the calibration on longer and longer validation windows - the driver's memory.

    python -m benchmarks.calibrate_window [--entities 64] [--buckets 2] [--days 1,8,32,128] [--out benchmarks/results]

Made-up raw scores (four modalities, lognormal errors, a tenth of them missing; a tick a minute per entity,
one part per day x entity bucket, as validation shards are) are calibrated the way `dmafn train` does
(EWMA smoothing, `contribution_scale: tail`, POT threshold, attention vote, validation outliers looked for:
`train.validation_outlier_limit` 4), each window in its own process,
sampled twice a second for peak RSS:
- `pipelines.calibrate.ShardTicks` on a local Ray (2 CPUs): each part made and kept by a task, the fit asking
  for counts, quantiles and tails (`Calibration.fit_from`) - what training does now;
- a bare loop of the same steps in one process: every part made there, concatenated in entity and time order
  and fitted by `Calibration.fit` - what the training driver did before 2026-12-01 (gather, then fit).
Checks both give the same calibration (to the bit while each contribution's tail is read whole, at most
`GATHER_MAX` values; past it each shard sums its excess, and the numbers agree to 1e-12) and prints seconds and
the driver's peak RSS of each, and how each grows with the window; `calibrate_window.json`. No model is run: what is measured is the calibration.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import write_json
from benchmarks.scale import run_python

MODALITIES = ("a", "b", "c", "d")
FIT = {"detector": "autoencoder", "vote": "attention", "scale": "tail",
       "outlier_limit": 4.0, "outlier_after": 6}      # train.validation_outlier_limit's default, the demo's reach


def made_up_part(day: int, bucket: int, entities: int, buckets: int):
    """The raw scores of one day x entity bucket, rows sorted by entity and time (`pipelines.calibrate.ShardPart`)."""
    from dmafn.scoring import RawScores
    from pipelines.calibrate import ShardPart

    names = [f"pump-{i:04d}" for i in range(entities) if i % buckets == bucket]
    rng = np.random.default_rng([day, bucket])
    n = len(names) * 1440
    mask = rng.random((n, len(MODALITIES))) > 0.1
    scale = np.repeat(1 + np.arange(len(names)) % 5, 1440)[:, None]
    errors = np.where(mask, rng.lognormal(size=mask.shape).astype(np.float32) * scale, np.nan).astype(np.float32)
    return ShardPart(np.repeat(np.array(names), 1440), RawScores(errors=errors, latent=None, mask=mask))


def settings():
    from dmafn.spec import SmoothingSpec, ThresholdSpec

    return {**FIT, "smoothing": SmoothingSpec(method="ewma", alpha=0.5),
            "threshold": ThresholdSpec(method="pot", risk=1e-3)}


def fingerprint(calibration) -> str:
    return hashlib.sha256(json.dumps(calibration.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def floats(calibration) -> list[float]:
    """Every number of the calibration, in a fixed order (to compare two whose sums ran in another order)."""
    def walk(value):
        if isinstance(value, dict):
            return [x for k in sorted(value) for x in walk(value[k])]
        if isinstance(value, (list, tuple)):
            return [x for v in value for x in walk(v)]
        return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
    return walk(calibration.to_dict())


def same(a: list[float], b: list[float], tol: float = 1e-12) -> bool:
    return len(a) == len(b) and all(x == y or abs(x - y) <= tol * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


def run_shards(days: int, entities: int, buckets: int) -> dict:
    """The fit on a local Ray, the parts made and kept by tasks (this process is the driver)."""
    import ray

    from dmafn.calibration import Calibration
    from pipelines.calibrate import ShardTicks

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    make = ray.remote(num_cpus=1)(lambda day, bucket: made_up_part(day, bucket, entities, buckets))
    parts = [(b, dt.date(2024, 1, 1) + dt.timedelta(days=d), make.remote(d, b))
             for d in range(days) for b in range(buckets)]
    metas = [{"ticks": -(-entities // buckets) * 1440, "columns": len(MODALITIES), "latent_dims": None}] * len(parts)
    calibration = Calibration.fit_from(ShardTicks(parts, metas), MODALITIES, **settings())
    ray.shutdown()
    return {"fingerprint": fingerprint(calibration), "threshold": calibration.threshold,
            "floats": floats(calibration)}


def run_memory(days: int, entities: int, buckets: int) -> dict:
    """The bare loop: every part here, in entity and time order, `Calibration.fit`."""
    from dmafn.calibration import Calibration
    from dmafn.scoring import RawScores

    parts = [(b, d, made_up_part(d, b, entities, buckets)) for d in range(days) for b in range(buckets)]
    groups = np.concatenate([p.groups for _, _, p in parts])
    day = np.concatenate([np.full(len(p.groups), d) for _, d, p in parts])
    minute = np.concatenate([np.tile(np.arange(1440), len(p.groups) // 1440) for _, _, p in parts])
    order = np.lexsort((minute, day, groups))
    raw = RawScores.concatenate([p.raw for _, _, p in parts], order)
    del parts
    calibration = Calibration.fit(raw, MODALITIES, groups=groups[order], **settings())
    return {"fingerprint": fingerprint(calibration), "threshold": calibration.threshold,
            "floats": floats(calibration)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entities", type=int, default=64)
    ap.add_argument("--buckets", type=int, default=2)
    ap.add_argument("--days", default="1,8,32,128")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--run", choices=("shards", "memory"), help=argparse.SUPPRESS)   # one measured process
    a = ap.parse_args()
    if a.run:
        days = int(a.days)
        result = (run_shards if a.run == "shards" else run_memory)(days, a.entities, a.buckets)
        print("RESULT " + json.dumps(result))
        return
    rows = []
    for days in [int(d) for d in a.days.split(",")]:
        measured = {}
        for run in ("shards", "memory"):
            secs, driver, _, out = run_python(["-m", "benchmarks.calibrate_window", "--run", run, "--days", str(days),
                                               "--entities", str(a.entities), "--buckets", str(a.buckets)])
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            measured[run] = {"seconds": round(secs, 2), "peak_rss_mb": round(driver / 2**20), **result}
        # to the bit while every tail is read whole; past GATHER_MAX a tail's excess is summed where it lies
        bit = measured["shards"]["fingerprint"] == measured["memory"]["fingerprint"]
        if not bit and not same(measured["shards"]["floats"], measured["memory"]["floats"]):
            sys.exit(f"{days} day(s): the two calibrations differ: {measured}")
        for run in measured.values():
            run.pop("floats")
        measured["same"] = "to the bit" if bit else "to 1e-12"
        rows.append({"days": days, "ticks": days * a.entities * 1440, **measured,
                     "time_ratio": round(measured["shards"]["seconds"] / measured["memory"]["seconds"], 2)})
        s, m = measured["shards"], measured["memory"]
        print(f"{days:3d} day(s), {rows[-1]['ticks']:>9,} ticks: shards {s['seconds']:6.1f} s, driver "
              f"{s['peak_rss_mb']:5d} MB | in one process {m['seconds']:6.1f} s, {m['peak_rss_mb']:5d} MB | "
              f"time x{rows[-1]['time_ratio']} | same calibration {measured['same']}", flush=True)
    first, last = rows[0], rows[-1]
    growth = {run: round(last[run]["peak_rss_mb"] / first[run]["peak_rss_mb"], 2) for run in ("shards", "memory")}
    print(f"window x{last['days'] // first['days']}: driver peak RSS x{growth['shards']} on the shards, "
          f"x{growth['memory']} in one process")
    write_json(Path(a.out) / "calibrate_window.json", {"entities": a.entities, "buckets": a.buckets, "rows": rows,
                                                        "driver_growth": growth,
                                                        "measured": dt.datetime.now(dt.timezone.utc).isoformat()})


if __name__ == "__main__":
    main()
