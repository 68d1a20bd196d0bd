"""The MLLM: vision encoder (HD layout) -> MLP projector -> any Hugging Face causal LM, with P-LoRA / LoRA.

How a training step calls it::

    out = model(input_ids, media, attention_mask=attention_mask, label_mask=label_mask)
    out.loss.backward()

* ``input_ids``: a (B, T) LongTensor (padding anywhere, marked by ``attention_mask`` 0) or a list of 1-D
  tensors. Each sample holds one placeholder per media item: ``config.image_token_id`` for an image,
  ``config.video_token_id`` for a video (none for a text-only sample).
* ``media``: one entry per sample: None, an image (3, H, W) - the padded HD image normalised with CLIP mean/std,
  H and W multiples of 336 - a video (frames, 3, H, W), or a list of those in placeholder order.
* ``labels`` (optional, same layout as ``input_ids``): the targets, -100 where no loss is taken; default: the
  input ids themselves. ``label_mask`` (optional, bool, same layout): True where the loss is taken (e.g. the
  answer tokens); False positions become -100. The LLM shifts labels by one internally (HF convention), so
  labels are aligned with the inputs, not pre-shifted. Image positions (and padding) are always -100.
  The loss is computed when ``labels`` or ``label_mask`` is given.

The model replaces every placeholder by the media's embedding sequence, right-pads the batch to the longest
sequence and returns ``MLLMOutput`` (loss, logits, and the built labels / attention mask / image mask, so a loop
can count tokens). Sequence length of a sample = its text tokens - placeholders + image tokens.

Packing: ``pack`` (a list of rows, each a list of sample indices) concatenates the samples of a row into one
sequence. Positions restart at 0 for every sample and the attention mask is left to the LLM: transformers sees
the restarts in ``position_ids`` and attends only within each sample (block-diagonal causal; varlen kernels under
``flash_attention_2``, a block mask under ``sdpa`` / ``eager`` / ``flex_attention``). The rows are right-padded;
the padding forms a block of its own and carries no loss.

Loss: the hidden states go through the output head only where a label is (answer tokens; next-token targets
that stay inside their own sample), in float32; ``loss`` is the mean over those tokens of the whole batch (or
``loss_sum / loss_normalizer`` when the caller passes the answer-token count of a larger batch: gradient
accumulation, several ranks). ``sample_loss`` is each sample's own mean. Without labels ``logits`` are the full
(B, L, V) logits; with labels they are the (N, V) logits of the N supervised positions.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import MLLMConfig
from .plora import ImageMask, apply_plora, find_linear_targets, plora_parameters
from .vision import VisionEncoder

CONFIG_FILE = "mllm_config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class MLLMInputs:
    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) long, 1 = real token
    labels: torch.Tensor  # (B, L) long, -100 = no loss
    image_mask: torch.Tensor  # (B, L) bool, True at image/video tokens (newline, separator included)
    position_ids: torch.Tensor | None = None  # (B, L) packed rows: positions restart per sample
    sample_index: torch.Tensor | None = None  # (B, L) long: the sample each position belongs to, -1 = padding


@dataclass
class MLLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    loss_sum: torch.Tensor | None = None  # summed token losses (float32)
    label_tokens: int = 0  # supervised tokens in this batch
    sample_loss: torch.Tensor | None = None  # (n_samples,) mean loss of each sample (nan: no answer tokens)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _from_pretrained_kwargs(config: MLLMConfig) -> dict[str, Any]:
    import transformers

    kw: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if config.dtype is not None:
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        kw[key] = _dtype(config.dtype)
    return kw


def _hf_config(d: dict[str, Any], name: str | None, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type in CONFIG_MAPPING:
        return AutoConfig.for_model(model_type, **d)
    if name is None:
        raise ValueError(f"config of model_type {model_type!r} needs its code: give the model's name or local path")
    return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)  # remote-code model


def load_vision_tower(config: MLLMConfig, pretrained: bool = True) -> nn.Module:
    """The HF vision model: pretrained from ``config.vision`` or randomly initialised from ``vision_config``.
    A full CLIP/SigLIP checkpoint name gives its vision half."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    towers = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}
    if pretrained and config.vision is not None:
        hf = AutoConfig.from_pretrained(config.vision, trust_remote_code=config.trust_remote_code)
        cls = towers.get(hf.model_type, AutoModel)
        tower = cls.from_pretrained(config.vision, **_from_pretrained_kwargs(config))
        return tower if config.vision_post_layernorm else drop_post_layernorm(tower)
    if config.vision_config is not None:
        hf = _hf_config(config.vision_config, config.vision, config.trust_remote_code)
    else:
        hf = AutoConfig.from_pretrained(config.vision, trust_remote_code=config.trust_remote_code)
    hf = getattr(hf, "vision_config", None) or hf
    tower = AutoModel.from_config(hf, trust_remote_code=config.trust_remote_code)
    tower = tower.to(_dtype(config.dtype)) if config.dtype else tower
    return tower if config.vision_post_layernorm else drop_post_layernorm(tower)


def drop_post_layernorm(tower: nn.Module) -> nn.Module:
    """The tower without CLIP's post-layernorm (an identity in its place, so no weights): the features are read
    before it, and the InternLM-XComposer2-4KHD release ships none (its finetune replaces it the same way)."""
    owner = getattr(tower, "vision_model", tower)
    if not isinstance(getattr(owner, "post_layernorm", None), nn.Module):
        raise ValueError(f"vision_post_layernorm=False: {type(tower).__name__} has no post_layernorm to leave out")
    owner.post_layernorm = nn.Identity()
    return tower


def load_llm(config: MLLMConfig, pretrained: bool = True) -> nn.Module:
    """The HF causal LM: pretrained from ``config.llm`` or randomly initialised from ``llm_config``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    if pretrained and config.llm is not None:
        return AutoModelForCausalLM.from_pretrained(config.llm, **_from_pretrained_kwargs(config), **extra)
    if config.llm_config is not None:
        hf = _hf_config(config.llm_config, config.llm, config.trust_remote_code)
    else:
        hf = AutoConfig.from_pretrained(config.llm, trust_remote_code=config.trust_remote_code)
    llm = AutoModelForCausalLM.from_config(hf, trust_remote_code=config.trust_remote_code, **extra)
    return llm.to(_dtype(config.dtype)) if config.dtype else llm


def build_model(config: MLLMConfig, pretrained: bool = True) -> "MLLM":
    """Build the MLLM. ``pretrained`` False skips loading the named checkpoints (random weights from the
    stored configs; used when a full checkpoint brings all weights)."""
    return MLLM(config, load_vision_tower(config, pretrained), load_llm(config, pretrained))


class MLLM(nn.Module):
    def __init__(self, config: MLLMConfig, vision_tower: nn.Module, llm: nn.Module):
        super().__init__()
        if config.image_token_id is None and config.video_token_id is None:
            raise ValueError("MLLMConfig.image_token_id (and/or video_token_id) must be set to the tokenizer's ids")
        # remember the resolved HF configs so a checkpoint can be rebuilt offline
        config = config.replace(vision_config=vision_tower.config.to_dict(), llm_config=llm.config.to_dict())
        self.config = config
        self.vision = VisionEncoder(vision_tower, config.vision_select_layer, config.vision_batch_size)
        hidden = llm.get_input_embeddings().embedding_dim
        ref = llm.get_input_embeddings().weight
        self.projector = nn.Sequential(
            nn.Linear(self.vision.out_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        ).to(device=ref.device, dtype=ref.dtype)
        self.vision.newline.data = self.vision.newline.data.to(device=ref.device, dtype=ref.dtype)
        self.vision.separator.data = self.vision.separator.data.to(device=ref.device, dtype=ref.dtype)
        self.image_mask = ImageMask()
        self.adapter_targets: list[str] = []
        if config.adapter == "plora":
            _, self.adapter_targets = apply_plora(
                llm, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets, self.image_mask,
                modules=config.lora_modules, fused=config.lora_fused,
            )
        elif config.adapter == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            self.adapter_targets = find_linear_targets(llm, config.lora_targets)
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=self.adapter_targets,
                rank_pattern={k: int(v[0]) for k, v in config.lora_modules.items()},
                alpha_pattern={k: float(v[1]) for k, v in config.lora_modules.items()},
            )
            llm = inject_adapter_in_model(lora, llm)
        self.llm = llm
        self.set_trainable(
            vision=not config.freeze_vision, connector=not config.freeze_projector, llm=not config.freeze_llm
        )
        if config.gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # -- parameter groups -------------------------------------------------------------------------------------
    def parameter_parts(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by part: ``vision`` (the ViT), ``connector`` (projector, newline, separator), ``adapter``
        (LoRA / P-LoRA factors) and ``llm`` (the base LLM)."""
        adapter = {id(p) for _, p in plora_parameters(self.llm)}
        parts: dict[str, list[tuple[str, nn.Parameter]]] = {"vision": [], "connector": [], "adapter": [], "llm": []}
        for name, p in self.named_parameters():
            if name.startswith("vision.tower."):
                parts["vision"].append((name, p))
            elif name.startswith(("vision.", "projector.")):
                parts["connector"].append((name, p))
            elif id(p) in adapter:
                parts["adapter"].append((name, p))
            else:
                parts["llm"].append((name, p))
        return parts

    def set_trainable(self, *, vision: bool, connector: bool, llm: bool, adapter: bool = True) -> None:
        flags = {"vision": vision, "connector": connector, "llm": llm, "adapter": adapter}
        for part, params in self.parameter_parts().items():
            for _, p in params:
                p.requires_grad_(flags[part])

    # -- switches -------------------------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing in the LLM and the vision tower (non-reentrant, so frozen inputs work)."""
        for part in (self.llm, self.vision.tower):
            if not getattr(part, "supports_gradient_checkpointing", False):
                continue
            if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.x
                part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        for part in (self.llm, self.vision.tower):
            if getattr(part, "supports_gradient_checkpointing", False):
                disable = getattr(part, "activation_checkpointing_disable", None) or part.gradient_checkpointing_disable
                disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.llm.modules())

    # -- media ------------------------------------------------------------------------------------------------------
    def embed_media(self, items: list[torch.Tensor], names: list[str] | None = None) -> list[torch.Tensor]:
        """Each image (3, H, W) / video (frames, 3, H, W) -> its (T_i, llm_hidden) embedding sequence."""
        seqs = self.vision(items, names)
        if not seqs:
            return []
        w = self.projector[0].weight
        flat = self.projector(torch.cat(seqs, dim=0).to(w.dtype))
        return list(flat.split([s.shape[0] for s in seqs], dim=0))

    def _media_items(self, media: Any, n_samples: int) -> list[list[torch.Tensor]]:
        if media is None:
            return [[] for _ in range(n_samples)]
        if len(media) != n_samples:
            raise ValueError(f"media has {len(media)} entries for {n_samples} samples")
        out = []
        for m in media:
            if m is None:
                out.append([])
            elif isinstance(m, torch.Tensor):
                out.append([m])
            else:
                out.append(list(m))
        return out

    # -- inputs --------------------------------------------------------------------------------------------------
    def prepare_inputs(
        self,
        input_ids: torch.Tensor | list[torch.Tensor],
        media: list[Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | list[torch.Tensor] | None = None,
        label_mask: torch.Tensor | list[torch.Tensor] | None = None,
        padding_side: str = "right",
        pack: list[list[int]] | None = None,
    ) -> MLLMInputs:
        """Build inputs_embeds, attention mask, labels and image mask (see the module docstring); with ``pack``,
        one row per entry holding those samples back to back, with per-sample positions."""
        ids_list = _rows(input_ids, attention_mask)
        labels_list = _rows(labels, attention_mask) if labels is not None else [i.clone() for i in ids_list]
        mask_list = _rows(label_mask, attention_mask) if label_mask is not None else None
        n = len(ids_list)
        items = self._media_items(media, n)
        cfg = self.config
        kinds = {cfg.image_token_id: "image", cfg.video_token_id: "video"}
        kinds.pop(None, None)

        all_items, names, plans = [], [], []
        for b, ids in enumerate(ids_list):
            if labels_list[b].shape != ids.shape or (mask_list is not None and mask_list[b].shape != ids.shape):
                raise ValueError(f"sample {b}: labels / label_mask do not have the layout of input_ids")
            is_ph = torch.zeros_like(ids, dtype=torch.bool)
            for tid in kinds:
                is_ph |= ids == tid
            positions = is_ph.nonzero().flatten().tolist()
            if len(positions) != len(items[b]):
                raise ValueError(
                    f"sample {b}: {len(positions)} media placeholder(s) in the text but {len(items[b])} media item(s)"
                )
            for k, (pos, item) in enumerate(zip(positions, items[b])):
                kind = kinds[int(ids[pos])]
                want = 3 if kind == "image" else 4
                if item.dim() != want:
                    raise ValueError(
                        f"sample {b}: placeholder {k} is {kind} token but its media has shape {tuple(item.shape)} "
                        f"(an image is (3, H, W), a video (frames, 3, H, W))"
                    )
                all_items.append(item)
                names.append(f"sample {b} {kind} {k}")
            plans.append(positions)

        media_embeds = self.embed_media(all_items, names)
        embed = self.llm.get_input_embeddings()
        device = embed.weight.device
        flat_ids = torch.cat(ids_list).to(device)
        flat_ids = flat_ids.masked_fill(torch.isin(flat_ids, torch.tensor(list(kinds), device=device)), 0)
        text = embed(flat_ids).split([len(i) for i in ids_list])

        seqs, labs, imgs = [], [], []
        m = 0
        for b, positions in enumerate(plans):
            lab = labels_list[b].to(device).clone()
            if mask_list is not None:
                lab = lab.masked_fill(~mask_list[b].to(device=device, dtype=torch.bool), -100)
            parts_e, parts_l, parts_i = [], [], []
            start = 0
            for pos in positions + [len(ids_list[b])]:
                parts_e.append(text[b][start:pos])
                parts_l.append(lab[start:pos])
                parts_i.append(torch.zeros(pos - start, dtype=torch.bool, device=device))
                if pos < len(ids_list[b]):
                    e = media_embeds[m].to(device=device, dtype=text[b].dtype)
                    m += 1
                    parts_e.append(e)
                    parts_l.append(torch.full((e.shape[0],), -100, dtype=lab.dtype, device=device))
                    parts_i.append(torch.ones(e.shape[0], dtype=torch.bool, device=device))
                start = pos + 1
            seqs.append(torch.cat(parts_e))
            labs.append(torch.cat(parts_l))
            imgs.append(torch.cat(parts_i))

        if pack is not None:
            return _packed_rows(seqs, labs, imgs, pack, device)
        length = max(s.shape[0] for s in seqs)
        hidden = seqs[0].shape[1]
        out_e = seqs[0].new_zeros(n, length, hidden)
        out_l = torch.full((n, length), -100, dtype=torch.long, device=device)
        out_a = torch.zeros(n, length, dtype=torch.long, device=device)
        out_i = torch.zeros(n, length, dtype=torch.bool, device=device)
        for b, (e, lab, im) in enumerate(zip(seqs, labs, imgs)):
            k = e.shape[0]
            sl = slice(0, k) if padding_side == "right" else slice(length - k, length)
            out_e[b, sl] = e
            out_l[b, sl] = lab
            out_a[b, sl] = 1
            out_i[b, sl] = im
        return MLLMInputs(out_e, out_a, out_l, out_i)

    # -- forward / generate -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | list[torch.Tensor],
        media: list[Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | list[torch.Tensor] | None = None,
        label_mask: torch.Tensor | list[torch.Tensor] | None = None,
        pack: list[list[int]] | None = None,
        loss_normalizer: float | None = None,
        **llm_kwargs: Any,
    ) -> MLLMOutput:
        inputs = self.prepare_inputs(input_ids, media, attention_mask, labels, label_mask, pack=pack)
        # kept set after the call: activation recomputation in backward needs the same mask
        self.image_mask.mask = inputs.image_mask if self.config.adapter == "plora" else None
        self.image_mask.decoding = False
        want_loss = labels is not None or label_mask is not None
        llm_kwargs.setdefault("use_cache", False)
        if inputs.position_ids is not None:  # packed: the restarts in position_ids separate the samples
            attn, llm_kwargs["position_ids"] = None, inputs.position_ids
        else:
            attn = inputs.attention_mask
        if not want_loss:
            out = self.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=attn, **llm_kwargs)
            return MLLMOutput(None, out.logits, inputs.labels, inputs.attention_mask, inputs.image_mask)
        hidden = self.llm.get_decoder()(inputs_embeds=inputs.inputs_embeds, attention_mask=attn,
                                        **llm_kwargs).last_hidden_state
        n = len(input_ids)
        sample = inputs.sample_index
        if sample is None:
            sample = torch.arange(inputs.labels.shape[0], device=hidden.device)[:, None].expand_as(inputs.labels)
            sample = sample.masked_fill(inputs.attention_mask == 0, -1)
        target = inputs.labels[:, 1:]
        keep = (target != -100) & (sample[:, 1:] == sample[:, :-1])  # next token inside the same sample
        rows = hidden[:, :-1][keep]  # only the supervised positions reach the head
        logits = self.llm.get_output_embeddings()(rows).float()
        token_loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="none")
        loss_sum = token_loss.sum()
        count = int(keep.sum())
        idx = sample[:, 1:][keep]
        per_sum = token_loss.new_zeros(n).index_add(0, idx, token_loss.detach())
        per_n = token_loss.new_zeros(n).index_add(0, idx, torch.ones_like(token_loss))
        norm = loss_normalizer if loss_normalizer is not None else max(count, 1)
        return MLLMOutput(loss_sum / norm, logits, inputs.labels, inputs.attention_mask, inputs.image_mask,
                          loss_sum=loss_sum, label_tokens=count, sample_loss=per_sum / per_n)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | list[torch.Tensor],
        media: list[Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """HF ``generate`` on the built embeddings (left-padded); returns the new token ids (B, new)."""
        inputs = self.prepare_inputs(input_ids, media, attention_mask, padding_side="left")
        mask = inputs.image_mask if self.config.adapter == "plora" else None
        with self.image_mask.use(mask, decoding=True):
            return self.llm.generate(
                inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, **generate_kwargs
            )

    # -- save / load ---------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, trainable_only: bool = False) -> Path:
        """Write ``mllm_config.json`` and either ``model.safetensors`` (all weights) or, with ``trainable_only``,
        ``trainable.safetensors`` (parameters with requires_grad: adapters, projector, ...; the base is then
        rebuilt from the named checkpoints on load). Each file is written to a temp name and renamed."""
        from safetensors.torch import save_file, save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if trainable_only and (self.config.vision is None or self.config.llm is None):
            raise ValueError(
                "trainable_only save needs the vision tower and the LLM given by name or path "
                "(a base built from a config alone is random and cannot be rebuilt); save the full model"
            )
        meta = {"format": "pt", "mllm_pipeline": "trainable" if trainable_only else "full"}
        target = path / (TRAINABLE_FILE if trainable_only else WEIGHTS_FILE)
        tmp = _tmp_name(path, target.name)
        try:
            if trainable_only:
                tensors = {n: p.detach().contiguous() for n, p in self.named_parameters() if p.requires_grad}
                save_file(tensors, tmp, metadata=meta)
            else:
                save_model(self, tmp, metadata=meta)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        stale = path / (WEIGHTS_FILE if trainable_only else TRAINABLE_FILE)
        if stale.exists():
            stale.unlink()
        _atomic_write_text(path / CONFIG_FILE, self.config.to_json())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "MLLM":
        """Load a directory written by ``save_pretrained``; ``overrides`` replace config fields (e.g. dtype,
        gradient_checkpointing)."""
        from safetensors.torch import load_file, load_model

        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found: not an MLLM checkpoint directory")
        config = MLLMConfig.from_json(cfg_file.read_text())
        if overrides:
            config = config.replace(**overrides)
        if (path / WEIGHTS_FILE).exists():
            model = build_model(config, pretrained=False)
            device = next(model.parameters()).device
            load_model(model, path / WEIGHTS_FILE, strict=True, device=str(device))
            return model
        if (path / TRAINABLE_FILE).exists():
            model = build_model(config, pretrained=True)
            state = load_file(path / TRAINABLE_FILE)
            result = model.load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise ValueError(f"{path / TRAINABLE_FILE}: weights the model does not have: {result.unexpected_keys[:5]}")
            return model
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_FILE} nor {TRAINABLE_FILE} found")


def _packed_rows(seqs: list[torch.Tensor], labs: list[torch.Tensor], imgs: list[torch.Tensor],
                 pack: list[list[int]], device: torch.device) -> MLLMInputs:
    """Samples concatenated into rows (``pack``: sample indices per row), right-padded; positions restart per
    sample and the padding is a block of its own (positions from 0, sample index -1)."""
    flat = sorted(i for row in pack for i in row)
    if flat != list(range(len(seqs))):
        raise ValueError(f"pack must name every one of the {len(seqs)} samples exactly once, got {pack}")
    lengths = [sum(seqs[i].shape[0] for i in row) for row in pack]
    length = max(lengths)
    b, hidden = len(pack), seqs[0].shape[1]
    out_e = seqs[0].new_zeros(b, length, hidden)
    out_l = torch.full((b, length), -100, dtype=torch.long, device=device)
    out_a = torch.zeros(b, length, dtype=torch.long, device=device)
    out_i = torch.zeros(b, length, dtype=torch.bool, device=device)
    pos = torch.zeros(b, length, dtype=torch.long, device=device)
    smp = torch.full((b, length), -1, dtype=torch.long, device=device)
    for r, row in enumerate(pack):
        at = 0
        for i in row:
            k = seqs[i].shape[0]
            out_e[r, at:at + k] = seqs[i]
            out_l[r, at:at + k] = labs[i]
            out_i[r, at:at + k] = imgs[i]
            out_a[r, at:at + k] = 1
            pos[r, at:at + k] = torch.arange(k, device=device)
            smp[r, at:at + k] = i
            at += k
        pos[r, at:] = torch.arange(length - at, device=device)
    return MLLMInputs(out_e, out_a, out_l, out_i, pos, smp)


def _rows(x: torch.Tensor | list[torch.Tensor], attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    if isinstance(x, (list, tuple)):
        return [torch.as_tensor(r) for r in x]
    if x.dim() != 2:
        raise ValueError(f"expected a (batch, seq) tensor or a list of 1-D tensors, got shape {tuple(x.shape)}")
    if attention_mask is None:
        return list(x)
    if attention_mask.shape != x.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input shape {tuple(x.shape)}")
    keep = attention_mask.to(torch.bool)
    return [row[k.to(row.device)] for row, k in zip(x, keep)]


def _tmp_name(directory: Path, name: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return tmp


def _atomic_write_text(target: Path, text: str) -> None:
    tmp = _tmp_name(target.parent, target.name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_config(path: str | os.PathLike) -> MLLMConfig:
    return MLLMConfig.from_json((Path(path) / CONFIG_FILE).read_text())


__all__ = ["MLLM", "MLLMInputs", "MLLMOutput", "build_model", "load_llm", "load_vision_tower", "load_config"]
