"""InternLM2's tokenizer (remote code on the hub, read here from its files) and its chat format.

The fixture is a tiny tokenizer laid out like ``internlm/internlm-xcomposer2-4khd-7b``'s: a ``tokenizer_config.json``
naming ``InternLM2Tokenizer`` through ``auto_map`` (code that is not there), ``<s>`` / ``</s>`` and the turn
markers ``[UNUSED_TOKEN_146]`` (start of a turn) and ``[UNUSED_TOKEN_145]`` (end of a turn). The expected ids are
written from the documented prompt format: ``<s>[UNUSED_TOKEN_146]user\\n{query}[UNUSED_TOKEN_145]\\n
[UNUSED_TOKEN_146]assistant\\n{answer}[UNUSED_TOKEN_145]``; the text between special tokens is tokenized as a whole.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mllm_pipeline.manifests.conversation import TemplateConfig
from mllm_pipeline.manifests.tokenization import PromptCache, TokenizeConfig, load_tokenizer, tokenize_samples

SPECIALS = ["<unk>", "<s>", "</s>", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("internlm2-tok")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system describe the image briefly a dog runs on the beach"] * 20,
                            trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    return out


def test_internlm2_tokenizer_loads_without_its_remote_code(internlm2_dir):
    tok = load_tokenizer(str(internlm2_dir))
    assert tok.is_fast
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]) == [1, 2, 3, 4]
    image, video = tok.convert_tokens_to_ids(["<image>", "<video>"])
    assert image >= 300 and video == image + 1  # added as single special tokens


def test_the_prompt_follows_internlm2s_chat_format(internlm2_dir):
    tok = load_tokenizer(str(internlm2_dir))
    image = tok.convert_tokens_to_ids("<image>")
    bos, end, start = 1, 3, 4

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    template = TemplateConfig(style="instruct", image_instructions=("Describe the image briefly.",))
    cfg = TokenizeConfig(template=template)  # chat_format "auto" recognises InternLM2's tokenizer
    prompts = PromptCache(tok, cfg)
    want_prompt = ([bos, start] + enc("user\n") + [image] + enc("\nDescribe the image briefly.") + [end]
                   + enc("\n") + [start] + enc("assistant\n"))
    assert prompts.ids("s0", "image") == want_prompt
    table = tokenize_samples(tok, ["s0"], ["image"], ["a dog runs on the beach"], np.array([10]), cfg, prompts)
    ids = table["input_ids"][0].as_py()
    answer = enc("a dog runs on the beach") + [end]  # the answer closes with the end-of-turn marker
    assert ids == want_prompt + answer
    assert table["label_mask"][0].as_py() == [0] * len(want_prompt) + [1] * len(answer)
    assert table["seq_len"][0].as_py() == len(ids) - 1 + 10

    with_system = PromptCache(tok, TokenizeConfig(template=template, system="You are helpful."))
    assert with_system.ids("s0", "image") == ([bos, start] + enc("system\nYou are helpful.") + [end] + enc("\n")
                                              + want_prompt[1:])
    plain = PromptCache(tok, TokenizeConfig(template=TemplateConfig(style="plain")))
    assert plain.end_id == tok.eos_token_id  # pretraining form: [bos] <image> caption </s>


def test_internlm2_format_needs_its_markers():
    from mllm_pipeline.demo.tokenizer import train_tokenizer

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = load_tokenizer(str(train_tokenizer(["a b c"] * 5, d, vocab_size=280)))
    with pytest.raises(ValueError, match="UNUSED_TOKEN_146"):
        PromptCache(tok, TokenizeConfig(chat_format="internlm2"))
