"""`ray_session` without a cluster: what it asks of a local Ray."""
import os

import ray

from pipelines import ray_runtime


def test_a_local_session_sends_no_usage_statistics_unless_the_user_says_so(monkeypatch):
    seen = []
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append((os.environ.get("RAY_USAGE_STATS_ENABLED"),
                                                                kw.get("num_cpus"))))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_runtime.ray_session(num_cpus=1):
        pass
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    with ray_runtime.ray_session(num_cpus=1):
        pass
    assert seen == [("0", 1), ("1", 1)]
