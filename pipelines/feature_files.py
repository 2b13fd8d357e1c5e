"""Training features staged as files: written once by the featurizing tasks, streamed by each Train worker.

A training shard's model inputs (`x__<m>`, `mask`, `label` with labels) are written by its task to one Arrow IPC
file under the run's staging folder (LZ4; up to 1,024 ticks and about 2 MB a record batch); the task returns
its rows per record batch and positives. The driver keeps the file list. Every epoch each Train worker reads its own
part of the rows - the window's rows in shard order cut into `workers` equal ranges (the remainder, fewer than
`workers` rows, is left out, as a Ray Data equal split does, so every rank runs the same number of batches) - as
blocks (its part of a record batch) in a seeded order drawn over all its blocks, read by a few threads, through a
seeded shuffle buffer that holds `MIXED_BLOCKS` blocks: each training batch mixes ticks of that many places of the
window. A feature file holds a shard's ticks in time order, so reading them in file order (as before 2026-12-05)
gave batches of a few consecutive hours: a classifier trained on one labelled day learnt next to nothing through the
CLI (ROC-AUC 0.73 on its own training day) where the same ticks shuffled whole gave 0.99. No process and no object
store holds the window: a worker holds its shuffle buffer and the blocks being read ahead.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa

from pipelines.storage import DataError, Storage

BATCH_ROWS = 1024                  # rows per record batch of a feature file (a worker's read unit) at most,
BATCH_BYTES = 2 << 20              # and about this many bytes at most when a tick's inputs are big (images)
MIXED_BLOCKS = 16                  # blocks from as many places of the window a worker's shuffle buffer holds
READ_THREADS = 4                   # blocks a worker reads at once (a block is a ranged read on S3)
OPEN_FILES = 16                    # feature files a reading thread keeps open
T = TypeVar("T")
_SHAPE = b"dmafn.shape"
_DTYPE = b"dmafn.dtype"
_IPC = pa.ipc.IpcWriteOptions(compression="lz4")


@dataclass(frozen=True)
class FeatureFile:
    """One shard's feature file: where it is and the rows (ticks) of each of its record batches."""

    path: str
    batches: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.batches)


@dataclass(frozen=True)
class Piece:
    """Rows `[start, stop)` of a feature file."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class Block:
    """Rows `[start, stop)` of record batch `batch` of a feature file: a worker's unit of reading."""

    path: str
    batch: int
    start: int
    stop: int


def _record_batch(columns: dict[str, np.ndarray]) -> pa.RecordBatch:
    """Numpy columns of any per-row shape and dtype as a record batch of flat fixed-size lists; each field's
    metadata keeps its row shape and dtype."""
    arrays, fields = [], []
    for name, values in columns.items():
        values = np.ascontiguousarray(values)
        shape = values.shape[1:]
        width = int(np.prod(shape, dtype=np.int64))
        store = values.view(np.uint8) if values.dtype == np.bool_ else values
        flat = pa.array(store.reshape(-1), type=pa.from_numpy_dtype(store.dtype))
        array = pa.FixedSizeListArray.from_arrays(flat, width) if shape else flat
        arrays.append(array)
        fields.append(pa.field(name, array.type, metadata={
            _SHAPE: ",".join(map(str, shape)).encode(), _DTYPE: values.dtype.str.encode()}))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def columns_of(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """The numpy columns a record batch of `write_features` holds (the inverse of its writing)."""
    out = {}
    for field, array in zip(batch.schema, batch.columns):
        shape = tuple(int(s) for s in field.metadata[_SHAPE].decode().split(",") if s)
        dtype = np.dtype(field.metadata[_DTYPE].decode())
        flat = array.flatten() if shape else array
        values = flat.to_numpy(zero_copy_only=False).reshape((len(batch), *shape))
        out[field.name] = values.view(np.bool_) if dtype == np.bool_ else values.astype(dtype, copy=False)
    return out


def batch_rows(columns: dict[str, np.ndarray]) -> int:
    """Rows a record batch of these columns holds: `BATCH_ROWS`, fewer where that would pass `BATCH_BYTES`."""
    row_bytes = sum(v.itemsize * int(np.prod(v.shape[1:], dtype=np.int64)) for v in columns.values())
    return max(1, min(BATCH_ROWS, BATCH_BYTES // max(row_bytes, 1)))


def write_features(storage: Storage, path: str, parts: Iterable[dict[str, np.ndarray]]) -> tuple[int, ...]:
    """Write `parts` (numpy columns, the same names, shapes and dtypes each) to one feature file at `path`,
    `batch_rows` rows a record batch; returns the rows of each record batch written. With no part at all no file is
    written."""
    fs, writer, written = storage.filesystem(path), None, []
    sink = None
    try:
        for part in parts:
            n = len(next(iter(part.values())))
            step = batch_rows(part)
            for lo in range(0, max(n, 1), step):
                batch = _record_batch({k: v[lo:lo + step] for k, v in part.items()})
                if writer is None:
                    fs.create_dir(storage.fs_path(path).rsplit("/", 1)[0], recursive=True)
                    sink = fs.open_output_stream(storage.fs_path(path))
                    writer = pa.ipc.new_file(sink, batch.schema, options=_IPC)
                if len(batch):
                    writer.write_batch(batch)
                    written.append(len(batch))
    finally:
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()
    return tuple(written)


def worker_blocks(files: list[FeatureFile], rank: int, workers: int) -> list[Block]:
    """The blocks of rank `rank`: the window's rows, files and record batches in order, cut into `workers` ranges
    of `total // workers` rows each, and each range cut at the record batches' edges."""
    per = sum(f.rows for f in files) // workers
    lo, hi = rank * per, (rank + 1) * per
    blocks, offset = [], 0
    for f in files:
        for i, n in enumerate(f.batches):
            start, stop = max(lo, offset), min(hi, offset + n)
            if start < stop:
                blocks.append(Block(f.path, i, start - offset, stop - offset))
            offset += n
    return blocks


def _open(storage: Storage, path: str):
    try:
        return storage.filesystem(path).open_input_file(storage.fs_path(path))
    except FileNotFoundError as exc:
        raise DataError(f"training features: {path} is missing (deleted while training?)") from exc


def read_piece(storage: Storage, piece: Piece) -> Iterator[dict[str, np.ndarray]]:
    """A piece's rows, a record batch at a time (batches wholly outside it are not read)."""
    with _open(storage, piece.path) as source:
        reader = pa.ipc.open_file(source)
        offset = 0
        for i in range(reader.num_record_batches):
            if offset >= piece.stop:
                break
            batch = reader.get_batch(i)
            start, stop = max(piece.start - offset, 0), min(piece.stop - offset, len(batch))
            if start < stop:
                yield columns_of(batch.slice(start, stop - start))
            offset += len(batch)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def shuffled_batches(chunks: Iterable[dict[str, np.ndarray]], batch_size: int, buffer_rows: int,
                     rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` rows (the last one shorter) drawn from a shuffle buffer: once it holds
    `buffer_rows`, it is permuted and its whole batches go out, the rest waits for the next chunk.
    Every row comes out once; ceil(rows / batch_size) batches in all."""
    held, count = [], 0
    for chunk in itertools.chain(chunks, [None]):        # None: the end, where the buffer empties whole
        last = chunk is None
        if not last:
            n = len(next(iter(chunk.values())))
            if not n:
                continue
            held.append(chunk)
            count += n
            if count < buffer_rows:
                continue
        if not count:
            continue
        rows = _concat(held)
        order = rng.permutation(count)
        out = count if last else count // batch_size * batch_size
        for lo in range(0, out, batch_size):
            yield {k: v[order[lo:lo + batch_size]] for k, v in rows.items()}
        held = [{k: v[order[out:]] for k, v in rows.items()}] if out < count else []
        count -= out


class _OpenFiles:
    """Each reading thread's open feature files (at most `OPEN_FILES`, the least recently used closed first); every
    file opened is closed by `close`."""

    def __init__(self, storage: Storage):
        self.storage, self.local, self.lock, self.opened = storage, threading.local(), threading.Lock(), []

    def reader(self, path: str) -> pa.ipc.RecordBatchFileReader:
        held = self.local.__dict__.setdefault("files", OrderedDict())
        if path in held:
            held.move_to_end(path)
            return held[path][1]
        source = _open(self.storage, path)
        with self.lock:
            self.opened.append(source)
        held[path] = (source, pa.ipc.open_file(source))
        if len(held) > OPEN_FILES:
            held.popitem(last=False)[1][0].close()
        return held[path][1]

    def read(self, block: Block) -> dict[str, np.ndarray]:
        batch = self.reader(block.path).get_batch(block.batch)
        return columns_of(batch.slice(block.start, block.stop - block.start))

    def close(self) -> None:
        with self.lock:
            for source in self.opened:
                source.close()
            self.opened.clear()


def fetched_in_order(tasks: Iterable[Callable[[], T]], threads: int, depth: int) -> Iterator[T]:
    """Each task's result in the tasks' order, run by `threads` threads at most `depth` ahead of the consumer (the
    next blocks are read while the model trains on this one); a task's error is raised here, and a consumer that
    stops early leaves the tasks not yet started unrun."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="feature-read")
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(task))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def epoch_batches(storage: Storage, blocks: list[Block], batch_size: int, rng: np.random.Generator,
                  mixed: int = MIXED_BLOCKS) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of a worker: its blocks in an order drawn from `rng` over all of them, read ahead by
    `READ_THREADS` threads, shuffled through a buffer of `mixed` blocks' rows (at least 4 batches) into batches."""
    order = rng.permutation(len(blocks))
    buffer_rows = max(4 * batch_size, mixed * max((b.stop - b.start for b in blocks), default=1))
    files = _OpenFiles(storage)
    chunks = fetched_in_order((lambda b=blocks[i]: files.read(b) for i in order), READ_THREADS, mixed)
    try:
        yield from shuffled_batches(chunks, batch_size, buffer_rows, rng)
    finally:
        chunks.close()          # its reads finished or cancelled before their files are closed
        files.close()
