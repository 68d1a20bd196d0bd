"""What a fetcher yields for one raw row, and the fetcher's signature (images, videos and adopted tars alike)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass
class Fetched:
    """The outcome for one raw row. ``media`` is ``(extension, bytes)`` on success."""

    row: int
    ok: bool
    reason: str | None = None
    detail: str | None = None
    media: tuple[str, bytes] | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


#: fetch(rows to fetch, scratch logger) -> one Fetched per row, in any order
Fetcher = Callable[[list[dict[str, Any]], Any], Iterator[Fetched]]
