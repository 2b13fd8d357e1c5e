"""In-memory DMAFN detector with the PyOD / scikit-learn contract.

    det = Detector(modalities, config=small(fusion="attention")).fit(features)
    det.decision_function(features)   # higher = more anomalous
    det.predict(features)             # 0/1 by det.threshold_
    det.score_record(features)        # fused score and per-modality contributions
    det.causes(features)              # per row, the modality behind its score (an echo of another's fault is not)
    det.calibration_                  # the fitted `dmafn.calibration.Calibration` (normalisation, smoothing, threshold)

`features` is a `dmafn.features.Features` (a dict of modality arrays and a presence mask), e.g. from
`featurize(aligned, spec, stats)`. Uses the same scoring path as the Ray pipelines.
"""
from __future__ import annotations

import warnings

import numpy as np

from dmafn.features import Features
from dmafn.model import ModelConfig, build_model, model_config
from dmafn.calibration import Calibration
from dmafn.scoring import (ScoreRecord, cause_names, channel_names, line_names, occlusion_contributions,
                           occlusion_groups, raw_scores, voting_mask)
from dmafn.spec import (ModalitySpec, ModelSpec, SmoothingSpec, ThresholdSpec, TrainSpec, threshold_without_method,
                        voting_modalities)
from dmafn.training import fit_densities, fit_model, seed_everything


def _rows(features: Features, idx: np.ndarray) -> Features:
    return features.rows(idx)


class Detector:
    """Multi-modal anomaly detector. Parameters are stored as given; fitted state ends in '_'."""

    def __init__(self, modalities: dict[str, ModalitySpec], config: ModelConfig | None = None, *,
                 epochs: int = TrainSpec.epochs, batch_size: int = TrainSpec.batch_size,
                 learning_rate: float = TrainSpec.learning_rate, vote: str = ModelSpec.vote,
                 contribution_scale: str = ModelSpec.contribution_scale,
                 state_baseline: bool = ModelSpec.state_baseline,
                 threshold: str | None = None, risk: float = ThresholdSpec.risk,
                 quantile: float = ThresholdSpec.quantile, threshold_value: float | None = None,
                 smoothing: str = "none", alpha: float = SmoothingSpec.alpha, window: int = SmoothingSpec.window,
                 knee: float | None = SmoothingSpec.knee,
                 validation_fraction: float = 0.2, seed: int = TrainSpec.seed, device: str = "cpu",
                 outlier_limit: float | None = TrainSpec.validation_outlier_limit, outlier_after: int = 0):
        self.modalities = modalities
        self.config = config
        self.epochs, self.batch_size, self.learning_rate = epochs, batch_size, learning_rate
        self.vote, self.threshold, self.risk, self.quantile = vote, threshold, risk, quantile
        self.contribution_scale, self.state_baseline = contribution_scale, state_baseline
        self.threshold_value, self.validation_fraction = threshold_value, validation_fraction
        self.smoothing, self.alpha, self.window, self.knee = smoothing, alpha, window, knee
        self.seed, self.device = seed, device
        self.outlier_limit, self.outlier_after = outlier_limit, outlier_after

    def fit(self, X: Features, y: np.ndarray | None = None) -> "Detector":
        """Train on the first rows, calibrate contributions and the threshold on the last
        `validation_fraction` (time order kept), leaving out its outliers (`outlier_limit` IQRs over a voting
        modality's median and the `outlier_after` rows after one; None: none). `y` is only used by the
        classifier detector."""
        cfg = self.config or model_config(ModelSpec())
        n = len(X.mask)
        n_val = int(n * self.validation_fraction) if n >= 20 else 0
        train_idx, val_idx = np.arange(n - n_val), np.arange(n - n_val, n)
        if n_val == 0:
            val_idx = train_idx
        seed_everything(self.seed)
        self.model_ = build_model(self.modalities, cfg)
        self.history_ = fit_model(self.model_, _rows(X, train_idx), epochs=self.epochs, batch_size=self.batch_size,
                                  lr=self.learning_rate, labels=None if y is None else np.asarray(y)[train_idx],
                                  seed=self.seed, device=self.device)
        fit_densities(self.model_, _rows(X, train_idx), device=self.device)    # spec `encoding_distance`
        raw_val = raw_scores(self.model_, _rows(X, val_idx), device=self.device)
        self.calibration_ = Calibration.fit(
            raw_val, X.modalities, detector=cfg.detector, vote=self.vote, scale=self.contribution_scale,
            smoothing=SmoothingSpec(self.smoothing, self.alpha, self.window, self.knee),
            threshold=self._threshold_spec(cfg.detector),
            voting=voting_modalities(self.modalities), state_baseline=self.state_baseline,
            outlier_limit=self.outlier_limit, outlier_after=self.outlier_after)
        for line in self.calibration_.tail_warnings() + self.calibration_.outlier_warnings():
            warnings.warn(line, UserWarning, stacklevel=2)
        self.threshold_ = self.calibration_.threshold
        self.decision_scores_ = self.decision_function(X)
        self.labels_ = self.calibration_.alarms(self.decision_scores_).astype(int)
        return self

    def _threshold_spec(self, detector: str) -> ThresholdSpec:
        """The threshold rule asked for; without a `threshold` method, as a spec without one gets
        (`threshold_without_method`: fixed at `threshold_value` when given, a classifier's at logit 0, else POT)."""
        rule = ThresholdSpec(self.threshold or ThresholdSpec.method, self.risk, self.quantile, self.threshold_value)
        return rule if self.threshold is not None else threshold_without_method(rule, detector)

    def score_record(self, X: Features, groups: np.ndarray | None = None, *, smoothed: bool = True) -> ScoreRecord:
        """Fused score and contributions; smoothed (causally, per group: rows in time order) unless `smoothed`
        is False or the detector's smoothing is 'none'."""
        raw = raw_scores(self.model_, X, device=self.device)
        return self.calibration_.apply(raw, groups)[0] if smoothed else self.calibration_.record(raw)

    def channels(self, X: Features, groups: np.ndarray | None = None, *, smoothed: bool = True) -> dict[str, np.ndarray]:
        """Per voting tabular or series modality of two channels or more, and audio modality (its mel bands), the name
        of the channel that drives its error at each row (`channel_names`, as the output's `channel_<m>`; None where
        the modality is absent): each channel's part smoothed as the scores are (per group, rows in time order;
        `Calibration.parts_smoothing`) unless `smoothed` is False or the detector's smoothing is 'none'. Per voting
        text modality with a vocabulary, its window's latest line unseen in training (`line_names`)."""
        raw = self.calibration_.settle(raw_scores(self.model_, X, device=self.device))
        parts = self.calibration_.parts_smoothing()
        named = channel_names(raw, self.modalities, (lambda m, p: parts.smooth(p, groups)) if smoothed else None)
        return {**named, **line_names(X, self.modalities)}

    def causes(self, X: Features, views: dict[str, Features] | None = None) -> np.ndarray:
        """(N,) per row, the voting modality with the largest unsmoothed contribution that no other modality explains
        (`cause_names` of `own_contributions`: hidden in turn, `occlusion_contributions`; as the output's `cause`,
        which the pipeline reads at over-threshold ticks only): the fault the others' errors follow; None where
        fewer than two voting modalities are present, and for a classifier (its contributions are occlusions).
        `views[m]`: X's rows featurized with m absent (`featurize(..., absent=...)`) for a modality other modalities'
        cross-modal relations read, so that hiding it hides it from them too, as the pipeline does."""
        if self.model_.cfg.detector == "classifier":
            return np.full(len(X.mask), None, object)
        record = self.calibration_.record(raw_scores(self.model_, X, device=self.device))
        hidden = occlusion_contributions(self.model_, X, self.calibration_.record, occlusion_groups(self.modalities),
                                         device=self.device, views=views)
        voting = voting_mask(X.mask, self.calibration_.normalisation)
        return cause_names(record.contributions, hidden, voting, X.modalities)

    def decision_function(self, X: Features, groups: np.ndarray | None = None) -> np.ndarray:
        """Anomaly score per row: higher = more anomalous (NaN where no modality is present)."""
        return self.score_record(X, groups).score

    def predict(self, X: Features, groups: np.ndarray | None = None) -> np.ndarray:
        """0/1 per row by the calibrated threshold."""
        return self.calibration_.alarms(self.decision_function(X, groups)).astype(int)
