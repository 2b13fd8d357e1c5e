"""The values of validation ticks, wherever they are held.

The calibration (`dmafn.calibration`) is fitted through this interface, so the same code fits it on arrays in
memory (`Detector`, the benchmarks) and on validation shards held by a cluster's workers
(`pipelines.calibrate`), where the driver holds counts and a few values, never the ticks.

- `Values`: the finite values of one column: how many, exact quantiles (those of `np.quantile`), and the
  values above a level (a tail: the POT threshold's excesses). `ArrayValues` holds them in memory.
- `select_ranks`: exact order statistics of values split in sorted parts, asking the parts only for samples
  of their values, counts at given levels and the values inside a small interval; `quantiles_from_ranks`
  turns them into `np.quantile`'s numbers, bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import numpy as np

GATHER_MAX = 65_536     # an interval holding at most this many values is read whole
SPLIT_BINS = 256        # else it is cut at up to this many sampled values of each part per round


class Values(Protocol):
    """The finite values of one column of validation ticks."""

    def count(self) -> int:
        ...

    def quantiles(self, qs: Sequence[float]) -> np.ndarray:
        """As `np.quantile(values, np.asarray(qs, float))` (linear); needs count() > 0."""
        ...

    def above(self, level: float) -> np.ndarray:
        """The values > level, sorted."""
        ...

    def count_above(self, level: float) -> int:
        """How many values are > level."""
        ...

    def excess_mean(self, level: float) -> tuple[int, float]:
        """How many values are > level and the mean of their excess over it (0.0 with none), in float64."""
        ...

    def excess_moments(self, level: float) -> tuple[int, float, float]:
        """`excess_moments` of the values' excesses over level (those > level)."""
        ...


class ArrayValues:
    """`Values` of an array in memory (non-finite entries left out; float32 stays float32, as numpy computes
    its quantiles in it)."""

    def __init__(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        values = values if np.issubdtype(values.dtype, np.floating) else values.astype(float)
        self.values = values[np.isfinite(values)]

    def count(self) -> int:
        return int(self.values.size)

    def quantiles(self, qs: Sequence[float]) -> np.ndarray:
        return np.quantile(self.values, np.asarray(qs, float))

    def above(self, level: float) -> np.ndarray:
        return np.sort(self.values[self.values > level])

    def count_above(self, level: float) -> int:
        return int(np.count_nonzero(self.values > level))

    def excess_mean(self, level: float) -> tuple[int, float]:
        excess = self.above(level) - level
        return int(excess.size), float(excess.mean(dtype=np.float64)) if excess.size else 0.0

    def excess_moments(self, level: float) -> tuple[int, float, float]:
        return excess_moments(self.above(level) - level)


def excess_moments(excesses: np.ndarray) -> tuple[int, float, float]:
    """n excesses' probability-weighted moments (`dmafn.postprocess.gpd_fit`): n, b0 = their mean and b1 = E[X F(X)]
    with plotting positions i/(n-1) over them sorted (b1 0.0 for fewer than 2)."""
    x = np.sort(np.asarray(excesses, float))
    n = x.size
    if n < 2:
        return n, float(x.mean()) if n else 0.0, 0.0
    return n, float(x.mean()), float(np.sum(x * (np.arange(n)) / (n - 1)) / n)


def as_values(values: np.ndarray | Values) -> Values:
    """An array as `ArrayValues`; `Values` as they are."""
    return ArrayValues(values) if isinstance(values, np.ndarray) else values


def quantiles_from_ranks(n: int, qs: Sequence[float], select: Callable[[list[int]], dict[int, float]],
                         dtype: np.dtype = np.dtype(float)) -> np.ndarray:
    """`np.quantile`'s linear quantiles of n values of `dtype` from their order statistics: `select(ranks)`
    gives the values at those 0-based ranks; each quantile interpolates between two of them as numpy does."""
    spots = [(n - 1) * float(q) for q in qs]                  # numpy's virtual index, (n - 1) * q
    floors = [min(int(math.floor(s)), n - 1) for s in spots]
    got = select(sorted({r for f in floors for r in (f, min(f + 1, n - 1))}))
    # numpy interpolates a and b with weight s - floor(s); on [a, b] its virtual index is that weight itself
    # (given as an array, as `qs` are: a float scalar would be cast to the values' dtype first)
    return np.array([np.quantile(np.array([got[f], got[min(f + 1, n - 1)]], dtype), np.array([s - math.floor(s)]))[0]
                     if f < n - 1 else got[f] for s, f in zip(spots, floors)], float)


def select_ranks(ranks: list[int], *, n: int, bounds: tuple[float, float],
                 count_le: Callable[[np.ndarray], np.ndarray],
                 between: Callable[[list[tuple[float, float]]], list[np.ndarray]],
                 sample: Callable[[list[tuple[float, float]], int], list[np.ndarray]],
                 gather_max: int = GATHER_MAX, bins: int = SPLIT_BINS) -> dict[int, float]:
    """The values at 0-based `ranks` among n finite values lying in `bounds` (their min and max), held in parts.

    `count_le(levels)`: how many values are <= each level; `between(intervals)`: for each (lo, hi], its values
    in any order; `sample(intervals, k)`: for each (lo, hi], from every part up to k of its values there,
    evenly spaced in rank, its smallest and largest among them. An interval holding more than `gather_max`
    values is cut at the sampled values (their counts tell which piece holds each rank; each round leaves
    about 1/k of the values), a smaller one is read and sorted; ties end when an interval holds one value."""
    lo0, hi0 = bounds
    open_ranks = {r: (float(np.nextafter(lo0, -np.inf)), float(hi0), 0, n) for r in ranks}   # (lo, hi] and counts
    found: dict[int, float] = {}
    while open_ranks:
        intervals: dict[tuple[float, float, int, int], list[int]] = {}
        for r, iv in open_ranks.items():
            intervals.setdefault(iv, []).append(r)
        small = [iv for iv in intervals if iv[3] - iv[2] <= gather_max]
        for iv, values in zip(small, between([(iv[0], iv[1]) for iv in small]) if small else []):
            values = np.sort(values)
            for r in intervals.pop(iv):
                found[r] = float(values[r - iv[2]])
                del open_ranks[r]
        if not intervals:
            continue
        for iv, cut in zip(list(intervals), cut_intervals(list(intervals), sample, count_le, bins)):
            rs = intervals.pop(iv)
            if cut is None:                            # every part's values there equal hi
                for r in rs:
                    found[r] = iv[1]
                    del open_ranks[r]
                continue
            all_edges, all_counts = cut
            for r in rs:
                j = int(np.searchsorted(all_counts, r, side="right")) - 1     # count_le(e_j) <= r < count_le(e_j+1)
                open_ranks[r] = (float(all_edges[j]), float(all_edges[j + 1]), int(all_counts[j]),
                                 int(all_counts[j + 1]))
    return found


def cut_intervals(intervals: list[tuple[float, float, int, int]],
                  sample: Callable[[list[tuple[float, float]], int], list[np.ndarray]],
                  count_le: Callable[[np.ndarray], np.ndarray], bins: int, most: list[int] | None = None,
                  ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each (lo, hi, c_lo, c_hi) - the values in (lo, hi], c_lo and c_hi of them <= lo and hi - cut at the values
    `sample` draws there from every part (`select_ranks`), at most `most[i]` of them evenly spaced: its edges
    (lo, the cuts, hi) and how many values are <= each; None where no sampled value lies strictly inside (every
    value there equals hi)."""
    cuts = []
    for i, ((lo, hi, _, _), values) in enumerate(zip(intervals, sample([iv[:2] for iv in intervals], bins))):
        values = np.unique(values)
        inside = values[(values > lo) & (values < hi)]
        if most is not None and inside.size > most[i]:
            inside = np.unique(inside[np.linspace(0, inside.size - 1, most[i]).round().astype(int)])
        cuts.append(inside)
    cut = [c for c in cuts if c.size]
    counts = count_le(np.concatenate(cut)) if cut else np.zeros(0, np.int64)
    out, at = [], 0
    for (lo, hi, c_lo, c_hi), edges in zip(intervals, cuts):
        if not edges.size:
            out.append(None)
            continue
        out.append((np.r_[lo, edges, hi], np.r_[c_lo, counts[at:at + len(edges)], c_hi]))
        at += len(edges)
    return out


def sorted_part_sample(part: np.ndarray, lo: float, hi: float, k: int) -> np.ndarray:
    """`select_ranks`' sample of one sorted part: up to k of its values in (lo, hi], evenly spaced in rank, the
    first and last included."""
    a, b = np.searchsorted(part, lo, side="right"), np.searchsorted(part, hi, side="right")
    if b <= a:
        return part[:0]
    return part[np.unique(np.linspace(a, b - 1, min(k, b - a)).round().astype(int))]
