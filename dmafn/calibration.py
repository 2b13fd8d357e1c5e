"""One calibration: what turns a model's raw per-modality errors into scores and alarms, fitted once on
validation ticks and applied everywhere - the in-memory `Detector`, the pipelines' training and scoring, the
benchmarks.

    raw errors --contribution normalisation--> contributions (N, M) --vote--> fused score (N,)
               --causal smoothing per group (entity)--> smoothed score --threshold--> alarm

`Calibration.fit(raw, groups=...)` fits the normalisation on the validation ticks, smooths their fused score
per group in time order, and fits the threshold on the smoothed scores (so the threshold sees the same
scores it is later applied to); `apply(raw, groups=...)` does the same steps on new ticks. With an
`outlier_limit`, the validation ticks where a voting modality lies beyond that many interquartile ranges over
its median (an incident nobody labelled, most likely) are left out first (`OutlierTicks`), so that they do not
become the tail every later tick is measured against. It is stored as
plain data (`to_dict` / `from_dict`) in a model version's manifest; the expected alarm rate on clean days is
the validation alarm rate it records.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dmafn.features import group_rows, is_speed, state_owner
from dmafn.postprocess import fit_threshold, smooth_by_group, soften
from dmafn.scoring import (TAIL_MIN_VALUES, Column, RawScores, RawTicks, ScoreRecord, baseline_columns,
                           baseline_min_ticks, fit_normalisation, fit_robust_scales, robust_scale, settle_held,
                           to_record)
from dmafn.spec import ModelSpec, SmoothingSpec, ThresholdSpec
from dmafn.validation import ArrayValues, Values

OUTLIER_ROUNDS = 3              # robust scales refitted on the ticks kept, at most, before the outliers settle
OUTLIER_SHARE = 0.01            # the first round finds at most this share of the validation ticks over the limit
OUTLIER_MIN_TICKS = 10          # (before the reach after each), or at most this many: a clean day's tail, every
                                # tick kept; more: incidents, left out with their reach (and `dmafn train` warns)
OUTLIER_MOST = 0.5              # a round that would leave out more than this share: nothing is left out (warned)
OUTLIER_CHUNK = 1 << 18         # ticks whose contributions a round computes at once (its flags: one bool per tick)


@dataclass(frozen=True)
class OutlierTicks:
    """The validation ticks a calibration leaves out as outliers: those where a voting modality's contribution on
    the robust scale `calib` (`dmafn.scoring.fit_robust_scales`: its log error less the median, over the
    interquartile range, of the ticks kept so far) exceeds `limit`, and the `after` ticks that follow one in its
    group (an event's stale evidence and its recovery). Plain data, so a worker holding ticks applies it."""

    calib: dict[str, Any]
    limit: float
    after: int = 0

    def __call__(self, raw: RawScores, groups: np.ndarray,
                 carry: dict[str, int] | None = None) -> tuple[np.ndarray, dict[str, int], int]:
        """(N,) bool, the ticks to leave out (rows in time order within each group), per group how many of its
        next ticks are still to leave out (`carry` in: the same from the part before), and how many ticks are over
        the limit themselves (the reach after them not counted: what `Calibration.fit_from` judges a tail by)."""
        voting = self.calib.get("voting", self.calib["modalities"])
        columns = [i for i, m in enumerate(self.calib["modalities"]) if m in voting]
        n = len(raw.mask)
        over = np.zeros(n, bool)
        for start in range(0, n, OUTLIER_CHUNK):          # a chunk's contributions at a time: memory O(chunk)
            part = slice(start, min(start + OUTLIER_CHUNK, n))
            contributions = Column("contribution", self.calib)(raw.rows(part))
            over[part] = np.nan_to_num(contributions[:, columns], nan=-np.inf).max(1, initial=-np.inf) > self.limit
        return (*spread_after(over, np.asarray(groups, dtype=str), self.after, carry or {}), int(over.sum()))


def spread_after(flags: np.ndarray, groups: np.ndarray, after: int,
                 carry: dict[str, int]) -> tuple[np.ndarray, dict[str, int]]:
    """`flags` (N,) grown by the `after` rows that follow each flagged row in its group (rows in time order within
    each group); `carry[g]`: how many of group g's first rows are flagged by the part before. Returns the
    grown flags and, per group, how many rows of its next part they still reach."""
    out, left = flags.copy(), {}
    for key, rows in group_rows(groups):
        n = len(rows)
        index = np.arange(n)
        last = np.maximum.accumulate(np.where(flags[rows], index, -1 - after - 1))   # the latest flagged row so far
        within = (index - last <= after) | (index < carry.get(key, 0))
        out[rows] = within
        reach = max(int(last[-1]) + after + 1 - n, carry.get(key, 0) - n, 0)
        if reach:
            left[key] = reach
    return out, left


@dataclass(frozen=True)
class Calibration:
    """Fitted post-model steps; `normalisation` is `dmafn.scoring.fit_normalisation`'s data (contributions,
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
            scale: str = ModelSpec.contribution_scale,
            state_baseline: bool = ModelSpec.state_baseline, outlier_limit: float | None = None,
            outlier_after: int = 0) -> "Calibration":
        """Fit on validation ticks in memory (rows in time order within each group; `groups` e.g. the entity
        keys); `voting`: the modalities whose contributions make the fused score (default all;
        `dmafn.spec.voting_modalities`); `scale`: the contributions' units, `robust` or `tail`; `state_baseline`:
        each modality's error against the level expected at the tick's operating state (`raw.state`;
        `dmafn.scoring.fit_normalisation`); `outlier_limit` (None: keep every tick) and `outlier_after`: the
        validation ticks left out as outliers first (`OutlierTicks`)."""
        return cls.fit_from(InMemoryTicks(raw, groups), modalities, detector=detector, vote=vote,
                            smoothing=smoothing, threshold=threshold, voting=voting, scale=scale,
                            state_baseline=state_baseline, outlier_limit=outlier_limit, outlier_after=outlier_after)

    @classmethod
    def fit_from(cls, ticks: "InMemoryTicks", modalities: tuple[str, ...], *, detector: str, vote: str,
                 smoothing: SmoothingSpec = SmoothingSpec(method="none"), threshold: ThresholdSpec = ThresholdSpec(),
                 voting: tuple[str, ...] | None = None, scale: str = ModelSpec.contribution_scale,
                 state_baseline: bool = ModelSpec.state_baseline, outlier_limit: float | None = None,
                 outlier_after: int = 0) -> "Calibration":
        """`fit` on validation ticks wherever they are held: `ticks` gives the finite values of their columns,
        their fused scores smoothed per group under a calibration, and each group's robust scale of them, and
        leaves out the ticks an `OutlierTicks` rule flags (`InMemoryTicks`; `pipelines.calibrate.ShardTicks`
        keeps them on the workers)."""
        outliers, kept, total, robust = 0, 0, ticks.count(), None
        if outlier_limit is not None and detector != "classifier":
            for _ in range(OUTLIER_ROUNDS):    # each round: the robust scales of the ticks kept, and what they flag
                robust = fit_robust_scales(ticks, tuple(modalities), detector, vote, voting, state_baseline)
                flagged = ticks.leave_out(OutlierTicks(robust, float(outlier_limit), int(outlier_after)))
                # the first round: the ticks over the limit themselves (not their reach) a clean day's own tail?
                if not outliers and ticks.over <= max(OUTLIER_SHARE * total, OUTLIER_MIN_TICKS):
                    ticks.keep_all()
                    kept = ticks.over
                    break
                if flagged > OUTLIER_MOST * total:    # no normal day to calibrate on: keep them all, and say so
                    ticks.keep_all()
                    outliers, kept, robust = 0, flagged, None
                    break
                if flagged == outliers:        # the ticks kept are those `robust` was fitted on
                    break
                outliers, robust = flagged, None
        normalisation = fit_normalisation(ticks, tuple(modalities), detector, vote, voting, scale, state_baseline,
                                          robust)
        calibration = cls(tuple(modalities), normalisation, smoothing, threshold_method=threshold.method)
        smoothed = ticks.scores(calibration)
        if threshold.per_entity:
            calibration = replace(calibration, entity_scale={**ticks.group_scales(calibration),
                                                             "*": _robust(smoothed)})
            smoothed = ticks.scores(calibration)
        value = fit_threshold(smoothed, threshold.method, risk=threshold.risk, quantile=threshold.quantile,
                              value=threshold.value, level=threshold.level, rate=threshold.rate)
        scored = smoothed.count()
        p50, p99 = smoothed.quantiles([0.5, 0.99]) if scored else (None, None)
        contributions = [] if detector == "classifier" else list(zip(modalities, ticks.contributions(calibration)))
        present = {m: int(values.count()) for m, values in contributions}   # the ticks each modality is present at
        medians = {m: float(values.quantiles([0.5])[0]) for m, values in contributions if present[m]}
        validation = {"validation_ticks": ticks.count(), "validation_scored": scored,
                      "validation_outliers_left_out": outliers, "validation_outliers_kept": kept,
                      "validation_alarm_rate": float(smoothed.count_above(value) / scored) if scored else 0.0,
                      "validation_score_p50": None if p50 is None else float(p50),
                      "validation_score_p99": None if p99 is None else float(p99),
                      "validation_contribution_p50": medians, "validation_present_ticks": present,
                      "threshold_method": threshold.method}
        return replace(calibration, threshold=float(value), validation=validation)

    @property
    def outliers_left_out(self) -> int:
        """The validation ticks left out as outliers (`OutlierTicks`; 0 when none or without a limit)."""
        return int(self.validation.get("validation_outliers_left_out", 0))

    @property
    def outliers_kept(self) -> int:
        """The validation ticks flagged as outliers but kept: so few (`OUTLIER_SHARE`, `OUTLIER_MIN_TICKS`) that they
        are a clean day's own tail."""
        return int(self.validation.get("validation_outliers_kept", 0))

    def outlier_warnings(self) -> list[str]:
        """A line when validation ticks were left out as outliers (more than `OUTLIER_SHARE` of them): the
        validation days likely hold incidents nobody labelled; `dmafn train` logs it, `Detector.fit` warns."""
        left, kept = self.outliers_left_out, int(self.validation.get("validation_ticks", 0))
        if self.outliers_kept > OUTLIER_MOST * kept:
            return [f"{self.outliers_kept} of {kept} validation ticks lie beyond the outlier limit - more than half, "
                    "so none was left out and the calibration reads them all: the validation days look like one "
                    "long incident (or the limit, train.validation_outlier_limit, is far too low); calibrate on "
                    "other days"]
        if not left:
            return []
        return [f"{left} of {left + kept} validation ticks ({left / (left + kept):.1%}) were left out of the calibration "
                f"as outliers (a clean day has under {100 * OUTLIER_SHARE:g} % beyond the limit, and keeps them) - the "
                "validation days likely hold incidents nobody labelled; their slower parts, still inside the normal "
                "range, stay in and raise the threshold: label them (labels, train.exclude_labelled) or calibrate on "
                "other days"]

    @property
    def expected_alarm_rate(self) -> float | None:
        """The alarm rate on the validation ticks (clean days: the false-alarm rate to expect)."""
        return self.validation.get("validation_alarm_rate")

    def settle(self, raw: RawScores) -> RawScores:
        """Each held payload's reading that this calibration scores (`dmafn.scoring.settle_held`): what `record`
        reads, and what names a modality's driving channel (`channel_names`)."""
        return settle_held(raw, self.normalisation)

    def parts_smoothing(self) -> "Calibration":
        """This calibration with its smoothing's knee taken off: how the channel parts of a modality's error (raw
        error, not surprise units, so no knee applies) are smoothed before the largest is named (`channel_names`)."""
        return replace(self, smoothing=replace(self.smoothing, knee=None))

    def record(self, raw: RawScores) -> ScoreRecord:
        """Contributions and fused score, not smoothed (per batch: no state across ticks)."""
        return to_record(raw, self.normalisation, self.modalities)

    def smooth(self, values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """Causal smoothing of a score column (N,) or columns (N, k) within each group, rows in time order (each
        value first `soften`ed by the smoothing's knee, when it has one)."""
        values = np.asarray(values, float)
        sm = self.smoothing
        if sm.method == "none":
            return values.copy()
        groups = np.zeros(len(values), np.int8) if groups is None else np.asarray(groups)
        return smooth_by_group(values, groups, sm.method, sm.alpha, sm.window, sm.knee)

    def smooth_carried(self, values: np.ndarray, groups: np.ndarray,
                       carry: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`smooth` of a part of each group's series (rows sorted by group, in time order within it) that goes
        on from where `carry` (this method's last answer; {} at the start) left it: the same values as
        smoothing the whole series at once. Returns the smoothed part and the carry for the next part (each
        group's EWMA state, or its last `window` values for a rolling mean)."""
        values, groups = np.asarray(values, float), np.asarray(groups, dtype=str)
        sm = self.smoothing
        if sm.method == "none" or not len(values):
            return values.copy(), dict(carry)
        values = soften(values, sm.knee)            # once: the carry holds values already softened (or a state)
        cuts = np.flatnonzero(groups[1:] != groups[:-1]) + 1
        pieces, labels, own, names, out_carry = [], [], [], [], dict(carry)
        for i, rows in enumerate(np.split(np.arange(len(values)), cuts)):
            key = groups[rows[0]]
            prefix = carry.get(key, np.zeros(0))
            pieces += [prefix, values[rows]]
            labels.append(np.full(len(prefix) + len(rows), i))         # the group's place: no strings to sort
            own.append(np.r_[np.zeros(len(prefix), bool), np.ones(len(rows), bool)])
            names.append(key)
        series, keys, mine = np.concatenate(pieces), np.concatenate(labels), np.concatenate(own)
        smoothed = smooth_by_group(series, keys, sm.method, sm.alpha, sm.window)     # softened above
        starts = np.r_[0, np.cumsum([len(k) for k in labels])]
        for i, key in enumerate(names):
            span = slice(starts[i], starts[i + 1])
            if sm.method == "ewma":              # the state: the last smoothed value (NaN while there is none)
                done = smoothed[span][np.isfinite(smoothed[span])]
                out_carry[key] = done[-1:] if done.size else np.array([np.nan])
            else:                                # rolling: the last window values, NaN included
                out_carry[key] = series[span][-sm.window:]
        return smoothed[mine], out_carry

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

    def baseline_lines(self) -> list[str]:
        """One line per voting modality that the operating state could condition (`state_baseline`): the other
        modalities its baseline reads, the spread of its log error left against it and without it (the mean
        alone), the share that explains, and the validation ticks; or why it has none (fewer than 10 validation
        ticks per basis weight). `dmafn train` logs them."""
        state = self.normalisation.get("state")
        if not state:
            return []
        lines, voting = [], self.normalisation.get("voting", self.modalities)
        for m in [m for m in self.modalities if m in voting]:         # a context view that does not vote: silent
            columns = baseline_columns(state["owners"], m)
            if not columns:
                continue
            fitted = self.normalisation.get("baseline", {}).get(m)
            if fitted is None:
                lines.append(f"modality '{m}': no state baseline (fewer than {baseline_min_ticks(len(columns))} "
                             "validation ticks with it and its operating state present)")
                continue
            readers = ", ".join(sorted({state_owner(state["owners"][j]) for j in columns}))
            alone = fitted.get("fallbacks", {}).get("*", {}).get("residual_std")
            spread = fitted.get("residual_std")
            left = "" if not alone or spread is None else (
                f"residual std {spread:.3f} against {alone:.3f} with the mean alone "
                f"({1 - (spread / alone) ** 2:.0%} of its variance explained), ")
            width = f"{len(columns)} column{'s' * (len(columns) > 1)}"
            if speeds := sum(is_speed(state["owners"][j]) for j in columns):
                width += f", {speeds} of them how fast {'a' if speeds == 1 else 'each'} state rises"
            at_state = "; each residual against the spread expected at its state" if fitted.get("spread") else ""
            lines.append(f"modality '{m}': log error against its level at the operating state ({readers}, {width}): "
                         f"{left}{fitted['ticks']:,} validation ticks{at_state}")
        return lines

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


class InMemoryTicks(RawTicks):
    """Validation ticks in memory for `Calibration.fit_from`: raw scores, rows in time order within each group;
    `raw` and `groups` are those kept (`leave_out`)."""

    def __init__(self, raw: RawScores, groups: np.ndarray | None = None) -> None:
        super().__init__(raw)
        self.groups = groups
        self._all, self._all_groups = raw, groups
        self._left_out = np.zeros(len(raw.mask), bool)
        self.over = 0                   # the last `leave_out`'s ticks over the rule's limit themselves

    def count(self) -> int:
        return len(self.raw.mask)

    def leave_out(self, rule: OutlierTicks) -> int:
        """Leave out (as well as those before) the ticks `rule` flags among all of them; the count left out."""
        flagged, _, self.over = rule(self._all, _keys(np.zeros(len(self._all.mask)), self._all_groups))
        if not flagged.any() and not self._left_out.any():
            return 0                                           # nothing to leave out: no copy of the ticks
        self._left_out |= flagged
        kept = ~self._left_out
        self.raw = self._all.rows(kept)
        self.groups = None if self._all_groups is None else np.asarray(self._all_groups)[kept]
        return int(self._left_out.sum())

    def keep_all(self) -> None:
        """Take back every tick left out."""
        self._left_out[:] = False
        self.raw, self.groups = self._all, self._all_groups

    def _smoothed(self, calibration: Calibration) -> np.ndarray:
        return calibration.smooth(calibration.record(self.raw).score, self.groups)

    def scores(self, calibration: Calibration) -> Values:
        """The fused scores smoothed per group (and put on each group's scale, with `entity_scale`)."""
        return ArrayValues(calibration.normalise(self._smoothed(calibration), self.groups))

    def group_scales(self, calibration: Calibration) -> dict[str, tuple[float, float]]:
        """Median and interquartile range of each group's smoothed fused scores."""
        return group_scales(self._smoothed(calibration), self.groups)

    def contributions(self, calibration: Calibration) -> list[Values]:
        """Each modality's contributions smoothed per group, as `apply` gives them (one `Values` per modality)."""
        smoothed = calibration.smooth(calibration.record(self.raw).contributions, self.groups)
        return [ArrayValues(smoothed[:, j]) for j in range(smoothed.shape[1])]


def group_scales(smoothed: np.ndarray, groups: np.ndarray | None) -> dict[str, tuple[float, float]]:
    """Median and interquartile range of each group's finite smoothed scores."""
    return {key: _robust(ArrayValues(smoothed[rows])) for key, rows in group_rows(_keys(smoothed, groups))
            if key != "*"}


def _robust(values: Values) -> tuple[float, float]:
    r = robust_scale(values)
    return r["median"], r["scale"]


def _keys(values: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """The group of each row as a string ("*" for all rows when there are no groups)."""
    return np.full(len(values), "*") if groups is None else np.asarray(groups, dtype=str)
