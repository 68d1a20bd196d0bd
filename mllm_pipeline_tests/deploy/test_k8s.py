"""The Kubernetes files in docker/k8s/ and the training pod that train_mllm asks PipesK8sClient for (no cluster)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from mllm_pipeline.defs.train import TrainAssetConfig, k8s_run_args
from mllm_pipeline_tests.helpers import unavailable
from mllm_pipeline_tests.train.conftest import manifest_root  # noqa: F401 -- the fixture

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "docker" / "k8s"
COMMAND = ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "-m", "mllm_pipeline.train"]


def _train_config() -> dict:
    return yaml.safe_load((K8S / "train_run_config.yaml").read_text())["ops"]["train_mllm"]["config"]


def test_helm_values_use_the_image_k8s_run_launcher_postgres_and_the_s3_secret():
    values = yaml.safe_load((K8S / "values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["codeServerArgs"][:2] == ["-m", "mllm_pipeline.definitions"]
    assert deployment["codeServerArgs"][deployment["codeServerArgs"].index("--location-name") + 1] == "mllm_pipeline"
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert {"name": "mllm-s3"} in deployment["envSecrets"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert {"name": "mllm-s3"} in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    assert values["postgresql"]["enabled"] is True
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    pvc = yaml.safe_load((K8S / "scratch-pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "mllm-scratch"
    mounts = {m["mountPath"] for m in deployment["volumeMounts"]}
    assert deployment["env"]["TMPDIR"] in mounts


def test_training_pod_requests_the_gpus_and_uses_the_image():
    config = TrainAssetConfig(**_train_config())
    assert config.launcher == "k8s"
    args = k8s_run_args(config, COMMAND, {"PYTHONUNBUFFERED": "1"}, "/scratch/mllm-train/abc",
                        run_image="registry.example.com/mllm-pipeline:0.1.0")
    assert args["image"] == "registry.example.com/mllm-pipeline:0.1.0" and args["command"] == COMMAND
    container = args["base_pod_spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["limits"]["memory"] == "400Gi"  # the user's pod spec is kept
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert args["base_pod_spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert config.k8s_pod_spec["containers"][0]["resources"]["limits"] == {"memory": "400Gi"}  # not mutated


def test_training_pod_without_the_run_directory_mounted_or_an_image_is_refused(monkeypatch):
    config = TrainAssetConfig(launcher="k8s", nproc_per_node=2, k8s_image="img:1")
    with pytest.raises(dg.Failure, match="same path"):
        k8s_run_args(config, COMMAND, {}, "/scratch/mllm-train/abc")
    monkeypatch.delenv("DAGSTER_CURRENT_IMAGE", raising=False)
    with pytest.raises(dg.Failure, match="k8s_image"):
        k8s_run_args(TrainAssetConfig(launcher="k8s"), COMMAND, {}, "/scratch/x")


def _dagster_k8s():
    try:
        import dagster_k8s
    except ImportError:
        unavailable("dagster-k8s (the k8s extra) is not installed")
    return dagster_k8s


def test_pipes_k8s_client_builds_a_valid_pod_from_the_arguments():
    _dagster_k8s()
    import kubernetes
    from dagster_k8s.pipes import build_pod_body

    args = k8s_run_args(TrainAssetConfig(**_train_config()), COMMAND, {"PYTHONUNBUFFERED": "1"},
                        "/scratch/mllm-train/abc", run_image="registry.example.com/mllm-pipeline:0.1.0")
    pod = build_pod_body("dagster-train-1", args["image"], args["command"], {**args["env"], "DAGSTER_PIPES_CONTEXT": "x"},
                         args["base_pod_meta"], args["base_pod_spec"])
    body = kubernetes.client.ApiClient().sanitize_for_serialization(pod)
    (container,) = body["spec"]["containers"]
    assert container["image"] == "registry.example.com/mllm-pipeline:0.1.0"
    assert container["command"] == COMMAND
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert body["spec"]["restartPolicy"] == "Never"
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in container["env"]
    assert body["metadata"]["labels"]["app.kubernetes.io/component"] == "mllm-train"


def test_the_asset_hands_the_pod_to_pipes_k8s_client(manifest_root, monkeypatch):  # noqa: F811
    """train_mllm with launcher k8s: PipesK8sClient.run gets the pod (no cluster: the fake stops there)."""
    dagster_k8s = _dagster_k8s()
    from dagster._core.errors import DagsterPipesExecutionError

    from mllm_pipeline.defs.resources import StorageResource, TrackingResource
    from mllm_pipeline.defs.train import train_mllm

    calls = []

    class FakeClient:
        def run(self, **kwargs):
            calls.append(kwargs)
            raise DagsterPipesExecutionError("no cluster here")

    monkeypatch.setattr(dagster_k8s, "PipesK8sClient", FakeClient)
    work_mount = {"name": "root", "mountPath": manifest_root.root}
    spec = {"volumes": [{"name": "root", "hostPath": {"path": manifest_root.root}}],
            "containers": [{"volumeMounts": [work_mount]}]}
    result = dg.materialize(
        [train_mllm], resources={"storage": StorageResource(root=manifest_root.root), "tracking": TrackingResource()}, raise_on_error=False,
        run_config={"ops": {"train_mllm": {"config": {"max_steps": 2, "tiny": True, "launcher": "k8s", "nproc_per_node": 2,
                                                      "k8s_image": "img:1", "k8s_pod_spec": spec}}}})
    assert not result.success and "no cluster here" in result.get_step_failure_events()[0].step_failure_data.error.message
    (call,) = calls
    assert call["image"] == "img:1" and call["command"][:4] == ["python", "-m", "torch.distributed.run", "--standalone"]
    assert call["base_pod_spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert call["extras"]["manifests"] and call["context"] is not None
