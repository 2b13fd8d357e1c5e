"""`dmafn validate --check-data`: what each modality's path really holds, against what the spec expects.

Metadata only (listings and Parquet footers, no rows): per modality the partitions found, their dates, files,
bytes and the columns with their types; every problem (a path that cannot be listed, no partitions under the
spec's key, a file that is not Parquet, a column missing or of the wrong type, files whose columns differ) is
listed, not only the first. The labels, when the spec has them, are read (they are small): their rows, how many
are used and why the others cannot be (`labels.load_labels`); labels that cannot be read or have a column
missing or of the wrong type are a problem. Footers are read by `FOOTER_READERS` threads at once (a footer is a
round trip to the store: on S3, a lake of 100,000 files read one after another takes hours), each file closed
after its footer; problems are listed in file order whatever thread finished first.
"""
from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs

from dmafn.spec import Spec
from pipelines.ingest import check_schema, entity_casts, partition_span_us
from pipelines.align import date_end_us, date_start_us, label_intervals
from pipelines.labels import load_labels
from pipelines.parquet_files import field_of, list_parquet_files, open_parquet, time_bounds
from pipelines.storage import DataError, Storage, list_partitions
from pipelines.stored_times import is_count

FOOTER_READERS = 16


@dataclass
class ModalityData:
    name: str
    path: str
    dates: list[dt.date] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    columns: dict[str, str] = field(default_factory=dict)     # name -> Arrow type, as the first file has them
    problems: list[str] = field(default_factory=list)
    misplaced: list[tuple[str, dt.date, int, int]] = field(default_factory=list)   # files holding rows timed
    zone: str = "UTC"                       # outside their date (path, date, first, last time); the spec's timezone
    integer_times: str | None = None        # the modality's time_unit, where some file stores its time as numbers
    # the Arrow types of the spec's columns (entity, time, values) as stored -> the first file storing them so
    stored_types: dict[tuple[tuple[str, str], ...], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)        # how its files are read where that is not as stored
    naive_as_utc: bool = False              # a time without a zone read as UTC although the dates are a zone's

    def lines(self) -> list[str]:
        if not self.dates:
            return [f"{self.name}: {self.path}: no data"]
        gaps = (self.dates[-1] - self.dates[0]).days + 1 - len(self.dates)
        columns = ", ".join(f"{c} {t}" for c, t in self.columns.items())
        return [f"{self.name}: {self.path}",
                f"  partitions: {len(self.dates)} dates {self.dates[0]} .. {self.dates[-1]}"
                + (f" ({gaps} date(s) missing in between)" if gaps else ""),
                f"  files: {self.files}, {self.bytes / 1e6:.1f} MB",
                f"  columns: {columns}"] + [f"  {note}" for note in self.notes] + self._stored_types_lines() \
            + self._misplaced_lines()

    def _stored_types_lines(self) -> list[str]:
        if len(self.stored_types) < 2:
            return []
        (first, path), *others = self.stored_types.items()
        ways = [", ".join(f"{c} {t}" for (c, t), (_, was) in zip(types, first) if t != was) + f" in {other}"
                for types, other in others[:2]]
        empty = any(t == "null" for types in self.stored_types for _, t in types)
        return [f"  the spec's columns are stored as other types in some files ({len(self.stored_types)} ways; each "
                "file is read as its own types say" + ("; a column of type null holds no value: its rows are "
                                                       "quarantined" if empty else "")
                + f"): {path} has {', '.join(f'{c} {t}' for c, t in first)}; "
                + "; ".join(ways) + ("; ..." if len(others) > 2 else "")]

    def _misplaced_lines(self) -> list[str]:
        if not self.misplaced:
            return []
        path, date, first, last = self.misplaced[0]
        return [f"  rows timed outside their date partition (dates of timezone {self.zone}, by the footers' time "
                f"statistics): in {len(self.misplaced)} of {self.files} files, e.g. {path} ({date}) holds "
                f"{_span(first, last)} - misfiled rows (quarantined when scored), rows filed by the day "
                "they arrived (set `lateness`), or partitions cut by another time zone's dates (set `timezone`)"
                + (f", or numeric times that count another unit than `time_unit` ({self.integer_times})"
                   if self.integer_times else "")
                + (f", or times without a zone that show {self.zone}'s wall clock (set `naive_times: local`)"
                   if self.naive_as_utc else "")]


def _span(first: int, last: int) -> str:
    """Two times (microseconds since the epoch) as a line shows them: UTC to the minute, or the counts where no
    calendar holds them (integer times read in too small a unit)."""
    try:
        return " .. ".join(dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
                           for us in (first, last)) + " UTC"
    except (OverflowError, ValueError, OSError):
        return f"{first} .. {last} microseconds since the epoch"


@dataclass
class LabelsData:
    """What the labels hold: `summary` (`Labels.summary`), or the problem that kept them from being read."""
    path: str
    summary: dict | None = None
    problems: list[str] = field(default_factory=list)
    in_training: str | None = None          # what training does with the labels inside its window

    def lines(self) -> list[str]:
        if self.summary is None:
            return [f"labels: {self.path}: cannot be used"]
        left = ", ".join(f"{n} {why}" for why, n in self.summary["unusable"].items())
        return [f"labels: {self.path}",
                f"  rows: {self.summary['rows']}, used {self.summary['used']}" + (f"; left out: {left}" if left else "")] \
            + ([f"  {self.in_training}"] if self.in_training else [])


def check_labels(spec: Spec, storage: Storage) -> LabelsData:
    """The spec's labels read and checked (a DataError becomes the problem), and how many of the usable ones lie
    in the training window - what `dmafn train` does with their ticks (`train.exclude_labelled`)."""
    data = LabelsData(spec.labels.path)
    try:
        labels = load_labels(spec, storage)
    except DataError as exc:
        data.problems.append(str(exc))
        return data
    data.summary = labels.summary()
    intervals = label_intervals(labels.usable, spec, spec.labels.start, spec.labels.end)
    lo, hi = date_start_us(spec.train.start, spec.timezone), date_end_us(spec.train.end, spec.timezone)
    inside = intervals.filter((pl.col("_s") < hi) & (pl.col("_e") >= lo)).height
    if inside:
        window = f"the training window {spec.train.start}..{spec.train.end}"
        data.in_training = (f"{inside} of them in {window}: trained on as labelled anomalies (the classifier)"
                            if spec.model.detector == "classifier" else
                            f"{inside} of them in {window}: their ticks are left out of training and calibration "
                            "(train.exclude_labelled)" if spec.train.exclude_labelled else
                            f"{inside} of them in {window}: trained on as normal (train.exclude_labelled: false)")
    return data


def file_footer(filesystem: pafs.FileSystem, path: str, time_column: str, time_unit: str | None = None,
                naive_zone: str | None = None) -> tuple[pa.Schema, tuple[int, int] | None] | DataError:
    """The Arrow schema in the footer of the Parquet file at `path` and the earliest and latest time its time
    column's statistics give (None: none to go by), or the DataError naming it (returned, so that a thread pool's
    map keeps going); the file is closed afterwards."""
    try:
        parquet = open_parquet(filesystem, path)
    except DataError as exc:
        return exc
    try:
        schema = parquet.schema_arrow
        bounds = time_bounds(parquet, time_column, time_unit, naive_zone) \
            if field_of(schema, time_column) is not None else None
        return schema, None if not bounds else (min(lo for lo, _ in bounds), max(hi for _, hi in bounds))
    finally:
        parquet.close()


def _key_notes(spec: Spec, keyed: dict[str, list[pa.Schema]], found: dict[str, ModalityData]) -> None:
    """A note on each modality whose entity key is stored otherwise than in another's, or otherwise in some of its
    own files (`keyed`: a schema per way each modality's files store the keys), and read alike in every table
    (`ingest.entity_casts`, as the jobs read them)."""
    for key, kind in entity_casts(spec, keyed):
        i = spec.entity.index(key)
        stored = {name: " and ".join(dict.fromkeys(str(field_of(s, spec.entity_in(spec.modalities[name])[i]).type)
                                                   for s in held)) for name, held in keyed.items()}
        for name, mine in stored.items():
            by_type: dict[str, list[str]] = {}
            for other, t in stored.items():
                if t != mine:
                    by_type.setdefault(t, []).append(other)
            others = "; ".join(f"{t} in {', '.join(names)}" for t, names in by_type.items())
            if others or " and " in mine:
                found[name].notes.append(
                    f"entity '{key}' stored as {mine}" + (f" ({others})" if others else " in its files") + ": read as "
                    + ("text in every table, so that 17 and '17' are one entity" if kind == "text"
                       else "64-bit integers in every table"))


def check_data(spec: Spec, storage: Storage | None = None) -> list[ModalityData | LabelsData]:
    """What every modality path holds, and the labels if the spec has them; problems are collected on each,
    nothing is raised."""
    storage = storage or Storage.from_spec(spec.storage)
    found: list[ModalityData | LabelsData] = []
    dated: dict[str, set[dt.date]] = {}         # the dates of each modality's files (context views: their parent's)
    keyed: dict[str, dict[tuple[str, ...], pa.Schema]] = {}   # per modality, a schema per way it stores its keys
    for name, m in spec.modalities.items():
        data = ModalityData(name, m.path, zone=spec.timezone,
                            naive_as_utc=spec.timezone != "UTC" and spec.naive_zone_in(m) is None)
        found.append(data)
        try:
            partitions = list_partitions(storage, m.path, spec.partition)
            files = list_parquet_files(storage.filesystem(m.path), partitions)
        except DataError as exc:
            data.problems.append(f"modality '{name}': {exc}")
            continue
        data.dates = sorted(partitions)
        data.files, data.bytes = len(files), sum(f.size for f in files)
        if not files:
            data.problems.append(f"modality '{name}' ({m.path}): partitions but no Parquet files")
        elif not m.context_of:
            dated[name] = {dt.date.fromisoformat(f.date) for f in files}
        time, unit = spec.time_in(m), spec.time_unit_in(m)      # as the modality's files store it
        wanted = list(dict.fromkeys([*spec.entity_in(m), time, *m.value_columns]))
        filesystem, paths = storage.filesystem(m.path), [f.path for f in files]
        dates = {f.path: dt.date.fromisoformat(f.date) for f in files}
        with ThreadPoolExecutor(FOOTER_READERS) as pool:      # results in file order, taken as they come
            footers = pool.map(lambda path: file_footer(filesystem, path, time, unit, spec.naive_zone_in(m)), paths)
            for path, footer in zip(paths, footers):
                try:
                    if isinstance(footer, DataError):
                        raise footer
                    schema, times = footer
                    check_schema(schema, spec, m, path)
                except DataError as exc:
                    data.problems.append(str(exc))
                    continue
                if not m.context_of:
                    keyed.setdefault(name, {}).setdefault(
                        tuple(str(field_of(schema, k).type) for k in spec.entity_in(m)), schema)
                if times is None or m.context_of:   # a context view reads its parent's files: noted once, there
                    continue
                if is_count(field_of(schema, time).type):
                    data.integer_times = unit
                lo, hi = partition_span_us(dates[path], spec.timezone, spec.lateness_us)
                if times[0] < lo or times[1] >= hi:
                    data.misplaced.append((path, dates[path], *times))
                if not data.columns:
                    data.columns = {f.name: str(f.type) for f in schema}
                data.stored_types.setdefault(tuple((c, str(field_of(schema, c).type)) for c in wanted), path)
    _key_notes(spec, {name: list(ways.values()) for name, ways in keyed.items()}, {d.name: d for d in found})
    _training_days_problems(spec, dated, {d.name: d for d in found})
    if spec.labels:
        found.append(check_labels(spec, storage))
    return found


def _training_days_problems(spec: Spec, dated: dict[str, set[dt.date]], found: dict[str, ModalityData]) -> None:
    """A problem on each modality without a file in the training (validation) days' partitions where another one has
    files there: `dmafn train` refuses it (`shards.require_each_modality`). A window no modality has files in (aged
    out of the lake, a spec that only scores) is no problem here."""
    for role, days in zip(("training", "validation"), spec.train.split_days()):
        holding = {name for name, dates in dated.items() if dates & set(days)}
        for name in sorted(set(dated) - holding) if holding else []:
            found[name].problems.append(f"modality '{name}' ({spec.modalities[name].path}): no file in the partitions "
                                        f"of the {role} days {days[0]}..{days[-1]}, where {', '.join(sorted(holding))} "
                                        f"{'has' if len(holding) == 1 else 'have'} files: dmafn train would refuse it")
