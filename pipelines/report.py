"""`dmafn report`: one self-contained HTML page for a window of scored dates.

Sections: metrics per anomaly kind and per modality (when the spec has labels), ROC and PR curves, per-entity
timelines (fused score on a clipped axis with the threshold, alarms marked, labelled anomalies shaded by kind,
each modality's contribution below), the top alarm events with the modality that dominated each, the runs
table and a data-quality summary from the quarantine table. Figures are inline SVG, styles inline, no script
and nothing fetched: the file opens anywhere, offline, and can be mailed or archived as it is.
"""
from __future__ import annotations

import datetime as dt
import html
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from dmafn.postprocess import events
from dmafn.spec import Spec
from pipelines.align import date_start_us
from pipelines.delta_sink import CAUSE, read_table, scan_table
from pipelines.evaluate import (WindowEvaluation, WindowPart, contributing_modalities, open_scores, ranking_metrics,
                                ray_running, score_chunks, score_dates, score_types, unscored_line, window_part)
from pipelines.evaluate_tasks import TaskPasses
from pipelines.ingest import entity_string, reason_kind
from pipelines.labels import load_labels
from pipelines.postprocess import mark_runs, open_runs
from pipelines.registry import version_facts
from pipelines.score import (CHANGED_INTERVALS, ENTITIES_WITHOUT, MODALITY_SHARE, NEW_PAYLOAD_FORMATS, PRESENT_SHARE,
                             UNMET_KEYS, UNSEEN_RESPELLED, USABLE_ROWS)
from pipelines.storage import DataError, Storage

LINE_COLOURS = ["#1f4e9c", "#0f8a6a", "#b5651d", "#6a3d9a", "#8c564b", "#17a2b8", "#7f7f7f"]   # contributions
KIND_COLOURS = ["#f6c85f", "#9dd866", "#8dddd0", "#ffa056", "#c7b2de", "#b8d7f5", "#e0c9a6"]  # shaded labels
ALARM, THRESHOLD, SCORE = "#d62728", "#d62728", "#222222"
WIDTH, PLOT_HEIGHT = 1000, 180


def build_report(spec: Spec, out: str | Path, *, start: dt.date | None = None, end: dt.date | None = None,
                 entities: list[str] | None = None, top_events: int = 20, max_entities: int = 4,
                 min_ticks: tuple[int, ...] = ()) -> Path:
    """Write the report HTML for the scored dates in [start, end] (default: all) to `out`; returns its path
    (`min_ticks`: more N for the event-wise table by alarm length, as `evaluate` takes them).

    The window is read a date at a time, twice: the first pass tallies the metrics, the alarm events and each
    entity's counts and first and last tick (`report_part` of each date), the second ranks the normal ticks and
    keeps the rows the timelines draw, reduced date by date to a few per pixel column (`timeline_rows`). Connected
    to Ray (the `dmafn report` job is), the dates are read by tasks (`pipelines.evaluate_tasks.TaskPasses`) and
    this process holds the parts, the top events and the drawn rows, however long the window; without Ray it reads
    them itself, also holding a date and the labelled ticks' scores. The page is the same."""
    storage = Storage.from_spec(spec.storage)
    table = open_scores(spec, storage)
    dates = score_dates(table, spec, start, end)
    checked = load_labels(spec, storage).keyed_as(spec, score_types(table)) if spec.labels else None
    labels = checked.usable if checked is not None else None
    evaluation = WindowEvaluation(spec, labels, dates, min_ticks) if labels is not None else None
    window, found = WindowFacts(), AlarmEvents(list(spec.modalities), top_events, spec.timezone)
    first = partial(report_part, spec=spec, top=top_events, intervals=evaluation.intervals if evaluation else None)
    passes = TaskPasses("report", spec, storage, table, None, dates, labels) if ray_running() else None
    intervals = evaluation.intervals if evaluation is not None else None
    for part, positives in (((p, None) for p in passes.first(first, intervals)) if passes else
                            (first(chunk) for chunk in score_chunks(table, spec, dates, labels))):
        window.add_part(part.facts)
        found.add_part(part.events)
        if evaluation is not None:
            evaluation.add_part(part.window)
            if positives is not None:
                evaluation.metrics.keep_positives(positives)
    found.finish()
    chosen = entities or window.busiest(max_entities)
    unknown = sorted(set(chosen) - window.entities)
    if unknown:
        raise DataError(f"report: entity {', '.join(unknown)} has no scores in {dates[0]}..{dates[-1]}")
    modalities = [m for m in spec.modalities if m in window.modalities]
    spans = window.spans(chosen)
    lines = ["score", *[f"score_{m}" for m in modalities]]                 # each drawn as a line
    marks = ["is_anomaly", *(["label_kind"] if labels is not None else [])]  # alarms and labelled spans
    keep = partial(timeline_rows, spec=spec, spans=spans, lines=lines, marks=marks)
    curves = ["fused", *[f"score_{m}" for m in modalities]]
    if passes is not None:
        if evaluation is not None:
            passes.freeze(evaluation.metrics)
        shown = passes.second(keep)
        ranking = passes.ranking(evaluation.metrics, curves) if evaluation is not None else None
    else:
        if evaluation is not None:
            evaluation.freeze()
        shown = []
        for chunk in score_chunks(table, spec, dates, labels):
            if evaluation is not None:
                evaluation.second_pass(chunk)
            shown.append(keep(chunk))
        metrics = evaluation.metrics if evaluation is not None else None
        ranking = ranking_metrics(metrics.columns, metrics.reported, metrics.kind_list, curves, metrics.pairs) \
            if metrics is not None else None
    sections = [_header(spec, window, dates, checked.summary() if checked is not None else None)]
    kinds = evaluation.metrics.kind_list if evaluation is not None else []
    if evaluation is not None:
        sections += [_metrics_section(evaluation.result(storage, ranking)), _curves_section(ranking["curves"])]
    else:
        sections.append('<section id="metrics"><h2>Metrics</h2><p>The spec has no labels: no metrics.</p></section>')
    drawn = drawn_rows(pl.concat(shown, how="diagonal_relaxed"), spans, lines, marks)
    why = "The entities asked for." if entities else \
        f"The {len(chosen)} entities with the most alarm ticks in the window, the most first (--entities names others)."
    sections.append(_timelines_section(drawn, chosen, modalities, kinds, spec.timezone, why))
    sections.append(_events_section(found))
    sections.append(_versions_section(version_facts(spec, storage, window.versions)))
    sections.append(_runs_section(_read_table(spec.score.runs_path, storage, dates)))
    sections.append(_quality_section(_read_table(spec.score.quarantine_path, storage, dates, quarantine_summary)))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(f"DMAFN report: {spec.name} {dates[0]}..{dates[-1]}", "\n".join(sections)))
    return path


@dataclass
class ReportPart:
    """What the report's first pass takes of one date (`report_part`): the header's counts, the alarm runs (those
    inside the date aggregated, the top ones kept; the rows of those at its edges) and, with labels, the
    evaluation's part."""
    facts: dict[str, Any]
    events: "EventsPart"
    window: WindowPart | None


def report_part(chunk: pl.DataFrame, spec: Spec, top: int | None, intervals: pl.DataFrame | None
                ) -> tuple[ReportPart, pl.DataFrame | None]:
    """A chunk's `ReportPart` and, with labels (`intervals`), its labelled ticks' scores."""
    chunk = chunk.with_columns(entity_string(spec.entity).alias("_entity"))
    window, positives = window_part(chunk, spec, intervals) if intervals is not None else (None, None)
    return ReportPart(WindowFacts.part(chunk, spec), AlarmEvents.part(chunk, list(spec.modalities), top), window), \
        positives


def timeline_rows(chunk: pl.DataFrame, spec: Spec, spans: pl.DataFrame, lines: list[str], marks: list[str]
                  ) -> pl.DataFrame:
    """The rows of a chunk the timelines of the entities in `spans` need (`drawn_rows` of `lines` and `marks`)."""
    rows = (chunk.with_columns(entity_string(spec.entity).alias("_entity"))
            .filter(pl.col("_entity").is_in(spans["_entity"].implode()))
            .select("_entity", "ts", "threshold", *lines, *marks))
    return drawn_rows(rows, spans, lines, marks)


PLOT_COLUMNS = WIDTH - 70          # pixel columns of a timeline's plot


def pixel_column(t_us: pl.Expr | np.ndarray, t0: Any, t1: Any) -> Any:
    """The pixel column of a timeline's plot (0..PLOT_COLUMNS-1) that microsecond `t_us` falls in, on an axis from
    `t0` to `t1` (t1 > t0)."""
    column = (t_us - t0) * PLOT_COLUMNS // (t1 - t0)
    return column.clip(0, PLOT_COLUMNS - 1)


def drawn_rows(rows: pl.DataFrame, spans: pl.DataFrame, lines: list[str], marks: list[str]) -> pl.DataFrame:
    """The rows of some entities' ticks (`_entity`, `ts`) their timelines need to look as if drawn through every
    row, in entity and time order, with a column `_line_<c>` for each line column `c` saying which rows its line
    goes through.

    Per pixel column of an entity's axis (`spans`: `_t0`, `_t1` in microseconds) a line keeps its first, last,
    lowest and highest finite value (M4 aggregation: the polyline through them covers the pixels a line through
    every row covers) and its first and last tick without a value (the line breaks there); each `marks` column
    (alarms, labelled kinds) keeps the first and last tick of each of its values (not null, not false). Each
    entity's first and last row are kept. So a timeline holds at most a few rows per pixel column and line however
    long the window and however often a modality comes and goes, and `drawn_rows` of the concatenated
    `drawn_rows` of chunks of a window is `drawn_rows` of the whole window: each date is reduced where it is
    read."""
    frame = (rows.join(spans, on="_entity", how="inner").sort("_entity", "ts", maintain_order=True)
             .with_columns(pixel_column(pl.col("ts").dt.epoch("us"), pl.col("_t0"), pl.col("_t1")).alias("_col"),
                           pl.int_range(pl.len()).alias("_i")))
    i = pl.col("_i")
    keep = (i == i.min().over("_entity")) | (i == i.max().over("_entity"))

    def ends(group: list[str]) -> pl.Expr:
        return (i == i.min().over(group)) | (i == i.max().over(group))

    for column in marks:
        c = pl.col(column)
        marked = c.fill_null(False) if frame.schema[column] == pl.Boolean else c.is_not_null()
        keep = keep | (marked & ends(["_entity", "_col", column]))
    flags = []
    for column in lines:
        value = pl.col(column).cast(pl.Float64)
        finite = value.is_finite().fill_null(False)
        group = ["_entity", "_col", finite]
        at = pl.int_range(pl.len()).over(group)
        extremes = (at == value.arg_min().over(group)) | (at == value.arg_max().over(group))
        flags.append((ends(group) | (finite & extremes).fill_null(False)).alias(f"_line_{column}"))
        keep = keep | flags[-1]
    return frame.with_columns(*flags, keep.alias("_keep")).filter("_keep").drop("_t0", "_t1", "_col", "_i", "_keep")


def _read_table(path: str, storage: Storage, dates: list[str],
                query: Callable[[pl.LazyFrame], pl.LazyFrame] = lambda rows: rows) -> pl.DataFrame | None:
    """`query` of the rows of `dates` of a Delta table of the pipeline's, run streaming (a query that aggregates
    holds its groups, not the rows), or None when none was written yet (a section says so); a table that exists
    but cannot be read is a DataError naming it."""
    try:
        uri, options = storage.delta_uri(path), storage.delta_options(path)
        if read_table(uri, options) is None:
            return None
        rows = scan_table(uri, options).filter(pl.col("date").is_in(dates))
        return query(rows).collect(engine="streaming")
    except Exception as exc:  # noqa: BLE001 - any reader failure: say which table
        raise DataError(f"{path}: cannot be read ({exc})") from None


class WindowFacts:
    """What the header and the choice of timelines need of a window read in chunks: ticks, alarm ticks, model
    versions, the modalities with any contribution, and per entity its alarm and labelled ticks."""

    def __init__(self) -> None:
        self.ticks = self.alarms = 0
        self.versions: set[str] = set()
        self.modalities: set[str] = set()
        self._per_entity: list[pl.DataFrame] = []
        self._summed: pl.DataFrame | None = None

    @staticmethod
    def part(chunk: pl.DataFrame, spec: Spec) -> dict[str, Any]:
        """A chunk's counts (with `_entity`), for `add_part`."""
        aggs = [pl.col("is_anomaly").cast(pl.Int64).sum().alias("alarms"),
                pl.col("ts").min().alias("first"), pl.col("ts").max().alias("last")]
        if "label" in chunk.columns:
            aggs.append(pl.col("label").cast(pl.Int64).sum().alias("labelled"))
        return {"ticks": chunk.height, "alarms": int(chunk["is_anomaly"].sum()),
                "versions": set(chunk["model_version"].unique().to_list()),
                "modalities": set(contributing_modalities(chunk, spec)),
                "per_entity": chunk.group_by("_entity").agg(aggs)}

    def add_part(self, part: dict[str, Any]) -> None:
        self.ticks += part["ticks"]
        self.alarms += part["alarms"]
        self.versions |= part["versions"]
        self.modalities |= part["modalities"]
        self._per_entity.append(part["per_entity"])
        self._summed = None

    @property
    def per_entity(self) -> pl.DataFrame | None:
        """Per entity its alarm ticks (and labelled ticks), first and last tick over the chunks added."""
        if self._summed is None and self._per_entity:
            self._summed = pl.concat(self._per_entity).group_by("_entity").agg(
                pl.all().exclude("first", "last").sum(), pl.col("first").min(), pl.col("last").max())
            self._per_entity = [self._summed]
        return self._summed

    @property
    def entities(self) -> set[str]:
        return set(self.per_entity["_entity"].to_list()) if self.per_entity is not None else set()

    def spans(self, entities: list[str]) -> pl.DataFrame:
        """Each of `entities`' time axis on its timeline, in microseconds: `_t0` its first tick, `_t1` its last
        (at least 1 later)."""
        first = pl.col("first").dt.epoch("us")
        return (self.per_entity.filter(pl.col("_entity").is_in(entities))
                .select("_entity", first.alias("_t0"), pl.max_horizontal(pl.col("last").dt.epoch("us"), first + 1)
                        .alias("_t1")))

    def busiest(self, n: int) -> list[str]:
        """The n entities with the most alarm ticks (then the most labelled ticks, then by name)."""
        by = ["alarms", *(["labelled"] if "labelled" in self.per_entity.columns else [])]
        ranked = self.per_entity.sort([*by, "_entity"], descending=[True] * len(by) + [False])
        return ranked["_entity"].head(n).to_list()


@dataclass
class EventsPart:
    """A chunk's alarm runs for `AlarmEvents.add_part`: how many lie wholly inside it (`count`), the `top` of those
    aggregated (`runs`), and the rows the runs at its edges need (`edges`: each entity's first run if alarmed
    and the row after it, its last run if alarmed, its first and last rows)."""
    count: int
    runs: pl.DataFrame
    edges: pl.DataFrame


class AlarmEvents:
    """Runs of consecutive `is_anomaly` ticks per entity of a window read in chunks (dates in time order; an
    entity's run still open at a chunk's end waits for the next), highest peak first: entity, start, end, ticks,
    peak, the dominant modality (largest mean contribution in the run), the channel that drove that modality's error
    at most of the run's ticks (its output column `channel_<m>`, for a sensor table or series of several channels,
    an audio modality's mel band or a text modality's latest line unseen in training; None otherwise), the modality
    the output's `cause` names at most of its ticks (None where no tick has one) and the labelled kind it overlaps,
    if any.
    Keeps the number of runs and the `top` highest (all: None). A chunk is added whole (`add`) or as the
    `EventsPart` computed where it lies (`add_part`): the runs inside it counted there, those at its edges here."""

    def __init__(self, modalities: list[str], top: int | None = None, zone: str = "UTC") -> None:
        self.modalities, self.top, self.count, self.zone = modalities, top, 0, zone   # zone: of the times shown
        self.best: pl.DataFrame | None = None
        self._carry: pl.DataFrame | None = None
        self.found: list[dict[str, Any]] = []

    def attribution(self, run: dict[str, Any]) -> tuple[dict[str, float], str | None, str | None]:
        """A run's (a row of `best`) mean contribution per modality, the dominant one (the largest; None without
        any) and that modality's channel at most of the run's ticks (None without one)."""
        means = {m: run[m] for m in self.modalities if run.get(m) is not None and math.isfinite(run[m])}
        dominant = max(means, key=means.get) if means else None
        return means, dominant, run.get(f"channel_{dominant}") if dominant else None

    @staticmethod
    def cause(run: dict[str, Any]) -> tuple[str | None, str | None]:
        """A run's (a row of `best`) cause - the modality the output's `cause` names at most of its ticks - and that
        modality's channel at most of them; None where no tick names one, or the modality has no channels."""
        cause = run.get(CAUSE)
        return cause, run.get(f"channel_{cause}") if cause else None

    @staticmethod
    def _rows(chunk: pl.DataFrame, modalities: list[str]) -> tuple[pl.DataFrame, list[pl.Expr]]:
        """A chunk's columns that the runs need, and the aggregations of a run."""
        contributions = [m for m in modalities if f"score_{m}" in chunk.columns]
        channels = [f"channel_{m}" for m in modalities if f"channel_{m}" in chunk.columns]
        channels += [CAUSE] if CAUSE in chunk.columns else []                 # most of its ticks, alike
        has_kind = "label_kind" in chunk.columns
        rows = chunk.select("_entity", "ts", "is_anomaly", "score", *[f"score_{m}" for m in contributions],
                            *channels, *(["label_kind"] if has_kind else []))
        aggs = [pl.col("ts").min().alias("start"), pl.col("ts").max().alias("end"), pl.len().alias("ticks"),
                pl.col("score").max().alias("peak"),
                *[pl.col(f"score_{m}").cast(pl.Float64).mean().alias(m) for m in contributions],
                *[pl.col(c).drop_nulls().mode().sort().first().alias(c) for c in channels]]     # most of its ticks
        if has_kind:
            aggs.append(pl.col("label_kind").filter(pl.col("label_kind").fill_null("") != "").mode().sort().first()
                        .alias("kind"))
        return rows, aggs

    def _keep(self, runs: pl.DataFrame) -> None:
        best = runs if self.best is None else pl.concat([self.best, runs], how="diagonal_relaxed")
        best = best.sort(["peak", "_entity"], descending=[True, False])
        self.best = best.head(self.top) if self.top is not None else best

    @staticmethod
    def part(chunk: pl.DataFrame, modalities: list[str], top: int | None) -> EventsPart:
        """A chunk's `EventsPart`."""
        rows, aggs = AlarmEvents._rows(chunk, modalities)
        marked = mark_runs(rows, "is_anomaly", "_entity").with_columns(
            pl.col("_run").max().over("_entity").alias("_runs"),
            (pl.col("_i") == pl.col("_i").min().over("_entity", "_run")).alias("_starts"))
        inner = marked.filter(pl.col("is_anomaly") & (pl.col("_run") != 1) & (pl.col("_run") != pl.col("_runs")))
        runs = inner.group_by("_entity", "_run").agg(aggs).sort(["peak", "_entity"], descending=[True, False])
        edge = (((pl.col("_run") == 1) & (pl.col("is_anomaly") | pl.col("_starts")))
                | ((pl.col("_run") == 2) & pl.col("_starts") & ~pl.col("is_anomaly"))      # ends an alarmed first run
                | ((pl.col("_run") == pl.col("_runs")) & pl.col("is_anomaly")) | pl.col("_end"))
        edges = marked.filter(edge).sort("_i").drop("_i", "_run", "_last", "_end", "_runs", "_starts")
        return EventsPart(runs.height, runs.head(top) if top is not None else runs, edges)

    def add_part(self, part: EventsPart) -> None:
        """A chunk's `EventsPart`, chunks in time order."""
        self.count += part.count
        if part.runs.height:
            self._keep(part.runs)
        self.add(part.edges)

    def add(self, chunk: pl.DataFrame, final: bool = False) -> None:
        rows, aggs = self._rows(chunk, self.modalities)
        if self._carry is not None:
            rows = pl.concat([self._carry, rows], how="diagonal_relaxed")
        rows = mark_runs(rows, "is_anomaly", "_entity")
        runs = rows.filter(pl.col("is_anomaly") & (~pl.col("_last") | final)).group_by("_entity", "_run").agg(aggs)
        self.count += runs.height
        self._keep(runs)
        self._carry = None if final else open_runs(rows, "is_anomaly")

    def finish(self) -> list[dict[str, Any]]:
        """Close the runs still open; the runs found, highest peak first."""
        if self._carry is not None:
            self.add(self._carry.clear(), final=True)
        self.found = []
        for row in (self.best.iter_rows(named=True) if self.best is not None else []):
            _, dominant, channel = self.attribution(row)
            cause, cause_channel = self.cause(row)
            self.found.append({"entity": row["_entity"], "start": _when(row["start"], self.zone),
                               "end": _when(row["end"], self.zone),
                               "ticks": row["ticks"], "peak": row["peak"], "dominant": dominant or "none",
                               "channel": channel, "cause": cause, "cause_channel": cause_channel,
                               "kind": row.get("kind")})
        return self.found


def alarm_events(scores: pl.DataFrame, modalities: list[str]) -> list[dict[str, Any]]:
    """`AlarmEvents` of scores held in memory (with `_entity`), every run."""
    found = AlarmEvents(modalities)
    found.add(scores.sort(["_entity", "ts"]), final=True)
    return found.finish()


# ---------------------------------------------------------------- sections

def _header(spec: Spec, window: WindowFacts, dates: list[str], labels: dict[str, Any] | None) -> str:
    facts = [("dates", f"{dates[0]} .. {dates[-1]} ({len(dates)})"), ("ticks", f"{window.ticks:,}"),
             ("entities", str(len(window.entities))), ("alarm ticks", f"{window.alarms:,}"),
             ("model version", ", ".join(sorted(window.versions))), ("scores table", spec.score.output),
             ("generated", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    if labels is not None:
        left = ", ".join(f"{n} {why}" for why, n in labels["unusable"].items())
        facts.append(("labels", f"{labels['used']:,} of {labels['rows']:,} rows used"
                      + (f"; left out: {left}" if left else "")))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    return f'<header><h1>{_e(spec.name)}</h1><table class="facts">{rows}</table></header>'


def _metrics_section(result: dict[str, Any]) -> str:
    f = result["overall"]["fused"]
    point = [("precision", f["precision"]), ("recall", f["recall"]), ("F1", f["f1"]), ("FAR", f["far"]),
             ("MAR", f["mar"]), ("event precision", f["event_precision"]), ("event recall", f["event_recall"]),
             ("event F1", f["event_f1"]), ("point-adjusted F1 (beside the point-wise F1)", f["f1_point_adjusted"])]
    if "oracle_f1" in f:
        point.append(("oracle F1 (threshold chosen with the labels; not deployable)", f["oracle_f1"]))
    point.append(("alarm rate (all ticks)", result["alarm_rate"]))
    if result.get("false_alarm_rate_clear") is not None:
        point.append((f"FAR clear of events (normal ticks over {result['clear_after_minutes']:.0f} min after one)",
                      result["false_alarm_rate_clear"]))
    for version, rate in result["expected_false_alarm_rate"].items():
        point.append((f"expected false-alarm rate (validation days of {version})", rate))
    for version, left in result.get("validation_outliers_left_out", {}).items():
        if left:          # its validation days held incidents nobody labelled, most likely
            point.append((f"validation ticks left out as outliers (calibration of {version})", left))
    fused = _table(["at the calibrated threshold", "value"], [[k, _num(v)] for k, v in point], "fused-metrics")
    kinds = list(result["by_kind"])
    head = ["score", "ROC-AUC overall", "PR-AUC overall", *[f"ROC-AUC {k}" for k in kinds]]
    rows = [[name, _num(result["overall"][name]["roc_auc"]), _num(result["overall"][name]["pr_auc"]),
             *[_num(result["by_kind"][k][name]["roc_auc"]) for k in kinds]] for name in result["overall"]]
    per_kind = _table(head, rows, "kind-metrics")
    caught = ""
    if result.get("detection"):
        found = [("all kinds", result["detection"]["overall"]), *result["detection"]["by_kind"].items()]
        head = ["kind", "events caught", "minutes to first alarm: median", "p90", "share of the event gone (median)"]
        caught = _table(head,
                        [[k, f"{d['detected']} of {d['events']}",
                          *([f"{d['median_delay_min']:.1f}", f"{d['p90_delay_min']:.1f}",
                             f"{100 * d['median_elapsed_share']:.0f} %"] if d["detected"] else ["-", "-", "-"])]
                         for k, d in found], "detection")
    named = ""
    if result.get("attribution"):                  # which modality the alarm ticks name, per kind
        named = ("<p>Which modality the alarm ticks name - the largest contribution at each alarm tick - per labelled "
                 "kind (<code>normal</code>: the false alarms):</p>"
                 + _shares_table(result["attribution"], "attribution"))
    if result.get("causes"):                       # ... and which their cause names
        named += ("<p>Which modality their cause names - the output's <code>cause</code>: the largest contribution "
                  "that no other modality explains, each hidden from the model in turn (at the alarm ticks whose own "
                  "score is over the threshold); a fault the others' errors echo names its own modality here:</p>"
                  + _shares_table(result["causes"], "causes"))
    least = ""
    if f.get("event_by_min_ticks"):
        rows = [[n, f"{e['alarm_events']:,}", f"{e['false_alarm_events']:,}", _num(e["event_precision"]),
                 f"{e['events_caught']} of {e['events']}", _num(e["event_recall"]), _num(e["event_f1"])]
                for n, e in f["event_by_min_ticks"].items()]
        least = ("<p>Event-wise when only the alarm events of N ticks or more count, as <code>dmafn alarms "
                 "--min-ticks N</code> lists them (a false one touches no labelled tick; a labelled event - a run of "
                 "labelled ticks, so labels that overlap or touch make one - is caught when a kept one touches it):</p>"
                 + _table(["N", "alarm events", "false", "precision", "events caught", "recall", "F1"], rows,
                          "min-ticks"))
    short = ""
    if result.get("shortfall"):
        s = result["shortfall"]
        rows = [["anomaly kind outranked", k, "", _num(v)] for k, v in s["by_kind"].items()]
        rows += [["normal ticks outranking, since their last event ended", name, f"{c['ticks']:,}", _num(c["share"])]
                 for name, c in s.get("by_normal_ticks", {}).items()]
        short = (f'<p>Where the fused ROC-AUC falls short of 1 (by {_num(s["total"])}): the pairs of a normal tick '
                 'outranking a labelled one, split by the labelled tick\'s kind and by the normal tick\'s time since '
                 'its entity\'s last event ended (each split adds up to the shortfall):</p>'
                 + _table(["split", "part", "ticks", "of 1 - ROC-AUC"], rows, "shortfall"))
    unscored = ""
    if result.get("unscored_events"):              # labelled events no metric counts: said, never dropped quietly
        unscored = f'<p class="warning" id="unscored-events">Labels: {_e(unscored_line(result["unscored_events"]))}.</p>'
    return (f'<section id="metrics"><h2>Metrics</h2><p>{result["ticks"]:,} ticks, {result["anomalous_ticks"]:,} '
            f'labelled anomalous. Per kind: that kind\'s ticks against the normal ones.</p>{unscored}{per_kind}{fused}'
            f'{least}<p>How soon the calibrated alarms catch each labelled event:</p>{caught}{named}{short}</section>')


def _curves_section(curves: dict[str, tuple[np.ndarray, ...]]) -> str:
    """The ROC and PR figures of `ranking_metrics`' curves (fpr, tpr, precision, recall per score column)."""
    roc, pr = {}, {}
    for name, (fpr, tpr, precision, recall) in curves.items():
        label = name.removeprefix("score_")
        roc[label], pr[label] = (fpr, tpr), (recall, precision)
    return ('<section id="curves"><h2>ROC and PR curves</h2><div class="row">'
            + _xy_figure("roc", "ROC: true vs false positive rate", roc, "false positive rate", "true positive rate",
                         diagonal=True)
            + _xy_figure("pr", "Precision vs recall", pr, "recall", "precision") + "</div></section>")


def _timelines_section(scores: pl.DataFrame, entities: list[str], modalities: list[str], kinds: list[str],
                       zone: str = "UTC", why: str = "") -> str:
    legend = "".join(f'<span class="key" style="background:{KIND_COLOURS[i % len(KIND_COLOURS)]}"></span>{_e(k)} '
                     for i, k in enumerate(kinds))
    legend += f'<span class="key" style="background:{ALARM}"></span>alarm (is_anomaly) '
    intro = f"<p>{_e(why)}</p>" if why else ""
    parts = [f'<section id="timelines"><h2>Timelines</h2>{intro}<p class="legend">{legend}</p>']
    for entity in entities:
        one = scores.filter(pl.col("_entity") == entity).sort("ts")
        parts.append(_timeline_figure(entity, one, modalities, kinds, zone))
    parts.append("</section>")
    return "".join(parts)


def _shares_table(counts_by_kind: dict[str, dict[str, int]], table_id: str) -> str:
    """Alarm ticks per kind and the share each modality is named at (`evaluate`'s attribution or causes)."""
    modalities = sorted({m for counts in counts_by_kind.values() for m in counts})
    rows = [[kind, f"{sum(counts.values()):,}",
             *[f"{100 * counts[m] / sum(counts.values()):.0f} %" if m in counts else "" for m in modalities]]
            for kind, counts in counts_by_kind.items()]
    return _table(["kind", "alarm ticks", *modalities], rows, table_id)


def _events_section(found: AlarmEvents) -> str:
    head = ["entity", "start", "end", "ticks", "peak score", "dominant modality", "cause", "labelled kind"]
    rows = [[e["entity"], e["start"], e["end"], str(e["ticks"]), _num(e["peak"]),
             e["dominant"] + (f" ({e['channel']})" if e.get("channel") else ""),
             (e.get("cause") or "-") + (f" ({e['cause_channel']})" if e.get("cause_channel") else ""),
             e["kind"] or "none"] for e in found.found]
    note = f"{found.count} alarm events (runs of consecutive alarm ticks of one entity); the {len(found.found)} " \
           "with the highest peak score, their times in the spec's timezone. Dominant modality: the largest mean " \
           "contribution during the event. Cause: the modality whose contribution no other modality explains " \
           "(each hidden from the model in turn), at most of the event's ticks (the output's <code>cause</code>) - " \
           "where it differs from the dominant one, the dominant modality's error follows a fault of the other."
    return f'<section id="events"><h2>Top alarm events</h2><p>{note}</p>{_table(head, rows, "events-table")}</section>'


def _versions_section(facts: dict[str, dict[str, Any] | str]) -> str:
    def days(d: list[str]) -> str:
        return f"{d[0]} .. {d[-1]} ({len(d)})" if d else "-"

    parts = []
    for i, (version, fact) in enumerate(facts.items()):
        if isinstance(fact, str):
            parts.append(f"<h3>{_e(version)}</h3><p>Its manifest could not be read: {_e(fact)}</p>")
            continue
        rows = [["created", fact["created_at"] or "-"], ["training days", days(fact["train_days"])],
                ["validation days", days(fact["validation_days"])],
                ["entities with statistics of their own", "-" if fact["entities"] is None else str(fact["entities"])
                 + (f" ({fact['enrolled']} enrolled since {fact['enrolled_into']} was trained: dmafn enroll)"
                    if fact.get("enrolled") else "")]]
        warnings = fact["warnings"]
        said = ("<p>Saved before versions kept their training warnings.</p>" if warnings is None else
                "<p>No warning at training.</p>" if not warnings else
                f"<p>{len(warnings)} warning(s) at training:</p><ul>"
                + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
        parts.append(f"<h3>{_e(version)}</h3>{_table(['fact', 'value'], rows, f'version-{i}')}{said}")
    return ('<section id="versions"><h2>Model versions</h2><p>The versions that scored these dates, and what '
            f'their training said.</p>{"".join(parts)}</section>')


def _runs_section(runs: pl.DataFrame | None) -> str:
    if runs is None:
        return '<section id="runs"><h2>Runs</h2><p>No runs table yet.</p></section>'
    runs = runs.sort(["date", "finished_at"])
    by_modality = sorted(c for c in runs.columns if c.startswith((MODALITY_SHARE, PRESENT_SHARE)))
    coverage = sorted(c for c in runs.columns if c.startswith((USABLE_ROWS, ENTITIES_WITHOUT)))
    shares = [*RUN_SHARES, *by_modality]
    cols = [c for c in ["date", "status", "model_version", "ticks_in", "rows_scored", "rows_quarantined",
                        "input_rows_quarantined", "input_rows", "input_rows_misplaced", "input_files", "anomalies",
                        "entities", "unseen_entities", UNSEEN_RESPELLED, *shares, *coverage, NEW_PAYLOAD_FORMATS,
                        CHANGED_INTERVALS, UNMET_KEYS, "duration_s", "run_id", "finished_at", "error"]
            if c in runs.columns]
    rows = [[_share(r[c]) if c in shares else _cell(r[c]) for c in cols]
            for r in runs.select(cols).iter_rows(named=True)]
    return (f'<section id="runs"><h2>Runs</h2><p>Every scoring run of these dates (a re-run adds a row). '
            'alarm_rate beside expected_alarm_rate, the version\'s validation days\' (an incident raises a '
            'day\'s); above_validation_median: the share of the day\'s ticks scoring above the version\'s '
            'validation median - about half on days like those, far more when the inputs have moved (and, per '
            'modality, the share of its smoothed contributions above their validation median); unseen_entities: '
            'entities the version has no statistics of their own for (new machines, scored by the fleet\'s: they '
            'alarm more, at unseen_entity_alarm_rate, until they are enrolled, dmafn enroll, or a version is '
            'trained on days that hold them; unseen_respelled of them are spelled like a trained entity but for '
            'case, spaces, separators or padding zeros: a source that changed how it writes its keys, to be mended '
            'there); unmet_keys: the date\'s warnings of entity keys whose modalities never met; '
            'new_payload_formats: per image or audio modality, its frames of sizes or colour (clips of sample rates '
            'or lengths) the version\'s training payloads (almost) never had - a camera or microphone replaced or '
            'reconfigured; '
            'changed_row_intervals: per non-text modality, its entities whose rows came at another '
            'interval (the median between consecutive rows) than on every training day - a sensor sampled at '
            'another rate, a source writing more or fewer rows; '
            'input_rows_misplaced: of the input_rows its partitions held, those '
            'timed outside their date partition (quarantined; many at the edges of every day: the lake is filed by '
            'another calendar than the spec\'s timezone, or by arrival beyond its lateness); per modality '
            'usable_rows_ (its usable rows in the date\'s partitions: 0, the date was scored without it), '
            'present_share_ (the share of the ticks it was present at) and entities_without_ (the entities it was '
            'absent at every tick of: a sensor, camera or log shipper that stopped); input_files: the files the '
            'date\'s partitions held when the run listed them (a backfill rescores a date whose files changed '
            'since, or - their rows the same, a compaction - adds a row with status relisted and the new count).</p>'
            f'<div class="wide">{_table(cols, rows, "runs-table")}</div></section>')


RUN_SHARES = ("alarm_rate", "expected_alarm_rate", "above_validation_median",   # shown as percentages
              "unseen_entity_alarm_rate")


def _share(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f} %"


def quarantine_summary(rows: pl.LazyFrame) -> pl.LazyFrame:
    """Quarantined rows per stage, source and kind of reason (`ingest.reason_kind`: a file's note as the reason of a
    row, the values and files reasons name left out): how many input rows (a row noting a file's rows counts them; a
    table written before `rows` was kept: 1 a row), of how many entities and dates."""
    counted = pl.col("rows").fill_null(1).sum() if "rows" in rows.collect_schema().names() else pl.len()
    return rows.with_columns(reason_kind(pl.col("reason")).alias("reason")).group_by("stage", "source", "reason").agg(
        counted.cast(pl.Int64).alias("rows"), pl.col("entity").n_unique().alias("entities"),
        pl.col("date").n_unique().alias("dates"))


def _quality_section(summary: pl.DataFrame | None) -> str:
    title = '<section id="quality"><h2>Data quality</h2>'
    if summary is None:
        return title + "<p>No quarantine table: nothing was quarantined.</p></section>"
    if summary.is_empty():
        return title + "<p>Nothing quarantined in these dates.</p></section>"
    summary = summary.sort(["rows", "stage", "source", "reason"], descending=[True, False, False, False])
    rows = [[_cell(v) for v in r] for r in summary.iter_rows()]
    return (title + f"<p>{summary['rows'].sum():,} quarantined rows (stage ingest: unusable input rows; stage score: "
            f"ticks no modality could serve), by reason.</p>{_table(summary.columns, rows, 'quality-table')}</section>")


# ---------------------------------------------------------------- figures

def _xy_figure(fid: str, title: str, series: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
               diagonal: bool = False) -> str:
    w, h, pad = 500, 320, 40
    side = h - 2 * pad
    sx = lambda v: pad + v * side                             # noqa: E731 - unit square to pixels
    sy = lambda v: h - pad - v * side                         # noqa: E731
    body = [f'<rect x="{pad}" y="{pad}" width="{side}" height="{side}" class="frame"/>']
    for t in (0, 0.5, 1):
        body.append(f'<text x="{sx(t):.0f}" y="{h - pad + 14}" class="tick">{t:g}</text>'
                    f'<text x="{pad - 6}" y="{sy(t) + 4:.0f}" class="tick" text-anchor="end">{t:g}</text>')
    if diagonal:
        body.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}" class="diagonal"/>')
    legend = []
    for i, (name, (x, y)) in enumerate(series.items()):
        colour = SCORE if name == "fused" else LINE_COLOURS[(i - 1) % len(LINE_COLOURS)]
        points = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, y))
        width = 2 if name == "fused" else 1.2
        body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="{width}"/>')
        key_y = pad + 10 + 14 * i          # each name in its curve's colour beside a stroke of it (a style, since the
        legend.append(                     # page's `.label` fill would override a presentation attribute)
            f'<line x1="{pad + side + 16}" y1="{key_y - 4}" x2="{pad + side + 34}" y2="{key_y - 4}" stroke="{colour}" '
            f'stroke-width="{width}" class="legend-swatch"/><text x="{pad + side + 40}" y="{key_y}" '
            f'class="label legend-key" style="fill:{colour}">{_e(name)}</text>')
    body.append(f'<text x="{pad + side / 2}" y="{h - 6}" class="axis" text-anchor="middle">{_e(xlabel)}</text>'
                f'<text x="12" y="{h / 2}" class="axis" text-anchor="middle" '
                f'transform="rotate(-90 12 {h / 2})">{_e(ylabel)}</text>')
    return (f'<figure id="{fid}"><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">'
            f'{"".join(body + legend)}</svg><figcaption>{_e(title)}</figcaption></figure>')


def _timeline_figure(entity: str, one: pl.DataFrame, modalities: list[str], kinds: list[str],
                     zone: str = "UTC") -> str:
    """One entity's timeline from its `drawn_rows`: each line through the rows its `_line_` column marks."""
    t = one["ts"].dt.epoch("us").to_numpy().astype(np.float64)
    t0, t1 = float(t.min()), float(max(t.max(), t.min() + 1))
    sx = lambda v: 50 + (v - t0) / (t1 - t0) * (WIDTH - 70)   # noqa: E731

    def line(column: str) -> tuple[np.ndarray, np.ndarray]:
        points = one.filter(pl.col(f"_line_{column}"))
        return (points["ts"].dt.epoch("us").to_numpy().astype(np.float64),
                points[column].cast(pl.Float64).fill_null(np.nan).to_numpy())

    score = line("score")
    threshold = float(one["threshold"][0])
    lo, hi = _clipped_range(score[1], threshold)
    top = _panel({"fused score": (*score, SCORE)}, lo, hi, sx, threshold=threshold)
    clipped = int((score[1] > hi).sum())
    labelled = _shading(one, kinds, sx, PLOT_HEIGHT)                      # behind both panels
    contributions = {m: (*line(f"score_{m}"), LINE_COLOURS[i % len(LINE_COLOURS)]) for i, m in enumerate(modalities)}
    finite = np.concatenate([v[np.isfinite(v)] for _, v, _ in contributions.values()]) if contributions else np.zeros(1)
    c_lo, c_hi = _clipped_range(finite if finite.size else np.zeros(1), None)
    bottom = _panel(contributions, c_lo, c_hi, sx)
    days = _day_ticks(t0, t1, sx, 2 * PLOT_HEIGHT + 30, zone)
    legend = "".join(f'<tspan fill="{c}"> {_e(m)}</tspan>' for m, (_, _, c) in contributions.items())
    svg = (f'<svg viewBox="0 0 {WIDTH} {2 * PLOT_HEIGHT + 40}" width="{WIDTH}" height="{2 * PLOT_HEIGHT + 40}" '
           f'role="img"><g>{labelled}{_alarms(one, sx, PLOT_HEIGHT, zone)}{top}</g>'
           f'<g transform="translate(0 {PLOT_HEIGHT + 15})">{labelled}{bottom}'
           f'<text x="56" y="14" class="label">contributions:{legend}</text></g>{days}</svg>')
    note = (f"fused score on an axis clipped to [{lo:.2f}, {hi:.2f}]; {clipped} of the points drawn lie above it, "
            f"on the top edge. Dashed: the threshold {threshold:.3f}." if clipped else
            f"fused score; dashed: the threshold {threshold:.3f}.")
    return f'<figure class="timeline" data-entity="{_e(entity)}">{svg}<figcaption>{_e(entity)}: {_e(note)}' \
           f'</figcaption></figure>'


def _clipped_range(values: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """An axis that a few huge values cannot flatten: the 0.5-99.5 % range of the points drawn (each pixel column's
    lowest and highest among them), widened to show the threshold."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [0.5, 99.5])
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold + 0.25 * abs(threshold) + 1e-6)
    span = max(hi - lo, 1e-6)
    return float(lo - 0.05 * span), float(hi + 0.05 * span)


def _panel(series: dict[str, tuple[np.ndarray, np.ndarray, str]], lo: float, hi: float, sx,
           threshold: float | None = None) -> str:
    sy = lambda v: 20 + (1 - (np.clip(v, lo, hi) - lo) / (hi - lo)) * (PLOT_HEIGHT - 30)   # noqa: E731
    out = [f'<rect x="50" y="20" width="{WIDTH - 70}" height="{PLOT_HEIGHT - 30}" class="frame"/>',
           f'<text x="44" y="24" class="tick" text-anchor="end">{hi:.2f}</text>',
           f'<text x="44" y="{PLOT_HEIGHT - 8}" class="tick" text-anchor="end">{lo:.2f}</text>']
    for t, values, colour in series.values():
        for segment in _segments(values):
            points = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(t[segment], values[segment]))
            out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1"/>')
    if threshold is not None:
        out.append(f'<line x1="50" x2="{WIDTH - 20}" y1="{sy(threshold):.1f}" y2="{sy(threshold):.1f}" '
                   f'stroke="{THRESHOLD}" stroke-dasharray="5 3" class="threshold"/>')
    return "".join(out)


def _segments(values: np.ndarray) -> list[slice]:
    """Runs of finite values: a line never bridges a gap where a modality was absent."""
    return [slice(a, b + 1) for a, b in events(np.isfinite(values))]


def _spans(one: pl.DataFrame, marked: np.ndarray) -> list[tuple[int, int]]:
    """The (first, last) rows of each stretch of adjacent pixel columns holding a `marked` row: a mark drawn per
    stretch, however many runs of ticks fall in it."""
    idx = np.flatnonzero(marked)
    if idx.size == 0:
        return []
    t = one["ts"].dt.epoch("us").to_numpy()
    t0, t1 = int(t.min()), max(int(t.max()), int(t.min()) + 1)
    columns = pixel_column(t[idx], t0, t1)
    breaks = np.flatnonzero(np.diff(columns) > 1)
    return [(int(idx[a]), int(idx[b])) for a, b in zip(np.r_[0, breaks + 1], np.r_[breaks, idx.size - 1])]


def _shading(one: pl.DataFrame, kinds: list[str], sx, height: int) -> str:
    if not kinds:
        return ""
    t = one["ts"].dt.epoch("us").to_numpy().astype(np.float64)
    kind = one["label_kind"].fill_null("").to_numpy()
    out = []
    for i, k in enumerate(kinds):
        for a, b in _spans(one, kind == k):
            x0, x1 = sx(t[a]), sx(t[b])
            out.append(f'<rect x="{x0:.1f}" y="20" width="{max(x1 - x0, 1.5):.1f}" height="{height - 30}" '
                       f'fill="{KIND_COLOURS[i % len(KIND_COLOURS)]}" opacity="0.55" class="label-span">'
                       f'<title>{_e(k)}</title></rect>')
    return "".join(out)


def _alarms(one: pl.DataFrame, sx, height: int, zone: str = "UTC") -> str:
    t = one["ts"].dt.epoch("us").to_numpy().astype(np.float64)
    out = []
    for a, b in _spans(one, one["is_anomaly"].fill_null(False).to_numpy()):
        x0, x1 = sx(t[a]), sx(t[b])
        out.append(f'<rect x="{x0:.1f}" y="{height - 9}" width="{max(x1 - x0, 2):.1f}" height="7" fill="{ALARM}" '
                   f'class="alarm"><title>alarm ticks {_when(one["ts"][a], zone)} .. {_when(one["ts"][b], zone)}'
                   '</title></rect>')
    return "".join(out)


def _day_ticks(t0: float, t1: float, sx, y: int, zone: str = "UTC") -> str:
    """The dates' starts (midnight in the spec's `timezone`) between t0 and t1, labelled, for up to 31 days."""
    day = 86_400_000_000
    if (t1 - t0) / day > 31:
        return ""
    first = dt.datetime.fromtimestamp(t0 / 1e6, dt.timezone.utc).date() - dt.timedelta(days=1)
    dates = [first + dt.timedelta(days=i) for i in range(int((t1 - t0) // day) + 3)]
    marks = [(d, m) for d in dates if t0 <= (m := date_start_us(d, zone)) <= t1]
    return "".join(f'<text x="{sx(m):.0f}" y="{y}" class="tick" text-anchor="middle">{d:%Y-%m-%d}</text>'
                   for d, m in marks)


# ---------------------------------------------------------------- HTML

def _table(head: list[str], rows: list[list[str]], tid: str) -> str:
    thead = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{tid}"><thead><tr>{thead}</tr></thead><tbody>{body}</tbody></table>'


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1060px; color: #222; }}
h1 {{ margin: 0 0 8px; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }} .wide {{ overflow-x: auto; }}
.wide td {{ white-space: nowrap; }}
td, th {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }} th {{ background: #f6f6f6; }}
td:first-child, th:first-child {{ text-align: left; }}
table.facts th {{ text-align: left; background: none; font-weight: 600; }}
.row {{ display: flex; gap: 16px; flex-wrap: wrap; }} figure {{ margin: 8px 0 20px; }}
figcaption {{ color: #555; font-size: 12px; }} .frame {{ fill: none; stroke: #ccc; }}
.tick {{ font-size: 10px; fill: #666; }} .axis, .label {{ font-size: 11px; fill: #333; }}
.diagonal {{ stroke: #bbb; stroke-dasharray: 4 4; }} .key {{ display: inline-block; width: 12px; height: 12px;
  margin: 0 4px 0 12px; vertical-align: middle; }} .warning {{ color: #8a4b00; }}
</style></head>
<body>
{body}
</body></html>
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 0.1 else f"{value:.3f}"
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return _when(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def _when(value: dt.datetime, zone: str | None = None) -> str:
    """A time as text; with `zone` (an IANA name) an aware time in that zone, its abbreviation after it (the spec's
    `timezone`: the dates' own clock)."""
    if zone is None or value.tzinfo is None:
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return value.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S %Z")
