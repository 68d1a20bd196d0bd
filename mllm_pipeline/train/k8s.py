"""The training pod: what ``launcher: k8s`` asks ``dagster_k8s.PipesK8sClient`` for.

The project's image, the training command, ``gpus`` GPUs (``nvidia.com/gpu``), a memory-backed ``/dev/shm`` (DDP's
data loaders and NCCL need more than a container's default 64 MB) and the user's pod spec, which must mount the run
directory at its own path (the run writes its checkpoints there and the asset commits them from there).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


class PodSpecError(ValueError):
    """The pod cannot be built from the configuration (no image, the run directory not mounted)."""


def training_pod_args(*, image: str, command: list[str], env: dict[str, str], work: str, gpus: int,
                      pod_spec: dict[str, Any], namespace: str = "") -> dict[str, Any]:
    """``PipesK8sClient.run`` arguments (all but context and extras) for the training pod."""
    if not image:
        raise PodSpecError("launcher k8s: set k8s_image (the run has no container image to default to)")
    spec = copy.deepcopy(pod_spec)
    containers = spec.setdefault("containers", [{}])
    container = containers[0]
    container.setdefault("name", "train")
    resources = container.setdefault("resources", {})
    for kind in ("limits", "requests"):
        resources.setdefault(kind, {})["nvidia.com/gpu"] = str(gpus)
    spec.setdefault("volumes", []).append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    mounts = container.setdefault("volumeMounts", [])
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if not any(Path(work).is_relative_to(m.get("mountPath", "")) for m in mounts if m.get("mountPath") not in ("", "/dev/shm")):
        raise PodSpecError(f"launcher k8s: the run directory {work} must be on a volume the training pod mounts at "
                           "the same path: add it to k8s_pod_spec (volumes + containers[0].volumeMounts)")
    args: dict[str, Any] = {"image": image, "command": command, "env": env, "base_pod_spec": spec,
                            "base_pod_meta": {"labels": {"app.kubernetes.io/component": "mllm-train"}}}
    if namespace:
        args["namespace"] = namespace
    return args
