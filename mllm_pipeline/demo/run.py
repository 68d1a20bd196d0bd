"""Run the pipeline on the embedded demo with the Dagster CLI, stage by stage: ``python -m mllm_pipeline.demo.run``.

The demo is an ordinary user: it generates its corpus (files in each dataset's official layout), writes the run
config files a user would write (the files' paths for the raw assets, ``allow_loopback: true`` for the media
assets, since its media server listens on 127.0.0.1), serves its media for the duration, and runs:

1. ``dagster job execute -j demo_pipeline -c raw.yaml``: the raw annotations of all datasets. The raw
   assets register one partition per raw shard.
2. ``dagster asset materialize --select <assets> --partition-range shard-00000...shard-NNNNN`` for each dataset:
   its per-shard stages (media download, clean captions, and for WebVid the watermark stage) over all its shards,
   in one run.
3. ``dagster asset materialize --select media_hashes,captions_dedup,manifests,export_media,export_videochat2,...,train_mllm
   -c final.yaml``: the cross-shard stages: the manifests, their exports for VideoChat2, InternLM-XComposer2, InternVL
   and LLaVA, and a model trained on them. Like any user, the demo names its tokenizer and its model in the run
   config: a small BPE tokenizer it trains on its own captions once (``<demo dir>/tokenizer``), and ``tiny: true``
   (a small random model).

Every command is printed before it runs, so the same commands can be reused on real data. Running it again with
nothing changed costs one check per output ("up to date" in the logs): nothing is fetched or rebuilt. Extra
arguments go to ``dagster job execute``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

MODULE = "mllm_pipeline.definitions"

#: (assets, partitions definition) in the order they run: each dataset's per-shard stages, in one run per dataset
PARTITIONED_STAGES = [
    ("images_cc3m,captions_cc3m", "cc3m_shards"),
    ("images_coco,captions_coco", "coco_shards"),
    ("videos_webvid,captions_webvid,webvid_watermark", "webvid_shards"),
    ("videos_msrvtt,captions_msrvtt", "msrvtt_shards"),
    ("videos_internvid,captions_internvid", "internvid_shards"),
    ("images_cc3m_wds,captions_cc3m_wds", "cc3m_wds_shards"),
]
#: the cross-shard stages, after every shard is done
FINAL_STAGES = ("media_hashes,captions_dedup,manifests,export_media,export_videochat2,export_ixc2,export_internvl,export_llava,"
                "train_mllm")


def write_configs(directory: Path, out: Path) -> dict[str, Path]:
    """The run config files of the demo (raw.yaml and one media.yaml per dataset stage) in ``out``."""
    import yaml

    from mllm_pipeline.demo.config import MEDIA_ASSETS, media_run_config, raw_run_config

    out.mkdir(parents=True, exist_ok=True)
    files = {"raw": out / "raw.yaml"}
    files["raw"].write_text(yaml.safe_dump(raw_run_config(directory)))
    for assets, name in PARTITIONED_STAGES:
        media = [a for a in assets.split(",") if a in MEDIA_ASSETS]  # the ones that fetch from the media server
        files[name] = out / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(media_run_config(media)))
    return files


#: the demo tokenizer's vocabulary (a small BPE trained on the demo's captions)
DEMO_VOCAB = 2048


def ensure_demo_tokenizer(storage, directory: Path) -> Path:
    """The demo's tokenizer: trained once on the captions of the committed raw shards, then reused (so a second run
    finds its manifests up to date)."""
    from mllm_pipeline.demo.tokenizer import train_tokenizer
    from mllm_pipeline.sources.common import raw_shards
    from mllm_pipeline.stages.registry import DATASET_NAMES
    from mllm_pipeline.storage import read_parquet

    out = directory / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    texts: list[str] = []
    for name in DATASET_NAMES:
        try:
            shards = raw_shards(storage, name)
        except FileNotFoundError:
            continue
        for shard in shards:
            texts += [c for caps in read_parquet(shard.uri, ["captions"])["captions"].to_pylist() for c in caps or []]
    print(f"training the demo's tokenizer on {len(texts):,} captions -> {out}", flush=True)
    partial = directory / "tokenizer.partial"  # renamed into place once complete: a killed run leaves no half of it
    shutil.rmtree(partial, ignore_errors=True)
    train_tokenizer(texts or ["an empty corpus"], partial, vocab_size=DEMO_VOCAB)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def final_run_config(tokenizer: Path) -> dict:
    """The cross-shard stages' config: the tokenizer the manifests count tokens with, and the model to train."""
    return {"ops": {"manifests": {"config": {"tokenizer": str(tokenizer)}}, "train_mllm": {"config": {"tiny": True}}}}


def _run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    import dagster as dg

    from mllm_pipeline.demo.paths import PrintLog, demo_dir, demo_media_served, ensure_demo_corpus
    from mllm_pipeline.storage import Storage

    argv = list(sys.argv[1:] if argv is None else argv)
    storage = Storage()
    ensure_demo_corpus(storage)
    directory = demo_dir(storage)
    configs = write_configs(directory, directory / "run_config")
    print(f"demo corpus in {directory}; run config files in {directory / 'run_config'}")
    with demo_media_served(storage, PrintLog()):
        _run(["dagster", "job", "execute", "-m", MODULE, "-j", "demo_pipeline", "-c", str(configs["raw"]), *argv])
        with dg.DagsterInstance.get() as instance:
            ranges = {name: instance.get_dynamic_partitions(name) for _, name in PARTITIONED_STAGES}
        for asset, name in PARTITIONED_STAGES:
            keys = ranges[name]
            if not keys:
                print(f"\n{asset}: no {name} partitions yet (its raw asset has no shards); skipped")
                continue
            _run(["dagster", "asset", "materialize", "-m", MODULE, "--select", asset,
                  "--partition-range", f"{keys[0]}...{keys[-1]}", "-c", str(configs[name])])
        import yaml

        final = directory / "run_config" / "final.yaml"
        final.write_text(yaml.safe_dump(final_run_config(ensure_demo_tokenizer(storage, directory))))
        _run(["dagster", "asset", "materialize", "-m", MODULE, "--select", FINAL_STAGES, "-c", str(final)])
    from mllm_pipeline.demo.summary import main as summary

    return summary([])


if __name__ == "__main__":
    sys.exit(main())
