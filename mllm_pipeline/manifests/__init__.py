"""Tokenized training manifests: captions + media shards -> per-split Parquet and LLaVA / Video-LLaVA JSON.

* :mod:`.conversation` — the LLaVA conversation records and instruction templates (``plain`` / ``instruct``);
* :mod:`.tokenization` — the tokenizer (any Hugging Face fast tokenizer), input ids, the answer-only label mask;
* :mod:`.build` — the join, the split, the media-token counts, over-length handling, the writers;
"""

from mllm_pipeline.manifests.build import (
    MANIFEST_SCHEMA,
    ManifestConfig,
    ManifestWriter,
    assign_split,
    media_bytes,
    read_manifest_split,
    video_token_count,
)
from mllm_pipeline.manifests.conversation import TemplateConfig, conversation
from mllm_pipeline.manifests.tokenization import TokenizeConfig, load_tokenizer, tokenize_samples

__all__ = [
    "MANIFEST_SCHEMA", "ManifestConfig", "ManifestWriter", "TemplateConfig", "TokenizeConfig", "assign_split",
    "conversation", "load_tokenizer", "media_bytes", "read_manifest_split", "tokenize_samples", "video_token_count",
]
