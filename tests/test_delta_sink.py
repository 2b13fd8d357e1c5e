"""Delta commits from a job's driver: one date replaced atomically, the job's tables opened once."""
import polars as pl
import pyarrow as pa
from deltalake import DeltaTable
from pyarrow import fs

from pipelines.delta_sink import OpenTables, commit_date, write_data_file, write_partition


def _files(uri: str, date: str, values: list[float], name: str) -> list[dict]:
    table = pa.table({"entity": [f"e{i}" for i in range(len(values))], "score": values, "date": [date] * len(values)})
    return [write_data_file(uri, table, date=date, name=name, filesystem=fs.LocalFileSystem(), root=uri)]


def test_open_tables_are_opened_once_and_see_other_writers_commits(tmp_path):
    """A job's cached table is brought up to date before each commit: a date another writer replaced meanwhile
    is replaced again with one copy, the other dates stay, and the audit append lands on the same table."""
    uri = str(tmp_path / "scores")
    schema = pa.schema([("entity", pa.large_string()), ("score", pa.float64()), ("date", pa.large_string())])
    tables = OpenTables()
    assert tables.get(uri) is None                                     # no table yet: nothing cached
    commit_date(uri, _files(uri, "2024-01-01", [1.0, 2.0], "a"), date="2024-01-01", schema=schema, tables=tables)
    first = tables.get(uri)
    assert first is not None and tables.get(uri) is first              # opened once
    commit_date(uri, _files(uri, "2024-01-02", [5.0], "other"), date="2024-01-02", schema=schema)   # another writer
    commit_date(uri, _files(uri, "2024-01-01", [9.0], "other"), date="2024-01-01", schema=schema)
    commit_date(uri, _files(uri, "2024-01-01", [3.0, 4.0, 6.0], "b"), date="2024-01-01", schema=schema, tables=tables)
    rows = pl.read_delta(uri).sort("date", "entity")
    assert rows["date"].to_list() == ["2024-01-01"] * 3 + ["2024-01-02"]
    assert rows["score"].to_list() == [3.0, 4.0, 6.0, 5.0]
    assert tables.get(uri) is first and first.version() == DeltaTable(uri).version()     # the same object, current
    runs = str(tmp_path / "runs")
    for run in ("r1", "r2"):
        write_partition(runs, pa.table({"run_id": [run]}), date=None, mode="append", partition_by=(), tables=tables)
    assert sorted(pl.read_delta(runs)["run_id"].to_list()) == ["r1", "r2"]


def _version_files(uri: str, date: str, versions: list[str], name: str) -> list[dict]:
    table = pa.table({"machine_id": [f"pump-{i:02d}" for i in range(len(versions))], "score": [1.0] * len(versions),
                      "model_version": versions, "note": ["x" * 40] * len(versions), "date": [date] * len(versions)})
    return [write_data_file(uri, table, date=date, name=name, filesystem=fs.LocalFileSystem(), root=uri)]


def test_files_carry_exact_text_statistics_and_the_dates_a_version_wrote_are_read_off_the_log(tmp_path, monkeypatch):
    """Each data file's add action carries its text columns' null count, min and max (not for a longer text,
    nor for numbers); a reader's filter on them skips files and still returns every matching row; the dates all
    written by one model version come from those statistics without reading a row, and a date committed without
    them (an older writer) is read."""
    import json

    import pipelines.delta_sink as sink

    uri = str(tmp_path / "scores")
    schema = pa.schema([("machine_id", pa.string()), ("score", pa.float64()), ("model_version", pa.string()),
                        ("note", pa.string()), ("date", pa.string())])
    commit_date(uri, _version_files(uri, "2024-01-01", ["v1", "v1"], "a"), date="2024-01-01", schema=schema)
    commit_date(uri, _version_files(uri, "2024-01-02", ["v1", "v2", "v1"], "a"), date="2024-01-02", schema=schema)
    old = _version_files(uri, "2024-01-03", ["v1"], "a")
    old[0]["stats"] = json.dumps({"numRecords": 1})                        # as written before 2026-12-02
    commit_date(uri, old, date="2024-01-03", schema=schema)
    old = _version_files(uri, "2024-01-04", ["v2"], "a")
    old[0]["stats"] = json.dumps({"numRecords": 1})
    commit_date(uri, old, date="2024-01-04", schema=schema)

    stats = json.loads(_version_files(uri, "2024-01-05", ["v2", "v1"], "b")[0]["stats"])
    assert stats == {"numRecords": 2, "minValues": {"machine_id": "pump-00", "model_version": "v1"},
                     "maxValues": {"machine_id": "pump-01", "model_version": "v2"},
                     "nullCount": {"machine_id": 0, "model_version": 0}}
    actions = pl.DataFrame(DeltaTable(uri).get_add_actions(flatten=True)).sort("partition.date")
    assert actions["min.model_version"].to_list() == ["v1", "v1", None, None]
    assert actions["max.model_version"].to_list() == ["v1", "v2", None, None]
    picked = pl.scan_delta(uri).filter(pl.col("model_version") == "v2").collect()
    assert sorted(picked["date"].to_list()) == ["2024-01-02", "2024-01-04"]

    read = []
    real_scan = pl.scan_delta
    monkeypatch.setattr(sink.pl, "scan_delta", lambda *a, **k: read.append(a) or real_scan(*a, **k))
    dates = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-09"]
    assert sink.dates_written_by(uri, None, "model_version", "v1", dates) == {"2024-01-01", "2024-01-03"}
    assert sink.dates_written_by(uri, None, "model_version", "v2", dates) == {"2024-01-04"}
    assert len(read) == 2                                                    # once per call: the dates without stats
    assert sink.dates_written_by(str(tmp_path / "none"), None, "model_version", "v1", dates) == set()


def test_a_table_under_a_name_with_a_space_or_a_letter_beyond_ascii_is_read(tmp_path):
    """`/data/Pumpen Daten ü/scores`: the log's file URIs percent-encode the name and Polars opened them as spelled (no
    such file: `status`, `evaluate`, `report` and a backfill's check failed on tables `score` had just written);
    `scan_table` reads it - by its URI and open - as a plain name is read."""
    from pipelines.delta_sink import dates_written_by, scan_table

    for name in ("plain", "Pumpen Daten \u00fc"):
        uri = str(tmp_path / name / "scores")
        for day in ("2024-01-01", "2024-01-02"):
            write_partition(uri, pa.table({"m": ["a", "b"], "v": [1.0, 2.0], "run_id": ["r1", "r1"],
                                           "date": [day, day]}), date=day, mode="replace_date")
        read = scan_table(uri).filter(pl.col("date") == "2024-01-02").collect()
        assert read.sort("m")["v"].to_list() == [1.0, 2.0]
        per_date = scan_table(DeltaTable(uri)).group_by("date").agg(pl.len()).collect(engine="streaming")
        assert per_date.sort("date")["len"].to_list() == [2, 2]
        assert dates_written_by(uri, None, "run_id", "r1", ["2024-01-01", "2024-01-02"]) == {"2024-01-01",
                                                                                            "2024-01-02"}


def test_tables_dmafn_did_not_write_are_refused_before_anything_is_written(tmp_path):
    """A `score.output` (or quarantine, or runs table) pointed at another table - another team's, or the output of
    a spec with another entity key - is named with what differs, and left as it was: dmafn replaces whole dates in
    its tables. Its own tables, and paths with no table yet, pass."""
    import datetime as dt
    import shutil

    import pytest
    from deltalake import write_deltalake

    from dmafn.spec import ScoreSpec
    from pipelines.delta_sink import OUTPUT_COLUMNS, require_own_tables, table_mismatch
    from pipelines.storage import DataError, Storage

    score = ScoreSpec(output=str(tmp_path / "scores"))
    require_own_tables(score, ("machine_id",), Storage())                       # nothing there yet
    (tmp_path / "scores" / "date=2024-01-05").mkdir(parents=True)               # a first job killed before its commit
    (tmp_path / "scores" / "date=2024-01-05" / "part-r-0.parquet").write_bytes(b"PAR1")
    require_own_tables(score, ("machine_id",), Storage())
    (tmp_path / "scores" / "exports.csv").write_text("a,b\n")                  # someone else's files
    with pytest.raises(DataError, match=f"score.output {score.output} holds files but no Delta table "
                                        "\\(exports.csv\\)"):
        require_own_tables(score, ("machine_id",), Storage())
    shutil.rmtree(tmp_path / "scores")
    theirs = pa.table({"a": [1, 2], "date": ["2024-01-05", "2024-01-05"]})
    write_deltalake(score.output, theirs)
    with pytest.raises(DataError, match=f"score.output {score.output} is a Delta table dmafn did not write for this "
                                        "spec \\(no column machine_id, ts, score, threshold, is_anomaly, "
                                        "model_version, run_id; partitioned by nothing, not date\\)"):
        require_own_tables(score, ("machine_id",), Storage())
    assert pl.read_delta(score.output).to_dict(as_series=False) == theirs.to_pydict()
    ours = {"machine_id": ["m"], "ts": [dt.datetime(2024, 1, 5)], "date": ["2024-01-05"], "score": [0.1],
            "threshold": [1.0], "is_anomaly": [False], "model_version": ["v"], "run_id": ["r"]}
    write_deltalake(score.output, pa.table(ours), mode="overwrite", schema_mode="overwrite", partition_by=["date"])
    require_own_tables(score, ("machine_id",), Storage())
    assert table_mismatch(DeltaTable(score.output), ("site", "machine_id", *OUTPUT_COLUMNS)) == ["no column site"]
    write_deltalake(score.runs_path, pa.table({"run_id": ["r"], "date": ["2024-01-05"]}), partition_by=["date"])
    with pytest.raises(DataError, match="score.runs .*scores_runs is a Delta table dmafn did not write for this spec "
                                        "\\(no column model_version, status, finished_at\\)"):
        require_own_tables(score, ("machine_id",), Storage())
