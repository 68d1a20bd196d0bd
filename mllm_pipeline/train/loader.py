"""The training loader: DataLoader worker processes, each reading only its own shards, uint8 media, HD on the device.

``ShardedData`` is what a run trains from (``TrainConfig.loader = "workers"``); :class:`~mllm_pipeline.train.data.
ManifestData` (one decode thread per rank, every rank streaming every tar) stays as ``loader = "thread"``.

The manifest is held columnar: the split is read with only the columns below (a pyarrow table, row groups as the
file has them); the plan works on numpy arrays of ``seq_len`` and of the tar each row's media sits in, and a batch
takes its ``input_ids`` / ``label_mask`` / ``media_key`` out of the table (``Table.take``) when it is built.

Order of one epoch (deterministic given ``seed``, the epoch, the world size and ``num_workers``):

1. the tars are shuffled (``rng(seed, epoch)``) and dealt to the ``world_size x num_workers`` *units* (rank
   ``r``'s worker ``w`` is unit ``r * num_workers + w``): each tar, in that order, goes to the unit with the fewest
   rows so far. Text-only rows (no media) form pseudo-shards of ``buffer_rows`` rows. ``num_workers`` is lowered to
   the shards per rank when there are fewer (a unit needs a shard); fewer shards than ranks is an error;
2. inside a unit, its tars are read front to back in that order, cut into windows of ``buffer_rows`` rows and
   batched as :class:`~mllm_pipeline.train.data.ManifestData` does (length-grouped padding, or first-fit packing
   under ``packing``), the window's batches shuffled;
3. every unit is cut to the smallest unit's batch count ``m`` (as ``DistributedSampler(drop_last=True)``), so all
   ranks run as many steps; rank ``r``'s ``k``-th batch is its worker ``k % num_workers``'s ``k // num_workers``-th,
   the order a DataLoader's round robin over its workers yields them.

So no rank (and no worker) opens a tar of another one. A data position is ``(epoch, g)`` with ``g = k * world_size
+ r`` the global batch index, as for ``ManifestData``; resuming rebuilds the plan and each worker skips to its
first remaining batch without reading the media of the skipped ones (the tars are still streamed from their start).
Resuming on a different world size re-partitions the shards: the weights and the count of batches seen are
exact, the order of the rest of that epoch is the new partition's (``num_workers`` is part of the run's
configuration fingerprint, so a resume with another worker count is refused).

``partition=False`` (validation): one unit over every tar, rank ``r`` takes the global batches ``b % world == r``:
the same batches on any world size, read in the main process.

Media leave the workers (``hd_on_device``, what a CUDA run uses) as ``uint8`` tensors, decoded but not resized: an
image (3, H, W), a video's frames (F, 3, H, W). With ``pin_memory`` on CUDA the DataLoader pins them;
:func:`~mllm_pipeline.train.data.batch_to_device` copies them ``non_blocking`` and runs the HD transform and the
CLIP normalisation on the device with :func:`mllm_pipeline.vision.hd_torch.hd_batch` (all images of a batch at one
``hd_num`` in one call). On the CPU this is the very function the thread loader runs, so the pixels are the same.
Without CUDA the run sets ``hd_on_device=False``: the workers run that same transform on the CPU and hand over
float tensors (on a CPU the transform in the training process would be serial, and torch's intra-op threads there
compete with the workers).

Samples: one image or video (one placeholder), text only (no ``media_kind`` / ``media_tar``, no placeholder), or
several media: the optional ``extra_media`` column (:data:`EXTRA_MEDIA`) lists further members of the row's tar, in
placeholder order; such a sample's ``media`` is a list. Placeholder counts are checked for every row up front.

``hd_num`` per dataset (``hd_num_by_dataset``): images of those datasets are transformed at their own ``hd_num``;
their media tokens and ``seq_len`` are recomputed from the manifest's ``width`` / ``height``
(:func:`~mllm_pipeline.vision.hd.hd_token_count`) before planning, and a decoded image whose size disagrees with
the manifest is an error. Videos keep the manifests' ``video_hd_num`` (naming a video dataset is refused).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mllm_pipeline.storage import Storage
from mllm_pipeline.train.types import (Batch, DataConfig, DataError, TarMembers, media_on_device, pack_window, read_tar,
                                       window_batches)

#: the columns the loader reads from a manifest split
LOADER_COLUMNS = ["id", "dataset", "media_kind", "media_tar", "media_key", "media_ext", "width", "height",
                  "input_ids", "label_mask", "seq_len", "text_tokens", "media_tokens", "extra_media"]
#: the optional column of a sample's further media (several images, or images and a video, in one sample): a list of
#: these structs, each a member of the row's own ``media_tar`` (so the shard partition stays exact), in placeholder
#: order after the first medium (``media_kind`` / ``media_key`` / ``media_ext``)
EXTRA_MEDIA = pa.list_(pa.struct([("media_kind", pa.string()), ("media_key", pa.string()), ("media_ext", pa.string()),
                                  ("width", pa.int32()), ("height", pa.int32())]))
REQUIRED = ["id", "media_kind", "media_tar", "media_key", "media_ext", "input_ids", "label_mask", "seq_len"]


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True
    partition: bool = True  # False: every rank plans over every tar (validation)
    # True: media leave the workers as uint8 and batch_to_device HD-transforms them on the device (CUDA); False:
    # the workers HD-transform them on the CPU (the fallback without a GPU: the transform is then parallel over
    # the workers instead of serial in the training process)
    hd_on_device: bool = True


class ShardedData:
    """A manifest split as this rank's batches, media decoded by DataLoader workers from this rank's shards."""

    def __init__(self, storage: Storage, table: pa.Table, config: DataConfig, rank: int = 0, world_size: int = 1,
                 source: str = "train.parquet", loader: LoaderConfig | None = None):
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise DataError(f"{source}: manifest lacks column(s) {missing}")
        if table.num_rows == 0:
            raise DataError(f"{source}: the train split is empty: nothing to train on")
        self.storage, self.config, self.rank, self.world_size, self.source = storage, config, rank, world_size, source
        self.loader = loader or LoaderConfig()
        if self.loader.num_workers < 0 or self.loader.prefetch_factor < 1:
            raise DataError("num_workers must be >= 0 and prefetch_factor >= 1")
        self.table = table.select([c for c in LOADER_COLUMNS if c in table.column_names]).combine_chunks()
        n = self.table.num_rows
        kind = self.table["media_kind"].fill_null("")
        self.kind_code = np.zeros(n, dtype=np.int8)  # 0 text-only, 1 image, 2 video
        self.kind_code[pc.equal(kind, "image").to_numpy(zero_copy_only=False)] = 1
        self.kind_code[pc.equal(kind, "video").to_numpy(zero_copy_only=False)] = 2
        known = pc.is_in(kind, value_set=pa.array(["", "image", "video"])).to_numpy(zero_copy_only=False)
        if not known.all():
            i = int(np.flatnonzero(~known)[0])
            raise DataError(f"{source} row {i} ({self.table['id'][i]}): unknown media_kind {kind[i].as_py()!r}")
        tar = pc.dictionary_encode(self.table["media_tar"].fill_null("")).combine_chunks()
        self.tar_names: list[str] = tar.dictionary.to_pylist()
        self.tar_code = np.asarray(tar.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        self.n_extra = np.zeros((n, 2), dtype=np.int64)  # further images, videos per row
        if "extra_media" in self.table.column_names:
            ex = self.table["extra_media"]
            lengths = np.asarray(pc.list_value_length(ex).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
            seg = np.repeat(np.arange(n), lengths)
            kinds = pc.struct_field(pc.list_flatten(ex), "media_kind").fill_null("")
            for col, name in ((0, "image"), (1, "video")):
                self.n_extra[:, col] = np.bincount(seg[pc.equal(kinds, name).to_numpy(zero_copy_only=False)],
                                                   minlength=n)
            odd = np.flatnonzero(np.bincount(seg, minlength=n) != self.n_extra.sum(1))
            if len(odd):
                i = int(odd[0])
                raise DataError(f"{source} row {i} ({self.table['id'][i]}): extra_media kinds must be image or video")
        self.seq_len, self.hd = self._token_counts()
        self._check_rows()
        self._groups = self._shard_groups()
        self._plans: dict[int, list[list[list[int]]]] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    # -- rows ---------------------------------------------------------------------------------------------------
    def _token_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``seq_len`` per row (recomputed for images of datasets trained at another hd_num) and the hd_num of the
        row's images."""
        from mllm_pipeline.vision.hd import hd_token_count

        c = self.config
        seq = np.asarray(self.table["seq_len"].to_numpy(zero_copy_only=False), dtype=np.int64).copy()
        hd = np.full(len(seq), c.hd_num, dtype=np.int64)  # the hd_num of the row's images (videos: video_hd_num)
        by = dict(c.hd_num_by_dataset or {})
        if not by:
            return seq, hd
        for name in ("dataset", "width", "height", "text_tokens"):
            if name not in self.table.column_names:
                raise DataError(f"{self.source}: hd_num_by_dataset needs the manifest column {name!r}")
        ds = self.table["dataset"].fill_null("")
        for dataset, want in by.items():
            sel = pc.equal(ds, dataset).to_numpy(zero_copy_only=False)
            if (sel & (self.kind_code == 2)).any():
                raise DataError(f"{self.source}: hd_num_by_dataset names {dataset!r}, which holds videos; videos are "
                                f"trained at the manifests' video_hd_num={c.video_hd_num} (drop {dataset!r})")
            rows = np.flatnonzero(sel & (self.kind_code == 1))
            if not len(rows) or int(want) == c.hd_num:
                continue
            if self.n_extra[rows].any():
                raise DataError(f"{self.source}: hd_num_by_dataset[{dataset!r}] with samples of several media: their "
                                "token counts are not recomputed yet; build the manifests at that hd_num instead")
            w = self.table["width"].take(rows).to_numpy(zero_copy_only=False)
            h = self.table["height"].take(rows).to_numpy(zero_copy_only=False)
            text = self.table["text_tokens"].take(rows).to_numpy(zero_copy_only=False)
            cache: dict[tuple[int, int], int] = {}
            for j, i in enumerate(rows):
                k = (int(w[j]), int(h[j]))
                if k not in cache:
                    cache[k] = hd_token_count(k[0], k[1], int(want))
                seq[i] = int(text[j]) - 1 + cache[k]
            hd[rows] = int(want)
        return seq, hd

    def _check_rows(self) -> None:
        """One placeholder per media row, none in a text-only row, a tar for every media row (vectorised)."""
        c = self.config
        ids = self.table["input_ids"]
        flat = np.asarray(pc.list_flatten(ids).to_numpy(zero_copy_only=False))
        lengths = np.asarray(pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        n = len(lengths)
        seg = np.repeat(np.arange(n), lengths)

        def count(tid: int | None) -> np.ndarray:
            if tid is None:
                return np.zeros(n, dtype=np.int64)
            return np.bincount(seg[flat == tid], minlength=n)

        n_img, n_vid = count(c.image_token_id), count(c.video_token_id)
        want_img = (self.kind_code == 1).astype(np.int64) + self.n_extra[:, 0]
        want_vid = (self.kind_code == 2).astype(np.int64) + self.n_extra[:, 1]
        extra_without_first = np.flatnonzero((self.kind_code == 0) & (self.n_extra.sum(1) > 0))
        if len(extra_without_first):
            i = int(extra_without_first[0])
            raise DataError(f"{self.source} row {i} ({self.table['id'][i]}): extra_media in a row without media_kind")
        bad = np.flatnonzero((n_img != want_img) | (n_vid != want_vid))
        if len(bad):
            i = int(bad[0])
            kind = ("image", "video", "text")[[1, 2, 0].index(int(self.kind_code[i]))]
            raise DataError(f"{self.source} row {i} ({self.table['id'][i]}): a {kind} sample must hold "
                            f"{int(want_img[i])} <image> and {int(want_vid[i])} <video> token(s) (ids "
                            f"{c.image_token_id}/{c.video_token_id}), found {int(n_img[i])} and {int(n_vid[i])}; was "
                            "the manifest tokenized with the model's tokenizer?")
        no_tar = np.flatnonzero((self.kind_code > 0) & (np.asarray(self.tar_names, dtype=object)[self.tar_code] == ""))
        if len(no_tar):
            i = int(no_tar[0])
            raise DataError(f"{self.source} row {i} ({self.table['id'][i]}): no media_tar / media_key")

    def _shard_groups(self) -> list[np.ndarray]:
        """The shards a plan deals out: each tar's rows in member (key) order; text-only rows in chunks."""
        keys = self.table["media_key"].fill_null("")
        order = np.asarray(pc.sort_indices(pa.table({"t": self.tar_code, "k": keys, "i": np.arange(len(self))}),
                                           sort_keys=[("t", "ascending"), ("k", "ascending"), ("i", "ascending")]))
        codes = self.tar_code[order]
        cuts = np.flatnonzero(np.diff(codes)) + 1
        groups: list[np.ndarray] = []
        text_code = self.tar_names.index("") if "" in self.tar_names else -1
        for g in np.split(order, cuts):
            if self.tar_code[g[0]] == text_code:
                groups += [g[s:s + self.config.buffer_rows] for s in range(0, len(g), self.config.buffer_rows)]
            else:
                groups.append(g)
        return groups

    # -- the plan -----------------------------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        """Workers that get shards: ``num_workers``, at most the shards per rank (a unit needs a shard)."""
        return max(1, min(self.loader.num_workers, len(self._groups) // self.world_size))

    @property
    def units(self) -> int:
        return self.world_size * self.workers if self.loader.partition else 1

    def unit_plans(self, epoch: int) -> list[list[list[int]]]:
        """Per unit, its batches (row indices) of ``epoch``, each unit cut to the smallest unit's count."""
        if epoch in self._plans:
            return self._plans[epoch]
        c = self.config
        rng = np.random.default_rng([c.seed, epoch])
        order = rng.permutation(len(self._groups))
        load = np.zeros(self.units, dtype=np.int64)
        rows: list[list[int]] = [[] for _ in range(self.units)]
        for g in order:
            u = int(np.argmin(load))
            rows[u] += self._groups[g].tolist()
            load[u] += len(self._groups[g])
        plans = []
        for u in range(self.units):
            urng = np.random.default_rng([c.seed, epoch, 1 + u])
            batches: list[list[int]] = []
            for s in range(0, len(rows[u]), c.buffer_rows):
                window = rows[u][s:s + c.buffer_rows]
                batches += pack_window(window, self.seq_len, c.tokens_per_batch, urng) if c.packing \
                    else window_batches(window, self.seq_len, c.tokens_per_batch, urng)
            plans.append(batches)
        m = min(len(p) for p in plans)
        if not self.loader.partition:
            m -= m % self.world_size
        if m == 0:
            raise DataError(f"{self.source}: {len(self._groups)} shard(s) for {self.units} loader unit(s) "
                            f"({self.world_size} rank(s) x {self.workers} worker(s)) leave some unit without a batch; "
                            "use fewer num_workers or ranks, a lower tokens_per_batch, or more shards")
        self._plans = {epoch: [p[:m] for p in plans]}
        return self._plans[epoch]

    def plan(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` in global order (index ``k * world_size + r`` = rank r's k-th)."""
        plans = self.unit_plans(epoch)
        if not self.loader.partition:
            return plans[0]
        W, m = self.workers, len(plans[0])
        out = []
        for k in range(m * W):
            for r in range(self.world_size):
                out.append(plans[r * W + k % W][k // W])
        return out

    def batches_per_epoch(self) -> int:
        return len(self.plan(0))

    def rank_batches(self, epoch: int) -> list[tuple[int, list[int], int]]:
        """This rank's (global index, rows, unit) for ``epoch``, in order."""
        plans = self.unit_plans(epoch)
        if not self.loader.partition:
            return [(b, rows, 0) for b, rows in enumerate(plans[0]) if b % self.world_size == self.rank]
        W, m = self.workers, len(plans[0])
        return [(k * self.world_size + self.rank, plans[self.rank * W + k % W][k // W], self.rank * W + k % W)
                for k in range(m * W)]

    # -- streaming ----------------------------------------------------------------------------------------------
    def iterate(self, position: tuple[int, int] = (0, 0)) -> Iterator[Batch]:
        """This rank's batches from ``position`` on, forever; media as uint8 (see
        :func:`~mllm_pipeline.train.data.batch_to_device`). The stream runs epoch after epoch, so the DataLoader's
        workers are started once and live as long as the iterator."""
        lc = self.loader
        if lc.num_workers == 0 or not lc.partition:
            yield from _Stream(self, position, None)
            return
        # The DataLoader draws its workers' base seed when its iterator starts (at the first batch); from a generator
        # of its own, never the global RNG: a resumed run restores the global RNG from its checkpoint and then
        # starts the iterator, which would otherwise shift every later random draw (P-LoRA dropout) against the
        # uninterrupted run.
        generator = torch.Generator().manual_seed(int(np.random.default_rng(
            [self.config.seed, self.rank, position[0], position[1]]).integers(2**62)))
        loader = torch.utils.data.DataLoader(
            _Stream(self, position, None), batch_size=None, num_workers=self.workers,
            prefetch_factor=lc.prefetch_factor, generator=generator,
            pin_memory=lc.pin_memory and torch.cuda.is_available(), worker_init_fn=_limit_threads)
        yield from loader

    def batch(self, rows: list[int], position: tuple[int, int], fetch) -> Batch:
        t = self.table.take(pa.array(rows, pa.int64()))
        ids = t["id"].to_pylist()
        key, ext = t["media_key"].to_pylist(), t["media_ext"].to_pylist()
        extra = t["extra_media"].to_pylist() if "extra_media" in t.column_names else [None] * len(rows)
        media: list[Any] = []
        for j, i in enumerate(rows):
            kind = int(self.kind_code[i])
            if kind == 0:
                media.append(None)
                continue
            tar, member = self.tar_names[self.tar_code[i]], f"{key[j]}.{ext[j]}"
            first = self._decode(i, ids[j], kind, tar, member, fetch(i, tar, member), (t["width"][j].as_py(),
                                 t["height"][j].as_py()) if "width" in t.column_names else None)
            if not extra[j]:
                media.append(first)
                continue
            items = [first]
            for e in extra[j]:
                m = f"{e['media_key']}.{e['media_ext']}"
                items.append(self._decode(i, ids[j], 1 if e["media_kind"] == "image" else 2, tar, m,
                                          fetch(i, tar, m), (e["width"], e["height"])))
            media.append(items)
        seq = [int(self.seq_len[i]) for i in rows]
        out = Batch(
            ids=ids,
            input_ids=[torch.from_numpy(np.array(x.values.to_numpy(zero_copy_only=False), dtype=np.int64))
                       for x in t["input_ids"]],
            label_mask=[torch.from_numpy(np.asarray(x.values.to_numpy(zero_copy_only=False)) != 0)
                        for x in t["label_mask"]],
            media=media, tokens=sum(seq),
            padded_tokens=sum(seq) if self.config.packing else len(rows) * max(seq),
            position=position, pack=[list(range(len(rows)))] if self.config.packing else None,
            hd=[int(self.hd[i]) for i in rows], video_hd=self.config.video_hd_num)
        if not self.loader.hd_on_device:
            out.media, out.hd = media_on_device(out, torch.device("cpu")), None
        return out

    def _decode(self, i: int, sid: str, kind: int, tar: str, member: str, data: bytes,
                size: tuple[int, int] | None) -> torch.Tensor:
        from mllm_pipeline.vision.hd import hd_token_count
        from mllm_pipeline.vision.hd_torch import decode_image

        c = self.config
        try:
            if kind == 1:
                img = decode_image(data, key=member)
                if c.hd_num_by_dataset and size is not None:
                    w, h = size
                    if (w, h) != (img.shape[2], img.shape[1]):
                        raise DataError(f"{self.source} row {i} ({sid}): {member} in {tar} is {img.shape[2]}x"
                                        f"{img.shape[1]}, the manifest says {w}x{h}: its token count "
                                        f"({hd_token_count(w, h, int(self.hd[i]))}) would be wrong; rebuild the "
                                        "manifests")
                return img
            from mllm_pipeline.vision.frames import sample_frames

            n = c.video_frames
            sample = sample_frames(data, n=max(2, n), max_side=None, gray=False, name=f"{tar}:{member}")
            frames = sample.frames[:n] if n > 1 else sample.frames[:1]
            if len(frames) < n:
                frames = np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])
            return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.source} row {i} ({sid}): cannot decode {member} from {tar}: {e}") from None

    def read_tar(self, rel: str) -> Iterator[tuple[str, bytes]]:
        return read_tar(self.storage, rel, self.source)


def _limit_threads(_: int) -> None:
    torch.set_num_threads(1)  # one decode per worker process: the workers are the parallelism
    info = torch.utils.data.get_worker_info()
    data = getattr(info.dataset, "data", None) if info is not None else None
    if data is not None and not data.storage.local:
        # fsspec's async filesystems (s3fs) are not fork-safe: each worker opens its own
        data.storage = Storage(data.storage.root)


class _Stream(torch.utils.data.IterableDataset):
    """This rank's batches from a position on, forever. Under a DataLoader, worker ``i`` serves the unit whose
    batches are ``k % num_workers == (i + k0) % num_workers`` (``k0`` the first remaining batch), which is the
    order the DataLoader's round robin over its workers yields."""

    def __init__(self, data: ShardedData, position: tuple[int, int], worker: int | None):
        self.data, self.position, self.worker = data, position, worker

    def __iter__(self) -> Iterator[Batch]:
        d = self.data
        info = torch.utils.data.get_worker_info()
        epoch, g = self.position
        k0 = g // d.world_size if d.loader.partition else 0
        slot = None
        if info is not None:
            slot = (info.id + k0) % d.workers
        first = True
        while True:
            todo = [(b, rows) for b, rows, unit in d.rank_batches(epoch)
                    if (b >= g if first else True) and (slot is None or unit % d.workers == slot)]
            yield from self._epoch(epoch, todo)
            epoch, first = epoch + 1, False

    def _epoch(self, epoch: int, todo: list[tuple[int, list[int]]]) -> Iterator[Batch]:
        d = self.data
        need: Counter = Counter()
        member_of: dict[int, tuple[str, str]] = {}
        for _, rows in todo:
            t = d.table.take(pa.array(rows, pa.int64()))
            extra = t["extra_media"].to_pylist() if "extra_media" in t.column_names else [None] * len(rows)
            for i, k, e, more in zip(rows, t["media_key"].to_pylist(), t["media_ext"].to_pylist(), extra):
                if d.kind_code[i]:
                    member_of[i] = (d.tar_names[d.tar_code[i]], f"{k}.{e}")
                    need[member_of[i]] += 1
                    for x in more or []:
                        need[(member_of[i][0], f"{x['media_key']}.{x['media_ext']}")] += 1
        members = TarMembers(need, d.read_tar, d.source)

        def fetch(i: int, tar: str, member: str) -> bytes:
            return members.get(tar, member, f"row {i} ({d.table['id'][i]})")

        for b, rows in todo:
            yield d.batch(rows, (epoch, b), fetch)
        members.close()


__all__ = ["EXTRA_MEDIA", "LOADER_COLUMNS", "LoaderConfig", "ShardedData"]
