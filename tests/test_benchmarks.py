"""The SKAB benchmark's pooling, checked against hand-computed confusion matrices."""
import numpy as np
import polars as pl
import pytest

from benchmarks.skab import FileSplit, pooled


def _split(name, train_labels, test_labels):
    return FileSplit(name, pl.DataFrame({"anomaly": train_labels}), pl.DataFrame({"anomaly": test_labels}), {})


def test_skab_pools_test_parts_and_whole_files_as_its_leaderboard_does():
    splits = [_split("a", [0, 0, 0, 1], [1, 1, 0, 0]), _split("b", [0, 0], [1, 0])]
    test_preds = [np.array([1, 0, 1, 0], bool), np.array([1, 0], bool)]
    train_preds = [np.array([0, 1, 0, 0], bool), np.array([0, 0], bool)]
    margins = [np.where(p, 1.0, -1.0) for p in test_preds]
    r = pooled(test_preds, margins, margins, splits, train_preds, [np.where(p, 1.0, -1.0) for p in train_preds])
    # test parts: TP 2, FN 1, FP 1, TN 2
    assert (r["f1"], r["far"], r["mar"]) == pytest.approx((2 / 3, 100 / 3, 100 / 3))
    # whole files add the training rows: TP 0, FN 1, FP 1, TN 4 -> TP 2, FN 2, FP 2, TN 6
    whole = r["leaderboard_evaluation"]
    assert (whole["f1"], whole["far"], whole["mar"]) == pytest.approx((0.5, 25.0, 50.0))
    assert set(r["roc_auc_by_file"]) == {"a", "b"}


def test_skab_transform_auto_is_chosen_across_files_from_training_rows_only(tmp_path):
    """Thermal channels that warm up through every file's training rows are centered, the others keep their
    level; the labels play no part (they are made to disagree with the drift)."""
    import pandas as pd
    import pyarrow.dataset as pads

    from benchmarks.skab import GROUPS, file_splits, load_files, transforms_chosen, write_lake
    from dmafn.spec import load_spec
    from pipelines.align import alignment_input

    rng = np.random.default_rng(0)
    for folder, k in (("valve1", 0), ("valve2", 1), ("other", 2)):
        (tmp_path / "skab" / folder).mkdir(parents=True)
        n = 450
        frame = pd.DataFrame({"datetime": pd.date_range(f"2020-03-0{k + 1} 10:00", periods=n, freq="1s")})
        for c in sum(GROUPS.values(), []):
            frame[c] = rng.normal(size=n) + (np.arange(n) / 40 if c in GROUPS["thermal"] else 0)
        frame["anomaly"], frame["changepoint"] = (np.arange(n) < 200).astype(float), 0.0
        frame.to_csv(tmp_path / "skab" / folder / f"{k}.csv", sep=";", index=False)
    files = load_files(tmp_path / "skab")
    spec = load_spec(write_lake(files, tmp_path / "lake", 10, None, {g: "auto" for g in GROUPS}))
    tables = {name: alignment_input(pl.from_arrow(pads.dataset(m.path, format="parquet", partitioning="hive")
                                                  .to_table()), spec, m) for name, m in spec.modalities.items()}
    splits = file_splits(spec, files, tables)
    chosen = transforms_chosen(spec, splits)
    assert chosen["thermal.Temperature"] == {"centered": 3} and chosen["thermal.Thermocouple"] == {"centered": 3}
    assert all(c == {"level": 3} for name, c in chosen.items() if not name.startswith("thermal."))
    assert [len(f.train) for f in splits] == [400] * 3 and [len(f.test) for f in splits] == [50] * 3


def test_the_synthetic_split_reads_the_generated_specs_context_views():
    """The fusion and forward benchmarks' data: every modality of the generated spec, its slow context views
    included (each reads its parent's rows), featurized for train and test; they failed on a KeyError once
    the generated spec grew a context view."""
    from benchmarks.common import synthetic_split
    from dmafn.synthetic import SyntheticConfig

    split = synthetic_split(SyntheticConfig(entities=1, days=2, clean_days=1, image_size=8))
    contexts = [m for m, spec in split.spec.modalities.items() if spec.context_of]
    assert contexts and set(split.test.modalities) == set(split.spec.modalities)
    for features in (split.train, split.test):                   # a relation-only view speaks through its relations
        i = features.modalities.index(contexts[0])
        assert features.relation_errors is not None and np.isfinite(features.relation_errors[:, i]).any()
    assert len(split.labels) == len(split.test.mask) > 0
    # what a modality alone may see: the same inputs, each relation within its own modality (no peers' values)
    parent = split.test.modalities.index(split.spec.modalities[contexts[0]].context_of)
    for full, within in ((split.train, split.train_within), (split.test, split.test_within)):
        assert within.inputs is full.inputs and (within.mask == full.mask).all()
        assert not np.allclose(within.relation_errors[:, parent], full.relation_errors[:, parent])
    # a subset keeps the operating state its modalities own: a modality alone has only its own levels (none of
    # which its baseline reads), the whole fleet every column
    from benchmarks.common import subset

    assert subset(split.test, split.test.modalities).state_owners == split.test.state_owners
    alone = subset(split.test, ("vibration",))
    assert set(alone.state_owners) <= {"vibration", "vibration.rising"}
    assert (alone.state is None) == (not alone.state_owners)
    # ... and the channels each tick holds, which the model's errors and its training's channel dropout read
    assert set(alone.channels) == {"vibration"} and alone.channels["vibration"] is split.test.channels["vibration"]
    # ... and when each payload's row was taken, with the ticks' groups (`hold_payload_errors` reads both)
    camera = subset(split.test, ("camera",))
    assert camera.taken["camera"] is split.test.taken["camera"] and camera.groups is split.test.groups


def test_the_entity_statistics_benchmark_cuts_the_same_statistics_three_ways(tmp_path):
    """The registry's cut, the bare loop and the old manifest's cut give each bucket the same statistics, with only
    its entities' parts (`make bench-entity-statistics` exits when they differ)."""
    from benchmarks.entity_statistics import run_bare, run_before, run_registry, save_versions
    from pipelines.registry import Registry
    from pipelines.shards import bucket_of
    from pipelines.storage import Storage

    sizes = save_versions(tmp_path, 40)
    assert sizes["entity_file_mb"] > 0 and (tmp_path / "before" / sizes["version"] / "manifest.json").exists()
    cuts = [run(tmp_path, 4) for run in (run_registry, run_bare, run_before)]
    digests = [cut["digests"] for cut in cuts]
    assert digests[0] == digests[1] == digests[2] and len(set(digests[0])) == 4
    mv = Registry(str(tmp_path / "now"), Storage()).load(build=False)
    assert len(mv.statistics.keys()) == 40
    bucket = [k for k in mv.statistics.keys() if bucket_of(k, 4) == 1]
    assert set(mv.statistics.for_keys(bucket)["modalities"]["process"]["entity"]) == set(bucket)


def test_the_relation_width_benchmark_fits_the_same_weights_shared_and_per_channel(tmp_path):
    """`benchmarks.relation_width` at a tiny size: the shared accumulator and one per channel give the same weights
    (it exits when they differ), each way timed, and the JSON written."""
    from benchmarks.relation_width import main

    result = main(["--channels", "3", "--ticks", "3000", "--entities", "4", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["quantities"] == 3 * 6 + 6 and row["largest_weight_difference"] < 1e-6
    assert {"seconds", "peak_mb"} <= set(row["shared"]) and (tmp_path / "relation_width.json").exists()


def test_the_dead_tags_benchmark_scores_each_rate_and_dead_count_on_the_pipelines_detector():
    """`make bench-dead-tags` on a tiny table: per channel-dropout rate and number of dead tags, the normal ticks'
    false alarms (%) and the ROC-AUC of one live tag off its relation."""
    from benchmarks.dead_tags import run

    found = run(5, [0.0, 0.5], draws=1, epochs=1, train_ticks=300, test_ticks=200)
    assert set(found) == {"0.0", "0.5"} and set(found["0.0"]) == {"0", "1", "3"}          # 5 of 5 would leave none
    for by_dead in found.values():
        for v in by_dead.values():
            assert 0 <= v["false_alarm_pct"] <= 100 and 0 <= v["roc_auc"] <= 1


def test_the_dead_tag_relations_benchmark_keeps_a_relation_error_while_tags_are_dead():
    """`make bench-dead-tag-relations` on a tiny table: per number of dead tags the relation error's ROC-AUC and
    the normal ticks' mean error with the kept covariance, and without it (before: alone, no error at all while a
    tag is dead, so 0.5 and 0; beside a peer, the peer alone), and `featurize`'s cost against every tag there."""
    from benchmarks.dead_tag_relations import run

    found = run(6, 400)
    assert set(found) == {"0", "1", "3", "5"}
    assert found["0"]["roc_auc"] == found["0"]["roc_auc_before"] > 0.6
    for count in ("1", "3"):
        assert found[count]["roc_auc"] > 0.6 and found[count]["roc_auc_before"] == 0.5
        assert found[count]["normal_mean_error"] > 0 and found[count]["normal_mean_error_before"] == 0
    assert all(v["kept_covariance"] and v["ratio"] > 0 for v in found.values())
    beside = run(6, 400, peer=True)                  # before: each tag read against the peer alone
    assert beside["1"]["roc_auc"] > beside["1"]["roc_auc_before"] and beside["1"]["normal_mean_error_before"] > 0
    assert all(v["kept_covariance"] for v in beside.values())


def test_the_smoothing_benchmark_checks_the_bare_loops_values_and_times_both():
    """`make bench-smoothing` on a few entities: many series stepped at once give the bare loop's values to the bit
    (the run raises otherwise), and both are timed."""
    from benchmarks.smoothing import run

    found = run(20, 3, 50)                          # 20 entities x 3 columns: stepped together
    assert found["values"] == 3000 and found["seconds"] > 0 and found["bare_loop_seconds"] > 0
    assert found["ratio"] == found["seconds"] / found["bare_loop_seconds"]
