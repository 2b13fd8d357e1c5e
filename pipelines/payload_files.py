"""Payloads kept as files of their own (`payload: file`): an image or audio modality whose column holds, for each
row, where its frame or clip lies - an `s3://` URI, an absolute path, or a path under the modality's
`payload_root` - as camera and recorder pipelines often land them (the objects in a bucket, a table of their keys).

A shard's task reads the files of the rows it keeps - its entity bucket's, its dates' and what its first ticks look
back on, checked - `PAYLOAD_READERS` at a time, and a row whose file cannot be read is quarantined with a reason
naming the file. The driver sizes shards by the bytes the files hold, estimated from a sample of them
(`shards.payload_ratio`): a table of keys is small beside the frames it names."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dmafn.spec import ModalitySpec
from pipelines.parquet_files import field_of, open_parquet, read_columns
from pipelines.storage import Storage, is_s3, join

PAYLOAD_READERS = 32    # payload files a task reads at once (on S3 each is a GET of its own)
SAMPLED_PAYLOADS = 16   # payload files the driver looks at (their sizes) to size shards and `validate --check-data`


def payload_location(name: str, root: str | None) -> str | None:
    """Where a row's payload file lies: `name` itself when it is an `s3://` URI (Hadoop's `s3a://` and `s3n://` read
    as such) or an absolute path (a `file://` URI's too), else under `root` (the modality's `payload_root`; None
    without one, or where `name` is a URI of another scheme)."""
    name = name.strip()
    scheme, sep, rest = name.partition("://")
    if sep and scheme in ("s3a", "s3n"):
        name = f"s3://{rest}"
    elif sep and scheme == "file":
        name = rest
    elif sep and scheme != "s3" and scheme.isalnum():
        return None
    if is_s3(name) or name.startswith("/"):
        return name
    return None if root is None else join(root, name)


class _Readers:
    """One filesystem per kind of place (S3, local) for the payload files of a read."""

    def __init__(self, storage: Storage):
        self.storage, self.held = storage, {}

    def _filesystem(self, where: str) -> pafs.FileSystem:
        if is_s3(where) not in self.held:
            self.held[is_s3(where)] = self.storage.filesystem(where)
        return self.held[is_s3(where)]

    def read(self, where: str) -> bytes:
        """The file's bytes (OSError where it cannot be read)."""
        with self._filesystem(where).open_input_stream(self.storage.fs_path(where)) as stream:
            return stream.read()

    def size(self, where: str) -> int | None:
        """The file's size; None where there is no such file."""
        info = self._filesystem(where).get_file_info(self.storage.fs_path(where))
        return info.size if info.type == pafs.FileType.File else None


def read_payloads(names: list[str], m: ModalitySpec, storage: Storage) -> dict[str, bytes | str]:
    """Each of `names` (distinct) -> its file's bytes, or the reason it cannot be read (text naming the file)."""
    readers = _Readers(storage)
    what = "image" if m.kind == "image" else "audio"

    def read(name: str) -> bytes | str:
        where = payload_location(name, m.payload_root)
        if where is None and "://" in name:
            return (f"{what} file '{name[:200]}' in column '{m.column}' is a URI of a scheme not read (s3://, "
                    "s3a://, file:// or a path)")
        if where is None:
            return (f"{what} file '{name[:200]}' in column '{m.column}' is a relative path and the modality has no "
                    "payload_root to read it under")
        try:
            return readers.read(where)
        except (OSError, pa.ArrowException) as exc:
            return f"{what} file '{where[:200]}' in column '{m.column}' cannot be read ({str(exc)[:200]})"

    if not names:
        return {}
    with ThreadPoolExecutor(min(PAYLOAD_READERS, len(names))) as pool:
        return dict(zip(names, pool.map(read, names)))


def fetched_payloads(rows: pl.DataFrame, m: ModalitySpec, storage: Storage, reason: str) -> pl.DataFrame:
    """`rows` of `m` (`reason`: null where a row is usable) with `m.column` - each row's payload file - as the bytes
    of that file where the row is usable (null elsewhere), and a reason naming the file where it cannot be read."""
    usable = rows[reason].is_null() & rows[m.column].is_not_null()
    names = rows[m.column].cast(pl.String)
    read = read_payloads(sorted(set(names.filter(usable).to_list())), m, storage)
    data = [read.get(n) if ok else None for n, ok in zip(names.to_list(), usable.to_list())]
    payload = pl.Series(m.column, [d if isinstance(d, bytes) else None for d in data], pl.Binary)
    failed = pl.Series("_payload_failed", [d if isinstance(d, str) else None for d in data], pl.String)
    return rows.with_columns(payload, pl.coalesce(pl.col(reason), failed).alias(reason))


class PayloadSample(NamedTuple):
    """What a sample of a table file's payload files says: the file, the rows it holds, its size, the sampled names,
    where each lies (`payload_location`; the name where it cannot be told) and the size of each (None: no such
    file)."""

    path: str
    rows: int
    file_bytes: int
    names: tuple[str, ...]
    locations: tuple[str, ...]
    sizes: tuple[int | None, ...]

    @property
    def found(self) -> list[int]:
        return [s for s in self.sizes if s is not None]

    def bytes_per_byte(self) -> float:
        """The payload bytes each byte of the table file names, by the sampled files' mean size (0 where none was
        found)."""
        found = self.found
        if not found or not self.file_bytes:
            return 0.0
        return self.rows * (sum(found) / len(found)) / self.file_bytes


def sample_listed(storage: Storage, m: ModalitySpec, listed: list) -> PayloadSample | None:
    """`sample_payloads` of the largest of a listing's files (`ListedFile`s or `InputFile`s: `path`, `size`,
    `stored_names`); None without a file."""
    if not listed:
        return None
    largest = max(listed, key=lambda f: f.size)
    return sample_payloads(storage, m, largest.path, largest.size, largest.stored_names)


def sample_payloads(storage: Storage, m: ModalitySpec, path: str, file_bytes: int,
                    stored_names: tuple[tuple[str, str], ...] = ()) -> PayloadSample:
    """The first `SAMPLED_PAYLOADS` distinct payload names in the table file at `path` (`m.column`, under its
    physical name `stored_names` gives or a former name where the file stores it so) and their files' sizes (None
    where there is no such file), looked up `PAYLOAD_READERS` at a time."""
    stored = dict(stored_names)
    with open_parquet(storage.filesystem(m.path), path) as parquet:
        rows = parquet.metadata.num_rows
        names: list[str] = []
        column = next((c for c in (stored.get(n, n) for n in (m.column, *dict(m.former_names).get(m.column, ())))
                       if field_of(parquet.schema_arrow, c) is not None), None)
        if column is not None:
            for r in range(parquet.metadata.num_row_groups):
                values = read_columns(parquet, path, [column], [r], storage.filesystem(m.path)).column(0)
                for v in pc.unique(values.cast(pa.string())).to_pylist():
                    if v is not None and v.strip() and v not in names:
                        names.append(v)
                if len(names) >= SAMPLED_PAYLOADS:
                    break
    names = names[:SAMPLED_PAYLOADS]
    readers = _Readers(storage)

    def size(name: str) -> int | None:
        where = payload_location(name, m.payload_root)
        try:
            return None if where is None else readers.size(where)
        except (OSError, pa.ArrowException):
            return None

    with ThreadPoolExecutor(max(1, min(PAYLOAD_READERS, len(names)))) as pool:
        sizes = tuple(pool.map(size, names))
    return PayloadSample(path, rows, file_bytes, tuple(names),
                         tuple(payload_location(n, m.payload_root) or n for n in names), sizes)
