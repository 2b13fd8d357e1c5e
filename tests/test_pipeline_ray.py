"""The whole path on tiny data with a small local Ray: generate -> train (Ray Train, 2 workers) ->
score (a Ray task per shard) -> Delta Lake -> evaluate; idempotency, quarantine accounting, bad input."""
import datetime as dt
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmafn.spec import SmoothingSpec, load_spec
from dmafn.synthetic import SyntheticConfig
from pipelines.generate import write_synthetic
from pipelines.storage import DataError

DAY1, DAY2, DAY3 = dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.date(2024, 1, 3)
OUTPUT_COLUMNS = {"machine_id", "ts", "date", "score", "threshold", "is_anomaly", "score_process",
                  "score_vibration", "score_camera", "score_logs", "score_process_context", "modalities",
                  "model_version", "run_id", "scored_at", "channel_process", "channel_vibration", "channel_logs",
                  "cause"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_ray):
    from pipelines.train import train

    root = tmp_path_factory.mktemp("fleet")
    spec_path = write_synthetic(root, SyntheticConfig(entities=2, days=3, clean_days=2, image_size=16, seed=3))
    spec = load_spec(spec_path)
    spec = replace(spec, train=replace(spec.train, epochs=2, batch_size=128),  # vibration: chosen per channel
                   modalities={**spec.modalities, "vibration": replace(spec.modalities["vibration"], transform="auto")})
    # a few unusable rows on the scored day: they must be counted in quarantine, not lost
    # (and a row filed under 2024-01-03 but timed on 2024-01-04)
    bad = pa.table({"machine_id": ["pump-00", None, "pump-01"],
                    "ts": pa.array([int(1704240000e6), int(1704240060e6), int(1704328200e6)],
                                   pa.timestamp("us", tz="UTC")),
                    "temperature": [None, 50.0, 50.0], "pressure": [3.0, 3.0, 3.0]})
    pq.write_table(bad, root / "raw" / "process" / "date=2024-01-03" / "bad-rows.parquet")
    # a Hive-named data file on a training day: not read, and the warning is kept with the version
    (root / "raw" / "process" / "date=2024-01-01" / "000000_0").write_bytes(b"not read")
    progress = _ProgressLines()
    with progress:
        version = train(spec)
    TRAIN_PROGRESS.extend(progress.lines)
    return spec, version, root


TRAIN_PROGRESS: list[str] = []      # what the `trained` fixture's training said of its progress


class _ProgressLines(logging.Handler):
    """The progress lines `pipelines.progress` logs at INFO while in the `with` block."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "_ProgressLines":
        self.logger, self.level = logging.getLogger("pipelines"), logging.getLogger("pipelines").level
        logging.getLogger("pipelines.progress").addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("pipelines.progress").removeHandler(self)
        self.logger.setLevel(self.level)


def test_training_statistics_fitted_by_entity_bucket_are_the_one_process_fit(trained):
    """`fit_statistics` - the shards' tasks, a task per entity bucket, the buckets' rows joined - gives the
    statistics one `StatisticsFitter` gives over the same shards' rows in one process (to 1e-9: the buckets'
    relation totals are summed in another order), the per-entity parts as entity-file rows; the relations refitted
    on their typical ticks by a pass over the shards per refit as in one process."""
    from dmafn.features import StatisticsFitter, refit_relations_on_typical_ticks
    from pipelines.shards import bytes_by_date, list_inputs, plan_shards
    from pipelines.storage import Storage
    from pipelines.train import aligned_batches, fit_statistics, split_dates
    from tests.conftest import same_statistics

    spec, _, _ = trained
    storage = Storage.from_spec(spec.storage)
    train_days, _ = split_dates(spec)
    files = list_inputs(spec, train_days, storage)
    third = -(-max(bytes_by_date(files).values()) // 3)
    shards = plan_shards(spec, train_days, files, shard_bytes=third)            # three entity buckets
    statistics = fit_statistics(spec, shards, True).statistics
    rows = [aligned.to_arrow() for shard in shards for aligned in aligned_batches(shard, spec, storage)[0]]

    def in_one(before):                              # the same fit in one process, relations refitted as there
        one = StatisticsFitter(spec, before)
        for aligned in rows:
            one.add(aligned)
        return one.result()

    whole = refit_relations_on_typical_ticks(in_one(None), in_one, lambda s: s)
    assert len(shards) == 3 and statistics.keys() == ["pump-00", "pump-01"]
    assert "left_out" in statistics.fleet["relations"]["process_context"]         # refitted at least once
    assert statistics.table().num_rows == 2 and not statistics.fleet["modalities"]["process"]["entity"]
    same_statistics(whole, statistics.whole)


def test_known_incidents_are_left_out_of_the_training_and_validation_ticks(trained, tmp_path):
    """With labels inside the training window (`train.exclude_labelled`, on by default), each task of the
    statistics, the feature files and the calibration leaves out the ticks in a labelled interval of their
    entity or less than the longest modality reach after its end, and says how many; the feature files hold the
    others. The `trained` fixture's labels lie after its training window: its manifest counts none."""
    from pipelines.align import KnownIncidents, date_end_us, date_start_us
    from pipelines.entity_keys import unmatched_label_lines
    from pipelines.registry import Registry
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.statistics import BucketStatistics
    from pipelines.storage import Storage
    from pipelines.train import fit_calibration, fit_statistics, split_dates, write_training_features

    spec, version, root = trained
    manifest = json.loads((root / "models" / version / "manifest.json").read_text())
    assert manifest["metrics"]["labelled_left_out"] == {"train": 0, "validation": 0}
    utc = dt.timezone.utc
    labels = pl.DataFrame({"machine_id": ["pump-00", "pump-01"],          # an hour of each day, one pump each
                           "start_ts": [dt.datetime(2024, 1, 1, 6, tzinfo=utc), dt.datetime(2024, 1, 2, 9, tzinfo=utc)],
                           "end_ts": [dt.datetime(2024, 1, 1, 7, tzinfo=utc), dt.datetime(2024, 1, 2, 10, tzinfo=utc)]})
    incidents = KnownIncidents.of(labels, spec)
    after = incidents.after_us // spec.grain_us                 # the grains after an end still left out, plus one
    assert after == 6                                           # the camera's tolerance (6 min), the longest reach
    train_days, validation = split_dates(spec)
    shards = plan_shards(spec, train_days, list_inputs(spec, train_days, Storage()))
    statistics = fit_statistics(spec, shards, True, incidents).statistics
    buckets = BucketStatistics(statistics, True)
    kept, _, left, _, entities = write_training_features(spec, shards, buckets, None, str(tmp_path / "kept"),
                                                         incidents)[:5]
    every, _, none = write_training_features(spec, shards, buckets, None, str(tmp_path / "every"))[:3]
    assert none == 0 and left == sum(f.rows for f in every) - sum(f.rows for f in kept)
    # a labelled interval whose entity has no training tick - a key the input spells otherwise - is named (the
    # training key it is spelled like beside it), one outside the training days is not
    span = (date_start_us(train_days[0]), date_end_us(train_days[-1]))
    where = f"training days {train_days[0]}..{train_days[-1]}"
    assert unmatched_label_lines(incidents.index.started, spec, entities, span, where, "L") == []
    odd = pl.concat([labels, pl.DataFrame({"machine_id": ["PUMP-00", "pump-99", "pump-99"], "start_ts": [
        dt.datetime(2024, 1, 1, 8, tzinfo=utc), dt.datetime(2024, 1, 1, 1, tzinfo=utc), dt.datetime(2024, 1, 2, tzinfo=utc)],
        "end_ts": [dt.datetime(2024, 1, 1, 9, tzinfo=utc), dt.datetime(2024, 1, 1, 2, tzinfo=utc),
                   dt.datetime(2024, 1, 2, 1, tzinfo=utc)]})])
    assert unmatched_label_lines(KnownIncidents.of(odd, spec).index.started, spec, entities, span, where, "L") == [
        f"labels L: 2 labelled interval(s) in the {where} name an entity with no tick there: 'PUMP-00' (the input has "
        "'pump-00'), 'pump-99' - a label reaches its ticks by the exact key, so an incident whose machine the input "
        "spells otherwise is trained on as normal: write the labels' keys as the input does"]
    assert 55 <= left <= 61 + after - 1                         # the hour's ticks (ends included) and the reach after
    mv = Registry(spec.registry, Storage()).load(version)
    val_shards = plan_shards(spec, validation, list_inputs(spec, validation, Storage()))
    _, left_in_validation = fit_calibration(spec, mv.model, BucketStatistics(mv.statistics, True), val_shards, incidents)
    assert 55 <= left_in_validation <= 61 + after - 1


def test_training_leaves_validation_outliers_out_of_the_calibration(trained, caplog):
    """`train.validation_outlier_limit`: the calibration's shard tasks flag the validation ticks beyond the limit
    (and the evidence reach after them) and every later question reads the ticks kept; `dmafn train` logs how many
    and warns. The `trained` fixture's clean validation day keeps every tick at the default limit (its manifest
    says 0); a limit of 2 IQRs calls more than 1 % (and less than half) of it outliers."""
    from dataclasses import replace

    from pipelines.registry import Registry
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.statistics import BucketStatistics
    from pipelines.storage import Storage
    from pipelines.train import TrainingWarnings, fit_calibration, split_dates

    spec, version, root = trained
    manifest = json.loads((root / "models" / version / "manifest.json").read_text())
    assert manifest["metrics"]["validation_outliers_left_out"] == 0
    (kept,) = manifest["warnings"]                    # the data layer's warning on the driver, kept with the version
    # (once: the process table is listed once for the process and its context view, which reads the same files)
    assert "1 file(s) not named *.parquet are not read (000000_0)" in kept and "date=2024-01-01" in kept
    assert manifest["calibration"]["validation"]["validation_outliers_left_out"] == 0
    mv = Registry(spec.registry, Storage()).load(version)
    _, validation = split_dates(spec)
    val_shards = plan_shards(spec, validation, list_inputs(spec, validation, Storage()))
    strict = replace(spec, train=replace(spec.train, validation_outlier_limit=2.0))
    warned = TrainingWarnings()                       # what `train` keeps for the manifest, as it logs it
    with caplog.at_level(logging.INFO, logger="pipelines"), warned.capturing():
        calibration, _ = fit_calibration(strict, mv.model, BucketStatistics(mv.statistics, True), val_shards)
    left, kept = calibration.outliers_left_out, calibration.validation["validation_ticks"]
    assert 0.01 * (left + kept) < left < kept
    assert f"calibration: {left} of {left + kept} validation ticks left out as outliers" in caplog.text
    (line,) = warned.lines
    assert "left out of the calibration as outliers" in line and line in caplog.text


def test_training_says_how_far_each_pass_has_come(trained):
    """`dmafn train` shows the statistics pass (shards, then entity buckets), the feature files (shards, ticks),
    the epochs' batches and the calibration's validation shards as each goes, each ending at its total."""
    ends = {line.split(":")[0]: line for line in TRAIN_PROGRESS if "(100%)" in line}
    assert set(ends) >= {"statistics", "features", "training", "encoding densities", "calibration"}, TRAIN_PROGRESS
    assert "shards and buckets" in ends["statistics"] and "ticks" in ends["features"]
    assert "validation shards" in ends["calibration"] and "ticks" in ends["calibration"]


@pytest.fixture(scope="module")
def scored(trained):
    """DAY3 scored once into the fleet's output tables (the tests below read them)."""
    from pipelines.score import score_date

    spec, _, _ = trained
    return score_date(spec, DAY3)


def test_model_version_has_manifest_and_weights(trained):
    from pipelines.registry import Registry
    from pipelines.storage import Storage

    spec, version, root = trained
    folder = root / "models" / version
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (root / "models" / "LATEST").read_text() == version
    assert manifest["training_window"]["train_days"] == ["2024-01-01"]
    assert manifest["training_window"]["validation_days"] == ["2024-01-02"]
    assert set(manifest["statistics"]["modalities"]) == {"process", "vibration", "camera", "logs", "process_context"}
    relation = manifest["statistics"]["relations"]["process_context"]     # the generated spec's slow context
    assert relation["parent"] == "process" and len(relation["channels"]) == 2
    # per-entity parts live one row per entity beside the manifest, which keeps the fleet's
    assert relation["channels"][0]["entity_intercepts"] == {} and relation["ranges"]["fleet"]
    rows = pq.read_table(folder / "entity_statistics.parquet")
    assert rows.column("key").to_pylist() == ["pump-00", "pump-01"]
    assert manifest["entity_statistics"]["entities"] == 2
    intercepts = "relations/process_context/channels/0/entity_intercepts"    # a column per place, numbers as numbers
    assert rows.schema.field(intercepts).type == pa.float64() and rows.schema.metadata[b"dmafn.json_columns"] == b"[]"
    mv = Registry(str(root / "models"), Storage()).load(version, build=False)
    whole = mv.stats["relations"]["process_context"]
    assert set(whole["channels"][0]["entity_intercepts"]) == {"pump-00", "pump-01"}
    assert set(whole["ranges"]["entities"]) == {"pump-00", "pump-01"}
    one = mv.statistics.for_keys(["pump-01", "pump-09"])["relations"]["process_context"]   # an unknown key: left out
    assert set(one["channels"][0]["entity_intercepts"]) == {"pump-01"}
    assert one["ranges"]["fleet"] == relation["ranges"]["fleet"]
    vibration = manifest["statistics"]["modalities"]["vibration"]        # 'auto' chosen over the shards' trends
    assert vibration["channel_transforms"] == ["centered" if d > vibration["drift_limit"] else "level"
                                               for d in vibration["drift"]]
    assert "threshold" in manifest["calibration"] and manifest["metrics"]["epochs"] == 2
    import torch
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert any(k.startswith("encoders.vibration") for k in state)
    # the generated spec's camera weighs its encoding's distance: a Gaussian of the training ticks' encodings
    fitted, left_out = manifest["metrics"]["encoding_density_ticks"], manifest["metrics"]["encoding_density_left_out"]
    assert list(fitted) == ["camera"] and 0 < fitted["camera"] + left_out["camera"] <= manifest["metrics"]["train_ticks"]
    assert 0 <= left_out["camera"] <= fitted["camera"] // 20       # the second pass leaves out the first fit's atypical
    assert int(state["densities.camera.ticks"]) == fitted["camera"]
    assert torch.allclose(state["densities.camera.precision"], state["densities.camera.precision"].T, atol=1e-3)


def test_training_again_on_the_same_data_gives_the_same_model(trained, tmp_path, monkeypatch):
    """Same data, spec and seed -> bit-identical weights, statistics and threshold (shards merged in order, ordered
    features and a seeded shuffle); the driver reads no input row while training. The second training reads its
    files split by entity bucket (staged even for one bucket here: the same rows in the same order), and leaves
    no piece behind."""
    import torch

    import pipelines.train
    from pipelines.registry import Registry
    from pipelines.staging import Staging
    from pipelines.storage import Storage
    from pipelines.train import train

    spec, version, _ = trained
    _driver_must_not_touch_rows(monkeypatch)
    again = replace(spec, registry=str(tmp_path / "models"), score=replace(spec.score, output=str(tmp_path / "out")))
    runs = []

    def staging(*args, **kwargs):
        runs.append(Staging(*args, **kwargs, min_buckets=1))
        return runs[-1]

    monkeypatch.setattr(pipelines.train, "Staging", staging)
    first = Registry(spec.registry, Storage.from_spec(spec.storage)).load(version)
    second = Registry(again.registry, Storage.from_spec(spec.storage)).load(train(again))
    assert runs[0].submitted > 0 and list((tmp_path / "out_staging").glob("*")) == []
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.stats == second.stats and first.manifest["statistics"] == second.manifest["statistics"]
    assert first.manifest["calibration"] == second.manifest["calibration"]


def test_score_writes_delta_and_rescoring_leaves_one_copy(trained, scored):
    from pipelines.score import score_date

    spec, version, root = trained
    first = scored
    df = pl.read_delta(str(root / "scores"))
    assert set(df.columns) == OUTPUT_COLUMNS
    assert df.height == first.rows_scored == 2 * 1440 - first.rows_quarantined
    for m in ("process", "vibration"):            # the channel that drives each sensor table's or series' error
        named = df.filter(pl.col(f"score_{m}").is_not_null())[f"channel_{m}"]
        assert named.null_count() == 0 and set(named) <= set(spec.modalities[m].columns)
        assert df.filter(pl.col(f"score_{m}").is_null())[f"channel_{m}"].null_count() == \
            df[f"score_{m}"].null_count()
    # the logs: a window's latest line unseen in training, as its template (a clean day: few or none)
    lines = df.filter(pl.col("channel_logs").is_not_null())
    assert lines["score_logs"].null_count() == 0 and all(t == t.lower() for t in lines["channel_logs"])
    # the cause: at a tick over the threshold, a voting modality present there (never the process's context view)
    causes = df.filter(pl.col("cause").is_not_null())
    assert all(c in present and c != "process_context" for c, present in zip(causes["cause"], causes["modalities"]))
    assert df["model_version"].unique().to_list() == [version]
    assert df["date"].unique().to_list() == ["2024-01-03"]
    second = score_date(spec, DAY3)
    again = pl.read_delta(str(root / "scores"))
    assert again.height == df.height                              # idempotent: one copy of the date
    assert again["run_id"].unique().to_list() == [second_run(root)]
    assert second.ticks_in == second.rows_scored + second.rows_quarantined


def test_adding_a_modality_adds_its_column_and_old_rows_keep_null(trained, tmp_path):
    """Schema evolution end to end: a model without `logs` scores a date, then the spec gains `logs` and a
    model with it scores another date into the same table: `score_logs` appears, the old rows keep null."""
    from pipelines.score import score_date
    from pipelines.train import train

    spec, version, _ = trained
    out = str(tmp_path / "evolving")
    without_logs = replace(spec, modalities={k: v for k, v in spec.modalities.items() if k != "logs"},
                           registry=str(tmp_path / "models"), score=replace(spec.score, output=out),
                           train=replace(spec.train, epochs=1))
    train(without_logs)
    score_date(without_logs, DAY3)
    assert "score_logs" not in pl.read_delta(out).columns
    score_date(replace(spec, score=replace(spec.score, output=out)), DAY2, version=version)
    df = pl.read_delta(out)
    old, new = df.filter(pl.col("date") == DAY3.isoformat()), df.filter(pl.col("date") == DAY2.isoformat())
    assert old.height > 0 and old["score_logs"].null_count() == old.height
    assert new["score_logs"].null_count() < new.height
    assert set(df.columns) == OUTPUT_COLUMNS


def second_run(root):
    runs = pl.read_delta(str(root / "scores_runs")).sort("finished_at")
    return runs["run_id"][-1]


def test_quarantine_and_run_audit_account_for_every_tick(trained, scored):
    spec, _, root = trained
    q = pl.read_delta(str(root / "scores_quarantine")).filter(pl.col("date") == "2024-01-03")
    ingest = q.filter(pl.col("stage") == "ingest")
    assert sorted(ingest["reason"].to_list()) == ["null entity column 'machine_id'",
                                                  "timed outside its date partition 2024-01-03",
                                                  "unusable value in column 'temperature' (the row's other "
                                                  "columns used)"]     # its pressure kept
    runs = pl.read_delta(str(root / "scores_runs"))
    scored = pl.read_delta(str(root / "scores")).filter(pl.col("date") == "2024-01-03").height
    last = runs.sort("finished_at").row(-1, named=True)
    assert last["ticks_in"] == last["rows_scored"] + last["rows_quarantined"]
    assert last["rows_scored"] == scored and last["input_rows_quarantined"] == 3
    assert ingest["rows"].sum() == 3                              # each row counts for one input row
    held = sum(pq.read_metadata(p).num_rows for p in root.glob("raw/*/date=2024-01-03/*.parquet"))
    assert last["input_rows"] == held and last["input_rows_misplaced"] == 1     # the row timed on 2024-01-04
    assert json.loads(last["input_unusable_reasons"]) == {              # the others, by modality and reason
        f"{row['source']}: {row['reason']}": 1 for row in ingest.iter_rows(named=True)
        if not row["reason"].startswith("timed outside")}


def test_each_run_records_its_alarm_rate_and_how_much_of_the_day_scores_above_the_validation_median(trained, scored):
    """The runs table keeps a date's alarm rate beside the one the version expects (its validation days') and the
    share of its ticks above the version's validation median score, each counted from the rows written."""
    spec, version, root = trained
    manifest = json.loads((root / "models" / version / "manifest.json").read_text())
    validation = manifest["calibration"]["validation"]
    out = pl.read_delta(str(root / "scores")).filter(pl.col("date") == "2024-01-03")
    last = pl.read_delta(str(root / "scores_runs")).filter(pl.col("date") == "2024-01-03").sort("finished_at").row(
        -1, named=True)
    assert last["alarm_rate"] == pytest.approx(out["is_anomaly"].sum() / out.height)
    assert last["expected_alarm_rate"] == pytest.approx(validation["validation_alarm_rate"])
    with_score = out["score"].drop_nulls()
    share = (with_score > validation["validation_score_p50"]).sum() / with_score.len()
    assert 0 < last["above_validation_median"] < 1 and last["above_validation_median"] == pytest.approx(share)
    assert scored.above_validation_median == pytest.approx(share)
    assert last["unseen_entities"] == 0 and last["unseen_entity_alarm_rate"] is None     # both pumps trained
    assert last["entities"] == scored.entities == out["machine_id"].n_unique() == 2
    medians = validation["validation_contribution_p50"]
    assert set(medians) == set(spec.modalities) - {"process_context"}   # speaking through its relations, the
    #                                                                     context view has no contribution of its own
    for m, median in medians.items():
        ranked = out[f"score_{m}"].drop_nulls()
        if ranked.len():
            assert last[f"above_validation_median_{m}"] == pytest.approx((ranked > median).sum() / ranked.len())
            assert scored.modality_above[m] == pytest.approx(last[f"above_validation_median_{m}"])


def test_score_position_counts_the_ticks_above_the_validation_median_and_nothing_without_one():
    from dmafn.calibration import Calibration
    from pipelines.score import DateResult, unlike_validation_warning
    from pipelines.score_steps import score_position

    calibration = Calibration(("a",), {}, validation={"validation_score_p50": 1.0})
    score = pa.chunked_array([[0.5, 1.5, None, 2.0, 1.0]])
    assert score_position(score, calibration) == (4, 2)                 # a null score is not ranked; 1.0 is not above
    assert score_position(score, replace(calibration, validation={})) == (0, 0)    # a version without the median
    assert unlike_validation_warning(DateResult("2024-01-03", 5, 5, 0, 0, 0.0), "v1") is None
    assert unlike_validation_warning(DateResult("2024-01-03", 5, 5, 0, 0, 0.0, above_validation_median=0.75), "v1") \
        is None
    line = unlike_validation_warning(DateResult("2024-01-03", 5, 5, 0, 0, 0.0, above_validation_median=0.9), "v1")
    assert line.startswith("2024-01-03: 90% of its scored ticks score above model version v1's validation median")


def _edited_copy(trained, tmp_path, files: str, edit):
    """The `trained` fixture's spec reading a copy of its inputs whose files matching `files` (a glob under raw/)
    were rewritten as `edit(table)`, and writing to its own tables under `tmp_path`."""
    import shutil

    spec, _, root = trained
    raw = tmp_path / "raw"
    shutil.copytree(root / "raw", raw)
    for path in raw.glob(files):
        pq.write_table(edit(pq.read_table(path)), path)
    return replace(spec, modalities={name: replace(m, path=str(raw / Path(m.path).name))
                                     for name, m in spec.modalities.items()},
                   score=replace(spec.score, output=str(tmp_path / "scores"), runs=None, quarantine=None, staging=None))


def test_a_lake_partitioned_by_local_dates_scores_its_own_dates_with_timezone(trained, scored, tmp_path, caplog):
    """The fleet's inputs re-filed by New York's dates (a partition holds 05:00 UTC to 05:00 UTC the next day): with
    `timezone: America/New_York` a date's ticks are that local day's, none of its rows is quarantined as misplaced,
    the output's `date` is the local date and a tick settled in both runs scores as the UTC-partitioned run scored
    it; the same lake read as UTC dates loses every date's evening rows to quarantine, with a warning naming
    `timezone`."""
    from pipelines.align import date_end_us, date_start_us
    from pipelines.score import score_date

    spec, _, root = trained
    zone = "America/New_York"
    local = tmp_path / "raw"
    for path in (root / "raw").glob("*/date=*/*.parquet"):
        table = pl.from_arrow(pq.read_table(path))
        day = pl.col("ts").dt.replace_time_zone("UTC", non_existent="null") if table.schema["ts"].time_zone is None \
            else pl.col("ts")
        table = table.with_columns(day.dt.convert_time_zone(zone).dt.date().alias("_local"))
        for (d,), part in table.partition_by("_local", as_dict=True).items():
            folder = local / path.parent.parent.name / f"date={d}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(part.drop("_local").to_arrow(), folder / f"{path.parent.name}-{path.name}")
    spec_local = replace(spec, timezone=zone,
                         modalities={n: replace(m, path=str(local / Path(m.path).name)) for n, m in spec.modalities.items()},
                         score=replace(spec.score, output=str(tmp_path / "scores"), runs=None, quarantine=None,
                                       staging=None))
    result = score_date(spec_local, DAY2)
    assert result.ticks_in == result.rows_scored + result.rows_quarantined
    assert result.input_rows_misplaced == 0
    out = pl.read_delta(spec_local.score.output)
    start, end = date_start_us(DAY2, zone), date_end_us(DAY2, zone)
    assert out["date"].unique().to_list() == ["2024-01-02"] and out.height == result.rows_scored
    assert out["ts"].dt.epoch("us").min() >= start and out["ts"].dt.epoch("us").max() < end
    quarantine = pl.read_delta(spec_local.score.quarantine_path)
    assert not quarantine["reason"].str.contains("outside its date").any()
    # 02:00-05:00 UTC on 2024-01-03: settled in the UTC run of that date (from 00:00) and in this one (from 05:00)
    settled = (pl.col("ts") >= dt.datetime(2024, 1, 3, 2, tzinfo=dt.timezone.utc)) & (pl.col("ts") < pl.lit(end).cast(
        pl.Datetime("us", "UTC")))
    utc_run = pl.read_delta(str(root / "scores")).filter(settled).sort("machine_id", "ts")
    ours = out.filter(settled).sort("machine_id", "ts")
    assert ours.height == utc_run.height > 300
    assert ours.select("machine_id", "ts", "is_anomaly").equals(utc_run.select("machine_id", "ts", "is_anomaly"))
    assert (ours["score"] - utc_run["score"]).abs().max() < 1e-5

    caplog.set_level(logging.WARNING, logger="pipelines.score")
    as_utc = replace(spec_local, timezone="UTC", score=replace(spec_local.score, output=str(tmp_path / "utc")))
    wrong = score_date(as_utc, DAY2)
    assert wrong.input_rows_misplaced > 0.1 * wrong.input_rows > 0          # 19:00-24:00 local is the next UTC date
    assert re.search(r"2024-01-02: \d+ of its \d+ input rows .* timed outside their date partition, as the spec's "
                     r"timezone \(UTC\) counts dates.*\(set `timezone` to it\)", caplog.text)


def test_a_lake_laid_out_by_year_month_and_day_scores_as_the_date_partitioned_one(trained, scored, tmp_path):
    """The fleet's inputs moved from `date=YYYY-MM-DD` folders into `YYYY/MM/DD` ones (a stream's sink), one table
    further into hour folders: with `partition: "%Y/%m/%d"` a date reads the same rows - its look-back day's too - and
    scores tick for tick as before; the run records the same input files."""
    import shutil

    from pipelines.score import score_date

    spec, _, root = trained
    nested = tmp_path / "raw"
    for path in (root / "raw").glob("*/date=*/*.parquet"):
        day = dt.date.fromisoformat(path.parent.name.removeprefix("date="))
        folder = nested / path.parent.parent.name / day.strftime("%Y/%m/%d")
        if path.parent.parent.name == "logs":
            folder = folder / "hour=00"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    laid_out = replace(spec, partition="%Y/%m/%d",
                       modalities={n: replace(m, path=str(nested / Path(m.path).name))
                                   for n, m in spec.modalities.items()},
                       score=replace(spec.score, output=str(tmp_path / "scores"), runs=None, quarantine=None,
                                     staging=None))
    result = score_date(laid_out, DAY3)
    assert (result.ticks_in, result.input_rows, result.input_files) == (scored.ticks_in, scored.input_rows,
                                                                        scored.input_files)
    ours = pl.read_delta(laid_out.score.output).sort("machine_id", "ts")
    before = pl.read_delta(str(root / "scores")).filter(pl.col("date") == "2024-01-03").sort("machine_id", "ts")
    assert ours.select("machine_id", "ts", "is_anomaly", "score").equals(
        before.select("machine_id", "ts", "is_anomaly", "score"))


def test_a_lake_partitioned_by_arrival_scores_as_by_event_time_with_lateness(trained, scored, tmp_path):
    """Every row filed under the date it arrived, 45 minutes after its time (a stream's sink): each date's last
    45 minutes sit in the next date's partition. With `lateness: 1h` the date's scoring reads them from there (and
    finds nothing misplaced): 2024-01-03 scores tick for tick as the lake filed by event time scored it."""
    from pipelines.score import score_date

    spec, _, root = trained
    arrived = tmp_path / "raw"
    for path in (root / "raw").glob("*/date=*/*.parquet"):
        table = pl.from_arrow(pq.read_table(path))
        arrival = (pl.col("ts") + pl.duration(minutes=45)).dt.date()
        for (d,), part in table.with_columns(arrival.alias("_arrival")).partition_by("_arrival", as_dict=True).items():
            folder = arrived / path.parent.parent.name / f"date={d}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(part.drop("_arrival").to_arrow(), folder / f"{path.parent.name}-{path.name}")
    late = replace(spec, lateness_us=3_600_000_000,
                   modalities={n: replace(m, path=str(arrived / Path(m.path).name)) for n, m in spec.modalities.items()},
                   score=replace(spec.score, output=str(tmp_path / "scores"), runs=None, quarantine=None, staging=None))
    result = score_date(late, DAY3)
    assert result.input_rows_misplaced == 0 and result.ticks_in == scored.ticks_in
    ours = pl.read_delta(late.score.output).sort("machine_id", "ts")
    before = pl.read_delta(str(root / "scores")).filter(pl.col("date") == "2024-01-03").sort("machine_id", "ts")
    assert ours.select("machine_id", "ts", "is_anomaly").equals(before.select("machine_id", "ts", "is_anomaly"))
    for col in ("score", "score_process", "score_vibration", "score_camera", "score_logs"):
        assert (ours[col] - before[col]).abs().max() < 1e-5, col
    # two dates in one shard (the later partition its own, holding the earlier date's late rows) or one each: the
    # same rows, and each partition's unusable rows counted once
    from pipelines.score import backfill
    cuts = {}
    for days in (1, 2):
        out = replace(late, score=replace(late.score, output=str(tmp_path / f"cut{days}")))
        results = backfill(out, DAY2, DAY3, days_per_shard=days, parallel=1)
        cuts[days] = (pl.read_delta(out.score.output).sort("machine_id", "ts"),
                      [(r.ticks_in, r.rows_scored, r.input_rows, r.input_rows_quarantined,
                        r.input_rows_misplaced)
                       for r in results])
    assert cuts[1][1] == cuts[2][1] and cuts[1][1][1][:2] == (result.ticks_in, result.rows_scored)
    keys = ["machine_id", "ts", "is_anomaly"]
    assert cuts[1][0].select(keys).equals(cuts[2][0].select(keys))
    assert (cuts[1][0]["score"] - cuts[2][0]["score"]).abs().max() < 1e-5


def test_backfill_rescores_dates_whose_partitions_changed_since_they_were_scored(trained, scored, tmp_path, caplog,
                                                                                  capsys):
    """2024-01-03's process rows after noon are uploaded late, after the date was scored: `status` names the date, a
    re-run backfill rescores it (not 2024-01-02), and its rows are then those of the complete partition. A file of
    2024-01-02 rewritten with the same rows: `--skip-changed` leaves it and says so; without it the backfill reads its
    rows, finds them the same and records its new listing (status relisted) instead of rescoring it; a value of the
    file changed, 2024-01-02 is rescored and so is 2024-01-03, whose first ticks read it. `backfill --dry-run` names
    the dates it would score and why, and writes nothing."""
    import os

    import pyarrow.compute as pc

    from pipelines.score import backfill
    from pipelines.status import scoring_status
    from pipelines.storage import Storage

    spec, _, root = trained
    held = tmp_path / "held-back.parquet"

    def morning_only(table):
        noon = pa.scalar(int(1704283200e6), pa.timestamp("us", tz="UTC"))      # 2024-01-03 12:00
        pq.write_table(table.filter(pc.greater_equal(table["ts"], noon)), held)
        return table.filter(pc.less(table["ts"], noon))

    late = _edited_copy(trained, tmp_path, "process/date=2024-01-03/part-0.parquet", morning_only)
    first = backfill(late, DAY2, DAY3, parallel=1)
    assert [r.date for r in first] == ["2024-01-02", "2024-01-03"] and first[1].input_files == 5
    assert backfill(late, DAY2, DAY3, parallel=1) == []                # nothing changed: nothing rescored
    partition = Path(late.modalities["process"].path) / "date=2024-01-03"
    (partition / "late-upload.parquet").write_bytes(held.read_bytes())
    status = scoring_status(late, Storage(), today=DAY3, spec_path="spec.yaml")
    (problem,) = [p for p in status.problems if "partitions changed" in p]
    assert "2024-01-03 (process; 5 -> 6 files)" in problem and "2024-01-02" not in problem.split(" - ")[0]
    assert "dmafn backfill spec.yaml --start 2024-01-03 --end 2024-01-03" in problem
    assert status.facts["changed_input"] == [{"date": "2024-01-03", "modalities": ["process"], "files_then": 5,
                                              "files_now": 6}]
    # a dry run through the CLI says so, and writes nothing
    import yaml

    from jobs.cli import main

    runs_before = pl.read_delta(late.score.runs_path).height
    (tmp_path / "late.yaml").write_text(yaml.safe_dump(late.to_dict()))
    capsys.readouterr()
    assert main(["backfill", str(tmp_path / "late.yaml"), "--start", "2024-01-01", "--end", "2024-01-03",
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "a dry run, nothing is scored or written" in printed and \
        "to score: 1 date(s) not scored by" in printed and ": 2024-01-01\n" in printed
    assert "to score again: 1 date(s) whose partitions changed since it scored them: 2024-01-03 (process; 5 -> 6 " \
        "files) (the backfill first reads their partitions: a date whose rows are those it was scored from - files " \
        "rewritten by a compaction - is left as scored, with the dates after it)\n  left as scored: 1 date(s): " \
        "2024-01-02\n  input: " in printed
    assert pl.read_delta(late.score.runs_path).height == runs_before
    with caplog.at_level(logging.INFO, logger="pipelines.score"):
        again = backfill(late, DAY2, DAY3, parallel=1)
    assert [r.date for r in again] == ["2024-01-03"] and again[0].input_files == 6
    assert "rescoring 1 date(s) whose partitions changed since model" in caplog.text
    assert "skipping 1 date(s) already scored" in caplog.text
    ours = pl.read_delta(late.score.output).filter(pl.col("date") == "2024-01-03").sort("machine_id", "ts")
    complete = pl.read_delta(str(root / "scores")).filter(pl.col("date") == "2024-01-03").sort("machine_id", "ts")
    assert ours.select("machine_id", "ts", "is_anomaly").equals(complete.select("machine_id", "ts", "is_anomaly"))
    assert (ours["score_process"] - complete["score_process"]).abs().max() < 1e-5
    assert not [p for p in scoring_status(late, Storage(), today=DAY3).problems if "partitions changed" in p]
    # a file of 2024-01-02 rewritten with the same rows (another modification time, a compaction's): its rows are
    # compared and found the same - left as scored, the new listing recorded, status content
    rewritten = next((Path(late.modalities["vibration"].path) / "date=2024-01-02").glob("*.parquet"))
    stat = rewritten.stat()
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.score"):
        assert backfill(late, DAY2, DAY3, parallel=1, skip_changed=True) == []
    assert "1 date(s) changed since model" in caplog.text and "left as scored (--skip-changed): 2024-01-02 " \
        "(vibration; 4 -> 4 files)" in caplog.text
    assert [p for p in scoring_status(late, Storage(), today=DAY3).problems if "partitions changed" in p]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.score"):
        assert backfill(late, DAY2, DAY3, parallel=1) == []
    assert "1 date(s) whose files were rewritten since model" in caplog.text and "hold the same rows, left as " \
        "scored (their new listing recorded): 2024-01-02 (vibration; 4 -> 4 files)" in caplog.text
    runs = pl.read_delta(late.score.runs_path).sort("finished_at")
    assert runs.row(-1, named=True)["status"] == "relisted" and runs.row(-1, named=True)["date"] == "2024-01-02"
    assert not [p for p in scoring_status(late, Storage(), today=DAY3).problems if "partitions changed" in p]
    assert backfill(late, DAY2, DAY3, parallel=1) == []                 # compared with the new listing: no read
    # a value of that file changed: it and the date after it, whose first ticks read it, are rescored
    table = pq.read_table(rewritten)
    column = table.column_names.index(late.modalities["vibration"].columns[0])
    values = table.column(column).to_pylist()
    values[0] = values[0] + 1.0
    pq.write_table(table.set_column(column, table.field(column), pa.array(values, table.field(column).type)),
                   rewritten)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.score"):
        assert [r.date for r in backfill(late, DAY2, DAY3, parallel=1)] == ["2024-01-02", "2024-01-03"]
    assert "and 1 scored date(s) after them whose first ticks read them (2024-01-03)" in caplog.text


def test_a_modality_gone_dark_for_a_date_or_for_one_machine_is_warned_and_named_by_status(trained, tmp_path, caplog):
    """2024-01-03's camera partition missing and one pump's log lines gone since 2024-01-02: the date is scored
    around them and not silently - `score` warns that the camera had no usable row, the runs table records each
    modality's usable rows, share of ticks present and the entities without it, and `status` names both. A vibration
    channel dead (null) all that day is no modality gone: the vibration is scored with its other channels, its rows
    warned of as unusable in part."""
    import shutil

    import pyarrow.compute as pc

    from pipelines.score import backfill
    from pipelines.status import scoring_status
    from pipelines.storage import Storage

    quiet = _edited_copy(trained, tmp_path, "logs/date=2024-01-0[23]/*.parquet",
                         lambda table: table.filter(pc.not_equal(table["machine_id"], "pump-01")))
    shutil.rmtree(Path(quiet.modalities["camera"].path) / "date=2024-01-03")
    dead = quiet.modalities["vibration"].columns[1]
    for path in (Path(quiet.modalities["vibration"].path) / "date=2024-01-03").glob("*.parquet"):
        table = pq.read_table(path)
        i = table.column_names.index(dead)
        pq.write_table(table.set_column(i, table.field(i), pa.nulls(table.num_rows, table.field(i).type)), path)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        day2, day3 = backfill(quiet, DAY2, DAY3, parallel=1)
    assert day3.modality_rows["camera"] == 0 and min(day2.modality_rows.values()) > 0
    assert day3.modality_rows["vibration"] > 0 and day3.modality_present["vibration"] > 0.9
    assert "modality vibration" not in caplog.text and f"unusable value in column '{dead}'" in caplog.text
    assert set(day3.modality_rows) == {"process", "vibration", "camera", "logs"}      # no context view
    assert 0 < day3.modality_present["camera"] < 0.01         # its first minutes: the day before's last frame
    assert "2024-01-03: modality camera had no usable input row in the date's partitions" in caplog.text
    assert "2024-01-02: modality" not in caplog.text
    assert "logs" not in day2.without_modality                   # its first ticks read 2024-01-01's lines
    assert (day3.without_modality["logs"].entities, day3.without_modality["logs"].named) == (1, ["pump-01"])
    runs = pl.read_delta(quiet.score.runs_path).sort("date")
    assert runs["usable_rows_camera"].to_list()[1] == 0 and runs["entities_without_logs"].to_list() == [0, 1]
    assert json.loads(runs["keys_without_modality"][1]) == {"logs": ["pump-01"]}
    problems = scoring_status(quiet, Storage(), today=DAY3, spec_path="spec.yaml").problems
    assert any(p.startswith("modality 'camera' had no usable input row in the partitions of 1 recent date(s): "
                            "2024-01-03 - ") for p in problems), problems
    assert any(p.startswith("modality 'logs' was absent at every scored tick of 1 entity on 2024-01-03 against 0 on "
                            "2024-01-02 (among them pump-01)") for p in problems), problems


def test_a_day_whose_inputs_moved_is_warned_as_unlike_the_validation_days(trained, tmp_path, caplog):
    """The same fleet with every temperature 25 C higher and every pressure 5 bar higher (a recalibrated sensor,
    a new regime): nearly every tick scores above the version's validation median, and scoring says so."""
    import pyarrow.compute as pc

    from pipelines.score import UNLIKE_VALIDATION_SHARE, score_date

    def recalibrated(table):
        for name, by in (("temperature", 25.0), ("pressure", 5.0)):
            table = table.set_column(table.schema.get_field_index(name), name, pc.add(table.column(name), by))
        return table

    _, version, _ = trained
    moved_spec = _edited_copy(trained, tmp_path, "process/**/*.parquet", recalibrated)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        result = score_date(moved_spec, DAY3, version=version)
    assert result.above_validation_median > UNLIKE_VALIDATION_SHARE
    assert f"2024-01-03: {result.above_validation_median:.0%} of its scored ticks score above model version {version}" \
        in caplog.text
    runs = pl.read_delta(str(tmp_path / "scores_runs"))
    assert runs["above_validation_median"].to_list() == [pytest.approx(result.above_validation_median)]
    moved = max(result.modality_above, key=result.modality_above.get)
    assert moved == "process" and result.modality_above["process"] > 0.95           # the modality that moved
    assert f"(each modality's contribution above its validation median; process " in caplog.text


def test_modality_presence_counts_ticks_present_and_the_entities_a_modality_missed_at_every_tick():
    from pipelines.score_steps import entity_alarms, modality_presence

    out = pa.table({"site": ["a", "a", "b"], "machine": [1, 1, 2],
                    "modalities": [["proc", "cam"], ["proc"], ["proc"]], "is_anomaly": [False, True, True]})
    keys, modalities = ("site", "machine"), ["proc", "cam", "logs"]
    present, without = modality_presence(out, entity_alarms(out, keys, modalities), keys, modalities)
    assert present == {"proc": 3, "cam": 1, "logs": 0}
    assert "proc" not in without
    assert (without["cam"].entities, without["cam"].ticks, without["cam"].anomalies, without["cam"].named) == \
        (1, 1, 1, ["b|2"])
    assert (without["logs"].entities, without["logs"].ticks, without["logs"].named) == (2, 3, ["a|1", "b|2"])


def test_unseen_entities_are_counted_from_keys_the_statistics_hold_parts_of():
    from dmafn.features import entity_key, entity_keys
    from pipelines.score import DateResult, unseen_entities_warning
    from pipelines.score_steps import entity_alarms, unseen_entities
    from pipelines.shards import UnseenEntities

    stats = {"modalities": {"proc": {"entity": {"m-1": {}, "m-2": {}}}, "img": {"global": {}}},
             "relations": {"ctx": {"channels": [{"entity_intercepts": {"m-3": 0.1}}], "cross_channels": None}}}
    assert entity_keys(stats) == {"m-1", "m-2", "m-3"}
    assert entity_keys({"modalities": {"proc": {"global": {}}}}) == set()
    out = pa.table({"site": ["a", "a", "b", "a"], "machine": [1, 2, 9, 9], "is_anomaly": [True, False, True, False]})
    per_entity = entity_alarms(out, ("site", "machine"))
    keys = entity_key(per_entity.select("site", "machine").to_arrow(), ("site", "machine"))
    found = unseen_entities(per_entity, keys, {"a|1", "a|2"})                  # keys as `entity_key` writes them
    assert (found.entities, found.ticks, found.anomalies, found.named) == (2, 2, 1, ["a|9", "b|9"])
    assert unseen_entities(per_entity, keys, set()) is None                    # no per-entity statistics: no fallback
    both = found.add(UnseenEntities(1, 2, 0, ["a|3"]))                       # another shard of the date
    assert unseen_entities_warning(DateResult("2024-01-03", 4, 4, 0, 2, 0.0, unseen=both), "v1") == (
        "2024-01-03: 3 entities not in model version v1's training data (a|3, a|9, b|9; 4 ticks, 25.0% of them "
        "alarmed) were scored by the fleet's statistics, not their own: expect more alarms from them until they are "
        "enrolled (dmafn enroll, --start/--end over days that hold them) or a version is trained on such days")


def test_an_entity_new_since_training_is_named_counted_and_recorded(trained, tmp_path, caplog):
    """A machine that joined the fleet after the training days (here pump-01's data under a new key) scores by
    the fleet's statistics: scoring names it with its ticks and alarm rate, and the runs table counts it."""
    from pipelines.score import score_date

    def renamed(table):
        keys = pa.array(["pump-09" if k == "pump-01" else k for k in table.column("machine_id").to_pylist()],
                        table.schema.field("machine_id").type)
        return table.set_column(table.schema.get_field_index("machine_id"), "machine_id", keys)

    _, version, _ = trained
    moved = _edited_copy(trained, tmp_path, "*/date=2024-01-03/*.parquet", renamed)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        result = score_date(moved, DAY3, version=version)
    out = pl.read_delta(str(tmp_path / "scores")).filter(pl.col("machine_id") == "pump-09")
    assert (result.unseen.entities, result.unseen.named) == (1, ["pump-09"])
    assert (result.unseen.ticks, result.unseen.anomalies) == (out.height, out["is_anomaly"].sum()) and out.height
    assert f"2024-01-03: 1 entity not in model version {version}'s training data (pump-09; {out.height} ticks" \
        in caplog.text
    runs = pl.read_delta(str(tmp_path / "scores_runs"))
    assert runs["unseen_entities"].to_list() == [1]
    assert runs["unseen_entity_alarm_rate"].to_list() == [pytest.approx(out["is_anomaly"].mean())]
    assert result.unseen.respelled == 0 and result.unmet_keys == []     # a new machine, not a key written otherwise


def test_frames_of_a_size_the_version_never_trained_on_are_counted_warned_and_recorded(trained, scored, tmp_path,
                                                                                       caplog):
    """The version keeps its training frames' sizes (`input_payload_formats`); the camera sending half-size frames on
    the scored day is warned of (they are resized and scored all the same) and recorded in the runs table; the
    fleet's own frames are no warning (the `scored` run). An audio modality's lines speak of clips and rates."""
    import io

    from PIL import Image

    from pipelines.registry import Registry
    from pipelines.score import new_payload_formats, new_payload_formats_lines, score_date
    from pipelines.storage import Storage

    spec, version, _ = trained
    manifest = Registry(spec.registry, Storage()).load(version).manifest
    assert manifest["input_payload_formats"].keys() == {"camera"}
    assert list(manifest["input_payload_formats"]["camera"]) == ["16x16"]
    assert list(scored.payload_formats["camera"]) == ["16x16"] and scored.new_payload_formats == {}

    def halved(table):
        out = []
        for frame in table.column("frame").to_pylist():
            buf = io.BytesIO()
            Image.open(io.BytesIO(frame)).resize((8, 8)).save(buf, "PNG")
            out.append(buf.getvalue())
        return table.set_column(table.schema.get_field_index("frame"), "frame", pa.array(out, pa.binary()))

    moved = _edited_copy(trained, tmp_path, "camera/date=2024-01-03/*.parquet", halved)
    moved = replace(moved, score=replace(moved.score, runs=str(tmp_path / "runs")))
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        result = score_date(moved, DAY3)
    frames = result.payload_formats["camera"]["8x8"]
    assert result.payload_formats == result.new_payload_formats == {"camera": {"8x8": frames}}
    assert f"2024-01-03: modality 'camera': {frames} of its {frames} frames (100%) are of a size or colour model " \
        f"version {version}'s training frames (almost) never had: 8x8 ({frames})" in caplog.text
    runs = pl.read_delta(str(tmp_path / "runs"))
    assert runs["new_payload_formats"].to_list() == [f'{{"camera": {{"8x8": {frames}}}}}']
    assert new_payload_formats({"camera": {"16x16": 9}}, manifest) == {} and new_payload_formats({}, {}) is None
    odd = {"input_payload_formats": {"camera": {"16x16": 995, "8x8": 5}}}     # a few odd training frames: not known
    assert new_payload_formats({"camera": {"8x8": 7, "16x16": 1}}, odd) == {"camera": {"8x8": 7}}
    kinds = {"camera": "image", "mic": "audio"}
    few = replace(result, new_payload_formats={"camera": {"8x8": 1}},
                  payload_formats={"camera": {"8x8": 1, "16x16": 199}})
    assert new_payload_formats_lines(few, version, kinds) == []
    (line,) = new_payload_formats_lines(replace(result, new_payload_formats={"mic": {"8000 Hz": 50}},
                                                payload_formats={"mic": {"8000 Hz": 50, "16000 Hz": 50}}), "v", kinds)
    assert line.startswith("2024-01-03: modality 'mic': 50 of its 100 clips (50%) are of a sample rate or length model "
                           "version v's training clips (almost) never had: 8000 Hz (50) - a microphone replaced or "
                           "reconfigured? They were resampled to the modality's sample_rate (WAV) or read as at it "
                           "(lists) and scored")
    lists = {"input_payload_formats": {"camera": {"16x16": 9}, "mic": {"4000 samples": 90}}}   # clips as lists
    assert new_payload_formats({"mic": {"2000 samples": 5, "4000 samples": 5}}, lists) == {"mic": {"2000 samples": 5}}
    before = {"input_payload_formats": {"camera": {"16x16": 9}}}       # lists' lengths not yet counted: not compared
    assert new_payload_formats({"mic": {"2000 samples": 5}, "camera": {"16x16": 1}}, before) == {}
    # the grey camera's frames sent with colour: new to this version; a version trained before they were counted
    # apart (no `input_payload_formats_colour`) recorded a colour camera's frames by size alone, so reads them so
    assert manifest["input_payload_formats_colour"] is True
    assert new_payload_formats({"camera": {"16x16 colour": 9}}, manifest) == {"camera": {"16x16 colour": 9}}
    assert new_payload_formats({"camera": {"16x16 colour": 9, "16x16": 1}}, before) == {}
    assert new_payload_formats({"camera": {"8x8 colour": 2, "16x16": 1}}, before) == {"camera": {"8x8": 2}}


def test_rows_at_another_interval_than_on_every_training_day_are_warned_and_recorded(trained, scored, tmp_path,
                                                                                      caplog):
    """The version keeps its tabular and time-series entities' training days per median row interval
    (`input_row_intervals`); vibration thinned to every fourth reading for one pump on the scored day is warned of
    (still scored) and recorded in the runs table; the fleet's own rows are no warning (the `scored` run)."""
    from pipelines.registry import Registry
    from pipelines.score import score_date
    from pipelines.storage import Storage

    spec, version, _ = trained
    manifest = Registry(spec.registry, Storage()).load(version).manifest
    assert manifest["input_row_intervals"].keys() == {"process", "vibration", "camera"}   # not the context view, logs
    assert manifest["input_row_intervals"]["vibration"].keys() == {"pump-00", "pump-01"}
    assert scored.changed_intervals == {} and scored.row_intervals == {}       # compared, then let go
    (bin_, days), = manifest["input_row_intervals"]["vibration"]["pump-00"].items()
    before = 2 ** (int(bin_) / 32)

    def thinned(table):
        keep = [k != "pump-00" or i % 4 == 0 for i, k in enumerate(table.column("machine_id").to_pylist())]
        return table.filter(pa.array(keep))

    moved = _edited_copy(trained, tmp_path, "vibration/date=2024-01-03/*.parquet", thinned)
    moved = replace(moved, score=replace(moved.score, runs=str(tmp_path / "runs")))
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        result = score_date(moved, DAY3)
    (entity, now, trained_us), = result.changed_intervals["vibration"]["first"]
    assert 3.5 * before < now < 4.5 * before and result.rows_scored == scored.rows_scored and days == 1
    assert (entity, result.changed_intervals["vibration"]["changed"],
            result.changed_intervals["vibration"]["compared"]) == ("pump-00", 1, 2)
    assert trained_us == round(before) and result.changed_intervals.keys() == {"vibration"}
    assert f"2024-01-03: modality 'vibration': 1 of its 2 entities' readings came at another interval than on any " \
        f"of model version {version}'s training days (the median between consecutive readings): pump-00 every " in \
        caplog.text
    runs = pl.read_delta(str(tmp_path / "runs"))
    assert json.loads(runs["changed_row_intervals"][0]) == result.changed_intervals


def test_a_damaged_row_group_fails_the_date_or_with_unreadable_files_skip_is_left_out_and_recorded(trained, scored,
                                                                                                    tmp_path, caplog):
    """The scored day's process rows rewritten with page checksums in row groups of 200 rows, one of whose pages is
    then damaged: the date fails naming file, row group and column; with `unreadable_files: skip` it is scored from
    the other row groups, the row group's rows counted unusable in the runs table and warned of."""
    from pipelines.score import score_date

    spec, _, root = trained
    moved = _edited_copy(trained, tmp_path, "process/date=2024-01-03/*.parquet", lambda table: table)
    path = max((tmp_path / "raw" / "process" / "date=2024-01-03").glob("*.parquet"), key=lambda p: p.stat().st_size)
    pq.write_table(pq.read_table(path), path, write_page_checksum=True, row_group_size=200, compression="none")
    meta = pq.ParquetFile(path).metadata
    rows = meta.row_group(1).num_rows
    chunk = next(meta.row_group(1).column(j) for j in range(meta.num_columns)
                 if meta.row_group(1).column(j).path_in_schema == "pressure")
    data = bytearray(path.read_bytes())
    at = (chunk.dictionary_page_offset or chunk.data_page_offset) + 40
    data[at:at + 8] = bytes(b ^ 0x5A for b in data[at:at + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path.name}: not a readable Parquet file \(row group 1, column 'pressure'"):
        score_date(moved, DAY3)
    skip = replace(moved, unreadable_files="skip", score=replace(moved.score, runs=str(tmp_path / "runs")))
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        result = score_date(skip, DAY3)
    assert result.unusable_reasons["process: damaged Parquet pages"] == rows and result.rows_scored
    assert result.input_rows == scored.input_rows
    assert f"2024-01-03: {rows} input row(s) sat in row groups whose pages do not decode (damaged in storage)" in \
        caplog.text
    runs = pl.read_delta(str(tmp_path / "runs"))
    assert json.loads(runs["input_unusable_reasons"][0])["process: damaged Parquet pages"] == rows


def test_a_table_whose_keys_are_respelled_after_training_is_named_at_scoring(trained, tmp_path, caplog):
    """The camera's table writes its keys upper-cased from the scored day on: its machines score as new ones, named
    with the trained keys they are spelled like, and the date warns that those keys' modalities never meet."""
    from pipelines.score import score_date

    def upper(table):
        keys = pa.array([k.upper() for k in table.column("machine_id").to_pylist()])
        return table.set_column(table.schema.get_field_index("machine_id"), "machine_id", keys)

    moved = _edited_copy(trained, tmp_path, "camera/date=2024-01-03/*.parquet", upper)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        result = score_date(moved, DAY3)
    assert result.unseen.respelled_named == [("PUMP-00", "pump-00"), ("PUMP-01", "pump-01")]
    (line,) = result.unmet_keys
    assert "'PUMP-00' (camera) and 'pump-00' (" in line and "scored ticks of 2024-01-03" in line
    assert f"2024-01-03: {line}" in caplog.text and "'PUMP-01' as 'pump-01'" in caplog.text


def test_enrolling_an_entity_new_since_training_makes_it_score_as_its_twin(trained, tmp_path):
    """pump-01's rows on every day also under a new key, pump-09 (a machine like pump-01 that joined the fleet later):
    the version scores pump-09 by the fleet's statistics. Enrolled over the training day, it gets statistics of its
    own - fitted from the same rows as pump-01's, under the version's fleet part - and its row intervals, and scores
    as pump-01 does; the new version keeps the weights, the fleet's statistics, the calibration and the other
    entities' rows and intervals."""
    import hashlib
    import shutil

    from pipelines.enroll import enroll, enrolment_lines
    from pipelines.registry import Registry, version_facts
    from pipelines.score import score_date
    from pipelines.storage import Storage

    def twinned(table):
        twin = table.filter(pa.compute.equal(table.column("machine_id"), "pump-01"))
        keys = pa.array(["pump-09"] * twin.num_rows, table.schema.field("machine_id").type)
        return pa.concat_tables([table, twin.set_column(twin.schema.get_field_index("machine_id"), "machine_id", keys)])

    spec, version, _ = trained
    moved = _edited_copy(trained, tmp_path, "*/date=*/*.parquet", twinned)
    shutil.copytree(spec.registry, tmp_path / "models")          # enrolling saves a version and moves LATEST
    moved = replace(moved, registry=str(tmp_path / "models"))
    before = score_date(moved, DAY3, version=version)
    assert (before.unseen.entities, before.unseen.named) == (1, ["pump-09"])
    assert _twin_gap(tmp_path / "scores", version)[0] > 0.01                    # by the fleet's statistics

    enrolment = enroll(moved, DAY1, DAY1, version=version)
    assert (enrolment.from_version, enrolment.entities, enrolment.named, enrolment.already_held) == \
        (version, 1, ["pump-09"], 2)
    registry = Registry(moved.registry, Storage())
    assert registry.latest() == enrolment.version
    old, new = registry.load(version, build=False), registry.load(enrolment.version, build=False)
    assert hashlib.sha256(new.weights).digest() == hashlib.sha256(old.weights).digest()
    assert new.manifest["calibration"] == old.manifest["calibration"]
    assert new.statistics.fleet == old.statistics.fleet
    assert new.statistics.keys() == ["pump-00", "pump-01", "pump-09"]
    held = old.statistics.for_keys(["pump-00", "pump-01"])
    assert new.statistics.for_keys(["pump-00", "pump-01"]) == held                 # theirs as they were
    own = new.statistics.for_keys(["pump-09"])["relations"]["process_context"]["channels"][0]["entity_intercepts"]
    assert own["pump-09"] == pytest.approx(held["relations"]["process_context"]["channels"][0]["entity_intercepts"]
                                           ["pump-01"], abs=1e-6)
    assert new.manifest["enrolled"][0]["named"] == ["pump-09"]
    for m, entities in new.manifest["input_row_intervals"].items():   # its row intervals too, theirs kept
        assert entities == {**old.manifest["input_row_intervals"][m], "pump-09": entities["pump-09"]}
    assert new.manifest["input_row_intervals"]["vibration"]["pump-09"] == {
        b: 1 for b in old.manifest["input_row_intervals"]["vibration"]["pump-01"]}      # one enrolment day
    facts = version_facts(moved, Storage(), [enrolment.version])[enrolment.version]
    assert (facts["entities"], facts["enrolled"], facts["enrolled_into"]) == (3, 1, version)
    assert enrolment_lines(enrolment, DAY1, DAY1)[0].startswith(
        f"model version {enrolment.version}: model version {version} with 1 entity enrolled from "
        "2024-01-01..2024-01-01 "
        "(pump-09); its weights, fleet statistics and calibration are")

    after = score_date(moved, DAY3, version=None)                # LATEST: the version with pump-09 enrolled
    assert after.unseen is None or after.unseen.entities == 0
    assert _twin_gap(tmp_path / "scores", enrolment.version) == (pytest.approx(0, abs=1e-4), True)
    again = enroll(moved, DAY1, DAY1)                            # nothing new to LATEST: nothing saved
    assert again.version is None and again.already_held == 3 and registry.latest() == enrolment.version
    assert enrolment_lines(again, DAY1, DAY1) == [
        f"no entity of 2024-01-01..2024-01-01 is new to model version {enrolment.version} (3 held already): "
        "nothing saved"]
    _promote_and_roll_back(moved, tmp_path, version, enrolment.version)


def test_recalibrate_refits_the_threshold_and_smoothing_with_the_specs_without_training(trained, tmp_path, capsys,
                                                                                         caplog):
    """The same settings on the version's validation days give its calibration to the digit (a candidate: LATEST
    stays); the spec's threshold and smoothing edited, `dmafn recalibrate` saves a version with the same weights and
    statistics whose threshold alarms as the new rule says, and whose spec no longer differs from the spec."""
    import hashlib
    import shutil

    import yaml

    from dmafn.spec import reading_differences
    from jobs.cli import main
    from pipelines.recalibrate import recalibrate, recalibration_lines
    from pipelines.registry import Registry
    from pipelines.storage import Storage

    spec, version, _ = trained
    shutil.copytree(spec.registry, tmp_path / "models")
    spec = replace(spec, registry=str(tmp_path / "models"))
    registry = Registry(spec.registry, Storage())
    same = recalibrate(spec, promote=False)
    old, again = registry.load(version, build=False), registry.load(same.version, build=False)
    assert registry.latest() == version and same.from_version == version and same.days == \
        old.manifest["training_window"]["validation_days"]
    assert again.manifest["calibration"] == old.manifest["calibration"]
    assert hashlib.sha256(again.weights).digest() == hashlib.sha256(old.weights).digest()
    assert again.statistics.table().equals(old.statistics.table())
    assert "Not promoted: LATEST is unchanged" in recalibration_lines(same)[0]

    edited = replace(spec, score=replace(spec.score, threshold=replace(spec.score.threshold, method="quantile",
                                                                       quantile=0.9),
                                         smoothing=replace(spec.score.smoothing, alpha=0.6)))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(edited.to_dict()))
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert main(["recalibrate", str(path)]) == 0
    out = capsys.readouterr().out
    new = registry.load(registry.latest(), build=False)
    assert re.search(rf"model version {new.version}: model version {version} recalibrated on \S+ \([\d,]+ ticks\): "
                     r"threshold pot risk [\d.e-]+ level 0.98 -> quantile 0.9, [\d.]+ -> [\d.]+; "
                     r"smoothing ewma alpha [\d.]+( knee [\d.]+)? -> ewma alpha 0.6( knee [\d.]+)?; "
                     r"expected alarm rate [\d.]+% -> 10.\d+%.*LATEST -> ", out), out
    assert not [r for r in caplog.records if "differs from model version" in r.getMessage()]   # what it adopts
    assert new.calibration.threshold_method == "quantile" and new.calibration.smoothing.alpha == 0.6
    assert new.calibration.expected_alarm_rate == pytest.approx(0.1, abs=0.01)
    assert reading_differences(new.spec, edited) == [] and new.manifest["recalibrated"][0]["from_version"] == version
    assert hashlib.sha256(new.weights).digest() == hashlib.sha256(old.weights).digest()
    assert main(["recalibrate", str(path), "--start", "2024-01-02"]) == 2
    assert "give both --start and --end" in capsys.readouterr().err
    gone = replace(edited, modalities={k: replace(m, path=str(tmp_path / "aged-out" / k))
                                       for k, m in edited.modalities.items()})
    for m in gone.modalities.values():                         # the tables are there, their old partitions not
        Path(m.path).mkdir(parents=True, exist_ok=True)
    with pytest.raises(DataError, match=rf": the validation days of model version {new.version}; "
                                        r"recalibrate on later days that hold data \(--start D --end D\)"):
        recalibrate(gone)


def _promote_and_roll_back(spec, tmp_path, trained_version: str, enrolled_version: str):
    """`dmafn promote` rolls LATEST back to the trained version and forward again; a version that does not load, or
    that the spec cannot score, leaves LATEST as it was; `--no-promote` saves a candidate that status names."""
    import yaml

    from jobs.cli import main
    from pipelines.enroll import enroll, enrolment_lines
    from pipelines.registry import Registry
    from pipelines.status import scoring_status
    from pipelines.storage import Storage

    registry = Registry(spec.registry, Storage())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert main(["promote", str(path), trained_version]) == 0
    assert registry.latest() == trained_version
    assert scoring_status(spec, Storage()).facts["newer_than_latest"] == [enrolled_version]
    before, mv = registry.promote(enrolled_version)                  # and forward again
    assert (before, mv.version, registry.latest()) == (trained_version, enrolled_version, enrolled_version)
    assert main(["promote", str(path), "no-such-version"]) == 2 and registry.latest() == enrolled_version

    def refuse(version):
        raise DataError(f"model version {version.version} reads a modality the spec lacks")

    with pytest.raises(DataError, match="reads a modality the spec lacks"):
        registry.promote(trained_version, check=refuse)
    assert registry.latest() == enrolled_version
    registry.promote(trained_version)
    candidate = enroll(spec, DAY1, DAY1, promote=False)              # pump-09 is new to the trained version again
    assert (candidate.version is not None, candidate.promoted, registry.latest()) == (True, False, trained_version)
    assert "Not promoted: LATEST is unchanged" in enrolment_lines(candidate, DAY1, DAY1)[0]
    assert scoring_status(spec, Storage()).facts["newer_than_latest"] == [enrolled_version, candidate.version]


def _twin_gap(scores: Path, version: str) -> tuple[float, bool]:
    """The largest difference between pump-09's and pump-01's scores by `version` (their ticks in time order), and
    whether they alarmed on the same ticks."""
    out = pl.read_delta(str(scores)).filter(pl.col("model_version") == version)
    twin, original = (out.filter(pl.col("machine_id") == k).sort("ts") for k in ("pump-09", "pump-01"))
    assert twin.height == original.height > 0
    same_alarms = twin["is_anomaly"].to_list() == original["is_anomaly"].to_list()
    return (twin["score"] - original["score"]).abs().max(), same_alarms


def test_evaluate_reports_metrics_and_plot(trained, scored, tmp_path, capsys):
    from pipelines.evaluate import evaluate, format_table

    spec, _, _ = trained
    result = evaluate(spec, start=DAY3, end=DAY3, report_dir=str(tmp_path), min_ticks=(30, 4))
    assert {"fused", "score_process", "score_vibration"} <= set(result["overall"])
    assert result["anomalous_ticks"] > 0
    # the report's ROC-AUC is the one of the Delta table's scores against the labels, and ranks the anomalies
    from dmafn.metrics import roc_auc
    from pipelines.align import label_ticks, to_micros
    from pipelines.labels import read_labels
    from pipelines.storage import Storage

    table = pl.read_delta(spec.score.output).filter(pl.col("date") == DAY3.isoformat())
    labelled = label_ticks(table.with_columns(to_micros(pl.col("ts")).alias("_t")), read_labels(spec, Storage()),
                           spec, spec.labels.start, spec.labels.end)
    expected = roc_auc(labelled["score"].to_numpy(), labelled["label"].to_numpy())
    assert result["overall"]["fused"]["roc_auc"] == pytest.approx(expected) and expected > 0.7
    assert (tmp_path / "scores.png").stat().st_size > 10_000
    fused = result["overall"]["fused"]
    assert fused["oracle_f1"] >= fused["f1"]            # the oracle may pick the calibrated threshold too
    out = capsys.readouterr().out
    assert "ROC-AUC" in out and "oracle (threshold chosen with the labels, not deployable)" in out
    # event-wise again when only alarm events of N ticks or more count (`dmafn alarms --min-ticks N`)
    ladder = fused["event_by_min_ticks"]
    assert list(ladder) == ["1", "2", "3", "4", "5", "10", "30"]          # with the N asked for, in order
    assert "only alarm events of N ticks or more count" in out
    assert (ladder["1"]["event_precision"], ladder["1"]["event_recall"]) == (fused["event_precision"],
                                                                             fused["event_recall"])
    steps = list(ladder.values())
    assert all(a["alarm_events"] >= b["alarm_events"] and a["events_caught"] >= b["events_caught"]
               for a, b in zip(steps, steps[1:]))
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["fused"]["event_by_min_ticks"] == ladder
    # the false-alarm rate of these dates against the one the model version expects from its validation days
    _, version, _ = trained
    assert result["false_alarm_rate"] == pytest.approx(fused["far"])
    manifest = json.loads((Path(spec.registry) / version / "manifest.json").read_text())
    assert result["expected_false_alarm_rate"] == {version: manifest["calibration"]["validation"]["validation_alarm_rate"]}
    assert f"false alarms on {100 * fused['far']:.2f} % of the ticks labelled normal, expected" in out
    assert result["validation_outliers_left_out"] == {version: 0} and "left out of its calibration" not in out
    said = format_table({**result, "validation_outliers_left_out": {version: 57}})
    assert f"model version {version}: 57 validation ticks were left out of its calibration as outliers" in said
    from pipelines.report import _metrics_section        # the report page's row, only when some were
    assert "as outliers" not in _metrics_section(result)
    assert f"validation ticks left out as outliers (calibration of {version})" in _metrics_section(
        {**result, "validation_outliers_left_out": {version: 57}})


REPORT_CHECK = """({
  sections: [...document.querySelectorAll('section')].map(s => s.id),
  curves: [...document.querySelectorAll('#roc polyline, #pr polyline')].length,
  timelines: [...document.querySelectorAll('figure.timeline')].map(f => f.dataset.entity),
  timelineLines: document.querySelectorAll('figure.timeline polyline').length,
  thresholds: document.querySelectorAll('figure.timeline .threshold').length,
  labelSpans: document.querySelectorAll('figure.timeline .label-span').length,
  alarms: document.querySelectorAll('figure.timeline .alarm').length,
  rows: Object.fromEntries([...document.querySelectorAll('table[id]')].map(t => [t.id, t.tBodies[0].rows.length])),
  width: document.documentElement.scrollWidth,
  timelinesChosen: document.querySelector('#timelines p').textContent,
  runsOnOneLine: [...document.querySelectorAll('#runs-table tbody td')]
    .every(td => td.clientHeight < 2 * parseFloat(getComputedStyle(td).lineHeight)),
  legendsMatch: [...document.querySelectorAll('#roc, #pr')].map(f => {
    const lines = [...f.querySelectorAll('polyline')].map(p => getComputedStyle(p).stroke);
    const keys = [...f.querySelectorAll('.legend-key')].map(t => getComputedStyle(t).fill);
    const swatches = [...f.querySelectorAll('.legend-swatch')].map(l => getComputedStyle(l).stroke);
    return keys.length === lines.length && new Set(lines).size === lines.length
      && lines.every((c, i) => c === keys[i] && c === swatches[i]);
  }),
})"""


def test_report_page_opens_in_chromium_with_its_figures_and_tables(trained, scored, tmp_path, capsys):
    """`dmafn report` through the CLI, then the page in headless Chromium: no console error, every section,
    figure and table there, and a screenshot that is not blank."""
    from PIL import Image

    from jobs.cli import main
    from tests.browser import visit

    spec, _, root = trained
    out = tmp_path / "report.html"
    assert main(["report", str(root / "spec.yaml"), "--start", str(DAY3), "--end", str(DAY3), "--out", str(out),
                 "--min-ticks", "4"]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    page = visit(out, REPORT_CHECK, tmp_path / "report.png")
    assert page.errors == []
    got = page.result
    assert got["sections"] == ["metrics", "curves", "timelines", "events", "versions", "runs", "quality"]
    assert got["curves"] == 2 * (1 + 4)    # fused + each modality (not the relation-only process context), ROC and PR
    assert sorted(got["timelines"]) == ["pump-00", "pump-01"]
    assert got["thresholds"] == 2 and got["timelineLines"] >= 2 * 5 and got["labelSpans"] > 0 and got["alarms"] > 0
    rows = got["rows"]
    assert rows["fused-metrics"] >= 9 and rows["kind-metrics"] == 5 and rows["events-table"] > 0
    assert rows["detection"] >= 2                                 # all kinds, then each kind of the day
    assert rows["attribution"] >= 1                               # which modality the alarm ticks name, per kind
    assert rows["causes"] >= 1                                    # ... and which their cause names
    assert rows["min-ticks"] == 6                                 # event-wise at N = 1, 2, 3, 4 (asked), 5, 10 ticks
    assert rows["shortfall"] >= 3                                 # the kinds, then the classes of normal ticks
    assert rows["runs-table"] >= 1 and rows["version-0"] == 4     # the version that scored: created, its days, entities
    assert rows["quality-table"] == 3                             # the three unusable input rows, by reason
    assert got["width"] <= 1200          # the window's width: a wide table scrolls in its own box, not the page
    assert got["legendsMatch"] == [True, True]    # each curve's name drawn in its curve's colour, beside a stroke of it
    assert got["timelinesChosen"].startswith("The 2 entities with the most alarm ticks in the window, the most first")
    assert got["runsOnOneLine"]          # a wide table's cells (dates, version ids) keep to one line as it scrolls
    image = Image.open(page.screenshot).convert("L")
    assert image.size[1] > 1500                                   # the whole page, not one screen
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram)                 # not one flat colour


def test_report_without_labels_and_with_chosen_entities(trained, scored, tmp_path):
    """A spec without labels still gets timelines, events, runs and quality (no metrics); an entity that has
    no scores in the window is a data error naming it."""
    from pipelines.report import build_report

    spec, _, _ = trained
    unlabelled = replace(spec, labels=None)
    page = build_report(unlabelled, tmp_path / "r.html", start=DAY3, end=DAY3, entities=["pump-01"]).read_text()
    assert "The spec has no labels: no metrics." in page and 'data-entity="pump-01"' in page
    assert "<p>The entities asked for.</p>" in page
    assert 'data-entity="pump-00"' not in page and 'id="events-table"' in page and 'id="runs-table"' in page
    assert '<section id="versions">' in page and "1 warning(s) at training:" in page and "000000_0" in page
    runs = page[page.index('id="runs-table"'):]
    assert "alarm_rate" in runs and "expected_alarm_rate" in runs and "above_validation_median" in runs
    assert re.search(r"<td[^>]*>\d+\.\d\d %</td>", runs)                  # the shares as percentages
    assert all(f"{c}_camera" in runs for c in ("usable_rows", "present_share", "entities_without"))
    assert "input_files" in runs and "keys_without_modality" not in runs
    assert all(c in runs for c in ("unseen_respelled", "new_payload_formats", "changed_row_intervals", "unmet_keys"))
    quarantined = pl.read_delta(spec.score.quarantine_path).filter(pl.col("date") == DAY3.isoformat())
    assert quarantined.height > 0 and f"{quarantined.height:,} quarantined rows (stage ingest" in page
    # event times in the spec's timezone: the same events, 5 hours earlier on New York's clock
    when = r"<td>(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (UTC|EST)</td>"
    events = page[page.index('id="events-table"'):page.index("</table>", page.index('id="events-table"'))]
    local = build_report(replace(unlabelled, timezone="America/New_York"), tmp_path / "ny.html", start=DAY3, end=DAY3,
                         entities=["pump-01"]).read_text()
    local_events = local[local.index('id="events-table"'):local.index("</table>", local.index('id="events-table"'))]
    utc, est = re.findall(when, events), re.findall(when, local_events)
    assert utc and len(utc) == len(est) and {z for _, z in utc} == {"UTC"} and {z for _, z in est} == {"EST"}
    assert all(dt.datetime.fromisoformat(a) - dt.datetime.fromisoformat(b) == dt.timedelta(hours=5)
               for (a, _), (b, _) in zip(utc, est))
    assert re.search(r"<title>alarm ticks \S+ \S+ EST \.\. \S+ \S+ EST</title>", local)
    with pytest.raises(DataError, match="report: entity pump-99 has no scores in 2024-01-03..2024-01-03"):
        build_report(unlabelled, tmp_path / "x.html", start=DAY3, end=DAY3, entities=["pump-99"])


def test_report_timelines_are_not_flattened_by_a_spike_and_events_name_their_dominant_modality():
    import numpy as np

    from pipelines.report import AlarmEvents, _clipped_range, alarm_events

    values = np.r_[np.random.default_rng(0).normal(0, 1, 5000), 1e6]
    lo, hi = _clipped_range(values, threshold=3.0)
    assert hi < 10 and lo > -10 and hi > 3.0                      # the spike is clipped, the threshold shown
    ts = pl.datetime_range(dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 1, 0, 7), "1m", eager=True, time_zone="UTC")
    scores = pl.DataFrame({"_entity": ["a"] * 8, "ts": ts, "score": [0.0, 5, 6, 0, 0, 9, 0, 0],
                           "is_anomaly": [False, True, True, False, False, True, False, False],
                           "score_x": [0.0, 4, 4, 0, 0, 0.5, 0, 0], "score_y": [0.0, 1, 1, 0, 0, 8, 0, 0],
                           "label_kind": [None, "leak", "leak", None, None, None, None, None]})
    events = alarm_events(scores, ["x", "y"])
    assert [(e["ticks"], e["peak"], e["dominant"], e["kind"]) for e in events] == [(1, 9.0, "y", None),
                                                                                 (2, 6.0, "x", "leak")]
    # read in chunks (the report reads a date at a time): a run across a chunk's edge is one run; top 1 kept
    chunked = AlarmEvents(["x", "y"], top=1)
    for part in (scores[:2], scores[2:2], scores[2:6], scores[6:]):
        chunked.add(part)
    assert chunked.finish() == events[:1] and chunked.count == 2
    other = AlarmEvents(["x", "y"])
    for part in (scores[:2], scores[2:]):
        other.add(part)
    assert other.finish() == events


def test_training_refuses_a_modality_it_would_never_see(trained, tmp_path):
    """A modality of the spec with no file in the training days' partitions is named before anything is read; one
    whose files there hold no usable row is named once the features are written, before the network trains (a model
    would score it with an encoder trained on nothing, its contributions calibrated on nothing). The fixture's
    version records each modality's validation ticks."""
    import shutil

    from pipelines.registry import Registry
    from pipelines.storage import Storage
    from pipelines.train import train

    spec, version, _ = trained
    manifest = Registry(spec.registry, Storage()).load(version).manifest
    present = manifest["calibration"]["validation"]["validation_present_ticks"]
    assert all(present[m] > 1000 for m in ("process", "vibration", "camera", "logs"))
    empty = _edited_copy(trained, tmp_path / "empty", "logs/date=2024-01-01/*.parquet", lambda t: t.slice(0, 0))
    with pytest.raises(DataError, match=r"modality 'logs' \(.*\): present at none of the [\d,]+ training ticks of "
                                        r"2024-01-01\.\.2024-01-01 .* could not learn it"):
        train(replace(empty, registry=str(tmp_path / "empty" / "models")))
    gone = _edited_copy(trained, tmp_path / "gone", "none", None)
    shutil.rmtree(Path(gone.modalities["camera"].path) / "date=2024-01-01")
    with pytest.raises(DataError, match=r"modality 'camera' \(.*\): no file in the partitions of the training days "
                                        r"2024-01-01\.\.2024-01-01, so the model could not learn it"):
        train(replace(gone, registry=str(tmp_path / "gone" / "models")))
    assert not (tmp_path / "gone" / "models").exists() and not (tmp_path / "empty" / "models").exists()
    # a column added to the process table after the training days (`added_columns`: null in their files) holds no
    # value at any training tick - a dead channel: the column named when its statistics would be fitted
    added = _edited_copy(trained, tmp_path / "added", "process/date=2024-01-01/*.parquet",
                         lambda t: t.drop(["pressure"]) if "pressure" in t.column_names else t)
    added = replace(added, registry=str(tmp_path / "added" / "models"), modalities={
        **added.modalities, "process": replace(added.modalities["process"], added_columns=("pressure",))})
    with pytest.raises(DataError, match=r"modality 'process' \(.*\): column 'pressure' holds no usable value at any "
                                        r"of the [\d,]+ training ticks its other columns have one, .* "
                                        r"added_columns: pressure\); train on days where it has values"):
        train(added)


def test_a_modality_present_at_few_training_or_validation_ticks_is_warned_of(tiny_spec):
    from pipelines.train import rare_modality_lines

    present = {"proc": 5000, "vib": 40, "logs": 50, "cam": 4990}
    assert rare_modality_lines(tiny_spec, present, 5000, "validation ticks of 2024-01-03..2024-01-03", "calibrate") == [
        "modality 'vib': present at only 40 of the 5,000 validation ticks of 2024-01-03..2024-01-03 (0.80 %), so the "
        "model can calibrate it from those alone - train on days that hold more of it"]
    with pytest.raises(DataError, match="modality 'logs' .* present at none of the 5,000 training ticks"):
        rare_modality_lines(tiny_spec, {**present, "logs": 0}, 5000, "training ticks", "learn")


def test_entity_keys_that_never_meet_across_modalities_are_warned_of(tiny_spec):
    """Training warns when a machine's key is written two ways (`PUMP-01` in the camera's table, `pump-01` in the
    others': its modalities never read together) and when a modality's entities never have another modality - each
    entity's modalities gathered from aligned ticks (`entity_modalities`, bits in `voting_modalities`' order) and
    merged over shards; keys alike but for case are no warning when they have the same modalities."""
    from pipelines.entity_keys import entity_modalities, key_shape, merge_entity_modalities, unmet_entity_lines

    aligned = pl.DataFrame({"machine_id": ["pump-01", "pump-01", "PUMP-01 ", "pump-02", "cam 9"],
                            "proc__present": [True, False, False, True, False],
                            "vib__present": [False, True, False, None, False],
                            "logs__present": [False, False, False, True, False],
                            "cam__present": [False, False, True, False, True]})
    seen = entity_modalities(aligned, tiny_spec)
    assert seen == {"pump-01": 0b0011, "PUMP-01 ": 0b1000, "pump-02": 0b0101, "cam 9": 0b1000}
    assert merge_entity_modalities(dict(seen), {"pump-02": 0b0010, "pump-03": 0b0001})["pump-02"] == 0b0111
    where = "training ticks of 2024-01-01..2024-01-02"
    assert unmet_entity_lines(tiny_spec, seen, where) == [
        f"entity keys that differ only in case, spaces, separators or padding zeros are present with different "
        f"modalities at the {where}, so those modalities are never read together: 'PUMP-01 ' (cam) and 'pump-01' "
        "(proc, vib) - a tick joins an entity's modalities by its exact key: write each machine's key alike in every "
        "table",
        f"modality 'cam': none of its 2 entities has another modality present at any of the {where} (its keys: "
        "'PUMP-01 ', 'cam 9'; the other modalities': 'pump-01', 'pump-02') - the model never reads it with the "
        "others: do its keys name the machines otherwise?"]
    met = {"pump-01": 0b1111, "PUMP_01": 0b1111, "pump-02": 0b1001}
    assert unmet_entity_lines(tiny_spec, met, where) == []
    assert [key_shape(k) for k in ("Pump-007", "pump_7", "site 10/pump-0", "P100")] == ["pump7", "pump7", "site10pump0",
                                                                                      "p100"]
    padded = {"pump-7": 0b0111, "pump-007": 0b1000, "pump-10": 0b1111}   # the camera's keys padded with zeros
    assert "'pump-007' (cam) and 'pump-7' (proc, vib, logs)" in unmet_entity_lines(tiny_spec, padded, where)[0]
    assert unmet_entity_lines(replace(tiny_spec, modalities={"proc": tiny_spec.modalities["proc"]}),
                              {"a": 1, "A": 1}, where) == []
    alone = {"pump-01": 0b1000, "pump-02": 0b1000}          # a scored date on which only the cameras held rows
    assert len(unmet_entity_lines(tiny_spec, alone, where)) == 1
    assert unmet_entity_lines(tiny_spec, alone, where, lone_when_others=True) == []
    assert len(unmet_entity_lines(tiny_spec, {**alone, "p-3": 0b0011}, where, lone_when_others=True)) == 1


def test_scored_entities_give_their_modalities_as_bits_and_respelled_keys_their_trained_spelling():
    """Scoring's side of the unmet-keys warning: each scored entity's modalities present (`entity_alarms`' `_has_`
    columns) as the same bits training gathers, and entities new to a version named with the trained key they are
    spelled like (case, separators, padding zeros)."""
    from pipelines.entity_keys import respelled_keys, scored_entity_modalities
    from pipelines.score import DateResult, unseen_entities_warning
    from pipelines.score_steps import entity_alarms, unseen_entities

    out = pa.table({"machine_id": ["pump-01", "pump-01", "PUMP-01", "pump_7"], "is_anomaly": [False, True, True, False],
                    "modalities": [["proc"], ["vib"], ["cam"], ["proc", "cam"]]})
    per_entity = entity_alarms(out, ["machine_id"], ["proc", "vib", "cam"]).sort("machine_id")
    keys = per_entity["machine_id"].to_list()
    assert scored_entity_modalities(per_entity, keys, ["proc", "vib", "cam"]) == {
        "PUMP-01": 0b100, "pump-01": 0b011, "pump_7": 0b101}
    known = {"pump-01", "pump-007", "pump-2"}
    assert respelled_keys(["PUMP-01", "pump_7", "pump-3"], known) == [("PUMP-01", "pump-01"), ("pump_7", "pump-007")]
    assert respelled_keys([], known) == []
    unseen = unseen_entities(per_entity, keys, known)
    assert (unseen.entities, unseen.respelled, unseen.respelled_named) == (
        2, 2, [("PUMP-01", "pump-01"), ("pump_7", "pump-007")])
    both = unseen.add(unseen)
    assert (both.respelled, len(both.respelled_named)) == (4, 4)
    line = unseen_entities_warning(DateResult("2024-01-03", 4, 4, 0, 2, 0.0, unseen=unseen), "v1")
    assert line.endswith("; 2 of them spelled like a trained entity but for case, spaces, separators or padding zeros "
                         "('PUMP-01' as 'pump-01', 'pump_7' as 'pump-007') - has a source changed how it writes its "
                         "keys? Write them as the version was trained on: until then they score as new machines (and "
                         "apart from the rows of any table that still writes the trained key)")


def test_missing_column_fails_before_any_write(trained, tmp_path):
    from pipelines.score import score_date
    from pipelines.train import train

    spec, _, root = trained
    mods = dict(spec.modalities)
    mods["process"] = replace(mods["process"], columns=("temperature", "humidity"))
    out = tmp_path / "never"
    broken = replace(spec, modalities=mods, score=replace(spec.score, output=str(out)), registry=str(out / "models"))
    with pytest.raises(DataError, match="process/date=2024-01-01/.*column 'humidity' not found"):
        train(broken)
    assert not out.exists()
    with pytest.raises(DataError, match=r"no modality .* has data for 2030-01-01; the newest date folder: 2024-01-03 "
                                        r"\(process, vibration, camera, logs\)$"):
        score_date(replace(spec, score=replace(spec.score, output=str(out))), dt.date(2030, 1, 1))
    assert not out.exists()


def test_missing_table_is_named(trained):
    from pipelines.shards import list_inputs
    from pipelines.storage import Storage

    spec, _, root = trained
    mods = dict(spec.modalities)
    mods["camera"] = replace(mods["camera"], path=str(root / "raw" / "nowhere"))
    with pytest.raises(DataError, match="nowhere: table not found"):
        list_inputs(replace(spec, modalities=mods), [DAY3], Storage())


def test_score_backfill_and_maintain_leave_a_table_dmafn_did_not_write_alone(trained, tmp_path):
    """`score.output` pointed at another team's table: score, backfill and maintain stop naming it, before writing
    anything (no runs row either), and its rows stay."""
    from deltalake import write_deltalake

    from pipelines.maintain import maintain
    from pipelines.score import backfill, score_date

    spec, version, _ = trained
    theirs = pa.table({"a": [1, 2], "date": ["2024-01-03", "2024-01-03"]})
    out = tmp_path / "theirs"
    write_deltalake(str(out), theirs)
    other = replace(spec, score=replace(spec.score, output=str(out), runs=None, quarantine=None, staging=None))
    for run in (lambda: score_date(other, DAY3, version=version), lambda: backfill(other, DAY3, DAY3),
                lambda: maintain(other)):
        with pytest.raises(DataError, match=f"score.output {out} is a Delta table dmafn did not write for this spec"):
            run()
    assert pl.read_delta(str(out)).to_dict(as_series=False) == theirs.to_pydict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]                 # no runs or quarantine table


def test_backfill_records_a_failed_date_and_finishes_the_others(trained, tmp_path):
    from pipelines.score import backfill

    spec, _, _ = trained
    day4 = DAY3 + dt.timedelta(days=1)                       # no data upstream for this date
    spec = replace(spec, score=replace(spec.score, output=str(tmp_path / "scores")))
    with pytest.raises(RuntimeError, match=r"1 date\(s\) failed, first 2024-01-04: no modality"):
        backfill(spec, DAY3, day4, parallel=1)
    runs = pl.read_delta(spec.score.runs_path)
    assert dict(zip(runs["date"].to_list(), runs["status"].to_list())) == {"2024-01-03": "succeeded",
                                                                             "2024-01-04": "failed"}
    assert dict(zip(runs["date"].to_list(), runs["error"].to_list()))["2024-01-03"] is None
    assert re.match(r"no modality .* has data for 2024-01-04; the newest date folder: 2024-01-03 \(process, vibration, "
                    r"camera, logs\)$", runs.filter(pl.col("status") == "failed")["error"][0])
    assert pl.read_delta(spec.score.output)["date"].unique().to_list() == ["2024-01-03"]


def test_a_date_without_input_is_skipped_when_the_spec_says_a_plant_may_rest(trained, tmp_path):
    """`score.missing_input: skip`: a date no modality has a row for is recorded as skipped (nothing written, the
    backfill succeeds); a date whose rows are all unusable still fails, with the quarantine to read."""
    from pipelines.score import backfill

    day4, day5 = DAY3 + dt.timedelta(days=1), DAY3 + dt.timedelta(days=2)
    resting = _edited_copy(trained, tmp_path, "no-file-matches", None)
    resting = replace(resting, score=replace(resting.score, missing_input="skip"))
    unusable = pa.table({"machine_id": ["pump-00"] * 3, "ts": pa.array([int(1704412800e6), 0, 0], pa.timestamp(
        "us", tz="UTC")), "temperature": pa.array([None, 1.0, 1.0], pa.float64()), "pressure": [None, 3.0, 3.0]})
    # 2024-01-05 without a value (a row with only a pressure would be kept for it and give ticks: a dead channel);
    # twice 1970-01-01 (epoch milliseconds read as microseconds, say): misplaced
    (tmp_path / "raw" / "process" / "date=2024-01-05").mkdir()
    pq.write_table(unusable, tmp_path / "raw" / "process" / "date=2024-01-05" / "part-0.parquet")
    with pytest.raises(RuntimeError, match=r"1 date\(s\) failed, first 2024-01-05: no modality .* has usable data "
                                           r"for 2024-01-05 \(3 input rows, all quarantined: see .*\); 2 of them timed "
                                           "outside their date partition: do the spec's timezone and lateness say"):
        backfill(resting, DAY3, day5, parallel=1)
    runs = pl.read_delta(resting.score.runs_path)
    assert dict(zip(runs["date"].to_list(), runs["status"].to_list())) == {
        "2024-01-03": "succeeded", "2024-01-04": "skipped", "2024-01-05": "failed"}
    assert runs.filter(pl.col("date") == "2024-01-04")["error"][0].endswith("(score.missing_input: skip)")
    assert pl.read_delta(resting.score.output)["date"].unique().to_list() == ["2024-01-03"]
    again = backfill(resting, day4, day4)                   # a skipped date is tried again: late data is scored
    assert [(r.date, r.skipped, r.ticks_in) for r in again] == [("2024-01-04", True, 0)]


def _driver_must_not_touch_rows(monkeypatch):
    """In this (driver) process, reading a table's rows or writing scored rows fails the test - the labels aside,
    a small table read whole on the driver (`known_incidents`, `evaluate`); the Ray tasks, in their own processes,
    use the real functions."""
    from pipelines import parquet_files

    def refuse(*args, **kwargs):
        raise AssertionError("the driver read input rows or wrote scored rows")

    def labels_only(parquet, path, *args, **kwargs):
        if "/labels/" not in path:
            refuse()
        return read_columns(parquet, path, *args, **kwargs)

    read_columns = parquet_files.read_columns
    monkeypatch.setattr("pipelines.parquet_files.read_columns", labels_only)
    monkeypatch.setattr("pipelines.score_steps.write_data_file", refuse)


def test_backfill_gives_the_same_rows_however_its_shards_are_cut(trained, tmp_path, monkeypatch, caplog):
    """Dates scored one per shard, two per shard, or split into entity buckets (their files split by bucket
    first) give each date exactly the same rows, counts and quarantine (smoothing restarts per date; alignment
    never reads past a tick); the driver reads no input row and writes no scored row."""
    import logging

    caplog.set_level(logging.INFO, logger="pipelines.score")
    from pipelines.score import backfill
    from pipelines.shards import list_inputs
    from pipelines.storage import Storage

    spec, _, root = trained
    _driver_must_not_touch_rows(monkeypatch)
    files = list_inputs(spec, [DAY2, DAY3], Storage())
    assert {f.path: f.size for f in files} == {str(p): p.stat().st_size for d in ("01", "02", "03")
                                               for p in root.glob(f"raw/*/date=2024-01-{d}/*.parquet")}
    day_bytes = max(sum(f.size for f in files if f.date == d) for d in (DAY2, DAY3))
    outputs = {}
    for cut, kwargs in {"alone": {"days_per_shard": 1}, "together": {"days_per_shard": 2},
                        "buckets": {"shard_bytes": day_bytes // 4 + 1}}.items():
        out = replace(spec, score=replace(spec.score, output=str(tmp_path / f"scores_{cut}")))
        results = backfill(out, DAY2, DAY3, parallel=2, **kwargs)
        assert [r.date for r in results] == ["2024-01-02", "2024-01-03"]
        assert all(r.ticks_in == r.rows_scored + r.rows_quarantined for r in results)
        runs = pl.read_delta(out.score.runs_path)
        assert sorted(runs["date"].to_list()) == ["2024-01-02", "2024-01-03"] and set(runs["status"]) == {"succeeded"}
        quarantine = pl.read_delta(out.score.quarantine_path).group_by("date", "stage").len().sort("date", "stage")
        outputs[cut] = (pl.read_delta(out.score.output).sort("machine_id", "ts"), quarantine,
                        [(r.ticks_in, r.rows_scored, r.rows_quarantined, r.anomalies) for r in results])
    # four entity buckets: pump-00 and pump-01 hash to two of them (two are empty), a data file per bucket with rows
    assert len(list((tmp_path / "scores_buckets" / "date=2024-01-03").glob("*.parquet"))) == 2
    # the demo's files mix both pumps in a row group: split by bucket once per file, the pieces deleted at the end
    assert re.search(r"(^|\s)[1-9]\d* file\(s\) checked for a split by entity bucket", caplog.text)
    assert list((tmp_path / "scores_buckets_staging").glob("*")) == []
    alone, q_alone, counts_alone = outputs.pop("alone")
    for cut, (rows, quarantine, counts) in outputs.items():
        assert counts == counts_alone and quarantine.equals(q_alone), cut
        assert rows.select("machine_id", "ts", "is_anomaly").equals(alone.select("machine_id", "ts", "is_anomaly"))
        for col in ("score", "score_process", "score_vibration", "score_camera", "score_logs"):
            assert rows[col].is_null().equals(alone[col].is_null()), (cut, col)
            # batches differ, the rows do not: float32 sums in other batch shapes round differently (~1e-6)
            assert (rows[col] - alone[col]).abs().max() < 1e-5, (cut, col)


def test_a_failed_pass_retries_its_dates_alone(trained, tmp_path):
    """An unreadable file fails the whole pass; its dates are then scored one by one, so only the date
    whose inputs hold the file fails."""
    import shutil

    from pipelines.score import backfill

    spec, _, root = trained
    shutil.copytree(root / "raw", tmp_path / "raw")
    (tmp_path / "raw" / "process" / "date=2024-01-03" / "truncated.parquet").write_bytes(b"PAR1 not parquet")
    mods = {k: replace(m, path=m.path.replace(str(root / "raw"), str(tmp_path / "raw")))
            for k, m in spec.modalities.items()}
    spec = replace(spec, modalities=mods, score=replace(spec.score, output=str(tmp_path / "scores")))
    with pytest.raises(RuntimeError, match=r"1 date\(s\) failed, first 2024-01-03: \S+/date=2024-01-03/"
                                           r"truncated.parquet: not a readable Parquet file"):
        backfill(spec, DAY2, DAY3, days_per_shard=2, parallel=1)
    runs = pl.read_delta(spec.score.runs_path)
    assert dict(zip(runs["date"].to_list(), runs["status"].to_list())) == {"2024-01-02": "succeeded",
                                                                             "2024-01-03": "failed"}
    assert pl.read_delta(spec.score.output)["date"].unique().to_list() == ["2024-01-02"]


def test_scoring_reads_where_the_spec_says_with_the_models_modalities(trained, tmp_path, caplog):
    """Data moved since training: the spec's paths are read; a modality the model needs but the spec no
    longer defines is an error naming it; a window edited since is read as the model's, with a warning once."""
    from pipelines.registry import Registry
    from pipelines.score import reading_spec
    from pipelines.storage import Storage

    spec, version, root = trained
    mv = Registry(spec.registry, Storage()).load(version)
    moved = replace(spec, modalities={k: replace(m, path=str(tmp_path / k)) for k, m in spec.modalities.items()})
    assert {k: m.path for k, m in reading_spec(mv, moved).modalities.items()} == \
        {k: str(tmp_path / k) for k in spec.modalities}
    calendar = reading_spec(mv, replace(spec, timezone="Asia/Tokyo", lateness_us=3_600_000_000,   # how it is filed
                                        time_unit="ms", unreadable_files="skip"))
    assert (calendar.timezone, calendar.lateness_us, calendar.time_unit, calendar.unreadable_files) == (
        "Asia/Tokyo", 3_600_000_000, "ms", "skip")
    without_logs = replace(spec, modalities={k: m for k, m in spec.modalities.items() if k != "logs"})
    with pytest.raises(DataError, match=r"reads modalities \['logs'\] that spec"):
        reading_spec(mv, without_logs)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    logs = spec.modalities["logs"]
    edited = replace(spec, source="edited.yaml",
                     modalities={**spec.modalities, "logs": replace(logs, window_us=2 * logs.window_us)})
    with caplog.at_level(logging.WARNING, logger="pipelines.score"):
        assert reading_spec(mv, edited).modalities["logs"].window_us == logs.window_us       # the model's
        reading_spec(mv, edited)                                                                # (backfill asks again)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and re.search(rf"spec edited\.yaml differs from model version {version} .*"
                                          rf"modalities\.logs\.window: \d+min \(the version's: \d+min\)$", warned[0])


def test_cli_backfill_lists_failed_dates_and_exits_1(trained, tmp_path, capsys):
    """`dmafn backfill` over a date without data: no traceback; each failed date on stderr, exit code 1."""
    import yaml

    from jobs.cli import main

    spec, _, root = trained
    data = yaml.safe_load((root / "spec.yaml").read_text())
    data["score"]["output"] = str(tmp_path / "scores")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["backfill", str(path), "--start", "2024-01-04", "--end", "2024-01-04", "--shard-mb", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "error: 2024-01-04: no modality of spec" in err and "1 date(s) failed" in err
    assert "Traceback" not in err
    runs = pl.read_delta(str(tmp_path / "scores_runs"))
    assert runs["status"].to_list() == ["failed"]


def test_ctrl_c_in_a_backfill_says_how_many_dates_are_committed_and_exits_130(trained, tmp_path, capsys, caplog,
                                                                              monkeypatch):
    """Ctrl-C at the second date's runs record (after its commit): exit 130, "2 of 3 dates committed", both stay;
    the progress display's plain lines (no terminal here) went to the log meanwhile."""
    import logging

    import yaml

    import pipelines.score
    from jobs.cli import main

    spec, _, root = trained
    data = yaml.safe_load((root / "spec.yaml").read_text())
    data["score"]["output"] = str(tmp_path / "scores")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    recorded, record_run = [], pipelines.score.record_run

    def record_then_ctrl_c(*args, **kwargs):
        if recorded:
            raise KeyboardInterrupt
        recorded.append(record_run(*args, **kwargs))

    monkeypatch.setattr(pipelines.score, "record_run", record_then_ctrl_c)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        code = main(["backfill", str(path), "--start", str(DAY1), "--end", str(DAY3), "--parallel", "1",
                     "--days-per-shard", "1"])
    assert code == 130
    assert "interrupted: 2 of 3 dates committed; run again to continue" in capsys.readouterr().err
    assert sorted(pl.read_delta(str(tmp_path / "scores"))["date"].unique().to_list()) == ["2024-01-01", "2024-01-02"]
    progress = [r.getMessage() for r in caplog.records if r.name == "pipelines.progress"]
    assert any(m.startswith("[1/3] 2024-01-01:") for m in progress)
    assert any(m.startswith("scoring: ") and "shards" in m and "committed" in m for m in progress)


def test_tick_batches_read_the_rows_before_their_first_tick(trained):
    """A slice of a shard's ticks starting mid-day gives exactly what aligning all its ticks at once gives: its
    first ticks still see the window and tolerance rows before the slice."""
    from pipelines.align import TIME, align, data_ticks, date_start_us
    from pipelines.ingest import read_shard
    from pipelines.score_steps import tick_batches
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage

    spec, _, _ = trained
    (shard,) = plan_shards(spec, [DAY3], list_inputs(spec, [DAY3], Storage()))
    inputs = read_shard(shard, spec, Storage())
    ticks = data_ticks(inputs.tables, inputs.present, spec, [DAY3])
    whole = align(ticks, inputs.tables, spec)
    batches = list(tick_batches(ticks, inputs.tables, spec, 97))
    sliced = pl.concat([align(batch, tables, spec) for batch, tables in batches])
    assert sliced.equals(whole)
    keys = list(spec.entity)
    for batch, tables in batches:                               # each slice reads its own entities' rows only
        mine = set(batch.select(keys).rows())
        assert all(set(t.select(keys).unique().rows()) <= mine for t in tables.values())
    assert any(len(set(t.select(keys).unique().rows())) < len(set(ticks.select(keys).rows()))
               for _, tables in batches for t in tables.values() if t.height)
    noon = date_start_us(DAY3) + 12 * 3_600_000_000
    first = next(tables for batch, tables in tick_batches(ticks.filter(pl.col(TIME) >= noon), inputs.tables, spec, 10))
    assert first["vibration"][TIME].min() < noon                   # the window before noon was read


def test_a_shard_streams_its_progress_then_its_scores(trained, tmp_path):
    """`score_shard_steps` yields (ticks done, ticks total) after each batch, growing to the total, then the
    shard's `ShardScores` last - what a scoring task streams to the driver instead of posting to an actor."""
    from pipelines.registry import Registry
    from pipelines.score import reading_spec
    from pipelines.score_steps import score_shard_steps
    from pipelines.shards import ShardScores, list_inputs, plan_shards
    from pipelines.storage import Storage

    spec, version, root = trained
    spec = replace(spec, score=replace(spec.score, output=str(tmp_path / "scores")))
    mv = Registry(spec.registry, Storage()).load(version)
    model_spec = reading_spec(mv, spec)
    (shard,) = plan_shards(model_spec, [DAY3], list_inputs(model_spec, [DAY3], Storage()))
    steps = list(score_shard_steps(shard, model_spec, mv, Storage(), run_id="t", batch_ticks=500,
                                   scored_at=dt.datetime.now(dt.timezone.utc)))
    progress, last = steps[:-1], steps[-1]
    assert isinstance(last, ShardScores) and not any(isinstance(p, ShardScores) for p in progress)
    counts = last.dates[DAY3.isoformat()]
    assert len(progress) == -(-counts.ticks_in // 500) >= 2
    assert [d for d, _ in progress] == sorted(d for d, _ in progress) and progress[-1] == (counts.ticks_in,) * 2
    assert {t for _, t in progress} == {counts.ticks_in} and counts.rows_scored + counts.rows_quarantined == counts.ticks_in
    assert mv.stats["relations"]["process_context"].get("smoothing") == 0.7    # the relations smooth their residuals
    whole = replace(model_spec, score=replace(model_spec.score, output=str(tmp_path / "whole")))
    at_once = list(score_shard_steps(shard, whole, mv, Storage(), run_id="t",
                                     scored_at=dt.datetime.now(dt.timezone.utc)))[-1].dates[DAY3.isoformat()]

    def scores(root, written):
        table = pa.concat_tables([pq.read_table(f"{root}/{f['path']}") for f in written.output_files])
        return table.sort_by([("machine_id", "ascending"), ("ts", "ascending")])

    cut, one = scores(tmp_path / "scores", counts), scores(tmp_path / "whole", at_once)
    assert cut.num_rows == one.num_rows == counts.rows_scored            # cut into 500-tick batches or not: alike
    np.testing.assert_allclose(cut["score_process"].to_numpy(zero_copy_only=False),
                               one["score_process"].to_numpy(zero_copy_only=False), rtol=1e-6)
    np.testing.assert_allclose(cut["score"].to_numpy(zero_copy_only=False),     # float32 sums of other batch sizes
                               one["score"].to_numpy(zero_copy_only=False), rtol=1e-5)
    named = np.asarray(cut["channel_vibration"].to_pylist(), object), np.asarray(one["channel_vibration"].to_pylist(), object)
    assert np.mean(named[0] == named[1]) > 0.99         # the channel parts' smoothing carried across the batches
    from pipelines.score_steps import Scorer

    assert Scorer(mv).relayed == {"vibration": ("vibration",)}     # the process's relations read the vibration
    causes = np.asarray(cut["cause"].to_pylist(), object), np.asarray(one["cause"].to_pylist(), object)
    named_any = np.fromiter((c is not None for c in causes[1]), bool)
    assert named_any.sum() > 20 and np.mean(causes[0][named_any] == causes[1][named_any]) > 0.99   # views carried


def test_the_scorer_smooths_each_channels_part_across_its_batches_as_at_once(trained):
    """`Scorer`: the channel parts `channel_<m>` is named from are smoothed per entity and date as the scores are
    (without the knee), carried from batch to batch exactly; a version without smoothing names the tick's own."""
    from types import SimpleNamespace

    from pipelines.registry import Registry
    from pipelines.score_steps import Scorer
    from pipelines.storage import Storage

    spec, version, _ = trained
    mv = Registry(spec.registry, Storage()).load(version)
    assert mv.calibration.smoothing.method == "ewma"
    parts = np.random.default_rng(0).gamma(1.0, size=(12, 3))
    parts[5] = np.nan                                               # the modality absent on a tick
    groups = np.array(["pump-00\x1f2024-01-03"] * 7 + ["pump-01\x1f2024-01-03"] * 5)
    whole = Scorer(mv)._smoothed_parts(None, SimpleNamespace(groups=groups))("vibration", parts)
    scorer = Scorer(mv)
    cut = [scorer._smoothed_parts(None, SimpleNamespace(groups=groups[rows]))("vibration", parts[rows])
           for rows in (slice(0, 3), slice(3, 9), slice(9, 12))]
    np.testing.assert_array_equal(np.concatenate(cut), whole)
    alpha = mv.calibration.smoothing.alpha
    np.testing.assert_allclose(whole[1], alpha * parts[1] + (1 - alpha) * parts[0])
    np.testing.assert_allclose(whole[6], alpha * parts[6] + (1 - alpha) * whole[4])   # over the absent tick
    assert np.isnan(whole[5]).all() and np.array_equal(whole[7], parts[7])         # another pump starts afresh
    plain = Scorer(mv)
    plain.parts_smoothing = replace(plain.parts_smoothing, smoothing=SmoothingSpec(method="none"))
    assert plain._smoothed_parts(None, SimpleNamespace(groups=groups)) is None


def test_cli_names_a_corrupt_file_in_one_error_line(trained, tmp_path, local_ray):
    """A Parquet file whose footer reads but whose pages do not, met inside a Ray task: `dmafn score` exits 2
    with one `error:` line naming the file, and no traceback (from Ray or Python) on its console."""
    import os
    import shutil
    import subprocess
    import sys

    import numpy as np
    import yaml

    spec, _, root = trained
    shutil.copytree(root / "raw", tmp_path / "raw")
    bad = tmp_path / "raw" / "process" / "date=2024-01-03" / "bad-rows.parquet"
    n = 5000
    pq.write_table(pa.table({"machine_id": ["pump-00"] * n, "ts": pa.array(np.arange(n) + int(1704240000e6),
                                                                           pa.timestamp("us", tz="UTC")),
                             "temperature": np.ones(n), "pressure": np.ones(n)}), bad)
    data = bytearray(bad.read_bytes())
    data[4:4000] = bytes(np.random.default_rng(1).integers(0, 256, 3996, dtype=np.uint8))
    bad.write_bytes(bytes(data))
    spec_data = yaml.safe_load((root / "spec.yaml").read_text())
    for m in spec_data["modalities"].values():
        m["path"] = m["path"].replace(str(root / "raw"), str(tmp_path / "raw"))
    spec_data["score"]["output"] = str(tmp_path / "scores")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_data))
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    run = subprocess.run([sys.executable, "-m", "jobs.score", str(tmp_path / "spec.yaml"), "--date", "2024-01-03"],
                         env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(errors) == 1 and "bad-rows.parquet: not a readable Parquet file" in errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout and "RayTaskError" not in run.stderr + run.stdout
    assert not (tmp_path / "scores").exists()


def test_a_scoring_driver_never_builds_the_network_nor_imports_torch(trained, tmp_path, local_ray):
    """A scoring job's driver only plans and commits: the model version travels to the shard tasks as its
    weights and is built there, and the driver process never imports torch nor Ray Data (its start and memory
    stay small)."""
    import os
    import pickle
    import subprocess
    import sys

    import torch
    import yaml

    from pipelines.registry import Registry
    from pipelines.storage import Storage

    spec, version, root = trained
    registry = Registry(str(root / "models"), Storage())
    lazy, built = registry.load(version, build=False), registry.load(version)
    assert "model" not in lazy.__dict__ and "model" in built.__dict__
    shipped = pickle.loads(pickle.dumps(built))
    assert "model" not in shipped.__dict__                       # the weights travel, not the network
    a, b = shipped.model.state_dict(), built.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    data = yaml.safe_load((root / "spec.yaml").read_text())
    data["score"]["output"] = str(tmp_path / "scores")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    script = ("import sys; from jobs.cli import main; code = main(['score', sys.argv[1], '--date', '2024-01-03']); "
              "print('torch imported:', 'torch' in sys.modules, 'ray.data' in sys.modules); sys.exit(code)")
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "spec.yaml")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torch imported: False False" in run.stdout, run.stdout[-2000:]
    scored = pl.read_delta(str(tmp_path / "scores"))
    assert scored.height > 0 and set(scored["model_version"]) == {version}


def test_model_versions_are_checked_and_only_plain_state_dicts_load(trained, tmp_path, capsys):
    """A registry version whose weights are not a plain tensor state dict is refused without running its code;
    weights, entity statistics or a manifest changed after saving fail their checksum; each error names the file.
    A version that keeps its entities' statistics in the manifest (saved before the entity file) loads."""
    import hashlib
    import io
    import shutil

    import torch

    from pipelines.registry import Registry
    from pipelines.storage import Storage

    spec, version, root = trained
    registry = Registry(str(tmp_path / "models"), Storage())
    folder = tmp_path / "models" / version
    shutil.copytree(root / "models" / version, folder)
    assert registry.load(version).version == version
    entity_file = folder / "entity_statistics.parquet"
    saved = entity_file.read_bytes()
    entity_file.write_bytes(saved[:-12] + b"\0" * 12)
    with pytest.raises(DataError, match=r"entity_statistics\.parquet: checksum does not match"):
        registry.load(version)
    entity_file.write_bytes(saved)
    current = registry.load(version, build=False)
    # a version saved before the entity file held every entity's statistics in its manifest: it loads as before
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["statistics"] = current.stats
    del manifest["entity_statistics"]
    body = json.dumps(manifest).encode()
    (folder / "manifest.json").write_bytes(body)
    (folder / "manifest.sha256").write_text(hashlib.sha256(body).hexdigest())
    entity_file.unlink()
    before = registry.load(version, build=False)
    assert before.entity_rows is None and before.stats == current.stats
    assert before.statistics.keys() == ["pump-00", "pump-01"]
    assert before.statistics.for_keys(["pump-01"]) == current.statistics.for_keys(["pump-01"]) != current.stats

    class Payload:
        def __reduce__(self):
            return (print, ("ran code from weights.pt",))

    buf = io.BytesIO()
    torch.save({"encoders.x": Payload()}, buf)
    (folder / "weights.pt").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"weights\.pt: checksum does not match"):
        registry.load(version)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("weights_sha256")                               # an attacker who edits the manifest too ...
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: checksum does not match"):
        registry.load(version)
    (folder / "manifest.sha256").unlink()                         # ... and drops its checksum: still refused
    with pytest.raises(DataError, match=r"weights\.pt: not a plain tensor state dict, refused without running"):
        registry.load(version)
    # through the CLI: exit 2 and one line naming the file
    import yaml

    from jobs.cli import main

    data = yaml.safe_load((root / "spec.yaml").read_text())
    data["registry"], data["score"]["output"] = str(tmp_path / "models"), str(tmp_path / "scores")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    assert main(["score", str(tmp_path / "spec.yaml"), "--date", "2024-01-03", "--model", version]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{version}/weights.pt: not a plain tensor state dict" in err
    assert "Traceback" not in err and "ran code from weights.pt" not in err
    assert not (tmp_path / "scores").exists()


@pytest.mark.slow
def test_training_resumes_from_the_latest_checkpoint_after_a_worker_is_killed(local_ray, tmp_path):
    """A Train worker killed once the first checkpoint exists: the worker group restarts and training goes on
    from the epoch after the latest checkpoint, not from epoch 0 (the manifest records where it resumed)."""
    import threading
    import time

    import psutil
    import torch

    from pipelines.registry import Registry
    from pipelines.storage import Storage
    from pipelines.train import train

    spec = load_spec(write_synthetic(tmp_path, SyntheticConfig(entities=2, days=3, clean_days=2, image_size=16,
                                                               seed=3)))
    spec = replace(spec, train=replace(spec.train, epochs=5, batch_size=128))
    killed = []

    def complete_checkpoint() -> bool:
        """A checkpoint whose state loads whole: a folder still being copied would leave nothing to resume from
        (training then rightly starts again at epoch 0, and this test would see no resume)."""
        for state in (tmp_path / "models" / "_train_runs").glob("*/checkpoint_*/state.pt"):
            try:
                torch.load(state, weights_only=True)
                return True
            except Exception:  # noqa: BLE001 - still being written
                continue
        return False

    def kill_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if complete_checkpoint():
                for proc in psutil.Process().children(recursive=True):       # this session's Ray only
                    try:
                        title = " ".join([proc.name(), *proc.cmdline()])
                    except psutil.Error:
                        continue
                    if "RayTrainWorker" in title:
                        proc.kill()
                        killed.append(proc.pid)
                        break
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    version = train(spec)
    watcher.join()
    assert killed, "no Train worker was found to kill"
    metrics = Registry(spec.registry, Storage()).load(version).manifest["metrics"]
    assert metrics["epochs"] == 5
    assert metrics["resumed_at_epochs"] and metrics["resumed_at_epochs"][0] >= 1, metrics["resumed_at_epochs"]
    assert not list((tmp_path / "models" / "_train_runs").iterdir())       # its checkpoints removed at the end


def test_maintain_vacuums_data_files_no_commit_referenced(trained, tmp_path):
    """A data file left by a shard whose date never committed is not part of the table; `maintain` removes it
    once older than the retention, and the table's rows stay; a killed run's staged pieces go too, a running
    run's stay, as do a killed training's checkpoints and a running one's."""
    import os
    import time

    from pipelines.maintain import maintain
    from pipelines.score import score_date

    spec, _, _ = trained
    spec = replace(spec, score=replace(spec.score, output=str(tmp_path / "scores")))
    score_date(spec, DAY3)
    before = pl.read_delta(spec.score.output).sort("machine_id", "ts")
    orphan = tmp_path / "scores" / "date=2024-01-03" / "part-left-by-a-failed-shard.parquet"
    pq.write_table(before.drop("date").to_arrow(), orphan)
    week_and_a_day = time.time() - 8 * 24 * 3600
    os.utime(orphan, (week_and_a_day, week_and_a_day))
    assert pl.read_delta(spec.score.output).height == before.height          # not part of the table
    left = tmp_path / "scores_staging" / "run-killed" / "3buckets" / "abc" / "bucket=0.parquet"  # a killed job's
    running = tmp_path / "scores_staging" / "run-now" / "3buckets" / "abc" / "bucket=0.parquet"
    for piece in (left, running):
        piece.parent.mkdir(parents=True)
        pq.write_table(before.drop("date").to_arrow(), piece)
    os.utime(left, (week_and_a_day, week_and_a_day))
    spec = replace(spec, registry=str(tmp_path / "models"))
    killed = tmp_path / "models" / "_train_runs" / "pumps-1700000000-abcdef" / "checkpoint_2023-11-14" / "state.pt"
    training = tmp_path / "models" / "_train_runs" / "pumps-1800000000-fedcba" / "checkpoint_2027-01-15" / "state.pt"
    for state in (killed, training):
        state.parent.mkdir(parents=True)
        state.write_bytes(b"weights")
    os.utime(killed, (week_and_a_day, week_and_a_day))
    lines = maintain(spec, retention_hours=168)
    assert not orphan.exists() and any("vacuumed 1 files" in line for line in lines), lines
    assert not left.parent.parent.parent.exists() and running.exists()
    assert any("removed 1 staging folder(s)" in line for line in lines), lines
    assert not killed.parent.parent.exists() and training.exists()
    assert any(line.endswith("_train_runs: removed 1 checkpoint folder(s) of stopped trainings older than 168h")
               for line in lines), lines
    assert pl.read_delta(spec.score.output).sort("machine_id", "ts").equals(before)


def test_evaluate_baselines_trains_and_scores_each_modality_alone_beside_the_output(trained, tmp_path, monkeypatch):
    """`evaluate --baselines`: each modality alone is a late-fusion autoencoder trained and scored by the jobs
    into `<output>_alone` (nothing gathered on the driver); evaluate reads its `score_<m>` of the same ticks as
    `alone_<m>`, and a second run reuses that version and its rows."""
    import shutil

    import numpy as np

    from dmafn.metrics import roc_auc
    from pipelines.align import label_ticks, to_micros
    from pipelines import baselines
    from pipelines.baselines import alone_spec
    from pipelines.evaluate import evaluate
    from pipelines.labels import read_labels
    from pipelines.registry import Registry
    from pipelines.score import score_date
    from pipelines.storage import Storage

    spec, _, _ = trained
    shutil.copytree(spec.registry, tmp_path / "models")
    spec = replace(spec, registry=str(tmp_path / "models"), score=replace(spec.score, output=str(tmp_path / "scores")))
    score_date(spec, DAY3)
    result = evaluate(spec, start=DAY3, end=DAY3, baselines=True)

    alone = alone_spec(spec)
    assert alone.registry == str(tmp_path / "models" / "_alone") and alone.score.output == str(tmp_path / "scores_alone")
    version = (tmp_path / "models" / "_alone" / "LATEST").read_text()
    manifest = json.loads((tmp_path / "models" / "_alone" / version / "manifest.json").read_text())
    assert (manifest["model_config"]["fusion"], manifest["model_config"]["detector"]) == ("late", "autoencoder")
    # alone, a context's relations stay within its modality: the model's reach across to the vibration, its own not
    model_relations = Registry(spec.registry, Storage()).load().manifest["statistics"]["relations"]["process_context"]
    assert model_relations["peers"] == ["vibration"] and model_relations["cross_channels"]
    assert "cross_channels" not in manifest["statistics"]["relations"]["process_context"]
    # and each error is scaled without the others' operating state, which the fused model's calibration reads
    fused_calibration = Registry(spec.registry, Storage()).load().manifest["calibration"]
    assert {"vibration", "camera", "logs"} <= set(fused_calibration["baseline"])
    owners = fused_calibration["state"]["owners"]           # the vibration's channels presented at their level
    assert owners[:2] == ["process", "process"] and set(owners[2:-2]) <= {"vibration"}
    assert owners[-2:] == ["process.rising", "vibration.rising"]          # then how fast each state rises
    assert "baseline" not in manifest["calibration"]
    rows = pl.read_delta(alone.score.output)
    assert rows["model_version"].unique().to_list() == [version] and rows["date"].unique().to_list() == [DAY3.isoformat()]
    assert (tmp_path / "scores_alone_runs").exists()
    # alone_<m> is the baseline table's score_<m> at the same tick, whatever the two tables' row orders
    scores = pl.read_delta(spec.score.output).sort("ts", descending=True)
    labelled = label_ticks(scores.with_columns(to_micros(pl.col("ts")).alias("_t")), read_labels(spec, Storage()),
                           spec, spec.labels.start, spec.labels.end)
    joined = labelled.join(rows.sample(fraction=1.0, shuffle=True, seed=1), on=["machine_id", "ts"], how="left",
                           suffix="_alone")
    modalities = [m for m in ("process", "vibration", "camera", "logs") if f"alone_{m}" in result["overall"]]
    assert modalities == ["process", "vibration", "camera", "logs"]
    for m in modalities:
        expected = roc_auc(joined[f"score_{m}_alone"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
                           joined["label"].to_numpy())
        assert result["overall"][f"alone_{m}"]["roc_auc"] == pytest.approx(expected), m
    assert result["overall"]["alone_vibration"]["roc_auc"] != result["overall"]["score_vibration"]["roc_auc"]

    again = evaluate(spec, start=DAY3, end=DAY3, baselines=True)
    assert (tmp_path / "models" / "_alone" / "LATEST").read_text() == version
    assert pl.read_delta(alone.score.output).height == rows.height
    assert json.dumps(again["overall"]) == json.dumps(result["overall"])
    # a model trained again (say on new data) makes the baseline train again too
    registry = Registry(spec.registry, Storage())
    model = registry.load()
    with pytest.raises(ValueError, match="whole statistics"):     # a loaded manifest holds the fleet's part only
        registry.save(model.model, {k: v for k, v in model.manifest.items() if k not in ("version", "created_at")})
    kept = {k: v for k, v in model.manifest.items() if k not in ("version", "created_at", "entity_statistics")}
    registry.save(model.model, {**kept, "statistics": model.stats})
    assert registry.load().stats == model.stats
    monkeypatch.setattr("pipelines.train.train", lambda s: f"retrained {s.registry}")
    assert baselines.alone_version(spec, alone, Storage()) == f"retrained {alone.registry}"
    # maintain compacts and vacuums the baselines' tables too
    from pipelines.maintain import maintain

    lines = maintain(spec)
    assert sum(line.startswith(str(tmp_path / "scores_alone")) for line in lines) == 3, lines


def test_each_entity_bucket_gets_its_entities_statistics_once(trained, local_ray):
    """`BucketStatistics`: a shard's task gets the statistics with only its entity bucket's per-entity parts, put
    once per bucket; one bucket, or keys whose text Polars and Python write differently, get the whole."""
    import ray

    from pipelines.registry import Registry
    from pipelines.shards import Shard, bucket_of
    from pipelines.statistics import BucketStatistics
    from pipelines.storage import Storage

    spec, version, _ = trained
    mv = Registry(spec.registry, Storage()).load(version, build=False)
    by_bucket = BucketStatistics(mv.statistics, keys_sliceable=True)
    shards = [Shard((DAY3,), b, 3, ()) for b in range(3)] + [Shard((DAY3, DAY3), 1, 3, ())]
    refs = [by_bucket.ref(s) for s in shards]
    assert refs[1] is refs[3] and len({id(r) for r in refs}) == 3
    for shard, ref in zip(shards, refs):
        entities = set(ray.get(ref)["modalities"]["process"]["entity"])
        assert entities == {k for k in ("pump-00", "pump-01") if bucket_of(k, 3) == shard.bucket}
    whole = [BucketStatistics(mv.statistics, keys_sliceable=False).ref(shards[0]),
             BucketStatistics(mv.statistics, keys_sliceable=True).ref(Shard((DAY3,), 0, 1, ()))]
    assert all(ray.get(ref) == mv.stats for ref in whole)


def test_training_calibrates_on_the_workers_as_it_would_on_the_gathered_ticks(trained, monkeypatch):
    """`train`'s calibration (`pipelines.calibrate.ShardTicks`) on the validation day cut into two entity buckets,
    its quantiles found by rounds of counts: the driver never receives a shard's ticks, and the calibration is
    the one `Calibration.fit` gives on the same raw scores gathered and sorted by entity and time."""
    import numpy as np
    import ray

    import pipelines.calibrate as calibrate
    from dmafn.calibration import Calibration
    from dmafn.scoring import RawScores
    from dmafn.spec import voting_modalities
    from pipelines.registry import Registry
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.statistics import BucketStatistics
    from pipelines.storage import Storage
    from pipelines.train import fit_calibration, outlier_reach_ticks, split_dates
    from tests.approx import close

    spec, version, _ = trained
    mv = Registry(spec.registry, Storage()).load(version)
    _, validation = split_dates(spec)
    files = list_inputs(spec, validation, Storage())
    # three entity buckets: the two pumps hash to two of them
    shards = plan_shards(spec, validation, files, shard_bytes=sum(f.size for f in files if f.date in validation) // 3 + 1)
    assert len(shards) == 3
    received, real = [], calibrate.raise_task_error
    monkeypatch.setattr(calibrate, "raise_task_error", lambda ref: received.append(real(ref)) or received[-1])
    monkeypatch.setattr(calibrate, "GATHER_MAX", 64)
    # each shard's task with its bucket's per-entity statistics, the gathered fit below with the whole
    on_workers = fit_calibration(spec, mv.model, BucketStatistics(mv.statistics, keys_sliceable=True), shards)[0].to_dict()
    assert received and not any(isinstance(v, calibrate.ShardPart) for v in received)

    parts = [ray.get(calibrate._score_shard.remote(s, spec, mv.stats, mv.model)[1]) for s in shards]
    keys = np.concatenate([p.groups for p in parts])
    assert len(set(keys)) == 2 and all(len(set(p.groups)) <= 1 for p in parts)     # each pump in one bucket
    order = np.argsort(keys, kind="stable")                                          # parts: time order inside
    raw = RawScores.concatenate([p.raw for p in parts if len(p.groups)], order)   # the camera's held states too
    assert "camera" in raw.held_state
    gathered = Calibration.fit(raw, tuple(spec.modalities), detector=spec.model.detector, vote=spec.model.vote,
                               scale=spec.model.contribution_scale, smoothing=spec.score.smoothing,
                               threshold=spec.score.threshold, voting=voting_modalities(spec.modalities),
                               groups=keys[order], state_baseline=spec.model.state_baseline,
                               outlier_limit=spec.train.validation_outlier_limit,
                               outlier_after=outlier_reach_ticks(spec)).to_dict()
    assert "baseline" in gathered
    # the same but for the order the baseline's normal equations were added in (per shard, then together)
    assert close(on_workers, gathered, 1e-9)
    # training cut the day otherwise: other batch shapes round the model's float32 sums otherwise (~1e-6)
    assert on_workers["threshold"] == pytest.approx(mv.manifest["calibration"]["threshold"], rel=1e-3)


def test_staging_splits_each_file_once_and_deletes_its_pieces_when_no_shard_left_reads_them(local_ray, tmp_path,
                                                                                            tiny_spec):
    """A file of the run's dates is split once, whichever shard asks first (its date's buckets, or the next
    date's as look-back); a look-back day outside the run is read in place; a file's pieces go when the last
    shard reading it is released, a failed shard's dates retried alone keep them; `close` leaves nothing. A bad
    file is named by the split's error."""
    import zlib

    from pipelines.shards import list_inputs, plan_shards
    from pipelines.staging import Staging
    from pipelines.storage import Storage

    spec = replace(tiny_spec, modalities={"proc": replace(tiny_spec.modalities["proc"], path=str(tmp_path / "proc"))},
                   score=replace(tiny_spec.score, output=str(tmp_path / "scores")))
    for day in ("2024-01-01", "2024-01-02", "2024-01-03"):
        start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc)
        folder = tmp_path / "proc" / f"date={day}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"machine_id": [f"pump-{i % 6}" for i in range(60)],
                                 "ts": pa.array([start + dt.timedelta(minutes=i) for i in range(60)],
                                                pa.timestamp("us", tz="UTC")),
                                 "temp": [float(i) for i in range(60)]}), folder / "part-0.parquet")
    dates = [DAY2, DAY3]
    files = list_inputs(spec, dates, Storage())
    shards = plan_shards(spec, dates, files, shard_bytes=max(f.size for f in files) // 4 + 1, days_per_shard=1)
    assert len(shards) == 8 and {s.buckets for s in shards} == {4}
    staging = Staging(spec, Storage(), shards, dates, "run-1")
    run = tmp_path / "scores_staging" / "run-1" / "4buckets"
    day2, day3 = shards[:4], shards[4:]
    assert len(staging.splits(day2[0])) == 1                     # 2024-01-01 is outside the run: read in place
    assert len(staging.splits(day3[0])) == 2 and staging.splits(day3[0])[0] in staging.splits(day2[1])
    resolved = staging.resolve(shards)
    assert all(f.path.startswith(str(run)) for s in resolved for f in s.files if f.date != DAY1)
    held = {zlib.crc32(f"pump-{i}".encode()) % 4 for i in range(6)}
    assert len(list(run.glob("*/bucket=*.parquet"))) == 2 * len(held)     # two files x the buckets with rows
    for shard in day2:
        staging.release(shard)
    assert len(list(run.glob("*"))) == 2                          # 2024-01-02 is 2024-01-03's look-back: kept
    staging.retain(day3[0].alone())                               # a retry of the same dates holds them
    for shard in day3:
        staging.release(shard)
    assert len(list(run.glob("*"))) == 2
    staging.release(day3[0])
    assert len(list(run.glob("*"))) == 0
    staging.close()
    assert not (tmp_path / "scores_staging" / "run-1").exists()

    (tmp_path / "proc" / "date=2024-01-03" / "part-1.parquet").write_bytes(b"PAR1 not parquet")
    files = list_inputs(spec, dates, Storage())
    shards = plan_shards(spec, dates, files, shard_bytes=max(f.size for f in files) // 4 + 1, days_per_shard=1)
    staging = Staging(spec, Storage(), shards, dates, "run-2")
    with pytest.raises(DataError, match=r"date=2024-01-03/part-1\.parquet: not a readable Parquet file"):
        staging.resolve(shards)
    staging.close()


@pytest.mark.slow
def test_a_classifier_trained_through_the_pipeline_ranks_incidents_and_alarms_at_logit_zero(tmp_path, local_ray):
    """The classifier trains on the labelled incidents of its training days. Its batches must mix the window (each
    feature file holds a shard's ticks in time order: read so, a labelled day came as a run of batches of its own, and
    through the CLI the classifier ranked its own training day at 0.73); and a spec that gives no threshold method
    gives it logit 0, not a tail of its validation days' logits, where the incidents lie."""
    import yaml

    from pipelines.align import label_ticks
    from pipelines.labels import read_labels
    from pipelines.registry import Registry
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage
    from pipelines.train import aligned_batches, train
    from dmafn.features import featurize
    from dmafn.metrics import roc_auc
    from dmafn.scoring import raw_scores

    path = write_synthetic(tmp_path, SyntheticConfig(entities=2, days=4, clean_days=2, image_size=16, seed=5))
    data = yaml.safe_load(path.read_text())
    data["model"]["detector"] = "classifier"
    data["modalities"]["camera"].pop("encoding_distance", None)     # a reconstructing detector's
    data["score"].pop("threshold")
    data["train"].update(end="2024-01-04", epochs=4, batch_size=128)   # days 1-3 trained on, 4 validates
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    assert (spec.score.threshold.method, spec.score.threshold.value) == ("fixed", 0.0)
    # trained on the clean days alone: said before any data is read, with where the labels lie and what to do
    from pipelines.storage import DataError
    clean = replace(spec, train=replace(spec.train, end=dt.date(2024, 1, 2)))      # day 1 trained on, 2 validates
    with pytest.raises(DataError, match=r"no labelled anomaly in the training days 2024-01-01..2024-01-01; its "
                                        r"\d+ labelled event\(s\) lie in 2024-01-0[34]..2024-01-0[45] - detector "
                                        r"'classifier' learns from the labelled incidents") as caught:
        train(clean)
    assert "train on days that hold some (train.start, train.end), or choose a detector" in str(caught.value)
    version = train(spec)
    mv = Registry(spec.registry, Storage()).load(version)
    assert mv.manifest["calibration"]["threshold"] == 0.0
    assert not any("nobody labelled" in line for line in mv.manifest["warnings"])
    labels, storage, day = read_labels(spec, Storage()), Storage(), dt.date(2024, 1, 3)
    logits, truth = [], []
    for shard in plan_shards(spec, [day], list_inputs(spec, [day], storage)):
        batches, _, decoded = aligned_batches(shard, spec, storage)[:3]
        for aligned in batches:
            logits.append(raw_scores(mv.model, featurize(aligned.to_arrow(), spec, mv.stats, decoded)).latent)
            truth.append(label_ticks(aligned, labels, spec, spec.labels.start, spec.labels.end)["label"].to_numpy())
    logits, truth = np.concatenate(logits), np.concatenate(truth)
    assert 100 < truth.sum() < len(truth) / 2
    assert roc_auc(logits, truth) > 0.95, roc_auc(logits, truth)


def test_a_classifier_whose_threshold_is_fitted_on_a_tail_is_warned_of_by_train_and_recalibrate(tiny_spec):
    """A tail method on a classifier's validation days, which hold its labelled incidents, sits among them (F1 0.000
    on the demo's 2024-01-06 under its POT); `train` and `recalibrate` say so with the way out."""
    from pipelines.train import classifier_threshold_lines

    days = [DAY2, DAY3]
    classifier = replace(tiny_spec, model=replace(tiny_spec.model, detector="classifier"))
    assert classifier.score.threshold.method == "pot"                # given by hand here, as a spec can
    (line,) = classifier_threshold_lines(classifier, days)
    assert "method 'pot'" in line and "(2024-01-02..2024-01-03)" in line and "fixed at logit 0" in line
    fixed = replace(classifier.score.threshold, method="fixed", value=0.0)
    assert classifier_threshold_lines(replace(classifier, score=replace(classifier.score, threshold=fixed)), days) == []
    assert classifier_threshold_lines(tiny_spec, days) == []          # an autoencoder's tail is its normal ticks'
