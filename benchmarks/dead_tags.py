"""Benchmark: dead tags on a wide sensor table, with and without channel dropout (`model.channel_dropout`).

    python -m benchmarks.dead_tags [--tags 10 30] [--rates 0 0.25] [--draws 4] [--out benchmarks/results]

A historian's table of `--tags` tags, each a linear mix of two slowly moving hidden loads (plus a little curvature)
and noise, beside a 4-channel table that reads the same loads; standardised, in memory through `Detector` (the
pipeline's model, calibration and scoring; every channel held in training). Each `--rates` value trains `--draws`
models (`train.seed` 0..draws-1) on 6,000 normal ticks and scores 3,000 test ticks whose every tenth tick has one live
tag off its relation by 1.5 standard deviations, with 0, 1, 3 and 5 (or a fifth) of the tags dead - other tags in
each draw -, 0 in the inputs and not held, as `featurize` gives a dead channel. Prints and writes per rate and dead count the share of normal ticks
over the calibrated threshold (false alarms) and the ROC-AUC of the anomalous ticks; `dead_tags.json`.
A quality measurement, not a timing: nothing here is timed.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np

from benchmarks.common import write_json
from dmafn.detector import Detector
from dmafn.features import Features
from dmafn.metrics import roc_auc
from dmafn.model import small
from dmafn.spec import ModalitySpec

SHIFT = 1.5          # how far an anomalous tag leaves its relation, in its standard deviations


def ticks(tags: int, n: int, seed: int, mixes: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(wide (n, tags), narrow (n, 4)) raw values over two slowly moving loads."""
    rng = np.random.default_rng(seed)
    loads = np.cumsum(rng.normal(0, 0.05, (n, 2)), 0) % 2 - 1
    wide = loads @ mixes[0] + 0.3 * loads[:, :1] ** 2 + rng.normal(0, 0.1, (n, tags))
    narrow = loads @ mixes[1] + rng.normal(0, 0.1, (n, 4))
    return wide.astype(np.float32), narrow.astype(np.float32)


def features(wide: np.ndarray, narrow: np.ndarray, held: np.ndarray | None = None) -> Features:
    """The two tables as model inputs; a tag not `held` is 0 and marked missing."""
    held = np.ones(wide.shape, bool) if held is None else held
    return Features({"historian": np.where(held, wide, 0).astype(np.float32), "aux": narrow},
                    np.ones((len(wide), 2), bool), ("historian", "aux"),
                    channels={"historian": held, "aux": np.ones(narrow.shape, bool)})


def run(tags: int, rates: list[float], draws: int, epochs: int = 15, train_ticks: int = 6000,
        test_ticks: int = 3000) -> dict[str, dict[str, dict[str, float]]]:
    """rate -> dead tags -> {false_alarm_pct, roc_auc}, means over the draws."""
    rng = np.random.default_rng(0)
    mixes = (rng.normal(size=(2, tags)), rng.normal(size=(2, 4)))
    train_w, train_n = ticks(tags, train_ticks, 1, mixes)
    mean_w, std_w, mean_n, std_n = train_w.mean(0), train_w.std(0), train_n.mean(0), train_n.std(0)
    test_w, test_n = ticks(tags, test_ticks, 2, mixes)
    test_w, test_n = (test_w - mean_w) / std_w, (test_n - mean_n) / std_n
    anomalous = np.zeros(test_ticks, bool)
    anomalous[::10] = True
    target = rng.integers(0, tags, test_ticks)
    dead_counts = sorted({0, 1, 3, max(5, tags // 5)} & set(range(tags)))
    modalities = {"historian": ModalitySpec("historian", "tabular", "-", columns=tuple(f"t{i}" for i in range(tags)),
                                            tolerance_us=1),
                  "aux": ModalitySpec("aux", "tabular", "-", columns=("a", "b", "c", "d"), tolerance_us=1)}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for rate in rates:
        found: dict[int, list[tuple[float, float]]] = {k: [] for k in dead_counts}
        for seed in range(draws):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                det = Detector(modalities, small(channel_dropout=rate), epochs=epochs, seed=seed).fit(
                    features((train_w - mean_w) / std_w, (train_n - mean_n) / std_n))
            for k in dead_counts:
                dead = np.random.default_rng([seed, k]).choice(tags, k, replace=False)    # other tags each draw
                held = np.ones(test_w.shape, bool)
                held[:, dead] = False
                wide = test_w.copy()
                live = np.where(np.isin(target, dead), (target + k + 1) % tags, target)   # the anomaly on a live tag
                wide[anomalous, live[anomalous]] += SHIFT
                score = det.decision_function(features(wide, test_n, held))
                found[k].append((float((score[~anomalous] > det.threshold_).mean() * 100),
                                 roc_auc(score, anomalous)))
        out[str(rate)] = {str(k): {"false_alarm_pct": float(np.mean([a for a, _ in v])),
                                   "roc_auc": float(np.mean([b for _, b in v]))} for k, v in found.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25])
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = {}
    for tags in args.tags:
        results[str(tags)] = run(tags, args.rates, args.draws)
        for rate, by_dead in results[str(tags)].items():
            print(f"{tags} tags, channel_dropout {rate}: " + "; ".join(
                f"{k} dead: false alarms {v['false_alarm_pct']:.2f} %, ROC-AUC {v['roc_auc']:.3f}"
                for k, v in by_dead.items()), flush=True)
    write_json(f"{args.out}/dead_tags.json", {"config": vars(args) | {"shift_stds": SHIFT}, "tags": results})


if __name__ == "__main__":
    main()
