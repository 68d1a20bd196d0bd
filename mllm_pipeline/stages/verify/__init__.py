"""Read back what a stage committed and compare it with what it was made from.

Each function here reads the *committed* outputs (the current version of a prefix, through
:class:`~mllm_pipeline.storage.Storage`) and the inputs they were made from, and counts again, on its own, without
calling the code that wrote them. It returns a :class:`Verdict`: passed or not, the counts it made, and the first
problems by name (the source file and line, the sample id, the tar member, the shard), so a failed check says what
is missing, not only that a total is off. The Dagster asset checks in ``mllm_pipeline.defs`` are thin wrappers.

* :func:`verify_raw` — every record of every source file is in the raw shards or in the quarantine, once;
* :func:`verify_media_shard` — every raw row of a media shard is in its status table once; every success has its
  media member in the tar, and it decodes;
* :func:`verify_caption_shard` — every caption of the raw shard is in ``kept`` or in ``rejected``, once;
* :func:`verify_quarantine_ceiling` — a raw version keeps rows, and sets aside no more than its ceiling;
* :func:`verify_manifests` — every kept caption with usable media is in a manifest split or set aside with a reason.

Reading is bounded in memory: Parquet files are read by row group and only the columns needed, tar files are
streamed member by member.
"""

from mllm_pipeline.stages.verify.captions import verify_caption_shard
from mllm_pipeline.stages.verify.manifests import verify_eval_splits, verify_manifests
from mllm_pipeline.stages.verify.media import verify_media_shard
from mllm_pipeline.stages.verify.raw import verify_quarantine_ceiling, verify_raw
from mllm_pipeline.stages.verify.verdict import Verdict, combine

__all__ = ["Verdict", "combine", "verify_caption_shard", "verify_eval_splits", "verify_manifests", "verify_media_shard", "verify_quarantine_ceiling", "verify_raw"]
