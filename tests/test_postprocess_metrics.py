"""POT, thresholds, smoothing, events and metrics against hand-computed values."""
import functools
import math
import operator
import pickle

import numpy as np
import pytest

from dmafn.metrics import event_metrics, point_adjust, point_metrics, pr_auc, report, roc_auc
from dmafn.postprocess import (best_f1_threshold, events, ewma, fit_threshold, gpd_fit, pot_threshold,
                               rolling_mean, smooth, smooth_by_group, soften, to_labels)


def test_roc_auc_hand_computed():
    # pairs (pos, neg): (0.8,0.1) (0.8,0.4) (0.8,0.35) (0.35,0.1) (0.35,0.4) (0.35 tie 0.35 = 0.5) -> 4.5 / 6
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.35])
    labels = np.array([0, 0, 0, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx(4.5 / 6)


def test_roc_auc_ignores_nan_and_needs_both_classes():
    assert roc_auc(np.array([np.nan, 1.0, 0.0]), np.array([0, 1, 0])) == 1.0
    assert math.isnan(roc_auc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_pr_auc_hand_computed():
    # ranked: 0.9(+) 0.8(-) 0.7(+) 0.1(-): AP = 1/2 * 1 + 1/2 * 2/3
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    labels = np.array([1, 0, 1, 0])
    assert pr_auc(scores, labels) == pytest.approx(0.5 + 1 / 3)


def test_point_metrics_hand_computed():
    pred = np.array([1, 1, 0, 0, 1, 0])
    true = np.array([1, 0, 1, 0, 1, 0])
    m = point_metrics(pred, true)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["far"] == pytest.approx(1 / 3)
    assert m["mar"] == pytest.approx(1 / 3)


def test_event_metrics_and_point_adjust():
    true = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    pred = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1, 1])
    e = event_metrics(pred, true)
    assert e["event_recall"] == 0.5 and e["event_precision"] == 0.5 and e["events"] == 2 and e["alarms"] == 2
    assert point_adjust(pred, true).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    r = report(pred.astype(float), true, 0.5)
    assert r["f1_point_adjusted"] >= r["f1"]          # adjustment inflates; both are reported
    # only the alarm events of 2 ticks or more: the 1-tick alarm inside the first event no longer catches it
    e2 = event_metrics(pred, true, min_ticks=2)
    assert (e2["alarms"], e2["event_precision"], e2["event_recall"]) == (1, 0.0, 0.0)
    reach = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 0])   # a 3-tick alarm run reaching outside the event still catches it
    assert event_metrics(reach, true, min_ticks=3)["event_recall"] == 0.5


def test_events_bridge_gaps():
    assert events(np.array([1, 1, 0, 1, 0, 0, 0, 1])) == [(0, 1), (3, 3), (7, 7)]
    assert events(np.array([1, 1, 0, 1, 0, 0, 0, 1]), max_gap=1) == [(0, 3), (7, 7)]
    assert events(np.zeros(4)) == []


def test_ewma_and_rolling_hand_computed():
    assert ewma(np.array([1.0, 3.0, np.nan, 5.0]), 0.5).tolist()[:2] == [1.0, 2.0]
    out = ewma(np.array([1.0, 3.0, np.nan, 5.0]), 0.5)
    assert math.isnan(out[2]) and out[3] == pytest.approx(3.5)
    assert rolling_mean(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [1.0, 1.5, 2.5, 3.5]


def test_a_knee_counts_the_excess_over_it_by_its_log_and_keeps_the_order():
    values = np.array([0.5, 2.0, 3.0, 10.0, np.nan])
    got = soften(values, 2.0)
    assert got[:4] == pytest.approx([0.5, 2.0, 2.0 + math.log(2.0), 2.0 + math.log(9.0)])
    assert math.isnan(got[4]) and np.all(np.diff(got[:4]) > 0)
    assert np.array_equal(soften(values, None), values, equal_nan=True)


def test_a_knee_shortens_how_long_one_overwhelming_tick_holds_the_smoothed_score_up():
    """One tick of surprise 50 among ticks of 0.4: EWMA 0.5 stays over 1.5 for 4 ticks after it without a knee,
    2 with a knee at 6 (6 + ln 45 = 9.8 carried); before it nothing changes, and smoothing 'none' is untouched."""
    scores = np.r_[np.full(5, 0.4), 50.0, np.full(10, 0.4)]
    plain, kneed = smooth(scores, "ewma", 0.5), smooth(scores, "ewma", 0.5, knee=6.0)
    assert (plain[6:] > 1.5).sum() == 4 and (kneed[6:] > 1.5).sum() == 2
    assert np.array_equal(plain[:5], kneed[:5]) and kneed[5] == pytest.approx(0.5 * 0.4 + 0.5 * (6 + math.log(45)))
    assert np.array_equal(smooth(scores, "none", knee=6.0), scores)
    assert smooth(scores, "rolling", window=3, knee=6.0)[5] == pytest.approx((0.8 + 6 + math.log(45)) / 3)


def test_many_series_step_their_ewma_together_to_the_same_bits_as_one_at_a_time(monkeypatch):
    """`smooth_by_group` steps the EWMAs of many series at once (`EWMA_SERIES_AT_ONCE`: one array operation per
    time step); each series comes out bit for bit as `ewma` gives it alone - rows of the groups interleaved, lengths
    1 to 40, NaNs inside, a series that starts with NaNs and one that is all NaN, two columns, with and without a
    knee; lengths too uneven to pad (`EWMA_MAX_PADDING`) take the series one at a time, with the same values."""
    import dmafn.postprocess as postprocess

    rng = np.random.default_rng(3)
    lengths = np.r_[1, 40, rng.integers(1, 41, 22)]
    groups = np.repeat([f"m{i}" for i in range(len(lengths))], lengths)
    values = rng.normal(0, 3, (len(groups), 2))
    values[rng.random(values.shape) < 0.2] = np.nan
    values[groups == "m2"] = np.nan                                      # all NaN
    values[np.flatnonzero(groups == "m3")[:3]] = np.nan                  # starts with NaNs
    times = np.concatenate([np.sort(rng.random(n)) for n in lengths])   # the groups' rows interleaved by time
    rows = np.argsort(times, kind="stable")
    groups, values = groups[rows], values[rows]
    for knee in (None, 1.0):
        calls = []
        monkeypatch.setattr(postprocess, "_ewma_together", lambda *a, f=postprocess._ewma_together: calls.append(1)
                            or f(*a))
        together = smooth_by_group(values, groups, "ewma", 0.3, knee=knee)
        assert calls                                                     # 24 groups x 2 columns: together
        for g in np.unique(groups):
            for j in range(2):
                alone = ewma(soften(values[groups == g, j], knee), 0.3)
                assert np.array_equal(together[groups == g, j], alone, equal_nan=True)
        monkeypatch.setattr(postprocess, "EWMA_MAX_PADDING", 1)          # 24 x 40 padded steps > the values
        calls.clear()
        assert np.array_equal(smooth_by_group(values, groups, "ewma", 0.3, knee=knee), together, equal_nan=True)
        assert not calls
        monkeypatch.undo()


def test_smoothing_stays_within_its_group():
    scores = np.array([0.0, 10.0, 0.0, 10.0])
    groups = np.array(["a", "b", "a", "b"])
    assert smooth_by_group(scores, groups, "ewma", 0.5).tolist() == [0.0, 10.0, 0.0, 10.0]


@pytest.mark.parametrize("method, knee", [("ewma", None), ("rolling", None), ("none", None), ("ewma", 1.0),
                                         ("rolling", 0.5), ("none", 1.0)])
def test_polars_smoothing_per_entity_equals_the_reference_series_by_series(method, knee):
    """The pipeline's Polars window expressions give the values of `dmafn.postprocess.smooth` applied to each
    entity's series (NaN ticks skipped and kept null, values over a knee softened), whatever the order rows
    come in."""
    import polars as pl

    from pipelines.postprocess import smoothed

    rng = np.random.default_rng(1)
    n = 600
    groups = rng.choice(["a", "b", "c", "d"], n)
    scores = rng.normal(size=n) * 3
    scores[rng.random(n) < 0.1] = np.nan
    df = pl.DataFrame({"g": groups, "t": np.arange(n), "s": scores}).sample(fraction=1.0, shuffle=True, seed=2)
    out = df.sort("g", "t").with_columns(smoothed("s", method, alpha=0.3, window=5, over=["g"], knee=knee))
    reference = df.sort("g", "t")
    expected = smooth_by_group(reference["s"].to_numpy(), reference["g"].to_numpy(), method, 0.3, 5, knee)
    if knee is not None and method != "none":     # the knee took part
        assert not np.allclose(expected, smooth_by_group(reference["s"].to_numpy(), reference["g"].to_numpy(),
                                                         method, 0.3, 5), equal_nan=True)
    got = out["s"].fill_null(np.nan).to_numpy()
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=0, atol=1e-12)


def test_the_metrics_tally_read_in_chunks_equals_the_metrics_of_the_whole_series(tiny_spec):
    """`MetricsTally` over time chunks (events and alarm runs crossing their edges, an entity absent from one)
    gives what `dmafn.metrics` gives on the whole series: ROC-AUC / PR-AUC overall and per kind, point-wise,
    event-wise (each entity's runs, pooled) and point-adjusted metrics, and the oracle threshold."""
    import polars as pl

    from dmafn.metrics import point_adjust, point_metrics, pr_auc, roc_auc
    from dmafn.postprocess import best_f1_threshold, to_labels
    from pipelines.evaluate import MetricsTally, metrics_table

    rng = np.random.default_rng(3)
    n, entities = 240, ["a", "b", "c"]
    rows = []
    for e in entities:
        label = np.zeros(n, bool)
        kind = np.full(n, None, object)
        for start in rng.choice(n - 30, 6, replace=False):
            length = int(rng.integers(3, 30))
            label[start:start + length] = True
            kind[start:start + length] = rng.choice(["x", "y"])
        score = rng.normal(size=n) + 1.5 * label
        proc = np.where(rng.random(n) < 0.1, np.nan, score + rng.normal(size=n))
        rows.append(pl.DataFrame({"machine_id": e, "ts": np.arange(n), "score": score, "threshold": 1.0,
                                  "label": label.astype(np.int8), "label_kind": kind.tolist(),
                                  "score_proc": pl.Series(proc).fill_nan(None)}))
    df = pl.concat(rows).sort("machine_id", "ts")
    whole = metrics_table(df, tiny_spec)

    tally, cuts = MetricsTally(tiny_spec), [0, 37, 100, 101, 190, n]
    chunks = [df.filter((pl.col("ts") >= a) & (pl.col("ts") < b)) for a, b in zip(cuts, cuts[1:])]
    chunks[2] = chunks[2].filter(pl.col("machine_id") != "c")
    chunks[3] = pl.concat([chunks[3], df.filter((pl.col("ts") == 100) & (pl.col("machine_id") == "c"))]).sort("machine_id", "ts")
    for chunk in chunks:
        tally.first_pass(chunk)
    tally.freeze()
    for chunk in chunks:
        tally.second_pass(chunk)
    flat = lambda d, at="": ({k: v for key, sub in d.items() for k, v in flat(sub, f"{at}/{key}").items()}  # noqa: E731
                             if isinstance(d, dict) else {at: d})
    assert flat(tally.result()) == pytest.approx(flat(whole), rel=0, abs=1e-12, nan_ok=True)
    assert whole["by_kind"].keys() == {"x", "y"} and whole["overall"].keys() == {"fused", "score_proc"}

    score, y = df["score"].to_numpy(), df["label"].to_numpy().astype(bool)
    fused = whole["overall"]["fused"]
    assert fused["roc_auc"] == roc_auc(score, y) and fused["pr_auc"] == pytest.approx(pr_auc(score, y), abs=1e-12)
    x = (df["label_kind"] == "x").fill_null(False).to_numpy()
    assert whole["by_kind"]["x"]["fused"]["roc_auc"] == pytest.approx(roc_auc(score[x | ~y], y[x | ~y]), abs=1e-12)
    proc = df["score_proc"].fill_null(np.nan).to_numpy()
    assert whole["overall"]["score_proc"]["roc_auc"] == pytest.approx(roc_auc(proc, y), abs=1e-12)
    pred = to_labels(score, 1.0)
    assert {k: fused[k] for k in ("precision", "recall", "f1", "far", "mar")} == point_metrics(pred, y)
    hits = events_ = good = alarms = 0
    adjusted = []
    for e in entities:
        sel = (df["machine_id"] == e).to_numpy()
        m = event_metrics(pred[sel], y[sel])
        hits, events_ = hits + m["event_recall"] * m["events"], events_ + m["events"]
        good, alarms = good + m["event_precision"] * m["alarms"], alarms + m["alarms"]
        adjusted.append(point_adjust(pred[sel], y[sel]))
    assert fused["event_recall"] == pytest.approx(hits / events_) and fused["event_precision"] == pytest.approx(good / alarms)
    assert fused["f1_point_adjusted"] == pytest.approx(point_metrics(np.concatenate(adjusted), y)["f1"])
    oracle = best_f1_threshold(score, y)
    assert fused["oracle_threshold"] == oracle and fused["oracle_f1"] == point_metrics(to_labels(score, oracle), y)["f1"]


def test_the_ranking_tally_equals_the_whole_column_metrics_on_random_ties():
    """`RankingTally` (positives kept, negatives counted in chunks) against roc_auc / pr_auc / best_f1_threshold:
    ties within and across classes, NaN scores, groups, no positives at all; and the chunks' `NegativeCounts`
    counted against copies of the frozen tally and summed in another order."""
    from dmafn.metrics import RankingTally
    from dmafn.postprocess import best_f1_threshold

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 120))
        s = np.round(rng.normal(size=n), int(rng.integers(0, 3)))
        s[rng.random(n) < 0.05] = np.nan
        y, g = rng.random(n) < rng.random(), rng.integers(0, 2, n)
        tally = RankingTally()
        cuts = [0, *sorted(rng.integers(0, n, 2)), n]
        for a, b in zip(cuts, cuts[1:]):
            tally.add_positives(s[a:b][y[a:b]], g[a:b][y[a:b]])
        tally.freeze()
        # where the chunks lie elsewhere: each counted against a copy of the frozen tally, summed in another order
        counts = [pickle.loads(pickle.dumps(tally)).count_negatives(s[a:b][~y[a:b]]) for a, b in zip(cuts, cuts[1:])]
        summed = pickle.loads(pickle.dumps(tally))
        summed.add_counts(functools.reduce(operator.add, counts[::-1]))
        for a, b in zip(cuts, cuts[1:]):
            tally.add_negatives(s[a:b][~y[a:b]])
        for t in (tally, summed):
            for group in (None, 0, 1):
                sel = np.ones(n, bool) if group is None else ~y | (g == group)
                assert t.roc_auc(group) == pytest.approx(roc_auc(s[sel], y[sel]), abs=1e-12, nan_ok=True)
                assert t.pr_auc(group) == pytest.approx(pr_auc(s[sel], y[sel]), abs=1e-12, nan_ok=True)
            if np.isfinite(s).any():
                threshold, found, wrong = t.best_f1()
                pred = to_labels(s, threshold).astype(bool)
                assert threshold == best_f1_threshold(s, y) and (found, wrong) == ((pred & y).sum(), (pred & ~y).sum())


def test_the_shortfall_splits_one_minus_roc_auc_by_kind_and_by_normal_ticks_hand_computed():
    """Positives 1 (kind 0), 3 (kind 1); negatives 2 and 3 (class a), 0 (class b): pairs outranked (neg > pos):
    2>1, 3>1; tied: 3=3 - so 1 - ROC-AUC = (2 + 0.5) / 6, kind 0 carries 2/6, kind 1 0.5/6; class a all of it."""
    from dmafn.metrics import RankingTally

    tally = RankingTally()
    tally.add_positives(np.array([1.0, 3.0, np.nan]), np.array([0, 1, 1]))
    tally.freeze()
    a, b = tally.count_pairs(np.array([2.0, 3.0, np.nan])), tally.count_pairs(np.array([0.0]))
    assert (a.above, a.level, a.n, b.above, b.level, b.n) == (2, 1, 2, 0, 0, 1)   # 2 over 1; 3 over 1, level with 3
    tally.add_negatives(np.array([2.0, 3.0, 0.0]))
    assert 1 - tally.roc_auc() == pytest.approx(2.5 / 6)
    assert (tally.shortfall(0), tally.shortfall(1), tally.shortfall()) == pytest.approx((2 / 6, 0.5 / 6, 2.5 / 6))
    assert (tally.shortfall_of_pairs(a), tally.shortfall_of_pairs(b)) == pytest.approx((2.5 / 6, 0.0))
    assert tally.shortfall_of_pairs(a + b) == pytest.approx(2.5 / 6)


def test_the_shortfall_adds_up_to_one_minus_roc_auc_on_random_ties():
    """Over random scores with ties and NaN: the kinds' parts and any split of the negatives add up to 1 - ROC-AUC,
    and each class's part is its pairs counted by brute force."""
    from dmafn.metrics import RankingTally

    rng = np.random.default_rng(3)
    for _ in range(100):
        n = int(rng.integers(3, 80))
        s = np.round(rng.normal(size=n), int(rng.integers(0, 2)))
        s[rng.random(n) < 0.05] = np.nan
        y, g, cls = rng.random(n) < 0.4, rng.integers(0, 3, n), rng.integers(0, 2, n)
        if not (y & np.isfinite(s)).any() or not (~y & np.isfinite(s)).any():
            continue
        tally = RankingTally()
        tally.add_positives(s[y], g[y])
        tally.freeze()
        pairs = [tally.count_pairs(s[~y & (cls == c)]) for c in (0, 1)]
        tally.add_negatives(s[~y])
        total = 1 - roc_auc(s, y)
        assert sum(tally.shortfall(k) for k in range(3)) == pytest.approx(total, abs=1e-12)
        assert sum(tally.shortfall_of_pairs(p) for p in pairs) == pytest.approx(total, abs=1e-12)
        pos, neg = s[y & np.isfinite(s)], s[~y & (cls == 0) & np.isfinite(s)]
        brute = ((neg[:, None] > pos[None, :]).sum() + 0.5 * (neg[:, None] == pos[None, :]).sum())
        assert tally.shortfall_of_pairs(pairs[0]) == pytest.approx(brute / (pos.size * (~y & np.isfinite(s)).sum()))


def test_gpd_fit_recovers_exponential_and_pareto():
    rng = np.random.default_rng(0)
    gamma, sigma = gpd_fit(rng.exponential(2.0, 20000))          # GPD with shape 0, scale 2
    assert gamma == pytest.approx(0.0, abs=0.05) and sigma == pytest.approx(2.0, rel=0.05)
    u = rng.uniform(size=20000)
    x = 1.0 / 0.3 * ((1 - u) ** -0.3 - 1)                       # GPD shape 0.3, scale 1
    gamma, sigma = gpd_fit(x)
    assert gamma == pytest.approx(0.3, abs=0.05) and sigma == pytest.approx(1.0, rel=0.08)


def test_pot_threshold_matches_the_formula_and_the_true_quantile():
    rng = np.random.default_rng(1)
    scores = rng.exponential(1.0, 200000)
    # exponential tail: the score exceeded with probability 1e-4 is -ln(1e-4) = 9.21
    assert pot_threshold(scores, 1e-4, level=0.98) == pytest.approx(-math.log(1e-4), rel=0.05)
    # hand-computed: t = q98, then t + sigma/gamma * ((risk n / N_t)^-gamma - 1)
    t = np.quantile(scores, 0.98)
    exc = scores[scores > t] - t
    gamma, sigma = gpd_fit(exc)
    expected = t + sigma / gamma * ((1e-4 * scores.size / exc.size) ** -gamma - 1)
    assert pot_threshold(scores, 1e-4, level=0.98) == pytest.approx(expected)


def test_pot_threshold_on_few_values_fits_an_exponential_tail_over_the_highest_twenty():
    """80 values (SKAB's held-out rows per file): 1.6 over the 98 % level, too few for the GPD - the tail over the
    highest 20 is fitted as exponential, t + mean excess * ln(20 / (risk n)), not the largest value."""
    rng = np.random.default_rng(3)
    scores = rng.exponential(1.0, 80)
    t = np.quantile(scores, 1 - 20 / 80)
    exc = scores[scores > t] - t
    assert exc.size == 20
    expected = t + exc.mean() * math.log(20 / (1e-3 * 80))
    assert pot_threshold(scores, 1e-3) == pytest.approx(expected)
    assert pot_threshold(scores, 1e-3) > scores.max()
    # 40 values: a quarter of them (10) make the tail; a risk inside the values is their quantile, as before
    few = scores[:40]
    t10 = np.quantile(few, 0.75)
    assert pot_threshold(few, 1e-3) == pytest.approx(t10 + (few[few > t10] - t10).mean() * math.log(10 / 0.04))
    assert pot_threshold(few, 0.05) == pytest.approx(np.quantile(few, 0.95))
    # ties leaving no excess: the (1 - risk) quantile
    assert pot_threshold(np.r_[np.zeros(70), np.ones(10)], 1e-3) == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_pot_threshold_on_few_values_alarms_near_the_risk_asked(alpha):
    """The threshold of 80 values (i.i.d., or an EWMA of them: a smoothed score) is exceeded about as often as
    asked: the mean exceedance probability over 300 draws within 0.5-4x of risk 1e-3. The largest value, taken
    before with fewer than 3 values over the 98 % level, is exceeded 13-22x as often."""
    rng = np.random.default_rng(0)
    tail = []
    for _ in range(300):
        x = ewma(rng.exponential(1.0, 130), alpha)[50:]
        tail.append(x)
    exceeded = []
    reference = np.sort(ewma(rng.exponential(1.0, 400_000), alpha)[100:])
    for x in tail:
        z = pot_threshold(x, 1e-3)
        exceeded.append(1 - np.searchsorted(reference, z) / reference.size)
    assert 0.5e-3 < np.mean(exceeded) < 4e-3, np.mean(exceeded)


def test_fit_threshold_methods():
    scores = np.arange(1000, dtype=float)
    assert fit_threshold(scores, "quantile", quantile=0.9) == pytest.approx(899.1)
    assert fit_threshold(scores, "fixed", value=3.0) == 3.0
    with pytest.raises(ValueError, match="needs a value"):
        fit_threshold(scores, "fixed")
    with pytest.raises(ValueError, match="unknown threshold"):
        fit_threshold(scores, "magic")


def test_best_f1_threshold_is_an_oracle():
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.3])
    labels = np.array([0, 0, 1, 1, 0])
    thr = best_f1_threshold(scores, labels)
    assert 0.3 <= thr < 0.8
    assert to_labels(scores, thr).tolist() == [0, 0, 1, 1, 0]     # used as score > threshold


def test_best_f1_threshold_respects_a_false_alarm_limit():
    # by hand: flagging the top 4 (0.9, 0.8, 0.7, 0.6) gives F1 = 2*3/(4+3) = 0.857 with FAR 1/3;
    # with FAR <= 0 only the top 2 may be flagged: F1 = 2*2/(2+3) = 0.8
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    labels = np.array([1, 1, 0, 1, 0, 0])
    assert to_labels(scores, best_f1_threshold(scores, labels)).tolist() == [1, 1, 1, 1, 0, 0]
    assert to_labels(scores, best_f1_threshold(scores, labels, max_far=0.0)).tolist() == [1, 1, 0, 0, 0, 0]
    ties = np.array([0.5, 0.5, 0.1])                              # a tie is never split
    assert to_labels(ties, best_f1_threshold(ties, np.array([1, 0, 0]), max_far=0.0)).tolist() == [0, 0, 0]


def test_the_metrics_table_has_no_row_for_a_modality_without_any_contribution(tiny_spec):
    """A relation-only context (or any modality the model never saw) has an empty score column: no row of NaNs."""
    import polars as pl

    from pipelines.evaluate import metrics_table

    n = 8
    df = pl.DataFrame({"machine_id": ["a"] * n, "score": np.linspace(0, 1, n), "threshold": [0.5] * n,
                       "label": [False] * 4 + [True] * 4, "label_kind": [None] * 4 + ["x"] * 4,
                       "score_proc": np.linspace(0, 1, n), "score_vib": pl.Series([None] * n, dtype=pl.Float64),
                       "alone_vib": np.full(n, np.nan), "alone_proc": np.linspace(0, 1, n)})
    table = metrics_table(df, tiny_spec)
    assert set(table["overall"]) == {"fused", "score_proc", "alone_proc"}
    assert table["overall"]["score_proc"]["roc_auc"] == 1.0 and set(table["by_kind"]["x"]) == set(table["overall"])


def test_the_metrics_say_which_modality_the_alarm_ticks_name_per_kind(tiny_spec):
    """`attribution`: each alarm tick counted by its kind (`normal` for a false alarm) and the modality with the largest
    contribution there; a tick under the threshold, or with no contribution, is not counted; the table prints it.
    `causes`: likewise by the output's `cause`."""
    import polars as pl

    from pipelines.evaluate import format_table, metrics_table

    score = [0.1, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.1, 2.0]
    df = pl.DataFrame({"machine_id": ["a"] * 9, "score": score, "threshold": [1.0] * 9,
                       "label": [0, 1, 1, 1, 1, 1, 0, 0, 1],
                       "label_kind": [None, "x", "x", "x", "y", None, None, None, "y"],
                       "score_proc": [9.0, 3.0, 3.0, 0.1, 0.2, 5.0, 0.1, 9.0, None],
                       "score_vib": pl.Series([0.0, 1.0, None, 2.0, 4.0, 1.0, 2.0, 0.0, None], dtype=pl.Float64),
                       "cause": ["proc", "vib", "proc", None, "vib", None, "proc", "vib", None]})
    table = metrics_table(df, tiny_spec)
    assert table["attribution"] == {"labelled": {"proc": 1}, "x": {"proc": 2, "vib": 1}, "y": {"vib": 1},
                                    "normal": {"vib": 1}}
    # `causes`: the same count of the output's `cause`, at the alarm ticks that have one
    assert table["causes"] == {"x": {"proc": 1, "vib": 1}, "y": {"vib": 1}, "normal": {"proc": 1}}
    text = format_table(table)
    assert "which modality the alarm ticks name" in text and "x             proc 67 %, vib 33 %  (3 ticks)" in text
    assert "which modality their cause names" in text and "x             proc 50 %, vib 50 %  (2 ticks)" in text
    assert "causes" in metrics_table(df.drop("cause"), tiny_spec) and "their cause" not in \
        format_table(metrics_table(df.drop("cause"), tiny_spec))         # scored before the column: no lines


def test_detection_counts_each_events_delay_to_its_first_alarm_inside_it():
    """Per kind: events with a scored tick, those caught, minutes from start to the first alarm inside the event
    (an alarm before it does not count), the share of the event gone by then; an event no tick saw is left out."""
    import datetime as dt

    import polars as pl

    from dmafn.spec import parse_spec
    from pipelines.align import TIME
    from pipelines.evaluate import detection
    from tests.conftest import tiny_spec_dict

    spec = parse_spec(tiny_spec_dict(labels={"path": "/tmp/none/labels", "start": "start_ts", "end": "end_ts"}),
                      source="tiny.yaml")
    t0 = dt.datetime(2024, 1, 3, tzinfo=dt.timezone.utc)
    at = lambda minute: t0 + dt.timedelta(minutes=minute)                        # noqa: E731
    alarms = {"a": {4, *range(8, 15), 16}, "b": set()}
    ticks = pl.DataFrame([{"machine_id": e, TIME: int(at(m).timestamp() * 1e6), "is_anomaly": m in alarms[e]}
                          for e in ("a", "b") for m in range(20)])
    labels = pl.DataFrame({"machine_id": ["a", "b", "a", "a"], "start_ts": [at(5), at(2), at(16), at(100)],
                           "end_ts": [at(14), at(5), at(18), at(110)], "kind": ["ramp", "ramp", "step", "step"]})
    found = detection(ticks, labels, spec)
    ramp, step = found["by_kind"]["ramp"], found["by_kind"]["step"]
    assert (ramp["events"], ramp["detected"]) == (2, 1)                       # b's ramp never alarmed
    assert ramp["median_delay_min"] == 3.0 and abs(ramp["median_elapsed_share"] - 3 / 9) < 1e-9
    assert (step["events"], step["detected"], step["median_delay_min"]) == (1, 1, 0.0)   # minute 100: no tick
    assert (found["overall"]["events"], found["overall"]["detected"]) == (3, 2)
    nothing = detection(ticks.with_columns(pl.lit(False).alias("is_anomaly")), labels, spec)["overall"]
    assert nothing["detected"] == 0 and nothing["median_delay_min"] is None


def test_the_plot_of_a_long_window_keeps_each_buckets_highest_scores_and_its_kind(tiny_spec):
    """`plot_rows`: one entity's ticks in buckets of time, each at its highest scores (a one-tick spike stays)
    and the kind labelled inside it; other entities left out."""
    import datetime as dt

    import polars as pl

    from pipelines.evaluate import plot_rows

    ts = [dt.datetime(2024, 1, 3, 0, m, tzinfo=dt.timezone.utc) for m in range(6)]
    chunk = pl.DataFrame({"machine_id": ["a"] * 6 + ["b"] * 6, "ts": ts * 2,
                          "score": [0.1, 0.9, 0.2, 0.1, 0.1, 0.3] + [5.0] * 6, "threshold": 0.5,
                          "score_proc": [0.0, 0.1, 0.7, None, None, None] + [5.0] * 6,
                          "label_kind": [None, None, None, "x", None, None] * 2})
    rows = plot_rows(chunk, tiny_spec, "a", 3 * 60_000_000)
    assert rows["score"].to_list() == [0.9, 0.3] and rows["score_proc"].to_list() == [0.7, None]
    assert rows["label_kind"].cast(pl.String).to_list() == [None, "x"] and rows["machine_id"].to_list() == ["a", "a"]


def test_evaluate_and_report_name_the_output_table_when_it_is_missing_or_the_window_empty(tmp_path):
    """Nothing scored yet, or no scored date in the window: a DataError naming the table (and the window)."""
    import datetime as dt

    import polars as pl
    from deltalake import write_deltalake

    from dmafn.spec import parse_spec
    from pipelines.evaluate import evaluate
    from pipelines.report import build_report
    from pipelines.storage import DataError
    from tests.conftest import tiny_spec_dict

    out = tmp_path / "scores"
    spec = parse_spec(tiny_spec_dict(score={"output": str(out)}, labels={"path": str(tmp_path / "labels"),
                                                                          "start": "s", "end": "e"}), source="t.yaml")
    with pytest.raises(DataError, match=f"scores {out}: no such table"):
        evaluate(spec)
    with pytest.raises(DataError, match=f"scores {out}: no such table"):
        build_report(spec, tmp_path / "r.html")
    write_deltalake(str(out), pl.DataFrame({"machine_id": ["a"], "date": ["2024-01-03"], "score": [0.1]}).to_arrow(),
                    partition_by=["date"])
    with pytest.raises(DataError, match=f"scores {out}: not an output table dmafn wrote for this spec \\(no column "
                                        "ts, threshold, is_anomaly\\)"):
        evaluate(spec)
    row = {"machine_id": ["a"], "ts": [dt.datetime(2024, 1, 3)], "date": ["2024-01-03"], "score": [0.1],
           "threshold": [1.0], "is_anomaly": [False], "model_version": ["v"], "run_id": ["r"]}
    write_deltalake(str(out), pl.DataFrame(row).to_arrow(), partition_by=["date"], mode="overwrite",
                    schema_mode="overwrite")
    with pytest.raises(DataError, match=f"scores {out}: no scored dates from 2024-02-01 on$"):
        evaluate(spec, start=dt.date(2024, 2, 1))


def test_the_report_says_what_each_versions_training_warned_read_from_its_manifest(tmp_path):
    """`version_facts` reads each version's manifest (its days, its training warnings); the section lists the
    warnings (escaped), says so for a version saved before they were kept, and names an unreadable manifest."""
    import json

    from dmafn.spec import parse_spec
    from pipelines.registry import Registry, version_facts
    from pipelines.report import _versions_section
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    spec = parse_spec(tiny_spec_dict(registry=str(tmp_path / "models")), source="t.yaml")
    for version, extra in (("v1", {"warnings": ["modality 'proc', column 'pres': values up to 1.2e+07 <coarse>"],
                                   "entity_statistics": {"file": "entity_statistics.parquet", "entities": 12}}),
                           ("v0", {})):
        folder = tmp_path / "models" / version
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({
            "created_at": "2024-01-05T00:00:00+00:00", **extra,
            "training_window": {"train_days": ["2024-01-01", "2024-01-02"], "validation_days": ["2024-01-03"]}}))
    facts = version_facts(spec, Storage(), {"v1", "v0", "gone"})
    assert list(facts) == ["gone", "v0", "v1"] and "not found in the model registry" in facts["gone"]
    assert facts["v0"]["warnings"] is None and facts["v1"]["train_days"] == ["2024-01-01", "2024-01-02"]
    assert (facts["v1"]["entities"], facts["v0"]["entities"]) == (12, None)     # v0: saved before the entity file
    page = _versions_section(facts)
    assert "<td>entities with statistics of their own</td><td>12</td>" in page
    assert "values up to 1.2e+07 &lt;coarse&gt;</li>" in page and "1 warning(s) at training" in page
    assert "Saved before versions kept their training warnings." in page
    assert "Its manifest could not be read" in page and "2024-01-01 .. 2024-01-02 (2)" in page
    assert Registry(spec.registry, Storage()).manifest("v1")["warnings"]         # read as any manifest is


def test_evaluate_a_date_at_a_time_equals_the_whole_window_across_midnight(tmp_path, monkeypatch):
    """`evaluate` in this process (no Ray: `tests/test_evaluate_tasks.py` has the tasks) on a Delta table of three
    dates (one commit each), an event and an alarm run crossing midnight, an entity absent on one date: the same
    metrics, alarm rates and detection as the whole window in memory."""
    import datetime as dt
    import json

    import polars as pl
    import yaml
    from deltalake import write_deltalake

    import pipelines.evaluate as ev
    from benchmarks.evaluate_window import same, whole_window
    from pipelines.evaluate import evaluate
    from tests.conftest import tiny_spec_dict

    monkeypatch.setattr(ev, "ray_running", lambda: False)

    rng = np.random.default_rng(7)
    t0 = dt.datetime(2024, 1, 3, tzinfo=dt.timezone.utc)
    events = {"a": [(23 * 60 + 50, 24 * 60 + 20, "x"), (2 * 1440 + 600, 2 * 1440 + 640, "y")],
              "b": [(700, 730, "y")]}
    frames, labels = [], []
    for entity, spans in events.items():
        minutes = np.arange(3 * 1440) if entity == "a" else np.r_[np.arange(1440), np.arange(2 * 1440, 3 * 1440)]
        inside = np.zeros(minutes.size, bool)
        for start, end, kind in spans:
            inside |= (minutes >= start) & (minutes <= end)
            labels.append({"machine_id": entity, "s": t0 + dt.timedelta(minutes=start),
                           "e": t0 + dt.timedelta(minutes=end), "kind": kind})
        proc = rng.gamma(2.0, 0.3, minutes.size) + 1.5 * inside
        score = proc + 0.2 * rng.normal(size=minutes.size)
        frames.append(pl.DataFrame({"machine_id": entity, "ts": [t0 + dt.timedelta(minutes=int(m)) for m in minutes],
                                    "score": score, "threshold": 1.4, "is_anomaly": score > 1.4, "score_proc": proc,
                                    "score_vib": pl.Series([None] * minutes.size, dtype=pl.Float64),
                                    "model_version": "v1"}))
    rows = pl.concat(frames).with_columns(pl.col("ts").dt.strftime("%Y-%m-%d").alias("date"))
    for date in sorted(rows["date"].unique()):
        write_deltalake(str(tmp_path / "scores"), rows.filter(pl.col("date") == date).to_arrow(), mode="append",
                        partition_by=["date"])
    (tmp_path / "labels").mkdir()
    pl.DataFrame(labels).write_parquet(tmp_path / "labels" / "part-0.parquet")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_dict(
        score={"output": str(tmp_path / "scores")}, registry=str(tmp_path / "models"),
        labels={"path": str(tmp_path / "labels"), "start": "s", "end": "e"})))

    from dmafn.spec import load_spec

    result = json.loads(json.dumps(evaluate(load_spec(spec_path)), default=float))
    whole = json.loads(json.dumps(whole_window(str(spec_path), "2024-01-03", "2024-01-05"), default=float))
    for key in ("overall", "by_kind", "detection", "alarm_rate", "false_alarm_rate", "false_alarm_rate_clear"):
        assert same(result[key], whole[key]), key
    assert result["dates"] == ["2024-01-03", "2024-01-04", "2024-01-05"] and result["detection"]["overall"]["events"] == 3
    assert result["overall"].keys() == {"fused", "score_proc"}


def test_training_warnings_keep_what_the_data_layer_warns_of_while_capturing_and_nothing_else():
    """`TrainingWarnings.capturing()`: a warning any `pipelines` module logs inside the block is kept (once, however
    often it is said), the version's own lines given through `warned(...)` too (once); INFO and other loggers' lines
    and anything after the block are not."""
    import logging

    from pipelines.train import TrainingWarnings

    warned = TrainingWarnings()
    with warned.capturing():
        logging.getLogger("pipelines.labels").warning("labels %s: %d of %d rows left out", "x", 2, 9)
        logging.getLogger("pipelines.parquet_files").warning("labels x: 2 of 9 rows left out")   # said again: once
        logging.getLogger("pipelines.parquet_files").info("read 3 files")
        logging.getLogger("elsewhere").warning("not ours")
        warned("modality 'p', column 'c': a glitch")
    logging.getLogger("pipelines.labels").warning("after the version was saved")
    assert warned.lines == ["labels x: 2 of 9 rows left out", "modality 'p', column 'c': a glitch"]
    assert not any(isinstance(h, logging.Handler) and h.__class__.__name__ == "_KeptWarnings"
                   for h in logging.getLogger("pipelines").handlers)
