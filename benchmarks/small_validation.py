"""Benchmark: how often a POT threshold fitted on few validation scores is exceeded (a simulation, no model).

    python -m benchmarks.small_validation [--sizes 40 80 300] [--risks 0.001 0.003] [--draws 1000]
                                          [--out benchmarks/results]

`score.threshold: {method: pot, risk: R}` asks for the score that a normal tick exceeds with probability R. With
few validation scores - SKAB's 80 held-out rows per file, a short `recalibrate` window, an in-memory `Detector` on
little data - too few lie over POT's 98 % level for a GPD fit. For each size n, risk R and kind of score (i.i.d.
draws of four distributions, and an EWMA of exponential draws, as a smoothed score is: n values in a row), it
draws n values `--draws` times, fits the threshold, and reads the probability that a new value of the same process
exceeds it (from 2,000,000 values of the process): the mean and median of those probabilities over the draws,
divided by R - 1.0 is a threshold that alarms as often as asked. Beside `dmafn.postprocess.pot_threshold` it fits
the rule before 2026-12-08 (`threshold_before`: with fewer than 3 values over the level, the (1 - R) quantile - the
largest value when n < 1 / R -, else the GPD by probability-weighted moments on those few). `small_validation.json`.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import stats

from benchmarks.common import write_json
from dmafn.postprocess import ewma, gpd_fit, pot_threshold

REFERENCE = 2_000_000
WARM_UP = 50                      # an EWMA's first values, left out (its start from the first draw)


def threshold_before(x: np.ndarray, risk: float, level: float = 0.98) -> float:
    """`pot_threshold` as it was before 2026-12-08."""
    t = float(np.quantile(x, level))
    excesses = x[x > t] - t
    if excesses.size < 3 or risk * x.size >= excesses.size:
        return float(np.quantile(x, 1 - risk))
    gamma, sigma = gpd_fit(excesses)
    ratio = risk * x.size / excesses.size
    return t - sigma * math.log(ratio) if abs(gamma) < 1e-6 else t + sigma / gamma * (ratio ** (-gamma) - 1)


def processes(rng: np.random.Generator) -> dict[str, tuple]:
    """Name -> (draw n values in a row, the probability that a value exceeds z)."""
    def smoothed(alpha: float):
        reference = np.sort(ewma(rng.exponential(1.0, REFERENCE + WARM_UP), alpha)[WARM_UP:])
        return (lambda n: ewma(rng.exponential(1.0, n + WARM_UP), alpha)[WARM_UP:],
                lambda z: 1.0 - np.searchsorted(reference, z) / reference.size)

    return {"exponential": (lambda n: rng.exponential(1.0, n), lambda z: math.exp(-z)),
            "gamma(4)": (lambda n: rng.gamma(4.0, 1.0, n), lambda z: stats.gamma.sf(z, 4.0)),
            "lognormal(0.5)": (lambda n: rng.lognormal(0.0, 0.5, n), lambda z: stats.lognorm.sf(z, 0.5)),
            "gaussian": (lambda n: rng.normal(0.0, 1.0, n), lambda z: stats.norm.sf(z)),
            "ewma 0.3 of exponential": smoothed(0.3), "ewma 0.5 of exponential": smoothed(0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 80, 300])
    parser.add_argument("--risks", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    print("exceeded / risk (mean, median over the draws): 1.0 alarms as often as asked")
    print(f"{'n':>4} {'risk':>6}  {'scores':<24} {'before 2026-12-08':>20} {'now':>16}")
    for name, (draw, sf) in processes(rng).items():
        for n in args.sizes:
            for risk in args.risks:
                before, now = [], []
                for _ in range(args.draws):
                    x = draw(n)
                    before.append(sf(threshold_before(x, risk)))
                    now.append(sf(pot_threshold(x, risk)))
                before, now = np.array(before) / risk, np.array(now) / risk
                row = {"before_mean": float(before.mean()), "before_median": float(np.median(before)),
                       "now_mean": float(now.mean()), "now_median": float(np.median(now))}
                results[f"{name} n={n} risk={risk:g}"] = row
                print(f"{n:>4} {risk:>6g}  {name:<24} {row['before_mean']:>9.2f} {row['before_median']:>9.2f}  "
                      f"{row['now_mean']:>7.2f} {row['now_median']:>7.2f}", flush=True)
    write_json(f"{args.out}/small_validation.json", {"config": vars(args), "results": results})


if __name__ == "__main__":
    main()
