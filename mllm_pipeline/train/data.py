"""Training data: manifest rows -> token-budget batches, media streamed from the webdataset tars.

This is the thread loader (``TrainConfig.loader = "thread"``); the default is the worker loader of
:mod:`mllm_pipeline.train.loader`. Both hand their batches to :func:`batch_to_device` (here) and share the
types of :mod:`mllm_pipeline.train.types`: the batching (:func:`~mllm_pipeline.train.types.window_batches`,
:func:`~mllm_pipeline.train.types.pack_window`), :class:`~mllm_pipeline.train.types.Batch`,
:class:`~mllm_pipeline.train.types.DataConfig` and the tar streaming.

Order of one epoch (deterministic given ``seed`` and the epoch number, computed from the manifest alone):

1. the tars (``media_tar``) are shuffled; the rows of a tar keep the tar's own member order (sorted by
   ``media_key``, the order the media shards are written in), so each tar is read front to back, once;
2. consecutive rows in that order are cut into windows of ``buffer_rows``; inside a window the rows are sorted
   by ``seq_len`` and packed greedily into batches whose *padded* size (``n * longest seq_len``) stays within
   ``tokens_per_batch`` (a sample longer than the budget gets a batch of its own); the window's batches are then
   shuffled. With ``packing`` a batch is instead one row of samples back to back (first-fit decreasing by
   ``seq_len`` inside the window: the row's real tokens stay within ``tokens_per_batch``, nothing is padded); the
   model keeps attention inside each sample (``MLLM.forward(pack=...)``). This is webdataset's shard shuffle + buffer shuffle, with length-grouping inside the buffer so
   little compute goes to padding.

A data position is ``(epoch, batch)``: the index of the next global batch in that epoch's plan. Resuming at a
position rebuilds the same plan and skips the earlier batches without decoding their media (the tars are still
read from their start, as a stream, but only members that a remaining batch needs are kept).

Distributed: global batch ``i`` goes to rank ``i % world_size`` (the batches of an epoch are cut to a multiple
of ``world_size``, as ``DistributedSampler(drop_last=True)`` does). Every rank streams the tars but decodes
only its own batches' media.

Media: an image is decoded and HD-transformed at ``hd_num`` with CLIP normalisation by
:mod:`mllm_pipeline.vision.hd_torch` -> (3, rows*336, cols*336); a video gets ``video_frames`` evenly spaced
frames (:func:`mllm_pipeline.vision.frames.sample_frames`, RGB, full size), each HD-transformed at
``video_hd_num`` and stacked -> (frames, 3, H, W). A clip with fewer frames repeats its last frame so the token
count stays the one the manifest recorded. Decoding runs in a background thread (Pillow, PyAV and the torch
resize release the GIL) that keeps ``prefetch`` batches ready.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mllm_pipeline.storage import Storage
from mllm_pipeline.train.types import (Batch, DataConfig, DataError, TarMembers, media_on_device, pack_window, read_tar,
                                       window_batches)

COLUMNS = ["id", "media_kind", "media_tar", "media_key", "media_ext", "input_ids", "label_mask", "seq_len"]


class ManifestData:
    """The training split of a manifest (a pyarrow table with :data:`COLUMNS`) as batches of decoded samples."""

    def __init__(self, storage: Storage, table: pa.Table, config: DataConfig, rank: int = 0, world_size: int = 1,
                 source: str = "train.parquet"):
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{source}: manifest lacks column(s) {missing}")
        if table.num_rows == 0:
            raise DataError(f"{source}: the train split is empty: nothing to train on")
        self.storage, self.config, self.rank, self.world_size, self.source = storage, config, rank, world_size, source
        t = table.select(COLUMNS)
        self.ids = t["id"].to_pylist()
        self.kind = t["media_kind"].to_pylist()
        self.tar = t["media_tar"].to_pylist()
        self.key = t["media_key"].to_pylist()
        self.ext = t["media_ext"].to_pylist()
        self.input_ids = t["input_ids"].to_pylist()
        self.label_mask = t["label_mask"].to_pylist()
        self.seq_len = np.asarray(t["seq_len"].to_numpy(zero_copy_only=False), dtype=np.int64)
        self._check_placeholders()
        by_tar: dict[str, list[int]] = {}
        for i, name in enumerate(self.tar):
            by_tar.setdefault(name or "", []).append(i)
        # a tar's rows in member order (shards are written in key order)
        self.tars = {k: sorted(v, key=lambda i: (self.key[i] or "", i)) for k, v in sorted(by_tar.items())}
        self._plans: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _check_placeholders(self) -> None:
        c = self.config
        want = {"image": c.image_token_id, "video": c.video_token_id}
        for i, (kind, ids) in enumerate(zip(self.kind, self.input_ids)):
            tid = want.get(kind)
            if kind not in want:
                raise DataError(f"{self.source} row {i} ({self.ids[i]}): unknown media_kind {kind!r}")
            if tid is None or ids.count(tid) != 1:
                raise DataError(f"{self.source} row {i} ({self.ids[i]}): expected exactly one <{kind}> token "
                                f"(id {tid}) in input_ids, found {ids.count(tid) if tid is not None else 0}; was the "
                                "manifest tokenized with the model's tokenizer?")
            if not self.tar[i] or not self.key[i]:
                raise DataError(f"{self.source} row {i} ({self.ids[i]}): no media_tar / media_key")

    # -- the plan -----------------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[list[int]]:
        """The global batches (row indices) of ``epoch``, cut to a multiple of ``world_size``."""
        if epoch in self._plans:
            return self._plans[epoch]
        c = self.config
        rng = np.random.default_rng([c.seed, epoch])
        names = list(self.tars)
        order = [i for t in rng.permutation(len(names)) for i in self.tars[names[t]]]
        batches: list[list[int]] = []
        for start in range(0, len(order), c.buffer_rows):
            window = order[start:start + c.buffer_rows]
            batches += pack_window(window, self.seq_len, c.tokens_per_batch, rng) if c.packing \
                else window_batches(window, self.seq_len, c.tokens_per_batch, rng)
        usable = len(batches) - len(batches) % self.world_size
        if usable == 0:
            raise DataError(f"{self.source}: {len(batches)} batch(es) per epoch for {self.world_size} ranks; lower "
                            "tokens_per_batch or use fewer ranks")
        self._plans = {epoch: batches[:usable]}
        return self._plans[epoch]

    def batches_per_epoch(self) -> int:
        return len(self.plan(0))

    # -- streaming ----------------------------------------------------------------------------------------------
    def iterate(self, position: tuple[int, int] = (0, 0)) -> Iterator[Batch]:
        """This rank's batches from ``position`` on, forever (epoch after epoch), in a prefetching thread."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.config.prefetch))
        stop = threading.Event()

        def produce() -> None:
            try:
                for b in self._iterate(position):
                    while not stop.is_set():
                        try:
                            q.put(("batch", b), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # surfaced in the consumer
                q.put(("error", e))

        thread = threading.Thread(target=produce, name="mllm-train-data", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "error":
                    raise item
                yield item
        finally:
            stop.set()

    def _iterate(self, position: tuple[int, int]) -> Iterator[Batch]:
        epoch, start = position
        while True:
            yield from self._epoch(epoch, start)
            epoch, start = epoch + 1, 0

    def _epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        plan = self.plan(epoch)
        mine = [(b, rows) for b, rows in enumerate(plan) if b >= start and b % self.world_size == self.rank]
        need: Counter = Counter()  # (tar, member name) -> remaining uses by this rank
        for _, rows in mine:
            for i in rows:
                need[(self.tar[i], self._member(i))] += 1
        members = TarMembers(need, self._read_tar, self.source)

        def fetch(i: int) -> bytes:
            return members.get(self.tar[i], self._member(i), f"row {i} ({self.ids[i]})")

        for b, rows in mine:
            media = [self._decode(i, fetch(i)) for i in rows]
            yield Batch(
                ids=[self.ids[i] for i in rows],
                input_ids=[torch.tensor(self.input_ids[i], dtype=torch.long) for i in rows],
                label_mask=[torch.tensor(self.label_mask[i], dtype=torch.bool) for i in rows],
                media=media,
                tokens=int(sum(self.seq_len[i] for i in rows)),
                padded_tokens=int(sum(self.seq_len[i] for i in rows)) if self.config.packing
                else int(len(rows) * max(self.seq_len[i] for i in rows)),
                position=(epoch, b),
                pack=[list(range(len(rows)))] if self.config.packing else None,
            )
        members.close()

    def _member(self, i: int) -> str:
        return f"{self.key[i]}.{self.ext[i]}"

    def _read_tar(self, rel: str) -> Iterator[tuple[str, bytes]]:
        return read_tar(self.storage, rel, self.source)

    def _decode(self, i: int, data: bytes) -> torch.Tensor:
        from mllm_pipeline.vision.hd_torch import decode_image, hd_transform_tensor

        c = self.config
        try:
            if self.kind[i] == "image":
                return hd_transform_tensor(decode_image(data, key=self.key[i]), c.hd_num)
            from mllm_pipeline.vision.frames import sample_frames

            n = c.video_frames
            sample = sample_frames(data, n=max(2, n), max_side=None, gray=False, name=f"{self.tar[i]}:{self._member(i)}")
            frames = sample.frames[:n] if n > 1 else sample.frames[:1]
            if len(frames) < n:
                frames = np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])
            out = [hd_transform_tensor(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1), c.video_hd_num)
                   for f in frames]
            return torch.stack(out)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.source} row {i} ({self.ids[i]}): cannot decode {self._member(i)} from "
                            f"{self.tar[i]}: {e}") from None


def batch_to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    """Model keyword arguments for a batch, on ``device``."""
    nb = device.type == "cuda"
    if batch.hd is not None:  # uint8 from the worker loader: HD transform + normalisation on the device
        media = media_on_device(batch, device)
    else:
        media = [None if m is None else m.to(device, non_blocking=nb) if isinstance(m, torch.Tensor)
                 else [x.to(device, non_blocking=nb) for x in m] for m in batch.media]
    return {
        "input_ids": [t.to(device, non_blocking=nb) for t in batch.input_ids],
        "media": media,
        "label_mask": [t.to(device, non_blocking=nb) for t in batch.label_mask],
        "pack": batch.pack,
    }
