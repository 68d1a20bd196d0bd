"""Training-loader throughput: model-ready samples/s of the worker loader against the thread loader, same run.

A synthetic manifest is written on the spot: ``--tars`` webdataset tars of ``--per-tar`` JPEGs (``--size``, smooth
colour fields plus noise, so they compress like photos), one caption row each. Both loaders then produce one epoch
of packed batches with the media *as the model receives them* (HD-transformed at ``--hd-num``, CLIP-normalised
float32 on ``--device``):

* ``thread``: :class:`mllm_pipeline.train.data.ManifestData`, one decode thread per rank that decodes and
  HD-transforms on the CPU (the loader before the worker loader).
* ``workers``: :class:`mllm_pipeline.train.loader.ShardedData` with ``--workers`` DataLoader processes, as a run
  on that device uses it: on CUDA the workers decode to uint8 (pinned) and
  :func:`mllm_pipeline.train.data.batch_to_device` copies them and runs the HD transform on the GPU; on the CPU the
  workers run the HD transform themselves (``hd_on_device=False``).
* ``workers_uint8`` (CPU only): the CUDA data path on the CPU: uint8 out of the workers, the HD transform in the
  main process (serial there, and competing with the workers for the cores).

Reported: samples/s per loader, best of ``--repeat`` epochs (each epoch starts the workers anew: a run starts
them once), and workers / thread. ``--manifest-rows N`` also measures what holding an ``N``-row manifest costs
each loader (no media read): construction time and memory (Python objects by ``tracemalloc``, Arrow buffers by
``pyarrow.total_allocated_bytes``), the thread loader's Python lists of every row against the worker loader's
columnar table.

    .venv/bin/python bench/loader_bench.py                      # CPU
    .venv/bin/python bench/loader_bench.py --device cuda --workers 8

``--per-worker`` measures instead what ONE DataLoader worker delivers at HD-9, HD-16 and HD-25 (images/s; a
worker of a GPU run reads and decodes to uint8, the HD transform then runs on the GPU; a worker of a CPU run also
HD-transforms, with Pillow: the official pixels), and sets it against what one H100 consumes: the samples/s of
the 7B model (the InternLM-XComposer2-4KHD release's shapes: InternLM2-7B + CLIP ViT-L/14-336 + P-LoRA, built on
the meta device) at 40 % MFU of the H100's 989.4 bf16 TFLOP/s, by ``mllm_pipeline.model.flops.flops_per_sample``
for one bench sample (one image at that HD, 27 text tokens), for SFT (every weight trains: 6N) and pretraining
(LLM frozen: 4N there, the loop's MFU convention). Workers per GPU = consumed / delivered per worker.

    .venv/bin/python bench/loader_bench.py --per-worker
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_pipeline.storage import Storage  # noqa: E402
from mllm_pipeline.train.data import DataConfig, ManifestData, batch_to_device  # noqa: E402
from mllm_pipeline.train.loader import LoaderConfig, ShardedData  # noqa: E402
from mllm_pipeline.vision.hd import hd_token_count  # noqa: E402

IMAGE_ID, VIDEO_ID = 1000, 1001


def photo(rng: np.random.Generator, w: int, h: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / rng.uniform(20, 80) + c) * np.cos(y / rng.uniform(20, 80)) for c in range(3)], -1)
    img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_manifest(root: Path, tars: int, per_tar: int, size: tuple[int, int], hd_num: int) -> tuple[Storage, pa.Table]:
    storage = Storage(str(root))
    rng = np.random.default_rng(0)
    rows = []
    for t in range(tars):
        rel = f"media/bench/shard-{t:05d}/v1/data.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for k in range(per_tar):
                w, h = (size if k % 3 else size[::-1])  # a third portrait
                data = photo(rng, w, h)
                info = tarfile.TarInfo(f"{k:09d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                text = [1, IMAGE_ID] + list(rng.integers(10, 900, 24)) + [2]
                media = hd_token_count(w, h, hd_num)
                rows.append({"id": f"bench-{t}-{k}#0", "dataset": "bench", "media_kind": "image", "media_tar": rel,
                             "media_key": f"{k:09d}", "media_ext": "jpg", "width": w, "height": h,
                             "input_ids": [int(x) for x in text], "label_mask": [0] * 2 + [1] * (len(text) - 2),
                             "seq_len": len(text) - 1 + media, "text_tokens": len(text), "media_tokens": media})
        storage.write_bytes(rel, buf.getvalue())
    return storage, pa.Table.from_pylist(rows)


def epoch(data, device: torch.device) -> tuple[float, int]:
    n = data.batches_per_epoch()
    t0 = time.perf_counter()
    it = data.iterate((0, 0))
    samples = 0
    for _ in range(n):
        out = batch_to_device(next(it), device)
        samples += len(out["media"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    it.close()
    return dt, samples


def manifest_memory(rows: int, cfg: DataConfig) -> dict:
    import tracemalloc

    rng = np.random.default_rng(1)
    text = rng.integers(10, 900, (rows, 60)).astype(np.int32)
    text[:, 1] = IMAGE_ID
    per_tar = 1000
    table = pa.table({
        "id": [f"r{i}#0" for i in range(rows)], "dataset": ["bench"] * rows, "media_kind": ["image"] * rows,
        "media_tar": [f"media/bench/shard-{i // per_tar:05d}/v1/data.tar" for i in range(rows)],
        "media_key": [f"{i % per_tar:09d}" for i in range(rows)], "media_ext": ["jpg"] * rows,
        "width": pa.array([640] * rows, pa.int32()), "height": pa.array([480] * rows, pa.int32()),
        "input_ids": pa.ListArray.from_arrays(np.arange(0, rows * 60 + 1, 60, dtype=np.int32), pa.array(text.ravel())),
        "label_mask": pa.ListArray.from_arrays(np.arange(0, rows * 60 + 1, 60, dtype=np.int32),
                                               pa.array(np.ones(rows * 60, np.int8))),
        "seq_len": pa.array(np.full(rows, 59 + 1000), pa.int32()), "text_tokens": pa.array(np.full(rows, 60), pa.int32()),
        "media_tokens": pa.array(np.full(rows, 1000), pa.int32())})
    storage = Storage(tempfile.mkdtemp())
    out = {"rows": rows, "manifest_arrow_mib": round(table.nbytes / 2**20, 1)}
    for name, make in (("thread", lambda: ManifestData(storage, table, cfg)),
                       ("workers", lambda: ShardedData(storage, table, cfg, loader=LoaderConfig(num_workers=2)))):
        arrow0 = pa.total_allocated_bytes()
        tracemalloc.start()
        t0 = time.perf_counter()
        data = make()
        data.plan(0)
        dt = time.perf_counter() - t0
        py = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out[name] = {"seconds": round(dt, 2), "python_mib": round(py / 2**20, 1),
                     "arrow_mib": round((pa.total_allocated_bytes() - arrow0) / 2**20, 1)}
        del data
    return out


#: the release's model (internlm/internlm-xcomposer2-4khd-7b config.json; CLIP ViT-L/14-336; P-LoRA as released)
RELEASE_LLM = dict(vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000.0, max_position_embeddings=32768,
                   tie_word_embeddings=False)
RELEASE_VIT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14)
H100_BF16 = 989.4e12
MFU = 0.40


def release_model(stage: str):
    """The 7B MLLM on the meta device (no memory), trainable as ``stage`` sets it."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, LlamaConfig

    from mllm_pipeline.model import MLLMConfig, build_model
    from mllm_pipeline.model.phases import PHASES

    modules = {m: [8, 16.0] for m in ("q_proj", "k_proj", "v_proj")}
    modules.update({m: [256, 256.0] for m in ("o_proj", "gate_proj", "up_proj", "down_proj")})
    cfg = MLLMConfig(vision=None, vision_config=CLIPVisionConfig(**RELEASE_VIT).to_dict(), llm=None,
                     llm_config=LlamaConfig(**RELEASE_LLM).to_dict(), image_token_id=92544, lora_rank=256,
                     lora_alpha=256.0, lora_modules=modules, lora_fused={"qkv": ["q_proj", "k_proj", "v_proj"]},
                     vision_post_layernorm=False)
    with init_empty_weights(include_buffers=False):
        model = build_model(cfg, pretrained=False)
    PHASES[stage](model)
    return model


def gpu_demand(hd_num: int, size: tuple[int, int], text_tokens: int = 27) -> dict[str, float]:
    """Samples/s one H100 consumes at 40 % MFU for one bench sample at ``hd_num``, per stage."""
    from mllm_pipeline.model.flops import flops_per_sample
    from mllm_pipeline.vision.hd import hd_grid

    rows, cols = hd_grid(size[0], size[1], hd_num)
    image_tokens = hd_token_count(size[0], size[1], hd_num)
    out = {"crops": rows * cols + 1, "image_tokens": image_tokens}
    for stage in ("sft", "pretrain"):
        model = release_model(stage)
        f = flops_per_sample(model, text_tokens - 1 + image_tokens, rows * cols + 1, image_tokens,
                             frozen_aware=stage == "pretrain")["total"]
        out[f"{stage}_tflop_per_sample"] = round(f / 1e12, 2)
        out[f"{stage}_samples_per_s"] = round(MFU * H100_BF16 / f, 1)
    return out


def per_worker(args) -> dict:
    """Images/s of one DataLoader worker at HD-9/16/25 (decode only, and decode + HD on the CPU) against the
    H100's demand."""
    rows = {}
    for hd in (9, 16, 25):
        with tempfile.TemporaryDirectory() as tmp:
            storage, table = write_manifest(Path(tmp), args.tars, args.per_tar, tuple(args.size), hd)
            cfg = DataConfig(tokens_per_batch=max(args.tokens_per_batch, 8 * hd_token_count(*args.size, hd)),
                             hd_num=hd, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, packing=True, buffer_rows=64)
            rates = {}
            for name, on_device in (("decode_uint8", True), ("decode_hd_cpu", False)):
                data = ShardedData(storage, table, cfg, loader=LoaderConfig(num_workers=1, hd_on_device=on_device,
                                                                            pin_memory=False))
                best = None
                for _ in range(args.repeat):
                    n = data.batches_per_epoch()
                    t0 = time.perf_counter()
                    it = data.iterate((0, 0))
                    images = sum(sum(m is not None for m in next(it).media) for _ in range(n))
                    dt = time.perf_counter() - t0
                    it.close()
                    best = dt if best is None else min(best, dt)
                rates[name] = round(images / best, 2)
        demand = gpu_demand(hd, tuple(args.size))
        row = {"images_per_s_per_worker": rates, "h100_at_40pct_mfu": demand}
        row["workers_per_gpu"] = {f"{stage}_{name}": round(demand[f"{stage}_samples_per_s"] / rate, 3)
                                  for stage in ("sft", "pretrain") for name, rate in rates.items()}
        rows[f"hd{hd}"] = row
    return {"per_worker": rows, "config": {"size": list(args.size), "images": args.tars * args.per_tar,
                                           "cpus": torch.get_num_threads(), "repeat": args.repeat}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tars", type=int, default=4)
    ap.add_argument("--per-tar", type=int, default=48)
    ap.add_argument("--size", type=int, nargs=2, default=(640, 480))
    ap.add_argument("--hd-num", type=int, default=9)
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--manifest-rows", type=int, default=0, help="also measure holding a manifest of this many rows")
    ap.add_argument("--per-worker", action="store_true", help="one worker's images/s at HD-9/16/25 against an "
                    "H100's demand at 40%% MFU (see the module docstring)")
    args = ap.parse_args()
    if args.per_worker:
        results = per_worker(args)
        print(json.dumps(results, indent=2))
        for hd, row in results["per_worker"].items():
            r, d, w = row["images_per_s_per_worker"], row["h100_at_40pct_mfu"], row["workers_per_gpu"]
            print(f"{hd}: worker {r['decode_uint8']} img/s decode, {r['decode_hd_cpu']} img/s decode+HD(CPU); "
                  f"H100 @40% MFU consumes {d['sft_samples_per_s']} (sft) / {d['pretrain_samples_per_s']} (pretrain) "
                  f"samples/s -> workers per GPU {w['sft_decode_uint8']} / {w['pretrain_decode_uint8']} "
                  f"(HD on the GPU), {w['sft_decode_hd_cpu']} / {w['pretrain_decode_hd_cpu']} (HD in the workers)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        storage, table = write_manifest(Path(tmp), args.tars, args.per_tar, tuple(args.size), args.hd_num)
        cfg = DataConfig(tokens_per_batch=args.tokens_per_batch, hd_num=args.hd_num, image_token_id=IMAGE_ID,
                         video_token_id=VIDEO_ID, packing=True, buffer_rows=64)
        cuda = device.type == "cuda"
        loaders = {
            "thread": ManifestData(storage, table, cfg),
            # what a run uses on this device: uint8 + HD on CUDA; HD in the workers on the CPU
            "workers": ShardedData(storage, table, cfg, loader=LoaderConfig(num_workers=args.workers, hd_on_device=cuda)),
        }
        if not cuda:  # the CUDA data path (uint8 out of the workers, HD in the training process) on the CPU
            loaders["workers_uint8"] = ShardedData(storage, table, cfg, loader=LoaderConfig(num_workers=args.workers))
        results = {}
        for name, data in loaders.items():
            best = None
            for _ in range(args.repeat):
                dt, samples = epoch(data, device)
                best = dt if best is None else min(best, dt)
            results[name] = {"samples": samples, "seconds": round(best, 3), "samples_per_s": round(samples / best, 2)}
        results["speedup"] = round(results["workers"]["samples_per_s"] / results["thread"]["samples_per_s"], 2)
        results["config"] = {**{k: v for k, v in vars(args).items()}, "cpus": torch.get_num_threads(),
                             "effective_workers": loaders["workers"].workers}
        if args.manifest_rows:
            results["manifest"] = manifest_memory(args.manifest_rows, cfg)
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
