"""Staging: files that interleave entities are split by entity bucket once, so that a date of B entity buckets
is read once instead of B times.

Every bucket of a date lists all the date's files (`pipelines.shards`). A file whose row groups each hold one
entity (a file per machine, or sorted by machine) is read only by the bucket that owns each row group
(`shards.row_groups_in_bucket`); a file that mixes machines in its row groups - hourly files landed from a
stream, say - would be read whole by every bucket. When a run needs `SPLIT_MIN_BUCKETS` buckets or more, each
file of the run's dates is first handed to a split task (`split_file`): it reads the file's row groups that
hold several entities, one at a time, and writes each bucket's rows of them (the spec's columns, values as they
are: checks and quarantine happen where a shard reads them, as for any file) to
`<staging>/<run>/<B>buckets/<file key>/bucket=<k>.<n>.parquet` - the rows held when the task's buffer
fills (`SPLIT_BUFFER_BYTES`) go out as one file per bucket, each written and closed before the next, so the
task holds one output stream, not one per bucket; row groups of one entity stay where they are. A
shard's task gets the split results of its files as arguments - Ray starts it once they exist - and reads its
bucket's piece and the file's single-entity row groups in place of the file (`with_pieces`).

`Staging` does the bookkeeping on the driver (metadata only): it submits a file's split the first time a
shard needs it, deletes a file's pieces as soon as no shard left to run reads them (a backfill of a year holds
only the dates in flight), and deletes the run's folder at the end.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from dmafn.spec import Spec, with_stored_names
from pipelines.ingest import as_read, check_schema, stored_names
from pipelines.parquet_files import (DamagedRowGroup, UnreadableFile, each_row_group, file_values, in_file,
                                     open_parquet, with_path_fields)
from pipelines.ray_runtime import raise_task_error
from pipelines.shards import InputFile, Shard, bucket_numbers, row_group_entity
from pipelines.storage import Storage, is_s3, join

log = logging.getLogger(__name__)

# below this many buckets a split (read once, write once, read once) saves nothing: `make bench-shard-reads` on
# files of interleaved machines, local disk, 2026-12-02: 3 buckets 0.96 x every bucket reading them, 4: 0.83 x
SPLIT_MIN_BUCKETS = 4
# a split task writes what it holds once its pending rows pass this (decoded bytes): each bucket gets a piece
# file per flush, and the task's memory stays one source row group plus this plus one output stream
SPLIT_BUFFER_BYTES = 64_000_000


@dataclass(frozen=True)
class SplitFile:
    """One input file after its split: its row groups of several entities moved to `pieces` (a bucket -> the
    files of its rows, one per flush of the split, in the source's order; a bucket with none has no piece),
    `kept` the row groups of one entity each, still read in place (by the bucket that owns them). `pieces`
    None: nothing moved, the file is read as it is."""

    source: InputFile
    buckets: int
    pieces: dict[int, tuple[InputFile, ...]] | None
    kept: tuple[int, ...] = ()


def file_key(path: str) -> str:
    """A short name for a source file's folder of pieces (the same in every process)."""
    return hashlib.sha1(path.encode()).hexdigest()[:20]


def split_file(file: InputFile, spec: Spec, storage: Storage, buckets: int, folder: str) -> SplitFile:
    """Move the rows of `file`'s row groups that hold several entities (or a null one) into Parquet files per
    entity bucket under `folder` (a path as the staging filesystem names it; see the module docstring); its row
    groups of one entity each, by their statistics, stay where they are. Raises DataError naming the file when
    its columns break the contract or its pages cannot be read."""
    path = spec.modalities[file.modality].path
    readers = [with_stored_names(m, file.stored_names)      # a context view reads the same files; a Delta table's
               for m in spec.modalities.values() if m.path == path]     # column mapping: by their physical names
    source_fs = storage.filesystem(path)
    try:
        parquet = open_parquet(source_fs, file.path)
    except UnreadableFile:
        if spec.unreadable_files != "skip":
            raise
        return SplitFile(file, buckets, None)       # left as it is: its date's first bucket names it
    # columns in the file's folders only, or added to its Delta table since (null): its pieces hold them
    with in_file(file.modality, file.path):
        values = file_values(file, parquet.schema_arrow, spec.modalities[file.modality].former_names)
        schema = with_path_fields(parquet.schema_arrow, values)
        for m in readers:
            check_schema(schema, spec, m, file.path)
    keys = list(spec.entity_in(spec.modalities[file.modality]))     # as the file names them; the pieces alike
    names = {stored: read for m in readers for stored, read in stored_names(schema, spec, m).items()}
    stored_keys = [next(s for s, read in names.items() if read == k) for k in keys]   # renamed upstream: as stored
    single = [row_group_entity(parquet, stored_keys, r, values) is not None
              for r in range(parquet.metadata.num_row_groups)]
    if all(single):
        return SplitFile(file, buckets, None)
    staging_fs = storage.filesystem(spec.score.staging_path)
    pieces: dict[int, list[InputFile]] = {}
    pending: dict[int, list[pa.Table]] = {}
    held, flushes = 0, 0

    def flush() -> None:
        """Each bucket's pending rows to a piece file of their own, written and closed one after another: one
        output stream at a time (on S3 each buffers a part before it uploads)."""
        nonlocal flushes
        if pending and not pieces:
            staging_fs.create_dir(folder, recursive=True)
        for bucket, tables in sorted(pending.items()):
            piece = join(folder, f"bucket={bucket}.{flushes:05d}.parquet")
            with staging_fs.open_output_stream(piece) as sink:
                pq.write_table(pa.concat_tables(tables), sink)
                size = sink.tell()
            pieces.setdefault(bucket, []).append(InputFile(file.modality, file.date, piece, size, name=file.name,
                                                           span=file.span, source=file.path))
        pending.clear()
        flushes += 1

    try:
        for part in each_row_group(parquet, file.path, list(names), [r for r, one in enumerate(single) if not one],
                                   source_fs, file.deleted, values):
            part = as_read(part, names)             # a column renamed upstream: its pieces name it as it is now
            numbers = bucket_numbers(pl.from_arrow(part.select(keys)), keys, buckets).to_numpy()
            order = np.argsort(numbers, kind="stable")
            part, numbers = part.take(pa.array(order)), numbers[order]
            starts = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1]]) if len(numbers) else []
            for start, stop in zip(starts, [*starts[1:], len(numbers)]):
                pending.setdefault(int(numbers[start]), []).append(part.slice(start, stop - start))
            held += part.nbytes
            if held > SPLIT_BUFFER_BYTES:
                flush()
                held = 0
    except DamagedRowGroup:
        if spec.unreadable_files != "skip":
            raise
        return SplitFile(file, buckets, None)   # left as it is (pieces written go with the run's folder): its date's
                                                # buckets read it in place and name its damaged row groups
    flush()
    return SplitFile(file, buckets, {b: tuple(files) for b, files in pieces.items()},
                     tuple(r for r, one in enumerate(single) if one))


_split_task = ray.remote(num_cpus=1)(split_file)


def with_pieces(shard: Shard, splits: Sequence[SplitFile]) -> Shard:
    """`shard` reading its bucket's pieces in place of the files that were split (other files as they are)."""
    by_path = {s.source.path: s for s in splits if s.buckets == shard.buckets}
    files = []
    for f in shard.files:
        split = by_path.get(f.path)
        if split is None or split.pieces is None:
            files.append(f)
            continue
        if split.kept:                          # its row groups of one entity each, read in place
            files.append(replace(f, row_groups=split.kept))
        # as this modality's files (a context view reads its parent's pieces), of its date (a file listed under
        # several dates, `InputFile.span`, is split once; each listing reads the pieces for its own date's rows)
        files.extend(replace(piece, modality=f.modality, date=f.date) for piece in split.pieces.get(shard.bucket, ()))
    return replace(shard, files=tuple(files))


class Staging:
    """The splits of one run (see the module docstring): `splits(shard)` submits the splits a shard's files need
    (once per file) and returns their object refs, `retain`/`release` count the shards still to run that read a
    file (its pieces are deleted when none is left), `close` deletes the run's folder."""

    def __init__(self, spec: Spec, storage: Storage, shards: Sequence[Shard], dates: Sequence[dt.date], run_id: str,
                 *, min_buckets: int = SPLIT_MIN_BUCKETS):
        self.spec, self.storage = spec, storage
        self.folder = join(spec.score.staging_path, run_id)
        self.dates, self.min_buckets = set(dates), min_buckets
        # a modality on another kind of storage than the staging folder is read in place (its reader opens
        # pieces with the modality's filesystem)
        self.modalities = {name for name, m in spec.modalities.items()
                           if is_s3(m.path) == is_s3(spec.score.staging_path)}
        self.refs: dict[tuple[str, int], ray.ObjectRef] = {}
        self.uses: Counter = Counter()
        self.submitted = 0                             # files given to `split_file` so far (split or left whole)
        self.retain(shards)

    def _split(self, shard: Shard) -> list[tuple[InputFile, tuple[str, int]]]:
        """The files of `shard` that a split serves: those of the run's own dates, when the shard has enough
        buckets (a look-back day outside the run is read in place: only its last row groups are read)."""
        if shard.buckets < self.min_buckets:
            return []
        return [(f, (f.path, shard.buckets)) for f in shard.files
                if f.date in self.dates and f.modality in self.modalities]

    def _folder(self, key: tuple[str, int]) -> str:
        return join(self.folder, f"{key[1]}buckets", file_key(key[0]))

    def retain(self, shards: Sequence[Shard]) -> None:
        """Count `shards` (still to run) as readers of their files."""
        for shard in shards:
            self.uses.update({key for _, key in self._split(shard)})

    def splits(self, shard: Shard) -> list[ray.ObjectRef]:
        """The object refs of the splits of `shard`'s files, submitted the first time a file is asked for."""
        refs = {}
        for f, key in self._split(shard):
            if key not in self.refs:
                self.submitted += 1
                self.refs[key] = _split_task.remote(f, self.spec, self.storage, key[1],
                                                    self.storage.fs_path(self._folder(key)))
            refs[key] = self.refs[key]
        return list(refs.values())

    def resolve(self, shards: Sequence[Shard]) -> list[Shard]:
        """Every shard with its pieces in place, the splits run first (training reads its shards several times).
        A file's error (DataError naming it) is raised as itself."""
        refs = [self.splits(s) for s in shards]
        return [with_pieces(s, [raise_task_error(r) for r in mine]) for s, mine in zip(shards, refs)]

    def release(self, shard: Shard) -> None:
        """`shard` has finished (or failed): the pieces of files no shard left to run reads are deleted."""
        for key in {key for _, key in self._split(shard)}:
            self.uses[key] -= 1
            if self.uses[key] <= 0:
                del self.uses[key]
                if self.refs.pop(key, None) is not None:
                    self._delete(self._folder(key))

    def close(self) -> None:
        """Delete the run's folder (every piece left)."""
        self._delete(self.folder)
        self.refs.clear()

    def _delete(self, folder: str) -> None:
        try:
            self.storage.filesystem(folder).delete_dir(self.storage.fs_path(folder))
        except FileNotFoundError:
            pass
        except OSError as exc:                  # left for `dmafn maintain`; the run's results stand
            log.warning("could not delete staged pieces under %s: %s", folder, exc)


def remove_stale_folders(storage: Storage, path: str, older_than_hours: float) -> int:
    """Delete each folder directly under `path` whose newest file is older than `older_than_hours` (a staging run's
    or a training's folder, of a job that was killed before it removed it); returns how many. One still being
    written stays."""
    fs, root = storage.filesystem(path), storage.fs_path(path)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return 0
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=older_than_hours)
    removed = 0
    for run in fs.get_file_info(pafs.FileSelector(root)):
        if run.type != pafs.FileType.Directory:
            continue
        times = [i.mtime for i in fs.get_file_info(pafs.FileSelector(run.path, recursive=True))
                 if i.type == pafs.FileType.File and i.mtime]
        if all(t.astimezone(dt.timezone.utc) < cutoff for t in times):
            fs.delete_dir(run.path)
            removed += 1
    return removed

