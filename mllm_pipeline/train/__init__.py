"""The training entry point: runs standalone (``python -m mllm_pipeline.train``), under ``torchrun`` (DDP / FSDP)
or under Dagster Pipes (the ``train_mllm`` asset launches it).

* ``data.py``: manifest rows -> token-budget batches, media streamed from the webdataset tars.
* ``loop.py``: ``TrainConfig``, the loop (AdamW + warmup/cosine, accumulation, bf16 autocast), checkpoints with
  exact resume, metrics (loss, lr, tokens/s, samples/s, MFU on CUDA).
* ``cli.py``: the command line (and the Pipes reporting when ``DAGSTER_PIPES_CONTEXT`` is set).
"""

from mllm_pipeline.train.data import Batch, DataConfig, DataError, ManifestData
from mllm_pipeline.train.loop import (
    PEAK_BF16_TFLOPS,
    TrainConfig,
    TrainError,
    latest_checkpoint,
    loss_check,
    read_metrics,
    summarize,
    train,
)

__all__ = ["Batch", "DataConfig", "DataError", "ManifestData", "PEAK_BF16_TFLOPS", "TrainConfig", "TrainError",
           "latest_checkpoint", "loss_check", "read_metrics", "summarize", "train"]
