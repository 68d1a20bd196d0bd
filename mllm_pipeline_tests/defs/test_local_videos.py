"""Videos you already have, adopted through the real raw and media assets: WebVid from a folder of ``<videoid>.mp4``
and from an earlier video2dataset output, InternVid from its clips already cut. Counts are exact: adopted, not on
disk, a corrupt file as ``decode_error``; a re-run is up to date; adopted rows cause no HTTP request (the loopback
media server the rows' URLs point at counts them).

The video2dataset output is built as video2dataset 1.3.0 writes it (read in ``.venv-video2dataset``):
``video2dataset/data_writer.py`` ``WebDatasetSampleWriter.write`` (a sample is ``{"__key__", <ext>: stream, "txt":
caption, "json": json.dumps(meta, indent=4)}``, written by ``webdataset/writer.py`` ``TarWriter.write``: members
``<key>.<ext>`` in sorted order, mode 0o444, owner ``bigdata``; a ``<shard>.parquet`` of the metas beside it),
``video2dataset/workers/download_worker.py`` (``compute_key``: ``<shard * 10**oom_sample_per_shard + index>`` on
``oom_sample_per_shard + oom_shard_count`` digits; ``meta`` = the input columns, then ``key``, ``status``,
``error_message``, ``yt_meta_dict``, which is null for a direct file URL; a failed sample is written with no video,
``status: failed_to_download``), ``video2dataset/input_sharder.py`` (the columns are ``save_additional_columns`` +
``caption`` + ``url``, read from the CSV by pandas, so ``videoid`` is an integer) and ``video2dataset/logger.py``
(``<shard>_stats.json``), with the WebVid recipe of video2dataset's ``dataset_examples/WebVid.md``
(``--url_col contentUrl --caption_col name --save_additional_columns '[videoid,page_idx,page_dir,duration]'``,
1,000 samples a shard, ``oom_shard_count`` 5). InternVid's lines carry its own field names (``YoutubeID``,
``Start_timestamp``, ``End_timestamp``, ``Caption``, ``Aesthetic_Score``, ``UMT_Score``).
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllm_pipeline.defs.checks import ACCOUNTING_CHECKS
from mllm_pipeline.defs.ingest.assets import raw_internvid, raw_webvid
from mllm_pipeline.defs.media.assets import videos_internvid, videos_webvid
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.demo.generate import write_mp4
from mllm_pipeline.download.videos import video2dataset_python
from mllm_pipeline.stages.media import iter_shard, read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw, unavailable
from mllm_pipeline_tests.media_server import serve_directory
from mllm_pipeline_tests.metadata import table_column

WEBVID_COLUMNS = ["videoid", "contentUrl", "duration", "page_dir", "name", "page_idx"]
V2D_COLUMNS = ["videoid", "page_idx", "page_dir", "duration"]  # the recipe's --save_additional_columns
V2D_SAMPLES_PER_SHARD, V2D_OOM_SHARD_COUNT = 1000, 5


def _v2d_key(index: int, shard_id: int) -> str:
    """video2dataset's compute_key."""
    oom_sample_per_shard = math.ceil(math.log10(V2D_SAMPLES_PER_SHARD))
    return f"{10 ** oom_sample_per_shard * shard_id + index:0{oom_sample_per_shard + V2D_OOM_SHARD_COUNT}d}"


def write_video2dataset_shard(folder: Path, shard_id: int, samples: list[tuple[int, dict, bytes | None]]) -> None:
    """One shard of a video2dataset webdataset output: ``samples`` are (index in the input shard, the WebVid CSV
    row, the video or None for a failed download), written in the given (completion) order."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard_id:0{V2D_OOM_SHARD_COUNT}d}"
    metas = []
    with open(folder / f"{name}.tar", "wb") as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
        for index, row, video in samples:
            meta = {
                "videoid": int(row["videoid"]), "page_idx": int(row["page_idx"]), "page_dir": row["page_dir"],
                "duration": row["duration"], "caption": row["name"], "url": row["contentUrl"],
                "key": _v2d_key(index, shard_id),
                "status": "success" if video is not None else "failed_to_download",
                "error_message": None if video is not None else "HTTP Error 403: Forbidden",
                "yt_meta_dict": None,
            }
            sample = {"json": json.dumps(meta, indent=4).encode(), "txt": row["name"].encode()}
            if video is not None:
                sample["mp4"] = video
            for ext in sorted(sample):
                info = tarfile.TarInfo(f"{meta['key']}.{ext}")
                info.size, info.mtime, info.mode = len(sample[ext]), time.time(), 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(sample[ext]))
            metas.append(meta)
    schema = pa.schema([("videoid", pa.int64()), ("page_idx", pa.int64()), ("page_dir", pa.string()),
                        ("duration", pa.string()), ("caption", pa.string()), ("url", pa.string()),
                        ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())])
    pq.write_table(pa.Table.from_pylist([{k: m[k] for k in schema.names} for m in metas], schema), folder / f"{name}.parquet")
    ok = sum(v is not None for _, _, v in samples)
    (folder / f"{name}_stats.json").write_text(json.dumps({
        "count": len(samples), "successes": ok, "failed_to_download": len(samples) - ok, "failed_to_subsample": 0,
        "duration": 1.0, "bytes_downloaded": 0, "start_time": 0.0, "end_time": 1.0, "status_dict": {}}, indent=4))


def _webvid_csv(path: Path, base_url: str, ids: list[int]) -> list[dict]:
    rows = [{"videoid": str(v), "contentUrl": f"{base_url}/v/{v}.mp4", "duration": "PT00H00M04S",
             "page_dir": "027701_027750", "name": f"stock footage clip number {i} of a mountain road", "page_idx": str(27732 + i)}
            for i, v in enumerate(ids)]
    path.write_text(",".join(WEBVID_COLUMNS) + "\n" + "".join(",".join(r[c] for c in WEBVID_COLUMNS) + "\n" for r in rows))
    return rows


def _materialize(instance, assets, storage: Storage, config: dict, partition: str | None = None):
    asset = assets[0]
    name = asset.key.to_user_string()
    result = dg.materialize(
        [*assets, ACCOUNTING_CHECKS[name]], instance=instance, partition_key=partition,
        resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()},
        run_config={"ops": {asset.key.to_python_identifier(): {"config": config}}},
    )
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    accounted = "samples_accounted" if partition else "rows_accounted"  # (quarantine_rate only warns)
    assert checks[accounted], checks
    return result.asset_materializations_for_node(name)[0].metadata


def _status(storage: Storage, dataset: str) -> dict[str, tuple[str, str | None]]:
    t = read_status(storage, dataset, "shard-00000")
    return {s: (st, r) for s, st, r in zip(t["sample_id"].to_pylist(), t["status"].to_pylist(), t["reason"].to_pylist())}


IDS = [1053841541, 5641526, 1029304822, 31353427, 14781349, 1011101010, 1022202020, 1033303030]


@pytest.fixture
def webvid_on_disk(tmp_path):
    """Eight WebVid rows whose URLs all point at a loopback server: rows 0-1 in videos_dir, row 2 there but not a
    video, rows 3-4 in a video2dataset output (row 5 is there as a failed download, no video), rows 5-7 nowhere;
    the server has rows 5 and 6 (and every row's video, so a request for an adopted row would succeed and show)."""
    rng = random.Random(11)
    www, videos, v2d = tmp_path / "www", tmp_path / "videos", tmp_path / "v2d"
    for i, v in enumerate(IDS):
        if i != 7:
            write_mp4(www / f"v/{v}.mp4", 3, rng)
    for i in (0, 1):
        write_mp4(videos / f"{IDS[i]}.mp4", 2 + i, rng)
    (videos / f"{IDS[2]}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # an mp4 header, no video
    (videos / "notes.txt").write_text("not a video of any row\n")
    with serve_directory(www) as server:
        rows = _webvid_csv(tmp_path / "results_2M_train.csv", server.base_url, IDS)
        write_mp4(tmp_path / "src/3.mp4", 2, rng)
        write_mp4(tmp_path / "src/4.mp4", 3, rng)
        # completion order, as imap_unordered writes them; the CSV's rows 3, 4, 5 are the input's samples 0, 1, 2
        write_video2dataset_shard(v2d, 0, [(1, rows[4], (tmp_path / "src/4.mp4").read_bytes()), (2, rows[5], None),
                                           (0, rows[3], (tmp_path / "src/3.mp4").read_bytes())])
        storage = Storage(str(tmp_path / "root"))
        with dg.DagsterInstance.ephemeral() as instance:
            yield {"tmp": tmp_path, "server": server, "storage": storage, "instance": instance,
                   "csv": str(tmp_path / "results_2M_train.csv"), "videos": str(videos), "v2d": str(v2d)}


def _requested(server) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in server.paths)


def test_webvid_adopts_a_folder_and_a_video2dataset_output_and_fetches_only_the_rest(webvid_on_disk):
    w = webvid_on_disk
    try:
        video2dataset_python()
    except FileNotFoundError:
        unavailable("the video2dataset environment is not set up (scripts/setup.sh, or set MLLM_VIDEO2DATASET_PYTHON)")
    storage, instance = w["storage"], w["instance"]
    raw_config = {"paths": [w["csv"]], "videos_dir": w["videos"], "video2dataset_dir": w["v2d"]}
    md = _materialize(instance, [raw_webvid], storage, raw_config)
    assert (md["rows_in"].value, md["rows_kept"].value, md["rows_quarantined"].value) == (8, 8, 0)
    assert (md["media_on_disk"].value, md["media_not_on_disk"].value) == (5, 3)
    paths = dict(zip(*read_raw(storage, "webvid").select(["sample_id", "path"]).to_pydict().values()))
    assert paths[f"webvid-{IDS[0]}"] == f"{w['videos']}/{IDS[0]}.mp4"
    assert paths[f"webvid-{IDS[3]}"] == f"tar://00000000.mp4::{w['v2d']}/00000.tar"
    assert paths[f"webvid-{IDS[4]}"] == f"tar://00000001.mp4::{w['v2d']}/00000.tar"
    assert [paths[f"webvid-{v}"] for v in IDS[5:]] == [None, None, None]

    media_config = {"processes": 1, "threads": 2, "timeout_s": 10, "allow_loopback": True}
    md = _materialize(instance, [videos_webvid], storage, media_config, "shard-00000")
    assert (md["attempted"].value, md["succeeded"].value, md["failed"].value) == (8, 6, 2)
    status = _status(storage, "webvid")
    assert status[f"webvid-{IDS[2]}"] == ("failed", "decode_error")
    assert status[f"webvid-{IDS[7]}"] == ("failed", "http_404")
    assert [status[f"webvid-{v}"][0] for v in IDS[:2] + IDS[3:7]] == ["success"] * 6
    # the URLs of adopted rows were never requested: only the three rows not on disk were
    assert _requested(w["server"]) == sorted(f"{v}.mp4" for v in IDS[5:])
    # the adopted videos are the bytes on disk, from the folder and from the tar
    stored = {json.loads(f["json"])["sample_id"]: f["mp4"] for _, f in iter_shard(storage, "webvid", "shard-00000")}
    assert stored[f"webvid-{IDS[0]}"] == (w["tmp"] / f"videos/{IDS[0]}.mp4").read_bytes()
    assert stored[f"webvid-{IDS[3]}"] == (w["tmp"] / "src/3.mp4").read_bytes()

    seen = len(w["server"].paths)
    assert _materialize(instance, [raw_webvid], storage, raw_config)["up_to_date"].value is True
    assert _materialize(instance, [videos_webvid], storage, media_config, "shard-00000")["fetched_this_run"].value == 0
    assert len(w["server"].paths) == seen


def test_webvid_without_fetch_missing_sets_the_rest_aside_and_requests_nothing(webvid_on_disk):
    w = webvid_on_disk
    storage, instance = w["storage"], w["instance"]
    raw_config = {"paths": [w["csv"]], "video2dataset_dir": w["v2d"], "videos_dir": w["videos"], "fetch_missing": False}
    md = _materialize(instance, [raw_webvid], storage, raw_config)
    assert (md["rows_in"].value, md["rows_kept"].value, md["rows_quarantined"].value) == (8, 5, 3)
    assert (md["media_on_disk"].value, md["media_not_on_disk"].value) == (5, 3)
    assert sorted(r["reason"] for r in quarantine_rows(storage, "webvid")) == ["media_file_missing"] * 3

    md = _materialize(instance, [videos_webvid], storage, {"allow_loopback": True}, "shard-00000")
    assert (md["attempted"].value, md["succeeded"].value, md["failed"].value) == (5, 4, 1)
    assert "decode_error" in table_column(md["failed_by_reason"], "reason")
    assert _status(storage, "webvid")[f"webvid-{IDS[2]}"] == ("failed", "decode_error")
    assert w["server"].paths == []  # nothing was on the network: no video2dataset, no guard, no request

    # a video added to the folder is a new listing: a new raw version, and the shard (its rows changed) is adopted again
    write_mp4(w["tmp"] / f"videos/{IDS[6]}.mp4", 2, random.Random(3))
    md = _materialize(instance, [raw_webvid], storage, raw_config)
    assert md["up_to_date"].value is False and (md["media_on_disk"].value, md["media_not_on_disk"].value) == (6, 2)
    md = _materialize(instance, [raw_webvid], storage, raw_config)
    assert md["up_to_date"].value is True
    md = _materialize(instance, [videos_webvid], storage, {"allow_loopback": True}, "shard-00000")
    assert (md["attempted"].value, md["succeeded"].value) == (6, 5) and w["server"].paths == []


def _internvid_line(yid: str, start: str, end: str, caption: str) -> str:
    return json.dumps({"YoutubeID": yid, "Start_timestamp": start, "End_timestamp": end, "Caption": caption,
                       "Aesthetic_Score": 4.6, "UMT_Score": 0.45})


CLIPS = [("-0zpSGvCvEY", "00:00:20.400", "00:00:29.366"), ("-0zpSGvCvEY", "00:01:02.000", "00:01:05.500"),
         ("y3kI7PyTG-g", "00:00:02.149", "00:00:10.290"), ("y3kI7PyTG-g", "00:00:10.290", "00:00:21.119"),
         ("y3kI7PyTG-g", "00:00:21.119", "00:00:30.000"), ("bXsOywQ0KJU", "00:00:00.030", "00:00:11.400")]


def test_internvid_adopts_clips_already_cut(tmp_path):
    """Clips 0-3 are in clips_dir under the default name (clip 3 is not a video), clips 4-5 are not; without
    fetch_missing they are set aside. The URL template points at a loopback server, which sees no request."""
    rng = random.Random(5)
    clips = tmp_path / "clips"
    for yid, start, end in CLIPS[:3]:
        write_mp4(clips / f"{yid}_{start}_{end}.mp4", 2, rng)
    yid, start, end = CLIPS[3]
    (clips / f"{yid}_{start}_{end}.mp4").write_bytes(b"not a video at all")
    jsonl = tmp_path / "InternVid-10M-flt.jsonl"
    jsonl.write_text("".join(_internvid_line(*c, f"a person doing thing {i} outdoors") + "\n" for i, c in enumerate(CLIPS)))
    with serve_directory(tmp_path / "www") as server, dg.DagsterInstance.ephemeral() as instance:
        storage = Storage(str(tmp_path / "root"))
        raw_config = {"paths": [str(jsonl)], "clips_dir": str(clips), "fetch_missing": False,
                      "url_template": f"{server.base_url}/yt/{{id}}.mp4"}
        md = _materialize(instance, [raw_internvid], storage, raw_config)
        assert (md["rows_in"].value, md["rows_kept"].value, md["rows_quarantined"].value) == (6, 4, 2)
        assert (md["media_on_disk"].value, md["media_not_on_disk"].value) == (4, 2)
        assert sorted(r["reason"] for r in quarantine_rows(storage, "internvid")) == ["media_file_missing"] * 2
        raw = read_raw(storage, "internvid")
        assert f"{clips}/-0zpSGvCvEY_00:00:20.400_00:00:29.366.mp4" in raw["path"].to_pylist()

        md = _materialize(instance, [videos_internvid], storage, {"allow_loopback": True}, "shard-00000")
        assert (md["attempted"].value, md["succeeded"].value, md["failed"].value) == (4, 3, 1)
        status = _status(storage, "internvid")
        assert status["internvid-y3kI7PyTG-g-10290-21119"] == ("failed", "decode_error")
        stored = {json.loads(f["json"])["sample_id"]: (json.loads(f["json"]), f["mp4"])
                  for _, f in iter_shard(storage, "internvid", "shard-00000")}
        meta, data = stored["internvid--0zpSGvCvEY-20400-29366"]
        assert data == (clips / "-0zpSGvCvEY_00:00:20.400_00:00:29.366.mp4").read_bytes()  # not cut again
        assert (meta["clip_start_s"], meta["clip_end_s"], meta["captions"]) == (20.4, 29.366, ["a person doing thing 0 outdoors"])

        assert _materialize(instance, [raw_internvid], storage, raw_config)["up_to_date"].value is True
        assert _materialize(instance, [videos_internvid], storage, {"allow_loopback": True}, "shard-00000")["up_to_date"].value is True
        assert server.paths == []


def test_internvid_clip_name_pattern(tmp_path):
    """A pattern of its own (a folder per video, times in milliseconds) finds the same clips; a pattern that does
    not name one file per clip fails before anything is read."""
    clips = tmp_path / "clips"
    rng = random.Random(9)
    for yid, start, end in CLIPS[2:5]:
        ms = [round(sum(float(x) * m for x, m in zip(t.split(":"), (3600, 60, 1))) * 1000) for t in (start, end)]
        write_mp4(clips / yid / f"{ms[0]}-{ms[1]}.mp4", 2, rng)
    jsonl = tmp_path / "InternVid-10M-flt.jsonl"
    jsonl.write_text("".join(_internvid_line(*c, f"caption {i} of a clip") + "\n" for i, c in enumerate(CLIPS)))
    storage = Storage(str(tmp_path / "root"))
    with dg.DagsterInstance.ephemeral() as instance:
        md = _materialize(instance, [raw_internvid], storage, {"paths": [str(jsonl)], "clips_dir": str(clips),
                                                               "clip_name_pattern": "{youtube_id}/{start_ms}-{end_ms}.mp4"})
        assert (md["rows_kept"].value, md["media_on_disk"].value, md["media_not_on_disk"].value) == (6, 3, 3)
        raw = read_raw(storage, "internvid").to_pylist()
        assert {r["sample_id"]: r["path"] for r in raw if r["path"]} == {
            "internvid-y3kI7PyTG-g-2149-10290": f"{clips}/y3kI7PyTG-g/2149-10290.mp4",
            "internvid-y3kI7PyTG-g-10290-21119": f"{clips}/y3kI7PyTG-g/10290-21119.mp4",
            "internvid-y3kI7PyTG-g-21119-30000": f"{clips}/y3kI7PyTG-g/21119-30000.mp4"}
        assert all(r["url"] == f"https://www.youtube.com/watch?v={r['group_id']}" for r in raw)  # the rest is fetched

        for pattern in ("{youtube_id}.mp4", "{youtube_id}_{start}_{stop}.mp4", "{youtube_id}_{start:>8}_{end}.mp4"):
            result = dg.materialize(
                [raw_internvid], instance=instance, resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()},
                run_config={"ops": {"raw_internvid": {"config": {"paths": [str(jsonl)], "clips_dir": str(clips),
                                                                 "clip_name_pattern": pattern}}}},
                raise_on_error=False)
            assert not result.success
            failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error.message
            assert "clip_name_pattern" in failure and "Nothing was read or written" in failure, failure
