"""Checkpoints: written under a temporary name and renamed, resumed exactly.

Two formats, by how the model is held:

* replicated (one process, or DDP): rank 0 writes ``model.safetensors`` (a model built from configs alone, the
  tests and the demo) or ``trainable.safetensors`` (both bases named: the frozen weights are reloaded from there)
  and ``optimizer.pt``;
* FSDP2 (``fsdp``): a ``torch.distributed.checkpoint`` directory ``dcp/`` holding the model (all weights, or the
  trainable ones over named bases) and the AdamW states, every rank writing its own shards. It loads on any world
  size (DCP reshards on load), on one process included.

Every rank writes its RNG states (``rng-rank<r>.pt``: python, numpy, torch, CUDA), so a resumed run draws what
an uninterrupted one would on every rank; a rank that the old run did not have is seeded from the seed, the rank
and the step. ``scheduler.pt`` and ``state.json`` (step, data position, world size, format, configuration
fingerprint) come from rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mllm_pipeline.model import MLLM
from mllm_pipeline.train.config import TrainConfig, TrainError
from mllm_pipeline.train.dist import Dist, rng_state, seed_all, set_rng_state


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").exists())
    return done[-1] if done else None


def full_weights(model: MLLM) -> bool:
    """A model whose bases were built from configs (random): its checkpoints hold every weight."""
    return model.config.vision is None or model.config.llm is None


def unwrap(model: torch.nn.Module) -> MLLM:
    return getattr(model, "module", model)  # type: ignore[return-value]


def _barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()


def _dcp_states(model: MLLM, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    if not full_weights(model):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        msd = {k: v for k, v in msd.items() if k in trainable}
    return msd, osd


def _replicated_state(model: MLLM) -> dict[str, torch.Tensor]:
    if full_weights(model):
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    else:
        state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():  # tied weights (shared storage) cannot be saved twice by safetensors: clone
        out[k] = v.clone() if any(v.data_ptr() == o.data_ptr() for o in out.values()) else v
    return out


def save_checkpoint(output: Path, step: int, model: MLLM, optimizer, scheduler, position: tuple[int, int],
                    cfg: TrainConfig, dist: Dist) -> Path | None:
    from safetensors.torch import save_file

    final = step_dir(output, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(dist)
    if cfg.fsdp:
        import torch.distributed.checkpoint as dcp

        msd, osd = _dcp_states(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    torch.save(rng_state(), tmp / f"rng-rank{dist.rank}.pt")
    if not cfg.fsdp and dist.main:
        name = "model.safetensors" if full_weights(model) else "trainable.safetensors"
        save_file(_replicated_state(model), str(tmp / name), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _barrier(dist)
    if not dist.main:
        _barrier(dist)
        return None
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "epoch": position[0], "batch": position[1], "world_size": dist.world_size,
        "format": "dcp" if cfg.fsdp else "safetensors", "fingerprint": cfg.fingerprint()}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if cfg.keep_checkpoints:
        done = sorted(p for p in final.parent.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp"))
        for old in done[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(dist)
    return final


def load_weights(model: MLLM, ckpt: Path) -> None:
    """Load a replicated checkpoint's weights into the (unwrapped) model."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "trainable.safetensors"):
        if (ckpt / name).exists():
            state = load_file(str(ckpt / name))
            result = model.load_state_dict(state, strict=name == "model.safetensors")
            if getattr(result, "unexpected_keys", None):
                raise TrainError(f"{ckpt / name}: weights the model does not have: {result.unexpected_keys[:5]}")
            return
    raise TrainError(f"{ckpt}: no model.safetensors or trainable.safetensors")


def read_state(ckpt: Path, cfg: TrainConfig) -> dict[str, Any]:
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("fingerprint") not in (None, cfg.fingerprint()):
        raise TrainError(f"{ckpt} was written by a run with a different configuration; use another output "
                         "directory or resume=false")
    fmt = state.get("format", "safetensors")
    if (fmt == "dcp") != cfg.fsdp:
        raise TrainError(f"{ckpt} is a {fmt} checkpoint; resume it with fsdp {'true' if fmt == 'dcp' else 'false'}")
    return state


def load_checkpoint(ckpt: Path, state: dict[str, Any], model: MLLM, optimizer, scheduler, cfg: TrainConfig,
                    dist: Dist) -> None:
    """Weights, AdamW states, scheduler and this rank's RNG from ``ckpt`` (after the model is wrapped)."""
    if state.get("format") == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from torch.distributed.checkpoint import DefaultLoadPlanner

        msd, osd = _dcp_states(model, optimizer)
        # parameters that never had a gradient (e.g. the ViT's unused post-layernorm) have no AdamW state saved
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt / "dcp"),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(strict=full_weights(model)))
    else:
        load_weights(model, ckpt)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=dist.device, weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = ckpt / f"rng-rank{dist.rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    else:
        seed_all(cfg.seed + 1_000_003 * (dist.rank + 1) + int(state["step"]))


def full_state_dict(model: MLLM, cfg: TrainConfig, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered from the FSDP2 shards; a collective call), None elsewhere."""
    if not cfg.fsdp:
        return _replicated_state(model) if dist.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return None
    if not full_weights(model):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        full = {k: v for k, v in full.items() if k in trainable}
    out: dict[str, torch.Tensor] = {}
    for k, v in full.items():
        v = v.detach().contiguous()
        out[k] = v.clone() if any(v.data_ptr() == o.data_ptr() for o in out.values()) else v
    return out


def save_final(model: MLLM, state: dict[str, torch.Tensor], tokenizer: Any, output: Path) -> None:
    """``<output>/model``: the weights in ``MLLM.save_pretrained``'s layout (loads with ``MLLM.from_pretrained``)
    and the tokenizer; written to ``model.tmp`` and renamed. A model converted from the official 4KHD checkpoint
    is also written to ``<output>/official`` in the official layout."""
    from safetensors.torch import save_file

    from mllm_pipeline.model.mllm import CONFIG_FILE, TRAINABLE_FILE, WEIGHTS_FILE

    tmp = output / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    full = full_weights(model)
    save_file(state, str(tmp / (WEIGHTS_FILE if full else TRAINABLE_FILE)),
              metadata={"format": "pt", "mllm_pipeline": "full" if full else "trainable"})
    (tmp / CONFIG_FILE).write_text(model.config.to_json())
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    shutil.rmtree(output / "model", ignore_errors=True)
    os.replace(tmp, output / "model")
    if model.config.extra.get("converted_from") and full:
        save_official_copy(model, state, output / "official")


def save_official_copy(model: MLLM, state: dict[str, torch.Tensor], path: Path) -> Path:
    """A model started from the official 4KHD checkpoint is also given back in the official layout (``<output>/
    official``: weights, ``config.json``, the source's tokenizer and remote code; ``mllm_pipeline.model.convert.
    save_official``), in the release's dtype (its ``config.json`` ``torch_dtype``)."""
    from mllm_pipeline.model.convert import save_official

    official = model.config.extra.get("official_config") or {}
    dtype = getattr(torch, str(official.get("torch_dtype", "")), None)
    if isinstance(dtype, torch.dtype):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return save_official(state, model.config, path)
