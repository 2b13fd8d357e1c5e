"""Paths: local folders or s3:// URIs, with the spec's `storage:` block and the AWS credential chain."""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow.fs as pafs

from dmafn.partition_layout import parse_layout
from dmafn.spec import StorageSpec

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data that cannot be used; the message names the path, column or date."""


class BackfillError(RuntimeError):
    """Some dates of a backfill failed (the others were committed); `failed` holds (date, error) by date."""

    def __init__(self, failed: list[tuple[dt.date, Exception]]):
        self.failed = sorted(failed, key=lambda f: f[0])
        day, exc = self.failed[0]
        super().__init__(f"backfill: {len(failed)} date(s) failed, first {day}: {exc}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a backfill: `committed` of `total` dates were committed before it (they stay committed)."""

    def __init__(self, committed: int, total: int):
        self.committed, self.total = committed, total
        super().__init__(f"{committed} of {total} dates committed")


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])


@dataclass(frozen=True)
class Storage:
    """Resolved storage settings: spec values first, then the environment (AWS_ENDPOINT_URL, AWS_REGION)."""

    endpoint_url: str | None = None
    region: str | None = None
    allow_http: bool = False
    timeout_s: float = StorageSpec.timeout_s     # per S3 connect and request (pyarrow, deltalake, boto3)
    retries: int = StorageSpec.retries           # times a failed S3 request is tried again (all three alike)

    @classmethod
    def from_spec(cls, spec: StorageSpec | None) -> "Storage":
        spec = spec or StorageSpec()
        endpoint = spec.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        region = spec.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        allow_http = spec.allow_http if spec.allow_http is not None else bool(endpoint and endpoint.startswith("http:"))
        return cls(endpoint_url=endpoint, region=region, allow_http=allow_http, timeout_s=spec.timeout_s,
                   retries=spec.retries)

    def filesystem(self, path: str) -> pafs.FileSystem:
        """A pyarrow filesystem for `path` (local or S3)."""
        if not is_s3(path):
            return pafs.LocalFileSystem()
        kwargs: dict = {"region": self.region, "connect_timeout": self.timeout_s, "request_timeout": self.timeout_s,
                        # the AWS SDK counts attempts: the first one and its retries
                        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.retries + 1)}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme)
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
        return pafs.S3FileSystem(**kwargs)

    def fs_path(self, path: str) -> str:
        """The path as the pyarrow filesystem wants it (no scheme for S3)."""
        return path[len("s3://"):] if is_s3(path) else str(Path(path).absolute())

    def delta_options(self, path: str) -> dict[str, str] | None:
        """deltalake storage options for `path` (None for local folders)."""
        if not is_s3(path):
            return None
        seconds = f"{max(1, round(self.timeout_s))}s"
        opts = {"AWS_REGION": self.region or "us-east-1", "timeout": seconds, "connect_timeout": seconds,
                # object_store retries with backoff for up to 3 minutes by default: here for as long as the other
                # clients' attempts may take (its `max_retries` is no key here: Polars, handed these options by
                # `pl.scan_delta`, reads that key itself, as a number)
                "retry_timeout": f"{max(1, math.ceil(self.timeout_s * (self.retries + 1)))}s"}
        if self.endpoint_url:
            opts["AWS_ENDPOINT_URL"] = self.endpoint_url
        if self.allow_http:
            opts["AWS_ALLOW_HTTP"] = "true"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            if os.environ.get(name):
                opts[name] = os.environ[name]
        return opts

    def boto3_client(self):
        """A boto3 S3 client with the same endpoint, region, timeouts and retries."""
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=self.timeout_s, read_timeout=self.timeout_s,
                        retries={"total_max_attempts": self.retries + 1, "mode": "standard"})
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def delta_uri(self, path: str) -> str:
        return path if is_s3(path) else str(Path(path).absolute())


def partition_date(name: str, key: str) -> dt.date | None:
    """The date a folder named `key=YYYY-MM-DD` stands for; None for any other name or no such date."""
    layout = parse_layout(key)
    fields = layout.match(0, name)
    return None if fields is None else layout.date(fields)


def relative(path: str, root: str) -> str:
    """`path` inside the folder `root` (as a filesystem's listing names both); its last part when it is not inside."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]


PARTITION_LISTERS = 16  # folders of a layout's level listed at once (on S3 each listing is a round trip)


class DateFolder(NamedTuple):
    """A folder holding files of one date (`list_partitions`): its path as the filesystem names it, and the
    `key=value/` folders of the layout's `key=*` levels above it ('' without such levels: a reader finds the column
    values of its files' folders in their names inside it, `ListedFile.name`, prefixed with these)."""

    path: str
    above: str = ""
    files: tuple[pafs.FileInfo, ...] | None = None   # what lies under it, where the listing already read it (a
                                                     # value folder listed whole: `list_partitions(..., whole=True)`)


def list_partitions(storage: Storage, path: str, partition: str = "date",
                    within: tuple[dt.date, dt.date] | None = None,
                    whole: bool = False) -> dict[dt.date, list[DateFolder]]:
    """The date partition folders under `path`, laid out as the spec's `partition` says (a key: `key=YYYY-MM-DD`
    folders; a layout such as `year=%Y/month=%m/day=%d`: a level of folders each, see `dmafn.partition_layout`):
    date -> its folders (one; for a layout with `key=*` levels, one per value). A layout's levels are listed one after
    the other, the folders of a level `PARTITION_LISTERS` at a time; with `within` (first, last date) a folder that
    can hold no date of it (another year's, another month's) is not listed further, and only dates within it are
    returned. Folders that do not fit the layout (`date=2024-13-01`, `date=2024-1-5`, another key, `backup`) are not
    read, with a warning naming them, never silently; those whose names start with `.` or `_` (`_delta_log`) are
    skipped.

    With `whole`, a layout that starts with its `key=*` levels (`machine_id=*/date=%Y-%m-%d`) has each value folder
    listed once, recursively, and its date folders found in that listing, their files kept (`DateFolder.files`): a
    round trip or a few per machine, instead of one per machine and date (the files' listing, `list_parquet_files`,
    then takes them from there) - a backfill over a year of a fleet's folders lists each machine once.

    Raises DataError naming the path when it does not exist or cannot be reached, or when no folder under it fits
    the layout.
    """
    layout = parse_layout(partition)
    fs, root = storage.filesystem(path), storage.fs_path(path)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{path}: table not found")
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    other, fitting = [], False
    frontier: list[tuple[str, dict[str, int], str]] = [(root, {}, "")]     # folder, date fields, `key=value/`s
    listed_whole = layout.values_first if whole else 0
    for level in range(listed_whole or len(layout.levels)):
        found = []
        for (folder, fields, above), entries in zip(frontier, _list_folders(fs, path, [f for f, *_ in frontier])):
            for entry in entries:
                if entry.type != pafs.FileType.Directory or entry.base_name.startswith((".", "_")):
                    continue                          # files beside the partitions, `_delta_log`, `.tmp`: not data
                if (got := layout.match(level, entry.base_name)) is None:
                    other.append(relative(entry.path, root))
                    continue
                span = layout.span({**fields, **got}) if within else None
                if span is None or (span[0] <= within[1] and span[1] >= within[0]):
                    found.append((entry.path, {**fields, **got},
                                  above + entry.base_name + "/" if layout.any_value(level) else above))
                else:                                 # another year's, month's or day's: fits, not wanted
                    fitting = True
        frontier = found
    out: dict[dt.date, list[DateFolder]] = {}
    if listed_whole:
        dated, elsewhere = _dates_in_whole_listings(fs, path, root, layout, listed_whole, frontier, within, other)
        fitting = fitting or elsewhere
        frontier = []
        for day, folder in dated:
            fitting = True
            out.setdefault(day, []).append(folder)
    for folder, fields, above in frontier:
        if (day := layout.date(fields)) is None:      # day=31 of April
            other.append(relative(folder, root))
            continue
        fitting = True
        out.setdefault(day, []).append(DateFolder(folder, above))   # within `within`: its span (the day) checked
    if other:
        log.warning("%s: %d folder(s) not named %s (a real date) are not read (%s%s); rename them to have them read",
                    path, len(other), layout.text, ", ".join(sorted(other)[:3]), ", ..." if len(other) > 3 else "")
    if not fitting:
        raise DataError(f"{path}: no '{layout.text}' partitions found")
    return out


def _dates_in_whole_listings(fs: pafs.FileSystem, path: str, root: str, layout, first: int,
                             frontier: list[tuple[str, dict[str, int], str]], within: tuple[dt.date, dt.date] | None,
                             other: list[str]) -> tuple[list[tuple[dt.date, DateFolder]], bool]:
    """`list_partitions`' date levels (from `first` on) found in one recursive listing of each value folder
    (`PARTITION_LISTERS` at a time, each cut to its dates within `within` as it comes, so the driver holds the files
    of the dates asked, not a machine's whole history): the date folders (each with the files under it) and whether
    one fitted outside `within`; folders that fit no date are added to `other`, hidden ones (`.`/`_`) and files
    beside the date folders skipped, as the level walk does."""
    depth = len(layout.levels) - first

    def dates_of(start: tuple[str, dict[str, int], str]) -> tuple[list[tuple[dt.date, DateFolder]], set[str], bool]:
        folder, fields, above = start
        under: dict[str, list[pafs.FileInfo]] = {}
        for info in _list_folders(fs, path, [folder], True)[0]:
            parts = relative(info.path, folder).split("/")
            if len(parts) < depth or (len(parts) == depth and info.type != pafs.FileType.Directory) \
                    or any(p.startswith((".", "_")) for p in parts[:depth]):
                continue
            held = under.setdefault("/".join(parts[:depth]), [])
            if len(parts) > depth:
                held.append(info)
        dated, unfit, elsewhere = [], set(), False
        for head, files in sorted(under.items()):
            got, parts = dict(fields), head.split("/")
            for k, part in enumerate(parts):
                if (matched := layout.match(first + k, part)) is None:
                    unfit.add(relative(f"{folder}/{'/'.join(parts[:k + 1])}", root))
                    break
                got |= matched
            else:
                if (day := layout.date(got)) is None:
                    unfit.add(relative(f"{folder}/{head}", root))
                elif within and not within[0] <= day <= within[1]:
                    elsewhere = True
                else:
                    dated.append((day, DateFolder(f"{folder}/{head}", above, tuple(files))))
        return dated, unfit, elsewhere

    dated, elsewhere = [], False
    with ThreadPoolExecutor(max(1, min(PARTITION_LISTERS, len(frontier)))) as pool:
        for found, unfit, outside in pool.map(dates_of, frontier):
            dated += found
            other.extend(sorted(unfit))
            elsewhere = elsewhere or outside
    return dated, elsewhere


def _list_folders(fs: pafs.FileSystem, path: str, folders: list[str],
                  recursive: bool = False) -> list[list[pafs.FileInfo]]:
    """Each folder's entries (recursive or not), `PARTITION_LISTERS` folders at a time; DataError names `path`."""
    def entries(folder: str) -> list[pafs.FileInfo]:
        try:
            return fs.get_file_info(pafs.FileSelector(folder, recursive=recursive))
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc})") from None

    if len(folders) <= 1:
        return [entries(f) for f in folders]
    with ThreadPoolExecutor(min(PARTITION_LISTERS, len(folders))) as pool:
        return list(pool.map(entries, folders))
