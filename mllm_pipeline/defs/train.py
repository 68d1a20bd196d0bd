"""The training asset: ``train_mllm`` runs ``python -m mllm_pipeline.train`` (or ``torchrun`` with
``nproc_per_node > 1``) through Dagster Pipes on the committed manifests. Where the run trains and how its result
commits: :mod:`mllm_pipeline.stages.checkpoints`; the training pod of ``launcher: k8s``: :mod:`mllm_pipeline.train.k8s`.

The asset runs in the ``gpu`` pool (set a pool limit of 1 per GPU machine in dagster.yaml / the UI so two runs
never share one GPU) and is tagged ``compute: gpu``.
"""


import os
from pathlib import Path
from typing import Any, Optional

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not exported at the top level in 1.13
from pydantic import Field

from mllm_pipeline.defs.plots import line_chart, tracking_metadata
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.stages.checkpoints import CODE_VERSION, MANIFESTS, TrainingRun, committed_metrics
from mllm_pipeline.stages.lineage import pinned
from mllm_pipeline.tracking import read_links
from mllm_pipeline.train.k8s import PodSpecError, training_pod_args
from mllm_pipeline.train.preflight import check_model_sources

CHECK = "loss_decreasing"


#: TrainConfig fields set at the asset's top level (the rest are under ``options``); the same names as the CLI's
#: ``--config`` JSON and ``train_config.json``.
TOP_LEVEL = ("stage", "preset", "init_from", "max_steps", "lr", "tokens_per_batch", "grad_accum", "checkpoint_every")


class TrainOptions(dg.Config):
    """Further TrainConfig fields (:class:`mllm_pipeline.train.config.TrainConfig`): unset ones keep its default (or
    the preset's value). The names are the CLI's (``python -m mllm_pipeline.train --config '{...}'``)."""

    llm_lr_scale: Optional[float] = Field(default=None, description="sft: the base LLM's lr = lr * llm_lr_scale (default 0.1).")
    vision_lr_scale: Optional[float] = Field(default=None, description="The ViT's lr scale (default 1.0).")
    vision_layer_decay: Optional[float] = Field(default=None, description="ViT layer-wise lr decay in (0, 1] (default 1.0; the presets 0.9).")
    weight_decay: Optional[float] = Field(default=None, description="AdamW weight decay (default 0.0; the presets 0.1).")
    betas: Optional[list[float]] = Field(default=None, description="AdamW betas (default [0.9, 0.95]).")
    max_grad_norm: Optional[float] = Field(default=None, description="Gradient clipping norm, 0 disables (default 1.0).")
    warmup_steps: Optional[int] = Field(default=None, description="Linear warmup steps (default: max_steps // 10, at most 10; "
                                        "0 uses warmup_ratio).")
    warmup_ratio: Optional[float] = Field(default=None, description="Warmup as a fraction of max_steps, when warmup_steps is 0.")
    min_lr_ratio: Optional[float] = Field(default=None, description="The cosine ends at lr * min_lr_ratio (default 0.1).")
    packing: Optional[bool] = Field(default=None, description="Several samples per row up to tokens_per_batch (default true).")
    buffer_rows: Optional[int] = Field(default=None, description="Rows the packer looks ahead (default 512).")
    grad_checkpointing: Optional[bool] = Field(default=None, description="Activation checkpointing (default false).")
    precision: Optional[str] = Field(default=None, description="auto (mixed on CUDA, fp32 on the CPU), mixed, fp32 or bf16.")
    bf16: Optional[bool] = Field(default=None, description="Autocast to bfloat16 on CUDA (default true).")
    seed: Optional[int] = Field(default=None, description="Seed of the data order, dropout and initialisation (default 0).")
    keep_checkpoints: Optional[int] = Field(default=None, description="Newest N checkpoints kept, 0 all (default 2).")
    log_every: Optional[int] = Field(default=None, description="Steps between metrics.jsonl rows (default 1).")
    val_every: Optional[int] = Field(default=None, description="Validation loss every N steps, 0 never (default 0).")
    val_batches: Optional[int] = Field(default=None, description="Batches of the val split per validation (default 8).")
    fsdp: Optional[bool] = Field(default=None, description="FSDP2 per decoder layer and ViT block (default false).")
    device: Optional[str] = Field(default=None, description="cuda or cpu (default: cuda when available).")
    peak_tflops: Optional[float] = Field(default=None, description="Per-GPU peak for MFU (default: from the GPU's name).")
    prefetch: Optional[int] = Field(default=None, description="loader thread: batches kept ready (default 2).")
    loader: Optional[str] = Field(default=None, description="workers (DataLoader processes, default) or thread.")
    num_workers: Optional[int] = Field(default=None, description="DataLoader workers per rank (default 2).")
    prefetch_factor: Optional[int] = Field(default=None, description="Batches each worker keeps ready (default 2).")
    pin_memory: Optional[bool] = Field(default=None, description="Page-locked batches on CUDA (default true).")
    hd_num_by_dataset: Optional[dict[str, int]] = Field(default=None, description="Images of these datasets at their own "
                                                        "hd_num, e.g. {coco: 9, cc3m: 16}.")

    def set_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TrainAssetConfig(dg.Config):
    tiny: bool = Field(default=False, description="A small random model, to try the pipeline end to end (what the "
                       "demo trains). Ignored when vision and llm or init_from are set.")
    vision: str = Field(default="", description="Vision tower: hub name (in the local Hugging Face cache) or local path "
                        "(e.g. openai/clip-vit-large-patch14-336).")
    llm: str = Field(default="", description="LLM: hub name (in the local cache) or local path (its tokenizer must be "
                     "the manifests' tokenizer).")
    model_options: dict[str, Any] = Field(default={}, description="Further MLLMConfig fields, e.g. {adapter: lora, "
                                          "lora_rank: 64, dtype: bfloat16, trust_remote_code: true}. hd_num / "
                                          "video_frames / video_hd_num come from the manifests (a different value is an error).")
    stage: str = Field(default="pretrain", description="pretrain (LLM frozen) or sft (everything trains).")
    preset: str = Field(default="", description="pretrain or sft: the paper's recipe (trainable parts, lr, 1% warmup, "
                        "cosine to zero, ViT layer-wise lr decay 0.9) for every option not set.")
    init_from: str = Field(default="", description="Start from these weights: an official InternLM-XComposer2-4KHD "
                           "checkpoint directory (converted on load) or a saved MLLM directory. The manifests' "
                           "tokenizer must be that model's (InternLM2's).")
    max_steps: int = Field(default=30, description="Optimizer steps.")
    lr: float = Field(default=2e-3, description="Peak learning rate (warmup, then cosine to min_lr_ratio).")
    tokens_per_batch: int = Field(default=4096, description="Tokens per micro-batch per process (with packing, the default: one row of samples back to back).")
    grad_accum: int = Field(default=1, description="Micro-batches per optimizer step.")
    checkpoint_every: int = Field(default=10, description="Checkpoint every N steps (and at the end).")
    resume: bool = Field(default=True, description="Continue from the newest checkpoint of the same configuration.")
    nproc_per_node: int = Field(default=1, description="Processes (GPUs); more than 1 launches torchrun (DDP).")
    options: TrainOptions = Field(default=TrainOptions(), description="Further training options (YAML fields: packing, "
                                  "fsdp, val_every, hd_num_by_dataset, num_workers, seed, ...), named as in the CLI's --config.")
    launcher: str = Field(default="subprocess", description="subprocess (here, through PipesSubprocessClient) or k8s "
                          "(a pod of its own through dagster-k8s' PipesK8sClient, requesting nproc_per_node GPUs).")
    k8s_image: str = Field(default="", description="launcher k8s: the pod's image (default: the image this "
                           "run was launched from).")
    k8s_namespace: str = Field(default="", description="launcher k8s: the pod's namespace (default: the client's).")
    k8s_pod_spec: dict[str, Any] = Field(default={}, description="launcher k8s: merged into the pod spec: volumes (the "
                                         "run directory's volume, mounted at the same path), nodeSelector, tolerations, "
                                         "and containers[0] fields such as volumeMounts.")

    def train_config(self) -> dict[str, Any]:
        model = dict(self.model_options)
        if self.vision or self.llm:
            if not (self.vision and self.llm):
                raise dg.Failure("train_mllm: set both config fields 'vision' and 'llm' (hub names or local paths)")
            model = {"vision": self.vision, "llm": self.llm, **model}
        elif self.tiny:
            model = {"tiny": True, **model}
        elif not self.init_from:
            raise dg.Failure("train_mllm: no model configured. Set config fields 'vision' and 'llm' (hub names or "
                             "local paths, e.g. openai/clip-vit-large-patch14-336 and your LLM), or 'init_from' (an "
                             "official InternLM-XComposer2-4KHD checkpoint or a saved MLLM directory), or 'tiny: true' "
                             "(a small random model, to try the pipeline).")
        if self.init_from:
            model = {k: v for k, v in model.items() if k not in ("tiny", "vision", "llm")}
        cfg = {"stage": self.stage, "max_steps": self.max_steps, "lr": self.lr, "tokens_per_batch": self.tokens_per_batch,
               "grad_accum": self.grad_accum, "checkpoint_every": self.checkpoint_every, "model": model,
               "warmup_steps": min(10, max(0, self.max_steps // 10))}
        if self.init_from:
            cfg["init_from"] = self.init_from
        if self.preset:  # the preset's schedule and stage, unless options set them
            cfg = {k: v for k, v in cfg.items() if k not in ("stage", "lr", "warmup_steps")}
            cfg["preset"] = self.preset
        cfg.update(self.options.set_fields())
        return cfg


def k8s_run_args(config: TrainAssetConfig, command: list[str], env: dict[str, str], work: str,
                 run_image: str | None = None) -> dict[str, Any]:
    """PipesK8sClient.run arguments (all but context and extras) for the training pod
    (:func:`mllm_pipeline.train.k8s.training_pod_args`)."""
    try:
        return training_pod_args(image=config.k8s_image or run_image or os.environ.get("DAGSTER_CURRENT_IMAGE", ""),
                                 command=command, env=env, work=work, gpus=config.nproc_per_node,
                                 pod_spec=dict(config.k8s_pod_spec), namespace=config.k8s_namespace)
    except PodSpecError as e:
        raise dg.Failure(str(e)) from None


def _launch(context: dg.AssetExecutionContext, config: TrainAssetConfig, command: list[str], env: dict[str, str],
            extras: dict[str, Any], work: Path) -> None:
    try:
        if config.launcher == "subprocess":
            dg.PipesSubprocessClient().run(command=command, context=context, env=env, extras=extras)
        elif config.launcher == "k8s":
            try:
                from dagster_k8s import PipesK8sClient  # the k8s extra
            except ImportError:
                raise dg.Failure("launcher k8s needs dagster-k8s: pip install 'mllm_pipeline[k8s]'") from None
            origin = context.run.job_code_origin  # the image the K8sRunLauncher started this run from
            run_image = origin.repository_origin.container_image if origin else None
            PipesK8sClient().run(context=context, extras=extras,
                                 **k8s_run_args(config, ["python", *command[1:]], env, str(work), run_image))
        else:
            raise dg.Failure(f"launcher must be subprocess or k8s, got {config.launcher!r}")
    except DagsterPipesExecutionError as e:
        raise dg.Failure(f"training failed (see the logs above; the run directory {work} keeps its checkpoints "
                         f"for a resume): {e}") from None


@dg.asset(
    group_name="training", kinds={"pytorch", "safetensors"}, deps=[dg.AssetKey(MANIFESTS)], pool="gpu",
    tags={"compute": "gpu"}, code_version=CODE_VERSION,
    check_specs=[dg.AssetCheckSpec(CHECK, asset="train_mllm", description="Every loss is finite and the mean loss "
                                   "of the last quarter of the steps is below the first quarter's.")],
    description="The MLLM trained on the manifests' train split (launched through Dagster Pipes; torchrun for "
                "several GPUs): the final model, metrics.jsonl and checkpoints under checkpoints/train_mllm/. "
                "Metadata: loss curve, throughput, MFU, validation losses, and links to the W&B run and TensorBoard "
                "logs when the tracking resource is on.",
)
def train_mllm(context: dg.AssetExecutionContext, config: TrainAssetConfig, storage: StorageResource,
               tracking: TrackingResource) -> dg.MaterializeResult:
    from mllm_pipeline.train.loop import TrainConfig, TrainError, manifest_info

    st = storage.get()
    try:
        info = manifest_info(st, MANIFESTS)
        cfg = TrainConfig.from_dict(config.train_config())
        check_model_sources(cfg.model, cfg.init_from)  # before any process is launched
    except TrainError as e:
        raise dg.Failure(str(e)) from None
    for name in ("hd_num", "video_frames", "video_hd_num"):
        want = cfg.model.get(name)
        if want is not None and int(want) != getattr(info, name):
            raise dg.Failure(f"model {name}={want} disagrees with the manifests' {name}={getattr(info, name)} "
                             f"({info.location}): rebuild the manifests for it or leave {name} out")
    if config.nproc_per_node < 1:
        raise dg.Failure("nproc_per_node must be at least 1")
    run = TrainingRun(st, cfg, info.version, config.nproc_per_node)
    done = run.up_to_date()
    if done is not None:
        context.log.info(f"up to date: {done['version']} was trained with this configuration on manifests "
                         f"{info.version}; not trained again")
        return _result(done, done["summary"], committed_metrics(st, done), config.nproc_per_node, 0.0, True)
    track = tracking.for_asset(context)
    command = run.command(config.resume, track.to_json() if track.enabled else "")
    context.log.info(f"training in {run.work} (run key {run.key}; resume={config.resume}) on manifests {info.version}")
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    extras = {"run_key": run.key, "manifests": info.version}
    with pinned(st, [run.manifests_ref], f"train_mllm run {context.run.run_id}"):  # retention keeps what it reads
        _launch(context, config, command, env, extras, run.work)
        manifest, summary, rows, wall = run.commit()
    return _result(manifest, summary, rows, config.nproc_per_node, wall, False, read_links(run.work) if track.enabled else {})


def _result(manifest: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]], nproc: int,
            wall: float, up_to_date: bool, links: dict[str, str] | None = None) -> dg.MaterializeResult:
    from mllm_pipeline.train.metrics import loss_check

    losses = [r["loss"] for r in rows]
    passed, why = loss_check(losses)
    md: dict[str, Any] = {
        "final_loss": summary.get("final_loss"),
        "first_loss": summary.get("first_loss"),
        "steps": summary.get("steps"),
        "samples": summary.get("samples"),
        "tokens": summary.get("tokens"),
        "tokens_per_s": round(float(summary.get("tokens_per_s", 0.0)), 1),
        "samples_per_s": round(float(summary.get("samples_per_s", 0.0)), 2),
        "resumed_from_step": summary.get("resumed_from_step", 0),
        "processes": nproc,
        "wall_time_s": round(wall, 1),
        "model": dg.MetadataValue.path(f"{manifest['location']}/model"),
        "checkpoints": dg.MetadataValue.path(f"{manifest['run_dir']}/checkpoints"),
        "manifests_version": manifest["manifests_version"],
        "version": manifest["version"],
        "up_to_date": up_to_date,
    }
    if "mfu" in summary:
        md["mfu"] = round(float(summary["mfu"]), 4)
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if vals:
        md["val_loss"] = round(float(vals[-1][1]), 6)
        md["val_losses"] = dg.MetadataValue.table(
            [dg.TableRecord({"step": int(s), "val_loss": float(v)}) for s, v in vals],
            schema=dg.TableSchema([dg.TableColumn("step", "int"), dg.TableColumn("val_loss", "float")]))
    md.update(tracking_metadata(links or {}))
    if "memory_estimate_gib" in summary:
        md["memory_estimate_gib"] = round(float(summary["memory_estimate_gib"]["total"]), 2)
    pic = line_chart([r["step"] for r in rows], {"loss": losses}, "training loss", "step", "loss")
    if pic:
        md["loss_curve"] = dg.MetadataValue.md(pic)
    return dg.MaterializeResult(metadata=md, check_results=[dg.AssetCheckResult(
        check_name=CHECK, passed=passed, metadata={"detail": why, "steps": len(losses)})],
        data_version=dg.DataVersion(manifest["version"]))
