"""The calibration fitted on validation shards held by Ray workers (`pipelines.calibrate.ShardTicks`) equals
the one fitted on the same ticks in memory (`Calibration.fit`), while the driver reads counts and small
gathers only."""
import datetime as dt

import numpy as np
import pytest

from dmafn.calibration import Calibration
from dmafn.scoring import RawScores
from dmafn.spec import SmoothingSpec, ThresholdSpec
from tests.approx import close

MODALITIES = ("a", "b", "c")


def _fleet(latent_dims, seed=0, entities=6, ticks=700, state=False):
    """Raw scores of a few entities over time, modalities missing at random, rows sorted by entity and time;
    with `state`, an operating state of two columns (of modalities b and c) that a's error grows with."""
    rng = np.random.default_rng(seed)
    n = entities * ticks
    groups = np.repeat([f"e{i}" for i in range(entities)], ticks)
    time = np.tile(np.arange(ticks), entities)
    mask = rng.random((n, len(MODALITIES))) > 0.1
    errors = np.where(mask, rng.lognormal(size=(n, len(MODALITIES))) * (1 + np.arange(entities).repeat(ticks))[:, None],
                      np.nan)
    errors[rng.random(n) < 0.01, 0] = 1e3                 # a heavy tail
    for entity, start in ((0, 200), (1, 450)):            # incidents of b (2 % of the ticks), across the shards' spans
        errors[entity * ticks + start: entity * ticks + start + 40, 1] *= 1e3
    latent = None if latent_dims is None else rng.lognormal(size=n if latent_dims == 1 else (n, len(MODALITIES)))
    if not state:
        return groups, time, RawScores(errors=errors, latent=latent, mask=mask)
    levels = np.where(mask[:, 1:], rng.normal(size=(n, 2)), np.nan)
    errors[:, 0] *= np.exp(np.nan_to_num(levels[:, 0]))
    return groups, time, RawScores(errors=errors, latent=latent, mask=mask, state=levels, state_owners=("b", "c"))


def _shard_ticks(groups, time, raw, ray):
    """The same ticks as shards: entity buckets x three spans of time, each sorted by entity and time."""
    from pipelines.calibrate import ShardPart, ShardTicks

    bucket = np.array([int(g[1:]) % 2 for g in groups])
    span = np.searchsorted([230, 480], time, side="right")
    parts, metas = [], []
    for b in (1, 0):                                      # any order: the chain follows bucket and date
        for s in (2, 0, 1):
            rows = np.flatnonzero((bucket == b) & (span == s))
            rows = rows[np.lexsort((time[rows], groups[rows]))]
            latent = None if raw.latent is None else raw.latent[rows]
            state = None if raw.state is None else raw.state[rows]
            part = ShardPart(groups[rows], RawScores(raw.errors[rows], latent, raw.mask[rows], state, raw.state_owners))
            parts.append((b, dt.date(2024, 1, 1 + s), ray.put(part)))
            metas.append({"ticks": len(rows), "columns": len(MODALITIES),
                          "latent_dims": None if latent is None else latent.ndim,
                          "state_owners": raw.state_owners if state is not None else ()})
    return ShardTicks(parts, metas)


@pytest.mark.parametrize("latent_dims,smoothing,threshold,scale,state,outliers", [
    (1, SmoothingSpec(method="ewma", alpha=0.3), ThresholdSpec(method="pot", risk=1e-3), "tail", False, (4.0, 3)),
    (2, SmoothingSpec(method="ewma", alpha=0.5), ThresholdSpec(method="quantile", quantile=0.99, per_entity=True), "robust",
     False, None),
    (None, SmoothingSpec(method="rolling", window=5), ThresholdSpec(method="pot", risk=1e-3, per_entity=True), "tail",
     False, (3.0, 0)),
    (1, SmoothingSpec(method="ewma", alpha=0.5), ThresholdSpec(method="pot", risk=1e-3), "tail", True, (4.0, 10)),
    (1, SmoothingSpec(method="ewma", alpha=0.5, knee=1.5), ThresholdSpec(method="pot", risk=1e-3), "tail", False, None),
])
def test_the_calibration_of_shards_on_workers_equals_the_one_in_memory(local_ray, monkeypatch, latent_dims, smoothing,
                                                                         threshold, scale, state, outliers):
    """... and so does the one that leaves out outliers first (`OutlierTicks`: flagged where each shard's ticks are
    held, an outlier's reach handed on to the entity's next shard)."""
    import pipelines.calibrate as calibrate

    groups, time, raw = _fleet(latent_dims, state=state)
    fit = dict(detector="autoencoder", vote="attention", smoothing=smoothing, threshold=threshold, scale=scale,
               state_baseline=state, **(dict(outlier_limit=outliers[0], outlier_after=outliers[1]) if outliers else {}))
    whole = Calibration.fit(raw, MODALITIES, groups=groups, **fit).to_dict()
    monkeypatch.setattr(calibrate, "GATHER_MAX", 128)     # quantiles by rounds of counts, not one gather (the
    # tails, 1-2 % of ~4,000 ticks, are read whole: the in-memory numbers; longer ones are tested below)
    asked = []
    answer = calibrate._ask.remote
    monkeypatch.setattr(calibrate._ask, "remote", lambda *a: asked.append(a[1]) or answer(*a))
    shards = Calibration.fit_from(_shard_ticks(groups, time, raw, local_ray), MODALITIES, **fit).to_dict()
    assert {"count_le", "sample", "between"} <= set(asked)
    if smoothing.method == "ewma" and not state:          # the same numbers, bit for bit
        assert shards == whole
    else:             # a rolling mean's sums start elsewhere, the baseline's normal equations are added per shard
        assert close(shards, whole, 1e-9 if state else 1e-12)
    left_out = whole["validation"]["validation_outliers_left_out"]
    assert whole["validation"]["validation_ticks"] == len(groups) - left_out
    assert (left_out > 0) == bool(outliers)
    assert ("baseline" in whole) == state
    if smoothing.knee is not None:                        # the knee took part: without it the threshold moves
        plain = Calibration.fit(raw, MODALITIES, groups=groups, **{**fit, "smoothing": SmoothingSpec("ewma", smoothing.alpha)})
        assert plain.threshold != whole["threshold"]


def test_a_long_tail_is_fitted_from_counts_and_sums_where_it_lies(local_ray, monkeypatch):
    """`contribution_scale: tail` with more values past the 99 % quantile than the driver reads whole: each shard
    answers how many of its values pass the level and their summed excess, never the values, and the fit agrees
    with the one in memory (to the order the floats were summed in)."""
    import pipelines.calibrate as calibrate

    groups, time, raw = _fleet(None)
    fit = dict(detector="autoencoder", vote="attention", smoothing=SmoothingSpec(method="ewma", alpha=0.5),
               threshold=ThresholdSpec(method="quantile", quantile=0.99), scale="tail", state_baseline=False)
    whole = Calibration.fit(raw, MODALITIES, groups=groups, **fit).to_dict()
    monkeypatch.setattr(calibrate, "GATHER_MAX", 16)      # ~40 values per modality past the 99 % quantile
    asked = []
    answer = calibrate._ask.remote
    monkeypatch.setattr(calibrate._ask, "remote", lambda *a: asked.append(a[1:]) or answer(*a))
    shards = Calibration.fit_from(_shard_ticks(groups, time, raw, local_ray), MODALITIES, **fit).to_dict()
    excess = [args for question, args in asked if question == "excess"]      # one question per shard and modality
    assert excess and len(excess) % len(MODALITIES) == 0
    assert not any(question == "between" and any(hi == np.inf for _, hi in args) for question, args in asked)
    assert close(shards, whole, 1e-12) and shards["tail"]["a"]["n"] == whole["tail"]["a"]["n"] > 3000


def _held_in_shards(parts: list[np.ndarray], ray_module):
    """`ShardValues` of one column whose values `parts` are held sorted in the object store, a shard each."""
    from pipelines.calibrate import ShardValues

    parts = [np.sort(p) for p in parts]
    return ShardValues([ray_module.put([(len(p), float(p[0]), float(p[-1]), "<f8")]) for p in parts], 0,
                       [ray_module.put(p) for p in parts])


def test_a_long_pot_tail_is_read_in_pieces(local_ray, monkeypatch):
    """The POT threshold on more excesses than the driver reads whole: the tail is cut into pieces at values
    sampled from the shards (exact counts), read a few at a time and never whole, each adding its excesses and its
    rank-weighted excesses; the calibration and the probability-weighted moments agree with the in-memory ones, a
    long tie included."""
    import pipelines.calibrate as calibrate
    from dmafn.validation import ArrayValues

    groups, time, raw = _fleet(None)
    fit = dict(detector="autoencoder", vote="attention", smoothing=SmoothingSpec(method="ewma", alpha=0.5),
               threshold=ThresholdSpec(method="pot", risk=1e-3), scale="robust", state_baseline=False)
    whole = Calibration.fit(raw, MODALITIES, groups=groups, **fit).to_dict()
    monkeypatch.setattr(calibrate, "GATHER_MAX", 16)      # ~80 smoothed scores past their 98 % quantile
    monkeypatch.setattr(calibrate, "TAIL_READ", 24)
    monkeypatch.setattr(calibrate.ShardValues, "above", lambda *_: pytest.fail("the whole tail was read"))
    shards = Calibration.fit_from(_shard_ticks(groups, time, raw, local_ray), MODALITIES, **fit).to_dict()
    assert close(shards, whole, 1e-12)
    # the moments themselves: values in three shards, ties across pieces' edges and one tie longer than a piece
    rng = np.random.default_rng(4)
    values = np.r_[np.round(rng.exponential(1.0, 3000), 2), np.full(40, 2.5)]
    held = _held_in_shards(np.array_split(rng.permutation(values), 3), local_ray)
    read = []
    between = calibrate.ShardValues._between
    monkeypatch.setattr(calibrate.ShardValues, "_between",
                        lambda self, intervals: read.append(out := between(self, intervals)) or out)
    level = float(np.quantile(values, 0.8))
    n, b0, b1 = held.excess_moments(level)
    m, c0, c1 = ArrayValues(values).excess_moments(level)
    assert n == m > 16 and b0 == pytest.approx(c0, rel=1e-12) and b1 == pytest.approx(c1, rel=1e-12)
    assert read and max(sum(v.size for v in answer) for answer in read) <= 24


@pytest.mark.parametrize("size", [80, 300])
def test_pot_on_few_scores_held_in_shards_is_the_one_in_memory(local_ray, monkeypatch, size):
    """Fewer than 20 scores over POT's level (`POT_MIN_PEAKS`): the exponential tail over the highest 20 is fitted
    where the shards hold the scores (its level by rounds of counts, its mean excess from the shards) and gives the
    in-memory threshold - above every score, as a risk of 1e-3 on so few asks."""
    import pipelines.calibrate as calibrate
    from dmafn.postprocess import pot_threshold
    from dmafn.validation import ArrayValues

    monkeypatch.setattr(calibrate, "GATHER_MAX", 16)      # no gather of the whole column
    values = np.random.default_rng(5).gamma(2.0, 1.0, size)
    held = _held_in_shards(np.array_split(values, 3), local_ray)
    expected = pot_threshold(ArrayValues(values), 1e-3)
    assert pot_threshold(held, 1e-3) == pytest.approx(expected, rel=1e-12)
    assert expected > values.max()
