"""The training stage's output: where a run trains, what names its result, and how the result commits.

* ``checkpoints/train_mllm/runs/<run key>/``: the working directory of a run (checkpoints, metrics). The run key is
  a hash of the training configuration (all but steps / checkpointing / logging), the manifests version and the
  process count, so with ``resume`` a run with the same configuration continues from its newest checkpoint (raising
  ``steps`` extends a finished run). On an ``s3://`` root the run trains in a local directory
  (``$TMPDIR/mllm-train/<run key>``; resuming works on the same machine) and its checkpoints are uploaded after.
* ``checkpoints/train_mllm/<version>/``: the committed result (``model/``, ``metrics.jsonl``, ``train_config.json``,
  ``summary.json``), named by the manifests version, the configuration and :data:`CODE_VERSION`; its lineage is the
  manifests version it trained on, so retention keeps those manifests (and their media) as long as it is kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mllm_pipeline.storage import Storage

PREFIX = "checkpoints/train_mllm"
MANIFESTS = "manifests"
#: Bump when the training entry point changes what a run with the same configuration produces.
CODE_VERSION = "train-4"


class TrainingRun:
    """One training run of ``cfg`` (a :class:`~mllm_pipeline.train.config.TrainConfig`) on a manifests version."""

    def __init__(self, storage: Storage, cfg: Any, manifests_version: str, nproc_per_node: int):
        self.storage, self.cfg, self.manifests_version, self.nproc = storage, cfg, manifests_version, nproc_per_node
        self.key = hashlib.sha256(f"{cfg.fingerprint()}|{manifests_version}|{nproc_per_node}".encode()).hexdigest()[:16]
        self.identity = {"stage": "train", "code": CODE_VERSION, "manifests": manifests_version,
                         "config": cfg.to_dict(), "nproc_per_node": nproc_per_node}
        self.manifests_ref = {"prefix": MANIFESTS, "version": manifests_version}
        self.run_rel = f"{PREFIX}/runs/{self.key}"
        self.work = (Path(storage.uri(self.run_rel)) if storage.local
                     else Path(tempfile.gettempdir()) / "mllm-train" / self.key)
        self.t0 = time.time()

    def up_to_date(self) -> dict[str, Any] | None:
        """The committed result of this exact run, if there is one."""
        return self.storage.up_to_date(PREFIX, self.identity)

    def command(self, resume: bool, tracking: str = "") -> list[str]:
        """``python -m mllm_pipeline.train ...`` (``torch.distributed.run`` for several processes). ``tracking``:
        W&B / TensorBoard settings as JSON (``--tracking``; not part of the run's identity)."""
        self.work.mkdir(parents=True, exist_ok=True)
        args = ["-m", "mllm_pipeline.train", "--storage-root", self.storage.root, "--manifests", MANIFESTS,
                "--manifests-version", self.manifests_version, "--output", str(self.work),
                "--config", json.dumps(self.cfg.to_dict())]
        if not resume:
            args.append("--no-resume")
        if tracking:
            args += ["--tracking", tracking]
        if self.nproc > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.nproc),
                    *args]
        return [sys.executable, *args]

    def commit(self) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], float]:
        """Commit the finished run's model, metrics and config; ``(manifest, summary, metrics rows, wall seconds)``."""
        from mllm_pipeline.train.metrics import read_metrics

        st, work = self.storage, self.work
        wall = time.time() - self.t0
        summary = json.loads((work / "summary.json").read_text())
        rows = read_metrics(work)
        with st.new_version(PREFIX, self.identity, inputs=[self.manifests_ref]) as version:
            for name in ("metrics.jsonl", "train_config.json", "summary.json"):
                st.write_bytes(version.rel(name), (work / name).read_bytes())
            upload(st, work / "model", version.rel("model"))
            if not st.local:
                upload(st, work / "checkpoints", f"{self.run_rel}/checkpoints")
            manifest = version.commit({"kind": "train_mllm", "summary": summary, "run_key": self.key,
                                       "run_dir": st.uri(self.run_rel), "manifests_version": self.manifests_version,
                                       "config": self.cfg.to_dict()})
        return manifest, summary, rows, wall


def upload(st: Storage, local: Path, rel: str) -> None:
    """Copy the local directory ``local`` to ``rel`` under the storage root, file by file, streaming."""
    for p in sorted(local.rglob("*")):
        if p.is_file():
            with st.open(f"{rel}/{p.relative_to(local).as_posix()}", "wb") as f, open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)


def committed_metrics(st: Storage, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics rows of a committed training version."""
    try:
        text = st.read_bytes(f"{manifest['prefix']}/{manifest['version']}/metrics.jsonl").decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
