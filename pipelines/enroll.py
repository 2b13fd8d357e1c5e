"""Enrolment: machines new to a model version get statistics of their own without a new training.

A model version keeps, per entity it was trained on, the parts of its statistics that are the entity's own (the
operating levels its errors are measured against, its relations' intercepts and ranges; its normalisation
moments with `model.normalization: entity`). An entity that joined the fleet later scores by the fleet's parts,
and a machine that runs hotter or at another pressure than the fleet's average then alarms far more often
(`dmafn score` names such entities, `dmafn status` lists the dates). `enroll` fits the entities' own parts over
days that hold them, under the version's fleet part (its transforms, its relations' weights: the same pass as
training's statistics, `pipelines.train.fit_statistics(under=)`), and saves a new version: the same weights,
fleet part and calibration, with the new entities' rows added to the entity file. The entities the version
already holds keep their parts, so their scores do not move.

    days D1..D2 -> shards -> statistics per shard (Ray tasks), per entity bucket under the version's fleet part
    (a task each) -> the rows of entities the version does not hold -> new version (LATEST)
"""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from dmafn.features import entity_places
from dmafn.spec import Spec
from pipelines.ingest import TRAINED_INTERVALS, entity_casts, require_columns
from pipelines.registry import Registry
from pipelines.score import reading_spec
from pipelines.shards import list_inputs, plan_shards, require_data
from pipelines.staging import Staging
from pipelines.statistics import EntityStatistics, entity_rows, keys_sliceable
from pipelines.storage import DataError, Storage
from pipelines.train import fit_statistics, known_incidents, left_out_files

NAMED = 10          # at most: the enrolled entities' keys kept in the manifest and printed


@dataclass
class Enrolment:
    """What `enroll` did: the version it read, the one it saved (None when no entity was new to it), the new
    entities' count and first `NAMED` keys, and the entities of the days the version held already."""

    from_version: str
    version: str | None
    entities: int
    named: list[str]
    already_held: int
    input_quarantine: dict[str, int]
    promoted: bool = False         # LATEST names the saved version


def enroll(spec: Spec, start: dt.date, end: dt.date, *, version: str | None = None, promote: bool = True) -> Enrolment:
    """Fit the statistics of the entities in `start`..`end` that model version `version` (default LATEST) holds
    no parts of, and save them with the version's weights and calibration as a new version (LATEST, unless not
    `promote`: a candidate, see `Registry.promote`). The data is read where `spec` says it lives now, with the
    version's modalities and windows (`reading_spec`); the ticks in a labelled incident are left out as training
    leaves them out (`train.exclude_labelled`)."""
    if end < start:
        raise DataError(f"--end {end} is before --start {start}")
    storage = Storage.from_spec(spec.storage)
    registry = Registry(spec.registry, storage)
    mv = registry.load(version, build=False)           # checked against its checksums; built only to be saved
    held = set(mv.statistics.keys())
    if not entity_places(mv.statistics.fleet):
        raise DataError(f"model version {mv.version} keeps no statistics per entity (none of its modalities is tabular "
                        "or a series, and it has no relations): every entity scores by the same statistics, so there "
                        "is nothing to enrol")
    rspec = replace(reading_spec(mv, spec), labels=spec.labels)
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    files = list_inputs(rspec, days, storage)
    require_data(rspec, files, days, storage)
    schemas = require_columns(rspec, storage, files)
    shards = plan_shards(rspec, days, files, min_shards=4 * rspec.train.workers, key_casts=entity_casts(rspec, schemas))
    staging = Staging(rspec, storage, shards, days, uuid.uuid4().hex[:12])
    try:
        shards = staging.resolve(shards)
        fitted, quarantined, intervals = fit_statistics(rspec, shards, keys_sliceable(rspec, schemas),
                                                        known_incidents(rspec, storage), under=mv.statistics.fleet)
        quarantined = left_out_files(quarantined, f"enrolment days {days[0]}..{days[-1]}")
    finally:
        staging.close()
    rows = fitted.table()
    new = rows.filter(pc.invert(pc.is_in(rows.column("key"), pa.array(sorted(held), pa.string()))))
    keys = new.column("key").to_pylist()
    enrolment = Enrolment(mv.version, None, len(keys), keys[:NAMED], rows.num_rows - len(keys), quarantined)
    if not keys:
        return enrolment
    manifest = mv.manifest_to_save_again()
    manifest["enrolled"] = [*mv.manifest.get("enrolled", []), {
        "from_version": mv.version, "days": [start.isoformat(), end.isoformat()], "entities": len(keys),
        "named": keys[:NAMED], "input_quarantine": quarantined,
        "at": dt.datetime.now(dt.timezone.utc).isoformat()}]
    if TRAINED_INTERVALS in manifest:   # the new entities' row intervals, compared at scoring as the trained ones'
        manifest[TRAINED_INTERVALS] = with_entities(manifest[TRAINED_INTERVALS], intervals, set(keys))
    statistics = EntityStatistics(mv.statistics.fleet, rows=entity_rows([mv.statistics.table(), new]))
    enrolment.version = registry.save(mv.model, manifest, statistics, promote=promote)
    enrolment.promoted = promote
    return enrolment


def with_entities(held: dict[str, dict[str, dict]], fitted: dict[str, dict[str, dict]],
                  keys: set[str]) -> dict[str, dict[str, dict]]:
    """A version's per-modality, per-entity counts (`input_row_intervals`) with those of `fitted` for the entities
    `keys` names added (the entities it held keep theirs)."""
    out = {m: dict(entities) for m, entities in held.items()}
    for m, entities in fitted.items():
        out.setdefault(m, {}).update((e, counts) for e, counts in entities.items() if e in keys)
    return out


def enrolment_lines(enrolment: Enrolment, start: dt.date, end: dt.date) -> list[str]:
    """What `dmafn enroll` prints."""
    if enrolment.version is None:
        return [f"no entity of {start}..{end} is new to model version {enrolment.from_version} "
                f"({enrolment.already_held} held already): nothing saved"]
    more = enrolment.entities - len(enrolment.named)
    names = ", ".join(enrolment.named) + (f" and {more} more" if more else "")
    lines = [f"model version {enrolment.version}: model version {enrolment.from_version} with {enrolment.entities} "
             f"{'entity' if enrolment.entities == 1 else 'entities'} enrolled from {start}..{end} ({names}); its "
             f"weights, fleet statistics and calibration are {enrolment.from_version}'s, and the "
             f"{enrolment.already_held} entities of those days it held keep their statistics. "
             + (f"LATEST -> {enrolment.version}" if enrolment.promoted else
                f"Not promoted: LATEST is unchanged (dmafn promote SPEC {enrolment.version})"),
             "rescore the dates they were scored on by the fleet's statistics: dmafn backfill SPEC --start D1 "
             "--end D2 (dates scored by another version are rescored)"]
    if enrolment.input_quarantine:
        lines.append("input rows quarantined (not used): " + ", ".join(
            f"{name} {n}" for name, n in sorted(enrolment.input_quarantine.items())))
    return lines
