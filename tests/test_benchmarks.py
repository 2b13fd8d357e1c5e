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
