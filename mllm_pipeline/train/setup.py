"""Everything a run sets up before its first step: the manifests it trains on, the model (from configs, named
checkpoints, or ``init_from``), the precision policy, the printed memory estimate and the wrapping (DDP / FSDP2).

Precision ``mixed`` (the default on CUDA): weights that do not train are stored in bfloat16 (half the memory of
the frozen LLM of pretraining), trainable weights stay float32 and so do their AdamW states (the fp32 master
copy *is* the trained parameter); the forward runs under bf16 autocast. Under FSDP2 the same policy holds per
shard, all-gathered in bf16 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from mllm_pipeline.model import MLLM, MLLMConfig, build_model, tiny_config
from mllm_pipeline.storage import Storage
from mllm_pipeline.train.config import TrainConfig, TrainError
from mllm_pipeline.train.dist import Dist

GIB = 1024**3


@dataclasses.dataclass
class ManifestInfo:
    version: str
    hd_num: int
    video_frames: int
    video_hd_num: int
    tokenizer: str  # local directory or hub name
    location: str


def manifest_info(storage: Storage, prefix: str = "manifests", version: str | None = None) -> ManifestInfo:
    """The current manifests (or the committed ``version``: a run trains on exactly the version it was started on,
    whatever is committed after)."""
    try:
        m = storage.read_manifest(prefix)
    except FileNotFoundError as e:
        raise TrainError(f"{e} (the manifests asset writes it)") from None
    if version is not None and m["version"] != version:
        m = storage.committed_version(prefix, version)
        if m is None:
            raise TrainError(f"no committed manifests version {version} under {storage.uri(prefix)}")
    cfg = m.get("summary", {}).get("config", {})
    version = m["version"]
    tok = cfg.get("tokenizer") or ""
    if not tok:
        rel = f"{prefix}/{version}/tokenizer"
        if not storage.exists(f"{rel}/tokenizer.json"):
            raise TrainError(f"the manifests at {storage.uri(f'{prefix}/{version}')} name no tokenizer and hold no "
                             "tokenizer/ directory")
        if storage.local:
            tok = storage.uri(rel)
        else:  # fetch the small demo tokenizer to a local temp dir
            import tempfile

            tok = tempfile.mkdtemp(prefix="mllm-tokenizer-")
            for name in storage.listdir(rel):
                Path(tok, name).write_bytes(storage.read_bytes(f"{rel}/{name}"))
    return ManifestInfo(version, int(cfg.get("hd_num", 9)), int(cfg.get("video_frames", 8)),
                        int(cfg.get("video_hd_num", 1)), tok, storage.uri(f"{prefix}/{version}"))


def model_config(cfg: TrainConfig, info: ManifestInfo, tokenizer: Any) -> MLLMConfig:
    """The MLLMConfig for this run: media settings from the manifests, placeholder ids from the tokenizer."""
    spec = dict(cfg.model)
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    for name, have in (("hd_num", info.hd_num), ("video_frames", info.video_frames), ("video_hd_num", info.video_hd_num)):
        if name in spec and int(spec[name]) != have:
            raise TrainError(f"model config {name}={spec[name]} disagrees with the manifests' {name}={have} (their "
                             f"media-token counts were computed for it): rebuild the manifests or drop {name}")
        spec[name] = have
    spec.update(image_token_id=image_id, video_token_id=video_id)
    tiny = spec.pop("tiny", False)
    try:
        if tiny:
            vocab = int(math.ceil(len(tokenizer) / 64) * 64)
            spec.setdefault("vocab_size", vocab)
            return tiny_config(**spec)
        return MLLMConfig.from_dict(spec)
    except (TypeError, ValueError) as e:
        raise TrainError(f"bad model config {cfg.model}: {e}") from None


def fit_vocab(model: MLLM, tokenizer: Any) -> None:
    emb = model.llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > emb:  # the placeholders were added to the tokenizer: grow the embedding table
        model.llm.resize_token_embeddings(len(tokenizer))



def build(cfg: TrainConfig, info: ManifestInfo, tokenizer: Any) -> MLLM:
    """The model of this run: ``init_from`` (an official 4KHD checkpoint, converted, or a saved MLLM), else from
    ``cfg.model``. The manifests' media settings and the tokenizer's placeholder ids always win."""
    if not cfg.init_from:
        mcfg = model_config(cfg, info, tokenizer)
        if cfg.grad_checkpointing:
            mcfg = mcfg.replace(gradient_checkpointing=True)
        model = build_model(mcfg)
        fit_vocab(model, tokenizer)
        return model
    from mllm_pipeline.model.convert import ConversionError, is_official_checkpoint, load_official

    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    over = {k: v for k, v in cfg.model.items() if k not in ("tiny", "vision", "llm", "vision_config", "llm_config")}
    over.update(image_token_id=image_id, video_token_id=video_id, hd_num=info.hd_num, video_frames=info.video_frames,
                video_hd_num=info.video_hd_num)
    if cfg.grad_checkpointing:
        over["gradient_checkpointing"] = True
    path = Path(cfg.init_from)
    try:
        if is_official_checkpoint(path):
            model = load_official(path, **over)
        elif (path / "mllm_config.json").exists():
            model = MLLM.from_pretrained(path, **over)
        else:
            raise TrainError(f"init_from {cfg.init_from}: neither an official InternLM-XComposer2-4KHD checkpoint "
                             "(plora_glb_GN in its weights) nor an MLLM directory (mllm_config.json)")
    except (ConversionError, FileNotFoundError, TypeError) as e:
        raise TrainError(f"init_from {cfg.init_from}: {e}") from None
    fit_vocab(model, tokenizer)
    return model


def apply_precision(model: MLLM, precision: str) -> None:
    """Cast in place (parameters keep their identity, so optimizer groups stay valid): ``mixed`` frozen -> bf16,
    trainable -> fp32; ``fp32`` / ``bf16`` everything."""
    for p in model.parameters():
        if precision == "fp32" or (precision == "mixed" and p.requires_grad):
            want = torch.float32
        else:
            want = torch.bfloat16
        if p.dtype != want:
            p.data = p.data.to(want)


def memory_estimate(model: MLLM, cfg: TrainConfig, dist: Dist, precision: str) -> dict[str, float]:
    """GiB per rank before the first step: weights, gradients, AdamW states (sharded by the world size under
    FSDP) and a rough activation figure for one micro-batch of ``tokens_per_batch`` LLM tokens (34·h bytes per
    token and layer without activation checkpointing, 2·h with it; a ViT crop counted as its 577 tokens)."""
    shard = dist.world_size if cfg.fsdp else 1
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / shard
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tbytes = 2 if precision == "bf16" else 4
    grads = trainable * tbytes / shard
    adam = trainable * 2 * tbytes / shard
    lcfg, vcfg = model.llm.config, model.vision.tower.config
    act_b = 2 if precision in ("mixed", "bf16") else 4
    per_layer = (1 if cfg.grad_checkpointing else 17) * act_b
    llm_act = cfg.tokens_per_batch * lcfg.num_hidden_layers * lcfg.hidden_size * per_layer
    crops = cfg.tokens_per_batch / 144  # an upper bound: every token an image token
    vit_act = crops * (model.vision.grid**2 + 1) * vcfg.num_hidden_layers * vcfg.hidden_size * per_layer
    head = cfg.tokens_per_batch * 0.1 * lcfg.vocab_size * 4  # logits at ~10 % supervised positions, fp32
    out = {"weights": weights / GIB, "gradients": grads / GIB, "optimizer": adam / GIB,
           "activations": (llm_act + vit_act + head) / GIB}
    out["total"] = sum(out.values())
    return out


def format_memory(est: dict[str, float], precision: str, world: int, fsdp: bool) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in est.items() if k != "total")
    return (f"memory estimate per rank ({precision}, {'FSDP2 over ' + str(world) if fsdp else 'replicated'}): "
            f"{parts} -> total {est['total']:.2f} GiB")


def wrap(model: MLLM, cfg: TrainConfig, dist: Dist, precision: str) -> torch.nn.Module:
    """DDP, or FSDP2 (``fully_shard``) on every LLM decoder layer and every ViT block, then on the whole model. One
    process is left unwrapped (nothing to shard; its checkpoints are still DCP directories under ``fsdp``)."""
    if dist.world_size == 1:
        return model
    if not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                   find_unused_parameters=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision in ("mixed", "bf16") else MixedPrecisionPolicy()
    for block in sharded_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def sharded_blocks(model: MLLM) -> list[torch.nn.Module]:
    """The units FSDP2 shards one by one: the LLM's decoder layers and the ViT's encoder blocks."""
    blocks = list(model.llm.get_decoder().layers)
    blocks += [m for m in model.vision.tower.modules() if type(m).__name__.endswith("EncoderLayer")]
    return blocks


__all__ = ["ManifestInfo", "apply_precision", "build", "fit_vocab", "format_memory", "manifest_info",
           "memory_estimate", "model_config", "sharded_blocks", "wrap"]
