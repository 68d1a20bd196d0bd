"""Raw shards against their source files: every record is in the committed raw shards or in the quarantine, once.

The records of each source file are counted here from the file itself, per format, not taken from the ingest:

* TSV / CSV / JSON lines (CC3M, WebVid, InternVid): physical lines, less the header line (WebVid always has one,
  CC3M when its first line is ``caption<TAB>url``). Each raw row names its line (``source_line``), each quarantine
  row its line, so a missing record is named by file and line;
* JSON documents (COCO, MSR-VTT): every entry of ``images`` / ``videos`` (or of the flat caption list) is a raw row
  (by its id) or quarantined (by its locator, ``images[17]``), and every caption entry (``annotations``,
  ``sentences``) is counted in its row's captions, quarantined itself, or belongs to a quarantined row;
* webdataset shards (CC3M wds): every sample key of every tar is a raw row or quarantined (``key 000123``);
* MSR-VTT's companions (:mod:`mllm_pipeline.sources.msrvtt`), which add to the videos' rows instead of making rows:
  every data line of a split list (``MSRVTT_train.9k.csv``, ``MSRVTT_JSFUSION_test.csv``) names a video of the
  annotation or is quarantined by its line; every entry of an MSRVTT-QA file is quarantined by its locator or
  carried on its video's row (the ``qa`` pairs of the raw rows add up to the entries kept). A 1k-A test video's
  evaluation sentence is put first in its captions (not repeated when it is one of them), which the caption count
  allows for.

A source file that changed since it was ingested (its size differs from the one recorded in the version's
identity) is reported as such: the raw version no longer describes it.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.sources.cc3m_wds import TRUNCATED
from mllm_pipeline.sources.msrvtt import QA_FILE_SPLITS, flat_captions, qa_video
from mllm_pipeline.stages.registry import DATASETS
from mllm_pipeline.storage import Storage, filesystem_for, open_source
from mllm_pipeline.stages.verify.verdict import Verdict, current_or_missing, iter_parquet, unreadable

LINE_FORMATS = ("tsv", "csv", "jsonl")
_BLOCK = 16 << 20
_WDS = re.compile(r"cc3m-([a-z]+)-\d+\.tar$")


def _dataset_of(prefix: str, manifest: dict[str, Any]) -> str:
    name = prefix.rstrip("/").rsplit("/", 1)[-1]
    return "cc3m_wds" if name == "cc3m_wds" else manifest.get("dataset", name)


def verify_raw(storage: Storage, dataset: str, prefix: str | None = None, manifest: dict | None = None) -> Verdict:
    """Verify the committed raw version of ``dataset`` against its source files (see the module doc)."""
    prefix = prefix or f"raw/{dataset}"
    m, v = current_or_missing(storage, prefix, manifest=manifest)
    if m is None:
        return v
    base = f"{prefix}/{m['version']}"
    kind = _dataset_of(prefix, m)
    fmt = DATASETS[kind].record_format if kind in DATASETS else None
    need_caps = fmt in ("coco", "msrvtt")
    has_mc = "src_mc_options" in (m.get("schema") or [])
    # what the committed shards and quarantine hold, per source file
    rows: dict[str, list[pa.Table]] = {}
    qa_pairs, raw_ids = 0, set()  # MSR-VTT: the question/answer pairs the rows carry, and every row's sample id
    mc_ids: set[str] = set()  # MSR-VTT: the rows that carry a multiple-choice entry
    for s in m.get("shards", []):
        n = 0
        try:
            for t in iter_parquet(storage, f"{base}/{s['file']}", ["sample_id", "source_file", "source_line"]
                                  + (["captions"] if need_caps else [])
                                  + (["eval_caption", "qa"] if fmt == "msrvtt" else [])
                                  + (["src_mc_options"] if has_mc else [])):
                n += t.num_rows
                t = t.set_column(t.column_names.index("source_file"), "source_file", t["source_file"].cast(pa.string()))
                if fmt == "msrvtt":
                    raw_ids.update(t["sample_id"].to_pylist())
                if has_mc:
                    mc_ids.update(t.filter(pc.is_valid(t["src_mc_options"]))["sample_id"].to_pylist())
                    t = t.drop_columns(["src_mc_options"])
                if "qa" in t.column_names:
                    qa_pairs += int(pc.sum(pc.fill_null(pc.list_value_length(t["qa"]), 0)).as_py() or 0)
                    t = t.drop_columns(["qa"])
                if need_caps:
                    t = t.set_column(t.column_names.index("captions"), "captions", pc.list_value_length(t["captions"]))
                for f in pc.unique(t["source_file"]).to_pylist():
                    rows.setdefault(f, []).append(t.filter(pc.equal(t["source_file"], f)))
        except Exception as e:  # noqa: BLE001 -- a truncated or deleted shard is a finding, not a crash
            unreadable(v, f"raw shard {s['file']}", e)
            continue
        if n != s.get("rows", n):
            v.problem(f"raw shard {s['file']} holds {n:,} rows, its manifest says {s['rows']:,}")
        v.add("raw_rows", n)
    quarantine: dict[str, list[pa.Table]] = {}
    for name in m.get("quarantine", []):
        try:
            for t in iter_parquet(storage, f"{base}/{name}", ["source_file", "line", "locator"]):
                v.add("quarantined", t.num_rows)
                for f in pc.unique(t["source_file"]).to_pylist():
                    quarantine.setdefault(f, []).append(t.filter(pc.equal(t["source_file"], f)))
        except Exception as e:  # noqa: BLE001
            unreadable(v, f"quarantine {name}", e)
    sizes = {f["path"]: f.get("size") for f in ((m.get("identity") or {}).get("files") or []) if isinstance(f, dict)}
    split_lists = {x["file"]: role for role, x in ((m.get("extra") or {}).get("split_lists") or {}).items()
                   if isinstance(x, dict) and x.get("file")}
    annotation_ids: set[str] = set()  # MSR-VTT: every video id the annotation names (its rows or its quarantine)
    qa_kept = mc_kept = 0
    sources = list(m.get("sources", []))
    kinds = (m.get("extra") or {}).get("file_kinds") or {src: "qa" for src in sources if _is_qa_file(src)}
    if fmt == "msrvtt":  # the annotation first: its videos are what the split lists and questions name
        sources.sort(key=lambda src: src in split_lists or kinds.get(src) in ("qa", "mc"))
    for src in sources:
        r = _concat(rows.pop(src, []))
        q = _concat(quarantine.pop(src, []))
        try:
            fs, path = filesystem_for(src)
            size = int(fs.info(path).get("size") or 0)
        except FileNotFoundError:
            v.problem(f"source file {src} no longer exists: its records cannot be counted")
            continue
        if sizes.get(src) is not None and sizes[src] != size:
            v.problem(f"source file {src} changed since it was ingested ({sizes[src]:,} -> {size:,} bytes): "
                      "materialize the raw asset again")
            continue
        try:
            if fmt in LINE_FORMATS:
                _lines(v, src, fmt, r, q, ((m.get("extra") or {}).get("multiline_records") or {}).get(src) or [])
            elif fmt == "coco":
                _json_units(v, src, *_coco_units(_load(src)), r, q)
            elif fmt == "msrvtt" and src in split_lists:
                _split_list_lines(v, src, q, annotation_ids, raw_ids)
            elif fmt == "msrvtt" and kinds.get(src) == "qa":
                qa_kept += _qa_entries(v, src, _load(src), q, raw_ids)
            elif fmt == "msrvtt" and kinds.get(src) == "mc":
                mc_kept += _mc_entries(v, src, _load(src), r, q, mc_ids)
            elif fmt == "msrvtt":
                doc = _load(src)
                prims, caps = _msrvtt_units(doc)
                annotation_ids.update(sid for _, sid in prims if sid)
                _json_units(v, src, prims, caps, r, q, adjust=_eval_caption_adjust(doc, r))
            elif fmt == "cc3m_wds":
                _json_units(v, src, *_wds_units(src), r, q)
            else:
                v.problem(f"no way to count the records of {src} (dataset {kind})")
        except (OSError, ValueError, tarfile.TarError) as e:
            unreadable(v, f"source file {src}", e)
    if has_mc and len(mc_ids) != mc_kept:
        v.problem(f"{len(mc_ids):,} raw row(s) carry a multiple-choice entry, the multiple-choice file gives {mc_kept:,} "
                  "that were not set aside")
    if fmt == "msrvtt" and qa_pairs != qa_kept:
        v.problem(f"the raw rows carry {qa_pairs:,} question/answer pair(s), the MSRVTT-QA files give {qa_kept:,} "
                  "that were not set aside")
    for src, parts in rows.items():
        v.problem(f"{sum(p.num_rows for p in parts):,} raw row(s) name {src}, which is not among the version's sources")
    for src, parts in quarantine.items():
        v.problem(f"{sum(p.num_rows for p in parts):,} quarantine row(s) name {src}, which is not among the version's sources")
    return v


def verify_quarantine_ceiling(storage: Storage, prefix: str, manifest: dict | None = None) -> Verdict:
    """A raw version keeps at least one row, and sets aside no more than its ``max_quarantine_rate`` of the rows it
    read (set-asides a configured scheme makes on purpose, :data:`~mllm_pipeline.sources.common.BY_DESIGN`, not
    counted): a file that is mostly unreadable is the wrong file or the wrong format, and must not replace a good
    version."""
    from mllm_pipeline.sources.common import BY_DESIGN, DEFAULT_MAX_QUARANTINE_RATE

    m, v = current_or_missing(storage, prefix, manifest=manifest)
    if m is None:
        return v
    rows_in, kept = int(m.get("rows_in") or 0), int(m.get("rows_kept") or 0)
    reasons = m.get("quarantined") or {}
    faults = {r: n for r, n in reasons.items() if r not in BY_DESIGN}
    n_faults = sum(faults.values())
    ceiling = float((m.get("limits") or {}).get("max_quarantine_rate", DEFAULT_MAX_QUARANTINE_RATE))
    v.add("rows_in", rows_in)
    v.add("set_aside_as_faults", n_faults)
    top = ", ".join(f"{r}: {n:,}" for r, n in sorted(faults.items(), key=lambda kv: -kv[1])[:4])
    if rows_in and not kept:
        v.problem(f"no row was kept: all {rows_in:,} rows read from {', '.join(m.get('sources') or [])[:300]} were set "
                  f"aside ({top or ', '.join(reasons)}); check the files and the format they are read as")
    elif rows_in and n_faults / rows_in > ceiling:
        v.problem(f"{n_faults:,} of {rows_in:,} rows ({n_faults / rows_in:.1%}) were set aside ({top}), above the "
                  f"ceiling max_quarantine_rate = {ceiling:g}; check the files, or raise max_quarantine_rate in the "
                  "raw asset's config if this is expected")
    return v


def _concat(parts: list[pa.Table]) -> pa.Table | None:
    return pa.concat_tables(parts) if parts else None


def _load(src: str) -> Any:
    with open_source(src) as f:
        return json.load(f)


# -- line formats ------------------------------------------------------------------------------------------------

def count_lines(src: str) -> tuple[int, bytes]:
    """(physical lines, the first line) of a text file, streamed (a last line without a line break counts)."""
    n, last, first = 0, b"\n", None
    with open_source(src) as f:
        while block := f.read(_BLOCK):
            if first is None:
                first = block.split(b"\n", 1)[0]
            n += block.count(b"\n")
            last = block[-1:]
    return n + (0 if last == b"\n" else 1), first or b""


def _has_header(fmt: str, first: bytes) -> bool:
    if fmt == "csv":
        return True
    if fmt == "tsv":
        return [c.strip().strip('"').lower() for c in first.decode("utf-8", "replace").rstrip("\r").split("\t")] == ["caption", "url"]
    return False


def _lines(v: Verdict, src: str, fmt: str, r: pa.Table | None, q: pa.Table | None, spans: list | None = None) -> None:
    """``spans``: (line, lines) of the records that run over several lines (a quoted line break): their
    continuation lines belong to the record named by their first line."""
    n, first = count_lines(src)
    header = 1 if _has_header(fmt, first) and n else 0
    v.add("source_records", n - header)
    seen = np.zeros(n + 1, dtype=np.int32)
    for what, table, col in (("raw row", r, "source_line"), ("quarantine row", q, "line")):
        if table is None:
            continue
        lines = table[col]
        unnamed = lines.null_count
        if unnamed:
            v.problem(f"{src}: {unnamed:,} {what}(s) name no line")
        arr = pc.drop_null(lines).to_numpy(zero_copy_only=False).astype(np.int64)
        outside = (arr < 1 + header) | (arr > n)
        for line in arr[outside][:3]:
            v.problem(f"{src}: a {what} names line {int(line)}, which is not a record of the file ({n:,} lines"
                      + (", line 1 the header)" if header else ")"))
        if outside.any():
            v.problem_count += max(0, int(outside.sum()) - 3)
        np.add.at(seen, arr[~outside], 1)
    for line, count in spans or []:
        if 1 <= line <= n and seen[line] == 1:
            stop = min(n + 1, line + count)
            seen[line + 1:stop] += 1  # lines of one record, named once by its first line
            v.add("multiline_records")
    body = seen[1 + header:]
    missing = np.flatnonzero(body == 0) + 1 + header
    for line in missing[:10]:
        v.problem(f"{src}: line {int(line)} is in neither the raw shards nor the quarantine")
    v.problem_count += max(0, len(missing) - 10)
    twice = np.flatnonzero(body > 1) + 1 + header
    for line in twice[:10]:
        v.problem(f"{src}: line {int(line)} is stored {int(seen[line])} times")
    v.problem_count += max(0, len(twice) - 10)
    v.add("missing", len(missing))


# -- documents: units with an id ------------------------------------------------------------------------------------
# primaries: (locator, sample_id or None) -- one raw row each, or quarantined by locator
# captions:  (locator, owner sample_id or None) -- counted in the owner's row, quarantined, or owner quarantined

def _coco_units(doc: Any) -> tuple[list, list]:
    if not isinstance(doc, dict):
        raise ValueError("not a COCO captions object")
    prim = [(f"images[{i}]", f"coco-{im['id']}" if isinstance(im, dict) and isinstance(im.get("id"), int) else None)
            for i, im in enumerate(doc.get("images") or [])]
    caps = [(f"annotations[{j}]", f"coco-{a['image_id']}" if isinstance(a, dict) and isinstance(a.get("image_id"), int)
             and isinstance(a.get("caption"), str) else None) for j, a in enumerate(doc.get("annotations") or [])]
    return prim, caps


def _msrvtt_units(doc: Any) -> tuple[list, list]:
    if isinstance(doc, dict):
        prim = [(f"videos[{i}]", f"msrvtt-{e['video_id']}" if isinstance(e, dict) and isinstance(e.get("video_id"), str)
                 and e["video_id"] else None) for i, e in enumerate(doc.get("videos") or [])]
        caps = [(f"sentences[{j}]", f"msrvtt-{s['video_id']}" if isinstance(s, dict) and isinstance(s.get("video_id"), str)
                 and isinstance(s.get("caption"), str) else None) for j, s in enumerate(doc.get("sentences") or [])]
        return prim, caps
    prim, caps, first = [], [], set()
    for i, e in enumerate(doc if isinstance(doc, list) else []):
        entry_caps = flat_captions(e)
        sid = f"msrvtt-{e['video'].rsplit('/', 1)[-1].removesuffix('.mp4')}" if entry_caps is not None else None
        if sid is None or sid not in first:  # the first entry of a video stands for its row
            prim.append((f"[{i}]", sid))
            if sid:
                first.add(sid)
        if sid is not None:
            caps.extend((f"[{i}]", sid) for _ in entry_caps)
    return prim, caps


def _wds_units(src: str) -> tuple[list, list]:
    m = _WDS.search(src.rsplit("/", 1)[-1])
    split = m.group(1) if m else "train"
    keys: list[str] = []
    truncated = False
    try:
        with open_source(src) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:  # headers only: stream mode skips the member bytes
                name = info.name.rsplit("/", 1)[-1]
                if info.isfile() and "." in name:
                    k = name.split(".", 1)[0]
                    if not keys or keys[-1] != k:
                        keys.append(k)
    except (tarfile.TarError, EOFError, OSError):  # the ingest sets the sample it broke off in aside with the rest
        truncated = True
        keys = keys[:-1]
    units = [(f"key {k}", f"cc3m-wds-{split}-{k}") for k in keys]
    return units + ([(f"key {TRUNCATED}", None)] if truncated else []), []


def _json_units(v: Verdict, src: str, prims: list, caps: list, r: pa.Table | None, q: pa.Table | None,
                adjust: dict[str, int] | None = None) -> None:
    """``adjust``: sample id -> captions its raw row holds beyond (or, negative, below) what the file gives it."""
    qlocs = Counter(q["locator"].to_pylist()) if q is not None else Counter()
    ncaps: dict[str, int] = {}
    if r is not None:
        for sid, n in zip(r["sample_id"].to_pylist(), (r["captions"].to_pylist() if "captions" in r.column_names
                                                       else [None] * r.num_rows)):
            if sid in ncaps:
                v.problem(f"{src}: {sid} is stored more than once")
            ncaps[sid] = n
    v.add("source_records", len(prims))
    claimed: set[str] = set()
    owner_quarantined: set[str] = set()
    missing = 0
    for loc, sid in prims:
        if qlocs.get(loc):
            qlocs[loc] -= 1
            if sid and sid not in ncaps:
                owner_quarantined.add(sid)
        elif sid and sid in ncaps and sid not in claimed:
            claimed.add(sid)
        else:
            missing += 1
            v.problem(f"{src}: {loc}" + (f" ({sid})" if sid else "") + " is in neither the raw shards nor the quarantine")
    expected: Counter = Counter()
    for loc, owner in caps:
        if qlocs.get(loc):
            qlocs[loc] -= 1
            v.add("source_records")  # a caption set aside on its own is a record of its own, as the ingest counts
        elif owner in claimed:
            expected[owner] += 1
        elif owner in owner_quarantined:
            pass
        else:
            missing += 1
            v.problem(f"{src}: caption {loc}" + (f" (of {owner})" if owner else "")
                      + " is in no raw row's captions and not in the quarantine")
    if caps:
        v.add("source_captions", len(caps))
        for sid in claimed:
            want = expected[sid] + (adjust or {}).get(sid, 0)
            if ncaps[sid] is not None and ncaps[sid] != want:
                v.problem(f"{src}: {sid} has {ncaps[sid]} caption(s) in the raw shards, the file gives it {want}")
    for sid in sorted(set(ncaps) - claimed)[:10]:
        v.problem(f"{src}: raw row {sid} matches no record of the file")
    v.problem_count += max(0, len(set(ncaps) - claimed) - 10)
    for loc, n in qlocs.items():
        if n > 0:
            v.problem(f"{src}: quarantine row {loc} matches no record of the file" + (f" ({n} extra)" if n > 1 else ""))
    v.add("missing", missing)


# -- MSR-VTT's companions: split lists and MSRVTT-QA ----------------------------------------------------------------


def _is_qa_file(src: str) -> bool:
    """An MSRVTT-QA file, by the name the ingest reads its split from."""
    return src.rsplit("/", 1)[-1].lower().startswith(tuple(QA_FILE_SPLITS))


def _split_list_lines(v: Verdict, src: str, q: pa.Table | None, annotation_ids: set[str], raw_ids: set[str]) -> None:
    """Every data line of a split list is quarantined by its line, or names a video of the annotation (whose row
    it gives a split; the video itself is accounted for by the annotation)."""
    with open_source(src) as f:
        lines = f.read().splitlines()
    quarantined = Counter(q["line"].to_pylist()) if q is not None else Counter()
    try:
        header = next(csv.reader([lines[0].decode("utf-8-sig")])) if lines else []
    except (UnicodeDecodeError, csv.Error):
        header = []
    col = [h.strip() for h in header].index("video_id") if "video_id" in [h.strip() for h in header] else None
    records = 0
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip() and n == len(lines):
            continue  # a blank last line is only the file's end
        records += 1
        if quarantined.get(n):
            quarantined[n] -= 1
            continue
        try:
            fields = next(csv.reader([raw.decode("utf-8")]))
            vid = fields[col].strip() if col is not None else ""
        except (UnicodeDecodeError, csv.Error, IndexError):
            vid = ""
        sid = f"msrvtt-{vid}"
        if not vid or (sid not in annotation_ids and sid not in raw_ids):
            v.problem(f"{src}: line {n} names no video of the annotation and is not in the quarantine")
    for line, k in quarantined.items():
        if k > 0:
            v.problem(f"{src}: a quarantine row names line {line}, which is not a data line of the file")
    v.add("split_list_lines", records)


def _qa_entries(v: Verdict, src: str, doc: Any, q: pa.Table | None, raw_ids: set[str]) -> int:
    """Every entry of an MSRVTT-QA file is quarantined by its locator or names a video that has a raw row (which
    carries it); returns how many entries were not quarantined."""
    entries = doc if isinstance(doc, list) else []
    qlocs = Counter(q["locator"].to_pylist()) if q is not None else Counter()
    kept = 0
    for i, e in enumerate(entries):
        loc = f"[{i}]"
        if qlocs.get(loc):
            qlocs[loc] -= 1
            continue
        vid = qa_video(e) if isinstance(e, dict) else None
        if vid and f"msrvtt-{vid}" in raw_ids:
            kept += 1
        else:
            v.problem(f"{src}: {loc} is on no raw row and not in the quarantine")
    for loc, k in qlocs.items():
        if k > 0:
            v.problem(f"{src}: quarantine row {loc} matches no entry of the file")
    v.add("qa_entries", len(entries))
    return kept


def _mc_entries(v: Verdict, src: str, doc: Any, r: pa.Table | None, q: pa.Table | None, mc_ids: set[str]) -> int:
    """Every entry of the multiple-choice test is quarantined by its locator or rides on its video's raw row (a row
    of its own when no caption file names the video); returns how many entries were not quarantined."""
    entries = doc if isinstance(doc, list) else []
    qlocs = Counter(q["locator"].to_pylist()) if q is not None else Counter()
    own = Counter(r["sample_id"].to_pylist()) if r is not None else Counter()
    kept = 0
    for i, e in enumerate(entries):
        loc = f"[{i}]"
        if qlocs.get(loc):
            qlocs[loc] -= 1
            if isinstance(e, dict) and isinstance(e.get("video"), str):
                own.pop(f"msrvtt-{e['video'].rsplit('/', 1)[-1].removesuffix('.mp4')}", None)  # its own row set aside
            continue
        vid = e["video"].rsplit("/", 1)[-1].removesuffix(".mp4") if isinstance(e, dict) and isinstance(e.get("video"), str) else ""
        sid = f"msrvtt-{vid}"
        if vid and sid in mc_ids:
            kept += 1
            own.pop(sid, None)
        else:
            v.problem(f"{src}: {loc} is on no raw row and not in the quarantine")
    for sid in list(own)[:10]:
        v.problem(f"{src}: raw row {sid} matches no entry of the file")
    for loc, k in qlocs.items():
        if k > 0:
            v.problem(f"{src}: quarantine row {loc} matches no entry of the file")
    v.add("mc_entries", len(entries))
    return kept


def _eval_caption_adjust(doc: Any, r: pa.Table | None) -> dict[str, int]:
    """A 1k-A test video's raw captions are its evaluation sentence first, then the file's captions other than it:
    one more than the file gives when the sentence is none of them, fewer when it is one of them more than once."""
    if r is None or "eval_caption" not in r.column_names:
        return {}
    evals = {sid: e.strip() for sid, e in zip(r["sample_id"].to_pylist(), r["eval_caption"].to_pylist()) if e}
    if not evals:
        return {}
    same: Counter = Counter()
    if isinstance(doc, dict):
        pairs = [(f"msrvtt-{x.get('video_id')}", x.get("caption")) for x in doc.get("sentences") or [] if isinstance(x, dict)]
    else:
        pairs = [(f"msrvtt-{str(x.get('video', '')).rsplit('/', 1)[-1].removesuffix('.mp4')}", x.get("caption"))
                 for x in (doc if isinstance(doc, list) else []) if isinstance(x, dict)]
    for sid, cap in pairs:
        if sid in evals and isinstance(cap, str) and cap.strip() == evals[sid]:
            same[sid] += 1
    return {sid: 1 - same[sid] for sid in evals}
