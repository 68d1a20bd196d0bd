"""The training entry point: runs standalone (``python -m mllm_pipeline.train``), under ``torchrun`` (DDP / FSDP2)
or under Dagster Pipes (the ``train_mllm`` asset launches it).

* ``config.py``: ``TrainConfig``, the paper's presets, the learning-rate schedule.
* ``setup.py``: the manifests, the model (``init_from`` included), precision, memory estimate, DDP / FSDP2.
* ``types.py``: what the two loaders share: ``Batch``, ``DataConfig``, ``DataError``, the window batching, the tar
  streaming, the on-device HD transform of uint8 media.
* ``data.py``: manifest rows -> packed (or length-grouped) batches, media streamed from the webdataset tars (the
  thread loader, ``batch_to_device``).
* ``loader.py``: the worker loader (the default): DataLoader workers over each rank's own shards, uint8 media
  HD-transformed on the device, text-only and multi-turn rows, ``hd_num`` per dataset.
* ``checkpoint.py``: checkpoints (safetensors, or sharded torch.distributed.checkpoint) and exact resume.
* ``metrics.py``: FLOPs / MFU, the metrics file, the summary and the loss check.
* ``loop.py``: the loop itself (accumulation, bf16 autocast, validation).
* ``cli.py``: the command line (and the Pipes reporting when ``DAGSTER_PIPES_CONTEXT`` is set).
"""

from mllm_pipeline.train.checkpoint import latest_checkpoint
from mllm_pipeline.train.config import PRESETS, TrainConfig, TrainError
from mllm_pipeline.train.data import ManifestData
from mllm_pipeline.train.loader import LoaderConfig, ShardedData
from mllm_pipeline.train.loop import train
from mllm_pipeline.train.metrics import PEAK_BF16_TFLOPS, loss_check, read_metrics, summarize
from mllm_pipeline.train.types import Batch, DataConfig, DataError

__all__ = ["Batch", "DataConfig", "DataError", "LoaderConfig", "ManifestData", "ShardedData", "PEAK_BF16_TFLOPS", "PRESETS", "TrainConfig",
           "TrainError", "latest_checkpoint", "loss_check", "read_metrics", "summarize", "train"]
