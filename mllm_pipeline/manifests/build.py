"""Join clean captions with media shards into tokenized training manifests, per split (the trainers' own files
are the exports' stage, written from these).

One manifest row is one (media, caption) pair. Columns:

=================  ==============================================================================================
``id``             ``<sample_id>#<caption_index>`` (unique; the LLaVA record id)
``sample_id``      the media sample (all its captions share it, and its split)
``dataset``        cc3m, coco, webvid, msrvtt, internvid
``split``          train / val / test (see :func:`assign_split`)
``media_kind``     image or video
``media_tar``      the webdataset tar holding the media, relative to the storage root
``media_key``      the sample's key inside that tar; the media file is ``<key>.<media_ext>``
``media_ext``      jpg, mp4 ...
``width/height``   the stored media's size, as the media shard recorded it
``frames``         frames the model samples from a video (0 for images)
``caption``        the clean caption (the answer)
``conversations``  the LLaVA / Video-LLaVA conversation as JSON
``input_ids``      token ids, with one placeholder id where the media goes
``label_mask``     1 where the loss applies (the answer and end-of-sequence), 0 on the prompt
``text_tokens``    ``len(input_ids)``
``media_tokens``   image tokens for the configured hd_num (video: all frames, with separators)
``seq_len``        ``text_tokens - 1 + media_tokens``, what the model sees
``truncated``      the answer was cut to fit ``max_seq_len``
``overlay_bbox``   WebVid in ``mask`` mode: the estimated watermark box [x0, y0, x1, y1] in pixels, else null
``task``           ``caption`` (the rows above) or ``qa``: an instruction sample from the raw ``qa`` pairs
=================  ==============================================================================================

Question/answer samples (``task == "qa"``, MSRVTT-QA): made from the raw shard's ``qa`` column, joined to the same
media as the video's captions. ``qa_samples`` = ``per_question`` gives one sample per pair (``id``
``<sample_id>#qa-<split>-<question id>``), ``turns`` one sample per video and split with every pair as a turn
(``<sample_id>#qa-<split>``), ``none`` none. ``conversations`` holds the turns (human: the placeholder and the
question, gpt: the answer), ``caption`` the answer (``turns``: the answers, one a line), and every answer is
supervised. The split is the question's own (``test`` / ``val`` are evaluation splits whatever the video's split
is; a ``train`` question follows its video's hash, so a video's captions and questions share a split). The
answers are not cleaned like captions (they are one-word labels).

Samples longer than ``max_seq_len`` are dropped or have their answer truncated, as configured; dropped ones go to
``rejected.parquet`` with the reason, never silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_pipeline.manifests.conversation import conversation, qa_conversation
from mllm_pipeline.manifests.tokenization import PromptCache, TokenizeConfig, tokenize_samples, tokenize_turns
from mllm_pipeline.storage import Storage, Version
from mllm_pipeline.vision.hd import hd_token_count

SPLITS = ("train", "val", "test")
#: source split names that are evaluation splits by default, kept as they are (MSR-VTT validate/test, COCO val ...)
EVAL_SPLITS = ("val", "validation", "validate", "test")

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()), ("sample_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()),
    ("media_kind", pa.string()), ("media_tar", pa.string()), ("media_key", pa.string()), ("media_ext", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("frames", pa.int32()), ("caption", pa.string()),
    ("conversations", pa.string()), ("input_ids", pa.list_(pa.int32())), ("label_mask", pa.list_(pa.int8())),
    ("text_tokens", pa.int32()), ("media_tokens", pa.int32()), ("seq_len", pa.int32()), ("truncated", pa.bool_()),
    ("overlay_bbox", pa.list_(pa.int32())), ("task", pa.string()),
])
#: ``task`` values: a caption sample (one caption, one answer) or an instruction sample from question/answer pairs
TASKS = ("caption", "qa")
QA_SAMPLES = ("per_question", "turns", "none")
REJECTED_SCHEMA = pa.schema([
    ("id", pa.string()), ("dataset", pa.string()), ("split", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("seq_len", pa.int32()),
])


@dataclasses.dataclass(frozen=True)
class ManifestConfig:
    tokenize: TokenizeConfig = TokenizeConfig()
    hd_num: int = 9  # image tokens are counted for this HD setting (the model's)
    video_frames: int = 8
    video_hd_num: int = 1  # per-frame hd_num for videos
    val_fraction: float = 0.01  # of samples whose source has no evaluation split
    test_fraction: float = 0.0
    split_salt: str = ""  # change to draw a different (still deterministic) split
    #: source split names that are evaluation splits: such a row goes to "test" when its name says test, else "val"
    eval_splits: tuple[str, ...] = EVAL_SPLITS
    qa_samples: str = "per_question"  # question/answer pairs: "per_question", "turns" (one sample a video), "none"

    def __post_init__(self) -> None:
        if self.qa_samples not in QA_SAMPLES:
            raise ValueError(f"qa_samples must be one of {', '.join(QA_SAMPLES)}, not {self.qa_samples!r}")
        for name in ("hd_num", "video_frames", "video_hd_num"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) must be in "
                             "[0, 1) and sum to less than 1")


def assign_split(sample_id: str, source_split: str | None, config: ManifestConfig) -> str:
    """The source's evaluation split when it has one (MSR-VTT's official splits, COCO val ...); otherwise a
    deterministic hash of the sample id (so every caption of one image lands in the same split)."""
    if source_split and source_split.lower() in config.eval_splits:
        return "test" if "test" in source_split.lower() else "val"
    h = hashlib.blake2b(f"{config.split_salt}{sample_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    if u < config.val_fraction:
        return "val"
    if u < config.val_fraction + config.test_fraction:
        return "test"
    return "train"


def video_token_count(width: int, height: int, frames: int, hd_num: int) -> int:
    """Tokens of a video: every frame through the HD path at ``hd_num``, one separator between frames."""
    return frames * hd_token_count(width, height, hd_num) + (frames - 1)


class ManifestWriter:
    """Streams (dataset, shard) batches into per-split Parquet manifests and LLaVA JSON, inside one version."""

    def __init__(self, storage: Storage, version: Version, tokenizer: Any, config: ManifestConfig):
        self.storage, self.version, self.tok, self.config = storage, version, tokenizer, config
        self.prompts = PromptCache(tokenizer, config.tokenize)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.files: dict[str, Any] = {}
        self.rejected: list[pa.Table] = []
        self.counts: Counter = Counter()
        self.seq_lens: list[np.ndarray] = []
        self.eval_out: dict[tuple[str, str], list[Any]] = {}  # (dataset, source split) -> [sample ids, captions]

    def _writer(self, split: str) -> pq.ParquetWriter:
        if split not in self.writers:
            self.files[split] = self.storage.open(self.version.rel(f"{split}.parquet"), "wb")
            self.writers[split] = pq.ParquetWriter(self.files[split], MANIFEST_SCHEMA, compression="zstd")
        return self.writers[split]

    def add(self, dataset: str, captions: pa.Table, media: pa.Table, raw: pa.Table) -> None:
        """``captions``: sample_id, caption_index, caption (the kept, clean captions of one shard);
        ``media``: sample_id, media_tar, media_key, media_ext, width, height (+ optional overlay_bbox) of the
        samples whose media is stored and usable; ``raw``: sample_id, split, media_kind."""
        bbox = (media["overlay_bbox"].combine_chunks() if "overlay_bbox" in media.column_names
                else pa.nulls(media.num_rows, pa.list_(pa.int32())))
        media = media.append_column("_media_row", pa.array(np.arange(media.num_rows, dtype=np.int64)))
        joined = (captions.select(["sample_id", "caption_index", "caption"])
                  .join(media.select(["sample_id", "media_tar", "media_key", "media_ext", "width", "height", "_media_row"]),
                        "sample_id", join_type="inner")
                  .join(raw.select(["sample_id", "split", "media_kind"]), "sample_id", join_type="inner")
                  .sort_by([("sample_id", "ascending"), ("caption_index", "ascending")]))
        self.counts[f"{dataset}.captions_without_media"] += captions.num_rows - joined.num_rows
        n = joined.num_rows
        self.counts["joined"] += n
        c = self.config
        if "qa" in raw.column_names and c.qa_samples != "none":
            self._add_qa(dataset, media, bbox, raw)
        if n == 0:
            return
        sid = joined["sample_id"].to_pylist()
        kinds = [str(k) for k in joined["media_kind"].to_pylist()]
        widths, heights = joined["width"].to_pylist(), joined["height"].to_pylist()
        media_tokens, frames = self._media_tokens(kinds, widths, heights)
        captions_list = joined["caption"].to_pylist()
        tokens = tokenize_samples(self.tok, sid, kinds, captions_list, media_tokens, c.tokenize, self.prompts)
        ids = [f"{s}#{i}" for s, i in zip(sid, joined["caption_index"].to_pylist())]
        splits = [assign_split(s, sp, c) for s, sp in zip(sid, joined["split"].to_pylist())]
        keys, exts = joined["media_key"].to_pylist(), joined["media_ext"].to_pylist()
        refs = [f"media/{dataset}/{k}.{e}" for k, e in zip(keys, exts)]
        convs = [conversation(i, k, r, cap, c.tokenize.template) for i, k, r, cap in zip(ids, kinds, refs, captions_list)]
        table = self._table(dataset, ids, sid, splits, kinds, joined, widths, heights, frames, captions_list, convs,
                            tokens, media_tokens, bbox.take(joined["_media_row"]), "caption")
        self._emit(dataset, table, convs, kinds, tokens, source_splits=joined["split"].to_pylist())

    def _media_tokens(self, kinds: list[str], widths: list[int], heights: list[int]) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        n = len(kinds)
        cache: dict[tuple[str, int, int], int] = {}
        media_tokens = np.empty(n, dtype=np.int64)
        frames = np.zeros(n, dtype=np.int32)
        for i, (k, w, h) in enumerate(zip(kinds, widths, heights)):
            key = (k, w, h)
            if key not in cache:
                cache[key] = (video_token_count(w, h, c.video_frames, c.video_hd_num) if k == "video"
                              else hd_token_count(w, h, c.hd_num))
            media_tokens[i] = cache[key]
            if k == "video":
                frames[i] = c.video_frames
        return media_tokens, frames

    def _table(self, dataset, ids, sid, splits, kinds, joined, widths, heights, frames, captions_list, convs, tokens,
               media_tokens, bbox, task) -> pa.Table:
        n = len(ids)
        return pa.table({
            "id": ids, "sample_id": sid, "dataset": [dataset] * n, "split": splits, "media_kind": kinds,
            "media_tar": joined["media_tar"], "media_key": joined["media_key"], "media_ext": joined["media_ext"],
            "width": pa.array(widths, pa.int32()), "height": pa.array(heights, pa.int32()), "frames": frames,
            "caption": captions_list, "conversations": [json.dumps(cv["conversations"], ensure_ascii=False) for cv in convs],
            "input_ids": tokens["input_ids"], "label_mask": tokens["label_mask"], "text_tokens": tokens["text_tokens"],
            "media_tokens": pa.array(media_tokens.astype(np.int32)), "seq_len": tokens["seq_len"],
            "truncated": tokens["truncated"], "overlay_bbox": bbox.cast(pa.list_(pa.int32())), "task": [task] * n,
        }, schema=MANIFEST_SCHEMA)

    def _add_qa(self, dataset: str, media: pa.Table, bbox: pa.Array, raw: pa.Table) -> None:
        """Instruction samples from the raw ``qa`` pairs of the samples whose media is usable (see the module doc)."""
        c = self.config
        raw = raw.filter(pc.is_valid(raw["qa"]))
        qa_col = raw["qa"]
        raw = raw.select(["sample_id", "split", "media_kind"]).append_column(
            "_raw_row", pa.array(np.arange(raw.num_rows, dtype=np.int64)))
        joined = (raw.join(media.select(["sample_id", "media_tar", "media_key", "media_ext", "width", "height", "_media_row"]),
                           "sample_id", join_type="inner")
                  .sort_by("sample_id"))
        joined_qa = qa_col.take(joined["_raw_row"]).to_pylist()
        self.counts[f"{dataset}.qa_without_media"] += (int(pc.sum(pc.list_value_length(qa_col)).as_py() or 0)
                                                       - sum(len(q) for q in joined_qa))
        rows: list[int] = []  # the joined row of each sample
        ids, splits, pairs = [], [], []
        for r, (sid, split, qa) in enumerate(zip(joined["sample_id"].to_pylist(), joined["split"].to_pylist(), joined_qa)):
            by_split: dict[str, list[dict[str, Any]]] = {}
            for q in qa:
                by_split.setdefault(q["split"] or split or "", []).append(q)
            for qsplit, qs in by_split.items():
                target = assign_split(sid, qsplit or split, c)
                groups = [[q] for q in qs] if c.qa_samples == "per_question" else [qs]
                for g in groups:
                    rows.append(r)
                    splits.append(target)
                    ids.append(f"{sid}#qa-{qsplit}-{g[0]['id']}" if c.qa_samples == "per_question" else f"{sid}#qa-{qsplit}")
                    pairs.append([(q["question"], q["answer"]) for q in g])
        if not rows:
            return
        take = pa.array(rows, pa.int64())
        sel = joined.take(take)
        sid = sel["sample_id"].to_pylist()
        kinds = [str(k) for k in sel["media_kind"].to_pylist()]
        widths, heights = sel["width"].to_pylist(), sel["height"].to_pylist()
        media_tokens, frames = self._media_tokens(kinds, widths, heights)
        tokens = tokenize_turns(self.tok, kinds, pairs, media_tokens, c.tokenize)
        refs = [f"media/{dataset}/{k}.{e}" for k, e in zip(sel["media_key"].to_pylist(), sel["media_ext"].to_pylist())]
        convs = [qa_conversation(i, k, ref, p, c.tokenize.template) for i, k, ref, p in zip(ids, kinds, refs, pairs)]
        answers = ["\n".join(a for _, a in p) for p in pairs]
        table = self._table(dataset, ids, sid, splits, kinds, sel, widths, heights, frames, answers, convs, tokens,
                            media_tokens, bbox.take(sel["_media_row"]), "qa")
        self.counts[f"{dataset}.qa_pairs"] += sum(len(p) for p in pairs)
        self._emit(dataset, table, convs, kinds, tokens, qa=True)

    def _emit(self, dataset: str, table: pa.Table, convs: list[dict[str, Any]], kinds: list[str], tokens: pa.Table,
              qa: bool = False, source_splits: list[str | None] | None = None) -> None:
        """Set the over-long samples aside, then write the others to their split's manifest and LLaVA JSON.
        ``source_splits``: each caption row's split as the source names it (evaluation rows are counted)."""
        c = self.config
        ids, splits = table["id"].to_pylist(), table["split"].to_pylist()
        over = tokens["overlength"].to_numpy(zero_copy_only=False)
        if over.any():
            idx = np.flatnonzero(over)
            self.rejected.append(pa.table({
                "id": [ids[i] for i in idx], "dataset": [dataset] * len(idx), "split": [splits[i] for i in idx],
                "reason": ["too_long"] * len(idx),
                "detail": [f"{int(table['seq_len'][i].as_py())} tokens > max_seq_len {c.tokenize.max_seq_len}"
                           + ("; the media alone does not fit" if c.tokenize.overlength == "truncate" and not qa else "")
                           for i in idx],
                "seq_len": pa.array(table["seq_len"].to_numpy()[idx]),
            }, schema=REJECTED_SCHEMA))
            self.counts["dropped_too_long"] += len(idx)
        self.counts["truncated"] += int(np.sum(tokens["truncated"].to_numpy(zero_copy_only=False)))
        keep = np.flatnonzero(~over)
        table = table.take(pa.array(keep))
        convs = [convs[i] for i in keep]
        self.seq_lens.append(table["seq_len"].to_numpy())
        split_arr = table["split"].to_pylist()
        for split in SPLITS:
            rows = [i for i, s in enumerate(split_arr) if s == split]
            if not rows:
                continue
            part = table.take(pa.array(rows, pa.int64()))
            self._writer(split).write_table(part)
            self.counts[f"{split}"] += len(rows)
            self.counts[f"{dataset}.{split}"] += len(rows)
            if qa:
                self.counts[f"{dataset}.qa.{split}"] += len(rows)
        # evaluation rows written, by source split (the manifests' metadata compares them with what came in)
        src = [source_splits[i] for i in keep] if source_splits is not None else []
        for s, sp in zip(table["sample_id"].to_pylist(), src):
            if sp and sp.lower() in c.eval_splits:
                self.eval_out.setdefault((dataset, sp), [set(), 0])
                self.eval_out[(dataset, sp)][0].add(s)
                self.eval_out[(dataset, sp)][1] += 1

    def close(self) -> dict[str, Any]:
        for w in self.writers.values():
            w.close()
        for f in self.files.values():
            f.close()
        rejected = pa.concat_tables(self.rejected) if self.rejected else REJECTED_SCHEMA.empty_table()
        with self.storage.open(self.version.rel("rejected.parquet"), "wb") as f:
            pq.write_table(rejected, f, compression="zstd")
        seq = np.concatenate(self.seq_lens) if self.seq_lens else np.zeros(0, dtype=np.int32)
        return {
            "splits": {s: self.counts.get(s, 0) for s in SPLITS},
            "by_dataset": {k: v for k, v in sorted(self.counts.items()) if "." in k},
            "joined": self.counts.get("joined", 0),
            "dropped_too_long": self.counts.get("dropped_too_long", 0),
            "truncated": self.counts.get("truncated", 0),
            "seq_len": _stats(seq),
            "files": sorted(f"{s}.parquet" for s in self.writers),
        }

    def seq_len_array(self) -> np.ndarray:
        return np.concatenate(self.seq_lens) if self.seq_lens else np.zeros(0, dtype=np.int32)


def _stats(x: np.ndarray) -> dict[str, Any]:
    if not len(x):
        return {"count": 0}
    q = np.percentile(x, [50, 90, 99])
    return {"count": int(len(x)), "mean": round(float(x.mean()), 1), "p50": int(q[0]), "p90": int(q[1]),
            "p99": int(q[2]), "max": int(x.max())}


def read_manifest_split(storage: Storage, split: str, prefix: str = "manifests", version: str | None = None,
                        columns: list[str] | None = None) -> pa.Table:
    """One split of the current manifests (or of the committed ``version``); ``columns``: only these (columns a
    manifest of an older schema lacks are left out, so the caller can name what is missing)."""
    version = version or storage.read_manifest(prefix)["version"]
    with storage.open(f"{prefix}/{version}/{split}.parquet") as f:
        pf = pq.ParquetFile(f)
        if columns is not None:
            have = set(pf.schema_arrow.names)
            columns = [c for c in columns if c in have]
        return pf.read(columns=columns)


def media_bytes(storage: Storage, media_tar: str, key: str, ext: str) -> bytes:
    """One sample's media from its shard (slow path for inspection; the training loader streams whole shards)."""
    with storage.open(media_tar, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
        for member in tf:
            if member.name == f"{key}.{ext}":
                return tf.extractfile(member).read()
    raise KeyError(f"{key}.{ext} is not in {media_tar}")

