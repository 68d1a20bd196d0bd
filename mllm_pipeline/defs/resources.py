"""Resources shared by every asset."""


import dagster as dg
from pydantic import Field

from mllm_pipeline.stages.gate import pipeline_storage
from mllm_pipeline.storage import Storage, resolve_root


class StorageResource(dg.ConfigurableResource):
    """The one storage root every asset reads and writes (local directory or s3://bucket/prefix).

    Defaults to ``$MLLM_STORAGE_ROOT``, else ``./data``. S3 credentials and endpoint come from the environment
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``MLLM_S3_ENDPOINT_URL``), never from this config.
    """

    root: str = Field(default="", description="Local directory or s3://bucket/prefix. Empty: $MLLM_STORAGE_ROOT, else ./data.")

    def get(self) -> Storage:
        """The root, with the commit gate (:mod:`mllm_pipeline.stages.gate`): every version is checked before it
        becomes current."""
        return pipeline_storage(self.root or None)


def default_storage() -> StorageResource:
    return StorageResource(root=resolve_root())
