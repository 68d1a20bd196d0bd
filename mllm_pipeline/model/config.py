"""``MLLMConfig``: everything needed to rebuild the model, as one JSON-serialisable dataclass.

The vision tower and the LLM are each given either by a Hugging Face name / local path (``vision``, ``llm``:
pretrained weights are loaded) or by a config dict (``vision_config``, ``llm_config``: random weights, used by
tests and the demo, and by ``MLLM.from_pretrained`` when a full checkpoint brings its own weights). When a name
is given, ``build_model`` fills the matching ``*_config`` dict with the resolved config, so a saved checkpoint
can be rebuilt without the hub.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

ADAPTERS = ("plora", "lora", "none")


@dataclass
class MLLMConfig:
    # --- the two pretrained parts -------------------------------------------------------------------------
    vision: str | None = "openai/clip-vit-large-patch14-336"
    vision_config: dict[str, Any] | None = None
    llm: str | None = None
    llm_config: dict[str, Any] | None = None
    trust_remote_code: bool = False  # InternLM2 and other hub models that bring their own code
    dtype: str | None = None  # "bfloat16", "float16", "float32" or None (the checkpoint's / torch default)
    attn_implementation: str | None = None  # passed to the LLM ("sdpa", "eager", "flash_attention_2", ...)

    # --- vision path ---------------------------------------------------------------------------------------
    # Which ViT hidden state feeds the merge: -1 is the last layer's output (the encoder output before the
    # post-layernorm, as InternLM-XComposer2 uses); LLaVA-style models use -2.
    vision_select_layer: int = -1
    # False: the tower is built without CLIP's post-layernorm (replaced by an identity, no weights). The features
    # are taken before it anyway; the InternLM-XComposer2-4KHD release has no post_layernorm weights at all.
    vision_post_layernorm: bool = True
    # Crops (and global views) of the whole batch go through the ViT in one pass; set a number to split that
    # pass into chunks of at most this many crops (bounds the ViT's activation memory at large hd_num).
    vision_batch_size: int | None = None
    hd_num: int = 25  # max 336-px crops per image (the data path applies the HD transform with it)
    video_frames: int = 8  # frames sampled per video (data path)
    video_hd_num: int = 1  # HD transform of each frame (data path)

    # --- placeholders in the token stream -----------------------------------------------------------------
    image_token: str = "<image>"
    video_token: str = "<video>"
    image_token_id: int | None = None  # must be set (the tokenizer's id of image_token) before use
    video_token_id: int | None = None

    # --- adapter ---------------------------------------------------------------------------------------------
    adapter: Literal["plora", "lora", "none"] = "plora"
    lora_rank: int = 256
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    # Module-name suffixes of the LLM linears to adapt; None finds every nn.Linear inside the decoder layers
    # (q,k,v,o,gate,up,down for Llama; wqkv,wo,w1,w2,w3 for InternLM2).
    lora_targets: list[str] | None = None
    # Per-module (rank, alpha) by module-name suffix, for modules whose adapter differs from lora_rank /
    # lora_alpha: the 4KHD release has q/k/v (its fused wqkv) at rank 8 alpha 16 and o/gate/up/down at rank 256
    # alpha 256, i.e. {"q_proj": [8, 16.0], ..., "o_proj": [256, 256.0], ...}. Scaling is alpha / rank per module.
    lora_modules: dict[str, list[float]] = field(default_factory=dict)
    # P-LoRA only: groups of sibling linears that read the same input and share ONE A matrix and ONE dropout mask
    # (a fused projection split in this model): InternLM2's wqkv -> {"qkv": ["q_proj", "k_proj", "v_proj"]}; the
    # shared A lives at ``<parent>.<group>.lora_A`` and each member keeps its own B (its rows of the fused B).
    lora_fused: dict[str, list[str]] = field(default_factory=dict)

    # --- what trains by default (the training-phase presets in phases.py override these) ---------------------
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = True
    gradient_checkpointing: bool = False

    extra: dict[str, Any] = field(default_factory=dict)  # free-form, kept in the saved JSON

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.vision is None and self.vision_config is None:
            raise ValueError("MLLMConfig needs a vision tower: set vision (name or path) or vision_config")
        if self.llm is None and self.llm_config is None:
            raise ValueError("MLLMConfig needs an LLM: set llm (name or path) or llm_config")
        for name in ("hd_num", "video_frames", "video_hd_num", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name, ra in self.lora_modules.items():
            if len(ra) != 2 or int(ra[0]) < 1 or int(ra[0]) != ra[0] or ra[1] <= 0:
                raise ValueError(f"lora_modules[{name!r}] must be [rank >= 1, alpha > 0], got {ra!r}")
        if self.lora_fused and self.adapter != "plora":
            raise ValueError("lora_fused (a shared LoRA A) is a P-LoRA option; adapter is " + repr(self.adapter))
        for group, members in self.lora_fused.items():
            ranks = {self.lora_module(m)[0] for m in members}
            if len(members) < 2 or len(ranks) != 1:
                raise ValueError(f"lora_fused[{group!r}] needs two or more modules of one rank, got {members} "
                                 f"with ranks {sorted(ranks)}")

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def lora_module(self, name: str) -> tuple[int, float]:
        """(rank, alpha) of the adapter on the linear called ``name`` (a dotted name or a suffix)."""
        for suffix, (rank, alpha) in self.lora_modules.items():
            if name == suffix or name.endswith("." + suffix):
                return int(rank), float(alpha)
        return self.lora_rank, self.lora_alpha

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MLLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MLLMConfig field(s): {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MLLMConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "MLLMConfig":
        return dataclasses.replace(self, **changes)


def tiny_config(
    *,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 336,
    patch_size: int = 14,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    vocab_size: int = 256,
    adapter: str = "plora",
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    **overrides: Any,
) -> MLLMConfig:
    """A small random model built offline from configs (tests, demo). The two highest token ids of the
    vocabulary are the ``<image>`` and ``<video>`` placeholders. ``image_size``/``patch_size`` stay 336/14 by
    default so a crop gives the real 24x24 patch grid (and the real token counts)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    llm = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=llm_hidden,
        intermediate_size=llm_hidden * 2,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    params: dict[str, Any] = dict(
        vision=None,
        vision_config=vision.to_dict(),
        llm=None,
        llm_config=llm.to_dict(),
        image_token_id=vocab_size - 2,
        video_token_id=vocab_size - 1,
        hd_num=4,
        video_frames=4,
        video_hd_num=1,
        adapter=adapter,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
    )
    params.update(overrides)
    return MLLMConfig(**params)
