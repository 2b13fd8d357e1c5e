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
import pyarrow.parquet as pq

from dmafn.spec import ModalitySpec, Spec, other_names, with_stored_names
from pipelines.ingest import check_schema, entity_casts, partition_span_us, schema_as_read, stored_names
from pipelines.align import date_end_us, date_start_us, label_intervals
from pipelines.labels import load_labels
from pipelines.parquet_files import (RepeatedColumn, RowTimes, absent_columns, column_chunk, field_of, file_values,
                                     in_file, list_table_files, open_parquet, path_values, time_bounds,
                                     with_path_fields)
from pipelines.payload_files import sample_listed
from pipelines.storage import DataError, Storage, relative
from pipelines.stored_times import formats_shown, is_count, times_from_stored

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
    # a column read under another name (`former_names`): (column, name stored) -> [files, the first such file]
    renamed: dict[tuple[str, str], list] = field(default_factory=dict)
    # a value column whose footers' smallest or largest value is a number writers store for a missing value, not in
    # its `missing_values`: (column, number) -> [files, the first such file]
    markers: dict[tuple[str, float], list] = field(default_factory=dict)
    # a column of its Delta table (or of its plain table's `added_columns`) that files written before it was added
    # lack (read as null): -> [files, the first]
    absent: dict[str, list] = field(default_factory=dict)
    delta: bool = False                     # a Delta table (read as its log says)

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
            + self._renamed_lines() + self._absent_lines() + self._marker_lines() + self._misplaced_lines()

    def _absent_lines(self) -> list[str]:
        table, read = ("the Delta table", "as Delta reads it") if self.delta else ("the table", "by added_columns")
        return [f"  column '{col}' is not in {files} of {self.files} files (written before it was added to {table}, "
                f"e.g. {path}): read as null there, {read} - each of their rows' '{col}' an unusable value "
                "(quarantined), the modality absent where no value of it is within its tolerance or window"
                for col, (files, path) in self.absent.items()]

    def _marker_lines(self) -> list[str]:
        return [f"  column '{col}' reaches {value:g} in {files} of {self.files} files (the footers' statistics), e.g. "
                f"{path}: if that is its writer's number for a missing value, set modalities.{self.name}."
                f"missing_values: {{{col}: [{value:g}]}} to read it as none" for (col, value), (files, path)
                in self.markers.items()]

    def _renamed_lines(self) -> list[str]:
        return [f"  column '{col}' read under its former name '{stored}' (former_names) in {files} of {self.files} "
                f"files, e.g. {path}" for (col, stored), (files, path) in self.renamed.items()]

    def _stored_types_lines(self) -> list[str]:
        kept: list[tuple[dict[str, str], str]] = []     # the ways that differ in a column both store (a file that
        for types, path in self.stored_types.items():   # lacks a column added to its Delta table since is no other
            held = dict(types)                          # way: the columns it stores alike are merged into one)
            same = next((other for other, _ in kept if all(other.get(c, t) == t for c, t in held.items())), None)
            if same is None:
                kept.append((held, path))
            else:
                same.update(held)
        if len(kept) < 2:
            return []
        (first, path), *others = kept
        ways = [", ".join(f"{c} {t}" for c, t in types.items() if c in first and t != first[c]) + f" in {other}"
                for types, other in others[:2]]
        empty = any(t == "null" for types, _ in kept for t in types.values())
        return [f"  the spec's columns are stored as other types in some files ({len(kept)} ways; each "
                "file is read as its own types say" + ("; a column of type null holds no value: its rows are "
                                                       "quarantined" if empty else "")
                + f"): {path} has {', '.join(f'{c} {t}' for c, t in first.items())}; "
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


def _payload_sample(storage: Storage, m: ModalitySpec, files: list, data: ModalityData) -> None:
    """A `payload: file` modality's payload files, by a sample the largest file names (`sample_listed`): a note of
    how many bytes they hold about, a note naming one that does not exist, a problem where none of them does."""
    try:
        sample = sample_listed(storage, m, files)
    except DataError as exc:
        data.problems.append(str(exc))
        return
    if not sample.names:
        return
    missing = [where for where, size in zip(sample.locations, sample.sizes) if size is None]
    if len(missing) == len(sample.names):
        data.problems.append(f"modality '{m.name}' ({sample.path}): none of the {len(missing)} payload files its "
                             f"rows name that were looked up exists (the first: {missing[0]}) - does payload_root "
                             "say where they lie?")
        return
    found = sample.found
    data.notes.append(f"payload files (payload: file): about {sum(found) / len(found) / 1e3:.1f} kB each by "
                      f"{len(found)} looked up, about {sum(f.size for f in files) * sample.bytes_per_byte() / 1e6:.1f}"
                      " MB for the files listed" + (
                          f"; {len(missing)} of the {len(sample.names)} looked up do not exist, e.g. {missing[0]}: "
                          "rows whose file cannot be read are quarantined" if missing else ""))


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


MARKERS = (-2147483648.0, -99999.0, -32768.0, -9999.0, 9999.0, 32767.0, 65535.0, 99999.0, 2147483647.0)
# numbers writers store for a missing value (a historian's -9999, a register's 65535, an integer type's limit)


def numeric_extremes(parquet: pq.ParquetFile) -> dict[str, tuple[float, float]]:
    """Each numeric column's smallest and largest value by the footer's statistics (dotted: a field inside struct
    columns), over the row groups that have them; a name the file holds more than once is left out."""
    schema, out = parquet.schema_arrow, {}
    for r in range(parquet.metadata.num_row_groups):
        meta = parquet.metadata.row_group(r)
        for j in range(meta.num_columns):
            chunk = meta.column(j)
            try:
                found = field_of(schema, chunk.path_in_schema)
            except RepeatedColumn:      # which one is read cannot be told: named by the check if the spec reads it
                continue
            stats = chunk.statistics
            if found is None or not (pa.types.is_integer(found.type) or pa.types.is_floating(found.type)) \
                    or stats is None or not stats.has_min_max:
                continue
            lo, hi = out.get(chunk.path_in_schema, (float(stats.min), float(stats.max)))
            out[chunk.path_in_schema] = (min(lo, float(stats.min)), max(hi, float(stats.max)))
    return out


def file_footer(filesystem: pafs.FileSystem, path: str, time_column: str | tuple[str, ...],
                time_unit: str | None = None, naive_zone: str | None = None
                ) -> tuple[pa.Schema, tuple[int, int] | None, list[str], dict[str, tuple[float, float]]] | DataError:
    """The Arrow schema in the footer of the Parquet file at `path`, the earliest and latest time its time column's
    statistics give (None: none to go by), for a time stored as text the texts its statistics hold (its first row
    group's smallest and largest: samples of how the times are written), and each numeric column's extremes
    (`numeric_extremes`) - or the DataError naming it (returned, so that a thread pool's map keeps going); the file
    is closed afterwards."""
    try:
        parquet = open_parquet(filesystem, path)
    except DataError as exc:
        return exc
    try:
        schema = parquet.schema_arrow
        if not isinstance(time_column, str):      # the time and its other names: the first the file holds
            time_column = next((t for t in time_column if field_of(schema, t) is not None), time_column[0])
        found = field_of(schema, time_column)
        bounds = time_bounds(parquet, time_column, time_unit, naive_zone) if found is not None else None
        samples = []
        if found is not None and (pa.types.is_string(found.type) or pa.types.is_large_string(found.type)):
            chunk = column_chunk(parquet, 0, time_column) if parquet.metadata.num_row_groups else None
            stats = None if chunk is None else chunk.statistics
            if stats is not None and stats.has_min_max:
                samples = list(dict.fromkeys(str(v) for v in (stats.min, stats.max)))
        return (schema, None if not bounds else (min(lo for lo, _ in bounds), max(hi for _, hi in bounds)), samples,
                numeric_extremes(parquet))
    except RepeatedColumn as exc:       # the time column held twice
        return DataError(f"{path}: {exc}")
    finally:
        parquet.close()


# how logs and exports write times, for `validate --check-data` to suggest a `time_format` from (each read with an
# optional fraction of seconds; with an offset too)
_DATES = ("%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%Y/%m/%d", "%d-%m-%Y", "%m-%d-%Y", "%Y%m%d", "%d/%b/%Y", "%b %d %Y",
          "%d %b %Y", "%Y.%m.%d")
_CLOCKS = ("%H:%M:%S%.f", "%H:%M", "%I:%M:%S %p", "%I:%M %p")
FORMATS = tuple(f"{d}{sep}{c}{z}" for d in _DATES for sep in (" ", "T", ":") for c in _CLOCKS
                for z in ("", " %z", "%z")) \
    + ("%a %b %d %H:%M:%S %Y", "%a %b %e %H:%M:%S %Y", "%a, %d %b %Y %H:%M:%S %z")     # ctime, RFC 2822


def formats_reading(samples: list[str]) -> list[str]:
    """The formats of `FORMATS` that read every one of `samples` (texts of a time column), most specific first: what
    `validate --check-data` suggests as `time_format` (a day-first and a month-first format can both read them)."""
    texts = pl.Series([t.strip() for t in samples], dtype=pl.String)
    return [f for f in FORMATS if texts.str.strptime(pl.Datetime("us"), f, strict=False).null_count() == 0]


def _text_time_problem(spec: Spec, m, path: str, samples: list[str]) -> str | None:
    """A problem where the texts a file's statistics hold of its time column (`file_footer`) are no time as the spec
    reads them (ISO 8601, or its `time_format`): every row of such a file would be quarantined. With the formats that
    do read them."""
    read = times_from_stored(pl.Series(samples, dtype=pl.String), spec.time_unit_in(m), spec.naive_zone_in(m),
                             spec.time_format_in(m))
    if read is None or not read[1].is_not_null().any():
        return None
    written, key = spec.time_format_in(m), f"modalities.{m.name}.time_format"
    fits = formats_reading(samples)
    return (f"modality '{m.name}': time column '{spec.time_in(m)}' holds text such as "
            f"{', '.join(repr(t) for t in samples)} ({path}, by its statistics), which is not "
            + (f"a time in {formats_shown(written)}" if written else "an ISO 8601 time")
            + " - every such row would be quarantined; "
            + (f"set {key}: it reads as " + " or as ".join(f"'{f}'" for f in fits[:3])
               + (" (which one, the data's source says)" if len(fits) > 1 else "") if fits
               else f"set {key} to the strftime format the times are written in"))


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
            partitions, files, delta, replaced = list_table_files(storage, m.path, spec.partition_in(m), None,
                                                                  RowTimes.of(spec, m), m.added_columns)
        except DataError as exc:
            data.problems.append(f"modality '{name}': {exc}")
            continue
        data.delta = delta
        if delta and not m.context_of:             # a Delta table: the files its log holds now
            marked = [f.deleted.count for f in files if f.deleted is not None]
            data.notes.append(f"a Delta table: read as its log says ({len(files)} files" + (
                f"; {len(replaced)} more in its folders that it no longer holds - replaced by an OPTIMIZE, DELETE, "
                f"UPDATE or MERGE and not yet vacuumed, e.g. {relative(replaced[0].path, storage.fs_path(m.path))} "
                "- are not read" if replaced else "") + (
                f"; {sum(marked)} rows of {len(marked)} files deleted in place by deletion vectors - not read (the "
                "footers' statistics this check reads still count them)" if marked else "") + (
                "; with column mapping: listed from its log, its files' columns read by their physical names"
                if any(f.stored_names for f in files) else "") + (
                "; not partitioned by the date: each file read for every date from its first to its last time by "
                "the log's statistics" if any(f.span for f in files) else "") + ")")
        data.dates = sorted(partitions)
        if not files:
            data.problems.append(f"modality '{name}' ({m.path}): partitions but no Parquet files")
        elif not m.context_of:          # a file of each date its rows span (listed once): the dates it spans
            dated[name] = set(partitions) if any(f.span for f in files) else {dt.date.fromisoformat(f.date)
                                                                              for f in files}
        data.files, data.bytes = len(files), sum(f.size for f in files)
        if m.payload == "file" and files and not m.context_of:
            _payload_sample(storage, m, files, data)
        time, unit = spec.time_in(m), spec.time_unit_in(m)      # as the modality's files store it
        filesystem = storage.filesystem(m.path)
        with ThreadPoolExecutor(FOOTER_READERS) as pool:      # results in file order, taken as they come
            def footer_of(f):
                # a time renamed upstream too, or stored under its physical name (a Delta table's column mapping)
                times_named = (time, *other_names(with_stored_names(m, f.stored_names).former_names, time))
                return file_footer(filesystem, f.path, times_named, unit, spec.naive_zone_in(m))
            footers = pool.map(footer_of, files)
            unread_text = None                                # the first file whose time texts are no time: named
            for listed, footer in zip(files, footers):
                path, stored_as = listed.path, with_stored_names(m, listed.stored_names)   # as the file stores them
                physical = {p: c for c, p in listed.stored_names if p != c}      # its name for a column -> the column
                try:
                    if isinstance(footer, DataError):
                        raise footer
                    schema, times, samples, extremes = footer
                    # columns added to its Delta table since it was written (null there), or in its folders only
                    with in_file(name, path):
                        lacked = set(absent_columns(schema, listed.table_columns, listed.stored_names,
                                                    m.former_names)) - set(path_values(listed.name))
                        schema = with_path_fields(schema, file_values(listed, schema, m.former_names))
                        check_schema(schema, spec, stored_as, path)
                except DataError as exc:
                    data.problems.append(str(exc))
                    continue
                if not data.columns:
                    data.columns = {physical.get(f.name, f.name): str(f.type) for f in schema if f.name not in lacked}
                if m.context_of:                    # a context view reads its parent's files: noted once, there
                    continue
                as_read = schema_as_read(schema, spec, stored_as)     # the key casts go by the names read
                keyed.setdefault(name, {}).setdefault(tuple(str(field_of(as_read, k).type) for k in spec.entity_in(m)),
                                                      as_read)
                names = stored_names(schema, spec, stored_as)
                for stored, read in names.items():
                    if stored in lacked:
                        data.absent.setdefault(read, [0, path])[0] += 1
                    if stored != read and stored not in physical:
                        data.renamed.setdefault((read, stored), [0, path])[0] += 1
                    marked = dict(m.missing_values).get(read, ())
                    if read in m.value_columns and m.kind in ("tabular", "timeseries"):
                        for value in dict.fromkeys(extremes.get(stored, ())):
                            if value in MARKERS and value not in marked:
                                data.markers.setdefault((read, value), [0, path])[0] += 1
                data.stored_types.setdefault(tuple((read, str(field_of(schema, stored).type))
                                                   for stored, read in names.items() if stored not in lacked), path)
                if samples and unread_text is None and (unread_text := _text_time_problem(spec, m, path, samples)):
                    data.problems.append(unread_text)
                if times is None:                   # no time statistics to go by (a time stored as text)
                    continue
                if is_count(field_of(as_read, time).type):
                    data.integer_times = unit
                day = dt.date.fromisoformat(listed.date)
                lo, hi = partition_span_us(day, spec.timezone, spec.lateness_us)
                if listed.span is None and (times[0] < lo or times[1] >= hi):   # a file spanning dates is never
                    data.misplaced.append((path, day, *times))
            for col in m.added_columns if not delta and not m.context_of else ():
                if data.files and data.absent.get(col, [0])[0] == data.files:
                    data.problems.append(f"modality '{name}': column '{col}' (added_columns) is in none of its "
                                         f"{data.files} files - every value of it would be null (a misspelt name?)")
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
