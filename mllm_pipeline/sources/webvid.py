"""WebVid-10M / WebVid-2M from the official CSV files (``results_10M_train.csv``, ``results_2M_val.csv``, ...).

Columns (by header name, in any order): ``videoid``, ``contentUrl``, ``duration`` (ISO-8601, e.g. ``PT00H00M09S``),
``page_dir``, ``name`` (the caption) and, in some releases, ``page_idx``. The 10M train file is 10.7M rows, so it
is streamed in blocks; peak memory stays well under 2 GiB (see ``bench/``).

The real files repeat some ``videoid`` values (the page was re-crawled and the caption updated). The first
occurrence is kept and every later one is quarantined as ``duplicate_id`` with its line, so the count is visible
and nothing is lost.

Most ``contentUrl``s are gone (HTTP 403 since 2024), so videos you already have are adopted instead
(:mod:`mllm_pipeline.sources.local_media`): ``videos_dir`` (a folder of ``<videoid>.mp4``) and/or
``video2dataset_dir`` (an earlier video2dataset output, matched by the ``videoid`` its samples' json carries). A row
found there gets ``path`` (the folder's file, or ``tar://<key>.mp4::<tar>``) and keeps its URL; the media stage
reads the path and requests nothing. A row found in neither keeps only its URL (``fetch_missing``, the default), or
is set aside as ``media_file_missing`` (``fetch_missing=False``); either way it is counted (``media_not_on_disk``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.sources.common import (
    DEFAULT_ROWS_PER_SHARD,
    IngestReport,
    RawIngest,
    SeenIds,
    SourceFormatError,
    bad_url,
    base_table,
    const,
    first_reason,
    is_blank,
    joined_raw,
    list_of_one,
)
from mllm_pipeline.sources.delimited import read_header, stream_delimited
from mllm_pipeline.sources.local_media import LocalMedia, folder_index, on_disk_reasons
from mllm_pipeline.storage import Storage

DATASET = "webvid"
REQUIRED = ["videoid", "contentUrl", "duration", "page_dir", "name"]
OPTIONAL = ["page_idx"]

_NUM = r"\d+(?:\.\d+)?"
ISO_DURATION_RE = rf"^P(?:(?P<d>{_NUM})D)?T?(?:(?P<h>{_NUM})H)?(?:(?P<m>{_NUM})M)?(?:(?P<s>{_NUM})S)?$"


def parse_iso_duration(strings) -> pa.Array:
    """ISO-8601 durations (``PT00H00M09S``, ``PT1M5.5S``, ``P1DT2H``) to float seconds; null where unparseable.

    WebVid writes every duration as ``PThhHmmMssS``; when a batch is all 11-character strings their bytes are
    decoded with numpy directly (no regex, no per-row strings); anything else goes through the general pattern.
    """
    if not isinstance(strings, (pa.Array, pa.ChunkedArray)):
        strings = pa.array(strings, pa.string())
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    n = len(strings)
    if n and strings.null_count == 0 and strings.type == pa.string():
        offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32)[strings.offset : strings.offset + n + 1]
        if np.all(np.diff(offsets) == 11):
            raw = np.frombuffer(strings.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].reshape(n, 11)
            digits = raw[:, [2, 3, 5, 6, 8, 9]].astype(np.int64) - ord("0")
            fixed = (raw[:, 0] == ord("P")) & (raw[:, 1] == ord("T")) & (raw[:, 4] == ord("H"))
            fixed &= (raw[:, 7] == ord("M")) & (raw[:, 10] == ord("S")) & np.all((digits >= 0) & (digits <= 9), axis=1)
            seconds = (digits[:, 0] * 10 + digits[:, 1]) * 3600 + (digits[:, 2] * 10 + digits[:, 3]) * 60
            seconds = (seconds + digits[:, 4] * 10 + digits[:, 5]).astype(np.float64)
            if fixed.all():
                return pa.array(seconds)
            return pc.if_else(pa.array(fixed), pa.array(seconds), _parse_iso_general(strings))
    return _parse_iso_general(strings)


def _parse_iso_general(strings) -> pa.Array:
    parts = pc.extract_regex(strings, ISO_DURATION_RE)
    total = None
    for name, scale in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        field = pc.struct_field(parts, name)
        value = pc.cast(pc.if_else(pc.equal(field, ""), "0", field), pa.float64())
        term = pc.multiply(value, scale)
        total = term if total is None else pc.add(total, term)
    # "P" or "PT" alone matches the pattern but says nothing
    empty = pc.match_substring_regex(strings, r"^PT?$")
    return pc.if_else(pc.fill_null(empty, True), pa.scalar(None, pa.float64()), total)


def check_columns(path: str, columns: list[str]) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise SourceFormatError(
            path,
            f"a WebVid CSV with a header naming the columns {', '.join(REQUIRED)} (and optionally page_idx)",
            f"the header {columns!r}, which lacks {', '.join(missing)}",
        )


def ingest_webvid(
    paths: list[str],
    storage: Storage,
    *,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    split: str | None = None,
    videos_dir: str | None = None,
    video2dataset_dir: str | None = None,
    fetch_missing: bool = True,
    media_listing: str | None = None,
    logger: Any = None,
    identity: Any = None,
    **raw_options: Any,
) -> IngestReport:
    """Read WebVid CSV file(s) and commit normalized raw shards under ``raw/webvid``.

    ``videos_dir`` / ``video2dataset_dir``: videos already on disk (see the module doc); ``fetch_missing``: whether a
    row found in neither keeps its URL (True) or is set aside as ``media_file_missing``; ``media_listing``: the
    :func:`~mllm_pipeline.sources.local_media.listing_digest` of those folders (the raw version's identity only)."""
    del media_listing  # it names the version; the folders are read here
    seen = SeenIds()
    duplicates = 0
    local: list[tuple[LocalMedia, str]] = []  # (index, suffix): a row's name there is its videoid + suffix
    if videos_dir:
        local.append((folder_index(videos_dir), ".mp4"))
    if video2dataset_dir:
        local.append((LocalMedia.video2dataset(video2dataset_dir), ""))
    on_disk = not_on_disk = 0
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, logger=logger, identity=identity, **raw_options) as ing:
        for path in paths:
            ing.begin_source(path)
            columns = read_header(path, ",")
            check_columns(path, columns)
            file_split = split or ("val" if "val" in path.rsplit("/", 1)[-1].lower() else "train")
            for chunk in stream_delimited(path, DATASET, delimiter=",", column_names=None, quoting=True, max_set_aside_rate=ing.max_quarantine_rate):
                ing.count_in(chunk.rows_read)
                ing.quarantine(chunk.rejected)
                if chunk.spans:  # records over more than one line (a quoted line break): the accounting needs them
                    ing.extra.setdefault("multiline_records", {}).setdefault(path, []).extend(chunk.spans)
                t = chunk.table
                if t is None or t.num_rows == 0:
                    continue
                n = t.num_rows
                vid_s, url, name = t.column("videoid"), t.column("contentUrl"), t.column("name")
                dur_s = t.column("duration")
                vid_ok = pc.match_substring_regex(vid_s, r"^\s*\d{1,18}\s*$")
                vid = pc.cast(pc.if_else(vid_ok, pc.utf8_trim_whitespace(vid_s), "0"), pa.int64())
                duration = parse_iso_duration(dur_s)
                reason = first_reason(
                    [
                        ("bad_id", pc.invert(vid_ok)),
                        ("missing_url", is_blank(url)),
                        ("bad_url", bad_url(url)),
                        ("missing_caption", is_blank(name)),
                        ("bad_duration", pc.is_null(duration)),
                    ],
                    n,
                )
                # duplicates among the rows that are otherwise fine: keep the first occurrence of each videoid
                ok = pc.is_null(reason).to_numpy(zero_copy_only=False)
                vid_np = vid.to_numpy()
                first = np.ones(n, dtype=bool)
                first[ok] = seen.first_seen(vid_np[ok])
                dup = pa.array(~first)
                duplicates += int((~first).sum())
                reason = pc.if_else(dup, pa.scalar("duplicate_id"), reason)
                media_path = None
                if local:
                    vid_text = pc.cast(vid, pa.string())
                    for index, suffix in local:  # videos_dir first, then the video2dataset samples
                        found = index.find(pc.binary_join_element_wise(vid_text, suffix, ""))
                        media_path = found if media_path is None else pc.coalesce(media_path, found)
                    reason, found, not_found = on_disk_reasons(reason, media_path, fetch_missing)
                    on_disk, not_on_disk = on_disk + found, not_on_disk + not_found

                page_idx = (
                    pc.cast(pc.if_else(pc.match_substring_regex(t.column("page_idx"), r"^\d+$"), t.column("page_idx"), None), pa.int64())
                    if "page_idx" in t.column_names
                    else pa.nulls(n, pa.int64())
                )
                out = base_table(
                    {
                        "sample_id": pc.binary_join_element_wise("webvid-", vid_s, ""),
                        "dataset": const(DATASET, n),
                        "split": const(file_split, n),
                        "media_kind": const("video", n),
                        "url": url,
                        "path": media_path,
                        "captions": list_of_one(name),
                        "duration_s": duration,
                        "source_file": const(path, n),
                        "source_line": pa.array(chunk.lines),
                    },
                    extra={
                        "src_videoid": vid,
                        "src_page_dir": t.column("page_dir"),
                        "src_page_idx": page_idx,
                        "src_duration": dur_s,
                    },
                )
                ing.add_checked(out, reason, t, joined_raw(","), path)
        ing.extra["duplicate_videoids"] = duplicates
        if local:
            ing.extra["media_on_disk"] = on_disk
            ing.extra["media_not_on_disk"] = not_on_disk
        return ing.commit()
