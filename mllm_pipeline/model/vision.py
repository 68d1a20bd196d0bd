"""The vision path: HD crops + global view through one ViT pass, 2x2 token merge, newline and separator tokens.

Input per image: the padded HD image (``vision.hd.hd_transform``) as a normalised tensor (3, rows*S, cols*S),
S = the ViT's input size (336 for CLIP ViT-L/14-336). For each image:

1. local view: the rows x cols crops of S x S pixels (row-major); global view: the whole padded image resized
   (bicubic) to S x S. The crops and global views of every image in the batch go through the ViT as one batch.
2. features: ``hidden_states[select_layer]`` of the ViT (default -1: the last layer's output, the encoder output
   before CLIP's post-layernorm, as InternLM-XComposer2 uses) with the CLS token dropped: g x g patches,
   g = S / patch (24 for 336/14).
3. 2x2 merge: each 2x2 block of patches becomes one token whose channels are the four patches concatenated in
   the order top-left, top-right, bottom-left, bottom-right: g*g x C becomes (g/2)^2 x 4C (576x1024 -> 144x4096).
4. the crops' merged maps are stitched into one (rows*g/2) x (cols*g/2) map; a learnable newline token is
   appended after every token row of the global map and of the stitched local map; the sequence is
   ``global rows (+newlines), separator, local rows (+newlines)``. For S=336:
   ``(rows*cols + 1)*144 + 1 + (rows + 1)*12`` tokens, which is ``vision.hd.hd_token_count``.
5. a video is its frames (each an HD image at the per-frame hd_num) laid out as above and joined by the separator.

Newline and separator live in the pre-projector space (4C). They start at zero, as in the official 4KHD code.
The projector (in ``mllm.py``) maps every token, newline and separator included, into the LLM's hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """(N, g*g, C) patch features (row-major) -> (N, g/2, g/2, 4C), channels TL, TR, BL, BR."""
    n, tokens, c = features.shape
    g = int(round(tokens**0.5))
    if g * g != tokens or g % 2:
        raise ValueError(f"patch features must form an even square grid, got {tokens} tokens per crop")
    x = features.reshape(n, g // 2, 2, g // 2, 2, c)  # (n, block row, row in block, block col, col in block, c)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (n, block row, block col, row in block, col in block, c)
    return x.reshape(n, g // 2, g // 2, 4 * c)


def stitch_crops(maps: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, m, m, D) merged maps of row-major crops -> one (rows*m, cols*m, D) map."""
    n, m, m2, d = maps.shape
    if n != rows * cols:
        raise ValueError(f"expected {rows}x{cols}={rows * cols} crop maps, got {n}")
    return maps.reshape(rows, cols, m, m2, d).permute(0, 2, 1, 3, 4).reshape(rows * m, cols * m2, d)


def add_newlines(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """(R, W, D) token map -> (R*(W+1), D): the row's W tokens then the newline token, row after row."""
    r, _, d = grid.shape
    nl = newline.reshape(1, 1, d).to(grid.dtype).expand(r, 1, d)
    return torch.cat([grid, nl], dim=1).reshape(-1, d)


def image_layout(
    global_map: torch.Tensor, local_map: torch.Tensor, newline: torch.Tensor, separator: torch.Tensor
) -> torch.Tensor:
    """The token sequence of one image: global map rows with newlines, the separator, local map rows with
    newlines. ``global_map`` (m, m, D), ``local_map`` (rows*m, cols*m, D); returns (T, D)."""
    sep = separator.reshape(1, -1).to(global_map.dtype)
    return torch.cat([add_newlines(global_map, newline), sep, add_newlines(local_map, newline)], dim=0)


def image_token_count(rows: int, cols: int, grid: int = 24) -> int:
    """Tokens of an image with a rows x cols crop grid and a g x g ViT patch grid per crop."""
    m = grid // 2
    return (rows * cols + 1) * m * m + 1 + (rows + 1) * m


def video_token_count(frame_rows: int, frame_cols: int, frames: int, grid: int = 24) -> int:
    """Tokens of a video of ``frames`` frames, each a frame_rows x frame_cols crop grid, joined by separators."""
    return frames * image_token_count(frame_rows, frame_cols, grid) + (frames - 1)


def split_crops(image: torch.Tensor, crop: int) -> torch.Tensor:
    """(3, rows*crop, cols*crop) -> (rows*cols, 3, crop, crop), row-major."""
    c, h, w = image.shape
    rows, cols = h // crop, w // crop
    x = image.reshape(c, rows, crop, cols, crop).permute(1, 3, 0, 2, 4)
    return x.reshape(rows * cols, c, crop, crop)


def global_view(image: torch.Tensor, crop: int) -> torch.Tensor:
    """Bicubic resize of the whole padded image to (3, crop, crop) (computed in float32)."""
    out = F.interpolate(image[None].float(), size=(crop, crop), mode="bicubic", align_corners=False)
    return out[0].to(image.dtype)


class VisionEncoder(nn.Module):
    """A Hugging Face vision tower (CLIP-like: ``pixel_values`` in, ``hidden_states`` out) plus the HD layout.

    ``forward(items)`` takes a list of media items, each an image (3, H, W) or a video (frames, 3, H, W), and
    returns one (T_i, 4C) pre-projector token sequence per item.
    """

    def __init__(self, tower: nn.Module, select_layer: int = -1, batch_size: int | None = None):
        super().__init__()
        self.tower = tower
        self.select_layer = select_layer
        self.batch_size = batch_size
        cfg = tower.config
        self.crop_size = int(cfg.image_size)
        self.patch_size = int(cfg.patch_size)
        if self.crop_size % self.patch_size:
            raise ValueError(f"vision image_size {self.crop_size} is not a multiple of patch_size {self.patch_size}")
        self.grid = self.crop_size // self.patch_size
        if self.grid % 2:
            raise ValueError(f"the ViT patch grid ({self.grid}x{self.grid}) must be even for the 2x2 merge")
        self.hidden_size = int(cfg.hidden_size)
        self.out_dim = 4 * self.hidden_size
        self.newline = nn.Parameter(torch.zeros(self.out_dim))
        self.separator = nn.Parameter(torch.zeros(self.out_dim))

    @property
    def tokens_per_crop(self) -> int:
        return (self.grid // 2) ** 2

    # -- the ViT ------------------------------------------------------------------------------------------------
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, g*g, C): the selected hidden state, CLS (or any prefix token) dropped."""
        param = next(self.tower.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        chunks = pixels.split(self.batch_size) if self.batch_size else (pixels,)
        hidden = torch.cat(
            [self.tower(pixel_values=c, output_hidden_states=True).hidden_states[self.select_layer] for c in chunks]
        )
        extra = hidden.shape[1] - self.grid * self.grid
        if extra < 0:
            raise ValueError(f"vision tower returned {hidden.shape[1]} tokens for a {self.grid}x{self.grid} grid")
        return hidden[:, extra:]

    def _check(self, image: torch.Tensor, where: str) -> tuple[int, int]:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{where}: expected an image tensor (3, H, W), got shape {tuple(image.shape)}")
        _, h, w = image.shape
        s = self.crop_size
        if h % s or w % s or h == 0 or w == 0:
            raise ValueError(
                f"{where}: image size {w}x{h} (WxH) is not a multiple of the {s}-px crop; "
                f"apply the HD transform (vision.hd.hd_transform) first"
            )
        return h // s, w // s

    def forward(self, items: list[torch.Tensor], names: list[str] | None = None) -> list[torch.Tensor]:
        names = names or [f"media item {i}" for i in range(len(items))]
        # flatten every image / video frame; remember (item, rows, cols) per image
        images: list[tuple[int, torch.Tensor, str]] = []
        for i, item in enumerate(items):
            if item.dim() == 3:
                images.append((i, item, names[i]))
            elif item.dim() == 4:
                if item.shape[0] < 1:
                    raise ValueError(f"{names[i]}: a video needs at least one frame")
                images.extend((i, frame, f"{names[i]} frame {f}") for f, frame in enumerate(item))
            else:
                raise ValueError(
                    f"{names[i]}: expected an image (3, H, W) or a video (frames, 3, H, W), got {tuple(item.shape)}"
                )
        if not images:
            return []
        grids = [self._check(img, where) for _, img, where in images]
        batch = []
        for (_, img, _), _grid in zip(images, grids):
            batch.append(global_view(img, self.crop_size)[None])
            batch.append(split_crops(img, self.crop_size))
        merged = merge_2x2(self.features(torch.cat(batch, dim=0)))  # (N, m, m, 4C)

        per_item: list[list[torch.Tensor]] = [[] for _ in items]
        offset = 0
        for (i, _, _), (rows, cols) in zip(images, grids):
            n = rows * cols
            glb = merged[offset]
            local = stitch_crops(merged[offset + 1 : offset + 1 + n], rows, cols)
            offset += 1 + n
            per_item[i].append(image_layout(glb, local, self.newline, self.separator))
        out = []
        for seqs in per_item:
            if len(seqs) == 1:
                out.append(seqs[0])
            else:  # video: frames joined by the separator
                sep = self.separator.reshape(1, -1).to(seqs[0].dtype)
                joined = [seqs[0]]
                for s in seqs[1:]:
                    joined += [sep, s]
                out.append(torch.cat(joined, dim=0))
        return out
