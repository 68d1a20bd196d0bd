"""The pipeline's stages: for each output, where it lives on the storage root, what it is made from, whether it is
up to date, and how it commits. One module per stage:

* :mod:`.raw` — raw shards of one dataset, named by the source files' content, the parser and its options;
* :mod:`.media` — one media shard (webdataset tar + status table) per raw shard: skip, retry the failed, commit;
* :mod:`.captions` — clean captions, one output per raw shard;
* :mod:`.media_hashes` — content and perceptual hashes, one table per media shard;
* :mod:`.dedup` — caption and media de-duplication across shards, datasets and evaluation splits;
* :mod:`.watermark` — WebVid watermark scores (and the masked / inpainted shard), one per media shard;
* :mod:`.manifests` — the tokenized training manifests, from the exact versions above;
* :mod:`.exports` — each trainer's files (and the media files they point at) from one manifests version;
* :mod:`.checkpoints` — a training run and its committed result;
* :mod:`.lineage` — pins and the retention rule that keeps whatever a kept version reads.

Beside them: :mod:`.registry`, the datasets every stage and the Dagster layer read; :mod:`.gate`, the checks every
commit passes before a new version becomes current; :mod:`.verify`, the read-back verifications the gate and the
asset checks run. The algorithms the stages call (``sources``, ``download``, ``text``, ``vision``, ``manifests``,
``exports``, ``model``, ``train``) know nothing of each other or of the storage layout; Dagster (``defs``) calls
the stages.
"""
