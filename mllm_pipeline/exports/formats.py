"""The files each consumer reads, built from manifest rows (one row: one medium, one conversation).

Every format gets the rows of one split at a time, each with ``rel`` (the medium's path relative to the media
root) and ``turns`` (the manifest's LLaVA conversation, a list of ``{"from": "human"|"gpt", "value": ...}``), and
writes them where and how its consumer expects:

=============  ===============================================================================================
videochat2     ``annotation/videos_images/<dataset>/caption_<split>.json`` — ``[{"image"|"video": path,
               "caption": text}]`` (the pretraining datasets) — and ``instruction_<split>.json`` —
               ``[{"image"|"video": path, "QA": [{"i": instruction, "q": question, "a": answer}]}]`` (the
               instruction-tuning datasets); ``videochat2_data.py`` holds the ``available_corpus`` entries.
ixc2           ``ixc2/<dataset>_<split>.json`` — ``[{"id", "image": [absolute path], "conversations":
               [{"from": "user", "value": "<ImageHere>..."}, {"from": "assistant", ...}]}]`` — and
               ``ixc2/data_<split>.txt`` (``data.txt`` for train): one ``<json path> <samples, in thousands>``
               line per file, what the finetune script's ``--data_path`` takes. Images only: the
               InternLM-XComposer2 / 4KHD finetune code reads no video, so video rows are counted as skipped.
internvl       ``internvl/<dataset>_<split>.jsonl`` — one ``{"id", "image"|"video": path, "width", "height",
               "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}`` a line —
               and ``internvl/meta_<split>.json`` — ``{name: {root, annotation, data_augment, repeat_time,
               length}}``, what ``--meta_path`` takes.
llava          ``llava/<split>_images.json`` and ``llava/<split>_videos.json`` — ``[{"id", "image"|"video":
               path, "conversations"}]`` (LLaVA's ``--data_path`` with ``--image_folder``; Video-LLaVA's with
               ``--image_folder`` and ``--video_folder``, both the media root).
=============  ===============================================================================================

VideoChat2's QA turns come from the conversation, not from the caption: a human turn that is one of the
manifests' caption instructions becomes ``{"i": instruction, "q": "", "a": answer}`` (how VideoChat2's caption
instruction data look); any other human turn is a question, ``{"i": qa_instruction, "q": question, "a": answer}``.
So question-answer rows (several turns each) export as question-answer data.
"""

from __future__ import annotations

import abc

import json
import posixpath
from collections.abc import Iterator
from typing import Any

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
IXC_PLACEHOLDER = "<ImageHere>"
DEFAULT_QA_INSTRUCTIONS = {
    "image": "Look at the image carefully and answer the question.",
    "video": "Watch the video carefully and answer the question.",
}


class JsonArrayFile:
    """A JSON array written element by element (or JSON lines), so no export is held in memory whole."""

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


class Context:
    """What a format needs besides the rows: where the consumer sees the media and the export, and the
    manifests' caption instructions."""

    def __init__(self, media_root: str, export_root: str, caption_instructions: set[str],
                 qa_instructions: dict[str, str], open_file: Any):
        self.media_root = media_root.rstrip("/")
        self.export_root = export_root.rstrip("/")
        self.caption_instructions = caption_instructions
        self.qa_instructions = qa_instructions
        self.open_file = open_file  # rel path inside the export -> writable binary file
        self.files: dict[str, JsonArrayFile] = {}

    def out(self, rel: str, lines: bool = False) -> JsonArrayFile:
        if rel not in self.files:
            self.files[rel] = JsonArrayFile(self.open_file(rel), lines=lines)
        return self.files[rel]

    def close(self) -> dict[str, int]:
        for f in self.files.values():
            f.close()
        return {rel: f.n for rel, f in sorted(self.files.items())}

    def abs_export(self, rel: str) -> str:
        return f"{self.export_root}/{rel}"


class Format(abc.ABC):
    name = ""
    consumer = ""

    @abc.abstractmethod
    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> bool:
        """Write ``row``; False when this consumer cannot take it (counted as skipped)."""

    def finish(self, ctx: Context, counts: dict[str, int]) -> dict[str, str]:
        """Extra files (rel -> text) once every row is written; ``counts``: records per written file."""
        return {}

    @abc.abstractmethod
    def usage(self, export_root: str, media_root: str, files: dict[str, Any]) -> str:
        """The config lines the consumer needs to read this export."""


class VideoChat2(Format):
    name, consumer = "videochat2", "VideoChat2"
    ANNOTATION = "annotation/videos_images"

    def __init__(self) -> None:
        self.video_files: set[str] = set()
        self.snippet = ""

    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> bool:
        kind = "video" if row["media_kind"] == "video" else "image"
        base = f"{self.ANNOTATION}/{row['dataset']}"
        if kind == "video":
            self.video_files |= {f"{base}/caption_{split}.json", f"{base}/instruction_{split}.json"}
        ctx.out(f"{base}/caption_{split}.json").add({kind: row["rel"], "caption": row["caption"]})
        qa = videochat2_qa(row["turns"], kind, ctx.caption_instructions, ctx.qa_instructions[kind])
        ctx.out(f"{base}/instruction_{split}.json").add({kind: row["rel"], "QA": qa})
        return True

    def finish(self, ctx: Context, counts: dict[str, int]) -> dict[str, str]:
        pt, it = [], []
        for rel in counts:
            dataset, name = rel.split("/")[-2:]
            form, split = name[: -len(".json")].split("_", 1)
            video = ', "video"' if rel in self.video_files else ""
            line = f'    {dataset}_{split}=["{ctx.abs_export(rel)}", "{ctx.media_root}"{video}],'
            (pt if form == "caption" else it).append(line)
        text = ("# VideoChat2 data config for this export: add these entries to available_corpus in\n"
                "# configs/data.py (pretraining: caption files) and configs/instruction_data.py (instruction files),\n"
                "# then name them in train_file / train_corpus.\n"
                "pretrain_corpus = dict(\n" + "\n".join(pt) + "\n)\n"
                "instruction_corpus = dict(\n" + "\n".join(it) + "\n)\n")
        self.snippet = text
        return {"videochat2_data.py": text}

    def usage(self, export_root: str, media_root: str, files: dict[str, Any]) -> str:
        return self.snippet


class IXC2(Format):
    name, consumer = "ixc2", "InternLM-XComposer2 / 4KHD finetune"

    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> bool:
        if row["media_kind"] == "video":
            return False
        ctx.out(f"ixc2/{row['dataset']}_{split}.json").add({
            "id": row["id"], "image": [f"{ctx.media_root}/{row['rel']}"], "conversations": ixc2_turns(row["turns"])})
        return True

    def finish(self, ctx: Context, counts: dict[str, int]) -> dict[str, str]:
        by_split: dict[str, list[str]] = {}
        for rel, n in counts.items():
            split = rel[: -len(".json")].rsplit("_", 1)[1]
            by_split.setdefault(split, []).append(f"{ctx.abs_export(rel)} {thousands(n)}")
        out = {f"ixc2/data_{split}.txt": "\n".join(lines) + "\n" for split, lines in sorted(by_split.items())}
        if "train" in by_split:
            out["ixc2/data.txt"] = out["ixc2/data_train.txt"]
        return out

    def usage(self, export_root: str, media_root: str, files: dict[str, Any]) -> str:
        return (f'# finetune/finetune.sh (or finetune_lora.sh)\nDATA="{export_root}/ixc2/data.txt"\n'
                "# 4KHD: --hd_num 16 (any positive number); the image paths in the JSON files are absolute")


def thousands(n: int) -> str:
    """A sample count in thousands, as InternLM-XComposer's data.txt takes it (exact: 41 -> 0.041)."""
    return f"{n / 1000:.3f}".rstrip("0").rstrip(".") or "0"


class InternVL(Format):
    name, consumer = "internvl", "InternVL (internvl_chat)"

    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> bool:
        f = ctx.out(f"internvl/{row['dataset']}_{split}.jsonl", lines=True)
        kind = "video" if row["media_kind"] == "video" else "image"
        rec: dict[str, Any] = {"id": f.n, kind: row["rel"]}
        if kind == "image":
            rec["width"], rec["height"] = row["width"], row["height"]
        rec["conversations"] = row["turns"]
        f.add(rec)
        return True

    def finish(self, ctx: Context, counts: dict[str, int]) -> dict[str, str]:
        metas: dict[str, dict[str, Any]] = {}
        for rel, n in counts.items():
            name = posixpath.basename(rel)[: -len(".jsonl")]
            split = name.rsplit("_", 1)[1]
            metas.setdefault(split, {})[name] = {"root": ctx.media_root, "annotation": ctx.abs_export(rel),
                                                 "data_augment": False, "repeat_time": 1, "length": n}
        return {f"internvl/meta_{split}.json": json.dumps(m, indent=2) + "\n" for split, m in sorted(metas.items())}

    def usage(self, export_root: str, media_root: str, files: dict[str, Any]) -> str:
        return f"# internvl_chat finetune script\n--meta_path {export_root}/internvl/meta_train.json"


class LLaVA(Format):
    name, consumer = "llava", "LLaVA / Video-LLaVA"

    def add(self, ctx: Context, split: str, row: dict[str, Any]) -> bool:
        kind = "video" if row["media_kind"] == "video" else "image"
        ctx.out(f"llava/{split}_{kind}s.json").add({"id": row["id"], kind: row["rel"], "conversations": row["turns"]})
        return True

    def usage(self, export_root: str, media_root: str, files: dict[str, Any]) -> str:
        images = [f"{export_root}/{r}" for r in files if r.startswith("llava/train_images")]
        videos = [f"{export_root}/{r}" for r in files if r.startswith("llava/train_videos")]
        lines = ["# LLaVA (llava/train/train.py)"]
        if images:
            lines.append(f"--data_path {images[0]} --image_folder {media_root}")
        lines.append("# Video-LLaVA (videollava/train/train.py)")
        lines.append(f"--data_path {' '.join(images + videos)} --image_folder {media_root} --video_folder {media_root}")
        return "\n".join(lines)


FORMATS: dict[str, type[Format]] = {f.name: f for f in (VideoChat2, IXC2, InternVL, LLaVA)}
