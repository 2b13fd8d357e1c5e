"""Evaluation: the scores in the Delta table against the labels - fused and per modality, per anomaly kind.

Prints a table, writes `metrics.json` and a PNG of score vs. labelled anomalies for one entity.
With `baselines=True` it also trains each modality alone (a late-fusion detector: one detector per
modality, never sees the others) on the training days, to show what fusion adds.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import ray

from dmafn.detector import Detector
from dmafn.calibration import Calibration
from dmafn.features import StatisticsFitter, featurize
from dmafn.metrics import point_adjust, point_metrics, pr_auc, roc_auc
from dmafn.model import ModelConfig, model_config
from dmafn.postprocess import best_f1_threshold, to_labels
from dmafn.spec import Spec
from pipelines.align import TIME, label_intervals, label_ticks, to_micros
from pipelines.ingest import entity_string, require_columns
from pipelines.labels import read_labels
from pipelines.postprocess import run_number, smooth_columns
from pipelines.storage import DataError, Storage
from pipelines.ray_runtime import raise_task_error
from pipelines.shards import Shard, list_inputs, plan_shards
from pipelines.train import aligned_batches, split_dates

log = logging.getLogger(__name__)


def read_scores(spec: Spec, storage: Storage, start: dt.date | None = None, end: dt.date | None = None) -> pl.DataFrame:
    uri = storage.delta_uri(spec.score.output)
    try:
        df = pl.read_delta(uri, storage_options=storage.delta_options(spec.score.output))
    except Exception as exc:  # noqa: BLE001 - any reader failure: say which table
        raise DataError(f"scores {spec.score.output}: cannot be read ({exc})") from None
    if start:
        df = df.filter(pl.col("date") >= start.isoformat())
    if end:
        df = df.filter(pl.col("date") <= end.isoformat())
    if df.is_empty():
        raise DataError(f"scores {spec.score.output}: no rows in {start}..{end}")
    return df.sort([*spec.entity, "ts"])


def _grouped_events(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Event-wise precision / recall / F1 (as `dmafn.metrics.event_metrics`) pooled over groups: an event is a
    run of labelled ticks of one group, an alarm a run of flagged ticks; rows in time order within each group.
    Polars window expressions, so the cost grows with the rows, not rows x groups."""
    df = pl.DataFrame({"g": groups, "p": np.asarray(pred, bool), "y": np.asarray(labels, bool)})

    def runs(flag: str, other: str) -> tuple[int, int]:
        found = df.with_columns(run_number(flag, "g").alias("_run")).filter(pl.col(flag)).group_by("g", "_run").agg(pl.col(other).any())
        return found.height, int(found[other].sum())

    events, hits = runs("y", "p")
    alarms, good = runs("p", "y")
    p = good / alarms if alarms else 0.0
    r = hits / events if events else 0.0
    return {"event_precision": p, "event_recall": r, "event_f1": 2 * p * r / (p + r) if p + r else 0.0}


def _row(scores: np.ndarray, labels: np.ndarray, threshold: float | None, groups: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"roc_auc": roc_auc(scores, labels), "pr_auc": pr_auc(scores, labels)}
    if threshold is not None:
        pred = to_labels(scores, threshold)
        out.update(point_metrics(pred, labels))
        out.update(_grouped_events(pred, labels, groups))
        out["f1_point_adjusted"] = point_metrics(point_adjust(pred, labels), labels)["f1"]
        if labels.any() and np.isfinite(scores).any():   # an oracle: chosen with the labels, reported only
            oracle = best_f1_threshold(scores, labels)
            out["oracle_threshold"] = oracle
            out["oracle_f1"] = point_metrics(to_labels(scores, oracle), labels)["f1"]
    return out


def contributing_modalities(scores: pl.DataFrame, spec: Spec) -> list[str]:
    """The modalities with a contribution column holding any value (a relation-only context holds none)."""
    return [m for m in spec.modalities
            if f"score_{m}" in scores.columns and scores[f"score_{m}"].null_count() < scores.height]


def metrics_table(df: pl.DataFrame, spec: Spec, extra: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Metrics per score column and per anomaly kind. `df` holds scores, `label`, `label_kind`."""
    labels = df["label"].to_numpy().astype(bool)
    kinds = df["label_kind"].fill_null("").to_numpy()
    groups = df.select(entity_string(spec.entity)).to_series().to_numpy()
    columns = {"fused": (df["score"].to_numpy(), float(df["threshold"][0]))}
    for m in contributing_modalities(df, spec):
        columns[f"score_{m}"] = (df[f"score_{m}"].cast(pl.Float64).fill_null(np.nan).to_numpy(), None)
    for name, values in (extra or {}).items():
        if not np.isnan(values).all():
            columns[name] = (values, None)
    result: dict[str, Any] = {"ticks": int(len(labels)), "anomalous_ticks": int(labels.sum()), "overall": {},
                              "by_kind": {}}
    for name, (scores, thr) in columns.items():
        result["overall"][name] = _row(scores, labels, thr, groups)
    for kind in sorted(k for k in set(kinds) if k):
        sel = (kinds == kind) | ~labels
        result["by_kind"][kind] = {name: _row(scores[sel], labels[sel], None, groups[sel])
                                   for name, (scores, _) in columns.items()}
    return result


def detection(ticks: pl.DataFrame, labels: pl.DataFrame, spec: Spec) -> dict[str, Any]:
    """How soon the calibrated alarms catch each labelled event: per anomaly kind and overall, the events with at
    least one scored tick, how many raised an alarm inside them, and for those the delay from the event's start to
    its first alarm (median and 90th percentile, minutes) and the share of the event gone by then (median). A
    gradual fault's ROC-AUC counts every tick of its onset, where the fault is still smaller than the noise; the
    delay says what an operator waits. `ticks`: the scored ticks with `is_anomaly` and the tick time column."""
    keys = list(spec.entity)
    intervals = label_intervals(labels, spec, spec.labels.start, spec.labels.end)
    # the first scored tick and the first alarm at or after each event's start (as-of joins per entity: the cost
    # grows with ticks + events, not ticks x events), kept where they fall inside the event
    scored = ticks.select([*keys, pl.col(TIME).alias("_tick")]).sort("_tick")
    alarms = ticks.filter(pl.col("is_anomaly").cast(pl.Boolean)).select([*keys, pl.col(TIME).alias("_alarm")]).sort("_alarm")
    events = (intervals.sort("_s")
              .join_asof(scored, left_on="_s", right_on="_tick", by=keys, strategy="forward", check_sortedness=False)
              .filter(pl.col("_tick") <= pl.col("_e"))
              .join_asof(alarms, left_on="_s", right_on="_alarm", by=keys, strategy="forward", check_sortedness=False)
              .with_columns(pl.when(pl.col("_alarm") <= pl.col("_e")).then(pl.col("_alarm")).alias("_first"))
              .with_columns(((pl.col("_first") - pl.col("_s")) / 60e6).alias("delay_min"),
                            ((pl.col("_first") - pl.col("_s")) / pl.max_horizontal(pl.col("_e") - pl.col("_s"),
                                                                                spec.grain_us)).alias("elapsed")))

    def summary(rows: pl.DataFrame) -> dict[str, Any]:
        found = rows.filter(pl.col("_first").is_not_null())
        delays, elapsed = found["delay_min"].to_numpy(), found["elapsed"].to_numpy()
        return {"events": rows.height, "detected": found.height,
                "median_delay_min": float(np.median(delays)) if delays.size else None,
                "p90_delay_min": float(np.quantile(delays, 0.9)) if delays.size else None,
                "median_elapsed_share": float(np.median(elapsed)) if elapsed.size else None}

    return {"overall": summary(events),
            "by_kind": {kind: summary(events.filter(pl.col("_kind") == kind))
                        for kind in sorted(events["_kind"].unique().to_list())}}


def settle_us(spec: Spec) -> int:
    """How long an event can still move the score after it ends: the longest reach of a modality (its window
    or tolerance) plus the smoothing's settling time (EWMA: until a step's weight is under 5 %; rolling: its
    window), in microseconds."""
    sm = spec.score.smoothing
    ticks = (int(np.ceil(np.log(0.05) / np.log(1 - sm.alpha))) if sm.method == "ewma" and 0 < sm.alpha < 1
             else sm.window if sm.method == "rolling" else 0)
    return max(m.lookback_us for m in spec.modalities.values()) + ticks * spec.grain_us


def alarm_rates(df: pl.DataFrame, spec: Spec, storage: Storage) -> dict[str, Any]:
    """The alarm rate of the scored ticks and the false-alarm rate (alarms on ticks labelled normal) against
    the rate the model version expects: its validation days' alarm rate (`validation_alarm_rate` in the
    manifest's `calibration.validation`: clean days, so every alarm there is a false one). Besides, the false-alarm rate on
    the normal ticks clear of events (more than `settle_us` after the end of the entity's last labelled
    event): the like-for-like comparison with the clean validation days, since right after an event the
    windows still hold its rows and the smoothing its scores."""
    from pipelines.registry import Registry

    alarms = df["is_anomaly"].to_numpy().astype(bool)
    normal = ~df["label"].to_numpy().astype(bool)
    guard = settle_us(spec)
    clear = normal
    if "since_event_us" in df.columns:
        since = df["since_event_us"].fill_null(np.iinfo(np.int64).max).to_numpy()
        clear = normal & (since > guard)
    out: dict[str, Any] = {"alarm_rate": float(alarms.mean()) if alarms.size else 0.0,
                           "false_alarm_rate": float(alarms[normal].mean()) if normal.any() else 0.0,
                           "false_alarm_rate_clear": float(alarms[clear].mean()) if clear.any() else None,
                           "clear_after_minutes": guard / 60e6, "clear_ticks": int(clear.sum()),
                           "expected_false_alarm_rate": {}}
    registry = Registry(spec.registry, storage)
    for version in sorted(df["model_version"].unique().to_list()):
        try:
            manifest = registry.manifest(version)
        except DataError as exc:
            log.warning("model version %s: %s (no expected alarm rate)", version, exc)
            continue
        # read as the version's calibration reads it (older versions kept the summary in `metrics`)
        expected = Calibration.from_dict(manifest["calibration"], validation=manifest.get("metrics")).expected_alarm_rate
        if expected is not None:
            out["expected_false_alarm_rate"][version] = float(expected)
    return out


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: ROC-AUC per score column and kind, and the fused score's F1 at its threshold."""
    names = list(result["overall"])
    kinds = list(result["by_kind"])
    width = max(len(n) for n in names) + 2
    lines = [f"{'ROC-AUC':<{width}}" + "".join(f"{k:>13}" for k in ["overall", *kinds])]
    for n in names:
        cells = [result["overall"][n]["roc_auc"], *[result["by_kind"][k][n]["roc_auc"] for k in kinds]]
        lines.append(f"{n:<{width}}" + "".join(f"{c:>13.3f}" for c in cells))
    f = result["overall"]["fused"]
    lines.append("")
    lines.append(f"fused at the calibrated threshold: precision {f['precision']:.3f}  recall {f['recall']:.3f}  "
                 f"F1 {f['f1']:.3f}  FAR {f['far']:.4f}  MAR {f['mar']:.3f}  PR-AUC {f['pr_auc']:.3f}")
    lines.append(f"  event-wise: precision {f['event_precision']:.3f}  recall {f['event_recall']:.3f}  "
                 f"F1 {f['event_f1']:.3f}   (point-adjusted F1 {f['f1_point_adjusted']:.3f}, shown only beside "
                 f"the point-wise F1 {f['f1']:.3f})")
    if "oracle_f1" in f:
        lines.append(f"  oracle (threshold chosen with the labels, not deployable): best point-wise F1 "
                     f"{f['oracle_f1']:.3f} at {f['oracle_threshold']:.3f} vs the calibrated {f['f1']:.3f}")
    if "alarm_rate" in result:
        expected = result["expected_false_alarm_rate"]
        said = ", ".join(f"{100 * r:.2f} % ({v})" for v, r in expected.items()) or "unknown"
        lines.append(f"  alarms on {100 * result['alarm_rate']:.2f} % of ticks; false alarms on "
                     f"{100 * result['false_alarm_rate']:.2f} % of the ticks labelled normal, expected {said} "
                     "from the validation days")
        if result.get("false_alarm_rate_clear") is not None:
            lines.append(f"  clear of events (normal ticks more than {result['clear_after_minutes']:.0f} min after "
                         f"an event's end: windows' reach + smoothing; {result['clear_ticks']} ticks): false "
                         f"alarms on {100 * result['false_alarm_rate_clear']:.2f} %")
    if result.get("detection"):
        lines.append("  detection at the calibrated threshold (events caught; of those, minutes from the event's start "
                     "to its first alarm, median / p90, and the share of the event gone by then):")
        for kind, d in [("overall", result["detection"]["overall"]), *result["detection"]["by_kind"].items()]:
            lines.append(f"    {kind:<14}{d['detected']:>4}/{d['events']:<4}" + (
                f"  {d['median_delay_min']:6.1f} / {d['p90_delay_min']:6.1f} min  {100 * d['median_elapsed_share']:3.0f} %"
                if d["detected"] else "  none caught"))
    lines.append(f"ticks {result['ticks']}, labelled anomalous {result['anomalous_ticks']}")
    return "\n".join(lines)


def plot_entity(df: pl.DataFrame, spec: Spec, path: Path, entity: str | None = None) -> Path:
    """PNG: fused score, threshold and labelled anomalies (shaded by kind) over time for one entity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = spec.entity[0]
    entity = entity or str(df[key][0])
    one = df.filter(pl.col(key).cast(pl.String) == entity).sort("ts")
    ts = one["ts"].to_numpy()
    fig, axes = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    axes[0].plot(ts, one["score"].to_numpy(), lw=0.7, color="black", label="fused score")
    axes[0].axhline(float(one["threshold"][0]), color="red", ls="--", lw=1, label="threshold")
    colors = plt.cm.tab10.colors
    kinds = sorted(k for k in one["label_kind"].unique().to_list() if k)
    for ax in axes:
        for i, kind in enumerate(kinds):
            mask = (one["label_kind"] == kind).to_numpy()
            ax.fill_between(ts, 0, 1, where=mask, transform=ax.get_xaxis_transform(), color=colors[i % 10],
                            alpha=0.25, label=kind if ax is axes[0] else None)
    for m in spec.modalities:
        if f"score_{m}" in one.columns:
            axes[1].plot(ts, one[f"score_{m}"].cast(pl.Float64).to_numpy(), lw=0.6, label=f"score_{m}")
    axes[0].set_title(f"{spec.name}: {entity}")
    axes[0].set_ylabel("fused score")
    axes[1].set_ylabel("per-modality contribution")
    axes[0].legend(loc="upper right", fontsize=8, ncol=4)
    axes[1].legend(loc="upper right", fontsize=8, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@ray.remote(num_cpus=1)
def _shard_aligned(shard: Shard, spec: Spec) -> pa.Table | None:
    batches, _, _ = aligned_batches(shard, spec, Storage.from_spec(spec.storage))
    tables = [b.to_arrow() for b in batches]
    return pa.concat_tables(tables) if tables else None


def aligned_rows(spec: Spec, days: list[dt.date], storage: Storage) -> pl.DataFrame:
    """The aligned rows of `days`, gathered here: only for the in-memory baselines of a report (an evaluation
    window of a demo-sized fleet), never on a job's path."""
    files = list_inputs(spec, days, storage)
    require_columns(spec, storage, files)
    tables = [t for t in (raise_task_error(r) for r in [_shard_aligned.remote(s, spec)
                                                        for s in plan_shards(spec, days, files)]) if t is not None]
    if not tables:
        raise DataError(f"spec '{spec.name}': no data for {days[0]}..{days[-1]}")
    return pl.from_arrow(pa.concat_tables(tables, promote_options="permissive")).sort([*spec.entity, TIME])


def single_modality_baselines(spec: Spec, storage: Storage, scores: pl.DataFrame) -> dict[str, np.ndarray]:
    """Each modality alone: a late-fusion detector trained on the training days, scored on the scored ticks."""
    train_days, _ = split_dates(spec)
    dates = sorted({dt.date.fromisoformat(d) for d in scores["date"].unique().to_list()})
    cfg = model_config(spec.model)
    train_al, eval_al = aligned_rows(spec, train_days, storage), aligned_rows(spec, dates, storage)
    stats = StatisticsFitter(spec).add(train_al.to_arrow()).result()
    det = Detector(spec.modalities, ModelConfig(**{**cfg.__dict__, "fusion": "late", "detector": "autoencoder"}),
                   epochs=spec.train.epochs, vote=spec.model.vote, seed=spec.train.seed)
    det.fit(featurize(train_al.to_arrow(), spec, stats))
    keyed = scores.select([*spec.entity, "ts"]).with_columns(to_micros(pl.col("ts")).alias(TIME))
    eval_al = keyed.join(eval_al.drop("ts"), on=[*spec.entity, TIME], how="left")
    record = det.score_record(featurize(eval_al.to_arrow(), spec, stats))
    out = keyed.with_columns([pl.Series(f"alone_{m}", record.contributions[:, i]).fill_nan(None)
                              for i, m in enumerate(record.modalities)])
    out = smooth_columns(out, [f"alone_{m}" for m in record.modalities], spec)
    return {f"alone_{m}": out[f"alone_{m}"].cast(pl.Float64).fill_null(np.nan).to_numpy() for m in record.modalities}


def evaluate(spec: Spec, *, start: dt.date | None = None, end: dt.date | None = None, report_dir: str | None = None,
             baselines: bool = False) -> dict[str, Any]:
    """Metrics of the scored dates in [start, end] against the labels; prints and writes the report."""
    storage = Storage.from_spec(spec.storage)
    scores = read_scores(spec, storage, start, end)
    labels = read_labels(spec, storage)
    df = label_ticks(scores.with_columns(to_micros(pl.col("ts")).alias(TIME)), labels, spec, spec.labels.start,
                     spec.labels.end).sort([*spec.entity, "ts"])
    extra = single_modality_baselines(spec, storage, df) if baselines else None
    result = metrics_table(df, spec, extra)
    result["dates"] = sorted(df["date"].unique().to_list())
    result |= alarm_rates(df, spec, storage)
    result["detection"] = detection(df, labels, spec)
    text = format_table(result)
    print(text)
    if report_dir:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
        (out / "metrics.txt").write_text(text + "\n")
        result["plot"] = str(plot_entity(df, spec, out / "scores.png"))
        print(f"report: {out / 'metrics.txt'}, plot: {result['plot']}")
    return result
