"""One calibration: what turns a model's raw per-modality errors into scores and alarms, fitted once on
validation ticks and applied everywhere - the in-memory `Detector`, the pipelines' training and scoring, the
benchmarks.

    raw errors --contribution normalisation--> contributions (N, M) --vote--> fused score (N,)
               --causal smoothing per group (entity)--> smoothed score --threshold--> alarm

`Calibration.fit(raw, groups=...)` fits the normalisation on the validation ticks, smooths their fused score
per group in time order, and fits the threshold on the smoothed scores (so the threshold sees the same
scores it is later applied to); `apply(raw, groups=...)` does the same steps on new ticks. It is stored as
plain data (`to_dict` / `from_dict`) in a model version's manifest; the expected alarm rate on clean days is
the validation alarm rate it records.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dmafn.features import group_rows
from dmafn.postprocess import fit_threshold, smooth_by_group
from dmafn.scoring import TAIL_MIN_VALUES, RawScores, ScoreRecord, fit_calibration, robust_scale, to_record
from dmafn.spec import ModelSpec, SmoothingSpec, ThresholdSpec


@dataclass(frozen=True)
class Calibration:
    """Fitted post-model steps; `normalisation` is `dmafn.scoring.fit_calibration`'s data (contributions,
    latent term, vote weights), `threshold` applies to the smoothed fused score."""

    modalities: tuple[str, ...]
    normalisation: dict[str, Any]
    smoothing: SmoothingSpec = field(default_factory=SmoothingSpec)
    threshold: float | None = None
    threshold_method: str = ThresholdSpec.method
    validation: dict[str, Any] = field(default_factory=dict)
    # per-entity score normalisation: group -> (median, scale) of its smoothed validation scores; "*" for the
    # pooled ones, used for a group not seen in validation
    entity_scale: dict[str, tuple[float, float]] | None = None

    @classmethod
    def fit(cls, raw: RawScores, modalities: tuple[str, ...], *, detector: str, vote: str,
            smoothing: SmoothingSpec = SmoothingSpec(method="none"), threshold: ThresholdSpec = ThresholdSpec(),
            groups: np.ndarray | None = None, voting: tuple[str, ...] | None = None,
            scale: str = ModelSpec.contribution_scale) -> "Calibration":
        """Fit on validation ticks (rows in time order within each group; `groups` e.g. the entity keys);
        `voting`: the modalities whose contributions make the fused score (default all; `dmafn.spec.voting_modalities`);
        `scale`: the contributions' units, `robust` or `tail` (`dmafn.scoring.fit_calibration`)."""
        calibration = cls(tuple(modalities), fit_calibration(raw, tuple(modalities), detector, vote, voting, scale),
                          smoothing, threshold_method=threshold.method)
        smoothed = calibration.smooth(calibration.record(raw).score, groups)
        if threshold.per_entity:
            calibration = replace(calibration, entity_scale=_entity_scales(smoothed, groups))
            smoothed = calibration.normalise(smoothed, groups)
        value = fit_threshold(smoothed, threshold.method, risk=threshold.risk, quantile=threshold.quantile,
                              value=threshold.value, level=threshold.level, rate=threshold.rate)
        finite = smoothed[np.isfinite(smoothed)]
        validation = {"validation_ticks": int(len(smoothed)), "validation_scored": int(finite.size),
                      "validation_alarm_rate": float((finite > value).mean()) if finite.size else 0.0,
                      "validation_score_p50": float(np.median(finite)) if finite.size else None,
                      "validation_score_p99": float(np.quantile(finite, 0.99)) if finite.size else None,
                      "threshold_method": threshold.method}
        return replace(calibration, threshold=float(value), validation=validation)

    @property
    def expected_alarm_rate(self) -> float | None:
        """The alarm rate on the validation ticks (clean days: the false-alarm rate to expect)."""
        return self.validation.get("validation_alarm_rate")

    def record(self, raw: RawScores) -> ScoreRecord:
        """Contributions and fused score, not smoothed (per batch: no state across ticks)."""
        return to_record(raw, self.normalisation, self.modalities)

    def smooth(self, values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """Causal smoothing of a score column (N,) or columns (N, k) within each group, rows in time order."""
        values = np.asarray(values, float)
        sm = self.smoothing
        if sm.method == "none":
            return values.copy()
        groups = np.zeros(len(values), np.int8) if groups is None else np.asarray(groups)
        return smooth_by_group(values, groups, sm.method, sm.alpha, sm.window)

    def normalise(self, smoothed_score: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """With per-entity normalisation: each group's smoothed score minus its validation median, over its
        scale (pooled values for a group validation never saw); else the score as it is."""
        score = np.asarray(smoothed_score, float)
        if not self.entity_scale:
            return score
        pooled, out = self.entity_scale["*"], np.empty(len(score))
        for key, rows in group_rows(_keys(score, groups)):            # one sort, not a lookup per row
            median, scale = self.entity_scale.get(key, pooled)
            out[rows] = (score[rows] - median) / scale
        return out

    def apply(self, raw: RawScores, groups: np.ndarray | None = None) -> tuple[ScoreRecord, np.ndarray]:
        """Smoothed (and, per entity, normalised) scores of new ticks - each group's rows in time order - and
        the alarms (N,) bool."""
        record = self.record(raw)
        smoothed = ScoreRecord(score=self.normalise(self.smooth(record.score, groups), groups),
                               contributions=self.smooth(record.contributions, groups), mask=record.mask,
                               modalities=record.modalities)
        return smoothed, self.alarms(smoothed.score)

    def alarms(self, smoothed_score: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise ValueError("calibration has no threshold (fit it first)")
        return np.nan_to_num(np.asarray(smoothed_score, float), nan=-np.inf) > self.threshold

    def tail_warnings(self) -> list[str]:
        """One line per modality whose `tail` scale was fitted on fewer than TAIL_MIN_VALUES validation ticks
        (its 99 % quantile is then a handful of ticks); `dmafn train` logs them, `Detector.fit` warns."""
        return [f"modality '{name}': contribution_scale tail fitted on {tail['n']} validation ticks (fewer than "
                f"{TAIL_MIN_VALUES}: its 99 % quantile is a handful of ticks); give it more validation ticks or use "
                "contribution_scale robust"
                for name, tail in self.normalisation.get("tail", {}).items() if 0 < tail["n"] < TAIL_MIN_VALUES]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a manifest: the normalisation's keys at the top level (as before), plus the
        smoothing, threshold and validation summary."""
        out = {**self.normalisation, "smoothing": dict(vars(self.smoothing)), "threshold": self.threshold,
               "threshold_method": self.threshold_method, "validation": dict(self.validation)}
        if self.entity_scale:
            out["entity_scale"] = {k: list(v) for k, v in self.entity_scale.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, smoothing: SmoothingSpec | None = None,
                  validation: dict[str, Any] | None = None) -> "Calibration":
        """Read `to_dict`'s data; manifests written before the smoothing was stored here take it (and the
        validation summary) from the arguments - the model version's spec and metrics."""
        extra = {"smoothing", "threshold", "threshold_method", "validation", "entity_scale"}
        stored = data.get("smoothing")
        return cls(modalities=tuple(data["modalities"]), normalisation={k: v for k, v in data.items() if k not in extra},
                   smoothing=SmoothingSpec(**stored) if stored else (smoothing or SmoothingSpec(method="none")),
                   threshold=None if data.get("threshold") is None else float(data["threshold"]),
                   threshold_method=data.get("threshold_method", (validation or {}).get("threshold_method",
                                                                                         ThresholdSpec.method)),
                   validation=data.get("validation") or dict(validation or {}),
                   entity_scale={k: (float(v[0]), float(v[1])) for k, v in data["entity_scale"].items()}
                   if data.get("entity_scale") else None)


def _entity_scales(smoothed: np.ndarray, groups: np.ndarray | None) -> dict[str, tuple[float, float]]:
    """Median and interquartile range of each group's finite smoothed scores, and of all of them ("*")."""

    def robust(values: np.ndarray) -> tuple[float, float]:
        r = robust_scale(values)
        return r["median"], r["scale"]

    scales = {key: robust(smoothed[rows]) for key, rows in group_rows(_keys(smoothed, groups)) if key != "*"}
    scales["*"] = robust(smoothed)
    return scales


def _keys(values: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """The group of each row as a string ("*" for all rows when there are no groups)."""
    return np.full(len(values), "*") if groups is None else np.asarray(groups).astype(str)
