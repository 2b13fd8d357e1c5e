"""Alignment on hand-made 3-row tables, without Ray."""
import datetime as dt

import numpy as np
import polars as pl
import pytest

from pipelines.align import TIME, align, date_start_us, label_ticks, make_ticks

DAY = dt.date(2024, 1, 2)
T0 = date_start_us(DAY)          # the first tick of the day, 00:00
S, M = 1_000_000, 60_000_000


def ticks(n=3, entities=("a",)):
    return make_ticks(pl.DataFrame({"machine_id": list(entities)}), DAY, M).group_by("machine_id").head(n)


def table(ts, **cols):
    return pl.DataFrame({"machine_id": ["a"] * len(ts), TIME: ts, **cols})


def run(spec, **tables):
    return align(ticks(), tables, spec).sort(TIME)


def test_ticks_cover_the_day_for_each_entity():
    t = make_ticks(pl.DataFrame({"machine_id": ["a", "b"]}), DAY, M)
    assert t.height == 2 * 1440
    assert t[TIME].min() == T0 and t[TIME].max() == T0 + 1439 * M


def test_tabular_is_latest_row_at_or_before_tick(tiny_spec):
    out = run(tiny_spec, proc=table([T0 - 30 * S, T0 + 10 * S, T0 + 2 * M], temp=[1.0, 2.0, 3.0]))
    assert out["proc__temp"].to_list() == [1.0, 2.0, 3.0]   # a row exactly at the tick counts
    assert out["proc__present"].to_list() == [True, True, True]


def test_an_as_of_payload_names_the_time_of_the_row_it_came_from(tiny_spec):
    """`m__taken`: a frame read at several ticks carries its own row's time at each (a tick tells a new row from one
    it read before); null where none is within tolerance."""
    frames = table([T0 - 3 * M, T0 + M], frame=[b"a", b"b"])
    out = run(tiny_spec, cam=frames, proc=table([T0, T0 + 30 * S], temp=[1.0, 2.0]))
    assert out["cam__frame"].to_list() == [b"a", b"b", b"b"]
    assert out["cam__taken"].to_list() == [T0 - 3 * M, T0 + M, T0 + M]
    assert out["proc__taken"].to_list() == [T0, T0 + 30 * S, T0 + 30 * S]
    assert run(tiny_spec, cam=frames.head(0))["cam__taken"].to_list() == [None] * 3


def test_no_row_after_the_tick_is_used(tiny_spec):
    out = run(tiny_spec, proc=table([T0 + 1, T0 + M + 1, T0 + 2 * M + 1], temp=[1.0, 2.0, 3.0]))
    assert out["proc__temp"].to_list() == [None, 1.0, 2.0]
    assert out["proc__present"].to_list() == [False, True, True]


def test_tolerance_limits_the_age_of_a_row(tiny_spec):
    # tolerance 2min: at tick 0 the latest row is 119 s old (used); at tick 1 it is 179 s old (absent)
    out = run(tiny_spec, proc=table([T0 - 150 * S, T0 - 119 * S, T0 + 100 * M], temp=[9.0, 1.0, 5.0]))
    assert out["proc__temp"].to_list() == [1.0, None, None]
    assert out["proc__present"].to_list() == [True, False, False]


def test_a_row_without_a_value_in_one_column_gives_the_others_and_that_column_its_latest_value_within_tolerance():
    """A row kept for its other values (`ingest.with_reasons`: the unusable one null): a tabular column takes its
    latest value within tolerance from an earlier row, and is null where there is none - the modality present
    with its other columns (a dead channel does not take the others with it); a time series column's bins without
    a value are filled from its own neighbouring bins, the other columns' stay as read, and a column with no value
    in the whole window is null, the modality present while another column has one."""
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"]["proc"]["columns"] = ["temp", "pres"]
    data["modalities"]["vib"]["columns"] = ["a", "b"]
    spec = parse_spec(data)
    # tolerance 2 min: tick 1 takes temp from 00:00:30 (30 s old) and pres from its own row; tick 2 its own pres
    # and temp from 00:00:30 again (90 s old: the rows since hold none)
    out = run(spec, proc=table([T0 - 150 * S, T0 + 30 * S, T0 + M, T0 + 2 * M],
                               temp=[1.0, 2.0, None, None], pres=[10.0, None, 30.0, 40.0]))
    assert out["proc__temp"].to_list() == [None, 2.0, 2.0]         # tick 0: the only temp is 150 s old
    assert out["proc__pres"].to_list() == [None, 30.0, 40.0]
    assert out["proc__present"].to_list() == [False, True, True]
    for order in ([0, 1], [1, 0]):      # two rows of one time, one without temp: read as one row, either order
        twice = table([T0, T0], temp=[7.0, None], pres=[8.0, 8.0])[order]
        first = run(spec, proc=twice).row(0, named=True)
        assert (first["proc__present"], first["proc__temp"], first["proc__pres"]) == (True, 7.0, 8.0)
    late = run(spec, proc=table([T0 - 30 * S, T0 + M, T0 + 2 * M], temp=[1.0, None, None], pres=[1.0, 2.0, 3.0]))
    assert late["proc__present"].to_list() == [True, True, True]    # tick 2: temp 150 s old, pres its own
    assert late["proc__temp"].to_list() == [1.0, 1.0, None]
    assert late["proc__pres"].to_list() == [1.0, 2.0, 3.0]
    # window 1 min in 20 s bins (-40 s, -20 s, 0 s): b's middle bin empty, filled from its neighbours
    out = run(spec, vib=table([T0 - 40 * S, T0 - 20 * S, T0, T0 + M], a=[1.0, 2.0, 3.0, 4.0],
                              b=[5.0, None, 7.0, None]))
    first = out.row(0, named=True)
    assert first["vib__present"] and first["vib__a"] == [1.0, 2.0, 3.0] and first["vib__b"] == [5.0, 5.0, 7.0]
    assert out["vib__present"].to_list() == [True, True, False]     # tick 1: b has no value in its window, a has
    assert out["vib__a"][1].to_list() == [4.0, 4.0, 4.0] and out["vib__b"][1] is None


def test_day_boundary_uses_previous_day_rows(tiny_spec):
    out = run(tiny_spec, vib=table([T0 - 40 * S, T0 - 20 * S, T0], a=[1.0, 2.0, 3.0]))
    first = out.row(0, named=True)
    assert first["vib__present"] and first["vib__a"] == [1.0, 2.0, 3.0]   # bins ending -40s, -20s, 0s


def test_timeseries_window_is_resampled_and_never_reads_ahead(tiny_spec):
    out = run(tiny_spec, vib=table([T0 - 10 * S, T0 - 5 * S, T0 + 50 * S], a=[2.0, 4.0, 7.0]))
    # tick 0: window (-60s, 0]: bins -40,-20,0 -> only bin 0 has data (mean of 2 and 4), gaps filled
    assert out["vib__a"][0].to_list() == [3.0, 3.0, 3.0]
    # tick 1: bins 20,40,60: the sample at 50s falls in bin 60 (<= tick)
    assert out["vib__a"][1].to_list() == [7.0, 7.0, 7.0]
    # tick 2: window (60s, 120s] is empty: absent, not lost
    assert out["vib__present"].to_list() == [True, True, False]
    assert out["vib__a"][2] is None


def test_text_window_is_half_open(tiny_spec):
    out = run(tiny_spec, logs=table([T0 - 2 * M, T0 - 60 * S, T0 + 90 * S], msg=["x", "y", "z"]))
    # window 2min: (tick-2min, tick]; at tick 1 min the message of -60 s is exactly 2 min old: out
    assert out["logs__msg"].to_list() == [["y"], None, ["z"]]
    assert out["logs__present"].to_list() == [True, False, True]


def test_absent_modality_is_a_mask_not_a_dropped_tick(tiny_spec):
    out = run(tiny_spec, proc=table([T0], temp=[1.0]))
    assert out.height == 3
    assert out["cam__present"].to_list() == [False] * 3
    assert out["logs__present"].to_list() == [False] * 3


def test_entities_do_not_leak_into_each_other(tiny_spec):
    t = ticks(entities=("a", "b"))
    proc = pl.DataFrame({"machine_id": ["b"], TIME: [T0], "temp": [5.0]})
    out = align(t, {"proc": proc}, tiny_spec).sort(["machine_id", TIME])
    assert out.filter(pl.col("machine_id") == "a")["proc__present"].to_list() == [False] * 3
    assert out.filter(pl.col("machine_id") == "b")["proc__temp"].to_list() == [5.0, 5.0, 5.0]


def test_output_has_utc_ts_and_date(tiny_spec):
    out = run(tiny_spec)
    assert str(out["ts"].dtype) == "Datetime(time_unit='us', time_zone='UTC')"
    assert out["date"].unique().to_list() == ["2024-01-02"]


def test_label_ticks_marks_ticks_inside_intervals(tiny_spec):
    out = run(tiny_spec)
    labels = pl.DataFrame({"machine_id": ["a"], "start_ts": [T0 + M], "end_ts": [T0 + 2 * M], "kind": ["k"]})
    labels = labels.with_columns(pl.from_epoch("start_ts", "us").dt.replace_time_zone("UTC"),
                                 pl.from_epoch("end_ts", "us").dt.replace_time_zone("UTC"))
    lab = label_ticks(out, labels, tiny_spec, "start_ts", "end_ts")
    assert lab.select(TIME).equals(out.select(TIME))                    # rows keep their order
    lab = lab.sort(TIME)
    assert lab["label"].to_list() == [0, 1, 1]
    assert lab["label_kind"].to_list() == [None, "k", "k"]
    assert lab["since_event_us"].to_list() == [None, None, None]        # the event has not ended before them
    later = label_ticks(out, labels.with_columns(pl.col("end_ts") - pl.duration(minutes=1)), tiny_spec,
                        "start_ts", "end_ts").sort(TIME)
    assert later["label"].to_list() == [0, 1, 0] and later["since_event_us"].to_list() == [None, None, M]
    # labels whose entity column has another type find the same ticks (cast to the ticks' type) or say why not
    categorical = label_ticks(out, labels.with_columns(pl.col("machine_id").cast(pl.Categorical)), tiny_spec,
                              "start_ts", "end_ts").sort(TIME)
    assert categorical["label"].to_list() == [0, 1, 1]
    from pipelines.storage import DataError
    with pytest.raises(DataError, match="labels: entity column 'machine_id' is String and some of its values cannot be read as Int64"):
        label_ticks(out.with_columns(pl.lit(7, pl.Int64).alias("machine_id")), labels, tiny_spec, "start_ts", "end_ts")


def test_known_incidents_leave_out_their_ticks_and_the_reach_after_them(tiny_spec):
    """`KnownIncidents` (training's `train.exclude_labelled`): a tick inside a labelled interval of its own entity,
    or less than the longest modality reach (here the camera's 5 min tolerance) after its end, is left out and
    counted; the other entity's ticks and the rest stay, in order; cut to the ticks' dates, the same."""
    from dataclasses import replace

    from dmafn.spec import LabelsSpec
    from pipelines.align import KnownIncidents, LabelIndex

    base = date_start_us(dt.date(2024, 1, 1))
    ticks = pl.DataFrame({"machine_id": ["a"] * 10 + ["b"] * 3,
                          TIME: [base + i * M for i in range(10)] + [base + i * M for i in range(3)], "x": range(13)})
    labels = pl.DataFrame({"machine_id": ["a"], "start_ts": [base + 2 * M], "end_ts": [base + 3 * M]}).with_columns(
        pl.from_epoch("start_ts", "us").dt.replace_time_zone("UTC"), pl.from_epoch("end_ts", "us").dt.replace_time_zone("UTC"))
    spec = replace(tiny_spec, labels=LabelsSpec(path="/tmp/none/labels"))
    incidents = KnownIncidents.of(labels, spec)
    assert incidents.after_us == 5 * M
    kept = incidents.without(ticks, spec)
    assert kept["x"].to_list() == [0, 1, 8, 9, 10, 11, 12] and incidents.left_out == 6   # minutes 2-3, then 4-7
    cut = incidents.for_dates([dt.date(2024, 1, 1)])
    assert cut.without(ticks, spec).equals(kept) and cut.left_out == 6 and incidents.left_out == 6
    assert KnownIncidents(LabelIndex.build(labels, spec, "start_ts", "end_ts"), 0).without(ticks, spec).height == 11


def test_training_with_unreadable_labels_says_how_to_train_on_every_tick(tiny_spec, tmp_path):
    from dataclasses import replace

    from dmafn.spec import LabelsSpec
    from pipelines.storage import DataError, Storage
    from pipelines.train import known_incidents

    spec = replace(tiny_spec, labels=LabelsSpec(path=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match=r"labels .*nowhere: cannot be read .*set train.exclude_labelled: false"):
        known_incidents(spec, Storage())
    assert known_incidents(replace(spec, train=replace(spec.train, exclude_labelled=False)), Storage()) is None
    assert known_incidents(replace(tiny_spec, labels=None), Storage()) is None


def test_label_times_naive_zoned_and_in_any_unit_are_one_utc_instant(tiny_spec, tmp_path):
    """A naive start beside a zoned end (or files that differ) once ended `evaluate` with an unexpected SchemaError
    comparing them; now naive times are read as UTC, zoned ones converted, both in microseconds."""
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmafn.spec import LabelsSpec
    from pipelines.labels import load_labels
    from pipelines.storage import Storage

    start = dt.datetime(2024, 1, 1, 10, 0)
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({
        "machine_id": ["a", "b"],
        "start_ts": pa.array([start, start], pa.timestamp("ns")),                               # naive: UTC
        "end_ts": pa.array([start.replace(hour=12, tzinfo=dt.timezone.utc)] * 2, pa.timestamp("us", tz="Europe/Berlin")),
    }), tmp_path / "labels" / "part-0.parquet")
    spec = replace(tiny_spec, labels=LabelsSpec(path=str(tmp_path / "labels")))
    labels = load_labels(spec, Storage())
    assert labels.usable.schema["start_ts"] == labels.usable.schema["end_ts"] == pl.Datetime("us", "UTC")
    assert labels.usable["start_ts"].to_list() == [start.replace(tzinfo=dt.timezone.utc)] * 2
    assert labels.usable["end_ts"].dt.hour().to_list() == [12, 12] and labels.unusable.is_empty()
    local = replace(spec, timezone="Europe/Berlin", naive_times="local")     # naive: Berlin's wall clock (UTC+1)
    assert load_labels(local, Storage()).usable["start_ts"].dt.hour().to_list() == [9, 9]
    pq.write_table(pa.table({"machine_id": ["a"], "start_ts": pa.array([dt.datetime(2024, 3, 31, 2, 30)]),
                             "end_ts": pa.array([dt.datetime(2024, 3, 31, 4)])}), tmp_path / "labels" / "part-0.parquet")
    assert load_labels(local, Storage()).unusable["reason"].to_list() == [
        "start_ts 2024-03-31 02:30:00: a wall-clock time Europe/Berlin's clocks skipped or showed twice"]


def test_label_times_stored_as_integers_count_the_specs_time_unit(tiny_spec, tmp_path):
    """With `time_unit: ms` labels storing start and end as epoch milliseconds read as the same UTC instants; a
    count no timestamp holds leaves its row out with the count in its reason; without `time_unit` the column is
    named with the key that reads it."""
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmafn.spec import LabelsSpec
    from pipelines.labels import load_labels
    from pipelines.storage import DataError, Storage

    start_ms = 1_704_103_200_000                                     # 2024-01-01 10:00 UTC
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"machine_id": ["a", "b"], "start_ts": pa.array([start_ms, 2 ** 62], pa.int64()),
                             "end_ts": pa.array([start_ms + 7_200_000] * 2, pa.int64())}),
                   tmp_path / "labels" / "part-0.parquet")
    spec = replace(tiny_spec, labels=LabelsSpec(path=str(tmp_path / "labels")), time_unit="ms")
    labels = load_labels(spec, Storage())
    assert labels.usable.schema["start_ts"] == labels.usable.schema["end_ts"] == pl.Datetime("us", "UTC")
    assert labels.usable.rows() == [("a", dt.datetime(2024, 1, 1, 10, tzinfo=dt.timezone.utc),
                                     dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc))]
    assert labels.unusable["reason"].to_list() == [f"start_ts {2 ** 62} out of range as ms since the epoch"]
    assert "_out_start_ts" not in labels.unusable.columns
    with pytest.raises(DataError, match="column 'start_ts' is Int64; a timestamp \\(or date, or ISO 8601 text\\) is "
                                        "needed - or, with the spec's time_unit"):
        load_labels(replace(spec, time_unit=None), Storage())


def test_labels_kept_as_a_delta_table_are_read_as_its_log_holds_them(tiny_spec, tmp_path):
    """An incident table kept in Delta: an UPDATE that closed an incident later leaves the replaced file in the
    folder until VACUUM - only the updated row is read; with column mapping and partitioned by the machine, the
    physical names read under the table's and the machine from the partition values; a deleted incident (a file
    rewritten, or its row deleted in place by a deletion vector) is gone."""
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable, write_deltalake

    from dmafn.spec import LabelsSpec
    from pipelines.labels import load_labels
    from pipelines.storage import Storage
    from tests.deletion_vectors import delete_in_place

    def at(*hours):
        return pa.array([dt.datetime(2024, 1, 5, h, tzinfo=dt.timezone.utc) for h in hours], pa.timestamp("us", "UTC"))

    incidents = pa.table({"machine_id": ["a", "b"], "start_ts": at(1, 3), "end_ts": at(2, 4)})
    for name, options in (("plain", {}), ("mapped", {"partition_by": ["machine_id"], "configuration": {
            "delta.columnMapping.mode": "name"}})):
        table = tmp_path / name
        write_deltalake(str(table), incidents, **options)
        DeltaTable(str(table)).update(predicate="machine_id = 'a'",
                                      updates={"end_ts": "'2024-01-05T05:00:00Z'::timestamp"})
        spec = replace(tiny_spec, labels=LabelsSpec(path=str(table)))
        rows = sorted(load_labels(spec, Storage()).usable.select("machine_id", "end_ts").rows())
        assert [(key, end.hour) for key, end in rows] == [("a", 5), ("b", 4)]
        if name == "plain":             # b's row deleted in place (a deletion vector, as Databricks writes them)
            (live,) = DeltaTable(str(table)).file_uris()
            b_at = pq.read_table(live)["machine_id"].to_pylist().index("b")
            delete_in_place(table, live.rsplit("/", 1)[1], [b_at])
        else:
            DeltaTable(str(table)).delete("machine_id = 'b'")
        assert load_labels(spec, Storage()).usable["machine_id"].to_list() == ["a"]
        assert load_labels(spec, Storage()).summary()["rows"] == 1


def test_labels_kept_as_plain_files_are_read_file_by_file(tiny_spec, tmp_path, caplog):
    """Labels as Spark's `partitionBy("machine_id")` leaves them (the machine in the folder names only), files that
    store a column as different types (naive ns beside zoned us, a date alone, one without `kind`), a side file, a
    text file and a file that is no Parquet: each Parquet file read with its folders' values, times as one UTC
    instant, `kind` null where a file lacks it; the text file skipped with a warning naming it; the broken file
    named in the error. Before, pyarrow's dataset took the first file's schema: a later file's `kind` and the
    folders' machine were dropped, and a non-Parquet file ended the read with an unexpected ArrowInvalid."""
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmafn.spec import LabelsSpec
    from pipelines.labels import load_labels
    from pipelines.storage import DataError, Storage

    root = tmp_path / "labels"
    for folder in ("machine_id=a", "machine_id=b", "_temporary/0"):
        (root / folder).mkdir(parents=True)
    pq.write_table(pa.table({"start_ts": pa.array([dt.datetime(2024, 1, 5, 1)], pa.timestamp("ns")),
                             "end_ts": pa.array([dt.datetime(2024, 1, 5, 2)], pa.timestamp("ns"))}),
                   root / "machine_id=a" / "part-0.parquet")
    pq.write_table(pa.table({"start_ts": pa.array([dt.date(2024, 1, 6)]),
                             "end_ts": pa.array([dt.datetime(2024, 1, 6, 3, tzinfo=dt.timezone.utc)],
                                                pa.timestamp("us", "Europe/Berlin")),
                             "kind": ["overheat"]}), root / "machine_id=b" / "part-0.parquet")
    pq.write_table(pa.table({"machine_id": ["x"], "start_ts": pa.array([dt.datetime(2024, 1, 5)]),
                             "end_ts": pa.array([dt.datetime(2024, 1, 6)])}), root / "_temporary" / "0" / "p.parquet")
    (root / "_SUCCESS").write_text("")
    (root / "README.txt").write_text("incidents, one file per machine")
    spec = replace(tiny_spec, labels=LabelsSpec(path=str(root)))
    with caplog.at_level("WARNING"):
        labels = load_labels(spec, Storage())
    assert "1 file(s) not named *.parquet are not read (README.txt)" in caplog.text
    rows = labels.usable.sort("machine_id").select("machine_id", "start_ts", "end_ts", "kind").rows()
    utc = dt.timezone.utc
    assert rows == [("a", dt.datetime(2024, 1, 5, 1, tzinfo=utc), dt.datetime(2024, 1, 5, 2, tzinfo=utc), None),
                    ("b", dt.datetime(2024, 1, 6, tzinfo=utc), dt.datetime(2024, 1, 6, 3, tzinfo=utc), "overheat")]
    # a date alone is the plant's midnight where naive times are its wall clock (Berlin: 23:00 UTC the day before)
    local = replace(spec, timezone="Europe/Berlin", naive_times="local")
    assert load_labels(local, Storage()).usable.sort("machine_id")["start_ts"].dt.hour().to_list() == [0, 23]
    # one label file alone; a file that is no Parquet, named
    single = replace(spec, labels=LabelsSpec(path=str(root / "machine_id=b" / "part-0.parquet")))
    with pytest.raises(DataError, match="part-0.parquet: column 'machine_id' not found"):
        load_labels(single, Storage())
    (root / "machine_id=b" / "part-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"labels {root / 'machine_id=b' / 'part-1.parquet'}: not a readable "
                                        "Parquet file"):
        load_labels(spec, Storage())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"labels {empty}: holds no Parquet file"):
        load_labels(replace(spec, labels=LabelsSpec(path=str(empty))), Storage())


def test_false_alarms_clear_of_events_leave_out_the_ticks_an_event_still_reaches(tiny_spec):
    from pipelines.evaluate import alarm_rates, settle_us

    # tiny spec: longest reach 5 min (camera tolerance), EWMA 0.3 settles in 9 ticks of 1 min
    assert settle_us(tiny_spec) == 14 * M
    df = pl.DataFrame({"machine_id": ["a"] * 4, "is_anomaly": [True, True, False, True], "label": [1, 0, 0, 0],
                       "since_event_us": [None, 2 * M, 20 * M, None], "model_version": ["v"] * 4})
    rates = alarm_rates(df, tiny_spec, __import__("pipelines.storage", fromlist=["Storage"]).Storage())
    assert rates["false_alarm_rate"] == pytest.approx(2 / 3)
    assert rates["false_alarm_rate_clear"] == pytest.approx(1 / 2) and rates["clear_ticks"] == 2


def test_ticks_follow_the_data_exactly_where_a_modality_can_be_present(tiny_spec):
    """`data_ticks` keeps the ticks at which `align` finds some modality present and no others; an entity
    without a row inside the date gets no tick, whatever its look-back rows."""
    from pipelines.align import data_ticks

    rows = lambda ts, **c: pl.DataFrame({"machine_id": [e for e, _ in ts], TIME: [t for _, t in ts], **c})  # noqa
    tables = {
        "proc": rows([("a", T0 - 30 * S), ("a", T0 + 10 * S), ("b", T0 - 30 * S)], temp=[1.0, 2.0, 3.0]),
        "vib": rows([("a", T0 + 30 * M + 5 * S)], a=[1.0]),
        "logs": rows([("a", T0 + 50 * M + S), ("a", T0 + 1439 * M + S)], msg=["x", "y"]),
    }
    present = pl.DataFrame({"machine_id": ["a"], "_day": [T0 // (1440 * M)]})
    got = data_ticks(tables, present, tiny_spec, [DAY])
    assert ((got[TIME] - T0) // M).to_list() == [0, 1, 2, 31, 51, 52]
    grid = make_ticks(pl.DataFrame({"machine_id": ["a"]}), DAY, M)
    aligned = align(grid, tables, tiny_spec)
    some = pl.any_horizontal([pl.col(f"{m}__present") for m in tiny_spec.modalities])
    expected = aligned.filter(some.fill_null(False)).select("machine_id", TIME)
    assert got.equals(expected)
    assert data_ticks(tables, present.head(0), tiny_spec, [DAY]).is_empty()


def test_a_date_in_a_time_zone_is_its_local_midnight_to_the_next_and_its_ticks_follow(tiny_spec):
    """With `timezone`, a date runs from its local midnight to the next: 23 h on the day clocks go forward, 25 h
    on the day they go back; `local_day`/`local_date_text` give each instant its local date, `data_ticks` keeps
    a date's ticks inside it and `align` writes that date."""
    from dataclasses import replace

    from pipelines.align import data_ticks, date_end_us, day_number, local_date_text, local_day

    H = 60 * M
    for day, hours in ((dt.date(2024, 3, 31), 23), (dt.date(2024, 10, 27), 25), (dt.date(2024, 1, 2), 24)):
        start, end = date_start_us(day, "Europe/Berlin"), date_end_us(day, "Europe/Berlin")
        assert (end - start) // H == hours and start == date_start_us(day) - (2 if day.month == 10 else 1) * H
        assert make_ticks(pl.DataFrame({"machine_id": ["a"]}), day, M, "Europe/Berlin")[TIME].to_list() == \
            list(range(start, end, M))
        edges = pl.DataFrame({TIME: [start - 1, start, end - 1, end]})
        assert edges.select(local_day(pl.col(TIME), "Europe/Berlin"))[TIME].to_list() == \
            [day_number(day) - 1, day_number(day), day_number(day), day_number(day) + 1]
        assert edges.select(local_date_text(pl.col(TIME), "Europe/Berlin"))[TIME].to_list()[1:3] == [day.isoformat()] * 2
    berlin = replace(tiny_spec, timezone="Europe/Berlin")
    start = date_start_us(DAY, "Europe/Berlin")              # 2024-01-01 23:00 UTC
    rows = {"proc": pl.DataFrame({"machine_id": ["a"] * 3, TIME: [start - 10 * S, start + 10 * S, start + 24 * H - 90 * S],
                                  "temp": [1.0, 2.0, 3.0]})}
    present = pl.DataFrame({"machine_id": ["a"], "_day": [day_number(DAY)]})
    got = data_ticks(rows, present, berlin, [DAY])
    # the day's ticks from its local start: the row 10 s before it is read there; the last row's second tick (its
    # 2 min tolerance) is the next date's
    assert ((got[TIME] - start) // M).to_list() == [0, 1, 2, 1439]
    assert align(got, rows, berlin)["date"].unique().to_list() == ["2024-01-02"]
    assert align(got, rows, tiny_spec)["date"].unique().sort().to_list() == ["2024-01-01", "2024-01-02"]


def test_label_ticks_agree_with_checking_every_interval_overlaps_included(tiny_spec):
    """Random ticks of two entities against random, overlapping intervals: a tick is labelled exactly when some
    interval of its entity covers it (ends included), with the kind of the earliest-starting one that does -
    what comparing every tick with every interval gives, at the cost of one as-of join."""
    rng = np.random.default_rng(3)
    n = 400
    ticks = pl.DataFrame({"machine_id": rng.choice(["a", "b"], n),
                          TIME: T0 + rng.integers(0, 300, n) * M}).with_row_index("i")
    starts = T0 + rng.integers(0, 300, 40) * M
    labels = pl.DataFrame({"machine_id": rng.choice(["a", "b", "c"], 40), "start_ts": starts,
                           "end_ts": starts + rng.integers(0, 40, 40) * M, "kind": rng.choice(["x", "y", "z"], 40)})
    labels = labels.with_columns(pl.from_epoch("start_ts", "us").dt.replace_time_zone("UTC"),
                                 pl.from_epoch("end_ts", "us").dt.replace_time_zone("UTC"))
    got = label_ticks(ticks, labels, tiny_spec, "start_ts", "end_ts")
    assert got["i"].to_list() == ticks["i"].to_list()                    # rows keep their order
    s, e = (labels[c].dt.epoch("us").to_numpy() for c in ("start_ts", "end_ts"))
    for entity, t, label, kind in got.select("machine_id", TIME, "label", "label_kind").iter_rows():
        covering = sorted((a, i, k) for i, (m, a, b, k) in enumerate(zip(labels["machine_id"], s, e, labels["kind"]))
                          if m == entity and a <= t <= b)
        assert label == bool(covering) and kind == (covering[0][2] if covering else None)


def test_a_label_index_cut_to_a_window_labels_its_ticks_as_the_whole_does(tiny_spec):
    """`LabelIndex.window` (what an evaluate task gets for its dates): random, overlapping intervals, some long ones
    reaching into the window from far before and a tie of starts; the window's ticks get the same label and kind
    as from the whole index, the same time since the last event up to the reach and none (or more) beyond it."""
    from pipelines.align import LabelIndex, attach_labels

    rng = np.random.default_rng(11)
    starts = T0 + rng.integers(0, 1000, 60) * M
    labels = pl.DataFrame({"machine_id": rng.choice(["a", "b", "c"], 60), "start_ts": starts,
                           "end_ts": starts + rng.integers(0, 300, 60) * M, "kind": rng.choice(["x", "y", "z"], 60)})
    extra = pl.DataFrame({"machine_id": ["a", "b", "b"], "start_ts": [T0, T0 + 500 * M, T0 + 500 * M],
                          "end_ts": [T0 + 800 * M, T0 + 520 * M, T0 + 505 * M], "kind": ["long", "tie1", "tie2"]})
    labels = pl.concat([labels, extra]).with_columns(pl.from_epoch("start_ts", "us").dt.replace_time_zone("UTC"),
                                                     pl.from_epoch("end_ts", "us").dt.replace_time_zone("UTC"))
    whole = LabelIndex.build(labels, tiny_spec, "start_ts", "end_ts")
    lo, hi, reach = T0 + 500 * M, T0 + 700 * M, 30 * M
    ticks = pl.DataFrame({"machine_id": rng.choice(["a", "b", "c", "d"], 500),
                          TIME: lo + rng.integers(0, 201, 500) * M})
    cut = whole.window(lo, hi, reach)
    assert cut.started.height < whole.started.height and cut.ends.height < whole.ends.height
    a, b = attach_labels(ticks, whole, tiny_spec), attach_labels(ticks, cut, tiny_spec)
    assert a["label"].to_list() == b["label"].to_list() and a["label_kind"].to_list() == b["label_kind"].to_list()
    assert a["label"].sum() > 0 and "long" in a["label_kind"].to_list()
    for before, after, t in zip(a["since_event_us"], b["since_event_us"], ticks[TIME]):
        if before is not None and before <= reach + (t - lo):        # every end from `reach` before the window on
            assert after == before
        else:
            assert after is None or after >= reach
