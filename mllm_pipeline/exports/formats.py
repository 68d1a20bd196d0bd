"""The files each consumer reads, built from manifest rows (one row: one medium, one conversation).

Every format gets the rows of one split at a time, each with ``rel`` (the medium's path relative to the media
root), ``turns`` (the manifest's LLaVA conversation, a list of ``{"from": "human"|"gpt", "value": ...}``) and, for
a video the format reads as pictures, ``frames`` (paths of frames sampled from it) or ``composite`` (one picture
of those frames), and writes them where and how its consumer expects:

=============  ===============================================================================================
videochat2     ``annotation/videos_images/<dataset>/caption_<split>.json`` — ``[{"image"|"video": path,
               "caption": text}]`` (the pretraining datasets) — and ``instruction_<split>.json`` —
               ``[{"image"|"video": path, "QA": [{"i": instruction, "q": question, "a": answer}]}]`` (the
               instruction-tuning datasets); ``videochat2_data.py`` holds the ``available_corpus`` entries.
ixc2           ``ixc2/<dataset>_<split>.json`` — ``[{"id", "image": [path], "conversations": [{"from": "user",
               "value": "<ImageHere>..."}, {"from": "assistant", ...}]}]`` — and ``ixc2/data_<split>.txt``
               (``data.txt`` for train): one ``<json path> <samples, in thousands>`` line per file, what the
               finetune script's ``--data_path`` takes with ``--given_num True``. The 2 / 4KHD finetune reads
               no video: video rows are skipped, or (``ixc2_video: composite``) given as one picture of their
               frames, the form InternLM-XComposer-2.5 gives its model a video in.
internvl       ``internvl/<dataset>_<split>.jsonl`` — one ``{"id", "image": path | [frame paths], "width",
               "height", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``
               a line (a video is its sampled frames, ``Frame-1: <image>\\nFrame-2: <image>...``, the prompt
               InternVL's own video path writes) — and ``internvl/meta_<split>.json`` — ``{name: {root,
               annotation, data_augment, repeat_time, length}}``, what ``--meta_path`` takes.
llava          ``llava/<split>_images.json`` and ``llava/<split>_videos.json`` — ``[{"id", "image"|"video":
               path, "conversations"}]`` (LLaVA's ``--data_path`` with ``--image_folder``; Video-LLaVA's with
               ``--image_folder`` and ``--video_folder``, both the media root) — and
               ``llava/pretrain_<split>_images.json`` / ``_videos.json``: the two-turn rows only, the one shape
               the pretraining template (``--version plain``) accepts.
=============  ===============================================================================================

Paths in records are relative to the media root wherever the trainer joins them to a root it is given. The files
that must hold absolute paths (InternLM-XComposer's records and ``data.txt``, InternVL's meta files, VideoChat2's
corpus entries) are *bound*: listed in the export's ``locate.json`` and written again for another location by the
export's own ``locate.py`` (:mod:`mllm_pipeline.exports.locate`).

VideoChat2's QA turns come from the conversation, not from the caption: a human turn that is one of the
manifests' caption instructions becomes ``{"i": instruction, "q": "", "a": answer}`` (how VideoChat2's caption
instruction data look); any other human turn is a question, ``{"i": qa_instruction, "q": question, "a": answer}``.
So question-answer rows (several turns each) export as question-answer data.
"""

from __future__ import annotations

import abc
import json
import math
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any

from mllm_pipeline.exports import locate

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
IXC_PLACEHOLDER = "<ImageHere>"
DEFAULT_QA_INSTRUCTIONS = {
    "image": "Look at the image carefully and answer the question.",
    "video": "Watch the video carefully and answer the question.",
}
#: InternVL's tokens per 448-pixel tile: (448 / 14) ** 2 patches, pixel-shuffled by 0.5 on each side.
INTERNVL_TILE_TOKENS = 256
#: Tokens a turn adds around its text in InternVL's chat templates (role markers, separators), an upper bound.
INTERNVL_TURN_OVERHEAD = 16


class JsonArrayFile:
    """A JSON array written element by element, one element a line (or JSON lines), so no export is held in
    memory whole (``locate.py`` relies on the one-record-a-line layout)."""

    def __init__(self, f: Any, lines: bool = False):
        self.f, self.n, self.lines = f, 0, lines
        if not lines:
            f.write(b"[")

    def add(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        if self.lines:
            self.f.write(data + b"\n")
        else:
            self.f.write((b",\n" if self.n else b"\n") + data)
        self.n += 1

    def close(self) -> None:
        if not self.lines:
            self.f.write(b"\n]\n")
        self.f.close()


def human_text(value: str) -> str:
    """A human turn without its media placeholder."""
    for p in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        value = value.replace(p + "\n", "").replace("\n" + p, "").replace(p, "")
    return value.strip()


def turn_pairs(turns: list[dict[str, str]]) -> Iterator[tuple[str, str]]:
    """(human, gpt) pairs of a LLaVA conversation, in order."""
    for i in range(0, len(turns) - 1, 2):
        h, g = turns[i], turns[i + 1]
        if h.get("from") != "human" or g.get("from") != "gpt":
            raise ValueError(f"a conversation must alternate human / gpt turns, got {h.get('from')!r} then {g.get('from')!r}")
        yield h["value"], g["value"]


def videochat2_qa(turns: list[dict[str, str]], kind: str, caption_instructions: set[str],
                  qa_instruction: str) -> list[dict[str, str]]:
    out = []
    for h, a in turn_pairs(turns):
        text = human_text(h)
        if not text or text in caption_instructions:
            out.append({"i": text, "q": "", "a": a})
        else:
            out.append({"i": qa_instruction, "q": text, "a": a})
    return out


def ixc2_turns(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for n, (h, a) in enumerate(turn_pairs(turns)):
        text = human_text(h)
        out.append({"from": "user", "value": (IXC_PLACEHOLDER + text) if n == 0 else text})
        out.append({"from": "assistant", "value": a})
    return out


def internvl_video_turns(turns: list[dict[str, str]], frames: int) -> list[dict[str, str]]:
    """The conversation of a video given as ``frames`` pictures, with the prompt InternVL's own video loader
    writes: ``<video>\\n`` in the first turn becomes ``Frame-1: <image>\\n...Frame-N: <image>\\n``."""
    out = [dict(t) for t in turns]
    first = out[0]["value"]
    if VIDEO_PLACEHOLDER not in first:
        first = VIDEO_PLACEHOLDER + "\n" + first
    tags = "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(frames))
    out[0]["value"] = first.replace(VIDEO_PLACEHOLDER + "\n", tags + "\n").replace(VIDEO_PLACEHOLDER, tags)
    return out


def internvl_image_tokens(pictures: int, max_dynamic_patch: int) -> int:
    """The most image tokens InternVL's multi-image path gives ``pictures`` pictures: each is cut into at most
    ``max(1, max_dynamic_patch // pictures)`` tiles, plus a thumbnail when that is more than one."""
    tiles = max(1, max_dynamic_patch // pictures)
    return pictures * (tiles + (1 if tiles > 1 else 0)) * INTERNVL_TILE_TOKENS


def text_token_bound(turns: list[dict[str, str]]) -> int:
    """An upper bound of the tokens of a conversation in any byte-level tokenizer: its UTF-8 bytes, plus the
    template's markers per turn."""
    return sum(len(t["value"].encode()) + INTERNVL_TURN_OVERHEAD for t in turns)


def thousands(n: int) -> str:
    """A sample count as InternLM-XComposer's ``data.txt`` takes it with ``--given_num True``: the finetune keeps
    ``int(float(x) * 1000)`` samples, so the string is chosen for that to give back exactly ``n`` (``0.041`` for
    41; for 1,001, where ``int(1.001 * 1000)`` is 1,000, the next float up)."""
    text = f"{n / 1000:.3f}".rstrip("0").rstrip(".") or "0"
    x = float(text)
    while int(x * 1000) < n:
        x = math.nextafter(x, math.inf)
        text = repr(x)
    if int(float(text) * 1000) != n:
        raise ValueError(f"no data.txt count gives back {n} samples")
    return text


class Context:
    """What a format needs besides the rows: where the consumer sees the media and the export, the manifests'
    caption instructions, and the export's options."""

    def __init__(self, media_root: str, export_root: str, caption_instructions: set[str],
                 qa_instructions: dict[str, str], open_file: Any, options: Any = None):
        self.media_root = media_root.rstrip("/")
        self.export_root = export_root.rstrip("/")
        self.caption_instructions = caption_instructions
        self.qa_instructions = qa_instructions
        self.open_file = open_file  # rel path inside the export -> writable binary file
        self.options = options
        self.files: dict[str, JsonArrayFile] = {}
        self.notes: Counter = Counter()  # what a consumer's file leaves out by design, by note

    def out(self, rel: str, lines: bool = False) -> JsonArrayFile:
        if rel not in self.files:
            self.files[rel] = JsonArrayFile(self.open_file(rel), lines=lines)
        return self.files[rel]

    def close(self) -> dict[str, int]:
        for f in self.files.values():
            f.close()
        return {rel: f.n for rel, f in sorted(self.files.items())}

    def media(self, rel: str) -> str:
        return locate.join(self.media_root, rel)


class Format(abc.ABC):
    name = ""
    consumer = ""
    #: how this consumer takes a video it cannot decode itself: None (it reads the file), "frames", "composite"
    video_form: str | None = None

    def video_form_for(self, options: Any) -> str | None:
        return self.video_form

    @abc.abstractmethod
    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> str | None:
        """Write ``row``; or return why this consumer cannot take it (the row is counted as skipped, by reason)."""

    def bound(self, ctx: Context, counts: dict[str, int]) -> list[dict[str, Any]]:
        """The files that carry absolute paths (``locate.json`` entries), once every row is written."""
        return []

    def relative_records(self, counts: dict[str, int]) -> list[str]:
        """The record files whose media paths are relative to the media root."""
        return list(counts)

    def spec_extra(self, options: Any) -> dict[str, Any]:
        return {}


class VideoChat2(Format):
    name, consumer = "videochat2", "VideoChat2"
    ANNOTATION = "annotation/videos_images"

    def __init__(self) -> None:
        self.video_files: set[str] = set()

    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> str | None:
        kind = "video" if row["media_kind"] == "video" else "image"
        base = f"{self.ANNOTATION}/{row['dataset']}"
        if kind == "video":
            self.video_files |= {f"{base}/caption_{split}.json", f"{base}/instruction_{split}.json"}
        ctx.out(f"{base}/caption_{split}.json").add({kind: row["rel"], "caption": row["caption"]})
        qa = videochat2_qa(row["turns"], kind, ctx.caption_instructions, ctx.qa_instructions[kind])
        ctx.out(f"{base}/instruction_{split}.json").add({kind: row["rel"], "QA": qa})
        return None

    def bound(self, ctx: Context, counts: dict[str, int]) -> list[dict[str, Any]]:
        entry: dict[str, Any] = {"kind": "videochat2_config", "path": "videochat2_data.py", "pretrain": [], "instruction": []}
        for rel in counts:
            dataset, name = rel.split("/")[-2:]
            form, split = name[: -len(".json")].split("_", 1)
            kind = "video" if rel in self.video_files else "image"
            entry["pretrain" if form == "caption" else "instruction"].append([f"{dataset}_{split}", rel, kind])
        return [entry]


class IXC2(Format):
    name, consumer = "ixc2", "InternLM-XComposer2 / 4KHD / 2.5 finetune"

    def video_form_for(self, options: Any) -> str | None:
        return "composite" if getattr(options, "ixc2_video", "skip") == "composite" else None

    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> str | None:
        if row["media_kind"] == "video":
            if "composite" not in row:
                return "the InternLM-XComposer2 / 4KHD finetune reads no video (ixc2_video: composite gives IXC-2.5 one picture of its frames)"
            if row["composite"] is None:
                return "the video does not decode into frames"
            image = row["composite"]
        else:
            image = row["rel"]
        ctx.out(f"ixc2/{row['dataset']}_{split}.json").add({
            "id": row["id"], "image": [ctx.media(image)], "conversations": ixc2_turns(row["turns"])})
        return None

    def bound(self, ctx: Context, counts: dict[str, int]) -> list[dict[str, Any]]:
        by_split: dict[str, list[list[str]]] = {}
        for rel, n in counts.items():
            split = rel[: -len(".json")].rsplit("_", 1)[1]
            by_split.setdefault(split, []).append([rel, thousands(n)])
        out = [{"kind": "ixc2_data", "path": f"ixc2/data_{split}.txt", "files": files} for split, files in sorted(by_split.items())]
        if "train" in by_split:
            out.append({"kind": "ixc2_data", "path": "ixc2/data.txt", "files": by_split["train"]})
        out += [{"kind": "ixc2_records", "path": rel} for rel in counts]
        return out

    def relative_records(self, counts: dict[str, int]) -> list[str]:
        return []


class InternVL(Format):
    name, consumer = "internvl", "InternVL (internvl_chat)"
    video_form = "frames"

    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> str | None:
        o = ctx.options
        rec: dict[str, Any] = {"id": None}
        if row["media_kind"] == "video":
            frames = row.get("frames")
            if not frames:
                return "the video does not decode into frames"
            rec["image"] = frames
            rec["conversations"] = internvl_video_turns(row["turns"], len(frames))
            tokens = internvl_image_tokens(len(frames), o.internvl_max_dynamic_patch)
        else:
            rec["image"], rec["width"], rec["height"] = row["rel"], row["width"], row["height"]
            rec["conversations"] = row["turns"]
            tokens = internvl_image_tokens(1, o.internvl_max_dynamic_patch)
        if tokens + text_token_bound(rec["conversations"]) > o.internvl_max_seq_length:
            return f"longer than InternVL's max_seq_length {o.internvl_max_seq_length} (its image tokens would be cut)"
        f = ctx.out(f"internvl/{row['dataset']}_{split}.jsonl", lines=True)
        rec["id"] = f.n
        f.add(rec)
        return None

    def bound(self, ctx: Context, counts: dict[str, int]) -> list[dict[str, Any]]:
        metas: dict[str, dict[str, Any]] = {}
        for rel, n in counts.items():
            name = posixpath.basename(rel)[: -len(".jsonl")]
            split = name.rsplit("_", 1)[1]
            metas.setdefault(split, {})[name] = {"annotation": rel, "length": n}
        return [{"kind": "internvl_meta", "path": f"internvl/meta_{split}.json", "datasets": m}
                for split, m in sorted(metas.items())]

    def spec_extra(self, options: Any) -> dict[str, Any]:
        return {"internvl": {"max_dynamic_patch": options.internvl_max_dynamic_patch,
                             "max_seq_length": options.internvl_max_seq_length, "frames": options.video_frames}}


class LLaVA(Format):
    name, consumer = "llava", "LLaVA / Video-LLaVA"

    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> str | None:
        kind = "video" if row["media_kind"] == "video" else "image"
        rec = {"id": row["id"], kind: row["rel"], "conversations": row["turns"]}
        ctx.out(f"llava/{split}_{kind}s.json").add(rec)
        if len(row["turns"]) == 2:
            ctx.out(f"llava/pretrain_{split}_{kind}s.json").add(rec)
        else:
            ctx.notes["llava: rows of more than two turns, left out of the pretraining files (--version plain takes two)"] += 1
        return None


FORMATS: dict[str, type[Format]] = {f.name: f for f in (VideoChat2, IXC2, InternVL, LLaVA)}
