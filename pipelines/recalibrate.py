"""Recalibration: a model version's threshold and smoothing fitted again, without training.

A version's calibration - each modality's contribution scale, the smoothing per entity, the threshold - is fitted on
its validation days when it trains, with the spec's `score.threshold` and `score.smoothing` of that time, so editing
them later changes no score (`dmafn score` names such edits). `recalibrate` fits the calibration again as training's
last step does (`pipelines.train.fit_calibration`: the validation shards scored by the version's network in Ray tasks,
the driver given counts and a few values), on the version's validation days or on days given, with the spec's
`score.threshold` and `score.smoothing`, and saves a new version: the same weights and statistics, the new
calibration, and the spec's threshold and smoothing in the version's spec. Refitted on the same days with the same
settings, the calibration is the version's own to the digit.

    version V + spec's score.threshold/smoothing -> validation days' shards scored (Ray tasks) -> calibration ->
    new version (LATEST): V's weights and statistics
"""
from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, replace

from dmafn.calibration import Calibration
from dmafn.spec import Spec, ThresholdSpec
from pipelines.ingest import entity_casts, require_columns
from pipelines.registry import Registry
from pipelines.score import reading_spec
from pipelines.shards import list_inputs, plan_shards, require_data, require_each_modality
from pipelines.staging import Staging
from pipelines.statistics import BucketStatistics, keys_sliceable
from pipelines.storage import DataError, Storage
from pipelines.train import classifier_threshold_lines, fit_calibration, known_incidents

log = logging.getLogger(__name__)


@dataclass
class Recalibration:
    """What `recalibrate` did: the version it read and the one it saved, the days, and the calibration before and
    after (threshold rule, threshold, the validation alarm rate - the false-alarm rate to expect)."""

    from_version: str
    version: str
    days: list[str]
    ticks: int
    before: dict
    after: dict
    promoted: bool


def recalibrate(spec: Spec, *, version: str | None = None, start: dt.date | None = None,
                end: dt.date | None = None, promote: bool = True) -> Recalibration:
    """Fit model version `version`'s (default LATEST) calibration again with `spec`'s `score.threshold` and
    `score.smoothing`, on its validation days (or `start`..`end`), and save it with the version's weights and
    statistics as a new version (LATEST, unless not `promote`: a candidate, see `Registry.promote`). The data is
    read where `spec` says it lives now, with the version's modalities and windows (`reading_spec`); the ticks in
    a labelled incident are left out as training leaves them out (`train.exclude_labelled`)."""
    storage = Storage.from_spec(spec.storage)
    registry = Registry(spec.registry, storage)
    mv = registry.load(version)                          # built: its network scores the validation days
    window = mv.manifest.get("training_window", {})
    if (start is None) != (end is None):
        raise DataError("recalibrate: give both --start and --end, or neither (the version's validation days)")
    if start is None:
        days = [dt.date.fromisoformat(d) for d in window.get("validation_days", [])]
        if not days:
            raise DataError(f"model version {mv.version} records no validation days: give --start and --end")
    else:
        if end < start:
            raise DataError(f"--end {end} is before --start {start}")
        days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
        trained_on = sorted(set(window.get("train_days", [])) & {d.isoformat() for d in days})
        if trained_on:
            log.warning("recalibrating model version %s on %d day(s) it was trained on (%s): its errors there are "
                        "lower than on new days, so the threshold will be too low and alarms more frequent than "
                        "expected; prefer later days", mv.version, len(trained_on), ", ".join(trained_on))
    rspec = replace(reading_spec(mv, spec, recalibrating=True), labels=spec.labels)
    try:
        files = list_inputs(rspec, days, storage)
        require_data(rspec, files, days, storage)
    except DataError as exc:
        if start is None:       # the version's validation days, aged out of the lake or moved
            raise DataError(f"{exc}: the validation days of model version {mv.version}; recalibrate on later days "
                            "that hold data (--start D --end D)") from None
        raise
    require_each_modality(rspec, files, days, "calibration")
    for line in classifier_threshold_lines(rspec, days):
        log.warning("%s", line)
    schemas = require_columns(rspec, storage, files)
    shards = plan_shards(rspec, days, files, min_shards=4 * rspec.train.workers, key_casts=entity_casts(rspec, schemas))
    staging = Staging(rspec, storage, shards, days, uuid.uuid4().hex[:12])
    try:
        shards = staging.resolve(shards)
        stats = BucketStatistics(mv.statistics, keys_sliceable(rspec, schemas))
        calibration, _ = fit_calibration(rspec, mv.model, stats, shards, known_incidents(rspec, storage), days)
    finally:
        staging.close()
    saved_spec = replace(mv.spec, score=replace(mv.spec.score, threshold=spec.score.threshold,
                                                smoothing=spec.score.smoothing))
    before, after = _summary(mv.calibration, mv.spec.score.threshold), _summary(calibration, spec.score.threshold)
    day_texts = [d.isoformat() for d in days]
    manifest = mv.manifest_to_save_again()
    manifest.update(spec=saved_spec.to_dict(), calibration=calibration.to_dict(),
                    training_window={**window, "validation_days": day_texts})
    manifest["recalibrated"] = [*mv.manifest.get("recalibrated", []), {
        "from_version": mv.version, "days": [day_texts[0], day_texts[-1]], "before": before, "after": after,
        "at": dt.datetime.now(dt.timezone.utc).isoformat()}]
    saved = registry.save(mv.model, manifest, mv.statistics, promote=promote)
    return Recalibration(mv.version, saved, day_texts, int(calibration.validation.get("validation_ticks", 0)), before,
                         after, promote)


def _summary(calibration: Calibration, threshold: ThresholdSpec) -> dict:
    """A calibration as `recalibrate` reports it: the threshold's rule, value and expected alarm rate."""
    return {"rule": threshold_rule(threshold), "threshold": calibration.threshold,
            "expected_alarm_rate": calibration.expected_alarm_rate, "smoothing": dict(vars(calibration.smoothing))}


def threshold_rule(threshold: ThresholdSpec) -> str:
    """`score.threshold` in words: its method and the settings that method reads."""
    settings = {"pot": ("risk", "level"), "quantile": ("quantile",), "rate": ("rate",), "fixed": ("value",)}
    words = [threshold.method, *(f"{'' if key == threshold.method else key + ' '}{getattr(threshold, key):g}"
                                 for key in settings[threshold.method] if getattr(threshold, key) is not None)]
    return " ".join(words) + (", per entity" if threshold.per_entity else "")


def recalibration_lines(r: Recalibration) -> list[str]:
    """What `dmafn recalibrate` prints."""
    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    def smoothing(s: dict) -> str:
        reads = {"ewma": ("alpha", "knee"), "rolling": ("window", "knee")}.get(s["method"], ())
        return " ".join([s["method"], *(f"{k} {s[k]:g}" for k in reads if s.get(k) is not None)])

    def value(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    b, a = r.before, r.after
    span = r.days[0] if len(r.days) == 1 else f"{r.days[0]}..{r.days[-1]}"
    return [f"model version {r.version}: model version {r.from_version} recalibrated on {span} ({r.ticks:,} ticks): "
            f"threshold {b['rule']} -> {a['rule']}, {value(b['threshold'])} -> {value(a['threshold'])}; smoothing "
            + (smoothing(a['smoothing']) if a['smoothing'] == b['smoothing'] else
               f"{smoothing(b['smoothing'])} -> {smoothing(a['smoothing'])}") + "; expected alarm rate "
            f"{rate(b['expected_alarm_rate'])} -> {rate(a['expected_alarm_rate'])}. Its weights and statistics are "
            f"{r.from_version}'s. " + (f"LATEST -> {r.version}" if r.promoted else
                                      f"Not promoted: LATEST is unchanged (dmafn promote SPEC {r.version})"),
            "rescore the dates to apply it: dmafn backfill SPEC --start D1 --end D2 (dates scored by another "
            "version are rescored)"]
