"""Partial LoRA: only image positions change; B = 0 is the base model; targets; gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mllm_pipeline.model import ImageMask, PLoRALinear, find_linear_targets
from mllm_pipeline_tests.model.tiny import hd_tensor, make_model


def test_plora_linear_changes_only_image_positions():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    state = ImageMask()
    layer = PLoRALinear(base, state, rank=4, alpha=8.0)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False, True, True, False, False], [True, False, False, False, True]])
    state.mask = mask
    assert torch.equal(layer(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    y = layer(x)
    ref = base(x)
    assert torch.equal(y[~mask], ref[~mask])  # text positions bit-for-bit the base output
    assert (y[mask] - ref[mask]).abs().min() > 1e-4
    expected = ref + layer.lora_B(layer.lora_A(x)) * 2.0
    assert torch.allclose(y[mask], expected[mask], atol=1e-6)
    state.mask = None
    assert torch.equal(layer(x), ref)  # no mask: base path
    state.mask = mask[:, :3]
    with pytest.raises(ValueError, match="image mask has shape"):
        layer(x)


def test_find_targets_llama():
    model = make_model()
    names = find_linear_targets(make_model(adapter="none").llm)
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert len(names) == 7 * model.llm.config.num_hidden_layers
    assert len(model.adapter_targets) == len(names)
    llm = make_model(adapter="none").llm
    assert all(n.endswith(("q_proj", "v_proj")) for n in find_linear_targets(llm, ["q_proj", "v_proj"]))
    assert len(find_linear_targets(llm, [r"re:.*layers\.0\.mlp\..*"])) == 3
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_linear_targets(llm, ["wqkv"])


def _copy_into_plain(plora_model, plain_model):
    state = {k.replace(".base.", "."): v for k, v in plora_model.state_dict().items() if "lora_" not in k}
    plain_model.load_state_dict(state, strict=True)


def test_model_equals_base_until_b_changes():
    plora = make_model(adapter="plora").eval()
    plain = make_model(adapter="none").eval()
    _copy_into_plain(plora, plain)
    cfg = plora.config
    ids = [torch.tensor([3, 4, 5, cfg.image_token_id, 6, 7]), torch.tensor([8, 9, 10, 11])]  # image sample, text-only
    media = [hd_tensor(500, 400, 1), None]
    with torch.no_grad():
        a, b = plora(ids, media), plain(ids, media)
        assert torch.equal(a.logits, b.logits)  # B = 0: exactly the base model
        for module in plora.llm.modules():
            if isinstance(module, PLoRALinear):
                module.lora_B.weight.normal_(std=0.5)
        c = plora(ids, media)
    n_img = int(c.image_mask[0].sum())
    # the text-only sample and the text before the image are untouched; image and later positions change
    assert torch.equal(c.logits[1], b.logits[1])
    assert torch.equal(c.logits[0, :3], b.logits[0, :3])
    assert not torch.allclose(c.logits[0, 3 : 3 + n_img], b.logits[0, 3 : 3 + n_img])


def test_gradient_checkpointing_keeps_the_mask_for_recomputation():
    grads = []
    for checkpointing in (False, True):
        model = make_model(gradient_checkpointing=checkpointing, freeze_llm=True).train()
        with torch.no_grad():
            for module in model.llm.modules():
                if isinstance(module, PLoRALinear):
                    module.lora_B.weight.normal_(std=0.1)
        ids = [torch.tensor([3, model.config.image_token_id, 6, 7, 8])]
        out = model(ids, [hd_tensor(336, 336, 1)], label_mask=[torch.ones(5, dtype=torch.bool)])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert model.is_gradient_checkpointing == checkpointing
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and any("lora_A" in k for k in plain)
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-5, rtol=1e-4), k
