"""The README stays short, and every relative link in it and in the docs/ pages points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Pages the contents table already names while they are being written; drop an entry once its page exists.
NOT_YET_WRITTEN: set[str] = set()

LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(text: str) -> list[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)  # fenced code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return LINK.findall(text)


def _relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")))


def test_docs_pages_exist():
    assert (REPO / "docs").is_dir() and len(PAGES) > 1


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines < 300, f"README.md has {lines} lines; move reference material into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page.read_text()):
        if not _relative(target):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if path.exists() or (path.is_relative_to(REPO) and path.relative_to(REPO).as_posix() in NOT_YET_WRITTEN):
            continue
        broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links to missing files: {broken}"


def test_config_reference_is_generated_from_the_code():
    """docs/config-reference.md is what `python -m mllm_pipeline.config_reference` writes from the config classes now:
    a field added, renamed or re-described without regenerating the page fails here."""
    from mllm_pipeline.definitions import defs
    from mllm_pipeline.config_reference import render

    page = (Path(__file__).resolve().parents[1] / "docs" / "config-reference.md").read_text()
    assert page == render(defs), "regenerate: python -m mllm_pipeline.config_reference > docs/config-reference.md"
    for field in ("max_steps", "options.hd_num_by_dataset", "video_frames", "ixc2_video", "split_scheme", "paths"):
        assert f"`{field}`" in page
