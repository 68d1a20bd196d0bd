"""Conceptual Captions 3M (CC3M) from the official TSV files.

The official ``Train_GCC-training.tsv`` (3,318,333 rows) and ``Validation_GCC-1.1.0-Validation.tsv`` have no
header: each line is ``caption<TAB>url``. The img2dataset recipe first adds a ``caption<TAB>url`` header line
with sed; both forms are accepted (the header is detected). Captions contain no quotes-escaping, so the file is
read with quoting off: a ``"`` in a caption is just a character.

Sample ids are ``cc3m-<split>-<row>`` with the 1-based data row (header excluded), so the header'd and the plain
file give the same ids.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.sources.common import (
    DEFAULT_ROWS_PER_SHARD,
    IngestReport,
    RawIngest,
    SourceFormatError,
    bad_url,
    base_table,
    const,
    first_reason,
    is_blank,
    joined_raw,
    list_of_one,
    zero_pad,
)
from mllm_pipeline.sources.delimited import read_header, stream_delimited
from mllm_pipeline.storage import Storage

DATASET = "cc3m"
COLUMNS = ["caption", "url"]


def split_from_filename(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    if re.search(r"val", name):
        return "validation"
    if re.search(r"test", name):
        return "test"
    return "train"


def has_header(path: str) -> bool:
    first = [c.lower() for c in read_header(path, "\t")]
    if first == COLUMNS:
        return True
    if len(first) == 2 and first[1].startswith(("http://", "https://")):
        return False
    if len(first) == 2 and not re.match(r"^[a-z][a-z0-9+.\-]*://", first[1]):
        raise SourceFormatError(
            path,
            "the CC3M TSV layout: caption<TAB>url per line, optionally after a 'caption<TAB>url' header",
            f"a first line with columns {first!r}",
        )
    return False


def ingest_cc3m(
    paths: list[str],
    storage: Storage,
    *,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    split: str | None = None,
    logger: Any = None,
    identity: Any = None,
    **raw_options: Any,
) -> IngestReport:
    """Read the CC3M TSV file(s) and commit normalized raw shards under ``raw/cc3m``."""
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, logger=logger, identity=identity, **raw_options) as ing:
        for path in paths:
            ing.begin_source(path)
            header = has_header(path)
            file_split = split or split_from_filename(path)
            data_offset = 1 if header else 0
            for chunk in stream_delimited(
                path, DATASET, delimiter="\t", column_names=None if header else COLUMNS, quoting=False,
                max_set_aside_rate=ing.max_quarantine_rate,
            ):
                ing.count_in(chunk.rows_read)
                ing.quarantine(chunk.rejected)
                if chunk.spans:  # records over more than one line (a quoted line break): the accounting needs them
                    ing.extra.setdefault("multiline_records", {}).setdefault(path, []).extend(chunk.spans)
                if chunk.table is None or chunk.table.num_rows == 0:
                    continue
                t = chunk.table.rename_columns(["caption", "url"]) if header else chunk.table
                n = t.num_rows
                caption, url = t.column("caption"), t.column("url")
                lines = pa.array(chunk.lines)
                reason = first_reason(
                    [
                        ("empty_line", pc.and_(is_blank(url), is_blank(caption))),
                        ("missing_url", is_blank(url)), ("bad_url", bad_url(url)), ("missing_caption", is_blank(caption)),
                    ],
                    n,
                )
                row = pc.subtract(lines, data_offset)
                out = base_table(
                    {
                        "sample_id": pc.binary_join_element_wise(f"cc3m-{file_split}-", zero_pad(row, 9), ""),
                        "dataset": const(DATASET, n),
                        "split": const(file_split, n),
                        "media_kind": const("image", n),
                        "url": url,
                        "captions": list_of_one(caption),
                        "source_file": const(path, n),
                        "source_line": lines,
                    }
                )
                ing.add_checked(out, reason, t, joined_raw("\t"), path)
        ing.extra["header_detected"] = header if paths else None
        return ing.commit()
