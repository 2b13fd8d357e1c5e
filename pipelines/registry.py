"""Model registry: a folder per version under `registry` (local or s3:// via boto3) and a LATEST pointer.

A version holds `weights.pt` (a state dict, loaded with weights_only=True: no pickled code) and
`manifest.json` (resolved spec, model config, preprocessing statistics, threshold calibration, validation
metrics, training window).
"""
from __future__ import annotations

import datetime as dt
import io
import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dmafn.model import DMAFN, ModelConfig, build_model
from dmafn.spec import Spec, parse_spec
from pipelines.storage import DataError, Storage, is_s3, join

LATEST = "LATEST"


@dataclass
class ModelVersion:
    version: str
    manifest: dict[str, Any]
    model: DMAFN

    @property
    def spec(self) -> Spec:
        return parse_spec(self.manifest["spec"], source=f"model version {self.version}")

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest["statistics"]

    @property
    def calibration(self) -> dict[str, Any]:
        return self.manifest["calibration"]


class Registry:
    """Reads and writes model versions under one root (a folder or an s3:// prefix)."""

    def __init__(self, root: str, storage: Storage):
        self.root, self.storage = root.rstrip("/"), storage

    # -- bytes I/O, local or S3
    def _s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.storage.endpoint_url, region_name=self.storage.region)

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri[len("s3://"):].partition("/")
        return bucket, key

    def _write(self, path: str, data: bytes) -> None:
        if is_s3(path):
            bucket, key = self._split(path)
            self._s3().put_object(Bucket=bucket, Key=key, Body=data)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)

    def _read(self, path: str) -> bytes:
        try:
            if is_s3(path):
                bucket, key = self._split(path)
                return self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: not found in the model registry") from None
        except Exception as exc:  # botocore errors: NoSuchKey, endpoint unreachable, ...
            raise DataError(f"{path}: cannot be read from the model registry ({exc})") from None

    # -- versions
    def save(self, model: DMAFN, manifest: dict[str, Any]) -> str:
        """Write a new version and point LATEST at it; returns the version id."""
        version = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        manifest = {**manifest, "version": version, "model_config": asdict(model.cfg),
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
        self._write(join(self.root, version, "weights.pt"), buf.getvalue())
        self._write(join(self.root, version, "manifest.json"), json.dumps(manifest, indent=2, default=str).encode())
        self._write(join(self.root, LATEST), version.encode())
        return version

    def latest(self) -> str:
        return self._read(join(self.root, LATEST)).decode().strip()

    def load(self, version: str | None = None) -> ModelVersion:
        """Load a version (default: LATEST) with weights_only=True."""
        version = version or self.latest()
        manifest = json.loads(self._read(join(self.root, version, "manifest.json")))
        spec = parse_spec(manifest["spec"], source=f"model version {version}")
        model = build_model(spec.modalities, ModelConfig(**manifest["model_config"]))
        state = torch.load(io.BytesIO(self._read(join(self.root, version, "weights.pt"))), map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state)
        model.eval()
        return ModelVersion(version=version, manifest=manifest, model=model)
