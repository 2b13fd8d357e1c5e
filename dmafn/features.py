"""Preprocessing: aligned rows -> model tensors, with statistics fitted on training days only.

Aligned rows come from `pipelines.align` (columns `m__present`, `m__<col>`). The statistics are plain
JSON-able dicts saved with each model version, so scoring uses exactly what training fitted.
"""
from __future__ import annotations

import functools
import io
import math
import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmafn.spec import TICK_TIME, WINDOW_TRANSFORMS, ModalitySpec, Spec

T = TypeVar("T")

TEXT_VOCAB = 4096          # hashed token ids: 0 = padding, 1 = message separator
TEXT_TOKENS = 64           # the latest tokens in the window
_TOKEN = re.compile(r"[a-z]+|\d+")
_EPS = 1e-6
DRIFT_LIMIT = 1.0          # transform 'auto': a channel whose training trend moves it by more residual stds is centered
AUTO_CANDIDATES = ("level", "centered")


def entity_key(table: pa.Table, keys: Iterable[str]) -> list[str]:
    """One string per row naming its entity (several key columns joined by '|')."""
    cols = [table.column(k).to_pylist() for k in keys]
    return ["|".join(str(v) for v in row) for row in zip(*cols)]


# ------------------------------------------------------------------ statistics
GLITCH_SHARE = 0.1          # one value holding more of a channel's training variance than this is reported
GLITCH_MIN_VALUES = 1000    # (`StatisticsFitter.outlier_warnings`; fewer values: a normal maximum can hold it)
SPREAD = "spread"           # a series modality's statistics: the moments of its channels' window spread
SPEED = ".rising"           # an operating-state column's owner + this: how fast that modality's state rises
RESOLUTION_SHARE = 0.1      # float32's step at a channel's largest level over this share of its std is reported


def pairwise_merge(n_a: float, mean_a: Any, scatter_a: Any, n_b: float, mean_b: Any,
                   scatter_b: Any) -> tuple[float, Any, Any]:
    """Count, mean and scatter of the union of two disjoint parts of rows (Chan et al.), never a difference of large
    sums; the scatter per column (sums of squared deviations, (k,)) or as a matrix (centred cross products, (k, k)),
    as the parts hold it. A part without rows gives the other as it is (its arrays are never changed in place)."""
    if not n_b:
        return n_a, mean_a, scatter_a
    if not n_a:
        return n_b, mean_b, scatter_b
    n = n_a + n_b
    delta = mean_b - mean_a
    spread = np.outer(delta, delta) if np.ndim(scatter_a) == 2 else delta * delta
    return n, mean_a + delta * (n_b / n), scatter_a + scatter_b + spread * (n_a * n_b / n)


class NoUsableRows(ValueError):
    """A modality with every channel at none of the ticks a fit was given (`StatisticsFitter.fleet_result`): nothing
    to fit its statistics on. `modality`: its name; `dead`: the columns that hold no value at any tick it is present
    at (present: with another column), `present`: those ticks."""

    def __init__(self, modality: str, dead: tuple[str, ...] = (), present: int = 0) -> None:
        super().__init__(f"modality '{modality}': no usable rows in the training days to fit statistics"
                         + (f" (column {', '.join(map(repr, dead))} holds no value at any of the {present} ticks its "
                            "others have one)" if dead else ""))
        self.modality, self.dead, self.present = modality, dead, present


class _Moments:
    """Streaming per-column count, mean and sum of squared deviations from the mean, and the smallest and largest
    value. Parts are merged pairwise (Chan et al.), never as a difference of large sums: a channel whose level is
    far from zero beside its spread (a counter near 1e6 that moves by 1) keeps its std over years of rows."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0.0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        values = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values[:, None]
        if not values.shape[0]:
            return
        part = _Moments()
        part.n, part.mean = float(values.shape[0]), values.mean(0, dtype=np.float64)
        deviations = values.astype(np.float64) - part.mean
        part.m2 = (deviations * deviations).sum(0)
        part.lo, part.hi = values.min(0), values.max(0)
        self.merge(part)

    def merge(self, other: "_Moments") -> "_Moments":
        """Add another partial result of disjoint rows."""
        if other.n:
            self.lo, self.hi = np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi)
            self.n, self.mean, self.m2 = pairwise_merge(self.n, self.mean, self.m2, other.n, other.mean, other.m2)
        return self

    def extreme_share(self) -> tuple[np.ndarray, np.ndarray]:
        """Per column, the value farthest from the mean and the share of the column's variance (sum of squared
        deviations) that this one value holds."""
        var_sum = np.maximum(self.m2, 1e-300)
        far = np.where(np.abs(self.hi - self.mean) >= np.abs(self.lo - self.mean), self.hi, self.lo)
        return np.atleast_1d(far), np.atleast_1d((far - self.mean) ** 2 / var_sum)

    def result(self) -> dict[str, list[float]]:
        std = np.sqrt(np.maximum(self.m2 / max(self.n, 1), 0.0))
        return {"mean": np.atleast_1d(self.mean).tolist(), "std": np.maximum(np.atleast_1d(std), 1e-3).tolist(),
                "count": self.n}


class _Trend:
    """Streaming least-squares line of each column against time (n, means, centred sums; Chan et al.'s
    pairwise merge, numerically stable), for the drift of a channel over the training span."""

    def __init__(self) -> None:
        self.n, self.mt, self.mx, self.st, self.sx, self.c = 0, 0.0, 0.0, 0.0, 0.0, 0.0
        self.t_min, self.t_max = np.inf, -np.inf

    def add(self, t: np.ndarray, x: np.ndarray) -> "_Trend":
        """`t` (N,) seconds, `x` (N, C)."""
        if len(t) == 0:
            return self
        part = _Trend()
        part.n, part.mt, part.mx = len(t), float(t.mean()), x.mean(0)
        dt, dx = t - part.mt, x - part.mx
        part.st, part.sx, part.c = float(dt @ dt), (dx * dx).sum(0), dt @ dx
        part.t_min, part.t_max = float(t.min()), float(t.max())
        return self.merge(part)

    def merge(self, other: "_Trend") -> "_Trend":
        if other.n == 0:
            return self
        n = self.n + other.n
        dt, dx, w = other.mt - self.mt, other.mx - self.mx, self.n * other.n / n
        self.st = self.st + other.st + dt * dt * w
        self.sx = self.sx + other.sx + dx * dx * w
        self.c = self.c + other.c + dt * dx * w
        self.mt, self.mx = self.mt + dt * other.n / n, self.mx + dx * other.n / n
        self.n, self.t_min, self.t_max = n, min(self.t_min, other.t_min), max(self.t_max, other.t_max)
        return self

    def drift(self) -> np.ndarray | None:
        """Per column: how far the fitted line moves across the span, in standard deviations of the residual
        about it; None with fewer than 10 rows or no time span."""
        if self.n < 10 or self.st <= 0:
            return None
        slope = np.asarray(self.c, float) / self.st
        residual = np.maximum(np.asarray(self.sx, float) - slope * np.asarray(self.c, float), 0.0) / self.n
        return np.abs(slope) * (self.t_max - self.t_min) / np.maximum(np.sqrt(residual), 1e-9)


def auto_transforms(drifts: Iterable[np.ndarray], limit: float = DRIFT_LIMIT) -> tuple[list[str], list[float]]:
    """Transform 'auto', per channel from each entity's training drift (`_Trend.drift`): 'centered' where the
    median entity's trend moves the channel by more than `limit` residual standard deviations over its
    training span (a level that keeps moving - warming up, wearing - lies outside the training range on
    later days; each window minus its mean keeps its shape), else 'level' (levels carry the anomalies)."""
    per_entity = [d for d in drifts if d is not None]
    if not per_entity:
        return [], []
    median = np.median(np.stack(per_entity), 0)
    return ["centered" if d > limit else "level" for d in median], [float(d) for d in median]


# ------------------------------------------------------------------ channel relations (slow context)
RELATION_BLOCKS = (1, 3, 10, 30)   # context steps, counted back from the latest, that end each history block
RELATION_TRIM_LIMIT = 4.0   # residual stds: a tick this far from a relation's fit on any channel is left out of its refit
RELATION_REFITS = 2         # at most: the relations refitted on the ticks their fit before calls typical


def relation_blocks(steps: int) -> list[tuple[int, int]]:
    """(from, to) step ranges counted back from the latest step of a context window of `steps` steps: the last
    step, steps 2-3, 4-10, 11-30 and the rest (those the window has)."""
    ends = sorted({min(b, steps) for b in RELATION_BLOCKS} | {steps})
    return [(lo, hi) for lo, hi in zip([0, *ends[:-1]], ends)]


def block_means(window: np.ndarray, dtype: type | None = None) -> list[np.ndarray]:
    """A window's (N, T, C) means over each of `relation_blocks` of its T steps: one (N, C) per block."""
    steps = window.shape[1]
    return [window[:, steps - hi:steps - lo].mean(1, dtype=dtype) for lo, hi in relation_blocks(steps)]


def relation_quantities(current: np.ndarray, history: np.ndarray, peers: np.ndarray | None = None) -> np.ndarray:
    """Everything a modality's relations are built from, once per tick: every channel's current value (N, C), the
    means of its context window (N, T, C) over each of `relation_blocks` (C per block), and the peers' current
    values (N, K; `peer_values`) for a cross-modal relation. (N, C x (1 + blocks) [+ K]), float64."""
    cols = [current, *block_means(history)]
    if peers is not None:
        cols.append(peers)
    return np.concatenate(cols, 1).astype(np.float64)


def design_index(channels: int, blocks: int, target: int, peers: int = 0, peers_only: bool = False) -> np.ndarray:
    """The columns of `relation_quantities` that channel `target`'s design reads: the other channels' current
    values and block means - never its own - and every peer value; `peers_only`: the peer values alone (what
    predicts it while another channel of its parent is missing - a dead channel)."""
    first_peer = (1 + blocks) * channels
    if peers_only:
        return np.arange(first_peer, first_peer + peers, dtype=np.int64)
    others = [j for j in range(channels) if j != target]
    return np.array([b * channels + j for b in range(1 + blocks) for j in others]
                    + [first_peer + k for k in range(peers)], np.int64)


def relation_design(current: np.ndarray, history: np.ndarray, target: int,
                    peers: np.ndarray | None = None) -> np.ndarray:
    """What channel `target` is predicted from: the other channels' current values (N, C) and the means of
    their context window (N, T, C) over `relation_blocks` - never the target's own values, so a channel that
    creeps away from its relation with the others cannot explain itself - and, for a cross-modal relation,
    the peer modalities' current values (N, K; `peer_values`). (N, (C-1) x (1 + blocks) [+ K])."""
    quantities = relation_quantities(current, history, peers)
    return quantities[:, _design_of(quantities, current.shape[1], target, 0 if peers is None else peers.shape[1])]


def _design_of(quantities: np.ndarray, channels: int, target: int, peers: int,
               peers_only: bool = False) -> np.ndarray:
    return design_index(channels, (quantities.shape[1] - peers) // channels - 1, target, peers, peers_only)


def level_modalities(spec: Spec) -> list[str]:
    """The modalities whose channels have a level to read at a tick (`level_values`): every tabular or timeseries
    modality that is not a context view, in spec order."""
    return [name for name, m in spec.modalities.items() if m.kind in ("tabular", "timeseries") and not m.context_of]


def level_values(level: np.ndarray, m: ModalitySpec, spread: bool = False) -> np.ndarray:
    """A modality's level per channel at each tick (N, C) float64 from its `raw_values` as they are: a tabular row
    as it is, a series window's mean (the latest step alone is one noisy sample of a fast signal); with `spread`,
    a series window's `window_spread` per channel beside its mean (N, 2C)."""
    if m.kind == "tabular":
        return level.astype(np.float64)
    mean = level.mean(1, dtype=np.float64)
    return np.concatenate([mean, window_spread(level)], 1) if spread else mean


def window_spread(level: np.ndarray) -> np.ndarray:
    """How far each channel of a series window (N, T, C) swings within it: its standard deviation over the T steps,
    (N, C) float64. An oscillating signal - an accelerometer's axis - averages near zero over a window whatever the
    load; its swing (RMS about the window's mean) is where the load shows."""
    return level.std(1, dtype=np.float64)


def spread_modalities(spec: Spec) -> list[str]:
    """The series modalities among the `level_modalities` whose window spread (`window_spread`) the operating state
    and the cross-modal relations read beside each channel's window mean; none with `model.window_spread` false."""
    if not spec.model.window_spread:
        return []
    return [name for name in level_modalities(spec) if spec.modalities[name].kind == "timeseries"]


def relation_peers(spec: Spec, parent: str) -> list[str]:
    """The modalities whose current values a cross-modal relation of `parent`'s channels also reads: every other
    of the `level_modalities`; none with `model.cross_modal_relations` false."""
    if not spec.model.cross_modal_relations:
        return []
    return [name for name in level_modalities(spec) if name != parent]


def peer_contexts(spec: Spec, parent: str) -> list[str]:
    """The context views of `parent`'s peers (`relation_peers`) that the spec has: their history joins the
    cross-modal design, so a channel that follows a peer with a lag (a temperature the load's last minutes) is
    related to the peer's past, not only to its current value."""
    peers = relation_peers(spec, parent)
    return [name for peer in peers for name, m in spec.modalities.items() if m.context_of == peer]


def level_spec(spec: Spec) -> Spec:
    """`spec` with its tabular and series modalities alone (their context views among them): everything the relations
    and the operating state read, without the images, clips and text a featurization for those needs no part of."""
    return replace(spec, modalities={name: m for name, m in spec.modalities.items()
                                     if m.kind in ("tabular", "timeseries")})


def relation_peers_read(stats: dict[str, Any]) -> set[str]:
    """The modalities some fitted cross-modal relation reads as a peer (its current values or, a context view, its
    history): where one of them is absent, the relations reading it fall back to their within-modality fits."""
    return {name for fitted in stats.get("relations", {}).values() if fitted.get("cross_channels")
            for name in [*fitted.get("peers", []), *fitted.get("peer_history", [])]}


def peer_values(levels: dict[str, np.ndarray], presence: dict[str, np.ndarray], spec: Spec,
                peers: list[str], history: Iterable[str] = (), spread: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The peers' current values side by side (N, K): their `level_values` (with `spread`, a series peer's window
    spread beside its mean), then for each peer context view in `history` (`peer_contexts`) its window's means
    over `relation_blocks`; and where every one of them is present (N,)."""
    cols, present = [], None
    for name in peers:
        cols.append(level_values(levels[name], spec.modalities[name], spread))
        present = presence[name] if present is None else present & presence[name]
    for name in history:                                        # (N, T, C): the peer's per-period means
        cols += block_means(levels[name], np.float64)
        present = present & presence[name]
    return np.concatenate(cols, 1), present


class _EntitySums:
    """One entity's part of a relation's regression: its row count and the sums of its design and target."""

    def __init__(self, d: int):
        self.n, self.sx, self.sy = 0, np.zeros(d), 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.n += len(y)
        self.sx = self.sx + x.sum(0)
        self.sy += float(y.sum())

    def merge(self, other: "_EntitySums") -> "_EntitySums":
        self.n, self.sx, self.sy = self.n + other.n, self.sx + other.sx, self.sy + other.sy
        return self

    def channel(self, design: np.ndarray, target: int) -> "_EntitySums":
        """One channel's sums from the sums of every quantity (`sx` over `relation_quantities`): its design's and,
        as its target's, its current value's."""
        out = _EntitySums(len(design))
        out.n, out.sx, out.sy = self.n, self.sx[design], float(self.sx[target])
        return out


class _Range:
    """The range each of a relation's quantities (`relation_quantities`) took for one entity, and its rows."""

    def __init__(self, q: int):
        self.n, self.lo, self.hi = 0, np.full(q, np.inf), np.full(q, -np.inf)

    def add(self, values: np.ndarray) -> None:
        self.n += len(values)
        if len(values):
            self.lo, self.hi = np.minimum(self.lo, values.min(0)), np.maximum(self.hi, values.max(0))

    def merge(self, other: "_Range") -> "_Range":
        self.n, self.lo, self.hi = self.n + other.n, np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi)
        return self


def fit_ranges(fleet: _Range | None) -> dict[str, Any] | None:
    """Where a relation's quantities were seen on the training days, over the fleet (`fleet`, the `range_total`
    of every entity) and per entity (those with 2 rows or more, as the fits; left empty here, filled with each
    entity bucket's `_entity_ranges`): at scoring each is held inside it, so a prediction never extrapolates from
    an abnormal predictor. Kept once per relation, not per channel (a quantity is in every other channel's
    design). None without an entity."""
    if fleet is None or fleet.n == 0:
        return None
    return {"fleet": [fleet.lo.tolist(), fleet.hi.tolist()], "entities": {}}


def _entity_ranges(ranges: dict[str, _Range]) -> dict[str, list[list[float]]]:
    return {key: [r.lo.tolist(), r.hi.tolist()] for key, r in ranges.items() if r.n >= 2}


def range_total(ranges: dict[str, _Range]) -> _Range | None:
    """The range over the entities with 2 rows or more (`fit_ranges`), its `n` their count; None without any
    entity. Totals of disjoint entities merge (`_Range.merge`)."""
    if not ranges:
        return None
    total = _Range(len(next(iter(ranges.values())).lo))
    for r in ranges.values():
        if r.n >= 2:
            total.n += 1
            total.lo, total.hi = np.minimum(total.lo, r.lo), np.maximum(total.hi, r.hi)
    return total


def clip_quantities(quantities: np.ndarray, ranges: dict[str, Any] | None,
                    groups: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """`quantities` held inside the ranges (`fit_ranges`) their entity took on the training days, else the
    fleet's; as they are without ranges."""
    if ranges is None:
        return quantities
    for key, rows in groups:
        lo, hi = ranges["entities"].get(key, ranges["fleet"])
        quantities[rows] = np.clip(quantities[rows], lo, hi)
    return quantities


class _Comoments:
    """Streaming count, mean and centred cross products (scatter about the mean) of the columns of rows z (N, k),
    float64, merged pairwise (Chan et al.): never a difference of large raw sums, so columns far from zero beside
    their spread (a counter near 1e6 that moves by 1) keep their scatter over years of rows."""

    def __init__(self, k: int):
        self.n, self.mean, self.scatter = 0.0, np.zeros(k), np.zeros((k, k))

    def add(self, z: np.ndarray, weights: np.ndarray | None = None) -> "_Comoments":
        """Rows z (N, k), each counted `weights` times (N,; default once)."""
        if not len(z):
            return self
        w = np.ones(len(z)) if weights is None else np.asarray(weights, np.float64)
        part = _Comoments(z.shape[1])
        part.n = float(w.sum())
        part.mean = (w @ z) / part.n
        d = z - part.mean
        part.scatter = d.T @ (d * w[:, None])
        return self.merge(part)

    def merge(self, other: "_Comoments") -> "_Comoments":
        """Add another part of disjoint rows (`other` is never changed by merging on)."""
        self.n, self.mean, self.scatter = pairwise_merge(self.n, self.mean, self.scatter,
                                                         other.n, other.mean, other.scatter)
        return self

    def columns(self, index: np.ndarray) -> "_Comoments":
        """The count, means and scatter of the columns `index` alone (as if only they had been added)."""
        out = _Comoments(len(index))
        out.n, out.mean, out.scatter = self.n, self.mean[index], self.scatter[np.ix_(index, index)]
        return out

    def about(self, point: np.ndarray) -> np.ndarray:
        """(k, k) the scatter about `point` instead of the mean."""
        delta = self.mean - point
        return self.scatter + np.outer(delta, delta) * self.n


class _Regression:
    """Streaming least squares of one channel on its design (`relation_design`) over a fleet: the count, means and
    centred cross products of [design, target] over every row once (`_Comoments`, (d+1) x (d+1)), and per entity
    only what its own intercept needs (`_EntitySums`), so memory grows with the entities by O(d), not O(d^2); the
    within-entity cross products are the fleet's minus the scatter of the entities' means (`_EntityTotals`).
    Merged by adding (ranges by min / max)."""

    def __init__(self, d: int, target: bool = True):
        self.d = d
        self.moments = _Comoments(d + 1 if target else d)     # without a target: every quantity's (`_RelationFit`)
        self.entities: dict[str, _EntitySums] = {}

    def add(self, key: str, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Rows of one entity: design x (n, d), target y (n,) (none without a target)."""
        self.moments.add((x if y is None else np.column_stack([x, y])).astype(np.float64))
        self.entities.setdefault(key, _EntitySums(self.d)).add(x, np.zeros(len(x)) if y is None else y)

    def merge(self, other: "_Regression") -> "_Regression":
        self.moments.merge(other.moments)
        for key, part in other.entities.items():               # copies: merging on must not change `other`
            self.entities.setdefault(key, _EntitySums(self.d)).merge(part)
        return self


class _RelationFit:
    """One context's relations as its rows stream in: the count, means and centred cross products of every quantity
    (`relation_quantities`: each channel's current value and block means, the peers' values) over the fleet and
    each entity's sums of them (`quantities`, a `_Regression` without a target), from which each parent channel's
    regression on its design is taken when it is fitted (`channel`: its design's and its own current value's rows
    and columns) - one (P, P) accumulator instead of one per channel: a parent of C channels has P = C x (1 +
    blocks) + K quantities and each channel's design nearly all of them, so C accumulators cost C times the
    arithmetic and memory (a historian table of 300 tags: 7.8 GB). And the range each quantity took per entity
    (`_Range`). Merged by adding."""

    def __init__(self) -> None:
        self.quantities: _Regression | None = None
        self.width = 0                      # the parent's channels (C)
        self.peers = 0                      # the peers' values (K)
        self.ranges: dict[str, _Range] = {}

    def add(self, current: np.ndarray, history: np.ndarray, keys: np.ndarray, peers: np.ndarray | None = None) -> None:
        """Ticks with the parent's current values (N, C), the context window (N, T, C), their entity keys and, for a
        cross-modal fit, the peers' values (N, K)."""
        quantities = relation_quantities(current, history, peers)
        if self.quantities is None:
            self.quantities = _Regression(quantities.shape[1], target=False)
            self.width, self.peers = current.shape[1], 0 if peers is None else peers.shape[1]
        for key, rows in group_rows(keys):
            mine = quantities[rows]
            self.ranges.setdefault(key, _Range(quantities.shape[1])).add(mine)
            self.quantities.add(key, mine)

    def merge(self, other: "_RelationFit") -> "_RelationFit":
        if other.quantities is not None:                        # copies: merging on must not change `other`
            if self.quantities is None:
                self.quantities = _Regression(other.quantities.d, target=False)
                self.width, self.peers = other.width, other.peers
            self.quantities.merge(other.quantities)
        for key, part in other.ranges.items():
            self.ranges.setdefault(key, _Range(len(part.lo))).merge(part)
        return self

    def design(self, channel: int, peers_only: bool = False) -> np.ndarray:
        """The columns of the quantities channel `channel`'s design reads (`design_index`, `peers_only` as there)."""
        return design_index(self.width, (self.quantities.d - self.peers) // self.width - 1, channel, self.peers,
                            peers_only)

    def channel(self, c: int, peers_only: bool = False) -> _Regression:
        """Channel `c`'s regression on its design (`design`), as if it alone had been fitted (`_Regression`)."""
        design = self.design(c, peers_only)
        reg = _Regression(len(design))
        reg.moments = self.quantities.moments.columns(np.append(design, c))
        reg.entities = {key: sums.channel(design, c) for key, sums in self.quantities.entities.items()}
        return reg

    def channels(self) -> Iterator[_Regression]:
        """Each parent channel's regression in turn (`channel`; none before a row was added)."""
        return (self.channel(c) for c in range(self.width if self.quantities is not None else 0))


class _EntityTotals:
    """What a relation's fleet fit needs from its entities' sums (`_EntitySums`): over the entities with rows,
    the count, mean and scatter of their [design, target] means, each weighted by its rows (`_Comoments`: taken
    out of the fleet's scatter to leave within-entity deviations); over those with 2 rows or more (the fitted
    ones), their rows, design and target sums. Totals of disjoint entities (entity buckets) merge."""

    def __init__(self, d: int):
        self.between = _Comoments(d + 1)
        self.fitted, self.n, self.sx, self.sy = 0, 0, np.zeros(d), 0.0

    @classmethod
    def of(cls, reg: _Regression) -> "_EntityTotals":
        """The totals of `reg`'s entities; of a regression without a target (`_RelationFit.quantities`) those of
        every quantity, from which each channel's are taken (`channel`)."""
        targeted = len(reg.moments.mean) > reg.d
        totals = cls(reg.d)
        if not targeted:
            totals.between = _Comoments(reg.d)
        counted = [e for e in reg.entities.values() if e.n]
        if counted:
            counts = np.array([e.n for e in counted], np.float64)
            sums = np.stack([e.sx for e in counted])                                              # (E, d)
            if targeted:
                sums = np.column_stack([sums, [e.sy for e in counted]])                           # (E, d + 1)
            totals.between.add(sums / counts[:, None], counts)
        fits = [e for e in reg.entities.values() if e.n >= 2]              # one row has no deviation from its mean
        totals.fitted, totals.n = len(fits), sum(e.n for e in fits)
        totals.sx, totals.sy = sum((e.sx for e in fits), np.zeros(reg.d)), sum(e.sy for e in fits)
        return totals

    def merge(self, other: "_EntityTotals") -> "_EntityTotals":
        self.between.merge(other.between)
        self.fitted, self.n = self.fitted + other.fitted, self.n + other.n
        self.sx, self.sy = self.sx + other.sx, self.sy + other.sy
        return self

    def channel(self, design: np.ndarray, target: int) -> "_EntityTotals":
        """One channel's totals from those of every quantity (`of` a regression without a target)."""
        out = _EntityTotals(len(design))
        out.between = self.between.columns(np.append(design, target))
        out.fitted, out.n, out.sx, out.sy = self.fitted, self.n, self.sx[design], float(self.sx[target])
        return out


def fit_relation(reg: _Regression, totals: _EntityTotals) -> dict[str, Any] | None:
    """One channel's relation from the fleet's centred cross products (`reg`) and every entity's `totals`: weights pooled
    over entities on within-entity deviations (each entity keeps its own intercept, left empty here and filled
    by `entity_intercepts` where its entities are; an unseen one gets the fleet's) and the residual's std (the
    unit of its error). None without enough rows to fit it."""
    d, n = reg.d, totals.n
    if not totals.fitted or n < 2 * d + 10:
        return None
    within = reg.moments.scatter - totals.between.about(reg.moments.mean)     # (d+1, d+1) about each entity's mean
    sxx, sxy, syy = within[:d, :d], within[:d, d], float(within[d, d])
    ridge = 1e-6 * max(float(np.trace(sxx)) / d, 1e-12)
    weights = np.linalg.solve(sxx + ridge * np.eye(d), sxy)
    spread = float(np.sqrt(max(syy, 0.0) / n))          # the channel's own within-entity std
    residual = max(float(np.sqrt(max(syy - weights @ sxy, 0.0) / n)), 1e-3 * spread)   # an exact relation: no 0
    return {"weights": weights.tolist(), "intercept": float((totals.sy - weights @ totals.sx) / n),
            "entity_intercepts": {}, "residual_std": max(residual, 1e-9), "spread": spread}


CONDITIONAL_QUANTITIES = 256   # at most: a relation's quantities whose covariance is kept for `conditional_residuals`
                               # (P x P numbers in the manifest; a 42-channel table with an hour's context has 252)


def conditional_fit(fit: _RelationFit, totals: _EntityTotals | None) -> dict[str, Any] | None:
    """What predicts each channel from whichever of its relation's quantities a tick has (`conditional_residuals`):
    the within-entity covariance of every quantity (`relation_quantities`; P x P) on the ticks the relations were
    fitted on, their mean over the fitted entities (an unseen entity's) and each entity's own (filled by
    `entity_statistics`, `entity_means`). The relations' fits are the special case of every other channel there.
    None for a parent of fewer than three channels (the other of two is the dead one), over `CONDITIONAL_QUANTITIES`,
    or without enough rows, as `fit_relation`."""
    quantities = fit.quantities
    if fit.width < 3 or totals is None or quantities is None or quantities.d > CONDITIONAL_QUANTITIES:
        return None
    d, n = quantities.d, totals.n
    if not totals.fitted or n < 2 * d + 10:
        return None
    within = quantities.moments.scatter - totals.between.about(quantities.moments.mean)
    return {"covariance": (within / n).tolist(), "means": (totals.sx / n).tolist(), "entity_means": {}}


def entity_means(fit: _RelationFit) -> dict[str, list[float]]:
    """Each entity's mean of every quantity of a relation (entities with 2 rows or more, as `entity_intercepts`;
    none where this fit had no rows): `conditional_fit`'s per-entity part."""
    if fit.quantities is None:
        return {}
    return {key: (e.sx / e.n).tolist() for key, e in fit.quantities.entities.items() if e.n >= 2}


def conditional_residuals(conditional: dict[str, Any], current: np.ndarray, quantities: np.ndarray,
                          available: np.ndarray, keys: list[str], peers: int = 0) -> np.ndarray:
    """(N, C) each channel's signed distance, in its conditional std, from what the quantities its tick has predict
    (NaN for a channel missing now or with nothing else there): a channel's relation with the others when some of
    them are missing - a dead tag - as a Gaussian conditioned on the rest. `current` (N, C) the channels' current
    values (the targets), `quantities` (N, P) the relation's quantities held in their training ranges, `available`
    (N, P) which of them the tick has, the last `peers` of them the peers' values (`cross_conditional`, K); the
    prediction of channel c reads every available quantity but its own (its current value and block means), as its
    fitted relation does - with every quantity there, the same prediction and residual std (`fit_relation`, up to
    its ridge). One matrix inverse per pattern of missing quantities."""
    cov = np.asarray(conditional["covariance"], np.float64)
    n, channels = current.shape
    owner = np.arange(cov.shape[0]) % channels            # quantity q: channel q % C's current value or block mean
    owner[cov.shape[0] - peers:] = -1                     # ... but a peer's value, no channel's own
    means = np.tile(np.asarray(conditional["means"], np.float64), (n, 1))
    for key, rows in group_rows(keys):
        if key in conditional["entity_means"]:
            means[rows] = conditional["entity_means"][key]
    apart = quantities - means
    target = current - means[:, :channels]
    z = np.full((n, channels), np.nan)
    packed = np.ascontiguousarray(np.packbits(available, axis=1))     # a pattern of missing quantities: bytes
    _, example, which = np.unique(packed.view(np.dtype((np.void, packed.shape[1]))).ravel(), return_index=True,
                                  return_inverse=True)                  # a row of each pattern, each row's pattern
    for p, pattern in enumerate(available[example]):
        rows, have = np.flatnonzero(which.reshape(-1) == p), np.flatnonzero(pattern)
        sigma = cov[np.ix_(have, have)]
        ridge = 1e-6 * max(float(np.trace(sigma)) / max(len(have), 1), 1e-12)
        precision = np.linalg.inv(sigma + ridge * np.eye(len(have)))
        weights, stds = np.zeros((len(have), channels)), np.full(channels, np.nan)   # column c: channel c's
        for c in range(channels):
            own, rest = owner[have] == c, owner[have] != c
            if not pattern[c] or not rest.any():
                continue
            # x_own | x_rest ~ N(-A P_own,rest x_rest, A), A = P_own,own^-1 (on deviations from the entity's means)
            inverse = np.linalg.inv(precision[np.ix_(own, own)])
            now = int(np.flatnonzero(have[own] == c)[0])         # the current value: the own quantity listed first
            weights[rest, c] = -(inverse @ precision[np.ix_(own, rest)])[now]
            stds[c] = max(float(np.sqrt(max(inverse[now, now], 0.0))),
                          1e-3 * float(np.sqrt(max(cov[c, c], 0.0))), 1e-9)
        scored = np.flatnonzero(~np.isnan(stds))
        pred = apart[np.ix_(rows, have)] @ weights[:, scored]                        # (rows, scored channels)
        z[np.ix_(rows, scored)] = np.clip((target[np.ix_(rows, scored)] - pred) / stds[scored], -Z_LIMIT, Z_LIMIT)
    return z


def entity_intercepts(reg: _Regression, fitted: dict[str, Any]) -> dict[str, float]:
    """Each entity's own intercept (entities with 2 rows or more) under the fleet's fitted weights."""
    weights = np.asarray(fitted["weights"])
    return {key: float((e.sy - weights @ e.sx) / e.n) for key, e in reg.entities.items() if e.n >= 2}


def _per_entity(stats: dict[str, Any], part: Callable[[str, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """`stats` with each per-entity mapping - a modality's normalisation moments, a relation channel's intercepts
    and ranges, a relation's quantity ranges - replaced by `part(where, mapping)`, `where` naming the mapping's
    place ('modalities/proc/entity', 'relations/ctx/channels/0/entity_intercepts', ...). The rest is shared."""
    def channel(where: str, fitted: dict[str, Any] | None) -> dict[str, Any] | None:
        if fitted is None:
            return None
        out = {**fitted, "entity_intercepts": part(f"{where}/entity_intercepts", fitted["entity_intercepts"])}
        if "entity_ranges" in fitted:                       # versions saved before the relation-level ranges
            out["entity_ranges"] = part(f"{where}/entity_ranges", fitted["entity_ranges"])
        return out

    modalities = {name: {**entry, "entity": part(f"modalities/{name}/entity", entry["entity"])}
                  if "entity" in entry else entry for name, entry in stats["modalities"].items()}
    relations = {}
    for ctx, fitted in stats.get("relations", {}).items():
        fitted = dict(fitted)
        for key in ("channels", "cross_channels", "peer_channels"):
            if fitted.get(key) is not None:
                fitted[key] = [channel(f"relations/{ctx}/{key}/{i}", ch) for i, ch in enumerate(fitted[key])]
        for key in ("ranges", "cross_ranges"):
            if fitted.get(key):
                fitted[key] = {**fitted[key], "entities": part(f"relations/{ctx}/{key}/entities",
                                                               fitted[key]["entities"])}
        for key in ("conditional", "cross_conditional"):
            if fitted.get(key):
                fitted[key] = {**fitted[key], "entity_means": part(f"relations/{ctx}/{key}/entity_means",
                                                                   fitted[key]["entity_means"])}
        relations[ctx] = fitted
    return {**stats, "modalities": modalities, **({"relations": relations} if "relations" in stats else {})}


def split_entity_statistics(stats: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`stats` as the fleet's part (every per-entity mapping empty) and, per entity key, its parts by place
    (`{'modalities/proc/entity': [...], ...}`): a model version stores the first in its manifest and the second
    one row per entity (`pipelines.registry`), so a process reads only the entities it scores.
    `join_entity_statistics` puts them back together."""
    entities: dict[str, dict[str, Any]] = {}

    def take(where: str, mapping: dict[str, Any]) -> dict[str, Any]:
        for key, value in mapping.items():
            entities.setdefault(key, {})[where] = value
        return {}

    return _per_entity(stats, take), entities


def entity_keys(stats: dict[str, Any]) -> set[str]:
    """The keys of the entities `stats` holds a per-entity part of (normalisation moments, relation intercepts or
    ranges): those it was fitted on with enough rows of their own. Any other entity scores by the fleet's parts,
    as one not seen in training."""
    keys: set[str] = set()

    def gather(where: str, mapping: dict[str, Any]) -> dict[str, Any]:
        keys.update(mapping)
        return mapping

    _per_entity(stats, gather)
    return keys


def entity_places(stats: dict[str, Any]) -> list[str]:
    """Where `stats` keep parts per entity (normalisation moments with `model.normalization: entity`, relation
    intercepts and ranges), e.g. 'modalities/proc/entity'; none: every entity scores by the fleet's parts alike."""
    places: list[str] = []

    def gather(where: str, mapping: dict[str, Any]) -> dict[str, Any]:
        places.append(where)
        return mapping

    _per_entity(stats, gather)
    return places


def join_entity_statistics(fleet: dict[str, Any], entities: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The statistics from `split_entity_statistics`'s fleet part and (key, parts) pairs of the entities wanted
    (any subset, e.g. one entity bucket's: those left out score by the fleet's parts, as entities not seen in
    training do)."""
    by_place: dict[str, dict[str, Any]] = {}
    for key, parts in entities:
        for where, value in parts.items():
            by_place.setdefault(where, {})[key] = value
    return _per_entity(fleet, lambda where, mapping: {**mapping, **by_place.get(where, {})})


def relation_lines(stats: dict[str, Any], spec: Spec) -> list[str]:
    """One line per fitted channel relation, for `dmafn train`'s log: the residual std (the unit its error is
    counted in) within the modality and, where fitted, across to its peers, each with the share of the channel's
    own within-entity spread it leaves (how much of the channel each relation explains); per parent of three
    channels or more what stands in while one is dead (`conditional_residuals`, or why nothing does); and per
    refitted relation the training ticks its refit left out (`refit_relations_on_typical_ticks`)."""
    lines = []
    for ctx, relation in stats.get("relations", {}).items():
        parent = relation["parent"]
        cross = relation.get("cross_channels") or [None] * len(relation["channels"])
        peers = f"across to {', '.join(relation.get('peers', []))}" + \
            (f" and the history of {', '.join(relation['peer_history'])}" if relation.get("peer_history") else "")
        for column, within, across in zip(spec.modalities[parent].columns, relation["channels"], cross):
            parts = [f"{label} {fit['residual_std']:.4g}" + (f" ({fit['residual_std'] / fit['spread']:.0%} of its "
                                                             "spread)" if fit.get("spread") else "")
                     for label, fit in (("within the modality", within), (peers, across)) if fit]
            if parts:
                lines.append(f"modality '{parent}', column '{column}': relation residual " + "; ".join(parts))
        width = len(spec.modalities[parent].columns)
        quantities = width * (1 + len(relation_blocks(spec.modalities[ctx].steps))) if ctx in spec.modalities else 0
        if relation.get("conditional"):
            peers = " and the peers' values where they are there" if relation.get("cross_conditional") else ""
            over = "" if peers or not relation.get("peers") else (
                f"; with the peers' values they are over {CONDITIONAL_QUANTITIES}: the peers are not read then")
            lines.append(f"modality '{parent}': while a channel is dead or its context window missing, each other "
                         f"channel is read against the quantities still there{peers} (the covariance of its "
                         f"{quantities} quantities kept{over})")
        elif width >= 3 and quantities > CONDITIONAL_QUANTITIES:
            stand_in = "to the peers alone" if relation.get("peer_channels") else "to nothing (no relation error)"
            lines.append(f"modality '{parent}': {quantities} relation quantities, over the {CONDITIONAL_QUANTITIES} "
                         "whose covariance is kept: while one of its channels is dead the others are related "
                         f"{stand_in}")
        if "left_out" in relation or "cross_left_out" in relation:
            lines.append(f"modality '{parent}': relations refitted without the training ticks beyond "
                         f"{RELATION_TRIM_LIMIT:g} residual stds of their fit before on a channel - "
                         + "; ".join(f"{label} {relation[key]} left out" for label, key in
                                     (("within the modality", "left_out"), ("across", "cross_left_out"))
                                     if key in relation))
    return lines


def relation_pairs(spec: Spec) -> dict[str, str]:
    """context view -> its parent, for parents with two channels or more (each channel related to the others) or
    with one channel and peers to relate it to (`relation_peers`: a cross-modal relation only)."""
    return {name: m.context_of for name, m in spec.modalities.items()
            if m.context_of and (len(spec.modalities[m.context_of].columns) >= 2 or relation_peers(spec, m.context_of))}


def current_values(level: np.ndarray, m: ModalitySpec) -> np.ndarray:
    """The latest raw value of each channel at each tick (N, C) from modality m's `raw_values` as they are
    ('level'): a tabular row, a window's last step."""
    return level if m.kind == "tabular" else level[:, -1, :]


def _relation_residual(fitted: dict[str, Any], design: np.ndarray, target: np.ndarray,
                       groups: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """(N,) the target's distance from its prediction by one fitted relation, in residual stds, each entity with
    its intercept (a version that kept its design's ranges per channel, saved before the relation-level
    `ranges` of 2026-12-02, is held inside them here; later ones clip the quantities once, `clip_quantities`)."""
    intercepts = np.full(len(target), fitted["intercept"])
    for key, rows in groups:
        intercepts[rows] = fitted["entity_intercepts"].get(key, fitted["intercept"])
        if "range" in fitted:
            lo, hi = fitted["entity_ranges"].get(key, fitted["range"])
            design[rows] = np.clip(design[rows], lo, hi)
    pred = design @ np.asarray(fitted["weights"]) + intercepts
    return np.clip((target - pred) / fitted["residual_std"], -Z_LIMIT, Z_LIMIT)


def relation_residuals(relation: dict[str, Any], current: np.ndarray, history: np.ndarray, keys: list[str],
                       peers: np.ndarray | None = None, peers_only: bool = False) -> np.ndarray:
    """(N, C) each channel's signed distance from its prediction by the relation with the others, in units of that
    relation's residual std on the training days (held within `Z_LIMIT`; NaN for a channel with no fitted
    relation): by the within-modality fits, or with the peers' values (`peers`, N x K, every one present) by the
    cross-modal fits (`cross_channels`), with `peers_only` by the fits on the peers alone (`peer_channels`: while a
    channel of the parent is missing). The quantities the designs are made of are first held inside the range
    they took on the training days (the entity's, else the fleet's): a prediction never extrapolates from an
    abnormal predictor."""
    n, channels = current.shape
    fits = relation["channels"] if peers is None else relation["peer_channels" if peers_only else "cross_channels"]
    groups = group_rows(keys)                                # one sort of the keys serves every channel
    quantities = clip_quantities(relation_quantities(current, history, peers),
                                 relation.get("ranges" if peers is None else "cross_ranges"), groups)
    width = 0 if peers is None else peers.shape[1]
    z = np.full((n, channels), np.nan)
    for c, fitted in enumerate(fits):
        if fitted is not None:
            z[:, c] = _relation_residual(fitted, quantities[:, _design_of(quantities, channels, c, width, peers_only)],
                                         current[:, c], groups)
    return z


def tick_residuals(relation: dict[str, Any], current: np.ndarray, history: np.ndarray,
                   keys: list[str], peers: np.ndarray | None = None,
                   peers_present: np.ndarray | None = None) -> np.ndarray:
    """(N, C) each channel's signed residual from its relation with the others (`relation_residuals`; NaN for a
    channel with no fitted relation). Where the relation has a cross-modal fit (`cross_channels`) and the ticks'
    peer values (`peers`, N x K) are present (`peers_present`), those ticks are scored by it instead."""
    z = relation_residuals(relation, current, history, keys)
    if peers is not None and relation.get("cross_channels") is not None and peers_present.any():
        across = np.flatnonzero(peers_present)
        cross = relation_residuals(relation, current[across], history[across],
                                   list(np.asarray(keys, object)[across]), peers[across])
        fitted = ~np.isnan(cross)                    # a one-channel parent: only here (NaN where a peer is absent)
        z[across] = np.where(fitted, cross, z[across])
    return z


def squared_residuals(relation: dict[str, Any], z: np.ndarray) -> np.ndarray:
    """(N,) the mean over a relation's channels of their squared residuals `z` (N, C; about 1 on normal ticks; a
    NaN channel, with no fitted relation, counts 0)."""
    return np.nansum(z ** 2, 1) / max(len(relation["channels"]), 1)


def smooth_residuals(z: np.ndarray, groups: np.ndarray, alpha: float,
                     carry: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """(N, C) each channel's signed relation residual `z` (N, C; rows in time order within each group - an entity's
    date) averaged causally within its group: an EWMA of weight `alpha`, divided by the root of its weights' sum of
    squares, so that residuals independent from tick to tick keep unit variance from a group's first tick on,
    while a persistent offset too small to show at one tick adds up over the ticks it lasts (a matched filter for a
    creeping break of a relation). NaN values are skipped (the state carries over; NaN out). `carry`: group ->
    (weighted sum, sum of squared weights) per channel, read and updated, so a group's series cut into batches
    smooths as one."""
    out = np.full(z.shape, np.nan)
    carry = {} if carry is None else carry
    for key, rows in group_rows(groups):
        total, weights = (np.array(part, np.float64) for part in
                          carry.get(key, (np.zeros(z.shape[1]), np.zeros(z.shape[1]))))
        for c in range(z.shape[1]):
            seen = rows[~np.isnan(z[rows, c])]
            if not len(seen):
                continue
            sums = _ewma_from(z[seen, c], alpha, total[c])
            decay = (1.0 - alpha) ** (2 * np.arange(1, len(seen) + 1))       # each weight's square, as it ages
            squares = decay * weights[c] + alpha * alpha * (1.0 - decay) / (1.0 - (1.0 - alpha) ** 2)
            out[seen, c] = sums / np.sqrt(squares)
            total[c], weights[c] = sums[-1], squares[-1]
        carry[key] = (total, weights)
    return out


_EWMA_BLOCK = 256     # values per matrix product in `_ewma_from`


def _ewma_from(values: np.ndarray, alpha: float, start: float) -> np.ndarray:
    """(n,) s_k = alpha x_k + (1 - alpha) s_(k-1) with s_(-1) = `start`, a block of values per matrix product
    (no Python step per value)."""
    keep = 1.0 - alpha
    steps = np.arange(_EWMA_BLOCK)
    lower = np.tril(keep ** np.clip(steps[:, None] - steps[None, :], 0, None))     # x_j's weight in s_i, j <= i
    out = np.empty(len(values))
    for lo in range(0, len(values), _EWMA_BLOCK):
        block = values[lo:lo + _EWMA_BLOCK]
        k = len(block)
        out[lo:lo + k] = alpha * (lower[:k, :k] @ block) + keep ** (steps[:k] + 1) * start
        start = out[lo + k - 1]
    return out


RELATION_LEFT_OUT_WARNING = 0.01   # share of the training ticks a relation's refit leaves out: over it, `dmafn train` warns


def relation_warnings(stats: dict[str, Any], ticks: int) -> list[str]:
    """One line per relation whose refit left out more than `RELATION_LEFT_OUT_WARNING` of the `ticks` training
    ticks (within or across; a clean history leaves out about 0.1 %): the training window likely holds incidents
    nobody labelled, and they may sit in the validation days too, where they set the threshold."""
    lines = []
    for relation in stats.get("relations", {}).values():
        left = max(relation.get("left_out", 0), relation.get("cross_left_out", 0))
        if ticks and left > RELATION_LEFT_OUT_WARNING * ticks:
            lines.append(f"modality '{relation['parent']}': its relations' refit left out {left} of {ticks} training "
                         f"ticks ({left / ticks:.1%}; a clean history leaves out about 0.1 %) - the training window "
                         "likely holds incidents nobody labelled, and the validation days may too, where they raise "
                         "the threshold: label them (labels, train.exclude_labelled) or train on "
                         "another window")
    return lines


def relation_outliers(features: "Features") -> int:
    """The ticks some relation puts beyond `RELATION_TRIM_LIMIT` residual stds (its channels' mean squared residual
    over the limit's square): on validation days that should be clean, a count far over a clean history's share
    (`RELATION_LEFT_OUT_WARNING`) says they hold incidents (`dmafn train` warns)."""
    if features.relation_errors is None:
        return 0
    return int((features.relation_errors > RELATION_TRIM_LIMIT ** 2).any(1).sum())


def validation_warnings(outliers: int, ticks: int) -> list[str]:
    """A line when more than `RELATION_LEFT_OUT_WARNING` of the `ticks` validation ticks are `relation_outliers`:
    incidents nobody labelled in the validation days, which raise the threshold."""
    if not ticks or outliers <= RELATION_LEFT_OUT_WARNING * ticks:
        return []
    return [f"{outliers} of {ticks} validation ticks ({outliers / ticks:.1%}) lie over {RELATION_TRIM_LIMIT:g} residual "
            "stds from their channel relations (a clean day: about 0.1 %) - the validation days likely hold incidents "
            "nobody labelled, which raise the threshold (the calibration leaves out their gross parts, "
            "train.validation_outlier_limit, not their slow ones): label them (labels, train.exclude_labelled) or move "
            "the training window"]


def relations_left_out(stats: dict[str, Any]) -> int:
    """The training ticks the relations' last refit left out (`StatisticsFitter(trim_from=)`), over every
    relation and its cross-modal fit; 0 for statistics fitted once."""
    return sum(r.get("left_out", 0) + r.get("cross_left_out", 0) for r in stats.get("relations", {}).values())


def with_left_out(fleet: dict[str, Any], left_out: dict[tuple[str, str], int]) -> dict[str, Any]:
    """A fleet's part fitted before with each relation's left-out counts replaced by those of another fit's refit
    (`StatisticsFitter.left_out_`: (kind, context) -> ticks; none for a first fit), so that
    `refit_relations_on_typical_ticks` can tell when entities' parts fitted under it stop changing."""
    relations = {}
    for ctx, fitted in fleet.get("relations", {}).items():
        fitted = {k: v for k, v in fitted.items() if k not in ("left_out", "cross_left_out")}
        for kind, key in (("relations_", "left_out"), ("cross_relations_", "cross_left_out")):
            if (kind, ctx) in left_out:
                fitted[key] = left_out[(kind, ctx)]
        relations[ctx] = fitted
    return {**fleet, "relations": relations} if "relations" in fleet else fleet


def refit_relations_on_typical_ticks(first: T, refit: Callable[[T], T], fleet_of: Callable[[T], dict[str, Any]]) -> T:
    """Statistics whose channel relations are fitted robustly: `first` (every training tick), then up to
    `RELATION_REFITS` times `refit(previous)` - the same fit with each relation over the ticks that lie within
    `RELATION_TRIM_LIMIT` residual stds of its previous fit on every channel (a trimmed least squares: an incident
    left in the training window, an overheat or a drift, no longer sets the weights, the intercepts and the
    residual std it is measured in). Stops once a refit leaves no tick out. `fleet_of(statistics)`: the
    statistics' fleet part (where the relations and their counts are); the in-memory and the Ray fits (the
    latter a pass over the training shards per refit) share this."""
    fitted = first
    for _ in range(RELATION_REFITS):
        if not fleet_of(fitted).get("relations"):
            break
        fitted = refit(fitted)
        if not relations_left_out(fleet_of(fitted)):
            break
    return fitted


def fit_training_statistics(spec: Spec, aligned: pa.Table,
                            transforms: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The statistics of aligned training rows held in memory, the relations refitted on their typical ticks
    (`refit_relations_on_typical_ticks`); `dmafn train` does the same over its shards in Ray tasks. `transforms`
    as in `StatisticsFitter.fleet_result`."""
    return refit_relations_on_typical_ticks(
        StatisticsFitter(spec).add(aligned).result(transforms),
        lambda previous: StatisticsFitter(spec, previous).add(aligned).result(transforms), lambda stats: stats)


class StatisticsFitter:
    """Fits normalisation statistics from aligned training batches (streamed, any number of batches).

    A timeseries modality with transform 'auto' keeps the moments of both candidate presentations and each
    entity's trend of every channel (the latest value at each tick against the tick time); `result` picks per
    channel and keeps the chosen presentation's moments.

    With `trim_from` (statistics fitted before on the same rows; for a shard, those of its entities) each channel
    relation is fitted only on the ticks within `RELATION_TRIM_LIMIT` residual stds of its fit there on every
    channel, and the ticks left out are counted (`refit_relations_on_typical_ticks`); the rest is as without."""

    def __init__(self, spec: Spec, trim_from: dict[str, Any] | None = None):
        self.spec = spec
        self.trim_from = trim_from
        self.left_out_: dict[tuple[str, str], int] = {}         # (kind, context) -> ticks left out of its refit
        self.global_: dict[str, dict[str, _Moments]] = {}        # modality -> transform -> moments
        self.entity_: dict[str, dict[str, dict[str, _Moments]]] = {}   # modality -> transform -> entity -> moments
        for name, m in spec.modalities.items():
            views = self._views(m)
            self.global_[name] = {v: _Moments() for v in views}
            self.entity_[name] = {v: {} for v in views}
        for name in spread_modalities(spec):     # the moments of each channel's window spread, beside the views'
            self.global_[name][SPREAD] = _Moments()
            self.entity_[name][SPREAD] = {}
        self.trend_: dict[str, dict[str, _Trend]] = {m: {} for m, s in spec.modalities.items() if s.transform == "auto"}
        self.templates_: dict[str, dict[str, int]] = {m: {} for m, s in spec.modalities.items() if s.kind == "text"}
        self.magnitude_: dict[str, np.ndarray] = {}             # modality -> each channel's largest |level| (C,)
        self.held_: dict[str, np.ndarray] = {}                  # modality -> ticks present, then holding each channel
        # context view -> its parent's channel relations; and the same with the peers' current values beside
        # (`relation_peers`), on the ticks where every peer is present
        self.relations_: dict[str, _RelationFit] = {ctx: _RelationFit() for ctx in relation_pairs(spec)}
        self.cross_relations_: dict[str, _RelationFit] = \
            {ctx: _RelationFit() for ctx, parent in relation_pairs(spec).items() if relation_peers(spec, parent)}

    @staticmethod
    def _views(m: ModalitySpec) -> tuple[str, ...]:
        if m.kind == "timeseries":
            return AUTO_CANDIDATES if m.transform == "auto" else (m.transform,)
        return ("level",)

    def add(self, aligned: pa.Table) -> "StatisticsFitter":
        keys = entity_key(aligned, self.spec.entity)
        levels, presents = {}, {}        # per modality: its raw values as they are (every row), its presence
        for name, m in self.spec.modalities.items():
            if m.kind == "text":              # each distinct message once per batch (windows repeat it)
                flat = pc.unique(pc.list_flatten(aligned.column(f"{name}__{m.column}"))).drop_null()
                self.templates_[name] = prune_counts(TextVocabulary.count(flat.to_pylist(), self.templates_[name]))
            if m.kind not in ("tabular", "timeseries", "audio"):
                continue
            present = np.asarray(aligned.column(f"{name}__present").to_numpy(zero_copy_only=False), bool)
            if m.kind != "audio":         # fitted on the ticks with every channel (a dead channel's ticks: none)
                held = channel_presence(aligned, m) & present[:, None]
                counts = np.concatenate([[present.sum()], held.sum(0)]).astype(np.int64)
                self.held_[name] = self.held_.get(name, 0) + counts
                present = present & held.all(1)
            levels[name], presents[name] = raw_values(aligned, m, "level"), present
            if not present.any():
                continue
            auto = name in self.trend_
            values = levels[name][present]
            if m.kind != "audio":
                largest = np.abs(values).reshape(-1, values.shape[-1]).max(0)
                self.magnitude_[name] = np.maximum(self.magnitude_.get(name, largest), largest)
            groups = group_rows(np.asarray(keys, object)[present]) if m.kind != "audio" else []
            for view in self._views(m):          # 'level' only, for tabular and audio: the values as they are
                shown = transform_window(values, view)
                self.global_[name][view].add(_per_channel(shown, m))
                for key, rows in groups:
                    self.entity_[name][view].setdefault(key, _Moments()).add(_per_channel(shown[rows], m))
            if SPREAD in self.global_[name]:
                swing = window_spread(values)
                self.global_[name][SPREAD].add(swing)
                for key, rows in groups:
                    self.entity_[name][SPREAD].setdefault(key, _Moments()).add(swing[rows])
            if auto:
                if TICK_TIME not in aligned.column_names:
                    raise ValueError(f"modality '{name}': transform 'auto' needs the aligned rows' tick time "
                                     f"column '{TICK_TIME}'")
                seconds = np.asarray(aligned.column(TICK_TIME).to_numpy(zero_copy_only=False), np.float64)[present] / 1e6
                latest = values[:, -1, :].astype(np.float64)              # the latest value at each tick (N, C)
                for key, rows in groups:
                    self.trend_[name].setdefault(key, _Trend()).add(seconds[rows], latest[rows])
        for ctx, parent in relation_pairs(self.spec).items():
            both = presents[ctx] & presents[parent]
            if not both.any():
                continue
            current = current_values(levels[parent], self.spec.modalities[parent])[both].astype(np.float64)
            history = levels[ctx][both]
            ticks = np.asarray(keys, object)[both]
            if current.shape[1] >= 2:                   # one channel has no other to be related to within
                keep = self._typical("relations_", ctx, current, history, ticks)
                self.relations_[ctx].add(current[keep], history[keep], ticks[keep])
            if ctx in self.cross_relations_:
                peers, peers_present = peer_values(levels, presents, self.spec, relation_peers(self.spec, parent),
                                                   peer_contexts(self.spec, parent), self.spec.model.window_spread)
                across = peers_present[both]
                if across.any():
                    mine = peers[both][across]
                    keep = self._typical("cross_relations_", ctx, current[across], history[across], ticks[across], mine)
                    self.cross_relations_[ctx].add(current[across][keep], history[across][keep],
                                                   ticks[across][keep], mine[keep])
        return self

    def _typical(self, kind: str, ctx: str, current: np.ndarray, history: np.ndarray, keys: np.ndarray,
                 peers: np.ndarray | None = None) -> np.ndarray:
        """(N,) the ticks a relation is fitted on: all of them, or with `trim_from` those within
        `RELATION_TRIM_LIMIT` of its fit there on every fitted channel (the ticks left out are counted)."""
        fitted = (self.trim_from or {}).get("relations", {}).get(ctx)
        if fitted is None or fitted.get("channels" if peers is None else "cross_channels") is None:
            return np.ones(len(current), bool)
        z = relation_residuals(fitted, current, history, list(keys), peers)
        keep = ~(np.abs(np.nan_to_num(z)) > RELATION_TRIM_LIMIT).any(1)
        self.left_out_[(kind, ctx)] = self.left_out_.get((kind, ctx), 0) + int((~keep).sum())
        return keep

    def merge(self, other: "StatisticsFitter") -> "StatisticsFitter":
        """Add the partial statistics of other rows (e.g. another shard's); the result is the same as one
        fitter that saw all the rows (up to float summation order)."""
        for name in self.spec.modalities:
            for view, moments in other.global_[name].items():
                self.global_[name][view].merge(moments)
                mine = self.entity_[name][view]
                for key, part in other.entity_[name][view].items():
                    mine.setdefault(key, _Moments()).merge(part)
        for name, trends in other.trend_.items():
            for key, part in trends.items():
                self.trend_[name].setdefault(key, _Trend()).merge(part)
        for name, counts in other.templates_.items():
            mine = self.templates_[name]
            for t, c in counts.items():
                mine[t] = mine.get(t, 0) + c
            self.templates_[name] = prune_counts(mine)
        for own, theirs in ((self.relations_, other.relations_), (self.cross_relations_, other.cross_relations_)):
            for ctx, fit in theirs.items():
                own[ctx].merge(fit)
        for place, n in other.left_out_.items():
            self.left_out_[place] = self.left_out_.get(place, 0) + n
        for name, largest in other.magnitude_.items():
            self.magnitude_[name] = np.maximum(self.magnitude_.get(name, largest), largest)
        for name, counts in other.held_.items():
            self.held_[name] = self.held_.get(name, 0) + counts
        return self

    def outlier_warnings(self) -> list[str]:
        """One line per channel where a single training value holds over `GLITCH_SHARE` of the channel's
        variance (with at least `GLITCH_MIN_VALUES` values): a glitch such as 1e20 then sets the channel's mean
        and std, and every normal value standardises to about the same number. And one per channel whose level is
        so far from zero beside its spread that float32 - how alignment holds a series' windows - keeps it only in
        steps over `RESOLUTION_SHARE` of its std (a counter near 1e7 that moves by 0.5: steps of 1): a series
        channel, or a tabular one with a `context` (its history is such a window; a tabular row itself is taken in
        float64 until it is standardised). `dmafn train` logs them."""
        lines = []
        for name, m in self.spec.modalities.items():
            if m.kind not in ("tabular", "timeseries", "audio") or m.context_of:   # a context view: its parent says it
                continue
            lines += self._resolution_warnings(name, m)
            moments = self.global_[name][self._views(m)[0]]
            if moments.n < GLITCH_MIN_VALUES:
                continue
            copies = m.steps if m.kind == "timeseries" else 1          # a period's value sits in up to `steps` windows
            columns = [m.column] if m.kind == "audio" else list(m.columns)
            for col, far, share in zip(columns, *moments.extreme_share()):
                if share * copies > GLITCH_SHARE:
                    lines.append(f"modality '{name}', column '{col}': one training value ({far:.4g}) holds "
                                 f"{min(share * copies, 1.0):.0%} of the column's variance over the training days - "
                                 "a glitch? It sets the column's mean and std, so normal values all standardise "
                                 "alike; drop or fix such rows at the source (or quarantine them upstream)")
        return lines

    def _resolution_warnings(self, name: str, m: ModalitySpec) -> list[str]:
        windowed = m.kind == "timeseries" or any(v.context_of == name for v in self.spec.modalities.values())
        if name not in self.magnitude_ or not windowed:
            return []
        views = [self.global_[name][v] for v in self._views(m)]
        spreads = np.min([np.sqrt(np.atleast_1d(v.m2) / max(v.n, 1)) for v in views], 0)   # 0: it never moved
        lines = []
        for col, largest, spread in zip(m.columns, self.magnitude_[name], spreads):
            step = float(np.spacing(np.float32(largest)))
            if np.isfinite(largest) and 0 < spread and step > RESOLUTION_SHARE * spread:
                held = "alignment holds its windows" if m.kind == "timeseries" else "alignment holds its context window"
                lines.append(f"modality '{name}', column '{col}': values up to {largest:.4g} that move by "
                             f"{spread:.3g} (std) - float32, in which {held}, keeps "
                             f"them only in steps of {step:.3g}; subtract the level at the source (a counter's "
                             "start, a fixed offset) or publish the increments")
        return lines

    def split(self, buckets: int, bucket_of: Callable[[str], int]) -> tuple["StatisticsFitter", list["StatisticsFitter"]]:
        """This fitter as the fleet's part (the moments over every row, the text templates, the relations' cross
        products) and `buckets` parts holding the per-entity state of the entities `bucket_of(key)` puts in each
        (moments, trends, relation sums and ranges). Merging them all back gives this fitter; a fleet's fit can
        then run with each bucket's entities in a different process (`totals`, `fleet_result`,
        `entity_statistics`)."""
        fleet, parts = StatisticsFitter(self.spec), [StatisticsFitter(self.spec) for _ in range(buckets)]
        fleet.global_, fleet.templates_, fleet.left_out_ = self.global_, self.templates_, self.left_out_
        fleet.magnitude_, fleet.held_ = self.magnitude_, self.held_
        bucket: dict[str, int] = {}

        def part(key: str) -> "StatisticsFitter":
            if key not in bucket:
                bucket[key] = bucket_of(key)
            return parts[bucket[key]]

        for name, views in self.entity_.items():
            for view, per_entity in views.items():
                for key, moments in per_entity.items():
                    part(key).entity_[name][view][key] = moments
        for name, trends in self.trend_.items():
            for key, trend in trends.items():
                part(key).trend_[name][key] = trend
        for kind in ("relations_", "cross_relations_"):
            for ctx, fit in getattr(self, kind).items():
                if fit.quantities is not None:
                    for p in (fleet, *parts):
                        held = getattr(p, kind)[ctx]
                        held.quantities = _Regression(fit.quantities.d, target=False)
                        held.width, held.peers = fit.width, fit.peers
                    getattr(fleet, kind)[ctx].quantities.moments.merge(fit.quantities.moments)   # a copy
                    for key, sums in fit.quantities.entities.items():
                        getattr(part(key), kind)[ctx].quantities.entities[key] = sums
                for key, r in fit.ranges.items():
                    getattr(part(key), kind)[ctx].ranges[key] = r
        return fleet, parts

    def totals(self) -> "StatisticsTotals":
        """What the fleet's statistics need from this fitter's per-entity state (`StatisticsTotals`)."""
        totals = StatisticsTotals()
        for name, trends in self.trend_.items():
            totals.drifts[name] = [d for d in (t.drift() for t in trends.values()) if d is not None]
        for kind in ("relations_", "cross_relations_"):
            for ctx, fit in getattr(self, kind).items():
                if fit.quantities is not None:
                    totals.relations[(kind, ctx)] = _EntityTotals.of(fit.quantities)
                totals.ranges[(kind, ctx)] = range_total(fit.ranges)
        return totals

    def fleet_result(self, totals: "StatisticsTotals", transforms: dict[str, list[str]] | None = None) -> dict[str, Any]:
        """The fleet's part of the statistics (every per-entity mapping empty, as `split_entity_statistics` gives)
        from this fitter's fleet-wide state and every entity's `totals`; `transforms[m]`: the per-channel choice
        for an 'auto' modality made elsewhere (e.g. across a fleet) instead of from these rows."""
        stats: dict[str, Any] = {"modalities": {}}
        for name, m in self.spec.modalities.items():
            entry: dict[str, Any] = {"kind": m.kind}
            if m.kind == "timeseries":
                entry["transform"] = m.transform
            if m.kind in ("tabular", "timeseries", "audio"):
                views = self._views(m)
                if self.global_[name][views[0]].n == 0:
                    counts = self.held_.get(name, np.zeros(len(m.columns) + 1, np.int64))
                    dead = tuple(c for c, n in zip(m.columns, counts[1:]) if n == 0) if counts[0] else ()
                    raise NoUsableRows(name, dead, int(counts[0]))
                if name in self.trend_:
                    chosen, drift = auto_transforms(totals.drifts.get(name, []))
                    if transforms and name in transforms:
                        chosen = list(transforms[name])
                        if len(chosen) != len(m.columns) or set(chosen) - set(AUTO_CANDIDATES):
                            raise ValueError(f"modality '{name}': {chosen} is not one of "
                                             f"{'/'.join(AUTO_CANDIDATES)} per column of {list(m.columns)}")
                    if not chosen:
                        chosen, drift = ["level"] * len(m.columns), [0.0] * len(m.columns)
                    entry.update(channel_transforms=chosen, drift=drift, drift_limit=DRIFT_LIMIT)
                    entry["global"] = _pick_channels({v: self.global_[name][v].result() for v in views}, chosen)
                else:
                    entry["global"] = self.global_[name][views[0]].result()
                if SPREAD in self.global_[name]:
                    entry[SPREAD] = self.global_[name][SPREAD].result()
                entry["entity"] = {}
            if m.kind == "text":
                entry["vocabulary"] = TextVocabulary.fit(self.templates_[name]).to_dict()
            stats["modalities"][name] = entry
        stats["normalization"] = self.spec.model.normalization
        relations = {}
        def fitted(fit: _RelationFit, totals_of: _EntityTotals | None,
                   peers_only: bool = False) -> list[dict[str, Any] | None]:
            """Each channel's relation, one channel at a time (none without rows)."""
            if totals_of is None or fit.quantities is None:
                return []
            return [fit_relation(fit.channel(c, peers_only), totals_of.channel(fit.design(c, peers_only), c))
                    for c in range(fit.width)]

        for ctx, parent in relation_pairs(self.spec).items():
            width = len(self.spec.modalities[parent].columns)
            channels = fitted(self.relations_[ctx], totals.relations.get(("relations_", ctx)))   # none: no rows
            cross = fitted(self.cross_relations_[ctx], totals.relations.get(("cross_relations_", ctx))) \
                if ctx in self.cross_relations_ else []
            if any(ch is not None for ch in channels) or any(ch is not None for ch in cross):
                # the context then speaks only through the relations: as a model input its hour of history kept
                # every reconstruction disturbed for the hour after an event, and let the model copy a drift. A
                # one-channel parent's relation reads only its peers' current values, none of the hour: its context
                # stays a model input
                relations[ctx] = {"parent": parent, "channels": channels or [None] * width, "model_input": width < 2,
                                  "ranges": fit_ranges(totals.ranges.get(("relations_", ctx)))}
                if self.spec.model.relation_smoothing < 1.0:        # versions before 2026-12-06: no such key
                    relations[ctx]["smoothing"] = self.spec.model.relation_smoothing
                if ("relations_", ctx) in self.left_out_:           # a refit: the ticks it left out
                    relations[ctx]["left_out"] = self.left_out_[("relations_", ctx)]
                if (conditional := conditional_fit(self.relations_[ctx],
                                                   totals.relations.get(("relations_", ctx)))) is not None:
                    relations[ctx]["conditional"] = conditional   # versions before 2026-12-06: none
                if any(ch is not None for ch in cross):
                    relations[ctx].update(peers=relation_peers(self.spec, parent), cross_channels=cross,
                                          cross_ranges=fit_ranges(totals.ranges.get(("cross_relations_", ctx))),
                                          peer_spread=self.spec.model.window_spread)
                    if width >= 2:      # each channel from the peers alone: while another channel is dead
                        relations[ctx]["peer_channels"] = fitted(
                            self.cross_relations_[ctx], totals.relations.get(("cross_relations_", ctx)), True)
                    if (conditional := conditional_fit(self.cross_relations_[ctx],
                                                       totals.relations.get(("cross_relations_", ctx)))) is not None:
                        relations[ctx]["cross_conditional"] = conditional   # the siblings there and the peers
                    if ("cross_relations_", ctx) in self.left_out_:
                        relations[ctx]["cross_left_out"] = self.left_out_[("cross_relations_", ctx)]
                    if history := peer_contexts(self.spec, parent):
                        relations[ctx]["peer_history"] = history
        if relations:
            stats["relations"] = relations
        if self.spec.model.state_speed_us and self.spec.model.state_baseline:   # versions before 2026-12-07: none
            stats["state_speed"] = 1.0 - math.exp(-self.spec.grain_us / self.spec.model.state_speed_us)
        return stats

    def entity_statistics(self, fleet: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """This fitter's entities' parts, per entity key by place (as `split_entity_statistics` gives them), under
        the fleet's part `fleet` (`fleet_result`: the chosen transforms, the relations' weights)."""
        def moments(name: str, entry: dict[str, Any]) -> dict[str, Any]:
            views = self._views(self.spec.modalities[name])
            if "channel_transforms" in entry:
                out = {key: _pick_channels({v: self.entity_[name][v][key].result() for v in views},
                                           entry["channel_transforms"]) for key in self.entity_[name][views[0]]}
            else:
                out = {key: m.result() for key, m in self.entity_[name][views[0]].items()}
            if SPREAD in entry:                   # each entity's window spread moments beside its level's
                for key, spread in self.entity_[name][SPREAD].items():
                    out[key][SPREAD] = spread.result()
            return out

        def channels(fit: _RelationFit, fitted: list[dict[str, Any] | None],
                     peers_only: bool = False) -> list[dict[str, Any] | None]:
            held = fit.quantities is not None                    # else no entity of this part had the relation's rows
            return [None if f is None else {**f, "entity_intercepts": entity_intercepts(fit.channel(c, peers_only), f)
                                            if held else {}} for c, f in enumerate(fitted)]

        def ranges(fit: _RelationFit, fitted: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if fitted is None else {**fitted, "entities": _entity_ranges(fit.ranges)}

        modalities = {name: {**entry, "entity": moments(name, entry)} if "entity" in entry else entry
                      for name, entry in fleet["modalities"].items()}
        relations = {}
        for ctx, fitted in fleet.get("relations", {}).items():
            own = self.relations_[ctx]
            relations[ctx] = {**fitted, "channels": channels(own, fitted["channels"]),
                              "ranges": ranges(own, fitted["ranges"])}
            if fitted.get("conditional"):
                relations[ctx]["conditional"] = {**fitted["conditional"], "entity_means": entity_means(own)}
            if fitted.get("cross_channels") is not None:
                cross = self.cross_relations_[ctx]
                relations[ctx].update(cross_channels=channels(cross, fitted["cross_channels"]),
                                      cross_ranges=ranges(cross, fitted.get("cross_ranges")))
                if fitted.get("peer_channels") is not None:
                    relations[ctx]["peer_channels"] = channels(cross, fitted["peer_channels"], True)
                if fitted.get("cross_conditional"):
                    relations[ctx]["cross_conditional"] = {**fitted["cross_conditional"],
                                                           "entity_means": entity_means(cross)}
        stats = {**fleet, "modalities": modalities, **({"relations": relations} if relations else {})}
        return split_entity_statistics(stats)[1]

    def result(self, transforms: dict[str, list[str]] | None = None) -> dict[str, Any]:
        """The statistics, every entity's parts included; `transforms` as in `fleet_result`."""
        fleet = self.fleet_result(self.totals(), transforms)
        return join_entity_statistics(fleet, self.entity_statistics(fleet).items())


class StatisticsTotals:
    """What the fleet's part of the statistics needs from the per-entity state (`StatisticsFitter.totals`): each
    'auto' modality's entity drifts, each relation's entity totals of its quantities (`_EntityTotals.of`,
    each channel's taken from them) and each relation's range over its entities. Totals of disjoint entities (one
    per entity bucket) merge into the fleet's."""

    def __init__(self) -> None:
        self.drifts: dict[str, list[np.ndarray]] = {}
        self.relations: dict[tuple[str, str], _EntityTotals] = {}
        self.ranges: dict[tuple[str, str], _Range | None] = {}

    def merge(self, other: "StatisticsTotals") -> "StatisticsTotals":
        for name, drifts in other.drifts.items():
            self.drifts.setdefault(name, []).extend(drifts)
        for place, theirs in other.relations.items():
            if place not in self.relations:                     # a copy: merging on must not change `other`
                self.relations[place] = _EntityTotals(len(theirs.sx))
                self.relations[place].between = _Comoments(len(theirs.sx))
            self.relations[place].merge(theirs)
        for place, theirs in other.ranges.items():
            mine = self.ranges.get(place)
            if theirs is not None:
                self.ranges[place] = _Range(len(theirs.lo)).merge(theirs) if mine is None else mine.merge(theirs)
        return self


def _pick_channels(by_view: dict[str, dict], chosen: list[str]) -> dict[str, Any]:
    """Moments per channel from the presentation chosen for that channel."""
    first = next(iter(by_view.values()))
    return {"mean": [by_view[v]["mean"][j] for j, v in enumerate(chosen)],
            "std": [by_view[v]["std"][j] for j, v in enumerate(chosen)], "count": first["count"]}


def _per_channel(values: np.ndarray, m: ModalitySpec) -> np.ndarray:
    if m.kind == "audio":
        return values.reshape(-1)
    return values  # tabular (N, C); timeseries (N, L, C) -> moments over N and L


# ------------------------------------------------------------------ featurization
def channel_presence(aligned: pa.Table, m: ModalitySpec) -> np.ndarray:
    """(N, C) bool: which of a tabular or series modality's channels hold a value at each tick. `align` keeps a
    modality present while any channel does: a dead channel (a historian's tag gone null) leaves the others in use."""
    return np.stack([np.asarray(pc.is_valid(aligned.column(f"{m.name}__{c}")).to_numpy(zero_copy_only=False), bool)
                     for c in m.columns], 1).reshape(aligned.num_rows, len(m.columns))


def raw_values(aligned: pa.Table, m: ModalitySpec, transform: str | list[str] | None = None) -> np.ndarray:
    """Tabular (N, C) float64 (as alignment gives a row's values: a level far from zero keeps its steps until it is
    standardised), held within float32's range (beyond it: its largest value, see Z_LIMIT); timeseries (N, L, C)
    float32, presented by `transform` (default the spec's; one per channel for a fitted 'auto'); audio (N, S)
    float32. Absent rows are zeros."""
    n = aligned.num_rows
    if m.kind == "tabular":
        cols = [aligned.column(f"{m.name}__{c}").to_numpy(zero_copy_only=False) for c in m.columns]
        values = np.nan_to_num(np.stack([np.asarray(c, np.float64) for c in cols], 1), nan=0.0,
                               posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)
        return np.clip(values, -FLOAT32_MAX, FLOAT32_MAX)
    if m.kind == "timeseries":
        out = np.zeros((n, m.steps, len(m.columns)), np.float32)
        for j, c in enumerate(m.columns):
            out[:, :, j] = _fixed_lists(aligned.column(f"{m.name}__{c}"), m.steps)
        return transform_window(out, m.transform if transform is None else transform)
    if m.kind == "audio":
        return _fixed_lists(aligned.column(f"{m.name}__{m.column}"), m.samples)
    raise ValueError(f"raw_values does not handle kind {m.kind}")


def transform_window(windows: np.ndarray, transform: str | list[str] | tuple[str, ...]) -> np.ndarray:
    """How a series window (N, L, C) is presented to the model; a list gives one transform per channel.

    level: the values as they are. centered: each window minus its own mean per channel - the shape
    within the window, free of slow drift that training days cannot cover (temperatures warming up).
    difference: step-to-step changes (the first step is 0) - the rate of change, also drift-free.
    ('auto' is resolved per channel by the statistics: `auto_transforms`.)
    """
    if not isinstance(transform, str):
        if len(transform) != windows.shape[-1]:
            raise ValueError(f"{len(transform)} channel transforms for {windows.shape[-1]} channels")
        out = windows.copy()
        for name in set(transform):
            channels = np.asarray([t == name for t in transform])
            out[..., channels] = transform_window(windows[..., channels], name)
        return out
    if transform == "level":
        return windows
    if transform == "centered":
        return windows - windows.mean(1, keepdims=True)
    if transform == "difference":
        return np.diff(windows, axis=1, prepend=windows[:, :1])
    if transform == "auto":
        raise ValueError("series transform 'auto' is chosen per channel by the training statistics: pass their "
                         "'channel_transforms'")
    raise ValueError(f"unknown series transform {transform!r} ({', '.join(WINDOW_TRANSFORMS)})")


def _fixed_lists(column: pa.ChunkedArray, length: int) -> np.ndarray:
    """A list<float> column -> (N, length), right-aligned: nulls as zeros, longer lists keep their last
    `length` values, shorter ones are zero-padded on the left."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    out = np.zeros((len(lists), length), np.float32)
    if len(lists) == 0:
        return out
    sizes = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = np.nan_to_num(np.asarray(pc.list_flatten(lists).to_numpy(zero_copy_only=False), np.float32))
    ends = np.cumsum(sizes)                                   # flat index after each row's last value
    step = np.arange(length)
    keep = step[None, :] >= (length - np.minimum(sizes, length))[:, None]          # (N, length)
    source = ends[:, None] - length + step[None, :]
    out[keep] = flat[source[keep]]
    return out


def group_rows(keys: Iterable[str]) -> list[tuple[str, np.ndarray]]:
    """(key, row indices) for each distinct key, in one sort (O(n log n), not a scan per key)."""
    # an array is converted as it is (no Python string per row: a text array of 10M keys stays as it is)
    keys = np.asarray(keys if isinstance(keys, np.ndarray) else list(keys), dtype=str)
    if keys.size == 0:
        return []
    uniq, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    return [(str(key), order[bounds[i]:bounds[i + 1]]) for i, key in enumerate(uniq)]


FLOAT32_MAX = float(np.finfo(np.float32).max)
Z_LIMIT = 1e4   # standardised inputs and relation residuals are held within +-Z_LIMIT standard deviations: a
                # reading far beyond it (a glitch of 1e20) still scores as extreme, where squaring it in float32
                # would give inf and NaN, a score of NaN and no alarm


def _normalise(values: np.ndarray, stats: dict, keys: list[str], by_entity: bool) -> np.ndarray:
    """Values in their training mean and std (the entity's with `by_entity`), held within +-Z_LIMIT, float32; taken
    in the values' own precision (a tabular row's float64: a level near 1e7 that moves by 0.1 keeps its steps)."""
    dtype = np.float64 if values.dtype == np.float64 else np.float32
    mean = np.asarray(stats["global"]["mean"], dtype)
    std = np.asarray(stats["global"]["std"], dtype)
    with np.errstate(over="ignore"):                       # a value near float32's limit: inf, then clipped
        if not by_entity or not stats.get("entity"):
            return np.clip((values - mean) / std, -Z_LIMIT, Z_LIMIT).astype(np.float32)
        out = np.empty_like(values)
        for key, rows in group_rows(keys):
            ent = stats["entity"].get(key, stats["global"])     # unseen entity: global fallback
            out[rows] = (values[rows] - np.asarray(ent["mean"], dtype)) / np.asarray(ent["std"], dtype)
    return np.clip(out, -Z_LIMIT, Z_LIMIT).astype(np.float32)


_DEEP_GREY = ("I;16", "I;16B", "I;16L", "I")     # Pillow's modes of a 16-bit grey PNG or TIFF (0..65535)


def decode_pixels(data: bytes | None, m: ModalitySpec) -> np.ndarray | None:
    """Image bytes (PNG, JPEG, TIFF, BMP, GIF, WebP: what Pillow decodes) -> (channels, H, W) uint8, resized to the
    modality's size; None when the bytes cannot be decoded. A 16-bit grey frame (PNG or TIFF) is scaled to 8 bits
    (Pillow's own conversion clips it at 255: nearly white)."""
    from PIL import Image

    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        if img.mode in _DEEP_GREY:      # 16-bit grey (machine-vision cameras): scaled to 8 bits, not clipped at 255
            img = Image.fromarray((np.asarray(img, np.float64) / 257.0).round().clip(0, 255).astype(np.uint8), "L")
        img = img.convert("L" if m.channels == 1 else "RGB").resize((m.size[1], m.size[0]), Image.BILINEAR)
    except Exception:  # noqa: BLE001 - any decoder failure means "not usable"
        return None
    arr = np.asarray(img, np.uint8)
    return arr[None] if m.channels == 1 else arr.transpose(2, 0, 1)


GREY_FRAME = " grey"     # after a frame's size (`frame_size`): it holds no colour
COLOUR_FRAME = " colour"   # after a frame's size as a grey modality counts it (`ingest.frame_formats`): it holds colour
_GREY_MODES = ("1", "L", "LA", "F", *_DEEP_GREY)    # Pillow's modes of a frame without colour


def frame_size(data: bytes | None) -> str | None:
    """An image's stored size as '<width>x<height>', followed by `GREY_FRAME` for a frame without colour (its header
    read by Pillow, the pixels not decoded); None when the bytes are no image Pillow opens. A camera replaced or
    reconfigured shows as a size its version never trained on: each frame is resized to the modality's `size` all
    the same (`decode_pixels`) - and a grey frame fed to a colour modality has its one channel copied to three."""
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return f"{img.size[0]}x{img.size[1]}" + (GREY_FRAME if img.mode in _GREY_MODES else "")
    except Exception:  # noqa: BLE001 - any decoder failure: no size
        return None


def decode_image(data: bytes | None, m: ModalitySpec) -> np.ndarray | None:
    """Image bytes (see `decode_pixels`) -> (channels, H, W) float32 in [0, 1]; None when they cannot be decoded."""
    pixels = decode_pixels(data, m)
    return None if pixels is None else pixels.astype(np.float32) / 255.0


_WAV_PCM, _WAV_FLOAT, _WAV_EXTENSIBLE = 1, 3, 0xFFFE


def _wav_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """A RIFF/WAVE file's chunks after its 12-byte header: (id, payload)."""
    at = 12
    while at + 8 <= len(data):                                   # chunks: id, size (little-endian), payload
        chunk, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        yield chunk, data[at + 8:at + 8 + size]
        at += 8 + size + size % 2                                # chunks are padded to an even size


def _wav_fmt(body: bytes) -> tuple[int, int, int, int]:
    """A WAV `fmt ` chunk's sample format code (an extensible one's sub-format), channels, rate and bits."""
    fmt = (int.from_bytes(body[0:2], "little"), int.from_bytes(body[2:4], "little"),
           int.from_bytes(body[4:8], "little"), int.from_bytes(body[14:16], "little"))
    if fmt[0] == _WAV_EXTENSIBLE and len(body) >= 26:            # the sub-format's first two bytes say PCM or float
        fmt = (int.from_bytes(body[24:26], "little"), *fmt[1:])
    return fmt


def wav_format(data: bytes | None) -> str | None:
    """A WAV clip's stored sample rate as '<rate> Hz' (its `fmt ` chunk read, no sample decoded); None for bytes that
    are no RIFF/WAVE file with one. A microphone replaced or reconfigured shows as a rate its version never trained
    on: each clip is resampled to the modality's `sample_rate` all the same (`decode_wav`)."""
    if not data or len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    return next((f"{_wav_fmt(body)[2]} Hz" for chunk, body in _wav_chunks(data)
                 if chunk == b"fmt " and len(body) >= 16), None)


def decode_wav(data: bytes | None, sample_rate: int) -> np.ndarray | None:
    """WAV bytes (a RIFF/WAVE file: PCM of 8, 16, 24 or 32 bits, or 32/64-bit float; any number of channels,
    averaged) -> float32 samples in [-1, 1] at `sample_rate` (the modality's; another rate is resampled by linear
    interpolation); None when the bytes are no such file (truncated, another format, no sample)."""
    if not data or len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    fmt, samples = None, None
    for chunk, body in _wav_chunks(data):
        if chunk == b"fmt " and len(body) >= 16:
            fmt = _wav_fmt(body)
        elif chunk == b"data":
            samples = body
    if fmt is None or samples is None:
        return None
    code, channels, rate, bits = fmt
    width = bits // 8
    if channels < 1 or rate < 1 or width < 1 or len(samples) < width * channels:
        return None
    samples = samples[:len(samples) // (width * channels) * width * channels]
    if code == _WAV_FLOAT and bits in (32, 64):
        values = np.frombuffer(samples, "<f4" if bits == 32 else "<f8").astype(np.float64)
    elif code == _WAV_PCM and bits == 8:                         # unsigned, centred on 128
        values = (np.frombuffer(samples, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif code == _WAV_PCM and bits in (16, 24, 32):
        if bits == 24:                                           # three bytes each: widened to 32 bits
            raw = np.frombuffer(samples, np.uint8).reshape(-1, 3)
            values = (raw[:, 0].astype(np.int32) | raw[:, 1].astype(np.int32) << 8
                      | raw[:, 2].astype(np.int8).astype(np.int32) << 16).astype(np.float64)
        else:
            values = np.frombuffer(samples, "<i2" if bits == 16 else "<i4").astype(np.float64)
        values /= float(2 ** (bits - 1))
    else:
        return None
    mono = values.reshape(-1, channels).mean(axis=1)
    if rate != sample_rate and len(mono) > 1:
        at_rate = np.arange(int(round(len(mono) * sample_rate / rate))) * (rate / sample_rate)
        mono = np.interp(at_rate, np.arange(len(mono)), mono)
    return mono.astype(np.float32) if len(mono) else None


def hash_token(token: str) -> int:
    return 2 + zlib.crc32(token.encode()) % (TEXT_VOCAB - 2)


MESSAGE_CHARS = 4096     # a log line's first characters that its tokens and template are read from


def message_text(message: str) -> str:
    """A log line as its tokens and template read it: its first `MESSAGE_CHARS` characters. A megabyte line (a dump,
    a payload logged whole) sits in every window that reaches it: read whole, it took minutes to score a day and
    its template a megabyte of the vocabulary."""
    text = str(message)
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS]


def tokenize_messages(messages: list[str] | None, max_tokens: int = TEXT_TOKENS) -> np.ndarray:
    """Messages (oldest first) -> the latest `max_tokens` hashed token ids, separator between messages (each message
    read as `message_text`). Read from the newest message back until `max_tokens` are there, each message's ids
    hashed once however many windows hold it (`_message_ids`)."""
    parts: list[np.ndarray] = []
    held = 0
    for msg in reversed(messages or []):
        parts.append(_message_ids(message_text(msg)))
        held += len(parts[-1])
        if held >= max_tokens:
            break
    tail = np.concatenate(parts[::-1])[-max_tokens:] if parts else np.zeros(0, np.int16)
    out = np.zeros(max_tokens, np.int64)
    out[max_tokens - len(tail):] = tail
    return out


@functools.lru_cache(maxsize=1 << 12)    # a line sits in every window that reaches it: hash it once
def _message_ids(text: str) -> np.ndarray:
    """A message's hashed token ids and the separator after it (int16: ids are under `TEXT_VOCAB`; read-only)."""
    ids = np.array([hash_token(t) for t in _TOKEN.findall(text.lower())] + [1], np.int16)
    ids.flags.writeable = False
    return ids


_WORD = re.compile(r"\S+")
_LETTERS = re.compile(r"[a-z]+")
VOCABULARY_CAP = 50_000       # most frequent templates / tokens kept in a model version's text vocabulary
NOVEL_LINE_CHARS = 120        # characters of an unseen line's template that `channel_<m>` of a text modality keeps


def prune_counts(counts: dict[str, int], cap: int = VOCABULARY_CAP) -> dict[str, int]:
    """Bound partial template counts (a shard's, or a merge of them): past 4 x cap distinct keys, keep the
    2 x cap most frequent. Memory stays bounded however many distinct lines the logs hold; a template rarer
    than the kept ones may be lost, which only makes the vocabulary stricter."""
    if len(counts) <= 4 * cap:
        return counts
    kept = sorted(counts, key=lambda t: (-counts[t], t))[:2 * cap]
    return {t: counts[t] for t in kept}


def line_template(message: str) -> str:
    """A log line's template (Drain-style masking) of its `message_text`: lower case, every word holding a digit
    (numbers, ids, hex, addresses, values with units) replaced by `<*>`."""
    return _template(message_text(message))


@functools.lru_cache(maxsize=1 << 16)      # a line sits in every window that reaches it: template it once
def _template(text: str) -> str:
    return " ".join("<*>" if any(c.isdigit() for c in w) else w for w in _WORD.findall(text.lower()))


def template_words(template: str) -> list[str]:
    """The letter tokens of a template (its masked words left out)."""
    return [t for w in template.split() if w != "<*>" for t in _LETTERS.findall(w)]


class TextVocabulary:
    """Templates and tokens seen in the training days (`fit` merges partial counts), and per log window the
    count of lines whose template was never seen and of tokens never seen: novelty the hashed-token encoder
    cannot be relied on to notice."""

    def __init__(self, templates: Iterable[str] = (), tokens: Iterable[str] = ()):
        self.templates, self.tokens = frozenset(templates), frozenset(tokens)

    @staticmethod
    def count(messages: Iterable[str], counts: dict[str, int] | None = None) -> dict[str, int]:
        """Template counts of `messages`, added to `counts` (partial counts merge by addition)."""
        counts = {} if counts is None else counts
        for msg in messages:
            t = line_template(msg)
            counts[t] = counts.get(t, 0) + 1
        return counts

    @classmethod
    def fit(cls, template_counts: dict[str, int], cap: int = VOCABULARY_CAP) -> "TextVocabulary":
        kept = sorted(template_counts, key=lambda t: (-template_counts[t], t))[:cap]
        tokens: dict[str, int] = {}
        for t in kept:
            for w in template_words(t):
                tokens[w] = tokens.get(w, 0) + template_counts[t]
        return cls(kept, sorted(tokens, key=lambda w: (-tokens[w], w))[:cap])

    def window_novelty(self, messages: Iterable[str] | None) -> tuple[int, int, str | None]:
        """In one window (messages oldest first), in one pass over its lines: the lines with an unseen template, the
        tokens never seen, and the template of the latest line whose template the training days never held (its first
        `NOVEL_LINE_CHARS` characters; None where every line's template was seen)."""
        lines = words = 0
        latest = None
        for msg in messages or ():
            t = line_template(msg)
            if t not in self.templates:
                lines += 1
                words += sum(w not in self.tokens for w in template_words(t))
                latest = t
        return lines, words, None if latest is None else latest[:NOVEL_LINE_CHARS]

    def novelty(self, messages: Iterable[str] | None) -> tuple[int, int]:
        """(lines with an unseen template, tokens never seen) in one window (`window_novelty`)."""
        return self.window_novelty(messages)[:2]

    def to_dict(self) -> dict[str, list[str]]:
        return {"templates": sorted(self.templates), "tokens": sorted(self.tokens)}

    @classmethod
    def from_stats(cls, entry: dict[str, Any]) -> "TextVocabulary | None":
        """The vocabulary saved in a modality's statistics (None for versions fitted without one); cached."""
        vocab = entry.get("vocabulary")
        if vocab is None:
            return None
        key = id(vocab)
        cached = _VOCABULARIES.get(key)
        if cached is None or cached[0] is not vocab:
            cached = _VOCABULARIES[key] = (vocab, cls(vocab["templates"], vocab["tokens"]))
            if len(_VOCABULARIES) > 16:
                _VOCABULARIES.pop(next(iter(_VOCABULARIES)))
        return cached[1]


_VOCABULARIES: dict[int, tuple[dict, TextVocabulary]] = {}


@dataclass
class Features:
    """Model inputs for N ticks: `inputs[m]` per modality and `mask` (N, M), True = present."""

    inputs: dict[str, np.ndarray]
    mask: np.ndarray
    modalities: tuple[str, ...]
    relation_errors: np.ndarray | None = None   # (N, M): added to a parent modality's error (`squared_residuals`)
    state: np.ndarray | None = None             # (N, S) the operating state (`operating_state`), NaN where absent
    state_owners: tuple[str, ...] = ()          # the modality each state column comes from
    channels: dict[str, np.ndarray] = field(default_factory=dict)   # m -> (N, C) the tabular or series channels
                                                # holding a value (a missing one is 0 in `inputs`, out of the error)
    relation_channels: dict[str, np.ndarray] = field(default_factory=dict)   # parent m -> (N, C) each channel's
                                                # part of `relation_errors` (`squared_residuals` before the sum)
    taken: dict[str, np.ndarray] = field(default_factory=dict)   # m -> (N,) int64: when the row a tabular, image or
                                                # audio modality's payload came from was taken (-1 where absent)
    groups: np.ndarray | None = None            # (N,) each tick's entity and date (`smoothing_groups`), where
                                                # `featurize` needed them (`taken`, or relations that smooth)
    novel_lines: dict[str, np.ndarray] = field(default_factory=dict)   # text m with a vocabulary -> (N,) object: the
                                                # template of its window's latest line unseen in training (None: none)

    def rows(self, idx) -> "Features":
        """The same features for a subset of the ticks."""
        return Features({m: self.inputs[m][idx] for m in self.modalities}, self.mask[idx], self.modalities,
                        None if self.relation_errors is None else self.relation_errors[idx],
                        None if self.state is None else self.state[idx], self.state_owners,
                        {m: c[idx] for m, c in self.channels.items()},
                        {m: r[idx] for m, r in self.relation_channels.items()},
                        {m: t[idx] for m, t in self.taken.items()},
                        None if self.groups is None else self.groups[idx],
                        {m: t[idx] for m, t in self.novel_lines.items()})


def featurize(aligned: pa.Table, spec: Spec, stats: dict[str, Any],
              decoded: dict[str, dict[bytes, np.ndarray | None]] | None = None,
              carry: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None,
              absent: Collection[str] = ()) -> Features:
    """Aligned rows -> normalised model inputs. Absent modalities are zeros with mask False; a tabular or series
    modality missing some of its channels is present, those channels 0 (their training mean) and False in
    `channels` (the model leaves them out of its error; relations and the operating state read it as absent).

    `decoded[m]`: frames of image modality m already decoded (`decode_pixels`, keyed by their bytes, None
    for bytes that do not decode), e.g. by the ingest check of the same shard; the others are decoded here.
    `carry`: for relations fitted with `model.relation_smoothing`, each context's smoothing state per entity and
    date (`smooth_residuals`), read and updated - given the same dict for the consecutive batches of one shard
    (rows sorted by entity and time), its ticks smooth as if aligned at once; without it each call starts afresh.
    `absent`: modalities read as having no row at any tick - out of the mask, the others' cross-modal relations and
    the operating state, as where their rows are missing (`dmafn.scoring.occlusion_contributions`' views)."""
    n = aligned.num_rows
    keys = entity_key(aligned, spec.entity)
    by_entity = stats.get("normalization") == "entity"
    inputs, masks, levels = {}, [], {}           # levels: tabular and series values as they are (relations)
    presence = {}                                 # what each modality really has (the mask hides relation-only ones;
    channels = {}                                 # a tabular or series one: every channel)
    held_by = {}                                  # a tabular or series one: which channels (N, C)
    taken = {}                                    # a tabular, image or audio one: when its row was taken (N,)
    novel_lines = {}                              # a text one with a vocabulary: its window's latest unseen template
    relation_only = {ctx for ctx, fitted in stats.get("relations", {}).items() if not fitted.get("model_input", True)}
    for name, m in spec.modalities.items():
        present = np.asarray(aligned.column(f"{name}__present").fill_null(False).to_numpy(zero_copy_only=False), bool)
        if name in absent:
            present = np.zeros(n, bool)
        if m.kind in ("tabular", "timeseries"):
            fitted = stats["modalities"][name]
            _check_transform(m, fitted)
            levels[name] = raw_values(aligned, m, "level")
            held = channel_presence(aligned, m) & present[:, None]                      # (N, C)
            complete = present & held.all(1)       # every channel: what relations and the state read
            held_by[name] = held
            if name in relation_only:             # a context absent to the model: its values feed the relations only
                x = np.zeros_like(levels[name], dtype=np.float32)
            else:
                shown = levels[name] if m.kind == "tabular" else \
                    transform_window(levels[name], fitted.get("channel_transforms") or m.transform)
                x = _normalise(shown, fitted, keys, by_entity)
                channels[name] = held
                if not complete[present].all():    # a missing channel at its training mean (0)
                    x = np.where(held if m.kind == "tabular" else held[:, None, :], x, 0).astype(np.float32)
        elif m.kind == "audio":
            x = _normalise(raw_values(aligned, m), stats["modalities"][name], keys, False)
        elif m.kind == "image":
            x = np.zeros((n, m.channels, *m.size), np.float32)
            frames = {} if decoded is None else decoded.setdefault(name, {})   # a frame is the latest for many ticks
            for i, data in enumerate(aligned.column(f"{name}__{m.column}").to_pylist()):
                if not present[i]:
                    continue
                if data not in frames:
                    frames[data] = decode_pixels(data, m)
                img = frames[data]
                if img is None:
                    present[i] = False
                else:
                    x[i] = img
            x /= 255.0
        else:
            # token ids (N, TEXT_TOKENS), then with a vocabulary the window's novelty (unseen-template lines,
            # unseen tokens) as two more columns: (N, TEXT_TOKENS + 2)
            vocab = TextVocabulary.from_stats(stats["modalities"].get(name, {}))
            width = TEXT_TOKENS + (2 if vocab is not None else 0)
            tokenized: dict[tuple, tuple] = {}                       # a window's messages repeat tick to tick
            rows, lines = [], []
            for msgs in aligned.column(f"{name}__{m.column}").to_pylist():
                key = tuple(msgs or ())
                if key not in tokenized:
                    ids = tokenize_messages(msgs)
                    if vocab is None:
                        tokenized[key] = (ids, None)
                    else:
                        unseen_lines, unseen_words, latest = vocab.window_novelty(msgs)
                        tokenized[key] = (np.concatenate([ids, [unseen_lines, unseen_words]]), latest)
                rows.append(tokenized[key][0])
                lines.append(tokenized[key][1])
            x = np.stack(rows) if n else np.zeros((0, width), np.int64)
            if vocab is not None:
                novel_lines[name] = np.where(present, np.array(lines, dtype=object), None)
        x = np.where(present.reshape(-1, *([1] * (x.ndim - 1))), x, 0).astype(x.dtype)
        inputs[name] = x
        if f"{name}__taken" in aligned.column_names and name not in relation_only:   # an as-of payload: its row's time
            when = aligned.column(f"{name}__taken").cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
            taken[name] = np.where(present, when, -1).astype(np.int64)
        presence[name] = complete if m.kind in ("tabular", "timeseries") else present
        masks.append(np.zeros(n, bool) if name in relation_only else present)
    mask = np.stack(masks, 1) if masks else np.zeros((n, 0), bool)
    names = tuple(spec.modalities)
    relations, relation_channels = None, {}
    smoothed = any(fitted.get("smoothing") for fitted in stats.get("relations", {}).values())
    groups, rank = (smoothing_groups(aligned, keys) if smoothed or taken or stats.get("state_speed")
                    else (None, None))                                                     # once for them all
    for ctx, fitted in stats.get("relations", {}).items():
        parent = fitted["parent"]
        if ctx not in spec.modalities or parent not in spec.modalities:
            continue
        if relations is None:
            relations = np.zeros((n, len(names)), np.float32)
        both = presence[ctx] & presence[parent]
        peers = peers_present = None
        history = fitted.get("peer_history", [])            # versions before 2026-12-03: current values only
        if fitted.get("cross_channels") and all(p in levels for p in [*fitted["peers"], *history]):
            peers, peers_present = peer_values(levels, presence, spec, fitted["peers"], history,
                                               fitted.get("peer_spread", False))   # before 2026-12-03: means only
        # a channel of the parent missing (a dead channel) with its peers there: each channel it has is scored by
        # its relation with the peers alone (`peer_channels`; versions before 2026-12-06 have none) - or, for a
        # parent of three channels or more, against its quantities still there and the peers' (`cross_conditional`:
        # a missing context window too), or where those are too many to keep, the quantities still there alone
        # (`conditional`, below: its siblings say more than the peers alone)
        across = fitted.get("cross_conditional") if peers is not None else None
        peers_alone = fitted.get("peer_channels") is not None and not fitted.get("conditional")
        dead = np.zeros(n, bool) if not (across or peers_alone) or peers is None else \
            held_by[parent].any(1) & ~(both if across else presence[parent]) & peers_present
        # else a channel or its context missing: each channel it has against whichever of the others' quantities
        # are there (`conditional_residuals`; versions before 2026-12-06 and parents of two channels have none)
        partial = held_by[parent].any(1) & ~both & ~dead if fitted.get("conditional") else np.zeros(n, bool)
        scored = both | dead | partial
        if scored.any():
            rows = np.flatnonzero(scored)
            current = current_values(levels[parent], spec.modalities[parent]).astype(np.float64)
            tick_keys = np.asarray(keys, object)
            z = np.full((len(rows), current.shape[1]), np.nan)
            whole = both[rows]
            if whole.any():
                z[whole] = tick_residuals(fitted, current[both], levels[ctx][both], list(tick_keys[both]),
                                          None if peers is None else peers[both],
                                          None if peers is None else peers_present[both])
            if dead.any() and across:
                z[dead[rows]] = _partial_residuals(fitted, current[dead], levels[ctx][dead], held_by[parent][dead],
                                                   held_by[ctx][dead], list(tick_keys[dead]), peers[dead])
            elif dead.any():
                alone = relation_residuals(fitted, current[dead], levels[ctx][dead], list(tick_keys[dead]),
                                           peers[dead], peers_only=True)
                z[dead[rows]] = np.where(held_by[parent][dead], alone, np.nan)     # none for the missing channel
            if partial.any():
                z[partial[rows]] = _partial_residuals(fitted, current[partial], levels[ctx][partial],
                                                      held_by[parent][partial], held_by[ctx][partial],
                                                      list(tick_keys[partial]))
            if fitted.get("smoothing"):                     # versions before 2026-12-06: each tick on its own
                order = np.argsort(rank[rows], kind="stable")
                z[order] = smooth_residuals(z[order], groups[rows][order], float(fitted["smoothing"]),
                                            None if carry is None else carry.setdefault(ctx, {}))
            relations[rows, names.index(parent)] += squared_residuals(fitted, z).astype(np.float32)
            split = relation_channels.setdefault(parent, np.zeros((n, z.shape[1])))
            split[rows] += np.nan_to_num(z ** 2) / max(len(fitted["channels"]), 1)      # (rows, C): adds up to it
    state, owners = operating_state(levels, presence, spec, stats, keys, (groups, rank), carry)
    return Features(inputs=inputs, mask=mask, modalities=names, relation_errors=relations, state=state,
                    state_owners=owners, channels=channels, relation_channels=relation_channels, taken=taken,
                    groups=groups, novel_lines=novel_lines)


def _partial_residuals(relation: dict[str, Any], current: np.ndarray, history: np.ndarray, held: np.ndarray,
                       held_history: np.ndarray, keys: list[str], peers: np.ndarray | None = None) -> np.ndarray:
    """(N, C) `conditional_residuals` of ticks whose parent (current values `current`, N x C, channels `held`) or
    context window (`history`, N x T x C, channels `held_history`) misses a channel: a channel's current value is
    there where it is held, its block means where its context window holds it and it is held now (a dead channel's
    window carries its last values forward until the whole window is without one: stale, not read); with `peers`
    (N x K, every one present) by the cross-modal covariance (`cross_conditional`), the peers' values read too."""
    blocks = len(relation_blocks(history.shape[1]))
    quantities = relation_quantities(current, history, peers)
    clipped = clip_quantities(quantities.copy(), relation.get("ranges" if peers is None else "cross_ranges"),
                              group_rows(keys))
    width = 0 if peers is None else peers.shape[1]
    available = np.concatenate([held, *[held_history & held] * blocks, np.ones((len(held), width), bool)], 1)
    return conditional_residuals(relation["conditional" if peers is None else "cross_conditional"], current, clipped,
                                 available, keys, width)


def smoothing_groups(aligned: pa.Table, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What a relation's residuals are smoothed within (`smooth_residuals`): each tick's entity and date (its
    `date` column, where the aligned rows have one) - a date smooths alike whether scored alone or in a backfill
    of many - and each row's rank in time order within them (by the tick time `_t`; else the rows' order)."""
    groups = np.asarray(keys, dtype=str)
    if "date" in aligned.column_names:
        groups = np.char.add(np.char.add(groups, "\x1f"), np.asarray(aligned.column("date").cast(pa.string())
                                                                      .to_pylist(), dtype=str))
    n = len(groups)
    if TICK_TIME not in aligned.column_names:
        return groups, np.arange(n)
    times = np.asarray(aligned.column(TICK_TIME).to_numpy(zero_copy_only=False), np.int64)
    rank = np.empty(n, np.int64)
    rank[np.lexsort((times, groups))] = np.arange(n)
    return groups, rank


def operating_state(levels: dict[str, np.ndarray], presence: dict[str, np.ndarray], spec: Spec,
                    stats: dict[str, Any], keys: list[str],
                    order: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                    carry: dict | None = None) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Where each machine is operating at each tick: the level of every channel of the `level_modalities`
    (`level_values`; a series channel presented drift-free, `centered` or `difference`, is left out: its level
    is not meant to be read) and, for a series fitted with `window_spread`, every channel's swing within the
    window (`window_spread`, whatever its presentation: a swing does not drift with the level), in the training
    days' standard deviations from the entity's own training mean (the fleet's for an entity not seen); for a
    version fitted with `model.state_speed` (`stats['state_speed']`, the EWMA weight per tick), then one column per
    such modality, owned by `<modality>.rising` (`SPEED`): how fast its state rises (`state_speed`'s rise, within
    each entity's date, `order` = `smoothing_groups`; `carry` keeps it from batch to batch as `featurize` says).
    (N, S) float32, NaN where the channel's modality is absent, and the owner of each column. The calibration
    reads it to expect each modality's error level at that state (`dmafn.scoring.fit_baseline`)."""
    cols, owners, groups, named = [], [], None, []
    for name in level_modalities(spec):
        m, fitted = spec.modalities[name], stats["modalities"][name]
        shown = fitted.get("channel_transforms") or ([m.transform] * len(m.columns) if m.kind == "timeseries"
                                                     else ["level"] * len(m.columns))
        keep = [j for j, t in enumerate(shown) if t == "level"]
        if not keep and SPREAD not in fitted:
            continue
        groups = group_rows(keys) if groups is None else groups        # one sort of the keys for every modality
        z = _state_columns(level_values(levels[name], m), fitted, groups)[:, keep]
        if SPREAD in fitted:              # a series' swing per channel (versions since 2026-12-03 with window_spread)
            z = np.concatenate([z, _state_columns(window_spread(levels[name]), fitted, groups, SPREAD)], 1)
        cols.append(np.where(presence[name][:, None], z, np.nan).astype(np.float32))
        owners += [name] * z.shape[1]
        named.append(name)
    if not cols:
        return None, ()
    alpha, (tick_groups, rank) = stats.get("state_speed"), order
    if alpha and tick_groups is not None:
        carry = {} if carry is None else carry
        cols += [state_speed(z, tick_groups, rank, float(alpha), carry.setdefault(name + SPEED, {}))[:, None]
                 .astype(np.float32) for z, name in zip(cols[:len(named)], named)]
        owners += [name + SPEED for name in named]
    return np.concatenate(cols, 1), tuple(owners)


def state_owner(owner: str) -> str:
    """The modality an operating-state column belongs to (a `SPEED` column's too)."""
    return owner.split(".")[0]


def is_speed(owner: str) -> bool:
    """Whether an operating-state column says how fast its modality's state moves (`SPEED`), not where it is."""
    return "." in owner


def state_speed(z: np.ndarray, groups: np.ndarray, rank: np.ndarray, alpha: float,
                carry: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(N,) how fast one modality's operating state rises at each tick: each value's distance from the EWMA (weight
    `alpha`) of the values before it in its group (an entity's date, in time order by `rank`), over its state
    columns `z` (N, C; NaN where absent) the root mean square of the rises (distances above the average; a fall
    counts 0) - a machine starting up lifts its state through several ticks, a steady one stays near its recent
    average. Falls are not read: a fall is a stop's and a fault's end alike, and the others' errors differ there
    (docs/fleets.md, "Stops and start-ups"). 0 at a group's first tick, NaN where every column is absent (an absent
    tick leaves the average as it was). `carry`: group -> the EWMA per column, read and updated, so a group cut into
    batches moves as one."""
    dev = np.full(z.shape, np.nan)
    carry = {} if carry is None else carry
    for key, rows in group_rows(groups):
        rows = rows[np.argsort(rank[rows], kind="stable")]
        average = np.array(carry.get(key, np.full(z.shape[1], np.nan)), np.float64)
        for c in range(z.shape[1]):
            seen = np.flatnonzero(np.isfinite(z[rows, c]))
            if not len(seen):
                continue
            values = z[rows[seen], c].astype(np.float64)
            start = average[c] if np.isfinite(average[c]) else values[0]
            sums = _ewma_from(values, alpha, start)
            dev[rows[seen], c] = values - np.concatenate([[start], sums[:-1]])
            average[c] = sums[-1]
        carry[key] = average
    held = np.isfinite(dev)
    count = np.where(held.any(1), held.sum(1), np.nan)
    rises = np.maximum(np.where(held, dev, 0.0), 0.0)                              # (N, C)
    return np.sqrt((rises ** 2).sum(1) / count)


def _state_columns(values: np.ndarray, fitted: dict[str, Any], groups: list[tuple[str, np.ndarray]],
                   part: str | None = None) -> np.ndarray:
    """(N, C) values in the training days' standard deviations from their entity's training mean (the fleet's for
    an entity not seen), clipped to +-Z_LIMIT; `part`: the moments kept under that name (`SPREAD`) instead of the
    modality's own."""
    moments = fitted[part] if part else fitted["global"]
    mean = np.asarray(moments["mean"], np.float64)
    std = np.maximum(np.asarray(moments["std"], np.float64), 1e-9)
    centre = np.broadcast_to(mean, (len(values), len(mean))).copy()
    for key, rows in groups:
        own = fitted.get("entity", {}).get(key)
        if own is not None and (part is None or part in own):
            centre[rows] = np.asarray(own[part]["mean"] if part else own["mean"], np.float64)
    return np.clip((values - centre) / std, -Z_LIMIT, Z_LIMIT)


def _check_transform(m: ModalitySpec, fitted: dict) -> None:
    trained = fitted.get("transform", "level")
    if m.kind == "timeseries" and trained != m.transform:
        raise ValueError(f"modality '{m.name}': the model was trained with transform '{trained}' but the spec "
                         f"says '{m.transform}'; restore the spec's transform or train a new model version")


def features_to_columns(features: Features) -> dict[str, np.ndarray]:
    """Features as flat numpy columns (a training feature file's columns): `x__<m>`, `mask` and `c__<m>` (the
    channels held, `Features.channels`)."""
    cols = {f"x__{m}": features.inputs[m] for m in features.modalities}
    cols["mask"] = features.mask
    cols.update({f"c__{m}": held for m, held in features.channels.items()})
    return cols


def features_from_columns(batch: dict[str, np.ndarray], modalities: Iterable[str]) -> Features:
    modalities = tuple(modalities)
    return Features(inputs={m: np.asarray(batch[f"x__{m}"]) for m in modalities},
                    mask=np.asarray(batch["mask"], bool), modalities=modalities,
                    channels={m: np.asarray(batch[f"c__{m}"], bool) for m in modalities if f"c__{m}" in batch})
