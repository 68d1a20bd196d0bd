"""Resources shared by every asset: the storage root and experiment tracking."""

import os

import dagster as dg
from pydantic import Field

from mllm_pipeline.stages.gate import pipeline_storage
from mllm_pipeline.storage import Storage, resolve_root
from mllm_pipeline.tracking import MODES, TrackingSettings


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


class TrackingResource(dg.ConfigurableResource):
    """Where the media downloads and the training report their metrics: Weights & Biases and / or TensorBoard.
    Both are off by default; set once for the code location (``default_tracking`` reads the environment, see the
    README's "Tracking runs" section) or per run in the launchpad (``resources: tracking: config: ...``).

    When on, ``images_*`` enables img2dataset's own W&B reporting with these settings (one W&B run per shard fetch,
    in the asset run's group) and every media asset logs its per-shard statistics and a table of its shards;
    ``train_mllm`` hands the settings to the training process, whose rank 0 logs every logged step (loss, lr, grad
    norm, tokens/s, MFU, memory, validation loss) with the run's config and manifests version. The materialization
    metadata links to the run (W&B URL or offline run directory, TensorBoard log directory).

    A resource of our own rather than dagster-wandb's ``wandb_resource``: that one logs in with an API key (which
    offline runs have no use for), hands assets the ``wandb`` module in the Dagster process only, and knows nothing
    of TensorBoard; the metrics here are logged by a training subprocess and by the downloaders' own processes,
    which get plain settings (:class:`mllm_pipeline.tracking.TrackingSettings`) instead.
    """

    wandb: bool = Field(default=False, description="Log to Weights & Biases.")
    mode: str = Field(default="online", description="W&B mode: online (needs WANDB_API_KEY where runs execute) or "
                      "offline (run files stay under wandb_dir; `wandb sync` uploads them later).")
    project: str = Field(default="mllm_pipeline", description="W&B project.")
    entity: str = Field(default="", description="W&B entity (team or user); empty: the API key's default.")
    run_name: str = Field(default="", description="W&B run name and TensorBoard run directory; empty: the asset key "
                          "and partition (e.g. images_cc3m/shard-00003).")
    wandb_dir: str = Field(default="", description="Where W&B writes its files (offline runs stay there); empty: "
                           "the working directory of the code location.")
    tensorboard: bool = Field(default=False, description="Write TensorBoard event files.")
    tensorboard_dir: str = Field(default="tensorboard", description="TensorBoard log root (a local directory); "
                                 "each run writes into <tensorboard_dir>/<run name>/<run id>.")

    def settings(self) -> TrackingSettings:
        return TrackingSettings(wandb=self.wandb, mode=self.mode, project=self.project, entity=self.entity,
                                run_name=self.run_name, wandb_dir=self.wandb_dir, tensorboard=self.tensorboard,
                                tensorboard_dir=self.tensorboard_dir)

    def for_asset(self, context: dg.AssetExecutionContext) -> TrackingSettings:
        """The settings for this asset's run: named after the asset key and partition (or partition range), with a
        run id from the Dagster run id and the asset (unique per asset per Dagster run)."""
        try:
            settings = self.settings()
        except ValueError as e:
            raise dg.Failure(f"tracking resource: {e}") from None
        name = context.asset_key.to_user_string()
        if context.has_partition_key_range:
            r = context.partition_key_range
            name += f"/{r.start}" if r.start == r.end else f"/{r.start}...{r.end}"
        elif context.has_partition_key:
            name += f"/{context.partition_key}"
        return settings.for_run(name, run_id=f"{context.run.run_id[:8]}-{context.asset_key.to_python_identifier()}")


def default_tracking() -> TrackingResource:
    """Tracking as the environment of the code location says: ``MLLM_WANDB`` = ``online`` or ``offline`` turns W&B
    on (``WANDB_PROJECT``, ``WANDB_ENTITY`` and ``WANDB_DIR`` as W&B reads them); ``MLLM_TENSORBOARD_DIR`` set turns
    TensorBoard on, writing there. Unset: both off."""
    mode = os.environ.get("MLLM_WANDB", "").strip().lower()
    if mode and mode not in (*MODES, "off"):
        raise ValueError(f"MLLM_WANDB must be online, offline or off, got {mode!r}")
    tb = os.environ.get("MLLM_TENSORBOARD_DIR", "")
    return TrackingResource(wandb=mode in MODES, mode=mode if mode in MODES else "online",
                            project=os.environ.get("WANDB_PROJECT") or "mllm_pipeline",
                            entity=os.environ.get("WANDB_ENTITY", ""), wandb_dir=os.environ.get("WANDB_DIR", ""),
                            tensorboard=bool(tb), tensorboard_dir=tb or "tensorboard")
