"""`evaluate` and `report` on Ray: each date of the window is read and tallied by a task, where the cluster has room.

The driver holds the window's small per-date results (`WindowPart`: counts, each entity's open runs at the
date's edges, the first alarm inside each labelled interval; the report's `ReportPart` adds its header's counts
and the alarm runs at the date's edges) and object references, never a scored row (`TaskPasses`):
1. one task per date reads the date's partition of the output table (and of the baselines' beside it) at the
   snapshot the driver opened, attaches the labels and returns its part, which the driver adds up in date
   order, and its labelled ticks' scores, which stay in the object store;
2. one task sorts those scores into a `RankingTally` per score column (`ranking_tallies`);
3. a task per slice of consecutive dates (as many slices as the cluster has CPUs, fewer where their counts would
   pass `COUNTS_BUDGET`) reads its dates again and counts their normal ticks against the sorted positives
   (`negative_counts`), and returns the few rows the caller asks of each date (the plot's buckets, the
   rows the timelines draw);
4. the slices' counts are added pairwise by tasks as they come, and a last task reads the ROC-AUC, PR-AUC, the
   oracle cut and the curves' corners off the tallies (`ranking_metrics`): the driver receives those numbers.
The numbers are the same as the passes compute in one process (`evaluate._evaluate_here`, `report`'s own loop).
Object store: the labelled ticks' scores twice (as read, then sorted) and, per slice still to be added, a count
per labelled tick and score column (16 bytes; at most `COUNTS_BUDGET` in all).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl
import ray
from deltalake import DeltaTable

from dmafn.metrics import NegativeCounts, PairCounts, RankingTally
from dmafn.spec import Spec
from pipelines.align import LabelIndex
from pipelines.evaluate import (MetricsTally, WindowEvaluation, add_negative_counts, negative_counts, plot_rows,
                                ranking_metrics, ranking_tallies, score_chunks, settle_us, split_counts, window_part)
from pipelines.progress import ProgressDisplay
from pipelines.ray_runtime import Resources, raise_task_error
from pipelines.storage import Storage


@dataclass(frozen=True)
class Snapshot:
    """A Delta table at one version, as a task opens it: every task reads what the driver opened."""
    uri: str
    version: int
    options: dict[str, str] | None

    @classmethod
    def of(cls, table: DeltaTable, storage: Storage) -> "Snapshot":
        uri = table.table_uri
        return cls(uri, table.version(), storage.delta_options(uri))

    def open(self) -> DeltaTable:
        return DeltaTable(self.uri, version=self.version, storage_options=self.options)


@dataclass(frozen=True)
class Source:
    """Where a task reads its dates: the output table, the baselines' beside it (or None), the labels (or None)."""
    spec: Spec
    scores: Snapshot
    beside: Snapshot | None
    labels: LabelIndex | None

    def chunks(self, dates: list[str]) -> Iterator[pl.DataFrame]:
        yield from score_chunks(self.scores.open(), self.spec, dates, self.labels,
                                self.beside.open() if self.beside else None)


FirstPass = Callable[[pl.DataFrame], tuple[Any, pl.DataFrame | None]]   # a chunk -> (its part, its positives)
Keep = Callable[[pl.DataFrame], pl.DataFrame]                           # a chunk -> the rows the caller keeps


@ray.remote(num_cpus=1, num_returns=2)
def _first_pass(source: Source, date: str, first: FirstPass) -> tuple[Any, pl.DataFrame | None]:
    return first(next(source.chunks([date])))


@ray.remote(num_cpus=1)
def _tallies(names: list[str], kinds: list[str], *positives: pl.DataFrame) -> dict[str, RankingTally]:
    return ranking_tallies(list(positives), names, kinds)


Counts = dict[Any, NegativeCounts | PairCounts]       # `negative_counts`


@ray.remote(num_cpus=1, num_returns=2)
def _second_pass(source: Source, dates: list[str], tallies: dict[str, RankingTally] | None, keep: Keep | None
                 ) -> tuple[Counts | None, pl.DataFrame | None]:
    counts, rows = None, []
    for chunk in source.chunks(dates):
        if tallies is not None:
            counts = add_negative_counts(counts, negative_counts(tallies, chunk, source.spec))
        if keep is not None:
            rows.append(keep(chunk))
    return counts, pl.concat(rows, how="diagonal_relaxed") if rows else None


@ray.remote(num_cpus=1)
def _add(a: Counts | None, b: Counts | None) -> Counts | None:
    return b if a is None else a if b is None else add_negative_counts(a, b)


@ray.remote(num_cpus=1)
def _ranking(tallies: dict[str, RankingTally], counts: Counts | None, names: list[str], kinds: list[str],
             curves: list[str]) -> dict[str, Any]:
    negatives, pairs = split_counts(counts)
    for name, c in negatives.items():
        tallies[name].add_counts(c)
    return ranking_metrics(tallies, names, kinds, curves, pairs)


COUNTS_BUDGET = 1 << 30     # bytes of negatives' counts the second pass's slices may hold at once (16 per labelled
                            # tick and score column each): fewer slices than CPUs where the labelled ticks are many


def _added(refs: list[ray.ObjectRef]) -> ray.ObjectRef:
    """The sum of the counts behind `refs`, added two at a time as they are ready."""
    pending = list(refs)
    while len(pending) > 1:
        ready, pending = ray.wait(pending, num_returns=2)
        pending.append(_add.remote(*ready))
    return pending[0]


def slices(dates: list[str], n: int) -> list[list[str]]:
    """`dates` cut into at most `n` runs of consecutive dates of nearly equal length."""
    n = max(1, min(n, len(dates)))
    return [list(part) for part in np.array_split(np.array(dates, dtype=object), n)]


class TaskPasses:
    """Two passes over a window's dates in Ray tasks, for a caller that adds up the parts (`first`), then asks for
    each date's negatives counted and a few rows kept (`second`), then the ranking metrics (`ranking`)."""

    def __init__(self, name: str, spec: Spec, storage: Storage, table: DeltaTable, beside: DeltaTable | None,
                 dates: list[str], labels: pl.DataFrame | None) -> None:
        self.index = LabelIndex.build(labels, spec, spec.labels.start, spec.labels.end) if labels is not None else None
        self.source = Source(spec, Snapshot.of(table, storage), Snapshot.of(beside, storage) if beside is not None
                             else None, None)
        self.reach_us = settle_us(spec)          # `since_event_us` past it counts as clear of events, as null does
        self.dates = dates
        self.groups = slices(dates, int(Resources.current().cpus))
        self.progress = ProgressDisplay(name, 2 * len(dates), "date passes")
        self._positives: list[ray.ObjectRef] = []
        self._tallies: ray.ObjectRef | None = None
        self._counts: list[ray.ObjectRef] = []

    def _source(self, dates: list[str]) -> Source:
        """The source for a task that reads `dates` (consecutive): the labels cut to them (`LabelIndex.window`, a
        day's margin either side), so no task holds the whole window's labels."""
        if self.index is None:
            return self.source
        lo, hi = day_span_us(dates[0], dates[-1])
        return replace(self.source, labels=self.index.window(lo, hi, self.reach_us))

    def first(self, first: FirstPass, intervals: pl.DataFrame | None = None) -> Iterator[Any]:
        """Each date's part, in date order; its positives (if any) stay in the object store. `intervals`: the
        labelled intervals (`evaluate.event_intervals`) `first` takes as its keyword `intervals` (bound here, in place
        of any bound before): each date's task gets those that overlap the date only."""
        launched = []
        for date in self.dates:
            run = first
            if intervals is not None:
                lo, hi = day_span_us(date, date)
                run = partial(first, intervals=intervals.filter((pl.col("_e") >= lo) & (pl.col("_s") <= hi)))
            launched.append(_first_pass.remote(self._source([date]), date, run))
        self._positives = [positives for _, positives in launched]
        for i, (part, _) in enumerate(launched):
            yield raise_task_error(part)
            self.progress.update(i + 1)

    def freeze(self, metrics: MetricsTally) -> None:
        """End of the first pass of `metrics` (its parts all added): the positives sorted by a task."""
        metrics.close_runs()
        self._tallies = _tallies.remote(metrics.names, metrics.kind_list, *self._positives)
        self._positives = []
        per_slice = 16 * (metrics.labelled + 1) * max(len(metrics.names), 1)      # its counts, bytes
        self.groups = slices(self.dates, min(int(Resources.current().cpus), max(1, COUNTS_BUDGET // per_slice)))

    def second(self, keep: Keep | None) -> list[pl.DataFrame]:
        """Each slice's kept rows, in date order; its negatives counted (after `freeze`) stay in the object store."""
        keep_ref = ray.put(keep)
        launched = [_second_pass.remote(self._source(group), group, self._tallies, keep_ref) for group in self.groups]
        self._counts = [counts for counts, _ in launched]
        kept, done = [], len(self.dates)
        for group, (_, rows) in zip(self.groups, launched):
            kept.append(raise_task_error(rows))
            done += len(group)
            self.progress.update(done)
        self.progress.close()
        return [rows for rows in kept if rows is not None]

    def ranking(self, metrics: MetricsTally, curves: list[str] = ()) -> dict[str, Any]:
        """`ranking_metrics` of the tallies with every slice's negatives added, read by a task."""
        return raise_task_error(_ranking.remote(self._tallies, _added(self._counts), metrics.reported,
                                                metrics.kind_list, list(curves)))


def day_span_us(first: str, last: str) -> tuple[int, int]:
    """Microseconds from a day before `first` (a date, YYYY-MM-DD) to a day after `last` ends: the span a task's
    ticks of those dates lie in, with a day's margin either side."""
    lo = int(np.datetime64(first, "us").astype(np.int64)) - DAY_US
    return lo, int(np.datetime64(last, "us").astype(np.int64)) + 2 * DAY_US


DAY_US = 86_400_000_000


def evaluate_on_tasks(spec: Spec, storage: Storage, table: DeltaTable, beside: DeltaTable | None, dates: list[str],
                      labels: pl.DataFrame, bucket_us: int | None, min_ticks: tuple[int, ...] = ()
                      ) -> tuple[dict[str, Any], pl.DataFrame | None, str | None, pl.DataFrame | None]:
    """`evaluate`'s two passes in Ray tasks: the result, with `bucket_us` the plot's rows and entity (the first of
    the first date), and the labelled events no scored tick falls in (`evaluate.unscored_events`)."""
    evaluation = WindowEvaluation(spec, labels, dates, min_ticks)
    passes = TaskPasses("evaluate", spec, storage, table, beside, dates, labels)
    entity = None
    for part in passes.first(partial(window_part, spec=spec), evaluation.intervals):   # each date's intervals
        evaluation.add_part(part)
        entity = entity or part.metrics.first_entity
    passes.freeze(evaluation.metrics)
    plot = partial(plot_rows, spec=spec, entity=entity, bucket_us=bucket_us) if bucket_us and entity else None
    plotted = passes.second(plot)
    result = evaluation.result(storage, passes.ranking(evaluation.metrics))
    return result, pl.concat(plotted, how="diagonal_relaxed") if plotted else None, entity, evaluation.unscored
