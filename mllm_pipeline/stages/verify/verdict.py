"""The result of a read-back verification: passed or not, its counts, and the first problems by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow.parquet as pq

#: How many problems a verdict names; the rest are counted.
MAX_NAMED = 20


@dataclasses.dataclass
class Verdict:
    """``subject`` is what was verified (``raw/cc3m v-...``, ``media/cc3m/shard-00000 v-...``)."""

    subject: str
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    problem_count: int = 0

    @property
    def passed(self) -> bool:
        return self.problem_count == 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_NAMED:
            self.problems.append(text)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + int(n)

    @property
    def message(self) -> str:
        counts = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        if self.passed:
            return f"{self.subject}: everything accounted for ({counts})"
        more = f" (and {self.problem_count - len(self.problems):,} more)" if self.problem_count > len(self.problems) else ""
        return (f"{self.subject}: {self.problem_count:,} problem(s){more}; " + "; ".join(self.problems)
                + (f" [{counts}]" if counts else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "passed": self.passed, "counts": self.counts, "problems": self.problems,
                "problem_count": self.problem_count}


def current_or_missing(storage: Any, prefix: str, what: str = "", manifest: dict[str, Any] | None = None
                       ) -> tuple[dict[str, Any] | None, Verdict]:
    """The committed manifest of ``prefix`` (or ``manifest``: a version the commit gate is checking before it
    becomes current) and a verdict about it (``<prefix> <version>[ what]``); when nothing is committed, None and a
    verdict that says so."""
    m = manifest if manifest is not None else storage.current(prefix)
    if m is None:
        v = Verdict(prefix)
        v.problem(f"nothing is committed at {prefix}")
        return None, v
    return m, Verdict(f"{prefix} {m['version']}{' ' + what if what else ''}")


def combine(subject: str, verdicts: Iterable[Verdict]) -> Verdict:
    """One verdict for many (the shards of one run): counts summed, problems named in order."""
    out = Verdict(subject)
    for v in verdicts:
        for k, n in v.counts.items():
            out.add(k, n)
        out.problem_count += v.problem_count
        room = MAX_NAMED - len(out.problems)
        if room > 0:
            out.problems += [p if p.startswith(v.subject) else f"{v.subject}: {p}" for p in v.problems[:room]]
    return out


def iter_parquet(storage: Any, rel: str, columns: list[str]) -> Iterator[Any]:
    """Record batches of a committed Parquet file, one row group at a time, only ``columns`` (those it has).
    A file that cannot be read (missing, truncated) raises ``OSError``/``ArrowInvalid`` for the caller to name."""
    with storage.open(rel, "rb") as f:
        pf = pq.ParquetFile(f)
        have = [c for c in columns if c in pf.schema_arrow.names]
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i, columns=have)


def read_columns(storage: Any, rel: str, columns: list[str]) -> Any:
    """The ``columns`` of a Parquet file (small tables: status tables, caption tables of one shard)."""
    import pyarrow as pa

    parts = list(iter_parquet(storage, rel, columns))
    if not parts:
        with storage.open(rel, "rb") as f:
            return pq.ParquetFile(f).schema_arrow.empty_table()
    return pa.concat_tables(parts)


def unreadable(verdict: Verdict, what: str, exc: BaseException) -> None:
    verdict.problem(f"{what} cannot be read ({type(exc).__name__}: {str(exc)[:200]})")
