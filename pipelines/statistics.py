"""A model's statistics split into the fleet's part and one part per entity, and their copies per entity bucket.

With a large fleet the per-entity parts (normalisation moments, relation intercepts and ranges) are most of the
statistics. A model version stores them one row per entity (`entity_file`, `pipelines.registry`);
`EntityStatistics` holds them as that file's Arrow table (or, for statistics in memory, as the split parts) and
makes Python objects of the entities asked for only; `BucketStatistics` puts one copy per entity bucket in the
object store, with that bucket's entities' parts, for the tasks that featurize a bucket's shards (training's
features and calibration, scoring).
"""
from __future__ import annotations

import io
import json
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dmafn.features import join_entity_statistics, split_entity_statistics
from dmafn.spec import Spec
from pipelines.parquet_files import each_schema, field_of
from pipelines.shards import Shard, bucket_of

if TYPE_CHECKING:
    import ray


class EntityStatistics:
    """Statistics as the fleet's part (`dmafn.features.split_entity_statistics`) and each entity's parts: in
    memory (`of`), or as an entity file's rows (`rows`), made Python objects only for the entities asked for."""

    def __init__(self, fleet: dict[str, Any], *, parts: dict[str, dict[str, Any]] | None = None,
                 rows: pa.Table | None = None, whole: dict[str, Any] | None = None) -> None:
        self.fleet, self._parts, self._rows, self._whole = fleet, parts, rows, whole

    @classmethod
    def of(cls, stats: dict[str, Any]) -> "EntityStatistics":
        """Whole statistics (as fitted, or as a manifest that holds every entity's parts), split; `whole` is
        `stats` itself."""
        fleet, parts = split_entity_statistics(stats)
        return cls(fleet, parts=parts, whole=stats)

    @cached_property
    def _row_of(self) -> dict[str, int]:
        return {key: row for row, key in enumerate(self._rows.column("key").to_pylist())}

    def keys(self) -> list[str]:
        """The keys of the entities with per-entity parts."""
        return list(self._parts if self._parts is not None else self._row_of)

    def for_keys(self, keys: Sequence[str]) -> dict[str, Any]:
        """The statistics with the per-entity parts of `keys` only (a key without any is left out: its entity
        scores by the fleet's parts, as one not seen in training)."""
        if self._parts is not None:
            return join_entity_statistics(self.fleet, ((k, self._parts[k]) for k in keys if k in self._parts))
        rows = sorted(self._row_of[k] for k in set(keys) if k in self._row_of)
        return join_entity_statistics(self.fleet, entity_parts(self._rows.take(pa.array(rows, pa.int64()))))

    def table(self) -> pa.Table:
        """Every entity's parts as an entity file's rows (`entity_table`)."""
        return self._rows if self._rows is not None else entity_table(self._parts)

    @property
    def whole(self) -> dict[str, Any]:
        """Every entity's parts joined to the fleet's (once)."""
        if self._whole is None:
            self._whole = self.for_keys(self.keys())
        return self._whole


class BucketStatistics:
    """Statistics in the object store, one copy per entity bucket holding only that bucket's entities' parts: with
    a fleet of 100,000 machines the per-entity parts are most of the statistics, and each task would otherwise
    receive them all; each key is hashed once per bucket count and each entity made Python objects once, for
    its bucket. Only where an entity key's text is the same whichever way it is written (`keys_sliceable`:
    `bucket_of` reads the key as Polars writes it, the statistics are keyed as Python writes it); else every
    bucket gets the whole statistics."""

    def __init__(self, statistics: EntityStatistics, keys_sliceable: bool) -> None:
        self.statistics, self.sliceable = statistics, keys_sliceable
        self._refs: dict[tuple[int, int], "ray.ObjectRef"] = {}
        self._members: dict[int, dict[int, list[str]]] = {}      # buckets -> bucket -> its entity keys

    def ref(self, shard: Shard) -> "ray.ObjectRef":
        """The statistics a shard's task needs, put in the object store once per bucket."""
        import ray

        key = (shard.bucket, shard.buckets) if self.sliceable and shard.buckets > 1 else (0, 1)
        if key not in self._refs:
            bucket, buckets = key
            if buckets == 1:
                self._refs[key] = ray.put(self.statistics.whole)
            else:
                if buckets not in self._members:
                    members: dict[int, list[str]] = {}
                    for entity in self.statistics.keys():
                        members.setdefault(bucket_of(entity, buckets), []).append(entity)
                    self._members[buckets] = members
                self._refs[key] = ray.put(self.statistics.for_keys(self._members[buckets].get(bucket, [])))
        return self._refs[key]


def keys_sliceable(spec: Spec, schemas: dict[str, pa.Schema | list[pa.Schema]]) -> bool:
    """Whether every modality's entity key columns are strings (plain or dictionary-encoded, as pandas and Polars
    write categorical columns) or integers (`BucketStatistics`)."""
    def plain(t: pa.DataType) -> bool:
        if pa.types.is_dictionary(t):
            return pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)

    return bool(schemas) and all(plain(field_of(schema, k).type) for name, held in schemas.items()
                                 for schema in each_schema(held) for k in spec.entity_in(spec.modalities[name])
                                 if field_of(schema, k) is not None)


_JSON_COLUMNS = b"dmafn.json_columns"     # the entity file's schema metadata: places stored as JSON text


def entity_table(entities: dict[str, dict[str, Any]]) -> pa.Table:
    """Per-entity statistics (`dmafn.features.split_entity_statistics`) as an entity file's rows: one row per entity
    key, sorted, one column per place (null where the entity has no part there), in Arrow's own types (numbers as
    float64, not text) wherever they come back exactly; a place whose values do not (mixed types, None) is kept as
    JSON text and named in the schema's metadata."""
    keys = sorted(entities)
    places = sorted({place for parts in entities.values() for place in parts})
    columns, as_json = {"key": pa.array(keys, pa.string())}, []
    for place in places:
        values = [entities[k].get(place) for k in keys]                  # None: the entity has no part there
        held_none = any(place in entities[k] and entities[k][place] is None for k in keys)
        typed = None if held_none else _typed_column(values)
        if typed is None:
            as_json.append(place)
            typed = pa.array([None if place not in entities[k] else _compact(entities[k][place]) for k in keys],
                             pa.string())
        columns[place] = typed
    return pa.table(columns).replace_schema_metadata({_JSON_COLUMNS: json.dumps(as_json).encode()})


def entity_rows(tables: Sequence[pa.Table]) -> pa.Table:
    """Entity tables of disjoint entities (`entity_table`, e.g. one per entity bucket) as one, sorted by key: a
    place one table keeps as JSON text, or that the tables typed differently, is JSON text in all."""
    tables = [t for t in tables if t.num_rows] or list(tables[:1]) or [entity_table({})]
    places = sorted({name for t in tables for name in t.column_names if name != "key"})
    as_json = set().union(*(_json_places(t) for t in tables))
    types: dict[str, set[pa.DataType]] = {}
    for t in tables:
        for name in t.column_names:
            if name != "key" and name not in as_json:
                types.setdefault(name, set()).add(t.schema.field(name).type)
    as_json |= {name for name, seen in types.items() if len(seen) > 1}
    unified = []
    for t in tables:
        columns, kept_as_json = {"key": t.column("key")}, _json_places(t)
        for place in places:
            if place not in t.column_names:
                kind = pa.string() if place in as_json else next(iter(types[place]))
                columns[place] = pa.nulls(t.num_rows, kind)
            elif place in as_json and place not in kept_as_json:
                columns[place] = pa.array([None if v is None else _compact(v) for v in t.column(place).to_pylist()],
                                          pa.string())
            else:
                columns[place] = t.column(place)
        unified.append(pa.table(columns))
    table = pa.concat_tables(unified).sort_by("key").combine_chunks()
    return table.replace_schema_metadata({_JSON_COLUMNS: json.dumps(sorted(as_json)).encode()})


def _json_places(table: pa.Table) -> set[str]:
    return set(json.loads((table.schema.metadata or {}).get(_JSON_COLUMNS, b"[]")))


def entity_file(rows: pa.Table) -> bytes:
    """An entity table (`entity_table`, `entity_rows`) as the Parquet bytes of a version's entity file."""
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="zstd", row_group_size=16384)
    return buf.getvalue()


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _typed_column(values: list[Any]) -> pa.Array | None:
    """`values` as an Arrow array that gives each back exactly (as JSON would write it), else None."""
    try:
        array = pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None
    return array if _compact(array.to_pylist()) == _compact(values) else None


def entity_parts(rows: pa.Table) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, parts) of each row of an entity file's table (`entity_file`)."""
    as_json = _json_places(rows)
    data = rows.to_pydict()
    places = [name for name in rows.column_names if name != "key"]
    for i, key in enumerate(data["key"]):
        parts = {}
        for place in places:
            value = data[place][i]
            if value is not None:
                parts[place] = json.loads(value) if place in as_json else value
        yield key, parts
