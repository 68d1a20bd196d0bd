"""The normalized raw-shard schema, the quarantine, and the writer every source parser shares.

Every dataset, whatever its official format, becomes Parquet shards with the same leading columns
(:data:`BASE_SCHEMA`) followed by the source's own columns, prefixed ``src_``. Rows that cannot be used are never
dropped silently: they go to the quarantine table with the file, the line (or JSON locator), the rule they broke
and their original bytes, so ``rows_in == rows_kept + rows_quarantined`` holds for every run and is checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_pipeline.redact import redact_url
from mllm_pipeline.storage import Storage

log = logging.getLogger(__name__)

DEFAULT_ROWS_PER_SHARD = 10_000

#: Low-cardinality text columns (dataset, split, media kind, source file) are dictionary-encoded: one value
#: stored per shard instead of one per row, which also makes writing them nearly free.
LABEL = pa.dictionary(pa.int32(), pa.string())

#: The columns a media shard is fetched from: its identity follows these, so a caption edit re-fetches nothing.
MEDIA_COLUMNS = ("sample_id", "url", "path", "group_id", "clip_start_s", "clip_end_s")
#: The columns the caption stage reads (and the evaluation caption, which says what the first caption means).
CAPTION_COLUMNS = ("sample_id", "captions", "split", "eval_caption")


def _column_digest(col: pa.ChunkedArray | pa.Array) -> bytes:
    """xxh3-128 of one column's values, independent of chunking, slicing and dictionary encoding: strings by their
    lengths and bytes, numbers by their float64 values, lists by their lengths and elements, nulls by position."""
    import xxhash

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    h = xxhash.xxh3_128()
    h.update(str(arr.type).encode())
    h.update(np.asarray(pc.is_valid(arr)).tobytes())
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        h.update(np.asarray(pc.fill_null(pc.list_value_length(arr), -1), dtype=np.int64).tobytes())
        h.update(_column_digest(pc.list_flatten(arr)))
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type):
        width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset: arr.offset + len(arr) + 1]
        h.update(np.diff(offsets).astype(np.int64).tobytes())
        data = arr.buffers()[2]
        if data is not None and len(arr):
            h.update(memoryview(data)[int(offsets[0]): int(offsets[-1])])
    else:
        h.update(np.asarray(pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64).tobytes())
    return h.digest()


def rows_digests(table: pa.Table, kinds: dict[str, Sequence[str]]) -> dict[str, str]:
    """One digest per kind (``{"media": MEDIA_COLUMNS, ...}``) of the values of its columns, row by row,
    independent of how the table is chunked or encoded. A shard's identity for a stage is its digest, so an
    unchanged shard keeps it across re-ingests, and an edited or appended row changes only the shards it lands in.
    Each column is hashed once (xxh3-128), however many kinds use it."""
    import xxhash

    cache: dict[str, bytes] = {}
    out: dict[str, str] = {}
    for kind, columns in kinds.items():
        h = xxhash.xxh3_128()
        h.update(f"{table.num_rows}|{','.join(columns)}|".encode())
        for c in columns:
            if c not in cache:
                cache[c] = _column_digest(table[c]) if c in table.column_names else b"absent"
            h.update(cache[c])
        out[kind] = h.hexdigest()
    return out


def rows_digest(table: pa.Table, columns: Sequence[str]) -> str:
    """:func:`rows_digests` of one set of columns."""
    return rows_digests(table, {"_": columns})["_"]


#: The columns every raw shard starts with, in this order.
BASE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # unique within the dataset, stable across runs
        pa.field("dataset", LABEL, nullable=False),
        pa.field("split", LABEL),  # train / validate / test / val ... as the source names it
        pa.field("media_kind", LABEL, nullable=False),  # "image" or "video"
        pa.field("url", pa.string()),  # where to fetch the media from, if remote
        pa.field("path", pa.string()),  # local or fsspec path of media that is already on disk
        pa.field("group_id", pa.string()),  # rows sharing a group share one media file (InternVid clips)
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("clip_start_s", pa.float64()),
        pa.field("clip_end_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("source_file", LABEL, nullable=False),
        pa.field("source_line", pa.int64()),  # 1-based line in the source file (null for JSON documents)
        # The caption an evaluation protocol scores this sample against (MSR-VTT 1k-A: the JSFusion sentence),
        # also the first element of ``captions``; null when the source names none (every other dataset).
        pa.field("eval_caption", pa.string()),
        # The declared evaluation set the sample belongs to (``msrvtt_ret_test1k``, ``karpathy_test``, ...; see
        # :mod:`mllm_pipeline.sources.eval_sets`); its ``split`` is then that set's evaluation split. Null otherwise.
        pa.field("eval_set", pa.string()),
        # Question/answer pairs about the sample's media (MSRVTT-QA), each with its own split; null when none.
        # ``answer`` is the training answer (the most frequent of ``answers`` when the source gives several);
        # ``answers`` every answer the source gives, null when it gives one.
        pa.field("qa", pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string()), ("split", pa.string()),
                                           ("id", pa.int64()), ("category_id", pa.int64()),
                                           ("answers", pa.list_(pa.string()))]))),
    ]
)
#: The type of the ``qa`` column.
QA_TYPE = BASE_SCHEMA.field("qa").type

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("line", pa.int64()),  # 1-based physical line, where the format has lines
        pa.field("locator", pa.string()),  # "line 17" or "sentences[345]"
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("raw", pa.binary()),  # the original bytes of the record, so nothing is lost
    ]
)


#: The share of a file's rows that may be set aside before the new version is refused at commit (reasons in
#: :data:`BY_DESIGN` excluded): a file that is mostly unreadable is a wrong file or a wrong format, not data.
DEFAULT_MAX_QUARANTINE_RATE = 0.5
#: After this many rows read, an ingest whose set-asides are already above the ceiling stops at once.
FAIL_FAST_ROWS = 1_000_000
#: Set-asides the configuration makes on purpose (MSR-VTT videos outside the 7k / 9k lists, InternVid clips under
#: the configured score thresholds): not faults, so they never count towards the quarantine ceiling.
BY_DESIGN = frozenset({"not_in_split_lists", "train_captions_missing", "below_aesthetic_threshold",
                       "below_umt_threshold"})

#: What each quarantine reason means, shown next to the counts in the UI and used as the row's detail.
REASONS: dict[str, str] = {
    "empty_line": "the line is empty",
    "wrong_field_count": "the line does not have the expected number of fields",
    "invalid_utf8": "the line holds bytes that are not UTF-8",
    "unbalanced_quote": "a quote opened on this line is not closed on it: a stray quote that would swallow the lines after it",
    "invalid_json": "the line is not valid JSON",
    "missing_field": "a required field is missing or has the wrong type",
    "missing_url": "the URL field is empty",
    "bad_url": "the URL is not an absolute URL (scheme://...)",
    "missing_caption": "the caption is empty",
    "bad_id": "the id is not valid for this dataset",
    "duplicate_id": "the id was already seen earlier in the input; the first occurrence is kept",
    "bad_duration": "the duration cannot be parsed",
    "bad_timestamp": "a timestamp cannot be parsed (expected HH:MM:SS.mmm)",
    "end_before_start": "the clip does not end after it starts",
    "below_aesthetic_threshold": "Aesthetic_Score is below the configured minimum",
    "below_umt_threshold": "UMT_Score is below the configured minimum",
    "image_missing": "the caption refers to an image id that is not in the file's images",
    "no_captions": "the image or video has no caption",
    "caption_for_unknown_video": "the caption refers to a video id that is not in the file's videos",
    "media_file_missing": "the media file is not in the configured local directory",
    "missing_image": "the webdataset sample has no image member",
    "not_in_split_lists": "the video is in neither the train list nor the test list of the split scheme; it is not used",
    "unknown_video": "the split list names a video id that is not in the annotation",
    "in_test_list": "the video is also in the test list: it is evaluated on, not trained on",
    "train_captions_missing": "the annotation has no sentences for this video: the 9k / 7k training captions are in "
                              "MSRVTT_data.json or the official videodatainfo files",
    "qa_for_unknown_video": "the question names a video that is not in the annotation",
    "qa_for_set_aside_video": "the question's video was set aside (see its own quarantine row), so the question is too",
    "in_test_file": "the video is also in an evaluation file (test / val): it is evaluated on, not trained on",
    "mc_for_set_aside_video": "the multiple-choice entry's video was set aside (see its own quarantine row)",
    "bad_answer": "the answer is not an index of the entry's options",
    "truncated_tar": "the tar file breaks off here (a truncated download?): the sample it ends in and any after it are lost",
    "repeated_key": "the JSON object names a key more than once, so one of its values would be lost silently",
}


def reason_details(reasons) -> list[str]:
    """The human-readable detail of each reason in ``reasons``."""
    values = reasons.to_pylist() if hasattr(reasons, "to_pylist") else list(reasons)
    return [REASONS.get(r, r) for r in values]


class RepeatedKeys(dict):
    """A JSON object that names a key more than once (``json`` keeps the last value silently); ``pairs`` holds
    every (key, value) as written. Parsers set such a record aside as ``repeated_key``; at the top of a document
    it stops the ingest."""

    pairs: list[tuple[str, Any]]


def json_object(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` that marks objects with a repeated key (see :class:`RepeatedKeys`)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        d = RepeatedKeys(d)
        d.pairs = pairs
    return d


def repeated_keys(obj: Any) -> list[str]:
    """The keys ``obj`` names more than once (empty for anything else)."""
    if not isinstance(obj, RepeatedKeys):
        return []
    seen: Counter[str] = Counter(k for k, _ in obj.pairs)
    return sorted(k for k, n in seen.items() if n > 1)


def raw_json(obj: Any) -> str:
    """A record as it was written, for the quarantine: a repeated key keeps every value."""
    if isinstance(obj, RepeatedKeys):
        return "{" + ", ".join(f"{json.dumps(k)}: {raw_json(v)}" for k, v in obj.pairs) + "}"
    return json.dumps(obj)


class SourceFormatError(ValueError):
    """The file as a whole does not have the structure the parser expects (wrong columns, wrong JSON shape)."""

    def __init__(self, path: str, expected: str, found: str, hint: str = ""):
        self.path, self.expected, self.found, self.hint = path, expected, found, hint
        msg = f"{path}: expected {expected}, but found {found}."
        if hint:
            msg += f" {hint}"
        super().__init__(msg)


@dataclasses.dataclass
class IngestReport:
    """What one ingest run read, kept and set aside; the Dagster asset turns this into metadata."""

    dataset: str
    sources: list[str]
    rows_in: int
    rows_kept: int
    quarantined: dict[str, int]
    shards: list[dict[str, Any]]
    quarantine_files: list[str]
    location: str
    manifest_uri: str
    preview: list[dict[str, Any]]
    extra: dict[str, Any]
    seconds: float
    version: str = ""
    up_to_date: bool = False  # nothing changed: the committed version was reused, nothing was read or written

    @property
    def rows_quarantined(self) -> int:
        return sum(self.quarantined.values())


def empty_like(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def quarantine_table(
    dataset: str,
    source_file: str,
    reasons: Sequence[str] | pa.Array,
    *,
    lines: Sequence[int | None] | pa.Array | np.ndarray | None = None,
    locators: Sequence[str] | pa.Array | None = None,
    details: Sequence[str | None] | pa.Array | None = None,
    raws: Sequence[bytes | None] | pa.Array | None = None,
) -> pa.Table:
    """Build a quarantine table; ``locators`` default to ``"line N"`` from ``lines``."""
    n = len(reasons)
    if lines is None:
        lines = pa.nulls(n, pa.int64())
    lines = pa.array(lines, pa.int64()) if not isinstance(lines, pa.Array) else lines.cast(pa.int64())
    if locators is None:
        locators = pc.binary_join_element_wise("line ", pc.cast(lines, pa.string()), "")
    return pa.table(
        {
            "dataset": pa.repeat(pa.scalar(dataset, pa.string()), n),
            "source_file": pa.repeat(pa.scalar(source_file, pa.string()), n),
            "line": lines,
            "locator": pa.array(locators, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details if details is not None else [None] * n, pa.string()),
            "raw": pa.array(raws if raws is not None else [None] * n, pa.binary()),
        },
        schema=QUARANTINE_SCHEMA,
    )


class _ShardBuffer:
    """Collects tables and writes Parquet files of exactly ``rows_per_shard`` rows (the last one may be short).

    Files are encoded and written on a background thread (pyarrow releases the GIL), so parsing the next block
    overlaps with compressing the previous shard; at most :data:`MAX_WRITES_IN_FLIGHT` shards wait in memory.
    """

    MAX_WRITES_IN_FLIGHT = 8  # one parsed block yields several shards; let them all queue

    def __init__(self, storage: Storage, version, stem: str, rows_per_shard: int, keep_groups: bool = False,
                 digests: bool = False):
        self.storage, self.version, self.stem = storage, version, stem
        self.digests = digests
        self.rows_per_shard = rows_per_shard
        self.keep_groups = keep_groups
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[dict[str, Any]] = []
        self.schema: pa.Schema | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{stem}")
        self._in_flight: deque[Future] = deque()

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.cast(self.schema)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_shard and self._flush(final=False):
            pass

    def _cut(self, table: pa.Table) -> int:
        """Where to end the next shard: at rows_per_shard, or (keep_groups) at the next group boundary."""
        cut = min(self.rows_per_shard, table.num_rows)
        if not self.keep_groups or cut >= table.num_rows:
            return cut
        groups = table.column("group_id")
        boundary = pc.not_equal(groups.slice(1), groups.slice(0, table.num_rows - 1))
        idx = np.flatnonzero(pc.fill_null(boundary, True).to_numpy(zero_copy_only=False)[cut - 1 :])
        return cut + int(idx[0]) if len(idx) else table.num_rows

    def _flush(self, final: bool) -> bool:
        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        cut = self._cut(table)
        if cut == table.num_rows and self.keep_groups and not final:
            self.pending = [table]  # the last group may continue in the next batch
            return False
        head, rest = table.slice(0, cut), table.slice(cut)
        name = f"{self.stem}-{len(self.files):05d}.parquet"
        # dictionary-encode only the label columns: trying it on URLs and captions costs time and gains nothing
        labels = [f.name for f in head.schema if pa.types.is_dictionary(f.type)]
        rel = self.version.rel(name)
        entry: dict[str, Any] = {"file": name, "rows": head.num_rows}

        def write() -> None:
            if self.digests:  # what each later stage's identity of this shard follows (see rows_digest)
                entry["digests"] = rows_digests(head, {"media": MEDIA_COLUMNS, "captions": CAPTION_COLUMNS})
            with self.storage.atomic_write(rel) as f:
                pq.write_table(head, f, compression="zstd", use_dictionary=labels or False)

        while len(self._in_flight) >= self.MAX_WRITES_IN_FLIGHT:
            self._in_flight.popleft().result()  # re-raises a failed write here
        self._in_flight.append(self._writer.submit(write))
        self.files.append(entry)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows
        return True

    def close(self) -> list[dict[str, Any]]:
        """Write what is left and wait until every file is in place."""
        while self.pending_rows:
            self._flush(final=True)
        self.drain()
        return self.files

    def drain(self, raise_errors: bool = True) -> None:
        try:
            while self._in_flight:
                fut = self._in_flight.popleft()
                if raise_errors:
                    fut.result()
                else:
                    fut.exception()
        finally:
            if not self._in_flight:
                self._writer.shutdown(wait=True)


class RawIngest:
    """Writes one dataset's raw shards and quarantine into a new version, then commits it.

    Parsers call :meth:`add` with tables in :data:`BASE_SCHEMA` (plus ``src_*`` columns), :meth:`quarantine`
    with rejected rows, and :meth:`count_in` with the number of records they read. :meth:`commit` refuses to
    publish if the three don't add up.
    """

    def __init__(
        self,
        storage: Storage,
        dataset: str,
        *,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
        prefix: str | None = None,
        keep_groups: bool = False,
        logger: Any = None,
        progress_every: int = 1_000_000,
        identity: Any = None,
        eval_sets: list[str] | None = None,
        max_quarantine_rate: float = DEFAULT_MAX_QUARANTINE_RATE,
    ):
        from mllm_pipeline.sources.eval_sets import load_eval_sets

        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
        if not 0.0 <= max_quarantine_rate <= 1.0:
            raise ValueError(f"max_quarantine_rate must be between 0 and 1, got {max_quarantine_rate}")
        self.max_quarantine_rate = max_quarantine_rate
        self.eval_sets = load_eval_sets(list(eval_sets or []))  # read before anything is written
        self.storage = storage
        self.dataset = dataset
        self.prefix = prefix or f"raw/{dataset}"
        self.log = logger or log
        self.progress_every = progress_every
        self.version = storage.new_version(self.prefix, identity)
        self.shards = _ShardBuffer(storage, self.version, "shard", rows_per_shard, keep_groups=keep_groups, digests=True)
        self.quarantine_buf = _ShardBuffer(storage, self.version, "quarantine", 1_000_000)
        self.sources: list[str] = []
        self.rows_in = 0
        self.rows_kept = 0
        self.reasons: Counter[str] = Counter()
        self.preview: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._next_progress = progress_every

    def __enter__(self) -> RawIngest:
        self.version.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # let in-flight writes finish before their version directory is removed
            self.shards.drain(raise_errors=False)
            self.quarantine_buf.drain(raise_errors=False)
        self.version.__exit__(*exc)

    def begin_source(self, path: str) -> None:
        self.sources.append(path)
        self.log.info(f"[{self.dataset}] reading {path}")

    def count_in(self, n: int) -> None:
        self.rows_in += n
        if self.rows_in >= self._next_progress:
            rate = self.rows_in / max(time.monotonic() - self._t0, 1e-9)
            self.log.info(
                f"[{self.dataset}] {self.rows_in:,} rows read, {self.rows_kept:,} kept, "
                f"{sum(self.reasons.values()):,} quarantined ({rate:,.0f} rows/s)"
            )
            self._next_progress = (self.rows_in // self.progress_every + 1) * self.progress_every

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self.eval_sets:
            from mllm_pipeline.sources.eval_sets import mark

            table = mark(self.dataset, table, self.eval_sets)
        self.rows_kept += table.num_rows
        if len(self.preview) < 5:
            cols = [c for c in table.column_names if c not in ("dataset", "source_file")]
            self.preview.extend({k: redact_url(v) if k == "url" else v for k, v in r.items()}  # into metadata: no secrets
                                for r in table.select(cols).slice(0, 5 - len(self.preview)).to_pylist())
        self.shards.add(table)

    def partition(
        self,
        table: pa.Table,
        reason: pa.Array,
        source: pa.Table,
        raw_of: Callable[[pa.Table], Any],
        source_file: str,
    ) -> pa.Table:
        """Quarantine the rows of ``table`` whose ``reason`` is not null and return the others.

        ``source`` holds the same rows as read from the file; ``raw_of`` turns its rejected rows into their
        original bytes for the quarantine (only called when something is rejected).
        """
        bad = pc.fill_null(pc.is_valid(reason), False)
        if not pc.any(bad).as_py():
            return table
        good, rejected = table.filter(pc.invert(bad)), table.filter(bad)
        why = reason.filter(bad)
        self.quarantine(
            quarantine_table(
                self.dataset,
                source_file,
                why,
                lines=rejected.column("source_line"),
                details=reason_details(why),
                raws=pc.cast(pa.array(raw_of(source.filter(bad))), pa.binary()),
            )
        )
        return good

    def add_checked(self, table, reason, source, raw_of, source_file) -> None:
        """:meth:`partition`, then :meth:`add` the rows that passed."""
        self.add(self.partition(table, reason, source, raw_of, source_file))

    def quarantine(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        for item in pc.value_counts(table.column("reason")).to_pylist():
            self.reasons[item["values"]] += item["counts"]
        self.quarantine_buf.add(table)
        faults = sum(n for r, n in self.reasons.items() if r not in BY_DESIGN)
        if self.rows_in >= FAIL_FAST_ROWS and faults > self.max_quarantine_rate * self.rows_in:
            # the commit would refuse this version: stop now instead of reading the rest of a wrong file
            top = ", ".join(f"{r}: {n:,}" for r, n in self.reasons.most_common(3))
            raise SourceFormatError(
                self.sources[-1] if self.sources else self.dataset, "a file whose rows are mostly usable",
                f"{faults:,} of the first {self.rows_in:,} rows set aside ({top}), more than max_quarantine_rate "
                f"{self.max_quarantine_rate:g}", "Nothing was committed; the current version stays. Check the file "
                "and the format it is read as, or raise max_quarantine_rate.")

    def commit(self) -> IngestReport:
        if self.eval_sets:
            from mllm_pipeline.sources.eval_sets import check_found

            check_found(self.dataset, self.eval_sets)
            self.extra["eval_sets"] = [s.report() for s in self.eval_sets]
            for s in self.eval_sets:
                self.log.info(f"[{self.dataset}] evaluation set {s.name} ({s.source}): {len(s.found):,} of "
                              f"{len(s.keys):,} media found, kept as split {s.split!r}")
        shards = self.shards.close()
        qfiles = [q["file"] for q in self.quarantine_buf.close()]
        quarantined = sum(self.reasons.values())
        if self.rows_in != self.rows_kept + quarantined:
            raise RuntimeError(
                f"[{self.dataset}] row accounting does not add up: {self.rows_in} read, {self.rows_kept} kept, "
                f"{quarantined} quarantined; nothing was committed."
            )
        manifest = self.version.commit(
            {
                "dataset": self.dataset,
                "kind": "raw_shards",
                "sources": self.sources,
                "schema": [f.name for f in (self.shards.schema or BASE_SCHEMA)],
                "shards": shards,
                "quarantine": qfiles,
                "rows_in": self.rows_in,
                "rows_kept": self.rows_kept,
                "quarantined": dict(self.reasons),
                "extra": self.extra,
                "limits": {"max_quarantine_rate": self.max_quarantine_rate},
                "preview": json.loads(json.dumps(self.preview, default=str)),
                "seconds": round(time.monotonic() - self._t0, 3),
            }
        )
        seconds = time.monotonic() - self._t0
        self.log.info(
            f"[{self.dataset}] committed {len(shards)} shard(s), {self.rows_kept:,} rows kept, "
            f"{quarantined:,} quarantined, in {seconds:.1f}s -> {manifest['location']}"
        )
        return IngestReport(
            dataset=self.dataset,
            sources=self.sources,
            rows_in=self.rows_in,
            rows_kept=self.rows_kept,
            quarantined=dict(self.reasons),
            shards=shards,
            quarantine_files=qfiles,
            location=manifest["location"],
            manifest_uri=self.storage.uri(f"{self.prefix}/_manifest.json"),
            preview=self.preview,
            extra=self.extra,
            seconds=seconds,
            version=manifest["version"],
        )


def report_from_manifest(storage: Storage, prefix: str, manifest: dict[str, Any], up_to_date: bool = True) -> IngestReport:
    """The report of an ingest that is already committed (nothing changed since)."""
    return IngestReport(
        dataset=manifest["dataset"], sources=manifest["sources"], rows_in=manifest["rows_in"],
        rows_kept=manifest["rows_kept"], quarantined=manifest["quarantined"], shards=manifest["shards"],
        quarantine_files=manifest["quarantine"], location=manifest["location"],
        manifest_uri=storage.uri(f"{prefix}/_manifest.json"), preview=manifest.get("preview", []),
        extra=manifest.get("extra", {}), seconds=0.0, version=manifest["version"], up_to_date=up_to_date,
    )


def read_raw_shards(storage: Storage, dataset: str, prefix: str | None = None) -> list[str]:
    """URIs of the committed raw shards of ``dataset`` (what downstream stages read)."""
    prefix = prefix or f"raw/{dataset}"
    m = storage.read_manifest(prefix)
    return [storage.uri(f"{prefix}/{m['version']}/{s['file']}") for s in m["shards"]]


@dataclasses.dataclass
class RawShard:
    """One committed raw shard: where it is, and the digests of its rows that later stages are named by."""

    index: int
    uri: str
    rows: int
    digests: dict[str, str]
    raw_prefix: str
    raw_version: str

    def digest(self, kind: str) -> str:
        """The ``media`` or ``captions`` digest (shards written before digests existed: their version and index)."""
        return self.digests.get(kind) or f"{self.raw_version}/{self.index}"

    def ref(self) -> dict[str, str]:
        return {"prefix": self.raw_prefix, "version": self.raw_version}


def raw_shards(storage: Storage, dataset: str, prefix: str | None = None) -> list[RawShard]:
    """The committed raw shards of ``dataset``, in order, with their row digests."""
    prefix = prefix or f"raw/{dataset}"
    m = storage.read_manifest(prefix)
    return [RawShard(i, storage.uri(f"{prefix}/{m['version']}/{s['file']}"), s["rows"], s.get("digests", {}), prefix,
                     m["version"]) for i, s in enumerate(m["shards"])]


def read_quarantine(storage: Storage, dataset: str, prefix: str | None = None) -> pa.Table:
    """The committed quarantine table of ``dataset`` (empty if nothing was set aside)."""
    prefix = prefix or f"raw/{dataset}"
    m = storage.read_manifest(prefix)
    tables = []
    for name in m["quarantine"]:
        with storage.open(f"{prefix}/{m['version']}/{name}") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()


# -- vectorised helpers shared by the parsers ----------------------------------------------------------



def split_by_mask(table: pa.Table, bad: pa.Array | pa.ChunkedArray) -> tuple[pa.Table, pa.Table]:
    """(rows where ``bad`` is false, rows where it is true); nulls in ``bad`` count as false."""
    bad = pc.fill_null(bad, False)
    return table.filter(pc.invert(bad)), table.filter(bad)


def first_reason(conditions: list[tuple[str, pa.Array | pa.ChunkedArray]], n: int) -> pa.Array:
    """Per row, the name of the first condition that is true (null if none): one reason per rejected row."""
    out = pa.nulls(n, pa.string())
    for name, cond in reversed(conditions):
        out = pc.if_else(pc.fill_null(cond, False), pa.scalar(name), out)
    return out


def is_blank(arr) -> pa.Array:
    """Null, empty or ASCII whitespace only (no string copies; other blanks are the cleaning stage's job)."""
    return pc.fill_null(pc.or_(pc.equal(pc.binary_length(arr), 0), pc.ascii_is_space(arr)), True)


def bad_url(arr) -> pa.Array:
    """Not an absolute URL: no ``scheme://`` with a scheme of at least one character and something after it."""
    pos = pc.find_substring(arr, "://")
    return pc.fill_null(pc.or_(pc.less(pos, 1), pc.less_equal(pc.binary_length(arr), pc.add(pos, 3))), True)


def zero_pad(ints, width: int) -> pa.Array:
    return pc.utf8_lpad(pc.cast(ints, pa.string()), width, "0")


def list_of_one(strings) -> pa.Array:
    """Wrap each string in a one-element list (vectorised)."""
    strings = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    offsets = pa.array(np.arange(len(strings) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, strings)


def const(value: str | None, n: int) -> pa.Array:
    """A dictionary-encoded column holding ``value`` ``n`` times (no per-row strings are built)."""
    if value is None:
        return pa.nulls(n, LABEL)
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value], pa.string()))


def base_table(columns: dict[str, Any], extra: dict[str, Any] | None = None) -> pa.Table:
    """Assemble a table with the :data:`BASE_SCHEMA` columns (missing ones null) then ``src_*`` columns."""
    n = len(next(iter(columns.values())))
    arrays, fields = [], []
    for field in BASE_SCHEMA:
        arr = columns.get(field.name)
        if arr is None:
            arr = pa.nulls(n, field.type)
        elif not isinstance(arr, (pa.Array, pa.ChunkedArray)):
            arr = pa.array(arr, field.type)
        if arr.type != field.type:
            arr = arr.dictionary_encode() if field.type == LABEL and arr.type == pa.string() else arr.cast(field.type)
        arrays.append(arr)
        fields.append(field)
    for name, arr in (extra or {}).items():
        if not isinstance(arr, (pa.Array, pa.ChunkedArray)):
            arr = pa.array(arr)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def joined_raw(sep: str) -> Callable[[pa.Table], Any]:
    """``raw_of`` for delimited files: the row's fields joined by ``sep``."""
    return lambda t: pc.binary_join_element_wise(*[pc.fill_null(c, "") for c in t.columns], sep)


def json_raw(t: pa.Table) -> list[bytes]:
    """``raw_of`` for JSON records: the record re-serialised."""
    return [json.dumps(r, ensure_ascii=False).encode() for r in t.to_pylist()]


def summarize_reasons(reasons: dict[str, int]) -> str:
    if not reasons:
        return "none"
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))


class SeenIds:
    """Set membership for a stream of int64 ids, in bounded memory (8 bytes an id) and numpy speed.

    Kept as a few sorted runs whose sizes grow geometrically (like a log-structured merge tree): a batch is
    checked with one binary search per run, then merged in. A Python ``set`` of 10M ints would take ~600 MB;
    this takes ~85 MB.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def first_seen(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: True where the id was not seen before (nor earlier in this batch). Records the ids."""
        ids = np.asarray(ids, dtype=np.int64)
        uniq, first_idx = np.unique(ids, return_index=True)  # sorted needles: cache-friendly searches below
        fresh = np.ones(len(uniq), dtype=bool)
        for run in self.runs:
            pos = np.searchsorted(run, uniq)
            fresh &= run[np.minimum(pos, len(run) - 1)] != uniq
        new = np.zeros(len(ids), dtype=bool)
        new[first_idx[fresh]] = True
        self.runs.append(uniq[fresh])  # already sorted
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            b, a = self.runs.pop(), self.runs.pop()
            merged = np.concatenate([a, b])
            merged.sort(kind="stable")
            self.runs.append(merged)
        return new
