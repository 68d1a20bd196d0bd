"""Vision domain code (no Dagster): the HD transform (PIL, and batched tensors in :mod:`.hd_torch`), frame
sampling, and static-overlay (watermark) estimation, scoring and removal for video clips, with a synthetic
labelled set to measure them."""

from mllm_pipeline.vision.frames import (
    DecodedVideo,
    FrameSample,
    VideoDecodeError,
    decode_video,
    encode_video,
    sample_frames,
    working_size,
)
from mllm_pipeline.vision.hd import hd_grid, hd_grid_scale, hd_target_size, hd_token_count, hd_transform
from mllm_pipeline.vision.watermark import (
    MODES,
    Calibration,
    ClipEvidence,
    ClipScore,
    FrameScorer,
    Template,
    WatermarkConfig,
    bbox_iou,
    calibrate_threshold,
    clip_evidence,
    detection_metrics,
    inpaint_clip,
    load_frame_scorer,
    mask_from_png,
    mask_iou,
    mask_png,
    psnr,
    remove_overlay,
    score_clip,
    score_clips,
    score_evidence,
)

__all__ = [
    "hd_transform", "hd_token_count", "hd_grid", "hd_target_size", "hd_grid_scale",
    "DecodedVideo", "FrameSample", "VideoDecodeError", "decode_video", "encode_video", "sample_frames", "working_size",
    "MODES", "Calibration", "ClipEvidence", "ClipScore", "FrameScorer", "Template", "WatermarkConfig", "bbox_iou",
    "calibrate_threshold", "clip_evidence", "detection_metrics", "inpaint_clip", "load_frame_scorer",
    "mask_from_png", "mask_iou", "mask_png", "psnr", "remove_overlay", "score_clip", "score_clips", "score_evidence",
]

#: the batched tensor path (needs torch): imported on first use, so the rest of the package stays light
_HD_TORCH = ("CLIP_MEAN", "CLIP_STD", "ImageDecodeError", "decode_image", "decode_images", "hd_transform_tensor",
             "hd_batch", "global_view", "hd_crops", "group_by_size", "stack_padded", "normalised_white")
__all__ += list(_HD_TORCH)


def __getattr__(name: str):
    if name in _HD_TORCH:
        from mllm_pipeline.vision import hd_torch

        return getattr(hd_torch, name)
    raise AttributeError(f"module 'mllm_pipeline.vision' has no attribute {name!r}")
