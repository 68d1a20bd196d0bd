"""The vision path: token counts against hd_token_count, 2x2 merge order, newline/separator layout, video."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mllm_pipeline_tests.model.tiny import hd_tensor

from mllm_pipeline.model import VisionEncoder, merge_2x2, video_token_count
from mllm_pipeline.vision.hd import hd_grid, hd_token_count

SIZES = [(1000, 500), (500, 1000), (800, 800), (120, 900), (1600, 300)]  # landscape, portrait, square, tall, wide


def test_image_token_counts_equal_hd_token_count(tiny_model):
    cases = [(w, h, n) for (w, h) in SIZES for n in (1, 4, 9)]
    images = [hd_tensor(w, h, n, seed=i) for i, (w, h, n) in enumerate(cases)]
    # every crop and global view of all images goes through one ViT pass
    calls = []
    hook = tiny_model.vision.tower.register_forward_hook(lambda m, a, kw: calls.append(1), with_kwargs=False)
    try:
        with torch.no_grad():
            embeds = tiny_model.embed_media(images)
    finally:
        hook.remove()
    assert len(calls) == 1
    hidden = tiny_model.llm.config.hidden_size
    for (w, h, n), e in zip(cases, embeds):
        assert e.shape == (hd_token_count(w, h, n), hidden), (w, h, n)
    # HD-9 of a 2:1 landscape image: 2x4 crops -> (8+1)*144 + 1 + 3*12
    assert embeds[2].shape[0] == 1333


def test_forward_shapes_mixed_orientations(tiny_model):
    cfg = tiny_model.config
    sizes = [(1000, 500, 4), (500, 1000, 4), (800, 800, 4)]
    media = [hd_tensor(w, h, n) for w, h, n in sizes]
    ids = [torch.tensor([5, 6, cfg.image_token_id, 7]), torch.tensor([cfg.image_token_id, 8]), torch.tensor([9, cfg.image_token_id])]
    with torch.no_grad():
        out = tiny_model(ids, media)
    counts = [hd_token_count(w, h, n) for w, h, n in sizes]
    lengths = [c + len(i) - 1 for c, i in zip(counts, ids)]
    assert out.logits.shape == (3, max(lengths), cfg.llm_config["vocab_size"])
    assert out.image_mask.sum(1).tolist() == counts
    assert out.attention_mask.sum(1).tolist() == lengths


def test_merge_order_tl_tr_bl_br():
    g, c = 24, 3
    r = torch.arange(g).view(g, 1, 1).expand(g, g, c)
    col = torch.arange(g).view(1, g, 1).expand(g, g, c)
    ch = torch.arange(c).view(1, 1, c).expand(g, g, c)
    fmap = (r * 10000 + col * 100 + ch).float()  # value encodes (row, col, channel)
    merged = merge_2x2(fmap.reshape(1, g * g, c))
    assert merged.shape == (1, 12, 12, 4 * c)
    for i in range(12):
        for j in range(12):
            want = torch.cat([fmap[2 * i, 2 * j], fmap[2 * i, 2 * j + 1], fmap[2 * i + 1, 2 * j], fmap[2 * i + 1, 2 * j + 1]])
            assert torch.equal(merged[0, i, j], want), (i, j)
    # the real sizes: 576 x 1024 -> 144 x 4096
    assert merge_2x2(torch.zeros(2, 576, 1024)).reshape(2, 144, -1).shape == (2, 144, 4096)


class SyntheticFeatures:
    """Replaces the ViT: returns, for ViT batch item n, patch (r, c): channel 0 = n, 1 = r, 2 = c (rest 0).
    Records the pixels it was given."""

    def __init__(self, encoder):
        self.encoder, self.pixels = encoder, None

    def __call__(self, pixels):
        self.pixels = pixels
        n, g, c = pixels.shape[0], self.encoder.grid, self.encoder.hidden_size
        f = torch.zeros(n, g, g, c)
        f[..., 0] = torch.arange(n).view(n, 1, 1).float()
        f[..., 1] = torch.arange(g).view(1, g, 1).float()
        f[..., 2] = torch.arange(g).view(1, 1, g).float()
        return f.reshape(n, g * g, c)


@pytest.fixture
def synthetic_encoder(tiny_model):
    enc = VisionEncoder(tiny_model.vision.tower)  # a fresh encoder; the shared model stays untouched
    fake = SyntheticFeatures(enc)
    enc.features = fake
    with torch.no_grad():
        enc.newline.fill_(-1.0)
        enc.separator.fill_(-2.0)
    return enc, fake


def _kind(tok):
    if torch.all(tok == -1):
        return "newline"
    if torch.all(tok == -2):
        return "separator"
    return "patch"


def _check_image(seq, vit_index, rows, cols, c):
    """seq: one image's tokens. Global first (12 rows of 12 + newline), separator, then the stitched local map."""
    assert seq.shape[0] == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12
    pos = 0
    for i in range(12):  # global view: ViT item vit_index
        for j in range(12):
            tok = seq[pos]
            assert _kind(tok) == "patch"
            # top-left patch of the 2x2 block is (2i, 2j); top-right (2i, 2j+1) sits at channel c
            assert tok[0] == vit_index and tok[1] == 2 * i and tok[2] == 2 * j
            assert tok[c + 2] == 2 * j + 1 and tok[2 * c + 1] == 2 * i + 1
            pos += 1
        assert _kind(seq[pos]) == "newline"
        pos += 1
    assert _kind(seq[pos]) == "separator"
    pos += 1
    for row in range(rows * 12):  # local view: crops row-major after the global view
        for col in range(cols * 12):
            tok = seq[pos]
            crop = (row // 12) * cols + col // 12
            assert _kind(tok) == "patch"
            assert tok[0] == vit_index + 1 + crop, (row, col)
            assert tok[1] == 2 * (row % 12) and tok[2] == 2 * (col % 12)
            pos += 1
        assert _kind(seq[pos]) == "newline", row
        pos += 1
    assert pos == seq.shape[0]


def test_layout_global_separator_local_with_newlines(synthetic_encoder):
    enc, fake = synthetic_encoder
    img = torch.randn(3, 2 * 336, 3 * 336)  # 2 rows x 3 columns of crops
    (seq,) = enc([img])
    _check_image(seq, 0, 2, 3, enc.hidden_size)
    # the ViT batch: the global view (bicubic resize of the whole padded image), then the crops row-major
    assert fake.pixels.shape == (7, 3, 336, 336)
    glb = F.interpolate(img[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
    assert torch.allclose(fake.pixels[0], glb)
    assert torch.equal(fake.pixels[1 + 1 * 3 + 2], img[:, 336:, 672:])  # crop row 1, col 2
    assert torch.equal(fake.pixels[1 + 0 * 3 + 1], img[:, :336, 336:672])


def test_video_layout_frames_joined_by_separator(synthetic_encoder):
    enc, fake = synthetic_encoder
    frames = torch.randn(3, 3, 336, 672)  # 3 frames, each 1 row x 2 columns
    image = torch.randn(3, 336, 336)
    seq_img, seq_vid = enc([image, frames])
    _check_image(seq_img, 0, 1, 1, enc.hidden_size)
    per_frame = hd_token_count(672, 336, 2)  # a 1x2 grid
    assert per_frame == 457
    assert seq_vid.shape[0] == video_token_count(1, 2, 3) == 3 * per_frame + 2
    for f in range(3):
        start = f * (per_frame + 1)
        _check_image(seq_vid[start : start + per_frame], 2 + 3 * f, 1, 2, enc.hidden_size)
        if f < 2:
            assert _kind(seq_vid[start + per_frame]) == "separator"


def test_video_through_the_model(tiny_model):
    cfg = tiny_model.config
    frames = torch.stack([hd_tensor(640, 360, cfg.video_hd_num, seed=s) for s in range(cfg.video_frames)])
    rows, cols = hd_grid(640, 360, cfg.video_hd_num)
    ids = torch.tensor([[3, cfg.video_token_id, 4, 5]])
    with torch.no_grad():
        out = tiny_model(ids, [frames])
    n = video_token_count(rows, cols, cfg.video_frames)
    assert n == cfg.video_frames * hd_token_count(640, 360, cfg.video_hd_num) + cfg.video_frames - 1
    assert out.image_mask[0].tolist() == [False] + [True] * n + [False, False]


def test_clear_errors(tiny_model):
    cfg = tiny_model.config
    ids = [torch.tensor([cfg.image_token_id, 1]), torch.tensor([2, cfg.image_token_id])]
    bad = torch.zeros(3, 336, 500)
    with pytest.raises(ValueError, match=r"sample 1 image 0: image size 500x336 .* not a multiple of the 336-px crop"):
        tiny_model.prepare_inputs(ids, [torch.zeros(3, 336, 336), bad])
    with pytest.raises(ValueError, match="sample 0: 1 media placeholder.*0 media item"):
        tiny_model.prepare_inputs(ids, [None, torch.zeros(3, 336, 336)])
    with pytest.raises(ValueError, match="sample 0: placeholder 0 is video token"):
        tiny_model.prepare_inputs([torch.tensor([cfg.video_token_id])], [torch.zeros(3, 336, 336)])


def test_chunked_vit_pass_gives_the_same_tokens(tiny_model):
    from mllm_pipeline_tests.model.tiny import make_model

    chunked = make_model(vision_batch_size=3).eval()  # same seed: same weights as tiny_model
    images = [hd_tensor(1000, 500, 9), hd_tensor(300, 300, 1)]  # 9 + 2 ViT inputs -> 4 chunks
    with torch.no_grad():
        a, b = tiny_model.embed_media(images), chunked.embed_media(images)
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)
