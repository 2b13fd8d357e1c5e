"""Where a date's files lie under a modality table's path: the spec's `partition`.

A key (`date`, the default) means Hive folders `date=YYYY-MM-DD`. A layout names the folders with `%Y`, `%m` and
`%d`, one level per `/`: `year=%Y/month=%m/day=%d` (Hive, partitioned by three columns), `%Y/%m/%d` (a stream's
sink, Firehose-style), `dt=%Y%m%d`. Each of the three once; every level holds at least one, but for a level `key=*`:
a folder per value of a column (`machine_id=*/date=%Y-%m-%d`, a lake partitioned by machine first; the readers take
the column from the folder names where the files lack it). `%%` is a `%`.
Pure: the listing that walks the levels is `pipelines.storage.list_partitions`.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import lru_cache

_CODES = {"Y": (r"\d{4}", "YYYY"), "m": (r"\d{2}", "MM"), "d": (r"\d{2}", "DD")}
_RANGES = {"Y": (1, 9999), "m": (1, 12), "d": (1, 31)}
_KEY = re.compile(r"[^%/=\s]+")
_ANY_VALUE = re.compile(r"([^%/=*\s]+)=\*")     # a level of a folder per value of a column: `machine_id=*`


class LayoutError(ValueError):
    """A `partition` value that is neither a key nor a layout; the message says why."""


@dataclass(frozen=True)
class PartitionLayout:
    """The folder levels of a date's partition (`levels`, each a pattern with %Y / %m / %d in it)."""

    levels: tuple[str, ...]

    @property
    def text(self) -> str:
        """The layout as a person reads it: `year=YYYY/month=MM/day=DD`."""
        return "/".join(re.sub(r"%(.)", lambda c: _CODES[c.group(1)][1] if c.group(1) in _CODES else "%",
                               level) for level in self.levels)

    def folder(self, date: dt.date) -> str:
        """The partition folder of `date`, relative to the table's path (`year=2024/month=01/day=05`)."""
        return "/".join(date.strftime(level) for level in self.levels)

    def any_value(self, level: int) -> bool:
        """Whether `level` is a folder per value of a column (`key=*`), naming no part of the date."""
        return _ANY_VALUE.fullmatch(self.levels[level]) is not None

    @property
    def values_first(self) -> int:
        """How many `key=*` levels the layout starts with when no such level comes after a date level (a lake
        partitioned by machine first: `machine_id=*/date=%Y-%m-%d`); 0 otherwise."""
        first = next((i for i in range(len(self.levels)) if not self.any_value(i)), len(self.levels))
        return first if not any(self.any_value(i) for i in range(first, len(self.levels))) else 0

    def match(self, level: int, name: str) -> dict[str, int] | None:
        """The date fields (`Y`, `m`, `d`) a folder named `name` gives at `level` (none at a `key=*` level: a folder
        `key=` and a value); None when it is not such a folder (`month=1`, `month=13`, `day=32`)."""
        if self.any_value(level):
            key = self.levels[level][:-2]
            return {} if name.startswith(key + "=") and len(name) > len(key) + 1 else None
        found = _pattern(self.levels[level]).fullmatch(name)
        if found is None:
            return None
        fields = {k: int(v) for k, v in found.groupdict().items()}
        return fields if all(lo <= fields.get(k, lo) <= hi for k, (lo, hi) in _RANGES.items()) else None

    def date(self, fields: dict[str, int]) -> dt.date | None:
        """The date the fields of every level give; None when they name no real date (`month=13`)."""
        try:
            return dt.date(fields["Y"], fields["m"], fields["d"])
        except ValueError:
            return None

    @staticmethod
    def span(fields: dict[str, int]) -> tuple[dt.date, dt.date] | None:
        """The first and last date the fields `match` gave so far allow (a year's, a month's; None: any date, as for
        a month without its year)."""
        if "Y" not in fields:
            return None
        if "m" not in fields:
            return dt.date(fields["Y"], 1, 1), dt.date(fields["Y"], 12, 31)
        first = dt.date(fields["Y"], fields["m"], 1)
        last = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)
        if "d" in fields and fields["d"] <= last.day:
            return first.replace(day=fields["d"]), first.replace(day=fields["d"])
        return first, last


@lru_cache(maxsize=None)
def _pattern(level: str) -> re.Pattern:
    parts, at = [], 0
    for code in re.finditer(r"%(.)", level):
        parts.append(re.escape(level[at:code.start()]))
        letter = code.group(1)
        parts.append("%" if letter == "%" else f"(?P<{letter}>{_CODES[letter][0]})")
        at = code.end()
    parts.append(re.escape(level[at:]))
    return re.compile("".join(parts))


@lru_cache(maxsize=None)
def parse_layout(partition: str) -> PartitionLayout:
    """The spec's `partition` as a layout: a key `k` is `k=%Y-%m-%d`; anything with a `%` is a layout, checked.
    Raises LayoutError saying what is wrong."""
    if "%" not in partition:
        if not _KEY.fullmatch(partition):
            raise LayoutError(f"{partition!r} is neither a partition key (e.g. date: date=YYYY-MM-DD folders) nor a "
                              "layout with %Y, %m and %d (e.g. year=%Y/month=%m/day=%d)")
        return PartitionLayout((f"{partition}=%Y-%m-%d",))
    levels = tuple(partition.strip("/").split("/"))
    seen: list[str] = []
    for level in levels:
        if _ANY_VALUE.fullmatch(level):
            continue
        if "*" in level:
            raise LayoutError(f"{partition!r}: the level {level!r} holds a '*' (a folder per value of a column is a "
                              "level of its own, key=*: machine_id=*)")
        codes = [c for c in re.findall(r"%(.)", level) if c != "%"]
        if unknown := sorted(set(codes) - set(_CODES)):
            raise LayoutError(f"{partition!r}: %{unknown[0]} is not a layout code (only %Y, %m, %d and %%)")
        if not codes:
            raise LayoutError(f"{partition!r}: the level {level!r} holds none of %Y, %m, %d (every folder level "
                              "of a layout names part of the date, or is key=* - a folder per value of a column; "
                              "files below the date's folder are read anyway)")
        seen += codes
    for code in _CODES:
        if seen.count(code) != 1:
            raise LayoutError(f"{partition!r}: a layout holds %{code} exactly once (it holds it {seen.count(code)} "
                              "time(s))")
    return PartitionLayout(levels)
