"""Profile: the per-day pandas function by hand, and the whole profile with Dask on the local Ray."""
import datetime as dt

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dmafn.spec import load_spec
from dmafn.synthetic import SyntheticConfig
from pipelines.generate import write_synthetic
from pipelines.profile import profile, profile_day


def test_profile_day_hand_computed():
    ts = pd.to_datetime(["2024-01-01 00:00:00", "2024-01-01 00:00:10", "2024-01-01 00:00:20",
                         "2024-01-01 00:01:20", "2024-01-01 00:01:20", "2024-01-02 00:00:05"], utc=True)
    day = pd.DataFrame({"m": ["a"] * 6, "ts": ts, "v": [1.0, None, 2.0, 3.0, 3.0, 4.0], "date": "2024-01-01"})
    row = profile_day(day, ["m"], "ts", "date", ["v"]).iloc[0]
    assert row["rows"] == 6 and row["entities"] == 1
    assert row["median_period_s"] == 10.0               # diffs 10, 10, 60, 0, 86325 -> median 10
    assert row["gaps"] == 2                              # 60 s and the jump into the next day
    assert row["nulls"] == 1 and row["duplicate_keys"] == 1 and row["outside_partition"] == 1


def test_profile_over_parquet_history_with_dask_on_ray(tmp_path, local_ray):
    spec = load_spec(write_synthetic(tmp_path, SyntheticConfig(entities=2, days=2, clean_days=2, image_size=16)))
    late = pa.table({"machine_id": ["pump-00"], "ts": pa.array([1704153600000000 + 10], pa.timestamp("us", tz="UTC")),
                     "temperature": [40.0], "pressure": [3.0]})
    pq.write_table(late, tmp_path / "raw" / "process" / "date=2024-01-01" / "late.parquet")   # misfiled row
    table = profile(spec, dt.date(2024, 1, 1), dt.date(2024, 1, 2))
    assert set(table["modality"]) == {"process", "vibration", "camera", "logs"}
    assert table.height == 8
    vib = table.filter(table["modality"] == "vibration").row(0, named=True)
    assert vib["entities"] == 2 and 0.8 < vib["median_period_s"] < 1.2 and vib["gaps"] > 0
    proc = table.filter(table["modality"] == "process").sort("date")
    assert proc["outside_partition"].to_list() == [1, 0]
