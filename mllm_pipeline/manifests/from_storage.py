"""The manifests from what the earlier stages committed on the storage root: clean captions (less the cross-shard
drops), media shards (WebVid as its watermark stage left it) and the raw shards' splits, shard by shard."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.download.shards import media_index, shard_index
from mllm_pipeline.manifests.build import ManifestConfig, ManifestWriter
from mllm_pipeline.manifests.tiny_tokenizer import train_tokenizer
from mllm_pipeline.manifests.tokenization import load_tokenizer
from mllm_pipeline.sources.common import read_raw_shards
from mllm_pipeline.storage import Storage, Version, read_parquet
from mllm_pipeline.text.shards import committed_shards, dedup_drops, read_kept
from mllm_pipeline.vision.watermark_shards import watermark_view

DEMO_VOCAB = 2048


def shard_inputs(storage: Storage, dataset: str, log: Any) -> list[str]:
    """Shards with both committed clean captions and a committed media shard (a warning names the others)."""
    caps = committed_shards(storage, dataset, "captions")
    media = set(committed_shards(storage, dataset, "media"))
    missing = [k for k in caps if k not in media]
    if missing:
        log.warning(f"{dataset}: {len(missing)} shard(s) have clean captions but no media yet (e.g. {missing[0]}); "
                    "materialize their media first")
    return [k for k in caps if k in media]


def tokenizer_for(storage: Storage, version: Version, source: str, datasets: list[str], log: Any) -> Any:
    """The configured tokenizer, or (``source`` empty: the demo) a small BPE trained on the clean captions and saved
    with the manifests under ``tokenizer/``."""
    if source:
        return load_tokenizer(source)
    texts: list[str] = []
    for ds in datasets:
        for key in committed_shards(storage, ds, "captions"):
            if len(texts) >= 200_000:
                break
            texts += read_kept(storage, ds, key, ["caption"])["caption"].to_pylist()
    with tempfile.TemporaryDirectory(prefix="mllm-tokenizer-") as tmp:
        train_tokenizer(texts or ["an empty corpus"], tmp, vocab_size=DEMO_VOCAB)
        for p in Path(tmp).iterdir():
            if p.is_file():
                storage.write_bytes(version.rel(f"tokenizer/{p.name}"), p.read_bytes())
        tok = load_tokenizer(tmp)
    log.warning("no tokenizer configured: trained a small BPE tokenizer on the captions (demo only). Set config "
                "'tokenizer' to your LLM's tokenizer (a local path or hub name) for real training.")
    return tok


def build_manifests(storage: Storage, version: Version, tok: Any, config: ManifestConfig, datasets: list[str],
                    log: Any) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """Write every split's manifest and the LLaVA JSON into ``version``. Returns the writer's summary, one row per
    input shard (captions before and after de-duplication, media stored and usable) and every sequence length."""
    writer = ManifestWriter(storage, version, tok, config)
    inputs: list[dict[str, Any]] = []
    for ds in datasets:
        drops = dedup_drops(storage, ds)
        if drops is None:
            log.warning(f"{ds}: captions_dedup has not run: duplicates across shards are not removed")
        gone = (pc.binary_join_element_wise(drops["sample_id"], drops["caption_index"].cast(pa.string()), "#")
                if drops is not None and drops.num_rows else None)
        raw_uris = read_raw_shards(storage, ds)
        for key in shard_inputs(storage, ds, log):
            caps = read_kept(storage, ds, key, ["sample_id", "caption_index", "caption"])
            n_caps = caps.num_rows
            if gone is not None:
                ids = pc.binary_join_element_wise(caps["sample_id"], caps["caption_index"].cast(pa.string()), "#")
                caps = caps.filter(pc.invert(pc.is_in(ids, gone)))
            media = media_index(storage, ds, key)
            n_media = media.num_rows
            note = ""
            if ds == "webvid":
                media, note = watermark_view(storage, key, media)
            raw = read_parquet(raw_uris[shard_index(key)], columns=["sample_id", "split", "media_kind"])
            raw = raw.set_column(1, "split", raw["split"].cast(pa.string())).set_column(2, "media_kind", raw["media_kind"].cast(pa.string()))
            writer.add(ds, caps, media, raw)
            inputs.append({"dataset": ds, "shard": key, "captions": n_caps, "after_dedup": caps.num_rows,
                           "media": n_media, "usable_media": media.num_rows, "note": note})
            log.info(f"[{ds} {key}] {caps.num_rows:,} caption(s), {media.num_rows:,} usable media {note}")
    summary = writer.close()
    return summary, inputs, writer.seq_len_array()
