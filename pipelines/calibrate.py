"""The calibration fitted on the validation shards where the workers hold them (`Calibration.fit_from`).

Each validation shard's task scores its ticks and keeps the raw scores in the object store (sorted by entity
and time); the driver holds their references, the shards' tick counts, at most `GATHER_MAX` values per
quantile's last round and at most `TAIL_READ` values of the POT threshold's tail at a time. What the fit asks of
the ticks:
- a column's finite values (log errors, latent terms, contributions): each shard's task sorts its values;
  their count, exact quantiles (`dmafn.validation.select_ranks`: counts at levels and small gathers, a few
  rounds of small tasks, the same numbers as `np.quantile` on the whole column), how many pass a level and
  their mean excess over it (each shard's count and sum; read whole, as in memory, when at most `GATHER_MAX`:
  a contribution's tail surprise) and the probability-weighted moments of those excesses (the POT threshold's
  generalised Pareto fit: a long tail cut into pieces at sampled values and read a few pieces at a time);
- the fused scores smoothed per entity: each entity bucket's shards in date order, a chain of tasks handing
  on each entity's smoothing state (`Calibration.smooth_carried`: the same values as smoothing each entity's
  whole validation series);
- the ticks to leave out as outliers (`dmafn.calibration.OutlierTicks`): each shard's task flags its own, the
  bucket's shards chained in date order to hand on how many of each entity's next ticks an outlier still reaches;
  every later question reads the ticks kept (each shard's flags an object beside its part);
- each entity's robust scale (per-entity normalisation): one task per entity bucket over its smoothed scores.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import ray

from dmafn.calibration import Calibration, OutlierTicks, group_scales
from dmafn.features import featurize, relation_outliers
from dmafn.scoring import Column, RawScores, raw_scores
from dmafn.spec import Spec
from dmafn.validation import (GATHER_MAX, SPLIT_BINS, ArrayValues, cut_intervals, excess_moments,
                             quantiles_from_ranks, select_ranks, sorted_part_sample)
from pipelines.align import KnownIncidents
from pipelines.ingest import LEFT_OUT, entity_string
from pipelines.progress import ProgressDisplay
from pipelines.ray_runtime import raise_task_error
from pipelines.shards import Shard
from pipelines.statistics import BucketStatistics
from pipelines.storage import DataError, Storage
from pipelines.train import aligned_batches, left_out_files


@dataclass
class ShardPart:
    """One validation shard's ticks where its task left them: raw scores and entity keys, sorted by entity and
    time."""

    groups: np.ndarray
    raw: RawScores

    def kept(self, left_out: np.ndarray | None) -> "ShardPart":
        """The ticks not `left_out` ((N,) bool, the outliers `ShardTicks.leave_out` flagged; None: all)."""
        if left_out is None:
            return self
        return ShardPart(self.groups[~left_out], self.raw.rows(~left_out))


@ray.remote(num_cpus=1, num_returns=2)
def _score_shard(shard: Shard, spec: Spec, stats: dict[str, Any], model,
                 incidents: KnownIncidents | None = None) -> tuple[dict[str, int | None], ShardPart]:
    batches, counts, decoded = aligned_batches(shard, spec, Storage.from_spec(spec.storage), incidents)[:3]
    unreadable = {why: 1 for why in counts if why.startswith(LEFT_OUT)}    # files, row groups left out: warned of
    keys, raws, outliers, carry, hold = [], [], 0, {}, {}
    for aligned in batches:          # sorted by entity and time: the relations' smoothing carries across them, as do
        features = featurize(aligned.to_arrow(), spec, stats, decoded, carry)          # the payloads' held errors
        outliers += relation_outliers(features)
        raws.append(raw_scores(model, features, hold=hold))
        keys.append(aligned.select([*spec.entity, "ts"]))
    left_out = 0 if incidents is None else incidents.left_out
    if not raws:
        return {"ticks": 0, "columns": 0, "latent_dims": None, "state_owners": (), "left_out": left_out,
                "relation_outliers": 0, "unreadable": unreadable}, ShardPart(
            np.zeros(0, str), RawScores(np.zeros((0, 0)), None, np.zeros((0, 0), bool)))
    order = pl.concat(keys).with_row_index("_row").sort([*spec.entity, "ts"])
    rows = order["_row"].to_numpy()
    raw = RawScores.concatenate(raws, rows)
    raw.channel_errors, raw.fresh_channel_errors = {}, {}      # the calibration never reads them
    part = ShardPart(order.select(entity_string(spec.entity)).to_series().to_numpy().astype(str), raw)
    return {"ticks": len(rows), "columns": raw.errors.shape[1],
            "latent_dims": None if raw.latent is None else raw.latent.ndim,
            "state_owners": raw.state_owners if raw.state is not None else (), "left_out": left_out,
            "relation_outliers": outliers, "unreadable": unreadable}, part


def _sorted(values: np.ndarray) -> tuple[Any, ...]:
    """Columns (N, k) as the driver's questions read them: their summaries [(count, min, max, dtype)], then each
    column's finite values sorted, as float64 (so that every level compares exactly; numpy's quantiles
    interpolate in the dtype they had) - one object each, so a few values travel without a task."""
    columns = [np.sort(v[np.isfinite(v)]).astype(np.float64) for v in values.T]
    dtype = values.dtype.str
    return ([(c.size, float(c[0]), float(c[-1]), dtype) if c.size else (0, np.inf, -np.inf, "<f8") for c in columns],
            *columns)


@ray.remote(num_cpus=1)
def _column(part: ShardPart, left_out: np.ndarray | None, column: Column, width: int) -> tuple[Any, ...]:
    """`_sorted` of a shard's `column` (`width` columns) over its ticks kept: run with num_returns=1 + width."""
    part = part.kept(left_out)
    return _sorted(column(part.raw) if len(part.groups) else np.zeros((0, width)))


@ray.remote(num_cpus=1)
def _total(part: ShardPart, left_out: np.ndarray | None, sums) -> dict[str, np.ndarray]:
    """`sums` (`dmafn.scoring.BaselineSums`) over a shard's ticks kept."""
    return sums(part.kept(left_out).raw)


@ray.remote(num_cpus=1, num_returns=4)
def _leave_out_part(part: ShardPart, left_out: np.ndarray | None, rule: OutlierTicks, carry: dict[str, int] | None):
    """The shard's ticks left out once those `rule` flags join the ones before ((N,) bool; going on from the
    bucket's previous shard's `carry`), how many that is, how many are over the rule's limit themselves, and the
    carry for the bucket's next shard."""
    flagged, carry, over = rule(part.raw, part.groups, carry or {})
    left_out = flagged if left_out is None else left_out | flagged
    return left_out, int(left_out.sum()), over, carry


@ray.remote(num_cpus=1)
def _ask(v: np.ndarray, question: str, args: Any) -> Any:
    """One sorted column of a shard answers: how many values <= each level; its values in each (lo, hi]; how many
    are > a level and their summed excess over it; a sample of them in each (lo, hi]."""
    if question == "count_le":
        return np.searchsorted(v, args, side="right")
    if question == "between":
        return [v[np.searchsorted(v, lo, side="right"):np.searchsorted(v, hi, side="right")] for lo, hi in args]
    if question == "excess":                                       # count and summed excess of the values > level
        excess = v[np.searchsorted(v, args, side="right"):] - args
        return excess.size, float(np.sum(excess, dtype=np.float64))
    intervals, k = args
    return [sorted_part_sample(v, lo, hi, k) for lo, hi in intervals]


@ray.remote(num_cpus=1, num_returns=4)
def _smooth_part(part: ShardPart, left_out: np.ndarray | None, calibration: Calibration,
                 carry: dict[str, np.ndarray] | None):
    """A shard's fused scores smoothed per entity, going on from the entity bucket's previous shard (`carry`):
    `_sorted` of its scores (normalised per entity with `entity_scale`: summary, sorted finite values),
    (entities, smoothed scores) for the entity scales, and the carry for the bucket's next shard."""
    part = part.kept(left_out)
    score = calibration.record(part.raw).score
    smoothed, carry = calibration.smooth_carried(score, part.groups, carry or {})
    scores = calibration.normalise(smoothed, part.groups)
    return (*_sorted(scores[:, None]), (part.groups, smoothed), carry)


@ray.remote(num_cpus=1)
def _smooth_contributions(part: ShardPart, left_out: np.ndarray | None, calibration: Calibration,
                          carry: dict[int, dict[str, np.ndarray]] | None):
    """A shard's contributions smoothed per entity, each modality's going on from the entity bucket's previous
    shard (`carry`, per modality): `_sorted` of them (summaries, then each modality's sorted finite values), and the
    carry for the bucket's next shard. Run with num_returns=2 + modalities."""
    part, carry = part.kept(left_out), carry or {}
    contributions = calibration.record(part.raw).contributions
    smoothed, after = np.empty_like(contributions, dtype=np.float64), {}
    for j in range(contributions.shape[1]):
        smoothed[:, j], after[j] = calibration.smooth_carried(contributions[:, j], part.groups, carry.get(j, {}))
    return (*_sorted(smoothed), after)


@ray.remote(num_cpus=1)
def _bucket_scales(*keyed: tuple[np.ndarray, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Each entity's robust scale of its smoothed scores, from its bucket's shards (an entity lies in one)."""
    return group_scales(np.concatenate([s for _, s in keyed]), np.concatenate([g for g, _ in keyed]))


TAIL_READ = 8 * GATHER_MAX     # values of a long POT tail read at once (`ShardValues.excess_moments`)


class ShardValues:
    """`dmafn.validation.Values` of one column held sorted by the shards' objects: `summaries` (each shard's
    [(count, min, max, dtype)] of its columns), `j` the column's place there, `columns` its sorted values."""

    def __init__(self, summaries: list[ray.ObjectRef], j: int, columns: list[ray.ObjectRef]) -> None:
        self.summaries, self.j, self.columns = summaries, j, columns
        self._summary: tuple[int, float, float, str] | None = None

    def _ask(self, question: str, args: Any = None) -> list[Any]:
        return [raise_task_error(r) for r in [_ask.remote(ref, question, args) for ref in self.columns]]

    def summary(self) -> tuple[int, float, float, str]:
        """Count, min, max and dtype of the values."""
        if self._summary is None:
            parts = [raise_task_error(ref)[self.j] for ref in self.summaries]
            self._summary = (sum(p[0] for p in parts), min((p[1] for p in parts), default=np.inf),
                             max((p[2] for p in parts), default=-np.inf), next((p[3] for p in parts if p[0]), "<f8"))
        return self._summary

    def count(self) -> int:
        return self.summary()[0]

    def _per_interval(self, question: str, intervals: list[tuple[float, float]], *args: Any) -> list[np.ndarray]:
        """Every shard's answer for each interval, joined per interval."""
        answers = self._ask(question, (intervals, *args) if args else intervals)
        return [np.concatenate([a[i] for a in answers]) for i in range(len(intervals))]

    def _between(self, intervals: list[tuple[float, float]]) -> list[np.ndarray]:
        return self._per_interval("between", intervals)

    def quantiles(self, qs) -> np.ndarray:
        n, lo, hi, dtype = self.summary()
        if n <= GATHER_MAX:                            # few enough to read whole (in their dtype, as numpy would)
            values = np.concatenate([raise_task_error(ref) for ref in self.columns])
            return ArrayValues(values.astype(dtype)).quantiles(qs)
        return quantiles_from_ranks(n, qs, lambda ranks: self._select(ranks, n, lo, hi), np.dtype(dtype))

    def _select(self, ranks: list[int], n: int, lo: float, hi: float) -> dict[int, float]:
        """The values at 0-based `ranks` (`select_ranks`, by rounds of counts and small gathers)."""
        return select_ranks(ranks, n=n, bounds=(lo, hi), count_le=self._count_le, between=self._between,
                            sample=self._sample, gather_max=GATHER_MAX)

    def _count_le(self, levels) -> np.ndarray:
        return np.sum(self._ask("count_le", levels), axis=0)

    def _sample(self, intervals: list[tuple[float, float]], k: int) -> list[np.ndarray]:
        return self._per_interval("sample", intervals, k)

    def above(self, level: float) -> np.ndarray:
        return np.sort(self._between([(level, np.inf)])[0])

    def count_above(self, level: float) -> int:
        return self.count() - int(self._count_le([level])[0])

    def excess_mean(self, level: float) -> tuple[int, float]:
        n = self.count_above(level)
        if n == 0:
            return 0, 0.0
        if n <= GATHER_MAX:                            # few enough to read whole: the mean as in memory, to the bit
            return n, float((self.above(level) - level).mean(dtype=np.float64))
        return n, sum(total for _, total in self._ask("excess", float(level))) / n   # else summed where they lie

    def excess_moments(self, level: float) -> tuple[int, float, float]:
        """As in memory (`dmafn.validation.excess_moments`), never holding a long tail: more than `GATHER_MAX`
        values past `level` are cut into pieces of at most that many (at values sampled from every shard, their
        exact counts from rounds of counts, as `select_ranks` cuts), read `TAIL_READ` values at a time, each adding
        its excesses and its excesses weighted by their rank in the tail (its offset known from the counts)."""
        n_t = self.count_above(level)
        if n_t <= GATHER_MAX:                          # few enough to read whole: the numbers in memory, to the bit
            return excess_moments(self.above(level) - level)
        n = self.count()
        first = n - n_t                                # values <= level: the tail's ranks start there
        pending, pieces = [(level, np.inf, first, n)], []          # (lo, hi] and how many values are <= lo, hi
        while pending:
            pieces += [p for p in pending if p[3] - p[2] <= GATHER_MAX]
            big = [p for p in pending if p[3] - p[2] > GATHER_MAX]
            pending = []
            if not big:
                break
            # as many cuts as pieces of about half GATHER_MAX need: every shard answers each piece's read with an
            # array, so thousands of tiny pieces would cost more than the values
            most = [2 * -(-(c_hi - c_lo) // max(GATHER_MAX // 2, 1)) for _, _, c_lo, c_hi in big]
            for piece, cut in zip(big, cut_intervals(big, self._sample, self._count_le, SPLIT_BINS, most)):
                if cut is None:                        # every value there equals hi: a tie, not read (below)
                    pieces.append(piece)
                    continue
                edges, at = cut
                pending += [(float(edges[i]), float(edges[i + 1]), int(at[i]), int(at[i + 1]))
                            for i in range(len(edges) - 1) if at[i + 1] > at[i]]
        pieces.sort()
        total, weighted, batch, held = 0.0, 0.0, [], 0

        def add(piece: tuple[float, float, int, int], values: np.ndarray) -> None:
            nonlocal total, weighted
            x = np.sort(values) - level
            total += float(np.sum(x))
            weighted += float(np.sum(x * np.arange(piece[2] - first, piece[3] - first)))

        def read() -> None:
            for piece, values in zip(batch, self._between([p[:2] for p in batch])):
                add(piece, values)

        for piece in pieces:
            size = piece[3] - piece[2]
            if size > GATHER_MAX:                      # a tie at hi: its values are known without reading them
                x, offset = piece[1] - level, piece[2] - first
                total += x * size
                weighted += x * (offset * size + size * (size - 1) / 2)
                continue
            if batch and held + size > TAIL_READ:
                read()
                batch, held = [], 0
            batch.append(piece)
            held += size
        if batch:
            read()
        return n_t, total / n_t, weighted / (n_t - 1) / n_t


class ShardTicks:
    """Validation ticks held by the workers, for `Calibration.fit_from`: one scored part per shard in the
    object store, chained per entity bucket in date order for the smoothing; beside each, once `leave_out` has
    run, the (N,) flags of its ticks left out as outliers (the raw scores are never copied)."""

    def __init__(self, parts: list[tuple[int, dt.date, ray.ObjectRef]], metas: list[dict[str, Any]],
                 left_out: int = 0) -> None:
        self.parts = sorted(parts, key=lambda p: (p[0], p[1]))
        self._left_out: list[ray.ObjectRef | None] = [None] * len(self.parts)    # per part, `leave_out`'s flags
        self.metas = metas
        self.left_out = left_out                # validation ticks left out for known incidents
        self.relation_outliers = sum(m.get("relation_outliers", 0) for m in metas)   # `relation_outliers`
        self.outliers = 0                       # ticks left out as outliers (`leave_out`)
        self.over = 0                           # the last `leave_out`'s ticks over the rule's limit themselves
        self._chain: tuple[Calibration, list, list] | None = None

    @classmethod
    def score(cls, spec: Spec, model, stats: BucketStatistics, shards: list[Shard],
              incidents: KnownIncidents | None = None) -> "ShardTicks":
        """Score the validation shards in Ray tasks, each with its entity bucket's statistics (and without the
        ticks in or just after the known `incidents` of its dates); their raw scores stay in the object store."""
        model_ref = ray.put(model)                                       # once, not a copy per shard's task
        launched = [(s, *_score_shard.remote(s, spec, stats.ref(s), model_ref,
                                             None if incidents is None else incidents.for_dates(s.dates)))
                    for s in shards]
        display, metas = ProgressDisplay("calibration", len(launched), "validation shards"), []
        for _, meta, _ in launched:
            metas.append(raise_task_error(meta))
            display.update(len(metas), ticks=sum(m["ticks"] for m in metas))
        display.close()
        days = sorted({d for s in shards for d in s.dates})
        left_out_files({why: 1 for m in metas for why in m.get("unreadable", {})},
                       f"validation days {days[0]}..{days[-1]}" if days else "validation days")
        parts = [(s.bucket, s.dates[0], part) for (s, _, part), meta in zip(launched, metas) if meta["ticks"]]
        left_out = sum(m["left_out"] for m in metas)
        if not parts:
            raise DataError(f"spec '{spec.name}': no tick of the validation days has a modality present" +
                            (f" outside the labelled incidents of {spec.labels.path} (train.exclude_labelled)"
                             if left_out else ""))
        return cls(parts, [m for m in metas if m["ticks"]], left_out)

    @property
    def latent_dims(self) -> int | None:
        return self.metas[0]["latent_dims"]

    def count(self) -> int:
        """The ticks kept."""
        return sum(m["ticks"] for m in self.metas) - self.outliers

    def _in_chains(self, task, *args) -> list[tuple[int, tuple]]:
        """`task.remote(part, its flags, *args, carry)` over the parts, each entity bucket's shards in date order
        with the carry (the task's last return) handed on from one to the next: (bucket, the task's other returns)
        per part."""
        out, carry, bucket = [], None, None
        for (b, _, part), flags in zip(self.parts, self._left_out):
            carry = None if b != bucket else carry
            bucket = b
            *returned, carry = task.remote(part, flags, *args, carry)
            out.append((b, tuple(returned)))
        return out

    def leave_out(self, rule: OutlierTicks) -> int:
        """Leave out (as well as those before) the ticks `rule` flags, each entity bucket's shards chained in date
        order; the count left out."""
        chained = self._in_chains(_leave_out_part, rule)
        self._left_out, self._chain = [flags for _, (flags, _, _) in chained], None
        self.outliers = sum(raise_task_error(count) for _, (_, count, _) in chained)
        self.over = sum(raise_task_error(over) for _, (_, _, over) in chained)
        return self.outliers

    def keep_all(self) -> None:
        """Take back every tick left out."""
        self._left_out, self._chain, self.outliers = [None] * len(self.parts), None, 0

    @property
    def state_owners(self) -> tuple[str, ...]:
        return tuple(self.metas[0].get("state_owners", ()))

    def total(self, sums) -> dict[str, np.ndarray]:
        """`sums` added up over every shard's ticks: each shard's task sums its own, the driver adds them."""
        out: dict[str, np.ndarray] = {}
        for part in (raise_task_error(r) for r in [_total.remote(p, flags, sums)
                                                   for (_, _, p), flags in zip(self.parts, self._left_out)]):
            for key, value in part.items():
                out[key] = out[key] + value if key in out else value
        return out

    def column(self, column: Column) -> list[ShardValues]:
        width = (1 if column.kind == "latent" and self.latent_dims == 1 else
                 len(self.state_owners) if column.kind == "state" else self.metas[0]["columns"])
        refs = [_column.options(num_returns=1 + width).remote(part, flags, column, width)
                for (_, _, part), flags in zip(self.parts, self._left_out)]
        return [ShardValues([r[0] for r in refs], j, [r[1 + j] for r in refs]) for j in range(width)]

    def _smoothed(self, calibration: Calibration) -> tuple[list, list]:
        if self._chain is None or self._chain[0] is not calibration:     # the chain of this very calibration
            chained = self._in_chains(_smooth_part, calibration)
            self._chain = (calibration, [(summary, values) for _, (summary, values, _) in chained],
                           [(b, by_entity) for b, (_, _, by_entity) in chained])
        return self._chain[1], self._chain[2]

    def scores(self, calibration: Calibration) -> ShardValues:
        scores = self._smoothed(calibration)[0]
        return ShardValues([summary for summary, _ in scores], 0, [values for _, values in scores])

    def contributions(self, calibration: Calibration) -> list[ShardValues]:
        """Each modality's contributions smoothed per entity (the bucket's shards chained in date order, as the
        fused scores): one `ShardValues` per modality."""
        width = len(calibration.modalities)
        chained = self._in_chains(_smooth_contributions.options(num_returns=2 + width), calibration)
        return [ShardValues([r[0] for _, r in chained], j, [r[1 + j] for _, r in chained]) for j in range(width)]

    def group_scales(self, calibration: Calibration) -> dict[str, tuple[float, float]]:
        keyed = self._smoothed(calibration)[1]
        buckets = sorted({b for b, _ in keyed})
        out: dict[str, tuple[float, float]] = {}
        for scales in (raise_task_error(r) for r in
                       [_bucket_scales.remote(*[ref for b, ref in keyed if b == bucket]) for bucket in buckets]):
            out.update(scales)
        return out
