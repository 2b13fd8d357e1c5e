"""Shared fixtures: a spec for tiny tables, and one small local Ray per test session (stopped at the end)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from dmafn.spec import parse_spec

os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def same_statistics(a, b, rtol=1e-9):
    """Two statistics with the same structure, keys and non-numbers, and numbers equal up to `rtol`."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (sorted(a)[:5], sorted(b)[:5])
        for k in a:
            same_statistics(a[k], b[k], rtol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            same_statistics(x, y, rtol)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=rtol, abs=1e-12, nan_ok=True)
    else:
        assert a == b


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 for the session; AWS_* variables point at it (set before Ray starts,
    so Ray workers inherit them). Stopped at the end."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url})
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="session")
def local_ray(s3_endpoint):
    """One small local Ray for the whole session (num_cpus=2, no dashboard); shut down afterwards.
    Started after the S3 server so that its workers see the same AWS_* settings as the driver."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
