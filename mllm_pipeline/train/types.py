"""The training loader's shared types: what the thread loader (:mod:`mllm_pipeline.train.data`) and the worker
loader (:mod:`mllm_pipeline.train.loader`) both use.

* :class:`DataError`, :class:`DataConfig` (batching and media options) and :class:`Batch` (one rank's batch);
* the batching of one window of rows: :func:`window_batches` (length-grouped, padded) and :func:`pack_window`
  (first-fit packing);
* the tar streaming: :func:`read_tar` (one tar's members, in order) and :class:`TarMembers` (each member kept only
  until its last planned use);
* :func:`media_on_device`: a worker-loader batch's uint8 media HD-transformed and normalised on a device (what
  :func:`mllm_pipeline.train.data.batch_to_device` runs for such a batch, and the worker loader on the CPU).
"""

from __future__ import annotations

import dataclasses
import tarfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mllm_pipeline.storage import Storage


class DataError(ValueError):
    """Bad or missing training data (names the file and the row)."""


@dataclasses.dataclass
class Batch:
    ids: list[str]
    input_ids: list[torch.Tensor]  # 1-D long, one per sample
    label_mask: list[torch.Tensor]  # 1-D bool
    media: list[torch.Tensor | None]
    tokens: int  # sum of seq_len (what the model sees, without padding)
    padded_tokens: int  # n * longest seq_len
    position: tuple[int, int]  # the data position of this global batch (epoch, batch index)
    pack: list[list[int]] | None = None  # packed: rows of sample indices (one row holding every sample)
    # set by the worker loader: media are uint8 (decoded, not resized) and this is each sample's hd_num; the HD
    # transform runs in batch_to_device (on the device)
    hd: list[int] | None = None  # the hd_num of each sample's images
    video_hd: int = 1  # the hd_num of every video frame

    def pin_memory(self) -> "Batch":
        """The batch with its tensors in page-locked memory (DataLoader ``pin_memory``)."""
        return dataclasses.replace(
            self, input_ids=[t.pin_memory() for t in self.input_ids],
            label_mask=[t.pin_memory() for t in self.label_mask],
            media=[None if m is None else m.pin_memory() if isinstance(m, torch.Tensor) else [x.pin_memory() for x in m]
                   for m in self.media])

    @property
    def samples(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    tokens_per_batch: int = 8192
    buffer_rows: int = 512
    seed: int = 0
    hd_num: int = 9
    video_frames: int = 8
    video_hd_num: int = 1
    image_token_id: int | None = None
    video_token_id: int | None = None
    prefetch: int = 2
    packing: bool = False
    hd_num_by_dataset: dict[str, int] = dataclasses.field(default_factory=dict)  # images of a dataset at its hd_num

    def __post_init__(self) -> None:
        if self.tokens_per_batch < 1 or self.buffer_rows < 1:
            raise ValueError("tokens_per_batch and buffer_rows must be at least 1")


class TarMembers:
    """Tar members read in one sequential pass per tar, each kept only until its last planned use.

    ``need`` counts the planned uses of each ``(tar, member)``; ``read_tar(tar)`` yields ``(name, bytes)`` in tar
    order. A tar's reader is closed once the next tar is opened (the plan reads tars one after another)."""

    def __init__(self, need: Counter, read_tar: Any, source: str):
        self.need, self.read_tar, self.source = need, read_tar, source
        self.cache: dict[tuple[str, str], bytes] = {}
        self.readers: dict[str, Any] = {}

    def get(self, tar: str, member: str, what: str) -> bytes:
        k = (tar, member)
        while k not in self.cache:
            reader = self.readers.get(tar)
            if reader is None:
                reader = self.readers[tar] = self.read_tar(tar)
                for other in [x for x in self.readers if x != tar]:  # a tar is done once the next one starts
                    self.readers.pop(other).close()
            try:
                name, data = next(reader)
            except StopIteration:
                raise DataError(f"{self.source} {what}: {member} is not in {tar}") from None
            if self.need.get((tar, name), 0) > 0:
                self.cache[(tar, name)] = data
        data = self.cache[k]
        self.need[k] -= 1
        if self.need[k] <= 0:
            del self.cache[k]
        return data

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def window_batches(window: list[int], seq_len: np.ndarray, budget: int, rng: np.random.Generator) -> list[list[int]]:
    """Length-grouped batches of one window: rows sorted by ``seq_len``, cut so ``n * longest <= budget`` (a row
    longer than the budget alone), then shuffled."""
    packed: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in sorted(window, key=lambda i: (seq_len[i], i)):
        new_longest = max(longest, int(seq_len[i]))
        if cur and (len(cur) + 1) * new_longest > budget:
            packed.append(cur)
            cur, new_longest = [], int(seq_len[i])
        cur.append(i)
        longest = new_longest
    if cur:
        packed.append(cur)
    return [packed[k] for k in rng.permutation(len(packed))]


def pack_window(rows: list[int], seq_len: np.ndarray, budget: int, rng: np.random.Generator) -> list[list[int]]:
    """First-fit decreasing: the longest sample first into the first row with room, rows then shuffled."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(rows, key=lambda i: (-seq_len[i], i)):
        n = int(seq_len[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return [bins[k] for k in rng.permutation(len(bins))]


def read_tar(storage: Storage, rel: str, source: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each file member of the tar ``rel`` of ``storage``, in tar order, read as a stream."""
    try:
        raw = storage.open(rel, "rb")
    except FileNotFoundError:
        raise DataError(f"{source}: media tar {storage.uri(rel)} not found (was the media shard "
                        "re-materialized after the manifests were built? rebuild the manifests)") from None
    with raw, tarfile.open(fileobj=raw, mode="r|") as tf:
        for member in tf:
            if member.isfile():
                f = tf.extractfile(member)
                yield member.name, f.read() if f is not None else b""


def media_on_device(batch: Batch, device: torch.device) -> list[Any]:
    """A batch's uint8 media on ``device``, HD-transformed and CLIP-normalised there (images at their row's
    ``hd_num``, batched per hd_num; a video's frames at the video ``hd_num``), as float32; a sample of several
    media gets a list."""
    from mllm_pipeline.vision.hd_torch import hd_batch

    nb = device.type == "cuda"
    flat: list[tuple[int, int, torch.Tensor]] = []  # (sample, item, uint8)
    for j, m in enumerate(batch.media):
        for k, x in enumerate([] if m is None else [m] if isinstance(m, torch.Tensor) else m):
            flat.append((j, k, x))
    done: dict[tuple[int, int], torch.Tensor] = {}
    groups: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    video_hd = batch.video_hd
    for j, k, x in flat:
        if x.ndim == 3:
            groups.setdefault(batch.hd[j], []).append((j, k, x))  # type: ignore[index]
        else:
            frames = x.to(device, non_blocking=nb)
            done[(j, k)] = torch.stack(hd_batch(list(frames), video_hd, device))
    for hd, items in groups.items():
        for (j, k, _), t in zip(items, hd_batch([x.to(device, non_blocking=nb) for _, _, x in items], hd, device)):
            done[(j, k)] = t
    out: list[Any] = []
    for j, m in enumerate(batch.media):
        if m is None:
            out.append(None)
        elif isinstance(m, torch.Tensor):
            out.append(done[(j, 0)])
        else:
            out.append([done[(j, k)] for k in range(len(m))])
    return out


__all__ = ["Batch", "DataConfig", "DataError", "TarMembers", "media_on_device", "pack_window", "read_tar",
           "window_batches"]
