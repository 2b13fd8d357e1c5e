"""`dmafn status`: the registry's versions and the runs table's dates, and the problems among them - on a real
runs table (Delta, in a temp folder) and registry folders, without Ray."""
import datetime as dt
import json
from dataclasses import replace

import polars as pl
import pytest
import yaml

from dmafn.spec import parse_spec
from pipelines.score import DateResult, record_run
from pipelines.shards import UnseenEntities
from pipelines.status import scoring_status
from pipelines.storage import Storage
from tests.conftest import tiny_spec_dict

OLD, NEW = "20240101T000000Z-aaaaaa", "20240102T120000Z-bbbbbb"


def _spec(tmp_path):
    data = tiny_spec_dict(registry=str(tmp_path / "models"), score={"output": str(tmp_path / "scores")})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_spec(data, source=str(path)), str(path)


def _version(tmp_path, version, alarm_rate=0.003, latest=True, entities=None, enrolled=(), spec=None):
    folder = tmp_path / "models" / version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        **({} if spec is None else {"spec": spec}),
        **({} if entities is None else {"entity_statistics": {"file": "x.parquet", "entities": entities}}),
        **({"enrolled": [{"from_version": OLD, "entities": n} for n in enrolled]} if enrolled else {}),
        "created_at": "2024-01-02T12:00:30+00:00", "warnings": ["modality 'proc': a warning"],
        "calibration": {"validation": {"validation_alarm_rate": alarm_rate}},
        "training_window": {"train_days": ["2024-01-01"], "validation_days": ["2024-01-02"]}}))
    if latest:
        (tmp_path / "models" / "LATEST").write_text(version)


def _run(spec, day, status="succeeded", version=OLD, above=0.5, anomalies=3, error="x.parquet: not Parquet\nmore",
         unseen=None, **counts):
    """A run of `day` recorded in the runs table; `counts`: more of a succeeded date's `DateResult` fields."""
    shares = {"proc": 0.97, "vib": 0.4} if above > 0.75 else {"proc": 0.5, "vib": 0.5}
    counts = {"input_rows_quarantined": 5, **counts}
    result = DateResult(day, 100, 98, 2, anomalies, 1.0, above_validation_median=above,
                        modality_above=shares, unseen=unseen, **counts) \
        if status == "succeeded" else DateResult(day, 0, 0, 0, 0, 0.0)
    record_run(spec, Storage(), result, run_id=f"r-{day}", version=version, status=status, expected_alarm_rate=0.003,
               error=None if status == "succeeded" else error)


def test_status_names_failed_never_scored_unlike_and_stale_dates(tmp_path):
    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD, latest=False)
    _version(tmp_path, NEW)
    (tmp_path / "models" / "_alone").mkdir()                          # the baselines' registry: not a version
    _run(spec, "2024-01-03")
    _run(spec, "2024-01-04", status="failed")
    _run(spec, "2024-01-04", above=0.9)                               # failed, then scored: not failed now
    _run(spec, "2024-01-06", status="failed")
    _run(spec, "2024-01-07", status="failed", error="no modality has data for 2024-01-07")
    _run(spec, "2024-01-08")
    _run(spec, "2024-01-03", status="failed", error="killed")          # a re-run that failed: its rows still stand
    _run(spec, "2024-01-09", status="failed")                         # the same cause as 2024-01-06: one line
    found = scoring_status(spec, Storage(), today=dt.date(2024, 1, 12), max_age_days=2, spec_path="s.yaml")
    text = found.text()
    assert f"model versions: 2 in {spec.registry}; LATEST {NEW} (created 2024-01-02 12:00 UTC; trained on " \
           "2024-01-01, validated on 2024-01-02; expected alarm rate 0.30%; 1 training warning(s))" in text
    assert f"scored: 3 date(s), 2024-01-03 .. 2024-01-08 (the newest by {OLD})" in text
    assert f"LATEST {NEW} has scored no date yet" in text
    assert len(found.problems) == 6, found.problems
    failed, failed_no_data, rerun, never, unlike, stale = found.problems
    assert failed == ("2 date(s) whose runs all failed: 2024-01-06, 2024-01-09 (x.parquet: not Parquet) - mend it, "
                      "then run dmafn backfill s.yaml --start 2024-01-06 --end 2024-01-09 (dates scored since are "
                      "skipped)")
    assert failed_no_data.startswith("1 date(s) whose runs all failed: 2024-01-07 (no modality has data for "
                                     "2024-01-07) - mend it")
    assert rerun == ("2024-01-03: its latest run failed (killed); the output holds an earlier run's rows - mend it, "
                     "then run dmafn score s.yaml --date 2024-01-03 again (scoring a date replaces it)")
    assert never == ("1 date(s) never scored between 2024-01-03 and 2024-01-08: 2024-01-05 - run dmafn backfill "
                     "s.yaml --start 2024-01-05 --end 2024-01-05")
    assert unlike.startswith(f"2024-01-04: 90% of its scored ticks score above model version {OLD}'s validation "
                             "median")
    assert unlike.endswith("(each modality's contribution above its validation median; proc 97%; vib 40%)")
    assert stale.startswith("the newest scored date is 2024-01-08, 4 days before 2024-01-12 (at most 2 allowed)")
    # the newest dates side by side, the latest run of each date only
    table = text.split("the 6 newest date(s):\n")[1].split("\nproblems")[0].splitlines()
    assert table[0].split()[:3] == ["date", "status", "model"] and len(table) == 7
    assert [line.split()[:2] for line in table[1:]] == [
        ["2024-01-03", "failed"], ["2024-01-04", "succeeded"], ["2024-01-06", "failed"], ["2024-01-07", "failed"],
        ["2024-01-08", "succeeded"], ["2024-01-09", "failed"]]
    assert table[5].split()[3:] == ["100", "98", "2", "5", "3", "3.06%", "0.30%", "50%", "-", "-"]
    assert table[2].split()[-3] == "90%"
    assert table[3].split()[3:] == ["0", "0", "0", "0", "0", "-", "0.30%", "-", "-", "-"]
    # only the newest `days` dates are checked for days unlike validation; a recent enough date is not stale
    quiet = scoring_status(spec, Storage(), today=dt.date(2024, 1, 9), days=2, max_age_days=2, spec_path="s.yaml")
    assert quiet.problems == [failed, failed_no_data, rerun, never]


def test_status_of_a_spec_with_nothing_trained_or_scored_and_the_cli_exit_codes(tmp_path, capsys):
    from jobs.cli import main

    spec, path = _spec(tmp_path)
    found = scoring_status(spec, Storage(), spec_path=path)
    assert found.as_dict() == {"versions": 0, "latest": None, "scored": {"dates": 0}, "recent": [],
                               "problems": found.problems}
    assert found.problems == [f"no model version named in {spec.registry}/LATEST: run dmafn train {path}",
                              f"nothing scored yet in {spec.score.output}: run dmafn score {path} (or dmafn backfill "
                              f"{path} --start D --end D)"]
    _version(tmp_path, OLD)
    today = dt.datetime.now(dt.timezone.utc).date()
    _run(spec, (today - dt.timedelta(days=3)).isoformat())
    _run(spec, (today - dt.timedelta(days=1)).isoformat())
    assert main(["status", path, "--check", "--max-age-days", "2"]) == 1      # the date between: never scored
    assert main(["status", path, "--max-age-days", "2"]) == 0                 # printed, not an exit code
    _run(spec, (today - dt.timedelta(days=2)).isoformat())
    assert scoring_status(spec, Storage(), max_age_days=2).problems == []
    assert main(["status", path, "--check", "--max-age-days", "2"]) == 0
    capsys.readouterr()
    assert main(["status", path, "--json", "--days", "2"]) == 0                # the same, as data
    found = json.loads(capsys.readouterr().out)
    assert found["versions"] == 1 and found["latest"]["version"] == OLD and found["problems"] == []
    assert found["latest"]["expected_alarm_rate"] == 0.003 and found["latest"]["train_days"] == ["2024-01-01"]
    assert found["scored"] == {"dates": 3, "first": (today - dt.timedelta(days=3)).isoformat(),
                               "newest": (today - dt.timedelta(days=1)).isoformat(), "newest_version": OLD}
    assert [r["date"] for r in found["recent"]] == [(today - dt.timedelta(days=d)).isoformat() for d in (2, 1)]
    assert found["recent"][0]["rows_scored"] == 98 and found["recent"][0]["above_validation_median_proc"] == 0.5
    with pytest.raises(SystemExit) as usage:                                   # argparse's usage error
        main(["status", path, "--days", "0"])
    assert usage.value.code == 2


def test_status_reads_a_runs_table_from_before_its_newer_columns_and_names_a_table_that_is_not_one(tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake

    from pipelines.storage import DataError

    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD)
    when = pa.array([dt.datetime(2024, 1, 4, tzinfo=dt.timezone.utc)] * 2, pa.timestamp("us", tz="UTC"))
    write_deltalake(spec.score.runs_path, pa.table({       # the first runs tables' columns only
        "run_id": ["r", "r"], "date": ["2024-01-02", "2024-01-03"], "model_version": [OLD, OLD],
        "ticks_in": pa.array([10, 10], pa.int64()), "rows_scored": pa.array([10, 10], pa.int64()),
        "status": ["succeeded", "failed"], "finished_at": when}))
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    assert found.problems == ["1 date(s) whose runs all failed: 2024-01-03 - mend it, then run dmafn backfill s.yaml "
                              "--start 2024-01-03 --end 2024-01-03 (dates scored since are skipped)"]
    rows = found.text().split("the 2 newest date(s):\n")[1].splitlines()
    assert rows[1].split() == ["2024-01-02", "succeeded", OLD, "10", "10", "-", "-", "-", "-", "-", "-", "-", "-"]
    write_deltalake(spec.score.runs_path, pa.table({"date": ["2024-01-05"], "n": [1]}), mode="overwrite",
                    schema_mode="overwrite")
    with pytest.raises(DataError, match=f"{spec.score.runs_path}: not a runs table of dmafn's \\(no column status, "
                                        "model_version, finished_at\\)"):
        scoring_status(spec, Storage())


def test_status_counts_dates_skipped_for_want_of_input_as_handled_not_as_problems(tmp_path):
    """A plant at rest (`score.missing_input: skip`): its skipped dates are listed, not failures; they count as
    handled for the gap and age checks, so a date missing between them is named."""
    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD)
    _run(spec, "2024-01-03")
    _run(spec, "2024-01-04", status="skipped", error="no modality of spec 's' has data for 2024-01-04")
    _run(spec, "2024-01-06", status="skipped", error="no modality of spec 's' has data for 2024-01-06")
    found = scoring_status(spec, Storage(), today=dt.date(2024, 1, 7), max_age_days=2, spec_path="s.yaml")
    assert "skipped for want of any input (score.missing_input: skip): 2 date(s), 2024-01-04, 2024-01-06" \
        in found.text() and found.as_dict()["skipped"] == ["2024-01-04", "2024-01-06"]
    assert found.problems == ["1 date(s) never scored between 2024-01-03 and 2024-01-06: 2024-01-05 - run dmafn "
                              "backfill s.yaml --start 2024-01-05 --end 2024-01-05"]       # not stale, not failed
    later = scoring_status(spec, Storage(), today=dt.date(2024, 1, 10), max_age_days=2, spec_path="s.yaml")
    assert later.problems[-1].startswith("the newest scored date is 2024-01-03, 7 days before 2024-01-10")


def test_status_counts_the_entities_enrolled_into_the_latest_version_since_its_training(tmp_path):
    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD, latest=False, entities=40)
    _version(tmp_path, NEW, entities=45, enrolled=(2, 3))                 # two enrolments into OLD, then into theirs
    found = scoring_status(spec, Storage())
    assert "trained on 2024-01-01 (45 entities, 5 enrolled since " + OLD + " was trained), validated on" \
        in found.text()
    assert (found.as_dict()["latest"]["enrolled"], found.as_dict()["latest"]["enrolled_into"]) == (5, OLD)


def test_status_names_recent_dates_the_latest_version_scored_entities_it_has_no_statistics_of(tmp_path):
    """Machines new since LATEST's training days score by the fleet's statistics and alarm more: status names the
    recent dates LATEST scored them on (a date scored by an older version is not named: a newer one may hold them)."""
    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD, latest=False)
    _version(tmp_path, NEW, entities=40)
    _run(spec, "2024-01-03", unseen=UnseenEntities(3, 300, 150, ["m-7", "m-8", "m-9"]))
    _run(spec, "2024-01-04", version=NEW, unseen=UnseenEntities(2, 200, 50, ["m-8", "m-9"]))
    _run(spec, "2024-01-05", version=NEW, unseen=UnseenEntities(1, 100, 30, ["m-9"]))
    _run(spec, "2024-01-06", version=NEW, unseen=UnseenEntities())
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    assert found.problems == [
        f"entities not in LATEST {NEW}'s training data (up to 2 a date) were scored by the fleet's statistics on 2 "
        "recent date(s): 2024-01-04, 2024-01-05; their alarm rate 27.5% - enrol them (dmafn enroll s.yaml --start "
        "2024-01-04 --end 2024-01-05: days that hold them, normal for them) or train a version on such days, then "
        "rescore with it (dmafn backfill s.yaml --start 2024-01-04 --end 2024-01-05)"]
    assert f"LATEST {NEW} (created 2024-01-02 12:00 UTC; trained on 2024-01-01 (40 entities), validated on" \
        in found.text() and found.as_dict()["latest"]["entities"] == 40
    table = found.text().split("the 4 newest date(s):\n")[1].split("\nproblems")[0].splitlines()
    assert [line.split()[-1] for line in table[1:]] == ["3", "2", "1", "0"]
    assert [r["unseen_entities"] for r in found.as_dict()["recent"]] == [3, 2, 1, 0]
    assert scoring_status(spec, Storage(), days=1).problems == []              # the newest date holds none


def test_status_tells_keys_a_source_respelled_from_new_machines_and_names_keys_that_never_meet(tmp_path):
    """Unseen entities spelled like trained ones (`UnseenEntities.respelled`) are a source's keys written otherwise:
    status says to mend the keys, not to enrol them; a date whose keys' modalities never met (the runs table's
    `unmet_keys`) is a problem of its own, with the newest date's warning."""
    spec, _ = _spec(tmp_path)
    _version(tmp_path, NEW, entities=40)
    line = "entity keys that differ only in case ... 'PUMP-00' (cam) and 'pump-00' (proc, vib) - ..."
    _run(spec, "2024-01-04", version=NEW, unseen=UnseenEntities(2, 200, 20, ["PUMP-00", "m-9"], 1,
                                                                   [("PUMP-00", "pump-00")]), unmet_keys=[line])
    _run(spec, "2024-01-05", version=NEW, unseen=UnseenEntities(1, 100, 10, ["PUMP-00"], 1, [("PUMP-00", "pump-00")]),
         unmet_keys=[line, "modality 'cam': none of its 1 entities ..."])
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    assert found.problems == [
        f"entities not in LATEST {NEW}'s training data (up to 2 a date, up to 1 of them spelled like a trained entity "
        "but for case, spaces, separators or padding zeros) on 2 recent date(s): 2024-01-04, 2024-01-05; their alarm "
        "rate 10.0% - has a source changed how it writes its keys (dmafn score names them)? Write them as trained at "
        "the source, then rescore (dmafn backfill s.yaml --start 2024-01-04 --end 2024-01-05); enrol the others "
        "(dmafn enroll)",
        f"entity keys whose modalities never meet on 2 recent date(s): 2024-01-04, 2024-01-05 - on 2024-01-05: {line} "
        "(and 1 more warning(s)); then rescore (dmafn backfill s.yaml --start 2024-01-04 --end 2024-01-05)"]
    assert [r["unseen_respelled"] for r in found.as_dict()["recent"]] == [1, 1]
    only = scoring_status(spec, Storage(), days=1).problems[0]
    assert "up to 1 of them spelled like" in only and not only.endswith("(dmafn enroll)")   # no other new machine


def test_status_names_an_image_modality_whose_frames_came_in_a_size_the_version_never_trained_on(tmp_path):
    """The runs table's `new_payload_formats` beside the modality's usable rows: over 1 % of a date's frames of a size
    the version's training frames never had is a problem (a camera replaced or reconfigured); a few are not."""
    spec, _ = _spec(tmp_path)
    _version(tmp_path, NEW)
    _run(spec, "2024-01-04", version=NEW, modality_rows={"proc": 900, "cam": 1000},
         new_payload_formats={"cam": {"8x8": 5}})
    _run(spec, "2024-01-05", version=NEW, modality_rows={"proc": 900, "cam": 1000},
         new_payload_formats={"cam": {"8x8": 600, "9x9": 100}})
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    assert found.problems == [
        "modality 'cam': frames of a size or colour their version's training frames (almost) never had on 1 recent "
        "date(s): 2024-01-05 - on 2024-01-05 700 of 1000 (70%; 8x8, 9x9): a camera replaced or reconfigured? Restore "
        "its setting, or train a version on days with such frames"]          # 2024-01-04's 0.5 % is no problem
    mic = replace(spec.modalities["cam"], name="mic", kind="audio", column="wave", sample_rate=16_000)
    _run(spec, "2024-01-06", version=NEW, modality_rows={"mic": 200}, new_payload_formats={"mic": {"8000 Hz": 200}})
    audio = scoring_status(replace(spec, modalities={**spec.modalities, "mic": mic}), Storage(), days=1).problems
    assert audio == ["modality 'mic': clips of a sample rate or length their version's training clips (almost) never "
                     "had on 1 recent date(s): 2024-01-06 - on 2024-01-06 200 of 200 (100%; 8000 Hz): a microphone "
                     "replaced or reconfigured? Restore its setting, or train a version on days with such clips"]


def test_status_names_a_modality_whose_rows_came_at_another_interval_than_on_its_training_days(tmp_path):
    """The runs table's `changed_row_intervals`: a tabular or time-series modality with entities whose rows came at
    another interval than on every training day is a problem, named with its dates and the newest's entities."""
    spec, _ = _spec(tmp_path)
    _version(tmp_path, NEW)
    _run(spec, "2024-01-04", version=NEW)
    for day in ("2024-01-05", "2024-01-06"):
        _run(spec, day, version=NEW, changed_intervals={"proc": {"changed": 2, "compared": 4, "first": [
            ["pump-00", 300_000_000, 60_000_000], ["pump-02", 290_000_000, 61_000_000]]}})
    assert scoring_status(spec, Storage(), spec_path="s.yaml").problems == [
        "modality 'proc': rows at another interval than on their version's training days on 2 recent date(s): "
        "2024-01-05, 2024-01-06 - on 2024-01-06 2 of 4 entities (pump-00 every 5 min against 1 min, pump-02 every "
        "4.8 min against 1 min): a source reconfigured, or rows thinned or batched on their way? Restore its rate, or "
        "train a version on days with such rows"]


def test_status_names_recent_dates_that_lost_input_rows_as_misfiled(tmp_path):
    """Dates with over 1 % of their input rows timed outside their date partition (a lake filed by another calendar,
    or by arrival): quarantined, never scored - status names them with `timezone` and `lateness` to set and the
    backfill that rescores them; a few late rows are not a problem, and runs tables without the counts read as
    none."""
    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD)
    for day, misplaced in (("2024-01-03", 5), ("2024-01-04", 420), ("2024-01-05", 1200)):
        _run(spec, day, input_rows=10_000, input_rows_misplaced=misplaced)
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    assert found.problems == [
        "2 recent date(s) had over 1% of their input rows timed outside their date partition (up to 12.0%; "
        "quarantined, not scored): 2024-01-04, 2024-01-05 - misfiled rows, or a lake filed by another calendar than "
        "the spec's timezone (UTC) or by arrival later than its lateness allows (none): set `timezone` or `lateness` "
        "in s.yaml, then rescore (dmafn backfill s.yaml --start 2024-01-04 --end 2024-01-05 --force)"]
    assert [r["input_rows_misplaced"] for r in found.as_dict()["recent"]] == [5, 420, 1200]
    assert scoring_status(spec, Storage(), days=1, spec_path="s.yaml").problems[0].startswith("1 recent date(s)")


def test_status_names_recent_dates_that_lost_input_rows_as_unusable_with_the_reasons(tmp_path):
    """Dates with over 1 % of their input rows unusable for another reason than their partition (null values,
    times that are none, ...): quarantined, the dates scored from the rest - named with the reasons that took most
    over them and the backfill that rescores them; misplaced rows are not counted here (their own problem), and runs
    recorded before the runs table kept the reasons are named by their count alone."""
    from pipelines.score import time_text_hint, unusable_rows_warning

    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD)
    reasons = {"vib: unusable value in column 'ax'": 300, "proc: time column 'ts' holds a value, not an ISO 8601 "
               "time": 100, "logs: redelivered": 20, "cam: undecodable image in column 'frame'": 10}
    _run(spec, "2024-01-03", input_rows=10_000, input_rows_quarantined=90)            # under 1 %: not named
    _run(spec, "2024-01-04", input_rows=10_000, input_rows_quarantined=430, unusable_reasons=reasons)
    _run(spec, "2024-01-05", input_rows=10_000, input_rows_quarantined=1_500, input_rows_misplaced=1_400,
         unusable_reasons={"vib: unusable value in column 'ax'": 100})                 # 1 % unusable: not named
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    unusable = [p for p in found.problems if "unusable" in p]
    assert unusable == [
        f"1 recent date(s) had over 1% of their input rows unusable (up to 4.3%; quarantined in "
        f"{spec.score.quarantine_path}, the dates scored from the rest): 2024-01-04 - most: vib: unusable value in "
        "column 'ax' (300); proc: time column 'ts' holds a value, not an ISO 8601 time (100); logs: redelivered (20); "
        "1 more reason(s) (times written as text otherwise than ISO 8601: set the spec's time_format, or the "
        "modality's - dmafn validate s.yaml --check-data names the formats that read them); mend the source, then "
        "rescore (dmafn backfill s.yaml --start 2024-01-04 --end 2024-01-04 --force)"]
    runs = pl.read_delta(spec.score.runs_path).sort("date")
    assert [None if v is None else json.loads(v) for v in runs["input_unusable_reasons"]] == [
        None, reasons, {"vib: unusable value in column 'ax'": 100}]
    older = runs.drop("input_unusable_reasons")                       # a runs table from before: counts alone
    older.write_delta(spec.score.runs_path, mode="overwrite", delta_write_options={"schema_mode": "overwrite"})
    assert [p for p in scoring_status(spec, Storage(), spec_path="s.yaml").problems if "unusable" in p][0].startswith(
        "1 recent date(s) had over 1% of their input rows unusable (up to 4.3%; quarantined in ")
    warned = unusable_rows_warning(DateResult("2024-01-04", 100, 100, 0, 1, 1.0, input_rows_quarantined=430,
                                              input_rows=10_000, unusable_reasons=reasons), spec)
    assert warned.startswith("2024-01-04: 430 of its 10000 input rows (4.3%) could not be used, in whole or in part, and were quarantined (")
    assert warned.endswith(f"(20); 1 more reason(s) (times written as text otherwise than ISO 8601: set the spec's "
                           f"time_format, or the modality's - dmafn validate {spec.source} --check-data names the "
                           "formats that read them) - mend the source, then rescore the date (dmafn backfill "
                           f"{spec.source} --start 2024-01-04 --end 2024-01-04 --force)")
    assert time_text_hint({"vib: unusable value in column 'ax'": 3}, "s.yaml") == ""
    assert "times the time_format does not read" in time_text_hint(
        {"logs: time column 'ts' holds a value, not a time in the format '%d/%m/%Y' (time_format)": 3}, "s.yaml")
    assert unusable_rows_warning(DateResult("2024-01-03", 100, 100, 0, 1, 1.0, input_rows_quarantined=90,
                                            input_rows=10_000), spec) is None


def test_status_names_recent_dates_scored_without_input_files_that_are_no_parquet(tmp_path):
    """Dates scored without input files left out as no Parquet (`unreadable_files: skip`, their reason folded in
    the runs table's reasons) are a problem, however few their rows: named with the count of files; the score
    command's warning says the same of its date."""
    from pipelines.score import unreadable_files_warning

    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD)
    reasons = {"proc: unreadable Parquet file": 2, "vib: unreadable Parquet file": 1}
    _run(spec, "2024-01-04", input_rows=10_000, input_rows_quarantined=3, unusable_reasons=reasons)
    _run(spec, "2024-01-05", input_rows=10_000, input_rows_quarantined=1,
         unusable_reasons={"vib: unusable value in column 'ax'": 1})
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    assert [p for p in found.problems if "Parquet" in p] == [
        "1 recent date(s) were scored without 3 input file(s) that could not be read as Parquet (unreadable_files: "
        f"skip): 2024-01-04 - each named in the quarantine table ({spec.score.quarantine_path}); once mended, a "
        "backfill over the dates rescores them"]
    assert unreadable_files_warning(DateResult("2024-01-04", 100, 100, 0, 1, 1.0, input_rows_quarantined=3,
                                               input_rows=10_000, unusable_reasons=reasons), spec) == (
        "2024-01-04: 3 input file(s) could not be read as Parquet (truncated, empty or another format) and were left "
        f"out (unreadable_files: skip) - each named in the quarantine table ({spec.score.quarantine_path}, reason "
        "'unreadable Parquet file ...'); once mended, a backfill over the date rescores it (its partitions changed)")
    assert unreadable_files_warning(DateResult("2024-01-05", 100, 100, 0, 1, 1.0), spec) is None
    damaged = {"proc: damaged Parquet pages": 600}                  # a row group whose pages do not decode
    _run(spec, "2024-01-06", input_rows=10_000, input_rows_quarantined=601,
         unusable_reasons={**damaged, "vib: unreadable Parquet file": 1})
    around = {"proc: damaged Parquet pages read around the date": 1}  # the day before's, read for the first ticks
    _run(spec, "2024-01-07", input_rows=10_000, input_rows_quarantined=1, unusable_reasons=around)
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    assert [p for p in found.problems if "unreadable_files" in p] == [
        "3 recent date(s) were scored without 4 input file(s) that could not be read as Parquet and 600 input row(s) "
        "of row groups whose pages do not decode and 1 row group(s) of days read around them whose pages do not "
        "decode (unreadable_files: skip): 2024-01-04, 2024-01-06, 2024-01-07 - each named in the quarantine table "
        f"({spec.score.quarantine_path}); once mended, a backfill over the dates rescores them"]
    assert unreadable_files_warning(DateResult("2024-01-07", 100, 100, 0, 1, 1.0, unusable_reasons=around), spec) == (
        "2024-01-07: 1 row group(s) of the days read around it (its first ticks' look-back) have pages that do not "
        "decode and were left out (unreadable_files: skip) - each named in the quarantine table "
        f"({spec.score.quarantine_path}, reason 'damaged Parquet pages ...'); once mended, a backfill over the date "
        "rescores it (its partitions changed)")
    assert unreadable_files_warning(DateResult("2024-01-06", 100, 100, 0, 1, 1.0, input_rows_quarantined=600,
                                               input_rows=10_000, unusable_reasons=damaged), spec) == (
        "2024-01-06: 600 input row(s) sat in row groups whose pages do not decode (damaged in storage) and were left "
        f"out (unreadable_files: skip) - each named in the quarantine table ({spec.score.quarantine_path}, reason "
        "'damaged Parquet pages ...'); once mended, a backfill over the date rescores it (its partitions changed)")


def test_status_names_a_modality_gone_dark_for_a_date_or_for_more_machines_than_before(tmp_path):
    """A modality with no usable row in a date's partitions is named for that date; one present at 5 points less of
    the newest date's ticks than the dates before (their median), and one absent at every tick of more of the newest
    date's entities than on a recent date before, are named (the latter with its entities) - a machine that never
    has it (one on every date) is not."""
    spec, _ = _spec(tmp_path)
    _version(tmp_path, OLD)
    for day, cam_rows in (("2024-01-03", 50), ("2024-01-04", 0), ("2024-01-05", 48)):
        _run(spec, day, modality_rows={"proc": 900, "cam": cam_rows},
             modality_present={"proc": 1.0, "cam": 0.9 if cam_rows else 0.02},
             without_modality={"cam": UnseenEntities(1, 96, 4, ["m-9"])})
    found = scoring_status(spec, Storage(), spec_path="s.yaml")
    assert found.problems == [
        "modality 'cam' had no usable input row in the partitions of 1 recent date(s): 2024-01-04 - they were scored "
        "without it (its partition missing or empty, its path moved, or every row quarantined): check its input "
        "(dmafn validate s.yaml --check-data, the quarantine table); once its files are there, dmafn backfill s.yaml "
        "--start 2024-01-04 --end 2024-01-04 rescores them"]
    _run(spec, "2024-01-06", modality_rows={"proc": 900, "cam": 40}, modality_present={"proc": 1.0, "cam": 0.7},
         without_modality={"cam": UnseenEntities(3, 300, 9, ["m-2", "m-5", "m-9"])})
    problems = scoring_status(spec, Storage(), spec_path="s.yaml").problems
    assert problems[1] == (
        "modality 'cam' was present at 70% of 2024-01-06's scored ticks against 90% on the 2 recent date(s) before "
        "(median) - part of its rows missing: an upload that stopped or started late, a gap upstream; once they are "
        "there, dmafn backfill s.yaml --start 2024-01-06 --end 2024-01-06 rescores the date")
    assert problems[2] == (
        "modality 'cam' was absent at every scored tick of 3 entities on 2024-01-06 against 1 on 2024-01-03 (among "
        "them m-2, m-5, m-9) - a sensor, camera or log shipper of theirs stopped, or its rows stopped reaching the lake: "
        "their ticks were scored without it (the output's `modalities` column says which ticks had it)")
    assert found.as_dict()["recent"][1]["usable_rows_cam"] == 0
    _run(spec, "2024-01-07", modality_rows={"proc": 900, "cam": 40}, modality_present={"proc": 1.0, "cam": 0.86},
         without_modality={"cam": UnseenEntities(3, 300, 9, ["m-2", "m-5", "m-9"])})
    problems = scoring_status(spec, Storage(), spec_path="s.yaml").problems       # 86% against a median of 90%
    assert len(problems) == 2 and not any("was present at" in p for p in problems)   # still 3 without it against 1


def test_a_registry_without_latest_says_to_train_a_first_version_or_promote_a_saved_one(tmp_path):
    """No LATEST: with no version saved, train one; with candidates only (trained with --no-promote), promote the
    newest or name one - as the error every job reading LATEST raises, and as `status` advises."""
    from pipelines.registry import Registry
    from pipelines.storage import DataError

    spec, path = _spec(tmp_path)
    registry = Registry(spec.registry, Storage())
    with pytest.raises(DataError, match=r"models/LATEST: not found - the model registry holds no version yet: "
                                        r"train one \(dmafn train SPEC\)$"):
        registry.latest()
    _version(tmp_path, OLD, latest=False)
    _version(tmp_path, NEW, latest=False)
    with pytest.raises(DataError, match=rf"models/LATEST: not found - no version is promoted yet; the model registry "
                                        rf"holds 2 \(newest {NEW}\): promote one \(dmafn promote SPEC {NEW}\) or "
                                        r"name one \(--model VERSION\)$"):
        registry.latest()
    with pytest.raises(DataError, match=r"promote one"):
        registry.load()
    found = scoring_status(spec, Storage(), spec_path=path)
    assert found.problems[0] == (f"no model version named in {spec.registry}/LATEST: promote one: dmafn promote "
                                 f"{path} {NEW} (the newest)")
    (tmp_path / "models" / "LATEST").write_text(NEW)
    assert registry.latest() == NEW


def test_the_registry_rewrites_latest_whole_and_names_an_empty_one(tmp_path, monkeypatch):
    """LATEST is written beside and renamed over: a write cut short leaves the old one (a nightly score reading it
    while `train` promotes never finds it empty); an empty one is an error naming it."""
    from pipelines.registry import Registry
    from pipelines.storage import DataError

    registry, latest = Registry(str(tmp_path / "models"), Storage()), tmp_path / "models" / "LATEST"
    registry._write(str(latest), OLD.encode())
    assert registry.latest() == OLD

    def cut_short(src, dst):
        raise OSError("No space left on device")

    monkeypatch.setattr("pipelines.registry.os.replace", cut_short)
    with pytest.raises(OSError, match="No space left"):
        registry._write(str(latest), NEW.encode())
    monkeypatch.undo()
    assert registry.latest() == OLD and [p.name for p in latest.parent.iterdir()] == ["LATEST"]
    registry._write(str(latest), NEW.encode())
    assert registry.latest() == NEW
    latest.write_text("\n")
    with pytest.raises(DataError, match=r"models/LATEST: empty; it should name a saved version"):
        registry.latest()


def test_status_names_the_spec_edits_latest_does_not_read(tmp_path):
    """A window and the threshold edited in the spec since LATEST was trained: one line names both (a note, not a
    problem: edits wait for the next training, or `recalibrate`); none when the spec reads as the version."""
    spec, _ = _spec(tmp_path)
    trained = tiny_spec_dict(registry=spec.registry, score={"output": spec.score.output})
    trained["modalities"]["logs"]["window"] = "1min"
    trained["score"]["threshold"] = {"method": "pot", "risk": 0.003}
    _version(tmp_path, NEW, spec=parse_spec(trained).to_dict())
    found = scoring_status(spec, Storage(), today=dt.date(2024, 1, 3), spec_path="s.yaml")
    assert "spec edits LATEST does not read (they take effect with a version trained on the spec; the threshold's " \
           "and the smoothing's also with dmafn recalibrate): modalities.logs.window: 2min (the version's: 1min); " \
           "score.threshold.risk: 0.001 (the version's: 0.003)" in found.text()
    assert found.facts["latest"]["spec_edits"] == ["modalities.logs.window: 2min (the version's: 1min)",
                                                   "score.threshold.risk: 0.001 (the version's: 0.003)"]
    assert not [p for p in found.problems if "edit" in p]
    (tmp_path / "models" / NEW / "manifest.json").unlink()
    (tmp_path / "models" / NEW).rmdir()
    _version(tmp_path, NEW, spec=spec.to_dict())
    again = scoring_status(spec, Storage(), today=dt.date(2024, 1, 3), spec_path="s.yaml")
    assert "spec edits" not in again.text() and again.facts["latest"]["spec_edits"] == []
