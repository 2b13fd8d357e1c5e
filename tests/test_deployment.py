"""Deployment files, checked offline with the tools' own validators: the cluster launcher config with Ray's
`prepare_config` + `validate_config`, the Kubernetes manifests with kubernetes-validate (the API's JSON schemas;
KubeRay's pod templates as Pods, their other fields against KubeRay's field names), the nightly CronJob's
wait loop against a stand-in kubectl."""
import os
import subprocess
import json
from pathlib import Path

import pytest
import yaml

from pipelines.ray_runtime import WORKER_JEMALLOC_CONF

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


def test_each_node_type_runs_its_image_on_a_host_that_can_run_it():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    docker, gpu = cfg["docker"], cfg["available_node_types"]["gpu_worker"]
    assert "cpu" in docker["head_image"] and "cpu" in docker["worker_image"]    # CPU nodes never pull CUDA
    assert "cuda" in gpu["docker"]["worker_image"]
    installs_docker = "apt-get install -y docker.io"
    assert any(installs_docker in c for c in cfg["initialization_commands"])
    gpu_init = " ".join(gpu["initialization_commands"])
    assert installs_docker in gpu_init and "nvidia-driver" in gpu_init and "nvidia-container-toolkit" in gpu_init
    assert "nvidia-ctk runtime configure --runtime=docker" in gpu_init


def test_images_build_from_the_repository_with_a_documented_command():
    makefile = (ROOT / "Makefile").read_text()
    assert "docker build -f infra/Dockerfile " in makefile and "docker build -f infra/Dockerfile.cuda " in makefile
    assert "make images" in (ROOT / "README.md").read_text()
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "infra" / name).read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), (name, source)
        assert "-c constraints.txt" in text          # the tested versions, as the Makefile installs them
        assert f"_RJEM_MALLOC_CONF={WORKER_JEMALLOC_CONF}" in text      # a cluster's workers: as a local Ray's


def test_ray_validation_would_catch_a_broken_config():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    with pytest.raises(Exception, match="bogus_key"):
        _validate({**cfg, "bogus_key": 1})


K8S = ROOT / "infra" / "k8s"
# KubeRay v1 field names (ray-operator/apis/ray/v1 rayjob_types.go, raycluster_types.go), for the parts of the
# custom resources that are not Kubernetes pod templates
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headServiceAnnotations",
                   "headGroupSpec", "workerGroupSpecs", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress", "headContainerIndex"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                "numOfHosts", "idleTimeoutSeconds", "suspend", "scaleStrategy"}


def _manifests():
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc]


def _validate_k8s(doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_kubernetes_manifests_pass_the_kubernetes_schemas():
    kinds = set()
    for name, doc in _manifests():
        kinds.add(doc["kind"])
        if doc["apiVersion"] == "ray.io/v1":
            cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            if doc["kind"] == "RayJob":
                assert set(doc["spec"]) <= RAYJOB_SPEC, (name, set(doc["spec"]) - RAYJOB_SPEC)
            assert set(cluster) <= RAYCLUSTER_SPEC, name
            assert set(cluster["headGroupSpec"]) <= HEAD_GROUP, name
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for group in cluster["workerGroupSpecs"]:
                assert set(group) <= WORKER_GROUP, (name, group["groupName"])
            for group in groups:            # every pod template is a real Kubernetes pod spec
                _validate_k8s({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
                               "spec": group["template"]["spec"]})
                assert group["template"]["spec"]["serviceAccountName"] == "dmafn", name
        else:
            _validate_k8s(doc)
    assert {"ServiceAccount", "CronJob", "Role", "RoleBinding", "RayJob", "RayCluster"} <= kinds


def test_the_kubernetes_check_would_catch_a_broken_manifest():
    import jsonschema

    cron = next(d for _, d in _manifests() if d["kind"] == "CronJob")
    broken = {**cron, "spec": {**cron["spec"], "shedule": "30 2 * * *"}}
    with pytest.raises(jsonschema.ValidationError, match="shedule"):
        _validate_k8s(broken)


def test_the_pods_service_account_exists_with_its_iam_role():
    accounts = {d["metadata"]["name"]: d for _, d in _manifests() if d["kind"] == "ServiceAccount"}
    assert "dmafn" in accounts and "dmafn-scheduler" in accounts
    assert accounts["dmafn"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_the_nightly_rayjob_has_a_deadline_and_a_retry_limit():
    job = next(d for _, d in _manifests() if d["kind"] == "RayJob")
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["backoffLimit"] >= 1
    cron = next(d for _, d in _manifests() if d["kind"] == "CronJob")
    attempts = job["spec"]["backoffLimit"] + 1
    assert cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > attempts * job["spec"]["activeDeadlineSeconds"]


@pytest.mark.parametrize("deployment, job, code", [("Complete", "SUCCEEDED", 0), ("Complete", "FAILED", 1),
                                                   ("Failed", "", 1), ("Complete", "STOPPED", 1)])
def test_the_nightly_cronjob_fails_when_the_rayjob_fails(tmp_path, deployment, job, code):
    """The CronJob's script against a stand-in kubectl: Running twice, then the given end."""
    cron = next(d for _, d in _manifests() if d["kind"] == "CronJob")
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    (bin_dir / "kubectl").write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
case "$*" in
  *jobDeploymentStatus*) n=$(grep -c jobDeploymentStatus {tmp_path}/calls)
                         if [ "$n" -le 2 ]; then echo Running; else echo {deployment}; fi ;;
  *jobStatus*) echo {job} ;;
  *reason*) echo "DeadlineExceeded: the job ran past its deadline" ;;
esac
""")
    for tool in ("sleep", "kubectl"):
        (bin_dir / tool).chmod(0o755)
    run = subprocess.run(["sh", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == code, run.stdout + run.stderr
    calls = (tmp_path / "calls").read_text()
    assert "apply -f /manifests/rayjob-nightly.yaml" in calls and calls.count("jobDeploymentStatus") == 3


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
