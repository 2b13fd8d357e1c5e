"""Deployment files: the cluster launcher config passes Ray's own validation; manifests parse."""
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))


def test_ray_cluster_yaml_is_valid_for_ray():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    _validate(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] > 0
    assert "cuda" in cfg["docker"]["worker_image"]


def test_ray_validation_would_catch_a_broken_config():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    with pytest.raises(Exception, match="bogus_key"):
        _validate({**cfg, "bogus_key": 1})


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-nightly.yaml", "cronjob-nightly.yaml"])
def test_kubernetes_manifests_parse(name):
    docs = [d for d in yaml.safe_load_all((ROOT / "infra" / "k8s" / name).read_text()) if d]
    assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)


def test_nightly_rayjob_runs_the_nightly_entry_point():
    job = yaml.safe_load((ROOT / "infra" / "k8s" / "rayjob-nightly.yaml").read_text())
    assert job["spec"]["entrypoint"].startswith("python -m jobs.nightly")
    cron = next(yaml.safe_load_all((ROOT / "infra" / "k8s" / "cronjob-nightly.yaml").read_text()))
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_iam_policy_is_least_privilege():
    policy = json.loads((ROOT / "infra" / "iam-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert "s3:*" not in actions and not any(a.startswith("iam:") for a in actions)
    raw = next(s for s in policy["Statement"] if s["Sid"] == "ReadRawModalitiesAndLabels")
    assert raw["Action"] == ["s3:GetObject"]          # inputs are read-only
