"""Start from the official 4KHD checkpoint layout, train, and get the model back in that layout.

The checkpoint is built from the release's key list at the tiny instance's shapes (``mllm_pipeline_tests/model/
fixtures/ixc2_4khd``, sources named in ``test_convert.py``): no vision post-layernorm, P-LoRA ranks 8 (wqkv) and 256
(wo, w1..w3). A pretraining run (LLM frozen, the ViT, the projector and P-LoRA train) writes ``<output>/official``:
the official names and shapes, the official config, the frozen LLM weights unchanged bit for bit, the trained ones
changed, and it converts back.
"""

from __future__ import annotations

import json

import torch

from mllm_pipeline.model.convert import load_official, read_official_state_dict
from mllm_pipeline.train.config import TrainConfig
from mllm_pipeline.train.loop import train
from mllm_pipeline_tests.model.test_convert import RANKS, TINY, TINY_VISION, official_shapes, random_official, write_official


def test_train_from_the_official_layout_and_give_it_back(manifest_root, tmp_path):
    shapes = official_shapes(TINY["config"], TINY_VISION, RANKS)
    sd = random_official(shapes)
    src = write_official(tmp_path / "internlm-xcomposer2-4khd-7b", sd, TINY["config"])
    cfg = TrainConfig(init_from=str(src), stage="pretrain", lr=1e-3, max_steps=2, warmup_steps=1,
                      tokens_per_batch=1200, device="cpu")
    summary = train(cfg, manifest_root.root, tmp_path / "out")
    assert summary["steps"] == 2
    run = json.loads((tmp_path / "out" / "train_config.json").read_text())["model"]
    assert run["lora_modules"]["q_proj"] == [8, 16.0] and run["lora_fused"] == {"qkv": ["q_proj", "k_proj", "v_proj"]}
    assert run["lora_dropout"] == 0.05 and not run["vision_post_layernorm"]

    out = tmp_path / "out" / "official"
    back = read_official_state_dict(out)
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes
    assert json.loads((out / "config.json").read_text()) == {**TINY["config"], "torch_dtype": "float32"}
    assert (out / "tokenizer_config.json").exists() and (out / "modeling_internlm_xcomposer2.py").exists()
    frozen = [k for k in sd if k.startswith(("model.", "output.")) and "Plora" not in k]
    assert frozen and all(torch.equal(back[k], sd[k]) for k in frozen)  # pretraining: the LLM is frozen
    # trained: the projector and P-LoRA, except in the last layer past attention: its wo/w1/w2/w3 act on image rows
    # only after the text has read them, so the loss (on text) gives them no gradient
    last = f"model.layers.{TINY['config']['num_hidden_layers'] - 1}."
    trained = [k for k in sd if k.startswith("vision_proj.") or ("Plora_A" in k and (
        not k.startswith(last) or ".wqkv." in k))]
    assert all(not torch.equal(back[k], sd[k]) for k in trained), [k for k in trained if torch.equal(back[k], sd[k])]
    model = load_official(out, image_token_id=TINY["config"]["vocab_size"])  # and it converts back
    assert model.llm.model.layers[0].self_attn.q_proj.scaling == 2.0
