"""Tokenize conversations for training: input ids, the label mask (answer only), and sequence lengths.

The tokenizer is any Hugging Face tokenizer, by hub name or local path (the LLM's own). ``<image>`` and
``<video>`` are added as special tokens when the tokenizer lacks them, so each placeholder is exactly one id;
the model replaces that one id with the image's (or the video's) tokens, so::

    seq_len = text_tokens - 1 + media_tokens

Prompt formats:

* ``plain`` template style: ``[bos] <image> caption [eos]`` (LLaVA's pretraining form);
* ``instruct`` style: InternLM2's chat format when the tokenizer is InternLM2's (``chat_format="auto"`` sees its
  ``[UNUSED_TOKEN_146]`` / ``[UNUSED_TOKEN_145]`` turn markers, or ``chat_format="internlm2"``)::

      <s>[UNUSED_TOKEN_146]user\\n<image>\\ninstruction[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\ncaption[UNUSED_TOKEN_145]

  (with ``system`` set, ``[UNUSED_TOKEN_146]system\\n...[UNUSED_TOKEN_145]\\n`` comes first; the answer ends with
  ``[UNUSED_TOKEN_145]``, the token InternLM-XComposer2 stops generating at); otherwise the tokenizer's own chat
  template when it has one, else ``[bos] USER: <image>\\ninstruction ASSISTANT: caption [eos]``.

InternLM2's tokenizer ships as remote code (``InternLM2Tokenizer``); ``load_tokenizer`` reads its files without
running that code: ``tokenizer.json`` through ``PreTrainedTokenizerFast``, or, with only the sentencepiece
``tokenizer.model``, through transformers' sentencepiece converter (the ``sentencepiece`` package is then needed).

Only the answer (the caption and the end-of-sequence token) is supervised: ``label_mask`` is 1 there and 0 on
the prompt. Speed: the prompts come from a handful of templates and are tokenized once each; the captions go
through one batched call of the fast tokenizer, and the per-sample lists are assembled with numpy.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mllm_pipeline.manifests.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, TemplateConfig, human_turn

SIMPLE_USER, SIMPLE_ASSISTANT = "USER: ", " ASSISTANT: "
IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"  # InternLM2's turn markers


def is_internlm2(tok: Any) -> bool:
    vocab = tok.get_vocab()
    return IM_START in vocab and IM_END in vocab


def _remote_code_tokenizer(path: Path) -> Any | None:
    """A tokenizer whose config names remote code (InternLM2's): read its files with the library's own classes."""
    import json

    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    if "auto_map" not in cfg and not str(cfg.get("tokenizer_class", "")).startswith("InternLM"):
        return None
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in cfg.items()
               if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v}
    special.setdefault("bos_token", "<s>")
    special.setdefault("eos_token", "</s>")
    special.setdefault("unk_token", "<unk>")
    if (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
    if (path / "tokenizer.model").exists():  # sentencepiece only: transformers converts it to a fast tokenizer
        from transformers import LlamaTokenizerFast

        tok = LlamaTokenizerFast(vocab_file=str(path / "tokenizer.model"), legacy=False, add_bos_token=True,
                                 add_eos_token=False, **special)
        return tok
    return None


def load_tokenizer(name_or_path: str) -> Any:
    """A fast Hugging Face tokenizer with ``<image>`` and ``<video>`` as single special tokens. Never downloads
    when ``HF_HUB_OFFLINE=1``; a missing local path or an unknown name gives a clear error. A tokenizer that
    ships as remote code (InternLM2's) is read from its files without running that code."""
    from pathlib import Path

    from transformers import AutoTokenizer

    local = Path(name_or_path)
    if local.is_dir():
        try:
            tok = _remote_code_tokenizer(local)
        except (OSError, ValueError, ImportError) as e:
            raise ValueError(f"cannot load the tokenizer in {name_or_path!r}: {e}") from None
        if tok is not None:
            return with_placeholders(tok)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer {name_or_path!r}: give a local directory holding tokenizer.json "
                         f"(or a hub name available offline): {e}") from None
    return with_placeholders(tok)


#: A sentence every text tokenizer must turn into tokens (an empty encoding means the tokenizer was not loaded).
PROBE_TEXT = "a man rides a bicycle down the street"


def with_placeholders(tok: Any) -> Any:
    missing = [p for p in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) if p not in tok.get_vocab()]
    if missing:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(p, special=True, normalized=False) for p in missing], special_tokens=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{type(tok).__name__} is a slow tokenizer; the manifests need a fast (Rust) tokenizer")
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token (eos_token); set one before tokenizing")
    probe = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not probe or (tok.unk_token_id is not None and all(t == tok.unk_token_id for t in probe)):
        raise ValueError(f"the tokenizer encodes {PROBE_TEXT!r} to {probe!r}: it has no vocabulary for text (a directory "
                         f"whose tokenizer files were not read: {len(tok)} tokens in all). Give the directory holding "
                         "tokenizer.json, or the model directory with its tokenizer.model and tokenizer_config.json")
    return tok


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    template: TemplateConfig = TemplateConfig()
    # "auto": InternLM2's format for InternLM2's tokenizer, else the tokenizer's chat template if it has one,
    # else "simple"; or name one: "internlm2", "simple"
    chat_format: str = "auto"
    system: str = ""  # InternLM2 format: a system turn before the user's (empty: none)
    max_seq_len: int = 4096  # text tokens + media tokens
    overlength: str = "drop"  # "drop" the sample, or "truncate" the answer (media tokens are never cut)

    def __post_init__(self) -> None:
        if self.chat_format not in ("auto", "simple", "internlm2"):
            raise ValueError(f"chat_format must be 'auto', 'simple' or 'internlm2', not {self.chat_format!r}")
        if self.overlength not in ("drop", "truncate"):
            raise ValueError(f"overlength must be 'drop' or 'truncate', not {self.overlength!r}")
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be at least 8, not {self.max_seq_len}")


class PromptCache:
    """Token ids of each distinct prompt (there are only as many as templates x media kinds)."""

    def __init__(self, tok: Any, config: TokenizeConfig):
        self.tok, self.config = tok, config
        self.cache: dict[tuple[str, str], list[int]] = {}
        self.internlm2 = config.chat_format == "internlm2" or (config.chat_format == "auto" and is_internlm2(tok))
        if self.internlm2 and not is_internlm2(tok):
            raise ValueError(f"chat_format internlm2 needs {IM_START} and {IM_END} in the tokenizer's vocabulary")
        self.use_chat = (not self.internlm2 and config.chat_format == "auto"
                         and bool(getattr(tok, "chat_template", None)))
        # the token that closes an answer (supervised): InternLM2's end of turn, else end of sequence
        self.end_id = tok.convert_tokens_to_ids(IM_END) if self.internlm2 and config.template.style != "plain" \
            else tok.eos_token_id

    def ids(self, sample_id: str, kind: str) -> list[int]:
        human = human_turn(sample_id, kind, self.config.template)
        key = (kind, human)
        got = self.cache.get(key)
        if got is None:
            got = self.cache[key] = self._encode(human)
        return got

    def _encode(self, human: str) -> list[int]:
        tok = self.tok
        if self.config.template.style == "plain":
            ids = tok(human, add_special_tokens=False)["input_ids"]
        elif self.internlm2:
            system = f"{IM_START}system\n{self.config.system}{IM_END}\n" if self.config.system else ""
            text = f"{system}{IM_START}user\n{human}{IM_END}\n{IM_START}assistant\n"
            ids = tok(text, add_special_tokens=False)["input_ids"]
        elif self.use_chat:
            ids = list(tok.apply_chat_template([{"role": "user", "content": human}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
            return ids
        else:
            ids = tok(SIMPLE_USER + human + SIMPLE_ASSISTANT, add_special_tokens=False)["input_ids"]
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + list(ids)


def _list_array(flat: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def tokenize_samples(
    tok: Any,
    sample_ids: list[str],
    media_kinds: list[str],
    captions: list[str],
    media_tokens: np.ndarray,
    config: TokenizeConfig,
    prompts: PromptCache | None = None,
) -> pa.Table:
    """Columns ``input_ids``, ``label_mask``, ``text_tokens``, ``seq_len``, ``truncated``, ``overlength`` for each
    sample, in order. ``overlength`` marks samples longer than ``max_seq_len`` that could not be truncated (or
    that the configuration drops); the caller sets them aside with that reason."""
    n = len(captions)
    prompts = prompts or PromptCache(tok, config)
    answers = tok(captions, add_special_tokens=False)["input_ids"] if n else []
    prompt_ids = [prompts.ids(s, k) for s, k in zip(sample_ids, media_kinds)]
    p_len = np.fromiter((len(p) for p in prompt_ids), dtype=np.int64, count=n)
    a_len = np.fromiter((len(a) for a in answers), dtype=np.int64, count=n) + 1  # + eos
    media_tokens = np.asarray(media_tokens, dtype=np.int64)
    seq = p_len + a_len - 1 + media_tokens
    over = seq > config.max_seq_len
    truncated = np.zeros(n, dtype=bool)
    if config.overlength == "truncate" and over.any():
        room = config.max_seq_len - (p_len - 1 + media_tokens)  # answer tokens that fit, eos included
        fits = room >= 2  # at least one caption token and eos
        cut = over & fits
        a_len = np.where(cut, room, a_len)
        truncated = cut
        over = over & ~fits
        seq = p_len + a_len - 1 + media_tokens
    eos = prompts.end_id
    flat = np.fromiter(
        itertools.chain.from_iterable(
            itertools.chain(p, a[: al - 1], (eos,)) for p, a, al in zip(prompt_ids, answers, a_len.tolist())),
        dtype=np.int32, count=int((p_len + a_len).sum()))
    lengths = p_len + a_len
    starts = np.repeat(np.cumsum(lengths) - lengths + p_len, lengths)  # flat index where each answer starts
    mask = (np.arange(len(flat)) >= starts).astype(np.int8)
    return pa.table({
        "input_ids": _list_array(flat, lengths, pa.int32()),
        "label_mask": _list_array(mask, lengths, pa.int8()),
        "text_tokens": pa.array(lengths.astype(np.int32)),
        "seq_len": pa.array(seq.astype(np.int32)),
        "truncated": pa.array(truncated),
        "overlength": pa.array(over),
    })


def tokenize_turns(
    tok: Any,
    media_kinds: list[str],
    turns: list[list[tuple[str, str]]],
    media_tokens: np.ndarray,
    config: TokenizeConfig,
) -> pa.Table:
    """:func:`tokenize_samples` for instruction samples of one or more (question, answer) turns (MSRVTT-QA).

    Each turn is its prompt (``USER: question ASSISTANT: `` in the simple format, the tokenizer's chat template
    of the user message otherwise; the first turn holds the media placeholder, see
    :func:`~mllm_pipeline.manifests.conversation.qa_human_turn`) and its answer plus end-of-sequence; the label
    mask is 1 on every answer and its end-of-sequence, 0 on every prompt. A sample longer than ``max_seq_len`` is
    ``overlength`` under either ``overlength`` setting: cutting a one-word answer or a turn changes what is asked.
    The questions and the answers each go through one batched tokenizer call."""
    from mllm_pipeline.manifests.conversation import qa_human_turn

    template, n = config.template, len(turns)
    use_chat = config.chat_format == "auto" and bool(getattr(tok, "chat_template", None))
    humans = [qa_human_turn(k, q, template, first=j == 0) for k, ts in zip(media_kinds, turns) for j, (q, _) in enumerate(ts)]
    answers = [a for ts in turns for _, a in ts]
    if use_chat:
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": h}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)) for h in humans]
    else:
        prompts = tok([SIMPLE_USER + h + SIMPLE_ASSISTANT for h in humans], add_special_tokens=False)["input_ids"] if humans else []
    answer_ids = tok(answers, add_special_tokens=False)["input_ids"] if answers else []
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = tok.eos_token_id
    ids_out: list[list[int]] = []
    masks: list[list[int]] = []
    t = 0
    for ts in turns:
        ids: list[int] = []
        mask: list[int] = []
        for j in range(len(ts)):
            p = list(prompts[t])
            if j == 0 and not use_chat:
                p = bos + p
            elif j > 0 and use_chat and bos and p[:1] == bos:
                p = p[1:]  # one sequence, one beginning-of-sequence token
            a = list(answer_ids[t]) + [eos]
            ids += p + a
            mask += [0] * len(p) + [1] * len(a)
            t += 1
        ids_out.append(ids)
        masks.append(mask)
    lengths = np.fromiter((len(x) for x in ids_out), dtype=np.int64, count=n)
    seq = lengths - 1 + np.asarray(media_tokens, dtype=np.int64)
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids_out), dtype=np.int32, count=int(lengths.sum()))
    flat_mask = np.fromiter(itertools.chain.from_iterable(masks), dtype=np.int8, count=int(lengths.sum()))
    return pa.table({
        "input_ids": _list_array(flat_ids, lengths, pa.int32()),
        "label_mask": _list_array(flat_mask, lengths, pa.int8()),
        "text_tokens": pa.array(lengths.astype(np.int32)),
        "seq_len": pa.array(seq.astype(np.int32)),
        "truncated": pa.array(np.zeros(n, dtype=bool)),
        "overlength": pa.array(seq > config.max_seq_len),
    })
