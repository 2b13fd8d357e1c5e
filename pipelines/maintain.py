"""Maintenance of the output Delta tables: compaction (optimize) and vacuum with a retention period; staged
pieces and training checkpoints left by killed jobs are removed."""
from __future__ import annotations

from dmafn.spec import Spec
from pipelines.baselines import alone_spec
from pipelines.delta_sink import OpenTables, require_own_tables
from pipelines.registry import train_runs_path
from pipelines.staging import remove_stale_folders
from pipelines.storage import Storage


def maintain(spec: Spec, *, retention_hours: int = 168) -> list[str]:
    """Compact small files and vacuum files older than the retention in the output, quarantine and runs tables,
    and in the baselines' (`evaluate --baselines`) where they exist; delete the staging folders of runs older
    than the retention (`pipelines.staging`) and the checkpoint folders of trainings stopped before they removed
    them (`registry/_train_runs`); returns one line per table and one per folder."""
    storage = Storage.from_spec(spec.storage)
    lines = []
    alone, tables = alone_spec(spec).score, OpenTables()
    for score in (spec.score, alone):        # compacting or vacuuming another team's table: refused, named
        require_own_tables(score, spec.entity, storage, tables)
    for path, optional in ((spec.score.output, False), (spec.score.quarantine_path, False),
                           (spec.score.runs_path, False), (alone.output, True), (alone.quarantine_path, True),
                           (alone.runs_path, True)):
        table = tables.get(storage.delta_uri(path), storage.delta_options(path))     # opened by the check
        if table is None:
            if not optional:
                lines.append(f"{path}: no table yet")
            continue
        compacted = table.optimize.compact()
        # full: also the data files no commit ever referenced (a shard whose date failed, a killed job)
        removed = table.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False,
                               full=True)
        lines.append(f"{path}: compacted {compacted.get('numFilesRemoved', 0)} files into "
                     f"{compacted.get('numFilesAdded', 0)}; vacuumed {len(removed)} files older than "
                     f"{retention_hours}h")
    stale = remove_stale_folders(storage, spec.score.staging_path, retention_hours)
    lines.append(f"{spec.score.staging_path}: removed {stale} staging folder(s) of stopped runs older than "
                 f"{retention_hours}h")
    runs = train_runs_path(spec)
    stale = remove_stale_folders(storage, runs, retention_hours)
    lines.append(f"{runs}: removed {stale} checkpoint folder(s) of stopped trainings older than {retention_hours}h")
    return lines
