"""The one calibration: contribution normalisation, vote, smoothing per group, threshold - fit and apply."""
import numpy as np
import polars as pl
import pytest

from dmafn.calibration import Calibration
from dmafn.scoring import RawScores
from dmafn.spec import SmoothingSpec, ThresholdSpec

MODALITIES = ("a", "b")


def _raw(n: int, seed: int = 0, spike: int | None = None) -> RawScores:
    rng = np.random.default_rng(seed)
    errors = np.exp(rng.normal(0, 0.3, (n, 2)))
    mask = np.ones((n, 2), bool)
    mask[::7, 1] = False                                             # b absent on some ticks
    if spike is not None:
        errors[spike] *= 50
    return RawScores(errors=np.where(mask, errors, np.nan), latent=None, mask=mask)


def test_fit_apply_and_a_round_trip_through_plain_data():
    raw = _raw(400)
    cal = Calibration.fit(raw, MODALITIES, detector="autoencoder", vote="mean",
                          smoothing=SmoothingSpec("ewma", 0.3), threshold=ThresholdSpec("quantile", quantile=0.95))
    smoothed, alarms = cal.apply(raw)
    assert alarms.mean() == pytest.approx(0.05, abs=0.01)             # the quantile it was fitted for
    assert cal.expected_alarm_rate == pytest.approx(alarms.mean())
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    np.testing.assert_array_equal(again.apply(raw)[1], alarms)
    new = _raw(100, seed=1, spike=50)
    record, new_alarms = cal.apply(new)
    assert new_alarms[50] and np.isnan(record.contributions[0, 1])   # the spike alarms; absent stays absent


def test_the_threshold_is_fitted_on_the_scores_it_is_applied_to():
    """Smoothed validation scores are narrower than raw ones: the threshold follows the smoothing."""
    raw = _raw(2000)
    kwargs = dict(detector="autoencoder", vote="mean", threshold=ThresholdSpec("quantile", quantile=0.99))
    plain = Calibration.fit(raw, MODALITIES, smoothing=SmoothingSpec("none"), **kwargs)
    smooth = Calibration.fit(raw, MODALITIES, smoothing=SmoothingSpec("ewma", 0.1), **kwargs)
    assert smooth.threshold < plain.threshold
    assert smooth.apply(raw)[1].mean() == pytest.approx(plain.apply(raw)[1].mean(), abs=0.005)


def test_smoothing_is_per_group_and_equals_the_pipelines_polars_smoothing():
    from pipelines.postprocess import smoothed

    raw = _raw(300)
    groups = np.repeat(np.array(["p1", "p2", "p3"]), 100)
    cal = Calibration.fit(raw, MODALITIES, detector="autoencoder", vote="mean",
                          smoothing=SmoothingSpec("ewma", 0.3), threshold=ThresholdSpec("pot", risk=0.01), groups=groups)
    record, _ = cal.apply(raw, groups)
    alone = cal.apply(RawScores(raw.errors[100:200], None, raw.mask[100:200]))[0]
    np.testing.assert_allclose(record.score[100:200], alone.score)    # group p2 starts fresh, as if alone
    unsmoothed = cal.record(raw).score
    polars = pl.DataFrame({"g": groups, "score": unsmoothed}).select(
        smoothed("score", "ewma", alpha=0.3, window=5, over=["g"]))["score"].to_numpy()
    np.testing.assert_allclose(record.score, polars)


@pytest.mark.parametrize("method, options", [("pot", {"risk": 0.01}), ("quantile", {"quantile": 0.9}),
                                             ("fixed", {"value": 1.5})])
def test_threshold_methods(method, options):
    cal = Calibration.fit(_raw(500), MODALITIES, detector="autoencoder", vote="max",
                          threshold=ThresholdSpec(method, **options))
    assert cal.threshold_method == method and np.isfinite(cal.threshold)
    if method == "fixed":
        assert cal.threshold == 1.5


def test_a_manifest_written_before_the_smoothing_was_stored_takes_the_specs():
    old = {"detector": "autoencoder", "vote": "mean", "modalities": ["a", "b"],
           "contribution": {"a": {"median": 0.0, "scale": 1.0}, "b": {"median": 0.0, "scale": 1.0}},
           "weights": [1.0, 1.0], "threshold": 2.0}
    cal = Calibration.from_dict(old, smoothing=SmoothingSpec("rolling", window=3),
                                validation={"validation_alarm_rate": 0.01, "threshold_method": "pot"})
    assert cal.smoothing == SmoothingSpec("rolling", window=3) and cal.threshold == 2.0
    assert cal.expected_alarm_rate == 0.01 and cal.threshold_method == "pot"
    assert cal.normalisation == {k: v for k, v in old.items() if k != "threshold"}


def test_three_rows():
    raw = RawScores(errors=np.array([[1.0, np.nan], [2.0, 3.0], [np.nan, np.nan]]), latent=None,
                    mask=np.array([[True, False], [True, True], [False, False]]))
    cal = Calibration.fit(raw, MODALITIES, detector="autoencoder", vote="mean",
                          threshold=ThresholdSpec("quantile", quantile=0.5))
    record, alarms = cal.apply(raw)
    assert np.isnan(record.score[2]) and not alarms[2]                # nothing present: no score, no alarm
