"""The pipeline spec: a YAML file parsed into frozen dataclasses, validated, never executed.

Every error names the file and the key. Unknown keys are errors.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import posixpath
import re
import zoneinfo
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from dmafn.partition_layout import LayoutError, parse_layout

MODALITY_KINDS = ("tabular", "timeseries", "image", "text", "audio")
FUSIONS = ("early", "late", "attention", "gated")
DETECTORS = ("autoencoder", "vae", "adversarial", "classifier", "svdd")
SERIES_ENCODERS = ("gru", "lstm", "tcn", "transformer")
TEXT_ENCODERS = ("transformer", "bag")
WINDOW_TRANSFORMS = ("level", "centered", "difference")   # how a window is presented (features.transform_window)
SERIES_TRANSFORMS = (*WINDOW_TRANSFORMS, "auto")          # auto: per channel, level or centered by its training drift
TICK_TIME = "_t"            # aligned rows: the tick time, Int64 microseconds since the epoch (UTC)
VOTES = ("mean", "max", "weighted", "attention")
CONTRIBUTION_SCALES = ("robust", "tail")
PRESETS = ("small", "base")
TIME_UNITS = ("s", "ms", "us", "ns")                       # a time column stored as integers since the epoch
NORMALIZATIONS = ("global", "entity")
THRESHOLD_METHODS = ("pot", "quantile", "rate", "fixed")
TAIL_METHODS = ("pot", "quantile", "rate")   # threshold methods fitted on the validation ticks' upper tail
CLASSIFIER_THRESHOLD = 0.0   # a classifier's threshold unless the spec gives a method: logit 0, P(anomaly) 0.5 under
                             # its class-weighted loss (a tail method would sit among its validation days' incidents)
SMOOTHING_METHODS = ("none", "ewma", "rolling")
MISSING_INPUT = ("fail", "skip")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|sec|min|m|h|d)\s*$")
_UNITS_US = {"us": 1, "ms": 1_000, "s": 1_000_000, "sec": 1_000_000, "min": 60_000_000,
             "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
DAY_US = _UNITS_US["d"]


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file and the key."""


def parse_duration_us(text: Any, *, where: str) -> int:
    """'100ms', '5min', '2h', '1d' -> microseconds (int)."""
    match = _DURATION.match(str(text))
    if not match:
        raise SpecError(f"{where}: {text!r} is not a duration like 100ms, 1s, 5min, 2h, 1d")
    value = float(match.group(1)) * _UNITS_US[match.group(2)]
    if value <= 0:
        raise SpecError(f"{where}: duration must be positive, got {text!r}")
    return int(round(value))


def format_duration(us: int) -> str:
    for unit in ("d", "h", "min", "s", "ms"):
        if us % _UNITS_US[unit] == 0:
            return f"{us // _UNITS_US[unit]}{unit}"
    return f"{us}us"


@dataclass(frozen=True)
class ModalitySpec:
    """One modality table and how it is aligned to the tick."""

    name: str
    kind: str
    path: str
    columns: tuple[str, ...] = ()       # tabular / timeseries value columns
    column: str | None = None           # image / text / audio payload column
    period_us: int | None = None        # timeseries resampling period
    window_us: int | None = None        # timeseries / text: window ending at the tick
    tolerance_us: int | None = None     # tabular / image / audio: max age of the latest row
    size: tuple[int, int] | None = None  # image (height, width)
    channels: int = 1                   # image: 1 grey, 3 RGB
    sample_rate: int | None = None      # audio
    clip_us: int | None = None          # audio clip length fed to the model
    encoder: str | None = None          # timeseries / text encoder override
    transform: str = "level"            # timeseries: level | centered | difference | auto (features.transform_window)
    context_of: str | None = None       # a slow view: the coarse window of this modality over the same rows
    encoding_distance: float = 0.0      # weight of the encoding's distance from the training encodings in the
                                        # modality's error (0: off; `dmafn.density.EncodingDensity`)
    channel_dropout: float | None = None   # tabular / timeseries: training hides each of its channels at this rate,
                                           # when not the model's `channel_dropout`
    time_column: str | None = None      # the time column's name in this table when not the spec's `time`
    entity_columns: tuple[str, ...] | None = None   # the entity columns' names here when not the spec's `entity`
    time_unit: str | None = None        # what this table's numeric time counts, when not the spec's `time_unit`
    naive_times: str | None = None      # utc | local: what this table's times without a zone are, when not the spec's
    time_format: str | tuple[str, ...] | None = None   # how this table writes a time as text (formats tried in
                                                       # order), when not ISO 8601 nor as the spec's says
    former_names: tuple[tuple[str, tuple[str, ...]], ...] = ()   # a column -> the other names its files have
                                                                 # stored it under (a rename upstream)
    partition: str | None = None        # where this table's date folders lie, when not as the spec's `partition`
    missing_values: tuple[tuple[str, tuple[float, ...]], ...] = ()   # a value column -> the numbers its writer puts
                                                                     # where it has none (-9999): unusable values
    added_columns: tuple[str, ...] = ()     # value columns added to the table after some of its files were written:
                                            # a file without one reads null there (unusable values), not an error
    payload: str = "bytes"              # image / audio: bytes (in the column) | file (the column says where each lies)
    payload_root: str | None = None     # payload: file - where a relative file name lies (a folder or s3:// prefix)

    @property
    def value_columns(self) -> tuple[str, ...]:
        return self.columns if self.kind in ("tabular", "timeseries") else (self.column,)

    @property
    def lookback_us(self) -> int:
        """How far before a tick this modality may read."""
        return int(self.window_us or self.tolerance_us or 0)

    @property
    def steps(self) -> int:
        """Timeseries: number of resampled steps in the window."""
        return int(self.window_us // self.period_us)

    @property
    def samples(self) -> int:
        """Audio: number of samples per clip."""
        return int(round(self.sample_rate * self.clip_us / 1e6))


@dataclass(frozen=True)
class LabelsSpec:
    path: str
    start: str = "start_ts"
    end: str = "end_ts"


@dataclass(frozen=True)
class ModelSpec:
    fusion: str = "attention"
    detector: str = "autoencoder"
    preset: str = "small"
    series_encoder: str = "gru"
    text_encoder: str = "transformer"
    vote: str = "attention"
    contribution_scale: str = "robust"      # robust | tail: the units contributions are voted in
    normalization: str = "global"
    modality_dropout: float = 0.25
    channel_dropout: float = 0.25           # training hides each channel of a sensor table or series at this rate
    cross_modal_scoring: bool = True
    cross_modal_relations: bool = True      # context relations also fitted with the peer modalities' values
    state_baseline: bool = True             # each modality's error against its level at the operating state
    window_spread: bool = True              # a series channel's swing within its window read beside its mean
    relation_smoothing: float = 0.7         # EWMA weight of each channel's signed relation residual (1: none)
    state_speed_us: int = 300_000_000       # time constant of the operating state's recent average that its speed is
                                            # read against (the state baseline's speed columns; spec false: 0, none)


@dataclass(frozen=True)
class TrainSpec:
    start: dt.date
    end: dt.date
    epochs: int = 10
    workers: int = 2
    gpu: bool = False
    batch_size: int = 256
    learning_rate: float = 1e-3
    validation_days: int = 1
    seed: int = 0
    exclude_labelled: bool = True   # ticks in (or just after) a labelled interval: not trained or calibrated on
    # validation ticks where a voting modality lies beyond this many IQRs over its median are left out of the
    # calibration (`dmafn.calibration.OutlierTicks`: unlabelled incidents); None (spec: 0) keeps every tick
    validation_outlier_limit: float | None = 4.0

    def split_days(self) -> tuple[list[dt.date], list[dt.date]]:
        """Training days and validation days (the last `validation_days` of the window; both the whole window when
        it is one day)."""
        days = [self.start + dt.timedelta(days=i) for i in range((self.end - self.start).days + 1)]
        n_val = min(self.validation_days, len(days) - 1)
        return (days[:-n_val], days[-n_val:]) if n_val > 0 else (days, days)


@dataclass(frozen=True)
class ThresholdSpec:
    method: str = "pot"
    risk: float = 1e-3
    quantile: float = 0.99
    value: float | None = None
    level: float = 0.98
    rate: float = 0.01            # method 'rate': the share of validation ticks that may alarm
    per_entity: bool = False      # each entity's smoothed score standardised by its own validation scores


@dataclass(frozen=True)
class SmoothingSpec:
    method: str = "ewma"
    alpha: float = 0.3
    window: int = 5
    knee: float | None = None     # over it a tick's score counts by the log of its excess (`postprocess.soften`)


@dataclass(frozen=True)
class ScoreSpec:
    output: str
    threshold: ThresholdSpec = field(default_factory=ThresholdSpec)
    smoothing: SmoothingSpec = field(default_factory=SmoothingSpec)
    quarantine: str | None = None
    runs: str | None = None
    staging: str | None = None
    missing_input: str = "fail"   # a date no modality has input for: 'fail' (an outage) or 'skip' (a plant at rest)

    @property
    def quarantine_path(self) -> str:
        return self.quarantine or self.output.rstrip("/") + "_quarantine"

    @property
    def runs_path(self) -> str:
        return self.runs or self.output.rstrip("/") + "_runs"

    @property
    def staging_path(self) -> str:
        """Where a run splits files that interleave entities, by entity bucket (deleted as it goes)."""
        return self.staging or self.output.rstrip("/") + "_staging"


@dataclass(frozen=True)
class StorageSpec:
    endpoint_url: str | None = None
    region: str | None = None
    allow_http: bool | None = None
    timeout_s: float = 10.0      # each S3 connect and request; with one retry an unresponsive endpoint fails in ~30 s
    retries: int = 1             # a failed S3 request is tried again this many times (throttling on a busy bucket)


@dataclass(frozen=True)
class Spec:
    """A validated pipeline spec (see README: 'The spec')."""

    name: str
    entity: tuple[str, ...]
    time: str
    grain_us: int
    partition: str
    modalities: dict[str, ModalitySpec]
    train: TrainSpec
    registry: str
    score: ScoreSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    labels: LabelsSpec | None = None
    storage: StorageSpec = field(default_factory=StorageSpec)
    source: str = "<memory>"
    timezone: str = "UTC"               # the zone whose calendar days the dates are (partitions, train days, output)
    lateness_us: int = 0                # how long after its time a row may still be filed (partitions by arrival)
    time_unit: str | None = None        # what a time column stored as integers counts since the epoch (s|ms|us|ns)
    naive_times: str = "utc"            # utc | local: a time without a zone is UTC, or the wall clock of `timezone`
    time_format: str | tuple[str, ...] | None = None   # how a time stored as text is written (a strftime format,
                                                       # or several tried in order) when not ISO 8601
    unreadable_files: str = "fail"      # fail | skip: an input file whose bytes are no Parquet (truncated, empty),
                                        # or a row group of one whose pages do not decode, fails its date, or is left
                                        # out of it - named in the quarantine and runs tables

    @property
    def lookback_days(self) -> int:
        """Days before a date whose partitions feed its first ticks."""
        return self._days_covering(max(m.lookback_us for m in self.modalities.values()))

    @property
    def lookahead_days(self) -> int:
        """Days after a date whose partitions may hold its rows (filed up to `lateness` after their time)."""
        return self._days_covering(self.lateness_us) if self.lateness_us else 0

    def _days_covering(self, span_us: int) -> int:
        """Whole days that always cover `span_us` (outside UTC an hour more: a local day can be 23 hours)."""
        return -(-(span_us + (_UNITS_US["h"] if self.timezone != "UTC" else 0)) // DAY_US)

    @property
    def evidence_reach_us(self) -> int:
        """How long after an event its evidence can stay in the ticks' inputs: the longest reach of a modality that
        is not a context view (a log window, a camera frame's tolerance)."""
        return max((m.lookback_us for m in self.modalities.values() if not m.context_of), default=0)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (saved with every model version)."""
        return spec_to_dict(self)

    def time_in(self, m: ModalitySpec) -> str:
        """The name of the time column in modality `m`'s files (its own `time`, else the spec's)."""
        return m.time_column or self.time

    def entity_in(self, m: ModalitySpec) -> tuple[str, ...]:
        """The names of the entity columns in modality `m`'s files (its own `entity`, else the spec's), in the
        order of the spec's."""
        return m.entity_columns or self.entity

    def time_unit_in(self, m: ModalitySpec) -> str | None:
        """What a time stored as a number in modality `m`'s files counts since the epoch (its own `time_unit`, else
        the spec's; None: a numeric time is no time)."""
        return m.time_unit or self.time_unit

    def time_format_in(self, m: ModalitySpec | None = None) -> str | tuple[str, ...] | None:
        """How modality `m`'s files write a time stored as text (its own `time_format`, else the spec's; without `m`,
        the spec's own, as the labels read theirs); None: ISO 8601."""
        return (m and m.time_format) or self.time_format

    def naive_zone_in(self, m: ModalitySpec | None = None) -> str | None:
        """The time zone whose wall clock modality `m`'s times without a zone show (`naive_times: local`: the spec's
        `timezone`; without `m`, the spec's own setting, as the labels read theirs); None where they are UTC."""
        local = ((m and m.naive_times) or self.naive_times) == "local" and self.timezone != "UTC"
        return self.timezone if local else None

    def partition_in(self, m: ModalitySpec) -> str:
        """Where modality `m`'s files of a date lie under its path (its own `partition`, else the spec's)."""
        return m.partition or self.partition

    def columns_read(self, m: ModalitySpec) -> list[str]:
        """The columns a job reads of `m`'s files, by the files' names: the entity columns, the time, the value
        columns, each once."""
        return list(dict.fromkeys([*self.entity_in(m), self.time_in(m), *m.value_columns]))

    def stored_columns(self, m: ModalitySpec, holds: Callable[[str], bool]) -> dict[str, str]:
        """The columns a job reads of one of `m`'s files (`columns_read`), by the name that file stores each under ->
        the name it is read as: a column the file does not hold (`holds(name)` false) is read under the first of its
        other names (`former_names`: a column and its names there, either way) the file holds; with none of them,
        under its own name (the file's check then names it missing)."""
        return {held_name(m.former_names, col, holds): col for col in self.columns_read(m)}

    def names_read(self, m: ModalitySpec) -> dict[str, str]:
        """The columns of `m`'s files read under another name: the stored name -> the spec's (empty when `m`'s
        files name their time and entity as the spec does)."""
        pairs = zip((*self.entity_in(m), self.time_in(m)), (*self.entity, self.time))
        return {stored: name for stored, name in pairs if stored != name}


def other_names(former_names: tuple[tuple[str, tuple[str, ...]], ...], column: str) -> list[str]:
    """The other names a modality's files have stored `column` under, by its `former_names`: the column's group (the
    column the spec names and its former names) but itself - so a version trained before a rename reads the renamed
    files too."""
    for current, former in former_names:
        group = [current, *former]
        if column in group:
            return [n for n in group if n != column]
    return []


def held_name(former_names: tuple[tuple[str, tuple[str, ...]], ...], column: str, holds: Callable[[str], bool]) -> str:
    """The name a file stores `column` under: its own where the file holds it (`holds(name)`), else the first of its
    other names (`other_names`) the file holds; with none of them, its own (the file's check then names it missing)."""
    return column if holds(column) else next((n for n in other_names(former_names, column) if holds(n)), column)


def with_stored_names(m: ModalitySpec, stored: tuple[tuple[str, str], ...]) -> ModalitySpec:
    """`m` as it reads a file that stores its columns under other names than its table's schema gives them (a Delta
    table's column mapping: `stored` pairs each column's name - a dotted path for a field inside a struct - with the
    name its files give it): each column, and each of its `former_names`, is looked up under its stored name first
    (`held_name`), the names as they are kept where the file holds no such column. `m` itself without `stored`."""
    if not stored:
        return m
    names = dict(stored)
    groups = {col: former for col, former in m.former_names}
    for col in names:
        groups.setdefault(col, ())
    merged = []
    for col, former in groups.items():
        found = [names[n] for n in (col, *former) if n in names]
        merged.append((col, tuple(dict.fromkeys(n for n in (*found, *former) if n != col))))
    return replace(m, former_names=tuple(merged))


# ---------------------------------------------------------------- parsing helpers
class _Section:
    """Reads one mapping of the YAML, tracking which keys were used."""

    def __init__(self, data: Any, where: str, source: str):
        if not isinstance(data, Mapping):
            raise SpecError(f"{source}: '{where}' must be a mapping, got {type(data).__name__}")
        self.data, self.where, self.source = dict(data), where, source

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def err(self, key: str, message: str) -> SpecError:
        return SpecError(f"{self.source}: key '{self._key(key)}': {message}")

    def required(self, key: str) -> Any:
        if key not in self.data or self.data[key] is None:
            raise SpecError(f"{self.source}: missing required key '{self._key(key)}'")
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def choice(self, key: str, options: tuple[str, ...], default: str | None = None) -> str:
        value = self.get(key, default) if default is not None else self.required(key)
        if value not in options:
            raise self.err(key, f"{value!r} is not one of {', '.join(options)}")
        return value

    def duration(self, key: str, default: str | None = None, required: bool = False) -> int | None:
        value = self.required(key) if required else self.get(key, default)
        return None if value is None else parse_duration_us(value, where=f"{self.source}: key '{self._key(key)}'")

    def date(self, key: str) -> dt.date:
        value = self.required(key)
        if isinstance(value, dt.datetime):
            return value.date()
        if isinstance(value, dt.date):
            return value
        try:
            return dt.date.fromisoformat(str(value))
        except ValueError:
            raise self.err(key, f"{value!r} is not a date YYYY-MM-DD") from None

    def number(self, key: str, default: float | int, kind: type = float, low: float | None = None,
               high: float | None = None) -> Any:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.err(key, f"{value!r} is not a number")
        if kind is int and not float(value).is_integer():
            raise self.err(key, f"{value!r} is not a whole number")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.err(key, f"{value!r} is outside [{low}, {high}]")
        return kind(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.err(key, f"{value!r} is not true/false")
        return value

    def string_list(self, key: str) -> tuple[str, ...]:
        value = self.required(key)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.err(key, "must be a non-empty list of column names")
        return tuple(value)

    def section(self, key: str, required: bool = False) -> "_Section | None":
        if key not in self.data or self.data[key] is None:
            if required:
                raise SpecError(f"{self.source}: missing required key '{self._key(key)}'")
            return None
        return _Section(self.data[key], self._key(key), self.source)

    def reject_unknown(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise SpecError(f"{self.source}: unknown key '{self._key(key)}' "
                                f"(allowed here: {', '.join(sorted(allowed))})")


_COMMON_MODALITY_KEYS = {"kind", "path", "encoding_distance", "time", "entity", "time_unit", "naive_times",
                         "time_format", "former_names", "partition"}
NAIVE_TIMES = ("utc", "local")
MAX_RETRIES = 20      # the most retries of a failed S3 request `storage.retries` takes
UNREADABLE_FILES = ("fail", "skip")   # an input file that is no Parquet: fail its date, or leave it out (quarantined)
PAYLOADS = ("bytes", "file")    # how an image or audio modality stores its payloads: in the column, or as files
_MODALITY_KEYS = {kind: _COMMON_MODALITY_KEYS | keys for kind, keys in {
    "tabular": {"columns", "tolerance", "context", "missing_values", "added_columns", "channel_dropout"},
    "timeseries": {"columns", "period", "window", "encoder", "transform", "context", "missing_values", "added_columns",
                   "channel_dropout"},
    "image": {"column", "size", "tolerance", "channels", "payload", "payload_root"},
    "text": {"column", "window", "encoder"},
    "audio": {"column", "sample_rate", "tolerance", "clip", "payload", "payload_root"},
}.items()}
ENCODING_DISTANCE_MAX = 4.0     # the largest weight `encoding_distance` takes (an exponent on the distance)


def _parse_modality(name: str, sec: _Section, grain_us: int) -> ModalitySpec:
    m = _parse_modality_kind(name, sec, grain_us)
    distance = sec.number("encoding_distance", 0.0, float, 0.0, ENCODING_DISTANCE_MAX)
    hidden = sec.number("channel_dropout", 0.0, float, 0.0, 0.9) if sec.get("channel_dropout") is not None else None
    time = sec.get("time")
    if time is not None and not (isinstance(time, str) and time):
        raise sec.err("time", f"{time!r} must be a column name")
    entity = sec.string_list("entity") if sec.get("entity") is not None else None
    unit = sec.choice("time_unit", TIME_UNITS) if sec.get("time_unit") is not None else None
    naive = sec.choice("naive_times", NAIVE_TIMES) if sec.get("naive_times") is not None else None
    partition = sec.get("partition")
    if partition is not None:
        try:
            parse_layout(str(partition))
        except LayoutError as exc:
            raise sec.err("partition", str(exc)) from None
    payload, root = sec.choice("payload", PAYLOADS, "bytes"), sec.get("payload_root")
    if root is not None and not (isinstance(root, str) and root.strip()):
        raise sec.err("payload_root", f"{root!r} must be a folder or an s3:// prefix")
    if root is not None and payload != "file":
        raise sec.err("payload_root", "says where payload files lie: it needs 'payload: file'")
    return replace(m, encoding_distance=distance, channel_dropout=hidden, time_column=time, entity_columns=entity,
                   time_unit=unit, naive_times=naive, time_format=_parse_time_format(sec),
                   former_names=_parse_former_names(sec, m), partition=None if partition is None else str(partition),
                   missing_values=_parse_missing_values(sec, m), added_columns=_parse_added_columns(sec, m),
                   payload=payload, payload_root=root)


def _parse_added_columns(sec: _Section, m: ModalitySpec) -> tuple[str, ...]:
    """A numeric modality's `added_columns`: value columns its table gained after some of its files were written
    (a new tag; Spark's `mergeSchema`, a Hive table's ADD COLUMNS) - a plain Parquet file without one reads null
    there, as a Delta table's file without a column its table added since always does."""
    if sec.get("added_columns") is None:
        return ()
    added = sec.string_list("added_columns")
    for col in added:
        if col not in m.value_columns:
            raise sec.err("added_columns", f"'{col}' is not a value column of the modality "
                          f"({', '.join(m.value_columns)})")
    return tuple(dict.fromkeys(added))


def _parse_missing_values(sec: _Section, m: ModalitySpec) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """A numeric modality's `missing_values`: the numbers its writer stores where a value is missing (a historian's
    -9999, a 16-bit 65535) - a list for every value column, or a mapping of some columns to theirs."""
    given = sec.get("missing_values")
    if given is None:
        return ()
    def numbers(key: str, value: Any) -> tuple[float, ...]:
        value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, list) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise sec.err(key, f"{value!r} must be a number or a non-empty list of finite numbers")
        return tuple(dict.fromkeys(float(v) for v in value))
    if isinstance(given, Mapping):
        for col in given:
            if col not in m.value_columns:
                raise sec.err(f"missing_values.{col}", f"'{col}' is not a value column of the modality "
                              f"({', '.join(m.value_columns)})")
        return tuple((col, numbers(f"missing_values.{col}", v)) for col, v in given.items())
    markers = numbers("missing_values", given)
    return tuple((col, markers) for col in m.value_columns)


def _parse_former_names(sec: _Section, m: ModalitySpec) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A modality's `former_names`: each of some of its columns (value columns, or its time or entity as its files
    name them: checked by `_check_names_read`) -> the name, or names, its files stored it under before (older files
    are read under them where they lack the column); a name no other column of the modality has nor another
    column's former names."""
    names = sec.get("former_names")
    if names is None:
        return ()
    if not isinstance(names, Mapping) or not names:
        raise sec.err("former_names", "must map columns to the name (or list of names) older files gave them")
    out, taken = [], set(m.value_columns)
    for col, former in names.items():
        former = [former] if isinstance(former, str) else former
        if not isinstance(former, list) or not former or not all(isinstance(n, str) and n for n in former):
            raise sec.err(f"former_names.{col}", "must be a column name or a non-empty list of them")
        clash = next((n for n in former if n in taken), None)
        if clash is not None:
            raise sec.err(f"former_names.{col}", f"'{clash}' is the name of another column of the modality, or "
                          "another column's former name: a file holding it would be read twice")
        taken |= set(former)
        out.append((col, tuple(dict.fromkeys(former))))
    return tuple(out)


ISO_8601 = "ISO8601"    # among several time formats: ISO 8601 text, each value by its own shape


def _parse_time_format(sec: "_Section") -> str | tuple[str, ...] | None:
    """A section's `time_format`: a strftime format (as Polars reads one: `%d/%m/%Y %H:%M:%S%.f`, `%z` for an
    offset) that writes a time which it reads back on the same day - it holds the year, month and day - or a list of
    them, tried in order (a writer that changed its format; `ISO8601` among them: ISO 8601 text). SpecError naming
    the key otherwise."""
    given = sec.get("time_format")
    if given is None:
        return None
    if isinstance(given, list) and given:
        formats = tuple(dict.fromkeys(_checked_format(sec, f) if f != ISO_8601 else f for f in given))
        return formats[0] if len(formats) == 1 else formats
    return given if given == ISO_8601 else _checked_format(sec, given)


def _checked_format(sec: "_Section", fmt: Any) -> str:
    """One strftime format of a `time_format`, checked to read back the day it writes."""
    if not isinstance(fmt, str) or "%" not in fmt:
        raise sec.err("time_format", f"{fmt!r} must be a strftime format such as '%d/%m/%Y %H:%M:%S'")
    import polars as pl                     # only where a spec has a format

    sample = dt.datetime(2024, 3, 17, 13, 45, 30, 123456, tzinfo=dt.timezone.utc)
    try:
        written = pl.Series([sample]).dt.strftime(fmt)
        read = written.str.strptime(pl.Datetime("us"), fmt, strict=False).item()
    except Exception as exc:  # noqa: BLE001 - Polars' own words on an unknown code
        raise sec.err("time_format", f"{fmt!r} is no format a time can be written in ({str(exc).splitlines()[0]})"
                      ) from None
    if read is None or read.date() != sample.date():
        raise sec.err("time_format", f"{fmt!r} does not read back the day it writes ({sample:%Y-%m-%d %H:%M:%S} "
                      f"written as {written.item()!r}): a format holds the year, month and day")
    return fmt


def _check_names_read(spec: Spec, sec: _Section) -> None:
    """A modality's own `time` / `entity` (the names its files use) name as many entity columns as the spec's, all
    different, and none of its value columns is a name they are read as (two columns would then have one name)."""
    for m in spec.modalities.values():
        if m.context_of:
            continue
        if m.entity_columns is not None and len(m.entity_columns) != len(spec.entity):
            raise sec.err(f"{m.name}.entity", f"names {len(m.entity_columns)} column(s) for the spec's entity "
                          f"{list(spec.entity)}: one for each, in that order")
        stored = [*spec.entity_in(m), spec.time_in(m)]
        if len(set(stored)) < len(stored):
            raise sec.err(f"{m.name}.time" if m.time_column else f"{m.name}.entity",
                          f"{stored} name one column twice")
        for col, former in m.former_names:
            if col not in spec.columns_read(m):
                raise sec.err(f"{m.name}.former_names.{col}", f"'{col}' is no column the modality reads "
                              f"({', '.join(spec.columns_read(m))}; the time and entity as its files name them)")
            keyed = next((n for n in former if n in spec.columns_read(m)), None)
            if keyed is not None:
                raise sec.err(f"{m.name}.former_names.{col}", f"'{keyed}' is the name of the modality's time or "
                              "entity column in its files: a file holding it would be read twice")
        for col in m.value_columns:
            if col in spec.names_read(m).values():
                raise sec.err(m.name, f"value column '{col}' is a name the modality's "
                              f"{'time' if col == spec.time else 'entity'} column is read as; name it otherwise "
                              "(or the spec's time and entity)")


def _parse_modality_kind(name: str, sec: _Section, grain_us: int) -> ModalitySpec:
    kind = sec.choice("kind", MODALITY_KINDS)
    sec.reject_unknown(_MODALITY_KEYS[kind])
    path = str(sec.required("path"))
    if kind == "tabular":
        return ModalitySpec(name, kind, path, columns=sec.string_list("columns"),
                            tolerance_us=sec.duration("tolerance") or grain_us)
    if kind == "timeseries":
        period, window = sec.duration("period", required=True), sec.duration("window", required=True)
        if window % period or window // period < 2:
            raise sec.err("window", "must be a whole multiple (>= 2) of 'period'")
        if grain_us % period:
            raise sec.err("period", "must divide the spec's 'grain' evenly")
        return ModalitySpec(name, kind, path, columns=sec.string_list("columns"), period_us=period,
                            window_us=window, encoder=sec.choice("encoder", SERIES_ENCODERS, "gru")
                            if sec.get("encoder") else None,
                            transform=sec.choice("transform", SERIES_TRANSFORMS, "level"))
    column = str(sec.required("column"))
    if kind == "image":
        size = sec.get("size", [32, 32])
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 8 for v in size)):
            raise sec.err("size", f"{size!r} must be [height, width], each an integer >= 8")
        channels = sec.number("channels", 1, int)
        if channels not in (1, 3):
            raise sec.err("channels", "must be 1 (grey) or 3 (RGB)")
        return ModalitySpec(name, kind, path, column=column, size=(size[0], size[1]), channels=channels,
                            tolerance_us=sec.duration("tolerance", required=True))
    if kind == "text":
        return ModalitySpec(name, kind, path, column=column, window_us=sec.duration("window", required=True),
                            encoder=sec.choice("encoder", TEXT_ENCODERS, "transformer")
                            if sec.get("encoder") else None)
    return ModalitySpec(name, kind, path, column=column, sample_rate=sec.number("sample_rate", 16000, int, 100),
                        tolerance_us=sec.duration("tolerance", required=True),
                        clip_us=sec.duration("clip", "1s"))


CONTEXT_SUFFIX = "_context"


def voting_modalities(modalities: dict[str, ModalitySpec]) -> tuple[str, ...]:
    """The modalities whose contributions make the fused score: all but the slow `context` views, which
    inform the others' reconstructions without voting (their look-back would hold an event's score up long
    after it ends). They are also the modalities that read a table of their own (a view reads its parent's)."""
    return tuple(name for name, m in modalities.items() if m.context_of is None)


def _parse_context(parent: ModalitySpec, sec: _Section, grain_us: int) -> ModalitySpec | None:
    """A modality's `context` (tabular, timeseries): a second, coarse window over the same rows - the mean of
    each `period` over the last `window` - as its own time-series modality `<name>_context`, so slow changes
    (a drift over tens of minutes, a level away from its relation with the others) are seen beside the short
    window."""
    ctx = sec.section("context")
    if ctx is None:
        return None
    ctx.reject_unknown({"window", "period"})
    period = ctx.duration("period") or grain_us
    window = ctx.duration("window", required=True)
    if grain_us % period:
        raise ctx.err("period", "must divide the spec's 'grain' evenly")
    if window % period or window // period < 2:
        raise ctx.err("window", "must be a whole multiple (>= 2) of 'period'")
    if window <= parent.lookback_us:
        raise ctx.err("window", f"must be longer than the modality's own reach ({format_duration(parent.lookback_us)})")
    return ModalitySpec(parent.name + CONTEXT_SUFFIX, "timeseries", parent.path, columns=parent.columns,
                        period_us=period, window_us=window, context_of=parent.name, time_column=parent.time_column,
                        entity_columns=parent.entity_columns, time_unit=parent.time_unit,
                        naive_times=parent.naive_times, time_format=parent.time_format,
                        former_names=parent.former_names, partition=parent.partition,
                        missing_values=parent.missing_values, added_columns=parent.added_columns,
                        channel_dropout=parent.channel_dropout)


def _parse_model(sec: _Section | None) -> ModelSpec:
    if sec is None:
        return ModelSpec()
    sec.reject_unknown({"fusion", "detector", "preset", "series_encoder", "text_encoder", "vote",
                        "contribution_scale", "normalization", "modality_dropout", "channel_dropout",
                        "cross_modal_scoring",
                        "cross_modal_relations", "state_baseline", "window_spread", "relation_smoothing",
                        "state_speed"})
    return ModelSpec(
        fusion=sec.choice("fusion", FUSIONS, ModelSpec.fusion),
        detector=sec.choice("detector", DETECTORS, ModelSpec.detector),
        preset=sec.choice("preset", PRESETS, ModelSpec.preset),
        series_encoder=sec.choice("series_encoder", SERIES_ENCODERS, ModelSpec.series_encoder),
        text_encoder=sec.choice("text_encoder", TEXT_ENCODERS, ModelSpec.text_encoder),
        vote=sec.choice("vote", VOTES, ModelSpec.vote),
        contribution_scale=sec.choice("contribution_scale", CONTRIBUTION_SCALES, ModelSpec.contribution_scale),
        normalization=sec.choice("normalization", NORMALIZATIONS, ModelSpec.normalization),
        modality_dropout=sec.number("modality_dropout", ModelSpec.modality_dropout, float, 0.0, 0.9),
        channel_dropout=sec.number("channel_dropout", ModelSpec.channel_dropout, float, 0.0, 0.9),
        cross_modal_scoring=sec.boolean("cross_modal_scoring", ModelSpec.cross_modal_scoring),
        cross_modal_relations=sec.boolean("cross_modal_relations", ModelSpec.cross_modal_relations),
        state_baseline=sec.boolean("state_baseline", ModelSpec.state_baseline),
        window_spread=sec.boolean("window_spread", ModelSpec.window_spread),
        relation_smoothing=sec.number("relation_smoothing", ModelSpec.relation_smoothing, float, 0.01, 1.0),
        state_speed_us=0 if sec.get("state_speed") is False
        else sec.duration("state_speed", f"{ModelSpec.state_speed_us}us"))


def default_validation_days(start: dt.date, end: dt.date) -> int:
    """Validation days when the spec gives none: a tenth of the training window, at least 1 and at most 14 -
    enough clean days (all entities) for the threshold to hold on new ones, without starving training."""
    days = (end - start).days + 1
    return int(min(14, max(1, round(days / 10))))


def _parse_train(sec: _Section) -> TrainSpec:
    sec.reject_unknown({"start", "end", "epochs", "workers", "gpu", "batch_size", "learning_rate",
                        "validation_days", "seed", "exclude_labelled", "validation_outlier_limit"})
    start, end = sec.date("start"), sec.date("end")
    if end < start:
        raise sec.err("end", f"{end} is before start {start}")
    return TrainSpec(start=start, end=end, epochs=sec.number("epochs", TrainSpec.epochs, int, 1),
                     workers=sec.number("workers", TrainSpec.workers, int, 1), gpu=sec.boolean("gpu", TrainSpec.gpu),
                     batch_size=sec.number("batch_size", TrainSpec.batch_size, int, 1),
                     learning_rate=sec.number("learning_rate", TrainSpec.learning_rate, float, 0.0),
                     validation_days=sec.number("validation_days", default_validation_days(start, end), int, 0),
                     seed=sec.number("seed", TrainSpec.seed, int),
                     exclude_labelled=sec.boolean("exclude_labelled", TrainSpec.exclude_labelled),
                     validation_outlier_limit=_outlier_limit(sec))


def _outlier_limit(sec: _Section) -> float | None:
    """`train.validation_outlier_limit`: at least 1 (IQRs over the median), or 0 for none."""
    limit = sec.number("validation_outlier_limit", TrainSpec.validation_outlier_limit, float, 0.0)
    if 0 < limit < 1:
        raise sec.err("validation_outlier_limit", f"{limit!r} would leave out a quarter of a clean day's ticks or "
                      "more: give at least 1 (interquartile ranges over the median), or 0 to keep every tick")
    return limit or None


def _parse_score(sec: _Section) -> ScoreSpec:
    sec.reject_unknown({"output", "threshold", "smoothing", "quarantine", "runs", "staging", "missing_input"})
    thr = sec.section("threshold")
    threshold = ThresholdSpec()
    if thr is not None:
        thr.reject_unknown({"method", "risk", "quantile", "value", "level", "rate", "per_entity"})
        method = thr.choice("method", THRESHOLD_METHODS, ThresholdSpec.method)
        if method == "fixed" and thr.get("value") is None:
            raise thr.err("value", "required when method is 'fixed'")
        threshold = ThresholdSpec(method=method, risk=thr.number("risk", ThresholdSpec.risk, float, 0.0, 1.0),
                                  quantile=thr.number("quantile", ThresholdSpec.quantile, float, 0.0, 1.0),
                                  value=None if thr.get("value") is None else thr.number("value", 0.0),
                                  level=thr.number("level", ThresholdSpec.level, float, 0.5, 0.9999),
                                  rate=thr.number("rate", ThresholdSpec.rate, float, 0.0, 1.0),
                                  per_entity=thr.boolean("per_entity", ThresholdSpec.per_entity))
    smo = sec.section("smoothing")
    smoothing = SmoothingSpec()
    if smo is not None:
        smo.reject_unknown({"method", "alpha", "window", "knee"})
        smoothing = SmoothingSpec(method=smo.choice("method", SMOOTHING_METHODS, SmoothingSpec.method),
                                  alpha=smo.number("alpha", SmoothingSpec.alpha, float, 0.001, 1.0),
                                  window=smo.number("window", SmoothingSpec.window, int, 1),
                                  knee=None if smo.get("knee") is None else smo.number("knee", None, float, 0.0))
    return ScoreSpec(output=str(sec.required("output")), threshold=threshold, smoothing=smoothing,
                     quarantine=sec.get("quarantine"), runs=sec.get("runs"),
                     staging=sec.get("staging"),
                     missing_input=sec.choice("missing_input", MISSING_INPUT, ScoreSpec.missing_input))


def parse_spec(data: Any, source: str = "<memory>") -> Spec:
    """Validate a spec given as parsed YAML; raise SpecError naming the key and the source."""
    top = _Section(data, "", source)
    top.reject_unknown({"name", "entity", "time", "time_unit", "naive_times", "time_format", "grain", "partition",
                        "timezone", "lateness", "modalities", "labels", "model", "train", "registry", "score",
                        "storage", "unreadable_files"})
    grain = top.duration("grain", required=True)
    if DAY_US % grain:
        raise top.err("grain", "must divide one day evenly (e.g. 1min, 5min, 1h)")
    mods_sec = top.section("modalities", required=True)
    if not mods_sec.data:
        raise top.err("modalities", "needs at least one modality")
    modalities = {}
    for name in mods_sec.data:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(name)):
            raise mods_sec.err(str(name), "modality names are letters, digits and '_'")
        sec = mods_sec.section(name, required=True)
        modalities[str(name)] = _parse_modality(str(name), sec, grain)
        if (context := _parse_context(modalities[str(name)], sec, grain)) is not None:
            if context.name in mods_sec.data:
                raise sec.err("context", f"derives modality '{context.name}', which the spec also defines")
            modalities[context.name] = context
    labels = None
    if (lab := top.section("labels")) is not None:
        lab.reject_unknown({"path", "start", "end"})
        labels = LabelsSpec(path=str(lab.required("path")), start=lab.get("start", "start_ts"),
                            end=lab.get("end", "end_ts"))
    storage = StorageSpec()
    if (sto := top.section("storage")) is not None:
        sto.reject_unknown({"endpoint_url", "region", "allow_http", "timeout_s", "retries"})
        storage = StorageSpec(endpoint_url=sto.get("endpoint_url"), region=sto.get("region"),
                              allow_http=sto.get("allow_http"),
                              timeout_s=sto.number("timeout_s", StorageSpec.timeout_s, float, 0.1, 600),
                              retries=sto.number("retries", StorageSpec.retries, int, 0, MAX_RETRIES))
    partition = str(top.get("partition", "date"))
    try:
        parse_layout(partition)
    except LayoutError as exc:
        raise top.err("partition", str(exc)) from None
    spec = Spec(name=str(top.required("name")), entity=top.string_list("entity"), time=str(top.required("time")),
                grain_us=grain, partition=partition, modalities=modalities,
                train=_parse_train(top.section("train", required=True)), registry=str(top.required("registry")),
                score=_parse_score(top.section("score", required=True)), model=_parse_model(top.section("model")),
                labels=labels, storage=storage, source=source, timezone=_parse_timezone(top),
                lateness_us=0 if top.get("lateness") in (0, "0") else top.duration("lateness") or 0,
                time_unit=None if top.get("time_unit") is None else top.choice("time_unit", TIME_UNITS),
                naive_times=top.choice("naive_times", NAIVE_TIMES, "utc"), time_format=_parse_time_format(top),
                unreadable_files=top.choice("unreadable_files", UNREADABLE_FILES, "fail"))
    _check_entity_names(spec, top)
    if spec.model.detector == "classifier" and spec.labels is None:
        raise top.err("model", "detector 'classifier' needs a 'labels' section")
    if _threshold_method_unset(top):
        spec = replace(spec, score=replace(spec.score, threshold=threshold_without_method(
            spec.score.threshold, spec.model.detector)))
    for m in modalities.values():
        if m.encoding_distance and (spec.model.fusion == "early" or spec.model.detector == "classifier"):
            raise mods_sec.err(f"{m.name}.encoding_distance", "needs each modality encoded on its own (fusion "
                               "attention, gated or late) and a detector that reconstructs (not 'classifier'); "
                               f"the spec has fusion '{spec.model.fusion}', detector '{spec.model.detector}'")
    _check_names_read(spec, mods_sec)
    _check_places(spec)
    return spec


def _threshold_method_unset(top: _Section) -> bool:
    """Whether the spec leaves `score.threshold.method` out (`threshold_without_method` then says which rule)."""
    threshold = top.section("score", required=True).section("threshold")
    return threshold is None or threshold.get("method") is None


def threshold_without_method(threshold: ThresholdSpec, detector: str) -> ThresholdSpec:
    """The threshold rule where none was named (the spec's and `Detector`'s one reading): `fixed` at a `value`
    given; else, for a classifier, `fixed` at `CLASSIFIER_THRESHOLD`; else `ThresholdSpec`'s default (POT)."""
    if threshold.value is not None:
        return replace(threshold, method="fixed")
    if detector == "classifier":
        return replace(threshold, method="fixed", value=CLASSIFIER_THRESHOLD)
    return replace(threshold, method=ThresholdSpec.method)


OUTPUT_TABLE_COLUMNS = ("ts", "date", "score", "threshold", "is_anomaly", "modalities", "model_version", "run_id",
                        "scored_at")      # the output table's columns beside the entity's, `score_<modality>` and
                                          # `channel_<modality>`


def _check_entity_names(spec: Spec, top: _Section) -> None:
    """The entity columns are the output table's too: none may be named as one of its other columns, nor start with
    `_` (the jobs' own columns: `_t`, `_reason`, ...) - a modality's files may keep their own name for it."""
    taken = {*OUTPUT_TABLE_COLUMNS, *(f"{p}_{m}" for m in spec.modalities for p in ("score", "channel"))}
    for name in spec.entity:
        if name in taken or name.startswith("_"):
            raise top.err("entity", f"'{name}' " + ("is a column of the output table beside the entity's" if name in
                                                    taken else "starts with '_', as the jobs' own columns do")
                          + " - name the entity otherwise; a modality whose files name it so says so in its own "
                          f"entity (modalities.<name>.entity: [{name}])")


def _parse_timezone(top: _Section) -> str:
    """`timezone`: an IANA time zone name (`Europe/Berlin`, `America/Chicago`, `UTC`, `Etc/GMT-1` for a fixed +1 h)."""
    name = top.get("timezone", "UTC")
    if not isinstance(name, str) or not name.strip():
        raise top.err("timezone", f"must be a time zone name like UTC or Europe/Berlin, got {name!r}")
    name = name.strip()
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return "UTC"
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise top.err("timezone", f"{name!r} is not a known time zone (an IANA name like Europe/Berlin or "
                      "America/Chicago; Etc/GMT-1 for a fixed UTC+1)") from None
    return name


def local_today(zone: str = "UTC") -> dt.date:
    """Today's date in time zone `zone` (the spec's `timezone`)."""
    return dt.datetime.now(dt.timezone.utc if zone == "UTC" else zoneinfo.ZoneInfo(zone)).date()


def _place(path: str) -> str:
    """A path as compared for overlap: a URI's scheme kept, '.', '..', doubled and trailing slashes folded; a local
    path made absolute (against the working directory, as the jobs read it)."""
    scheme, sep, rest = path.partition("://")
    if sep:
        return f"{scheme}://{posixpath.normpath('/' + rest)[1:]}"
    return os.path.normpath(os.path.abspath(path))


def _overlap(a: str, b: str) -> bool:
    """Whether one of two places is the other or lies inside it."""
    a, b = _place(a), _place(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _check_places(spec: Spec) -> None:
    """What the jobs write must lie apart from what they read and from each other: a `score.output` at (or above) an
    input table would add Delta files to its partitions, and `dmafn maintain`'s vacuum of a folder holding other
    files deletes them. SpecError naming both keys."""
    read = [(f"modalities.{m.name}.path", m.path) for m in spec.modalities.values() if m.context_of is None]
    read += [(f"modalities.{m.name}.payload_root", m.payload_root) for m in spec.modalities.values() if m.payload_root]
    if spec.labels is not None:
        read.append(("labels.path", spec.labels.path))
    score = spec.score
    tables = [("score.output", score.output), ("score.quarantine", score.quarantine_path),
              ("score.runs", score.runs_path), ("score.staging", score.staging_path)]
    written = [*tables, ("registry", spec.registry)]
    pairs = [(w, r) for w in written for r in read] + \
        [(a, b) for i, a in enumerate(tables) for b in [*tables[i + 1:], ("registry", spec.registry)]]
    for (key, path), (other, other_path) in pairs:
        if _overlap(path, other_path):
            raise SpecError(f"{spec.source}: key '{key}' ({path}) and key '{other}' ({other_path}) are the same place "
                            "or one lies inside the other: the jobs write there, so each needs a place of its own")


def read_spec_yaml(path: str | Path) -> Any:
    """The parsed YAML of a spec file (not validated); SpecError when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) or exc
        raise SpecError(f"{path}: not valid YAML{where}: {what}") from None
    if data is None:
        raise SpecError(f"{path}: the spec file is empty")
    return data


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec YAML file."""
    return parse_spec(read_spec_yaml(path), source=str(path))


def reading_differences(trained: Spec, current: Spec) -> list[str]:
    """What `current` says about reading, modelling or thresholding the data that differs from `trained` (a model
    version's spec), one line each: the entity, time and grain, a modality's settings (its path, the names its
    files give the time and entity, the unit of a numeric time and the zone of a naive one aside - data may move
    and be renamed; its columns as a set - they are read by name), a modality only `current` defines, the `model`
    section, `score.threshold` and `score.smoothing` (fitted into the version's calibration). A version reads and
    scores as it was trained, so each is an edit that takes effect with a new version."""
    was, now = spec_to_dict(trained), spec_to_dict(current)
    lines = [f"{key}: {now[key]} (the version's: {was[key]})" for key in ("entity", "time", "grain")
             if now[key] != was[key]]
    for name, entry in now["modalities"].items():
        old = was["modalities"].get(name)
        if old is None:
            lines.append(f"modalities.{name}: not in the version, so not read")
            continue
        for key in sorted((set(entry) | set(old)) - set(STORED_AS)):
            a, b = old.get(key), entry.get(key)
            if key == "columns" and a is not None and b is not None and \
                    sorted(map(renamed(entry), a)) == sorted(map(renamed(entry), b)):
                continue            # the same columns, in another order or under names they have had
            if a != b:
                lines.append(f"modalities.{name}.{key}: {_shown(b)} (the version's: {_shown(a)})")
    lines += [f"model.{key}: {value} (the version's: {was['model'].get(key)})"
              for key, value in now["model"].items() if value != was["model"].get(key)]
    for part in ("threshold", "smoothing"):
        a, b = was["score"][part], now["score"][part]
        lines += [f"score.{part}.{key}: {_shown(b.get(key))} (the version's: {_shown(a.get(key))})"
                  for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return lines


# a modality's keys that say how its data is stored (a spec entry's key -> the `ModalitySpec` field), not how it is
# modelled: no reading edit (`reading_differences`), and a version reads with the current spec's (`reading_spec`)
STORED_AS = {"path": "path", "time": "time_column", "entity": "entity_columns", "time_unit": "time_unit",
             "naive_times": "naive_times", "time_format": "time_format", "former_names": "former_names",
             "partition": "partition", "missing_values": "missing_values", "added_columns": "added_columns",
             "payload": "payload",
             "payload_root": "payload_root"}


def renamed(entry: dict[str, Any]) -> Callable[[str], str]:
    """A column's name as a modality's `spec_to_dict` entry names it now: a former name (`former_names`) -> the
    column's; any other name as it is."""
    now = {old: col for col, former in entry.get("former_names", {}).items() for old in former}
    return lambda name: now.get(name, name)


def is_calibration_edit(line: str) -> bool:
    """A `reading_differences` line of `score.threshold` or `score.smoothing`: fitted into a version's calibration,
    so `dmafn recalibrate` adopts it without training."""
    return line.startswith("score.")


def _shown(value: Any) -> str:
    """A spec value as a line shows it: a missing one as 'none', a context as its window and period."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    mods = {}
    for m in spec.modalities.values():
        if m.context_of:                      # written as its parent's `context`
            mods[m.context_of]["context"] = {"window": format_duration(m.window_us),
                                             "period": format_duration(m.period_us)}
            continue
        entry: dict[str, Any] = {"kind": m.kind, "path": m.path}
        if m.kind in ("tabular", "timeseries"):
            entry["columns"] = list(m.columns)
        else:
            entry["column"] = m.column
        for key, value in (("period", m.period_us), ("window", m.window_us), ("tolerance", m.tolerance_us),
                           ("clip", m.clip_us)):
            if value is not None:
                entry[key] = format_duration(value)
        if m.kind == "image":
            entry.update(size=list(m.size), channels=m.channels)
        if m.kind == "audio":
            entry["sample_rate"] = m.sample_rate
        if m.encoder:
            entry["encoder"] = m.encoder
        if m.transform != "level":
            entry["transform"] = m.transform
        if m.encoding_distance:
            entry["encoding_distance"] = m.encoding_distance
        if m.channel_dropout is not None:
            entry["channel_dropout"] = m.channel_dropout
        if m.time_column:
            entry["time"] = m.time_column
        if m.entity_columns:
            entry["entity"] = list(m.entity_columns)
        if m.time_unit:
            entry["time_unit"] = m.time_unit
        if m.naive_times:
            entry["naive_times"] = m.naive_times
        if m.time_format:
            entry["time_format"] = m.time_format if isinstance(m.time_format, str) else list(m.time_format)
        if m.former_names:
            entry["former_names"] = {col: list(former) for col, former in m.former_names}
        if m.partition:
            entry["partition"] = m.partition
        if m.missing_values:
            entry["missing_values"] = {col: list(markers) for col, markers in m.missing_values}
        if m.added_columns:
            entry["added_columns"] = list(m.added_columns)
        if m.payload != "bytes":
            entry["payload"] = m.payload
        if m.payload_root:
            entry["payload_root"] = m.payload_root
        mods[m.name] = entry
    out: dict[str, Any] = {
        "name": spec.name, "entity": list(spec.entity), "time": spec.time, "grain": format_duration(spec.grain_us),
        "partition": spec.partition, **({"timezone": spec.timezone} if spec.timezone != "UTC" else {}),
        **({"lateness": format_duration(spec.lateness_us)} if spec.lateness_us else {}),
        **({"time_unit": spec.time_unit} if spec.time_unit else {}),
        **({"naive_times": spec.naive_times} if spec.naive_times != "utc" else {}),
        **({"time_format": spec.time_format if isinstance(spec.time_format, str) else list(spec.time_format)}
           if spec.time_format else {}),
        **({"unreadable_files": spec.unreadable_files} if spec.unreadable_files != "fail" else {}),
        "modalities": mods,
        "model": {k: getattr(spec.model, k) for k in ModelSpec.__dataclass_fields__ if k != "state_speed_us"}
        | {"state_speed": format_duration(spec.model.state_speed_us) if spec.model.state_speed_us else False},
        "train": {k: (v.isoformat() if isinstance(v, dt.date) else v)
                  for k, v in ((k, getattr(spec.train, k)) for k in TrainSpec.__dataclass_fields__)}
        | {"validation_outlier_limit": spec.train.validation_outlier_limit or 0},     # 0: none (null reads as the default)
        "registry": spec.registry,
        "score": {"output": spec.score.output,
                  "threshold": {k: v for k, v in vars(spec.score.threshold).items() if v is not None},
                  "smoothing": dict(vars(spec.score.smoothing)),
                  **({"quarantine": spec.score.quarantine} if spec.score.quarantine else {}),
                  **({"runs": spec.score.runs} if spec.score.runs else {}),
                  **({"staging": spec.score.staging} if spec.score.staging else {}),
                  **({"missing_input": spec.score.missing_input} if spec.score.missing_input != "fail" else {})},
    }
    if spec.labels:
        out["labels"] = dict(vars(spec.labels))
    storage = {k: v for k, v in vars(spec.storage).items() if v is not None}
    if storage:
        out["storage"] = storage
    return out
