"""`evaluate` on Ray tasks (`pipelines.evaluate_tasks`) against the same window evaluated in one process and
whole: events and alarm runs crossing midnight, an entity absent for a date inside its event, a contribution
that is null on some ticks, more dates than slices."""
import datetime as dt
import json
import math

import numpy as np
import polars as pl
import pytest
from deltalake import write_deltalake

from dmafn.spec import parse_spec

DATES = [dt.date(2024, 3, 1) + dt.timedelta(days=i) for i in range(5)]
STEP_MIN = 10                                            # a tick every 10 minutes: 144 a day


def _flat(d, at=""):
    return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{at}/{key}").items()} \
        if isinstance(d, dict) else {at: d}


@pytest.fixture
def window(tmp_path):
    """A scored output table (5 dates, 3 entities, `c` absent on the third date) and labels of two kinds."""
    spec = parse_spec({
        "name": "eval-tasks", "entity": "machine_id", "time": "ts", "grain": f"{STEP_MIN}min", "partition": "date",
        "modalities": {m: {"kind": "tabular", "path": str(tmp_path / "raw" / m), "columns": ["x"], "tolerance": "10min"}
                       for m in ("process", "vibration")},
        "labels": {"path": str(tmp_path / "labels"), "start": "start_ts", "end": "end_ts"},
        "train": {"start": "2024-02-01", "end": "2024-02-02"},
        "registry": str(tmp_path / "models"), "score": {"output": str(tmp_path / "scores")}}, source="t.yaml")
    rng = np.random.default_rng(7)
    t0 = np.datetime64(DATES[0].isoformat(), "m")
    n = len(DATES) * 1440 // STEP_MIN
    ts = t0 + np.arange(n) * np.timedelta64(STEP_MIN, "m")
    events = {"a": [(130, 160, "drift"), (400, 410, "spike")],        # 130-160 crosses the first midnight
              "b": [(280, 300, "spike"), (575, 600, "drift")],         # 575-600 crosses the last midnight
              "c": [(250, 330, "drift")]}                              # c is absent on date 3 (ticks 288-431)
    frames, labels = [], []
    for name, spans in events.items():
        label = np.zeros(n, bool)
        for lo, hi, kind in spans:
            label[lo:hi + 1] = True
            labels.append({"machine_id": name, "start_ts": ts[lo].astype("datetime64[us]").item(),
                           "end_ts": ts[hi].astype("datetime64[us]").item(), "kind": kind})
        score = rng.normal(size=n) + 2.0 * label
        vib = np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n) + label)
        frame = pl.DataFrame({"machine_id": name, "ts": ts.astype("datetime64[us]"), "score": score,
                              "threshold": 1.2, "is_anomaly": score > 1.2, "score_process": score + rng.normal(size=n),
                              "score_vibration": pl.Series(vib).fill_nan(None), "model_version": "v-test"})
        frames.append(frame)
    scores = (pl.concat(frames).with_columns(pl.col("ts").dt.replace_time_zone("UTC"),
                                             pl.col("ts").dt.date().cast(pl.String).alias("date"))
              .filter(~((pl.col("machine_id") == "c") & (pl.col("date") == DATES[2].isoformat()))))
    for date in DATES:
        write_deltalake(spec.score.output, scores.filter(pl.col("date") == date.isoformat()).to_arrow(),
                        mode="append", partition_by=["date"])
    (tmp_path / "labels").mkdir()
    pl.DataFrame(labels).with_columns(pl.col("start_ts", "end_ts").dt.replace_time_zone("UTC")).write_parquet(
        tmp_path / "labels" / "part-0.parquet")
    return spec, scores


def test_evaluate_on_ray_tasks_equals_one_process_and_the_whole_window(window, tmp_path, monkeypatch, local_ray):
    import pipelines.evaluate as ev
    from pipelines.align import TIME, label_ticks, to_micros
    from pipelines.labels import read_labels
    from pipelines.storage import Storage

    spec, scores = window
    here_dir, tasks_dir = tmp_path / "here", tmp_path / "tasks"
    monkeypatch.setattr(ev, "ray_running", lambda: False)
    here = ev.evaluate(spec, report_dir=str(here_dir))
    monkeypatch.undo()

    def no_rows_here(*_args, **_kwargs):                # the driver reads no scored row: the tasks do
        raise AssertionError("the driver read a date of scores")
    monkeypatch.setattr(ev, "read_score_date", no_rows_here)
    assert ev.ray_running()
    tasks = ev.evaluate(spec, report_dir=str(tasks_dir))

    labelled = label_ticks(scores.with_columns(to_micros(pl.col("ts")).alias(TIME)), read_labels(spec, Storage()),
                           spec, spec.labels.start, spec.labels.end).sort("machine_id", "ts")
    whole = ev.metrics_table(labelled, spec) | ev.alarm_rates(labelled, spec, Storage())
    whole["detection"] = ev.detection(labelled, read_labels(spec, Storage()), spec)

    keys = ("ticks", "anomalous_ticks", "overall", "by_kind", "detection", "alarm_rate", "false_alarm_rate",
            "false_alarm_rate_clear", "shortfall", "attribution", "causes")
    # the negatives' counts over budget: one slice of every date instead of one per CPU
    import pipelines.evaluate_tasks as et
    asked = []
    monkeypatch.setattr(et, "COUNTS_BUDGET", 1)
    monkeypatch.setattr(et, "slices", lambda dates, n: asked.append(n) or [list(dates)])
    one_slice = ev.evaluate(spec)
    assert asked == [2, 1]
    for got in (here, tasks, one_slice):
        assert _flat({k: got[k] for k in keys}) == pytest.approx(_flat({k: whole[k] for k in keys}), rel=0,
                                                                abs=1e-12, nan_ok=True)
    assert json.loads((tasks_dir / "metrics.json").read_text())["overall"] == \
        json.loads((here_dir / "metrics.json").read_text())["overall"]
    assert (tasks_dir / "scores.png").stat().st_size > 10_000
    # the window really has what the tallies must carry over a date's edge
    fused = whole["overall"]["fused"]
    assert whole["by_kind"].keys() == {"drift", "spike"} and whole["detection"]["overall"]["events"] == 5
    assert fused["event_recall"] == 1.0 and 0 < fused["event_precision"] < 1 and not math.isnan(fused["roc_auc"])
    assert set(whole["overall"]) == {"fused", "score_process", "score_vibration"}
    # the shortfall: both splits add up to 1 - ROC-AUC; each class of normal ticks is its pairs counted by brute force
    short = whole["shortfall"]
    assert short["total"] == pytest.approx(1 - fused["roc_auc"], abs=1e-12)
    assert sum(short["by_kind"].values()) == pytest.approx(short["total"], abs=1e-12)
    assert sum(c["share"] for c in short["by_normal_ticks"].values()) == pytest.approx(short["total"], abs=1e-12)
    classes = ev.since_event_classes(spec)
    assert [name for name, _ in classes] == list(short["by_normal_ticks"]) and classes[-1][0] == "clear"
    normal = labelled.filter(pl.col("label") == 0)
    since = normal["since_event_us"].cast(pl.Float64).fill_null(np.inf).to_numpy()
    pos = labelled.filter(pl.col("label") == 1)["score"].to_numpy()
    lower = 0.0
    for name, upper in classes:
        neg = normal["score"].to_numpy()[(since > lower) & (since <= upper)]
        brute = (neg[:, None] > pos[None, :]).sum() + 0.5 * (neg[:, None] == pos[None, :]).sum()
        assert short["by_normal_ticks"][name]["ticks"] == neg.size
        assert short["by_normal_ticks"][name]["share"] == pytest.approx(brute / (pos.size * normal.height), abs=1e-12)
        lower = upper
    assert short["by_normal_ticks"]["0-5 min"]["ticks"] == 0                 # a tick every 10 minutes
    assert short["by_normal_ticks"]["clear"]["ticks"] > 0 and short["by_normal_ticks"]["5-15 min"]["ticks"] > 0
    assert "where the fused ROC-AUC falls short of 1" in (tasks_dir / "metrics.txt").read_text()
    # each task holds its dates' labels (a day's margin either side), not the window's
    passes = et.TaskPasses("t", spec, Storage(), ev.open_scores(spec, Storage()), None,
                           [d.isoformat() for d in DATES], read_labels(spec, Storage()))
    assert passes.index.started.height == 5
    assert passes._source([DATES[0].isoformat()]).labels.started.height == 3                # 130-160, 250-, 280-
    assert passes._source([DATES[-1].isoformat()]).labels.started.height == 1               # 575-600
    assert passes._source([d.isoformat() for d in DATES]).labels.started.height == 5


def test_run_edges_carry_runs_over_chunks_as_on_the_whole_series():
    """`RunTally` over `run_edges` of chunks (a run through a whole chunk, an entity missing from a chunk while
    its run is open, runs touching both edges) counts what the whole series' runs give."""
    from pipelines.evaluate import RunTally, run_edges

    rng = np.random.default_rng(11)
    n = 60
    series = {g: (rng.random(n) < 0.5, rng.random(n) < 0.4) for g in "xyz"}
    series["x"][1][10:30] = True                               # one run through the chunk [15, 25)
    frame = pl.DataFrame([{"g": g, "t": t, "p": bool(p[t]), "y": bool(y[t])}
                          for g, (p, y) in series.items() for t in range(n)])
    whole = {flag: RunTally() for flag in ("y", "p")}
    for flag, (counts, edges) in run_edges(frame).items():
        whole[flag].add(counts, edges)
        whole[flag].finish()
    chunked = {flag: RunTally() for flag in ("y", "p")}
    for lo, hi in [(0, 15), (15, 25), (25, 26), (26, 40), (40, n)]:
        chunk = frame.filter(pl.col("t").is_between(lo, hi - 1))
        if lo == 25:
            chunk = chunk.filter(pl.col("g") != "y")               # y absent from a chunk
        if lo == 26:
            chunk = pl.concat([frame.filter((pl.col("t") == 25) & (pl.col("g") == "y")), chunk])
        for flag, (counts, edges) in run_edges(chunk.sort("g", "t", maintain_order=True)).items():
            chunked[flag].add(counts, edges)
    for flag in ("y", "p"):
        chunked[flag].finish()
        other = "p" if flag == "y" else "y"
        runs = hit = hit_ticks = 0
        for p_y in series.values():
            f, o = (p_y[1], p_y[0]) if flag == "y" else p_y
            edges = np.flatnonzero(np.diff(np.r_[0, f.astype(int), 0]))
            for s, e in zip(edges[::2], edges[1::2]):
                runs += 1
                if o[s:e].any():
                    hit, hit_ticks = hit + 1, hit_ticks + (e - s)
        for tally in (whole[flag], chunked[flag]):
            assert (tally.runs, tally.hit, tally.hit_ticks) == (runs, hit, hit_ticks), (flag, other)


def test_event_metrics_by_min_ticks_over_chunks_equal_the_whole_series():
    """Event-wise precision and recall when only alarm runs of N ticks or more count (`by_min_ticks`: `RunTally`'s
    lengths and `CatchTally`), over chunks cut anywhere (one-tick chunks too, an entity missing from a chunk while
    its runs are open, an alarm run through several chunks touching events on both sides), equal
    `dmafn.metrics.event_metrics` on each entity's whole series."""
    from dmafn.metrics import event_metrics
    from pipelines.evaluate import CatchTally, RunTally, by_min_ticks, event_pieces, run_edges

    rng = np.random.default_rng(5)
    n = 120
    series = {g: (np.repeat(rng.random(n // 4) < 0.4, 4) & (rng.random(n) < 0.8),
                  np.repeat(rng.random(n // 6) < 0.3, 6)) for g in "xyz"}
    series["x"][0][30:80], series["x"][0][[29, 80]] = True, False   # a 50-tick alarm run touching 3 events
    series["x"][1][25:35] = series["x"][1][75:85] = True
    frame = pl.DataFrame([{"g": g, "t": t, "p": bool(p[t]), "y": bool(y[t])}
                          for g, (p, y) in series.items() for t in range(n)])
    ladder = (1, 2, 3, 4, 5, 8, 50, 51)

    def tallied(cuts: list[tuple[int, int]], absent: bool = False) -> dict[str, dict]:
        alarms, events, catches = RunTally(), RunTally(), CatchTally()
        for lo, hi in cuts:
            chunk = frame.filter(pl.col("t").is_between(lo, hi - 1))
            if absent and lo == 50:
                chunk = chunk.filter(pl.col("g") != "y")               # y absent while its runs are open
            if absent and lo == 51:
                chunk = pl.concat([frame.filter((pl.col("t") == 50) & (pl.col("g") == "y")), chunk])
            chunk = chunk.sort("g", "t", maintain_order=True)
            edges = run_edges(chunk)
            alarms.add(*edges["p"])
            events.add(*edges["y"])
            catches.add(event_pieces(chunk), edges["p"][1])
        for tally in (alarms, events, catches):
            tally.finish()
        assert len(catches.longest) == events.runs
        return by_min_ticks(alarms, catches, ladder)

    cuts = [0, 7, 31, 50, 51, 64, 65, 79, 100, n]
    chunked = tallied(list(zip(cuts[:-1], cuts[1:])), absent=True)
    ticks = tallied([(t, t + 1) for t in range(n)])
    whole = tallied([(0, n)])
    for key in map(str, ladder):
        want = [event_metrics(p, y, int(key)) for p, y in series.values()]
        events, alarms = sum(m["events"] for m in want), sum(m["alarms"] for m in want)
        caught = sum(round(m["event_recall"] * m["events"]) for m in want)
        good = sum(round(m["event_precision"] * m["alarms"]) for m in want)
        got = whole[key]
        kept = got["alarm_events"]
        assert (got["events"], got["events_caught"], kept, kept - got["false_alarm_events"]) == \
            (events, caught, alarms, good), key
        assert chunked[key] == got and ticks[key] == got, key
    assert whole["50"]["events_caught"] == 3 and whole["51"]["events_caught"] == 0      # x's long run: 50 ticks


def test_alarm_events_from_chunk_parts_equal_the_whole_series():
    """`AlarmEvents.part` of each chunk (runs inside it aggregated where it lies, the rows of those at its edges
    added here) gives the runs, counts and top events of the whole series: runs through a chunk, across edges,
    an entity missing from a chunk while its run is open, runs in the middle of a chunk. An event's channel is the
    one its dominant modality's `channel_<m>` names at most of its ticks (the first by name of a tie), its cause
    the modality `cause` names at most of them (None where no tick names one)."""
    from pipelines.report import AlarmEvents, alarm_events

    rng = np.random.default_rng(5)
    n = 120
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for g in ("a", "b", "c"):
        alarm = rng.random(n) < 0.45
        alarm[40:75] = g == "a"                                           # a's run goes through a chunk
        for t in range(n):
            rows.append({"_entity": g, "ts": t0 + dt.timedelta(minutes=t), "score": float(rng.normal() + 3 * alarm[t]),
                         "is_anomaly": bool(alarm[t]), "score_x": float(rng.random()), "score_y": float(rng.random()),
                         "channel_x": str(rng.choice(["p", "q", "r"])),
                         "cause": rng.choice(["x", "y", None]) if alarm[t] else None,
                         "label_kind": "k" if rng.random() < 0.3 else None})
    scores = pl.DataFrame(rows)
    whole = alarm_events(scores, ["x", "y"])
    for top in (None, 5):
        found = AlarmEvents(["x", "y"], top)
        for lo, hi in [(0, 17), (17, 50), (50, 51), (51, 90), (90, n)]:
            chunk = scores.filter(pl.col("ts").is_between(t0 + dt.timedelta(minutes=lo), t0 + dt.timedelta(minutes=hi - 1)))
            if lo == 50:
                chunk = chunk.filter(pl.col("_entity") != "b")
            if lo == 51:
                chunk = pl.concat([scores.filter((pl.col("_entity") == "b") & (pl.col("ts") == t0 + dt.timedelta(minutes=50))),
                                   chunk]).sort("_entity", "ts", maintain_order=True)
            found.add_part(AlarmEvents.part(chunk, ["x", "y"], top))
        got = found.finish()
        assert found.count == len(whole) and got == (whole[:top] if top else whole)
    assert len(whole) > 20 and any(e["ticks"] >= 35 for e in whole)
    for e in whole:
        start, end = (dt.datetime.strptime(e[k], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=dt.timezone.utc)
                      for k in ("start", "end"))
        ticks = scores.filter((pl.col("_entity") == e["entity"]) & pl.col("ts").is_between(start, end))
        counts = ticks["cause"].drop_nulls().value_counts()          # the cause: the one most of its ticks name
        assert e["cause"] == (counts.filter(pl.col("count") == counts["count"].max())["cause"].sort()[0]
                              if counts.height else None)
        named = ticks["channel_x"].value_counts()                   # a cause with channels: its channel too
        assert e["cause_channel"] == (named.filter(pl.col("count") == named["count"].max())["channel_x"].sort()[0]
                                      if e["cause"] == "x" else None)
        if e["dominant"] == "y":                          # a modality without channels: none named
            assert e["channel"] is None
            continue
        counts = ticks["channel_x"].value_counts()
        most = counts.filter(pl.col("count") == counts["count"].max())["channel_x"].sort()[0]
        assert e["channel"] == most
    assert {e["dominant"] for e in whole} == {"x", "y"}


def test_timeline_rows_reduced_a_date_at_a_time_are_those_of_the_whole_window_and_keep_every_pixel():
    """`drawn_rows` of chunks' `drawn_rows` is `drawn_rows` of the whole window (gaps and runs across chunk edges,
    an entity absent from a chunk, long ties, a line that comes and goes every other tick), and its rows keep what
    a timeline shows of every row: per pixel column each line's first, last, lowest and highest value and where
    it has none, and where each alarm and labelled kind starts and ends - at most a few rows per column."""
    from pipelines.report import PLOT_COLUMNS, drawn_rows, pixel_column

    rng = np.random.default_rng(7)
    n = 30_000                                                                  # ~32 ticks a pixel column
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    frames = []
    for g, start in (("a", 0), ("b", 1000), ("c", 0)):
        gap = np.zeros(n, bool)
        gap[2990:3030] = gap[4000:4001] = gap[n - 2:] = True                      # one across the 3000 cut
        tied = np.where(np.arange(n) % 1500 < 700, 0.0, rng.random(n))            # long runs of one value
        alarm = (rng.random(n) < 0.05) | ((np.arange(n) >= 2995) & (np.arange(n) < 3010))
        frames.append(pl.DataFrame({
            "_entity": g, "ts": pl.datetime_range(t0 + dt.timedelta(minutes=start),
                                                  t0 + dt.timedelta(minutes=start + n - 1), "1m", eager=True),
            "threshold": 2.5, "score": np.cumsum(rng.normal(size=n)), "score_x": np.where(gap, np.nan, rng.normal(size=n)),
            "score_y": tied, "score_z": np.where(np.arange(n) % 2 == 0, rng.normal(size=n), np.nan), "is_anomaly": alarm,
            "label_kind": pl.Series([["leak", None, "heat"][(i // 400) % 3] for i in range(n)], dtype=pl.String)}))
    rows = pl.concat(frames).with_columns(pl.when(pl.col("_entity") == "c").then(None).otherwise(pl.col("score_y"))
                                          .alias("score_y"))                  # c: y never there
    cuts = [t0 + dt.timedelta(minutes=m) for m in (0, 1440, 2880, 3000, 3001, 5000, 20_000, 40_000)]
    rows = rows.filter((pl.col("_entity") != "c") | (pl.col("ts") != cuts[3]))    # c absent from the 4th chunk
    spans = rows.group_by("_entity").agg(pl.col("ts").min().dt.epoch("us").alias("_t0"),
                                         pl.col("ts").max().dt.epoch("us").alias("_t1")).sort("_entity")
    lines, marks = ["score", "score_x", "score_y", "score_z"], ["is_anomaly", "label_kind"]
    whole = drawn_rows(rows, spans, lines, marks)
    parts = [drawn_rows(rows.filter((pl.col("ts") >= lo) & (pl.col("ts") < hi)), spans, lines, marks)
             for lo, hi in zip(cuts, cuts[1:])]
    again = drawn_rows(pl.concat(parts[::-1], how="diagonal_relaxed"), spans, lines, marks)
    assert again.equals(whole)
    assert whole.height < 0.4 * rows.height                                    # ~32 rows a column to ~10

    def per_column(frame: pl.DataFrame, first: int, last: int) -> pl.DataFrame:
        return frame.with_columns(pixel_column(pl.col("ts").dt.epoch("us"), first, last).alias("col"))

    for (g,), one in rows.group_by("_entity"):
        first, last = spans.filter(pl.col("_entity") == g).row(0)[1:]
        drawn = per_column(whole.filter(pl.col("_entity") == g), first, last)
        one = per_column(one, first, last)
        assert drawn["ts"].is_sorted() and (drawn["ts"][0], drawn["ts"][-1]) == (one["ts"].min(), one["ts"].max())
        for name in lines:
            line = drawn.filter(pl.col(f"_line_{name}"))
            assert line.group_by("col").len()["len"].max() <= 6
            assert line_summary(line, name).equals(line_summary(one, name)), name
        for name in marks:
            assert mark_summary(drawn, name).equals(mark_summary(one, name)) and mark_summary(one, name).height > 100


def line_summary(rows: pl.DataFrame, name: str) -> pl.DataFrame:
    """Per pixel column: a line's lowest, highest, first and last value and first and last tick without one."""
    v = pl.col("v")
    return (rows.with_columns(pl.col(name).cast(pl.Float64).fill_nan(None).alias("v")).group_by("col")
            .agg(v.min().alias("lo"), v.max().alias("hi"), v.drop_nulls().first().alias("v0"),
                 v.drop_nulls().last().alias("v1"), pl.col("ts").filter(v.is_null()).min().alias("gap0"),
                 pl.col("ts").filter(v.is_null()).max().alias("gap1")).sort("col"))


def mark_summary(rows: pl.DataFrame, name: str) -> pl.DataFrame:
    """Per pixel column and value of a mark (alarm, labelled kind): its first and last tick."""
    marked = rows.filter(pl.col(name).cast(pl.String).is_in(["true", "leak", "heat"]))
    return marked.group_by("col", name).agg(pl.col("ts").min().alias("t0"), pl.col("ts").max().alias("t1")).sort("col", name)


def test_the_report_page_on_ray_tasks_is_the_page_of_one_process(window, tmp_path, monkeypatch, local_ray):
    """`build_report` with its dates read by tasks writes the page that one process writes (all but the time it
    was generated), and this process reads no date of scores."""
    import re

    import pipelines.evaluate as ev
    import pipelines.report as rp

    spec, _ = window
    monkeypatch.setattr(rp, "ray_running", lambda: False)
    here = rp.build_report(spec, tmp_path / "here.html").read_text()
    monkeypatch.undo()

    def no_rows_here(*_args, **_kwargs):
        raise AssertionError("the report's process read a date of scores")
    monkeypatch.setattr(ev, "read_score_date", no_rows_here)
    tasks = rp.build_report(spec, tmp_path / "tasks.html").read_text()
    generated = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC")
    assert generated.sub("", tasks) == generated.sub("", here)
    assert 'id="curves"' in here and here.count('class="timeline"') == 3 and 'id="events-table"' in here


def test_labelled_events_without_a_scored_tick_are_counted_named_and_kept(window, tmp_path, monkeypatch, capsys,
                                                                          local_ray):
    """A labelled event of the window that holds no scored tick - its entity never scored there (a key written
    otherwise), or its hours not scored - is counted per reason, named (printed, warned, in metrics.json and on the
    page) and kept in labels_unscored.parquet, the same in one process and on Ray tasks; an event outside the window
    is not one of them, and the metrics stay those of the events that were scored."""
    import pipelines.evaluate as ev
    from pipelines.report import build_report

    spec, _ = window
    monkeypatch.setattr(ev, "ray_running", lambda: False)
    clean = ev.evaluate(spec)
    at = [dt.datetime(2024, 3, d, h, tzinfo=dt.timezone.utc) for d, h in ((2, 5), (3, 6), (20, 1))]
    pl.DataFrame({"machine_id": ["pump-9", "c", "a"], "start_ts": at, "end_ts": [t + dt.timedelta(hours=1) for t in at],
                  "kind": ["spike", "drift", "spike"]}).write_parquet(tmp_path / "labels" / "part-1.parquet")
    out = tmp_path / "eval"
    result = ev.evaluate(spec, report_dir=str(out))
    printed = capsys.readouterr().out
    assert result["unscored_events"] == {
        "events": 2, "by_reason": {ev.NEVER_SCORED: 1, ev.NONE_INSIDE: 1},
        "first": [f"machine_id=pump-9 2024-03-02 05:00 to 2024-03-02 06:00 UTC, spike ({ev.NEVER_SCORED})",
                  f"machine_id=c 2024-03-03 06:00 to 2024-03-03 07:00 UTC, drift ({ev.NONE_INSIDE})"]}
    assert {k: result[k] for k in ("overall", "by_kind", "detection")} == \
        {k: clean[k] for k in ("overall", "by_kind", "detection")}
    assert "labels: 2 labelled event(s) in the window hold no scored tick, so no metric counts them (1 entity " \
           "with no scored tick in the window, 1 no scored tick inside the event): machine_id=pump-9" in printed
    kept = pl.read_parquet(out / "labels_unscored.parquet")
    assert kept.columns == ["machine_id", "start_ts", "end_ts", "kind", "reason"]
    assert kept.select("machine_id", "start_ts", "reason").rows() == [("pump-9", at[0], ev.NEVER_SCORED),
                                                                    ("c", at[1], ev.NONE_INSIDE)]
    assert json.loads((out / "metrics.json").read_text())["unscored_events"]["events"] == 2
    assert "no metric counts them" in build_report(spec, tmp_path / "r.html").read_text()
    monkeypatch.undo()
    assert ev.ray_running()
    on_tasks = ev.evaluate(spec, report_dir=str(tmp_path / "tasks"))
    assert on_tasks["unscored_events"] == result["unscored_events"]
    assert pl.read_parquet(tmp_path / "tasks" / "labels_unscored.parquet").equals(kept)
    assert "unscored_events" not in clean


def test_unusable_label_rows_are_left_out_counted_and_kept_and_a_wrong_type_is_named(window, tmp_path, monkeypatch,
                                                                                     capsys):
    """Label rows without an entity or a start, ending before they start, or repeating an earlier row's event, are
    left out of the metrics, counted per reason (printed, in metrics.json, on the page) and kept in
    labels_unusable.parquet; a time column of numbers
    is a DataError naming the file's path and the column, one of text is read as ISO 8601."""
    from dataclasses import replace

    import pipelines.evaluate as ev
    from pipelines.labels import load_labels
    from pipelines.report import build_report
    from pipelines.storage import DataError, Storage

    spec, _ = window
    monkeypatch.setattr(ev, "ray_running", lambda: False)
    clean = ev.evaluate(spec)
    t = dt.datetime(2024, 3, 2, 1, tzinfo=dt.timezone.utc)
    bad = pl.DataFrame({"machine_id": ["a", None, "b"], "start_ts": [None, t, t], "end_ts": [t, t, t - dt.timedelta(hours=1)],
                        "kind": ["drift", "drift", "spike"]})
    bad.write_parquet(tmp_path / "labels" / "part-1.parquet")
    # an event exported twice (another file repeating the first one's row) counts once
    pl.read_parquet(tmp_path / "labels" / "part-0.parquet").head(1).write_parquet(tmp_path / "labels" / "part-2.parquet")
    out = tmp_path / "eval"
    result = ev.evaluate(spec, report_dir=str(out))
    repeat = "repeats an earlier row (same machine_id, start_ts, end_ts, kind)"
    assert result["labels"] == {"path": spec.labels.path, "rows": 9, "used": 5, "unusable": {
        "end_ts before start_ts": 1, "null machine_id": 1, "null start_ts": 1, repeat: 1}}
    assert {k: result[k] for k in ("overall", "by_kind", "detection")} == \
        {k: clean[k] for k in ("overall", "by_kind", "detection")}
    kept = pl.read_parquet(out / "labels_unusable.parquet")
    assert sorted(kept["reason"].to_list()) == ["end_ts before start_ts", "null machine_id", "null start_ts", repeat]
    assert "labels: 5 of 9 rows used; left out: 1 end_ts before start_ts, 1 null machine_id, 1 null start_ts, " \
           f"1 {repeat}" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["labels"]["used"] == 5
    page = build_report(spec, tmp_path / "r.html").read_text()
    assert "5 of 9 rows used; left out: 1 end_ts before start_ts" in page
    (tmp_path / "labels" / "part-2.parquet").unlink()

    # entity keys of another type: cast to the scores' type where they can be, else named
    labels = load_labels(spec, Storage())
    categorical = replace(labels, usable=labels.usable.with_columns(pl.col("machine_id").cast(pl.Categorical)))
    assert categorical.keyed_as(spec, ev.score_types(ev.open_scores(spec, Storage()))).usable.equals(labels.usable)
    with pytest.raises(DataError, match="column 'machine_id' is String and some of its values cannot be read as Int64"):
        labels.keyed_as(spec, {"machine_id": pl.Int64})
    (tmp_path / "labels" / "part-0.parquet").unlink()
    bad.with_columns(pl.col("start_ts").dt.epoch("s").cast(pl.Float64)).write_parquet(
        tmp_path / "labels" / "part-1.parquet")
    with pytest.raises(DataError, match=rf"labels {tmp_path / 'labels' / 'part-1.parquet'}: column 'start_ts' is "
                                        "Float64"):
        load_labels(spec, Storage())
    # text is read as ISO 8601 times: what is none is left out, counted under its own reason
    bad.with_columns(pl.col("start_ts").dt.strftime("%Y-%m-%dT%H:%M:%SZ").fill_null("soon")).write_parquet(
        tmp_path / "labels" / "part-1.parquet")
    assert load_labels(spec, Storage()).summary()["unusable"] == {"end_ts before start_ts": 1, "null machine_id": 1,
                                                                   "start_ts 'soon' not an ISO 8601 time": 1}


def test_alarm_events_are_the_runs_of_alarm_ticks_with_their_true_start_and_open_end(window, tmp_path, capsys,
                                                                                      monkeypatch):
    """`dmafn alarms`: each run of consecutive alarm ticks of an entity with a tick in the window, as a brute-force
    pass over the look-back date and the window finds it - a run open at the window's start keeps the start it had
    on the date before, one alarming at the window's last tick is `open`; the dominant modality is the one with the
    largest mean contribution; JSON lines; the newest date by default; --date with --start is a usage error."""
    import yaml

    from jobs.cli import main
    from pipelines.alarms import alarm_events

    spec, scores = window
    first, last = DATES[1], DATES[3]
    found = alarm_events(spec, start=first, end=last)
    assert found.dates == [d.isoformat() for d in DATES[1:4]]
    read = scores.filter(pl.col("date").is_between(pl.lit(DATES[0].isoformat()), pl.lit(last.isoformat()))
                         ).sort("machine_id", "ts")
    brute = []
    for (name,), rows in read.group_by(["machine_id"], maintain_order=True):
        flags, ts = rows["is_anomaly"].to_list(), rows["ts"].to_list()
        proc, vib, score = rows["score_process"].to_list(), rows["score_vibration"].to_list(), rows["score"].to_list()
        i = 0
        while i < len(flags):
            if not flags[i]:
                i += 1
                continue
            j = i
            while j + 1 < len(flags) and flags[j + 1]:
                j += 1
            if ts[j].date() >= first:
                v = [x for x in vib[i:j + 1] if x is not None]
                means = {"process": float(np.mean(proc[i:j + 1])), **({"vibration": float(np.mean(v))} if v else {})}
                brute.append({"entity": name, "start": ts[i], "end": ts[j], "ticks": j - i + 1,
                              "peak": max(score[i:j + 1]), "dominant": max(means, key=means.get),
                              "open": ts[j] == ts[-1], "earlier": i == 0})
            i = j + 1
    brute.sort(key=lambda e: (e["start"], e["entity"]))
    got = [{"entity": e["entity"], "start": dt.datetime.fromisoformat(e["start"]), "end": dt.datetime.fromisoformat(e["end"]),
            "ticks": e["ticks"], "peak": e["peak"], "dominant": e["dominant"], "open": e["open"],
            "earlier": e["may_have_begun_earlier"]} for e in found.events]
    assert got == brute and len(got) > 20
    kept = alarm_events(spec, start=first, end=last, min_ticks=3)
    longer = kept.events
    assert [(e["entity"], e["start"]) for e in longer] == [(e["entity"], e["start"]) for e in found.events
                                                          if e["ticks"] >= 3] and 0 < len(longer) < len(got)
    assert kept.text().startswith(f"alarm events on {first}..{last}: {len(longer)} (of 3 alarm ticks or more; "
                                  f"{len(got) - len(longer)} shorter left out)")
    assert found.text().startswith(f"alarm events on {first}..{last}: {len(got)}\n")     # N = 1: nothing left out
    assert any(e["start"].date() < first for e in brute)                   # a run carried in from the date before
    assert all(e["machine_id"] == e["entity"] for e in found.events)
    # the newest date by default, JSON lines through the CLI; a window without alarms lists none
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert main(["alarms", str(path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == alarm_events(spec, start=DATES[-1], end=DATES[-1]).events
    assert lines and all(e["end"][:10] == DATES[-1].isoformat() for e in lines)
    assert main(["alarms", str(path), "--date", DATES[2].isoformat()]) == 0
    assert capsys.readouterr().out.startswith(f"alarm events on {DATES[2].isoformat()}: ")
    with pytest.raises(SystemExit):
        main(["alarms", str(path), "--date", DATES[2].isoformat(), "--start", DATES[1].isoformat()])
    import pipelines.alarms as al
    read_date = al.read_score_date
    monkeypatch.setattr(al, "read_score_date", lambda *a: read_date(*a).with_columns(pl.lit(False).alias("is_anomaly")))
    none = alarm_events(spec, start=first, end=last)
    assert none.events == [] and none.text() == f"alarm events on {first}..{last}: 0"


def test_alarm_events_keep_each_key_column_as_stored_and_a_run_across_midnight_whole(tmp_path):
    """With two entity key columns, one of them an integer, each event carries both as stored (JSON numbers stay
    numbers) and `entity` joins them; a run from 23:50 to 00:10 listed for the second date keeps its start, and its
    channel is the one most of its ticks on both dates name, its cause (with the cause's channel) likewise; the
    table shows a cause unlike the dominant modality beside it."""
    from pipelines.alarms import AlarmList, alarm_events

    spec = parse_spec({
        "name": "alarms", "entity": ["site", "pump"], "time": "ts", "grain": "10min", "partition": "date",
        "modalities": {"process": {"kind": "tabular", "path": str(tmp_path / "raw"), "columns": ["x", "y"],
                                   "tolerance": "10min"}},
        "train": {"start": "2024-02-01", "end": "2024-02-02"},
        "registry": str(tmp_path / "models"), "score": {"output": str(tmp_path / "scores")}}, source="t.yaml")
    ts = [dt.datetime(2024, 3, 1, 23, 30), dt.datetime(2024, 3, 1, 23, 40), dt.datetime(2024, 3, 1, 23, 50),
          dt.datetime(2024, 3, 2, 0, 0), dt.datetime(2024, 3, 2, 0, 10), dt.datetime(2024, 3, 2, 0, 20)]
    alarm = [False, False, True, True, True, False]
    rows = pl.DataFrame({"site": [7] * 6, "pump": ["a"] * 6, "ts": ts, "score": [1.0, 1.0, 3.0, 5.0, 4.0, 1.0],
                         "threshold": 2.0, "is_anomaly": alarm, "score_process": [0.5, 0.5, 3.0, 5.0, 4.0, 0.5],
                         "channel_process": ["x", "x", "y", "y", "x", "x"],
                         "cause": [None, None, None, "process", "process", None],
                         "model_version": "v"}).with_columns(pl.col("ts").dt.replace_time_zone("UTC"),
                                                             pl.col("ts").dt.date().cast(pl.String).alias("date"))
    for date in ("2024-03-01", "2024-03-02"):
        write_deltalake(spec.score.output, rows.filter(pl.col("date") == date).to_arrow(), mode="append",
                        partition_by=["date"])
    (event,) = alarm_events(spec).events                     # the newest date, 2024-03-02
    assert event == {"entity": "7|a", "site": 7, "pump": "a", "start": "2024-03-01T23:50:00+00:00",
                     "end": "2024-03-02T00:10:00+00:00", "ticks": 3, "peak": 5.0, "dominant": "process",
                     "channel": "y", "cause": "process", "cause_channel": "y", "contributions": {"process": 4.0},
                     "open": False, "may_have_begun_earlier": False}
    echo = dict(event, dominant="camera", channel=None)            # the table names a cause unlike the dominant one
    assert AlarmList(["2024-03-02"], [event]).text().splitlines()[-1].endswith("5.000  process (y)")
    assert AlarmList(["2024-03-02"], [echo]).text().splitlines()[-1].endswith("5.000  camera  <- process (y)")
    (first,) = alarm_events(spec, start=dt.date(2024, 3, 1), end=dt.date(2024, 3, 1)).events
    assert first["open"] and first["end"] == "2024-03-01T23:50:00+00:00" and first["ticks"] == 1
    assert json.loads(json.dumps(event))["site"] == 7
