"""Sequence packing: several samples in one row give each sample the loss and gradients it has alone."""

from __future__ import annotations

import pytest
import torch

from mllm_pipeline.model import sft
from mllm_pipeline_tests.model.tiny import make_model


def _samples(cfg, crop):
    torch.manual_seed(3)
    out = []
    for s, (text, media) in enumerate([(9, torch.randn(3, crop, 2 * crop)), (7, None), (12, torch.randn(3, crop, crop)),
                                       (5, torch.randn(3, 2 * crop, crop))]):
        body = torch.randint(1, 200, (text,))
        ids = torch.cat([torch.tensor([1, cfg.image_token_id]), body]) if media is not None else body
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[-(text // 2):] = True  # the answer: the last half of the text
        out.append((ids, mask, media))
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_per_sample_losses_and_gradients_of_the_samples_alone(attn):
    model = make_model(image_size=56, attn_implementation=attn)
    with torch.no_grad():  # P-LoRA B starts at 0; make the image-only path count
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("vision.newline") or name.startswith("vision.separator"):
                p.normal_(0, 0.05)
    sft(model)  # everything trains: every weight's gradient is compared
    model.train()
    samples = _samples(model.config, 56)
    ids, masks, media = (list(x) for x in zip(*samples))

    alone_loss, alone_sum = [], 0.0
    model.zero_grad()
    for i in range(len(samples)):
        out = model([ids[i]], [media[i]], label_mask=[masks[i]])
        out.loss_sum.backward()
        alone_loss.append(out.loss.item())
        alone_sum += out.loss_sum.item()
    alone_grads = _grads(model)

    model.zero_grad()
    out = model(ids, media, label_mask=masks, pack=[[0, 1, 2], [3]])
    assert out.logits.shape[0] == out.label_tokens == sum(int(m.sum()) for m in masks) # logits only at labels
    out.loss_sum.backward()
    packed_grads = _grads(model)

    assert out.sample_loss.tolist() == pytest.approx(alone_loss, abs=1e-5)
    assert out.loss_sum.item() == pytest.approx(alone_sum, abs=1e-4)
    assert out.loss.item() == pytest.approx(alone_sum / out.label_tokens, abs=1e-6)  # mean over the batch's tokens
    assert set(packed_grads) == set(alone_grads)
    for name, g in alone_grads.items():
        assert torch.allclose(packed_grads[name], g, atol=1e-5, rtol=1e-4), name


def test_a_packed_row_does_not_see_the_sample_before_it():
    model = make_model(image_size=56).eval()
    samples = _samples(model.config, 56)
    ids, masks, media = (list(x) for x in zip(*samples))
    with torch.no_grad():
        packed = model(ids[:2], media[:2], label_mask=masks[:2], pack=[[0, 1]]).sample_loss
        other = [torch.randint(1, 200, (ids[0].numel(),))]
        other[0][1] = model.config.image_token_id
        changed = model([other[0], ids[1]], [torch.randn(3, 56, 56), media[1]], label_mask=masks[:2],
                        pack=[[0, 1]]).sample_loss
    assert float(changed[1]) == pytest.approx(float(packed[1]), abs=1e-6)  # sample 1 is blind to sample 0
    assert float(changed[0]) != pytest.approx(float(packed[0]), abs=1e-3)
