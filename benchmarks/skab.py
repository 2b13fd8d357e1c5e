"""Benchmark 2: SKAB (Skoltech Anomaly Benchmark), real pump-rig sensors, with its own protocol.

    python -m benchmarks.skab PATH/TO/skab --out benchmarks/results [--configs attention+autoencoder,...]

The four sensor groups are four modalities (vibration, electrical, hydraulic, thermal). Each labelled
file becomes an entity; its rows are written as hive-partitioned Parquet per modality with a spec, and go
through the same spec parsing, alignment (`pipelines.align`), statistics and featurisation as any
user's data, then an in-memory DMAFN `Detector` (the pipeline's scoring path without Ray).

Protocol (SKAB, outlier detection): each file's first 400 rows are its only training data; labels are
never used for training or for the threshold (fitted on the last 20 % of those 400 rows); point-wise F1,
FAR, MAR without point adjustment, pooled over files two ways: over the test parts only (the rows after
the first 400), and over whole files with the training rows predicted too - how SKAB's own evaluation
code computes its leaderboard (`core/metrics.py` `chp_score` sums each whole file's confusion matrix),
so only that second evaluation is comparable with the leaderboard's rows.

`--preregistered [NAME]` runs settings fixed in advance (`PREREGISTERED_RUNS`, below, each committed before
its run; NAME defaults to the first, `preregistered`):
every setting comes from outside SKAB's test parts - the spec's default model, the demo fleet's
calibration that day, the benchmark's training schedule, and the series transform chosen by `transform:
auto` from the training rows of all files (the median file's drift; no label read) - and writes
`skab-preregistered.json`. `--preregistered preregistered-relations` runs the second set fixed in advance
(`PREREGISTERED_RELATIONS`: a slow context with channel relations on every group) into
`skab-preregistered-relations.json`, `preregistered-relation-only` the third (`PREREGISTERED_RELATION_ONLY`:
the same with today's code and generated-spec smoothing), `preregistered-tail` the fourth
(`PREREGISTERED_TAIL`: the third with contributions on their tail surprise), `preregistered-cross` the fifth
(`PREREGISTERED_CROSS`: the fourth's settings under the code with cross-modal relations), `preregistered-robust`
the sixth (`PREREGISTERED_ROBUST`: the fifth's settings under the code whose relations are refitted robustly),
`preregistered-knee` the seventh (`PREREGISTERED_KNEE`: the sixth's with the smoothing's knee at 4),
`preregistered-again` the eighth (`PREREGISTERED_AGAIN`: the first's settings under the code of 2026-12-06), each
into `skab-NAME.json`. (`--preregistered-relations` and `--preregistered-relation-only` still name the second and
third.)
"""
from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads

from benchmarks.common import pipeline_model_config, write_json
from dmafn.detector import Detector
from dmafn.features import StatisticsFitter, featurize, fit_training_statistics
from dmafn.metrics import point_metrics, roc_auc
from dmafn.postprocess import best_f1_threshold, ewma, fit_threshold, to_labels
from dmafn.spec import CONTRIBUTION_SCALES, ModelSpec, load_spec
from pipelines.align import TIME, align, alignment_input, to_micros

GROUPS = {"vibration": ["Accelerometer1RMS", "Accelerometer2RMS"], "electrical": ["Current", "Voltage"],
          "hydraulic": ["Pressure", "Volume Flow RateRMS"], "thermal": ["Temperature", "Thermocouple"]}
TRAIN_ROWS = 400
VALIDATION_FRACTION = 0.2                                   # of the training rows: held out for the threshold
VALIDATION_ROWS = int(TRAIN_ROWS * VALIDATION_FRACTION)
ORACLE_MAX_FAR = 0.10                                       # the target's false-alarm limit, for the oracle bound
LEADERBOARD = [("Conv-AE", 0.78, 13.55, 28.02), ("MSET", 0.78, 39.73, 14.13), ("T-squared+Q (PCA)", 0.76, 26.62, 24.92),
               ("LSTM-AE", 0.74, 29.96, 25.92), ("T-squared", 0.66, 19.21, 42.60), ("LSTM-VAE", 0.56, 9.13, 55.03),
               ("Vanilla LSTM", 0.54, 12.54, 59.53), ("Vanilla AE", 0.39, 2.59, 75.15), ("MSCRED", 0.36, 49.94, 69.88),
               ("Isolation forest", 0.29, 2.56, 82.89)]

# Settings fixed before the run that reports them (written 2026-11-30, before any run with them; SKAB's test
# labels had been seen in earlier runs with other settings, listed in docs/benchmarks.md). Where each comes from:
PREREGISTERED = {
    "groups": ",".join(GROUPS),            # all four sensor groups, as the data come
    "window": 10,                          # the benchmark's window since its first version
    "transform": "auto",                   # every group: level or centered per channel, chosen by each channel's
                                           # drift over the training rows (dmafn.features.auto_transforms)
    "configs": "attention+autoencoder",    # the spec's default model (ModelSpec: attention fusion, autoencoder)
    "threshold": "pot", "risk": 1e-3,      # the demo fleet's calibration that day (`dmafn generate`'s spec;
                                           # it moved to risk 3e-3 after this run - SKAB was not rerun)
    "alpha": 0.3,                          # the demo fleet's EWMA smoothing
    "epochs": 30,                          # the benchmark's training schedule since its first version
}

# The second run fixed in advance (committed before it ran), after the channel relations of a slow context
# landed: the first run's settings, with what the generated specs do today - the demo fleet's calibration now
# (POT risk 3e-3, EWMA 0.3) and a slow context on every group of 60 grains (the generated specs give `process`
# 60 x its 1 min grain; here 60 x 1 s), whose channel relations add to each group's error. Nothing here was
# chosen on SKAB; the first run's result stays in its own file.
PREREGISTERED_RELATIONS = {**PREREGISTERED, "risk": 3e-3, "context": 60}

# The third run fixed in advance (written 2026-12-01 and committed before it ran): the second run's settings
# with what the generated specs and the code do today - a context with channel relations speaks only through
# them (the model no longer sees the context view; chosen on the `--slow-drifts` fleet and the demo) and
# scores are smoothed with EWMA alpha 0.5 (chosen on the same fleets). Nothing here was chosen on SKAB; the
# earlier runs' files stay as they are.
PREREGISTERED_RELATION_ONLY = {**PREREGISTERED_RELATIONS, "alpha": 0.5}

# The fourth run fixed in advance (written 2026-12-01 and committed before it ran): the third run's settings
# with what the generated specs do since: each group's contribution voted on its tail surprise among the
# held-out training rows' scores (`contribution_scale: tail`; chosen on the `--gradual` and `--slow-drifts`
# fleets, seeds 1-3, and the demo). Nothing here was chosen on SKAB; the earlier runs' files stay as they are.
PREREGISTERED_TAIL = {**PREREGISTERED_RELATION_ONLY, "contribution_scale": "tail"}

# The fifth run fixed in advance (written 2026-12-02 and committed before it ran): the fourth run's settings,
# unchanged, under today's code, where each group's channel relations are also fitted across groups - with the
# other three groups' window means beside (cross-modal relations; chosen on the `--gradual` fleet, seeds 1-3, and
# the demo, three training draws each). Nothing here was chosen on SKAB; the earlier runs' files stay as they are.
PREREGISTERED_CROSS = dict(PREREGISTERED_TAIL)

# The sixth run fixed in advance (written 2026-12-03 and committed before it ran): the fifth run's settings,
# unchanged, under today's code, where each channel relation is refitted on the training rows within 4 residual
# stds of its first fit (a trimmed least squares against incidents left in the training rows - SKAB's other/2
# holds 296 anomalous rows among its 400; measured on the `--gradual` fleet with anomalous training days, level on
# clean ones). The encoding distance chosen since went to the camera only, so no group gets it. Nothing here was
# chosen on SKAB; the earlier runs' files stay as they are.
PREREGISTERED_ROBUST = dict(PREREGISTERED_CROSS)

# The seventh run fixed in advance (written 2026-12-03 and committed before it ran): the sixth run's settings with
# the smoothing's knee the generated specs use since (`score.smoothing.knee: 4` - a score over 4 goes into the EWMA
# as 4 + ln(1 + excess); chosen on the `--gradual` fleet, seeds 1-3, and the demo, three training draws each).
# The T^2 reference is smoothed as before (its statistic is not in surprise units). Nothing here was chosen on
# SKAB; the earlier runs' files stay as they are.
PREREGISTERED_KNEE = {**PREREGISTERED_ROBUST, "knee": 4.0}

# The eighth run fixed in advance (written 2026-12-06 and committed before it ran): the first run's settings,
# unchanged, under today's code. Since the first run the defaults it takes changed, each chosen on the design fleets
# and none on SKAB: each group's error read against its level at the operating state (`state_baseline`,
# 2026-12-02), that state reading each series channel's swing beside its window mean (`window_spread`, 2026-12-03),
# training hiding each channel at random (`channel_dropout: 0.25`, 2026-12-06). Why the first run's settings and
# not the seventh's: runs two to seven each added a slow context with channel relations and did worse than the
# first - a choice made knowing those runs' results, so read this run as the first re-measured under today's
# defaults, not as a blind setting. The earlier runs' files stay as they are.
PREREGISTERED_AGAIN = dict(PREREGISTERED)

# The ninth run fixed in advance (written 2026-12-08 and committed before it ran): the first run's settings,
# unchanged, under the code whose POT threshold, where fewer than 20 validation scores lie over its 98 % level, fits
# an exponential tail over the highest 20 (`dmafn.postprocess.pot_threshold`). Each file here holds 80 held-out rows
# (1.6 over that level), so every earlier run's threshold was the largest held-out score, whatever the risk; the
# rule's constants (20 scores, shape 0) were set before any run and checked only by a simulation with no model
# (`benchmarks/small_validation.py`), and it changes no generated fleet. Why it was looked at: the eighth run's
# oracle bound - one shift of every file's threshold, chosen with the test labels - reached F1 0.783 / FAR 8.9 % /
# MAR 25.0 % on whole files, past Conv-AE on all three, so that run's ranking would have done and its thresholds
# did not. That reading of a label-chosen bound is why the threshold for few scores was mended now: read this run as
# the mend measured once, not as a blind setting. The T^2 reference's threshold takes the same rule. The earlier
# runs' files stay as they are.
PREREGISTERED_FEW_SCORES = dict(PREREGISTERED)

PREREGISTERED_RUNS = {"preregistered": PREREGISTERED, "preregistered-relations": PREREGISTERED_RELATIONS,
                      "preregistered-relation-only": PREREGISTERED_RELATION_ONLY,
                      "preregistered-tail": PREREGISTERED_TAIL, "preregistered-cross": PREREGISTERED_CROSS,
                      "preregistered-robust": PREREGISTERED_ROBUST, "preregistered-knee": PREREGISTERED_KNEE,
                      "preregistered-again": PREREGISTERED_AGAIN,
                      "preregistered-few-scores": PREREGISTERED_FEW_SCORES}


def load_files(root: Path) -> dict[str, pd.DataFrame]:
    files = sorted(p for folder in ("valve1", "valve2", "other") for p in (root / folder).glob("*.csv"))
    if not files:
        raise SystemExit(f"{root}: no SKAB CSV files under valve1/, valve2/, other/")
    return {f"{p.parent.name}/{p.stem}": pd.read_csv(p, sep=";", parse_dates=["datetime"]) for p in files}


def write_lake(files: dict[str, pd.DataFrame], root: Path, window_s: int, groups: list[str] | None = None,
               transforms: dict[str, str] | None = None, context_s: int = 0) -> Path:
    """Each sensor group as a modality table (hive-partitioned Parquet) and the spec describing them;
    `transforms` sets a sensor group's series transform (level, centered, difference); `context_s` > 0 gives
    every group a slow context of that many seconds (and so its channel relations)."""
    frames = []
    for name, df in files.items():
        frame = df.rename(columns={"datetime": "ts"}).assign(file=name)
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    data["ts"] = data["ts"].dt.tz_localize("UTC")
    data["date"] = data["ts"].dt.strftime("%Y-%m-%d")
    modalities = {}
    for group, cols in GROUPS.items():
        if groups and group not in groups:
            continue
        table = pa.Table.from_pandas(data[["file", "ts", *cols, "date"]], preserve_index=False)
        pads.write_dataset(table, root / "raw" / group, format="parquet", partitioning=["date"],
                           partitioning_flavor="hive", existing_data_behavior="delete_matching")
        modalities[group] = {"kind": "timeseries", "path": str(root / "raw" / group), "columns": cols,
                             "period": "1s", "window": f"{window_s}s",
                             "transform": (transforms or {}).get(group, "level")}
        if context_s:
            modalities[group]["context"] = {"window": f"{context_s}s"}
    import yaml

    spec = {"name": "skab", "entity": "file", "time": "ts", "grain": "1s", "partition": "date",
            "modalities": modalities, "train": {"start": "2020-01-01", "end": "2020-01-01"},
            "registry": str(root / "models"), "score": {"output": str(root / "scores")}}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def aligned_file(spec, tables: dict[str, pl.DataFrame], name: str, df: pd.DataFrame) -> pl.DataFrame:
    """Ticks at the file's own rows (1 Hz), every modality aligned as of each tick."""
    ticks = pl.DataFrame({"file": [name] * len(df), "ts": df["datetime"].dt.tz_localize("UTC")})
    ticks = ticks.select("file", to_micros(pl.col("ts")).alias(TIME)).unique().sort(TIME)
    own = {m: t.filter(pl.col("file") == name) for m, t in tables.items()}
    return align(ticks, own, spec)


@dataclass
class FileSplit:
    """One SKAB file through the pipeline code: its first 400 aligned rows (training) and the rest (test)."""

    name: str
    train: pl.DataFrame
    test: pl.DataFrame
    stats: dict

    @property
    def labels(self) -> np.ndarray:
        return self.test["anomaly"].fill_null(0).to_numpy()

    @property
    def train_labels(self) -> np.ndarray:
        return self.train["anomaly"].fill_null(0).to_numpy()


def file_splits(spec, files, tables) -> list[FileSplit]:
    """Each file's training and test rows and its statistics. A transform 'auto' is chosen as `dmafn train`
    chooses it for a fleet - by the median file's drift over the training rows of all files (each file an
    entity; labels unused) - and each file's statistics are then fitted on its own training rows."""
    aligned = []
    for name, df in files.items():
        al = aligned_file(spec, tables, name, df)
        label = pl.DataFrame({"_t": df["datetime"].dt.tz_localize("UTC").dt.as_unit("us").astype("int64"),
                              "anomaly": df["anomaly"].astype(int)})
        al = al.join(label.unique("_t"), on="_t", how="left").sort("_t")
        aligned.append((name, al.head(TRAIN_ROWS), al.slice(TRAIN_ROWS)))
    fleet = StatisticsFitter(spec)
    for _, train, _ in aligned:
        fleet.add(train.drop("anomaly").to_arrow())
    chosen = {m: e["channel_transforms"] for m, e in fleet.result()["modalities"].items() if "channel_transforms" in e}
    return [FileSplit(name, train, test, fit_training_statistics(spec, train.to_arrow(), chosen))   # as `dmafn train`
            for name, train, test in aligned]


def _metrics_and_bound(pred: np.ndarray, margin: np.ndarray, y: np.ndarray) -> dict:
    m = point_metrics(pred, y)
    shift = best_f1_threshold(margin, y, max_far=ORACLE_MAX_FAR)
    o = point_metrics(to_labels(margin, shift), y)
    return {"f1": m["f1"], "far": 100 * m["far"], "mar": 100 * m["mar"],
            "oracle_far10": {"f1": o["f1"], "far": 100 * o["far"], "mar": 100 * o["mar"], "shift": shift}}


def pooled(preds: list, scores: list, margins: list, splits: list[FileSplit], train_preds: list,
           train_margins: list) -> dict:
    """SKAB's pooled point-wise metrics over all files' test parts, and an oracle bound: the best F1 with
    FAR <= 10 % that one global shift of every file's own threshold could give (`margins`: each score
    minus its file's threshold; labels choose the shift, so it is reported, never used). Under
    `leaderboard_evaluation` the same over whole files, the training rows predicted by the same model and
    threshold, as SKAB's evaluation code pools them for its leaderboard."""
    pred, s, margin = np.concatenate(preds), np.concatenate(scores), np.concatenate(margins)
    y = np.concatenate([f.labels for f in splits])
    whole_y = np.concatenate([np.concatenate([f.train_labels, f.labels]) for f in splits])
    whole_pred = np.concatenate([np.concatenate([a, b]) for a, b in zip(train_preds, preds)])
    whole_margin = np.concatenate([np.concatenate([a, b]) for a, b in zip(train_margins, margins)])
    return {**_metrics_and_bound(pred, margin, y), "roc_auc_pooled": roc_auc(s, y),
            "roc_auc_by_file": {f.name: roc_auc(sc, f.labels) for f, sc in zip(splits, scores)},
            "leaderboard_evaluation": _metrics_and_bound(whole_pred, whole_margin, whole_y)}


@dataclass(frozen=True)
class ThresholdRule:
    """How each file's threshold is fitted on its held-out training scores (smoothed)."""

    method: str = "quantile"
    quantile: float = 0.99
    risk: float = 1e-3

    def fit(self, scores: np.ndarray) -> float:
        return fit_threshold(scores, self.method, quantile=self.quantile, risk=self.risk)


def run_config(spec, splits: list[FileSplit], fusion: str, detector: str, epochs: int, rule: ThresholdRule,
               alpha: float, contribution_scale: str = ModelSpec.contribution_scale, knee: float | None = None) -> dict:
    preds, scores, margins, contributions, train_preds, train_margins = [], [], [], [], [], []
    for f in splits:
        # the detector's calibration: the threshold is fitted on EWMA-smoothed scores of the held-out last
        # training rows (no labels), and every score it gives is smoothed the same way
        det = Detector(spec.modalities, pipeline_model_config(fusion=fusion, detector=detector),
                       epochs=epochs, batch_size=32, learning_rate=2e-3, threshold=rule.method,
                       quantile=rule.quantile, risk=rule.risk,
                       smoothing="ewma", alpha=alpha, knee=knee, validation_fraction=VALIDATION_FRACTION, seed=0,
                       contribution_scale=contribution_scale)
        det.fit(featurize(f.train.to_arrow(), spec, f.stats))
        threshold = det.threshold_
        train_score = det.decision_scores_                   # for the leaderboard's whole-file evaluation
        train_preds.append(train_score > threshold)
        train_margins.append(train_score - threshold)
        test = featurize(f.test.to_arrow(), spec, f.stats)
        score = det.decision_function(test)
        contributions.append(det.score_record(test, smoothed=False).contributions)
        preds.append(score > threshold)
        scores.append(score)
        margins.append(score - threshold)                   # scores are log-scale already
    result = pooled(preds, scores, margins, splits, train_preds, train_margins)
    contrib, y = np.concatenate(contributions), np.concatenate([f.labels for f in splits])
    # a context view that speaks only through its relations has no contribution of its own: not listed
    result["roc_auc_by_modality"] = {name: roc_auc(contrib[:, i], y) for i, name in enumerate(spec.modalities)
                                     if np.isfinite(contrib[:, i]).any()}
    return result


def run_reference(spec, splits: list[FileSplit], rule: ThresholdRule, alpha: float) -> dict:
    """A classical reference on the same inputs and protocol: Hotelling T^2 of the per-channel window
    means (the featurized model inputs), mean and covariance (shrunk towards its diagonal) from the first
    320 rows, threshold from the next 80, EWMA-smoothed like DMAFN's scores."""
    preds, scores, margins, train_preds, train_margins = [], [], [], [], []
    n_fit = TRAIN_ROWS - VALIDATION_ROWS

    def log_ratio(score: np.ndarray, threshold: float) -> np.ndarray:     # T^2 > 0: margins as ratios
        return np.log(np.maximum(score, 1e-12)) - np.log(max(threshold, 1e-12))

    def window_means(table: pl.DataFrame, stats: dict) -> np.ndarray:
        feats = featurize(table.to_arrow(), spec, stats)
        return np.concatenate([feats.inputs[m].mean(1) for m in feats.modalities], 1).astype(np.float64)

    for f in splits:
        x_train, x_test = window_means(f.train, f.stats), window_means(f.test, f.stats)
        fit = x_train[:n_fit]
        mean, cov = fit.mean(0), np.cov(fit.T)
        cov = 0.8 * cov + 0.2 * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(mean))
        inv = np.linalg.inv(cov)

        def t2(x: np.ndarray) -> np.ndarray:
            return np.einsum("ij,jk,ik->i", x - mean, inv, x - mean)

        threshold = rule.fit(ewma(t2(x_train[n_fit:]), alpha))
        score = ewma(t2(x_test), alpha)
        preds.append(score > threshold)
        scores.append(score)
        margins.append(log_ratio(score, threshold))
        train_score = ewma(t2(x_train), alpha)
        train_preds.append(train_score > threshold)
        train_margins.append(log_ratio(train_score, threshold))
    return pooled(preds, scores, margins, splits, train_preds, train_margins)


def _both_text(r: dict) -> str:
    w = r["leaderboard_evaluation"]
    return (f"whole files F1 {w['f1']:.3f} FAR {w['far']:5.2f} % MAR {w['mar']:5.2f} %; "
            f"test parts F1 {r['f1']:.3f} FAR {r['far']:5.2f} % MAR {r['mar']:5.2f} %")


def _oracle_text(r: dict) -> str:
    o = r["oracle_far10"]
    hardest = sorted((auc, name) for name, auc in r["roc_auc_by_file"].items() if np.isfinite(auc))[:3]
    return (f"oracle bound at FAR <= 10 % on the test parts: F1 {o['f1']:.3f}, FAR {o['far']:.1f} %, "
            f"MAR {o['mar']:.1f} %; "
            "lowest ROC-AUC within a file: " + ", ".join(f"{name} {auc:.2f}" for auc, name in hardest))


def transforms_chosen(spec, splits: list[FileSplit]) -> dict[str, dict[str, int]]:
    """Per channel of every modality whose transform is 'auto': how many files' training rows chose each."""
    chosen: dict[str, dict[str, int]] = {}
    for f in splits:
        for name, entry in f.stats["modalities"].items():
            for column, transform in zip(spec.modalities[name].columns, entry.get("channel_transforms", [])):
                counts = chosen.setdefault(f"{name}.{column}", {})
                counts[transform] = counts.get(transform, 0) + 1
    return chosen


def print_transforms(spec, splits: list[FileSplit]) -> None:
    chosen = transforms_chosen(spec, splits)
    if chosen:
        print("transform 'auto', chosen from the training rows of all files (the median file's drift; files per choice): "
              + "; ".join(f"{channel} " + ", ".join(f"{t} {n}" for t, n in sorted(c.items()))
                          for channel, c in chosen.items()), flush=True)


def _rule_text(rule: ThresholdRule) -> str:
    return f"POT (risk {rule.risk:g})" if rule.method == "pot" else f"{rule.quantile:.2f}-quantile"


def _print_table(rows: list[tuple[str, dict]], published: list | None = None) -> None:
    print(f"{'algorithm':<34}{'F1':>6}{'FAR %':>9}{'MAR %':>9}")
    table = [(name, r["f1"], r["far"], r["mar"]) for name, r in rows] + (published or [])
    for name, f1, far, mar in sorted(table, key=lambda r: -r[1]):
        print(f"{name:<34}{f1:>6.2f}{far:>9.2f}{mar:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("skab", type=Path, help="the SKAB folder (with valve1/, valve2/, other/)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--configs", default="attention+autoencoder,gated+autoencoder,late+autoencoder",
                        help="comma-separated fusion+detector pairs ('' for the reference row only)")
    parser.add_argument("--window", type=int, default=10, help="seconds of each sensor group per tick")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threshold", choices=("quantile", "pot"), default="quantile",
                        help="how each file's threshold is fitted on its held-out training scores")
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--risk", type=float, default=1e-3, help="--threshold pot: the exceedance probability")
    parser.add_argument("--alpha", type=float, default=0.1, help="EWMA smoothing of scores (causal)")
    parser.add_argument("--knee", type=float, default=None,
                        help="the smoothing's knee for DMAFN's scores (score.smoothing.knee; default none)")
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help="comma-separated sensor groups used as modalities (an ablation when not all four)")
    parser.add_argument("--transform", default="thermal=centered",
                        help="comma-separated GROUP=TRANSFORM (level, centered, difference, auto), or one TRANSFORM "
                             "for every group; default: the thermal group as each window minus its mean "
                             "(temperatures drift as the rig warms up); '' for levels everywhere")
    parser.add_argument("--context", type=int, default=0,
                        help="seconds of slow context per sensor group, with its channel relations (0: none)")
    parser.add_argument("--contribution-scale", default=ModelSpec.contribution_scale, choices=CONTRIBUTION_SCALES,
                        help="the units each group's contribution is voted in (model.contribution_scale)")
    parser.add_argument("--preregistered", nargs="?", const="preregistered", choices=list(PREREGISTERED_RUNS),
                        help="run settings fixed in advance (PREREGISTERED_RUNS; default the first; the options "
                             "above are ignored)")
    parser.add_argument("--preregistered-relations", dest="preregistered", action="store_const",
                        const="preregistered-relations", help="the same as --preregistered preregistered-relations")
    parser.add_argument("--preregistered-relation-only", dest="preregistered", action="store_const",
                        const="preregistered-relation-only",
                        help="the same as --preregistered preregistered-relation-only")
    parser.add_argument("--transforms-only", action="store_true",
                        help="print what `transform: auto` chooses from each file's training rows and stop "
                             "(no labels read)")
    args = parser.parse_args()
    fixed = args.preregistered                                                # settings fixed in advance, if any
    if fixed:
        for option, value in PREREGISTERED_RUNS[fixed].items():
            setattr(args, option, value)
    transforms = {g: args.transform for g in GROUPS} if args.transform and "=" not in args.transform \
        else dict(kv.split("=", 1) for kv in args.transform.split(",") if kv)
    unknown = set(transforms) - set(GROUPS)
    if unknown:
        parser.error(f"--transform names unknown sensor groups {sorted(unknown)} (groups: {', '.join(GROUPS)})")
    t0 = time.time()
    files = load_files(args.skab)
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(write_lake(files, Path(tmp), args.window, args.groups.split(","), transforms, args.context))
        tables = {}
        for name, m in spec.modalities.items():
            raw = pl.from_arrow(pads.dataset(m.path, format="parquet", partitioning="hive").to_table())
            tables[name] = alignment_input(raw, spec, m)
        splits = file_splits(spec, files, tables)
        print_transforms(spec, splits)
        if args.transforms_only:
            return
        rule = ThresholdRule(args.threshold, args.quantile, args.risk)
        reference = run_reference(spec, splits, rule, args.alpha)
        print(f"reference T^2 of window means  {_both_text(reference)}  (pooled ROC-AUC of the test parts "
              f"{reference['roc_auc_pooled']:.3f}; {_oracle_text(reference)})", flush=True)
        results = {}
        for pair in filter(None, args.configs.split(",")):
            fusion, detector = pair.split("+")
            start = time.time()
            results[pair] = run_config(spec, splits, fusion, detector, args.epochs, rule, args.alpha,
                                       args.contribution_scale, args.knee)
            r = results[pair]
            print(f"DMAFN {pair:<26} {_both_text(r)}  (pooled ROC-AUC of the test parts "
                  f"{r['roc_auc_pooled']:.3f}; by modality "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["roc_auc_by_modality"].items())
                  + f"; {_oracle_text(r)}; {time.time() - start:.0f}s)", flush=True)
    print(f"\nSKAB outlier detection, {len(files)} files, first {TRAIN_ROWS} rows of each for training, "
          f"window {args.window}s, groups {args.groups}, transforms {args.transform or 'none'}, "
          f"threshold: {_rule_text(rule)} of held-out training scores, EWMA alpha {args.alpha:g}"
          + (f", context {args.context}s" if args.context else "")
          + (f", DMAFN's smoothing knee {args.knee:g}" if args.knee is not None else "")
          + (f", contributions on their {args.contribution_scale} scale" if args.contribution_scale != parser.get_default("contribution_scale") else "")
          + (" (the preregistered settings)" if fixed else ""))
    ours = [*((f"DMAFN {k}", v) for k, v in results.items()), ("(reference: T^2 of window means)", reference)]
    print("\nWhole files pooled, training rows included (how SKAB's code computes the leaderboard rows):")
    _print_table([(name, r["leaderboard_evaluation"]) for name, r in ours], LEADERBOARD)
    print("\nTest parts only (the rows after each file's first 400; the leaderboard has no such rows):")
    _print_table(ours)
    print("\nOracle bound (not a result: the labels choose one global shift of every file's threshold): "
          "the best F1 any such shift gives with FAR <= 10 %, whole files | test parts")
    for name, r in ours:
        whole, test = r["leaderboard_evaluation"]["oracle_far10"], r["oracle_far10"]
        print(f"{name:<34}{whole['f1']:>6.2f}{whole['far']:>9.2f}{whole['mar']:>9.2f}   |"
              f"{test['f1']:>6.2f}{test['far']:>9.2f}{test['mar']:>9.2f}")
    tag = "".join(f"-{g}_{t}" for g, t in sorted(transforms.items()) if t != "level")
    if args.threshold != parser.get_default("threshold"):
        tag += f"-{args.threshold}{args.risk:g}"
    for option in ("quantile", "alpha", "epochs", "context"):     # a run with other settings gets its own file
        if getattr(args, option) != parser.get_default(option):
            tag += f"-{option}{getattr(args, option):g}"
    if args.contribution_scale != parser.get_default("contribution_scale"):
        tag += f"-{args.contribution_scale}"
    if args.knee is not None:
        tag += f"-knee{args.knee:g}"
    if not results:
        tag += "-reference_only"
    elif args.configs != parser.get_default("configs"):   # other pairs: their own file, the defaults' stays
        tag += "-" + "_".join(pair.replace("+", "-") for pair in results)
    name = f"skab-{args.groups.replace(',', '_')}-w{args.window}{tag}.json"
    if fixed:
        name = f"skab-{fixed}.json"
    write_json(f"{args.out}/{name}", {"args": {k: str(v) for k, v in vars(args).items()}, "dmafn": results,
                                         "transforms_chosen": transforms_chosen(spec, splits),
                                         "reference_t2_window_means": reference, "leaderboard": LEADERBOARD,
                                         "seconds": time.time() - t0,
                                         "date": dt.date.today().isoformat()})


if __name__ == "__main__":
    main()
