"""The official InternLM-XComposer2-4KHD checkpoint (``internlm/internlm-xcomposer2-4khd-7b``) in and out.

The official checkpoint is one state dict in its own key layout (remote code on the hub builds it)::

    vit.vision_tower.vision_model.*          the CLIP ViT-L/14-336 (a plain Hugging Face CLIPVisionModel; the
                                             release has no post_layernorm: its features are read before it)
    vision_proj.0.{weight,bias}, vision_proj.2.{weight,bias}      the MLP projector (Linear, GELU, Linear)
    plora_glb_GN (1, 1, 4C)                  the token between the global and the local view   -> separator
    plora_sub_GN (1, 1, 1, 4C)               the token after every token row of both views     -> newline
    model.tok_embeddings.weight, model.norm.weight, output.weight             InternLM2's embeddings / head
    model.layers.<i>.attention.wqkv         q, k, v in one matrix, grouped per KV head: for each of the
                                            n_kv heads, n_heads/n_kv query heads, then its key, then its value
    model.layers.<i>.attention.wo, feed_forward.w1 (gate) / w3 (up) / w2 (down)
    model.layers.<i>.attention_norm, ffn_norm                     RMSNorm before attention / before the MLP
    <each of wqkv, wo, w1, w2, w3>.Plora_A / .Plora_B             Partial LoRA, rank and alpha per module

Partial LoRA as released (4KHD): ``wqkv`` rank 8, alpha 16 (scaling 2); ``wo``, ``w1``, ``w2``, ``w3`` rank 256,
alpha 256 (scaling 1). The ranks are read off the ``Plora_A`` shapes; alpha is not stored in the weights nor in
``config.json``, so it comes from ``lora_alpha`` given by the caller, else from the documented release values for
that (module, rank) (``RELEASED_ALPHA``), else the conversion stops and asks for it.

InternLM2 is a Llama-architecture decoder (RMSNorm, rotary embeddings with Llama's rotate-half convention,
SwiGLU, GQA) whose code is not part of ``transformers``; so the converter maps it onto ``LlamaForCausalLM``
(offline, no ``trust_remote_code``): ``wqkv`` is split into ``q_proj``/``k_proj``/``v_proj`` by the grouping
above; its P-LoRA stays fused: the one ``Plora_A`` becomes the shared A of the three (``self_attn.qkv.lora_A``,
one dropout mask, see ``plora.SharedLoRAA``) and ``Plora_B`` is split like ``wqkv``. Everything else is a rename.

The way back, ``to_official_state_dict`` / ``save_official``, is the exact inverse (the split rows are put back in
place, nothing is recomputed), so official -> project -> official is the identity bit for bit; ``save_official``
writes the official ``config.json`` (kept from the conversion) and, when the source directory is at hand, copies
its tokenizer and remote-code files, so the result loads where the release loads. No library does this mapping
(the official code converts nothing), hence this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import MLLMConfig

#: InternLM2 config fields -> LlamaConfig fields (same meaning).
_LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "rope_scaling")
_LINEARS = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
            "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")
_NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_SKIP = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")
#: the P-LoRA modules of an official decoder layer -> the adapted linears of the converted one
PLORA_MODULES = {"attention.wqkv": _QKV, "attention.wo": ("o_proj",), "feed_forward.w1": ("gate_proj",),
                 "feed_forward.w3": ("up_proj",), "feed_forward.w2": ("down_proj",)}
#: alpha of the released checkpoints by (module, rank): 4KHD's wqkv rank 8 -> alpha 16; rank 256 -> alpha 256 (the
#: 4KHD release's wo/w1/w2/w3, and every module of the earlier InternLM-XComposer2 releases)
RELEASED_ALPHA: dict[tuple[str, int], float] = {("attention.wqkv", 8): 16.0,
                                                **{(m, 256): 256.0 for m in PLORA_MODULES}}
FUSED_GROUP = "qkv"  # the shared A of q/k/v lives at self_attn.qkv.lora_A
#: non-weight files of an official directory copied next to exported weights (tokenizer, remote code, ...)
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.index\.json)$")


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


def plora_settings(state: dict[str, torch.Tensor],
                   lora_alpha: dict[str, float] | None = None) -> dict[str, tuple[int, float]]:
    """``{official module: (rank, alpha)}`` of the checkpoint's P-LoRA (empty without P-LoRA). The rank is the row
    count of ``Plora_A`` and must be the same in every layer; alpha comes from ``lora_alpha`` (by official module
    name, e.g. ``{"attention.wqkv": 16}``), else from ``RELEASED_ALPHA``."""
    ranks: dict[str, set[int]] = {}
    for key, t in state.items():
        if m := re.fullmatch(r"model\.layers\.\d+\.(.+)\.Plora_A\.weight", key):
            ranks.setdefault(m.group(1), set()).add(int(t.shape[0]))
    out: dict[str, tuple[int, float]] = {}
    for module, rs in sorted(ranks.items()):
        if module not in PLORA_MODULES:
            raise ConversionError(f"official checkpoint has P-LoRA on {module!r}, which this layout does not know")
        if len(rs) != 1:
            raise ConversionError(f"P-LoRA of {module} has different ranks across layers: {sorted(rs)}")
        rank = rs.pop()
        alpha = (lora_alpha or {}).get(module, RELEASED_ALPHA.get((module, rank)))
        if alpha is None:
            raise ConversionError(f"P-LoRA of {module} has rank {rank}, for which no released alpha is known (the "
                                  f"weights do not store it): pass lora_alpha={{{module!r}: <alpha>}}")
        out[module] = (rank, float(alpha))
    return out


def _split_qkv(w: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Rows of InternLM2's grouped wqkv (n_kv, groups + 2, head_dim, in) -> q (n_heads*hd), k, v (n_kv*hd)."""
    groups = n_heads // n_kv
    x = w.reshape(n_kv, groups + 2, head_dim, *w.shape[1:])
    q = x[:, :groups].reshape(n_heads * head_dim, *w.shape[1:])
    k = x[:, groups].reshape(n_kv * head_dim, *w.shape[1:])
    v = x[:, groups + 1].reshape(n_kv * head_dim, *w.shape[1:])
    return q, k, v


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv: int,
              head_dim: int) -> torch.Tensor:
    """The inverse of ``_split_qkv``: q, k, v rows back into InternLM2's grouped wqkv rows."""
    groups = n_heads // n_kv
    rest = q.shape[1:]
    x = torch.cat([q.reshape(n_kv, groups, head_dim, *rest), k.reshape(n_kv, 1, head_dim, *rest),
                   v.reshape(n_kv, 1, head_dim, *rest)], dim=1)
    return x.reshape(n_kv * (groups + 2) * head_dim, *rest)


def _heads(llm_config: dict[str, Any]) -> tuple[int, int, int]:
    n_heads, n_kv = llm_config["num_attention_heads"], llm_config.get("num_key_value_heads") or llm_config["num_attention_heads"]
    head_dim = llm_config.get("head_dim") or llm_config["hidden_size"] // n_heads
    return n_heads, n_kv, head_dim


def _tower_keeps_vision_model_prefix() -> bool:
    """transformers 4.x names CLIPVisionModel's weights ``vision_model.*`` (the official checkpoint was written so);
    5.x drops that level. The converted keys follow the installed version."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        tiny = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                num_attention_heads=1, image_size=28, patch_size=14))
    return any(k.startswith("vision_model.") for k in tiny.state_dict())


def convert_state_dict(state: dict[str, torch.Tensor], llm_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Official 4KHD keys -> this project's ``MLLM`` keys (Llama LLM with P-LoRA, q/k/v sharing one A). Every
    official key is used or an error names it. Tensors are views or exact row selections (no arithmetic)."""
    keep_prefix = _tower_keeps_vision_model_prefix()
    n_heads, n_kv, head_dim = _heads(llm_config)
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
                if part == "Plora_A.weight":  # one A for q, k and v: the shared A of the fused group
                    out[f"{layer}self_attn.{FUSED_GROUP}.lora_A.weight"] = t
                    continue
                for proj, w in zip(_QKV, _split_qkv(t, n_heads, n_kv, head_dim)):
                    out[f"{layer}self_attn.{proj}.{suffix}"] = w.contiguous()
            else:
                out[f"{layer}{_LINEARS[name]}.{suffix}"] = t
        else:
            raise ConversionError(f"official checkpoint key {key!r} has no counterpart in the converted model")
    return out


def to_official_state_dict(state: dict[str, torch.Tensor], config: MLLMConfig) -> dict[str, torch.Tensor]:
    """This project's ``MLLM`` state dict (a model converted from, or shaped like, the release) -> the official
    4KHD key layout; the exact inverse of ``convert_state_dict``. Embedding / head rows past the official vocabulary
    (the ``<image>`` / ``<video>`` placeholders this project adds to the tokenizer; the official code splits the
    text at ``<ImageHere>`` instead) are left out; any other model (another LLM, separate q/k/v adapters) is
    refused with the key that does not fit."""
    llm_config = config.llm_config or {}
    if llm_config.get("model_type") not in (None, "llama"):
        raise ConversionError(f"the official layout holds an InternLM2 (converted to Llama); this model's LLM is "
                              f"{llm_config.get('model_type')!r}")
    if config.adapter == "lora":
        raise ConversionError("the official layout has Partial LoRA (Plora_A/B); this model has plain LoRA (peft)")
    n_heads, n_kv, head_dim = _heads(llm_config)
    official_vocab = int((config.extra.get("official_config") or {}).get("vocab_size") or llm_config.get("vocab_size", 0))
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if key.startswith("vision.tower."):
            rest = key[len("vision.tower."):]
            out["vit.vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)] = t
        elif key.startswith("projector."):
            out["vision_proj." + key[len("projector."):]] = t
        elif key == "vision.separator":
            out["plora_glb_GN"] = t.reshape(1, 1, -1)
        elif key == "vision.newline":
            out["plora_sub_GN"] = t.reshape(1, 1, 1, -1)
        elif key in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
            name = "model.tok_embeddings.weight" if "embed" in key else "output.weight"
            out[name] = _official_rows(t, official_vocab, config, key)
        elif key == "llm.model.norm.weight":
            out["model.norm.weight"] = t
        elif m := re.fullmatch(r"llm\.model\.layers\.(\d+)\.(.+)", key):
            layer, rest = f"model.layers.{m.group(1)}.", m.group(2)
            back = {v: k for k, v in _NORMS.items()}
            if nm := re.fullmatch(r"(input_layernorm|post_attention_layernorm)\.weight", rest):
                out[layer + back[nm.group(1)] + ".weight"] = t
                continue
            if rest == f"self_attn.{FUSED_GROUP}.lora_A.weight":
                out[layer + "attention.wqkv.Plora_A.weight"] = t
                continue
            lm = re.fullmatch(r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(base\.weight|weight|lora_A\.weight|lora_B\.weight)", rest)
            if lm is None:
                raise ConversionError(f"model key {key!r} has no counterpart in the official layout")
            name, part = lm.groups()
            if name.endswith(_QKV) and part == "lora_A.weight":
                raise ConversionError(f"{key}: q, k and v have their own LoRA A; the official wqkv has one A shared by "
                                      "the three (a model built with lora_fused={'qkv': [q_proj, k_proj, v_proj]})")
            suffix = {"base.weight": "weight", "weight": "weight", "lora_A.weight": "Plora_A.weight",
                      "lora_B.weight": "Plora_B.weight"}[part]
            if name.endswith(_QKV):
                qkv.setdefault(layer + "attention.wqkv." + suffix, {})[name.rsplit(".", 1)[1]] = t
            else:
                official = {v: k for k, v in _LINEARS.items()}[name]
                out[f"{layer}{official}.{suffix}"] = t
        else:
            raise ConversionError(f"model key {key!r} has no counterpart in the official layout")
    for key, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ConversionError(f"{key}: needs q_proj, k_proj and v_proj, the model has {sorted(parts)}")
        out[key] = _join_qkv(parts["q_proj"], parts["k_proj"], parts["v_proj"], n_heads, n_kv, head_dim)
    return out


def _official_rows(t: torch.Tensor, vocab: int, config: MLLMConfig, key: str) -> torch.Tensor:
    if not vocab or t.shape[0] == vocab:
        return t
    extra = set(range(vocab, t.shape[0]))
    placeholders = {config.image_token_id, config.video_token_id} - {None}
    if t.shape[0] < vocab or not extra <= placeholders:
        raise ConversionError(f"{key} has {t.shape[0]} rows; the official vocabulary has {vocab}, and only the rows "
                              f"of the placeholders {sorted(placeholders)} may be left out")
    return t[:vocab]


def official_model_config(path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None,
                          **overrides: Any) -> MLLMConfig:
    """The ``MLLMConfig`` of an official checkpoint directory (``config.json`` + weight shapes): per-module P-LoRA
    rank (read off the weights) and alpha (``lora_alpha`` override by official module name, else the release's),
    q/k/v sharing one A, no vision post-layernorm when the weights have none. ``overrides`` replace fields
    (image_token_id, video_token_id, hd_num, dtype, lora_dropout, ...); ``vision_heads`` sets the ViT's heads."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConversionError(f"{path}: no config.json")
    official = json.loads((path / "config.json").read_text())
    state = state if state is not None else read_official_state_dict(path)
    vision_heads = overrides.pop("vision_heads", None)
    alpha_override = overrides.pop("lora_alpha", None)
    if alpha_override is not None and not isinstance(alpha_override, dict):
        raise ConversionError("for an official checkpoint give lora_alpha per official module, e.g. "
                              "{'attention.wqkv': 16, 'attention.wo': 256, ...}: the ranks differ per module")
    settings = plora_settings(state, alpha_override)
    cfg: dict[str, Any] = dict(
        vision=None, vision_config=vision_config_from_weights(state, num_attention_heads=vision_heads),
        llm=None, llm_config=llama_config_from_official(official), vision_select_layer=-1,
        vision_post_layernorm=any(".post_layernorm." in k for k in state if k.startswith("vit.")),
        hd_num=int(official.get("hd_num", 25)), lora_dropout=0.05,  # the official finetune's lora_dropout
        extra={"converted_from": "internlm-xcomposer2-4khd", "source": str(path), "official_config": official})
    if settings:
        modules = {proj: [rank, alpha] for module, (rank, alpha) in settings.items() for proj in PLORA_MODULES[module]}
        main = settings.get("attention.wo") or next(iter(settings.values()))
        cfg.update(adapter="plora", lora_rank=main[0], lora_alpha=main[1], lora_modules=modules,
                   lora_targets=sorted(modules), lora_fused={FUSED_GROUP: list(_QKV)} if "attention.wqkv" in settings else {})
    else:
        cfg.update(adapter="none")
    cfg.update(overrides)
    return MLLMConfig(**cfg)


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


def save_official(state: dict[str, torch.Tensor], config: MLLMConfig, path: str | os.PathLike,
                  source: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``state`` (the model's state dict; ``model.state_dict()`` or the gathered FSDP2 one) in the official
    layout: safetensors shards of at most ``max_shard_bytes`` (+ ``model.safetensors.index.json`` when several),
    the official ``config.json`` (the one kept at conversion, ``torch_dtype`` set to the weights'), and the
    non-weight files of ``source`` (default: the directory the model was converted from, when it still exists):
    tokenizer.model, tokenizer_config.json, the remote code. Written to ``<path>.tmp`` and renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    official = to_official_state_dict(state, config)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = Path(source) if source else Path(config.extra["source"]) if config.extra.get("source") else None
    if src is not None and src.is_dir():
        for f in sorted(src.iterdir()):
            if f.is_file() and not _WEIGHT_FILE.search(f.name) and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
    official_cfg = dict(config.extra.get("official_config") or _official_config_from(config))
    dtypes = {str(t.dtype).removeprefix("torch.") for t in official.values()}
    if len(dtypes) == 1:
        official_cfg["torch_dtype"] = dtypes.pop()
    (tmp / "config.json").write_text(json.dumps(official_cfg, indent=2, sort_keys=True) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(official):
        t = official[k].detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in official.values())
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _official_config_from(config: MLLMConfig) -> dict[str, Any]:
    """An official-style config.json for a model that was not converted from one (its LLM config's fields)."""
    llm = config.llm_config or {}
    out = {k: llm[k] for k in _LLM_FIELDS if k in llm}
    out.update(model_type="internlmxcomposer2", architectures=["InternLMXComposer2ForCausalLM"], bias=False,
               hidden_act=llm.get("hidden_act", "silu"), tie_word_embeddings=bool(llm.get("tie_word_embeddings")),
               hd_num=config.hd_num)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if llm.get(name) is not None:
            out[name] = llm[name]
    return out
