"""How each trainer's own data code reads an export: its loading rules, transcribed (not copied) from the trainer's
source at the commit named in each function, so that the export tests read the files as the trainer will.

Each loader returns one dict per sample the trainer would build, with the media paths it would open (resolved
the way it resolves them) and the text it would tokenize; it raises ``AssertionError`` / ``OSError`` where the
trainer would fail, and opens every medium the way the trainer does (Pillow for pictures, a decoded frame for
videos) so a path that points nowhere fails here too.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from PIL import Image


def open_picture(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.convert("RGB").size


def open_video(path: str) -> None:
    import av

    with av.open(path) as c:
        next(c.decode(video=0))


# -- VideoChat2 ----------------------------------------------------------------------------------------------


def videochat2_load(config_py: str) -> list[dict[str, Any]]:
    """VideoChat2 (OpenGVLab/Ask-Anything @ 4dd8210b030374bb0c510a57dfbe916f70d3ef71): ``video_chat2/configs/
    instruction_data.py`` entries are ``[annotation json, data root(, "video")]``; ``dataset/__init__.py``
    ``get_media_type``: the third element "video" makes a video dataset; ``dataset/it_dataset.py``
    ``ITImgTrainDataset`` / ``ITVidTrainDataset``: ``json.load`` of the annotation, the medium is
    ``os.path.join(data_root, record[media_type])``, ``QA`` a list of ``{"i"?, "q", "a"}`` (``process_qa``: the
    first turn's non-empty ``i`` becomes the instruction); ``dataset/pt_dataset.py`` ``PTImgTrainDataset``: the
    same path rule and a ``caption`` string."""
    scope: dict[str, Any] = {}
    with open(config_py) as f:
        exec(f.read(), scope)  # the config lines a user pastes into configs/instruction_data.py
    out = []
    for group in ("pretrain_corpus", "instruction_corpus"):
        for name, entry in scope[group].items():
            anno_path, data_root = entry[:2]
            media_type = "video" if len(entry) >= 3 and entry[2] == "video" else "image"
            with open(anno_path) as f:
                anno = json.load(f)
            for rec in anno:
                path = os.path.join(data_root, rec[media_type])
                (open_video if media_type == "video" else open_picture)(path)
                if group == "pretrain_corpus":
                    assert isinstance(rec["caption"], str) and rec["caption"]
                    out.append({"group": group, "name": name, "kind": media_type, "media": [path], "answer": rec["caption"]})
                else:
                    qa = rec["QA"]
                    assert qa and all("q" in t and "a" in t for t in qa), rec
                    assert all(isinstance(t["a"], str) and t["a"] for t in qa)
                    out.append({"group": group, "name": name, "kind": media_type, "media": [path],
                                "answer": qa[-1]["a"], "qa": qa})
    return out


# -- InternLM-XComposer 2 / 4KHD / 2.5 -----------------------------------------------------------------------


def ixc2_given_num(count: str) -> int:
    """``finetune.py`` ``make_supervised_data_module`` with ``--given_num True``: the samples kept per file."""
    return int(float(count) * 1000)


def ixc2_conv2text(turns: list[dict[str, str]]) -> str:
    """``data_mix.py`` ``conv2text``: "human"/"user" turns are the user's, anything else the assistant's; each
    turn ``[UNUSED_TOKEN_146]<role>\\n<text stripped>[UNUSED_TOKEN_145]\\n``, then ``</s>``."""
    text = ""
    for t in turns:
        role = "user" if t["from"].lower() in ("human", "user") else "assistant"
        text += f"[UNUSED_TOKEN_146]{role}\n{t['value'].strip()}[UNUSED_TOKEN_145]\n"
    return text + "</s>"


def ixc2_load(data_txt: str, seed: int = 0) -> list[dict[str, Any]]:
    """InternLM-XComposer (InternLM/InternLM-XComposer @ 0f70c3e3911189de1869396b4017714c31821e3a):
    ``InternLM-XComposer-2.0/finetune/finetune.py`` (2 / 4KHD; ``finetune/finetune.py`` for 2.5 is the same)
    ``make_supervised_data_module``: each ``data.txt`` line is stripped and split on ``' '``; ``open(line[0])``
    and ``json.load``; with ``--given_num True`` (what ``finetune.sh`` passes) exactly two fields, and
    ``int(float(line[1]) * 1000)`` samples are drawn: ``random.sample`` when fewer than the file holds,
    ``random.choice`` repeats when more. ``data_mix.py`` ``Mix_dataset``: a file whose first record has
    ``image`` is multimodal; ``Sample_dataset``: ``image`` a path or a list of paths, each opened with
    ``Image.open(path).convert('RGB')`` (no root joined: paths must be absolute or relative to the working
    directory). The finetune README: one ``<ImageHere>`` per image, in order."""
    rng = random.Random(seed)
    out = []
    with open(data_txt) as f:
        lines = f.readlines()
    for line in lines:
        fields = line.strip().split(" ")
        assert len(fields) == 2, f"data.txt line {line!r} does not split into <json> <count> on ' '"
        with open(fields[0]) as f:
            temp = json.load(f)
        num = ixc2_given_num(fields[1])
        drawn = rng.sample(temp, num) if len(temp) > num else temp + [rng.choice(temp) for _ in range(num - len(temp))]
        multimodal = "image" in temp[0]
        for rec in drawn:
            images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
            for p in images:
                open_picture(p)
            text = ixc2_conv2text(rec["conversations"])
            assert text.count("<ImageHere>") == len(images), rec
            out.append({"file": fields[0], "given": num, "held": len(temp), "multimodal": multimodal, "id": rec["id"],
                        "media": images, "answer": rec["conversations"][-1]["value"], "text": text,
                        "turns": len(rec["conversations"])})
    return out


# -- InternVL ------------------------------------------------------------------------------------------------


def internvl_tiles(width: int, height: int, max_num: int, image_size: int = 448, use_thumbnail: bool = True) -> int:
    """The number of 448-pixel pictures ``dataset.py`` ``dynamic_preprocess`` cuts an image into: the grid
    (i, j) with 1 <= i*j <= max_num whose aspect ratio is closest to the image's (ties go to the larger grid when the
    image's area exceeds half of the grid's), plus a thumbnail when the grid has more than one cell."""
    grids = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if 1 <= i * j <= max_num}, key=lambda g: g[0] * g[1])
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for g in grids:
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * g[0] * g[1]:
            best = g
    blocks = best[0] * best[1]
    return blocks + (1 if use_thumbnail and blocks != 1 else 0)


def internvl_load(meta_path: str, max_dynamic_patch: int = 6, max_seq_length: int = 8192,
                  num_image_token: int = 256) -> list[dict[str, Any]]:
    """InternVL (OpenGVLab/InternVL @ 2410d1dbf208f0e799459aff9376e5747dbf41a2),
    ``internvl_chat/internvl/train/internvl_chat_finetune.py``: ``build_datasets`` reads the ``--meta_path`` JSON,
    each entry's ``repeat_time`` and ``data_augment``; ``LazySupervisedDataset`` asserts the ``annotation`` ends
    with ``jsonl`` and opens it as given (no root joined), ``root`` is joined to each picture with
    ``os.path.join``. ``__getitem__``: a non-empty ``image`` list goes to ``multi_modal_multi_image_get_item``
    (each picture cut into at most ``max(1, max_dynamic_patch // len(images))`` tiles), a string to
    ``multi_modal_get_item`` (at most ``max_dynamic_patch``; ``<image>\\n`` is prepended when the first turn has
    none), a ``video`` to ``video_get_item``, which calls ``tcs_loader``: ``None`` without the unpublished
    ``petrel_client``, so every video record fails there and, after 10 tries on random other records, the
    dataset raises ``StopIteration``. ``dataset.py`` ``preprocess_internvl2_5``: roles human/gpt, each
    ``<image>`` replaced by ``num_image_token`` x tiles context tokens, the count of ``<image>`` must equal the
    pictures (``current_image_idx == num_image``), and the tokens are cut at ``max_seq_length``, after which
    the image-end count check fails. ``num_image_token`` = (448 / 14)^2 x 0.5^2 = 256 for ``--force_image_size
    448 --down_sample_ratio 0.5``."""
    with open(meta_path) as f:
        collections = json.load(f)
    out = []
    for name, meta in collections.items():
        assert meta["annotation"].endswith("jsonl"), meta
        assert meta["repeat_time"] == 1 and meta["data_augment"] is False
        with open(meta["annotation"]) as f:
            raw = f.readlines()
        assert len(raw) == meta["length"]
        for line in raw:
            item = json.loads(line)
            assert "video" not in item, "InternVL's public code reads no video file (tcs_loader is None)"
            images = item["image"] if isinstance(item["image"], list) else [item["image"]]
            assert images
            per = max(1, max_dynamic_patch // len(images)) if isinstance(item["image"], list) else max_dynamic_patch
            turns = item["conversations"]
            if not isinstance(item["image"], list) and "<image>" not in turns[0]["value"]:
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2), turns
            assert sum(t["value"].count("<image>") for t in turns) == len(images)
            tokens = 0
            for p in images:
                w, h = open_picture(os.path.join(meta["root"], p))
                tokens += internvl_tiles(w, h, per) * num_image_token
            text_bound = sum(len(t["value"].encode()) + 16 for t in turns)
            assert tokens + text_bound <= max_seq_length, f"{name}: {tokens} image tokens + text exceed {max_seq_length}"
            out.append({"name": name, "media": [os.path.join(meta["root"], p) for p in images], "turns": turns,
                        "answer": turns[-1]["value"], "image_tokens": tokens})
    return out


# -- LLaVA and Video-LLaVA ------------------------------------------------------------------------------------


def llava_load(data_path: str, image_folder: str, version: str = "v1") -> list[dict[str, Any]]:
    """LLaVA (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd), ``llava/train/train.py``:
    ``LazySupervisedDataset`` ``json.load``s ``--data_path``; a record with ``image`` opens
    ``os.path.join(image_folder, image)``; ``preprocess_multimodal`` moves ``<image>`` to the front of its turn.
    ``--version plain`` (pretraining) goes to ``preprocess_plain``: ``assert len(source) == 2`` and ``<image>`` in
    the first turn. ``v1`` (``preprocess_v1``): a first turn not from the human is dropped, then the roles must
    alternate human, gpt (``assert role == conv.roles[j % 2]``)."""
    with open(data_path) as f:
        records = json.load(f)
    out = []
    for rec in records:
        turns = rec["conversations"]
        media = []
        if "image" in rec:
            media = [os.path.join(image_folder, rec["image"])]
            open_picture(media[0])
        if version == "plain":
            assert len(turns) == 2, f"{rec['id']}: the plain template takes two turns, not {len(turns)}"
            assert "<image>" in turns[0]["value"]
        else:
            if turns[0]["from"] != "human":
                turns = turns[1:]
            for j, t in enumerate(turns):
                assert t["from"] == ("human", "gpt")[j % 2], rec
        out.append({"id": rec["id"], "media": media, "answer": turns[-1]["value"], "turns": len(turns)})
    return out


def videollava_load(data_paths: list[str], image_folder: str, video_folder: str) -> list[dict[str, Any]]:
    """Video-LLaVA (PKU-YuanGroup/Video-LLaVA @ 984e65bf8e8fd97072258547c4c8061fdd2416b7),
    ``videollava/train/train.py``: ``--data_path`` takes several JSON files; ``LazySupervisedDataset``: a record
    with ``image`` (and no ``video``) opens each ``os.path.join(image_folder, f)`` (a string or a list), one with
    ``video`` decodes each ``os.path.join(video_folder, f)``; ``preprocess_multimodal`` handles a turn that starts
    with ``<image>`` or ``<video>`` (a ``<video>`` becomes ``num_frames`` image tokens)."""
    out = []
    for data_path in data_paths:
        with open(data_path) as f:
            records = json.load(f)
        for rec in records:
            kind = "video" if "video" in rec and "image" not in rec else "image"
            files = rec[kind] if isinstance(rec[kind], list) else [rec[kind]]
            folder = video_folder if kind == "video" else image_folder
            paths = [os.path.join(folder, f) for f in files]
            for p in paths:
                (open_video if kind == "video" else open_picture)(p)
            first = rec["conversations"][0]["value"]
            assert first.startswith(f"<{kind}>"), rec
            out.append({"id": rec["id"], "kind": kind, "media": paths, "answer": rec["conversations"][-1]["value"]})
    return out
