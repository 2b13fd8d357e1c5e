"""How well can any causal detector rank the ticks of a slow drift? A bound by simulation, no model involved.

A drift is a ramp from 0 to `--amplitude` over 45-90 minutes (the synthetic fleets' slow drifts: +6 C) read
once a minute with Gaussian noise `--sigma`; the detector knows the channel's true baseline exactly (a real one
must predict it, here from the other channels' history, and does worse) and scores each minute with the mean
of the last `--window` readings' deviation - one-sided (it knows the drift goes up) or two-sided (it does not,
as DMAFN's relation errors). ROC-AUC of the drift's minutes against normal minutes, and again when a share
`--stale` of the normal minutes outranks every drift minute (as the ticks right after an event do, while a
5-minute log window or the last camera frame still holds the event: `docs/fleets.md`, "What holds the ranking").

    python -m benchmarks.ramp_bound [--sigma 0.4,0.51] [--window 3] [--stale 0.02]
"""
from __future__ import annotations

import argparse

import numpy as np

from dmafn.metrics import roc_auc


def drift_scores(rng: np.random.Generator, sigma: float, amplitude: float, window: int,
                 events: int = 400, normal: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Trailing-mean deviation of the drift minutes (all events) and of normal minutes."""
    kernel = np.ones(window) / window
    drifts = []
    for _ in range(events):
        minutes, before = int(rng.integers(45, 91)), 60
        readings = np.r_[np.zeros(before), np.linspace(0, amplitude, minutes + 1)]
        readings = readings + rng.normal(0, sigma, readings.size)
        drifts.append(np.convolve(readings, kernel)[:readings.size][before:])
    quiet = np.convolve(rng.normal(0, sigma, normal), kernel)[window:normal]
    return np.concatenate(drifts), quiet


def bound(sigma: float, *, two_sided: bool, stale: float = 0.0, amplitude: float = 6.0, window: int = 3,
          seed: int = 0) -> float:
    """ROC-AUC of the drift minutes against the normal ones (a share `stale` of which outrank everything)."""
    drift, quiet = drift_scores(np.random.default_rng(seed), sigma, amplitude, window)
    if two_sided:
        drift, quiet = np.abs(drift), np.abs(quiet)
    if stale:
        quiet = np.r_[quiet, np.full(int(stale * quiet.size), np.inf)]
    scores = np.r_[drift, quiet]
    return roc_auc(np.where(np.isinf(scores), np.finfo(float).max, scores),
                   np.r_[np.ones(drift.size, bool), np.zeros(quiet.size, bool)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", default="0.4,0.51", help="noise std(s), comma-separated (C)")
    parser.add_argument("--amplitude", type=float, default=6.0)
    parser.add_argument("--window", type=int, default=3, help="trailing mean of this many minutes")
    parser.add_argument("--stale", type=float, default=0.02, help="share of normal minutes outranking every drift")
    args = parser.parse_args()
    print(f"slow drift 0 -> {args.amplitude} over 45-90 min, baseline known, trailing mean of {args.window} min")
    for sigma in (float(s) for s in args.sigma.split(",")):
        for two_sided in (False, True):
            side = "two-sided" if two_sided else "one-sided"
            clean = bound(sigma, two_sided=two_sided, amplitude=args.amplitude, window=args.window)
            stale = bound(sigma, two_sided=two_sided, stale=args.stale, amplitude=args.amplitude, window=args.window)
            print(f"  noise {sigma:.2f}, {side}: ROC-AUC {clean:.3f}; with {100 * args.stale:.0f} % of normal "
                  f"minutes above every drift minute {stale:.3f}")


if __name__ == "__main__":
    main()
