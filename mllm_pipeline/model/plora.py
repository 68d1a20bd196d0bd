"""Partial LoRA (InternLM-XComposer2): a LoRA update applied only at image-token positions.

For a wrapped linear ``W`` and input ``x`` at position ``t``:

    y_t = W x_t                                   at text positions
    y_t = W x_t + B A dropout(x_t) * alpha / r    at image positions (newline and separator included)

``B`` starts at zero, so a freshly wrapped model computes exactly what the base model does. peft has no
per-token mask, hence this small module. The mask is shared: every ``PLoRALinear`` of a model holds the same
``ImageMask`` object and the MLLM sets ``ImageMask.mask`` (a (batch, seq) bool tensor) before it calls the LLM.
The mask stays set after the forward (until the next one) so that activation recomputation during backward
(gradient checkpointing) sees the same mask. With no mask set the layers act as their base linear.

The update is computed only for the image rows (gathered with the mask and added back with ``index_add``), so
text rows are bit-for-bit the base layer's output.

Rank and alpha can differ per module (the 4KHD release: wqkv rank 8 alpha 16, the others rank 256 alpha 256);
each layer scales by its own ``alpha / r``. A fused projection that this model holds as several linears (InternLM2's
``wqkv`` = Llama's q/k/v) keeps ONE low-rank A and ONE dropout mask: the members share a ``SharedLoRAA`` (held by
their parent module under the group's name) and each keeps its own B, the rows of the fused B. The first member
to see an input computes ``A dropout(x)``; the others reuse it, so ``B_q A x``, ``B_k A x``, ``B_v A x`` are exactly
the rows of the fused ``B A x``, in training (dropout) too.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
from torch import nn


class ImageMask:
    """Holder of the per-forward image-position mask shared by all P-LoRA layers of a model.

    ``decoding``: while generating with a KV cache, forwards whose sequence length differs from the mask's
    (the new text tokens) take the base path; outside generation a mismatch is an error.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.decoding = False

    @contextlib.contextmanager
    def use(self, mask: torch.Tensor | None, decoding: bool = False) -> Iterator[None]:
        previous = (self.mask, self.decoding)
        self.mask, self.decoding = mask, decoding
        try:
            yield
        finally:
            self.mask, self.decoding = previous


class SharedLoRAA(nn.Module):
    """The one A matrix (and the one dropout) of a fused projection whose output rows this model splits over
    several ``PLoRALinear`` (q, k, v of InternLM2's ``wqkv``). ``project(x, rows)`` returns ``A dropout(rows)``;
    it is computed when the first member sees ``x`` and reused by the other ``members - 1`` calls on the same
    input (the cache is dropped after the last member, so no activation outlives its forward)."""

    def __init__(self, in_features: int, rank: int, dropout: float, members: int, device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.members = members
        self._key: torch.Tensor | None = None
        self._value: torch.Tensor | None = None
        self._uses = 0

    def extra_repr(self) -> str:
        return f"members={self.members}"

    def project(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self._key is x and self._value is not None and self._uses < self.members:
            value = self._value
            self._uses += 1
        else:
            value = self.lora_A(self.dropout(rows.to(self.lora_A.weight.dtype)))
            self._key, self._value, self._uses = x, value, 1
        if self._uses >= self.members:
            self._key = self._value = None
        return value


class PLoRALinear(nn.Module):
    """Wraps an ``nn.Linear``; adds the low-rank update at the positions the shared ``ImageMask`` marks. With
    ``shared`` the A matrix and the dropout are those of a ``SharedLoRAA`` (a fused projection's)."""

    def __init__(self, base: nn.Linear, state: ImageMask, rank: int, alpha: float, dropout: float = 0.0,
                 shared: SharedLoRAA | None = None):
        super().__init__()
        self.base = base
        self.state = state
        self.rank = rank
        self.scaling = alpha / rank
        w = base.weight
        if shared is None:
            self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        elif shared.lora_A.out_features != rank or shared.lora_A.in_features != base.in_features:
            raise ValueError(f"shared LoRA A is {shared.lora_A.in_features}->{shared.lora_A.out_features}, this "
                             f"layer needs {base.in_features}->{rank}")
        # a plain attribute, not a submodule: the parent module owns the shared A (one parameter, one key)
        self.__dict__["shared"] = shared
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its linears (dtype checks)
        return self.base.weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}" + (", shared A" if self.shared is not None else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mask = self.state.mask
        if mask is None:
            return out
        if mask.shape != x.shape[:-1]:
            if self.state.decoding:
                return out  # cached decoding step: the new tokens are text
            raise ValueError(
                f"P-LoRA image mask has shape {tuple(mask.shape)} but the layer input has positions "
                f"{tuple(x.shape[:-1])}; set the mask for this forward (MLLM.forward does)"
            )
        idx = mask.reshape(-1).nonzero().squeeze(1)
        if idx.numel() == 0:
            return out
        flat_x = x.reshape(-1, x.shape[-1]).index_select(0, idx)
        if self.shared is not None:
            low = self.shared.project(x, flat_x)
        else:
            low = self.lora_A(self.dropout(flat_x.to(self.lora_A.weight.dtype)))
        delta = self.lora_B(low.to(self.lora_B.weight.dtype)) * self.scaling
        flat_out = out.reshape(-1, out.shape[-1]).index_add(0, idx, delta.to(out.dtype))
        return flat_out.reshape(out.shape)


def find_linear_targets(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Dotted names of the ``nn.Linear`` modules to adapt.

    ``targets`` None: every ``nn.Linear`` inside the decoder layers (a ``.layers.<i>.`` / ``.h.<i>.`` /
    ``.blocks.<i>.`` path; the output head and embeddings are never included). Otherwise a module is taken
    when its name equals a target or ends with ``.<target>`` (peft's rule), or when a target starting with
    ``re:`` matches it as a regular expression (``re:.*\\.self_attn\\..*``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layer_path = re.compile(r"\.(layers|h|blocks|block|layer)\.\d+\.")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if targets is None:
            if layer_path.search("." + name):
                names.append(name)
            continue
        for t in targets:
            if t.startswith("re:"):
                hit = re.fullmatch(t[3:], name) is not None
            else:
                hit = name == t or name.endswith("." + t)
            if hit:
                names.append(name)
                break
    if not names:
        raise ValueError(f"no nn.Linear in {type(model).__name__} matches the adapter targets {targets}")
    return names


def _module_setting(name: str, settings: dict[str, list[float]] | None, rank: int, alpha: float) -> tuple[int, float]:
    for suffix, (r, a) in (settings or {}).items():
        if name == suffix or name.endswith("." + suffix):
            return int(r), float(a)
    return rank, alpha


def apply_plora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: list[str] | None = None,
    state: ImageMask | None = None,
    modules: dict[str, list[float]] | None = None,
    fused: dict[str, list[str]] | None = None,
) -> tuple[ImageMask, list[str]]:
    """Replace the target linears of ``model`` in place by ``PLoRALinear``; returns the shared mask holder and
    the wrapped names. ``modules``: per-module ``[rank, alpha]`` by name suffix (others get ``rank`` / ``alpha``).
    ``fused``: ``{group: [child names]}``: the named siblings under one parent share one A and one dropout mask
    (a ``SharedLoRAA`` registered on the parent as ``group``); every group must be complete under its parent."""
    state = state or ImageMask()
    names = find_linear_targets(model, targets)
    member_of = {child: group for group, children in (fused or {}).items() for child in children}
    shared: dict[tuple[str, str], SharedLoRAA] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        group = member_of.get(child)
        if group is None or (parent_name, group) in shared:
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        children = fused[group]  # type: ignore[index]
        missing = [c for c in children if f"{parent_name}.{c}".lstrip(".") not in names]
        if missing:
            raise ValueError(f"fused P-LoRA group {group!r} under {parent_name!r} lacks {missing} among the targets")
        in_features = {getattr(parent, c).in_features for c in children}
        r = {_module_setting(f"{parent_name}.{c}", modules, rank, alpha)[0] for c in children}
        if len(in_features) != 1 or len(r) != 1:
            raise ValueError(f"fused P-LoRA group {group!r} under {parent_name!r}: its linears must share the input "
                             f"size and the rank, got inputs {sorted(in_features)} ranks {sorted(r)}")
        w = getattr(parent, child).weight
        sa = SharedLoRAA(in_features.pop(), r.pop(), dropout, len(children), device=w.device, dtype=w.dtype)
        setattr(parent, group, sa)
        shared[(parent_name, group)] = sa
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        r, a = _module_setting(name, modules, rank, alpha)
        sa = shared.get((parent_name, member_of.get(child, "")))
        setattr(parent, child, PLoRALinear(getattr(parent, child), state, r, a, dropout, shared=sa))
    return state, names


def plora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of the low-rank factors (P-LoRA ``lora_A``/``lora_B``, or peft's)."""
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B.")):
            yield name, p
