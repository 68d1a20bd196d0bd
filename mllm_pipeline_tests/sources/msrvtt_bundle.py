"""A small MSR-VTT bundle in the documented layouts of the CLIP4Clip / EMCL download and of MSRVTT-QA.

30 videos with the official structure scaled down (train 20 / validate 2 / test 8, 20 captions each). As in the
real lists: the 7k list is the official train + validate videos (6,513 + 497 = 7,010), the JSFusion 1k-A test
videos are a subset of the official test videos, and the 9k list is train + validate + the other official test
videos. MSRVTT-QA asks two questions about every video, in the file of the video's official split.
"""

from __future__ import annotations

import json
from pathlib import Path

N_TRAIN, N_VALIDATE, N_TEST = 20, 2, 8
#: the official test videos that are in the JSFusion 1k-A test list (the others are in the 9k train list)
JSFUSION = (22, 24, 27, 29)
CAPTIONS_EACH = 20
QA_EACH = 2


def official_split(i: int) -> str:
    return "train" if i < N_TRAIN else "validate" if i < N_TRAIN + N_VALIDATE else "test"


def caption(i: int, k: int) -> str:
    return f"video {i} caption {k} a person is doing something"


def jsfusion_sentence(i: int) -> str:
    return caption(i, 3)  # the 1k-A sentence is one of the video's own captions


def msrvtt_data(n: int = N_TRAIN + N_VALIDATE + N_TEST, with_sentences: bool = True) -> dict:
    videos = [{"category": i % 20, "url": f"https://www.youtube.com/watch?v=yt{i:09d}", "video_id": f"video{i}",
               "start time": 1.0 + i, "end time": 11.0 + i, "split": official_split(i), "id": i} for i in range(n)]
    doc = {"info": {"contributor": "Microsoft MSM group", "year": "2016", "version": "1.0"}, "videos": videos}
    if with_sentences:
        doc["sentences"] = [{"caption": caption(i, k), "video_id": f"video{i}", "sen_id": i * CAPTIONS_EACH + k}
                            for i in range(n) for k in range(CAPTIONS_EACH)]
    return doc


def train_list(kind: str) -> list[str]:
    ids = [i for i in range(N_TRAIN + N_VALIDATE + N_TEST)
           if official_split(i) != "test" or (kind == "9k" and i not in JSFUSION)]
    return [f"video{i}" for i in ids]


def write_bundle(dest: Path, with_sentences: bool = True) -> dict[str, Path]:
    """Write the bundle's files under ``dest``; returns {name: path}."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    name = "MSRVTT_data.json" if with_sentences else "MSRVTT_category.json"
    out["data"] = dest / name
    out["data"].write_text(json.dumps(msrvtt_data(with_sentences=with_sentences)))
    for kind in ("9k", "7k"):
        out[kind] = dest / f"MSRVTT_train.{kind}.csv"
        out[kind].write_text("video_id\n" + "".join(f"{v}\n" for v in train_list(kind)))
    out["test"] = dest / "MSRVTT_JSFUSION_test.csv"
    out["test"].write_text(",key,vid_key,video_id,sentence\n" + "".join(
        f"{n},ret{n},msr{i},video{i},{jsfusion_sentence(i)}\n" for n, i in enumerate(JSFUSION)))
    qid = 0
    for split, official in (("train", "train"), ("val", "validate"), ("test", "test")):
        rows = []
        for i in range(N_TRAIN + N_VALIDATE + N_TEST):
            if official_split(i) != official:
                continue
            for k in range(QA_EACH):
                rows.append({"answer": ["man", "cook"][k], "category_id": i % 20, "id": qid,
                             "question": f"what is the person in video {i} doing {k}?", "video_id": i})
                qid += 1
        out[f"qa_{split}"] = dest / f"{split}_qa.json"
        out[f"qa_{split}"].write_text(json.dumps(rows))
    return out
