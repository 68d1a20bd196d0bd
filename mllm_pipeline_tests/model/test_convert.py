"""The official 4KHD checkpoint layout converts into the project's model and reproduces the official forward.

A tiny checkpoint is written on the spot in the official key layout (random weights, P-LoRA B non-zero so the
image-only update matters). ``official_logits`` transcribes the official model's arithmetic (InternLM2 with the
grouped ``wqkv``, P-LoRA at image positions, the 4KHD vision layout with ``plora_sub_GN`` after every token
row and ``plora_glb_GN`` between the views) straight from those tensors, independently of the project's code.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mllm_pipeline.model.convert import ConversionError, convert_state_dict, is_official_checkpoint, load_official

VOCAB, HIDDEN, HEADS, KV, LAYERS, FFN, RANK = 100, 64, 4, 2, 2, 96, 8
V_HIDDEN, V_LAYERS, V_HEADS, CROP, PATCH = 32, 2, 2, 56, 14
HEAD_DIM = HIDDEN // HEADS
IMAGE_ID = VOCAB - 1
OFFICIAL_CONFIG = {"model_type": "internlmxcomposer2", "architectures": ["InternLMXComposer2ForCausalLM"],
                   "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                   "num_attention_heads": HEADS, "num_key_value_heads": KV, "rms_norm_eps": 1e-5,
                   "rope_theta": 10000.0, "max_position_embeddings": 512, "bias": False, "hd_num": 4}


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    torch.manual_seed(seed)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN,
                                            num_hidden_layers=V_LAYERS, num_attention_heads=V_HEADS,
                                            image_size=CROP, patch_size=PATCH))
    # the official checkpoint was written with transformers 4.x: the tower's keys carry ``vision_model.``
    sd = {f"vit.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v.clone()
          for k, v in clip.state_dict().items()}
    c4 = 4 * V_HIDDEN
    sd.update({"vision_proj.0.weight": r(HIDDEN, c4), "vision_proj.0.bias": r(HIDDEN),
               "vision_proj.2.weight": r(HIDDEN, HIDDEN), "vision_proj.2.bias": r(HIDDEN),
               "plora_glb_GN": r(1, 1, c4, scale=1.0), "plora_sub_GN": r(1, 1, 1, c4, scale=1.0),
               "model.tok_embeddings.weight": r(VOCAB, HIDDEN, scale=1.0), "model.norm.weight": 1 + r(HIDDEN),
               "output.weight": r(VOCAB, HIDDEN)})
    qkv_out = (HEADS + 2 * KV) * HEAD_DIM
    shapes = {"attention.wqkv": (qkv_out, HIDDEN), "attention.wo": (HIDDEN, HIDDEN),
              "feed_forward.w1": (FFN, HIDDEN), "feed_forward.w3": (FFN, HIDDEN), "feed_forward.w2": (HIDDEN, FFN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "attention_norm.weight"] = 1 + r(HIDDEN)
        sd[p + "ffn_norm.weight"] = 1 + r(HIDDEN)
        for name, (o, n) in shapes.items():
            sd[p + name + ".weight"] = r(o, n, scale=0.15)
            sd[p + name + ".Plora_A.weight"] = r(RANK, n, scale=0.15)
            sd[p + name + ".Plora_B.weight"] = r(o, RANK, scale=0.15)  # non-zero: the image-only update counts
    return sd


def write_official(path, sd) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))


# -- the official arithmetic, transcribed --------------------------------------------------------------------------


def _rms(x, w, eps=1e-5):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _plora(x, sd, name, im_mask):
    out = x @ sd[name + ".weight"].T
    lora = (x @ sd[name + ".Plora_A.weight"].T) @ sd[name + ".Plora_B.weight"].T  # lora_alpha / r = 1
    return out + lora * im_mask[:, None]


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _official_image(sd, image):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN,
                                            num_hidden_layers=V_LAYERS, num_attention_heads=V_HEADS,
                                            image_size=CROP, patch_size=PATCH)).eval()
    own = set(clip.state_dict())
    tower = {k[len("vit.vision_tower."):]: v for k, v in sd.items() if k.startswith("vit.")}
    clip.load_state_dict({(k if k in own else k.removeprefix("vision_model.")): v for k, v in tower.items()})
    rows, cols = image.shape[1] // CROP, image.shape[2] // CROP
    glb = F.interpolate(image[None], size=(CROP, CROP), mode="bicubic", align_corners=False)
    subs = [image[:, y * CROP:(y + 1) * CROP, x * CROP:(x + 1) * CROP] for y in range(rows) for x in range(cols)]
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


@torch.no_grad()
def official_logits(sd, before: list[int], image: torch.Tensor, after: list[int]) -> torch.Tensor:
    emb = sd["model.tok_embeddings.weight"]
    img = _official_image(sd, image)
    x = torch.cat([emb[before], img, emb[after]])
    im_mask = torch.cat([torch.zeros(len(before)), torch.ones(len(img)), torch.zeros(len(after))])
    T = x.shape[0]
    groups = HEADS // KV
    inv_freq = 1.0 / (OFFICIAL_CONFIG["rope_theta"] ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "attention_norm.weight"])
        qkv = _plora(h, sd, p + "attention.wqkv", im_mask).reshape(T, KV, groups + 2, HEAD_DIM)
        q = qkv[:, :, :groups].reshape(T, HEADS, HEAD_DIM)
        k, v = qkv[:, :, -2], qkv[:, :, -1]
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(T, HIDDEN)
        x = x + _plora(o, sd, p + "attention.wo", im_mask)
        h = _rms(x, sd[p + "ffn_norm.weight"])
        ff = F.silu(_plora(h, sd, p + "feed_forward.w1", im_mask)) * _plora(h, sd, p + "feed_forward.w3", im_mask)
        x = x + _plora(ff, sd, p + "feed_forward.w2", im_mask)
    return _rms(x, sd["model.norm.weight"]) @ sd["output.weight"].T


def test_a_tiny_official_checkpoint_converts_and_reproduces_the_official_logits(tmp_path):
    sd = official_state_dict()
    write_official(tmp_path / "ixc", sd)
    assert is_official_checkpoint(tmp_path / "ixc")
    model = load_official(tmp_path / "ixc", image_token_id=IMAGE_ID, vision_heads=V_HEADS).eval()
    cfg = model.config
    assert (cfg.adapter, cfg.lora_rank, cfg.lora_scaling, cfg.hd_num) == ("plora", RANK, 1.0, 4)
    assert model.vision.crop_size == CROP and model.llm.config.num_key_value_heads == KV
    torch.manual_seed(1)
    image = torch.randn(3, CROP, 2 * CROP)  # a 1x2 crop grid
    before, after = [1, 5, 9], [17, 23, 42, 7]
    want = official_logits(sd, before, image, after)
    with torch.no_grad():
        got = model(torch.tensor([before + [IMAGE_ID] + after]), [image]).logits[0]
    assert got.shape == want.shape  # 3 + (2+1)*4 + 1 + (1+1)*2 + ... tokens
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
    # the P-LoRA update reaches the logits: without it the text after the image would read differently
    no_lora = {k: (torch.zeros_like(v) if k.endswith("Plora_B.weight") else v) for k, v in sd.items()}
    assert not torch.allclose(official_logits(no_lora, before, image, after)[-1], want[-1], atol=1e-3)


def test_keys_outside_the_layout_are_named():
    sd = official_state_dict()
    sd["model.layers.0.attention.extra.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match="attention.extra.weight"):
        convert_state_dict(sd, {"num_attention_heads": HEADS, "num_key_value_heads": KV, "hidden_size": HIDDEN})
