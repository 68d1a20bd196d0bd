"""A range of image shards fetched by one img2dataset run (:class:`~mllm_pipeline.download.images.RangeDownload`),
each shard committed as soon as its rows are done: against the real img2dataset and a loopback server."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from mllm_pipeline.download.images import ImageFetcher, ImageOptions
from mllm_pipeline.stages.media import ShardJob, iter_shard, materialize_range, read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import write_raw_shard

FAST = dict(processes=1, threads=8, timeout_s=5, retries=0, allow_loopback=True, resize_mode="no")


class _Log:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg, *a, **kw):
        self.lines.append(str(msg))

    warning = error = debug = info


def _jobs(tmp_path, urls_by_shard, options):
    jobs = []
    for i, urls in enumerate(urls_by_shard):
        raw = write_raw_shard(tmp_path / f"raw/shard-{i:05d}.parquet", urls)
        jobs.append(ShardJob(f"shard-{i:05d}", dict(
            dataset="cc3m", shard_key=f"shard-{i:05d}", shard_index=i, raw_uri=raw, raw_version="v1",
            options=options.content_options(), rows_digest=f"rows-{i}-{len(urls)}")))
    return jobs


def test_many_small_shards_one_img2dataset_run_each_row_back_to_its_own_shard(tmp_path, image_server):
    """70 shards of 2 rows (every shard's sample ids are ``cc3m-0`` and ``cc3m-1``, as duplicate ids across shards
    of a real dump would be) in one img2dataset run: each URL is requested once, each stored image is the one its
    own row names (its size is that file's), one failure per 7th shard is counted in that shard only, and
    img2dataset starts once for the range (18 tasks of up to 8 rows, 4 shards each, not 70 worker pools)."""
    base = image_server.base_url
    urls_by_shard = []
    for s in range(70):
        second = f"{base}/img/missing-{s}.jpg" if s % 7 == 0 else f"{base}/img/{(2 * s + 1) % 30:03d}.jpg"
        urls_by_shard.append([f"{base}/img/{(2 * s) % 30:03d}.jpg", second])
    options = ImageOptions(**FAST)
    storage = Storage(str(tmp_path / "root"))
    log = _log = _Log()
    outcomes = list(materialize_range(storage, _jobs(tmp_path, urls_by_shard, options), ImageFetcher(options), log=log))

    assert [o.shard_key for o in outcomes] == [f"shard-{i:05d}" for i in range(70)]  # committed in shard order
    assert sum("img2dataset: one run for 140 URL(s) of 70 shard(s), in 18 task(s)" in line for line in _log.lines) == 1, [x for x in _log.lines if "one run" in x]
    requested = Counter(p for p in image_server.paths if p.startswith("/img/"))
    assert requested == Counter(u[len(base):] for urls in urls_by_shard for u in urls)  # each row's URL once
    for s, urls in enumerate(urls_by_shard):
        status = read_status(storage, "cc3m", f"shard-{s:05d}").sort_by("row")
        assert status["sample_id"].to_pylist() == ["cc3m-0", "cc3m-1"]
        want = ["success", "http_404" if s % 7 == 0 else "success"]
        assert [st if st == "success" else r for st, r in zip(status["status"].to_pylist(),
                                                              status["reason"].to_pylist())] == want
        for key, files in iter_shard(storage, "cc3m", f"shard-{s:05d}"):
            row = int(key.split("_")[1])
            i = int(urls[row].rsplit("/", 1)[1][:3])
            assert Image.open(io.BytesIO(files["jpg"])).size == (120 + 7 * i, 90 + 5 * i), (s, row)


def test_a_failure_while_committing_stops_img2dataset(tmp_path, image_server):
    """A shard that cannot be committed (here: its output is locked by another writer) ends the range: the error
    reaches the caller, img2dataset is stopped (its tasks not yet started are dropped, so most of the range's URLs
    are never requested), and the shard committed before it stays committed."""
    from mllm_pipeline.storage import ConcurrentWriteError

    class Locked(Storage):
        def new_version(self, prefix, *a, **kw):
            if prefix.endswith("shard-00001"):
                raise ConcurrentWriteError(f"{prefix} is being written by another run")
            return super().new_version(prefix, *a, **kw)

    base = image_server.base_url
    urls_by_shard = [[f"{base}/_fault/slow/0.3/img/{(20 * s + r) % 30:03d}.jpg" for r in range(20)] for s in range(10)]
    options = ImageOptions(**FAST)
    storage = Locked(str(tmp_path / "root"))
    done = []
    with pytest.raises(ConcurrentWriteError):
        for o in materialize_range(storage, _jobs(tmp_path, urls_by_shard, options), ImageFetcher(options), log=_Log()):
            done.append(o.shard_key)
    assert done == ["shard-00000"] and storage.exists("media/cc3m/shard-00000/_manifest.json")
    requested = sum(p.startswith("/_fault/slow") for p in image_server.paths)
    # 10 tasks of 20 rows (one per shard). Shard 1 fails as soon as shard 0 has committed (its lock is refused before
    # anything is read); at most the tasks in flight by then (1, perhaps 2 and 3) finish: 80 rows, of 200
    assert requested <= 80, requested
