"""Tokenize conversations for training: input ids, the label mask (answer only), and sequence lengths.

The tokenizer is any Hugging Face tokenizer, by hub name or local path (the LLM's own). ``<image>`` and
``<video>`` are added as special tokens when the tokenizer lacks them, so each placeholder is exactly one id;
the model replaces that one id with the image's (or the video's) tokens, so::

    seq_len = text_tokens - 1 + media_tokens

Prompt formats:

* ``plain`` template style: ``[bos] <image> caption [eos]`` (LLaVA's pretraining form);
* ``instruct`` style: InternLM2's chat format when the tokenizer is InternLM2's (``chat_format="auto"`` sees its
  ``[UNUSED_TOKEN_146]`` / ``[UNUSED_TOKEN_145]`` turn markers, or ``chat_format="internlm2"``), as the official
  InternLM-XComposer2(-4KHD) finetune builds a sample (``finetune/data_mix.py`` ``conv2text``: every turn
  ``[UNUSED_TOKEN_146]{user|assistant}\n{value.strip()}[UNUSED_TOKEN_145]\n``, then ``</s>``; the tokenizer adds
  ``<s>``)::

      <s>[UNUSED_TOKEN_146]user\n<image>\ninstruction[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\ncaption[UNUSED_TOKEN_145]\n</s>

  and supervised as its ``mask_human_targets`` does: every answer and the ``[UNUSED_TOKEN_145]`` closing it; after
  the last answer also the ``\n`` and ``</s>``; nothing of the user turns, the ``\n`` after an earlier answer or
  the ``[UNUSED_TOKEN_146]assistant\n`` headers. Multi-turn samples (``tokenize_turns``) repeat the user/assistant
  pair. The finetune has no system turn; with ``system`` set, ``[UNUSED_TOKEN_146]system\n...[UNUSED_TOKEN_145]\n``
  (the chat demo's meta instruction) comes first, unsupervised. An answer is tokenized in its context
  (``assistant\n`` + answer is one piece of text for the official tokenizer) and the ids of ``assistant\n`` taken
  off, so the ids are the official ones even where the answer's first piece could merge with the header;
* otherwise the tokenizer's own chat template when it has one (other LLM families), else
  ``[bos] USER: <image>\ninstruction ASSISTANT: caption [eos]``.

InternLM2's tokenizer ships as remote code (``InternLM2Tokenizer``); ``load_tokenizer`` reads its files without
running that code: ``tokenizer.json`` through ``PreTrainedTokenizerFast``, or, with only the sentencepiece
``tokenizer.model`` (the release's form), through transformers' sentencepiece converter, checked against the
``sentencepiece`` package on a few texts.

Only the answers (and what closes them, above) are supervised: ``label_mask`` is 1 there and 0 on the prompt.
Speed: the prompts come from a handful of templates and are tokenized once each; the captions go
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
    if (path / "tokenizer.model").exists():  # the release's form: a sentencepiece model + remote code
        return sentencepiece_tokenizer(path / "tokenizer.model", cfg, special)
    return None


def _model_proto(data: bytes) -> Any:
    """sentencepiece's ModelProto, parsed with the protobuf module that transformers ships (the one inside the
    sentencepiece wheel may need a newer protobuf runtime than the one installed)."""
    import google.protobuf

    if int(google.protobuf.__version__.split(".")[0]) < 4:
        from transformers.utils import sentencepiece_model_pb2 as pb
    else:
        from transformers.utils import sentencepiece_model_pb2_new as pb
    proto = pb.ModelProto()
    proto.ParseFromString(data)
    return proto


def sentencepiece_tokenizer(model_file: Path, config: dict[str, Any], special: dict[str, str]) -> Any:
    """A fast tokenizer that encodes as the sentencepiece model ``model_file`` does (InternLM2's ``tokenizer.model``:
    BPE with byte fallback): the model's own normalizer settings, its pieces and merges (transformers'
    ``SpmConverter.build_tokenizer_from_spm_proto``), every chunk between special tokens encoded on its own as the
    slow remote-code tokenizer does. ``<s>`` is prepended when ``add_bos_token`` (default) and ``</s>`` appended
    when ``add_eos_token`` (default off), as ``InternLM2Tokenizer`` does. The sentencepiece control pieces, the
    tokenizer config's special tokens and InternLM2's turn markers are single special tokens. When the
    ``sentencepiece`` package is installed the result is checked against it on a few texts."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    data = model_file.read_bytes()
    proto = _model_proto(data)
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise ValueError(f"{model_file}: sentencepiece model type {proto.trainer_spec.model_type} is not BPE or unigram")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    vocab_arg: Any = vocab if proto.trainer_spec.model_type == 2 else [(p.piece, p.score) for p in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab_arg, legacy=True)
    if backend is None:
        raise ValueError(f"{model_file}: could not build a tokenizer from this sentencepiece model")
    names = [p.piece for p in proto.pieces if p.type == 3]  # control pieces: <s>, </s>
    names += [special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if special.get(k) in vocab]
    for tid, entry in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and entry.get("special") and entry.get("content") in vocab:
            names.append(entry["content"])
    names += [t for t in config.get("additional_special_tokens") or [] if t in vocab]
    names += [t for t in (IM_START, IM_END) if t in vocab]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(names)])
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    single = ([f"{bos}:0"] if add_bos and bos in vocab else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos in vocab else [])
    pair = single + [x.replace(":0", ":1").replace("$A", "$B") for x in single]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t in vocab])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    _check_against_sentencepiece(tok, data, model_file)
    return tok


def _check_against_sentencepiece(tok: Any, data: bytes, model_file: Path) -> None:
    try:
        import sentencepiece
    except ImportError:  # the converter follows the model's settings; the check needs the package
        return
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    texts = (PROBE_TEXT, " Two  spaces,\nnew lines\tand tabs. ", "数字 1234 ünïcödé ½ — emoji 🙂")
    for text in texts:
        want, got = sp.encode(text), tok(text, add_special_tokens=False)["input_ids"]
        if got != want:
            raise ValueError(f"{model_file}: the tokenizer built from this sentencepiece model encodes {text!r} as "
                             f"{got[:12]}..., sentencepiece as {want[:12]}...; refusing to tokenize with it")


def load_tokenizer(name_or_path: str) -> Any:
    """A fast Hugging Face tokenizer with ``<image>`` and ``<video>`` as single special tokens. Never downloads
    when ``HF_HUB_OFFLINE=1``; a missing local path or an unknown name gives a clear error. A tokenizer that
    ships as remote code (InternLM2's: ``tokenizer.model`` + ``tokenizer_config.json``, the form of the
    InternLM-XComposer2 releases) is read from its files without running that code. A tokenizer that encodes
    ordinary text to nothing or to unknown tokens is refused with the directory named."""
    from transformers import AutoTokenizer

    local = Path(name_or_path)
    tok = None
    if local.is_dir():
        try:
            tok = _remote_code_tokenizer(local)
        except (OSError, ValueError, ImportError) as e:
            raise ValueError(f"cannot load the tokenizer in {name_or_path!r}: {e}") from None
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the tokenizer {name_or_path!r}: give a local directory holding "
                             f"tokenizer.json (or a hub name available offline): {e}") from None
    try:
        return with_placeholders(tok)
    except ValueError as e:
        raise ValueError(f"tokenizer {name_or_path!r}: {e}") from None


#: A sentence every text tokenizer must turn into known tokens (an empty encoding, or unknown tokens, means the
#: tokenizer's vocabulary was not read).
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
    if not probe or (tok.unk_token_id is not None and tok.unk_token_id in probe):
        raise ValueError(f"it encodes {PROBE_TEXT!r} to {probe!r}: it has no vocabulary for text (a directory "
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
        tok = self.tok
        eos = tok.eos_token_id
        self.official = self.internlm2 and config.template.style != "plain"
        if self.official:  # the official finetune's: answer [UNUSED_TOKEN_145] \n </s>
            self.end_id = tok.convert_tokens_to_ids(IM_END)
            self.newline = list(tok("\n", add_special_tokens=False)["input_ids"])
            self.tail = [self.end_id, *self.newline, eos]
            self.header = list(tok("assistant\n", add_special_tokens=False)["input_ids"])
        else:
            self.end_id = eos
            self.newline, self.tail, self.header = [], [eos], []

    def answers(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each answer, as they read in the sample (see the module docstring); one batched call."""
        if not texts:
            return []
        tok = self.tok
        if not self.official:
            return [list(a) for a in tok(texts, add_special_tokens=False)["input_ids"]]
        k = len(self.header)
        ids = tok(["assistant\n" + t.strip() for t in texts], add_special_tokens=False)["input_ids"]
        out = []
        for text, a in zip(texts, ids):
            if list(a[:k]) == self.header:
                out.append(list(a[k:]))
            else:  # the answer's first piece merged with the header: cannot be cut apart, take it alone
                out.append(list(tok(text.strip(), add_special_tokens=False)["input_ids"]))
        return out

    def system_ids(self) -> list[int]:
        if not self.config.system:
            return []
        return list(self.tok(f"{IM_START}system\n{self.config.system}{IM_END}\n", add_special_tokens=False)["input_ids"])

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
            text = f"{IM_START}user\n{human.strip()}{IM_END}\n{IM_START}assistant\n"
            ids = self.system_ids() + list(tok(text, add_special_tokens=False)["input_ids"])
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
    answers = prompts.answers(captions)
    tail = prompts.tail  # closes the answer, supervised: </s>, or InternLM2's [UNUSED_TOKEN_145] \n </s>
    k = len(tail)
    prompt_ids = [prompts.ids(s, kd) for s, kd in zip(sample_ids, media_kinds)]
    p_len = np.fromiter((len(p) for p in prompt_ids), dtype=np.int64, count=n)
    a_len = np.fromiter((len(a) for a in answers), dtype=np.int64, count=n) + k
    media_tokens = np.asarray(media_tokens, dtype=np.int64)
    seq = p_len + a_len - 1 + media_tokens
    over = seq > config.max_seq_len
    truncated = np.zeros(n, dtype=bool)
    if config.overlength == "truncate" and over.any():
        room = config.max_seq_len - (p_len - 1 + media_tokens)  # answer tokens that fit, its closing tokens included
        fits = room >= k + 1  # at least one caption token and the closing tokens
        cut = over & fits
        a_len = np.where(cut, room, a_len)
        truncated = cut
        over = over & ~fits
        seq = p_len + a_len - 1 + media_tokens
    flat = np.fromiter(
        itertools.chain.from_iterable(
            itertools.chain(p, a[: al - k], tail) for p, a, al in zip(prompt_ids, answers, a_len.tolist())),
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

    With InternLM2's tokenizer the turns are the official finetune's (module docstring: turn markers, what is
    supervised). Otherwise each turn is its prompt (``USER: question ASSISTANT: `` in the simple format, the
    tokenizer's chat template of the user message otherwise) and its answer plus end-of-sequence, the label mask 1
    on every answer and its end-of-sequence, 0 on every prompt. The first turn holds the media placeholder (see
    :func:`~mllm_pipeline.manifests.conversation.qa_human_turn`). A sample longer than ``max_seq_len`` is
    ``overlength`` under either ``overlength`` setting: cutting a one-word answer or a turn changes what is asked.
    The questions and the answers each go through one batched tokenizer call."""
    from mllm_pipeline.manifests.conversation import qa_human_turn

    template, n = config.template, len(turns)
    cache = PromptCache(tok, config)
    use_chat = not cache.internlm2 and config.chat_format == "auto" and bool(getattr(tok, "chat_template", None))
    humans = [qa_human_turn(k, q, template, first=j == 0) for k, ts in zip(media_kinds, turns) for j, (q, _) in enumerate(ts)]
    answers = [a for ts in turns for _, a in ts]
    if cache.internlm2:  # the official finetune's turns (module docstring)
        texts = [f"{IM_START}user\n{h.strip()}{IM_END}\n{IM_START}assistant\n" for h in humans]
        prompts = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        answer_ids = PromptCache(tok, dataclasses.replace(config, template=dataclasses.replace(
            template, style="instruct"))).answers(answers)
        first = cache.system_ids()
    elif use_chat:
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": h}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)) for h in humans]
        answer_ids, first = cache.answers(answers), []
    else:
        prompts = tok([SIMPLE_USER + h + SIMPLE_ASSISTANT for h in humans], add_special_tokens=False)["input_ids"] if humans else []
        answer_ids, first = cache.answers(answers), []
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = tok.eos_token_id
    end, newline = tok.convert_tokens_to_ids(IM_END) if cache.internlm2 else None, \
        list(tok("\n", add_special_tokens=False)["input_ids"]) if cache.internlm2 else []
    ids_out: list[list[int]] = []
    masks: list[list[int]] = []
    t = 0
    for ts in turns:
        ids: list[int] = []
        mask: list[int] = []
        for j in range(len(ts)):
            p = list(prompts[t])
            if j == 0 and not use_chat:
                p = bos + first + p
            elif j > 0 and use_chat and bos and p[:1] == bos:
                p = p[1:]  # one sequence, one beginning-of-sequence token
            last = j == len(ts) - 1
            if cache.internlm2:
                # answer [145] supervised; then "\n" (supervised only after the last answer) and </s>
                a, after = list(answer_ids[t]) + [end], newline + [eos] if last else newline
                ids += p + a + after
                mask += [0] * len(p) + [1] * len(a) + [1 if last else 0] * len(after)
            else:
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
