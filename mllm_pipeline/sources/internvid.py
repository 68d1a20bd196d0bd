"""InternVid-10M-FLT from its JSON-lines caption file.

Each line: ``{"YoutubeID", "Start_timestamp": "00:03:10.567", "End_timestamp", "Caption", "Aesthetic_Score",
"UMT_Score"}``. Timestamps become seconds; clips whose end is not after their start, lines that are not JSON,
lines with bytes that are not UTF-8 and lines missing a field are quarantined with their line number. Optional
minimum scores set clips aside as ``below_*_threshold`` (the FLT subset is already filtered, so both default off).

Clips are grouped per video: rows are ordered by (YoutubeID, start) and a shard never splits a video's clips,
so a download stage fetches each video once and cuts all its clips, each keeping its own caption. The grouping
needs the kept clips in memory (about 150 bytes a clip: ~1.5 GB for the full 10M), which is why this parser,
unlike the CSV ones, is not fully streaming.

The file is read in blocks; a block of well-formed lines is parsed by pyarrow's JSON reader, and only a block
that contains a bad line is re-read line by line in Python.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from mllm_pipeline.sources.common import (
    DEFAULT_ROWS_PER_SHARD,
    IngestReport,
    RawIngest,
    base_table,
    const,
    first_reason,
    is_blank,
    json_raw,
    list_of_one,
    quarantine_table,
    reason_details,
)
from mllm_pipeline.storage import Storage, open_source

DATASET = "internvid"
DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"
FIELDS = pa.schema(
    [
        ("YoutubeID", pa.string()),
        ("Start_timestamp", pa.string()),
        ("End_timestamp", pa.string()),
        ("Caption", pa.string()),
        ("Aesthetic_Score", pa.float64()),
        ("UMT_Score", pa.float64()),
    ]
)
TIMESTAMP_RE = r"^(?P<h>\d+):(?P<m>[0-5]?\d):(?P<s>[0-5]?\d(?:\.\d+)?)$"
BLOCK_BYTES = 32 << 20


def parse_timestamp(strings) -> pa.Array:
    """``HH:MM:SS.mmm`` to float seconds; null where unparseable."""
    parts = pc.extract_regex(strings, TIMESTAMP_RE)
    h = pc.cast(pc.struct_field(parts, "h"), pa.float64())
    m = pc.cast(pc.struct_field(parts, "m"), pa.float64())
    s = pc.cast(pc.struct_field(parts, "s"), pa.float64())
    return pc.add(pc.add(pc.multiply(h, 3600.0), pc.multiply(m, 60.0)), s)


def _blocks(path: str):
    """Yield (first line number, block bytes) with blocks ending at a line break."""
    line = 1
    tail = b""
    with open_source(path) as f:
        while True:
            data = f.read(BLOCK_BYTES)
            if not data:
                break
            data = tail + data
            cut = data.rfind(b"\n")
            if cut < 0:
                tail = data
                continue
            block, tail = data[: cut + 1], data[cut + 1 :]
            yield line, block
            line += block.count(b"\n")
    if tail:
        yield line, tail + b"\n"


def _parse_block(block: bytes, first_line: int, path: str) -> tuple[pa.Table, np.ndarray, pa.Table | None]:
    """Parse one block: (table in FIELDS schema, line numbers, quarantine rows or None)."""
    if not block.startswith(b"\n") and b"\n\n" not in block and b"\r" not in block:
        try:
            t = pajson.read_json(
                io.BytesIO(block),
                parse_options=pajson.ParseOptions(explicit_schema=FIELDS, unexpected_field_behavior="ignore"),
            )
            if t.num_rows == block.count(b"\n"):
                return t.select(FIELDS.names), np.arange(first_line, first_line + t.num_rows, dtype=np.int64), None
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    rows, lines, bad = [], [], []
    for i, raw in enumerate(block.split(b"\n")[:-1]):
        lineno = first_line + i
        text = raw.rstrip(b"\r")
        if not text.strip():
            bad.append((lineno, "empty_line", text))
            continue
        try:
            obj = json.loads(text.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((lineno, "invalid_utf8", text))
            continue
        except json.JSONDecodeError:
            bad.append((lineno, "invalid_json", text))
            continue
        if not isinstance(obj, dict):
            bad.append((lineno, "invalid_json", text))
            continue
        rows.append({k: _coerce(obj.get(k), FIELDS.field(k).type) for k in FIELDS.names})
        lines.append(lineno)
    table = pa.Table.from_pylist(rows, schema=FIELDS)
    rej = None
    if bad:
        ln, reasons, raws = zip(*bad)
        rej = quarantine_table(DATASET, path, list(reasons), lines=list(ln), details=reason_details(reasons), raws=list(raws))
    return table, np.asarray(lines, dtype=np.int64), rej


def _coerce(value: Any, type_: pa.DataType) -> Any:
    if pa.types.is_floating(type_):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return value if isinstance(value, str) else None


def ingest_internvid(
    paths: list[str],
    storage: Storage,
    *,
    min_aesthetic_score: float | None = None,
    min_umt_score: float | None = None,
    url_template: str = DEFAULT_URL_TEMPLATE,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    logger: Any = None,
    identity: Any = None,
) -> IngestReport:
    """Read InternVid JSONL file(s) and commit clip rows, grouped per video, under ``raw/internvid``."""
    if "{id}" not in url_template:
        raise ValueError(f"url_template must contain '{{id}}', got {url_template!r}")
    prefix, suffix = url_template.split("{id}", 1)
    kept: list[pa.Table] = []
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, keep_groups=True, logger=logger, identity=identity) as ing:
        for path in paths:
            ing.begin_source(path)
            for first_line, block in _blocks(path):
                t, lines, rej = _parse_block(block, first_line, path)
                ing.count_in(t.num_rows + (0 if rej is None else rej.num_rows))
                if rej is not None:
                    ing.quarantine(rej)
                if t.num_rows == 0:
                    continue
                n = t.num_rows
                yid = t.column("YoutubeID")
                start, end = parse_timestamp(t.column("Start_timestamp")), parse_timestamp(t.column("End_timestamp"))
                aes, umt = t.column("Aesthetic_Score"), t.column("UMT_Score")
                missing = pc.or_(
                    pc.or_(is_blank(yid), pc.is_null(t.column("Caption"))),
                    pc.or_(pc.or_(pc.is_null(t.column("Start_timestamp")), pc.is_null(t.column("End_timestamp"))), pc.or_(pc.is_null(aes), pc.is_null(umt))),
                )
                conditions = [
                    ("missing_field", missing),
                    ("bad_id", pc.invert(pc.match_substring_regex(yid, r"^[A-Za-z0-9_-]{1,64}$"))),
                    ("bad_timestamp", pc.or_(pc.is_null(start), pc.is_null(end))),
                    ("end_before_start", pc.less_equal(end, start)),
                    ("missing_caption", is_blank(t.column("Caption"))),
                ]
                if min_aesthetic_score is not None:
                    conditions.append(("below_aesthetic_threshold", pc.less(aes, min_aesthetic_score)))
                if min_umt_score is not None:
                    conditions.append(("below_umt_threshold", pc.less(umt, min_umt_score)))
                reason = first_reason(conditions, n)
                start_ms = pc.cast(pc.round(pc.multiply(start, 1000.0)), pa.int64())
                end_ms = pc.cast(pc.round(pc.multiply(end, 1000.0)), pa.int64())
                out = base_table(
                    {
                        "sample_id": pc.binary_join_element_wise(
                            "internvid-", yid, "-", pc.cast(start_ms, pa.string()), "-", pc.cast(end_ms, pa.string()), ""
                        ),
                        "dataset": const(DATASET, n),
                        "split": const("train", n),
                        "media_kind": const("video", n),
                        "url": pc.binary_join_element_wise(prefix, yid, suffix, ""),
                        "group_id": yid,
                        "captions": list_of_one(t.column("Caption")),
                        "clip_start_s": start,
                        "clip_end_s": end,
                        "duration_s": pc.subtract(end, start),
                        "source_file": const(path, n),
                        "source_line": pa.array(lines),
                    },
                    extra={
                        "src_youtube_id": yid,
                        "src_start_timestamp": t.column("Start_timestamp"),
                        "src_end_timestamp": t.column("End_timestamp"),
                        "src_aesthetic_score": aes,
                        "src_umt_score": umt,
                    },
                )
                kept.append(ing.partition(out, reason, t, json_raw, path))
        if kept:
            table = pa.concat_tables(kept)
            table = table.sort_by([("group_id", "ascending"), ("clip_start_s", "ascending"), ("clip_end_s", "ascending")])
            ing.extra["videos"] = pc.count_distinct(table.column("group_id")).as_py()
            ing.extra["clips"] = table.num_rows
            ing.add(table)
        return ing.commit()
