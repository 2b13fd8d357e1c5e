"""Shards: the unit of work of every job. A shard is one or a few consecutive dates x one entity bucket,
sized by the input bytes of its files; the driver plans shards from metadata only (file lists and sizes).

Pure functions, no Ray: `list_inputs` lists each modality's Parquet files per date (the look-back days
included), `plan_shards` groups dates and entity buckets under a byte budget. `ShardScores` / `DateCounts`
are what a scoring task hands back for its shard (counts and file actions: plain data, no model code).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import zlib
from dataclasses import dataclass, field, replace

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dmafn.spec import ModalitySpec, Spec, voting_modalities
from pipelines.delta_sink import DeletedRows
from pipelines.parquet_files import DamagedRowGroup, RowTimes, UnreadableFile, column_chunk, field_of, list_table_files
from pipelines.payload_files import sample_listed
from pipelines.row_digests import RowDigest
from pipelines.storage import DataError, Storage, list_partitions

log = logging.getLogger(__name__)

# a shard's input files (Parquet bytes on disk, look-back days included) should stay under this: decoded and
# aligned they take ~10x that in one worker
SHARD_BYTES = 64_000_000
DAYS_PER_SHARD = 7


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of a modality: the date partition it lies in, its path (as the filesystem names it)
    and its size on disk; `row_groups`: only these are read (None: all; `pipelines.staging` moves a file's
    row groups of several entities to pieces per bucket and leaves the rest here)."""

    modality: str
    date: dt.date
    path: str
    size: int
    row_groups: tuple[int, ...] | None = None
    name: str = ""                  # its name inside the date's folder (as listed; a staged piece: its source's)
    mtime_ns: int | None = None     # when it was last written (None: the filesystem does not say)
    deleted: DeletedRows | None = None   # the rows a Delta deletion vector removes from it (positions in the file)
    stored_names: tuple[tuple[str, str], ...] = ()   # a Delta table's column mapping: column -> the file's name
    span: tuple[dt.date, dt.date] | None = None  # a Delta table not partitioned by date: its rows' first and last
                                                 # date (listed under each; read for `date`, its rows of that date)
    table_columns: tuple[str, ...] = ()     # a Delta table's columns, a plain table's `added_columns`: one the file
                                            # lacks is null (`file_values`)
    payload_bytes: int = 0                  # `payload: file`: about how many bytes the files its rows name hold
    source: str = ""                        # a staged piece: the path of the file it was split from


@dataclass(frozen=True)
class Shard:
    """Consecutive `dates` x entity bucket `bucket` of `buckets`; `files` holds every file it reads: its dates',
    the look-back days' before them (rows within each modality's window or tolerance of the first tick) and, with
    the spec's `lateness`, the look-ahead days' after them (rows of its dates filed late)."""

    dates: tuple[dt.date, ...]
    bucket: int
    buckets: int
    files: tuple[InputFile, ...]
    lookback_days: int = 1
    lookahead_days: int = 0
    key_casts: tuple[tuple[str, str], ...] = ()   # entity keys the tables store differently: (key, 'text'|'integer')

    @property
    def name(self) -> str:
        days = self.dates[0].isoformat() + (f"..{self.dates[-1].isoformat()}" if len(self.dates) > 1 else "")
        return f"{days}#{self.bucket}of{self.buckets}"

    def alone(self) -> list["Shard"]:
        """The same shard one date at a time (each with its own look-back files)."""
        if len(self.dates) == 1:
            return [self]
        return [replace(self, dates=(d,), files=tuple(
                    f for f in self.files if f.date in _reads((d,), self.lookback_days, self.lookahead_days)))
                for d in self.dates]


@dataclass
class DateCounts:
    """One date's part of a shard: counts and the data files written for it (add actions as plain data)."""

    ticks_in: int = 0
    rows_scored: int = 0
    rows_quarantined: int = 0
    anomalies: int = 0
    input_rows_quarantined: int = 0
    input_rows: int = 0                 # input rows its partitions held (usable or not)
    input_rows_misplaced: int = 0       # of them, quarantined as timed outside their date partition
    unusable_reasons: dict[str, int] = field(default_factory=dict)   # the other quarantined input rows, per modality
                                                                     # and reason (`ingest.unusable_reasons`)
    with_score: int = 0                 # scored ticks with a fused score, where the version recorded its validation
    above_validation_median: int = 0    # median score; of those, the ticks above it
    modality_above: dict[str, tuple[int, int]] = field(default_factory=dict)   # the same per modality's contribution
    entities: int = 0                   # entities with a scored tick (a date's shards hold disjoint entities)
    unseen: UnseenEntities | None = None   # scored entities the version has no statistics of their own for
    modality_rows: dict[str, int] = field(default_factory=dict)      # per modality, usable input rows of the date's
                                                                     # own partitions (context views left out)
    row_digests: dict[str, RowDigest] = field(default_factory=dict)  # per modality, those rows' digest as stored
    modality_present: dict[str, int] = field(default_factory=dict)   # per modality, scored ticks it was present at
    without_modality: dict[str, UnseenEntities] = field(default_factory=dict)   # per modality, the scored entities
                                                                    # it was absent at every tick of
    payload_formats: dict[str, dict[str, int]] = field(default_factory=dict)   # per image or audio modality, its
                                            # usable payloads of the date per stored format (a frame's size, a rate)
    row_intervals: dict[str, dict[str, int]] = field(default_factory=dict)   # per non-text modality
                                            # and entity, its median interval between rows (`ingest.daily_intervals`)
    entity_modalities: dict[str, int] = field(default_factory=dict)  # per scored entity key, the modalities present at
                                                        # any of its ticks, as bits (`entity_keys.entity_modalities`)
    output_files: list[dict] = field(default_factory=list)
    quarantine_files: list[dict] = field(default_factory=list)


UNSEEN_NAMED = 10     # entities not seen in training: named up to this many, the rest counted


@dataclass
class UnseenEntities:
    """A group of a date's scored entities with their ticks and alarms: those the model version holds no per-entity
    statistics of (not in its training data, or with too few rows there: they score by the fleet's statistics, so
    their own level reads as a deviation and they alarm more), or those a modality was absent at every tick of.
    Counts over one date's shards; `named` the first `UNSEEN_NAMED` keys (sorted)."""

    entities: int = 0
    ticks: int = 0
    anomalies: int = 0
    named: list[str] = field(default_factory=list)
    respelled: int = 0      # of entities new to the version, those spelled like a trained one but for case,
    respelled_named: list[tuple[str, str]] = field(default_factory=list)   # separators...: the first, with it

    def add(self, other: "UnseenEntities") -> "UnseenEntities":
        """Both counts together (one date's shards hold disjoint entities)."""
        return UnseenEntities(self.entities + other.entities, self.ticks + other.ticks,
                              self.anomalies + other.anomalies, sorted(self.named + other.named)[:UNSEEN_NAMED],
                              self.respelled + other.respelled,
                              sorted(self.respelled_named + other.respelled_named)[:UNSEEN_NAMED])

    @property
    def alarm_rate(self) -> float | None:
        """The share of their scored ticks that alarmed."""
        return self.anomalies / self.ticks if self.ticks else None


@dataclass
class ShardScores:
    """What a scoring task returns to the driver: per date counts and file actions, the tables' schemas (defined
    here, beside `Shard`, so the driver unpickles it without importing the model code)."""

    shard: str
    dates: dict[str, DateCounts]
    output_schema: pa.Schema | None
    quarantine_schema: pa.Schema | None
    seconds: float = 0.0


def _reads(dates: tuple[dt.date, ...], lookback_days: int, lookahead_days: int = 0) -> set[dt.date]:
    return {d + dt.timedelta(days=i) for d in dates for i in range(-lookback_days, lookahead_days + 1)}


def list_inputs(spec: Spec, dates: list[dt.date], storage: Storage) -> list[InputFile]:
    """Every modality's Parquet files of `dates`, of the look-back days before them and of the look-ahead days
    after them (`lateness`; metadata only).

    Raises DataError naming the path when a modality's table or a folder cannot be listed; a date with no
    folder simply has no files.
    """
    return list_partition_files(spec, sorted(_reads(tuple(dates), spec.lookback_days, spec.lookahead_days)), storage)


def list_partition_files(spec: Spec, dates: list[dt.date], storage: Storage, sized: bool = True) -> list[InputFile]:
    """Every modality's Parquet files of exactly the partitions of `dates` (`list_inputs` without the days around);
    with `sized`, a `payload: file` modality's files carry the bytes of the payload files they name (`payload_ratio`:
    a sample looked up - for planning shards; a listing that only compares what the partitions hold skips it)."""
    files, by_path = [], {}                 # a context view reads its parent's table: listed once
    for name, m in spec.modalities.items():
        if m.path not in by_path:
            added = tuple(dict.fromkeys(c for r in spec.modalities.values() if r.path == m.path
                                        for c in r.added_columns))
            by_path[m.path] = list_table_files(storage, m.path, spec.partition_in(m), dates, RowTimes.of(spec, m),
                                               added).files
        ratio = payload_ratio(storage, m, by_path[m.path]) if sized and m.payload == "file" else 0.0
        files += [InputFile(name, dt.date.fromisoformat(f.date), f.path, f.size, name=f.name, mtime_ns=f.mtime_ns,
                            deleted=f.deleted, stored_names=f.stored_names,
                            span=None if f.span is None else tuple(map(dt.date.fromisoformat, f.span)),
                            table_columns=f.table_columns, payload_bytes=int(f.size * ratio))
                  for f in by_path[m.path]]
    return files


def payload_ratio(storage: Storage, m: ModalitySpec, listed: list) -> float:
    """For a `payload: file` modality, about how many bytes of payload files each byte of its table files names:
    the rows of its largest listed file times the mean size of the payload files a sample of them names
    (`payload_files.sample_listed`); 0 without a file. A sample none of whose files exist is warned of (a wrong
    `payload_root`, say): the rows will be quarantined as their files cannot be read. A largest file whose bytes are
    no Parquet, or whose pages do not decode, leaves the shards sized by the table's bytes (its date's task fails or
    leaves it out)."""
    try:
        sample = sample_listed(storage, m, listed)
    except (UnreadableFile, DamagedRowGroup) as exc:
        log.warning("modality '%s': %s - its payload files are not sampled, shards sized by the table's bytes",
                    m.name, exc)
        return 0.0
    if sample is None:
        return 0.0
    if sample.names and not sample.found:
        log.warning("modality '%s': none of the %d payload files sampled from %s exist (the first: %s) - does "
                    "payload_root say where they lie?", m.name, len(sample.names), sample.path, sample.locations[0])
    return sample.bytes_per_byte()


@dataclass(frozen=True)
class PartitionFiles:
    """What a date's own partitions held when they were listed: how many files over every modality's table, and per
    modality (context views left out: they read their parent's files) a digest of each file's name, size and
    modification time (and, in a Delta table, of the rows its deletion vector removes) - a file added, removed or
    rewritten, or rows of it deleted in place, changes its modality's digest."""

    files: int
    digests: dict[str, str]

    def changed(self, recorded: dict[str, str]) -> list[str]:
        """The modalities whose digest differs from `recorded`'s (a listing's earlier `digests`); a modality only one
        of them knows is not compared."""
        return sorted(m for m, digest in recorded.items() if m in self.digests and self.digests[m] != digest)


def partition_files(spec: Spec, files: list[InputFile], dates: list[dt.date]) -> dict[dt.date, PartitionFiles]:
    """Each of `dates`' `PartitionFiles` from a listing (`list_inputs`' or `list_partition_files`'; the look-back and
    look-ahead days' files are not a date's own). A date without files has one too: files that land later change
    it."""
    lines = {d: {name: [] for name in voting_modalities(spec.modalities)} for d in dates}   # each reads its own table
    paths: dict[dt.date, set[str]] = {d: set() for d in dates}
    for f in files:
        if f.date in lines and f.modality in lines[f.date]:
            lines[f.date][f.modality].append(f"{f.name}\t{f.size}\t{f.mtime_ns}"
                                             + ("" if f.deleted is None else f"\t{f.deleted.token()}"))
            paths[f.date].add(f.path)
    return {d: PartitionFiles(len(paths[d]), {name: hashlib.sha256("\n".join(sorted(found)).encode()).hexdigest()[:16]
                                             for name, found in lines[d].items()})
            for d in dates}


def bytes_by_date(files: list[InputFile]) -> dict[dt.date, int]:
    """Each date's bytes on disk (a `payload: file` table's file with the payload files it names,
    `InputFile.payload_bytes`); a file listed under each date its rows span (`InputFile.span`) counts its size
    shared out evenly over them."""
    sizes: dict[dt.date, int] = {}
    for f in files:
        held = f.size + f.payload_bytes         # a table of payload files' names: the files' bytes too
        share = held if f.span is None else held // ((f.span[1] - f.span[0]).days + 1)
        sizes[f.date] = sizes.get(f.date, 0) + share
    return sizes


def plan_shards(spec: Spec, dates: list[dt.date], files: list[InputFile], *, shard_bytes: int = SHARD_BYTES,
                days_per_shard: int = DAYS_PER_SHARD, min_shards: int = 1,
                key_casts: tuple[tuple[str, str], ...] = ()) -> list[Shard]:
    """Shards covering `dates`: the entity buckets are as many as the largest date needs to fit `shard_bytes`
    (every bucket of a date reads the date's files and keeps its entities' rows), and consecutive dates share
    a shard while their bytes per bucket stay under `shard_bytes` (at most `days_per_shard` dates, fewer when
    that would give less than `min_shards` shards: a cluster's slots all get work, and the last shard to
    finish is short). `key_casts`: how every shard reads the entity keys the tables store differently
    (`ingest.entity_casts`)."""
    dates = sorted(set(dates))
    if not dates:
        return []
    sizes = bytes_by_date(files)
    buckets = max(1, max(-(-sizes.get(d, 0) // shard_bytes) for d in dates))
    days_per_shard = max(1, min(days_per_shard, -(-len(dates) * buckets // max(min_shards, 1))))
    groups: list[list[dt.date]] = []
    held = 0
    for d in dates:
        size = sizes.get(d, 0) / buckets
        if not groups or len(groups[-1]) == days_per_shard or held + size > shard_bytes \
                or (d - groups[-1][-1]).days != 1:
            groups.append([])
            held = 0
        groups[-1].append(d)
        held += size
    shards = []
    for group in groups:
        reads = _reads(tuple(group), spec.lookback_days, spec.lookahead_days)
        mine = tuple(f for f in files if f.date in reads)
        shards += [Shard(tuple(group), b, buckets, mine, spec.lookback_days, spec.lookahead_days, key_casts)
                   for b in range(buckets)]
    return shards


def bucket_of(key: str, buckets: int) -> int:
    """The entity bucket of `buckets` an entity key text falls in: CRC-32 of the text (the same in every process
    and version)."""
    return zlib.crc32(key.encode()) % buckets


def bucket_numbers(rows: pl.DataFrame, keys: list[str], buckets: int) -> pl.Series:
    """Each row's entity bucket of `buckets` (`bucket_of` of its key columns' text, '|' between several). A null
    key falls in one bucket, so its row is counted once."""
    key = pl.concat_str([pl.col(k).cast(pl.String).fill_null("\x00") for k in keys], separator="|")
    texts = rows.select(key.alias("_key"))["_key"]
    unique = texts.unique()
    numbers = pl.Series([bucket_of(k, buckets) for k in unique.to_list()], dtype=pl.UInt32)
    return texts.replace_strict(unique, numbers, return_dtype=pl.UInt32).alias("_bucket")


def in_bucket(rows: pl.DataFrame, keys: list[str], bucket: int, buckets: int) -> pl.DataFrame:
    """The rows whose entity falls in `bucket` of `buckets` (`bucket_numbers`)."""
    if buckets == 1:
        return rows
    return rows.filter(bucket_numbers(rows, keys, buckets) == bucket)


# a single-key row group is pruned only when its key is text or an integer (cast to text as `in_bucket` does) and
# shorter than this: some writers cut long text statistics
_EXACT_KEY_CHARS = 64


def row_group_entity(parquet: pq.ParquetFile, keys: list[str], row_group: int,
                     path: dict[str, str | pa.Scalar | None] | None = None) -> str | None:
    """The one entity key (as `in_bucket` writes it) of every row of `row_group` when its statistics say so (each
    key column's min equals its max, no nulls) - or, for a key the file does not hold, its folders (`path`: the
    file's partition values, `parquet_files.path_values`); None when they do not."""
    values = []
    for key in keys:
        if path and key in path and field_of(parquet.schema_arrow, key) is None:
            if not isinstance(path[key], str):        # a null folder, or a key column its Delta table added since
                return None
            values.append(path[key])
            continue
        field_type = field_of(parquet.schema_arrow, key).type
        if pa.types.is_dictionary(field_type):
            field_type = field_type.value_type
        text = pa.types.is_string(field_type) or pa.types.is_large_string(field_type)
        chunk = column_chunk(parquet, row_group, key)
        if chunk is None or not (text or pa.types.is_integer(field_type)):
            return None
        stats = chunk.statistics
        if stats is None or not stats.has_min_max or not stats.has_null_count or stats.null_count:
            return None
        if stats.min != stats.max or (text and len(stats.min) >= _EXACT_KEY_CHARS):
            return None
        values.append(str(stats.min))
    return "|".join(values)


def row_groups_in_bucket(parquet: pq.ParquetFile, keys: list[str], bucket: int, buckets: int,
                         path: dict[str, str | None] | None = None) -> list[int] | None:
    """The row groups of a file that may hold rows of entity bucket `bucket` of `buckets` (`bucket_of`):
    a row group whose statistics (or the file's folders, `path`) show one entity key and no null key is left out
    when that key falls in another bucket (a file per machine, files sorted by machine, or a folder per machine are
    then read by the bucket that owns them); every other row group is kept. None when all are kept."""
    if buckets == 1:
        return None
    kept = [r for r in range(parquet.metadata.num_row_groups)
            if (key := row_group_entity(parquet, keys, r, path)) is None or bucket_of(key, buckets) == bucket]
    return None if len(kept) == parquet.metadata.num_row_groups else kept


def require_data(spec: Spec, files: list[InputFile], dates: list[dt.date], storage: Storage) -> None:
    """DataError when no modality has a file for any of `dates` (before anything is written), saying where the
    lake's data ends (`newest_data_note`)."""
    wanted = set(dates)
    if not any(f.date in wanted for f in files):
        raise DataError(f"no modality of spec '{spec.name}' has data for {min(dates)}..{max(dates)}"
                        + newest_data_note(spec, storage))


def newest_data_note(spec: Spec, storage: Storage) -> str:
    """For an error that found no file for the dates asked: where the lake's date folders end - '; the newest
    date folder: 2024-01-06 (process, vibration), 2024-01-05 (camera)' - so that an upload that stopped, a date
    asked beyond the history or a lake filed by other dates tells itself apart. A table whose folders do not
    follow the spec's `partition` (a Delta table listed from its log) is left out; '' when none is left."""
    tables: dict[str, list[str]] = {}                  # each table -> the modalities reading it (views: none)
    for name in voting_modalities(spec.modalities):
        tables.setdefault(spec.modalities[name].path, []).append(name)
    newest: dict[dt.date, list[str]] = {}
    for path, names in tables.items():
        try:
            folders = list_partitions(storage, path, spec.partition_in(spec.modalities[names[0]]))
        except DataError:
            continue
        if folders:
            newest.setdefault(max(folders), []).extend(names)
    if not newest:
        return ""
    return "; the newest date folder: " + ", ".join(f"{d} ({', '.join(n)})" for d, n in sorted(newest.items(),
                                                                                              reverse=True))


def require_each_modality(spec: Spec, files: list[InputFile], dates: list[dt.date], role: str) -> None:
    """DataError naming the first modality (with a table of its own) that has no file in any of `dates`' partitions -
    training's `role` ("training", "validation") days, or recalibration's ("calibration"): a model cannot learn, or
    calibrate, a modality it never sees, and would score it with an encoder trained on nothing. A listing, before
    anything is read or written."""
    seen = {f.modality for f in files if f.date in set(dates)}
    for name in voting_modalities(spec.modalities):
        if name not in seen:
            remedy = {"training": "train on days that hold it (train.start/end), or leave it out of the spec",
                      "validation": "train on days that hold it (train.start/end, train.validation_days), or leave "
                                    "it out of the spec",
                      "calibration": "calibrate on days that hold it (--start, --end)"}[role]
            raise DataError(f"modality '{name}' ({spec.modalities[name].path}): no file in the partitions of the "
                            f"{role} days {min(dates)}..{max(dates)}, so the model could not "
                            f"{'learn' if role == 'training' else 'calibrate'} it: {remedy}")
