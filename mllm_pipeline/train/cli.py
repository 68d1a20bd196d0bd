"""``python -m mllm_pipeline.train --storage-root ROOT --output DIR [--manifests manifests] [--config JSON|FILE]``

Runs the same under ``torchrun --nproc_per_node N -m mllm_pipeline.train ...`` (DDP; ``"fsdp": true`` in the
config shards the model with FSDP2, ``fully_shard`` per decoder layer and ViT block, instead). ``--config`` is a JSON object (or a file holding
one) of :class:`~mllm_pipeline.train.loop.TrainConfig` fields, e.g.
``{"stage": "sft", "max_steps": 1000, "model": {"vision": "openai/clip-vit-large-patch14-336", "llm": "..."}}``.

Under Dagster Pipes (``DAGSTER_PIPES_CONTEXT`` set, by the ``train_mllm`` asset) rank 0 opens the Pipes
connection: it logs progress, sends each logged step as a custom message (``{"step", "loss", "lr",
"tokens_per_s", ...}``) and a final ``{"summary": ...}`` message; the asset builds its metadata (loss curve,
throughput) from the output directory. Other ranks stay silent. Exit status: 0 done, 2 a configuration or
data error (printed as one line), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mllm_pipeline.train", description="Train the MLLM on the manifests.")
    p.add_argument("--storage-root", default=None, help="storage root (default: $MLLM_STORAGE_ROOT, else ./data)")
    p.add_argument("--manifests", default="manifests", help="the manifests' prefix under the root")
    p.add_argument("--manifests-version", default=None, help="train on this committed version (default: the current one)")
    p.add_argument("--output", required=True, help="output directory (checkpoints, metrics, final model)")
    p.add_argument("--config", default="{}", help="TrainConfig as JSON, or a path to a JSON file")
    p.add_argument("--val-split", default="val", help="the split val_every evaluates (default: val)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming the latest checkpoint")
    return p.parse_args(argv)


def _load_config(text: str) -> dict[str, Any]:
    if not text.lstrip().startswith("{") and Path(text).exists():
        text = Path(text).read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config is neither a JSON object nor a file: {e}") from None
    if not isinstance(d, dict):
        raise ValueError("--config must be a JSON object")
    return d


def main(argv: list[str] | None = None) -> int:
    from mllm_pipeline.train.types import DataError
    from mllm_pipeline.train.loop import TrainConfig, TrainError, train

    args = _parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    with ExitStack() as stack:
        pipes = None
        if os.environ.get("DAGSTER_PIPES_CONTEXT") and rank == 0:
            from dagster_pipes import open_dagster_pipes

            pipes = stack.enter_context(open_dagster_pipes())

        def log(msg: str) -> None:
            if pipes is not None:
                pipes.log.info(msg)
            elif rank == 0:
                print(msg, flush=True)

        def on_log(rec: dict[str, Any]) -> None:
            msg = (f"step {rec['step']}: loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                   f"{rec['tokens_per_s']:.0f} tokens/s {rec['samples_per_s']:.2f} samples/s")
            if "mfu" in rec:
                msg += f" MFU {rec['mfu']:.1%}"
            log(msg)
            if pipes is not None:
                pipes.report_custom_message({k: v for k, v in rec.items()})

        try:
            try:
                raw = _load_config(args.config)
            except ValueError as e:
                raise TrainError(str(e)) from None
            config = TrainConfig.from_dict(raw)
            log(f"training {config.stage} for {config.max_steps} steps -> {args.output}")
            summary = train(config, args.storage_root, args.output, manifests_prefix=args.manifests,
                            resume=not args.no_resume, on_log=on_log, manifests_version=args.manifests_version,
                            val_split=args.val_split, log=log)
        except (TrainError, DataError) as e:
            if pipes is not None:
                pipes.log.error(str(e))
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and pipes is None:
            # one write per line: the ranks share the terminal / pipe
            sys.stdout.write(f"rank {rank} weights_checksum {summary.get('weights_checksum')!r}\n")
            sys.stdout.flush()
        if rank == 0:
            log(f"done: {json.dumps(summary)}")
            if pipes is not None:
                pipes.report_custom_message({"summary": summary})
    return 0
