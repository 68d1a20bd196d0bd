"""Benchmark: the tensor HD-transform path (decode + HD transform + CLIP normalisation) against a straightforward
per-image implementation of the official InternLM-XComposer2-4KHD code path, same images, same run.

    .venv/bin/python bench/hd_bench.py                      # 200 JPEGs, HD-9, best of 3, 1 thread and the default
    .venv/bin/python bench/hd_bench.py --hd-num 16 --images 100 --repeats 2
    .venv/bin/python bench/hd_bench.py --device cuda        # also the GPU path, where CUDA is present

What it does (see bench/README.md for the figures):

1. Generates ``--images`` JPEGs in memory (seeded): long side log-uniform in 256..2048 px, aspect ratios from
   square to 4:1 in both orientations plus a few extreme strips, photo-like content (smooth colour fields and
   sensor noise), quality 90.
2. For each ``--threads`` setting (``torch.set_num_threads``) and ``--repeats`` rounds, times, alternately:

   * ``baseline``: per image, the official code path written out here: ``Image.open(...).convert("RGB")``, the
     4KHD ``HD_transform`` (transpose a portrait image, the scale rule, Pillow bilinear resize, white padding to a
     multiple of 336 centred, transpose back), then ``ToTensor`` + ``Normalize(CLIP mean, std)`` in torch, one
     image at a time;
   * ``ours``: ``hd_batch(blobs, hd_num)`` on the CPU, in chunks of ``--batch-size`` images (a loader batch).

   Both produce one float32 (3, H, W) tensor per image; the output sizes of both are checked to be identical
   (and equal to ``hd_target_size``) before anything is timed, and the mean absolute pixel difference between
   the two outputs is reported in 0..255 units. ``decode only`` (Pillow decode to a tensor, what both share) is
   timed for context.
3. With ``--device cuda`` (and CUDA present): ``hd_batch(..., device="cuda")`` (nvJPEG decode when torchvision
   is installed, else Pillow decode and upload; float resize and normalisation on the GPU; synchronised at the
   end), against the CPU path of the same run.

Before each timed run the benchmark waits (``--wait-idle``) for other processes to leave the CPUs idle; a run
during which they used more than 0.15 cores is flagged in the log and measured again, up to ``--retries`` times.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mllm_pipeline.vision.hd import hd_target_size  # noqa: E402
from mllm_pipeline.vision.hd_torch import CLIP_MEAN, CLIP_STD, decode_images, hd_batch  # noqa: E402

TARGET_RATIO = 1.0  # ours / baseline images per second, CPU

# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------

ASPECTS = [1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0, 4.0]


def make_jpegs(n: int, seed: int) -> list[bytes]:
    """``n`` photo-like JPEGs of varied size and aspect ratio (both orientations), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(n):
        long_side = int(math.exp(rng.uniform(math.log(256), math.log(2048))))
        aspect = 12.0 if i % 50 == 49 else float(rng.choice(ASPECTS))  # an extreme strip now and then
        short_side = max(8, int(long_side / aspect))
        w, h = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
        # smooth colour fields, computed at 1/8 scale and upsampled, plus noise: compresses like a photo
        sw, sh = max(2, w // 8), max(2, h // 8)
        yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
        f = rng.uniform(0.02, 0.2, 6)
        small = np.stack(
            [128 + 90 * np.sin(xx * f[c] + c) * np.cos(yy * f[c + 3] - c) for c in range(3)], -1
        ).clip(0, 255).astype(np.uint8)
        base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
        noisy = (base + rng.integers(-12, 13, (h, w, 1), dtype=np.int16)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


# --------------------------------------------------------------------------------------------------------------
# baseline: the official code path, one image at a time
# --------------------------------------------------------------------------------------------------------------

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def official_hd_transform(img: Image.Image, hd_num: int) -> Image.Image:
    """4KHD ``HD_transform`` + ``padding_336``, with torchvision's PIL resize/pad written as the Pillow calls they
    make (bilinear resize; constant white padding). The short side is clamped to 1 px as ``hd_transform`` does."""
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = max(1, int(new_w / ratio))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    tar = int(math.ceil(new_h / 336) * 336)
    top = int((tar - new_h) / 2)
    padded = Image.new("RGB", (new_w, tar), (255, 255, 255))
    padded.paste(img, (0, top))
    return padded.transpose(Image.Transpose.TRANSPOSE) if trans else padded


def baseline_one(blob: bytes, hd_num: int) -> torch.Tensor:
    img = Image.open(io.BytesIO(blob)).convert("RGB")
    img = official_hd_transform(img, hd_num)
    # ToTensor + Normalize, as torchvision does them
    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
    return t.sub_(_MEAN).div_(_STD)


def run_baseline(blobs: list[bytes], hd_num: int) -> int:
    """Returns the number of outputs (each is dropped once made, as a loader hands it on)."""
    n = 0
    for b in blobs:
        n += baseline_one(b, hd_num).shape[0] == 3
    return n


def run_ours(blobs: list[bytes], hd_num: int, batch_size: int, device: str = "cpu") -> int:
    n = 0
    for i in range(0, len(blobs), batch_size):
        n += sum(t.shape[0] == 3 for t in hd_batch(blobs[i : i + batch_size], hd_num, device=device))
    if device != "cpu":
        torch.cuda.synchronize()
    return n


def run_decode(blobs: list[bytes], batch_size: int) -> int:
    n = 0
    for i in range(0, len(blobs), batch_size):
        n += sum(t.shape[0] == 3 for t in decode_images(blobs[i : i + batch_size]))
    return n


# --------------------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------------------


def cpu_busy_seconds() -> float:
    """CPU seconds used by every process on the machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_idle(max_wait: float, threshold: float = 0.2) -> None:
    t0 = time.perf_counter()
    told = False
    while time.perf_counter() - t0 < max_wait:
        b0, o0 = cpu_busy_seconds(), own_cpu_seconds()
        time.sleep(1.0)
        load = (cpu_busy_seconds() - b0) - (own_cpu_seconds() - o0)
        if load < threshold:
            return
        if not told:
            print(f"    (other processes use {load:.1f} cores; waiting up to {max_wait:.0f} s)", flush=True)
            told = True
        time.sleep(2.0)


def timed(fn, wait: float, retries: int) -> dict:
    """Best-effort uncontended timing of ``fn()``: returns seconds, own CPU seconds, other processes' load and
    ``fn``'s result."""
    for attempt in range(retries + 1):
        wait_idle(wait)
        b0, o0, t0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
        result = fn()
        secs = time.perf_counter() - t0
        own = own_cpu_seconds() - o0
        others = max(0.0, (cpu_busy_seconds() - b0) - own) / secs
        if others <= 0.15 or attempt == retries:
            return {"seconds": secs, "cpu_seconds": own, "other_load_cores": others, "contended": others > 0.15,
                    "result": result}
        print(f"    contended run ({others:.2f} cores used by others), measuring again", flush=True)
    raise AssertionError("unreachable")


def check_outputs(blobs: list[bytes], hd_num: int, batch_size: int) -> dict:
    """Untimed: both paths give exactly ``hd_target_size`` sizes, and their pixel difference in 0..255 units."""
    total_abs, total_n, worst = 0.0, 0, 0.0
    for i in range(0, len(blobs), batch_size):
        chunk = blobs[i : i + batch_size]
        ours = hd_batch(chunk, hd_num)
        for blob, o in zip(chunk, ours):
            with Image.open(io.BytesIO(blob)) as im:
                w, h = im.size
            b = baseline_one(blob, hd_num)
            _, (pw, ph) = hd_target_size(w, h, hd_num)
            assert tuple(b.shape) == tuple(o.shape) == (3, ph, pw), (w, h, b.shape, o.shape)
            d = ((o - b) * _STD * 255).abs()
            total_abs += float(d.double().sum())
            total_n += d.numel()
            worst = max(worst, float(d.mean()))
    return {"mean_abs_diff_255": total_abs / total_n, "worst_image_mean_abs_diff_255": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200, help="number of generated JPEGs (default 200)")
    ap.add_argument("--hd-num", type=int, default=9, help="HD-N: 9 (default), 16, 25, 55")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per thread setting; the best time counts (default 3)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch.set_num_threads settings to measure (default: 1 and torch's default)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per hd_batch call (default 16)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: also time the GPU path")
    ap.add_argument("--wait-idle", type=float, default=30, metavar="S",
                    help="before each run, wait up to S s for other processes to leave the CPUs idle (default 30)")
    ap.add_argument("--retries", type=int, default=1, help="re-measure a contended run up to N times (default 1)")
    ap.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = ap.parse_args()

    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads})
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")

    print(f"python {platform.python_version()}, torch {torch.__version__}, Pillow {Image.__version__}, "
          f"{os.cpu_count()} CPUs, torch default threads {default_threads}")
    t0 = time.perf_counter()
    blobs = make_jpegs(args.images, args.seed)
    pixels = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            pixels.append(im.size[0] * im.size[1])
    print(f"generated {len(blobs)} JPEGs in {time.perf_counter() - t0:.1f} s: {sum(map(len, blobs)) / 2**20:.1f} MiB, "
          f"{np.mean(pixels) / 1e6:.2f} MP mean, {min(pixels)}..{max(pixels)} px")

    check = check_outputs(blobs, args.hd_num, args.batch_size)
    print(f"output sizes identical for all {len(blobs)} images (= hd_target_size); pixel difference ours vs "
          f"baseline: mean {check['mean_abs_diff_255']:.3f}, worst image mean "
          f"{check['worst_image_mean_abs_diff_255']:.3f} (0..255 units)")

    results: dict = {"hd_num": args.hd_num, "images": len(blobs), "check": check, "runs": []}
    summary = []
    for nt in threads:
        torch.set_num_threads(nt)
        contenders = [
            ("baseline", lambda: run_baseline(blobs, args.hd_num)),
            ("ours", lambda: run_ours(blobs, args.hd_num, args.batch_size)),
            ("decode only", lambda: run_decode(blobs, args.batch_size)),
        ]
        if args.device == "cuda":
            run_ours(blobs[:4], args.hd_num, args.batch_size, "cuda")  # warm-up: CUDA context, kernels
            contenders.append(("ours cuda", lambda: run_ours(blobs, args.hd_num, args.batch_size, "cuda")))
        best: dict[str, dict] = {}
        for rep in range(args.repeats):
            for name, fn in contenders:
                r = timed(fn, args.wait_idle, args.retries)
                assert r.pop("result") == len(blobs)
                r.update(contender=name, threads=nt, repeat=rep, images_per_s=len(blobs) / r["seconds"])
                results["runs"].append(r)
                flag = "  CONTENDED" if r["contended"] else ""
                print(f"  threads {nt}  round {rep + 1}  {name:<12} {r['seconds']:7.2f} s  {r['images_per_s']:7.1f} img/s"
                      f"  cpu {r['cpu_seconds']:6.2f} s  others {r['other_load_cores']:.2f} cores{flag}", flush=True)
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        summary.append((nt, best))

    print(f"\nHD-{args.hd_num}, {len(blobs)} images, best of {args.repeats}:")
    head = (f"{'threads':>7}  {'baseline img/s':>14}  {'ours img/s':>10}  {'ratio':>5}  {'decode-only img/s':>17}"
            f"  {'CPU s base/ours':>15}")
    if args.device == "cuda":
        head += f"  {'cuda img/s':>10}  {'cuda/cpu':>8}"
    print(head + "  target")
    print("-" * (len(head) + 8))
    for nt, best in summary:
        b, o, d = best["baseline"], best["ours"], best["decode only"]
        ratio = o["images_per_s"] / b["images_per_s"]
        line = (f"{nt:>7}  {b['images_per_s']:>14.1f}  {o['images_per_s']:>10.1f}  {ratio:>5.2f}  {d['images_per_s']:>17.1f}"
                f"  {b['cpu_seconds']:>7.2f}/{o['cpu_seconds']:<7.2f}")
        if args.device == "cuda":
            c = best["ours cuda"]
            line += f"  {c['images_per_s']:>10.1f}  {c['images_per_s'] / o['images_per_s']:>8.2f}"
        line += "  " + ("met" if ratio >= TARGET_RATIO else "NOT met") + f" (ratio >= {TARGET_RATIO})"
        if any(best[k]["contended"] for k in best):
            line += "  (some best runs contended)"
        print(line)
        results.setdefault("summary", []).append(
            {"threads": nt, **{k: v["images_per_s"] for k, v in best.items()}, "ratio": ratio})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
