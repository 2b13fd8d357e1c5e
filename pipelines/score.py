"""Scoring jobs (the Ray wiring): the dates are cut into shards (`pipelines.shards`), each shard is scored by a
Ray task that reads its files straight from storage and writes its rows as data files of the output tables
(`pipelines.score_steps.score_shard_steps`), and the driver commits each date once all its shards are written - one
atomic Delta commit per date and table. The driver holds metadata only: file lists, the model version, counts.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import polars as pl
import pyarrow as pa
import ray

from dmafn.features import COLOUR_FRAME
from dmafn.spec import STORED_AS, Spec, is_calibration_edit, reading_differences
from pipelines.affinity import pinned_to_free_cpu, pinning_enabled
from pipelines.delta_sink import (OpenTables, commit_date, dates_written_by, read_table, require_own_tables,
                                  scan_table, write_partition)
from pipelines.entity_keys import merge_entity_modalities, unmet_entity_lines
from pipelines.ingest import (DAMAGED, DAMAGED_AROUND, DAMAGED_ELSEWHERE, INTERVAL_STEPS, TRAINED_COLOUR,
                              TRAINED_FORMATS, TRAINED_INTERVALS, UNREADABLE, entity_casts, interval_bin, merge_counts,
                              require_columns)
from pipelines.progress import ProgressDisplay, Throttle, clock
from pipelines.ray_runtime import Resources, raise_task_error
from pipelines.registry import ModelVersion, Registry
from pipelines.row_digests import RowDigest, date_digests, merged, record, recorded_columns, same_rows
from pipelines.shards import (DAYS_PER_SHARD, SHARD_BYTES, DateCounts, InputFile, Shard, ShardScores, UnseenEntities,
                             list_inputs, list_partition_files, newest_data_note, partition_files, plan_shards)
from pipelines.staging import SplitFile, Staging, with_pieces
from pipelines.statistics import BucketStatistics, keys_sliceable
from pipelines.storage import BackfillError, DataError, Interrupted, Storage

log = logging.getLogger(__name__)


@dataclass
class DateResult:
    date: str
    ticks_in: int
    rows_scored: int
    rows_quarantined: int
    anomalies: int
    seconds: float
    input_rows_quarantined: int = 0     # unusable input rows of the date (stage = ingest in the quarantine table)
    above_validation_median: float | None = None   # share of its ticks with a score above the version's validation
                                                   # median (None: no score, or a version without the median)
    modality_above: dict[str, float] = field(default_factory=dict)   # the same for each modality's contribution
    entities: int | None = None          # entities with a scored tick (None: a failed date)
    unseen: UnseenEntities | None = None   # scored entities the version has no statistics of their own for (None:
                                           # a version with no per-entity statistics, or a failed date)
    skipped: bool = False                # no modality had input for the date, and `score.missing_input: skip`
    input_rows: int = 0                  # input rows the date's partitions held (usable or not)
    input_rows_misplaced: int = 0        # of them, quarantined as timed outside their date partition
    unusable_reasons: dict[str, int] = field(default_factory=dict)   # the other quarantined input rows, per modality
                                                                     # and reason, largest first
    input_files: int | None = None       # files its own partitions held when the run listed them (None: a failed date)
    input_digests: dict[str, str] | None = None   # per modality, a digest of those files (`shards.PartitionFiles`)
    modality_rows: dict[str, int] = field(default_factory=dict)   # per modality (context views left out), usable
                                                                   # input rows of the date's own partitions
    modality_present: dict[str, float] = field(default_factory=dict)   # per modality, the share of the scored ticks
                                                                        # it was present at
    without_modality: dict[str, UnseenEntities] = field(default_factory=dict)   # per modality, the scored entities it
                                                                                # was absent at every tick of
    row_digests: dict[str, RowDigest] = field(default_factory=dict)   # per modality, its own partitions' rows as stored
    input_row_digests: str | None = None   # the runs table's JSON of them (`row_digests.record`; None: a failed date)
    payload_formats: dict[str, dict[str, int]] = field(default_factory=dict)   # per image or audio modality, its
                        # usable payloads per stored format (a frame's size, a clip's rate or length)
    new_payload_formats: dict[str, dict[str, int]] | None = None   # of them, those of formats the version's training
                     # payloads (almost) never had (`new_payload_formats`; None: a version that did not record its own)
    unmet_keys: list[str] = field(default_factory=list)   # warnings of entity keys whose modalities never meet
                                                          # (`entity_keys.unmet_entity_lines` over its scored ticks)
    row_intervals: dict[str, dict[str, int]] = field(default_factory=dict)   # per non-text modality
                # and entity, its median interval between rows (`ingest.daily_intervals`; emptied once compared)
    changed_intervals: dict[str, dict] | None = None   # of them, those far from every training day's of the same
                            # entity (`changed_row_intervals`; None: a version that did not record its own)

    @property
    def alarm_rate(self) -> float | None:
        """The share of the scored ticks that alarmed."""
        return self.anomalies / self.rows_scored if self.rows_scored else None


UNLIKE_VALIDATION_SHARE = 0.75   # a date with more of its ticks above the validation median than this: warned
                                 # (the design fleets' days with 10-18 % anomalous ticks: 0.54-0.62)


UNUSABLE_REASONS = "input_unusable_reasons"   # the runs table's column of a date's unusable rows per reason (JSON)
MODALITY_SHARE = "above_validation_median_"   # the runs table's column of a modality's share: this prefix + its name


def unlike_validation_warning(result: DateResult, version: str) -> str | None:
    """A line when most of a date's ticks score above the model version's validation median: the bulk of the day,
    not an incident's share of it, looks unlike the days the version was calibrated on (inputs that moved: a
    changed sensor, a new operating regime, a fleet-wide fault) - check the inputs, or train a new version."""
    return unlike_validation_line(result.date, version, result.above_validation_median, result.modality_above)


def unlike_validation_line(date: str, version: str, share: float | None,
                           by_modality: dict[str, float]) -> str | None:
    """`unlike_validation_warning` from a date's share of ticks above the validation median and each modality's
    share (a runs table row's, as `dmafn status` reads them); None when the day is like the validation days."""
    if share is None or share <= UNLIKE_VALIDATION_SHARE:
        return None
    shares = "".join(f"; {m} {v:.0%}" for m, v in sorted(by_modality.items(), key=lambda kv: -kv[1]))
    return (f"{date}: {share:.0%} of its scored ticks score above model version {version}'s validation median "
            f"(about half on days like its validation days; over {UNLIKE_VALIDATION_SHARE:.0%} warns) - most of the "
            "day, not an incident's share of it, looks unlike the days the version was calibrated on: check the "
            "inputs (dmafn report, dmafn profile) or train a new version on recent days"
            + (f" (each modality's contribution above its validation median{shares})" if shares else ""))


def unseen_entities_warning(result: DateResult, version: str) -> str | None:
    """A line when a date scored entities that model `version` has no statistics of their own for - machines new to
    the fleet since its training days (or with too few rows in them): they were scored by the fleet's statistics,
    so their own normal level reads as a deviation and they alarm more than the others. Train a version on days
    that hold them."""
    unseen = result.unseen
    if unseen is None or not unseen.entities:
        return None
    more = f" and {unseen.entities - len(unseen.named)} more" if unseen.entities > len(unseen.named) else ""
    rate = unseen.alarm_rate
    one = unseen.entities == 1
    return (f"{result.date}: {unseen.entities} entit{'y' if one else 'ies'} not in model version {version}'s training "
            f"data ({', '.join(unseen.named)}{more}; {unseen.ticks} ticks"
            + ("" if rate is None else f", {rate:.1%} of them alarmed") + f") {'was' if one else 'were'} scored by the "
            f"fleet's statistics, not {'its' if one else 'their'} own: expect more alarms from them until they are "
            "enrolled (dmafn enroll, --start/--end over days that hold them) or a version is trained on such days"
            + _respelled(unseen))


def _respelled(unseen: UnseenEntities) -> str:
    """Of `unseen_entities_warning`'s entities, those spelled like a trained one but for case, spaces, separators or
    padding zeros, named with it ('' when none): a source that changed how it writes its keys."""
    if not unseen.respelled:
        return ""
    shown = ", ".join(f"'{new}' as '{old}'" for new, old in unseen.respelled_named)
    more = f" and {unseen.respelled - len(unseen.respelled_named)} more" if unseen.respelled > len(
        unseen.respelled_named) else ""
    return (f"; {unseen.respelled} of them spelled like a trained entity but for case, spaces, separators or padding "
            f"zeros ({shown}{more}) - has a source changed how it writes its keys? Write them as the version was "
            "trained on: until then they score as new machines (and apart from the rows of any table that still "
            "writes the trained key)")


NEW_FORMAT_SHARE = 0.01   # a date with more of a modality's payloads of a format its version never trained on: warned
# per kind: what its payloads are, what their stored format says, the device, and what scoring does with another format
PAYLOAD_WORDS = {"image": ("frames", "of a size or colour", "camera",
                           "resized to the modality's size (a grey one's channel copied to a colour modality's three, "
                           "a colour one made grey for a grey modality)"),
                 "audio": ("clips", "of a sample rate or length", "microphone",
                           "resampled to the modality's sample_rate (WAV) or read as at it (lists)")}


def new_payload_formats(formats: dict[str, dict[str, int]], manifest: dict) -> dict[str, dict[str, int]] | None:
    """Of a date's payloads per image or audio modality and stored format (`DateResult.payload_formats`: a frame's
    size, a WAV clip's sample rate, a listed clip's length), those of formats the version (almost) never trained on:
    none or at most `NEW_FORMAT_SHARE` of its training payloads had (its manifest's `input_payload_formats`; a few
    odd ones in the training days do not make a format known). None for a version that did not record them
    (trained before 2026-12-05); a modality it recorded none for (clips stored as lists, before their lengths were
    counted on 2026-12-05) is not compared; a grey modality's frames with colour (`COLOUR_FRAME`) by their size
    alone for a version trained before they were counted apart (no `TRAINED_COLOUR`)."""
    trained = manifest.get(TRAINED_FORMATS)
    if trained is None:
        return None
    if not manifest.get(TRAINED_COLOUR):
        formats = {m: _without_colour_mark(held) for m, held in formats.items()}
    known = {m: {found for found, n in held.items() if n > NEW_FORMAT_SHARE * sum(held.values())}
             for m, held in trained.items()}
    return {m: new for m, held in formats.items()
            if known.get(m) and (new := {found: n for found, n in held.items() if found not in known[m]})}


def _without_colour_mark(held: dict[str, int]) -> dict[str, int]:
    """Payload counts per format with a grey modality's `COLOUR_FRAME` mark taken off (counted by size alone)."""
    out: dict[str, int] = {}
    for found, n in held.items():
        size = found.removesuffix(COLOUR_FRAME)
        out[size] = out.get(size, 0) + n
    return out


def new_payload_formats_lines(result: DateResult, version: str, kinds: dict[str, str]) -> list[str]:
    """A line per image or audio modality (`kinds`: each modality's kind) more than `NEW_FORMAT_SHARE` of whose
    payloads on the date are of a format the version's training payloads (almost) never had (`new_payload_formats`):
    a camera or microphone replaced or reconfigured. Each frame is resized to the modality's `size` (each clip
    resampled to its `sample_rate`) and scored all the same, but its contributions are not those the version was
    calibrated on (on the demo, its 32x32 frames sent as 16x16 gave 52 % more alarms; as 64x64 the median camera
    contribution fell from 0.36 to 0.02)."""
    lines = []
    for m, new in sorted((result.new_payload_formats or {}).items()):
        held, count = sum(result.payload_formats.get(m, {}).values()), sum(new.values())
        if held and count > NEW_FORMAT_SHARE * held:
            things, of_format, device, done = PAYLOAD_WORDS.get(kinds.get(m, "image"), PAYLOAD_WORDS["image"])
            found = ", ".join(f"{f} ({n})" for f, n in sorted(new.items(), key=lambda kv: -kv[1]))
            lines.append(f"{result.date}: modality '{m}': {count} of its {held} {things} ({count / held:.0%}) are "
                         f"{of_format} model version {version}'s training {things} (almost) never had: {found} - a "
                         f"{device} replaced or reconfigured? They were {done} and scored, but their contributions "
                         f"are not those the version was calibrated on: restore the {device}'s setting, or train a "
                         f"version on days with such {things}")
    return lines


INTERVAL_CHANGE = 20     # interval bins (32 per doubling) beyond every training day's: about 1.5 x apart, warned
INTERVALS_SHOWN = 3      # entities named per modality (the runs table keeps as many)
# per kind: what its rows are, the device, and what scoring does with rows at another interval
INTERVAL_WORDS = {"timeseries": ("readings", "sensor", "resampled to the modality's period"),
                  "tabular": ("rows", "source", "taken as the latest row within the modality's tolerance"),
                  "image": ("frames", "camera", "taken as the latest frame within the modality's tolerance"),
                  "audio": ("clips", "microphone", "taken as the latest clip within the modality's tolerance")}


def changed_row_intervals(intervals: dict[str, dict[str, int]], manifest: dict) -> dict[str, dict] | None:
    """Of a date's median interval between rows per non-text modality and entity
    (`DateResult.row_intervals`), the entities whose interval lies more than `INTERVAL_CHANGE` bins (about 1.5 x)
    outside every training day's of the same entity (the manifest's `input_row_intervals`): per modality with any,
    `changed` (how many), `compared` (its entities with training days) and `first` ([entity, now, trained] - the
    training days' median interval, microseconds - for the first `INTERVALS_SHOWN` by key). Entities the version
    did not train on are not compared. None for a version that did not record them (trained before 2026-12-05)."""
    trained = manifest.get(TRAINED_INTERVALS)
    if trained is None:
        return None
    out = {}
    for m, now in sorted(intervals.items()):
        held = trained.get(m, {})
        compared = [(entity, us, {int(b): n for b, n in held[entity].items()}) for entity, us in sorted(now.items())
                    if entity in held]
        changed = [[entity, us, typical_interval(bins)] for entity, us, bins in compared
                   if not min(bins) - INTERVAL_CHANGE <= interval_bin(us) <= max(bins) + INTERVAL_CHANGE]
        if changed:
            out[m] = {"changed": len(changed), "compared": len(compared), "first": changed[:INTERVALS_SHOWN]}
    return out


def typical_interval(bins: dict[int, int]) -> int:
    """The median interval (microseconds) of an entity's training days per interval bin."""
    days = sorted(b for b, n in bins.items() for _ in range(n))
    return round(2 ** (days[len(days) // 2] / INTERVAL_STEPS))


def about(us: float) -> str:
    """A duration in its largest unit that it fills, to 2 figures: '4 s', '250 ms', '1.5 min'."""
    for unit, size in (("d", 86_400e6), ("h", 3_600e6), ("min", 60e6), ("s", 1e6), ("ms", 1e3)):
        if us >= size:
            return f"{float(f'{us / size:.2g}'):g} {unit}"
    return f"{float(f'{us:.2g}'):g} us"


def changed_entities(found: dict) -> str:
    """A modality's first entities with rows at another interval (`changed_row_intervals`), as words."""
    return ", ".join(f"{e} every {about(now)} against {about(then)}" for e, now, then in found["first"])


def changed_intervals_lines(result: DateResult, version: str, kinds: dict[str, str]) -> list[str]:
    """A line per non-text modality (`kinds`: each modality's kind) some entities of which had their
    rows at another interval on the date than on every training day (`changed_row_intervals`): a sensor sampled at
    another rate, a source that writes more or fewer rows. Its rows were read and scored all the same, but a series
    resampled from fewer readings (a table's latest row older) is not what the version was calibrated on."""
    lines = []
    for m, found in sorted((result.changed_intervals or {}).items()):
        things, device, done = INTERVAL_WORDS.get(kinds.get(m, "timeseries"), INTERVAL_WORDS["timeseries"])
        named = changed_entities(found)
        more = found["changed"] - len(found["first"])
        lines.append(f"{result.date}: modality '{m}': {found['changed']} of its {found['compared']} entities' {things} "
                     f"came at another interval than on any of model version {version}'s training days (the median "
                     f"between consecutive {things}): {named}{f' and {more} more' if more > 0 else ''} - a {device} "
                     f"reconfigured, or rows thinned or batched on their way? They were {done} and scored, but not as "
                     f"the version was calibrated on: restore the {device}'s rate, or train a version on days with "
                     f"such {things}")
    return lines


MISPLACED_SHARE = 0.01   # a date with more of its input rows timed outside its partition than this: warned
USABLE_ROWS = "usable_rows_"              # the runs table's column of a modality's usable input rows: + its name
PRESENT_SHARE = "present_share_"          # the runs table's column of a modality's share of ticks present: + its name
ENTITIES_WITHOUT = "entities_without_"    # ... of the scored entities it was absent at every tick of: + its name
UNSEEN_RESPELLED = "unseen_respelled"      # ... of its unseen entities, those spelled like a trained one
UNMET_KEYS = "unmet_keys"                  # ... its warnings of keys whose modalities never meet (JSON list)
NEW_PAYLOAD_FORMATS = "new_payload_formats"   # ... per modality, its payloads of formats the version never trained on
CHANGED_INTERVALS = "changed_row_intervals"   # ... per modality, its entities with rows at another interval (JSON)
KEYS_WITHOUT_MODALITY = "keys_without_modality"   # ... their first keys per modality (JSON; not a per-modality
                                                  # column, so outside those prefixes)


def absent_modality_warning(result: DateResult) -> str | None:
    """A line when a modality of the version had no usable row in a date's partitions while others scored its ticks:
    the date was scored without it (but for its first ticks, which read the day before; its partition missing or
    empty, its path moved, every row quarantined) - the fused score then rests on the other modalities, and the
    faults only it shows are not seen. (A dead channel is not this: its modality is scored with its other channels,
    and its rows are counted in `unusable_rows_warning`.)"""
    gone = sorted(m for m, rows in result.modality_rows.items() if rows == 0)
    if not gone or not result.rows_scored:
        return None
    return (f"{result.date}: modality {', '.join(gone)} had no usable input row in the date's partitions, so its "
            f"{result.rows_scored} scored ticks were scored without it (its partition missing or empty, its path "
            "moved, or every row quarantined) - check its input (dmafn "
            "validate SPEC --check-data, the quarantine table); once its files are there, a backfill over the date "
            "rescores it (its partitions changed)")


UNUSABLE_SHARE = 0.01    # a date with more of its input rows unusable (quarantined, misplaced ones aside): warned
UNUSABLE_NAMED = 3       # reasons named in the warning (the runs table keeps them all)


def unusable_rows_warning(result: DateResult, spec: Spec) -> str | None:
    """A line when more than `UNUSABLE_SHARE` of a date's input rows could not be used for another reason than their
    time's partition (`misplaced_rows_warning`): null or non-finite values, undecodable frames, times that are none,
    conflicting or redelivered rows - quarantined, so the date was scored from the rest (a row of numbers kept for
    its other columns counts too: a value of it was lost): the reasons that took most, and where the rows are."""
    unusable = result.input_rows_quarantined - result.input_rows_misplaced
    if unusable <= UNUSABLE_SHARE * result.input_rows:
        return None
    return (f"{result.date}: {unusable} of its {result.input_rows} input rows ({unusable / result.input_rows:.1%}) "
            f"could not be used, in whole or in part, and were quarantined ({spec.score.quarantine_path}); the date "
            f"was scored from the rest: {named_reasons(result.unusable_reasons)}"
            f"{time_text_hint(result.unusable_reasons, spec.source)} - mend the source, then rescore the "
            f"date (dmafn backfill {spec.source} --start {result.date} --end {result.date} --force)")


def time_text_hint(reasons: dict[str, int], spec_path: str) -> str:
    """Where some unusable rows' times are text the spec does not read (`ingest.read_times`' reasons), what to set
    or check, and the command that reads the files' samples (`validate --check-data`); else nothing."""
    if any("not an ISO 8601 time" in why for why in reasons):
        return (" (times written as text otherwise than ISO 8601: set the spec's time_format, or the modality's - "
                f"dmafn validate {spec_path} --check-data names the formats that read them)")
    if any("(time_format)" in why for why in reasons):
        return (f" (times the time_format does not read: dmafn validate {spec_path} --check-data names the formats "
                "that read them)")
    return ""


def largest_first(reasons: dict[str, int]) -> dict[str, int]:
    """Reasons by the rows they took, most first (ties by name)."""
    return dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


def named_reasons(reasons: dict[str, int]) -> str:
    """The `UNUSABLE_NAMED` reasons that took most rows, with their counts (and how many other reasons)."""
    named = "; ".join(f"{why} ({n})" for why, n in list(largest_first(reasons).items())[:UNUSABLE_NAMED])
    more = len(reasons) - UNUSABLE_NAMED
    return named + (f"; {more} more reason(s)" if more > 0 else "")


LEFT_OUT_KINDS = (UNREADABLE, DAMAGED, DAMAGED_AROUND, DAMAGED_ELSEWHERE)   # what `unreadable_files: skip` leaves
                                                                            # out, as reasons fold


def left_out_counts(reasons: dict[str, int]) -> dict[str, int]:
    """Of a date's unusable reasons (`ingest.unusable_reasons`), what `unreadable_files: skip` left out, per kind
    present: files whose bytes are no Parquet (`UNREADABLE`, 1 each), rows of row groups whose pages do not decode
    (`DAMAGED`), such row groups of the days read around the date (`DAMAGED_AROUND`, 1 each) and of files spanning
    several dates whose rows another date counts (`DAMAGED_ELSEWHERE`, 1 each)."""
    out: dict[str, int] = {}
    for why, n in reasons.items():
        if (kind := next((k for k in LEFT_OUT_KINDS if why.endswith(f": {k}")), None)) is not None:
            out[kind] = out.get(kind, 0) + n
    return out


def left_out_input(reasons: dict[str, int]) -> tuple[str, str] | None:
    """What `unreadable_files: skip` left out of a date, from its unusable reasons (`left_out_counts`): the words
    and the reasons that name them; None where nothing."""
    counts = left_out_counts(reasons)
    words = {UNREADABLE: "input file(s) could not be read as Parquet (truncated, empty or another format)",
             DAMAGED: "input row(s) sat in row groups whose pages do not decode (damaged in storage)",
             DAMAGED_AROUND: "row group(s) of the days read around it (its first ticks' look-back) have pages that do "
                             "not decode",
             DAMAGED_ELSEWHERE: "row group(s) of files spanning several dates have pages that do not decode (their "
                                "rows counted under another date)"}
    if not counts:
        return None
    named = [kind for kind in (UNREADABLE, DAMAGED)
             if kind in counts or kind == DAMAGED and (DAMAGED_AROUND in counts or DAMAGED_ELSEWHERE in counts)]
    return (" and ".join(f"{counts[kind]} {words[kind]}" for kind in LEFT_OUT_KINDS if kind in counts),
            " or ".join(f"'{kind} ...'" for kind in named))


def unreadable_files_warning(result: DateResult, spec: Spec) -> str | None:
    """A line when a date was scored without input files whose bytes are no Parquet, or without row groups whose
    pages do not decode (`unreadable_files: skip`): how many, where they are named, and how to rescore it once they
    are mended."""
    left_out = left_out_input(result.unusable_reasons)
    if left_out is None:
        return None
    said, reasons = left_out
    return (f"{result.date}: {said} and were left out (unreadable_files: skip) - each named in the quarantine table "
            f"({spec.score.quarantine_path}, reason {reasons}); once mended, a backfill over the date "
            "rescores it (its partitions changed)")


def misplaced_rows_warning(result: DateResult, zone: str) -> str | None:
    """A line when more than `MISPLACED_SHARE` of a date's input rows were timed outside its date partition (and
    quarantined): misfiled rows; rows filed by the day they arrived, later than the spec's `lateness` allows; or -
    when they sit in the hours at either edge of every day - partitions cut by the calendar of another time zone
    than the spec's `timezone`."""
    misplaced = result.input_rows_misplaced
    if misplaced <= MISPLACED_SHARE * result.input_rows:
        return None
    return (f"{result.date}: {misplaced} of its {result.input_rows} input rows "
            f"({misplaced / max(result.input_rows, 1):.1%}) are timed outside their date partition, as "
            f"the spec's timezone ({zone}) counts dates, and were quarantined: misfiled rows; rows filed by the day they "
            "arrived (set `lateness` to how late they may come); or, if every day loses the hours at its start or "
            "end, partitions cut by another time zone's dates (set `timezone` to it)")


@ray.remote(num_cpus=1, num_returns="streaming")
def _score_shard_task(shard: Shard, spec: Spec, mv: ModelVersion, stats: dict, run_id: str, scored_at: dt.datetime,
                      pin: bool = True, *splits: SplitFile) -> Iterator[tuple[int, int] | ShardScores]:
    """Streams (ticks done, ticks total) at most once a second while it scores, then the shard's `ShardScores`.
    `mv`: the model version without its statistics, `stats` those of the shard's entity bucket
    (`pipelines.statistics.BucketStatistics`); `splits`: its files split by entity bucket (`pipelines.staging`), read in their place."""
    mv = mv.with_statistics(stats)
    import torch

    from pipelines.score_steps import score_shard_steps   # torch and the model code: in the worker, never the driver

    # the task holds one CPU (and, pinned, one core): one intra-op thread, whatever the worker's torch started with
    torch.set_num_threads(1)
    started, throttle = time.time(), Throttle(1.0)
    with pinned_to_free_cpu(pin):                        # one core per task (pipelines.affinity)
        for step in score_shard_steps(with_pieces(shard, splits), spec, mv, Storage.from_spec(spec.storage),
                                      run_id=run_id, scored_at=scored_at):
            if isinstance(step, ShardScores):
                step.seconds = time.time() - started
                yield step
            elif throttle():
                yield step


_EDITS_WARNED: set[tuple[str, str, tuple[str, ...]]] = set()


def reading_spec(mv: ModelVersion, spec: Spec, *, recalibrating: bool = False) -> Spec:
    """The model version's modalities, columns and windows, read from where `spec` says the data lives now
    (its modality paths, the names their files give the time and entity, the unit of a numeric time, the zone
    of a naive one and the format of a time written as text, the partition key, the time zone of its dates and
    how late rows may be filed), written to `spec`'s output tables: moving the data does not need a new model.
    Where `spec` reads, models or thresholds the data otherwise than the version (a window, a column, the model
    section, the threshold edited since), a warning names each (`recalibrating`: the threshold and smoothing aside,
    which `dmafn recalibrate` adopts)."""
    missing = sorted(set(mv.spec.modalities) - set(spec.modalities))
    if missing:
        raise DataError(f"model version {mv.version} reads modalities {missing} that spec '{spec.name}' does not "
                        "define; add them back or score with a model trained on this spec")
    edits = [e for e in reading_differences(mv.spec, spec) if not (recalibrating and is_calibration_edit(e))]
    if edits and (mv.version, spec.source, tuple(edits)) not in _EDITS_WARNED:      # once per command
        _EDITS_WARNED.add((mv.version, spec.source, tuple(edits)))
        calibration = any(map(is_calibration_edit, edits))
        log.warning("spec %s differs from model version %s in how data is read, modelled or thresholded, and the "
                    "version reads and scores as it was trained (these edits take effect with a version trained on "
                    "the spec%s): %s", spec.source, mv.version,
                    "; the threshold's and the smoothing's also with dmafn recalibrate, which fits the version's "
                    "calibration again without training" if calibration else "", "; ".join(edits))
    modalities = {name: replace(m, **{field: getattr(now, field) for field in STORED_AS.values()})
                  for name, m in mv.spec.modalities.items() for now in [spec.modalities[name]]}
    return replace(mv.spec, modalities=modalities, partition=spec.partition, timezone=spec.timezone,
                   lateness_us=spec.lateness_us, time_unit=spec.time_unit, naive_times=spec.naive_times,
                   time_format=spec.time_format, unreadable_files=spec.unreadable_files, score=spec.score,
                   storage=spec.storage)


def score_date(spec: Spec, date: dt.date, *, version: str | None = None, run_id: str | None = None) -> DateResult:
    """Score one date with a model version (default LATEST) and replace that date in the output tables."""
    mv = Registry(spec.registry, Storage.from_spec(spec.storage)).load(version, build=False)
    done, failed = score_dates(spec, [date], mv, run_id=run_id or uuid.uuid4().hex[:12])
    if failed:
        raise failed[0][1]
    return done[0]


def score_dates(spec: Spec, dates: list[dt.date], mv: ModelVersion, *, run_id: str, parallel: int | None = None,
                days_per_shard: int = DAYS_PER_SHARD, shard_bytes: int = SHARD_BYTES, tables: OpenTables | None = None,
                ) -> tuple[list[DateResult], list[tuple[dt.date, Exception]]]:
    """Score `dates` in shards on the cluster and commit each date on its own once its shards are written.

    Each date is smoothed per entity, thresholded, checked (ticks in = scored + quarantined), committed in one
    Delta commit per table and recorded in the runs table. A shard of several dates that fails is retried one
    date at a time, so a bad date fails alone. Returns the dates done and the dates that failed with their
    error; errors before any shard runs (a table that cannot be listed, a missing column) are raised. A date no
    modality has a row for fails (an upstream outage), unless `score.missing_input` is 'skip' (a plant at rest):
    then it is done, `skipped`, recorded as such in the runs table, and nothing is written for it.
    `tables`: the job's open output tables, when it opened them already (backfill reads the scored dates first).
    """
    storage = Storage.from_spec(spec.storage)
    model_spec = reading_spec(mv, spec)
    kinds = {n: k.kind for n, k in model_spec.modalities.items()}
    tables = tables or OpenTables()        # the caller's, when it opened (and checked) them already
    require_own_tables(spec.score, model_spec.entity, storage, tables)    # before anything is written
    dates = sorted(set(dates))
    files = list_inputs(model_spec, dates, storage)
    listed = partition_files(model_spec, files, dates)     # what each date's partitions held: its run records it
    schemas = require_columns(model_spec, storage, files)
    parallel = parallel or max(1, int(Resources.current().cpus))
    shards = plan_shards(model_spec, dates, files, shard_bytes=shard_bytes, days_per_shard=days_per_shard,
                         min_shards=2 * parallel, key_casts=entity_casts(model_spec, schemas))
    log.info("%d date(s) in %d shard(s) (%d entity bucket(s)), %d at once", len(dates), len(shards),
             shards[0].buckets if shards else 0, parallel)
    # the version without its statistics once; the statistics once per entity bucket, its entities' parts only
    mv_ref, scored_at = ray.put(mv.with_statistics({})), dt.datetime.now(dt.timezone.utc)
    stats = BucketStatistics(mv.statistics, keys_sliceable(model_spec, schemas))
    staging = Staging(model_spec, storage, shards, dates, run_id)    # files that mix entities: split once
    pin = pinning_enabled()
    display = ProgressDisplay("scoring", len(shards), "shards")
    waiting = {d.isoformat(): sum(1 for s in shards if d in s.dates) for d in dates}
    parts: dict[str, list[tuple[DateCounts, float]]] = {d: [] for d in waiting}
    schemas: dict[str, pa.Schema] = {}
    done, failed, started = [], [], time.time()
    todo, running = deque(shards), {}                  # running: each shard task's stream -> its shard
    partial: dict[str, tuple[int, int]] = {}           # a running shard's last (ticks done, ticks total)

    @functools.cache
    def ends_note() -> str:                            # listed once a run, only if some date found nothing
        return newest_data_note(model_spec, storage)

    def finish(day: str, error: Exception | None) -> None:
        waiting.pop(day)
        date = dt.date.fromisoformat(day)
        read = {"input_files": listed[date].files, "input_digests": listed[date].digests}
        if error is None:
            try:
                result = _commit(spec, storage, day, parts.pop(day), schemas, model_spec, tables)
            except NoInput as exc:
                if spec.score.missing_input != "skip":        # where the lake ends, when the date's folders are empty
                    error = exc if listed[date].files else NoInput(f"{exc}{ends_note()}")
                else:                                 # a plant at rest: recorded, nothing written, not a failure
                    done.append(DateResult(day, 0, 0, 0, 0, 0.0, skipped=True, **read))
                    record_run(spec, storage, done[-1], run_id=run_id, version=mv.version, status="skipped",
                               tables=tables, error=f"{exc} (score.missing_input: skip)")
                    display.note(skipped_line(day))
                    return
            except Exception as exc:  # noqa: BLE001 - the other dates still commit
                error = exc
            else:
                result = replace(result, **read, input_row_digests=record(model_spec, result.row_digests),
                                 new_payload_formats=new_payload_formats(result.payload_formats, mv.manifest),
                                 changed_intervals=changed_row_intervals(result.row_intervals, mv.manifest),
                                 row_intervals={})   # let go: a number per entity, not kept for every date of a run
                done.append(result)                   # committed: counted even if Ctrl-C lands in the record
                record_run(spec, storage, result, run_id=run_id, version=mv.version, status="succeeded",
                           tables=tables, expected_alarm_rate=mv.validation_summary.get("validation_alarm_rate"))
                display.note(_date_line(len(done) + len(failed), len(dates), started, result))
                for line in (unlike_validation_warning(result, mv.version), unseen_entities_warning(result, mv.version),
                             misplaced_rows_warning(result, spec.timezone), absent_modality_warning(result),
                             unusable_rows_warning(result, spec), unreadable_files_warning(result, spec),
                             *(f"{day}: {line}" for line in result.unmet_keys),
                             *new_payload_formats_lines(result, mv.version, kinds),
                             *changed_intervals_lines(result, mv.version, kinds)):
                    if line is not None:
                        log.warning("%s", line)
                return
        failed.append((date, error))
        record_run(spec, storage, DateResult(day, 0, 0, 0, 0, 0.0), run_id=run_id, version=mv.version, status="failed",
                   tables=tables, error=str(error))
        log.warning("%s failed: %s", day, error)

    finished_shards, ticks_done = 0, 0

    def show() -> None:
        now = [partial[s.name] for s in running.values() if s.name in partial]
        display.update(finished_shards + sum(d / max(t, 1) for d, t in now), ticks=ticks_done + sum(d for d, _ in now),
                       committed=f"{len(done)}/{len(dates)} dates")

    def submit() -> None:
        while todo and len(running) < parallel:
            shard = todo.popleft()
            if any(d.isoformat() not in waiting for d in shard.dates):     # a date already failed: skip it
                shard = replace(shard, dates=tuple(d for d in shard.dates if d.isoformat() in waiting))
                if not shard.dates:
                    staging.release(shard)
                    continue
            running[_score_shard_task.remote(shard, model_spec, mv_ref, stats.ref(shard), run_id, scored_at, pin,
                                             *staging.splits(shard))] = shard

    def release(stream) -> Shard:
        """A finished (or failed) task's shard; its slot gets the next shard at once, before this one's dates
        are committed."""
        shard = running.pop(stream)
        partial.pop(shard.name, None)
        staging.release(shard)
        submit()
        return shard

    try:
        while todo or running:
            submit()
            if not running:                           # only shards of dates that had already failed were left
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            if not ready:
                show()
                continue
            stream = ready[0]
            try:
                step = raise_task_error(next(stream))
            except Exception as exc:  # noqa: BLE001 - one shard: retry its dates alone, or fail its date
                if len(running[stream].dates) > 1:
                    staging.retain(running[stream].alone())     # before release: its files' pieces are kept
                shard = release(stream)
                if isinstance(exc, StopIteration):
                    exc = RuntimeError(f"shard {shard.name} ended without its scores")
                if len(shard.dates) > 1:
                    log.warning("shard %s failed (%s); scoring its dates one at a time", shard.name, exc)
                    todo.extendleft(reversed(shard.alone()))
                elif shard.dates[0].isoformat() in waiting:
                    finish(shard.dates[0].isoformat(), exc)
                continue
            if not isinstance(step, ShardScores):         # progress: (ticks done, ticks total)
                partial[running[stream].name] = step
                show()
                continue
            result: ShardScores = step
            shard = release(stream)
            finished_shards += 1
            ticks_done += sum(c.ticks_in for c in result.dates.values())
            for name, schema in (("output", result.output_schema), ("quarantine", result.quarantine_schema)):
                if schema is not None:
                    schemas[name] = schema
            for day, counts in result.dates.items():
                if day not in waiting:
                    continue
                parts[day].append((counts, result.seconds / len(result.dates)))
                waiting[day] -= 1
                if waiting[day] == 0:
                    finish(day, None)
            show()
    except KeyboardInterrupt:
        raise Interrupted(len(done), len(dates)) from None
    finally:
        display.close()
        staging.close()
        if staging.submitted:
            log.info("%d file(s) checked for a split by entity bucket (those holding several entities in a row "
                     "group split, the others read in place)", staging.submitted)
    return sorted(done, key=lambda r: r.date), sorted(failed, key=lambda f: f[0])


class NoInput(DataError):
    """No modality has a row for the date (not even an unusable one)."""


def skipped_line(day: str) -> str:
    """What a job says of a date it skipped for want of any input (`score.missing_input: skip`)."""
    return f"{day}: no input for any modality: skipped, nothing written (score.missing_input: skip)"


def _commit(spec: Spec, storage: Storage, day: str, parts: list[tuple[DateCounts, float]],
            schemas: dict[str, pa.Schema], model: Spec, tables: OpenTables) -> DateResult:
    """One date's files from all its shards: checked, then committed (quarantine first, then the output). `model`:
    the version's spec as it reads now (`reading_spec`), whose modalities the shards' entity bits follow."""
    t0 = time.time()
    name = model.name
    counts = [c for c, _ in parts]
    ticks_in = sum(c.ticks_in for c in counts)
    scored, quarantined = sum(c.rows_scored for c in counts), sum(c.rows_quarantined for c in counts)
    unusable = sum(c.input_rows_quarantined for c in counts)
    # rows came and none could be used - or only rows kept for some of their values, which gave no modality a
    # tick: a data problem, whatever score.missing_input says
    if not scored and unusable:
        misplaced = sum(c.input_rows_misplaced for c in counts)
        keys = ["timezone", "lateness", *(["time_unit"] if any(map(spec.time_unit_in, spec.modalities.values()))
                                          else []), *(["naive_times"] if spec.timezone != "UTC" else [])]
        raise DataError(f"no modality of spec '{name}' has usable data for {day} ({unusable} input rows, all "
                        f"quarantined: see {spec.score.quarantine_path})" + (
                            f"; {misplaced} of them timed outside their date partition: do the spec's "
                            f"{', '.join(keys[:-1])} and {keys[-1]} say how the lake is filed?"
                            if 2 * misplaced > unusable else ""))
    if not ticks_in:
        raise NoInput(f"no modality of spec '{name}' has data for {day}")
    if scored + quarantined != ticks_in:
        raise RuntimeError(f"{day}: {ticks_in} ticks in but {scored} scored + {quarantined} quarantined")
    targets = ((spec.score.quarantine_path, [f for c in counts for f in c.quarantine_files], schemas.get("quarantine")),
               (spec.score.output, [f for c in counts for f in c.output_files], schemas.get("output")))
    for path, files, schema in targets:
        uri, options = storage.delta_uri(path), storage.delta_options(path)
        if schema is None:                       # nothing written for this table by any shard of the run
            table = tables.get(uri, options)
            if table is None:
                continue
            schema = pa.schema(table.schema().to_arrow())
        commit_date(uri, files, date=day, schema=schema, storage_options=options, tables=tables)
    modalities = sorted({m for c in counts for m in c.modality_above})
    unseen = [c.unseen for c in counts if c.unseen is not None]
    present = summed_counts([c.modality_present for c in counts])
    usable = summed_counts([c.modality_rows for c in counts])
    without: dict[str, UnseenEntities] = {}
    for c in counts:                     # a date's shards hold disjoint entities
        for m, group in c.without_modality.items():
            without[m] = without[m].add(group) if m in without else group
    seen: dict[str, int] = {}
    formats: dict[str, dict[str, int]] = {}
    intervals: dict[str, dict[str, int]] = {}
    for c in counts:                     # a date's shards hold disjoint entities
        merge_entity_modalities(seen, c.entity_modalities)
        merge_counts(formats, c.payload_formats)
        for m, entities in c.row_intervals.items():
            intervals.setdefault(m, {}).update(entities)
    by_modality = {m: _share_above([c.modality_above[m] for c in counts if m in c.modality_above]) for m in modalities}
    return DateResult(date=day, ticks_in=ticks_in, rows_scored=scored, rows_quarantined=quarantined,
                      anomalies=sum(c.anomalies for c in counts),
                      seconds=round(sum(s for _, s in parts) + time.time() - t0, 2),
                      input_rows_quarantined=sum(c.input_rows_quarantined for c in counts),
                      above_validation_median=_share_above([(c.with_score, c.above_validation_median) for c in counts]),
                      modality_above={m: share for m, share in by_modality.items() if share is not None},
                      entities=sum(c.entities for c in counts),
                      unseen=functools.reduce(UnseenEntities.add, unseen) if unseen else None,
                      input_rows=sum(c.input_rows for c in counts),
                      input_rows_misplaced=sum(c.input_rows_misplaced for c in counts),
                      unusable_reasons=largest_first(summed_counts([c.unusable_reasons for c in counts])),
                      modality_rows=usable,
                      modality_present={m: n / scored for m, n in present.items()} if scored else {},
                      without_modality=without, row_digests=merged([c.row_digests for c in counts]),
                      unmet_keys=unmet_entity_lines(model, seen, f"scored ticks of {day}", lone_when_others=True),
                      payload_formats=formats, row_intervals=intervals)


def summed_counts(parts: list[dict[str, int]]) -> dict[str, int]:
    """Per key, the sum over the parts' counts - a date's shards', or dates' (a key with 0 kept: a modality without
    rows), sorted by key."""
    return {k: sum(p.get(k, 0) for p in parts) for k in sorted({k for p in parts for k in p})}


def _share_above(positions: list[tuple[int, int]]) -> float | None:
    """The share above a validation median over the shards' (values, those above it) counts; None without values."""
    values = sum(n for n, _ in positions)
    return sum(up for _, up in positions) / values if values else None


RUN_ERROR_CHARS = 2000    # a failed date's error kept in the runs table: its first this many characters


def record_run(spec: Spec, storage: Storage, result: DateResult, *, run_id: str, version: str, status: str,
               tables: OpenTables | None = None, expected_alarm_rate: float | None = None,
               error: str | None = None) -> None:
    """Append one row to the run audit table (`score.runs`, default `<output>_runs`): the date's counts, its
    alarm rate beside the one the version expects (its validation days'), the share of its ticks above the
    version's validation median score (`unlike_validation_warning`), the entities it scored without statistics of
    their own, their alarm rate and those spelled like a trained entity (`unseen_entities_warning`), the warnings of
    keys whose modalities never meet (`unmet_keys`), its input rows and those timed outside their date
    partition (`misplaced_rows_warning`), the other unusable ones per modality and reason (`unusable_rows_warning`),
    per modality its usable input rows (`absent_modality_warning`), the share
    of its scored ticks it was present at and the entities it was absent at every tick of (`dmafn status`), the
    files its partitions held when listed (`input_files`, and per modality a digest of them, `input_digests`:
    `changed_inputs`) and, for a failed or skipped date, why (`error`)."""
    row = pa.table({"run_id": [run_id], "date": [result.date], "model_version": [version],
                    "ticks_in": pa.array([result.ticks_in], pa.int64()),
                    "rows_scored": pa.array([result.rows_scored], pa.int64()),
                    "rows_quarantined": pa.array([result.rows_quarantined], pa.int64()),
                    "anomalies": pa.array([result.anomalies], pa.int64()),
                    "input_rows_quarantined": pa.array([result.input_rows_quarantined], pa.int64()),
                    "input_rows": pa.array([result.input_rows], pa.int64()),
                    "input_rows_misplaced": pa.array([result.input_rows_misplaced], pa.int64()),
                    UNUSABLE_REASONS: pa.array([json.dumps(result.unusable_reasons) if result.unusable_reasons
                                                else None], pa.string()),
                    "input_files": pa.array([result.input_files], pa.int64()),
                    "input_digests": pa.array([None if result.input_digests is None
                                               else json.dumps(result.input_digests, sort_keys=True)], pa.string()),
                    "input_row_digests": pa.array([result.input_row_digests], pa.string()),
                    "alarm_rate": pa.array([result.alarm_rate], pa.float64()),
                    "expected_alarm_rate": pa.array([expected_alarm_rate], pa.float64()),
                    "above_validation_median": pa.array([result.above_validation_median], pa.float64()),
                    **{f"{MODALITY_SHARE}{m}": pa.array([share], pa.float64())
                       for m, share in sorted(result.modality_above.items())},
                    **{f"{USABLE_ROWS}{m}": pa.array([rows], pa.int64())
                       for m, rows in sorted(result.modality_rows.items())},
                    **{f"{PRESENT_SHARE}{m}": pa.array([share], pa.float64())
                       for m, share in sorted(result.modality_present.items())},
                    **{f"{ENTITIES_WITHOUT}{m}": pa.array([result.without_modality[m].entities
                                                           if m in result.without_modality else 0], pa.int64())
                       for m in sorted(result.modality_present)},
                    KEYS_WITHOUT_MODALITY: pa.array([json.dumps({m: g.named for m, g in
                                                                 sorted(result.without_modality.items())})
                                                     if result.without_modality else None], pa.string()),
                    "entities": pa.array([result.entities], pa.int64()),
                    "unseen_entities": pa.array([None if result.unseen is None else result.unseen.entities],
                                                pa.int64()),
                    "unseen_entity_alarm_rate": pa.array([None if result.unseen is None else result.unseen.alarm_rate],
                                                         pa.float64()),
                    UNSEEN_RESPELLED: pa.array([None if result.unseen is None else result.unseen.respelled],
                                               pa.int64()),
                    UNMET_KEYS: pa.array([json.dumps(result.unmet_keys) if result.unmet_keys else None], pa.string()),
                    NEW_PAYLOAD_FORMATS: pa.array([json.dumps(result.new_payload_formats, sort_keys=True)
                                               if result.new_payload_formats else None], pa.string()),
                    CHANGED_INTERVALS: pa.array([json.dumps(result.changed_intervals, sort_keys=True)
                                                 if result.changed_intervals else None], pa.string()),
                    "duration_s": [float(result.seconds)], "status": [status],
                    "error": pa.array([None if error is None else error[:RUN_ERROR_CHARS]], pa.string()),
                    "finished_at": pa.array([dt.datetime.now(dt.timezone.utc)], pa.timestamp("us", tz="UTC"))})
    write_partition(storage.delta_uri(spec.score.runs_path), row, date=None, mode="append",
                    storage_options=storage.delta_options(spec.score.runs_path), tables=tables)


def scored_dates(spec: Spec, storage: Storage, version: str, dates: list[str]) -> set[str]:
    """Dates whose rows in the output table were all written by model `version`."""
    return dates_written_by(storage.delta_uri(spec.score.output), storage.delta_options(spec.score.output),
                            "model_version", version, dates)


RELISTED = "relisted"   # a runs table row's status: the date's files were rewritten since it was scored, its rows the
                        # same (`rows_unchanged`); the row records the new listing, the output is as scored


@dataclass(frozen=True)
class ChangedInput:
    """A scored date whose partitions changed since the run that scored it listed them: the modalities whose files
    differ (added, removed or rewritten: name, size or modification time) and the count of files then and now; and, to
    compare its rows (`rows_unchanged`), the row digests that run recorded (`row_digests.record`'s JSON, None before
    runs recorded them), the per-modality listing digests now and the files its own partitions hold now."""

    date: str
    modalities: list[str]
    files_then: int | None
    files_now: int
    rows_then: str | None = field(default=None, compare=False)
    digests_now: dict[str, str] = field(default_factory=dict, compare=False)
    listed_now: tuple[InputFile, ...] = field(default=(), compare=False)


def recorded_inputs(spec: Spec, storage: Storage, dates: list[str], *,
                    version: str | None = None) -> dict[str, tuple[int | None, dict[str, str], str | None]]:
    """For each of `dates` the files count, per-modality digests and row digests (None before runs recorded them)
    its newest run that scored it recorded (status succeeded, skipped for want of input, or relisted: its files
    rewritten with the same rows; by model `version` when given - the run whose rows the output holds); a date without
    such a run, or scored before runs recorded their listing, is left out."""
    path = spec.score.runs_path
    uri, options = storage.delta_uri(path), storage.delta_options(path)
    if not dates or read_table(uri, options) is None:
        return {}
    runs = scan_table(uri, options)
    names = runs.collect_schema().names()
    if "input_digests" not in names:
        return {}
    if "input_row_digests" not in names:                    # runs tables before 2026-12-04
        runs = runs.with_columns(pl.lit(None, pl.String).alias("input_row_digests"))
    runs = runs.filter(pl.col("date").is_in(dates) & pl.col("status").is_in(["succeeded", "skipped", RELISTED]))
    if version is not None:
        runs = runs.filter(pl.col("model_version") == version)
    newest = (runs.select("date", "input_files", "input_digests", "input_row_digests", "finished_at").collect()
              .sort("finished_at").group_by("date").last())
    return {row["date"]: (row["input_files"], json.loads(row["input_digests"]), row["input_row_digests"])
            for row in newest.iter_rows(named=True) if row["input_digests"] is not None}


def changed_inputs(spec: Spec, storage: Storage, dates: list[str], *, version: str | None = None) -> list[ChangedInput]:
    """The dates among `dates` whose own partitions (`spec`'s modalities; context views read their parent's) changed
    since the newest run that scored them listed them (`recorded_inputs`; by `version` when given): a late upload of
    a date's files, a partition re-delivered or rewritten, rows of a Delta table deleted in place (a deletion
    vector). Their output was scored without what is there now;
    `backfill` rescores them. Metadata only: one listing of the dates' partitions. Dates whose runs recorded no
    listing (older runs tables) are not compared."""
    recorded = recorded_inputs(spec, storage, dates, version=version)
    days = sorted(dt.date.fromisoformat(d) for d in recorded)
    files = list_partition_files(spec, days, storage, sized=False) if days else []
    now = partition_files(spec, files, days) if days else {}
    by_date: dict[dt.date, list[InputFile]] = {}
    for f in files:
        by_date.setdefault(f.date, []).append(f)
    changed = []
    for day in days:
        files_then, digests, rows_then = recorded[day.isoformat()]
        if modalities := now[day].changed(digests):
            changed.append(ChangedInput(day.isoformat(), modalities, files_then, now[day].files, rows_then,
                                        now[day].digests, tuple(by_date.get(day, ()))))
    return changed


_date_digests_task = ray.remote(num_cpus=1)(date_digests)


def rows_unchanged(spec: Spec, changed: list[ChangedInput]) -> set[str]:
    """The dates of `changed` whose changed modalities' partitions hold, row for row, what the run that scored them
    read (`row_digests`): files rewritten - a compaction upstream, a copy uploaded again in place of the first - with
    the same rows. A Ray task per date reads its changed modalities' files (the columns hashed then); a date whose run
    recorded no row digests (before 2026-12-04, or under another Polars version) is not compared."""
    tasks = []
    for c in changed:
        columns = recorded_columns(c.rows_then)
        if all(m in columns for m in c.modalities):
            tasks.append((c, _date_digests_task.remote(spec, [f for f in c.listed_now if f.modality in c.modalities],
                                                       {m: columns[m] for m in c.modalities})))
    display, same = ProgressDisplay("comparing rows", len(tasks), "changed dates"), set()
    for done, (c, ref) in enumerate(tasks, 1):
        if same_rows(c.rows_then, raise_task_error(ref), c.modalities):
            same.add(c.date)
        display.update(done, same=len(same))
    display.close()
    return same


def changed_inputs_line(changed: list[ChangedInput]) -> str:
    """One text for the changed dates: each with the modalities whose files changed and its partitions' count of files
    (every modality's) then -> now; the first `NAMED_DATES`, the rest counted."""
    return named_dates([f"{c.date} ({', '.join(c.modalities)}; {c.files_then} -> {c.files_now} files)"
                        for c in changed])


NAMED_DATES = 10     # dates a line names; the rest counted


def named_dates(dates: list[str]) -> str:
    """The first `NAMED_DATES` of `dates` (or of their descriptions) and how many more."""
    more = f" and {len(dates) - NAMED_DATES} more" if len(dates) > NAMED_DATES else ""
    return ", ".join(dates[:NAMED_DATES]) + more


def _date_line(done: int, total: int, started: float, r: DateResult) -> str:
    elapsed = time.time() - started
    eta = elapsed / done * (total - done)
    return (f"[{done}/{total}] {r.date}: {r.ticks_in} ticks, {r.rows_scored} scored, {r.rows_quarantined} "
            f"quarantined, {r.anomalies} anomalies ({r.seconds:.1f}s) - elapsed {clock(elapsed)}, ETA {clock(eta)}")


def backfill(spec: Spec, start: dt.date, end: dt.date, *, version: str | None = None, force: bool = False,
             skip_changed: bool = False, parallel: int | None = None, days_per_shard: int = DAYS_PER_SHARD,
             shard_bytes: int = SHARD_BYTES) -> list[DateResult]:
    """Score every date in [start, end], one commit per date, with one model version.

    Resumable: dates already scored by that version are skipped unless `force` - but a date whose partitions changed
    since it was scored (`changed_inputs`: files added, removed or rewritten) is rescored, and so are the scored
    dates after it whose first ticks read it as their look-back, unless `skip_changed` (`plan_backfill`). The dates
    are cut into shards of at most `days_per_shard` consecutive dates x an entity bucket, each reading at most about
    `shard_bytes` of Parquet; `parallel` shards run at once (default: the cluster's CPUs). A date that fails
    is recorded as failed in the runs table and the error is raised once the other dates have finished.
    """
    return backfill_dates(spec, _date_range(start, end, days_per_shard, shard_bytes, parallel), version=version,
                          force=force, skip_changed=skip_changed, parallel=parallel, days_per_shard=days_per_shard,
                          shard_bytes=shard_bytes)


def _date_range(start: dt.date, end: dt.date, days_per_shard: int, shard_bytes: int,
                parallel: int | None) -> list[dt.date]:
    if end < start:
        raise ValueError(f"backfill: end {end} is before start {start}")
    if days_per_shard < 1 or shard_bytes <= 0 or (parallel is not None and parallel < 1):
        raise ValueError("backfill: days_per_shard, shard_bytes and parallel must be positive")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def backfill_dates(spec: Spec, days: list[dt.date], *, version: str | None = None, force: bool = False,
                   skip_changed: bool = False, parallel: int | None = None, days_per_shard: int = DAYS_PER_SHARD,
                   shard_bytes: int = SHARD_BYTES) -> list[DateResult]:
    """`backfill` of the dates `days` (in any order, not necessarily consecutive)."""
    storage = Storage.from_spec(spec.storage)
    mv = Registry(spec.registry, storage).load(version, build=False)
    tables = OpenTables()
    plan = plan_backfill(spec, days, mv, storage, tables, force=force, skip_changed=skip_changed,
                         compare_rows=rows_unchanged)
    plan.log()
    run_id = uuid.uuid4().hex[:12]
    for c in plan.rewritten:        # the new listing recorded: the next check compares with it, reading no row
        record_run(spec, storage, DateResult(c.date, 0, 0, 0, 0, 0.0, input_files=c.files_now,
                                             input_digests=c.digests_now, input_row_digests=c.rows_then),
                   run_id=run_id, version=mv.version, status=RELISTED, tables=tables)
    if not plan.todo:
        return []
    results, errors = score_dates(spec, plan.todo, mv, run_id=run_id, parallel=parallel,
                                  days_per_shard=days_per_shard, shard_bytes=shard_bytes, tables=tables)
    if errors:
        error = BackfillError(errors)
        raise error from error.failed[0][1]
    return results


@dataclass
class BackfillPlan:
    """Which dates a backfill with model `version` scores and which it leaves, and why (`plan_backfill`)."""

    version: str
    new: list[str]                     # not scored by the version (or all of them, with `force`)
    changed: list[ChangedInput]        # scored by it, their partitions changed since: scored again
    after_changed: list[str]           # scored by it after a changed date, within the look-back days: scored again
    left: list[str]                    # scored by it: skipped
    changed_left: list[ChangedInput]   # changed since, but left as scored (`skip_changed`)
    rewritten: list[ChangedInput] = field(default_factory=list)   # their files changed, not their rows: left as scored

    @property
    def todo(self) -> list[dt.date]:
        """The dates it scores."""
        return sorted(dt.date.fromisoformat(d) for d in [*self.new, *(c.date for c in self.changed),
                                                         *self.after_changed])

    def log(self) -> None:
        """What a backfill says of its plan before it scores (the changed dates as warnings)."""
        if self.changed:
            log.warning("rescoring %d date(s) whose partitions changed since model %s scored them: %s%s",
                        len(self.changed), self.version, changed_inputs_line(self.changed),
                        f"; and {len(self.after_changed)} scored date(s) after them whose first ticks read them "
                        f"({named_dates(self.after_changed)})" if self.after_changed else "")
        if self.changed_left:
            log.warning("%d date(s) changed since model %s scored them, left as scored (--skip-changed): %s",
                        len(self.changed_left), self.version, changed_inputs_line(self.changed_left))
        if self.rewritten:
            log.info("%d date(s) whose files were rewritten since model %s scored them hold the same rows, left as "
                     "scored (their new listing recorded): %s", len(self.rewritten), self.version,
                     changed_inputs_line(self.rewritten))
        if self.left:
            log.info("skipping %d date(s) already scored by model %s (use --force to rescore)", len(self.left),
                     self.version)


def plan_backfill(spec: Spec, days: list[dt.date], mv: ModelVersion, storage: Storage,
                  tables: OpenTables | None = None, *, force: bool = False, skip_changed: bool = False,
                  compare_rows: Callable[[Spec, list[ChangedInput]], set[str]] | None = None) -> BackfillPlan:
    """The dates of `days` a backfill with `mv` scores: those its output does not hold from `mv` (all with `force`),
    those it holds whose partitions changed since (`changed_inputs`) and the scored dates after each of them within
    the look-back days (their first ticks read the changed partition) - the last two left as they are with
    `skip_changed`. Checks the output tables first (`require_own_tables`); metadata only, unless `compare_rows`
    (`rows_unchanged`) is given: the changed dates it finds holding the rows they were scored from are then left as
    scored (`rewritten`), and so are the dates after them."""
    tables = tables or OpenTables()
    require_own_tables(spec.score, mv.spec.entity, storage, tables)       # before reading which dates it holds
    names = sorted({d.isoformat() for d in days})
    scored = set() if force else scored_dates(spec, storage, mv.version, names)
    model_spec = reading_spec(mv, spec)
    changed = changed_inputs(model_spec, storage, sorted(scored), version=mv.version) if scored else []
    rewritten = []
    if changed and compare_rows is not None and not skip_changed:
        same = compare_rows(model_spec, changed)
        rewritten, changed = [c for c in changed if c.date in same], [c for c in changed if c.date not in same]
    after = sorted({(dt.date.fromisoformat(c.date) + dt.timedelta(days=i)).isoformat()
                    for c in changed for i in range(1, model_spec.lookback_days + 1)} & scored
                   - {c.date for c in changed})
    if skip_changed:
        changed, after, changed_left = [], [], changed
    else:
        changed_left = []
    again = {c.date for c in changed} | set(after)
    return BackfillPlan(mv.version, [d for d in names if d not in scored], changed, after,
                        sorted(scored - again), changed_left, rewritten)


def backfill_dry_run(spec: Spec, start: dt.date, end: dt.date, *, version: str | None = None, force: bool = False,
                     skip_changed: bool = False, parallel: int | None = None, days_per_shard: int = DAYS_PER_SHARD,
                     shard_bytes: int = SHARD_BYTES) -> list[str]:
    """What `backfill` with these arguments would do, as lines - the dates it would score and why, those it would
    leave, the input it would read and its shards - without scoring or writing anything (no Ray; listings and the
    output table's log only). `parallel` (default 1 here: no cluster is asked) sets the least number of shards."""
    days = _date_range(start, end, days_per_shard, shard_bytes, parallel)
    storage = Storage.from_spec(spec.storage)
    mv = Registry(spec.registry, storage).load(version, build=False)
    plan = plan_backfill(spec, days, mv, storage, force=force, skip_changed=skip_changed)
    lines = [f"backfill {start} .. {end} with model version {mv.version}: a dry run, nothing is scored or written",
             f"  to score: {len(plan.new)} date(s) " + ("(--force)" if force else f"not scored by {mv.version}")
             + (f": {named_dates(plan.new)}" if plan.new else "")]
    if plan.changed:
        lines.append(f"  to score again: {len(plan.changed)} date(s) whose partitions changed since it scored them: "
                     f"{changed_inputs_line(plan.changed)}"
                     + (f"; {len(plan.after_changed)} date(s) after them whose first ticks read them: "
                        f"{named_dates(plan.after_changed)}" if plan.after_changed else "")
                     + " (the backfill first reads their partitions: a date whose rows are those it was scored from "
                       "- files rewritten by a compaction - is left as scored, with the dates after it)")
    lines.append(f"  left as scored: {len(plan.left)} date(s)" + (f": {named_dates(plan.left)}" if plan.left else ""))
    if plan.changed_left:
        lines.append(f"  left although their partitions changed (--skip-changed): {len(plan.changed_left)} date(s): "
                     f"{changed_inputs_line(plan.changed_left)}")
    todo = plan.todo
    if todo:
        model_spec = reading_spec(mv, spec)
        files = list_inputs(model_spec, todo, storage)
        shards = plan_shards(model_spec, todo, files, shard_bytes=shard_bytes, days_per_shard=days_per_shard,
                             min_shards=2 * (parallel or 1))
        sizes = {f.path: f.size for f in files}              # a context view's files are its parent's
        lines.append(f"  input: {len(sizes)} file(s), {sum(sizes.values()) / 1e6:,.1f} MB (the look-back and "
                     f"look-ahead days' included) in {len(shards)} "
                     f"shard(s) of up to {days_per_shard} date(s) x {shards[0].buckets if shards else 1} entity "
                     f"bucket(s) (--shard-mb {shard_bytes / 1e6:g}, --parallel {parallel or 1})")
    return lines
