"""The one calibration: contribution normalisation, vote, smoothing per group, threshold - fit and apply."""
from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from dmafn.calibration import Calibration
from dmafn.scoring import RawScores, _state_basis, state_spread
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


def test_the_validation_medians_of_the_fused_score_and_of_each_contribution_are_recorded():
    """What scoring compares a day against (`pipelines.score`'s share above the validation median): the smoothed
    fused score's median and each modality's smoothed contribution's, as `apply` gives them on the same ticks."""
    raw = _raw(400)
    groups = np.repeat(["e0", "e1"], 200)
    cal = Calibration.fit(raw, MODALITIES, detector="autoencoder", vote="mean", groups=groups,
                          smoothing=SmoothingSpec("ewma", 0.3), threshold=ThresholdSpec("quantile", quantile=0.95))
    smoothed, _ = cal.apply(raw, groups)
    assert cal.validation["validation_score_p50"] == pytest.approx(np.nanmedian(smoothed.score))
    medians = cal.validation["validation_contribution_p50"]
    assert list(medians) == list(MODALITIES)
    for j, m in enumerate(MODALITIES):
        assert medians[m] == pytest.approx(np.nanmedian(smoothed.contributions[:, j]))
    assert (smoothed.contributions[:, 0] > medians["a"]).mean() == pytest.approx(0.5, abs=0.01)


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
    assert cal.smoothing.knee is None
    kneed = Calibration.from_dict({**old, "smoothing": {"method": "ewma", "alpha": 0.5, "window": 5}})
    assert kneed.smoothing == SmoothingSpec("ewma", 0.5)          # stored before the knee existed: none
    again = Calibration.from_dict(Calibration(("a", "b"), kneed.normalisation, SmoothingSpec("ewma", 0.5, knee=6.0),
                                              threshold=2.0).to_dict())
    assert again.smoothing.knee == 6.0
    assert cal.expected_alarm_rate == 0.01 and cal.threshold_method == "pot"
    assert cal.normalisation == {k: v for k, v in old.items() if k != "threshold"}


def test_three_rows():
    raw = RawScores(errors=np.array([[1.0, np.nan], [2.0, 3.0], [np.nan, np.nan]]), latent=None,
                    mask=np.array([[True, False], [True, True], [False, False]]))
    cal = Calibration.fit(raw, MODALITIES, detector="autoencoder", vote="mean",
                          threshold=ThresholdSpec("quantile", quantile=0.5))
    record, alarms = cal.apply(raw)
    assert np.isnan(record.score[2]) and not alarms[2]                # nothing present: no score, no alarm


def test_per_entity_normalisation_puts_entities_with_other_baselines_on_one_scale():
    rng = np.random.default_rng(0)
    n = 600
    groups = np.repeat(np.array(["quiet", "loud"]), n // 2)
    errors = np.exp(rng.normal(0, 0.2, (n, 2)) + np.where(groups == "loud", 1.5, 0.0)[:, None])
    raw = RawScores(errors=errors, latent=None, mask=np.ones((n, 2), bool))
    kwargs = dict(detector="autoencoder", vote="mean", groups=groups)
    pooled = Calibration.fit(raw, MODALITIES, threshold=ThresholdSpec("rate", rate=0.02), **kwargs)
    per_entity = Calibration.fit(raw, MODALITIES, threshold=ThresholdSpec("rate", rate=0.02, per_entity=True),
                                 **kwargs)
    loud = groups == "loud"
    assert pooled.apply(raw, groups)[1][~loud].sum() == 0            # one scale: the quiet entity never alarms
    alarms = per_entity.apply(raw, groups)[1]
    assert alarms[loud].mean() == pytest.approx(0.02, abs=0.015) and alarms[~loud].mean() == pytest.approx(0.02, abs=0.015)
    again = Calibration.from_dict(per_entity.to_dict())
    np.testing.assert_array_equal(again.apply(raw, groups)[1], alarms)
    unseen = again.normalise(np.array([1.0]), np.array(["new-pump"]))     # pooled scale for an unseen entity
    assert np.isfinite(unseen).all()


def test_rate_threshold_is_an_alarm_budget_on_validation():
    raw = _raw(1000)
    cal = Calibration.fit(raw, MODALITIES, detector="autoencoder", vote="mean",
                          threshold=ThresholdSpec("rate", rate=0.05))
    assert cal.expected_alarm_rate == pytest.approx(0.05, abs=0.002)


def test_the_pipelines_finalize_applies_the_per_entity_normalisation_as_the_calibration_does():
    import datetime as dt

    from dmafn.spec import parse_spec
    from pipelines.score_steps import finalize
    from tests.conftest import tiny_spec_dict

    spec = parse_spec(tiny_spec_dict(), "tiny.yaml")
    n = 40
    groups = np.repeat(np.array(["m1", "m2"]), n // 2)
    rng = np.random.default_rng(3)
    raw = RawScores(errors=np.exp(rng.normal(0, 0.3, (n, 2)) + (groups == "m2")[:, None]), latent=None,
                    mask=np.ones((n, 2), bool))
    cal = Calibration.fit(raw, MODALITIES, detector="autoencoder", vote="mean", smoothing=SmoothingSpec("none"),
                          threshold=ThresholdSpec("quantile", quantile=0.9, per_entity=True), groups=groups)
    record = cal.record(raw)
    ts = [dt.datetime(2024, 1, 1, 0, i % (n // 2), tzinfo=dt.timezone.utc) for i in range(n)]
    scored = pl.DataFrame({"machine_id": groups, "ts": ts, "date": ["2024-01-01"] * n, "score": record.score,
                           "score_a": record.contributions[:, 0], "score_b": record.contributions[:, 1],
                           "modalities": [["a", "b"]] * n})
    out = finalize(scored, spec, cal, version="v", run_id="r", modalities=["a", "b"],
                   scored_at=dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc))
    expected, alarms = cal.apply(raw, groups)
    np.testing.assert_allclose(out["score"].to_numpy(), expected.score)
    np.testing.assert_array_equal(out["is_anomaly"].to_numpy(), alarms)


def test_a_non_voting_modality_keeps_its_contribution_but_does_not_move_the_score():
    """A slow context view ('b' here) informs the model but does not vote; a tick where only it is present
    still gets a score, from it; the choice round-trips and a bad voting set is refused."""
    from dmafn.spec import parse_spec, voting_modalities
    from tests.conftest import tiny_spec_dict

    raw = _raw(400)
    kwargs = dict(detector="autoencoder", vote="mean", smoothing=SmoothingSpec("none"),
                  threshold=ThresholdSpec("quantile", quantile=0.95))
    cal = Calibration.fit(raw, MODALITIES, voting=("a",), **kwargs)
    record = cal.record(raw)
    np.testing.assert_allclose(record.score, record.contributions[:, 0])        # 'a' alone votes
    assert np.isfinite(record.contributions[:, 1]).sum() == raw.mask[:, 1].sum()  # 'b' still attributed
    only_b = RawScores(np.array([[np.nan, 2.0]]), None, np.array([[False, True]]))
    assert cal.record(only_b).score[0] == pytest.approx(cal.record(only_b).contributions[0, 1])
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert "voting" not in Calibration.fit(raw, MODALITIES, voting=MODALITIES, **kwargs).normalisation
    with pytest.raises(ValueError, match=r"voting modalities \['c'\] must be a non-empty subset"):
        Calibration.fit(raw, MODALITIES, voting=("c",), **kwargs)
    data = tiny_spec_dict()
    data["modalities"]["proc"]["context"] = {"window": "1h"}
    assert voting_modalities(parse_spec(data).modalities) == ("proc", "vib", "logs", "cam")


def test_a_tail_fitted_on_few_validation_ticks_is_reported_by_train_and_the_detector(recwarn):
    """Fewer than TAIL_MIN_VALUES validation ticks under `scale="tail"`: one line naming the modality (train logs
    it, the in-memory Detector warns with it); enough ticks, or the robust scale, report nothing."""
    from dmafn.scoring import TAIL_MIN_VALUES

    rng = np.random.default_rng(1)
    kwargs = dict(detector="autoencoder", vote="mean", threshold=ThresholdSpec("quantile", quantile=0.99))

    def fitted(n_a: int, n_b: int, scale: str) -> Calibration:
        n = max(n_a, n_b)
        mask = np.stack([np.arange(n) < n_a, np.arange(n) < n_b], 1)
        return Calibration.fit(RawScores(np.exp(rng.normal(0, 0.3, (n, 2))), None, mask), MODALITIES,
                               scale=scale, **kwargs)

    lines = fitted(80, TAIL_MIN_VALUES, "tail").tail_warnings()
    assert len(lines) == 1 and lines[0].startswith("modality 'a': contribution_scale tail fitted on 80 validation")
    assert fitted(TAIL_MIN_VALUES, TAIL_MIN_VALUES, "tail").tail_warnings() == []
    assert fitted(80, 80, "robust").tail_warnings() == []
    # the in-memory detector (the SKAB benchmark's path): 100 rows, 20 of them held out for calibration
    from dmafn.detector import Detector
    from dmafn.features import Features
    from dmafn.model import small
    from dmafn.spec import ModalitySpec

    x = Features({"a": rng.normal(0, 1, (100, 3)).astype(np.float32)}, np.ones((100, 1), bool), ("a",))
    det = Detector({"a": ModalitySpec("a", "tabular", "/unused", ("c0", "c1", "c2"))}, small(d_model=16, latent=4),
                   epochs=1, contribution_scale="tail")
    with pytest.warns(UserWarning, match=r"modality 'a': contribution_scale tail fitted on 20 validation ticks"):
        det.fit(x)


def test_tail_scale_puts_modalities_with_different_tails_in_the_same_units():
    """`scale="tail"`: a contribution becomes -log10 of the share of validation ticks at or above it, so a
    modality with heavy tails on normal ticks no longer outvotes a rare value of a quiet one."""
    from dmafn.scoring import fit_tail, tail_surprise

    rng = np.random.default_rng(0)
    n = 5000
    errors = np.exp(np.stack([rng.normal(0, 0.3, n), rng.standard_t(1.5, n) * 0.3], 1))   # b: heavy tails
    raw = RawScores(errors=errors, latent=None, mask=np.ones((n, 2), bool))
    kwargs = dict(detector="autoencoder", vote="attention", threshold=ThresholdSpec("quantile", quantile=0.99))
    robust = Calibration.fit(raw, MODALITIES, **kwargs)
    tail = Calibration.fit(raw, MODALITIES, scale="tail", **kwargs)
    contributions = tail.record(raw).contributions
    for i in range(2):                                   # the 99 % quantile of each column sits at 2 (1 in 100)
        assert np.quantile(contributions[:, i], 0.99) == pytest.approx(2.0, abs=0.05)
        assert contributions[:, i].min() >= 0.0
    # a tick where a is at 1 in 10,000 of its validation ticks, one where b is at 1 in 100 of its own
    a_rare = np.exp(0.3 * 3.72)
    b_common = np.exp(0.3 * np.quantile(rng.standard_t(1.5, 200_000), 0.99))
    probe = RawScores(errors=np.array([[a_rare, 1.0], [1.0, b_common]]), latent=None, mask=np.ones((2, 2), bool))
    assert tail.record(probe).score[0] > tail.record(probe).score[1]          # the rare value ranks first
    assert robust.record(probe).score[0] < robust.record(probe).score[1]      # in IQR units it did not
    assert Calibration.from_dict(tail.to_dict()) == tail                     # stored as plain data
    # tiny inputs: three rows, one modality constant, one absent throughout
    three = fit_tail(np.array([0.0, 1.0, np.nan]))
    assert three["n"] == 2 and tail.normalisation["tail"]["a"]["n"] == n     # train warns under TAIL_MIN_VALUES
    np.testing.assert_allclose(tail_surprise(np.array([-1.0, 0.0, np.nan]), three)[:2], [0.0, 0.0])
    assert np.isnan(tail_surprise(np.array([np.nan]), three)[0])
    assert tail_surprise(np.array([5.0]), fit_tail(np.array([1.0, 1.0, 1.0])))[0] > 2    # above a constant
    assert tail_surprise(np.array([5.0]), fit_tail(np.array([np.nan])))[0] > 0
    with pytest.raises(ValueError, match="contribution scale"):
        Calibration.fit(raw, MODALITIES, scale="ranks", **kwargs)


def test_exact_quantiles_from_sorted_parts_by_counts_and_small_gathers():
    """`select_ranks` + `quantiles_from_ranks` give `np.quantile`'s numbers bit for bit (float64 and float32,
    ties, a constant, outliers that stretch the range), in rounds when intervals hold more than `gather_max`."""
    from dmafn.validation import quantiles_from_ranks, select_ranks, sorted_part_sample

    rng = np.random.default_rng(0)
    cases = [rng.normal(size=997), rng.normal(size=500).astype(np.float32), rng.integers(0, 4, 800).astype(float),
             np.full(50, 3.0), np.r_[rng.lognormal(size=300), -1e300, 1e300], np.array([2.5])]
    qs = np.r_[0.0, 0.25, 0.5, 0.75, 0.99, 1.0, np.linspace(0, 0.99, 100), rng.random(5)]
    for values in cases:
        parts = [np.sort(p).astype(float) for p in np.array_split(rng.permutation(values), 3)]   # as the shards keep them
        rounds = []

        def count_le(levels):
            rounds.append("count_le")
            return sum(np.searchsorted(p, levels, side="right") for p in parts)

        def between(intervals):
            rounds.append("between")
            return [np.concatenate([p[np.searchsorted(p, lo, "right"):np.searchsorted(p, hi, "right")] for p in parts])
                    for lo, hi in intervals]

        def sample(intervals, k):
            return [np.concatenate([sorted_part_sample(p, lo, hi, k) for p in parts]) for lo, hi in intervals]

        got = quantiles_from_ranks(values.size, qs, lambda ranks: select_ranks(
            ranks, n=values.size, bounds=(float(values.min()), float(values.max())), count_le=count_le,
            between=between, sample=sample, gather_max=16, bins=8), values.dtype)
        assert np.array_equal(got, np.quantile(values, qs)), values[:5]
        assert values.size <= 16 or values.min() == values.max() or "count_le" in rounds


def test_smoothing_in_parts_with_a_carry_equals_smoothing_the_whole_series():
    """`Calibration.smooth_carried`: each group's series cut in time, smoothed part by part, as smoothed whole
    (EWMA bit for bit; a rolling mean's sums start elsewhere: 1e-12)."""
    from dmafn.spec import SmoothingSpec

    rng = np.random.default_rng(1)
    n = 300
    groups = np.sort(rng.choice(["x", "y", "z"], n))
    time = rng.random(n)
    order = np.lexsort((time, groups))
    groups, time = groups[order], time[order]
    values = rng.normal(size=n)
    values[rng.random(n) < 0.3] = np.nan
    values[groups == "z"] = np.nan                       # a group with no value yet carries NaN
    slot = np.searchsorted([0.3, 0.31, 0.7], time)      # the second part holds few rows
    values[rng.random(n) < 0.1] = 8.0                    # over the knees below: softened once, never twice
    for smoothing in (SmoothingSpec(method="ewma", alpha=0.3), SmoothingSpec(method="rolling", window=4),
                      SmoothingSpec(method="none"), SmoothingSpec(method="ewma", alpha=0.3, knee=1.0),
                      SmoothingSpec(method="rolling", window=4, knee=1.0)):
        calibration = Calibration(("a",), {}, smoothing)
        carry, got = {}, np.full(n, np.nan)
        for k in range(4):
            rows = np.flatnonzero(slot == k)
            got[rows], carry = calibration.smooth_carried(values[rows], groups[rows], carry)
        whole = calibration.smooth(values, groups)
        if smoothing.method == "rolling":
            np.testing.assert_allclose(got, whole, rtol=1e-12, atol=1e-12)
        else:
            assert np.array_equal(got, whole, equal_nan=True)
        if smoothing.method != "none":
            parted = calibration.smooth(values, np.char.add(groups, slot.astype(str)))   # without the carry
            assert not np.allclose(parted, whole, equal_nan=True)


def _loaded(n: int, seed: int = 0) -> RawScores:
    """Ticks whose modality a errs more at high load (a state column of b's), b's error independent of it;
    a's own level is a state column too."""
    rng = np.random.default_rng(seed)
    load = rng.uniform(-1.5, 1.5, n)
    log_err = np.stack([load + rng.normal(0, 0.2, n), rng.normal(0, 0.3, n)], 1)
    state = np.stack([load, rng.normal(size=n)], 1)
    return RawScores(errors=np.exp(log_err), latent=None, mask=np.ones((n, 2), bool), state=state,
                     state_owners=("b", "a"))


def test_a_state_baseline_scores_each_error_against_its_level_at_the_operating_state():
    raw = _loaded(4000)
    fit = dict(detector="autoencoder", vote="mean", threshold=ThresholdSpec("quantile", quantile=0.99))
    cal = Calibration.fit(raw, MODALITIES, state_baseline=True, **fit)
    plain = Calibration.fit(raw, MODALITIES, state_baseline=False, **fit)
    assert "baseline" not in plain.normalisation
    assert cal.normalisation["baseline"]["a"]["columns"] == [0]        # b's level, never a's own
    assert cal.normalisation["baseline"]["b"]["columns"] == [1]
    a = cal.record(raw).contributions[:, 0]
    assert abs(np.corrcoef(a, raw.state[:, 0])[0, 1]) < 0.1             # no longer follows the load
    assert np.corrcoef(plain.record(raw).contributions[:, 0], raw.state[:, 0])[0, 1] > 0.9
    # a fault that lifts a's error by 0.8 at low load, against a normal tick at high load
    probe = RawScores(errors=np.exp(np.array([[-1.2 + 0.8, 0.0], [1.2, 0.0]])), latent=None,
                      mask=np.ones((2, 2), bool), state=np.array([[-1.2, 0.0], [1.2, 0.0]]), state_owners=("b", "a"))
    fault, normal = cal.record(probe).contributions[:, 0]
    assert fault > normal + 2
    fault, normal = plain.record(probe).contributions[:, 0]
    assert fault < normal                                               # what the plain scale gets wrong
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    np.testing.assert_array_equal(again.apply(raw)[0].score, cal.apply(raw)[0].score)


def test_a_state_baseline_reads_each_residual_against_the_spread_expected_at_its_state():
    """`state_spread`: where a's error strays far from its level (low load: a machine near rest) its residuals count
    for less, where it is steady (high load) for more - a rise at high load that the one spread of before called
    ordinary outranks a normal swing at low load; held within `SPREAD_LIMITS`; b, whose error the state does not
    explain (under `SPREAD_MIN_EXPLAINED`), keeps one spread; a calibration without a spread (before 2026-12-07)
    reads every residual on the one spread, as before."""
    from dmafn.scoring import SPREAD_LIMITS

    rng = np.random.default_rng(0)
    n = 4000
    load = rng.uniform(-1.5, 1.5, n)
    strays = np.where(load < 0, 1.0, 0.15)                 # a's log error: load + noise of 1.0 below 0, 0.15 above
    raw = RawScores(errors=np.exp(np.stack([load + rng.normal(0, 1, n) * strays, rng.normal(0, 0.3, n)], 1)),
                    latent=None, mask=np.ones((n, 2), bool), state=np.stack([load, rng.normal(size=n)], 1),
                    state_owners=("b", "a"))
    cal = Calibration.fit(raw, MODALITIES, detector="autoencoder", vote="mean", state_baseline=True)
    spread = cal.normalisation["baseline"]["a"]["spread"]
    assert "spread" not in cal.normalisation["baseline"]["b"]
    assert spread["mean"] == pytest.approx(np.mean(np.abs(rng.normal(0, 1, 200_000) * np.where(
        rng.random(200_000) < 0.5, 1.0, 0.15))), rel=0.1)
    one = Calibration.from_dict({**cal.to_dict(), "baseline": {m: {k: v for k, v in f.items() if k != "spread"}
                                                               for m, f in cal.to_dict()["baseline"].items()}})
    assert "spread" not in one.normalisation["baseline"]["a"]
    c, c_one = cal.record(raw).contributions[:, 0], one.record(raw).contributions[:, 0]
    ratio = np.quantile(c[load < 0], 0.99) / np.quantile(c[load > 0], 0.99)
    ratio_one = np.quantile(c_one[load < 0], 0.99) / np.quantile(c_one[load > 0], 0.99)
    assert ratio_one > 4 and ratio < ratio_one / 2
    # a rise of 0.8 at high load (over 5 of its noise stds) against a normal swing of 1.5 at low load (1.5 stds)
    probe = RawScores(errors=np.exp(np.array([[1.0 + 0.8, 0.0], [-1.0 + 1.5, 0.0]])), latent=None,
                      mask=np.ones((2, 2), bool), state=np.array([[1.0, 0.0], [-1.0, 0.0]]), state_owners=("b", "a"))
    rise, swing = cal.record(probe).contributions[:, 0]
    assert rise > swing + 0.5
    rise, swing = one.record(probe).contributions[:, 0]
    assert rise < swing                                                 # what the one spread gets wrong
    lo, hi = SPREAD_LIMITS
    basis_at = {x: _state_basis(np.array([[x, 0.0]]), cal.normalisation["state"], [0]) for x in (-1.4, 1.4)}
    factors = {x: state_spread(b, cal.normalisation["baseline"]["a"])[0] for x, b in basis_at.items()}
    assert 1 / hi <= factors[-1.4] < 1 < factors[1.4] <= 1 / lo
    assert state_spread(basis_at[1.4], one.normalisation["baseline"]["a"])[0] == 1.0
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    np.testing.assert_array_equal(again.apply(raw)[0].score, cal.apply(raw)[0].score)


def test_a_held_error_is_expected_at_the_state_it_was_read_at():
    """`RawScores.held_state`: a modality whose error is held (`hold_payload_errors`) is scored against its level at
    the operating state of the tick it was read at - a frame taken at high load and still the latest after the load
    fell is as normal as it was - and its baseline is fitted on those pairs."""
    raw = _loaded(4000)
    fit = dict(detector="autoencoder", vote="mean", state_baseline=True)
    cal = Calibration.fit(raw, MODALITIES, **fit)
    stale = RawScores(errors=np.exp(np.array([[1.2, 0.0], [1.2, 0.0]])), latent=None, mask=np.ones((2, 2), bool),
                      state=np.array([[1.2, 0.0], [-1.2, 0.0]]), state_owners=("b", "a"))   # the load fell
    fresh, now = cal.record(stale).contributions[:, 0]
    assert now > fresh + 2                                             # read against the state as it is now
    stale.held_state = {"a": np.array([[1.2, 0.0], [1.2, 0.0]])}
    assert cal.record(stale).contributions[1, 0] == pytest.approx(fresh)
    shifted = RawScores(raw.errors, None, raw.mask, raw.state, raw.state_owners,
                        held_state={"a": np.stack([raw.state[:, 0] + 0.5, raw.state[:, 1]], 1)})
    weights = Calibration.fit(shifted, MODALITIES, **fit).normalisation["baseline"]["a"]["weights"]
    assert weights != cal.normalisation["baseline"]["a"]["weights"]    # fitted on the held pairs


def test_a_held_payload_counts_by_the_smaller_of_its_held_and_its_fresh_reading():
    """`settle_held`: where a payload is held (the machine moved since its row came), its contribution is the smaller
    of the held reading (against the state it was taken in) and the tick's own (against the machine now) - a frame
    unusual for the moment it was taken that fits the machine now is not held as an anomaly; one anomalous both ways
    still is; its parts (driving channel) come with the reading chosen; a calibration from before reads as held."""
    cal = Calibration.fit(_loaded(4000), MODALITIES, detector="autoencoder", vote="mean", state_baseline=True)
    assert cal.normalisation["held_reading"] == "least"
    log_error = np.array([[1.2, 0.0], [3.5, 0.0], [1.2, 0.0]])      # a's error goes with the load (b's level)
    raw = RawScores(errors=np.exp(log_error), latent=None, mask=np.ones((3, 2), bool),
                    state=np.full((3, 2), [1.2, 0.0]), state_owners=("b", "a"),     # the load now: high
                    held_state={"a": np.array([[-1.2, 0.0], [1.2, 0.0], [1.2, 0.0]])},  # tick 0's row came at low
                    channel_errors={"a": np.array([[2.0, 1.0], [1.0, 2.0], [2.0, 1.0]])},
                    fresh_errors={"a": np.exp(np.array([1.2, 3.5, 1.2]))},
                    fresh_channel_errors={"a": np.array([[1.0, 2.0], [2.0, 1.0], [2.0, 1.0]])})
    as_held = Calibration.from_dict({k: v for k, v in cal.to_dict().items() if k != "held_reading"})   # older
    held = as_held.record(raw).contributions[:, 0]
    settled = cal.settle(raw)
    c = cal.record(raw).contributions[:, 0]
    assert held[0] > c[0] + 2 and c[0] == pytest.approx(c[2])      # tick 0: as normal as the machine now reads it
    assert c[1] > c[2] + 2 and c[1] == pytest.approx(held[1])      # tick 1: anomalous both ways - still anomalous
    np.testing.assert_array_equal(cal.record(settled).contributions, cal.record(raw).contributions)
    assert settled.channel_errors["a"][:, 0].tolist() == [1.0, 1.0, 2.0] and not settled.fresh_errors
    assert settled.held_state["a"][0, 0] == 1.2 and settled.held_state["a"][1, 0] == 1.2
    assert as_held.settle(raw) is raw and held[1] == pytest.approx(c[1])
    np.testing.assert_array_equal(as_held.record(raw).contributions[:, 1], cal.record(raw).contributions[:, 1])


def test_a_frame_that_came_while_the_machine_moved_counts_by_the_least_of_three_readings():
    """`settle_held` under `held_reading: least`: a frame that came while the machine moved (`RawScores.prior_state`,
    the state at the tick before its row came) is also read against that state, and counts by the least of its
    three readings - a frame of a loaded machine first read once the load fell is judged against the load it
    pictured; one anomalous all three ways still is; a calibration reading the smaller of two ignores the prior."""
    cal = Calibration.fit(_loaded(4000), MODALITIES, detector="autoencoder", vote="mean", state_baseline=True)
    log_error = np.array([[1.2, 0.0], [1.2, 0.0], [3.5, 0.0]])      # a's error goes with the load (b's level)
    low = np.full((3, 2), [-1.2, 0.0])                              # the load now, and when each frame was read
    raw = RawScores(errors=np.exp(log_error), latent=None, mask=np.ones((3, 2), bool), state=low,
                    state_owners=("b", "a"), held_state={"a": low.copy()}, fresh_errors={"a": np.exp(log_error[:, 0])},
                    prior_state={"a": np.array([[1.2, 0.0], [-1.2, 0.0], [1.2, 0.0]])})   # ticks 0, 2: came falling
    c = cal.record(raw).contributions[:, 0]
    smaller = Calibration.from_dict({**cal.to_dict(), "held_reading": "smaller"})
    two = smaller.record(raw).contributions[:, 0]
    normal = cal.record(replace(raw, state=-low, held_state={}, fresh_errors={}, prior_state={})).contributions[0, 0]
    assert two[0] > normal + 2 and c[0] == pytest.approx(normal)   # tick 0: judged against the load it pictured
    assert c[1] == pytest.approx(two[1]) and c[1] == pytest.approx(two[0])   # tick 1: no move, two readings
    assert c[2] > normal + 2                                       # tick 2: anomalous all three ways
    settled = cal.settle(raw)
    assert settled.held_state["a"][:, 0].tolist() == [1.2, -1.2, 1.2] and not settled.prior_state   # the least
    np.testing.assert_array_equal(cal.record(settled).contributions, cal.record(raw).contributions)


def test_a_state_baseline_reads_how_fast_the_other_modalities_state_moves():
    """With speed columns (`model.state_speed`): a's error runs higher while b's state rises fast (a machine starting
    up, 3 % of the validation ticks); a's baseline reads how fast b's state rises (never its own), with hinges in
    the speed's tail (`SPEED_LEVELS`), so a start-up's error is ordinary while the same error at a steady state still
    stands out; b absent: b's level and speed fall back together."""
    from dmafn.scoring import SPEED_LEVELS

    rng = np.random.default_rng(0)
    n = 6000
    speed = np.where(rng.random(n) < 0.03, rng.uniform(1.0, 3.0, n), np.abs(rng.normal(0, 0.15, n)))
    own_speed = np.abs(rng.normal(0, 0.15, n))
    log_err = np.stack([rng.normal(0, 0.2, n) + 1.5 * np.maximum(speed - 0.5, 0), rng.normal(0, 0.3, n)], 1)
    state = np.stack([rng.normal(size=n), rng.normal(size=n), speed, own_speed], 1)
    owners = ("b", "a", "b.rising", "a.rising")
    raw = RawScores(errors=np.exp(log_err), latent=None, mask=np.ones((n, 2), bool), state=state, state_owners=owners)
    fit = dict(detector="autoencoder", vote="mean", state_baseline=True)
    cal = Calibration.fit(raw, MODALITIES, **fit)
    without_speed = RawScores(raw.errors, None, raw.mask, state[:, :2], owners[:2])
    blind = Calibration.fit(without_speed, MODALITIES, **fit)
    assert cal.normalisation["baseline"]["a"]["columns"] == [0, 2]           # b's level and rise, not a's rise
    assert cal.normalisation["baseline"]["b"]["columns"] == [1, 3]
    assert set(cal.normalisation["baseline"]["a"]["fallbacks"]) == {"b", "*"}
    assert "(a, 2 columns, 1 of them how fast a state rises)" in cal.baseline_lines()[1]
    assert cal.normalisation["state"]["hi"][2] == pytest.approx(speed.max())
    assert cal.normalisation["state"]["knots"][2] == pytest.approx(np.quantile(speed, SPEED_LEVELS[1:4]).tolist())
    start = [[0.0, 0.0, 2.5, 0.1], [0.0, 0.0, 0.1, 0.1]]                   # a start-up, then a steady tick
    probe = RawScores(errors=np.exp(np.array([[3.0, 0.0], [3.0, 0.0]])), latent=None, mask=np.ones((2, 2), bool),
                      state=np.array(start), state_owners=owners)
    run_up, steady = cal.record(probe).contributions[:, 0]
    assert steady > run_up + 3
    threshold = np.quantile(cal.record(raw).contributions[:, 0], 0.99)
    assert run_up < threshold < steady
    blind_probe = RawScores(probe.errors, None, probe.mask, probe.state[:, :2], owners[:2])
    blind_threshold = np.quantile(blind.record(without_speed).contributions[:, 0], 0.99)
    assert blind.record(blind_probe).contributions[0, 0] > blind_threshold    # without the speed: an alarm
    gone = RawScores(probe.errors, None, probe.mask, np.array([[np.nan, 0.0, np.nan, 0.1]] * 2), owners)
    assert np.isfinite(cal.record(gone).contributions).all()                 # b's fallback, its speed out too
    again = Calibration.from_dict(cal.to_dict())
    np.testing.assert_array_equal(again.apply(raw)[0].score, cal.apply(raw)[0].score)


def test_a_state_baseline_holds_the_state_in_its_range_and_names_a_wrong_layout():
    cal = Calibration.fit(_loaded(4000), MODALITIES, detector="autoencoder", vote="mean", state_baseline=True)
    far = RawScores(errors=np.ones((2, 2)), latent=None, mask=np.ones((2, 2), bool),
                    state=np.array([[1.5, 0.0], [50.0, 0.0]]), state_owners=("b", "a"))
    c = cal.record(far).contributions[:, 0]
    assert np.isfinite(c).all() and c[1] == pytest.approx(c[0], abs=0.05)   # 50 is read as the range's top
    with pytest.raises(ValueError, match=r"\['b', 'a'\]"):
        cal.record(RawScores(np.ones((1, 2)), None, np.ones((1, 2), bool)))
    no_state = Calibration.fit(_raw(400), MODALITIES, detector="autoencoder", vote="mean", state_baseline=True)
    assert "baseline" not in no_state.normalisation                     # nothing to condition on: as before


def test_with_a_state_modality_absent_the_baseline_falls_back_and_keeps_its_false_alarm_rate():
    """b absent: a's error is scored by the regression without b's levels (here its mean), its residual put on
    the full regression's spread - not against b's typical level, which would call every high-load tick rare."""
    cal = Calibration.fit(_loaded(4000), MODALITIES, detector="autoencoder", vote="mean", state_baseline=True)
    assert set(cal.normalisation["baseline"]["a"]["fallbacks"]) == {"b", "*"}
    new = _loaded(4000, seed=1)
    with_b = cal.record(new).contributions[:, 0]
    new.state = new.state.copy()
    new.state[:, 0] = np.nan
    without_b = cal.record(new).contributions[:, 0]
    assert np.isfinite(without_b).all()
    assert np.quantile(without_b, 0.99) == pytest.approx(np.quantile(with_b, 0.99), rel=0.2)
    assert np.mean(without_b > np.quantile(with_b, 0.99)) < 0.03


def test_train_logs_what_the_operating_state_explains_of_each_modalitys_error_or_why_it_has_no_baseline():
    lines = Calibration.fit(_loaded(4000), MODALITIES, detector="autoencoder", vote="mean").baseline_lines()
    assert lines[0].startswith("modality 'a': log error against its level at the operating state (b, 1 column): "
                               "residual std 0.2")                  # a's error: load (b's level) + noise 0.2
    assert lines[0].endswith("of its variance explained), 4,000 validation ticks; each residual against the spread "
                             "expected at its state")                # explained over SPREAD_MIN_EXPLAINED
    assert lines[1].endswith("validation ticks")                     # b's: one spread
    share = int(lines[0].split("(")[2].split("%")[0])
    assert share > 90 and int(lines[1].split("(")[2].split("%")[0]) < 5   # b's error has nothing to do with a's
    few = Calibration.fit(_loaded(40), MODALITIES, detector="autoencoder", vote="mean")
    assert few.normalisation["baseline"] == {} and few.baseline_lines()[0] == (
        "modality 'a': no state baseline (fewer than 50 validation ticks with it and its operating state present)")
    np.testing.assert_array_equal(few.record(_loaded(40)).contributions,        # and scores as without one
                                  Calibration.fit(_loaded(40), MODALITIES, detector="autoencoder", vote="mean",
                                                  state_baseline=False).record(_loaded(40)).contributions)
    assert Calibration.fit(_raw(400), MODALITIES, detector="autoencoder", vote="mean").baseline_lines() == []
    non_voting = Calibration.fit(_loaded(4000), MODALITIES, detector="autoencoder", vote="mean", voting=("a",))
    assert [line.split(":")[0] for line in non_voting.baseline_lines()] == ["modality 'a'"]


def test_spread_after_grows_flags_within_each_group_and_hands_their_reach_on():
    from dmafn.calibration import spread_after

    flags = np.array([False, True, False, False, False, False, True, False])
    groups = np.array(["x", "x", "x", "x", "x", "y", "y", "y"])       # y: an outlier one row before its end
    grown, carry = spread_after(flags, groups, 2, {"y": 1})
    assert grown.tolist() == [False, True, True, True, False, True, True, True]   # y's first row: the part before's
    assert carry == {"y": 1}                               # y's outlier reaches one row into its next part
    assert spread_after(flags, groups, 0, {})[0].tolist() == flags.tolist()
    grown, carry = spread_after(np.zeros(3, bool), np.array(["x"] * 3), 2, {"x": 5})   # a reach longer than a part
    assert grown.all() and carry == {"x": 2}


def _incident_day(n=3000, seed=0):
    """Clean validation ticks of two entities, and the same with an incident on entity e1: modality a 60x its
    usual error for 150 ticks, then 30 ticks of stale evidence at 3x (a log window still holding its lines)."""
    raw = _raw(n, seed)
    groups = np.repeat(["e0", "e1"], n // 2)
    errors = raw.errors.copy()
    errors[2000:2150, 0] *= 60
    errors[2150:2180, 0] *= 3
    return raw, RawScores(errors=errors, latent=None, mask=raw.mask), groups


def test_validation_outliers_are_left_out_so_an_incident_does_not_set_the_threshold():
    clean, dirty, groups = _incident_day()
    fit = dict(detector="autoencoder", vote="mean", smoothing=SmoothingSpec("ewma", 0.5), groups=groups,
               threshold=ThresholdSpec("pot", risk=1e-3), scale="tail")
    reference = Calibration.fit(clean, MODALITIES, **fit)
    fooled = Calibration.fit(dirty, MODALITIES, **fit)
    robust = Calibration.fit(dirty, MODALITIES, outlier_limit=4.0, outlier_after=40, **fit)
    # on the clean ticks: nothing (or next to nothing) left out, the same calibration
    kept = Calibration.fit(clean, MODALITIES, outlier_limit=4.0, outlier_after=40, **fit)
    assert kept.outliers_left_out == 0 and kept.outlier_warnings() == []
    assert kept == reference
    # a few gross ticks (under 1 % of the ticks over the limit) are a clean day's own tail: kept
    def same(a, b):                                       # all but the count of ticks flagged and kept
        return a.normalisation == b.normalisation and a.threshold == b.threshold and (
            {k: v for k, v in a.validation.items() if k != "validation_outliers_kept"}
            == {k: v for k, v in b.validation.items() if k != "validation_outliers_kept"})

    spiked = _raw(3000, spike=100)
    trimmed = Calibration.fit(spiked, MODALITIES, outlier_limit=4.0, outlier_after=5, **fit)
    assert same(trimmed, Calibration.fit(spiked, MODALITIES, **fit))
    assert trimmed.outliers_kept == 1 and trimmed.outliers_left_out == 0      # the spike (its reach not counted)
    # brief spikes under 1 % whose reach makes them more (a routine run-down of a few minutes, several a day): kept
    errors = clean.errors.copy()
    errors[np.arange(100, 2900, 112), 0] *= 60                        # 25 spikes, 0.8 %; with a reach of 6: 5.8 %
    brief = RawScores(errors=errors, latent=None, mask=clean.mask)
    spikes = Calibration.fit(brief, MODALITIES, outlier_limit=4.0, outlier_after=6, **fit)
    assert same(spikes, Calibration.fit(brief, MODALITIES, **fit)) and spikes.outliers_kept == 25
    # more than half of the ticks beyond the limit (a validation window that is one long incident): none left out
    errors = clean.errors.copy()
    errors[[*range(10, 30), *range(1510, 1530)], 0] *= 60     # 40 outliers early in each entity, reaching to its end
    early = RawScores(errors=errors, latent=None, mask=clean.mask)
    flooded = Calibration.fit(early, MODALITIES, outlier_limit=4.0, outlier_after=len(groups), **fit)
    assert same(flooded, Calibration.fit(early, MODALITIES, **fit)) and flooded.outliers_kept > len(groups) / 2
    assert any("more than half, so none was left out" in line for line in flooded.outlier_warnings())
    few = _raw(200, spike=100)                            # 6 of 200 ticks: over 1 %, but too few to tell (10 at most)
    few_fit = {**fit, "groups": None}
    assert same(Calibration.fit(few, MODALITIES, outlier_limit=4.0, outlier_after=5, **few_fit),
                Calibration.fit(few, MODALITIES, **few_fit))
    # the incident's 150 ticks and the reach after them go; the threshold is the clean one's again
    assert 150 <= robust.outliers_left_out <= 150 + 40 + 10
    assert robust.validation["validation_ticks"] == len(groups) - robust.outliers_left_out
    assert robust.threshold == pytest.approx(reference.threshold, rel=0.1)
    # a new day's fault (a at 20x for a while) is caught by the robust calibration, not by the fooled one
    new = _raw(1000, seed=3)
    errors = new.errors.copy()
    errors[500:540, 0] *= 20
    fault = RawScores(errors=errors, latent=None, mask=new.mask)
    caught = {name: cal.apply(fault)[1][505:540].mean() for name, cal in
              (("reference", reference), ("robust", robust), ("fooled", fooled))}
    assert caught["robust"] == caught["reference"] > 0.9 and caught["fooled"] < 0.1
    assert any("left out of the calibration as outliers" in line for line in robust.outlier_warnings())
    assert Calibration.from_dict(robust.to_dict()).outliers_left_out == robust.outliers_left_out


def test_validation_outliers_flagged_a_chunk_of_ticks_at_a_time_are_the_same(monkeypatch):
    """The flags' contributions are computed `OUTLIER_CHUNK` ticks at a time (memory); chunks of 7 ticks, cutting
    the incident and its reach, give the same calibration as one chunk."""
    import dmafn.calibration as calibration

    _, dirty, groups = _incident_day()
    fit = dict(detector="autoencoder", vote="mean", smoothing=SmoothingSpec("ewma", 0.5), groups=groups,
               threshold=ThresholdSpec("pot", risk=1e-3), scale="tail", outlier_limit=4.0, outlier_after=40)
    whole = Calibration.fit(dirty, MODALITIES, **fit)
    monkeypatch.setattr(calibration, "OUTLIER_CHUNK", 7)
    assert Calibration.fit(dirty, MODALITIES, **fit) == whole and whole.outliers_left_out >= 150


def test_the_detector_and_the_spec_carry_the_outlier_limit():
    from dmafn.detector import Detector
    from dmafn.spec import SpecError, TrainSpec, parse_spec
    from tests.conftest import tiny_spec_dict

    assert Detector({}).outlier_limit == TrainSpec.validation_outlier_limit == 4.0
    data = tiny_spec_dict()
    assert parse_spec(data).train.validation_outlier_limit == 4.0
    off = parse_spec({**data, "train": {**data["train"], "validation_outlier_limit": 0}})
    assert off.train.validation_outlier_limit is None
    assert parse_spec(off.to_dict()).train.validation_outlier_limit is None        # a round trip keeps it off
    with pytest.raises(SpecError, match=r"train.validation_outlier_limit.*at least 1"):
        parse_spec({**data, "train": {**data["train"], "validation_outlier_limit": 0.5}})


def test_raw_scores_of_batches_join_in_the_order_given_with_their_held_states():
    """`RawScores.concatenate` (a validation shard's batches, `pipelines.calibrate`): every per-tick field joined
    and taken in `order`, the held states kept - the state baseline of a held modality reads them."""
    a, b = _loaded(3, seed=1), _loaded(2, seed=2)
    a.held_state, b.held_state = {"a": a.state + 1}, {"a": b.state + 2}
    whole = RawScores.concatenate([a, b], np.array([4, 0, 1, 2, 3]))
    assert np.array_equal(whole.errors, np.r_[a.errors, b.errors][[4, 0, 1, 2, 3]])
    assert np.array_equal(whole.held_state["a"], np.r_[a.state + 1, b.state + 2][[4, 0, 1, 2, 3]])
    assert np.array_equal(whole.state, np.r_[a.state, b.state][[4, 0, 1, 2, 3]]) and whole.state_owners == ("b", "a")
    assert whole.state_of("b") is whole.state and whole.rows([0]).held_state["a"].shape == (1, 2)
