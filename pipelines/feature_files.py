"""Training features staged as files: written once by the featurizing tasks, streamed by each Train worker.

A training shard's model inputs (`x__<m>`, `mask`, `label` with labels) are written by its task to one Arrow IPC
file under the run's staging folder (LZ4; up to 4,096 ticks and about 16 MB a record batch); the task returns
its row count and positives. The driver keeps the file list. Every epoch each Train worker reads its own part of the rows -
the window's rows in shard order cut into `workers` equal ranges (the remainder, fewer than `workers` rows,
is left out, as a Ray Data equal split does, so every rank runs the same number of batches) - its pieces in a
seeded order, a record batch at a time, through a seeded shuffle buffer. No process and no object store
holds the window: a worker holds its shuffle buffer and a few record batches (the one it uses, two read ahead).
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from pipelines.storage import DataError, Storage

BATCH_ROWS = 4096                  # rows per record batch of a feature file (a worker's read unit) at most,
BATCH_BYTES = 16 << 20             # and about this many bytes at most when a tick's inputs are big (images)
_SHAPE = b"dmafn.shape"
_DTYPE = b"dmafn.dtype"
_IPC = pa.ipc.IpcWriteOptions(compression="lz4")


@dataclass(frozen=True)
class FeatureFile:
    """One shard's feature file: where it is and how many rows (ticks) it holds."""

    path: str
    rows: int


@dataclass(frozen=True)
class Piece:
    """Rows `[start, stop)` of a feature file."""

    path: str
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


def write_features(storage: Storage, path: str, parts: Iterable[dict[str, np.ndarray]]) -> int:
    """Write `parts` (numpy columns, the same names, shapes and dtypes each) to one feature file at `path`,
    `batch_rows` rows a record batch; returns the rows written. With no part at all no file is written."""
    fs, writer, rows = storage.filesystem(path), None, 0
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
            rows += n
    finally:
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()
    return rows


def worker_pieces(files: list[FeatureFile], rank: int, workers: int) -> list[Piece]:
    """The pieces of rank `rank`: the window's rows, files in order, cut into `workers` ranges of
    `total // workers` rows each."""
    per = sum(f.rows for f in files) // workers
    lo, hi = rank * per, (rank + 1) * per
    pieces, offset = [], 0
    for f in files:
        start, stop = max(lo, offset), min(hi, offset + f.rows)
        if start < stop:
            pieces.append(Piece(f.path, start - offset, stop - offset))
        offset += f.rows
    return pieces


def read_piece(storage: Storage, piece: Piece) -> Iterator[dict[str, np.ndarray]]:
    """A piece's rows, a record batch at a time (batches wholly outside it are not read)."""
    try:
        source = storage.filesystem(piece.path).open_input_file(storage.fs_path(piece.path))
    except FileNotFoundError as exc:
        raise DataError(f"training features: {piece.path} is missing (deleted while training?)") from exc
    with source:
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


def read_ahead(items: Iterator, depth: int = 2) -> Iterator:
    """`items` produced by a thread up to `depth` ahead of the consumer (a file's next batch is read while
    the model trains on this one); an error in the thread is raised here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return                          # the consumer has gone
            offer((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            offer((done, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def epoch_batches(storage: Storage, pieces: list[Piece], batch_size: int, rng: np.random.Generator,
                  buffer_rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of a worker: its pieces in an order drawn from `rng`, read ahead by a thread, shuffled
    through a buffer of `buffer_rows` (default 4 batches) into batches."""
    order = rng.permutation(len(pieces))
    chunks = read_ahead(chunk for i in order for chunk in read_piece(storage, pieces[i]))
    return shuffled_batches(chunks, batch_size, buffer_rows or 4 * batch_size, rng)
