"""Shared fixtures: a spec for tiny tables, and one small local Ray per test session (stopped at the end)."""
from __future__ import annotations

import os

import pytest

from dmafn.spec import parse_spec

os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def tiny_spec_dict(**overrides) -> dict:
    spec = {
        "name": "tiny", "entity": "machine_id", "time": "ts", "grain": "1min", "partition": "date",
        "modalities": {
            "proc": {"kind": "tabular", "path": "/tmp/none/proc", "columns": ["temp"], "tolerance": "2min"},
            "vib": {"kind": "timeseries", "path": "/tmp/none/vib", "columns": ["a"], "period": "20s",
                    "window": "1min"},
            "logs": {"kind": "text", "path": "/tmp/none/logs", "column": "msg", "window": "2min"},
            "cam": {"kind": "image", "path": "/tmp/none/cam", "column": "frame", "size": [16, 16],
                    "tolerance": "5min"},
        },
        "train": {"start": "2024-01-01", "end": "2024-01-02"},
        "registry": "/tmp/none/models",
        "score": {"output": "/tmp/none/scores"},
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def tiny_spec():
    return parse_spec(tiny_spec_dict(), source="tiny.yaml")


@pytest.fixture(scope="session")
def local_ray():
    """One small local Ray for the whole session (num_cpus=2, no dashboard); shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
