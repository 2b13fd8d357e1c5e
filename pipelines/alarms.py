"""`dmafn alarms`: the alarm events of scored dates, for a pager or a ticket queue after the nightly.

An alarm event is a run of consecutive alarm ticks (`is_anomaly`) of one entity in the output table, as the report
page's "top alarm events" counts them (`report.AlarmEvents`): its start and end, ticks, peak score, each modality's
mean contribution over the run and the one with the largest (where to look) - for a sensor table or series of several
channels also the channel that drove its error at most of the run's ticks (`channel`, from the output's `channel_<m>`;
for an audio modality its mel band, for a text modality its window's latest line unseen in training; None for dates
scored before 2026-12-06 or a modality of one channel or none), and the modality the output's `cause` names at most of
its ticks (`cause`, with its channel as above, `cause_channel`: the one whose contribution no other modality explains;
where it differs from `dominant`, the dominant modality's error follows the cause's fault - an overheated process
raising the camera's; None for dates scored before 2026-12-07 or events none of whose ticks is over the threshold
unsmoothed). The output is read a date at a time, in this process (a date's scores and the runs found in memory). The
scored date before the window is read too, so a run that began there keeps its true start - an event is the same
`(entity, start)` whichever window lists it, and a consumer that files one ticket per pair files it once; a run still
alarming at the window's last tick is marked `open` (the next date may go on with it), and one already alarming at the
first tick read (the date before's) `may_have_begun_earlier`. `entity` is the entity key as text (several key columns
joined by '|'), each key column's value as stored beside it."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from dmafn.spec import Spec
from pipelines.align import date_start_us
from pipelines.evaluate import open_scores, read_score_date, score_dates
from pipelines.ingest import entity_string
from pipelines.report import AlarmEvents
from pipelines.storage import Storage


@dataclass
class AlarmList:
    """The alarm events of a window (`alarm_events`), in order of start, then entity; with `min_ticks` over 1 those of
    that many alarm ticks or more, `shorter` counting the runs left out."""
    dates: list[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    min_ticks: int = 1
    shorter: int = 0

    def json_lines(self) -> str:
        """One JSON object per event (times ISO 8601, UTC)."""
        return "\n".join(json.dumps(e) for e in self.events)

    def text(self) -> str:
        """A table for a person: one line per event."""
        head = (f"alarm events on {self.dates[0]}" + (f"..{self.dates[-1]}" if len(self.dates) > 1 else "")
                + f": {len(self.events)}" + (f" (of {self.min_ticks} alarm ticks or more; {self.shorter} shorter "
                                             "left out)" if self.min_ticks > 1 else ""))
        lines = [head]
        if self.events:
            lines.append(f"  {'entity':<16} {'start (UTC)':<20} {'end (UTC)':<20} {'ticks':>6} {'peak':>8}  dominant"
                         "  (cause, where another modality's fault it follows)")
        for e in self.events:
            lines.append(f"  {e['entity']:<16} {e['start'][:19]:<20} {e['end'][:19]:<20} {e['ticks']:>6} "
                         f"{e['peak']:>8.3f}  {e['dominant']}" + (f" ({e['channel']})" if e["channel"] else "")
                         + (f"  <- {e['cause']}" + (f" ({e['cause_channel']})" if e["cause_channel"] else "")
                            if e["cause"] and e["cause"] != e["dominant"] else "")
                         + ("  (open: still alarming at the window's end)" if e["open"] else ""))
        return "\n".join(lines)


def alarm_events(spec: Spec, *, start: dt.date | None = None, end: dt.date | None = None,
                 min_ticks: int = 1) -> AlarmList:
    """The alarm events with a tick in the scored dates of [start, end] (default: the newest scored date), of
    `min_ticks` alarm ticks or more; a DataError where the output table is not there or holds no date in the
    window."""
    storage = Storage.from_spec(spec.storage)
    table = open_scores(spec, storage)
    every = score_dates(table, spec)
    dates = score_dates(table, spec, start, end) if start or end else every[-1:]
    before = [d for d in every if d < dates[0]][-1:]          # where a run open at the window's start began
    found = AlarmEvents(list(spec.modalities))
    last: pl.DataFrame | None = None                          # each entity's last tick in the window
    first: pl.DataFrame | None = None                         # ... and the first tick read
    key_values: dict[str, dict[str, Any]] = {}                # entity string -> its key columns' values as stored
    for date in [*before, *dates]:
        chunk = read_score_date(table, spec, date).with_columns(entity_string(spec.entity).alias("_entity"))
        found.add(chunk)
        for row in chunk.select("_entity", *spec.entity).unique("_entity").iter_rows(named=True):
            key_values.setdefault(row.pop("_entity"), row)
        if first is None:
            first = chunk.group_by("_entity").agg(pl.col("ts").min().alias("_first"))
        if date == dates[-1]:
            last = chunk.group_by("_entity").agg(pl.col("ts").max().alias("_last"))
    found.finish()
    window_start = dt.datetime.fromtimestamp(date_start_us(dt.date.fromisoformat(dates[0]), spec.timezone) / 1e6,
                                             dt.timezone.utc)
    if found.best is None:                                    # no alarm tick in the dates read
        return AlarmList(dates, min_ticks=min_ticks)
    in_window = found.best.filter(pl.col("end") >= window_start)
    runs = (in_window.filter(pl.col("ticks") >= min_ticks)
            .join(last, on="_entity", how="left").join(first, on="_entity", how="left").sort("start", "_entity"))
    events = []
    for row in runs.iter_rows(named=True):
        means, dominant, channel = found.attribution(row)
        cause, cause_channel = found.cause(row)
        events.append({"entity": row["_entity"], **key_values[row["_entity"]],
                       "start": _iso(row["start"]), "end": _iso(row["end"]), "ticks": row["ticks"],
                       "peak": row["peak"], "dominant": dominant, "channel": channel, "cause": cause,
                       "cause_channel": cause_channel,
                       "contributions": means, "open": row["_last"] is not None and row["end"] == row["_last"],
                       "may_have_begun_earlier": bool(before) and row["start"] == row["_first"]})
    return AlarmList(dates, events, min_ticks, in_window.height - runs.height)


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat()
