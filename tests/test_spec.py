import pytest

from dmafn.detector import Detector
from dmafn.spec import CONTEXT_SUFFIX, SpecError, load_spec, parse_duration_us, parse_spec, reading_differences
from tests.conftest import tiny_spec_dict


def test_valid_spec_resolves_defaults(tiny_spec):
    assert tiny_spec.entity == ("machine_id",)
    assert tiny_spec.grain_us == 60_000_000
    assert tiny_spec.modalities["vib"].steps == 3
    assert tiny_spec.model.fusion == "attention" and tiny_spec.model.detector == "autoencoder"
    assert tiny_spec.score.quarantine_path == "/tmp/none/scores_quarantine"
    assert tiny_spec.lookback_days == 1


def test_channel_dropout_reaches_the_networks_config_and_is_saved_with_it():
    from dmafn.model import model_config
    spec = parse_spec({**tiny_spec_dict(), "model": {"channel_dropout": 0.3}})
    assert spec.model.channel_dropout == 0.3 and model_config(spec.model).channel_dropout == 0.3
    assert parse_spec(spec.to_dict()).model == spec.model
    # a sensor table's or series' own rate, kept in the spec's dict; the slow context takes its parent's
    data = tiny_spec_dict()
    data["modalities"]["vib"] |= {"channel_dropout": 0.05, "context": {"period": "1min", "window": "30min"}}
    spec = parse_spec(data)
    assert spec.modalities["vib"].channel_dropout == 0.05 and spec.modalities["proc"].channel_dropout is None
    assert spec.modalities["vib" + CONTEXT_SUFFIX].channel_dropout == 0.05
    assert parse_spec(spec.to_dict()).modalities == spec.modalities
    data["modalities"]["vib"]["channel_dropout"] = 0.95
    with pytest.raises(SpecError, match=r"'modalities.vib.channel_dropout': 0.95 is outside \[0.0, 0.9\]"):
        parse_spec(data)
    data["modalities"]["vib"]["channel_dropout"] = 0.05
    data["modalities"]["cam"]["channel_dropout"] = 0.1
    with pytest.raises(SpecError, match="channel_dropout"):
        parse_spec(data)


def test_round_trip_through_dict(tiny_spec):
    again = parse_spec(tiny_spec.to_dict())
    assert again.modalities == tiny_spec.modalities
    assert again.train == tiny_spec.train


@pytest.mark.parametrize("text,us", [("100ms", 100_000), ("5min", 300_000_000), ("2h", 7_200_000_000),
                                     ("1d", 86_400_000_000), ("1.5s", 1_500_000)])
def test_durations(text, us):
    assert parse_duration_us(text, where="x") == us


def test_a_classifier_without_a_threshold_method_alarms_at_logit_zero_and_one_with_a_method_keeps_it():
    """A tail method (POT, quantile, rate) fitted on a classifier's validation days, which hold its labelled
    incidents, sat among them: on the demo's days F1 0.00-0.11 against the oracle's 0.92-0.94, and 0.91-0.94 at logit
    0. Without a method a classifier now gets logit 0; a method given is kept (`dmafn train` warns of a tail one)."""
    data = {**tiny_spec_dict(), "labels": {"path": "/tmp/none/labels", "start": "start_ts", "end": "end_ts"},
            "model": {"detector": "classifier"}}
    threshold = parse_spec(data).score.threshold
    assert (threshold.method, threshold.value) == ("fixed", 0.0)
    data["score"] = {**data["score"], "threshold": {"per_entity": True}}
    threshold = parse_spec(data).score.threshold
    assert (threshold.method, threshold.value, threshold.per_entity) == ("fixed", 0.0, True)
    data["score"]["threshold"] = {"method": "pot", "risk": 0.01}
    assert parse_spec(data).score.threshold.method == "pot"
    assert parse_spec(parse_spec(data).to_dict()).score.threshold.method == "pot"
    del data["model"]
    assert parse_spec({**data, "score": {"output": "/tmp/none/scores"}}).score.threshold.method == "pot"


def test_a_threshold_value_given_without_a_method_is_a_fixed_threshold_for_every_detector():
    """`threshold: {value: V}` without a method: fixed at V (before 2026-12-05 a classifier's V was replaced by
    logit 0 and any other detector's ignored for POT), in the spec as in `Detector(threshold_value=V)`."""
    labels = {"path": "/tmp/none/labels", "start": "start_ts", "end": "end_ts"}
    for model in ({"detector": "classifier"}, {"detector": "autoencoder"}, {}):
        data = {**tiny_spec_dict(), "labels": labels, "model": model}
        data["score"] = {**data["score"], "threshold": {"value": 1.5}}
        threshold = parse_spec(data).score.threshold
        assert (threshold.method, threshold.value) == ("fixed", 1.5), model
        assert parse_spec(parse_spec(data).to_dict()).score.threshold == threshold
        detector = model.get("detector", "autoencoder")
        assert Detector(parse_spec(data).modalities, threshold_value=1.5)._threshold_spec(detector) == threshold
    data["score"]["threshold"] = {"method": "pot", "value": 1.5}      # a method named is the rule, as before
    assert parse_spec(data).score.threshold.method == "pot"


def test_unknown_top_level_key_names_key_and_file():
    with pytest.raises(SpecError, match=r"spec.yaml: unknown key 'colour'"):
        parse_spec({**tiny_spec_dict(), "colour": "red"}, source="spec.yaml")


@pytest.mark.parametrize("name, why", [("score", "is a column of the output table"),
                                       ("run_id", "is a column of the output table"),
                                       ("score_proc", "is a column of the output table"),
                                       ("_t", "starts with '_'")])
def test_an_entity_named_as_an_output_or_internal_column_is_refused(name, why):
    """The entity columns are the output table's too: named `score` it trained and then failed every date with
    Polars' DuplicateError (exit 3); now the spec names the clash and where a modality's files keep their name."""
    data = tiny_spec_dict()
    data["entity"] = name
    with pytest.raises(SpecError, match=rf"key 'entity': '{name}' {why}.*\(modalities.<name>.entity: \[{name}\]"):
        parse_spec(data)
    data["entity"] = ["site", "machine"]
    data["modalities"]["proc"]["entity"] = ["site", name]          # the files' own name for it: read under the spec's
    assert parse_spec(data).entity_in(parse_spec(data).modalities["proc"]) == ("site", name)


def test_unknown_nested_key_names_full_path():
    data = tiny_spec_dict()
    data["modalities"]["proc"]["window"] = "1min"
    with pytest.raises(SpecError, match=r"unknown key 'modalities.proc.window'"):
        parse_spec(data, source="s.yaml")


def test_missing_key_is_named():
    data = tiny_spec_dict()
    del data["registry"]
    with pytest.raises(SpecError, match=r"s.yaml: missing required key 'registry'"):
        parse_spec(data, source="s.yaml")


@pytest.mark.parametrize("patch,message", [
    ({"grain": "7min"}, "must divide one day"),
    ({"model": {"fusion": "mixing"}}, "'model.fusion': 'mixing' is not one of"),
    ({"model": {"detector": "classifier"}}, "needs a 'labels' section"),
    ({"model": {"channel_dropout": 1.5}}, r"'model.channel_dropout': 1.5 is outside \[0.0, 0.9\]"),
    ({"train": {"start": "2024-02-01", "end": "2024-01-01"}}, "before start"),
    ({"score": {"output": "x", "threshold": {"method": "fixed"}}}, "required when method is 'fixed'"),
])
def test_bad_values_are_explained(patch, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**tiny_spec_dict(), **patch}, source="s.yaml")


def test_partition_is_a_key_or_a_layout_with_year_month_and_day():
    """`partition: date` means `date=YYYY-MM-DD` folders; a value with % is a layout, one folder level per '/', each
    of %Y, %m, %d once; anything else is an error naming the key."""
    import datetime as dt

    from dmafn.partition_layout import parse_layout

    day = dt.date(2024, 1, 5)
    for partition, folder, text in (
            ("date", "date=2024-01-05", "date=YYYY-MM-DD"),
            ("year=%Y/month=%m/day=%d", "year=2024/month=01/day=05", "year=YYYY/month=MM/day=DD"),
            ("%Y/%m/%d", "2024/01/05", "YYYY/MM/DD"), ("dt=%Y%m%d", "dt=20240105", "dt=YYYYMMDD"),
            ("/%d-%m-%Y/", "05-01-2024", "DD-MM-YYYY")):
        assert parse_spec({**tiny_spec_dict(), "partition": partition}).partition == partition
        layout = parse_layout(partition)
        assert (layout.folder(day), layout.text) == (folder, text)
        fields = {}
        for level, name in enumerate(folder.split("/")):
            fields |= layout.match(level, name)
        assert layout.date(fields) == day
    per_machine = parse_layout("machine_id=*/date=%Y-%m-%d")          # a folder per machine above the date's
    assert per_machine.text == "machine_id=*/date=YYYY-MM-DD" and per_machine.any_value(0)
    assert per_machine.match(0, "machine_id=pump-01") == {} and per_machine.match(0, "machine_id=") is None
    assert per_machine.match(0, "backup") is None and per_machine.match(1, "date=2024-01-05") == {"Y": 2024, "m": 1,
                                                                                                "d": 5}
    data = tiny_spec_dict()
    data["modalities"]["proc"]["partition"] = "machine_id=*/year=%Y/month=%m/day=%d"     # this table's own layout
    spec = parse_spec(data)
    assert [spec.partition_in(spec.modalities[m]) for m in ("proc", "vib")] == ["machine_id=*/year=%Y/month=%m/day=%d",
                                                                                "date"]
    assert parse_spec(spec.to_dict()) == spec and reading_differences(parse_spec(tiny_spec_dict()), spec) == []
    data["modalities"]["proc"]["partition"] = "%Y/%m"
    with pytest.raises(SpecError, match=r"key 'modalities.proc.partition': '%Y/%m': a layout holds %d exactly once"):
        parse_spec(data)
    layout = parse_layout("year=%Y/month=%m/day=%d")
    assert layout.match(1, "month=1") is None and layout.match(0, "year=2024x") is None
    assert layout.date({"Y": 2024, "m": 2, "d": 30}) is None
    assert layout.span({"Y": 2024, "m": 2}) == (dt.date(2024, 2, 1), dt.date(2024, 2, 29))
    assert layout.span({"m": 2}) is None                             # a month of any year
    for partition, message in (("%Y/%m", "holds %d exactly once"), ("%Y/%m/%d/%d", "holds %d exactly once"),
                               ("machine_id=*", "is neither a partition key"), ("m=*/%m/%d", "holds %Y exactly once"),
                               ("m=p*/%Y/%m/%d", "a level of its own"),
                               ("%Y/%H/%m/%d", "%H is not a layout code"),
                               ("raw/%Y/%m/%d", "the level 'raw' holds none"), ("date of day", "neither a partition key")):
        with pytest.raises(SpecError, match=f"s.yaml: key 'partition': .*{message}"):
            parse_spec({**tiny_spec_dict(), "partition": partition}, source="s.yaml")


def test_timeseries_period_must_fit_grain_and_window():
    data = tiny_spec_dict()
    data["modalities"]["vib"]["period"] = "7s"
    with pytest.raises(SpecError, match="modalities.vib.window"):
        parse_spec(data, source="s.yaml")


def test_load_spec_reports_missing_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_load_spec_reports_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: not valid YAML at line 2, column 1: while parsing a flow sequence "
                                        "expected ',' or ']', but got '<stream end>'"):
        load_spec(path)
    path.write_text("name: x\n\tmodalities: 1\n")
    with pytest.raises(SpecError, match="at line 2, column 1: while scanning for the next token found character"):
        load_spec(path)
    path.write_text("# nothing yet\n")
    with pytest.raises(SpecError, match="bad.yaml: the spec file is empty"):
        load_spec(path)


def test_series_transform_is_parsed_checked_and_round_trips():
    data = tiny_spec_dict()
    data["modalities"]["vib"]["transform"] = "centered"
    spec = parse_spec(data, source="s.yaml")
    assert spec.modalities["vib"].transform == "centered"
    assert parse_spec(spec.to_dict()).modalities["vib"].transform == "centered"
    data["modalities"]["vib"]["transform"] = "auto"
    assert parse_spec(parse_spec(data).to_dict()).modalities["vib"].transform == "auto"
    data["modalities"]["vib"]["transform"] = "log"
    with pytest.raises(SpecError, match=r"'modalities.vib.transform': 'log' is not one of level, centered, difference, auto"):
        parse_spec(data, source="s.yaml")
    data["modalities"]["vib"].pop("transform")
    data["modalities"]["proc"]["transform"] = "centered"          # tabular rows have no window to transform
    with pytest.raises(SpecError, match=r"unknown key 'modalities.proc.transform'"):
        parse_spec(data, source="s.yaml")


def test_encoding_distance_is_parsed_checked_and_round_trips():
    data = tiny_spec_dict()
    data["modalities"]["cam"]["encoding_distance"] = 0.5
    spec = parse_spec(data, source="s.yaml")
    assert spec.modalities["cam"].encoding_distance == 0.5 and spec.modalities["proc"].encoding_distance == 0
    assert parse_spec(spec.to_dict()).modalities == spec.modalities
    data["modalities"]["cam"]["encoding_distance"] = -1
    with pytest.raises(SpecError, match=r"'modalities.cam.encoding_distance': -1 is outside \[0.0, 4.0\]"):
        parse_spec(data, source="s.yaml")
    data["modalities"]["cam"]["encoding_distance"] = 1
    data["model"] = {"fusion": "early"}              # early fusion has no encoding of a modality on its own
    with pytest.raises(SpecError, match=r"'modalities.cam.encoding_distance': needs each modality encoded"):
        parse_spec(data, source="s.yaml")


def test_the_smoothings_knee_is_parsed_checked_and_round_trips():
    data = tiny_spec_dict()
    assert parse_spec(data).score.smoothing.knee is None
    data["score"] = {**data["score"], "smoothing": {"method": "ewma", "alpha": 0.5, "knee": 6}}
    spec = parse_spec(data, source="s.yaml")
    assert spec.score.smoothing.knee == 6.0 and parse_spec(spec.to_dict()).score == spec.score
    data["score"]["smoothing"]["knee"] = -1
    with pytest.raises(SpecError, match=r"'score.smoothing.knee': -1 is outside \[0.0, None\]"):
        parse_spec(data, source="s.yaml")


def test_missing_input_is_parsed_checked_and_round_trips():
    data = tiny_spec_dict()
    spec = parse_spec(data)
    assert spec.score.missing_input == "fail" and "missing_input" not in spec.to_dict()["score"]
    data["score"] = {**data["score"], "missing_input": "skip"}
    spec = parse_spec(data, source="s.yaml")
    assert spec.score.missing_input == "skip" and parse_spec(spec.to_dict()).score == spec.score
    data["score"]["missing_input"] = "ignore"
    with pytest.raises(SpecError, match="s.yaml: key 'score.missing_input': 'ignore' is not one of fail, skip"):
        parse_spec(data, source="s.yaml")


def test_timezone_is_parsed_checked_and_round_trips():
    """`timezone` names the calendar the dates are in: an IANA name, UTC by default (and not written then); a
    zone's day can be 23 h, so its look-back covers an hour more."""
    data = tiny_spec_dict()
    spec = parse_spec(data)
    assert spec.timezone == "UTC" and "timezone" not in spec.to_dict() and spec.lookback_days == 1
    spec = parse_spec({**data, "timezone": "Europe/Berlin"}, source="s.yaml")
    assert spec.timezone == "Europe/Berlin" and parse_spec(spec.to_dict()).timezone == "Europe/Berlin"
    assert parse_spec({**data, "timezone": "utc"}).timezone == "UTC"
    day = {**data, "modalities": {**data["modalities"], "logs": {**data["modalities"]["logs"], "window": "1d"}}}
    assert parse_spec(day).lookback_days == 1 and parse_spec({**day, "timezone": "Asia/Tokyo"}).lookback_days == 2
    from dmafn.spec import local_today
    assert (local_today("Pacific/Kiritimati") - local_today("Etc/GMT+12")).days in (1, 2)   # UTC+14 and UTC-12
    for bad in ("Mars/Olympus", "", 5):
        with pytest.raises(SpecError, match=r"s.yaml: key 'timezone': .*(time zone|Europe/Berlin)"):
            parse_spec({**data, "timezone": bad}, source="s.yaml")


def test_lateness_is_parsed_checked_and_round_trips():
    """`lateness`: how long after its time a row may still be filed (a lake partitioned by arrival); it sets how
    many partitions after a date are read for it (an hour more outside UTC, for a 23-hour day)."""
    data = tiny_spec_dict()
    assert parse_spec(data).lateness_us == 0 and parse_spec(data).lookahead_days == 0
    assert "lateness" not in parse_spec(data).to_dict() and parse_spec({**data, "lateness": 0}).lateness_us == 0
    spec = parse_spec({**data, "lateness": "2h"})
    assert spec.lateness_us == 7_200_000_000 and spec.lookahead_days == 1
    assert parse_spec(spec.to_dict()).lateness_us == spec.lateness_us
    assert parse_spec({**data, "lateness": "1d"}).lookahead_days == 1
    assert parse_spec({**data, "lateness": "1d", "timezone": "Europe/Berlin"}).lookahead_days == 2
    assert parse_spec({**data, "lateness": "25h"}).lookahead_days == 2
    with pytest.raises(SpecError, match=r"s.yaml: key 'lateness': 'soon' is not a duration"):
        parse_spec({**data, "lateness": "soon"}, source="s.yaml")


def test_time_unit_is_parsed_checked_and_round_trips():
    """`time_unit`: what a time column stored as integers counts since the epoch; absent unless set."""
    data = tiny_spec_dict()
    assert parse_spec(data).time_unit is None and "time_unit" not in parse_spec(data).to_dict()
    spec = parse_spec({**data, "time_unit": "ms"})
    assert spec.time_unit == "ms" and parse_spec(spec.to_dict()).time_unit == "ms"
    with pytest.raises(SpecError, match=r"s.yaml: key 'time_unit': 'minutes' is not one of s, ms, us, ns"):
        parse_spec({**data, "time_unit": "minutes"}, source="s.yaml")


def test_a_modalitys_own_time_and_entity_names_are_parsed_checked_and_round_trip():
    """A modality's `time` / `entity`: the names its files give the spec's time and entity columns (read as the
    spec's); absent unless set; a context view reads its parent's files, so their names."""
    data = tiny_spec_dict(entity=["site", "machine_id"])
    spec = parse_spec(data)
    assert spec.names_read(spec.modalities["logs"]) == {} and "time" not in spec.to_dict()["modalities"]["logs"]
    data["modalities"]["logs"].update(time="@timestamp", entity=["plant", "machine_id"])
    data["modalities"]["proc"].update(time="event_time", context={"window": "30min"}, time_unit="s")
    spec = parse_spec({**data, "time_unit": "ms"}, source="s.yaml")
    assert [spec.time_unit_in(spec.modalities[m]) for m in ("proc", "proc_context", "logs")] == ["s", "s", "ms"]
    assert spec.to_dict()["modalities"]["proc"]["time_unit"] == "s" and parse_spec(spec.to_dict(), "s.yaml") == spec
    with pytest.raises(SpecError, match="'modalities.proc.time_unit': 'sec' is not one of s, ms, us, ns"):
        parse_spec({**data, "modalities": {**data["modalities"], "proc": {**data["modalities"]["proc"],
                                                                        "time_unit": "sec"}}}, source="s.yaml")
    spec = parse_spec(data, source="s.yaml")
    logs, view = spec.modalities["logs"], spec.modalities["proc_context"]
    assert (spec.time_in(logs), spec.entity_in(logs)) == ("@timestamp", ("plant", "machine_id"))
    assert spec.names_read(logs) == {"plant": "site", "@timestamp": "ts"}
    assert (spec.time_in(view), spec.entity_in(view)) == ("event_time", ("site", "machine_id"))
    assert spec.entity_in(spec.modalities["vib"]) == ("site", "machine_id") and spec.time_in(spec.modalities["vib"]) == "ts"
    assert parse_spec(spec.to_dict()).modalities == spec.modalities
    assert spec.to_dict()["modalities"]["logs"]["entity"] == ["plant", "machine_id"]
    for patch, message in (({"entity": "plant"}, r"'modalities.logs.entity': names 1 column\(s\) for the spec's "
                                                 r"entity \['site', 'machine_id'\]: one for each, in that order"),
                           ({"entity": ["plant", "@timestamp"]}, r"'modalities.logs.time': \['plant', '@timestamp', "
                                                                 r"'@timestamp'\] name one column twice"),
                           ({"time": 5}, r"'modalities.logs.time': 5 must be a column name"),
                           ({"column": "ts"}, r"'modalities.logs': value column 'ts' is a name the modality's time "
                                              "column is read as")):
        with pytest.raises(SpecError, match=message):
            parse_spec({**data, "modalities": {**data["modalities"], "logs": {**data["modalities"]["logs"], **patch}}},
                       source="s.yaml")


def test_naive_times_are_parsed_checked_and_round_trip():
    """`naive_times: local`: a time without a zone shows the wall clock of `timezone` (the spec's, or one modality's
    own setting); UTC by default, and under `timezone: UTC` either way."""
    data = tiny_spec_dict(timezone="Europe/Berlin")
    spec = parse_spec(data)
    assert spec.naive_times == "utc" and spec.naive_zone_in() is None and "naive_times" not in spec.to_dict()
    data["modalities"]["logs"]["naive_times"] = "local"
    spec = parse_spec(data, source="s.yaml")
    assert [spec.naive_zone_in(spec.modalities[m]) for m in ("proc", "logs")] == [None, "Europe/Berlin"]
    assert parse_spec(spec.to_dict(), "s.yaml") == spec
    everywhere = parse_spec({**data, "naive_times": "local"})
    assert everywhere.naive_zone_in() == everywhere.naive_zone_in(everywhere.modalities["proc"]) == "Europe/Berlin"
    assert parse_spec({**data, "naive_times": "local", "timezone": "UTC"}).naive_zone_in() is None
    assert reading_differences(parse_spec(tiny_spec_dict(timezone="Europe/Berlin")), spec) == []   # how it is stored
    with pytest.raises(SpecError, match=r"key 'naive_times': 'berlin' is not one of utc, local"):
        parse_spec({**data, "naive_times": "berlin"}, source="s.yaml")


def test_time_format_is_checked_to_hold_the_day_and_round_trips():
    """`time_format`: how a time stored as text is written when not ISO 8601 (the spec's, or one modality's own); a
    format that does not write the year, month and day, an unknown code or no code at all is an error naming the key;
    it says how the data is stored, so a model version reads a table whose format changed."""
    data = tiny_spec_dict(time_format="%d/%m/%Y %H:%M:%S%.f")
    data["modalities"]["logs"]["time_format"] = "%b %d %Y %I:%M:%S %p"
    spec = parse_spec(data, source="s.yaml")
    assert [spec.time_format_in(spec.modalities[m]) for m in ("proc", "logs")] == ["%d/%m/%Y %H:%M:%S%.f",
                                                                                   "%b %d %Y %I:%M:%S %p"]
    assert spec.time_format_in() == "%d/%m/%Y %H:%M:%S%.f" and parse_spec(spec.to_dict(), "s.yaml") == spec
    assert parse_spec(tiny_spec_dict()).time_format_in() is None
    assert reading_differences(parse_spec(tiny_spec_dict()), spec) == []
    several = parse_spec(tiny_spec_dict(time_format=["%d/%m/%Y %H:%M:%S", "ISO8601", "%d/%m/%Y %H:%M:%S"]))
    assert several.time_format_in() == ("%d/%m/%Y %H:%M:%S", "ISO8601")          # in order, each once
    assert parse_spec(several.to_dict()) == several
    assert parse_spec(tiny_spec_dict(time_format=["%d/%m/%Y %H:%M:%S"])).time_format_in() == "%d/%m/%Y %H:%M:%S"
    iso = parse_spec(tiny_spec_dict(time_format=["ISO8601"]))               # a list of one: as its one format
    assert iso.time_format_in() == "ISO8601" and parse_spec(iso.to_dict()) == iso
    from dmafn.spec_schema import spec_problems
    assert spec_problems(tiny_spec_dict(time_format=["%d/%m/%Y %H:%M:%S", "ISO8601"]), "s.yaml") == []
    with pytest.raises(SpecError, match=r"key 'modalities.logs.time_format': '%H:%M' does not read back the day it "
                                        r"writes .* a format holds the year, month and day"):
        parse_spec({**data, "modalities": {**data["modalities"], "logs": {**data["modalities"]["logs"],
                                                                          "time_format": "%H:%M"}}})
    for bad, said in (("%Q %Y", "is no format a time can be written in"), ("dd/mm/yyyy", "must be a strftime format"),
                      (5, "must be a strftime format"), (["%d/%m/%Y", "%H:%M"], "'%H:%M' does not read back the day")):
        with pytest.raises(SpecError, match=f"key 'time_format': .*{said}"):
            parse_spec(tiny_spec_dict(time_format=bad), source="s.yaml")


def test_former_names_read_a_renamed_column_either_way_and_are_checked():
    """`former_names`: a value column renamed upstream is read under an older name where a file lacks it - and a
    version trained on the older name (scored with the current spec's `former_names`) reads the renamed files; the
    rename is no reading edit; a former name that is no value column's, or that names another column, is an error
    naming the key."""
    from dataclasses import replace

    data = tiny_spec_dict()
    data["modalities"]["vib"] = {**data["modalities"]["vib"], "columns": ["a", "b"],
                                 "former_names": {"a": "acc_x", "b": ["acc_y", "ay"]}}
    spec = parse_spec(data, source="s.yaml")
    vib = spec.modalities["vib"]
    assert vib.former_names == (("a", ("acc_x",)), ("b", ("acc_y", "ay")))
    assert spec.modalities["proc"].former_names == () and parse_spec(spec.to_dict(), "s.yaml") == spec
    now = {"machine_id", "ts", "a", "b"}
    assert spec.stored_columns(vib, now.__contains__) == {"machine_id": "machine_id", "ts": "ts", "a": "a", "b": "b"}
    assert spec.stored_columns(vib, {"machine_id", "ts", "acc_x", "ay"}.__contains__) == {
        "machine_id": "machine_id", "ts": "ts", "acc_x": "a", "ay": "b"}
    assert spec.stored_columns(vib, {"machine_id", "ts"}.__contains__)["a"] == "a"     # none: the check names it
    trained = replace(vib, columns=("acc_x", "b"))          # a version trained before the rename of a
    assert spec.stored_columns(trained, now.__contains__) == {"machine_id": "machine_id", "ts": "ts", "a": "acc_x",
                                                               "b": "b"}
    before = tiny_spec_dict()
    before["modalities"]["vib"] = {**before["modalities"]["vib"], "columns": ["b", "acc_x"]}
    assert reading_differences(parse_spec(before), spec) == []
    from dmafn.spec_schema import spec_problems
    assert spec_problems(data, "s.yaml") == []
    data["modalities"]["proc"]["former_names"] = {"ts": "timestamp", "machine_id": ["machine"]}   # time and entity
    assert parse_spec(data).modalities["proc"].former_names == (("ts", ("timestamp",)), ("machine_id", ("machine",)))
    for bad, key, said in (({"c": "x"}, "vib.former_names.c", "'c' is no column the modality reads \\(machine_id, "
                                                              "ts, a, b;"),
                           ({"a": "b"}, "vib.former_names.a", "'b' is the name of another column of the modality"),
                           ({"a": "x", "b": "x"}, "vib.former_names.b", "'x' is the name .* another column's former"),
                           ({"a": []}, "vib.former_names.a", "must be a column name or a non-empty list of them"),
                           ({"a": "ts"}, "vib.former_names.a", "'ts' is the name of the modality's time or entity"),
                           ("a", "vib.former_names", "must map columns to the name")):
        broken = tiny_spec_dict()
        broken["modalities"]["vib"] = {**broken["modalities"]["vib"], "columns": ["a", "b"], "former_names": bad}
        with pytest.raises(SpecError, match=f"key 'modalities.{key}': {said}"):
            parse_spec(broken, source="s.yaml")


def test_with_stored_names_reads_each_column_and_its_former_names_by_the_files_physical_names():
    """A file of a Delta table with column mapping: each column is read under its physical name, a former name under
    its own physical name (a column renamed in the table keeps its physical name), a column the mapping does not
    know (a partition value) under its own name; without stored names the modality is unchanged."""
    from dmafn.spec import with_stored_names

    data = tiny_spec_dict()
    data["modalities"]["vib"] = {**data["modalities"]["vib"], "columns": ["a", "b"], "former_names": {"b": "bb"}}
    spec = parse_spec(data, source="s.yaml")
    vib = spec.modalities["vib"]
    assert with_stored_names(vib, ()) is vib
    mapped = with_stored_names(vib, (("ts", "col-1"), ("a", "col-2"), ("bb", "col-3"), ("x", "col-4")))
    physical = {"machine_id", "col-1", "col-2", "col-3", "col-4"}          # the entity from the file's folders
    assert spec.stored_columns(mapped, physical.__contains__) == {"machine_id": "machine_id", "col-1": "ts",
                                                                  "col-2": "a", "col-3": "b"}
    assert spec.stored_columns(mapped, {"machine_id", "ts", "a", "b"}.__contains__) == {
        "machine_id": "machine_id", "ts": "ts", "a": "a", "b": "b"}              # a file from before the mapping


def test_missing_values_are_numbers_for_every_value_column_or_some_and_only_of_numeric_modalities():
    """`missing_values`: a list (or one number) for each value column of a tabular or timeseries modality, or a
    mapping of some columns to theirs; it says how the data is stored, so it is no reading edit; a text, an unknown
    column or a non-numeric modality is an error naming the key."""
    data = tiny_spec_dict()
    data["modalities"]["vib"] = {**data["modalities"]["vib"], "columns": ["a", "b"], "missing_values": -9999}
    data["modalities"]["proc"]["missing_values"] = {"temp": [-9999, 65535]}
    spec = parse_spec(data, source="s.yaml")
    assert spec.modalities["vib"].missing_values == (("a", (-9999.0,)), ("b", (-9999.0,)))
    assert spec.modalities["proc"].missing_values == (("temp", (-9999.0, 65535.0)),)
    assert parse_spec(spec.to_dict(), "s.yaml") == spec
    before = tiny_spec_dict()
    before["modalities"]["vib"] = {**before["modalities"]["vib"], "columns": ["a", "b"]}
    assert reading_differences(parse_spec(before), spec) == []
    from dmafn.spec_schema import spec_problems
    assert spec_problems(data, "s.yaml") == []
    for where, bad, said in (("proc", {"x": 1}, "missing_values.x': 'x' is not a value column"),
                             ("proc", ["n/a"], "missing_values': \\['n/a'\\] must be a number or a non-empty list"),
                             ("logs", [-1], "unknown key 'modalities.logs.missing_values'")):
        broken = tiny_spec_dict()
        broken["modalities"][where]["missing_values"] = bad
        with pytest.raises(SpecError, match=said):
            parse_spec(broken, source="s.yaml")


def test_added_columns_name_value_columns_of_numeric_modalities_and_are_no_reading_edit():
    """`added_columns`: value columns a tabular or timeseries table gained after some files were written; it says how
    the data is stored (no reading edit), a context view reads its parent's; an unknown column, a non-list or a
    text modality is an error naming the key."""
    data = tiny_spec_dict()
    data["modalities"]["proc"] = {**data["modalities"]["proc"], "added_columns": ["temp"],
                                  "context": {"window": "1h", "period": "1min"}}
    spec = parse_spec(data, source="s.yaml")
    assert spec.modalities["proc"].added_columns == ("temp",)
    assert spec.modalities["proc" + CONTEXT_SUFFIX].added_columns == ("temp",)
    assert parse_spec(spec.to_dict(), "s.yaml") == spec
    before = tiny_spec_dict()
    before["modalities"]["proc"] = {**before["modalities"]["proc"], "context": {"window": "1h", "period": "1min"}}
    assert reading_differences(parse_spec(before), spec) == []
    from dmafn.spec_schema import spec_problems
    assert spec_problems(data, "s.yaml") == []
    for where, bad, said in (("proc", ["x"], "added_columns': 'x' is not a value column"),
                             ("proc", [1], "added_columns': must be a non-empty list of column names"),
                             ("logs", ["message"], "unknown key 'modalities.logs.added_columns'")):
        broken = tiny_spec_dict()
        broken["modalities"][where]["added_columns"] = bad
        with pytest.raises(SpecError, match=said):
            parse_spec(broken, source="s.yaml")


def test_unreadable_files_is_fail_by_default_or_skip_and_kept_in_the_written_spec():
    data = tiny_spec_dict()
    assert parse_spec(data).unreadable_files == "fail" and "unreadable_files" not in parse_spec(data).to_dict()
    spec = parse_spec({**data, "unreadable_files": "skip"}, "s.yaml")
    assert spec.unreadable_files == "skip" and parse_spec(spec.to_dict(), "s.yaml") == spec
    from dmafn.spec_schema import spec_problems
    assert spec_problems({**data, "unreadable_files": "skip"}, "s.yaml") == []
    with pytest.raises(SpecError, match="unreadable_files': 'ignore' is not one of"):
        parse_spec({**data, "unreadable_files": "ignore"}, "s.yaml")


def test_cli_names_a_bad_spec_key_and_exits_2(tmp_path, capsys):
    import yaml

    from jobs.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(scheduler="nightly")))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "scheduler" in err and str(path) in err
    path.write_text(yaml.safe_dump(tiny_spec_dict()))
    assert main(["validate", str(path)]) == 0
    assert "valid spec 'tiny'" in capsys.readouterr().out
    for option, value in (("--days-per-shard", "0"), ("--parallel", "-1"), ("--shard-mb", "none")):
        with pytest.raises(SystemExit) as usage:          # a usage error before anything starts
            main(["backfill", str(path), "--start", "2024-01-01", "--end", "2024-01-02", option, value])
        assert usage.value.code == 2 and f"'{value}' is not a positive" in capsys.readouterr().err
    for verb, value in (("evaluate", "0"), ("report", "3,x"), ("evaluate", ",")):
        with pytest.raises(SystemExit) as usage:
            main([verb, str(path), "--min-ticks", value])
        assert usage.value.code == 2 and f"'{value}' is not a list of positive whole numbers" in capsys.readouterr().err


def test_cli_version_order_of_dates_unexpected_errors_and_interrupts(tmp_path, capsys, monkeypatch):
    """--version; --end before --start is a usage error before anything starts; an unexpected error is one
    line and exit 3 (its traceback with -v); Ctrl-C exits 130 saying how to continue."""
    import yaml

    import jobs.cli
    from jobs.cli import main

    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("dmafn ")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict()))
    with pytest.raises(SystemExit) as usage:
        main(["backfill", str(path), "--start", "2024-01-05", "--end", "2024-01-02"])
    assert usage.value.code == 2 and "--end 2024-01-02 is before --start 2024-01-05" in capsys.readouterr().err

    def boom(args):
        raise RuntimeError("the disk fell off")

    monkeypatch.setattr(jobs.cli, "cmd_validate", boom)
    assert main(["validate", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: unexpected RuntimeError: the disk fell off (run with -v for the "
                                        "traceback)"]
    assert main(["validate", str(path), "-v"]) == 3
    assert "Traceback" in capsys.readouterr().err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs.cli, "cmd_validate", interrupted)
    assert main(["validate", str(path)]) == 130
    assert "interrupted: the dates already committed stay committed; run again" in capsys.readouterr().err


def test_every_verb_is_also_a_jobs_module_that_runs_it():
    """Each `dmafn VERB` is `python -m jobs.VERB` too (a `ray job submit` target), as README says; `score`'s is
    `jobs.nightly` (and `jobs.score`)."""
    import argparse
    import ast
    from pathlib import Path

    from jobs.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    jobs = Path(__file__).resolve().parent.parent / "jobs"
    for verb in sub.choices:
        module = jobs / f"{verb}.py"
        assert module.exists(), f"no jobs/{verb}.py for `dmafn {verb}`"
        calls = [n for n in ast.walk(ast.parse(module.read_text())) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", None) == "run"]
        assert [kw.value.value for c in calls for kw in c.keywords if kw.arg == "verb"] == [verb], module


def test_readme_has_a_section_for_every_verb():
    """README's "Commands" has a section headed "### `dmafn VERB`" for each verb the CLI takes, and none for a verb
    it does not."""
    import argparse
    import re
    from pathlib import Path

    from jobs.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    commands = readme[readme.index("\n## Commands\n"):readme.index("\n## Where output goes\n")]
    assert sorted(re.findall(r"^### `dmafn (\w+)`$", commands, re.M)) == sorted(sub.choices)


def test_validate_lists_every_problem_of_a_spec_at_once(tmp_path, capsys):
    import yaml

    from jobs.cli import main

    data = tiny_spec_dict(grain="1 minute", bogus=1)
    data["modalities"]["proc"]["tolerence"] = "2min"
    data["modalities"]["cam"].pop("column")
    data["modalities"]["logs"]["kind"] = "txt"
    data["train"]["epochs"] = 0
    data["model"] = {"fusion": "attn"}
    data.pop("registry")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 8 problem(s):")
    for expected in ("key 'grain': '1 minute' is not a duration", "unknown key 'bogus'",
                     "unknown key 'modalities.proc.tolerence' (allowed here: added_columns, channel_dropout, columns, "
                     "context, encoding_distance, entity, former_names, kind, missing_values, naive_times, partition, "
                     "path, time, time_format, time_unit, tolerance)",
                     "missing required key 'modalities.cam.column'", "key 'modalities.logs.kind': 'txt' is not one of",
                     "key 'train.epochs': 0 is less than the minimum of 1", "key 'model.fusion': 'attn' is not one of",
                     "missing required key 'registry'"):
        assert f"{path}: {expected}" in err, expected


def test_validate_checks_across_keys_once_the_structure_is_sound():
    from dmafn.spec_schema import spec_problems

    data = tiny_spec_dict()
    data["modalities"]["vib"]["window"] = "50s"                 # not a multiple of its 20s period
    assert spec_problems(data, "s.yaml") == ["s.yaml: key 'modalities.vib.window': must be a whole multiple "
                                             "(>= 2) of 'period'"]
    assert spec_problems(tiny_spec_dict(), "s.yaml") == []


def test_the_published_json_schema_is_the_one_the_code_builds():
    import json
    from pathlib import Path

    from dmafn.spec_schema import spec_json_schema

    published = json.loads((Path(__file__).resolve().parents[1] / "spec.schema.json").read_text())
    assert published == spec_json_schema()                     # regenerate: dmafn validate --schema > spec.schema.json


def test_validate_check_data_lists_what_each_path_holds_and_every_problem(tmp_path, capsys):
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from jobs.cli import main

    data = tiny_spec_dict()
    ts = pa.array([dt.datetime(2024, 1, 1, 0, 0, tzinfo=dt.timezone.utc)], pa.timestamp("us", tz="UTC"))
    for name in ("proc", "vib", "logs", "cam"):
        data["modalities"][name]["path"] = str(tmp_path / name)
    for day, temp in (("2024-01-01", [1.0]), ("2024-01-03", pa.nulls(1))):   # a day with no value: type null
        folder = tmp_path / "proc" / f"date={day}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"machine_id": ["a"], "ts": ts, "temp": temp, "extra": [day]}),
                       folder / "part-0.parquet")
    folder = tmp_path / "vib" / "date=2024-01-01"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"machine_id": ["a"], "ts": ts, "b": [1.0]}), folder / "part-0.parquet")   # no 'a'
    (folder / "broken.parquet").write_bytes(b"not parquet")
    folder = tmp_path / "logs" / "day=2024-01-01"                                # the wrong partition key
    folder.mkdir(parents=True)
    (tmp_path / "labels").mkdir()                                                 # one label row unusable
    pq.write_table(pa.table({"machine_id": ["a", "a"], "start_ts": pa.array([ts[0].as_py(), None], ts.type),
                             "end_ts": ts.take([0, 0])}), tmp_path / "labels" / "part-0.parquet")
    data["labels"] = {"path": str(tmp_path / "labels"), "start": "start_ts", "end": "end_ts"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path), "--check-data"]) == 2
    captured = capsys.readouterr()
    assert "proc: " in captured.out and "partitions: 2 dates 2024-01-01 .. 2024-01-03 (1 date(s) missing in between)" \
        in captured.out and "columns: machine_id string, ts timestamp[us, tz=UTC], temp double" in captured.out
    proc = tmp_path / "proc"        # a note, not a problem: each file is read as its types say (columns not read: no)
    assert "  the spec's columns are stored as other types in some files (2 ways; each file is read as its own " \
        "types say; a column of type null holds no value: its rows are quarantined): " \
        f"{proc}/date=2024-01-01/part-0.parquet has machine_id string, ts timestamp[us, tz=UTC], temp double; " \
        f"temp null in {proc}/date=2024-01-03/part-0.parquet\n" in captured.out
    assert f"labels: {tmp_path / 'labels'}\n  rows: 2, used 1; left out: 1 null start_ts\n  1 of them in the " \
        "training window 2024-01-01..2024-01-02: their ticks are left out of training and calibration " \
        "(train.exclude_labelled)" in captured.out
    err = captured.err
    assert err.startswith("error: 4 data problem(s):")
    assert "column 'a' not found" in err and "broken.parquet: not a readable Parquet file" in err
    assert f"modality 'logs': {tmp_path / 'logs'}: no 'date=YYYY-MM-DD' partitions found" in err
    assert f"modality 'cam': {tmp_path / 'cam'}: table not found" in err

    # labels whose end column is a number: a problem naming their path and the column
    pq.write_table(pa.table({"machine_id": ["a"], "start_ts": ts, "end_ts": [1.5]}),
                   tmp_path / "labels" / "part-0.parquet")
    assert main(["validate", str(path), "--check-data"]) == 2
    captured = capsys.readouterr()
    assert f"labels: {tmp_path / 'labels'}: cannot be used" in captured.out
    assert captured.err.startswith("error: 5 data problem(s):")
    assert f"labels {tmp_path / 'labels' / 'part-0.parquet'}: column 'end_ts' is Float64; a timestamp (or date, or ISO 8601 text) is " \
        "needed" in captured.err


def test_check_data_names_a_modality_without_files_in_the_training_days_where_the_others_have_them(tmp_path):
    """What `dmafn train` would refuse (a modality it could not learn or calibrate) is a problem before it runs; a
    training window no modality has files in (aged out of the lake: a spec that only scores) is none."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.check_data import check_data

    data = tiny_spec_dict()
    data["modalities"] = {name: {**data["modalities"][name], "path": str(tmp_path / name)} for name in ("proc", "vib")}
    data["train"] = {"start": "2024-01-01", "end": "2024-01-03"}            # training 01-02, validation 03
    ts = pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)], pa.timestamp("us", tz="UTC"))
    for name, column, days in (("proc", "temp", ("01", "02", "03", "09")), ("vib", "a", ("03", "09"))):
        for day in days:
            folder = tmp_path / name / f"date=2024-01-{day}"
            folder.mkdir(parents=True)
            stamp = pa.array([dt.datetime(2024, 1, int(day), tzinfo=dt.timezone.utc)], ts.type)
            pq.write_table(pa.table({"machine_id": ["a"], "ts": stamp, column: [1.0]}), folder / "part-0.parquet")
    found = {d.name: d.problems for d in check_data(parse_spec(data))}
    assert found == {"proc": [], "vib": [
        f"modality 'vib' ({tmp_path / 'vib'}): no file in the partitions of the training days 2024-01-01..2024-01-02, "
        "where proc has files: dmafn train would refuse it"]}
    data["train"] = {"start": "2023-06-01", "end": "2023-06-03"}            # long gone from the lake
    assert all(not d.problems for d in check_data(parse_spec(data)))


def test_check_data_names_files_holding_rows_timed_outside_their_date_by_the_specs_timezone(tmp_path, capsys):
    """From the footers' time statistics alone: a lake filed by Berlin's dates read as UTC dates has files whose
    rows start the evening before their date - named, with `timezone` suggested; with `timezone: Europe/Berlin`
    nothing is outside. A note, not a problem (late rows are quarantined when scored)."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from jobs.cli import main

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc")}}
    utc = dt.timezone.utc
    for day in (1, 2):                                       # Berlin's date: 23:00 UTC the day before to 23:00 UTC
        times = [dt.datetime(2024, 1, day - 1, 23, 30, tzinfo=utc) if day > 1 else dt.datetime(2024, 1, 1, 0, 30,
                                                                                                tzinfo=utc),
                 dt.datetime(2024, 1, day, 22, 0, tzinfo=utc)]
        folder = tmp_path / "proc" / f"date=2024-01-0{day}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"machine_id": ["a", "a"], "ts": pa.array(times, pa.timestamp("ns", tz="UTC")),
                                 "temp": [1.0, 2.0]}), folder / "part-0.parquet")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path), "--check-data"]) == 0
    out = capsys.readouterr().out
    assert ("rows timed outside their date partition (dates of timezone UTC, by the footers' time statistics): in 1 "
            f"of 2 files, e.g. {tmp_path / 'proc' / 'date=2024-01-02' / 'part-0.parquet'} (2024-01-02) holds "
            "2024-01-01 23:30 .. 2024-01-02 22:00 UTC") in out and "(set `timezone`)" in out
    path.write_text(yaml.safe_dump({**data, "timezone": "Europe/Berlin"}))
    assert main(["validate", str(path), "--check-data"]) == 0
    assert "outside their date partition" not in capsys.readouterr().out
    # the same lake with naive times of Berlin's wall clock (01:30 is 00:30 UTC): read as UTC, the evening's are
    # late - `naive_times` suggested; with `naive_times: local` nothing is outside
    for day in (1, 2):
        file = tmp_path / "proc" / f"date=2024-01-0{day}" / "part-0.parquet"
        wall = pq.read_table(file).column("ts").cast(pa.timestamp("ns", tz="Europe/Berlin")).to_pylist()
        pq.write_table(pq.read_table(file).set_column(1, "ts", pa.array([t.replace(tzinfo=None) for t in wall],
                                                                        pa.timestamp("us"))), file)
    assert main(["validate", str(path), "--check-data"]) == 0
    assert "or times without a zone that show Europe/Berlin's wall clock (set `naive_times: local`)" in \
        capsys.readouterr().out
    path.write_text(yaml.safe_dump({**data, "timezone": "Europe/Berlin", "naive_times": "local"}))
    assert main(["validate", str(path), "--check-data"]) == 0
    assert "outside their date partition" not in capsys.readouterr().out


def test_check_data_reads_integer_times_by_the_specs_time_unit(tmp_path, capsys):
    """A lake timed in epoch milliseconds: without `time_unit` each file is a problem naming the column and the
    key; with `time_unit: ms` it checks clean; with a wrong unit every file's rows lie in January 1970 (`us`) or
    beyond any calendar (`s`: year 56,000) - named as rows outside their date, the unit suggested."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from jobs.cli import main

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc")}}
    for day in (1, 2):
        folder = tmp_path / "proc" / f"date=2024-01-0{day}"
        folder.mkdir(parents=True)
        start = 1_704_067_200_000 + (day - 1) * 86_400_000     # the date's midnight, UTC, in milliseconds
        pq.write_table(pa.table({"machine_id": ["a", "a"], "ts": pa.array([start, start + 60_000], pa.int64()),
                                 "temp": [1.0, 2.0]}), folder / "part-0.parquet")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path), "--check-data"]) == 2
    assert "time column 'ts' is int64, expected a timestamp or ISO 8601 text; a count of seconds" \
        in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**data, "time_unit": "ms"}))
    assert main(["validate", str(path), "--check-data"]) == 0
    assert "outside their date partition" not in capsys.readouterr().out
    path.write_text(yaml.safe_dump({**data, "time_unit": "us"}))
    assert main(["validate", str(path), "--check-data"]) == 0
    out = capsys.readouterr().out
    assert "in 2 of 2 files" in out and "holds 1970-01-20 17:21 .. 1970-01-20 17:21 UTC" in out
    assert "or numeric times that count another unit than `time_unit` (us)" in out
    path.write_text(yaml.safe_dump({**data, "time_unit": "s"}))
    assert main(["validate", str(path), "--check-data"]) == 0
    assert "holds 1704067200000000000 .. 1704067260000000000 microseconds since the epoch" in capsys.readouterr().out


def test_check_data_names_text_times_the_spec_does_not_read_and_the_formats_that_do(tmp_path, capsys):
    """A table timed by day-first text: `validate --check-data` names the column, texts its statistics hold and the
    key, with the formats that read them (day- and month-first alike: the source says which); with `time_format` it
    checks clean, and the columns are listed (they were not for a time stored as text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from jobs.cli import main
    from pipelines.check_data import formats_reading

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc")}}
    for day in (1, 2):
        folder = tmp_path / "proc" / f"date=2024-01-0{day}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"machine_id": ["a", "a"],
                                 "ts": [f"0{day}/01/2024 00:00:00", f"0{day}/01/2024 13:30:00"],
                                 "temp": [1.0, 2.0]}), folder / "part-0.parquet")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path), "--check-data"]) == 2
    err = capsys.readouterr().err
    assert "modality 'proc': time column 'ts' holds text such as '01/01/2024 00:00:00', '01/01/2024 13:30:00' (" \
        in err
    assert "which is not an ISO 8601 time - every such row would be quarantined; set modalities.proc.time_format: it " \
        "reads as '%d/%m/%Y %H:%M:%S%.f' or as '%m/%d/%Y %H:%M:%S%.f' (which one, the data's source says)" in err
    assert err.count("holds text such as") == 1                                     # the first file only
    path.write_text(yaml.safe_dump({**data, "time_format": "%d/%m/%Y %H:%M:%S"}))
    assert main(["validate", str(path), "--check-data"]) == 0
    assert "columns: machine_id string, ts string, temp double" in capsys.readouterr().out
    assert formats_reading(["13/01/2024 10:00:00"]) == ["%d/%m/%Y %H:%M:%S%.f"]        # no 13th month
    assert formats_reading(["[05/Jan/2024:10:00:00 +0100]"]) == []
    assert "%d/%b/%Y:%H:%M:%S%.f %z" in formats_reading(["05/Jan/2024:10:00:00 +0100"])   # a web server's


def test_context_derives_a_slow_time_series_view_of_the_same_rows():
    data = tiny_spec_dict()
    data["modalities"]["proc"]["context"] = {"window": "30min"}          # period: the grain
    spec = parse_spec(data, source="s.yaml")
    ctx = spec.modalities["proc_context"]
    assert (ctx.kind, ctx.path, ctx.columns, ctx.context_of) == ("timeseries", "/tmp/none/proc", ("temp",), "proc")
    assert (ctx.period_us, ctx.steps) == (60_000_000, 30)
    assert list(spec.modalities)[:2] == ["proc", "proc_context"]
    again = parse_spec(spec.to_dict())
    assert again.modalities == spec.modalities and spec.to_dict()["modalities"]["proc"]["context"] == \
        {"window": "30min", "period": "1min"}
    for patch, message in (({"window": "30min", "period": "7min"}, "context.period': must divide"),
                           ({"window": "2min"}, "context.window': must be longer than the modality's own reach"),
                           ({"period": "1min"}, "context.window"),
                           ({"window": "1h", "step": "1min"}, "unknown key 'modalities.proc.context.step'")):
        data["modalities"]["proc"]["context"] = patch
        with pytest.raises(SpecError, match=message):
            parse_spec(data, source="s.yaml")
    data["modalities"]["proc"]["context"] = {"window": "1h"}
    data["modalities"]["proc_context"] = dict(data["modalities"]["vib"])
    with pytest.raises(SpecError, match="derives modality 'proc_context', which the spec also defines"):
        parse_spec(data, source="s.yaml")


def test_reading_differences_name_each_edit_a_model_version_would_not_see():
    trained = parse_spec(tiny_spec_dict(), source="trained")
    data = tiny_spec_dict()
    data["modalities"]["proc"].update(path="s3://moved/proc", columns=["temp"])     # moved: no difference
    data["modalities"]["logs"].update(time="@timestamp", entity="machine", time_unit="s")   # renamed: none either
    assert reading_differences(trained, parse_spec(data, source="s.yaml")) == []
    data["modalities"]["vib"].update(window="2min", columns=["a", "b"])
    data["modalities"]["proc"]["context"] = {"window": "1h"}
    data["modalities"]["audio"] = {"kind": "audio", "path": "/tmp/none/audio", "column": "clip",
                                   "sample_rate": 8000, "clip": "1s", "tolerance": "1min"}
    data.update(grain="2min", model={"fusion": "gated"}, train={"start": "2024-02-01", "end": "2024-02-09"},
                score={"output": "/tmp/elsewhere/scores", "threshold": {"method": "quantile", "quantile": 0.95}})
    assert reading_differences(trained, parse_spec(data, source="s.yaml")) == [
        "grain: 2min (the version's: 1min)",
        "modalities.proc.context: window 1h, period 2min (the version's: none)",
        "modalities.vib.columns: ['a', 'b'] (the version's: ['a'])",
        "modalities.vib.window: 2min (the version's: 1min)",
        "modalities.audio: not in the version, so not read",
        "model.fusion: gated (the version's: attention)",
        "score.threshold.method: quantile (the version's: pot)",
        "score.threshold.quantile: 0.95 (the version's: 0.99)"]   # neither the train section nor where output goes


def test_validation_days_default_to_a_tenth_of_the_training_window():
    from dmafn.spec import default_validation_days

    d = __import__("datetime").date
    assert [default_validation_days(d(2024, 1, 1), d(2024, 1, n)) for n in (1, 3, 14, 15, 31)] == [1, 1, 1, 2, 3]
    assert default_validation_days(d(2024, 1, 1), d(2024, 6, 30)) == 14
    data = tiny_spec_dict()
    data["train"] = {"start": "2024-01-01", "end": "2024-01-30"}
    assert parse_spec(data).train.validation_days == 3
    data["train"]["validation_days"] = 1                      # given: kept
    spec = parse_spec(data)
    assert spec.train.validation_days == 1 and parse_spec(spec.to_dict()).train.validation_days == 1


def test_check_data_reads_footers_in_parallel_and_lists_problems_in_file_order(tmp_path, monkeypatch):
    """Footers are read by threads; the problems still come in file order when later files answer first."""
    import datetime as dt
    import threading
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipelines.check_data as check
    from dmafn.spec import parse_spec

    data = tiny_spec_dict()
    ts = pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)], pa.timestamp("us", tz="UTC"))
    folder = tmp_path / "proc" / "date=2024-01-01"
    folder.mkdir(parents=True)
    for i in range(24):
        if i % 5 == 2:
            (folder / f"part-{i:02d}.parquet").write_bytes(b"not parquet")
        else:
            pq.write_table(pa.table({"machine_id": ["a"], "ts": ts, "temp": [1.0]}), folder / f"part-{i:02d}.parquet")
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc")}}
    spec = parse_spec(data, source="spec.yaml")
    reading, most = set(), [0]
    lock = threading.Lock()
    read = check.file_footer

    def slow_first(filesystem, path, time_column, time_unit=None, naive_zone=None):
        with lock:
            reading.add(path)
            most[0] = max(most[0], len(reading))
        time.sleep(0.2 - 0.008 * int(path[-10:-8]))          # the later the file, the sooner it answers
        try:
            return read(filesystem, path, time_column, time_unit, naive_zone)
        finally:
            with lock:
                reading.discard(path)

    monkeypatch.setattr(check, "file_footer", slow_first)
    found = check.check_data(spec)[0]
    assert found.files == 24 and most[0] > 1
    broken = [p for p in found.problems if "not a readable Parquet file" in p]
    assert [p.split("part-")[1][:2] for p in broken] == ["02", "07", "12", "17", "22"]
    assert found.columns == {"machine_id": "string", "ts": "timestamp[us, tz=UTC]", "temp": "double"}


def test_what_the_jobs_write_lies_apart_from_what_they_read_and_from_each_other():
    """A `score.output` at an input table would add Delta files to its partitions (read back as input), one above it
    would be vacuumed with the inputs inside; the output tables and the registry need places of their own too."""
    def spec(**score):
        data = tiny_spec_dict(score={"output": "/tmp/none/scores", **score})
        data["modalities"]["proc"]["path"] = "s3://lake/raw/proc"
        return data

    parse_spec(spec(), source="s.yaml")                                 # the default layout: apart
    parse_spec(spec(output="s3://lake/raw/proc_scores"), source="s.yaml")   # a common prefix is not inside
    cases = [(spec(output="s3://lake/raw/proc/"), "score.output", "modalities.proc.path"),
             (spec(output="s3://lake//raw"), "score.output", "modalities.proc.path"),
             (spec(runs="/tmp/none/scores/runs"), "score.output", "score.runs"),
             (spec(quarantine="/tmp/none/models/q"), "score.quarantine", "registry"),
             (dict(spec(), registry="/tmp/none/vib/../vib/models"), "registry", "modalities.vib.path"),
             (dict(spec(), labels={"path": "/tmp/none/scores_staging/labels"}), "score.staging", "labels.path")]
    for data, key, other in cases:
        with pytest.raises(SpecError, match=f"s.yaml: key '{key}' \\(.*\\) and key '{other}' \\(.*\\) are the same "
                                            "place or one lies inside the other"):
            parse_spec(data, source="s.yaml")


def test_payload_files_are_an_image_or_audio_modalitys_way_of_storage():
    """`payload: file` with `payload_root`: parsed, written back by `spec_to_dict`, how data is stored (no reading
    edit, a version reads with the current spec's); `payload_root` without `payload: file`, on a tabular
    modality, or where the jobs write, is refused naming the key."""
    from dmafn.spec import spec_to_dict

    spec = tiny_spec_dict()
    spec["modalities"]["cam"].update(payload="file", payload_root="s3://lake/frames")
    parsed = parse_spec(spec, source="s.yaml")
    cam = parsed.modalities["cam"]
    assert (cam.payload, cam.payload_root) == ("file", "s3://lake/frames")
    assert spec_to_dict(parsed)["modalities"]["cam"]["payload_root"] == "s3://lake/frames"
    assert parse_spec(spec_to_dict(parsed), source="again").modalities["cam"] == cam
    assert reading_differences(parse_spec(tiny_spec_dict(), source="t"), parsed) == []
    for key, value, message in (("payload", "url", "'url' is not one of bytes, file"),
                                ("payload", "bytes", "payload_root.*needs 'payload: file'")):
        bad = tiny_spec_dict()
        bad["modalities"]["cam"].update(payload_root="/frames", **{key: value})
        with pytest.raises(SpecError, match=message):
            parse_spec(bad, source="s.yaml")
    tabular = tiny_spec_dict()
    tabular["modalities"]["proc"]["payload"] = "file"
    with pytest.raises(SpecError, match="unknown key 'modalities.proc.payload'"):
        parse_spec(tabular, source="s.yaml")
    inside = tiny_spec_dict()
    inside["modalities"]["cam"].update(payload="file", payload_root="/tmp/none/scores")
    with pytest.raises(SpecError, match="'score.output' .* and key 'modalities.cam.payload_root'"):
        parse_spec(inside, source="s.yaml")
