"""Static-overlay (stock-site watermark) estimation, scoring, calibration and removal for video clips.

WebVid's clips carry a semi-transparent mark at the same place in every frame of every clip, mid-frame, so no crop
removes it. This module finds such marks without any model download.

**Per-clip evidence** (``clip_evidence``). An overlay blended as ``I = (1 - a) C + a W`` adds the same gradient to
every frame wherever the content ``C`` under it moves; the content's own gradients move with it. Over ``T`` sampled
frames (gray, working size), per pixel:

* ``S = |median_t grad I|``, the signed temporal median of the gradient (x and y separately): what stays;
* ``A = mean_t |grad I|``, how much edge there is at all, and ``P``, the fraction of frames with an edge there
  (temporal persistence of edges); the static ratio ``S / A`` is near 1 on an overlay's edges and small on
  moving content;
* the motion gate: a pixel is *observed* only if its intensity varies over time (temporal standard deviation above
  ``motion_gate`` gray levels). On a static pixel an overlay cannot be told from content, so such pixels give no
  evidence at all. The clip's ``motion`` is the fraction of observed pixels.

**Static-edge score (no template).** Candidate pixels are observed, static (``S / A >= static_ratio``), strong
(``S >= min_static_edge``) and persistent (``P >= min_persistence``). They are joined into regions (closing with a
kernel of ``join_px``); the region with the most static-edge mass ``sum(S)`` is the overlay candidate, and the
score is ``1 - exp(-mass / mass_scale)`` in [0, 1).

**Template (cross-clip, Dekel et al., CVPR 2017).** The median over many watermarked images of their gradient
fields converges to the watermark's gradients. ``Template.estimate`` takes the per-clip median gradients of the
clips that the static-edge score already flags whose region covers the place most flagged regions cover (so
marks elsewhere do not dilute it) and takes their per-pixel median; its support (gradient magnitude
above ``template_edge``) is where the shared mark is. A clip's template score is the normalised correlation of its
median gradient with the template over the template's support (observed pixels only when enough of them are): ~0
for a clip without the mark (its residual gradients have random sign), near 1 with it, whatever the opacity. The
clip score is ``max(static-edge score, template score)``. Each static-edge region's mass is discounted by the
orientation spread of its gradients (an isotropy factor: edges that stay put under a pan share one orientation)
and by the share of its area that moves (an opaque static object moves nowhere inside).

**Still clips.** When fewer than ``min_motion`` of the pixels are observed, every edge is "persistent" and the
static-edge evidence means nothing: the clip gets ``still=True``, its score is the template score alone (0 without a
template), and it is flagged only if that reaches the stricter ``still_threshold`` (``decision="any"``; with the
default ``decision="template"`` every clip that has a template is judged by the template score alone). So a still scene is never
called watermarked from persistence alone; without a template it is kept (``score == 0``), and callers who prefer
to drop what cannot be checked can filter on ``ClipScore.still``.

**Decision** (``WatermarkConfig.decision``). WebVid's mark is one mark at one place, so by default
(``"template"``) a clip whose frame shape has a template (one is estimated per shape) is flagged when its
template score reaches ``template_threshold``, and only clips without a template fall back to the static-edge
score. On the WebVid-like benchmark this removes the static-edge score's false positives on burnt-in subtitles,
TV logos, letterbox bars, tripod shots and time-lapses (bench/README.md). ``"any"`` flags any static overlay.

**Known limits.** Content that stays put inside a moving scene (an object that hardly moves while the camera
pans, a burnt-in caption, a TV logo) is a static overlay as far as the pixels go, and is flagged like one (a
textured object moving less than about one pixel per sampled frame is the usual false positive). Content edges
parallel to a pan stay put too (the aperture problem); they share one orientation, which the isotropy factor
discounts. A semi-transparent mark over content that does not move is not seen without a template.

**Region.** The flagged region is the template support (when the template score decides) or the winning candidate
region, dilated and with holes filled, at the working size; ``ClipScore.bbox`` is in the clip's own pixels.
``mask_png``/``mask_from_png`` store it compactly for ``mask`` mode.

**Removal** (``inpaint_clip``). The working-size mask is scaled to the clip and dilated. With ``method="alpha"``
(the default) the overlay's colour and per-pixel opacity are estimated from the clip itself (every frame gives
``I - C_hat = a (W - C_hat)`` with ``C_hat`` a Telea inpainting), and the blend is inverted,
``C = (I - a W) / (1 - a)``, which restores the texture under the mark; pixels where the estimate is unreliable
fall back to the inpainting. ``method="inpaint"`` uses ``cv2.inpaint`` per frame only. The clip is re-encoded with
PyAV (H.264 if available, else MPEG-4), same size, frame count and rate.

**Model-based detectors** (e.g. LAION's EfficientNet-B3 watermark classifier) plug in through ``FrameScorer``
(a callable from frames to a probability); ``load_frame_scorer`` checks the weights file and the factory.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mllm_pipeline.vision.frames import FrameSample, decode_video, encode_video, sample_frames

__all__ = [
    "WatermarkConfig", "ClipEvidence", "Template", "ClipScore", "Calibration", "FrameScorer",
    "clip_evidence", "score_clip", "score_evidence", "score_clips", "calibrate_threshold", "inpaint_clip", "remove_overlay",
    "mask_png", "mask_from_png", "load_frame_scorer", "detection_metrics", "psnr", "mask_iou", "bbox_iou",
    "MODES",
]

MODES = ("drop", "mask", "remove")


@dataclasses.dataclass(frozen=True)
class WatermarkConfig:
    """Settings of the detector. Gradients are in intensity units (0..1) per pixel (Sobel / 8).

    frames: frames sampled per clip, evenly spaced (16: enough for a stable temporal median).
    max_side: working size, longer side in pixels (256; WebVid's 596x336 previews become 256x144).
    motion_gate: temporal standard deviation (gray levels, 0..255) above which a pixel's content is moving.
    min_motion: fraction of moving pixels below which the clip is "still" (0.10).
    edge_threshold: gradient magnitude that counts as an edge for persistence (0.02, about 5 gray levels/pixel).
    min_persistence: fraction of frames with an edge at a candidate pixel (0.6).
    static_ratio: |median gradient| / mean |gradient| at a candidate pixel (0.6).
    min_static_edge: |median gradient| at a candidate pixel (0.02, about 5 gray levels/pixel).
    join_px: closing kernel that joins a mark's strokes into one region, working pixels (9).
    mass_scale: static-edge mass giving a score of 1 - 1/e (2.0).
    template_edge: template gradient magnitude that belongs to the mark's support (0.015).
    min_template_clips: flagged clips needed before a template is trusted (8).
    template_clips: at most this many clips feed the template in ``score_clips`` (200; bounds memory).
    threshold: score at or above which a moving clip is watermarked (calibrated on the synthetic set, see
        bench/README.md).
    still_threshold: template score at or above which a still clip is watermarked (0.8, stricter); ``decision="any"``.
    decision: ``"template"`` (default; WebVid): where a template exists for the clip's frame shape, the template
        score alone decides (``>= template_threshold``, still clips included) and the region is the template's
        support; the static-edge score decides only for clips without a template. Content that stays put (burnt-in
        subtitles, a TV logo, letterbox bars, a tripod shot's background, a time-lapse) has static edges but not
        the shared mark's, so it is not flagged; a different mark elsewhere is not flagged either. ``"any"``: the
        clip score is ``max(static-edge, template)`` (any static overlay is flagged).
    template_threshold: template score at or above which a clip is watermarked under ``decision="template"``
        (0.45, calibrated on the WebVid-like set of bench/watermark_realistic_bench.py).
    mask_dilate: pixels added around the region (working size) for masks and removal (1).
    """

    frames: int = 16
    max_side: int = 256
    motion_gate: float = 3.0
    min_motion: float = 0.10
    edge_threshold: float = 0.02
    min_persistence: float = 0.6
    static_ratio: float = 0.6
    min_static_edge: float = 0.02
    join_px: int = 9
    mass_scale: float = 5.0
    template_edge: float = 0.015
    min_template_clips: int = 8
    template_clips: int = 200
    threshold: float = 0.5
    still_threshold: float = 0.8
    mask_dilate: int = 1
    decision: str = "template"
    template_threshold: float = 0.45

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.frames, int) or self.frames < 3:
            problems.append(f"frames must be an integer >= 3 (a median needs several frames), got {self.frames!r}")
        if not isinstance(self.max_side, int) or self.max_side < 32:
            problems.append(f"max_side must be an integer >= 32 pixels, got {self.max_side!r}")
        if self.decision not in ("template", "any"):
            problems.append(f"decision must be 'template' or 'any', got {self.decision!r}")
        for name in ("min_motion", "min_persistence", "static_ratio", "threshold", "still_threshold", "template_threshold"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                problems.append(f"{name} must be in [0, 1], got {v!r}")
        for name in ("motion_gate", "edge_threshold", "min_static_edge", "mass_scale", "template_edge"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                problems.append(f"{name} must be a positive number, got {v!r}")
        for name in ("join_px", "min_template_clips", "template_clips", "mask_dilate"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                problems.append(f"{name} must be a non-negative integer, got {v!r}")
        if not problems and self.template_clips < self.min_template_clips:
            problems.append(f"template_clips ({self.template_clips}) must be >= min_template_clips ({self.min_template_clips})")
        if problems:
            raise ValueError("invalid WatermarkConfig: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------------------
# per-clip evidence
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ClipEvidence:
    """Per-pixel evidence of one clip at the working size (all float32 ``(H, W)`` unless noted).

    gx, gy: temporal median of the gradient; mean_mag: temporal mean of the gradient magnitude; persistence:
    fraction of frames with an edge; moving: bool, the pixel's content moves; motion: fraction of moving pixels.
    """

    gx: np.ndarray
    gy: np.ndarray
    mean_mag: np.ndarray
    persistence: np.ndarray
    moving: np.ndarray
    motion: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.gx.shape

    @property
    def static_edge(self) -> np.ndarray:
        """``|median gradient|``, the per-pixel persistence map."""
        return np.hypot(self.gx, self.gy)


def _gray(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 4:
        if frames.shape[-1] != 3:
            raise ValueError(f"expected (T, H, W) gray or (T, H, W, 3) RGB frames, got shape {frames.shape}")
        frames = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif frames.ndim != 3:
        raise ValueError(f"expected (T, H, W) gray or (T, H, W, 3) RGB frames, got shape {frames.shape}")
    return frames.astype(np.float32)


def _temporal_median(x: np.ndarray) -> np.ndarray:
    """Median over axis 0 (sorting the short axis is about 3x faster than ``np.median``'s strided partition)."""
    s = np.sort(x, axis=0)
    t = s.shape[0]
    return s[t // 2] if t % 2 else 0.5 * (s[t // 2 - 1] + s[t // 2])


def clip_evidence(frames: np.ndarray | FrameSample, config: WatermarkConfig | None = None) -> ClipEvidence:
    """The per-pixel persistence map and motion measure of one clip's sampled frames (gray or RGB, 0..255)."""
    import cv2

    config = config or WatermarkConfig()
    if isinstance(frames, FrameSample):
        frames = frames.frames
    g = _gray(frames)
    if g.shape[0] < 3:
        raise ValueError(f"need at least 3 frames for temporal statistics, got {g.shape[0]}")
    t, h, w = g.shape
    g01 = g * np.float32(1 / 255)
    gx = np.empty_like(g01)
    gy = np.empty_like(g01)
    for i in range(t):
        cv2.Sobel(g01[i], cv2.CV_32F, 1, 0, dst=gx[i], ksize=3, scale=0.125)
        cv2.Sobel(g01[i], cv2.CV_32F, 0, 1, dst=gy[i], ksize=3, scale=0.125)
    mag = np.hypot(gx, gy)
    mean_mag = mag.mean(axis=0)
    persistence = (mag >= config.edge_threshold).mean(axis=0, dtype=np.float32)
    mx = _temporal_median(gx)
    my = _temporal_median(gy)
    # motion gate: temporal std of a lightly blurred intensity (blur: sensor noise and coding noise average out)
    blurred = np.stack([cv2.blur(g[i], (3, 3)) for i in range(t)])
    std = blurred.std(axis=0)
    moving = std >= config.motion_gate
    return ClipEvidence(mx.astype(np.float32), my.astype(np.float32), mean_mag.astype(np.float32),
                        persistence, moving, float(moving.mean()))


# ------------------------------------------------------------------------------------------------------------
# template
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Template:
    """The shared overlay's gradient field (the per-pixel median of many flagged clips' median gradients) and its
    support, at the working size it was estimated at."""

    gx: np.ndarray
    gy: np.ndarray
    support: np.ndarray
    clips: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.gx.shape

    @classmethod
    def estimate(cls, evidence: Iterable[ClipEvidence], config: WatermarkConfig | None = None) -> Template | None:
        """The median over clips of their median gradients, using only clips that the static-edge score flags
        (Dekel et al. take the median over watermarked images). Clips of another working size are skipped (the
        most common size with a template wins). None if fewer than ``min_template_clips`` clips qualify or the
        support is empty. ``estimate_all`` gives one per frame shape."""
        templates = cls.estimate_all(evidence, config)
        return templates[0] if templates else None

    @classmethod
    def estimate_all(cls, evidence: Iterable[ClipEvidence], config: WatermarkConfig | None = None) -> list[Template]:
        """One template per working frame shape (so 16:9, 4:3, 1:1 and portrait clips each get their own), for
        every shape with enough flagged clips; most clips first."""
        config = config or WatermarkConfig()
        by_shape: dict[tuple[int, int], list[tuple[ClipEvidence, np.ndarray]]] = {}
        for ev in evidence:
            if ev.motion < config.min_motion:
                continue
            score, region = _static_score(ev, config)
            if score >= config.threshold:
                by_shape.setdefault(ev.shape, []).append((ev, _fill_region(region, config.join_px, 0)))
        out = []
        for _, flagged in sorted(by_shape.items(), key=lambda kv: -len(kv[1])):
            t = cls._from_flagged(flagged, config)
            if t is not None:
                out.append(t)
        return out

    @classmethod
    def _from_flagged(cls, flagged: list[tuple[ClipEvidence, np.ndarray]], config: WatermarkConfig) -> Template | None:
        import cv2

        # the shared mark sits at the same place in its clips: keep the clips whose region covers the place that
        # most flagged regions cover, so marks elsewhere (other sites, burnt-in captions) do not dilute the median
        occupancy = cv2.blur(np.sum([r for _, r in flagged], axis=0, dtype=np.float32), (5, 5))
        hot = occupancy >= 0.5 * occupancy.max()
        chosen = [ev for ev, r in flagged if (r & hot).sum() >= 0.3 * min(r.sum(), hot.sum())]
        if len(chosen) < config.min_template_clips:
            return None
        gx = np.median(np.stack([e.gx for e in chosen]), axis=0).astype(np.float32)
        gy = np.median(np.stack([e.gy for e in chosen]), axis=0).astype(np.float32)
        support = np.hypot(gx, gy) >= config.template_edge
        if support.sum() < 10:
            return None
        return cls(gx, gy, support, len(chosen))

    def resized(self, shape: tuple[int, int]) -> Template | None:
        """The template at another working size of the same aspect ratio (within 2%), else None."""
        import cv2

        if shape == self.shape:
            return self
        (h0, w0), (h, w) = self.shape, shape
        if abs((w / h) / (w0 / h0) - 1) > 0.02:
            return None
        sx, sy = w / w0, h / h0
        gx = cv2.resize(self.gx, (w, h), interpolation=cv2.INTER_LINEAR) / np.float32(sx)
        gy = cv2.resize(self.gy, (w, h), interpolation=cv2.INTER_LINEAR) / np.float32(sy)
        support = cv2.resize(self.support.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        return Template(gx, gy, support, self.clips)

    def save(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, gx=self.gx, gy=self.gy, support=self.support, clips=self.clips)
        return buf.getvalue()

    @classmethod
    def load(cls, data: bytes) -> Template:
        z = np.load(io.BytesIO(data))
        return cls(z["gx"], z["gy"], z["support"].astype(bool), int(z["clips"]))


# ------------------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------------------


def _fill_region(mask: np.ndarray, join_px: int, dilate: int) -> np.ndarray:
    import cv2

    m = mask.astype(np.uint8)
    if join_px > 1:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (join_px, join_px)))
    # fill holes: what the border cannot reach through background is inside the region
    h, w = m.shape
    flood = np.pad(m, 1)
    ff = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, ff, (0, 0), 2)
    m = (flood[1:-1, 1:-1] != 2).astype(np.uint8)
    if dilate > 0:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1)))
    return m.astype(bool)


def _static_score(ev: ClipEvidence, config: WatermarkConfig) -> tuple[float, np.ndarray]:
    """(score in [0, 1), candidate-region mask) of the static-edge evidence, without any template."""
    import cv2

    s = ev.static_edge
    cand = (ev.moving & (s >= config.min_static_edge) & (s >= config.static_ratio * ev.mean_mag)
            & (ev.persistence >= config.min_persistence))
    if not cand.any():
        return 0.0, cand
    # regions: candidates joined by a closing, holes filled
    filled = _fill_region(cand, config.join_px, 0).astype(np.uint8)
    n, labels = cv2.connectedComponents(filled, connectivity=8)
    lab = labels.ravel()
    c = cand.ravel()
    mass = np.bincount(lab, weights=np.where(c, s.ravel(), 0.0), minlength=n)
    # orientation spread of each region's static gradients (structure tensor): an overlay's strokes run in every
    # direction, while content edges that stay put under a pan are the ones parallel to the motion (aperture
    # problem) and share one orientation. isotropy = 2 * l2 / (l1 + l2) in [0, 1].
    gx, gy = np.where(c, ev.gx.ravel(), 0.0), np.where(c, ev.gy.ravel(), 0.0)
    jxx = np.bincount(lab, weights=gx * gx, minlength=n)
    jyy = np.bincount(lab, weights=gy * gy, minlength=n)
    jxy = np.bincount(lab, weights=gx * gy, minlength=n)
    tr = jxx + jyy
    disc = np.sqrt(np.maximum(0.0, (jxx - jyy) ** 2 + 4 * jxy**2))
    with np.errstate(divide="ignore", invalid="ignore"):
        isotropy = np.where(tr > 0, (tr - disc) / tr, 0.0)  # = 2 * l2 / (l1 + l2)
    # a semi-transparent overlay lets the motion show through its whole area; an opaque static object (a static
    # box over a moving background) moves nowhere inside: discount regions whose area is mostly not moving
    area = np.bincount(lab, minlength=n)
    moving_share = np.bincount(lab, weights=ev.moving.ravel().astype(np.float64), minlength=n) / np.maximum(area, 1)
    effective = mass * np.clip(isotropy, 0.0, 1.0) * np.clip((moving_share - 0.5) / 0.3, 0.0, 1.0)
    effective[0] = 0
    best = int(effective.argmax())
    score = 1.0 - math.exp(-float(effective[best]) / config.mass_scale)
    # a mark in parts (a logo beside a word) gives several regions: keep those with a good share of the best's mass
    keep = np.nonzero(effective >= max(0.25 * effective[best], 0.1 * config.mass_scale))[0]
    keep = keep[keep > 0] if len(keep) else np.array([best])
    return score, cand & np.isin(labels, keep)


def _template_score(ev: ClipEvidence, template: Template, observed_only: bool) -> float:
    sup = template.support
    if observed_only:
        obs = sup & ev.moving
        if obs.sum() >= 0.5 * sup.sum():
            sup = obs
    tx, ty = template.gx[sup], template.gy[sup]
    cx, cy = ev.gx[sup], ev.gy[sup]
    den = math.sqrt(float((tx * tx + ty * ty).sum()) * float((cx * cx + cy * cy).sum()))
    if den <= 0:
        return 0.0
    return max(0.0, float((tx * cx + ty * cy).sum()) / den)


@dataclasses.dataclass
class ClipScore:
    """The verdict on one clip.

    score: in [0, 1]; is_watermarked: the decision (``score >= threshold``, or ``>= still_threshold`` for a still
    clip); still: too little motion to judge from persistence; motion: fraction of moving pixels; mask: the
    estimated overlay region at the working size (bool, empty if none); bbox: ``(x0, y0, x1, y1)`` of the region in
    the clip's own pixels (exclusive end) or None; static_score / template_score: the two parts of the score
    (template_score None without a template); width, height: the clip's size.
    """

    score: float
    is_watermarked: bool
    still: bool
    mask: np.ndarray
    bbox: tuple[int, int, int, int] | None
    motion: float
    static_score: float = 0.0
    template_score: float | None = None
    width: int = 0
    height: int = 0

    def record(self) -> dict[str, Any]:
        """A JSON-friendly summary (no mask; see ``mask_png``)."""
        return {"score": round(self.score, 4), "is_watermarked": self.is_watermarked, "still": self.still,
                "motion": round(self.motion, 4), "bbox": list(self.bbox) if self.bbox else None,
                "static_score": round(self.static_score, 4),
                "template_score": None if self.template_score is None else round(self.template_score, 4),
                "width": self.width, "height": self.height}


def _bbox(mask: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    if not mask.any():
        return None
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    sx, sy = (width or w) / w, (height or h) / h
    return (int(math.floor(xs.min() * sx)), int(math.floor(ys.min() * sy)),
            min(width or w, int(math.ceil((xs.max() + 1) * sx))), min(height or h, int(math.ceil((ys.max() + 1) * sy))))


def _template_for(template: Template | Sequence[Template] | None, shape: tuple[int, int]) -> Template | None:
    """The template for a clip of working size ``shape``: one of that shape, else one resized from the same aspect."""
    if template is None:
        return None
    if isinstance(template, Template):
        return template.resized(shape)
    for t in template:
        if t.shape == shape:
            return t
    for t in template:
        r = t.resized(shape)
        if r is not None:
            return r
    return None


def score_evidence(ev: ClipEvidence, template: Template | Sequence[Template] | None = None, config: WatermarkConfig | None = None,
                   width: int = 0, height: int = 0) -> ClipScore:
    """``score_clip`` from already computed evidence (``width``/``height``: the clip's size, for the bbox)."""
    config = config or WatermarkConfig()
    tpl = _template_for(template, ev.shape)
    still = ev.motion < config.min_motion
    tscore = _template_score(ev, tpl, observed_only=not still) if tpl is not None else None
    if config.decision == "template" and tpl is not None:
        sscore = 0.0 if still else _static_score(ev, config)[0]
        score = float(tscore)
        flagged = score >= config.template_threshold
        use_template = flagged
    elif still:
        sscore, region = 0.0, np.zeros(ev.shape, bool)
        score = tscore or 0.0
        flagged = score >= config.still_threshold
        use_template = flagged
    else:
        sscore, region = _static_score(ev, config)
        score = max(sscore, tscore or 0.0)
        flagged = score >= config.threshold
        use_template = tscore is not None and tscore >= config.threshold
    if not flagged:
        mask = np.zeros(ev.shape, bool)
    elif use_template:
        mask = _fill_region(tpl.support, 3, config.mask_dilate)
    else:
        mask = _fill_region(region, config.join_px, config.mask_dilate)
    return ClipScore(score=float(score), is_watermarked=bool(flagged), still=bool(still), mask=mask,
                     bbox=_bbox(mask, width, height), motion=ev.motion, static_score=float(sscore),
                     template_score=tscore, width=width, height=height)


def score_clip(frames: np.ndarray | FrameSample, template: Template | Sequence[Template] | None = None,
               config: WatermarkConfig | None = None) -> ClipScore:
    """Score one clip from its sampled frames (``(T, H, W)`` gray or ``(T, H, W, 3)`` RGB, or a ``FrameSample``,
    whose clip size then gives the bbox in the clip's pixels)."""
    config = config or WatermarkConfig()
    width = height = 0
    if isinstance(frames, FrameSample):
        width, height = frames.width, frames.height
    ev = clip_evidence(frames, config)
    return score_evidence(ev, template, config, width, height)


def _sample(key: str, data: bytes, config: WatermarkConfig) -> FrameSample:
    return sample_frames(data, n=config.frames, max_side=config.max_side, gray=True, name=key)


def score_clips(source: Callable[[], Iterable[tuple[str, bytes]]] | Sequence[tuple[str, bytes]],
                config: WatermarkConfig | None = None, template: Template | Sequence[Template] | None | str = "auto",
                on_error: str = "record") -> Iterator[tuple[str, ClipScore | Exception]]:
    """Score a stream of ``(key, mp4 bytes)`` in two passes, yielding ``(key, ClipScore)`` in input order.

    Pass 1 (only with ``template="auto"``) decodes the first ``template_clips`` clips, keeps their evidence and
    estimates the shared template from it, one per frame shape (``Template.estimate_all``); those clips are then scored from the kept evidence, and pass 2 reads
    the source again, skips them and decodes and scores the rest. Memory holds at most ``template_clips`` evidence
    maps (about 0.7 MB each at 256x144) plus one clip. ``source`` must be readable twice: a sequence, or a callable that
    returns a fresh iterable each time (e.g. ``lambda: ((k, f["mp4"]) for k, f in iter_shard(...))``). A
    ``Template``, a list of them, or None skips pass 1. ``on_error="record"`` yields ``(key, VideoDecodeError)`` for clips that
    cannot be decoded; ``"raise"`` raises it.
    """
    config = config or WatermarkConfig()
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    if callable(source):
        reread = source
    else:
        if iter(source) is source:
            raise TypeError("score_clips reads its source twice: pass a sequence or a callable returning a fresh "
                            "iterable, not a one-shot iterator")
        reread = lambda: source  # noqa: E731
    if isinstance(template, str) and template != "auto":
        raise ValueError(f"template must be a Template, None or 'auto', got {template!r}")
    head: list[tuple[str, ClipEvidence | None, FrameSample | ValueError]] = []
    if template == "auto":
        # pass 1: evidence of the first template_clips clips (kept: they are scored from it, not decoded again)
        for key, data in reread():
            if len(head) >= config.template_clips:
                break
            try:
                sample = _sample(key, data, config)
                ev = clip_evidence(sample, config)
                sample = dataclasses.replace(sample, frames=sample.frames[:0])  # keep the sizes, drop the pixels
                head.append((key, ev, sample))
            except ValueError as exc:
                head.append((key, None, exc))
        template = Template.estimate_all((ev for _, ev, _ in head if ev is not None), config) or None
    for key, ev, sample in head:
        if ev is None:
            if on_error == "raise":
                raise sample
            yield key, sample
        else:
            yield key, score_evidence(ev, template, config, sample.width, sample.height)
    skip = len(head)
    del head
    if skip and skip < config.template_clips:
        return  # pass 1 read the whole source
    for n, (key, data) in enumerate(reread()):
        if n < skip:
            continue
        try:
            sample = _sample(key, data, config)
        except ValueError as exc:
            if on_error == "raise":
                raise
            yield key, exc
            continue
        yield key, score_evidence(clip_evidence(sample, config), template, config, sample.width, sample.height)


# ------------------------------------------------------------------------------------------------------------
# calibration and evaluation
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
    threshold: float
    precision: float
    recall: float
    f1: float


def detection_metrics(predicted: Sequence[bool], labels: Sequence[bool]) -> dict[str, float]:
    """Precision, recall, F1 and counts (precision is 1.0 when nothing is predicted, recall 1.0 when nothing is
    positive, so a band without positives or without predictions does not read as a failure)."""
    p = np.asarray(predicted, bool)
    y = np.asarray(labels, bool)
    if p.shape != y.shape:
        raise ValueError(f"predicted and labels differ in length: {p.shape} vs {y.shape}")
    tp = int((p & y).sum())
    fp = int((p & ~y).sum())
    fn = int((~p & y).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "n": int(len(y))}


def calibrate_threshold(scores: Sequence[float], labels: Sequence[bool], min_precision: float = 0.0) -> Calibration:
    """The threshold with the best F1 on labelled scores (among those reaching ``min_precision``), placed midway
    between the last negative-side score and the first positive-side one, so it has margin on both sides."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of the same length, got {s.shape} and {y.shape}")
    if not len(s) or y.all() or not y.any():
        raise ValueError("calibration needs both positive and negative labelled clips")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    values = np.unique(s)
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    best = None
    for c in cuts:
        m = detection_metrics(s >= c, y)
        if m["precision"] < min_precision:
            continue
        key = (m["f1"], m["precision"])
        if best is None or key > best[0]:
            best = (key, c, m)
    if best is None:
        raise ValueError(f"no threshold reaches precision {min_precision}")
    _, c, m = best
    return Calibration(float(np.clip(c, 0.0, 1.0)), m["precision"], m["recall"], m["f1"])


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB, peak 255) between two images or frame stacks, over ``mask`` (``(H, W)``, broadcast) if given."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    d = (a - b) ** 2
    if mask is not None:
        m = np.asarray(mask, bool)
        rgb = d.ndim >= 3 and d.shape[-1] == 3 and d.shape[-3:-1] == m.shape
        if rgb:
            m = m[..., None]
        d = d[np.broadcast_to(m, d.shape)]
    mse = float(d.mean()) if d.size else 0.0
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def bbox_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes (exclusive end); 0 if either is None."""
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ------------------------------------------------------------------------------------------------------------
# mask storage
# ------------------------------------------------------------------------------------------------------------


def mask_png(mask: np.ndarray) -> bytes:
    """A region mask as a 1-bit PNG (a few hundred bytes at the working size)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def mask_from_png(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """The bool mask stored by ``mask_png``, optionally scaled (nearest) to ``size = (width, height)``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("1")
        if size is not None and img.size != tuple(size):
            img = img.resize(tuple(size), Image.NEAREST)
        return np.asarray(img, bool)


# ------------------------------------------------------------------------------------------------------------
# removal
# ------------------------------------------------------------------------------------------------------------


def _full_mask(mask: np.ndarray, width: int, height: int, grow: int) -> np.ndarray:
    import cv2

    m = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    if grow > 0:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    return m


def remove_overlay(frames: np.ndarray, mask: np.ndarray, method: str = "alpha", radius: int = 3) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 with the overlay inside ``mask`` (``(H, W)``, full size) removed.

    ``inpaint``: Telea inpainting per frame. ``alpha``: estimate the overlay colour ``W`` and per-pixel opacity
    ``a`` from all frames (``I - C_hat = a (W - C_hat)``, ``C_hat`` the inpainted frame; ``W`` a robust
    regression over the region, ``a`` the per-pixel temporal median), then invert the blend; where ``a`` is not
    reliable (``1 - a`` small, or few frames with enough contrast) the inpainted value is kept.
    """
    import cv2

    if method not in ("alpha", "inpaint"):
        raise ValueError(f"method must be 'alpha' or 'inpaint', got {method!r}")
    m = (np.asarray(mask) > 0).astype(np.uint8)
    out = frames.copy()
    if not m.any():
        return out
    inpainted = np.stack([cv2.inpaint(f, m, radius, cv2.INPAINT_TELEA) for f in frames])
    if method == "inpaint":
        return inpainted
    sel = m.astype(bool)
    obs = frames[:, sel].astype(np.float32)  # (T, N, 3)
    ref = inpainted[:, sel].astype(np.float32)
    y = obs - ref
    # overlay colour: I = (1 - a) C + a W  =>  the brighter/darker side; estimate W per channel as the value that
    # makes a (computed per channel) agree across channels: use pixels/frames with a clear shift
    lum_y = y.mean(axis=2)
    shift = np.abs(lum_y) > 6.0
    if shift.sum() < 20:
        return inpainted
    sign = np.sign(np.median(lum_y[shift]))
    colour = np.where(sign > 0, np.maximum(obs[shift].max(axis=0), 200.0), np.minimum(obs[shift].min(axis=0), 55.0))
    denom = colour[None, None, :] - ref
    with np.errstate(divide="ignore", invalid="ignore"):
        a_each = np.where(np.abs(denom) > 25.0, y / denom, np.nan)
    a_pix = np.nanmedian(a_each.reshape(a_each.shape[0], a_each.shape[1], -1).transpose(1, 0, 2).reshape(a_each.shape[1], -1),
                         axis=1) if np.isfinite(a_each).any() else np.full(a_each.shape[1], np.nan)
    a_pix = np.clip(np.nan_to_num(a_pix, nan=0.0), 0.0, 0.9).astype(np.float32)
    # a few percent of opacity is within the estimate's noise: treat as no overlay
    a_pix[a_pix < 0.04] = 0.0
    restored = (obs - a_pix[None, :, None] * colour[None, None, :]) / (1.0 - a_pix[None, :, None])
    good = a_pix < 0.8
    res = np.where(good[None, :, None], restored, ref)
    out[:, sel] = np.clip(res + 0.5, 0, 255).astype(np.uint8)
    return out


def inpaint_clip(mp4_bytes: bytes, mask: np.ndarray, method: str = "alpha", grow: int = 1, radius: int = 3,
                 name: str = "<clip>", crf: int = 20) -> bytes:
    """MP4 bytes of the clip with the region ``mask`` (any size; scaled to the clip, nearest) removed, every frame,
    re-encoded with PyAV (H.264 if available, else MPEG-4) at the clip's size, frame count and rate.
    ``grow``: pixels added around the scaled mask. Raises ``VideoDecodeError`` for undecodable input."""
    video = decode_video(mp4_bytes, name=name)
    m = _full_mask(np.asarray(mask, bool), video.width, video.height, grow)
    frames = remove_overlay(video.frames, m, method=method, radius=radius)
    return encode_video(frames, video.rate, crf=crf)


# ------------------------------------------------------------------------------------------------------------
# model-based detectors (plug-in)
# ------------------------------------------------------------------------------------------------------------


@runtime_checkable
class FrameScorer(Protocol):
    """A model-based watermark detector: ``scorer(frames)`` takes ``(T, H, W, 3)`` uint8 RGB frames of one clip
    and returns the probability (0..1) that the clip is watermarked. LAION's EfficientNet-B3 watermark
    classifier, for instance, fits behind this with its own preprocessing (resize 256, normalise) and a mean of
    per-frame probabilities."""

    def __call__(self, frames: np.ndarray) -> float: ...


def load_frame_scorer(weights: str | Path, factory: Callable[[Path], FrameScorer]) -> FrameScorer:
    """Build a model-based scorer from a local weights file with ``factory(path)`` (which imports the model
    library). Nothing is downloaded: a missing file is a ``FileNotFoundError`` that says so."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"watermark model weights not found at {path}: model-based scoring needs the weights file on local disk "
            "(nothing is downloaded); pass the path of the downloaded file, or score without a model")
    scorer = factory(path)
    if not callable(scorer):
        raise TypeError(f"the factory returned {type(scorer).__name__}, which is not a callable FrameScorer")
    return scorer
