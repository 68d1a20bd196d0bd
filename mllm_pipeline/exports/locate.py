#!/usr/bin/env python3
"""Point an export at where it is now: ``python locate.py [--media-root DIR] [--export-root DIR] [--check]``.

Every export carries a copy of this file (standard library only, so it runs on a training machine without this
project). The records of an export name their media relative to a media root; but some trainers only take
absolute paths in a few files: InternLM-XComposer's ``data.txt`` and the ``image`` of each of its records,
InternVL's ``meta_*.json`` (``root`` and ``annotation``) and VideoChat2's ``available_corpus`` entries. Those
files are *bound* to a location; ``locate.json`` lists them with everything needed to write them again.

After copying an export (and the media) to another machine, run this script once there::

    python /data/export/locate.py --media-root /data/media

The export root defaults to the folder this script is in; the media root defaults to where the media were
relative to the export when it was written (``media/`` inside a ``media: copy`` export; ``../../media`` beside a
shared export), so copying the whole ``exports/`` folder needs no argument at all. ``--check`` also opens every
path the bound files name and counts what is missing. The script prints the trainer's command-line flags with the
new paths.

The export pipeline writes the bound files with these same functions when it writes the export.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

LOCATE_FILE = "locate.json"
SPEC_VERSION = 1


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}"


# -- the bound files, one renderer per kind ------------------------------------------------------------------


def ixc2_data(entry: dict[str, Any], export_root: str, media_root: str) -> str:
    """InternLM-XComposer's ``data.txt``: ``<json path> <samples in thousands>`` per line (``--given_num True``)."""
    if " " in export_root:
        raise ValueError(f"InternLM-XComposer splits data.txt lines on spaces; the export root {export_root!r} has one: "
                         "copy the export to a path without spaces")
    return "".join(f"{join(export_root, rel)} {count}\n" for rel, count in entry["files"])


def internvl_meta(entry: dict[str, Any], export_root: str, media_root: str) -> str:
    """InternVL's ``--meta_path`` file: ``{name: {root, annotation, data_augment, repeat_time, length}}``."""
    out = {name: {"root": media_root.rstrip("/") + "/", "annotation": join(export_root, m["annotation"]),
                  "data_augment": False, "repeat_time": 1, "length": m["length"]}
           for name, m in entry["datasets"].items()}
    return json.dumps(out, indent=2) + "\n"


def videochat2_config(entry: dict[str, Any], export_root: str, media_root: str) -> str:
    """The ``available_corpus`` entries for VideoChat2's ``configs/instruction_data.py`` (or ``configs/data.py``)."""
    def lines(items: list[list[str]]) -> str:
        out = []
        for name, rel, kind in items:
            video = ', "video"' if kind == "video" else ""
            out.append(f"    {name}=[{json.dumps(join(export_root, rel))}, {json.dumps(media_root)}{video}],")
        return "\n".join(out)

    return ("# VideoChat2 data config for this export (written by locate.py): add these entries to available_corpus in\n"
            "# configs/instruction_data.py (instruction files) or configs/data.py (caption files, pretraining), then name\n"
            "# them in train_corpus / train_file. Or: available_corpus.update(instruction_corpus).\n"
            f"pretrain_corpus = dict(\n{lines(entry['pretrain'])}\n)\n"
            f"instruction_corpus = dict(\n{lines(entry['instruction'])}\n)\n")


RENDER: dict[str, Callable[[dict[str, Any], str, str], str]] = {
    "ixc2_data": ixc2_data, "internvl_meta": internvl_meta, "videochat2_config": videochat2_config}


def rebind_records(lines: Iterable[str], old_media: str, new_media: str) -> Iterator[str]:
    """The lines of an InternLM-XComposer record file (a JSON array, one record a line, as the export writes it)
    with every ``image`` path moved from ``old_media`` to ``new_media``."""
    old = old_media.rstrip("/") + "/"
    for n, line in enumerate(lines, 1):
        body = line.rstrip("\n")
        comma = body.endswith(",")
        text = body[:-1] if comma else body
        if not text.startswith("{"):
            yield line if line.endswith("\n") else line + "\n"
            continue
        rec = json.loads(text)
        paths = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
        moved = []
        for p in paths:
            if not p.startswith(old):
                raise ValueError(f"line {n}: image {p!r} is not under the media root {old_media!r} the file was "
                                 "written with; was it edited by hand?")
            moved.append(join(new_media, p[len(old):]))
        rec["image"] = moved if isinstance(rec["image"], list) else moved[0]
        yield json.dumps(rec, ensure_ascii=False) + ("," if comma else "") + "\n"


def usage(spec: dict[str, Any], export_root: str, media_root: str) -> str:
    """The trainer's command-line flags for this export at these roots."""
    files = spec.get("files", [])
    fmt = spec["format"]
    if fmt == "ixc2":
        return ("# InternLM-XComposer2 / 4KHD: InternLM-XComposer-2.0/finetune/finetune.sh (IXC-2.5: finetune/finetune.sh)\n"
                f"--data_path {join(export_root, 'ixc2/data.txt')} --given_num True\n"
                "# 4KHD: --model_name_or_path internlm/internlm-xcomposer2-4khd-7b --img_size 336 --hd_num 16\n"
                "# IXC-2.5: --model_name_or_path internlm/internlm-xcomposer2d5-7b --hd_num 18")
    if fmt == "internvl":
        return ("# InternVL (internvl_chat/internvl/train/internvl_chat_finetune.py)\n"
                f"--meta_path {join(export_root, 'internvl/meta_train.json')} --conv_style internvl2_5 "
                f"--force_image_size 448 --down_sample_ratio 0.5 --dynamic_image_size True --use_thumbnail True "
                f"--max_dynamic_patch {spec['internvl']['max_dynamic_patch']} "
                f"--max_seq_length {spec['internvl']['max_seq_length']}")
    if fmt == "llava":
        def pick(name: str) -> list[str]:
            return [join(export_root, r) for r in files if posixpath.basename(r) == name]
        pre, images, videos = pick("pretrain_train_images.json"), pick("train_images.json"), pick("train_videos.json")
        out = ["# LLaVA (llava/train/train_mem.py)"]
        if pre:
            out.append(f"# pretraining: --version plain --data_path {pre[0]} --image_folder {media_root}")
        if images:
            out.append(f"# finetuning:  --version v1 --data_path {images[0]} --image_folder {media_root}")
        out.append("# Video-LLaVA (videollava/train/train_mem.py)")
        out.append(f"--version v1 --data_path {' '.join(images + videos)} --image_folder {media_root} "
                   f"--video_folder {media_root}")
        return "\n".join(out)
    if fmt == "videochat2":
        return (f"# VideoChat2: the available_corpus entries are in {join(export_root, 'videochat2_data.py')}\n"
                f"# (annotation files under {join(export_root, 'annotation/videos_images')}, media root {media_root})")
    return ""


# -- binding an export on a local disk -----------------------------------------------------------------------


def default_media_root(export_dir: str, spec: dict[str, Any]) -> str | None:
    rel = spec.get("media_rel")
    return None if rel is None else os.path.normpath(os.path.join(export_dir, rel))


def bind(export_dir: str, media_root: str | None = None, export_root: str | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rewrite the bound files of the export in ``export_dir`` for ``export_root`` (default: ``export_dir``) and
    ``media_root`` (default: the media where they were relative to the export). Returns the updated spec."""
    export_dir = os.path.abspath(export_dir)
    spec_path = os.path.join(export_dir, LOCATE_FILE)
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("spec") != SPEC_VERSION:
        raise ValueError(f"{spec_path}: written by another version of the exporter (spec {spec.get('spec')!r})")
    export_root = (export_root or export_dir).rstrip("/")
    media_root = media_root or default_media_root(export_dir, spec)
    if not media_root:
        raise ValueError("where are the media? pass --media-root (the folder the records' paths are relative to)")
    media_root = media_root.rstrip("/")
    for entry in spec["bound"]:
        path = os.path.join(export_dir, entry["path"])
        tmp = path + ".locating"
        with open(tmp, "w", encoding="utf-8") as out:
            if entry["kind"] == "ixc2_records":
                with open(path, encoding="utf-8") as src:
                    out.writelines(rebind_records(src, spec["media_root"], media_root))
            else:
                out.write(RENDER[entry["kind"]](entry, export_root, media_root))
        os.replace(tmp, path)
    spec["media_root"], spec["export_root"] = media_root, export_root
    tmp = spec_path + ".locating"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
    os.replace(tmp, spec_path)
    log(f"{len(spec['bound'])} file(s) now point at export root {export_root} and media root {media_root}")
    return spec


def bound_paths(export_dir: str, spec: dict[str, Any]) -> Iterator[str]:
    """Every media or annotation path the export names, as the trainer will open it."""
    for entry in spec["bound"]:
        path = os.path.join(export_dir, entry["path"])
        if entry["kind"] == "ixc2_data":
            with open(path, encoding="utf-8") as f:
                yield from (line.rsplit(" ", 1)[0] for line in f if line.strip())
        elif entry["kind"] == "ixc2_records":
            with open(path, encoding="utf-8") as f:
                for line in f:
                    text = line.rstrip("\n").rstrip(",")
                    if text.startswith("{"):
                        img = json.loads(text)["image"]
                        yield from (img if isinstance(img, list) else [img])
    for rel in spec.get("relative_records", []):
        with open(os.path.join(export_dir, rel), encoding="utf-8") as f:
            text = f.read()
        records = [json.loads(x) for x in text.splitlines() if x.strip()] if rel.endswith(".jsonl") else json.loads(text)
        for rec in records:
            for key in ("image", "video"):
                v = rec.get(key)
                for p in (v if isinstance(v, list) else [v] if v else []):
                    yield join(spec["media_root"], p)


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--media-root", help="the folder the records' media paths are relative to, on this machine")
    ap.add_argument("--export-root", help="where the trainer sees this export (default: this folder)")
    ap.add_argument("--export-dir", default=here, help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help="also count the named files that are missing")
    args = ap.parse_args(argv)
    try:
        spec = bind(args.export_dir, args.media_root, args.export_root)
    except (OSError, ValueError) as e:
        print(f"locate.py: {e}", file=sys.stderr)
        return 2
    if args.check:
        missing = total = 0
        for p in bound_paths(args.export_dir, spec):
            total += 1
            if not os.path.isfile(p):
                missing += 1
                if missing <= 5:
                    print(f"missing: {p}", file=sys.stderr)
        print(f"checked {total} path(s): {missing} missing")
        if missing:
            return 1
    print(usage(spec, spec["export_root"], spec["media_root"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
