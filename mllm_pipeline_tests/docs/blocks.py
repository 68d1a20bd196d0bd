"""The fenced blocks of the README and the docs/ pages, and what the docs test does with each.

A block is run unless the line before its fence says otherwise, in an HTML comment (invisible on the rendered
page): ``<!-- docs-test: output -->`` (a sample of output or a tree, nothing to run), ``<!-- docs-test: example:
<reason> -->`` (needs what a test machine has not: a GPU, a cluster, the internet, Docker; the reason says which,
and which test covers it instead) or ``<!-- docs-test: fails: <text> -->`` (a command the page shows failing: it is
run, and must exit non-zero with ``<text>`` in its output). A run block is a ``yaml`` config file whose first line
is ``# <name>.yaml``, or a ``bash`` block of commands.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^([ \t]*)```(\w*)\n(.*?)^\1```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!-- docs-test: (output|example: .+?|fails: .+?) -->")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    text: str
    mark: str  # "" (run it), "output", "example: <reason>" or "fails: <text>"

    @property
    def runs(self) -> bool:
        return not self.mark or self.mark.startswith("fails:")

    @property
    def expected_failure(self) -> str | None:
        return self.mark[len("fails: "):] if self.mark.startswith("fails:") else None

    @property
    def config_name(self) -> str | None:
        first = self.text.lstrip().splitlines()[0] if self.text.strip() else ""
        m = re.match(r"#\s*([\w.-]+\.yaml)\b", first)
        return m.group(1) if self.lang == "yaml" and m else None

    def commands(self) -> list[str]:
        """The block's commands: continuation lines joined, comments and blank lines dropped."""
        out, cur = [], ""
        for raw in self.text.splitlines():
            line = raw.rstrip()
            if cur:
                line = cur + " " + line.lstrip()
                cur = ""
            if line.endswith("\\"):
                cur = line[:-1].rstrip()
                continue
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                out.append(stripped)
        return out

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks() -> list[Block]:
    out = []
    for path in pages():
        text = path.read_text()
        for m in FENCE.finditer(text):
            before = text[:m.start()].rstrip("\n").splitlines()
            prev = before[-1] if before else ""
            mark = MARKER.search(prev)
            body = "\n".join(line[len(m.group(1)):] if line.startswith(m.group(1)) else line
                             for line in m.group(3).splitlines())
            out.append(Block(path.relative_to(REPO).as_posix(), text[:m.start()].count("\n") + 2, m.group(2), body,
                             mark.group(1) if mark else ""))
    return out


def to_run() -> list[Block]:
    return [b for b in blocks() if b.runs]
