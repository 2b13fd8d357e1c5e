"""What a date's partitions hold, row by row, without keeping a row: a digest per modality that a compaction keeps.

A date's listing (`shards.PartitionFiles`: the files' names, sizes and modification times) changes whenever its
files are rewritten - also by a compaction upstream that merged a day's small files without changing a row. The
row digest tells the two apart: per modality the count of the rows its own partitions hold and the sum (modulo 2**64)
of a hash of each row's columns as the job reads them (entity, time and value columns, by the files' names). A sum
does not depend on the order of the rows, on how they are cut into files and row groups, or on how a job cuts a date
into entity buckets (each row is in one); string, binary and list columns hash alike however large their offsets,
a dictionary-encoded column as its values, millisecond times as the same microseconds, float32 as the same float64.
A value changed, a row added or removed, another type for a column: another digest.

Scoring sums each shard's rows as it reads them (`pipelines.ingest.read_shard`) and the run records the date's
(`record`); a backfill that finds a date's listing changed reads its partitions again (`date_digests`, a Ray task
per date in `pipelines.score`) and rescores it only when a digest differs. The hash is Polars' `hash_rows`, stable
within one Polars version only: a digest recorded under another version is never taken as equal (the date is
rescored, as before digests).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dmafn.spec import Spec, held_name, with_stored_names
from pipelines.parquet_files import (DamagedRowGroup, UnreadableFile, each_row_group, file_values, open_parquet,
                                     with_path_fields)
from pipelines.storage import Storage

if TYPE_CHECKING:
    from pipelines.shards import InputFile

SEED = 20241205
HASH = f"polars {pl.__version__} hash_rows seed {SEED}"     # digests under another scheme are never compared equal
ROW_HASH = "_row_hash"                                      # the column `read_shard` carries each row's hash in
_MASK = 2**64 - 1


def row_hashes(table: pa.Table) -> pl.Series:
    """(N,) UInt64: a hash of each row of `table` (Arrow, as read from a file), alike for the same values stored in
    another width of offsets, dictionary-encoded, as millisecond times or as float32 (see the module); a 256-bit
    decimal (which Polars cannot hold) by its exact text."""
    wide = [i for i, f in enumerate(table.schema) if pa.types.is_decimal256(f.type)]
    for i in wide:
        table = table.set_column(i, table.schema.field(i).name, pc.cast(table.column(i), pa.string()))
    frame = pl.from_arrow(table)
    if isinstance(frame, pl.Series):
        frame = frame.to_frame()
    same = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, (pl.Categorical, pl.Enum)):
            same.append(pl.col(name).cast(pl.String))
        elif isinstance(dtype, pl.Datetime) and dtype.time_unit == "ms":
            same.append(pl.col(name).cast(pl.Datetime("us", dtype.time_zone)))
        elif dtype == pl.Float32:
            same.append(pl.col(name).cast(pl.Float64))
    return (frame.with_columns(same) if same else frame).hash_rows(seed=SEED).alias(ROW_HASH)


@dataclass
class RowDigest:
    """The count of some rows and the sum of their hashes modulo 2**64; digests of disjoint rows add up."""

    rows: int = 0
    total: int = 0

    def add(self, hashes: pl.Series | np.ndarray) -> "RowDigest":
        values = hashes.to_numpy() if isinstance(hashes, pl.Series) else hashes
        self.rows += len(values)
        self.total = (self.total + int(np.asarray(values, np.uint64).sum(dtype=np.uint64))) & _MASK
        return self

    def merge(self, other: "RowDigest") -> "RowDigest":
        return RowDigest(self.rows + other.rows, (self.total + other.total) & _MASK)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "sum": f"{self.total:016x}"}


def merged(parts: list[dict[str, RowDigest]]) -> dict[str, RowDigest]:
    """Per modality, the digest of a date's shards' (disjoint entity buckets) rows together."""
    out: dict[str, RowDigest] = {}
    for part in parts:
        for m, digest in part.items():
            out[m] = out[m].merge(digest) if m in out else digest
    return out


def record(spec: Spec, digests: dict[str, RowDigest]) -> str:
    """The runs table's `input_row_digests` of a date: JSON with the hash scheme and, per modality, its rows, their
    hashes' sum and the columns hashed (`Spec.columns_read`: what a job reads of its files)."""
    return json.dumps({"hash": HASH, "modalities": {
        m: {**d.to_dict(), "columns": spec.columns_read(spec.modalities[m])} for m, d in sorted(digests.items())}},
        sort_keys=True)


def date_digests(spec: Spec, files: list[InputFile], columns: dict[str, list[str]]) -> dict[str, RowDigest | None]:
    """Per modality of `columns`, the digest of every row of `files` (a date's own partitions, as listed now) over
    those columns; None for a modality some file of which lacks one of them (its rows cannot be the same)."""
    from pipelines.ingest import of_listed_date         # ingest imports this module

    storage = Storage.from_spec(spec.storage)
    out: dict[str, RowDigest | None] = {m: RowDigest() for m in columns}
    for f in files:
        if f.modality not in columns or out[f.modality] is None:
            continue
        wanted = columns[f.modality]
        filesystem = storage.filesystem(spec.modalities[f.modality].path)
        try:
            opened = open_parquet(filesystem, f.path)
        except UnreadableFile:              # no Parquet now: its rows cannot be the ones scored
            out[f.modality] = None
            continue
        with opened as parquet:
            # columns in the file's folders only (Hive, Spark), or added to its Delta table since (null)
            values = file_values(f, parquet.schema_arrow, spec.modalities[f.modality].former_names)
            names = set(with_path_fields(parquet.schema_arrow, values).names)
            # a column renamed upstream (`former_names`, either way) or stored under its physical name (a Delta
            # table's column mapping): read under the name the file holds
            former = with_stored_names(spec.modalities[f.modality], f.stored_names).former_names
            read = [held_name(former, c, lambda n: n.split(".")[0] in names) for c in wanted]
            if not all(c.split(".")[0] in names for c in read):
                out[f.modality] = None
                continue
            groups = None if f.row_groups is None else list(f.row_groups)
            m = spec.modalities[f.modality]
            if f.span is not None and spec.time_in(m) not in wanted:    # its rows of the date cannot be told apart
                out[f.modality] = None
                continue
            time = read[wanted.index(spec.time_in(m))] if f.span is not None else None    # as the file names it
            try:
                for part in each_row_group(parquet, f.path, read, groups, filesystem, f.deleted, values):
                    # a file listed under each date its rows span: its rows of `f.date`
                    part = of_listed_date(part, time, spec.time_unit_in(m), spec.naive_zone_in(m),
                                          spec.time_format_in(m), spec.timezone, f.date, f.span,
                                          [read[wanted.index(k)] for k in spec.entity_in(m) if k in wanted])
                    out[f.modality].add(row_hashes(part))
            except DamagedRowGroup:         # pages that do not decode now: its rows cannot be the ones scored
                out[f.modality] = None
    return out


def same_rows(recorded: str | None, now: dict[str, RowDigest | None], modalities: list[str]) -> bool:
    """Whether each of `modalities` holds the rows a run recorded (`record`'s JSON): False where it recorded none,
    under another hash scheme, or not for one of them."""
    if not recorded:
        return False
    then = json.loads(recorded)
    if then.get("hash") != HASH:
        return False
    for m in modalities:
        entry, digest = then["modalities"].get(m), now.get(m)
        if entry is None or digest is None or digest.to_dict() != {"rows": entry["rows"], "sum": entry["sum"]}:
            return False
    return True


def recorded_columns(recorded: str | None) -> dict[str, list[str]]:
    """Per modality, the columns a run's digests were taken over (empty: it recorded none under this scheme)."""
    if not recorded:
        return {}
    then = json.loads(recorded)
    return {m: e["columns"] for m, e in then["modalities"].items()} if then.get("hash") == HASH else {}
