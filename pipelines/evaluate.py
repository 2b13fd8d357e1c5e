"""Evaluation: the scores in the Delta table against the labels - fused and per modality, per anomaly kind.

Prints a table, writes `metrics.json` and a PNG of score vs. labelled anomalies for one entity.
With `baselines=True` it also trains each modality alone (a late-fusion detector: one detector per
modality, never sees the others) on the training days and scores the window with it, to show what fusion adds
(`pipelines.baselines`: the same training and scoring jobs, into the table `<output>_alone`).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
from deltalake import DeltaTable

from dmafn.calibration import Calibration
from dmafn.metrics import NegativeCounts, PairCounts, RankingTally, count_metrics, f1_of
from dmafn.postprocess import to_labels
from dmafn.spec import DAY_US, Spec
from pipelines.align import (TIME, LabelIndex, attach_labels, date_end_us, date_start_us, label_intervals,
                            to_micros)
from pipelines.baselines import score_alone
from pipelines.delta_sink import CAUSE, SCORED_COLUMNS, read_table, scan_table, table_mismatch
from pipelines.ingest import entity_string
from pipelines.labels import load_labels
from pipelines.postprocess import mark_runs, run_number
from pipelines.progress import ProgressDisplay
from pipelines.storage import DataError, Storage

log = logging.getLogger(__name__)


def score_arrays(chunk: pl.DataFrame, spec: Spec) -> dict[str, np.ndarray]:
    """A chunk's score columns as float64 arrays (NaN where null), by the name the metrics give them: `fused`,
    `score_<m>`, and the baselines' `alone_<m>`."""
    names = {"score": "fused"} | {f"{prefix}_{m}": f"{prefix}_{m}" for prefix in ("score", "alone")
                                  for m in spec.modalities}
    return {name: chunk[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
            for column, name in names.items() if column in chunk.columns}


RUN_FLAGS = (("y", "p"), ("p", "y"))     # runs of labelled ticks (events), hit by an alarm; runs of alarms, good
                                         # when they touch a labelled tick


def run_edges(frame: pl.DataFrame) -> dict[str, tuple[dict[str, Any], pl.DataFrame]]:
    """Runs of labelled ticks and of alarms in a chunk (`frame`: entity `g`, alarm `p`, label `y`; rows in time
    order per entity), per flag: the counts of the runs that lie wholly inside the chunk (`runs`, `hit`: runs
    the other flag touches, `hit_ticks`: their ticks, `lengths`: runs and hit runs by length), and per entity its
    edges - whether its first row is flagged and the run it starts (`f0`, `head_n`, `head_hit`), the same for its
    last row (`f1`, `tail_n`, `tail_hit`), and `through` when one run covers every row. `RunTally` joins the
    edges of consecutive chunks."""
    out = {}
    for flag, other in RUN_FLAGS:
        rows = mark_runs(frame, flag, "g")
        ends = rows.group_by("g", maintain_order=True).agg(pl.col("_run").max().alias("_runs"),
                                                           pl.col(flag).first().alias("f0"),
                                                           pl.col(flag).last().alias("f1"))
        runs = (rows.filter(pl.col(flag)).group_by("g", "_run")
                .agg(pl.len().cast(pl.Int64).alias("n"), pl.col(other).any().alias("hit"))
                .join(ends.select("g", "_runs"), on="g"))
        inner = runs.filter((pl.col("_run") != 1) & (pl.col("_run") != pl.col("_runs")))
        hit = inner.filter(pl.col("hit"))
        counts = {"runs": inner.height, "hit": hit.height, "hit_ticks": int(hit["n"].sum()),
                  "lengths": run_lengths(inner)}
        head = runs.filter(pl.col("_run") == 1).select("g", pl.col("n").alias("head_n"), pl.col("hit").alias("head_hit"))
        tail = (runs.filter(pl.col("_run") == pl.col("_runs"))
                .select("g", pl.col("n").alias("tail_n"), pl.col("hit").alias("tail_hit")))
        edges = (ends.join(head, on="g", how="left").join(tail, on="g", how="left")
                 .with_columns((pl.col("f0") & (pl.col("_runs") == 1)).alias("through")).drop("_runs"))
        out[flag] = (counts, edges)
    return out


def run_lengths(runs: pl.DataFrame) -> dict[int, tuple[int, int]]:
    """Runs (`n`: ticks, `hit`) counted by length: {ticks: (runs, hit runs)}."""
    by = runs.group_by("n").agg(pl.len().alias("runs"), pl.col("hit").sum().alias("hit"))
    return {int(n): (int(r), int(h)) for n, r, h in by.select("n", "runs", "hit").iter_rows()}


class RunTally:
    """Runs of one flag per entity over chunks in time order (`run_edges`), counted as on each entity's whole
    series: a run at a chunk's end stays open until the entity's next row that is not flagged (an entity absent
    from a chunk keeps its run open). Holds one open run per entity, not rows; `lengths` counts the runs and the
    hit runs by length (`at_least`)."""

    def __init__(self) -> None:
        self.runs = self.hit = self.hit_ticks = 0
        self.lengths: dict[int, tuple[int, int]] = {}
        self.open = pl.DataFrame(schema={"g": pl.String, "n": pl.Int64, "hit": pl.Boolean})

    def _count_lengths(self, lengths: dict[int, tuple[int, int]]) -> None:
        for n, (runs, hit) in lengths.items():
            before = self.lengths.get(n, (0, 0))
            self.lengths[n] = (before[0] + runs, before[1] + hit)

    def _close(self, closed: pl.DataFrame) -> None:
        hit = closed.filter(pl.col("hit"))
        self.runs += closed.height
        self.hit += hit.height
        self.hit_ticks += int(hit["n"].sum())
        self._count_lengths(run_lengths(closed))

    def at_least(self, ticks: int) -> tuple[int, int]:
        """The runs of `ticks` or more, and how many of them the other flag touches."""
        kept = [counts for n, counts in self.lengths.items() if n >= ticks]
        return sum(r for r, _ in kept), sum(h for _, h in kept)

    def add(self, counts: dict[str, Any], edges: pl.DataFrame) -> None:
        """One chunk's `run_edges` of this flag, chunks in time order."""
        self.runs += counts["runs"]
        self.hit += counts["hit"]
        self.hit_ticks += counts["hit_ticks"]
        self._count_lengths(counts["lengths"])
        j = edges.join(self.open, on="g", how="left").with_columns(
            (pl.col("n").fill_null(0) + pl.col("head_n").fill_null(0)).alias("merged_n"),
            (pl.col("hit").fill_null(False) | pl.col("head_hit").fill_null(False)).alias("merged_hit"))
        self._close(pl.concat([
            j.filter(pl.col("f0") & ~pl.col("through")).select("g", n="merged_n", hit="merged_hit"),
            j.filter(~pl.col("f0") & pl.col("n").is_not_null()).select("g", "n", "hit")]))
        self.open = pl.concat([
            self.open.join(edges.select("g"), on="g", how="anti"),
            j.filter(pl.col("through")).select("g", n="merged_n", hit="merged_hit"),
            j.filter(~pl.col("through") & pl.col("f1")).select("g", n="tail_n", hit="tail_hit")])

    def finish(self) -> None:
        """Close the runs still open (the window's end)."""
        self._close(self.open)
        self.open = self.open.clear()


def event_pieces(frame: pl.DataFrame) -> pl.DataFrame:
    """The runs of labelled ticks in a chunk (`frame` as `run_edges` takes it), a row each in time order per entity,
    with what `CatchTally` needs to find the longest alarm run that touches each: `known`, the longest alarm run
    lying wholly inside the chunk that it touches (0: none); `head` / `tail`, whether it touches the entity's alarm
    run at the chunk's first / last row (which may go on in the chunks around, so its length is not known here);
    `first` / `last`, whether it holds the entity's first / last row (it may go on from / into the chunks around)."""
    alarm = pl.col("p")
    rows = (frame.select("g", "p", "y").sort("g", maintain_order=True)
            .with_columns(run_number("p", "g").alias("_pr"), run_number("y", "g").alias("_yr"))
            .with_columns(pl.len().over("g", "_pr").cast(pl.Int64).alias("_pn"),
                          (alarm & (pl.col("_pr") == 1) & alarm.first().over("g")).alias("_ph"),
                          (alarm & (pl.col("_pr") == pl.col("_pr").max().over("g")) & alarm.last().over("g"))
                          .alias("_pt"),
                          pl.col("_yr").max().over("g").alias("_yrs")))
    return (rows.filter(pl.col("y"))
            .group_by("g", "_yr", maintain_order=True)
            .agg(pl.when(alarm & ~pl.col("_ph") & ~pl.col("_pt")).then(pl.col("_pn")).otherwise(0).max().alias("known"),
                 pl.col("_ph").any().alias("head"), pl.col("_pt").any().alias("tail"),
                 (pl.col("_yr").first() == 1).alias("first"), (pl.col("_yr").first() == pl.col("_yrs").first())
                 .alias("last"))
            .sort("g", "_yr", maintain_order=True).drop("_yr"))


class CatchTally:
    """Per labelled event (a run of labelled ticks of one entity), the longest alarm run that touches it, over
    chunks in time order (`event_pieces` and the alarm flag's `run_edges`), exactly as on each entity's whole
    series - so the event-wise recall when only alarm runs of N ticks or more count (`dmafn alarms --min-ticks N`)
    does not depend on where the chunks split. Holds each entity's open alarm run and open event, a number per
    event, and the events touching an alarm run at a chunk's edge until that run closes."""

    def __init__(self) -> None:
        self.longest: list[int] = []                     # per event: the longest alarm run known to touch it
        self._waiting: dict[int, list[int]] = {}         # an open edge alarm run -> the events touching it
        self._alarm: dict[str, tuple[int, int]] = {}     # entity -> its open alarm run: (id, ticks so far)
        self._event: dict[str, int] = {}                 # entity -> its open event
        self._ids = 0

    def _run_id(self) -> int:
        self._ids += 1
        return self._ids

    def _close(self, run: int, ticks: int) -> None:
        for event in self._waiting.pop(run, []):
            self.longest[event] = max(self.longest[event], ticks)

    def add(self, pieces: pl.DataFrame, alarm_edges: pl.DataFrame) -> None:
        """One chunk's `event_pieces` and the alarm flag's `run_edges` edges, chunks in time order."""
        heads: dict[str, int] = {}
        tails: dict[str, int] = {}
        closing: list[tuple[int, int]] = []
        edges = alarm_edges.filter(pl.col("f0") | pl.col("f1") | pl.col("g").is_in(list(self._alarm)))
        for g, f0, f1, through, head_n, tail_n in edges.select("g", "f0", "f1", "through", "head_n",
                                                                "tail_n").iter_rows():
            before = self._alarm.pop(g, None)
            if f0:                                       # the entity's first row alarms: its open run goes on
                run, n = before or (self._run_id(), 0)
                heads[g] = run
                if through:
                    self._alarm[g], tails[g] = (run, n + head_n), run
                else:
                    closing.append((run, n + head_n))
            elif before is not None:
                closing.append(before)
            if f1 and not through:
                tails[g] = run = self._run_id()
                self._alarm[g] = (run, tail_n)
        present_open = alarm_edges.filter(pl.col("g").is_in(list(self._event)))["g"].to_list()
        continued = set(pieces.filter(pl.col("first"))["g"].to_list())
        for g in present_open:                           # the entity's first row is not labelled: its event ended
            if g not in continued:
                del self._event[g]
        for g, known, head, tail, first, last in pieces.select("g", "known", "head", "tail", "first",
                                                               "last").iter_rows():
            event = self._event.pop(g) if first and g in self._event else None
            if event is None:
                event = len(self.longest)
                self.longest.append(0)
            self.longest[event] = max(self.longest[event], int(known))
            for touched, runs in ((head, heads), (tail, tails)):
                if touched:
                    self._waiting.setdefault(runs[g], []).append(event)
            if last:
                self._event[g] = event
        for run, ticks in closing:
            self._close(run, ticks)

    def finish(self) -> None:
        """Close the runs still open (the window's end)."""
        for run, ticks in self._alarm.values():
            self._close(run, ticks)
        self._alarm, self._event = {}, {}

    def caught(self, ticks: int) -> int:
        """The events touched by an alarm run of `ticks` or more."""
        return int(np.count_nonzero(np.asarray(self.longest, np.int64) >= ticks))


@dataclass
class ChunkPart:
    """What `MetricsTally`'s first pass takes of one chunk, computed where the chunk lies (`chunk_part`): counts,
    each entity's run edges and the names of the score columns - small, whatever the chunk. The labelled ticks'
    scores travel beside it (`positives`)."""
    ticks: int
    labelled: int
    points: dict[str, int]
    names: list[str]                  # score columns, in the table's order
    seen: set[str]                    # those holding any value
    kinds: set[str]                   # labelled kinds
    runs: dict[str, tuple[dict[str, Any], pl.DataFrame]]
    pieces: pl.DataFrame              # `event_pieces`
    first_entity: str | None
    attribution: dict[tuple[str, str], int]   # `attribution_counts`
    causes: dict[tuple[str, str], int] = field(default_factory=dict)   # ... of the output's `cause` (`named_counts`)


NORMAL_TICKS = "normal"     # `attribution_counts`' kind of an alarm tick no label covers: a false alarm
KINDLESS = "labelled"       # ... and of a labelled one whose label names no kind


def attribution_counts(scores: dict[str, np.ndarray], alarms: np.ndarray,
                       kinds: np.ndarray) -> dict[tuple[str, str], int]:
    """Which modality the alarm ticks name: each alarm tick counted by its kind (`kinds`, per tick) and the modality
    with the largest contribution `score_<m>` there (a tick with none left out)."""
    names = [n for n in scores if n.startswith("score_")]
    if not names or not alarms.any():
        return {}
    contributions = np.stack([scores[n][alarms] for n in names], 1)          # the alarm ticks' only
    held = ~np.isnan(contributions).all(1)
    top = np.full(len(alarms), None, object)
    top[np.flatnonzero(alarms)[held]] = np.asarray([n[6:] for n in names], object)[
        np.argmax(np.where(np.isnan(contributions), -np.inf, contributions)[held], 1)]
    return named_counts(top, alarms, kinds)


def named_counts(named: np.ndarray, alarms: np.ndarray, kinds: np.ndarray) -> dict[tuple[str, str], int]:
    """Alarm ticks by (kind, the modality `named` at each; a tick naming none left out): `attribution_counts`, and
    the same of the output's `cause`."""
    named, alarms = np.asarray(named, object), np.asarray(alarms, bool)
    kept = alarms & np.fromiter((n is not None for n in named), bool, len(named))
    if not kept.any():
        return {}
    pairs = pl.DataFrame({"kind": kinds[kept].astype(str), "modality": named[kept].astype(str)})
    return {(k, m): int(n) for k, m, n in pairs.group_by("kind", "modality").len().iter_rows()}


def chunk_part(chunk: pl.DataFrame, spec: Spec) -> tuple[ChunkPart, pl.DataFrame]:
    """A chunk's `ChunkPart` and its labelled ticks' scores (`kind` and a column per score name)."""
    labels = chunk["label"].to_numpy().astype(bool)
    scores = score_arrays(chunk, spec)
    pred = to_labels(scores["fused"], chunk["threshold"].to_numpy()).astype(bool)
    points = {key: int(hit.sum()) for key, hit in (("tp", pred & labels), ("fp", pred & ~labels),
                                                   ("fn", ~pred & labels), ("tn", ~pred & ~labels))}
    kinds = chunk["label_kind"].fill_null("").to_numpy().astype(str)[labels]
    every_kind = np.full(len(labels), NORMAL_TICKS, object)
    every_kind[labels] = np.where(kinds == "", KINDLESS, kinds)
    positives = pl.DataFrame({"kind": kinds.astype(str), **{n: v[labels] for n, v in scores.items()}})
    flags = pl.DataFrame({"g": chunk.select(entity_string(spec.entity)).to_series(), "p": pred, "y": labels})
    part = ChunkPart(ticks=len(labels), labelled=int(labels.sum()), points=points, names=list(scores),
                     seen={n for n, v in scores.items() if not np.isnan(v).all()}, kinds=set(kinds) - {""},
                     runs=run_edges(flags), pieces=event_pieces(flags),
                     first_entity=str(chunk[spec.entity[0]][0]) if chunk.height else None,
                     attribution=attribution_counts(scores, pred, every_kind),
                     causes=named_counts(chunk[CAUSE].to_numpy(), pred, every_kind) if CAUSE in chunk.columns else {})
    return part, positives


def ranking_tallies(positives: list[pl.DataFrame], names: list[str], kinds: list[str]) -> dict[str, RankingTally]:
    """The frozen `RankingTally` of each score column from the chunks' labelled ticks (`chunk_part`): groups are
    the places of the kinds in `kinds` (-1: a labelled tick without a kind)."""
    codes = {k: i for i, k in enumerate(kinds)}
    tallies = {name: RankingTally() for name in names}
    for frame in positives:
        groups = np.array([codes.get(k, -1) for k in frame["kind"].to_list()], np.int64)
        for name in names:
            if name in frame.columns:
                tallies[name].add_positives(frame[name].to_numpy(), groups)
    for tally in tallies.values():
        tally.freeze()
    return tallies


SINCE_EVENT_MINUTES = (5, 15)   # where the shortfall splits the normal ticks by time since an event's end (and at
                                # `settle_us`: past it they are clear of events)


def since_event_classes(spec: Spec) -> list[tuple[str, float]]:
    """The classes of normal ticks by time since their entity's last labelled event ended, as (name, upper bound
    in microseconds, inclusive): `SINCE_EVENT_MINUTES` below `settle_us`, then `settle_us`, then `clear` (later,
    or no event before the tick)."""
    settle = settle_us(spec)
    uppers = sorted({m * 60_000_000 for m in SINCE_EVENT_MINUTES if m * 60_000_000 < settle} | {settle})
    lowers = [0, *uppers[:-1]]
    return [(f"{lo / 60e6:g}-{hi / 60e6:g} min", float(hi)) for lo, hi in zip(lowers, uppers)] + [("clear", np.inf)]


def negative_counts(tallies: dict[str, RankingTally], chunk: pl.DataFrame, spec: Spec
                    ) -> dict[Any, NegativeCounts | PairCounts]:
    """The second pass over a chunk, where it lies: its normal ticks counted against each column's positives;
    with `since_event_us` in the chunk also the fused score's normal ticks of each `since_event_classes` class
    as pairs (key `("fused", class)`, for the shortfall's split)."""
    normal = ~chunk["label"].to_numpy().astype(bool)
    scores = score_arrays(chunk, spec)
    out: dict[Any, NegativeCounts | PairCounts] = {name: tallies[name].count_negatives(values[normal])
                                                   for name, values in scores.items() if name in tallies}
    if "fused" in tallies and "since_event_us" in chunk.columns:
        since = chunk["since_event_us"].cast(pl.Float64).fill_null(np.inf).to_numpy()[normal]
        classes = since_event_classes(spec)
        which = np.searchsorted(np.array([hi for _, hi in classes]), since, "left")   # first class reaching it
        fused = scores["fused"][normal]
        for i, (name, _) in enumerate(classes):
            out[("fused", name)] = tallies["fused"].count_pairs(fused[which == i])
    return out


def split_counts(counts: dict[Any, NegativeCounts | PairCounts] | None
                 ) -> tuple[dict[str, NegativeCounts], dict[str, PairCounts]]:
    """`negative_counts` (added up) as each column's counts and the fused score's pairs by class."""
    counts = counts or {}
    return ({k: c for k, c in counts.items() if isinstance(c, NegativeCounts)},
            {k[1]: c for k, c in counts.items() if isinstance(c, PairCounts)})


def add_negative_counts(a: dict[Any, NegativeCounts | PairCounts] | None, b: dict[Any, NegativeCounts | PairCounts]
                        ) -> dict[Any, NegativeCounts | PairCounts]:
    """Two chunks' `negative_counts` together (in any order)."""
    if a is None:
        return b
    return {name: a[name] + b[name] if name in a and name in b else a.get(name) or b[name] for name in a | b}


CURVE_POINTS = 2000         # a curve's corners kept for a figure (`thin`)


def thin(*curves: np.ndarray, points: int = CURVE_POINTS) -> tuple[np.ndarray, ...]:
    """Curves of equal length downsampled alike to <= `points` points (the first and last kept)."""
    keep = np.unique(np.linspace(0, len(curves[0]) - 1, min(len(curves[0]), points)).astype(int))
    return tuple(c[keep] for c in curves)


def ranking_metrics(tallies: dict[str, RankingTally], names: list[str], kinds: list[str],
                    curves: list[str] = (), pairs: dict[str, PairCounts] | None = None) -> dict[str, Any]:
    """ROC-AUC and PR-AUC of each of `names` overall and per kind, the fused score's oracle cut and `shortfall`,
    and the ROC and PR curves' corners of each of `curves` (`RankingTally.curve`, `thin`ned), from tallies that
    have counted every negative (`pairs`: the fused score's normal ticks by class, `split_counts`)."""
    overall = {name: {"roc_auc": tallies[name].roc_auc(), "pr_auc": tallies[name].pr_auc()} for name in names}
    by_kind = {kind: {name: {"roc_auc": tallies[name].roc_auc(code), "pr_auc": tallies[name].pr_auc(code)}
                      for name in names} for code, kind in enumerate(kinds)}
    fused = tallies["fused"]
    oracle = fused.best_f1() if fused.positives.size or fused.negatives else None
    return {"overall": overall, "by_kind": by_kind, "oracle": oracle, "shortfall": shortfall(fused, kinds, pairs),
            "curves": {name: thin(*tallies[name].curve()) for name in curves}}


def shortfall(fused: RankingTally, kinds: list[str], pairs: dict[str, PairCounts] | None) -> dict[str, Any] | None:
    """Where the fused ROC-AUC falls short of 1, split two ways that each add up to 1 - ROC-AUC: by the anomaly
    kind of the positive in each pair the negative outranks (`by_kind`, the largest part first, as the text and
    the report page list it), and by the class of the normal tick
    (`by_normal_ticks`: time since its entity's last event ended, `since_event_classes`; with `pairs` only).
    None without positives or negatives."""
    if not fused.positives.size or not fused.negatives:
        return None
    by_kind = {kind: fused.shortfall(code) for code, kind in enumerate(kinds)}
    if (fused.groups < 0).any():                     # labelled ticks without a kind
        by_kind["(no kind)"] = fused.shortfall(-1)
    out: dict[str, Any] = {"total": 1.0 - fused.roc_auc(),      # kinds from the largest part down
                           "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))}
    if pairs:
        out["by_normal_ticks"] = {name: {"ticks": c.n, "share": fused.shortfall_of_pairs(c)}
                                  for name, c in pairs.items()}
    return out


EVENT_MIN_TICKS = (1, 2, 3, 5, 10)     # the alarm events' least lengths the event-wise metrics are also given at


def by_min_ticks(alarms: RunTally, catches: CatchTally, ladder: tuple[int, ...] = EVENT_MIN_TICKS
                 ) -> dict[str, dict[str, Any]]:
    """Event-wise metrics when only the alarm events of N ticks or more count (`dmafn alarms --min-ticks N`), for
    each N of `ladder` (keys: N as text): the alarm events kept and the false ones (touching no labelled tick),
    event precision, the labelled events caught (touched by a kept alarm event), event recall and F1. N = 1 is
    the plain event-wise figures."""
    out = {}
    events = len(catches.longest)
    for n in ladder:
        kept, good = alarms.at_least(n)
        caught = catches.caught(n)
        precision = good / kept if kept else 0.0
        recall = caught / events if events else 0.0
        out[str(n)] = {"alarm_events": kept, "false_alarm_events": kept - good, "event_precision": precision,
                       "events": events, "events_caught": caught, "event_recall": recall,
                       "event_f1": f1_of(precision, recall)}
    return out


class MetricsTally:
    """`metrics_table`'s numbers for a window read in chunks (dates, in time order), exactly as if read whole:
    ROC-AUC and PR-AUC per score column, overall and per anomaly kind; the fused score's point-wise, event-wise
    and point-adjusted metrics at its threshold and the oracle F1. Two passes over the same chunks:
    `first_pass` each, `freeze`, `second_pass` each, then `result`. Memory: one chunk, the labelled ticks' scores
    (`dmafn.metrics.RankingTally`), each entity's open run of alarms and of labelled ticks, the runs' counts by
    length and a number per labelled event (`CatchTally`).

    The passes split where chunks lie elsewhere (`pipelines.evaluate_tasks`): `add_part` takes a `chunk_part`
    computed anywhere (in time order), the ranking tallies are built, counted and read where the scores lie
    (`ranking_tallies`, `negative_counts`, `ranking_metrics`), and `result(ranking)` joins them.

    A chunk holds the score columns, `threshold`, `label`, `label_kind` and the entity keys, rows in time order
    per entity, and the baselines' `alone_<m>` columns if any (a column holding no value gets no row)."""

    def __init__(self, spec: Spec, min_ticks: tuple[int, ...] = ()) -> None:
        self.spec = spec
        self.ladder = tuple(sorted(set(EVENT_MIN_TICKS) | set(min_ticks)))   # N of the event-wise figures by length
        self.names: list[str] = []                        # score columns, in order of appearance
        self.seen: set[str] = set()                       # those holding any value
        self.kinds: set[str] = set()
        self.ticks = self.labelled = 0
        self.points = dict.fromkeys(("tp", "fp", "fn", "tn"), 0)
        self.run_tallies = {flag: RunTally() for flag, _ in RUN_FLAGS}
        self.catches = CatchTally()
        self.columns: dict[str, RankingTally] = {}        # in memory, after freeze
        self.pairs: dict[str, PairCounts] = {}            # the fused score's normal ticks by class, second pass
        self.attribution: dict[tuple[str, str], int] = {}  # alarm ticks by (kind, the modality they name)
        self.causes: dict[tuple[str, str], int] = {}       # ... and by the modality their `cause` names
        self._positives: list[pl.DataFrame] = []

    def add_part(self, part: ChunkPart) -> None:
        """One chunk's first pass, chunks in time order."""
        self.names += [n for n in part.names if n not in self.names]
        self.seen |= part.seen
        self.kinds |= part.kinds
        self.ticks += part.ticks
        self.labelled += part.labelled
        for key, n in part.points.items():
            self.points[key] += n
        for flag, (counts, edges) in part.runs.items():
            self.run_tallies[flag].add(counts, edges)
        self.catches.add(part.pieces, part.runs["p"][1])
        for key, n in part.attribution.items():
            self.attribution[key] = self.attribution.get(key, 0) + n
        for key, n in part.causes.items():
            self.causes[key] = self.causes.get(key, 0) + n

    def keep_positives(self, positives: pl.DataFrame) -> None:
        """A chunk's labelled ticks' scores (`chunk_part`), kept here until `freeze`."""
        self._positives.append(positives)

    def first_pass(self, chunk: pl.DataFrame) -> None:
        part, positives = chunk_part(chunk, self.spec)
        self.add_part(part)
        self.keep_positives(positives)

    def close_runs(self) -> None:
        """End of the first pass: count the runs still open."""
        for tally in self.run_tallies.values():
            tally.finish()
        self.catches.finish()

    def freeze(self) -> None:
        """End of the first pass: count the runs still open and sort the labelled ticks' scores."""
        self.close_runs()
        self.columns, self._positives = ranking_tallies(self._positives, self.names, self.kind_list), []

    @property
    def kind_list(self) -> list[str]:
        return sorted(self.kinds)

    @property
    def reported(self) -> list[str]:
        """The score columns that get a row: those holding any value, and the fused score."""
        return [n for n in self.names if n in self.seen or n == "fused"]

    def second_pass(self, chunk: pl.DataFrame) -> None:
        counts, pairs = split_counts(negative_counts(self.columns, chunk, self.spec))
        for name, c in counts.items():
            self.columns[name].add_counts(c)
        self.pairs = {name: self.pairs[name] + c if name in self.pairs else c for name, c in pairs.items()}

    def result(self, ranking: dict[str, Any] | None = None) -> dict[str, Any]:
        """The metrics; `ranking`: `ranking_metrics` computed elsewhere (else of the tallies held here)."""
        ranking = ranking or ranking_metrics(self.columns, self.reported, self.kind_list, pairs=self.pairs)
        result: dict[str, Any] = {"ticks": self.ticks, "anomalous_ticks": self.labelled,
                                  "overall": ranking["overall"], "by_kind": ranking["by_kind"]}
        if ranking.get("shortfall"):
            result["shortfall"] = ranking["shortfall"]
        result["overall"]["fused"] |= self._fused(ranking["oracle"])
        result["attribution"] = self._by_kind(self.attribution)
        result["causes"] = self._by_kind(self.causes)
        return result

    @staticmethod
    def _by_kind(counts: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
        """Alarm ticks per kind (in order, then `NORMAL_TICKS`) and modality named, the most named first."""
        out: dict[str, dict[str, int]] = {}
        for kind in [*sorted({k for k, _ in counts} - {NORMAL_TICKS}), NORMAL_TICKS]:
            named = sorted(((m, n) for (k, m), n in counts.items() if k == kind), key=lambda p: (-p[1], p[0]))
            if named:
                out[kind] = dict(named)
        return out

    def _fused(self, oracle: tuple[float, int, int] | None) -> dict[str, Any]:
        tp, fp, fn, tn = (self.points[k] for k in ("tp", "fp", "fn", "tn"))
        out = count_metrics(tp, fp, fn, tn)
        events, alarms = self.run_tallies["y"], self.run_tallies["p"]
        precision = alarms.hit / alarms.runs if alarms.runs else 0.0
        recall = events.hit / events.runs if events.runs else 0.0
        out |= {"event_precision": precision, "event_recall": recall,
                "event_f1": f1_of(precision, recall),
                "event_by_min_ticks": by_min_ticks(alarms, self.catches, self.ladder)}
        # point adjustment: every tick of an event with an alarm inside counts as found (only beside the point-wise F1)
        out["f1_point_adjusted"] = count_metrics(events.hit_ticks, fp, self.labelled - events.hit_ticks, tn)["f1"]
        if self.labelled and oracle is not None:         # an oracle: chosen with the labels, reported only
            threshold, found, wrong = oracle
            out["oracle_threshold"] = threshold
            out["oracle_f1"] = count_metrics(found, wrong, self.labelled - found, 0)["f1"]
        return out


def contributing_modalities(scores: pl.DataFrame, spec: Spec) -> list[str]:
    """The modalities with a contribution column holding any value (a relation-only context holds none)."""
    return [m for m in spec.modalities
            if f"score_{m}" in scores.columns and scores[f"score_{m}"].null_count() < scores.height]


def metrics_table(df: pl.DataFrame, spec: Spec) -> dict[str, Any]:
    """Metrics per score column and per anomaly kind. `df` holds scores, `threshold`, `label`, `label_kind`, rows
    in time order per entity; the baselines' `alone_<m>` if any (a column holding no value gets no row)."""
    tally = MetricsTally(spec)
    tally.first_pass(df)
    tally.freeze()
    tally.second_pass(df)
    return tally.result()


def event_intervals(labels: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """The labelled intervals (`align.label_intervals`) numbered `_event`."""
    return label_intervals(labels, spec, spec.labels.start, spec.labels.end).with_row_index("_event")


def event_firsts(ticks: pl.DataFrame, intervals: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Per labelled interval (`event_intervals`) with a tick of `ticks` inside it: the first such tick (`_tick`) and
    the first alarm inside it (`_first`, null where none); the earlier of two chunks' is the first of both
    (`earliest`). As-of joins per entity over the intervals that overlap the ticks' time span: the cost grows with
    ticks + those intervals, not ticks x intervals, nor with the window's other intervals."""
    if ticks.is_empty():
        intervals = intervals.clear()
    else:
        intervals = intervals.filter((pl.col("_e") >= ticks[TIME].min()) & (pl.col("_s") <= ticks[TIME].max()))
    scored = ticks.select([*keys, pl.col(TIME).alias("_tick")]).sort("_tick")
    alarms = ticks.filter(pl.col("is_anomaly").cast(pl.Boolean)).select([*keys, pl.col(TIME).alias("_alarm")]).sort("_alarm")
    return (intervals.sort("_s")
            .join_asof(scored, left_on="_s", right_on="_tick", by=keys, strategy="forward", check_sortedness=False)
            .join_asof(alarms, left_on="_s", right_on="_alarm", by=keys, strategy="forward", check_sortedness=False)
            .select("_event", pl.when(pl.col("_tick") <= pl.col("_e")).then(pl.col("_tick")).alias("_tick"),
                    pl.when(pl.col("_alarm") <= pl.col("_e")).then(pl.col("_alarm")).alias("_first"))
            .filter(pl.col("_tick").is_not_null()))


def earliest(firsts: list[pl.DataFrame]) -> pl.DataFrame:
    """`event_firsts` of several chunks combined: the earlier tick and alarm of each interval."""
    return pl.concat(firsts).group_by("_event").agg(pl.col("_tick").min(), pl.col("_first").min())


def detection_summary(intervals: pl.DataFrame, firsts: pl.DataFrame, spec: Spec) -> dict[str, Any]:
    """How soon the calibrated alarms catch each labelled event: per anomaly kind and overall, the events with at
    least one scored tick, how many raised an alarm inside them, and for those the delay from the event's start to
    its first alarm (median and 90th percentile, minutes) and the share of the event gone by then (median). A
    gradual fault's ROC-AUC counts every tick of its onset, where the fault is still smaller than the noise; the
    delay says what an operator waits. `firsts`: `event_firsts` of the window's ticks."""
    events = (intervals.join(firsts, on="_event").filter(pl.col("_tick").is_not_null())
              .with_columns(((pl.col("_first") - pl.col("_s")) / 60e6).alias("delay_min"),
                            ((pl.col("_first") - pl.col("_s")) / pl.max_horizontal(pl.col("_e") - pl.col("_s"),
                                                                                spec.grain_us)).alias("elapsed")))

    def summary(rows: pl.DataFrame) -> dict[str, Any]:
        found = rows.filter(pl.col("_first").is_not_null())
        delays, elapsed = found["delay_min"].to_numpy(), found["elapsed"].to_numpy()
        return {"events": rows.height, "detected": found.height,
                "median_delay_min": float(np.median(delays)) if delays.size else None,
                "p90_delay_min": float(np.quantile(delays, 0.9)) if delays.size else None,
                "median_elapsed_share": float(np.median(elapsed)) if elapsed.size else None}

    return {"overall": summary(events),
            "by_kind": {kind: summary(events.filter(pl.col("_kind") == kind))
                        for kind in sorted(events["_kind"].unique().to_list())}}


def detection(ticks: pl.DataFrame, labels: pl.DataFrame, spec: Spec) -> dict[str, Any]:
    """`detection_summary` of scored `ticks` held in memory (with `is_anomaly` and the tick time column)."""
    intervals = event_intervals(labels, spec)
    return detection_summary(intervals, event_firsts(ticks, intervals, list(spec.entity)), spec)


@dataclass
class WindowPart:
    """`WindowEvaluation`'s first pass of one chunk (`window_part`): the metrics' part, the alarm counts, the
    first tick and alarm inside each labelled interval and the entities scored - small, whatever the chunk."""
    metrics: ChunkPart
    counts: dict[str, Any]
    firsts: pl.DataFrame
    entities: pl.DataFrame | None = None           # the entity keys with a tick in the chunk, each once


def window_part(chunk: pl.DataFrame, spec: Spec, intervals: pl.DataFrame) -> tuple[WindowPart, pl.DataFrame]:
    """A chunk's `WindowPart` and its labelled ticks' scores (`chunk_part`)."""
    metrics, positives = chunk_part(chunk, spec)
    keys = list(spec.entity)
    return WindowPart(metrics, alarm_counts(chunk, spec), event_firsts(chunk, intervals, keys),
                      chunk.select(keys).unique()), positives


NEVER_SCORED = "entity with no scored tick in the window"
NONE_INSIDE = "no scored tick inside the event"
UNSCORED_SHOWN = 5          # unscored events named in the printed line (`labels_unscored.parquet` keeps them all)


def unscored_events(intervals: pl.DataFrame, firsts: pl.DataFrame, entities: pl.DataFrame, window_us: tuple[int, int],
                    spec: Spec) -> pl.DataFrame:
    """The labelled events (`event_intervals`) that overlap the window [start, end) of microseconds but hold none
    of its scored ticks - so no metric counts them: the entity keys, start, end, `kind` and a `reason`:
    `NEVER_SCORED` (an entity the scores do not hold in the window: a key written otherwise than in the input,
    or an entity whose input is missing) or `NONE_INSIDE` (its ticks were not scored there: its input missing
    for those hours, a date not scored, or an event shorter than the grain between two ticks). `firsts`:
    `earliest` of the window's `event_firsts`; `entities`: the entity keys scored in the window."""
    keys = list(spec.entity)
    lo, hi = window_us
    seen = firsts.filter(pl.col("_tick").is_not_null()).select("_event")
    known = entities.unique().with_columns(pl.lit(True).alias("_known"))
    missing = (intervals.filter((pl.col("_e") >= lo) & (pl.col("_s") < hi)).join(seen, on="_event", how="anti")
               .join(known, on=keys, how="left").sort("_event"))
    at = pl.Datetime("us", "UTC")
    return missing.select(*keys, pl.col("_s").cast(at).alias(spec.labels.start),
                          pl.col("_e").cast(at).alias(spec.labels.end), pl.col("_kind").alias("kind"),
                          pl.when(pl.col("_known")).then(pl.lit(NONE_INSIDE)).otherwise(pl.lit(NEVER_SCORED))
                          .alias("reason"))


def unscored_summary(unscored: pl.DataFrame, spec: Spec) -> dict[str, Any]:
    """`unscored_events` counted per reason, with the first `UNSCORED_SHOWN` named (for `metrics.json`, the text
    and the page)."""
    start, end = spec.labels.start, spec.labels.end
    reasons = dict(unscored.group_by("reason").len().sort("reason").iter_rows())
    named = [f"{' '.join(f'{k}={row[k]}' for k in spec.entity)} {row[start]:%Y-%m-%d %H:%M} to "
             f"{row[end]:%Y-%m-%d %H:%M} UTC, {row['kind']}" + (f" ({row['reason']})" if len(reasons) > 1 else "")
             for row in unscored.head(UNSCORED_SHOWN).iter_rows(named=True)]
    return {"events": unscored.height, "by_reason": reasons, "first": named}


class WindowEvaluation:
    """What `evaluate` and the report page say of a labelled window read in chunks (dates in time order, two
    passes as `MetricsTally`): the metrics, the alarm rates against the expected one, and detection. The first
    pass takes chunks (`first_pass`) or their `window_part` computed elsewhere (`add_part`); `min_ticks`: more N
    for the event-wise figures by alarm length than `EVENT_MIN_TICKS`."""

    def __init__(self, spec: Spec, labels: pl.DataFrame, dates: list[str] | None = None,
                 min_ticks: tuple[int, ...] = ()) -> None:
        self.spec, self.intervals = spec, event_intervals(labels, spec)
        self.metrics = MetricsTally(spec, min_ticks)
        self.counts: dict[str, Any] | None = None
        self.firsts: list[pl.DataFrame] = []             # each chunk's `event_firsts`: its intervals only
        self.window_us = (date_start_us(dt.date.fromisoformat(dates[0]), spec.timezone),
                          date_end_us(dt.date.fromisoformat(dates[-1]), spec.timezone)) if dates else None
        self.entities = pl.DataFrame(schema=self.intervals.select(spec.entity).schema)   # scored so far, each once
        self.unscored: pl.DataFrame | None = None        # `unscored_events`, set by `result` (given the dates)

    def add_part(self, part: WindowPart) -> None:
        self.metrics.add_part(part.metrics)
        self.counts = add_counts(self.counts, part.counts)
        self.firsts.append(part.firsts)
        if part.entities is not None and part.entities.height:
            self.entities = pl.concat([self.entities, part.entities], how="vertical_relaxed").unique()

    def first_pass(self, chunk: pl.DataFrame) -> None:
        part, positives = window_part(chunk, self.spec, self.intervals)
        self.add_part(part)
        self.metrics.keep_positives(positives)

    def freeze(self) -> None:
        self.metrics.freeze()

    def second_pass(self, chunk: pl.DataFrame) -> None:
        self.metrics.second_pass(chunk)

    def result(self, storage: Storage, ranking: dict[str, Any] | None = None) -> dict[str, Any]:
        """`metrics_table`'s dict with `alarm_rates` and `detection` added (`ranking`: as `MetricsTally.result`), and
        with the window's dates its `unscored_events` counted (`unscored_summary`; the events themselves kept in
        `unscored`)."""
        result = self.metrics.result(ranking) | alarm_rates(self.counts, self.spec, storage)
        firsts = earliest(self.firsts)
        result["detection"] = detection_summary(self.intervals, firsts, self.spec)
        if self.window_us is not None:
            self.unscored = unscored_events(self.intervals, firsts, self.entities, self.window_us, self.spec)
            if self.unscored.height:
                result["unscored_events"] = unscored_summary(self.unscored, self.spec)
        return result


def settle_us(spec: Spec) -> int:
    """How long an event can still move the score after it ends: the longest reach of a modality (its window
    or tolerance) plus the smoothing's settling time (EWMA: until a step's weight is under 5 %; rolling: its
    window), in microseconds."""
    sm = spec.score.smoothing
    ticks = (int(np.ceil(np.log(0.05) / np.log(1 - sm.alpha))) if sm.method == "ewma" and 0 < sm.alpha < 1
             else sm.window if sm.method == "rolling" else 0)
    return max(m.lookback_us for m in spec.modalities.values()) + ticks * spec.grain_us


def alarm_counts(df: pl.DataFrame, spec: Spec) -> dict[str, Any]:
    """What `alarm_rates` needs of some labelled scored ticks, as counts that add up over chunks (`add_counts`)."""
    alarms = df["is_anomaly"].to_numpy().astype(bool)
    normal = ~df["label"].to_numpy().astype(bool)
    clear = normal
    if "since_event_us" in df.columns:
        since = df["since_event_us"].fill_null(np.iinfo(np.int64).max).to_numpy()
        clear = normal & (since > settle_us(spec))
    return {"ticks": int(alarms.size), "alarms": int(alarms.sum()), "normal": int(normal.sum()),
            "false_alarms": int(alarms[normal].sum()), "clear": int(clear.sum()),
            "clear_alarms": int(alarms[clear].sum()), "versions": set(df["model_version"].unique().to_list())}


def add_counts(total: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """Two `alarm_counts` together."""
    if total is None:
        return more
    return {k: total[k] | v if isinstance(v, set) else total[k] + v for k, v in more.items()}


def alarm_rates(df: pl.DataFrame | dict[str, Any], spec: Spec, storage: Storage) -> dict[str, Any]:
    """The alarm rate of the scored ticks and the false-alarm rate (alarms on ticks labelled normal) against
    the rate the model version expects: its validation days' alarm rate (`validation_alarm_rate` in the
    manifest's `calibration.validation`: clean days, so every alarm there is a false one). Besides, the false-alarm rate on
    the normal ticks clear of events (more than `settle_us` after the end of the entity's last labelled
    event): the like-for-like comparison with the clean validation days, since right after an event the
    windows still hold its rows and the smoothing its scores. `df`: the labelled scored ticks or their
    `alarm_counts`."""
    from pipelines.registry import Registry

    c = alarm_counts(df, spec) if isinstance(df, pl.DataFrame) else df
    out: dict[str, Any] = {"alarm_rate": c["alarms"] / c["ticks"] if c["ticks"] else 0.0,
                           "false_alarm_rate": c["false_alarms"] / c["normal"] if c["normal"] else 0.0,
                           "false_alarm_rate_clear": c["clear_alarms"] / c["clear"] if c["clear"] else None,
                           "clear_after_minutes": settle_us(spec) / 60e6, "clear_ticks": c["clear"],
                           "expected_false_alarm_rate": {}, "validation_outliers_left_out": {}}
    registry = Registry(spec.registry, storage)
    for version in sorted(c["versions"]):
        try:
            manifest = registry.manifest(version)
        except DataError as exc:
            log.warning("model version %s: %s (no expected alarm rate)", version, exc)
            continue
        # read as the version's calibration reads it (older versions kept the summary in `metrics`)
        calibration = Calibration.from_dict(manifest["calibration"], validation=manifest.get("metrics"))
        if calibration.expected_alarm_rate is not None:
            out["expected_false_alarm_rate"][version] = float(calibration.expected_alarm_rate)
        out["validation_outliers_left_out"][version] = calibration.outliers_left_out
    return out


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: ROC-AUC per score column and kind, and the fused score's F1 at its threshold."""
    names = list(result["overall"])
    kinds = list(result["by_kind"])
    width = max(len(n) for n in names) + 2
    lines = [f"{'ROC-AUC':<{width}}" + "".join(f"{k:>13}" for k in ["overall", *kinds])]
    for n in names:
        cells = [result["overall"][n]["roc_auc"], *[result["by_kind"][k][n]["roc_auc"] for k in kinds]]
        lines.append(f"{n:<{width}}" + "".join(f"{c:>13.3f}" for c in cells))
    f = result["overall"]["fused"]
    lines.append("")
    lines.append(f"fused at the calibrated threshold: precision {f['precision']:.3f}  recall {f['recall']:.3f}  "
                 f"F1 {f['f1']:.3f}  FAR {f['far']:.4f}  MAR {f['mar']:.3f}  PR-AUC {f['pr_auc']:.3f}")
    lines.append(f"  event-wise: precision {f['event_precision']:.3f}  recall {f['event_recall']:.3f}  "
                 f"F1 {f['event_f1']:.3f}   (point-adjusted F1 {f['f1_point_adjusted']:.3f}, shown only beside "
                 f"the point-wise F1 {f['f1']:.3f})")
    lines += min_ticks_lines(f.get("event_by_min_ticks"))
    if "oracle_f1" in f:
        lines.append(f"  oracle (threshold chosen with the labels, not deployable): best point-wise F1 "
                     f"{f['oracle_f1']:.3f} at {f['oracle_threshold']:.3f} vs the calibrated {f['f1']:.3f}")
    if "alarm_rate" in result:
        expected = result["expected_false_alarm_rate"]
        said = ", ".join(f"{100 * r:.2f} % ({v})" for v, r in expected.items()) or "unknown"
        lines.append(f"  alarms on {100 * result['alarm_rate']:.2f} % of ticks; false alarms on "
                     f"{100 * result['false_alarm_rate']:.2f} % of the ticks labelled normal, expected {said} "
                     "from the validation days")
        for version, left in result.get("validation_outliers_left_out", {}).items():
            if left:
                lines.append(f"  model version {version}: {left} validation ticks were left out of its calibration as "
                             "outliers (train.validation_outlier_limit) - its validation days likely held incidents "
                             "nobody labelled, whose slower parts may have raised the threshold")
        if result.get("false_alarm_rate_clear") is not None:
            lines.append(f"  clear of events (normal ticks more than {result['clear_after_minutes']:.0f} min after "
                         f"an event's end: windows' reach + smoothing; {result['clear_ticks']} ticks): false "
                         f"alarms on {100 * result['false_alarm_rate_clear']:.2f} %")
    if result.get("detection"):
        lines.append("  detection at the calibrated threshold (events caught; of those, minutes from the event's start "
                     "to its first alarm, median / p90, and the share of the event gone by then):")
        for kind, d in [("overall", result["detection"]["overall"]), *result["detection"]["by_kind"].items()]:
            lines.append(f"    {kind:<14}{d['detected']:>4}/{d['events']:<4}" + (
                f"  {d['median_delay_min']:6.1f} / {d['p90_delay_min']:6.1f} min  {100 * d['median_elapsed_share']:3.0f} %"
                if d["detected"] else "  none caught"))
    lines += attribution_lines(result.get("attribution"))
    lines += attribution_lines(result.get("causes"), CAUSE_HEAD)
    lines += shortfall_lines(result.get("shortfall"))
    lines.append(f"ticks {result['ticks']}, labelled anomalous {result['anomalous_ticks']}")
    if result.get("unscored_events"):
        lines.append(f"labels: {unscored_line(result['unscored_events'])} (labels_unscored.parquet in the report "
                     "folder)")
    if result.get("labels", {}).get("unusable"):
        lab = result["labels"]
        reasons = ", ".join(f"{n} {why}" for why, n in lab["unusable"].items())
        lines.append(f"labels: {lab['used']} of {lab['rows']} rows used; left out: {reasons} "
                     f"(labels_unusable.parquet in the report folder)")
    return "\n".join(lines)


ATTRIBUTION_HEAD = "which modality the alarm ticks name (the largest contribution at each; `normal`: false alarms):"
CAUSE_HEAD = ("which modality their cause names (the output's `cause`: the largest contribution that no other modality "
              "explains, with each hidden in turn; at the alarm ticks whose own score is over the threshold):")


def attribution_lines(attribution: dict[str, dict[str, int]] | None, head: str = ATTRIBUTION_HEAD) -> list[str]:
    """`MetricsTally`'s attribution (or causes) as text lines: per kind, the share of its alarm ticks each modality
    is named at (the three most named); none without alarm ticks."""
    if not attribution:
        return []
    lines = [f"  {head}"]
    for kind, named in attribution.items():
        total = sum(named.values())
        shares = ", ".join(f"{m} {100 * n / total:.0f} %" for m, n in list(named.items())[:3])
        lines.append(f"    {kind:<14}{shares}  ({total} ticks)")
    return lines


def min_ticks_lines(ladder: dict[str, dict[str, Any]] | None) -> list[str]:
    """`by_min_ticks` as text lines (none without it)."""
    if not ladder:
        return []
    lines = ["  event-wise when only alarm events of N ticks or more count (`dmafn alarms --min-ticks N`;",
             "  a labelled event is a run of labelled ticks, as above: labels that overlap or touch make one):",
             f"    {'N':>3} {'alarm events':>13} {'false':>7} {'precision':>10} {'events caught':>15} {'recall':>7} "
             f"{'F1':>6}"]
    for n, e in ladder.items():
        lines.append(f"    {n:>3} {e['alarm_events']:>13} {e['false_alarm_events']:>7} {e['event_precision']:>10.3f} "
                     f"{e['events_caught']:>7} of {e['events']:<4} {e['event_recall']:>7.3f} {e['event_f1']:>6.3f}")
    return lines


def unscored_line(unscored: dict[str, Any]) -> str:
    """`unscored_summary` in words: how many labelled events no metric counts, why, and the first of them."""
    reasons = ", ".join(f"{n} {why}" for why, n in unscored["by_reason"].items())
    more = unscored["events"] - len(unscored["first"])
    return (f"{unscored['events']} labelled event(s) in the window hold no scored tick, so no metric counts them "
            f"({reasons}): {'; '.join(unscored['first'])}" + (f"; {more} more" if more > 0 else ""))


def shortfall_lines(short: dict[str, Any] | None) -> list[str]:
    """`shortfall` as text lines (none without it)."""
    if not short:
        return []
    lines = [f"  where the fused ROC-AUC falls short of 1 (by {short['total']:.3f}; each split adds up to it):",
             "    by the anomaly kind outranked: " + ", ".join(f"{k} {v:.3f}" for k, v in short["by_kind"].items())]
    if short.get("by_normal_ticks"):
        lines.append("    by the normal ticks outranking, time since their last event ended: " + ", ".join(
            f"{name} {c['share']:.3f} ({c['ticks']} ticks)" for name, c in short["by_normal_ticks"].items()))
    return lines


PLOT_POINTS = 4000          # the PNG is ~1,500 pixels wide: more points than this only cost memory


def plot_rows(chunk: pl.DataFrame, spec: Spec, entity: str, bucket_us: int) -> pl.DataFrame:
    """One entity's rows of a chunk for `plot_entity`, each `bucket_us` of time as its highest scores (a spike
    stays visible) and its labelled kind: what the plot holds grows with its points, not with the window."""
    key = spec.entity[0]
    cols = ["score", "threshold", *[c for c in chunk.columns if c.startswith("score_")]]
    one = (chunk.filter(pl.col(key).cast(pl.String) == entity)
           .select("ts", *cols, pl.col("label_kind").cast(pl.Categorical)).sort("ts"))
    return (one.group_by_dynamic("ts", every=f"{max(int(bucket_us), 1)}us")
            .agg(*[pl.col(c).max() for c in cols], pl.col("label_kind").drop_nulls().first())
            .with_columns(pl.lit(entity).alias(key)))


def plot_entity(df: pl.DataFrame, spec: Spec, path: Path, entity: str | None = None) -> Path:
    """PNG: fused score, threshold and labelled anomalies (shaded by kind) over time for one entity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = spec.entity[0]
    entity = entity or str(df[key][0])
    one = df.filter(pl.col(key).cast(pl.String) == entity).sort("ts")
    ts = one["ts"].to_numpy()
    fig, axes = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    axes[0].plot(ts, one["score"].to_numpy(), lw=0.7, color="black", label="fused score")
    axes[0].axhline(float(one["threshold"][0]), color="red", ls="--", lw=1, label="threshold")
    colors = plt.cm.tab10.colors
    kinds = sorted(k for k in one["label_kind"].unique().to_list() if k)
    for ax in axes:
        for i, kind in enumerate(kinds):
            mask = (one["label_kind"] == kind).to_numpy()
            ax.fill_between(ts, 0, 1, where=mask, transform=ax.get_xaxis_transform(), color=colors[i % 10],
                            alpha=0.25, label=kind if ax is axes[0] else None)
    for m in spec.modalities:
        if f"score_{m}" in one.columns:
            axes[1].plot(ts, one[f"score_{m}"].cast(pl.Float64).to_numpy(), lw=0.6, label=f"score_{m}")
    axes[0].set_title(f"{spec.name}: {entity}")
    axes[0].set_ylabel("fused score")
    axes[1].set_ylabel("per-modality contribution")
    axes[0].legend(loc="upper right", fontsize=8, ncol=4)
    axes[1].legend(loc="upper right", fontsize=8, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def open_scores(spec: Spec, storage: Storage) -> DeltaTable:
    """The output table at its current version: every pass of an evaluation reads this one snapshot, whatever
    a job commits meanwhile."""
    try:
        table = read_table(storage.delta_uri(spec.score.output), storage.delta_options(spec.score.output))
    except Exception as exc:  # noqa: BLE001 - any reader failure: say which table
        raise DataError(f"scores {spec.score.output}: cannot be read ({exc})") from None
    if table is None:
        raise DataError(f"scores {spec.score.output}: no such table (nothing scored yet)")
    if problems := table_mismatch(table, (*spec.entity, *SCORED_COLUMNS)):
        raise DataError(f"scores {spec.score.output}: not an output table dmafn wrote for this spec "
                        f"({'; '.join(problems)})")
    return table


def score_types(table: DeltaTable) -> dict[str, pl.DataType]:
    """The output table's column types, from its log (no data file is read)."""
    return dict(scan_table(table).collect_schema())


def score_dates(table: DeltaTable, spec: Spec, start: dt.date | None = None, end: dt.date | None = None) -> list[str]:
    """The dates in [start, end] that the output table holds, from its log (no data file is read)."""
    dates = sorted({p["date"] for p in table.partitions()})
    dates = [d for d in dates if (not start or d >= start.isoformat()) and (not end or d <= end.isoformat())]
    if not dates:
        within = (f" in {start}..{end}" if start and end else f" from {start} on" if start
                  else f" up to {end}" if end else "")
        raise DataError(f"scores {spec.score.output}: no scored dates{within}")
    return dates


def read_score_date(table: DeltaTable, spec: Spec, date: str) -> pl.DataFrame:
    """The output table's rows of one date (its partition alone), in time order per entity."""
    try:
        df = scan_table(table).filter(pl.col("date") == date).collect()
    except Exception as exc:  # noqa: BLE001 - any reader failure: say which table
        raise DataError(f"scores {spec.score.output}: date {date} cannot be read ({exc})") from None
    return df.sort([*spec.entity, "ts"])


def score_chunks(table: DeltaTable, spec: Spec, dates: list[str], labels: pl.DataFrame | LabelIndex | None,
                 beside: DeltaTable | None = None) -> Iterator[pl.DataFrame]:
    """The output table's rows a date at a time, in time order per entity, with the labels attached (`label`,
    `label_kind`, `since_event_us`) when `labels` are given (or their `LabelIndex`), and with `beside` (the
    baselines' table: each modality alone) its `score_<m>` of the same ticks as `alone_<m>` (null where it has no
    row)."""
    index = LabelIndex.build(labels, spec, spec.labels.start, spec.labels.end) \
        if isinstance(labels, pl.DataFrame) else labels
    for date in dates:
        chunk = read_score_date(table, spec, date)
        if beside is not None:
            chunk = with_alone_scores(chunk, read_score_date(beside, spec, date), spec)
        yield chunk if index is None else \
            attach_labels(chunk.with_columns(to_micros(pl.col("ts")).alias(TIME)), index, spec)


def with_alone_scores(chunk: pl.DataFrame, alone: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """`chunk` with the baselines' contributions of its ticks (`score_<m>` of `alone`) as `alone_<m>`, rows kept
    in their order."""
    keys = [*spec.entity, "ts"]
    columns = {f"score_{m}": f"alone_{m}" for m in spec.modalities if f"score_{m}" in alone.columns}
    return chunk.join(alone.select([*keys, *columns]).rename(columns), on=keys, how="left", maintain_order="left")


def ray_running() -> bool:
    """Whether this process is connected to Ray (without importing it)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def evaluate(spec: Spec, *, start: dt.date | None = None, end: dt.date | None = None, report_dir: str | None = None,
             baselines: bool = False, min_ticks: tuple[int, ...] = ()) -> dict[str, Any]:
    """Metrics of the scored dates in [start, end] against the labels; prints and writes the report. `min_ticks`:
    more N than `EVENT_MIN_TICKS` to give the event-wise figures at when only alarm events of N ticks or more count.

    The window is read a date at a time, twice (`MetricsTally`). Connected to Ray (the `dmafn evaluate` job is),
    each date is read and tallied by a task where the cluster has room (`pipelines.evaluate_tasks`): this process
    holds the window's small per-date results, never a scored row. Without Ray it reads the dates itself: memory
    holds one date's scores, the labelled ticks' scores and the labels, whatever the window's length. The numbers
    are the same. With `baselines` each modality alone is trained and scored by the jobs (`pipelines.baselines`,
    on Ray) into `<output>_alone`, read beside the output table."""
    storage = Storage.from_spec(spec.storage)
    table = open_scores(spec, storage)
    dates = score_dates(table, spec, start, end)
    checked = load_labels(spec, storage).keyed_as(spec, score_types(table))
    labels = checked.usable
    beside = open_scores(score_alone(spec, dates), storage) if baselines else None
    bucket_us = max(len(dates) * DAY_US // spec.grain_us // PLOT_POINTS, 1) * spec.grain_us
    if ray_running():
        from pipelines.evaluate_tasks import evaluate_on_tasks

        result, plotted, entity, unscored = evaluate_on_tasks(spec, storage, table, beside, dates, labels,
                                                              bucket_us if report_dir else None, min_ticks)
    else:
        result, plotted, entity, unscored = _evaluate_here(spec, storage, table, beside, dates, labels,
                                                           bucket_us if report_dir else None, min_ticks)
    result["dates"] = dates
    result["labels"] = checked.summary()
    if result.get("unscored_events"):
        log.warning("labels %s: %s", spec.labels.path, unscored_line(result["unscored_events"]))
    text = format_table(result)
    print(text)
    if report_dir:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        if checked.unusable.height:                 # kept beside the metrics they were left out of
            checked.unusable.write_parquet(out / "labels_unusable.parquet")
        if unscored is not None and unscored.height:     # the labelled events no metric counts
            unscored.write_parquet(out / "labels_unscored.parquet")
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
        (out / "metrics.txt").write_text(text + "\n")
        result["plot"] = str(plot_entity(plotted, spec, out / "scores.png", entity))
        print(f"report: {out / 'metrics.txt'}, plot: {result['plot']}")
    return result


def _evaluate_here(spec: Spec, storage: Storage, table: DeltaTable, beside: DeltaTable | None, dates: list[str],
                   labels: pl.DataFrame, bucket_us: int | None, min_ticks: tuple[int, ...] = ()
                   ) -> tuple[dict[str, Any], pl.DataFrame | None, str | None, pl.DataFrame | None]:
    """`evaluate`'s two passes in this process: the result, with `bucket_us` the plot's rows and entity (the
    first of the first date), and the labelled events no scored tick falls in (`unscored_events`)."""
    evaluation, plotted, entity = WindowEvaluation(spec, labels, dates, min_ticks), [], None
    progress = ProgressDisplay("evaluate", 2 * len(dates), "dates")
    for i, chunk in enumerate(score_chunks(table, spec, dates, labels, beside)):
        evaluation.first_pass(chunk)
        if bucket_us and not chunk.is_empty():
            entity = entity or str(chunk[spec.entity[0]][0])
            plotted.append(plot_rows(chunk, spec, entity, bucket_us))
        progress.update(i + 1)
    evaluation.freeze()
    for i, chunk in enumerate(score_chunks(table, spec, dates, labels, beside)):
        evaluation.second_pass(chunk)
        progress.update(len(dates) + i + 1)
    progress.close()
    result = evaluation.result(storage)
    return result, pl.concat(plotted, how="diagonal_relaxed") if plotted else None, entity, evaluation.unscored
