"""Start from the official InternLM-XComposer2-4KHD checkpoint (``internlm/internlm-xcomposer2-4khd-7b``).

The official checkpoint is one state dict in its own key layout (remote code on the hub builds it)::

    vit.vision_tower.vision_model.*          the CLIP ViT-L/14-336 (a plain Hugging Face CLIPVisionModel)
    vision_proj.0.{weight,bias}, vision_proj.2.{weight,bias}      the MLP projector (Linear, GELU, Linear)
    plora_glb_GN (1, 1, 4C)                  the token between the global and the local view   -> separator
    plora_sub_GN (1, 1, 1, 4C)               the token after every token row of both views     -> newline
    model.tok_embeddings.weight, model.norm.weight, output.weight             InternLM2's embeddings / head
    model.layers.<i>.attention.wqkv         q, k, v in one matrix, grouped per KV head: for each of the
                                            n_kv heads, n_heads/n_kv query heads, then its key, then its value
    model.layers.<i>.attention.wo, feed_forward.w1 (gate) / w3 (up) / w2 (down)
    model.layers.<i>.attention_norm, ffn_norm                     RMSNorm before attention / before the MLP
    <each of wqkv, wo, w1, w2, w3>.Plora_A / .Plora_B             Partial LoRA (scaling = alpha / r = 1)

InternLM2 is a Llama-architecture decoder (RMSNorm, rotary embeddings with Llama's rotate-half convention,
SwiGLU, GQA) whose code is not part of ``transformers``; so the converter maps it onto ``LlamaForCausalLM``
(offline, no ``trust_remote_code``): ``wqkv`` is split into ``q_proj``/``k_proj``/``v_proj`` by the grouping
above, its single ``Plora_A`` is given to each of the three (so ``B_q A x``, ``B_k A x``, ``B_v A x`` are exactly
the rows of the official ``B A x``; the three copies then train independently), and ``Plora_B`` is split like
``wqkv``. Everything else is a rename. No library does this mapping (the official code converts nothing), hence
this module.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .config import MLLMConfig

#: InternLM2 config fields -> LlamaConfig fields (same meaning).
_LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "rope_scaling")
_LINEARS = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
            "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
_NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_SKIP = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")


class ConversionError(ValueError):
    """The checkpoint is not in the official 4KHD layout (names the key or file)."""


def is_official_checkpoint(path: str | os.PathLike) -> bool:
    """A directory whose weights use the official key layout (``plora_glb_GN`` present)."""
    try:
        return "plora_glb_GN" in _weight_index(Path(path))
    except (ConversionError, FileNotFoundError):
        return False


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{path}: no *.safetensors or pytorch_model*.bin weight files")
    return files


def _weight_index(path: Path) -> dict[str, Path]:
    """key -> file, from the shard index when there is one (no tensor is read)."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).exists():
            wm = json.loads((path / name).read_text())["weight_map"]
            return {k: path / v for k, v in wm.items()}
    out: dict[str, Path] = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                out.update({k: f for k in sf.keys()})
        else:
            out.update({k: f for k in torch.load(f, map_location="meta", weights_only=True)})
    return out


def read_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an official checkpoint directory (safetensors or .bin shards, memory-mapped)."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(set(_weight_index(path).values())):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return state


def llama_config_from_official(official: dict[str, Any]) -> dict[str, Any]:
    """The LlamaConfig dict equivalent to an official ``config.json`` (InternLM2 fields)."""
    from transformers import LlamaConfig

    if official.get("bias"):
        raise ConversionError("an InternLM2 with bias=True has biased projections; LlamaForCausalLM is built "
                              "with attention_bias and mlp_bias off for this layout")
    kw = {k: official[k] for k in _LLM_FIELDS if official.get(k) is not None}
    kw.setdefault("num_key_value_heads", kw.get("num_attention_heads"))
    kw["tie_word_embeddings"] = bool(official.get("tie_word_embeddings", False))
    kw["hidden_act"] = official.get("hidden_act", "silu")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if official.get(name) is not None:
            kw[name] = official[name]
    return LlamaConfig(**kw).to_dict()


def vision_config_from_weights(state: dict[str, torch.Tensor], prefix: str = "vit.vision_tower.",
                               num_attention_heads: int | None = None) -> dict[str, Any]:
    """A CLIPVisionConfig read off the tower's weight shapes (ViT-L/14-336 for the real checkpoint). Heads cannot
    be seen in the weights: ``hidden_size / 64`` (CLIP's head size) unless given."""
    from transformers import CLIPVisionConfig

    p = prefix + "vision_model." if any(k.startswith(prefix + "vision_model.") for k in state) else prefix
    try:
        patch = state[p + "embeddings.patch_embedding.weight"]
        positions = state[p + "embeddings.position_embedding.weight"].shape[0]
        fc1 = state[p + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ConversionError(f"official checkpoint lacks the vision tower key {e.args[0]!r}") from None
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k)))
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    grid = int(round((positions - 1) ** 0.5))
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=fc1.shape[0], num_hidden_layers=layers,
                            num_attention_heads=num_attention_heads or max(1, hidden // 64),
                            image_size=grid * patch_size, patch_size=patch_size).to_dict()


def _split_qkv(w: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Rows of InternLM2's grouped wqkv (n_kv, groups + 2, head_dim, in) -> q (n_heads*hd), k, v (n_kv*hd)."""
    groups = n_heads // n_kv
    x = w.reshape(n_kv, groups + 2, head_dim, *w.shape[1:])
    q = x[:, :groups].reshape(n_heads * head_dim, *w.shape[1:])
    k = x[:, groups].reshape(n_kv * head_dim, *w.shape[1:])
    v = x[:, groups + 1].reshape(n_kv * head_dim, *w.shape[1:])
    return q, k, v


def _tower_keeps_vision_model_prefix() -> bool:
    """transformers 4.x names CLIPVisionModel's weights ``vision_model.*`` (the official checkpoint was written so);
    5.x drops that level. The converted keys follow the installed version."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        tiny = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                num_attention_heads=1, image_size=28, patch_size=14))
    return any(k.startswith("vision_model.") for k in tiny.state_dict())


def convert_state_dict(state: dict[str, torch.Tensor], llm_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Official 4KHD keys -> this project's ``MLLM`` keys (Llama LLM with P-LoRA). Every official key is used or
    an error names it."""
    keep_prefix = _tower_keeps_vision_model_prefix()
    n_heads, n_kv = llm_config["num_attention_heads"], llm_config["num_key_value_heads"]
    head_dim = llm_config.get("head_dim") or llm_config["hidden_size"] // n_heads
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if _SKIP.search(key):
            continue
        if key.startswith("vit.vision_tower."):
            rest = key[len("vit.vision_tower."):]
            if rest.startswith("vision_model.") and not keep_prefix:
                rest = rest[len("vision_model."):]
            elif not rest.startswith("vision_model.") and keep_prefix:
                rest = "vision_model." + rest
            out["vision.tower." + rest] = t
        elif key.startswith("vision_proj."):
            out["projector." + key[len("vision_proj."):]] = t
        elif key == "plora_glb_GN":
            out["vision.separator"] = t.reshape(-1)
        elif key == "plora_sub_GN":
            out["vision.newline"] = t.reshape(-1)
        elif key == "model.tok_embeddings.weight":
            out["llm.model.embed_tokens.weight"] = t
        elif key == "model.norm.weight":
            out["llm.model.norm.weight"] = t
        elif key == "output.weight":
            out["llm.lm_head.weight"] = t
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
            layer, rest = f"llm.model.layers.{m.group(1)}.", m.group(2)
            if nm := re.fullmatch(r"(attention_norm|ffn_norm)\.weight", rest):
                out[layer + _NORMS[nm.group(1)] + ".weight"] = t
                continue
            lm = re.fullmatch(r"(attention\.wqkv|attention\.wo|feed_forward\.w[123])\.(weight|Plora_A\.weight|Plora_B\.weight)", rest)
            if lm is None:
                raise ConversionError(f"official checkpoint key {key!r} has no counterpart in the converted model")
            name, part = lm.groups()
            suffix = {"weight": "base.weight", "Plora_A.weight": "lora_A.weight", "Plora_B.weight": "lora_B.weight"}[part]
            if name == "attention.wqkv":
                if part == "Plora_A.weight":  # one A shared by q, k, v: each projection gets a copy
                    parts = (t, t.clone(), t.clone())
                else:
                    parts = _split_qkv(t, n_heads, n_kv, head_dim)
                for proj, w in zip(("q_proj", "k_proj", "v_proj"), parts):
                    out[f"{layer}self_attn.{proj}.{suffix}"] = w.contiguous()
            else:
                out[f"{layer}{_LINEARS[name]}.{suffix}"] = t
        else:
            raise ConversionError(f"official checkpoint key {key!r} has no counterpart in the converted model")
    return out


def official_model_config(path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None,
                          **overrides: Any) -> MLLMConfig:
    """The ``MLLMConfig`` of an official checkpoint directory (``config.json`` + weight shapes); ``overrides``
    replace fields (image_token_id, video_token_id, hd_num, dtype, ...)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConversionError(f"{path}: no config.json")
    official = json.loads((path / "config.json").read_text())
    state = state if state is not None else read_official_state_dict(path)
    vision_heads = overrides.pop("vision_heads", None)
    a = next((t for k, t in state.items() if k.endswith("attention.wqkv.Plora_A.weight")), None)
    rank = int(a.shape[0]) if a is not None else 8
    cfg: dict[str, Any] = dict(
        vision=None, vision_config=vision_config_from_weights(state, num_attention_heads=vision_heads),
        llm=None, llm_config=llm_config_for(official), adapter="plora" if a is not None else "none",
        lora_rank=rank, lora_alpha=float(rank), lora_dropout=0.05, vision_select_layer=-1,
        hd_num=int(official.get("hd_num", 25)),
        extra={"converted_from": "internlm-xcomposer2-4khd", "source": str(path)})
    cfg.update(overrides)
    return MLLMConfig(**cfg)


def llm_config_for(official: dict[str, Any]) -> dict[str, Any]:
    return llama_config_from_official(official)


def load_official(path: str | os.PathLike, **overrides: Any):
    """Build an ``MLLM`` holding the weights of an official 4KHD checkpoint directory. The model is built without
    allocating random weights (``accelerate.init_empty_weights``) and the converted tensors are assigned."""
    from accelerate import init_empty_weights

    from .mllm import build_model

    state = read_official_state_dict(path)
    cfg = official_model_config(path, state, **overrides)
    converted = convert_state_dict(state, cfg.llm_config)
    del state
    with init_empty_weights(include_buffers=False):
        model = build_model(cfg, pretrained=False)
    have = dict(model.state_dict())
    missing = sorted(set(have) - set(converted))
    unexpected = sorted(set(converted) - set(have))
    if missing or unexpected:
        raise ConversionError(f"{path}: converted weights do not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, t in converted.items():
        if tuple(have[k].shape) != tuple(t.shape):
            raise ConversionError(f"{path}: {k} has shape {tuple(t.shape)}, the model expects {tuple(have[k].shape)}")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    if dtype is not None:
        converted = {k: v.to(dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    model.set_trainable(vision=not cfg.freeze_vision, connector=not cfg.freeze_projector, llm=not cfg.freeze_llm)
    return model
