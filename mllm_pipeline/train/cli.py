"""``python -m mllm_pipeline.train --storage-root ROOT --output DIR [--manifests manifests] [--config JSON|FILE]``

Runs the same under ``torchrun --nproc_per_node N -m mllm_pipeline.train ...`` (DDP; ``"fsdp": true`` in the
config shards the model with FSDP2, ``fully_shard`` per decoder layer and ViT block, instead). ``--config`` is a JSON object (or a file holding
one) of :class:`~mllm_pipeline.train.loop.TrainConfig` fields, e.g.
``{"stage": "sft", "max_steps": 1000, "model": {"vision": "openai/clip-vit-large-patch14-336", "llm": "..."}}``.

Under Dagster Pipes (``DAGSTER_PIPES_CONTEXT`` set, by the ``train_mllm`` asset) rank 0 opens the Pipes
connection: it logs progress, sends each logged step as a custom message (``{"step", "loss", "lr",
"tokens_per_s", ...}``) and a final ``{"summary": ...}`` message; the asset builds its metadata (loss curve,
throughput) from the output directory. Other ranks stay silent. With ``--tracking`` (JSON of
:class:`mllm_pipeline.tracking.TrackingSettings`) rank 0 also logs each logged step to W&B and / or TensorBoard
(``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``train/mfu``, ``train/max_memory_gib``,
``val/loss`` ...), with the run's configuration and manifests version, and writes where the run is to
``<output>/tracking.json``. Exit status: 0 done, 2 a configuration or
data error (printed as one line), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
    p.add_argument("--tracking", default="", help="W&B / TensorBoard settings as JSON (mllm_pipeline.tracking."
                   "TrackingSettings fields, e.g. {\"wandb\": true, \"mode\": \"offline\", \"tensorboard\": true}); "
                   "rank 0 logs every logged step there")
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


@contextmanager
def _tracker(args: argparse.Namespace, config: Any) -> Iterator[Any]:
    """Rank 0's W&B / TensorBoard run (None when ``--tracking`` turns neither on); its links go to
    ``<output>/tracking.json`` as soon as it starts."""
    from mllm_pipeline.tracking import Tracker, TrackingSettings, write_links
    from mllm_pipeline.train.loop import TrainError

    try:
        settings = TrackingSettings.from_json(args.tracking or "{}")
    except (ValueError, TypeError) as e:
        raise TrainError(f"--tracking: {e}") from None
    if not settings.enabled:
        yield None
        return
    settings = settings.for_run("train_mllm")
    cfg = {"train": config.to_dict(), "manifests_prefix": args.manifests, "manifests_version": args.manifests_version,
           "world_size": int(os.environ.get("WORLD_SIZE", "1")), "output": str(args.output)}
    with Tracker(settings, "train", cfg) as tracker:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        write_links(args.output, tracker.links())
        yield tracker


def _tracked(on_log: Any, tracker: Any) -> Any:
    from mllm_pipeline.tracking import training_metrics

    def log_both(rec: dict[str, Any]) -> None:
        tracker.log(training_metrics(rec), step=int(rec["step"]))
        on_log(rec)

    return log_both


def _finish_tracking(tracker: Any, output: str, summary: dict[str, Any]) -> None:
    """The run's resolved configuration (model, manifests version, precision) and its summary."""
    path = Path(output) / "train_config.json"
    if path.exists():
        resolved = json.loads(path.read_text())
        tracker.update_config({"model": resolved.get("model"), "manifests": resolved.get("manifests"),
                               "precision": resolved.get("precision"), "fingerprint": resolved.get("fingerprint")})
    tracker.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})


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

        tracker = None
        try:
            try:
                raw = _load_config(args.config)
            except ValueError as e:
                raise TrainError(str(e)) from None
            config = TrainConfig.from_dict(raw)
            if rank == 0:
                tracker = stack.enter_context(_tracker(args, config))
                if tracker is not None:
                    log(f"tracking: {json.dumps(tracker.links())}")
                    on_log = _tracked(on_log, tracker)
            log(f"training {config.stage} for {config.max_steps} steps -> {args.output}")
            summary = train(config, args.storage_root, args.output, manifests_prefix=args.manifests,
                            resume=not args.no_resume, on_log=on_log, manifests_version=args.manifests_version,
                            val_split=args.val_split, log=log)
            if rank == 0 and tracker is not None:
                _finish_tracking(tracker, args.output, summary)
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
