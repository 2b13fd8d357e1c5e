"""Training feature files (`pipelines.feature_files`): what a featurizing task writes is what the Train
workers read, every row once, in equal parts, in a seeded order."""
import numpy as np
import pytest

from dmafn.features import StatisticsFitter, featurize, features_to_columns
from pipelines.feature_files import (BATCH_BYTES, BATCH_ROWS, FeatureFile, batch_rows, Piece, epoch_batches, read_ahead, read_piece,
                                     shuffled_batches, worker_pieces, write_features)
from pipelines.storage import DataError, Storage
from tests.test_features_ingest import aligned_rows


def _columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x__sensors": rng.normal(size=(n, 5, 3)).astype(np.float32),
            "x__logs": rng.integers(0, 1000, size=(n, 7)),
            "x__image": rng.random(size=(n, 1, 4, 4)).astype(np.float32),
            "mask": rng.random((n, 3)) > 0.5,
            "label": rng.integers(0, 2, n).astype(np.float32)}


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_a_feature_file_gives_back_its_columns_with_their_shapes_and_dtypes_in_any_row_range(tmp_path):
    storage = Storage()
    parts = [_columns(BATCH_ROWS + 5, 1), _columns(0, 2), _columns(3, 3)]
    path = str(tmp_path / "f" / "000000.arrow")
    assert write_features(storage, path, iter(parts)) == BATCH_ROWS + 8
    whole = _concat(parts)
    ranges = [(0, BATCH_ROWS + 8), (BATCH_ROWS - 2, BATCH_ROWS + 6), (1, 2), (BATCH_ROWS + 7, BATCH_ROWS + 8)]
    for start, stop in ranges:
        got = _concat(list(read_piece(storage, Piece(path, start, stop))))
        for name, values in whole.items():
            assert got[name].dtype == values.dtype and got[name].shape[1:] == values.shape[1:], name
            assert np.array_equal(got[name], values[start:stop]), (name, start, stop)
    # a shard with no tick writes no file and counts none
    assert write_features(storage, str(tmp_path / "f" / "none.arrow"), iter([])) == 0
    assert not (tmp_path / "f" / "none.arrow").exists()
    with pytest.raises(DataError, match="none.arrow"):
        list(read_piece(storage, Piece(str(tmp_path / "f" / "none.arrow"), 0, 1)))


def test_a_record_batch_of_big_ticks_holds_fewer_rows():
    small = {"x__sensors": np.zeros((1, 5, 3), np.float32), "mask": np.ones((1, 2), bool)}
    images = {"x__cam": np.zeros((1, 3, 256, 256), np.float32), "mask": np.ones((1, 1), bool)}
    assert batch_rows(small) == BATCH_ROWS
    assert batch_rows(images) == BATCH_BYTES // (3 * 256 * 256 * 4 + 1) < BATCH_ROWS


def test_featurized_ticks_round_trip_through_a_feature_file(tiny_spec, tmp_path):
    """The real model inputs of 3 ticks of 2 machines (table, series, image, log tokens; a bool mask) come back
    bit for bit."""
    aligned = aligned_rows(tiny_spec)
    cols = features_to_columns(featurize(aligned, tiny_spec, StatisticsFitter(tiny_spec).add(aligned).result()))
    assert cols["mask"].dtype == np.bool_ and cols["x__logs"].dtype == np.int64
    path = str(tmp_path / "one.arrow")
    assert write_features(Storage(), path, iter([cols])) == len(cols["mask"])
    got = _concat(list(read_piece(Storage(), Piece(path, 0, len(cols["mask"])))))
    assert got.keys() == cols.keys()
    for name in cols:
        assert got[name].dtype == cols[name].dtype and np.array_equal(got[name], cols[name]), name


def test_workers_get_equal_disjoint_parts_of_the_rows_in_file_order():
    files = [FeatureFile("a", 5), FeatureFile("b", 0), FeatureFile("c", 7), FeatureFile("d", 2)]   # 14 rows
    parts = [worker_pieces(files, rank, 3) for rank in range(3)]
    rows = [[(p.path, i) for p in pieces for i in range(p.start, p.stop)] for pieces in parts]
    assert [len(r) for r in rows] == [4, 4, 4]                       # 14 // 3 each, 2 rows left out
    flat = [row for r in rows for row in r]
    everything = [(f.path, i) for f in files for i in range(f.rows)]
    assert flat == everything[:12]                                    # disjoint, in file order
    assert parts[1] == [Piece("a", 4, 5), Piece("c", 0, 3)]
    assert worker_pieces(files, 0, 1) == [Piece("a", 0, 5), Piece("c", 0, 7), Piece("d", 0, 2)]


def test_shuffled_batches_give_every_row_once_in_a_seeded_order():
    chunks = [{"i": np.arange(lo, hi)} for lo, hi in [(0, 7), (7, 7), (7, 30), (30, 31)]]

    def draw(seed):
        return [b["i"] for b in shuffled_batches(iter(chunks), 4, 10, np.random.default_rng(seed))]

    batches = draw(1)
    assert [len(b) for b in batches] == [4] * 7 + [3]                # ceil(31 / 4) batches, the last shorter
    assert sorted(np.concatenate(batches).tolist()) == list(range(31))
    assert [b.tolist() for b in draw(1)] == [b.tolist() for b in batches]
    assert [b.tolist() for b in draw(2)] != [b.tolist() for b in batches]
    assert np.concatenate(batches).tolist() != list(range(31))


def test_an_epoch_reads_each_piece_once_and_an_error_while_reading_ahead_reaches_the_loop(tmp_path):
    storage = Storage()
    files = []
    for i, n in enumerate([9, 0, 13]):
        path = str(tmp_path / f"{i}.arrow")
        part = {"i": np.arange(100 * i, 100 * i + n), "mask": np.ones((n, 1), bool)}
        files.append(FeatureFile(path, write_features(storage, path, iter([part]))))
    pieces = worker_pieces(files, 1, 2)                              # rows 11..21 of the 22
    seen = [b["i"] for b in epoch_batches(storage, pieces, 3, np.random.default_rng(0), buffer_rows=5)]
    assert sorted(np.concatenate(seen).tolist()) == [202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212]

    def failing():
        yield 1
        raise DataError("bad piece")

    got = read_ahead(failing())
    assert next(got) == 1
    with pytest.raises(DataError, match="bad piece"):
        next(got)
