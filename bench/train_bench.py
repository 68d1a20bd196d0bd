"""Training-step throughput of the MLLM: steps/s, tokens/s and (on CUDA) MFU.

Two setups, both built from configs with random weights (nothing is downloaded):

* ``--size tiny`` (default on the CPU): ``tiny_config()`` at hd_num 4.
* ``--size real`` (default with ``--device cuda``): a CLIP ViT-L/14-336 vision config + a 1B Llama config
  (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocab 128256: Llama-3.2-1B's shape), P-LoRA rank
  256, HD-9 images (1008x1008 -> 3x3 crops + the global view: 1,489 image tokens) and a 64-token caption,
  bf16 autocast, fused AdamW.

The step is the loop's step (``mllm_pipeline.train.loop``): forward with the label mask, backward, gradient
clipping, AdamW, on synthetic batches already on the device (the data path is not timed). The baseline measured
in the same run is the forward pass alone (no grad) of the same batch: a training step costs about 3x a forward
pass by the FLOPs convention (2N forward + 4N backward), so ``step / forward`` well above 3 points at overhead
in the backward or the optimizer. MFU = model FLOPs of the step (``flops_per_sample``: ViT crops, projector,
LLM, adapter; frozen weights at 2N / 4N, not 6N) / (step time x peak bf16 FLOP/s of the card,
``PEAK_BF16_TFLOPS``). ``--packed`` puts the batch's samples in one row (flash-attn varlen when installed, else
sdpa with a block mask); ``--precision mixed`` keeps frozen weights in bf16 and trainable ones in fp32.

    .venv/bin/python bench/train_bench.py                          # CPU, tiny
    .venv/bin/python bench/train_bench.py --device cuda            # GPU, real size, stage pretrain
    .venv/bin/python bench/train_bench.py --device cuda --stage sft --batch 8 --grad-checkpointing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_pipeline.model import MLLMConfig, build_model, tiny_config  # noqa: E402
from mllm_pipeline.model.flops import count_media, flops_per_sample  # noqa: E402
from mllm_pipeline.model.phases import PHASES  # noqa: E402
from mllm_pipeline.train.metrics import peak_flops  # noqa: E402
from mllm_pipeline.train.setup import apply_precision  # noqa: E402


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def real_config(hd_num: int, vit_layers: int, llm_layers: int) -> MLLMConfig:
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vit_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    llm = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=llm_layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=True)
    return MLLMConfig(vision=None, vision_config=vision.to_dict(), llm=None, llm_config=llm.to_dict(),
                      image_token_id=128254, video_token_id=128255, hd_num=hd_num, adapter="plora",
                      lora_rank=256, lora_alpha=256.0, lora_dropout=0.0, attn_implementation="sdpa")


def batch(cfg: MLLMConfig, n: int, side: int, text: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    ids, masks, media = [], [], []
    for _ in range(n):
        t = torch.randint(0, vocab - 2, (text,), generator=g)
        t[1] = cfg.image_token_id
        m = torch.zeros(text, dtype=torch.bool)
        m[2:] = True
        ids.append(t.to(device))
        masks.append(m.to(device))
        media.append(torch.randn(3, side, side, generator=g).to(device))
    return {"input_ids": ids, "label_mask": masks, "media": media}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=["tiny", "real"], default=None, help="default: tiny on cpu, real on cuda")
    p.add_argument("--stage", choices=sorted(PHASES), default="pretrain")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 4 tiny, 8 real)")
    p.add_argument("--hd-num", type=int, default=None, help="default 4 tiny, 9 real")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 tiny, 20 real)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--vit-layers", type=int, default=24, help="real size: ViT layers (24 = ViT-L)")
    p.add_argument("--llm-layers", type=int, default=16, help="real size: LLM layers (16 = the 1B shape)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--packed", action="store_true", help="pack the batch's samples into one row (varlen attention)")
    p.add_argument("--precision", choices=["mixed", "fp32"], default=None,
                   help="mixed: frozen weights bf16, trainable fp32 (default on cuda); fp32 (default on cpu)")
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    size = a.size or ("real" if device.type == "cuda" else "tiny")
    hd = a.hd_num or (9 if size == "real" else 4)
    n = a.batch or (8 if size == "real" else 4)
    steps = a.steps or (20 if size == "real" else 10)
    torch.manual_seed(0)
    cfg = real_config(hd, a.vit_layers, a.llm_layers) if size == "real" else tiny_config(hd_num=hd)
    if a.grad_checkpointing:
        cfg = cfg.replace(gradient_checkpointing=True)
    if device.type == "cuda" and size == "real":
        cfg = cfg.replace(attn_implementation="flash_attention_2" if a.packed and _has_flash() else "sdpa")
    model = build_model(cfg, pretrained=False).to(device)
    groups = PHASES[a.stage](model, lr=1e-5)
    precision = a.precision or ("mixed" if device.type == "cuda" else "fp32")
    apply_precision(model, precision)
    opt = torch.optim.AdamW(groups, lr=1e-5, fused=device.type == "cuda")
    vocab = model.llm.get_input_embeddings().num_embeddings
    side = 336 * int(hd ** 0.5)  # a square image fills an s x s crop grid (s = floor(sqrt(hd_num)))
    b = batch(cfg, n, side, a.text_tokens, vocab, device)
    if a.packed:
        b["pack"] = [list(range(n))]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "mixed" else nullcontext()
    params = [q for g in groups for q in g["params"]]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        with autocast:
            out = model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(**b)

    model.train()
    for _ in range(a.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    t_step = (time.perf_counter() - t0) / steps
    forward()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        forward()
    sync()
    t_fwd = (time.perf_counter() - t0) / steps

    crops, img_tokens = count_media(model, b["media"][:1])
    seq = a.text_tokens - 1 + img_tokens
    flops = n * flops_per_sample(model, seq, crops, img_tokens, frozen_aware=True)["total"]
    peak = peak_flops(device)
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "size": size, "stage": a.stage, "hd_num": hd, "batch": n, "seq_len": seq, "packed": a.packed,
        "precision": precision, "attn": model.llm.config._attn_implementation,
        "trainable_params": sum(q.numel() for q in params), "params": sum(q.numel() for q in model.parameters()),
        "step_s": round(t_step, 4), "steps_per_s": round(1 / t_step, 3), "tokens_per_s": round(n * seq / t_step, 1),
        "samples_per_s": round(n / t_step, 2), "forward_s": round(t_fwd, 4), "step_over_forward": round(t_step / t_fwd, 2),
        "model_tflops_per_step": round(flops / 1e12, 3),
    }
    if peak:
        res["mfu"] = round(flops / t_step / peak, 4)
        res["peak_tflops"] = peak / 1e12
    if device.type == "cuda":
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    for k, v in res.items():
        print(f"{k:>22}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
