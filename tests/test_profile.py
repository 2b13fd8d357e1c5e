"""Profile: each pass's function by hand, and the whole profile with Dask on the local Ray (an entity's rows of a
day spread over reads and files are brought together; more partitions give the same table; no disk shuffle; a bad
file is named)."""
import datetime as dt
import logging
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import polars as pl
import pytest

from dmafn.spec import load_spec
from dmafn.synthetic import SyntheticConfig
from jobs.cli import main
from pipelines.generate import write_synthetic
from pipelines.profile import Columns, FilePart, RowGroupsPart, entity_periods, file_counts, key_rows, profile
from pipelines.storage import DataError, Storage

S = 1_000_000                                  # a second in microseconds
DAY = 1704067200 * S                           # 2024-01-01 00:00 UTC


def test_entity_periods_per_entity_by_hand():
    # a: every 10 s, gaps of 60 and 40 s, one repeated tick -> diffs 10, 10, 60, 0, 10, 40, 10 -> median 10,
    #    2 gaps (over 30 s; against 3x their mean, 60 s, none), 1 repeat;
    # b: every 30 s -> median 30, no gap (pooled, a's and b's diffs would have a median of 20 and a no gap);
    # c: one row -> no period; rows without an entity or a time are left to the null count
    a = [0, 10, 20, 80, 80, 90, 130, 140]
    b = [5, 35, 65, 95]
    rows = pl.DataFrame({"m": ["a"] * 8 + ["b"] * 4 + ["c", None, "a"],
                         "_us": [DAY + t * S for t in [*a, *b, 3]] + [DAY, None]})
    out = entity_periods(rows.sample(fraction=1.0, shuffle=True, seed=1), ["m"]).sort("m")
    assert out["m"].to_list() == ["a", "b", "c"]
    assert out["period_s"].to_list() == [10.0, 30.0, None]
    assert out["gaps"].to_list() == [2, 0, 0] and out["duplicate_keys"].to_list() == [1, 0, 0]


def test_file_counts_a_row_group_at_a_time(tmp_path):
    ts = pa.array([DAY + i * S for i in range(5)] + [DAY + 86_400 * S + 5, None], pa.timestamp("us", tz="UTC"))
    table = pa.table({"m": ["a", "a", None, "b", "b", "b", "b"], "ts": ts,
                      "v": [1.0, float("nan"), None, 2.0, 3.0, 4.0, 5.0],
                      "img": [b"\x89PNG", None, b"\x89PNG", b"\x89PNG", None, b"\x89PNG", b"\x89PNG"]})
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=3)               # three row groups
    cols = Columns("process", ("m",), "ts", ("v", "img"))
    part = FilePart(cols, dt.date(2024, 1, 1), str(path), Storage(), str(tmp_path))
    row = file_counts(part).iloc[0]
    assert row["rows"] == 7 and row["date"] == "2024-01-01"
    assert row["nulls"] == 6                    # a null key, a null time, NaN and null in v, two null images
    assert row["outside_partition"] == 1        # the row timed on the next day; the one without a time is a null
    assert row["row_groups"] == 3
    # as Los Angeles counts dates (2024-01-01 runs 08:00 UTC to 08:00 UTC the next day): the five rows at 00:00 UTC
    # are the day before; the one at 00:00 UTC the next day is inside
    west = FilePart(cols, dt.date(2024, 1, 1), str(path), Storage(), str(tmp_path), "America/Los_Angeles")
    assert file_counts(west).iloc[0]["outside_partition"] == 5
    # the same rows timed in epoch milliseconds (`time_unit: ms`): the same counts; one more row whose count no
    # timestamp holds (a nanosecond time read as milliseconds) is outside its date, not a null
    millis = pa.array([None if t is None else t // 1000 for t in ts.cast(pa.int64()).to_pylist()], pa.int64())
    pq.write_table(table.set_column(1, "ts", millis), tmp_path / "ms.parquet", row_group_size=3)
    in_ms = Columns("process", ("m",), "ts", ("v", "img"), "ms")
    row = file_counts(FilePart(in_ms, dt.date(2024, 1, 1), str(tmp_path / "ms.parquet"), Storage(), str(tmp_path)))
    assert row.iloc[0][["rows", "nulls", "outside_partition", "row_groups"]].tolist() == [7, 6, 1, 3]
    far = pa.concat_tables([table.set_column(1, "ts", millis), table.slice(0, 1).set_column(1, "ts",
                                                                                           pa.array([2 ** 62]))])
    pq.write_table(far, tmp_path / "far.parquet")
    assert file_counts(FilePart(in_ms, dt.date(2024, 1, 1), str(tmp_path / "far.parquet"), Storage(),
                                str(tmp_path))).iloc[0][["rows", "nulls", "outside_partition"]].tolist() == [8, 6, 2]
    with pytest.raises(DataError, match=r"ms\.parquet.*time column 'ts' is int64, expected a timestamp"):
        file_counts(FilePart(cols, dt.date(2024, 1, 1), str(tmp_path / "ms.parquet"), Storage(), str(tmp_path)))
    key = key_rows(RowGroupsPart(FilePart(in_ms, dt.date(2024, 1, 1), str(tmp_path / "far.parquet"), Storage(),
                                          str(tmp_path)), (0,), 7))
    assert key["_us"].tolist() == [DAY + i * S for i in (0, 1, 3, 4)] + [DAY + 86_400 * S]  # no key, time, too far: out
    pq.write_table(table.set_column(1, "ts", pa.nulls(7)), tmp_path / "no_time.parquet")   # no time in the file
    row = file_counts(FilePart(cols, dt.date(2024, 1, 1), str(tmp_path / "no_time.parquet"), Storage(), str(tmp_path)))
    assert row.iloc[0][["rows", "nulls", "outside_partition"]].tolist() == [7, 12, 0]       # 7 times, 5 as before
    # the same times as ISO 8601 text (a CSV loaded as strings): the same counts; a text that is no time is a null
    iso = pa.array([None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in ts.to_pylist()][:-1] + ["?"])
    pq.write_table(table.set_column(1, "ts", iso), tmp_path / "iso.parquet", row_group_size=3)
    row = file_counts(FilePart(cols, dt.date(2024, 1, 1), str(tmp_path / "iso.parquet"), Storage(), str(tmp_path)))
    assert row.iloc[0][["rows", "nulls", "outside_partition", "row_groups"]].tolist() == [7, 6, 1, 3]
    number_time = table.set_column(1, "ts", pa.array([1.5] * 7))
    pq.write_table(number_time, tmp_path / "number.parquet")
    with pytest.raises(DataError, match=r"number\.parquet.*time column 'ts' is double"):
        file_counts(FilePart(cols, dt.date(2024, 1, 1), str(tmp_path / "number.parquet"), Storage(), str(tmp_path)))
    with pytest.raises(DataError, match=r"part\.parquet.*column 'w' not found"):
        file_counts(FilePart(Columns("process", ("m",), "ts", ("w",)), dt.date(2024, 1, 1), str(path), Storage(),
                             str(tmp_path)))


def test_profile_over_parquet_history_with_dask_on_ray(tmp_path, local_ray, caplog, capsys):
    spec = load_spec(write_synthetic(tmp_path, SyntheticConfig(entities=3, days=2, clean_days=2, image_size=16)))
    late = pa.table({"machine_id": ["pump-00", "pump-00"],
                     "ts": pa.array([1704153600000000 + 10] * 2, pa.timestamp("us", tz="UTC")),
                     "temperature": [40.0, None], "pressure": [3.0, 3.0]})
    pq.write_table(late, tmp_path / "raw" / "process" / "date=2024-01-01" / "late.parquet")   # misfiled rows
    # a day's vibration in two files of small row groups, each holding every entity: an entity's rows of the
    # day lie in several reads, which the shuffle must bring together
    folder = tmp_path / "raw" / "vibration" / "date=2024-01-01"
    day = pl.read_parquet(folder)
    for old in folder.iterdir():
        old.unlink()
    half = day.height // 2
    for i, piece in enumerate([day[:half], day[half:]]):
        pq.write_table(piece.to_arrow(), folder / f"part-{i}.parquet", row_group_size=5_000)

    partd_before = set(Path(tempfile.gettempdir()).glob("*.partd"))
    out = tmp_path / "profile.parquet"                             # through the CLI, as a user runs it
    assert main(["profile", str(tmp_path / "spec.yaml"), "--start", "2024-01-01", "--end", "2024-01-02",
                 "--out", str(out)]) == 0
    table = pl.read_parquet(out)
    assert "vibration" in capsys.readouterr().out
    assert set(table["modality"]) == {"process", "vibration", "camera", "logs"}
    assert table.height == 8 and table.columns[:2] == ["modality", "date"]
    proc = table.filter(pl.col("modality") == "process").sort("date")
    assert proc["outside_partition"].to_list() == [2, 0]
    assert proc["duplicate_keys"].to_list() == [1, 0] and proc["nulls"].to_list() == [1, 0]
    raw = pq.read_table(tmp_path / "raw" / "process" / "date=2024-01-02")
    assert proc["rows"].to_list()[1] == raw.num_rows

    # the vibration day: what the pure per-entity function gives on the whole day in one frame
    whole = entity_periods(day.select("machine_id", pl.col("ts").dt.epoch("us").alias("_us")), ["machine_id"])
    vib = table.filter((pl.col("modality") == "vibration") & (pl.col("date") == "2024-01-01")).row(0, named=True)
    assert vib["rows"] == day.height and vib["entities"] == 3 == whole.height
    assert vib["median_period_s"] == pytest.approx(whole["period_s"].median(), rel=1e-12)
    assert 0.8 < vib["median_period_s"] < 1.2 and vib["gaps"] == whole["gaps"].sum() > 0
    assert vib["duplicate_keys"] == whole["duplicate_keys"].sum()

    # more, smaller shuffled partitions: the same table
    with caplog.at_level(logging.INFO, logger="pipelines.profile"):
        small = profile(spec, dt.date(2024, 1, 1), dt.date(2024, 1, 2), partition_rows=100_000)
    assert re.search(r"profile: 10 files, 10 reads of row groups, ([2-9]|\d\d+) partitions", caplog.text)
    assert small.drop("median_period_s").equals(table.drop("median_period_s"))
    assert small["median_period_s"].to_list() == pytest.approx(table["median_period_s"].to_list(), rel=1e-12)
    # every shuffle moved its pieces as task results: no disk shuffle's partd folder (one worker's local disk,
    # unreadable from another node) left in the workers' temp folder
    assert set(Path(tempfile.gettempdir()).glob("*.partd")) == partd_before

    # a file whose time column holds no time (booleans): its path and the column named (raised from the task)
    bad = late.set_column(1, "ts", pa.array([True] * 2))
    pq.write_table(bad, tmp_path / "raw" / "process" / "date=2024-01-02" / "bad.parquet")
    with pytest.raises(DataError, match=r"date=2024-01-02/bad\.parquet.*time column 'ts' is bool"):
        profile(spec, dt.date(2024, 1, 1), dt.date(2024, 1, 2))
    assert main(["profile", str(tmp_path / "spec.yaml"), "--start", "2024-01-02", "--end", "2024-01-02"]) == 2
    assert re.search(r"error: .*bad\.parquet.*time column 'ts' is bool", capsys.readouterr().err)
