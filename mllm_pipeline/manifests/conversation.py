"""Conversations in the LLaVA / Video-LLaVA schema, built from a caption and an instruction template.

A record looks like what LLaVA-style trainers read::

    {"id": "cc3m-000123", "image": "media/cc3m/shard-00000/00000_00123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the image briefly."},
                       {"from": "gpt", "value": "a dog runs on the beach"}]}

Videos use the key ``"video"`` and the ``<video>`` placeholder. Two template styles:

* ``plain`` — LLaVA's pretraining form: the human turn is the placeholder alone and the answer is the caption;
* ``instruct`` — the human turn is the placeholder plus an instruction picked from a list. The pick is a hash of
  the sample id, so it is the same on every run and spread evenly over the list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

DEFAULT_IMAGE_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What is shown in this picture?",
    "Give a one-sentence description of the image.",
    "Summarize the visual content of the image.",
)
DEFAULT_VIDEO_INSTRUCTIONS = (
    "Describe the video briefly.",
    "What happens in this video?",
    "Write a short caption for this clip.",
    "Summarize the content of the video.",
)


@dataclasses.dataclass(frozen=True)
class TemplateConfig:
    """How a caption becomes a conversation."""

    style: str = "instruct"  # "plain" (LLaVA pretraining) or "instruct"
    image_instructions: tuple[str, ...] = DEFAULT_IMAGE_INSTRUCTIONS
    video_instructions: tuple[str, ...] = DEFAULT_VIDEO_INSTRUCTIONS
    placeholder_first: bool = True  # "<image>\ninstruction" (LLaVA) or "instruction\n<image>"

    def __post_init__(self) -> None:
        if self.style not in ("plain", "instruct"):
            raise ValueError(f"template style must be 'plain' or 'instruct', not {self.style!r}")
        if self.style == "instruct" and (not self.image_instructions or not self.video_instructions):
            raise ValueError("the instruct style needs at least one image and one video instruction")
        for text in (*self.image_instructions, *self.video_instructions):
            if IMAGE_PLACEHOLDER in text or VIDEO_PLACEHOLDER in text:
                raise ValueError(f"an instruction must not contain a placeholder; it is added for you: {text!r}")


def pick(sample_id: str, choices: tuple[str, ...]) -> str:
    digest = hashlib.blake2b(sample_id.encode(), digest_size=8).digest()
    return choices[int.from_bytes(digest, "little") % len(choices)]


def human_turn(sample_id: str, media_kind: str, template: TemplateConfig) -> str:
    placeholder = VIDEO_PLACEHOLDER if media_kind == "video" else IMAGE_PLACEHOLDER
    if template.style == "plain":
        return placeholder
    instruction = pick(sample_id, template.video_instructions if media_kind == "video" else template.image_instructions)
    return f"{placeholder}\n{instruction}" if template.placeholder_first else f"{instruction}\n{placeholder}"


def conversation(sample_id: str, media_kind: str, media_ref: str, caption: str, template: TemplateConfig) -> dict[str, Any]:
    """One LLaVA / Video-LLaVA record."""
    return {
        "id": sample_id,
        ("video" if media_kind == "video" else "image"): media_ref,
        "conversations": [
            {"from": "human", "value": human_turn(sample_id, media_kind, template)},
            {"from": "gpt", "value": caption},
        ],
    }


def conversation_json(record: dict[str, Any]) -> str:
    return json.dumps(record["conversations"], ensure_ascii=False)


def qa_conversation(sample_id: str, media_kind: str, media_ref: str, pairs: list[tuple[str, str]],
                    template: TemplateConfig) -> dict[str, Any]:
    """One instruction record from question/answer pairs about one medium (MSRVTT-QA): the first human turn is the
    placeholder and the first question (in the template's placeholder order), each later turn the question alone;
    each gpt turn is the answer. The template's instructions are not used: the question is the instruction."""
    turns: list[dict[str, str]] = []
    for k, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": qa_human_turn(media_kind, question, template, first=k == 0)})
        turns.append({"from": "gpt", "value": answer})
    return {"id": sample_id, ("video" if media_kind == "video" else "image"): media_ref, "conversations": turns}


def qa_human_turn(media_kind: str, question: str, template: TemplateConfig, first: bool) -> str:
    if not first:
        return question
    placeholder = VIDEO_PLACEHOLDER if media_kind == "video" else IMAGE_PLACEHOLDER
    return f"{placeholder}\n{question}" if template.placeholder_first else f"{question}\n{placeholder}"
