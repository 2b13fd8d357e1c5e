"""Training feature files (`pipelines.feature_files`): what a featurizing task writes is what the Train
workers read, every row once, in equal parts, in a seeded order that mixes the window's places in every batch."""
import numpy as np
import pytest

from dmafn.features import StatisticsFitter, featurize, features_to_columns
from pipelines import feature_files
from pipelines.feature_files import (BATCH_BYTES, BATCH_ROWS, Block, FeatureFile, Piece, batch_rows, epoch_batches,
                                     fetched_in_order, read_piece, shuffled_batches, worker_blocks, write_features)
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
    assert write_features(storage, path, iter(parts)) == (BATCH_ROWS, 5, 3)     # rows per record batch
    whole = _concat(parts)
    ranges = [(0, BATCH_ROWS + 8), (BATCH_ROWS - 2, BATCH_ROWS + 6), (1, 2), (BATCH_ROWS + 7, BATCH_ROWS + 8)]
    for start, stop in ranges:
        got = _concat(list(read_piece(storage, Piece(path, start, stop))))
        for name, values in whole.items():
            assert got[name].dtype == values.dtype and got[name].shape[1:] == values.shape[1:], name
            assert np.array_equal(got[name], values[start:stop]), (name, start, stop)
    # a shard with no tick writes no file and counts none
    assert write_features(storage, str(tmp_path / "f" / "none.arrow"), iter([])) == ()
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
    assert write_features(Storage(), path, iter([cols])) == (len(cols["mask"]),)
    got = _concat(list(read_piece(Storage(), Piece(path, 0, len(cols["mask"])))))
    assert got.keys() == cols.keys()
    for name in cols:
        assert got[name].dtype == cols[name].dtype and np.array_equal(got[name], cols[name]), name


def test_workers_get_equal_disjoint_parts_of_the_rows_in_file_order_cut_at_record_batches():
    files = [FeatureFile("a", (3, 2)), FeatureFile("b", ()), FeatureFile("c", (4, 3)), FeatureFile("d", (2,))]
    parts = [worker_blocks(files, rank, 3) for rank in range(3)]                    # 14 rows
    rows = [[(b.path, b.batch, i) for b in blocks for i in range(b.start, b.stop)] for blocks in parts]
    assert [len(r) for r in rows] == [4, 4, 4]                       # 14 // 3 each, 2 rows left out
    everything = [(f.path, i, j) for f in files for i, n in enumerate(f.batches) for j in range(n)]
    assert [row for r in rows for row in r] == everything[:12]      # disjoint, in file order
    assert parts[1] == [Block("a", 1, 1, 2), Block("c", 0, 0, 3)]
    assert worker_blocks(files, 0, 1) == [Block("a", 0, 0, 3), Block("a", 1, 0, 2), Block("c", 0, 0, 4),
                                          Block("c", 1, 0, 3), Block("d", 0, 0, 2)]


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


def test_an_epoch_reads_each_row_of_its_blocks_once_and_an_error_while_reading_ahead_reaches_the_loop(tmp_path):
    storage = Storage()
    files = []
    for i, n in enumerate([9, 0, 13]):
        path = str(tmp_path / f"{i}.arrow")
        part = {"i": np.arange(100 * i, 100 * i + n), "mask": np.ones((n, 1), bool)}
        files.append(FeatureFile(path, write_features(storage, path, iter([part]))))
    blocks = worker_blocks(files, 1, 2)                              # rows 11..21 of the 22
    seen = [b["i"] for b in epoch_batches(storage, blocks, 3, np.random.default_rng(0), mixed=2)]
    assert sorted(np.concatenate(seen).tolist()) == [202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212]
    with pytest.raises(DataError, match="gone.arrow"):
        list(epoch_batches(storage, [Block(str(tmp_path / "gone.arrow"), 0, 0, 1)], 3, np.random.default_rng(0)))

    def failing():
        raise DataError("bad block")

    got = fetched_in_order(iter([lambda: 1, lambda: 2, failing, lambda: 4]), threads=2, depth=2)
    assert [next(got), next(got)] == [1, 2]
    with pytest.raises(DataError, match="bad block"):
        next(got)


def test_every_batch_of_an_epoch_mixes_ticks_of_many_places_of_the_window(tmp_path, monkeypatch):
    """Feature files hold each shard's ticks in time order: an epoch read in that order gave batches of a few
    consecutive hours (a labelled day's incidents in a run of batches of their own). Each batch now draws from the
    shuffle buffer's `mixed` blocks, taken in a seeded order over all of a worker's blocks."""
    monkeypatch.setattr(feature_files, "BATCH_ROWS", 16)
    monkeypatch.setattr(feature_files, "OPEN_FILES", 2)             # a reading thread closes files as it goes
    storage, files = Storage(), []
    for day in range(6):                                             # 6 shards of 8 record batches of 16 ticks
        path = str(tmp_path / f"{day}.arrow")
        ticks = np.arange(day * 128, (day + 1) * 128)
        files.append(FeatureFile(path, write_features(storage, path, iter([{"i": ticks}]))))
    assert all(f.batches == (16,) * 8 for f in files)
    blocks = worker_blocks(files, 0, 1)

    def epoch(seed):
        return [b["i"] for b in epoch_batches(storage, blocks, 8, np.random.default_rng(seed), mixed=8)]

    batches = epoch(3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6 * 128))
    places = [len(set((b // 16).tolist())) for b in batches]           # the blocks each batch's ticks come from
    assert min(places) >= 2 and np.mean(places) > 4
    assert len({int(b // 128) for b in batches[0]}) >= 2             # the first batch already spans shards
    assert [b.tolist() for b in epoch(3)] == [b.tolist() for b in batches]
    assert [b.tolist() for b in epoch(4)] != [b.tolist() for b in batches]
