"""Benchmark: the model's scoring forward pass, ticks per second on one core.

    python -m benchmarks.forward [--fusions attention,early,gated,late] [--ticks 8192]

Synthetic demo ticks (4 pumps, the demo's modalities), a freshly initialised `small()` model per fusion (speed
does not depend on the weights), `dmafn.scoring.raw_scores` (every encoder, the fusion, the head and the
cross-modal leave-one-out errors) on one torch thread, best of three. Uses only APIs that older versions have
too, so the same file measures a checkout before a change (`PYTHONPATH=old-checkout python benchmarks/forward.py`).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import synthetic_split
from dmafn.features import Features
from dmafn.model import build_model, small
from dmafn.scoring import raw_scores
from dmafn.synthetic import SyntheticConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fusions", default="attention,early,gated,late")
    parser.add_argument("--ticks", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = synthetic_split(SyntheticConfig(entities=4, days=5, clean_days=3, image_size=32))
    x = split.test
    n = min(args.ticks, len(x.mask))
    x = Features({m: x.inputs[m][:n] for m in x.modalities}, x.mask[:n], x.modalities)
    for fusion in args.fusions.split(","):
        torch.manual_seed(0)
        model = build_model(split.spec.modalities, small(fusion=fusion))
        raw_scores(model, x)                                    # warm-up
        best = min(_timed(model, x) for _ in range(3))
        print(f"{fusion:>10} + autoencoder: {n / best:7.0f} ticks/s on one core ({n} ticks, {best:.2f} s)", flush=True)


def _timed(model, x) -> float:
    started = time.perf_counter()
    raw_scores(model, x)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
