"""Production jobs against a moto S3 server: train -> nightly -> backfill -> re-run (skipped) -> --force ->
a backfill killed mid-way and re-run -> concurrent jobs; and `ray job submit` of train, backfill and the
nightly job to a 2-node cluster (`ray start --head` + `ray start --address`) on 127.0.0.1."""
import datetime as dt
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import boto3
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dmafn.spec import load_spec
from dmafn.synthetic import SyntheticConfig
from pipelines.delta_sink import write_partition
from pipelines.generate import write_synthetic
from pipelines.storage import DataError, Storage, list_partitions

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "lake"
DAYS = [dt.date(2024, 1, 3), dt.date(2024, 1, 4), dt.date(2024, 1, 5)]


def _upload(local: Path, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    for path in local.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


@pytest.fixture(scope="module")
def s3_lake(tmp_path_factory, s3_endpoint):
    """The synthetic fleet uploaded to the moto bucket and a spec reading it there (nothing trained)."""
    local = tmp_path_factory.mktemp("s3data")
    spec_path = write_synthetic(local, SyntheticConfig(entities=2, days=5, clean_days=2, image_size=16, seed=5))
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    _upload(local / "raw", BUCKET, "raw")
    _upload(local / "labels", BUCKET, "labels")
    data = yaml.safe_load(spec_path.read_text())
    for m in data["modalities"].values():
        m["path"] = m["path"].replace(str(local), f"s3://{BUCKET}")
    data["labels"]["path"] = f"s3://{BUCKET}/labels"
    data["registry"] = f"s3://{BUCKET}/models"
    data["score"]["output"] = f"s3://{BUCKET}/scores"
    data["train"].update(epochs=1, batch_size=256)
    data["storage"] = {"endpoint_url": s3_endpoint, "region": "us-east-1"}
    s3_spec_path = local / "s3-spec.yaml"
    s3_spec_path.write_text(yaml.safe_dump(data))
    return load_spec(s3_spec_path), s3_spec_path


@pytest.fixture(scope="module")
def s3_spec(s3_lake, local_ray):
    """`s3_lake` with a model trained on it and promoted in the bucket's registry."""
    from pipelines.train import train

    spec, s3_spec_path = s3_lake
    return spec, train(spec), s3_spec_path


def _scores(spec) -> pl.DataFrame:
    storage = Storage.from_spec(spec.storage)
    return pl.read_delta(spec.score.output, storage_options=storage.delta_options(spec.score.output))


def _assert_each_date_once(spec, dates):
    df = _scores(spec)
    for d in dates:
        day = df.filter(pl.col("date") == d.isoformat())
        assert day.height > 0, d
        assert day.select(["machine_id", "ts"]).is_duplicated().sum() == 0, d
    return df


def test_registry_on_s3_has_latest_and_manifest(s3_spec):
    spec, version, _ = s3_spec
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="models/")["Contents"]]
    assert "models/LATEST" in keys
    assert f"models/{version}/weights.pt" in keys and f"models/{version}/manifest.json" in keys
    assert f"models/{version}/entity_statistics.parquet" in keys        # per-entity statistics, read back from S3
    # the training's checkpoints removed (the folder's own marker object may stay)
    assert not [k for k in keys if k.startswith("models/_train_runs/") and k != "models/_train_runs/"]
    from pipelines.registry import Registry

    mv = Registry(spec.registry, Storage.from_spec(spec.storage)).load(version, build=False)
    assert mv.entity_rows is not None and set(mv.stats["modalities"]["process"]["entity"]) == set(mv.statistics.keys())


def test_enrol_a_new_machine_from_s3_as_a_candidate_then_promote_and_roll_back(s3_spec, tmp_path):
    """`enroll` reads its days from S3 and saves the version there; `--no-promote` leaves LATEST, `promote` moves it
    and moves it back (the other tests keep scoring with the trained version)."""
    import shutil
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.enroll import enroll
    from pipelines.registry import Registry

    spec, version, spec_path = s3_spec
    raw = tmp_path / "raw"
    shutil.copytree(spec_path.parent / "raw", raw)
    for path in raw.glob("*/date=2024-01-01/*.parquet"):          # pump-01's training day again, as pump-07
        table = pq.read_table(path)
        twin = table.filter(pc.equal(table.column("machine_id"), "pump-01"))
        keys = pa.array(["pump-07"] * twin.num_rows, table.schema.field("machine_id").type)
        pq.write_table(twin.set_column(twin.schema.get_field_index("machine_id"), "machine_id", keys),
                       path.with_name("twin.parquet"))
    _upload(raw, BUCKET, "raw-enrol")
    moved = replace(spec, modalities={name: replace(m, path=m.path.replace(f"s3://{BUCKET}/raw/",
                                                                          f"s3://{BUCKET}/raw-enrol/"))
                                      for name, m in spec.modalities.items()})
    enrolment = enroll(moved, dt.date(2024, 1, 1), dt.date(2024, 1, 1), version=version, promote=False)
    assert (enrolment.entities, enrolment.named, enrolment.already_held) == (1, ["pump-07"], 2)
    registry = Registry(spec.registry, Storage.from_spec(spec.storage))
    assert registry.latest() == version                              # a candidate
    assert "pump-07" in registry.load(enrolment.version, build=False).statistics.keys()
    assert registry.promote(enrolment.version)[0] == version and registry.latest() == enrolment.version
    assert registry.promote(version)[0] == enrolment.version and registry.latest() == version


def test_nightly_backfill_rerun_and_force(s3_spec, caplog):
    import logging

    from pipelines.score import backfill, score_date
    from pipelines.shards import bytes_by_date, list_inputs

    spec, version, _ = s3_spec
    nightly = score_date(spec, DAYS[0])
    assert nightly.ticks_in == nightly.rows_scored + nightly.rows_quarantined
    results = backfill(spec, DAYS[0], DAYS[-1])
    assert [r.date for r in results] == ["2024-01-04", "2024-01-05"]      # the nightly's date is skipped
    counts = _assert_each_date_once(spec, DAYS).group_by("date").len().sort("date")
    assert backfill(spec, DAYS[0], DAYS[-1]) == []                         # everything already scored
    # a file uploaded late into a scored date's partition without a row: its rows are read on S3 and found the same,
    # the date left as scored (recorded relisted)
    s3 = boto3.client("s3")
    first = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"raw/logs/date={DAYS[1]}/")["Contents"][0]["Key"]
    held = s3.get_object(Bucket=BUCKET, Key=first)["Body"].read()
    sink = pa.BufferOutputStream()
    pq.write_table(pq.read_table(pa.BufferReader(held)).slice(0, 0), sink)
    s3.put_object(Bucket=BUCKET, Key=f"raw/logs/date={DAYS[1]}/late-upload.parquet", Body=sink.getvalue().to_pybytes())
    caplog.set_level(logging.INFO, logger="pipelines.score")
    assert backfill(spec, DAYS[0], DAYS[-1]) == []
    assert f"1 date(s) whose files were rewritten since model {version} scored them hold the same rows" in caplog.text
    # a copy of a file uploaded again (its lines quarantined as redelivered): that date and the next are rescored
    s3.put_object(Bucket=BUCKET, Key=f"raw/logs/date={DAYS[1]}/uploaded-again.parquet", Body=held)
    rescored = backfill(spec, DAYS[0], DAYS[-1])
    assert [r.date for r in rescored] == [DAYS[1].isoformat(), DAYS[2].isoformat()]   # and the next: its look-back
    assert f"rescoring 1 date(s) whose partitions changed since model {version} scored them: {DAYS[1]} (logs; " \
        in caplog.text
    assert [(r.ticks_in, r.rows_scored, r.anomalies) for r in rescored] == \
        [(r.ticks_in, r.rows_scored, r.anomalies) for r in results]
    assert backfill(spec, DAYS[0], DAYS[-1]) == []
    s3.delete_object(Bucket=BUCKET, Key=f"raw/logs/date={DAYS[1]}/uploaded-again.parquet")   # the lake as uploaded
    # forced in four entity buckets: the files are split by bucket on S3 first, the pieces deleted afterwards
    files = list_inputs(spec, DAYS, Storage.from_spec(spec.storage))
    assert all(f.mtime_ns for f in files)                               # S3's LastModified, listed
    forced = backfill(spec, DAYS[0], DAYS[-1], force=True,
                      shard_bytes=max(bytes_by_date(files).values()) // 4 + 1)
    assert len(forced) == 3
    again = _assert_each_date_once(spec, DAYS).group_by("date").len().sort("date")
    assert again.equals(counts)
    assert [(r.ticks_in, r.rows_scored, r.anomalies) for r in forced[1:]] == \
        [(r.ticks_in, r.rows_scored, r.anomalies) for r in results]
    assert re.search(r"(^|\s)[1-9]\d* file\(s\) checked for a split by entity bucket", caplog.text)
    left = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="scores_staging/").get("Contents", [])
    assert [o["Key"] for o in left] in ([], ["scores_staging/"])        # at most pyarrow's folder marker
    runs = pl.read_delta(spec.score.runs_path, storage_options=Storage.from_spec(spec.storage)
                         .delta_options(spec.score.runs_path))
    assert (runs["ticks_in"] == runs["rows_scored"] + runs["rows_quarantined"]).all()
    assert set(runs["status"]) == {"succeeded", "relisted"}


def test_evaluate_and_report_read_the_scores_on_s3_a_date_at_a_time(s3_spec, tmp_path):
    """`evaluate` and `report` list the output table's dates from its log and read each date's partition from S3:
    every scored tick counted once, the runs table's rows of those dates on the page."""
    from pipelines.evaluate import evaluate
    from pipelines.report import build_report
    from pipelines.score import backfill

    spec, _, _ = s3_spec
    backfill(spec, DAYS[0], DAYS[-1])
    scored = _scores(spec).filter(pl.col("date").is_in([d.isoformat() for d in DAYS]))
    result = evaluate(spec, start=DAYS[0], end=DAYS[-1], report_dir=str(tmp_path / "eval"))
    assert result["ticks"] == scored.height and result["dates"] == [d.isoformat() for d in DAYS]
    assert result["overall"]["fused"]["roc_auc"] > 0.5 and (tmp_path / "eval" / "scores.png").exists()
    page = build_report(spec, tmp_path / "r.html", start=DAYS[0], end=DAYS[-1]).read_text()
    assert f"{scored.height:,}" in page and 'id="runs-table"' in page and 'id="kind-metrics"' in page
    # `dmafn alarms` reads the same partitions: its events hold every alarm tick of the window
    from pipelines.alarms import alarm_events
    found = alarm_events(spec, start=DAYS[0], end=DAYS[-1])
    alarm_ticks = int(scored["is_anomaly"].sum())
    assert alarm_ticks and alarm_ticks <= sum(e["ticks"] for e in found.events)
    assert all(e["end"] >= DAYS[0].isoformat() for e in found.events)
    # `status` lists the registry's versions on S3 (not its `_train_runs` checkpoints) and reads the runs table there
    from pipelines.registry import Registry
    from pipelines.status import scoring_status

    registry = Registry(spec.registry, Storage.from_spec(spec.storage))
    versions = registry.versions()
    assert registry.latest() in versions and not any(v.startswith("_") for v in versions)
    text = scoring_status(spec, Storage.from_spec(spec.storage), today=DAYS[-1]).text()
    assert f"model versions: {len(versions)} in {spec.registry}; LATEST {registry.latest()} (created " in text
    assert re.search(rf"scored: \d+ date\(s\), \S+ \.\. {DAYS[-1].isoformat()} ", text), text
    assert f"\n{DAYS[-1].isoformat()}  succeeded  " in text


def test_profile_reads_the_history_on_s3(s3_spec):
    """`profile` lists and reads the modality files on S3 (both passes in Ray tasks): the same table as over the
    local copy they were uploaded from."""
    from pipelines.profile import profile

    spec, _, spec_path = s3_spec
    on_s3 = profile(spec, DAYS[0], DAYS[-1])
    here = profile(load_spec(spec_path.parent / "spec.yaml"), DAYS[0], DAYS[-1])
    assert on_s3.height == 4 * len(DAYS) and on_s3["rows"].sum() > 0
    assert on_s3.drop("median_period_s").equals(here.drop("median_period_s"))
    assert on_s3["median_period_s"].to_list() == pytest.approx(here["median_period_s"].to_list(), rel=1e-12)


def test_backfill_killed_midway_then_rerun(s3_spec, local_ray):
    from pipelines.score import backfill

    spec, version, spec_path = s3_spec
    before = _scores(spec).group_by("date").len().sort("date")
    runs_uri = spec.score.runs_path
    opts = Storage.from_spec(spec.storage).delta_options(runs_uri)
    n_runs = pl.read_delta(runs_uri, storage_options=opts).height
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.backfill", str(spec_path), "--start", "2024-01-03",
                             "--end", "2024-01-05", "--force", "--parallel", "1", "--days-per-shard", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while pl.read_delta(runs_uri, storage_options=opts).height == n_runs:   # wait for the first date's commit
        assert proc.poll() is None and time.time() < deadline, "backfill ended before any commit"
        time.sleep(0.5)
    proc.kill()                                                           # killed mid-way
    proc.wait()
    backfill(spec, DAYS[0], DAYS[-1])                                     # the re-run finishes the rest
    after = _assert_each_date_once(spec, DAYS).group_by("date").len().sort("date")
    assert after.equals(before)                                           # none lost, none duplicated


def test_concurrent_jobs_on_different_and_same_dates(s3_spec):
    from pipelines.score import score_date

    spec, _, _ = s3_spec
    before = _scores(spec).group_by("date").len().sort("date")
    errors = []

    def run(day):
        try:
            score_date(spec, day)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in (DAYS[1], DAYS[2], DAYS[1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    after = _assert_each_date_once(spec, DAYS).group_by("date").len().sort("date")
    assert after.equals(before)


def test_storage_retries_reach_each_s3_client_alike():
    """`storage.retries`: how many times pyarrow and boto3 try a failed request again (each counting the first
    attempt its own way), and for how long deltalake's object store does (its own default: up to 3 minutes)."""
    from dmafn.spec import SpecError, StorageSpec, parse_spec
    from tests.conftest import tiny_spec_dict

    spec = parse_spec({**tiny_spec_dict(), "storage": {"timeout_s": 10, "retries": 3}})
    storage = Storage.from_spec(spec.storage)
    assert storage.retries == 3 and Storage.from_spec(StorageSpec()).retries == 1
    options = storage.delta_options("s3://lake/t")
    assert options["retry_timeout"] == "40s" and "max_retries" not in options      # Polars reads that key itself
    assert storage.boto3_client().meta.config.retries == {"total_max_attempts": 4, "mode": "standard"}
    assert storage.filesystem("s3://lake/t") is not None
    with pytest.raises(SpecError, match="storage.retries': 21 is outside"):
        parse_spec({**tiny_spec_dict(), "storage": {"retries": 21}})


def test_unreachable_endpoint_is_a_clear_error_before_any_write(s3_spec, tmp_path):
    from pipelines.shards import list_inputs

    spec, _, _ = s3_spec
    broken = replace(spec, storage=replace(spec.storage, endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(DataError, match=r"s3://lake/raw/.*cannot be read"):
        list_inputs(broken, [DAYS[0]], Storage.from_spec(broken.storage))


def test_an_endpoint_that_never_answers_fails_within_the_storage_timeout(s3_spec):
    """A server that accepts connections and never answers: listing the inputs fails with a DataError after
    the spec's `storage.timeout_s` (and one retry), not after minutes."""
    import socket

    from pipelines.shards import list_inputs

    spec, _, _ = s3_spec
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])              # held open, never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    silent = replace(spec, storage=replace(spec.storage, endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}",
                                           timeout_s=1.0))
    started = time.monotonic()
    try:
        with pytest.raises(DataError, match=r"s3://lake/raw/.*cannot be read"):
            list_inputs(silent, [DAYS[0]], Storage.from_spec(silent.storage))
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()
    assert accepted, "the client never connected"
    assert time.monotonic() - started < 30


def test_a_table_under_a_key_with_a_space_is_read_on_s3(s3_endpoint):
    """`delta_sink.scan_table` reads a Delta table on S3 whose key holds a space and a letter beyond ASCII (through
    deltalake's pyarrow dataset, with the same storage options) as one under a plain key."""
    from dmafn.spec import StorageSpec
    from pipelines.delta_sink import scan_table, write_partition

    boto3.client("s3").create_bucket(Bucket="spaced")
    storage = Storage.from_spec(StorageSpec(endpoint_url=s3_endpoint, region="us-east-1"))
    for key in ("plain/scores", "Pumpen Daten \u00fc/scores"):
        uri = f"s3://spaced/{key}"
        options = storage.delta_options(uri)
        write_partition(uri, pa.table({"m": ["a", "b"], "v": [1.0, 2.0], "date": ["2024-01-02"] * 2}),
                        date="2024-01-02", mode="replace_date", storage_options=options)
        read = scan_table(uri, options).filter(pl.col("date") == "2024-01-02").collect()
        assert read.sort("m")["v"].to_list() == [1.0, 2.0], key


def test_partitions_laid_out_as_year_month_day_prefixes_are_listed_on_s3(s3_endpoint):
    """S3 has no folders, only key prefixes: a `%Y/%m/%d` layout is found level by level there too, only the years and
    months that can hold the dates asked are listed, and a failed Spark job's `_temporary/` files are not read; a
    layout with a folder per machine first (`machine_id=*/date=%Y-%m-%d`) gives a date each machine's folder."""
    from dmafn.spec import StorageSpec
    from pipelines.parquet_files import list_parquet_files

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="layouts")
    for key in ("2023/12/31/part-0.parquet", "2024/01/05/part-0.parquet", "2024/01/05/hour=13/part-1.parquet",
                "2024/01/05/_temporary/0/part-9.parquet", "2024/01/06/part-0.parquet", "2024/02/01/part-0.parquet",
                "_staging/part-0.parquet", "2024/notes/readme.txt"):
        s3.put_object(Bucket="layouts", Key=f"process/{key}", Body=b"x")
    storage = Storage.from_spec(StorageSpec(endpoint_url=s3_endpoint, region="us-east-1"))
    everything = list_partitions(storage, "s3://layouts/process", "%Y/%m/%d")
    assert sorted(d.isoformat() for d in everything) == ["2023-12-31", "2024-01-05", "2024-01-06", "2024-02-01"]
    wanted = list_partitions(storage, "s3://layouts/process", "%Y/%m/%d", (dt.date(2024, 1, 5), dt.date(2024, 1, 5)))
    assert wanted == {dt.date(2024, 1, 5): [("layouts/process/2024/01/05", "", None)]}
    files = list_parquet_files(storage.filesystem("s3://layouts/process"), wanted)
    assert [f.name for f in files] == ["hour=13/part-1.parquet", "part-0.parquet"]
    for key in ("machine_id=b/date=2024-01-05/part-0.parquet", "machine_id=a/date=2024-01-05/part-0.parquet",
                "machine_id=a/date=2024-01-06/part-0.parquet", "backup/date=2024-01-05/part-0.parquet"):
        s3.put_object(Bucket="layouts", Key=f"by_machine/{key}", Body=b"x")      # a folder per machine first
    per_machine = list_partitions(storage, "s3://layouts/by_machine", "machine_id=*/date=%Y-%m-%d",
                                  (dt.date(2024, 1, 5), dt.date(2024, 1, 5)))
    assert {d: sorted(f[:2] for f in held) for d, held in per_machine.items()} == {dt.date(2024, 1, 5): [
        ("layouts/by_machine/machine_id=a/date=2024-01-05", "machine_id=a/"),
        ("layouts/by_machine/machine_id=b/date=2024-01-05", "machine_id=b/")]}
    files = list_parquet_files(storage.filesystem("s3://layouts/by_machine"), per_machine)
    assert [f.name for f in files] == ["machine_id=a/part-0.parquet", "machine_id=b/part-0.parquet"]
    whole = list_partitions(storage, "s3://layouts/by_machine", "machine_id=*/date=%Y-%m-%d", whole=True)  # once each
    assert sorted(whole) == [dt.date(2024, 1, 5), dt.date(2024, 1, 6)]
    assert list_parquet_files(storage.filesystem("s3://layouts/by_machine"), {d: whole[d] for d in [
        dt.date(2024, 1, 5)]}) == files


def test_schema_evolution_adds_a_column_and_old_rows_keep_null(tmp_path):
    uri = str(tmp_path / "scores")
    old = pa.table({"date": ["2024-01-01"], "score": [1.0], "score_a": [0.5]})
    new = pa.table({"date": ["2024-01-02"], "score": [2.0], "score_a": [0.1], "score_b": [0.7]})
    write_partition(uri, old, date="2024-01-01", mode="replace_date")
    write_partition(uri, new, date="2024-01-02", mode="replace_date")
    df = pl.read_delta(uri).sort("date")
    assert df["score_b"].to_list() == [None, 0.7]


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_cluster(temp: Path, gcs_port: int) -> None:
    """Stop only the processes of the cluster started with --temp-dir=temp and --port=gcs_port (`ray stop`
    would also stop the test session's own Ray), with their children (the agents rename themselves
    `ray::DashboardAgent` etc., so their command lines no longer name the temp dir), then check none is left."""
    import psutil

    def marked(part: str) -> bool:
        return str(temp) in part or part.endswith(f":{gcs_port}")        # e.g. --address=IP:PORT

    def ours():
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marked(part) for part in (p.info["cmdline"] or [])):
                    found[p.pid] = p
                    found.update({c.pid: c for c in p.children(recursive=True)})
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return list(found.values())

    for p in ours():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours(), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(temp, ignore_errors=True)
    assert not ours(), "processes of the submitted-to cluster are left running"


STARTUP_TIMEOUT = "timed out during startup"   # `ray start`: its raylet not registered within Ray's fixed 30 s


def _ray_start(ray_bin: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    # the test session's own Ray holds the default agent ports
    ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    return subprocess.run([str(ray_bin), "start", *args, *ports, "--disable-usage-stats"], env=env,
                          capture_output=True, text=True, timeout=120)


def _start_cluster(ray_bin: Path, env: dict, temp: Path, gcs_port: int, dash: int) -> None:
    """A head and a second node of one CPU each. On a loaded 2-core machine a node's raylet can miss Ray's fixed
    30 s to register (seen once in CI beside the test session's own Ray): that cluster is stopped and started
    once more; any other failure fails at once."""
    for attempt in (1, 2):
        started = _ray_start(ray_bin, env, "--head", "--num-cpus=1", f"--port={gcs_port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             f"--temp-dir={temp}", f"--ray-client-server-port={_free_port()}")
        if started.returncode == 0:
            started = _ray_start(ray_bin, env, f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1",
                                 '--resources={"node2": 1}')
        if started.returncode == 0:
            return
        if attempt == 1 and STARTUP_TIMEOUT in started.stderr:
            _stop_cluster(temp, gcs_port)
            continue
        raise AssertionError(started.stderr[-2000:])


def _submit(ray_bin: Path, env: dict, dash: int, *entrypoint: str) -> str:
    deadline = time.time() + 90
    while True:   # right after `ray start` the job agent may not be up yet
        try:
            submit = subprocess.run(
                [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".", "--",
                 "python", "-m", *entrypoint], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        except subprocess.TimeoutExpired as exc:      # say where the job stood (seen once: no log line in 400 s)
            jobs = subprocess.run([str(ray_bin), "job", "list", f"--address=http://127.0.0.1:{dash}"], env=env,
                                  capture_output=True, text=True, timeout=60)
            said = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o
                           for o in (exc.stdout or b"", exc.stderr or b""))
            raise AssertionError(f"`ray job submit {' '.join(entrypoint)}` still running after 400 s; its output:\n"
                                 f"{said[-2000:]}\nthe cluster's jobs:\n{(jobs.stdout + jobs.stderr)[-3000:]}") from None
        if "No available agent" not in submit.stdout + submit.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    return submit.stdout


def _nodes(ray_bin: Path, env: dict, dash: int, kind: str, where: str) -> set[str]:
    """The node ids of the cluster's `kind` (actors, tasks) matching `where`, from Ray's state API."""
    import json

    listed = subprocess.run([str(ray_bin), "list", kind, f"--address=http://127.0.0.1:{dash}", f"--filter={where}",
                             "--limit=1000", "--format=json"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr[-2000:]
    return {row["node_id"] for row in json.loads(listed.stdout)}


@pytest.mark.slow
def test_ray_job_submit_train_backfill_nightly_on_a_two_node_cluster(s3_lake, tmp_path):
    """A 2-node Ray cluster on 127.0.0.1 (a head and a second `ray start --address` with its own resource, one
    CPU each): `ray job submit` of train, backfill and the nightly job; the Train workers and the scoring
    tasks ran on both nodes. Its jobs train their own model: the test session's Ray is not needed."""
    spec, spec_path = s3_lake
    ray_bin = Path(sys.executable).parent / "ray"
    # `python` in the job's entrypoint must be this environment's, as on a cluster built from our image
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dash, gcs_port = _free_port(), _free_port()
    temp = Path("/tmp") / f"rayjob-{secrets.token_hex(3)}"
    data = yaml.safe_load(spec_path.read_text())
    data["registry"] = f"s3://{BUCKET}/cluster-models"
    data["score"]["output"] = f"s3://{BUCKET}/cluster-scores"
    job_spec = replace(load_spec(spec_path), registry=data["registry"],
                       score=replace(spec.score, output=data["score"]["output"]))
    try:
        _start_cluster(ray_bin, env, temp, gcs_port, dash)
        (ROOT / ".ci-job-spec.yaml").write_text(yaml.safe_dump(data))
        assert "model version" in _submit(ray_bin, env, dash, "jobs.train", ".ci-job-spec.yaml")
        out = _submit(ray_bin, env, dash, "jobs.backfill", ".ci-job-spec.yaml", "--start", "2024-01-03",
                      "--end", "2024-01-04", "--days-per-shard", "1")
        assert "2024-01-03:" in out and "2024-01-04:" in out
        out = _submit(ray_bin, env, dash, "jobs.nightly", ".ci-job-spec.yaml", "--date", "2024-01-05")
        assert "2024-01-05:" in out and "scored" in out
        train_nodes = _nodes(ray_bin, env, dash, "actors", "class_name=RayTrainWorker")
        shard_nodes = _nodes(ray_bin, env, dash, "tasks", "name=_score_shard_task")
        assert len(train_nodes) == 2, train_nodes        # 0.75 CPU per Train worker: one per 1-CPU node
        assert len(shard_nodes) == 2, shard_nodes
    finally:
        (ROOT / ".ci-job-spec.yaml").unlink(missing_ok=True)
        _stop_cluster(temp, gcs_port)
    runs = pl.read_delta(job_spec.score.runs_path, storage_options=Storage.from_spec(spec.storage)
                         .delta_options(job_spec.score.runs_path))
    assert sorted(runs["date"].to_list()) == ["2024-01-03", "2024-01-04", "2024-01-05"]
    assert set(runs["status"]) == {"succeeded"}
    _assert_each_date_once(job_spec, DAYS)


def test_a_delta_input_table_on_s3_is_listed_by_its_log(s3_endpoint):
    """A modality table kept as a Delta table in a bucket: after a date was overwritten (the replaced file stays
    until VACUUM) the listing takes only the file its log holds - the log read through deltalake's object store, the
    files through pyarrow's S3 filesystem, their paths matched inside the table's prefix; a deletion vector then
    written in the bucket is decoded by delta-rs and its row is not read."""
    from deltalake import DeltaTable, write_deltalake

    from dmafn.spec import StorageSpec
    from pipelines.parquet_files import RowTimes, each_row_group, list_table_files, open_parquet
    from tests.deletion_vectors import deletion_commit, latest_add, vector_in_a_file

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="deltalake-input")
    storage = Storage.from_spec(StorageSpec(endpoint_url=s3_endpoint, region="us-east-1"))
    path = "s3://deltalake-input/raw/process"
    options = storage.delta_options(path)
    rows = pa.table({"date": ["2024-01-05"] * 2, "machine_id": ["a", "b"], "temp": [1.0, 2.0]})
    write_deltalake(path, rows, partition_by=["date"], storage_options=options)
    write_deltalake(path, rows.slice(0, 1), partition_by=["date"], mode="overwrite", predicate="date = '2024-01-05'",
                    storage_options=options)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="deltalake-input", Prefix="raw/process/date=")["Contents"]]
    assert len(keys) == 2
    listed = list_table_files(storage, path, "date")
    folders, files = listed.folders, listed.files
    assert list(folders) == [dt.date(2024, 1, 5)] and len(files) == 1 and listed.delta and len(listed.replaced) == 1
    live = DeltaTable(path, storage_options=options).file_uris()
    assert live == [f"s3://{files[0].path}"]
    # a DELETE in place: a deletion vector in a file beside the data, read by delta-rs from the bucket
    log = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="deltalake-input", Prefix="raw/process/_delta_log/")[
        "Contents"] if o["Key"].endswith(".json"))
    commits = [s3.get_object(Bucket="deltalake-input", Key=k)["Body"].read().decode() for k in log]
    vector, name, blob = vector_in_a_file([0])
    s3.put_object(Bucket="deltalake-input", Key=f"raw/process/{name}", Body=blob)
    s3.put_object(Bucket="deltalake-input", Key=f"raw/process/_delta_log/{len(log):020d}.json",
                  Body=deletion_commit(latest_add(commits, files[0].path.rsplit("/", 1)[1]), vector).encode())
    (marked,) = list_table_files(storage, path, "date").files
    assert marked.path == files[0].path and marked.deleted.count == 1
    with open_parquet(storage.filesystem(path), marked.path) as parquet:
        assert parquet.metadata.num_rows == 1
        assert pa.concat_tables(each_row_group(parquet, marked.path, ["temp"], deleted=marked.deleted)).num_rows == 0
    # column mapping: listed from the log alone (random folder names), the columns read by their physical names
    mapped = "s3://deltalake-input/raw/mapped"
    write_deltalake(mapped, rows, partition_by=["date", "machine_id"], storage_options=options,
                    configuration={"delta.columnMapping.mode": "name"})
    found = sorted(list_table_files(storage, mapped, "date").files, key=lambda f: f.name)   # random folders
    assert [f.name.split("/")[0] for f in found] == ["machine_id=a", "machine_id=b"] and {f.date for f in found} == {
        "2024-01-05"}
    with open_parquet(storage.filesystem(mapped), found[1].path) as parquet:
        physical = dict(found[1].stored_names)["temp"]
        assert pa.concat_tables(each_row_group(parquet, found[1].path, [physical])).column(0).to_pylist() == [2.0]
    # not partitioned by the date: listed by the time statistics its log keeps
    clustered = "s3://deltalake-input/raw/clustered"
    write_deltalake(clustered, pa.table({"machine_id": ["a", "b"], "ts": pa.array(
        [1_704_412_800_000_000, 1_704_499_200_000_000], pa.timestamp("us", tz="UTC")), "temp": [1.0, 2.0]}),
        storage_options=options)                                       # 2024-01-05 00:00 and 2024-01-06 00:00
    days = [dt.date(2024, 1, 5), dt.date(2024, 1, 6)]
    spanning = list_table_files(storage, clustered, "date", days, RowTimes("ts")).files
    assert [(f.date, f.span) for f in spanning] == [("2024-01-05", ("2024-01-05", "2024-01-06")),
                                                    ("2024-01-06", ("2024-01-05", "2024-01-06"))]
    assert spanning[0].path.startswith("deltalake-input/raw/clustered/part-")
    assert list(list_table_files(storage, clustered, "date", None, RowTimes("ts")).folders) == days


def test_payload_files_in_a_bucket_are_read_for_the_rows_a_shard_keeps(s3_endpoint, tiny_spec):
    """`payload: file` on S3: a camera table in the bucket names each frame's object by its URI (s3a://, as Spark
    writes it) or by a key under `payload_root`; the shard reads those objects (a missing one quarantined, naming
    it), and the planner sizes the date by their bytes (`payload_bytes`, from a sample of HEAD requests)."""
    import io

    from PIL import Image

    from dmafn.spec import StorageSpec
    from pipelines.ingest import read_shard
    from pipelines.shards import list_inputs, plan_shards

    def png(value: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pa.array([value] * 256, pa.uint8()).to_numpy().reshape(16, 16)).save(out, format="PNG")
        return out.getvalue()

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="frames")
    for key, value in (("cam/a/1.png", 10), ("cam/a/2.png", 20)):
        s3.put_object(Bucket="frames", Key=key, Body=png(value))
    storage_spec = StorageSpec(endpoint_url=s3_endpoint, region="us-east-1")
    cam = replace(tiny_spec.modalities["cam"], path="s3://frames/raw/cam", payload="file",
                  payload_root="s3://frames/cam")
    spec = replace(tiny_spec, modalities={"cam": cam}, storage=storage_spec)
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    table = pa.table({"machine_id": ["a"] * 3, "ts": pa.array([day + i * 60_000_000 for i in (1, 2, 3)],
                                                              pa.timestamp("us", tz="UTC")),
                      "frame": ["a/1.png", "s3a://frames/cam/a/2.png", "a/gone.png"]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    s3.put_object(Bucket="frames", Key="raw/cam/date=2024-01-02/part-0.parquet", Body=sink.getvalue().to_pybytes())
    storage = Storage.from_spec(storage_spec)
    files = list_inputs(spec, [dt.date(2024, 1, 2)], storage)
    (listed,) = files
    assert listed.payload_bytes == int(listed.size * (3 * (len(png(10)) + len(png(20))) / 2 / listed.size))
    (shard,) = plan_shards(spec, [dt.date(2024, 1, 2)], files)
    got = read_shard(shard, spec, storage)
    assert sorted(got.tables["cam"]["frame"].to_list()) == sorted([png(10), png(20)])
    (reason,) = got.quarantined["reason"].to_list()
    assert reason.startswith("image file 's3://frames/cam/a/gone.png' in column 'frame' cannot be read (")
