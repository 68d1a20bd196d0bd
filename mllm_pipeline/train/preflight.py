"""Checks a training run makes before any process is launched: every model it names can be loaded here, offline.

Nothing downloads models at run time, so a vision tower, LLM or ``init_from`` checkpoint is either a local directory
with a ``config.json`` or a hub name already in the local Hugging Face cache. Found out here, a missing model is one
line naming the field and the fix; found out by eight ranks it is hundreds of log lines and a traceback per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm_pipeline.train.config import TrainError


def _looks_like_hub_name(src: str) -> bool:
    return not src.startswith(("/", ".", "~")) and src.count("/") <= 1


def check_source(field: str, src: str) -> None:
    """``src`` (config field ``field``) can be loaded without the network, or a ``TrainError`` says why and how."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise TrainError(f"{field} {src!r} is a file: give the model's directory (the one with config.json)")
        if not (p / "config.json").is_file():
            raise TrainError(f"{field} {src!r} has no config.json: is it a Hugging Face model directory?")
        return
    if not _looks_like_hub_name(src):
        raise TrainError(f"{field} {src!r} does not exist: give the model's directory, or a hub name in the local "
                         "Hugging Face cache")
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(src, "config.json")
    if not isinstance(found, str):
        raise TrainError(f"{field} {src!r} is neither a local directory nor a model in the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}); nothing is downloaded at run time: run `huggingface-cli "
                         f"download {src}` where there is internet (or copy the cache), or give the model's directory")


def check_model_sources(model: dict[str, Any], init_from: str = "") -> None:
    """Every model a run names (``vision``, ``llm`` of its model config, and ``init_from``) loads offline."""
    if model.get("tiny") and not init_from:
        return
    for field in ("vision", "llm"):
        if model.get(field):
            check_source(field, str(model[field]))
    if init_from:
        check_source("init_from", init_from)
