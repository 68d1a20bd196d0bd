"""Each export read by its trainer's own loading rules (:mod:`mllm_pipeline_tests.exports.trainers`, transcribed
from each trainer's source at a named commit): every record must open its media where the trainer resolves it,
carry the manifest's text, and add up to the manifest's counts; multi-turn question-answer rows and videos
included. Then the exports are copied elsewhere and pointed at their new place with their own ``locate.py``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pytest

from mllm_pipeline.exports.formats import InternVL, Context, thousands
from mllm_pipeline.manifests import media_bytes
from mllm_pipeline.manifests.conversation import DEFAULT_VIDEO_INSTRUCTIONS
from mllm_pipeline.stages.exports import ExportConfig, build_export
from mllm_pipeline.stages.media import media_index
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.exports import trainers

SPLITS = ("train", "val", "test")


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _manifest_rows(storage: Storage, man) -> list[dict]:
    rows = []
    for split in SPLITS:
        rel = f"manifests/{man['version']}/{split}.parquet"
        if storage.exists(rel):
            for r in storage.read_parquet(rel).to_pylist():
                r["split"] = split
                rows.append(r)
    return rows


def _expected(storage: Storage, man, kinds=("image", "video")) -> dict[tuple[str, str], Counter]:
    """(split, dataset) -> Counter of (answer, sha256 of the media bytes in the committed shard)."""
    out: dict[tuple[str, str], Counter] = {}
    for r in _manifest_rows(storage, man):
        if r["media_kind"] not in kinds:
            continue
        answer = json.loads(r["conversations"])[-1]["value"]
        data = media_bytes(storage, r["media_tar"], r["media_key"], r["media_ext"])
        out.setdefault((r["split"], r["dataset"]), Counter())[(answer, hashlib.sha256(data).hexdigest())] += 1
    return out


def _by_name(samples, split_of_name) -> dict[tuple[str, str], Counter]:
    out: dict[tuple[str, str], Counter] = {}
    for s in samples:
        dataset, split = split_of_name(s)
        out.setdefault((split, dataset), Counter())[(s["answer"], _sha(s["media"][0]))] += 1
    return out


def _loc(export) -> Path:
    return Path(export["location"])


# -- VideoChat2 ----------------------------------------------------------------------------------------------


def test_videochat2_loads_in_its_trainer(built):
    storage, man, exports, _, _ = built
    samples = trainers.videochat2_load(str(_loc(exports["videochat2"]) / "videochat2_data.py"))
    expected = _expected(storage, man)
    for group in ("pretrain_corpus", "instruction_corpus"):
        got = _by_name([s for s in samples if s["group"] == group], lambda s: tuple(s["name"].rsplit("_", 1)))
        assert got == expected, group
    # the question-answer row exports as QA turns; caption rows as an instruction with an empty question
    qa = [s["qa"] for s in samples if s["group"] == "instruction_corpus" and s["name"] == "msrvtt_train" and len(s["qa"]) == 2]
    assert qa == [[{"i": "Watch the video carefully and answer the question.", "q": "what is the man doing?", "a": "cooking"},
                   {"i": "Watch the video carefully and answer the question.", "q": "where is he?", "a": "in a kitchen"}]]
    single = [s["qa"][0] for s in samples if s["group"] == "instruction_corpus" and s["kind"] == "video" and len(s["qa"]) == 1]
    assert single and all(t["q"] == "" and t["i"] in DEFAULT_VIDEO_INSTRUCTIONS for t in single)


# -- InternLM-XComposer --------------------------------------------------------------------------------------


def test_ixc2_loads_with_given_num_exact_counts(built):
    storage, man, exports, _, _ = built
    e = exports["ixc2"]
    got: dict[tuple[str, str], Counter] = {}
    for split in SPLITS:
        txt = _loc(e) / "ixc2" / f"data_{split}.txt"
        if not txt.exists():
            continue
        samples = trainers.ixc2_load(str(txt))
        for s in samples:
            assert s["given"] == s["held"] and s["multimodal"]  # --given_num True keeps every record, once
            dataset = Path(s["file"]).stem.rsplit("_", 1)[0]
            got.setdefault((split, dataset), Counter())[(s["answer"], _sha(s["media"][0]))] += 1
    assert got == _expected(storage, man, kinds=("image",))
    assert (_loc(e) / "ixc2/data.txt").read_text() == (_loc(e) / "ixc2/data_train.txt").read_text()
    multi = [s for s in trainers.ixc2_load(str(_loc(e) / "ixc2/data.txt")) if s["turns"] == 4]
    assert len(multi) == 1 and multi[0]["text"].count("[UNUSED_TOKEN_146]user\n") == 2
    skipped = e["summary"]["skipped"]
    assert {(s["split"], s["dataset"], s["rows"]) for s in skipped} == {("train", "msrvtt", 2), ("test", "msrvtt", 1)}
    assert all("reads no video" in s["why"] for s in skipped)


def test_ixc2_data_txt_counts_survive_the_trainers_arithmetic():
    """``int(float(n) * 1000)`` (InternLM-XComposer-2.0/finetune/finetune.py, ``--given_num True``) gives back every
    count 0..100,000 that ``data.txt`` states; the plain three-decimal form loses one sample for 741 of them."""
    assert all(trainers.ixc2_given_num(thousands(n)) == n for n in range(100_001))
    assert sum(trainers.ixc2_given_num(f"{n / 1000:.3f}") != n for n in range(1, 100_001)) == 741
    assert thousands(41) == "0.041" and thousands(1000) == "1"


def test_ixc25_takes_videos_as_one_picture_of_their_frames(built):
    storage, man, _, _, log = built
    e, _ = build_export(storage, "ixc2", ExportConfig(ixc2_video="composite", video_frames=4), log)
    samples = trainers.ixc2_load(str(_loc(e) / "ixc2/data.txt"))
    videos = [s for s in samples if "/composite/msrvtt/" in s["media"][0]]
    assert len(videos) == 2 and not e["summary"]["skipped"]
    # the IXC-2.5 layout: 128x72 landscape frames scaled to 1120 wide, stacked under 40-pixel label bands
    w, h = trainers.open_picture(videos[0]["media"][0])
    assert (w, h) == (1120, 4 * (630 + 10 + 40))
    assert {"prefix": e["inputs"][-1]["prefix"], "version": e["inputs"][-1]["version"]} in e["inputs"]
    assert any(r["prefix"].startswith("exports/media/composite/msrvtt/") for r in e["inputs"])


# -- InternVL ------------------------------------------------------------------------------------------------


def test_internvl_loads_videos_as_frames_within_its_token_limit(built):
    storage, man, exports, _, _ = built
    e = exports["internvl"]
    rows = {(r["split"], r["dataset"], json.loads(r["conversations"])[-1]["value"]): r for r in _manifest_rows(storage, man)}
    got: dict[tuple[str, str], Counter] = {}
    for split in SPLITS:
        meta = _loc(e) / "internvl" / f"meta_{split}.json"
        if not meta.exists():
            continue
        for s in trainers.internvl_load(str(meta)):
            dataset = s["name"].rsplit("_", 1)[0]
            row = rows[(split, dataset, s["answer"])]
            if row["media_kind"] == "video":
                n = len(s["media"])
                assert 2 <= n <= 8 and s["image_tokens"] == n * 256
                assert s["turns"][0]["value"].startswith("\n".join(f"Frame-{i + 1}: <image>" for i in range(n)) + "\n")
                assert all(f"/{row['media_key']}/" in p for p in s["media"])
                key = (s["answer"], f"frames of {row['media_key']}")
            else:
                key = (s["answer"], _sha(s["media"][0]))
            got.setdefault((split, dataset), Counter())[key] += 1
    expected = _expected(storage, man, kinds=("image",))
    for r in _manifest_rows(storage, man):
        if r["media_kind"] == "video":
            expected.setdefault((r["split"], r["dataset"]), Counter())[(json.loads(r["conversations"])[-1]["value"], f"frames of {r['media_key']}")] += 1
    assert got == expected
    assert not e["summary"]["skipped"]


def test_internvl_frame_count_must_fit_its_sequence_limit():
    with pytest.raises(ValueError, match="video_frames 32 give up to 8192 image tokens.*max_seq_length 8192"):
        ExportConfig(video_frames=32)
    ExportConfig(video_frames=16)  # 4,096 image tokens: half of 8,192 leaves the text its room
    # a record whose text would push the image tokens past the limit is skipped and counted, not cut by the trainer
    ctx = Context("/m", "/e", set(), {"image": "", "video": ""}, lambda rel: open(os.devnull, "wb"),
                  options=ExportConfig(internvl_max_seq_length=4096))
    row = {"id": "x", "dataset": "msrvtt", "media_kind": "video", "rel": "v.mp4", "frames": [f"f/{i}.jpg" for i in range(8)],
           "turns": [{"from": "human", "value": "<video>\n" + "why? " * 500}, {"from": "gpt", "value": "because"}]}
    assert "max_seq_length 4096" in InternVL().add(ctx, "train", row)
    row["turns"][0]["value"] = "<video>\nwhy?"
    assert InternVL().add(ctx, "train", row) is None


# -- LLaVA / Video-LLaVA -------------------------------------------------------------------------------------


def test_llava_finetune_and_pretraining_files_load(built):
    storage, man, exports, _, _ = built
    e = exports["llava"]
    media = e["summary"]["media_root"]
    datasets = {r["id"]: (r["split"], r["dataset"]) for r in _manifest_rows(storage, man)}
    got: dict[tuple[str, str], Counter] = {}
    for split in SPLITS:
        p = _loc(e) / "llava" / f"{split}_images.json"
        if p.exists():
            for s in trainers.llava_load(str(p), media, version="v1"):
                got.setdefault(datasets[s["id"]], Counter())[(s["answer"], _sha(s["media"][0]))] += 1
            pre = trainers.llava_load(str(_loc(e) / "llava" / f"pretrain_{split}_images.json"), media, version="plain")
            assert all(s["turns"] == 2 for s in pre)
    assert got == _expected(storage, man, kinds=("image",))
    # the multi-turn row is in the finetuning file only: the plain template asserts two turns
    with pytest.raises(AssertionError, match="two turns"):
        trainers.llava_load(str(_loc(e) / "llava/train_images.json"), media, version="plain")
    assert e["summary"]["left_out"] == [{"note": "llava: rows of more than two turns, left out of the pretraining files "
                                                 "(--version plain takes two)", "rows": 2}]


def test_videollava_loads_images_and_videos(built):
    storage, man, exports, _, _ = built
    e = exports["llava"]
    media = e["summary"]["media_root"]
    files = [str(_loc(e) / "llava" / f"train_{k}.json") for k in ("images", "videos")]
    samples = trainers.videollava_load(files, media, media)
    datasets = {r["id"]: r["dataset"] for r in _manifest_rows(storage, man)}
    got = Counter((datasets[s["id"]], s["answer"], _sha(s["media"][0])) for s in samples)
    exp = Counter((d, a, h) for (split, d), c in _expected(storage, man).items() if split == "train" for (a, h), n in c.items() for _ in range(n))
    assert got == exp


# -- bookkeeping ---------------------------------------------------------------------------------------------


def test_exports_name_their_manifests_and_share_the_media(built):
    storage, man, exports, _, log = built
    total = sum(sum(c.values()) for c in _expected(storage, man).values())
    for fmt, e in exports.items():
        assert e["manifests_version"] == man["version"]
        assert {"prefix": "manifests", "version": man["version"]} in e["inputs"]
        media = [r for r in e["inputs"] if r["prefix"].startswith("exports/media/") and "/frames/" not in r["prefix"]]
        assert len(media) == 3  # one extraction per media shard, read by every export
        assert json.loads((_loc(e) / "export.json").read_text())["manifests_version"] == man["version"]
        got = sum(r["records"] for r in e["summary"]["records"])
        assert got + sum(s["rows"] for s in e["summary"]["skipped"]) == total, fmt
    assert any(r["prefix"] == "exports/media/frames/msrvtt/shard-00000" for r in exports["internvl"]["inputs"])
    # the same manifests and config again: nothing is written
    again, up_to_date = build_export(storage, "internvl", ExportConfig(), log)
    assert up_to_date and again["version"] == exports["internvl"]["version"]


def test_copy_mode_is_self_contained(built):
    storage, man, exports, _, log = built
    copied, _ = build_export(storage, "internvl", ExportConfig(media="copy"), log)
    assert copied["version"] != exports["internvl"]["version"]
    assert copied["summary"]["media_root"].startswith(copied["location"])
    assert not [r for r in copied["inputs"] if r["prefix"].startswith("exports/media/")]
    samples = trainers.internvl_load(str(_loc(copied) / "internvl/meta_train.json"))
    assert samples and all(p.startswith(copied["location"]) for s in samples for p in s["media"])


# -- moving an export ----------------------------------------------------------------------------------------


def _locate(export_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The export's own locate.py, run isolated (-I: no site packages, no this project) as on a training machine."""
    proc = subprocess.run([sys.executable, "-I", str(export_dir / "locate.py"), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _no_trace_of(tree: Path, old: str) -> None:
    """No file a trainer reads names ``old`` (the provenance files, export.json and _version.json, say where the
    export was written, on purpose)."""
    for p in tree.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", ".py") and p.name not in ("export.json", "_version.json"):
            assert old not in p.read_text(), p


def test_an_export_copied_elsewhere_loads_with_one_setting(built, tmp_path):
    """Each export and the media copied to unrelated places; ``locate.py --media-root`` (one setting) and every
    trainer reads the copy, and nothing in it still names the storage root."""
    storage, man, exports, _, _ = built
    media = tmp_path / "disk2/media"
    shutil.copytree(Path(storage.root) / "exports/media", media)
    for fmt, e in exports.items():
        dest = tmp_path / f"cluster/{fmt}"
        shutil.copytree(_loc(e), dest)
        out = _locate(dest, "--media-root", str(media), "--check").stdout
        assert "0 missing" in out and str(dest) in out
        _no_trace_of(dest, str(storage.root))
    n = {fmt: sum(r["records"] for r in e["summary"]["records"] if r["split"] == "train") for fmt, e in exports.items()}
    vc2 = [s for s in trainers.videochat2_load(str(tmp_path / "cluster/videochat2/videochat2_data.py"))
           if s["group"] == "instruction_corpus" and s["name"].endswith("_train")]
    ixc = trainers.ixc2_load(str(tmp_path / "cluster/ixc2/ixc2/data.txt"))
    ivl = trainers.internvl_load(str(tmp_path / "cluster/internvl/internvl/meta_train.json"))
    llava = trainers.videollava_load([str(tmp_path / f"cluster/llava/llava/train_{k}.json") for k in ("images", "videos")],
                                     str(media), str(media))
    assert (len(vc2), len(ixc), len(ivl), len(llava)) == (n["videochat2"], n["ixc2"], n["internvl"], n["llava"])
    for s in vc2 + ixc + ivl + llava:
        assert all(p.startswith(str(tmp_path)) for p in s["media"]), s


def test_the_whole_exports_folder_copied_needs_no_setting(built, tmp_path):
    storage, _, exports, _, _ = built
    shutil.copytree(Path(storage.root) / "exports", tmp_path / "exports")
    e = exports["ixc2"]
    dest = tmp_path / Path(e["location"]).relative_to(storage.root)
    out = _locate(dest, "--check").stdout
    assert f"--data_path {dest}/ixc2/data.txt --given_num True" in out
    samples = trainers.ixc2_load(str(dest / "ixc2/data.txt"))
    assert samples and all(s["media"][0].startswith(str(tmp_path / "exports/media")) for s in samples)
    # a missing medium is found by --check and named
    victim = Path(samples[0]["media"][0])
    victim.unlink()
    proc = subprocess.run([sys.executable, "-I", str(dest / "locate.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 1 and f"missing: {victim}" in proc.stderr and "1 missing" in proc.stdout


def test_predownloaded_cc3m_is_adopted_with_the_same_accounting(built):
    storage, man, _, adopted, _ = built
    s = adopted.summary
    assert (s["attempted"], s["succeeded"], s["failed_by_reason"]) == (6, 5, {"decode_error": 1})
    status = storage.read_parquet(f"media/cc3m_wds/shard-00000/{adopted.manifest['version']}/samples.parquet")
    assert status.num_rows == 6 and status.filter(pc.equal(status["status"], "failed"))["detail"].to_pylist()[0].startswith("000000004.jpg")
    # adopted, not downloaded: the stored image bytes are the source tar's
    idx = media_index(storage, "cc3m_wds", "shard-00000")
    first = idx.filter(pc.equal(idx["sample_id"], "cc3m-wds-train-000000000")).to_pylist()[0]
    with tarfile.open(Path(storage.root).parent / "wds/cc3m-train-0000.tar") as tf:
        assert media_bytes(storage, first["media_tar"], first["media_key"], "jpg") == tf.extractfile("000000000.jpg").read()
