"""The embedded demo corpus: each dataset's official annotation layout, small, with the media it points at.

``generate_demo_corpus(dest)`` writes, deterministically (fixed seeds) and in a few seconds:

* ``cc3m/Train_GCC-training.tsv``, ``cc3m/Validation_GCC-1.1.0-Validation.tsv`` — no header, ``caption<TAB>url``;
  JPEGs of varied aspect ratios (square, portrait, 4:1, 1:3) under ``cc3m/images/``; one URL deliberately has no
  image (a 404 for the download stage); the last rows are what real dumps hold too: one image re-hosted under a
  second URL, a copy of a COCO val image, and two distinct images sharing a hypernymised caption;
* ``cc3m_wds/cc3m-{train,validation}-NNNN.tar`` — the pixparse/cc3m-wds layout (``.jpg``, ``.txt``, ``.json``);
* ``webvid/results_2M_val.csv`` — the real WebVid header and URL shape; MP4 clips of moving content, 15 of the 22
  carrying the same static, semi-transparent mark at the same place mid-frame (``demo.marks.webvid_mark``,
  opacity 0.4, like the stock-site watermark) and 7 clean, so watermark filtering has something to keep and drop
  (``WEBVID_MARKED`` lists the marked rows); one re-crawled videoid;
* ``msrvtt/train_val_videodatainfo.json`` (12 videos: 8 train, 2 validate, 2 test; 20 captions each), the
  flat ``msrvtt/msrvtt_flat.json`` and the same videos as MMAction2's guide prepares them, ``msrvtt/annotations/``
  (``msrvtt_ret_train9k.json`` ... ``msrvtt_qa_answer_list.json``; the demo reads this folder, under 9k-1kA);
  videos in ``msrvtt/videos/all/``;
* ``coco/annotations/captions_{train,val}2017.json`` with images in ``coco/{train,val}2017/``;
* ``internvid/InternVid-10M-flt.jsonl`` (clips of 6 videos, interleaved) with the videos in ``youtube/``.

With ``with_bad_rows`` (the default) the files also hold a few malformed records of the kinds real dumps have —
a wrong field count, an empty URL, bytes that are not UTF-8, an unparseable duration or timestamp, a line that is
not JSON, a clip that ends before it starts, a caption whose image is missing — so the quarantine has something
to show. Every URL is ``<base_url>/<path relative to dest>``: serve ``dest`` over HTTP at ``base_url`` (see
``mllm_pipeline.demo.media_host``) and the download stage can fetch everything.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_MEDIA_BASE_URL = "http://127.0.0.1:8765"
GENERATOR_VERSION = 4
WEBVID_CLIPS = 22
# the WebVid rows (by position) whose clip carries the mark: 15 of 22, from their own seeded rng so the main
# stream (ids, captions, everything after) is the same as without the choice
WEBVID_MARKED = frozenset(random.Random("webvid-watermark").sample(range(WEBVID_CLIPS), 15))

SUBJECTS = ["a young woman", "an old man", "a brown dog", "two children", "a red car", "a chef", "a cyclist",
            "a black cat", "a group of friends", "a surfer", "a horse", "a businessman", "a little girl", "a bird"]
ACTIONS = ["walking along", "standing near", "playing in", "driving through", "sitting on", "running across",
           "looking at", "resting beside", "jumping over", "waiting at"]
PLACES = ["the beach at sunset", "a busy city street", "a green park", "the snowy mountains", "a wooden bench",
          "a modern kitchen", "an empty road", "the river bank", "a crowded market", "a quiet forest"]
STYLES = ["", " in slow motion", " - aerial view", ", close up", " at golden hour", " 4k"]


def _caption(rng: random.Random, style: bool = False) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
    return (text + rng.choice(STYLES)) if style else text


def _jpeg(path: Path, width: int, height: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    c = [rng.randint(0, 255) for _ in range(6)]
    arr = np.stack([(c[i] * x / max(width, 1) + c[i + 3] * y / max(height, 1)) % 256 for i in range(3)], axis=-1)
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randint(0, width - 1), rng.randint(0, height - 1)
        draw.ellipse([x0, y0, x0 + width // 4, y0 + height // 4], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    img.save(path, "JPEG", quality=80)


def write_mp4(path: Path, seconds: int, rng: random.Random, watermark: bool = False, fps: int = 8) -> None:
    """Write a small MP4 (128x72, ``seconds`` long at ``fps``) of moving content to ``path`` (parents created).

    The colours come from ``rng``, so a seeded ``random.Random`` gives the same clip every time; the file is written
    under a temporary name and renamed into place. H.264 when the FFmpeg build has x264, else MPEG-4 Part 2.
    ``watermark`` adds the static semi-transparent stock-site mark mid-frame
    (:func:`mllm_pipeline.demo.marks.webvid_mark`). The demo corpus's WebVid, MSR-VTT and InternVid videos are made
    with it; tests and benchmarks use it for clips too.
    """
    import av

    from mllm_pipeline.demo.marks import webvid_mark

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = 128, 72
    y, x = np.mgrid[0:h, 0:w]
    base = np.array([rng.randint(40, 200) for _ in range(3)], dtype=np.float32)
    overlay = webvid_mark(w, h, opacity=0.4) if watermark else None
    tmp = path.with_name(f".{path.name}.tmp")
    with av.open(str(tmp), "w", format="mp4") as out:
        try:
            stream = out.add_stream("libx264", rate=fps)
            stream.options = {"preset": "ultrafast", "crf": "30"}
        except Exception:  # an FFmpeg build without x264
            stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(seconds * fps):
            shift = i * 3
            frame = np.empty((h, w, 3), dtype=np.float32)
            for ch in range(3):
                frame[..., ch] = base[ch] + 50 * np.sin((x + shift * (ch + 1)) / 9.0) + 30 * np.cos((y - shift) / 7.0)
            cx = (10 + i * 4) % (w - 16)
            frame[20:36, cx : cx + 16] = [250, 240, 30]
            img = overlay.apply(np.clip(frame, 0, 255)) if overlay is not None else np.clip(frame, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _cc3m(dest: Path, base: str, rng: random.Random, bad: bool) -> dict[str, Path]:
    sizes = [(320, 240), (240, 320), (256, 256), (640, 160), (160, 480), (400, 300), (300, 500), (512, 288)]
    lines: dict[str, list[bytes]] = {"train": [], "val": []}
    for split, count in (("train", 40), ("val", 8)):
        for i in range(count):
            idx = f"{(0 if split == 'train' else 100000) + i:09d}"
            rel = f"cc3m/images/{idx}.jpg"
            if not (split == "train" and i == 17):  # this one is a 404 for the download stage
                _jpeg(dest / rel, *sizes[i % len(sizes)], rng)
            lines[split].append(f"{_caption(rng)}\t{base}/{rel}".encode())
    # captions a cleaning stage has to handle (the rows stay valid; only their text is noisy)
    noisy = {2: "a chef &amp; <b>his team</b> cooking in a modern kitchen", 5: "a surfer riding a wave, more at https://example.com/surf",
             8: "photo", 12: lines["train"][3].split(b"\t")[0].decode(), 14: "the cafÃ© terrace on a sunny morning!!!!"}
    for i, text in noisy.items():
        lines["train"][i] = text.encode() + b"\t" + lines["train"][i].split(b"\t")[1]
    if bad:
        lines["train"][10:10] = [b"actor performing on stage without a url field"]
        lines["train"][20:20] = [_caption(rng).encode() + b"\t"]
        lines["train"][25:25] = [b"caf\xe9 terrace on a sunny morning\t" + f"{base}/cc3m/images/x.jpg".encode()]
        lines["train"][30:30] = [b"a tree in the park\t" + f"{base}/cc3m/images/y.jpg".encode() + b"\textra field"]
    return {
        "cc3m_train": _write(dest / "cc3m/Train_GCC-training.tsv", b"\n".join(lines["train"]) + b"\n"),
        "cc3m_val": _write(dest / "cc3m/Validation_GCC-1.1.0-Validation.tsv", b"\n".join(lines["val"]) + b"\n"),
    }


def _cc3m_copies(dest: Path, base: str, rng: random.Random) -> None:
    """Rows real CC3M dumps have: one image re-hosted under a second URL, an image that is a copy of a COCO val
    image, and two distinct images sharing one hypernymised caption (appended to the training TSV)."""
    first_val = sorted((dest / "coco/val2017").iterdir())[0]
    _write(dest / "cc3m/mirror/000000003.jpg", (dest / "cc3m/images/000000003.jpg").read_bytes())
    _write(dest / "cc3m/images/reposted.jpg", first_val.read_bytes())
    for name in ("premiere_a.jpg", "premiere_b.jpg"):
        _jpeg(dest / f"cc3m/images/{name}", 320, 240, rng)
    rows = [("the same picture under a second address", "cc3m/mirror/000000003.jpg"),
            ("a photo reposted from another collection", "cc3m/images/reposted.jpg"),
            ("actor attends the premiere of the film", "cc3m/images/premiere_a.jpg"),
            ("actor attends the premiere of the film", "cc3m/images/premiere_b.jpg")]
    with open(dest / "cc3m/Train_GCC-training.tsv", "ab") as f:
        f.write(b"".join(f"{c}\t{base}/{r}\n".encode() for c, r in rows))


def _cc3m_wds(dest: Path, base: str, rng: random.Random) -> dict[str, Path]:
    key = 0
    for name in ("cc3m-train-0000.tar", "cc3m-train-0001.tar", "cc3m-validation-0000.tar"):
        path = dest / "cc3m_wds" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(10):
                k = f"{key:09d}"
                key += 1
                w, h = rng.choice([(256, 256), (320, 240), (240, 320)])
                buf = io.BytesIO()
                tmp = dest / "cc3m_wds" / ".tmp.jpg"
                _jpeg(tmp, w, h, rng)
                buf.write(tmp.read_bytes())
                tmp.unlink()
                caption = _caption(rng)
                meta = {"key": k, "caption": caption, "url": f"https://example.invalid/cc3m/{k}.jpg", "width": w,
                        "height": h, "original_width": w * 2, "original_height": h * 2, "status": "success"}
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size, info.mtime = len(data), 1_600_000_000
                    tar.addfile(info, io.BytesIO(data))
    return {"cc3m_wds_dir": dest / "cc3m_wds"}


def _webvid(dest: Path, base: str, rng: random.Random, bad: bool) -> dict[str, Path]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
    rows = []
    for i in range(WEBVID_CLIPS):
        vid = 1_000_000_000 + rng.randint(0, 99_999_999)
        seconds = rng.randint(3, 8)
        name = _caption(rng, style=True)
        slug = "-".join(name.lower().replace(",", "").split())
        rel = f"shutterstock/videos/{vid}/preview/stock-footage-{slug}.mp4"
        write_mp4(dest / rel, seconds, rng, watermark=i in WEBVID_MARKED)
        page = rng.randint(1, 99_999)
        lo = (page - 1) // 50 * 50 + 1
        rows.append([vid, name, page, f"{lo:06d}_{lo + 49:06d}", f"PT00H00M{seconds:02d}S", f"{base}/{rel}"])
    rows.insert(12, [rows[3][0], rows[3][1] + ", updated", *rows[3][2:]])  # re-crawled with a new caption
    if bad:
        rows.insert(5, [1_200_000_001, "waves crashing on rocks", 10, "000001_000050", "PT00H00M05S", ""])
        rows.insert(9, [1_200_000_002, "timelapse of clouds", 11, "000001_000050", "PT0XH", f"{base}/missing.mp4"])
        rows.insert(15, [1_200_000_003, "a field missing"])
    writer.writerows(rows)
    return {"webvid": _write(dest / "webvid/results_2M_val.csv", buf.getvalue())}


def _msrvtt(dest: Path, base: str, rng: random.Random) -> dict[str, Path]:
    splits = ["train"] * 8 + ["validate"] * 2 + ["test"] * 2
    videos, sentences, flat = [], [], []
    for i, split in enumerate(splits):
        seconds = rng.randint(4, 10)
        write_mp4(dest / f"msrvtt/videos/all/video{i}.mp4", seconds, rng)
        start = round(rng.uniform(5, 200), 2)
        yid = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for _ in range(11))
        videos.append({"category": rng.randint(0, 19), "url": f"https://www.youtube.com/watch?v={yid}", "video_id": f"video{i}",
                       "start time": start, "end time": round(start + seconds, 2), "split": split, "id": i})
        for k in range(20):
            sentences.append({"caption": _caption(rng), "video_id": f"video{i}"})
            flat.append({"video": f"video{i}.mp4", "caption": sentences[-1]["caption"], "duration": float(seconds)})
    rng.shuffle(sentences)
    for n, s in enumerate(sentences):
        s["sen_id"] = n
    doc = {"info": {"contributor": "Microsoft MSM group", "data_created": "2016-04-14 14:30:20", "version": "1.0", "year": "2016"},
           "videos": videos, "sentences": sentences}
    return {
        "msrvtt": _write(dest / "msrvtt/train_val_videodatainfo.json", json.dumps(doc)),
        "msrvtt_flat": _write(dest / "msrvtt/msrvtt_flat.json", json.dumps(flat)),
        "msrvtt_videos_dir": dest / "msrvtt/videos/all",
        "msrvtt_annotations": _msrvtt_mmaction2(dest / "msrvtt/annotations", videos, flat),
    }


def _msrvtt_mmaction2(ann: Path, videos: list[dict], flat: list[dict]) -> Path:
    """The same videos as MMAction2's preparation guide lays MSR-VTT out (VindLU's annotation folder): the 7k
    training file is the official train + validate videos, the 9k one adds the test videos outside 1k-A (here
    video10), the 1k-A test file holds the other test video with one sentence, the multiple-choice test covers
    every official test video, and MSRVTT-QA asks two questions a video in its official split."""
    rng = random.Random(23)  # its own generator: the rest of the corpus stays as it was
    caps: dict[str, list[str]] = {}
    for e in flat:
        caps.setdefault(e["video"], []).append(e["caption"])
    split_of = {f"{v['video_id']}.mp4": v["split"] for v in videos}
    test = [n for n, sp in split_of.items() if sp == "test"]
    seven = [n for n, sp in split_of.items() if sp != "test"]
    nine, one_k = seven + test[:-1], test[-1:]
    duration = {e["video"]: e["duration"] for e in flat}

    def ret(names: list[str], every: bool) -> list[dict]:
        return [{"video": n, "caption": c, "duration": duration[n]} for n in names for c in (caps[n] if every else caps[n][:1])]

    def options(n: str) -> tuple[list[str], int]:
        others = [caps[m][0] for m in caps if m != n]
        opts = rng.sample(others, 4)
        k = rng.randrange(5)
        return opts[:k] + [caps[n][0]] + opts[k:], k

    mc = []
    for n in test:
        opts, k = options(n)
        mc.append({"video": n, "caption": opts, "answer": k})
    words = ["man", "woman", "cooking", "singing", "car", "dog", "playing", "talking"]
    qa: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    qid = 0
    for n, sp in split_of.items():
        split = {"validate": "val"}.get(sp, sp)
        for question in ("what is happening in the video?", "who is in the video?"):
            answer: str | list[str] = rng.choice(words)
            if split == "test" and qid % 2:
                answer = [answer, answer, rng.choice(words)]  # some releases give every annotator's answer
            qa[split].append({"video": n, "question": question, "answer": answer, "question_id": qid})
            qid += 1
    files = {"msrvtt_ret_train9k.json": ret(nine, True), "msrvtt_ret_train7k.json": ret(seven, True),
             "msrvtt_ret_test1k.json": ret(one_k, False), "msrvtt_mc_test.json": mc,
             "msrvtt_qa_train.json": qa["train"], "msrvtt_qa_val.json": qa["val"], "msrvtt_qa_test.json": qa["test"],
             "msrvtt_qa_answer_list.json": words}
    for name, doc in files.items():
        _write(ann / name, json.dumps(doc))
    return ann


def _coco(dest: Path, base: str, rng: random.Random, bad: bool) -> dict[str, Path]:
    out = {}
    ann_id = 1
    for split, count in (("train", 12), ("val", 4)):
        images, anns = [], []
        for _ in range(count):
            image_id = rng.randint(1, 581_929)
            w, h = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)])
            name = f"{image_id:012d}.jpg"
            _jpeg(dest / f"coco/{split}2017/{name}", w // 2, h // 2, rng)
            images.append({"license": rng.randint(1, 8), "file_name": name, "coco_url": f"{base}/coco/{split}2017/{name}",
                           "height": h // 2, "width": w // 2, "date_captured": "2013-11-14 11:18:45",
                           "flickr_url": f"http://farm{rng.randint(1, 9)}.staticflickr.com/{image_id}.jpg", "id": image_id})
            for _ in range(rng.choice([5, 5, 5, 6, 7])):
                anns.append({"image_id": image_id, "id": ann_id, "caption": _caption(rng).capitalize() + "."})
                ann_id += 1
        if bad and split == "train":
            anns.append({"image_id": 999_999_999, "id": ann_id, "caption": "A caption whose image is not in the file."})
            ann_id += 1
        rng.shuffle(anns)
        doc = {"info": {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0", "year": 2017,
                        "contributor": "COCO Consortium", "date_created": "2017/09/01"},
               "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                             "name": "Attribution-NonCommercial-ShareAlike License"}],
               "images": images, "annotations": anns}
        out[f"coco_{split}"] = _write(dest / f"coco/annotations/captions_{split}2017.json", json.dumps(doc))
    out["coco_images_dir"] = dest / "coco"
    return out


def _internvid(dest: Path, base: str, rng: random.Random, bad: bool) -> dict[str, Path]:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
    lines = []
    for _ in range(6):
        yid = "".join(rng.choice(alphabet) for _ in range(11))
        seconds = rng.randint(8, 12)
        write_mp4(dest / f"youtube/{yid}.mp4", seconds, rng)
        t = 0.0
        for _ in range(rng.randint(2, 4)):
            start = t + rng.uniform(0.2, 1.0)
            end = min(start + rng.uniform(1.0, 2.5), seconds - 0.1)
            t = end
            lines.append(json.dumps({"YoutubeID": yid, "Start_timestamp": _ts(start), "End_timestamp": _ts(end),
                                     "Caption": _caption(rng), "Aesthetic_Score": round(rng.uniform(3.0, 6.5), 6),
                                     "UMT_Score": round(rng.uniform(0.25, 0.55), 6)}).encode())
    rng.shuffle(lines)
    if bad:
        lines.insert(3, b'{"YoutubeID": "truncated0001", "Start_timestamp": "00:00:01.0')
        lines.insert(7, json.dumps({"YoutubeID": "endsbeforest", "Start_timestamp": "00:00:05.000", "End_timestamp": "00:00:02.000",
                                    "Caption": "a clip that ends before it starts", "Aesthetic_Score": 5.1, "UMT_Score": 0.4}).encode())
        lines.insert(11, json.dumps({"YoutubeID": "badtimestamp", "Start_timestamp": "00:61:xx", "End_timestamp": "00:62:00.000",
                                     "Caption": "an unreadable timestamp", "Aesthetic_Score": 5.1, "UMT_Score": 0.4}).encode())
    return {"internvid": _write(dest / "internvid/InternVid-10M-flt.jsonl", b"\n".join(lines) + b"\n")}


def _ts(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def generate_demo_corpus(dest: str | Path, base_url: str = DEFAULT_MEDIA_BASE_URL, with_bad_rows: bool = True) -> dict[str, Path]:
    """Write the demo corpus into ``dest`` (if it is not already there) and return its paths by name.

    Safe to call from several processes at once (Dagster runs assets in parallel): one generates, the others
    wait on a lock file and then read what it wrote.
    """
    import fcntl

    dest = Path(dest)
    base_url = base_url.rstrip("/")
    stamp = {"version": GENERATOR_VERSION, "base_url": base_url, "with_bad_rows": with_bad_rows}
    marker = dest / ".complete"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            done = json.loads(marker.read_text())
            if done.get("stamp") == stamp:
                return {k: Path(v) for k, v in done["paths"].items()}
        if dest.exists() and not marker.exists() and any(dest.iterdir()):
            raise FileExistsError(
                f"{dest} is not empty and holds no demo corpus; refusing to overwrite it. Set MLLM_DEMO_DIR elsewhere."
            )
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rng = random.Random(0)
        rel: dict[str, Path] = {}
        rel.update(_cc3m(tmp, base_url, rng, with_bad_rows))
        rel.update(_cc3m_wds(tmp, base_url, rng))
        rel.update(_webvid(tmp, base_url, rng, with_bad_rows))
        rel.update(_msrvtt(tmp, base_url, rng))
        rel.update(_coco(tmp, base_url, rng, with_bad_rows))
        rel.update(_internvid(tmp, base_url, rng, with_bad_rows))
        _cc3m_copies(tmp, base_url, rng)
        paths = {k: str(dest / p.relative_to(tmp)) for k, p in rel.items()}
        (tmp / ".complete").write_text(json.dumps({"stamp": stamp, "paths": paths}, indent=2))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return {k: Path(v) for k, v in paths.items()}
