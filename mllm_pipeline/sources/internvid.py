"""InternVid-10M-FLT from its JSON-lines caption file.

Each line: ``{"YoutubeID", "Start_timestamp": "00:03:10.567", "End_timestamp", "Caption", "Aesthetic_Score",
"UMT_Score"}``. Timestamps become seconds; clips whose end is not after their start, lines that are not JSON,
lines with bytes that are not UTF-8 and lines missing a field are quarantined with their line number. Optional
minimum scores set clips aside as ``below_*_threshold`` (the FLT subset is already filtered, so both default off).

Clips are grouped per video: rows are ordered by (YoutubeID, start, end) and a shard never splits a video's clips,
so a download stage fetches each video once and cuts all its clips, each keeping its own caption. The ordering is
an external sort (:class:`ExternalSort`): sorted runs of about a million clips spill to temporary Parquet files and
are merged, so memory stays bounded whatever the file's size (the full 10M-clip file included).

The file is read in blocks; a block of well-formed lines is parsed by pyarrow's JSON reader, and only a block
that contains a bad line is re-read line by line in Python.

Clips already cut (InternVid-10M-FLT is distributed that way) are adopted instead of fetched from YouTube:
``clips_dir`` is their folder and ``clip_name_pattern`` names a clip's file relative to it, from the fields
``{youtube_id}``, ``{start}``, ``{end}`` (``Start_timestamp`` / ``End_timestamp`` exactly as the line spells them,
``HH:MM:SS.mmm``) and ``{start_ms}``, ``{end_ms}`` (the same times in whole milliseconds, as in ``sample_id``); the
default :data:`DEFAULT_CLIP_NAME_PATTERN` gives ``<YoutubeID>_00:03:10.567_00:03:15.100.mp4``. A clip found there
gets ``path`` and keeps its URL; the media stage reads the file (already the clip: it is not cut again) and requests
nothing. A clip not there keeps only its URL (``fetch_missing``, the default) or is set aside as
``media_file_missing``; either way it is counted (``media_not_on_disk``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from mllm_pipeline.sources.common import (
    DEFAULT_ROWS_PER_SHARD,
    IngestReport,
    RawIngest,
    SourceFormatError,
    base_table,
    const,
    first_reason,
    is_blank,
    json_raw,
    list_of_one,
    quarantine_table,
    reason_details,
)
from mllm_pipeline.sources.local_media import folder_index, format_names, name_fields, on_disk_reasons
from mllm_pipeline.storage import Storage, make_scratch_dir, open_source

DATASET = "internvid"
DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"
#: How a cut clip's file is named under ``clips_dir``: the line's own id and timestamps, so names round-trip exactly.
DEFAULT_CLIP_NAME_PATTERN = "{youtube_id}_{start}_{end}.mp4"
CLIP_NAME_FIELDS = ("youtube_id", "start", "end", "start_ms", "end_ms")


def check_clip_name_pattern(pattern: str) -> None:
    """ValueError unless ``pattern`` names a clip: its video (``{youtube_id}``), its start and its end."""
    try:
        fields = {f for _, f in name_fields(pattern) if f is not None}
    except ValueError as e:
        raise ValueError(f"clip_name_pattern: {e}") from None
    unknown = sorted(fields - set(CLIP_NAME_FIELDS))
    if unknown:
        raise ValueError(f"clip_name_pattern {pattern!r} uses unknown field(s) {', '.join(unknown)}; the fields are "
                         f"{', '.join('{' + f + '}' for f in CLIP_NAME_FIELDS)}")
    if "youtube_id" not in fields or not fields & {"start", "start_ms"} or not fields & {"end", "end_ms"}:
        raise ValueError(f"clip_name_pattern {pattern!r} must name the video ({{youtube_id}}), the start ({{start}} or "
                         "{start_ms}) and the end ({end} or {end_ms}): one file per clip")
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


#: The longest JSON line accepted (an InternVid line is about 300 bytes).
MAX_LINE_BYTES = 64 << 20


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
                if len(data) > MAX_LINE_BYTES:  # one line without end (a bomb or not JSON lines): stop, bounded
                    raise SourceFormatError(path, f"JSON lines of at most {MAX_LINE_BYTES:,} bytes each",
                                            f"line {line} running past {len(data):,} bytes without a line break")
                tail = data
                continue
            block, tail = data[: cut + 1], data[cut + 1 :]
            yield line, block
            line += block.count(b"\n")
    if tail:
        yield line, tail + b"\n"


def _is_utf8(block: bytes) -> bool:
    """Arrow's JSON reader stores invalid UTF-8 inside strings as it is; such a block takes the line-by-line path,
    which sets the bad lines aside (``invalid_utf8``). Decoding checks at memory speed."""
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _parse_block(block: bytes, first_line: int, path: str) -> tuple[pa.Table, np.ndarray, pa.Table | None]:
    """Parse one block: (table in FIELDS schema, line numbers, quarantine rows or None)."""
    if not block.startswith(b"\n") and b"\n\n" not in block and b"\r" not in block and _is_utf8(block):
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


SEQ = "_seq"
SORT_RUN_ROWS = 1_000_000  # clips sorted in memory before a run is spilled (about 200 MB)
SORT_KEYS = ("group_id", "clip_start_s", "clip_end_s", SEQ)


class ExternalSort:
    """Sort tables by ``keys`` in bounded memory: runs of ``run_rows`` rows are sorted and spilled to Parquet in
    ``work_dir``; :meth:`sorted` merges them, a batch at a time.

    ``add`` appends a sequence column (``_seq``, the row's position in arrival order) used as the last key, so keys
    are unique and the result equals a stable in-memory sort. The merge is vectorised: it takes, from every run's
    current batch, the rows up to the smallest "last key" among those batches (no unread row can sort before it),
    sorts just those with pyarrow and emits them. Written here because pyarrow has no out-of-core sort and the engines
    that have one (DuckDB, Polars' streaming engine) would be a large new dependency for one ``ORDER BY``.
    """

    def __init__(self, keys: tuple[str, ...] = SORT_KEYS, run_rows: int | None = None, merge_rows: int = 500_000,
                 work_dir: str | None = None):
        self.keys, self.run_rows, self.merge_rows = keys, run_rows or SORT_RUN_ROWS, merge_rows
        # a scratch folder owned by this process (a killed run's is removed by the next run that makes one)
        self._tmp_dir = make_scratch_dir("mllm-sort-", work_dir)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp_dir, True)
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._runs: list[str] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.append_column(SEQ, pa.array(np.arange(self.rows, self.rows + table.num_rows, dtype=np.int64)))
        self.rows += table.num_rows
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.run_rows:
            self._spill()

    def _sorted_buffer(self) -> pa.Table:
        table = pa.concat_tables(self._buffer).combine_chunks()
        self._buffer, self._buffered = [], 0
        return table.sort_by([(k, "ascending") for k in self.keys])

    def _spill(self) -> None:
        path = os.path.join(self._tmp_dir, f"run-{len(self._runs):05d}.parquet")
        pq.write_table(self._sorted_buffer(), path, compression="lz4", row_group_size=16_384)
        self._runs.append(path)

    def sorted(self) -> Iterator[pa.Table]:
        """The rows in key order (with ``_seq``), in batches; then the spilled runs are removed."""
        try:
            if not self._runs:
                if self._buffer:
                    yield self._sorted_buffer()
                return
            if self._buffer:
                self._spill()
            batch_rows = max(1_000, self.merge_rows // len(self._runs))
            # pre_buffer=False: pyarrow's default pre-buffers the whole file's column chunks (about 100 MB a run),
            # which made the merge's memory grow with the number of runs
            readers = [pq.ParquetFile(p, pre_buffer=False).iter_batches(batch_size=batch_rows) for p in self._runs]
            current: list[pa.Table | None] = [self._next(r) for r in readers]
            while any(t is not None for t in current):
                live = [i for i, t in enumerate(current) if t is not None]
                bound = min(tuple(current[i].column(k)[-1].as_py() for k in self.keys) for i in live)
                taken = []
                for i in live:
                    t = current[i]
                    mask = self._up_to(t, bound)
                    taken.append(t.filter(mask))
                    rest = t.filter(pc.invert(mask))
                    current[i] = rest if rest.num_rows else self._next(readers[i])
                yield pa.concat_tables(taken).sort_by([(k, "ascending") for k in self.keys])
        finally:
            self._cleanup()

    @staticmethod
    def _next(reader) -> pa.Table | None:
        batch = next(reader, None)
        return None if batch is None else pa.Table.from_batches([batch])

    def _up_to(self, t: pa.Table, bound: tuple) -> pa.Array:
        """Rows whose key tuple is <= ``bound`` (lexicographic)."""
        mask = None
        for k, v in reversed(list(zip(self.keys, bound))):
            col = t.column(k)
            mask = pc.less_equal(col, v) if mask is None else pc.or_(pc.less(col, v), pc.and_(pc.equal(col, v), mask))
        return mask


def ingest_internvid(
    paths: list[str],
    storage: Storage,
    *,
    min_aesthetic_score: float | None = None,
    min_umt_score: float | None = None,
    url_template: str = DEFAULT_URL_TEMPLATE,
    clips_dir: str | None = None,
    clip_name_pattern: str = DEFAULT_CLIP_NAME_PATTERN,
    fetch_missing: bool = True,
    media_listing: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    logger: Any = None,
    identity: Any = None,
    **raw_options: Any,
) -> IngestReport:
    """Read InternVid JSONL file(s) and commit clip rows, grouped per video, under ``raw/internvid``.

    ``clips_dir`` / ``clip_name_pattern``: clips already cut (see the module doc); ``fetch_missing``: whether a clip
    not there keeps its URL (True) or is set aside as ``media_file_missing``; ``media_listing``: the
    :func:`~mllm_pipeline.sources.local_media.listing_digest` of ``clips_dir`` (the raw version's identity only)."""
    del media_listing  # it names the version; the folder is read here
    if "{id}" not in url_template:
        raise ValueError(f"url_template must contain '{{id}}', got {url_template!r}")
    prefix, suffix = url_template.split("{id}", 1)
    if clips_dir:
        check_clip_name_pattern(clip_name_pattern)
    local = folder_index(clips_dir) if clips_dir else None
    on_disk = not_on_disk = 0
    sorter = ExternalSort()
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, keep_groups=True, logger=logger, identity=identity, **raw_options) as ing:
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
                media_path = None
                if local is not None:
                    media_path = local.find(format_names(clip_name_pattern, {
                        "youtube_id": yid, "start": t.column("Start_timestamp"), "end": t.column("End_timestamp"),
                        "start_ms": pc.cast(start_ms, pa.string()), "end_ms": pc.cast(end_ms, pa.string())}))
                    reason, found, not_found = on_disk_reasons(reason, media_path, fetch_missing)
                    on_disk, not_on_disk = on_disk + found, not_on_disk + not_found
                out = base_table(
                    {
                        "sample_id": pc.binary_join_element_wise(
                            "internvid-", yid, "-", pc.cast(start_ms, pa.string()), "-", pc.cast(end_ms, pa.string()), ""
                        ),
                        "dataset": const(DATASET, n),
                        "split": const("train", n),
                        "media_kind": const("video", n),
                        "url": pc.binary_join_element_wise(prefix, yid, suffix, ""),
                        "path": media_path,
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
                sorter.add(ing.partition(out, reason, t, json_raw, path))
        videos, clips, last, last_id = 0, 0, None, None
        for table in sorter.sorted():  # grouped per video, in bounded memory
            # the same clip twice (same video, start and end): one sample id, so the later lines are set aside
            ids = table.column("sample_id")
            prev = pa.concat_arrays([pa.array([last_id], pa.string()), ids.combine_chunks().slice(0, table.num_rows - 1)])
            dup = pc.fill_null(pc.equal(ids, prev), False)
            last_id = ids[-1].as_py()
            if pc.any(dup).as_py():
                gone = table.filter(dup)
                raws = [json.dumps({"YoutubeID": r["src_youtube_id"], "Start_timestamp": r["src_start_timestamp"],
                                    "End_timestamp": r["src_end_timestamp"], "Caption": (r["captions"] or [None])[0],
                                    "Aesthetic_Score": r["src_aesthetic_score"], "UMT_Score": r["src_umt_score"]}).encode()
                        for r in gone.to_pylist()]
                ing.quarantine(quarantine_table(DATASET, gone["source_file"][0].as_py(), ["duplicate_id"] * gone.num_rows,
                                                lines=gone["source_line"], details=reason_details(["duplicate_id"] * gone.num_rows),
                                                raws=raws))
                table = table.filter(pc.invert(dup))
                if not table.num_rows:
                    continue
            groups = table.column("group_id")
            videos += pc.count_distinct(groups).as_py() - (1 if groups[0].as_py() == last else 0)
            last = groups[-1].as_py()
            clips += table.num_rows
            ing.add(table.drop_columns([SEQ]))
        if clips:
            ing.extra["videos"] = videos
            ing.extra["clips"] = clips
        if local is not None:
            ing.extra["media_on_disk"] = on_disk
            ing.extra["media_not_on_disk"] = not_on_disk
        return ing.commit()
