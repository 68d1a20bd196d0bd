"""A tokenizer that encodes text to nothing stops the manifests instead of building them from empty text (what a
tokenizer directory whose vocabulary was not read gives: a handful of special tokens, every caption -> [])."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mllm_pipeline.manifests.tokenization import load_tokenizer


def _save(tmp_path, vocab: dict[str, int], unk: str | None):
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk) if unk else models.WordLevel(vocab=vocab))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token=unk, bos_token="<s>").save_pretrained(tmp_path)
    return str(tmp_path)


def test_only_special_tokens_is_an_error(tmp_path):
    path = _save(tmp_path, {"<unk>": 0, "<s>": 1, "</s>": 2}, "<unk>")
    with pytest.raises(ValueError, match="no vocabulary for text"):
        load_tokenizer(path)


def test_a_real_vocabulary_passes(tmp_path):
    words = "a man rides bicycle down the street".split()
    path = _save(tmp_path, {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}, "<unk>")
    assert len(load_tokenizer(path)("a man rides", add_special_tokens=False)["input_ids"]) == 3
