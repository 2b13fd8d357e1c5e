"""`dmafn status`: where a spec's scoring stands and what needs a look, from the model registry, the runs table (a row
per scored date and run) and a listing of the newest dates' input partitions - no Ray, no row read.

It lists the model versions (the latest: when it was trained, on which days, the alarm rate its validation days
had), the dates scored (first, newest, by which version), the last few dates' runs side by side, and the problems:
dates whose runs all failed, dates whose latest re-run failed, dates never scored between the first and the newest
scored date, recent dates most of whose ticks score above the version's validation median (the line
`pipelines.score.unlike_validation_warning` logs), entities the latest version scored without statistics of their
own (`pipelines.score.unseen_entities_warning`; those spelled like a trained one apart), entity keys whose
modalities never meet (`entity_keys.unmet_entity_lines`), image frames of a size the version never trained on,
recent dates with many input rows timed outside their partition,
modalities gone dark (no usable row on a date, part of the newest day missing, more machines without it), recent
dates whose partitions changed since they were scored (`pipelines.score.changed_inputs`), and - with `max_age_days` -
a newest scored date too old for a nightly job.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from dmafn.spec import Spec, format_duration, is_calibration_edit, local_today
from pipelines.delta_sink import read_table, scan_table
from pipelines.ingest import DAMAGED, DAMAGED_AROUND, DAMAGED_ELSEWHERE, UNREADABLE
from pipelines.registry import LATEST, Registry, version_facts
from pipelines.score import (CHANGED_INTERVALS, ENTITIES_WITHOUT, INTERVAL_WORDS, KEYS_WITHOUT_MODALITY,
                             LEFT_OUT_KINDS, MISPLACED_SHARE, MODALITY_SHARE, NEW_FORMAT_SHARE, NEW_PAYLOAD_FORMATS,
                             PAYLOAD_WORDS, PRESENT_SHARE, RELISTED, UNMET_KEYS, UNSEEN_RESPELLED, UNUSABLE_REASONS,
                             UNUSABLE_SHARE, USABLE_ROWS, changed_entities, changed_inputs, changed_inputs_line,
                             left_out_counts, named_dates, named_reasons, summed_counts, time_text_hint,
                             unlike_validation_line)
from pipelines.storage import DataError, Storage, join

STATUS_DAYS = 7     # the newest dates shown, and checked for days unlike the validation days
SKIPPED = "skipped"  # a run's status for a date no modality had input for, with `score.missing_input: skip`
PRESENT_DROP = 0.05  # a modality present at this much less of the newest date's ticks than the median of the recent
                     # dates before: named (the demo fleet's shares move by at most 0.01 from day to day)


@dataclass
class ScoringStatus:
    """What `scoring_status` found: the lines to print and the problems among them (none: nothing needs a look)."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    latest: str | None = None          # the version the registry names LATEST, when its manifest reads
    facts: dict[str, Any] = field(default_factory=dict)     # the same as plain data (`as_dict`)

    def as_dict(self) -> dict[str, Any]:
        """What was found as JSON-ready data: `versions` (count), `latest` (its facts), `scored` (dates, first,
        newest, newest_version), `recent` (the newest dates' latest runs, a dict each) and `problems`."""
        return {**self.facts, "problems": list(self.problems)}

    def text(self) -> str:
        found = [f"problems: {len(self.problems)}", *(f"  {p}" for p in self.problems)] if self.problems \
            else ["problems: none"]
        return "\n".join([*self.lines, *found])


def scoring_status(spec: Spec, storage: Storage, *, today: dt.date | None = None, days: int = STATUS_DAYS,
                   max_age_days: int | None = None, spec_path: str = "SPEC") -> ScoringStatus:
    """The registry's versions and the runs table's dates of `spec`, and what needs a look (see the module).
    `today` (default: today in the spec's timezone) and `max_age_days`: a newest scored date older than today -
    max_age_days is a problem; `spec_path` names the spec in the commands the problems suggest."""
    today = today or local_today(spec.timezone)
    out = ScoringStatus()
    _versions(spec, storage, out, spec_path)
    runs = _latest_runs(spec, storage)
    if runs is None or not runs["committed"].any():
        out.lines.append(f"scored: nothing yet in {spec.score.output}")
        out.problems.append(f"nothing scored yet in {spec.score.output}: run dmafn score {spec_path} "
                            f"(or dmafn backfill {spec_path} --start D --end D)")
        if runs is not None:
            _failed(runs, out, spec_path)
        return out
    done = runs.filter(pl.col("committed"))
    first, newest = done["date"].min(), done["date"].max()
    newest_version = done.filter(pl.col("date") == newest)["model_version"][0]
    out.facts["scored"] = {"dates": done.height, "first": first, "newest": newest, "newest_version": newest_version}
    out.lines.append(f"scored: {done.height} date(s), {first} .. {newest} (the newest by {newest_version}) "
                     f"in {spec.score.output}")
    if out.latest is not None and out.latest not in set(done["model_version"].to_list()):
        out.lines.append(f"{LATEST} {out.latest} has scored no date yet (dmafn score and backfill use it unless "
                         "given --model)")
    # dates no modality had input for, skipped as the spec asks (`score.missing_input: skip`): not problems
    skipped = runs.filter((pl.col("status") == SKIPPED) & ~pl.col("committed"))["date"].to_list()
    out.facts["skipped"] = skipped
    if skipped:
        out.lines.append(f"skipped for want of any input (score.missing_input: skip): {len(skipped)} date(s), "
                         f"{named_dates(skipped)}")
    handled = max([newest, *skipped])                   # a plant at rest: the nightly ran and skipped its dates
    _failed(runs, out, spec_path)
    _never_scored(runs, first, handled, out, spec_path)
    recent = runs.sort("date").tail(days)
    out.lines += ["", f"the {recent.height} newest date(s):", *_table(recent)]
    out.facts["recent"] = [{k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}
                           for row in recent.iter_rows(named=True)]
    for row in recent.filter(pl.col("status") == "succeeded").iter_rows(named=True):
        by_modality = {c[len(MODALITY_SHARE):]: v for c, v in row.items()
                       if c.startswith(MODALITY_SHARE) and v is not None}
        share = row["above_validation_median"]
        if line := unlike_validation_line(row["date"], row["model_version"], share, by_modality):
            out.problems.append(line)
    _unseen(recent, out, spec_path)
    _unmet(recent, out, spec_path)
    _new_payload_formats(recent, out, spec)
    _changed_intervals(recent, out, spec)
    _misplaced(recent, out, spec, spec_path)
    _unusable(recent, out, spec, spec_path)
    _unreadable(recent, out, spec)
    _absent(recent, out, spec_path)
    _changed(recent, out, spec, storage, spec_path, handled)
    if max_age_days is not None and dt.date.fromisoformat(handled) < today - dt.timedelta(days=max_age_days):
        out.problems.append(f"the newest scored date is {newest}, {(today - dt.date.fromisoformat(newest)).days} "
                            f"days before {today} (at most {max_age_days} allowed): is the nightly job running?")
    return out


def _versions(spec: Spec, storage: Storage, out: ScoringStatus, spec_path: str) -> None:
    registry = Registry(spec.registry, storage)
    versions = registry.versions()
    out.facts.update(versions=len(versions), latest=None, scored={"dates": 0}, recent=[])
    try:
        latest = registry.latest() if versions else None
    except DataError:
        latest = None
    if latest is None:
        out.lines.append(f"model versions: {len(versions)} in {spec.registry}, none named {LATEST}")
        todo = (f"promote one: dmafn promote {spec_path} {versions[-1]} (the newest)" if versions
                else f"run dmafn train {spec_path}")
        out.problems.append(f"no model version named in {join(spec.registry, LATEST)}: {todo}")
        return
    fact = version_facts(spec, storage, [latest])[latest]
    if isinstance(fact, str):
        out.lines.append(f"model versions: {len(versions)} in {spec.registry}; {LATEST} {latest}")
        out.problems.append(f"{LATEST} names {latest}, whose manifest cannot be read: {fact}")
        return

    def span(d: list[str]) -> str:
        return "-" if not d else d[0] if d[0] == d[-1] else f"{d[0]} .. {d[-1]}"

    created = fact["created_at"]
    if created:                                     # to the minute, in UTC
        created = dt.datetime.fromisoformat(created).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    out.latest = latest
    out.facts["latest"] = {"version": latest, **fact}
    rate = fact["expected_alarm_rate"]
    warnings = fact["warnings"]
    enrolled = f", {fact['enrolled']} enrolled since {fact['enrolled_into']} was trained" \
        if fact.get("enrolled") else ""
    entities = "" if fact["entities"] is None else f" ({fact['entities']} entities{enrolled})"
    out.lines.append(f"model versions: {len(versions)} in {spec.registry}; {LATEST} {latest} (created "
                     f"{created or '-'}; trained on {span(fact['train_days'])}{entities}, validated on "
                     f"{span(fact['validation_days'])}; expected alarm rate "
                     f"{'-' if rate is None else f'{rate:.2%}'}; "
                     f"{'warnings not kept' if warnings is None else f'{len(warnings)} training warning(s)'})")
    edits = fact.get("spec_edits")
    if edits:
        out.lines.append(f"spec edits {LATEST} does not read (they take effect with a version trained on the spec"
                         + ("; the threshold's and the smoothing's also with dmafn recalibrate"
                            if any(map(is_calibration_edit, edits)) else "") + "): " + "; ".join(edits))
    # versions saved after LATEST that it does not name: candidates (train --no-promote) or rolled back from
    out.facts["newer_than_latest"] = newer = [v for v in versions if v > latest]
    if newer:
        out.lines.append(f"saved after {LATEST} and not named by it: {named_dates(newer)} (candidates not promoted, or "
                         f"versions rolled back from; dmafn promote {spec_path} VERSION names one)")


def _latest_runs(spec: Spec, storage: Storage) -> pl.DataFrame | None:
    """The runs table's newest row per date (by when it finished) and whether any run of the date succeeded
    (`committed`: its rows are in the output, even if a later re-run failed), or None when the table does not
    exist yet."""
    path = spec.score.runs_path
    uri, options = storage.delta_uri(path), storage.delta_options(path)
    try:
        if read_table(uri, options) is None:
            return None
        runs = scan_table(uri, options).collect()
    except Exception as exc:  # noqa: BLE001 - any reader failure: say which table
        raise DataError(f"{path}: cannot be read ({exc})") from None
    missing = [c for c in ("date", "status", "model_version", "finished_at") if c not in runs.columns]
    if missing:
        raise DataError(f"{path}: not a runs table of dmafn's (no column {', '.join(missing)})")
    wanted = ["date", "status", "model_version", "ticks_in", "rows_scored", "rows_quarantined",
              "input_rows_quarantined", "input_rows", "input_rows_misplaced", UNUSABLE_REASONS, "anomalies",
              "alarm_rate", "expected_alarm_rate", "above_validation_median",
              "entities", "unseen_entities", "unseen_entity_alarm_rate", UNSEEN_RESPELLED, UNMET_KEYS,
              NEW_PAYLOAD_FORMATS, CHANGED_INTERVALS, KEYS_WITHOUT_MODALITY, "error", "finished_at"]
    runs = runs.with_columns(pl.lit(None).alias(c) for c in wanted if c not in runs.columns)  # older tables: null
    per_modality = (MODALITY_SHARE, USABLE_ROWS, PRESENT_SHARE, ENTITIES_WITHOUT)     # its columns' prefixes
    by_modality = sorted(c for c in runs.columns if c.startswith(per_modality))
    runs = runs.filter(pl.col("status") != RELISTED)           # a new listing of the same rows: not a run of its own
    return (runs.select(wanted + by_modality).sort("finished_at").group_by("date", maintain_order=True)
            .agg(pl.all().last(), (pl.col("status") == "succeeded").any().alias("committed")).sort("date"))


def _failed(runs: pl.DataFrame, out: ScoringStatus, spec_path: str) -> None:
    latest_failed = runs.filter(~pl.col("status").is_in(["succeeded", SKIPPED]))
    never = latest_failed.filter(~pl.col("committed"))
    for (error,), group in never.group_by("error", maintain_order=True):     # the same cause: one line
        days = group["date"].to_list()
        out.problems.append(f"{len(days)} date(s) whose runs all failed: {named_dates(days)}{_because(error)} - mend "
                            f"it, then run dmafn backfill {spec_path} --start {days[0]} --end {days[-1]} (dates "
                            "scored since are skipped)")
    for row in latest_failed.filter(pl.col("committed")).iter_rows(named=True):
        out.problems.append(f"{row['date']}: its latest run failed{_because(row['error'])}; the output holds an "
                            f"earlier run's rows - mend it, then run dmafn score {spec_path} --date {row['date']} "
                            "again (scoring a date replaces it)")


def _unseen(recent: pl.DataFrame, out: ScoringStatus, spec_path: str) -> None:
    """A problem when recent dates scored by LATEST scored entities that LATEST has no statistics of their own for
    (`pipelines.score.unseen_entities_warning`): machines new since its training days. Dates scored by an older
    version are not named: a newer version may hold them (its runs say)."""
    hit = recent.filter((pl.col("status") == "succeeded") & (pl.col("model_version") == out.latest)
                        & (pl.col("unseen_entities") > 0))
    if not hit.height:
        return
    most, rate = hit["unseen_entities"].max(), hit["unseen_entity_alarm_rate"].mean()
    alarms = "" if rate is None else f"; their alarm rate {rate:.1%}"
    first, last = hit["date"].min(), hit["date"].max()      # days that hold them: where enrolment can fit them
    respelled = hit[UNSEEN_RESPELLED].max()
    if respelled:       # not new machines: keys a source writes otherwise than the version was trained on
        out.problems.append(f"entities not in {LATEST} {out.latest}'s training data (up to {most} a date, up to "
                            f"{respelled} of them spelled like a trained entity but for case, spaces, separators or "
                            f"padding zeros) on {hit.height} recent date(s): {named_dates(hit['date'].to_list())}"
                            f"{alarms} - has a source changed how it writes its keys (dmafn score names them)? Write "
                            f"them as trained at the source, then rescore (dmafn backfill {spec_path} --start {first} "
                            f"--end {last})" + ("; enrol the others (dmafn enroll)" if (
                                hit["unseen_entities"] > hit[UNSEEN_RESPELLED].fill_null(0)).any() else ""))
        return
    out.problems.append(f"entities not in {LATEST} {out.latest}'s training data (up to {most} a date) were scored by "
                        f"the fleet's statistics on {hit.height} recent date(s): {named_dates(hit['date'].to_list())}"
                        f"{alarms} - enrol them (dmafn enroll {spec_path} --start {first} --end {last}: days that "
                        f"hold them, normal for them) or train a version on such days, then rescore with it (dmafn "
                        f"backfill {spec_path} --start {first} --end {last})")


def _new_payload_formats(recent: pl.DataFrame, out: ScoringStatus, spec: Spec) -> None:
    """A problem per image or audio modality when recent dates had more than `NEW_FORMAT_SHARE` of its usable
    payloads of a format their version's training payloads (almost) never had - a frame's size, a clip's sample rate
    (`pipelines.score.new_payload_formats_lines`; the runs table's `new_payload_formats` beside `usable_rows_<m>`): a
    camera or microphone replaced or reconfigured."""
    hit: dict[str, list[tuple[str, int, int, dict[str, int]]]] = {}
    for row in recent.filter((pl.col("status") == "succeeded") & pl.col(NEW_PAYLOAD_FORMATS).is_not_null()).iter_rows(
            named=True):
        for m, new in json.loads(row[NEW_PAYLOAD_FORMATS]).items():
            held, count = row.get(f"{USABLE_ROWS}{m}") or 0, sum(new.values())
            if held and count > NEW_FORMAT_SHARE * held:
                hit.setdefault(m, []).append((row["date"], count, held, new))
    for m, dates in sorted(hit.items()):
        day, count, held, new = dates[-1]
        kind = spec.modalities[m].kind if m in spec.modalities else "image"
        things, of_format, device, _ = PAYLOAD_WORDS.get(kind, PAYLOAD_WORDS["image"])
        found = ", ".join(sorted(new, key=lambda f: -new[f]))
        out.problems.append(f"modality '{m}': {things} {of_format} their version's training {things} (almost) never "
                            f"had on {len(dates)} recent date(s): {named_dates([d[0] for d in dates])} - on {day} "
                            f"{count} of {held} ({count / held:.0%}; {found}): a {device} replaced or reconfigured? "
                            f"Restore its setting, or train a version on days with such {things}")


def _changed_intervals(recent: pl.DataFrame, out: ScoringStatus, spec: Spec) -> None:
    """A problem per non-text modality when recent dates had entities whose rows came at another
    interval than on every training day of their version (`pipelines.score.changed_intervals_lines`; the runs
    table's `changed_row_intervals`): a sensor sampled at another rate, a source writing more or fewer rows."""
    hit: dict[str, list[tuple[str, dict]]] = {}
    for row in recent.filter((pl.col("status") == "succeeded") & pl.col(CHANGED_INTERVALS).is_not_null()).iter_rows(
            named=True):
        for m, found in json.loads(row[CHANGED_INTERVALS]).items():
            hit.setdefault(m, []).append((row["date"], found))
    for m, dates in sorted(hit.items()):
        day, found = dates[-1]
        kind = spec.modalities[m].kind if m in spec.modalities else "timeseries"
        things, device, _ = INTERVAL_WORDS.get(kind, INTERVAL_WORDS["timeseries"])
        named = changed_entities(found)
        out.problems.append(f"modality '{m}': {things} at another interval than on their version's training days on "
                            f"{len(dates)} recent date(s): {named_dates([d for d, _ in dates])} - on {day} "
                            f"{found['changed']} of {found['compared']} entities ({named}): a {device} reconfigured, "
                            f"or rows thinned or batched on their way? Restore its rate, or train a version on days "
                            f"with such {things}")


def _unmet(recent: pl.DataFrame, out: ScoringStatus, spec_path: str) -> None:
    """A problem when recent dates' entity keys differ only in case, spaces, separators or padding zeros with
    different modalities, or a modality's keys meet no other's (`entity_keys.unmet_entity_lines` over their scored
    ticks, the runs table's `unmet_keys`): those modalities were never read together."""
    hit = recent.filter((pl.col("status") == "succeeded") & pl.col(UNMET_KEYS).is_not_null())
    if not hit.height:
        return
    days = hit["date"].to_list()
    newest = json.loads(hit[UNMET_KEYS][-1])
    out.problems.append(f"entity keys whose modalities never meet on {len(days)} recent date(s): {named_dates(days)} "
                        f"- on {days[-1]}: {newest[0]}" + (f" (and {len(newest) - 1} more warning(s))"
                                                           if len(newest) > 1 else "")
                        + f"; then rescore (dmafn backfill {spec_path} --start {days[0]} --end {days[-1]})")


def _misplaced(recent: pl.DataFrame, out: ScoringStatus, spec: Spec, spec_path: str) -> None:
    """A problem when recent dates had more than `MISPLACED_SHARE` of their input rows timed outside their date
    partition (`pipelines.score.misplaced_rows_warning`): quarantined, never scored - a lake filed by another
    calendar than the spec's `timezone`, or by arrival later than its `lateness` allows."""
    share = pl.col("input_rows_misplaced") / pl.col("input_rows")
    hit = recent.filter((pl.col("status") == "succeeded") & (pl.col("input_rows") > 0)
                        & (share > MISPLACED_SHARE)).with_columns(share.alias("_share"))
    if not hit.height:
        return
    first, last = hit["date"].min(), hit["date"].max()
    out.problems.append(f"{hit.height} recent date(s) had over {MISPLACED_SHARE:.0%} of their input rows timed outside "
                        f"their date partition (up to {hit['_share'].max():.1%}; quarantined, not scored): "
                        f"{named_dates(hit['date'].to_list())} - misfiled rows, or a lake filed by another calendar "
                        f"than the spec's timezone ({spec.timezone}) or by arrival later than its lateness allows "
                        f"({format_duration(spec.lateness_us) if spec.lateness_us else 'none'}): set `timezone` or "
                        f"`lateness` in {spec_path}, then rescore (dmafn backfill {spec_path} --start {first} --end "
                        f"{last} --force)")


def _unusable(recent: pl.DataFrame, out: ScoringStatus, spec: Spec, spec_path: str) -> None:
    """A problem when recent dates had more than `UNUSABLE_SHARE` of their input rows unusable for another reason
    than their partition (`pipelines.score.unusable_rows_warning`): quarantined, scored from the rest - with the
    reasons that took most over those dates (runs before the runs table kept reasons: their count alone)."""
    unusable = pl.col("input_rows_quarantined") - pl.col("input_rows_misplaced").fill_null(0)
    hit = recent.filter((pl.col("status") == "succeeded") & (pl.col("input_rows") > 0)
                        & (unusable > UNUSABLE_SHARE * pl.col("input_rows"))).with_columns(
        (unusable / pl.col("input_rows")).alias("_share"))
    if not hit.height:
        return
    reasons = summed_counts([json.loads(kept) for kept in hit[UNUSABLE_REASONS].drop_nulls().to_list()])
    first, last = hit["date"].min(), hit["date"].max()
    why = f" - most: {named_reasons(reasons)}{time_text_hint(reasons, spec_path)}" if reasons else ""
    out.problems.append(f"{hit.height} recent date(s) had over {UNUSABLE_SHARE:.0%} of their input rows unusable "
                        f"(up to {hit['_share'].max():.1%}; quarantined in {spec.score.quarantine_path}, the dates "
                        f"scored from the rest): {named_dates(hit['date'].to_list())}{why}; mend the source, then "
                        f"rescore (dmafn backfill {spec_path} --start {first} --end {last} --force)")


def _unreadable(recent: pl.DataFrame, out: ScoringStatus, spec: Spec) -> None:
    """A problem when recent dates were scored without input files whose bytes are no Parquet, or without row groups
    whose pages do not decode, left out by `unreadable_files: skip` (`pipelines.score.unreadable_files_warning`):
    the dates, how many files and how many rows of damaged row groups."""
    reasons = {row["date"]: json.loads(row[UNUSABLE_REASONS]) for row in recent.filter(
        pl.col("status") == "succeeded").iter_rows(named=True) if row.get(UNUSABLE_REASONS)}
    left = {date: counts for date, why in reasons.items() if (counts := left_out_counts(why))}
    if not left:
        return
    hit, counts = sorted(left), summed_counts(list(left.values()))
    words = {UNREADABLE: "input file(s) that could not be read as Parquet",
             DAMAGED: "input row(s) of row groups whose pages do not decode",
             DAMAGED_AROUND: "row group(s) of days read around them whose pages do not decode",
             DAMAGED_ELSEWHERE: "row group(s) of files spanning several dates (counted under another) whose pages do "
                                "not decode"}
    said = [f"{counts[kind]} {words[kind]}" for kind in LEFT_OUT_KINDS if kind in counts]
    out.problems.append(f"{len(hit)} recent date(s) were scored without {' and '.join(said)} (unreadable_files: "
                        f"skip): {named_dates(hit)} - each named in the quarantine table "
                        f"({spec.score.quarantine_path}); once mended, a backfill over the dates rescores them")


def _absent(recent: pl.DataFrame, out: ScoringStatus, spec_path: str) -> None:
    """Problems for modalities that went dark, each modality on its own: dates it had no usable row on
    (`_dark_dates`), a newest date with part of its day missing (`_share_drop`), and more machines without it on the
    newest date than before (`_dark_entities`)."""
    done = recent.filter((pl.col("status") == "succeeded") & (pl.col("rows_scored") > 0))
    for rows in sorted(c for c in done.columns if c.startswith(USABLE_ROWS)):
        m = rows[len(USABLE_ROWS):]
        _dark_dates(done, m, out, spec_path)
        if f"{ENTITIES_WITHOUT}{m}" in done.columns and f"{PRESENT_SHARE}{m}" in done.columns:
            with_rows = done.filter(pl.col(rows) > 0)          # a dark date is named above, and not compared
            _share_drop(with_rows, m, out, spec_path)
            _dark_entities(with_rows, m, out)


def _dark_dates(done: pl.DataFrame, m: str, out: ScoringStatus, spec_path: str) -> None:
    """A problem when modality `m` had no usable row in the partitions of recent dates whose ticks were scored
    (`pipelines.score.absent_modality_warning`): they were scored without it."""
    gone = done.filter(pl.col(f"{USABLE_ROWS}{m}") == 0)["date"].to_list()
    if gone:
        out.problems.append(f"modality '{m}' had no usable input row in the partitions of {len(gone)} recent "
                            f"date(s): {named_dates(gone)} - they were scored without it (its partition missing or "
                            "empty, its path moved, or every row quarantined): check its input (dmafn validate "
                            f"{spec_path} --check-data, the quarantine table); once its files are there, dmafn "
                            f"backfill {spec_path} --start {gone[0]} --end {gone[-1]} rescores them")


def _share_drop(done: pl.DataFrame, m: str, out: ScoringStatus, spec_path: str) -> None:
    """A problem when modality `m` was present at `PRESENT_DROP` less of the newest date's scored ticks than the
    median of the recent dates before: part of its day missing."""
    share = f"{PRESENT_SHARE}{m}"
    shares = done.filter(pl.col(share).is_not_null())
    if shares.height < 2:
        return
    newest, usual = shares.row(-1, named=True), shares.head(shares.height - 1)[share].median()
    if newest[share] < usual - PRESENT_DROP:
        out.problems.append(f"modality '{m}' was present at {newest[share]:.0%} of {newest['date']}'s scored ticks "
                            f"against {usual:.0%} on the {shares.height - 1} recent date(s) before (median) - part of "
                            "its rows missing: an upload that stopped or started late, a gap upstream; once they are "
                            f"there, dmafn backfill {spec_path} --start {newest['date']} --end {newest['date']} "
                            "rescores the date")


def _dark_entities(done: pl.DataFrame, m: str, out: ScoringStatus) -> None:
    """A problem when modality `m` was absent at every scored tick of more of the newest date's entities than on the
    recent date before with the fewest (a sensor, camera or log shipper that stopped; machines that never have it
    count alike on every date and are not named)."""
    without = f"{ENTITIES_WITHOUT}{m}"
    counted = done.filter(pl.col(without).is_not_null())
    if counted.height < 2:
        return
    newest, fewest = counted.row(-1, named=True), counted.head(counted.height - 1).sort(without).row(0, named=True)
    if newest[without] > fewest[without]:
        named = json.loads(newest[KEYS_WITHOUT_MODALITY] or "{}").get(m, [])
        out.problems.append(f"modality '{m}' was absent at every scored tick of {newest[without]} entit"
                            f"{'y' if newest[without] == 1 else 'ies'} on {newest['date']} against {fewest[without]} "
                            f"on {fewest['date']}" + (f" (among them {', '.join(named)})" if named else "")
                            + " - a sensor, camera or log shipper of theirs stopped, or its rows stopped reaching the "
                            "lake: their ticks were scored without it (the output's `modalities` column says which "
                            "ticks had it)")


def _changed(recent: pl.DataFrame, out: ScoringStatus, spec: Spec, storage: Storage, spec_path: str,
             handled: str) -> None:
    """A problem when recent dates' partitions changed since the run that scored (or skipped) them listed them
    (`pipelines.score.changed_inputs`: files added, removed or rewritten - a late upload, a re-delivered partition):
    their output was scored without what is there now. One listing of those dates' partitions."""
    dates = recent.filter(pl.col("committed") | (pl.col("status") == SKIPPED))["date"].to_list()
    try:
        changed = changed_inputs(spec, storage, dates)
    except DataError as exc:
        out.lines.append(f"recent dates' input not compared with what their runs listed: {exc}")
        return
    out.facts["changed_input"] = [{"date": c.date, "modalities": c.modalities, "files_then": c.files_then,
                                   "files_now": c.files_now} for c in changed]
    if not changed:
        return
    first = changed[0].date          # and the dates whose first ticks read the last one, up to the newest handled
    last = min(dt.date.fromisoformat(changed[-1].date) + dt.timedelta(days=spec.lookback_days),
               dt.date.fromisoformat(handled)).isoformat()
    out.problems.append(f"{len(changed)} recent date(s) whose partitions changed since they were scored: "
                        f"{changed_inputs_line(changed)} - "
                        "their output was scored without what is there now (files uploaded late, a partition "
                        "re-delivered or rewritten, rows of a Delta table deleted in place): run dmafn backfill "
                        f"{spec_path} --start {first} --end {last} "
                        "(it rescores the dates whose partitions changed and those whose first ticks read them; a "
                        "date whose files were rewritten with the rows it was scored from - a compaction - it leaves "
                        "as scored and records as such)")


def _because(error: str | None) -> str:
    """The runs table's error of a failed date, its first line (runs recorded before errors were kept: none)."""
    return "" if not error else f" ({error.strip().splitlines()[0]})"


def _never_scored(runs: pl.DataFrame, first: str, newest: str, out: ScoringStatus, spec_path: str) -> None:
    start, end = dt.date.fromisoformat(first), dt.date.fromisoformat(newest)
    seen = set(runs["date"].to_list())
    missing = [d.isoformat() for d in (start + dt.timedelta(days=i) for i in range((end - start).days + 1))
               if d.isoformat() not in seen]
    if missing:
        out.problems.append(f"{len(missing)} date(s) never scored between {first} and {newest}: {named_dates(missing)} "
                            f"- run dmafn backfill {spec_path} --start {missing[0]} --end {missing[-1]}")


def _table(runs: pl.DataFrame) -> list[str]:
    head = ["date", "status", "model version", "ticks in", "scored", "quarantined", "input rows quarantined",
            "alarms", "alarm rate", "expected", "above val. median", "entities", "unseen entities"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2%}"

    def count(v: int | None) -> str:
        return "-" if v is None else str(v)

    rows = [[r["date"], r["status"], r["model_version"], count(r["ticks_in"]), count(r["rows_scored"]),
             count(r["rows_quarantined"]), count(r["input_rows_quarantined"]), count(r["anomalies"]),
             pct(r["alarm_rate"]), pct(r["expected_alarm_rate"]),
             "-" if r["above_validation_median"] is None else f"{r['above_validation_median']:.0%}",
             count(r["entities"]), count(r["unseen_entities"])]
            for r in runs.iter_rows(named=True)]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *rows]]
