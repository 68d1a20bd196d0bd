"""The MLLM end to end: inputs and labels, overfitting, save/load, peft LoRA, training-phase presets, generate,
FLOPs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mllm_pipeline.model import MLLM, PLoRALinear, build_model, count_media, flops_per_sample, flops_per_token, pretrain, sft
from mllm_pipeline.model.config import MLLMConfig
from mllm_pipeline.vision.hd import hd_token_count
from mllm_pipeline_tests.model.tiny import hd_tensor, make_model


def test_inputs_labels_and_padding(tiny_model):
    cfg = tiny_model.config
    img = cfg.image_token_id
    # padded (B, T) batch: sample 0 left-padded, sample 1 right-padded, sample 2 text-only
    ids = torch.tensor([[0, 0, 10, img, 11, 12], [20, img, 21, 22, 0, 0], [30, 31, 32, 33, 34, 35]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    label_mask = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    media = [hd_tensor(400, 300, 4), hd_tensor(300, 400, 1), None]
    with torch.no_grad():
        x = tiny_model.prepare_inputs(ids, media, attention_mask=attn, label_mask=label_mask)
    n0, n1 = hd_token_count(400, 300, 4), hd_token_count(300, 400, 1)
    lengths = [3 + n0, 3 + n1, 6]
    assert x.attention_mask.sum(1).tolist() == lengths
    assert x.inputs_embeds.shape == (3, max(lengths), cfg.llm_config["hidden_size"])
    for b, n in enumerate(lengths):  # right padding
        assert x.attention_mask[b, :n].all() and not x.attention_mask[b, n:].any()
        assert (x.labels[b, n:] == -100).all() and not x.image_mask[b, n:].any()
    assert x.labels[0].tolist()[: 3 + n0] == [-100] + [-100] * n0 + [11, 12]
    assert x.image_mask[0].tolist()[: 3 + n0] == [False] + [True] * n0 + [False, False]
    assert x.labels[1].tolist()[: 3 + n1] == [-100] + [-100] * n1 + [21, 22]
    assert x.labels[2].tolist() == [-100, -100, -100, 33, 34, 35] + [-100] * (max(lengths) - 6)
    # the text embeddings are the LLM's own, image rows are the projected vision tokens
    emb = tiny_model.llm.get_input_embeddings().weight
    assert torch.equal(x.inputs_embeds[0, 0], emb[10]) and torch.equal(x.inputs_embeds[0, 1 + n0], emb[11])
    # explicit labels: -100 kept where the caller put it
    labels = ids.clone()
    labels[2, :4] = -100
    with torch.no_grad():
        y = tiny_model.prepare_inputs(ids, media, attention_mask=attn, labels=labels)
    assert y.labels[2, :6].tolist() == [-100, -100, -100, -100, 34, 35]
    assert y.labels[0, : 3 + n0].tolist() == [10] + [-100] * n0 + [11, 12]


def _overfit(model: MLLM, groups, steps: int, lr: float) -> tuple[float, float]:
    """Train on 4 (image, random caption) pairs; the loss is taken on the caption only."""
    cfg = model.config
    crop = model.vision.crop_size
    torch.manual_seed(1)
    samples = []
    for s in range(4):
        caption = torch.randint(1, 200, (8,))
        ids = torch.cat([torch.tensor([1, cfg.image_token_id, 2]), caption])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[3:] = True
        samples.append((ids, mask, torch.randn(3, crop, crop * (1 + s % 2))))
    ids, masks, media = zip(*samples)
    opt = torch.optim.AdamW(groups, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(list(ids), list(media), label_mask=list(masks))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses[0], losses[-1]


def test_tiny_model_overfits_a_few_samples():
    # a 56-px crop (4x4 patches, 4 tokens a crop) keeps this fast; the layout code is the same as at 336
    model = make_model(image_size=56)
    first, last = _overfit(model, sft(model), steps=20, lr=5e-3)
    assert last < 0.5 * first, (first, last)


def test_pretrain_phase_learns_with_the_llm_frozen():
    model = make_model(image_size=56)
    frozen = {n: p.detach().clone() for n, p in model.parameter_parts()["llm"]}
    first, last = _overfit(model, pretrain(model), steps=20, lr=5e-3)
    assert last < 0.97 * first, (first, last)  # slow: only image positions and the ViT can adapt
    for n, p in model.parameter_parts()["llm"]:
        assert torch.equal(p, frozen[n]), n


def test_training_phase_presets():
    model = make_model()
    groups = pretrain(model, lr=1e-4)
    names = {g["name"] for g in groups}
    assert names == {"vision", "connector", "adapter"}
    parts = model.parameter_parts()
    assert not any(p.requires_grad for _, p in parts["llm"])
    assert all(p.requires_grad for k in ("vision", "connector", "adapter") for _, p in parts[k])
    assert any("newline" in n for n, _ in parts["connector"]) and any("separator" in n for n, _ in parts["connector"])
    assert all("lora_" in n for n, _ in parts["adapter"]) and parts["adapter"]
    groups = sft(model, lr=1e-4, llm_lr_scale=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"vision", "connector", "adapter", "llm"}
    assert all(p.requires_grad for p in model.parameters())
    assert by_name["llm"]["lr"] == pytest.approx(1e-5) and by_name["vision"]["lr"] == pytest.approx(1e-4)
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())


def _perturb_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)


def _batch(cfg):
    ids = [torch.tensor([3, cfg.image_token_id, 4, 5]), torch.tensor([6, 7, cfg.video_token_id])]
    media = [hd_tensor(700, 300, 4), torch.stack([hd_tensor(320, 240, 1, seed=s) for s in range(2)])]
    return ids, media


def test_save_load_round_trip(tmp_path):
    model = make_model().eval()
    _perturb_adapters(model)
    ids, media = _batch(model.config)
    with torch.no_grad():
        ref = model(ids, media).logits
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "mllm_config.json").read_text())
    assert saved["adapter"] == "plora" and saved["llm_config"]["model_type"] == "llama"
    loaded = MLLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, media).logits, ref)
    assert loaded.config == model.config


def test_trainable_only_save_over_local_base_checkpoints(tmp_path):
    # the base parts as a user has them: local Hugging Face directories
    base = make_model(adapter="none")
    base.vision.tower.save_pretrained(tmp_path / "vit")
    base.llm.save_pretrained(tmp_path / "llm")
    cfg = base.config.replace(
        vision=str(tmp_path / "vit"), llm=str(tmp_path / "llm"), vision_config=None, llm_config=None, adapter="plora"
    )
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    pretrain(model)
    _perturb_adapters(model)
    with torch.no_grad():
        model.projector[0].weight.mul_(1.5)
    ids, media = _batch(cfg)
    with torch.no_grad():
        ref = model(ids, media).logits
    model.save_pretrained(tmp_path / "adapter", trainable_only=True)
    with safe_open(tmp_path / "adapter" / "trainable.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.startswith("llm.") and "lora_" not in k for k in keys)  # the frozen LLM is not in the file
    torch.manual_seed(99)  # a different random init of the new parts must not matter
    loaded = MLLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, media).logits, ref)
    with pytest.raises(ValueError, match="trainable_only save needs"):
        make_model().save_pretrained(tmp_path / "x", trainable_only=True)


def test_peft_lora_alternative(tmp_path):
    lora = make_model(adapter="lora").eval()
    plain = make_model(adapter="none").eval()
    assert not any(isinstance(m, PLoRALinear) for m in lora.modules())
    assert {n.rsplit(".", 1)[1] for n in lora.adapter_targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    ids, media = _batch(lora.config)
    with torch.no_grad():
        base = plain(ids, media).logits
        assert torch.allclose(lora(ids, media).logits, base, atol=1e-6)  # B = 0 at start
    groups = pretrain(lora)
    assert any(g["name"] == "adapter" for g in groups)
    _perturb_adapters(lora)
    lora.train()
    out = lora(ids, media, label_mask=[torch.ones(4, dtype=torch.bool), torch.ones(3, dtype=torch.bool)])
    out.loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_A" in n)
    lora.eval()
    with torch.no_grad():
        ref = lora(ids, media).logits
    assert not torch.allclose(ref, base, atol=1e-4)  # LoRA acts on text positions too
    lora.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(MLLM.from_pretrained(tmp_path / "lora").eval()(ids, media).logits, ref)


def test_generate_matches_forward_argmax(tiny_model):
    cfg = tiny_model.config
    ids = [torch.tensor([3, cfg.image_token_id, 4, 5]), torch.tensor([6, 7, 8, 9, 10, 11])]
    media = [hd_tensor(500, 300, 1), None]
    with torch.no_grad():
        out = tiny_model(ids, media)
        new = tiny_model.generate(ids, media, max_new_tokens=3, do_sample=False)
    last = out.attention_mask.sum(1) - 1
    first = out.logits[torch.arange(2), last].argmax(-1)
    assert new.shape[0] == 2 and new[:, 0].tolist() == first.tolist()
    # the second token equals a full forward on the prompt plus the first token (KV-cached decoding is text-only)
    with torch.no_grad():
        ext = tiny_model([torch.cat([i, f.view(1)]) for i, f in zip(ids, new[:, 0])], media)
    last = ext.attention_mask.sum(1) - 1
    assert new[:, 1].tolist() == ext.logits[torch.arange(2), last].argmax(-1).tolist()


def test_bfloat16_model_runs():
    model = make_model(dtype="bfloat16")
    assert model.projector[0].weight.dtype == torch.bfloat16
    ids = [torch.tensor([3, model.config.image_token_id, 4, 5])]
    out = model(ids, [hd_tensor(400, 400, 1)], label_mask=[torch.ones(4, dtype=torch.bool)])
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)  # the head's output, upcast for the loss
    out.loss.backward()


def test_flops_formula(tiny_model):
    llm_cfg = tiny_model.llm.config
    n_llm = sum(
        m.in_features * m.out_features
        for n, m in tiny_model.llm.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n
    )
    seq = 500
    want = 6 * n_llm + 12 * llm_cfg.num_hidden_layers * llm_cfg.hidden_size * seq
    assert flops_per_token(tiny_model, seq) == pytest.approx(want)
    one = flops_per_sample(tiny_model, seq, n_crops=2, n_image_tokens=313)
    two = flops_per_sample(tiny_model, seq, n_crops=4, n_image_tokens=313)
    assert two["vision"] == pytest.approx(2 * one["vision"]) and one["vision"] > 0
    assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k != "total"))
    crops, tokens = count_media(tiny_model, [hd_tensor(1000, 500, 9), torch.zeros(3, 3, 336, 672)])
    assert (crops, tokens) == (9 + 3 * 3, hd_token_count(1000, 500, 9) + 3 * hd_token_count(672, 336, 2) + 2)
    fwd = flops_per_sample(tiny_model, seq, n_crops=2, n_image_tokens=313, training=False)
    assert fwd["total"] == pytest.approx(one["total"] / 3)
    model = make_model()
    pretrain(model)
    aware = flops_per_sample(model, seq, n_crops=2, n_image_tokens=313, frozen_aware=True)
    assert aware["llm"] < one["llm"] and aware["vision"] == pytest.approx(one["vision"])


def test_config_json_round_trip_and_errors():
    cfg = make_model().config
    again = MLLMConfig.from_json(cfg.to_json())
    assert again.to_json() == cfg.to_json() and again.hd_num == cfg.hd_num
    with pytest.raises(ValueError, match="adapter must be one of"):
        cfg.replace(adapter="qlora")
    with pytest.raises(ValueError, match="unknown MLLMConfig field"):
        MLLMConfig.from_dict({**cfg.to_dict(), "hd": 3})
