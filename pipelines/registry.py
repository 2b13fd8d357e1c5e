"""Model registry: a folder per version under `registry` (local or s3:// via boto3) and a LATEST pointer.

A version holds `weights.pt` (a state dict, loaded with weights_only=True: no pickled code), `manifest.json`
(resolved spec, model config, the fleet's preprocessing statistics, threshold calibration, validation metrics,
training window, the SHA-256 of the weights and of the entity statistics), `entity_statistics.parquet` (one row
per entity: its key and its per-entity statistics - normalisation moments, relation intercepts and ranges - one
column per place, numbers as float64, `pipelines.statistics`; with 100,000 machines these are most of the
statistics, and a process makes Python objects only of the rows of the entities it scores) and
`manifest.sha256` (the manifest's own SHA-256); every file is checked at load. Versions saved with every
entity's statistics inside the manifest load as before.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import uuid
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dmafn.features import split_entity_statistics
from dmafn.spec import Spec, SpecError, parse_spec, reading_differences
from pipelines.statistics import EntityStatistics, entity_file, entity_table
from pipelines.storage import DataError, Storage, is_s3, join

if TYPE_CHECKING:                  # torch is imported where a model is built or saved, not by a scoring driver
    import torch

    from dmafn.calibration import Calibration
    from dmafn.model import DMAFN

LATEST = "LATEST"
MANIFEST_SHA256 = "manifest.sha256"
ENTITY_STATISTICS = "entity_statistics.parquet"
TRAIN_RUNS = "_train_runs"             # a training's checkpoints while it runs (not a version: it begins with _)


@dataclass
class ModelVersion:
    """A saved model version: its manifest, its spec and its weights as saved. The network is built from the
    weights on first use of `model`, so a process that only plans and commits (a scoring job's driver) never
    imports torch; a pickled version carries the weights, not the built network."""

    version: str
    manifest: dict[str, Any]
    weights: bytes                 # the state dict as torch.save wrote it, checked against weights_sha256
    spec: Spec                     # the version's resolved spec, parsed from the manifest once
    weights_path: str = ""         # where the weights were read from, for errors

    entity_rows: pa.Table | None = None   # `entity_statistics.parquet` as read: made Python objects where needed

    @property
    def stats(self) -> dict[str, Any]:
        """The statistics, every entity's parts included (joined from the entity rows on first use)."""
        return self.manifest["statistics"] if self.entity_rows is None else self.statistics.whole

    @cached_property
    def statistics(self) -> EntityStatistics:
        """The statistics split into the fleet's part and each entity's (`pipelines.statistics`)."""
        if self.entity_rows is None:
            return EntityStatistics.of(self.manifest["statistics"])
        return EntityStatistics(self.manifest["statistics"], rows=self.entity_rows)

    def with_statistics(self, stats: dict[str, Any]) -> "ModelVersion":
        """The same version carrying `stats` as its statistics (e.g. only some entities' parts, or none: {} for a
        copy whose statistics travel apart)."""
        return replace(self, manifest={**self.manifest, "statistics": stats}, entity_rows=None)

    @cached_property
    def model(self) -> "DMAFN":
        """The network with the version's weights, in eval mode (DataError naming the file when the weights are
        not a plain tensor state dict)."""
        from dmafn.model import ModelConfig, build_model

        model = build_model(self.spec.modalities, ModelConfig(**self.manifest["model_config"]))
        model.load_state_dict(plain_state_dict(self.weights, self.weights_path))
        model.eval()
        return model

    @property
    def validation_summary(self) -> dict[str, Any]:
        """What the calibration recorded of its validation days (alarm rate, score median and 99th percentile), read
        from the manifest as `calibration` reads it, without the model code (the scoring driver never imports
        torch); versions saved before the calibration kept it have it in their metrics."""
        return self.manifest.get("calibration", {}).get("validation") or dict(self.manifest.get("metrics") or {})

    @cached_property
    def calibration(self) -> "Calibration":
        """The fitted calibration; versions saved before it stored its smoothing take the spec's."""
        from dmafn.calibration import Calibration

        return Calibration.from_dict(self.manifest["calibration"], smoothing=self.spec.score.smoothing,
                                     validation=self.manifest.get("metrics"))

    def manifest_to_save_again(self) -> dict[str, Any]:
        """The manifest without what `Registry.save` writes for each version (its id, time, model config and
        checksums, its entity file): what a version saved from this one (`enroll`, `recalibrate`) starts from."""
        return {k: v for k, v in self.manifest.items()
                if k not in ("version", "model_config", "created_at", "weights_sha256", "entity_statistics")}

    def __getstate__(self) -> dict[str, Any]:
        # what was built from the manifest and the weights is rebuilt where it is used, not shipped
        return {k: v for k, v in self.__dict__.items() if k in self.__dataclass_fields__}


def train_runs_path(spec: Spec) -> str:
    """Where `dmafn train` keeps a training's checkpoints while it runs (removed when it ends; `dmafn maintain`
    removes those of a training that was killed)."""
    return join(spec.registry, TRAIN_RUNS)


class Registry:
    """Reads and writes model versions under one root (a folder or an s3:// prefix)."""

    def __init__(self, root: str, storage: Storage):
        self.root, self.storage = root.rstrip("/"), storage

    # -- bytes I/O, local or S3
    def _s3(self):
        return self.storage.boto3_client()

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri[len("s3://"):].partition("/")
        return bucket, key

    def _write(self, path: str, data: bytes) -> None:
        """Write a file whole: a reader sees the old bytes or the new ones, never a part (an S3 PUT is so; a local
        file is written beside and renamed over, so a nightly score reading LATEST while `train` or `promote`
        rewrites it, or a write cut short, never finds it empty)."""
        if is_s3(path):
            bucket, key = self._split(path)
            self._s3().put_object(Bucket=bucket, Key=key, Body=data)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            partial.write_bytes(data)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def _read(self, path: str, *, missing_ok: bool = False) -> bytes | None:
        """The file's bytes; with `missing_ok`, None when it does not exist (a version saved before checksums
        has no `manifest.sha256`)."""
        try:
            if is_s3(path):
                bucket, key = self._split(path)
                return self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
            return Path(path).read_bytes()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise DataError(f"{path}: not found in the model registry") from None
        except Exception as exc:  # botocore errors: NoSuchKey, endpoint unreachable, ...
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if missing_ok and code in ("NoSuchKey", "404"):
                return None
            raise DataError(f"{path}: cannot be read from the model registry ({exc})") from None

    # -- versions
    def save(self, model: "DMAFN", manifest: dict[str, Any], statistics: EntityStatistics | None = None, *,
             promote: bool = True) -> str:
        """Write a new version and (with `promote`) point LATEST at it; returns the version id. The statistics are
        `statistics` (the fleet's part goes to the manifest, the entities' rows to the entity file: training's,
        fitted per entity bucket), else `manifest["statistics"]`, whole (as fitted in memory, or a loaded
        version's `stats`). Without `promote` the version is a candidate: scored only where asked for by name
        (`--model`) until `promote` names it."""
        import torch

        if "entity_statistics" in manifest:
            raise ValueError("the manifest is a loaded version's, whose statistics hold the fleet's part only: save "
                             "it with the whole statistics ({**manifest, 'statistics': version.stats}) and without "
                             "its 'entity_statistics' entry")

        version = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        manifest = {**manifest, "version": version, "model_config": asdict(model.cfg),
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
        weights = buf.getvalue()
        manifest["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        if statistics is None:
            fleet, entities = split_entity_statistics(manifest["statistics"])
            table = entity_table(entities)
        else:
            fleet, table = statistics.fleet, statistics.table()
        rows = entity_file(table)
        manifest = {**manifest, "statistics": fleet, "entity_statistics": {
            "file": ENTITY_STATISTICS, "entities": table.num_rows, "sha256": hashlib.sha256(rows).hexdigest()}}
        body = json.dumps(manifest, indent=2, default=str).encode()
        self._write(join(self.root, version, ENTITY_STATISTICS), rows)
        self._write(join(self.root, version, "weights.pt"), weights)
        self._write(join(self.root, version, "manifest.json"), body)
        self._write(join(self.root, version, MANIFEST_SHA256), hashlib.sha256(body).hexdigest().encode())
        if promote:
            self._write(join(self.root, LATEST), version.encode())
        return version

    def latest(self) -> str:
        """The version LATEST names (DataError naming the file when there is none or it names none; where there is
        none, what to do: train a first version, or promote one of the saved candidates)."""
        path = join(self.root, LATEST)
        body = self._read(path, missing_ok=True)
        if body is None:
            saved = self.versions()
            if not saved:
                raise DataError(f"{path}: not found - the model registry holds no version yet: train one "
                                "(dmafn train SPEC)")
            raise DataError(f"{path}: not found - no version is promoted yet; the model registry holds "
                            f"{len(saved)} (newest {saved[-1]}): promote one (dmafn promote SPEC {saved[-1]}) "
                            "or name one (--model VERSION)")
        version = body.decode().strip()
        if not version:
            raise DataError(f"{path}: empty; it should name a saved version (dmafn promote SPEC VERSION sets it)")
        return version

    def promote(self, version: str, check: Callable[[ModelVersion], object] | None = None
                ) -> tuple[str | None, ModelVersion]:
        """Point LATEST at a saved version (a candidate trained with `--no-promote`, or an older version to roll
        back to), after loading it as scoring will - its manifest, weights and entity file checked against their
        checksums, the weights built into its network (DataError naming the file) - and `check(version)` raised
        nothing (e.g. that the spec still defines the modalities it reads). Returns the version LATEST named before
        (None: none) and the one loaded."""
        mv = self.load(version)
        if check is not None:
            check(mv)
        try:
            before = self.latest()
        except DataError:
            before = None
        self._write(join(self.root, LATEST), mv.version.encode())
        return before, mv

    def versions(self) -> list[str]:
        """The saved versions' ids, oldest first (an id begins with its UTC save time); none when the registry does
        not exist yet. Folders whose names begin with '_' (training checkpoints, the baselines' registry) are not
        versions."""
        fs, root = self.storage.filesystem(self.root), self.storage.fs_path(self.root)
        try:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
        except Exception as exc:  # noqa: BLE001 - unreachable endpoint, denied: say which registry
            raise DataError(f"{self.root}: the model registry cannot be listed ({exc})") from None
        return sorted(e.base_name for e in entries
                      if e.type == pafs.FileType.Directory and not e.base_name.startswith("_"))

    def manifest(self, version: str) -> dict[str, Any]:
        """A version's manifest, checked against the checksum written at save (DataError names the file)."""
        manifest_path = join(self.root, version, "manifest.json")
        body = self._read(manifest_path)
        expected = self._read(join(self.root, version, MANIFEST_SHA256), missing_ok=True)
        if expected is not None and hashlib.sha256(body).hexdigest() != expected.decode().strip():
            raise DataError(f"{manifest_path}: checksum does not match {MANIFEST_SHA256}; the file was changed "
                            "after the version was saved")
        return json.loads(body)

    def load(self, version: str | None = None, *, build: bool = True) -> ModelVersion:
        """Load a version (default: LATEST): the manifest and the weights are checked against the checksums
        written at save, and the weights must be a plain state dict of tensors (loaded with weights_only=True,
        so no code in the file is run). DataError names the file otherwise.

        With `build=False` the network is built where `model` is first used (a scoring job's workers), unless
        the weights have no checksum to vouch for them: those are loaded here, so a bad file fails at once."""
        version = version or self.latest()
        weights_path = join(self.root, version, "weights.pt")
        manifest = self.manifest(version)
        spec = parse_spec(manifest["spec"], source=f"model version {version}")
        weights = self._read(weights_path)
        if manifest.get("weights_sha256") and hashlib.sha256(weights).hexdigest() != manifest["weights_sha256"]:
            raise DataError(f"{weights_path}: checksum does not match the manifest's weights_sha256; the file was "
                            "changed after the version was saved")
        mv = ModelVersion(version=version, manifest=manifest, weights=weights, spec=spec, weights_path=weights_path,
                          entity_rows=self._entity_rows(version, manifest))
        if build or not manifest.get("weights_sha256"):
            mv.model  # noqa: B018 - built now: the weights are checked here
        return mv

    def _entity_rows(self, version: str, manifest: dict[str, Any]) -> pa.Table | None:
        """The version's per-entity statistics rows, checked against the manifest's SHA-256; None for a version
        that keeps them in its manifest."""
        saved = manifest.get("entity_statistics")
        if saved is None:
            return None
        path = join(self.root, version, saved["file"])
        data = self._read(path)
        if hashlib.sha256(data).hexdigest() != saved["sha256"]:
            raise DataError(f"{path}: checksum does not match the manifest's entity_statistics sha256; the file was "
                            "changed after the version was saved")
        table = pq.read_table(pa.BufferReader(data))
        if table.column_names[:1] != ["key"] or table.num_rows != saved["entities"]:
            raise DataError(f"{path}: expected {saved['entities']} rows keyed by 'key', found {table.num_rows} with "
                            f"columns {table.column_names[:3]}")
        return table


def version_facts(spec: Spec, storage: Storage, versions: Iterable[str]) -> dict[str, dict[str, Any] | str]:
    """Per model version, what its manifest says about its training - when, on which days, the warnings it gave
    (`pipelines.train.TrainingWarnings`), the alarm rate its validation days had (`expected_alarm_rate`), how many
    entities it keeps statistics of their own for (`entities`: the others score by the fleet's; `enrolled` of them
    by `dmafn enroll` into the version first trained, `enrolled_into`), the edits of `spec` it does not read
    (`spec_edits`) - or why the manifest could not be read."""
    registry, out = Registry(spec.registry, storage), {}
    for version in sorted(versions):
        try:
            manifest = registry.manifest(version)
        except (DataError, ValueError) as exc:                  # missing, changed, or not JSON
            out[version] = str(exc)
            continue
        window = manifest.get("training_window", {})
        validation = manifest.get("calibration", {}).get("validation") or manifest.get("metrics") or {}
        out[version] = {"created_at": manifest.get("created_at"), "train_days": window.get("train_days", []),
                        "validation_days": window.get("validation_days", []),
                        "expected_alarm_rate": validation.get("validation_alarm_rate"),
                        # the entities with statistics of their own (None: saved before the entity file)
                        "entities": (manifest.get("entity_statistics") or {}).get("entities"),
                        # of those, enrolled after training (`pipelines.enroll`), and the version first trained
                        "enrolled": sum(e["entities"] for e in manifest.get("enrolled", [])),
                        "enrolled_into": (manifest.get("enrolled") or [{}])[0].get("from_version"),
                        "warnings": manifest.get("warnings"),          # None: saved before versions kept them
                        # what `spec` reads, models or thresholds otherwise (taking effect with a new version)
                        "spec_edits": _spec_edits(manifest, version, spec)}
    return out


def _spec_edits(manifest: dict[str, Any], version: str, spec: Spec) -> list[str] | None:
    """`reading_differences` between the version's spec and `spec`; None where the manifest keeps no spec that
    parses (the version's own load names why)."""
    try:
        return reading_differences(parse_spec(manifest["spec"], source=f"model version {version}"), spec)
    except (KeyError, SpecError):
        return None


def plain_state_dict(data: bytes, path: str) -> dict[str, "torch.Tensor"]:
    """A state dict of tensors from `data`, or DataError naming `path`: anything else (a pickled object, a
    module, code) is refused by torch's weights_only loader without running any of it."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, ... all mean "not a plain state dict"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a plain tensor state dict, refused without running any code in it "
                        f"({first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise DataError(f"{path}: not a plain tensor state dict (it holds {type(state).__name__}); refused")
    return state
