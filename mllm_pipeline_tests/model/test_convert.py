"""The official InternLM-XComposer2-4KHD layout in and out: conversion, the exact way back, the official forward.

Sources the fixtures and the transcriptions are built from (read, not copied):

* ``fixtures/ixc2_4khd/weight_names.json``: the 942 weight names of ``internlm/internlm-xcomposer2-4khd-7b`` (a
  public save_pretrained copy of the release's index, github QimingLee/InternLM-XComposer-main @ a0332991,
  ``model/pytorch_model.bin.index.json``); ``config.json``: the release's model config;
  ``tiny_layout_with_shapes.json``: every weight name and shape of a tiny instance of the official 4KHD model code
  (hidden 64, 2 layers, CLIP 336/14 with 2 layers, vocab 92544, the released P-LoRA ranks).
* The P-LoRA arithmetic (``res[im_mask] += Plora_B(Plora_A(lora_dropout(x[im_mask]))) * lora_alpha / lora_r``),
  the grouped ``wqkv`` (``rearrange(qkv, "b q (h gs d) -> b q h gs d")``, queries then key then value per KV
  head), the MLP order ``w2(act(w1(x)) * w3(x))``: github InternLM/InternLM-XComposer @
  0f70c3e3911189de1869396b4017714c31821e3a, ``InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base/
  build_mlp.py`` (class PLoRA) and ``.../modeling_internlm2.py`` (InternLM2Attention, InternLM2MLP) — the same
  classes the 4KHD hub code uses, there with ``wqkv`` rank 8 / alpha 16 and ``wo``, ``w1..w3`` rank 256 / alpha 256
  (the ranks are corroborated by the fixture's shapes and lmdeploy's ``_lora_cfg_4khd_7b``).
* The vision layout (global view rows + ``plora_sub_GN``, ``plora_glb_GN``, local rows + ``plora_sub_GN``; features
  of the last hidden state, CLS dropped, 2x2 merge) as in the 4KHD ``build_mlp.py`` on the hub.

``official_logits`` below transcribes that arithmetic straight from the official tensors, independently of the
project's code; with ``dropout`` it draws the official dropout masks (one per P-LoRA module and call, on the image
rows, in the official call order wqkv, wo, w1, w3, w2), so train-mode outputs are compared exactly too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mllm_pipeline.model.convert import (ConversionError, convert_state_dict, is_official_checkpoint, load_official,
                                         official_model_config, read_official_state_dict, save_official,
                                         to_official_state_dict)

FIXTURES = Path(__file__).parent / "fixtures" / "ixc2_4khd"
TINY = json.loads((FIXTURES / "tiny_layout_with_shapes.json").read_text())
RELEASE_NAMES = json.loads((FIXTURES / "weight_names.json").read_text())["keys"]
RELEASE_CONFIG = json.loads((FIXTURES / "config.json").read_text())
#: CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336's vision config): hidden, intermediate, layers, size, patch
CLIP_L_336 = {"hidden": 1024, "intermediate": 4096, "layers": 24, "image_size": 336, "patch": 14}
#: the released P-LoRA (module: rank, alpha)
RELEASED = {"attention.wqkv": (8, 16.0), "attention.wo": (256, 256.0), "feed_forward.w1": (256, 256.0),
            "feed_forward.w3": (256, 256.0), "feed_forward.w2": (256, 256.0)}
VIT = "vit.vision_tower.vision_model."


def official_shapes(llm: dict, vision: dict, ranks: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every weight of the official model and its shape, from its config (the module shapes of the official
    InternLM2 + PLoRA + CLIP code, transcribed)."""
    h, nh, kv, ffn, vocab = (llm[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                               "intermediate_size", "vocab_size"))
    hd = h // nh
    c, vi, s, p = vision["hidden"], vision["intermediate"], vision["image_size"], vision["patch"]
    out: dict[str, tuple[int, ...]] = {
        "plora_glb_GN": (1, 1, 4 * c), "plora_sub_GN": (1, 1, 1, 4 * c), "model.tok_embeddings.weight": (vocab, h),
        "model.norm.weight": (h,), "output.weight": (vocab, h), VIT + "embeddings.class_embedding": (c,),
        VIT + "embeddings.patch_embedding.weight": (c, 3, p, p),
        VIT + "embeddings.position_embedding.weight": ((s // p) ** 2 + 1, c),
        VIT + "pre_layrnorm.weight": (c,), VIT + "pre_layrnorm.bias": (c,),
        "vision_proj.0.weight": (h, 4 * c), "vision_proj.0.bias": (h,), "vision_proj.2.weight": (h, h),
        "vision_proj.2.bias": (h,)}
    for i in range(vision["layers"]):
        e = f"{VIT}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.update({e + f"self_attn.{proj}.weight": (c, c), e + f"self_attn.{proj}.bias": (c,)})
        for norm in ("layer_norm1", "layer_norm2"):
            out.update({e + f"{norm}.weight": (c,), e + f"{norm}.bias": (c,)})
        out.update({e + "mlp.fc1.weight": (vi, c), e + "mlp.fc1.bias": (vi,), e + "mlp.fc2.weight": (c, vi),
                    e + "mlp.fc2.bias": (c,)})
    linears = {"attention.wqkv": ((nh + 2 * kv) * hd, h), "attention.wo": (h, nh * hd),
               "feed_forward.w1": (ffn, h), "feed_forward.w3": (ffn, h), "feed_forward.w2": (h, ffn)}
    for i in range(llm["num_hidden_layers"]):
        lp = f"model.layers.{i}."
        out.update({lp + "attention_norm.weight": (h,), lp + "ffn_norm.weight": (h,)})
        for name, (o, n) in linears.items():
            out.update({lp + name + ".weight": (o, n), lp + name + ".Plora_A.weight": (ranks[name], n),
                        lp + name + ".Plora_B.weight": (o, ranks[name])})
    return out


TINY_VISION = {"hidden": 64, "intermediate": 128, "layers": 2, "image_size": 336, "patch": 14}
RANKS = {k: r for k, (r, _) in RELEASED.items()}


def test_the_shape_transcription_matches_the_published_layouts():
    """The shape rules above give exactly the tiny instance's published shapes and the release's 942 names."""
    assert official_shapes(TINY["config"], TINY_VISION, RANKS) == {k: tuple(v) for k, v in TINY["shapes"].items()}
    release = official_shapes(RELEASE_CONFIG, CLIP_L_336, RANKS)
    assert sorted(release) == sorted(RELEASE_NAMES) and len(release) == 942
    assert not any("post_layernorm" in k for k in RELEASE_NAMES)


def random_official(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for the official names (norm weights near 1, P-LoRA B non-zero so image rows matter)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in sorted(shapes.items()):
        scale = 1.0 if k in ("plora_glb_GN", "plora_sub_GN", "model.tok_embeddings.weight") else 0.1
        t = torch.randn(*shape, generator=g) * scale
        if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight")):
            t = 1 + t
        if "Plora_A" in k or "Plora_B" in k:
            t = t * 0.5
        sd[k] = t
    return sd


def write_official(path: Path, sd: dict[str, torch.Tensor], config: dict) -> Path:
    """The directory a user downloads: config.json, weights (two shards + index, as the release), the tokenizer
    and remote-code files (placeholders here: only their copying is checked)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    keys = sorted(sd)
    half = len(keys) // 2
    wm = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(path / name))
        wm.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLMXComposer2Tokenizer"}))
    (path / "modeling_internlm_xcomposer2.py").write_text("# remote code of the release (placeholder)\n")
    return path


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    sd = random_official(official_shapes(TINY["config"], TINY_VISION, RANKS))
    return write_official(tmp_path_factory.mktemp("ixc") / "internlm-xcomposer2-4khd-7b", sd, TINY["config"]), sd


IMAGE_ID = 92544  # the id the tokenizer gives the added <image>; replaced by the image before the LLM


def test_the_release_layout_loads_with_its_own_ranks_and_no_post_layernorm(tiny_release):
    """The failure modes of the old converter are gone: no post_layernorm is demanded (and none is built), every
    module keeps its released rank and alpha (scaling 2 on q/k/v, 1 elsewhere), wqkv's A stays one matrix."""
    path, sd = tiny_release
    assert is_official_checkpoint(path)
    model = load_official(path, image_token_id=IMAGE_ID)
    cfg = model.config
    assert not cfg.vision_post_layernorm and not any("post_layernorm" in k for k in model.state_dict())
    layer = model.llm.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert (proj.rank, proj.scaling) == (8, 2.0) and proj.shared is attn.qkv and "lora_A" not in proj._modules
    for proj in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert (proj.rank, proj.scaling) == (256, 1.0) and proj.shared is None
    assert torch.equal(attn.qkv.lora_A.weight, sd["model.layers.0.attention.wqkv.Plora_A.weight"])
    assert sum(".lora_A." in k for k in model.state_dict()) == 5 * TINY["config"]["num_hidden_layers"]
    # the saved MLLM config rebuilds the same structure
    from mllm_pipeline.model import MLLMConfig, build_model

    again = build_model(MLLMConfig.from_json(cfg.to_json()), pretrained=False)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_official_to_project_to_official_is_the_identity(tiny_release, tmp_path):
    path, sd = tiny_release
    model = load_official(path, image_token_id=IMAGE_ID)
    out = save_official(model.state_dict(), model.config, tmp_path / "export", max_shard_bytes=20 * 1024**2)
    back = read_official_state_dict(out)
    assert sorted(back) == sorted(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert json.loads((out / "config.json").read_text()) == {**TINY["config"], "torch_dtype": "float32"}
    assert (out / "model.safetensors.index.json").exists()  # sharded like the release
    for name in ("tokenizer_config.json", "modeling_internlm_xcomposer2.py"):  # loads where the release loads
        assert (out / name).read_bytes() == (path / name).read_bytes()
    # and again: the export is itself an official checkpoint
    assert is_official_checkpoint(out)


def test_the_release_key_list_round_trips_at_full_size(tmp_path):
    """On the meta device (no memory): the 942 names at their 7B shapes convert into exactly the project model's
    keys and shapes, and come back as exactly the official names and shapes."""
    from accelerate import init_empty_weights

    from mllm_pipeline.model import build_model

    shapes = official_shapes(RELEASE_CONFIG, CLIP_L_336, RANKS)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    (tmp_path / "config.json").write_text(json.dumps(RELEASE_CONFIG))
    cfg = official_model_config(tmp_path, state=meta, image_token_id=IMAGE_ID)
    assert cfg.vision_config["num_attention_heads"] == 16 and cfg.vision_config["num_hidden_layers"] == 24
    assert cfg.lora_modules["q_proj"] == [8, 16.0] and cfg.lora_modules["down_proj"] == [256, 256.0]
    converted = convert_state_dict(meta, cfg.llm_config)
    with init_empty_weights(include_buffers=False):
        model = build_model(cfg, pretrained=False)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in converted.items()}
    back = to_official_state_dict(converted, cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes


def test_unknown_rank_needs_its_alpha(tmp_path):
    ranks = {**RANKS, "attention.wqkv": 16}
    sd = random_official(official_shapes(TINY["config"], TINY_VISION, ranks))
    path = write_official(tmp_path / "ixc", sd, TINY["config"])
    with pytest.raises(ConversionError, match=r"attention\.wqkv has rank 16.*lora_alpha"):
        load_official(path, image_token_id=IMAGE_ID)
    model = load_official(path, image_token_id=IMAGE_ID, lora_alpha={"attention.wqkv": 8.0})
    assert model.llm.model.layers[1].self_attn.v_proj.scaling == 0.5


def test_keys_outside_the_layout_are_named(tiny_release):
    _, sd = tiny_release
    sd = dict(sd)
    sd["model.layers.0.attention.extra.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match="attention.extra.weight"):
        convert_state_dict(sd, TINY["config"])


def test_separate_qkv_adapters_are_not_exported_as_one():
    from mllm_pipeline.model import build_model, tiny_config

    model = build_model(tiny_config(image_token_id=250))
    with pytest.raises(ConversionError, match="one A shared"):
        to_official_state_dict(model.state_dict(), model.config)


# -- the official arithmetic, transcribed --------------------------------------------------------------------------


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _plora(x, sd, name, im_mask, dropout):
    """PLoRA.forward: the base linear, plus B A dropout(x) * alpha / r on the image rows."""
    rank, alpha = RELEASED[name.split(".", 3)[3]]
    res = x @ sd[name + ".weight"].T
    part = x[im_mask]
    if dropout:
        part = F.dropout(part, p=dropout, training=True)
    res[im_mask] += (part @ sd[name + ".Plora_A.weight"].T) @ sd[name + ".Plora_B.weight"].T * (alpha / rank)
    return res


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _official_image(sd, image, cfg):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    crop = TINY_VISION["image_size"]
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=TINY_VISION["hidden"], intermediate_size=TINY_VISION["intermediate"],
                                            num_hidden_layers=TINY_VISION["layers"], num_attention_heads=1,
                                            image_size=crop, patch_size=TINY_VISION["patch"])).eval()
    own = set(clip.state_dict())
    tower = {k[len("vit.vision_tower."):]: v for k, v in sd.items() if k.startswith("vit.")}
    tower = {(k if k in own else k.removeprefix("vision_model.")): v for k, v in tower.items()}
    missing = clip.load_state_dict(tower, strict=False).missing_keys
    assert all("post_layernorm" in k for k in missing)  # the only weights the release lacks: unused
    rows, cols = image.shape[1] // crop, image.shape[2] // crop
    glb = F.interpolate(image[None], size=(crop, crop), mode="bicubic", align_corners=False)
    subs = [image[:, y * crop:(y + 1) * crop, x * crop:(x + 1) * crop] for y in range(rows) for x in range(cols)]
    with torch.no_grad():
        feats = clip(torch.cat([glb, torch.stack(subs)]), output_hidden_states=True).hidden_states[-1][:, 1:]
    n, L, C = feats.shape
    H = int(L**0.5)
    merged = feats.reshape(n, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(n, H // 2, H // 2, 4 * C)
    m = H // 2
    sub_gn, glb_gn = sd["plora_sub_GN"].reshape(-1), sd["plora_glb_GN"].reshape(-1)
    tokens = []
    for y in range(m):  # global view: each row, then sub_GN
        tokens += [merged[0, y, x] for x in range(m)] + [sub_gn]
    tokens.append(glb_gn)
    for cy in range(rows):  # local view, stitched: token row y of crop row cy runs through every crop column
        for y in range(m):
            for cx in range(cols):
                tokens += [merged[1 + cy * cols + cx, y, x] for x in range(m)]
            tokens.append(sub_gn)
    x = torch.stack(tokens)
    h = F.gelu(x @ sd["vision_proj.0.weight"].T + sd["vision_proj.0.bias"])
    return h @ sd["vision_proj.2.weight"].T + sd["vision_proj.2.bias"]


def official_logits(sd, before: list[int], image: torch.Tensor, after: list[int], dropout: float = 0.0,
                    seed: int | None = None) -> torch.Tensor:
    """Logits of every position; with ``dropout`` the masks are drawn after ``torch.manual_seed(seed)`` (set once
    the vision features are computed: building the transcription's CLIP draws random numbers of its own)."""
    cfg = TINY["config"]
    hidden, heads, kv, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    head_dim, groups = hidden // heads, heads // kv
    emb = sd["model.tok_embeddings.weight"]
    img = _official_image(sd, image, cfg)
    if seed is not None:
        torch.manual_seed(seed)
    x = torch.cat([emb[before], img, emb[after]])
    im_mask = torch.cat([torch.zeros(len(before)), torch.ones(len(img)), torch.zeros(len(after))]).bool()
    T = x.shape[0]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "attention_norm.weight"], eps)
        qkv = _plora(h, sd, p + "attention.wqkv", im_mask, dropout).reshape(T, kv, groups + 2, head_dim)
        q = qkv[:, :, :groups].reshape(T, heads, head_dim)
        k, v = qkv[:, :, -2], qkv[:, :, -1]
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / head_dim**0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(T, hidden)
        x = x + _plora(o, sd, p + "attention.wo", im_mask, dropout)
        h = _rms(x, sd[p + "ffn_norm.weight"], eps)
        w1 = _plora(h, sd, p + "feed_forward.w1", im_mask, dropout)
        w3 = _plora(h, sd, p + "feed_forward.w3", im_mask, dropout)
        x = x + _plora(F.silu(w1) * w3, sd, p + "feed_forward.w2", im_mask, dropout)
    return _rms(x, sd["model.norm.weight"], eps) @ sd["output.weight"].T


BEFORE, AFTER = [1, 92543, 1008, 364], [92542, 364, 92543, 525, 11353, 364]


def test_converted_model_reproduces_the_official_forward(tiny_release):
    """Eval: logits equal the transcription; P-LoRA (scaling 2 on wqkv) reaches them. Train mode with the
    official lora_dropout 0.05: the same seed gives the same logits, i.e. the converted model draws exactly the
    official dropout masks, one per module (q, k and v share wqkv's)."""
    path, sd = tiny_release
    model = load_official(path, image_token_id=IMAGE_ID)
    assert model.config.lora_dropout == 0.05
    torch.manual_seed(1)
    image = torch.randn(3, 336, 672)  # a 1x2 crop grid
    ids = torch.tensor([BEFORE + [IMAGE_ID] + AFTER])
    want = official_logits(sd, BEFORE, image, AFTER)
    model.eval()
    with torch.no_grad():
        got = model(ids, [image]).logits[0]
    assert got.shape == want.shape == (len(BEFORE) + 3 * 144 + 1 + 2 * 12 + len(AFTER), 92544)
    diff = (got - want).abs().max()
    assert diff < 1e-4, diff
    # the loss on the text after the image (labels as the official finetune: the inputs, HF's shift by one)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, -len(AFTER):] = True
    with torch.no_grad():
        loss = model(ids, [image], label_mask=mask).loss
    n = want.shape[0]
    want_loss = F.cross_entropy(want[n - len(AFTER) - 1:n - 1], torch.tensor(AFTER))
    assert abs(float(loss) - float(want_loss)) < 1e-5, (float(loss), float(want_loss))
    # the per-module scaling matters: with scaling 1 on wqkv (alpha = rank, the old converter) the text after the
    # image reads differently
    half = {k: (v / 2 if k.endswith("wqkv.Plora_B.weight") else v) for k, v in sd.items()}
    assert (official_logits(half, BEFORE, image, AFTER)[-1] - want[-1]).abs().max() > 1e-3

    model.train()
    torch.manual_seed(7)
    with torch.no_grad():
        got_t = model(ids, [image]).logits[0]
    want_t = official_logits(sd, BEFORE, image, AFTER, dropout=0.05, seed=7)
    assert (want_t - want).abs().max() > 1e-3  # dropout did act
    assert (got_t - want_t).abs().max() < 1e-4, (got_t - want_t).abs().max()
