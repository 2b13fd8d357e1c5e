"""Benchmark: EWMA smoothing of many entities' series at once (`dmafn.postprocess.smooth_by_group`).

    python -m benchmarks.smoothing [--entities 10 100 1000 4000] [--ticks 1440] [--out benchmarks/results]

A scoring task smooths each modality's channel parts per entity (`Calibration.smooth_carried`, to name the channel
that drove a score) and the calibration smooths every validation tick's contributions the same way. Per entity
count and number of columns (3: a vibration's axes; 40: a wide historian table, up to 100 entities) it times
`smooth_carried` on one shard's ticks (`--ticks` per entity, 10 % NaN, rows sorted by entity and time, EWMA alpha
0.5 with a knee of 4, as the generated specs) against the bare loop of the same steps - `ewma` over each entity's
series and column one at a time, in Python, with no grouping to find (before 2026-12-07 `smooth_carried` ran that
loop, after sorting the entities' names) - checks that both give the same values to the bit, and prints the ratio
(the fastest of `REPEATS` each). `smoothing.json`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import write_json
from dmafn.calibration import Calibration
from dmafn.postprocess import ewma, soften
from dmafn.spec import SmoothingSpec

REPEATS = 3
SMOOTHING = SmoothingSpec(method="ewma", alpha=0.5, knee=4.0)


def fastest(run, repeats: int = REPEATS) -> tuple[float, np.ndarray]:
    """The fastest of `repeats` timed calls of `run` and its last answer."""
    best, out = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(entities: int, columns: int, ticks: int) -> dict[str, float]:
    rng = np.random.default_rng(entities * 1000 + columns)
    groups = np.repeat([f"pump-{i:05d}" for i in range(entities)], ticks)
    values = np.abs(rng.standard_t(3, (len(groups), columns)))
    values[rng.random(values.shape) < 0.1] = np.nan
    calibration = Calibration(("m",), {}, SMOOTHING)

    def together() -> np.ndarray:
        return np.stack([calibration.smooth_carried(values[:, j], groups, {})[0] for j in range(columns)], 1)

    def bare_loop() -> np.ndarray:
        out = np.empty(values.shape)
        for start in range(0, len(groups), ticks):
            rows = slice(start, start + ticks)
            for j in range(columns):
                out[rows, j] = ewma(soften(values[rows, j], SMOOTHING.knee), SMOOTHING.alpha)
        return out

    seconds, smoothed = fastest(together)
    bare, expected = fastest(bare_loop, 1 if entities * columns > 4000 else REPEATS)
    if not np.array_equal(smoothed, expected, equal_nan=True):
        raise AssertionError(f"{entities} entities x {columns} columns: not the bare loop's values")
    return {"values": int(values.size), "seconds": seconds, "bare_loop_seconds": bare, "ratio": seconds / bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, nargs="+", default=[10, 100, 1000, 4000])
    parser.add_argument("--ticks", type=int, default=1440)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = {}
    for entities in args.entities:
        for columns in (3, 40) if entities <= 100 else (3,):
            r = results[f"{entities}x{columns}"] = run(entities, columns, args.ticks)
            print(f"{entities} entities x {columns} columns x {args.ticks} ticks ({r['values']:,} values): "
                  f"{r['seconds']:.3f} s against the bare loop's {r['bare_loop_seconds']:.3f} s "
                  f"({r['ratio']:.2f}x), the same values", flush=True)
    write_json(f"{args.out}/smoothing.json",
               {"config": vars(args) | {"alpha": SMOOTHING.alpha, "knee": SMOOTHING.knee}, "results": results})


if __name__ == "__main__":
    main()
