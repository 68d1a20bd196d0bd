"""InternLM2's tokenizer as the InternLM-XComposer2-4KHD release ships it, and the official finetune's samples.

The release directory (``internlm/internlm-xcomposer2-4khd-7b``) holds a sentencepiece ``tokenizer.model``, a
``tokenizer_config.json`` naming ``InternLMXComposer2Tokenizer`` through ``auto_map`` and its remote code, and no
``tokenizer.json``. The fixture is that layout with a tiny sentencepiece model trained here with InternLM2's
settings (BPE, byte fallback, digits split, no dummy prefix, no whitespace folding) and its special pieces
(``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the turn markers ``[UNUSED_TOKEN_145]`` / ``[UNUSED_TOKEN_146]``).

The expected ids and masks are a transcription of the official finetune's rules, github InternLM/InternLM-XComposer
@ 0f70c3e3911189de1869396b4017714c31821e3a (read, not copied):

* ``InternLM-XComposer-2.0/finetune/data_mix.py`` ``conv2text``: each turn ``[UNUSED_TOKEN_146]user\\n`` or
  ``[UNUSED_TOKEN_146]assistant\\n``, the value ``.strip()``-ed, then ``[UNUSED_TOKEN_145]\\n``; ``</s>`` at the end;
  no system turn;
* ``modeling_internlm_xcomposer2.py`` ``interleav_wrap`` (the 4KHD hub code; the same function in
  ``InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base/modeling_internlm_xcomposer2.py``): the text is
  cut at the image placeholder, each part tokenized on its own, the first non-empty part with the tokenizer's
  special tokens (``<s>``); the slow ``InternLM2Tokenizer`` cuts at its special tokens and runs sentencepiece on
  each piece;
* ``mask_human_targets``: walking the ids, at each ``[UNUSED_TOKEN_145]`` (id 92542) closing a user turn (an even
  count so far) everything from the end of the last answer to ``i + 6`` is set to -100 — the six ids
  ``[UNUSED_TOKEN_145]``, ``\\n``, ``[UNUSED_TOKEN_146]``, ``ass``, ``istant``, ``\\n`` of InternLM2's vocabulary, i.e.
  ``1 + len("\\n[UNUSED_TOKEN_146]assistant\\n")`` ids, which is how the transcription counts them for the tiny
  vocabulary; at one closing an answer the answer's end is remembered; at ``</s>`` (id 2) everything after it is
  -100.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mllm_pipeline.manifests.conversation import TemplateConfig, conversation, qa_conversation
from mllm_pipeline.manifests.tokenization import (PromptCache, TokenizeConfig, load_tokenizer, tokenize_samples,
                                                  tokenize_turns)

SPECIALS = ["<unk>", "<s>", "</s>", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]
CORPUS = ["a man rides a bicycle down the street", "user assistant system describe the image briefly",
          "a dog runs on the beach", "What is the person doing? He is cooking 2 eggs in a pan.",
          "Can you provide an extremely detailed description for this image?", "两只熊猫在竹林里吃竹子。"]


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """The tokenizer files of the release's layout: tokenizer.model, tokenizer_config.json, remote code."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("internlm-xcomposer2-4khd-7b")
    (out / "corpus.txt").write_text("\n".join(CORPUS * 40))
    spm.SentencePieceTrainer.train(
        input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), vocab_size=480, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", user_defined_symbols=SPECIALS[3:], unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, allow_whitespace_only_pieces=True, minloglevel=2)
    (out / "corpus.txt").unlink()
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm_xcomposer2.InternLMXComposer2Tokenizer", None]},
        "tokenizer_class": "InternLMXComposer2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>", "padding_side": "right"}))
    (out / "tokenization_internlm_xcomposer2.py").write_text("# the release's remote code (never run)\n")
    return out


@pytest.fixture(scope="module")
def sp(release_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(release_dir / "tokenizer.model"))


# -- the official rules, transcribed -----------------------------------------------------------------------------


def official_encode(sp, text: str, add_bos: bool) -> list[int]:
    """The slow InternLM2Tokenizer: cut at the special tokens, sentencepiece on each piece, <s> first."""
    ids = [1] if add_bos else []
    for piece in re.split("(" + "|".join(re.escape(s) for s in SPECIALS) + ")", text):
        if piece in SPECIALS:
            ids.append(sp.piece_to_id(piece))
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


def conv2text(conversations: list[dict]) -> str:
    text = ""
    for turn in conversations:
        role = "user" if turn["from"].lower() in ("human", "user") else "assistant"
        text += f"[UNUSED_TOKEN_146]{role}\n" + turn["value"].strip() + "[UNUSED_TOKEN_145]\n"
    return text + "</s>"


IMG = -1  # where the image's embeddings go (their targets are -100)


def interleave(sp, text: str, placeholder: str = "<image>") -> list[int]:
    out, need_bos = [], True
    parts = text.split(placeholder)
    for k, part in enumerate(parts):
        if part:
            out += official_encode(sp, part, add_bos=need_bos)
            need_bos = False
        if k < len(parts) - 1:
            out.append(IMG)
    return out


def mask_human_targets(sp, ids: list[int]) -> list[int]:
    end_id, eos_id = sp.piece_to_id("[UNUSED_TOKEN_145]"), 2
    after = 1 + len(official_encode(sp, "\n[UNUSED_TOKEN_146]assistant\n", add_bos=False))  # 6 for InternLM2
    targets = list(ids)
    end_count, last_eoa, tid = 0, 0, None
    for i, tid in enumerate(ids):
        if tid == end_id:
            if end_count % 2 == 0:
                targets[last_eoa:i + after] = [-100] * len(targets[last_eoa:i + after])
            else:
                last_eoa = i + 1
            end_count += 1
        elif tid == eos_id:
            targets[i + 1:] = [-100] * len(targets[i + 1:])
            break
    if tid != eos_id and end_count % 2 == 0:
        targets[last_eoa + 1:] = [-100] * len(targets[last_eoa + 1:])
    return targets


def official_sample(sp, record: dict) -> tuple[list[int], list[int]]:
    ids = interleave(sp, conv2text(record["conversations"]))
    targets = mask_human_targets(sp, ids)
    return ids, [int(t != -100 and t != IMG) for t in targets]


def ours(tok, ids: list[int]) -> list[int]:
    image = tok.convert_tokens_to_ids("<image>")
    return [IMG if t == image else t for t in ids]


# -- the tokenizer ---------------------------------------------------------------------------------------------------


TEXTS = CORPUS + ["  leading and trailing  ", "tabs\tand\nnew lines\n\n", "Xylophone 1234567 ½ ünïcödé 🙂",
                  "[UNUSED_TOKEN_146]user\nhi[UNUSED_TOKEN_145]\n"]


def test_the_release_tokenizer_loads_and_encodes_as_sentencepiece(release_dir, sp):
    assert not (release_dir / "tokenizer.json").exists()
    tok = load_tokenizer(str(release_dir))
    assert tok.is_fast and len(tok) == sp.get_piece_size() + 2  # + <image>, <video>
    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
        assert tok(text)["input_ids"] == [1] + sp.encode(text)  # add_bos_token, as InternLM2Tokenizer
    assert tok.convert_tokens_to_ids(SPECIALS) == [sp.piece_to_id(s) for s in SPECIALS]
    assert tok("</s><s>", add_special_tokens=False)["input_ids"] == [2, 1]  # special tokens are single ids
    image, video = tok.convert_tokens_to_ids(["<image>", "<video>"])
    assert (image, video) == (sp.get_piece_size(), sp.get_piece_size() + 1)
    assert tok.decode(sp.encode(CORPUS[5])) == CORPUS[5]
    assert tok(CORPUS[0], add_special_tokens=False)["input_ids"]  # the old failure: every caption became []


def test_a_directory_without_a_readable_vocabulary_is_refused_by_name(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    empty = tmp_path / "only-specials"
    empty.mkdir()
    t = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(SPECIALS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(empty / "tokenizer.json"))
    (empty / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLM2Tokenizer",
                                                             "auto_map": {"AutoTokenizer": ["x.Y", None]}}))
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*no vocabulary for text"):
        load_tokenizer(str(empty))
    code_only = tmp_path / "remote-code-only"
    code_only.mkdir()
    (code_only / "tokenizer_config.json").write_text((empty / "tokenizer_config.json").read_text())
    with pytest.raises(ValueError, match=re.escape(str(code_only))):
        load_tokenizer(str(code_only))


# -- the samples -----------------------------------------------------------------------------------------------------


CAPTIONS = ["a dog runs on the beach", "  He is cooking 2 eggs in a pan.  ", "两只熊猫在竹林里吃竹子。",
            "Xylophone QQ 1234"]


@pytest.mark.parametrize("placeholder_first", [True, False])
def test_single_turn_samples_are_the_official_finetunes(release_dir, sp, placeholder_first):
    tok = load_tokenizer(str(release_dir))
    template = TemplateConfig(style="instruct", placeholder_first=placeholder_first)
    cfg = TokenizeConfig(template=template)  # chat_format "auto" recognises InternLM2's tokenizer
    ids = [f"s{i}" for i in range(len(CAPTIONS))]
    table = tokenize_samples(tok, ids, ["image"] * len(ids), CAPTIONS, np.array([10] * len(ids)), cfg)
    for i, (sid, caption) in enumerate(zip(ids, CAPTIONS)):
        want_ids, want_mask = official_sample(sp, conversation(sid, "image", "x.jpg", caption, template))
        got = table["input_ids"][i].as_py()
        assert ours(tok, got) == want_ids, caption
        assert table["label_mask"][i].as_py() == want_mask, caption
        assert table["seq_len"][i].as_py() == len(got) - 1 + 10
        # what is supervised: the answer, [UNUSED_TOKEN_145], "\n", </s>
        sup = [t for t, m in zip(got, want_mask) if m]
        assert sup == official_encode(sp, caption.strip() + "[UNUSED_TOKEN_145]\n</s>", add_bos=False)


def test_multi_turn_samples_are_the_official_finetunes(release_dir, sp):
    tok = load_tokenizer(str(release_dir))
    template = TemplateConfig(style="instruct")
    turns = [[("What is the person doing?", "He is cooking."), ("How many eggs?", " 2 "), ("where?", "in a pan")],
             [("describe the image briefly", "a dog runs on the beach")]]
    table = tokenize_turns(tok, ["video", "image"], turns, np.array([20, 30]), TokenizeConfig(template=template))
    for i, (kind, pairs) in enumerate(zip(["video", "image"], turns)):
        record = qa_conversation(f"q{i}", kind, "x.mp4", pairs, template)
        want_ids, want_mask = official_sample(sp, json.loads(json.dumps(record).replace("<video>", "<image>")))
        got = table["input_ids"][i].as_py()
        placeholder = tok.convert_tokens_to_ids("<video>" if kind == "video" else "<image>")
        assert [IMG if t == placeholder else t for t in got] == want_ids
        assert table["label_mask"][i].as_py() == want_mask
    # every turn has its markers (the old output was "USER: ... ASSISTANT: ..." with none)
    first = table["input_ids"][0].as_py()
    assert first.count(sp.piece_to_id("[UNUSED_TOKEN_146]")) == 6 and first.count(sp.piece_to_id("[UNUSED_TOKEN_145]")) == 6


def test_a_system_turn_comes_first_and_is_not_supervised(release_dir, sp):
    tok = load_tokenizer(str(release_dir))
    template = TemplateConfig(style="instruct", image_instructions=("describe the image briefly",))
    meta = "You are an AI assistant whose name is InternLM-XComposer."
    plain = PromptCache(tok, TokenizeConfig(template=template))
    with_system = PromptCache(tok, TokenizeConfig(template=template, system=meta))
    want = official_encode(sp, f"[UNUSED_TOKEN_146]system\n{meta}[UNUSED_TOKEN_145]\n", add_bos=True)
    assert with_system.ids("s0", "image") == want + plain.ids("s0", "image")[1:]
    table = tokenize_samples(tok, ["s0"], ["image"], ["a dog"], np.array([5]), TokenizeConfig(template=template, system=meta))
    mask = table["label_mask"][0].as_py()
    assert sum(mask) == len(official_encode(sp, "a dog[UNUSED_TOKEN_145]\n</s>", add_bos=False)) and mask[-1] == 1


def test_truncation_keeps_the_closing_tokens(release_dir, sp):
    tok = load_tokenizer(str(release_dir))
    cfg = TokenizeConfig(template=TemplateConfig(style="instruct"), max_seq_len=60, overlength="truncate")
    long = "Xylophone quartz jukebox " * 6  # unseen words: many byte-fallback pieces
    table = tokenize_samples(tok, ["s0"], ["image"], [long], np.array([10]), cfg)
    ids = table["input_ids"][0].as_py()
    assert table["truncated"][0].as_py() and table["seq_len"][0].as_py() == 60
    assert ids[-3:] == official_encode(sp, "[UNUSED_TOKEN_145]\n</s>", add_bos=False)


def test_the_plain_style_ends_with_eos(release_dir):
    tok = load_tokenizer(str(release_dir))
    plain = PromptCache(tok, TokenizeConfig(template=TemplateConfig(style="plain")))
    assert plain.tail == [tok.eos_token_id]  # pretraining form: [bos] <image> caption </s>


def test_other_families_keep_their_chat_template(tmp_path):
    """A tokenizer with its own chat template (a Llama/Qwen-style LLM) is formatted by that template."""
    from mllm_pipeline.demo.tokenizer import train_tokenizer

    tok = load_tokenizer(str(train_tokenizer(CORPUS * 5, tmp_path, vocab_size=300)))
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    cfg = TokenizeConfig(template=TemplateConfig(style="instruct", image_instructions=("describe",)))
    prompt = PromptCache(tok, cfg).ids("s0", "image")
    want = tok.apply_chat_template([{"role": "user", "content": "<image>\ndescribe"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    assert prompt == list(want)
    table = tokenize_turns(tok, ["image"], [[("q1", "a1"), ("q2", "a2")]], np.array([5]), cfg)
    assert "USER:" not in tok.decode(table["input_ids"][0].as_py())


def test_internlm2_format_needs_its_markers():
    from mllm_pipeline.demo.tokenizer import train_tokenizer

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = load_tokenizer(str(train_tokenizer(["a man rides a bicycle down the street"] * 5, d, vocab_size=280)))
    with pytest.raises(ValueError, match="UNUSED_TOKEN_146"):
        PromptCache(tok, TokenizeConfig(chat_format="internlm2"))
