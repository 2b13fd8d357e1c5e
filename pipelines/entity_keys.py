"""Entity keys as the jobs compare them across modalities: which modalities each key had present at its ticks (as
bits), keys spelled alike but for case, spaces, separators or padding zeros (`key_shape`), and the warnings when a
fleet's tables key their machines differently - a tick joins an entity's modalities by its exact key, so such
machines' modalities are never read together. Training warns of them over its training ticks (each feature task's
`entity_modalities`), scoring over each date's scored ticks (`scored_entity_modalities`) and of entities new to a
version that are spelled like one it was trained on (`respelled_keys`), and of labelled incidents in the training
window whose entity has no training tick (`unmatched_label_lines`). Plain Polars, no Ray."""
from __future__ import annotations

import re

import polars as pl

from dmafn.spec import Spec, voting_modalities
from pipelines.ingest import entity_string


def entity_modalities(aligned: pl.DataFrame, spec: Spec) -> dict[str, int]:
    """Per entity key of `aligned` (`ingest.entity_string`), which of the modalities with a table of their own it
    has present at any of its ticks, as bits (bit i: the i-th of `voting_modalities`)."""
    own = list(voting_modalities(spec.modalities))
    bits = sum((pl.col(f"{m}__present").fill_null(False).any().cast(pl.Int64) * (1 << i) for i, m in enumerate(own)),
               pl.lit(0, pl.Int64))
    per_entity = aligned.group_by(entity_string(spec.entity).alias("_entity")).agg(bits.alias("_bits"))
    return dict(per_entity.iter_rows())


def merge_entity_modalities(into: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """`into` with each entity's modalities of `more` added (bitwise or)."""
    for key, bits in more.items():
        into[key] = into.get(key, 0) | bits
    return into


SEPARATORS = re.compile(r"[\s\-_./:]+")     # what `unmet_entity_lines` ignores in keys (not | between keys)
LEADING_ZEROS = re.compile(r"(?<!\d)0+(?=\d)")   # and the zeros a number is padded with: pump-01 as pump-1


def key_shape(key: str) -> str:
    """An entity key as `unmet_entity_lines` compares keys: case, spaces, separators and padding zeros left out."""
    return LEADING_ZEROS.sub("", SEPARATORS.sub("", key).casefold())


def unmet_entity_lines(spec: Spec, seen: dict[str, int], where: str, examples: int = 3, *,
                       lone_when_others: bool = False) -> list[str]:
    """Warnings when the entity keys of the modalities do not meet (`seen`: per entity key the modalities present at
    any of its `where` ticks, `entity_modalities`): keys that differ only in case, spaces, separators or padding zeros
    (`key_shape`) present with different modalities (`PUMP-01` in the camera's table, `pump-01` in the others' - a
    tick joins modalities by the exact key, so such a machine's modalities are never read together), and a modality
    none of whose entities has another modality at any tick (its keys name the machines otherwise) - with
    `lone_when_others` only where other entities have other modalities (a scored date on which the other tables
    held nothing is no sign of keys that differ: `absent_modality_warning` says so)."""
    own = list(voting_modalities(spec.modalities))
    if len(own) < 2 or not seen:
        return []
    named = lambda bits: ", ".join(m for i, m in enumerate(own) if bits >> i & 1)     # noqa: E731
    lines, groups = [], {}
    for key in sorted(seen):
        groups.setdefault(key_shape(key), []).append(key)
    apart = [keys for keys in groups.values() if len(keys) > 1 and len({seen[k] for k in keys}) > 1]
    if apart:
        shown = "; ".join(" and ".join(f"'{k}' ({named(seen[k])})" for k in keys) for keys in apart[:examples])
        lines.append(f"entity keys that differ only in case, spaces, separators or padding zeros are present with "
                     f"different modalities at the {where}, so those modalities are never read together: {shown}"
                     + (f"; and {len(apart) - examples} more such group(s)" if len(apart) > examples else "")
                     + " - a tick joins an entity's modalities by its exact key: write each machine's key alike in "
                     "every table")
    for i, m in enumerate(own):
        mine = [k for k, bits in seen.items() if bits >> i & 1]
        if mine and not any(seen[k] & ~(1 << i) for k in mine):
            others = sorted(k for k, bits in seen.items() if not bits >> i & 1)
            if lone_when_others and not others:
                continue
            lines.append(f"modality '{m}': none of its {len(mine)} entities has another modality present at any of "
                         f"the {where} (its keys: {', '.join(repr(k) for k in sorted(mine)[:examples])}"
                         + (", ..." if len(mine) > examples else "")
                         + (f"; the other modalities': {', '.join(repr(k) for k in others[:examples])}"
                            + (", ...)" if len(others) > examples else ")") if others else ")")
                         + " - the model never reads it with the others: do its keys name the machines otherwise?")
    return lines


def scored_entity_modalities(per_entity: pl.DataFrame, keys: list[str], modalities: list[str]) -> dict[str, int]:
    """Per entity key (`keys`, in `per_entity`'s row order: `pipelines.score_steps.entity_alarms`' rows with their
    `_has_<m>` columns) the `modalities` (`voting_modalities`' order) present at any of its scored ticks, as bits -
    `entity_modalities` of a scored date."""
    bits = sum((pl.col(f"_has_{m}").cast(pl.Int64) * (1 << i) for i, m in enumerate(modalities)), pl.lit(0, pl.Int64))
    return dict(zip(keys, per_entity.select(bits.alias("_bits"))["_bits"].to_list()))


def respelled_keys(keys: list[str], known: set[str]) -> list[tuple[str, str]]:
    """Of entity `keys` not in `known` (a version's trained entities), each spelled like a known key but for case,
    spaces, separators or padding zeros (`key_shape`), with that key: a source that changed how it writes its keys
    (`PUMP_01` for `pump-01`) - its machines score as new ones and apart from their other tables' rows."""
    if not keys:
        return []
    shapes: dict[str, str] = {}
    for k in sorted(known):
        shapes.setdefault(key_shape(k), k)
    return [(k, shapes[key_shape(k)]) for k in keys if key_shape(k) in shapes]


def unmatched_label_lines(intervals: pl.DataFrame, spec: Spec, seen: dict[str, int], span_us: tuple[int, int],
                          where: str, path: str, examples: int = 3) -> list[str]:
    """A warning when labelled intervals (`align.label_intervals`: the entity columns, `_s`, `_e`) overlapping
    `span_us` ([start, end) microseconds) name an entity with no tick among `seen` (the entity keys of the `where`
    ticks, `entity_modalities`): training leaves a known incident out (or, for a classifier, labels its ticks) by its
    entity's exact key, so where the input spells the machine otherwise (`PUMP-01` for `pump-01`) the incident is
    trained on as normal, without a word -
    the keys named, and the training key each is spelled like but for case, spaces, separators or padding zeros
    (`key_shape`)."""
    lo, hi = span_us
    inside = intervals.filter((pl.col("_e") >= lo) & (pl.col("_s") < hi))
    if inside.is_empty():
        return []
    keys = inside.select(entity_string(spec.entity).alias("_entity"))["_entity"].to_list()
    missing = sorted({k for k in keys if k not in seen})
    if not missing:
        return []
    events = sum(k in missing for k in keys)
    like = dict(respelled_keys(missing, set(seen)))
    shown = ", ".join(repr(k) + (f" (the input has {like[k]!r})" if k in like else "") for k in missing[:examples])
    return [f"labels {path}: {events} labelled interval(s) in the {where} name an entity with no tick there: "
            f"{shown}" + (f"; and {len(missing) - examples} more" if len(missing) > examples else "")
            + " - a label reaches its ticks by the exact key, so an incident whose machine the input spells otherwise "
            "is trained on as normal: write the labels' keys as the input does"]
