"""Benchmark: WebVid-style watermark detection and removal on a generated labelled set.

    .venv/bin/python bench/watermark_bench.py                 # 200 clips, calibration on a separate 100-clip set
    .venv/bin/python bench/watermark_bench.py --clips 80 --calibration-clips 60 --psnr-clips 8   # a quick run

What it does (see bench/README.md for the figures):

1. Generates (``mllm_pipeline_tests.vision.synthetic.labelled_set``) a calibration set (seed ``--seed + 1``) and an
   evaluation set (seed ``--seed``), each 30% clips with the shared "WebVid" mark, 30% with a random mark, 30% clean
   moving clips and 10% still scenes; opacities cycle 0.2-0.6; 256x144, 40 frames at 10 fps, H.264 (crf 23).
2. Calibration: scores the calibration set with the template it estimates itself and prints the F1-best
   threshold next to ``WatermarkConfig().threshold`` (the default is that figure, rounded).
3. Throughput: times ``score_clips`` over the evaluation set's MP4 bytes, single process, OpenCV and FFmpeg held
   to one thread, at the default frame sampling: with ``template="auto"`` (pass 1 over up to ``template_clips``
   clips + pass 2) and with the template given (one pass). Prints clips/s (wall) and clips per CPU-second; the
   baseline in the same run is decoding the same 16 frames alone (``sample_frames``), the floor of any scorer that
   reads the clip.
4. Detection: precision/recall/F1 per opacity band (each band against every clean clip), without and with the
   template, and still scenes flagged.
5. Localisation: bbox IoU and mask recall (true overlay pixels covered) of flagged watermarked clips.
6. Removal: for ``--psnr-clips`` flagged watermarked clips, PSNR inside the true overlay region against the clean
   source: overlay left in (decoded input), ``inpaint`` (cv2.inpaint per frame) and ``alpha`` (reverse alpha).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _set(seed: int, total: int):
    from mllm_pipeline_tests.vision.synthetic import labelled_set

    n_marked = round(total * 0.3)
    n_still = max(2, total - 3 * n_marked)
    return labelled_set(seed=seed, n_webvid=n_marked, n_varied=n_marked, n_clean=n_marked, n_still=n_still)


def _table(rows: list[dict]) -> str:
    lines = ["| opacity | positives | TP | FN | FP | precision | recall | F1 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    still = ""
    for r in rows:
        if r["band"] == "still":
            still = f"still scenes flagged: {r['fp']} of {r['n']}"
            continue
        lines.append(f"| {r['band']} | {r['positives']} | {r['tp']} | {r['fn']} | {r['fp']} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['f1']:.3f} |")
    return "\n".join(lines) + "\n" + still


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=200, help="clips in the evaluation (and timing) set")
    ap.add_argument("--calibration-clips", type=int, default=100, help="clips in the calibration set")
    ap.add_argument("--psnr-clips", type=int, default=20, help="watermarked clips put through removal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()

    import cv2
    import numpy as np

    from mllm_pipeline.vision.frames import decode_video, sample_frames
    from mllm_pipeline_tests.vision.synthetic import detection_by_opacity
    from mllm_pipeline.vision.watermark import (
        Template, WatermarkConfig, bbox_iou, calibrate_threshold, clip_evidence, inpaint_clip, psnr, score_clips,
        score_evidence)

    cv2.setNumThreads(1)
    cfg = WatermarkConfig()
    out: dict = {"config": cfg.__dict__}

    t0 = time.perf_counter()
    cal = _set(args.seed + 1, args.calibration_clips)
    clips = _set(args.seed, args.clips)
    print(f"generated {len(cal)} + {len(clips)} clips in {time.perf_counter() - t0:.1f} s")

    # -- calibration --------------------------------------------------------------------------------------------
    cal_scores = [s for _, s in score_clips([(c.key, c.mp4) for c in cal], cfg)]
    moving = [i for i, c in enumerate(cal) if not c.still]
    calib = calibrate_threshold([cal_scores[i].score for i in moving], [cal[i].label for i in moving])
    print(f"\ncalibration ({len(cal)} clips, seed {args.seed + 1}): F1-best threshold {calib.threshold:.3f} "
          f"(P {calib.precision:.3f} R {calib.recall:.3f} F1 {calib.f1:.3f}); default threshold {cfg.threshold}")
    neg_max = max(cal_scores[i].score for i in moving if not cal[i].label)
    pos_min = min(cal_scores[i].score for i in moving if cal[i].label)
    print(f"calibration scores: clean moving clips up to {neg_max:.3f}, watermarked clips from {pos_min:.3f} "
          f"(any threshold in between separates them)")
    out["calibration"] = {**calib.__dict__, "negative_max": neg_max, "positive_min": pos_min}

    # -- throughput ---------------------------------------------------------------------------------------------
    items = [(c.key, c.mp4) for c in clips]
    t, c0 = time.perf_counter(), time.process_time()
    for key, data in items:
        sample_frames(data, n=cfg.frames, max_side=cfg.max_side, name=key)
    base_wall, base_cpu = time.perf_counter() - t, time.process_time() - c0
    t, c0 = time.perf_counter(), time.process_time()
    scores = [s for _, s in score_clips(items, cfg, template="auto")]
    auto_wall, auto_cpu = time.perf_counter() - t, time.process_time() - c0
    evidence = [clip_evidence(sample_frames(d, n=cfg.frames, max_side=cfg.max_side), cfg) for _, d in items]
    template = Template.estimate(evidence[: cfg.template_clips], cfg)
    t, c0 = time.perf_counter(), time.process_time()
    list(score_clips(items, cfg, template=template))
    one_wall, one_cpu = time.perf_counter() - t, time.process_time() - c0
    n = len(items)
    print(f"\nthroughput, {n} clips (256x144, 40 frames), {cfg.frames} frames sampled, one process:")
    print("| | wall s | clips/s | clips per CPU-s | ratio to decode only |\n|---|---:|---:|---:|---:|")
    for name, w, c in (("decode 16 frames only (baseline)", base_wall, base_cpu),
                       ("score_clips, template given (1 pass)", one_wall, one_cpu),
                       ("score_clips, template='auto' (2 passes)", auto_wall, auto_cpu)):
        print(f"| {name} | {w:.2f} | {n / w:.1f} | {n / c:.1f} | {w / base_wall:.2f} |")
    out["throughput"] = {"clips": n, "decode_only_cps": n / base_wall, "one_pass_cps": n / one_wall,
                         "auto_cps": n / auto_wall, "auto_cps_cpu": n / auto_cpu}
    print(f"template: {'none' if template is None else f'{template.clips} clips, {int(template.support.sum())} support px'}")

    # -- detection ----------------------------------------------------------------------------------------------
    no_tpl = [score_evidence(ev, None, cfg) for ev in evidence]
    for name, ss in (("without template", no_tpl), ("with template (score_clips default)", scores)):
        rows = detection_by_opacity(clips, [s.is_watermarked for s in ss])
        print(f"\ndetection {name}, threshold {cfg.threshold}:\n{_table(rows)}")
        out[f"detection {name}"] = rows
    hi = [i for i, c in enumerate(clips) if not c.still and (not c.label or c.opacity >= 0.3 - 1e-9)]
    from mllm_pipeline.vision.watermark import detection_metrics

    m = detection_metrics([scores[i].is_watermarked for i in hi], [clips[i].label for i in hi])
    print(f"opacity >= 0.3 overall: P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f}")
    out["f1_opacity_ge_0.3"] = m

    # -- localisation -------------------------------------------------------------------------------------------
    print("\nlocalisation of flagged watermarked clips (working size):")
    print("| group | clips | mean bbox IoU | median bbox IoU | mean mask recall |\n|---|---:|---:|---:|---:|")
    for group in ("webvid", "varied"):
        idx = [i for i, c in enumerate(clips) if c.group == group and scores[i].is_watermarked]
        ious = []
        recs = []
        for i in idx:
            s, ov = scores[i], clips[i].overlay
            ious.append(bbox_iou(s.bbox, ov.bbox))
            recs.append(float((s.mask & ov.mask).sum() / ov.mask.sum()))
        if idx:
            print(f"| {group} | {len(idx)} | {statistics.mean(ious):.2f} | {statistics.median(ious):.2f} | "
                  f"{statistics.mean(recs):.2f} |")
            out[f"iou_{group}"] = statistics.mean(ious)

    # -- removal ------------------------------------------------------------------------------------------------
    marked = [i for i, c in enumerate(clips) if c.label and scores[i].is_watermarked]
    step = max(1, len(marked) // max(1, args.psnr_clips))
    chosen = marked[::step][: args.psnr_clips]
    res = {"overlay left in": [], "inpaint": [], "alpha": []}
    t = time.perf_counter()
    for i in chosen:
        c, s = clips[i], scores[i]
        region = c.overlay.mask
        before = decode_video(c.mp4).frames
        res["overlay left in"].append(psnr(before[:, region], c.clean[:, region]))
        for method in ("inpaint", "alpha"):
            after = decode_video(inpaint_clip(c.mp4, s.mask, method=method)).frames
            assert after.shape == before.shape
            res[method].append(psnr(after[:, region], c.clean[:, region]))
    per_clip = (time.perf_counter() - t) / max(1, len(chosen)) / 2
    print(f"\nremoval, {len(chosen)} flagged watermarked clips, PSNR (dB) inside the true overlay region vs the clean "
          f"source ({per_clip:.2f} s per clip and method, 40 frames):")
    print("| | mean | median | min | clips better than overlay left in |\n|---|---:|---:|---:|---:|")
    for name, vals in res.items():
        better = sum(v > b for v, b in zip(vals, res["overlay left in"]))
        print(f"| {name} | {statistics.mean(vals):.2f} | {statistics.median(vals):.2f} | {min(vals):.2f} | "
              f"{'-' if name == 'overlay left in' else f'{better} of {len(vals)}'} |")
    out["psnr"] = {k: statistics.mean(v) for k, v in res.items()}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
