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
