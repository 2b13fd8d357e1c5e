"""`evaluate` on Ray: each date of the window is read and tallied by a task, where the cluster has room.

The driver holds the window's small per-date results (`WindowPart`: counts, each entity's open runs at the
date's edges, the first alarm inside each labelled interval) and object references, never a scored row:
1. one task per date reads the date's partition of the output table (and of the baselines' beside it) at the
   snapshot the driver opened, attaches the labels and returns its `WindowPart`, which the driver adds up in date
   order, and its labelled ticks' scores, which stay in the object store;
2. one task sorts those scores into a `RankingTally` per score column (`ranking_tallies`);
3. a task per slice of consecutive dates (as many slices as the cluster has CPUs) reads its dates again and
   counts their normal ticks against the sorted positives (`negative_counts`), and returns the plot's rows;
4. the slices' counts are added pairwise by tasks as they come, and a last task reads the ROC-AUC, PR-AUC and
   oracle cut off the tallies (`ranking_metrics`): the driver receives those numbers.
The numbers are the same as `evaluate` computes in one process (`pipelines.evaluate._evaluate_here`).
Object store: the labelled ticks' scores twice (as read, then sorted) and, per slice still to be added, a count
per labelled tick and score column (16 bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import ray
from deltalake import DeltaTable

from dmafn.metrics import NegativeCounts, RankingTally
from dmafn.spec import Spec
from pipelines.align import LabelIndex
from pipelines.evaluate import (WindowEvaluation, WindowPart, add_negative_counts, negative_counts, plot_rows,
                                ranking_metrics, ranking_tallies, score_chunks, window_part)
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
    """Where a task reads its dates: the output table, the baselines' beside it (or None), the labels."""
    spec: Spec
    scores: Snapshot
    beside: Snapshot | None
    labels: LabelIndex

    def chunks(self, dates: list[str]):
        yield from score_chunks(self.scores.open(), self.spec, dates, self.labels,
                                self.beside.open() if self.beside else None)


@ray.remote(num_cpus=1, num_returns=2)
def _first_pass(source: Source, date: str, intervals: pl.DataFrame) -> tuple[WindowPart, pl.DataFrame]:
    return window_part(next(source.chunks([date])), source.spec, intervals)


@ray.remote(num_cpus=1)
def _tallies(names: list[str], kinds: list[str], *positives: pl.DataFrame) -> dict[str, RankingTally]:
    return ranking_tallies(list(positives), names, kinds)


@ray.remote(num_cpus=1, num_returns=2)
def _second_pass(source: Source, dates: list[str], tallies: dict[str, RankingTally], plot: tuple[str, int] | None
                 ) -> tuple[dict[str, NegativeCounts] | None, pl.DataFrame | None]:
    counts, rows = None, []
    for chunk in source.chunks(dates):
        counts = add_negative_counts(counts, negative_counts(tallies, chunk, source.spec))
        if plot is not None:
            rows.append(plot_rows(chunk, source.spec, *plot))
    return counts, pl.concat(rows, how="diagonal_relaxed") if rows else None


@ray.remote(num_cpus=1)
def _add(a: dict[str, NegativeCounts] | None, b: dict[str, NegativeCounts] | None) -> dict[str, NegativeCounts] | None:
    return b if a is None else a if b is None else add_negative_counts(a, b)


@ray.remote(num_cpus=1)
def _ranking(tallies: dict[str, RankingTally], counts: dict[str, NegativeCounts] | None, names: list[str],
             kinds: list[str]) -> dict[str, Any]:
    for name, c in (counts or {}).items():
        tallies[name].add_counts(c)
    return ranking_metrics(tallies, names, kinds)


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


def evaluate_on_tasks(spec: Spec, storage: Storage, table: DeltaTable, beside: DeltaTable | None, dates: list[str],
                      labels: pl.DataFrame, bucket_us: int | None
                      ) -> tuple[dict[str, Any], pl.DataFrame | None, str | None]:
    """`evaluate`'s two passes in Ray tasks: the result, and with `bucket_us` the plot's rows and entity (the
    first of the first date)."""
    evaluation = WindowEvaluation(spec, labels)
    source = Source(spec, Snapshot.of(table, storage), Snapshot.of(beside, storage) if beside is not None else None,
                    LabelIndex.build(labels, spec, spec.labels.start, spec.labels.end))
    source_ref, intervals_ref = ray.put(source), ray.put(evaluation.intervals)
    groups = slices(dates, int(Resources.current().cpus))
    progress = ProgressDisplay("evaluate", len(dates) + len(groups), "tasks")   # a date each, then a slice each
    launched = [_first_pass.remote(source_ref, date, intervals_ref) for date in dates]
    entity = None
    for i, (part_ref, _) in enumerate(launched):
        part = raise_task_error(part_ref)
        evaluation.add_part(part)
        entity = entity or part.metrics.first_entity
        progress.update(i + 1)
    metrics = evaluation.metrics
    metrics.close_runs()
    tallies = _tallies.remote(metrics.names, metrics.kind_list, *[positives for _, positives in launched])
    del launched
    plot = (entity, bucket_us) if bucket_us and entity is not None else None
    second = [_second_pass.remote(source_ref, group, tallies, plot) for group in groups]
    plotted = []
    for i, (_, rows) in enumerate(second):
        plotted.append(raise_task_error(rows))
        progress.update(len(dates) + i + 1)
    ranking = raise_task_error(_ranking.remote(tallies, _added([counts for counts, _ in second]), metrics.reported,
                                               metrics.kind_list))
    progress.close()
    plotted = [rows for rows in plotted if rows is not None]
    return (evaluation.result(storage, ranking), pl.concat(plotted, how="diagonal_relaxed") if plotted else None,
            entity)
