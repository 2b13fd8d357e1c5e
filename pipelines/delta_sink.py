"""The one Delta Lake writer: replace one date's partition (idempotent) or append, with retries on
concurrent-commit conflicts and schema merge (a new `score_<modality>` column appears, old rows keep null)."""
from __future__ import annotations

import logging
import random
import time
from typing import Literal

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

log = logging.getLogger(__name__)


def write_partition(uri: str, data: pa.Table, *, date: str | None, mode: Literal["replace_date", "append"],
                    storage_options: dict[str, str] | None = None, partition_by: tuple[str, ...] = ("date",),
                    retries: int = 8) -> None:
    """Write `data` to the Delta table at `uri`.

    mode="replace_date": atomically replace every row of `date` (re-running leaves one copy);
    mode="append": add rows (the run audit table).
    """
    if mode == "replace_date" and not date:
        raise ValueError("mode 'replace_date' needs a date")
    for attempt in range(retries + 1):
        try:
            if mode == "replace_date":
                write_deltalake(uri, data, mode="overwrite", predicate=f"date = '{date}'",
                                partition_by=list(partition_by), storage_options=storage_options,
                                schema_mode="merge")
            else:
                write_deltalake(uri, data, mode="append", partition_by=list(partition_by),
                                storage_options=storage_options, schema_mode="merge")
            return
        except CommitFailedError as exc:
            if attempt == retries:
                raise
            wait = min(0.2 * 2 ** attempt, 5.0) * (0.5 + random.random())
            log.warning("Delta commit to %s conflicted (%s); retrying in %.1fs", uri, exc, wait)
            time.sleep(wait)


def read_table(uri: str, storage_options: dict[str, str] | None = None) -> DeltaTable | None:
    """The Delta table at `uri`, or None when none exists yet."""
    try:
        return DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        return None
