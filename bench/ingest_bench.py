"""Benchmark: raw-annotation ingest (CC3M TSV, WebVid CSV) against a bare pyarrow CSV -> Parquet conversion.

    .venv/bin/python bench/ingest_bench.py                         # full size, best of 2
    .venv/bin/python bench/ingest_bench.py --cc3m-rows 100000 --webvid-rows 300000   # a quick run

What it does (see bench/README.md for the figures):

1. Generates, once, a CC3M-size TSV (``caption<TAB>url``, no header, no quoting) and a WebVid-10M-size CSV
   (``videoid,contentUrl,duration,page_dir,name`` with standard quoting, ~0.1% repeated videoids) in the workdir
   (default ``bench/out/``, git-ignored). Generation is vectorised (numpy + pyarrow compute, the file is written
   straight from the Arrow string buffers), runs in child processes, and is checked once (row count and field
   count with pyarrow, and a prefix of the WebVid file against Python's ``csv`` module). A ``.json`` sidecar holds
   the row count, the number of repeated videoids and length statistics; a file is reused if its sidecar matches.
2. Reads each file once (warm page cache for every contender), then for ``--repeats`` rounds runs, alternately,
   in a fresh child process each:

   * ``baseline``: ``pyarrow.csv.open_csv`` (default options; CC3M: tab delimiter, no quoting, the two column
     names) streamed into one ``pyarrow.parquet.ParquetWriter`` (zstd) -- the least a converter has to do;
   * ``ours``: ``ingest_cc3m`` / ``ingest_webvid`` into a fresh temporary storage root.

   The time is measured inside the child around the work (imports excluded); the peak RSS is the child's
   ``ru_maxrss`` as returned by ``os.wait4`` for that child alone (and cross-checked by polling with psutil).
   Note: Linux carries the parent's high-water RSS into a child at ``exec``, so this parent process never imports
   pyarrow or numpy and does the generation in children; its own peak is printed at the end.
3. Prints a per-run log and a summary table (best time of the repeats, highest peak RSS of the repeats), with the
   targets: ours/baseline time <= 1.5, peak RSS of ours < 2048 MiB on the WebVid-size file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GEN_VERSION = 3  # bump when the generated data changes, so cached files are regenerated

CC3M_ROWS = 3_318_333
WEBVID_ROWS = 10_727_607
TARGET_RATIO = 1.5
TARGET_RSS_MIB = 2048
CHUNK_ROWS = 500_000

# --------------------------------------------------------------------------------------------------------------
# data generation (runs in a child process: imports numpy/pyarrow)
# --------------------------------------------------------------------------------------------------------------

# CC3M captions are hypernymised, lower-case, ~10 words: "actor attends the premiere of the film".
CC3M_WORDS = (
    "a the of in on with and at for to is from during by as an his her their its this that are was "
    "person actor man woman people young old little child children boy girl family couple friends group "
    "dog cat horse bird animal tree trees flower flowers forest park garden field grass water river lake sea "
    "ocean beach sand island mountain mountains hill rock sky clouds sun sunset sunrise night light dark snow "
    "winter summer autumn spring rain city street road building house home room kitchen table chair window "
    "door wall floor bed car bus train plane boat bike bridge tower church castle village town country "
    "view background texture pattern design illustration vector image photo picture cartoon icon logo set "
    "white black red blue green yellow orange pink purple brown grey golden silver colorful beautiful "
    "large small big new modern traditional vintage ancient abstract isolated close up top front back side "
    "walking running sitting standing playing looking holding wearing smiling eating drinking working "
    "dressed attends arrives performs poses during premiere event award ceremony festival concert game match "
    "football player team season league stage show film series episode fashion dress shirt hat shoes style "
    "food dish fruit vegetables cake coffee wine glass bottle plate hand hands face hair eyes portrait "
    "business office computer phone book paper money map flag sign christmas wedding party birthday holiday "
    "hotel restaurant shop market museum gallery art artist painting sculpture statue monument temple "
    "celebrity politician football_player soccer basketball tennis golf race athlete runner swimmer "
    "person's actor's woman's man's"
).split()

# WebVid names are stock-footage titles, capitalised, ~12 words, longer words than CC3M.
WEBVID_WORDS = (
    "the of a and in on with at for to from slow motion aerial view shot footage video clip timelapse time "
    "lapse close up closeup background abstract animation seamless loop beautiful young woman man businessman "
    "businesswoman people group friends family couple happy smiling laughing talking walking running "
    "working sitting standing looking camera using laptop computer smartphone tablet office modern city "
    "cityscape skyline downtown street traffic night sunset sunrise dawn evening morning light lights "
    "flying drone over above mountains mountain forest trees river ocean waves beach tropical island nature "
    "landscape panorama panoramic cloudy clouds blue sky green field meadow flowers blooming snow winter "
    "autumn summer spring rain water underwater fish coral reef wildlife animal horse dog cat bird birds "
    "kitchen cooking food fresh vegetables fruit restaurant coffee table hands hand holding typing keyboard "
    "technology digital futuristic network connection data particles glowing colorful gold golden shiny "
    "bokeh blurred defocused motion graphics concept medical doctor hospital patient healthcare science "
    "laboratory scientist research education student students school university classroom teacher "
    "children child little girl boy playing park garden outdoors indoors home living room sofa window "
    "portrait attractive caucasian asian african american senior elderly teenage adult male female "
    "fashion model dancing dancer music concert crowd celebration party holiday christmas wedding bride "
    "groom romantic love industrial factory construction worker engineer car driving road highway bridge "
    "train airplane airport ship boat harbor port sailing yacht tourist travel vacation resort hotel pool "
    "dolly tracking handheld steadicam camera 4k hd 1080p"
).split()

CC3M_HOSTS = [
    ("https://i.pinimg.com/736x/", "/", ".jpg"),
    ("http://l7.alamy.com/zooms/", "-", ".jpg"),
    ("https://media.gettyimages.com/photos/", "-picture-id", "?s=612x612"),
    ("http://i.dailymail.co.uk/i/pix/2016/08/23/", "-", ".jpg"),
    ("https://thumb1.shutterstock.com/display_pic_with_logo/", "/stock-photo-", ".jpg"),
    ("http://www.picturesof.net/_images_300/", "_", ".png"),
    ("https://st.depositphotos.com/1000938/", "/i/950/depositphotos_", "-stock-photo.jpg"),
    ("http://ak2.picdn.net/shutterstock/videos/", "/thumb/", ".jpg"),
    ("https://www.featurepics.com/StockImage/20090128/", "-stock-photo-", ".jpg"),
    ("http://static.panoramio.com/photos/large/", "/", ".jpg"),
    ("https://s-media-cache-ak0.pinimg.com/originals/", "/", ".jpg"),
    ("http://www.lovethispic.com/uploaded_images/", "-", ".jpg"),
    ("https://ichef.bbci.co.uk/news/660/cpsprodpb/", "/production/_", ".jpg"),
    ("http://cdn.cnn.com/cnnnext/dam/assets/", "-", "-exlarge-169.jpg"),
    ("https://images.slideplayer.com/", "/", "/slides/slide_1.jpg"),
    ("http://www.telegraph.co.uk/content/dam/news/2016/", "-", "-large_trans_NvBQzQNjv4BqqVzuuqpFlyLIwiB6NTmJwfSVWeZ_vEN7c6bHu2jJnT8.jpg"),
    ("https://cdn.vectorstock.com/i/composite/", "/", ".jpg"),
    ("http://img.izismile.com/img/img3/20100513/640/", "_640_", ".jpg"),
    ("https://farm4.staticflickr.com/3737/", "_", "_b.jpg"),
    ("http://media.rightmove.co.uk/dir/crop/10:9-16:9/", "/", "_max_476x317.jpg"),
    ("https://static1.squarespace.com/static/", "/t/", "/1490000000000/"),
    ("http://www.dailymail.co.uk/i/pix/2015/11/02/", "/", ".jpg"),
    ("https://ssl.c.photoshelter.com/img-get/", "/s/750/750/", ".jpg"),
    ("http://wonderfulengineering.com/wp-content/uploads/2014/", "-", ".jpg"),
]

WEBVID_URL = "https://ak.picdn.net/shutterstock/videos/"


def _word_sampler(words: list[str], zipf_s: float):
    """A lookup table mapping uniform 16-bit ints to word indexes with Zipf-like frequencies (fast sampling)."""
    import numpy as np

    w = 1.0 / np.arange(2, len(words) + 2, dtype=np.float64) ** zipf_s
    cdf = np.cumsum(w / w.sum())
    table = np.searchsorted(cdf, (np.arange(65536) + 0.5) / 65536).astype(np.int32)
    table = np.minimum(table, len(words) - 1)
    lens = np.array([len(x) for x in words], dtype=np.float64)
    mean_len = float(lens[table].mean())
    return table, mean_len


def _words_lists(rng, table, n_rows: int, mean_words: float, min_words: int):
    """Per row a word count (min_words + Poisson) and the flat array of word indexes; returns (offsets, idx)."""
    import numpy as np

    k = min_words + rng.poisson(max(mean_words - min_words, 0.1), n_rows)
    offsets = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(k, out=offsets[1:])
    idx = table[rng.integers(0, 65536, int(offsets[-1]), dtype=np.int32)]
    return k, offsets, idx


def _join_words(vocab, offsets, idx, sep: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    words = vocab.take(pa.array(idx))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), sep)


def _write_lines(f, lines) -> int:
    """Write a StringArray of complete lines straight from its data buffer; returns the bytes written."""
    import numpy as np

    assert lines.null_count == 0
    bufs = lines.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int32, count=len(lines) + 1, offset=lines.offset * 4)
    data = memoryview(bufs[2])[int(offs[0]) : int(offs[-1])]
    f.write(data)
    return len(data)


def _digits(rng, n: int, lo: int, hi: int):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(pa.array(rng.integers(lo, hi, n, dtype=np.int64)), pa.string())


def generate_cc3m(path: Path, rows: int, seed: int = 3) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    vocab = pa.array(CC3M_WORDS)
    table, mean_len = _word_sampler(CC3M_WORDS, 0.95)
    # ~55 characters: (words * (mean_len + 1)) - 1 = 55
    mean_words = 56 / (mean_len + 1)
    hosts = pa.array([h[0] for h in CC3M_HOSTS])
    seps = pa.array([h[1] for h in CC3M_HOSTS])
    sufs = pa.array([h[2] for h in CC3M_HOSTS])
    hex_chars = pa.array(list("0123456789abcdef"))
    stats = {"caption_chars": 0, "url_chars": 0, "caption_words": 0}
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "wb") as f:
        for ci, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            rng = np.random.default_rng([seed, ci])
            k, offs, idx = _words_lists(rng, table, n, mean_words, 2)
            caption = _join_words(vocab, offs, idx, " ")
            # URL: host prefix + a slug of ~6.5 words (or 32 hex chars for the hash-named hosts) + sep + id + suffix
            h = pa.array(rng.integers(0, len(CC3M_HOSTS), n, dtype=np.int32))
            _, soffs, sidx = _words_lists(rng, table, n, 6.5, 3)
            slug = _join_words(vocab, soffs, sidx, "-")
            hexs = pc.binary_join(
                pa.ListArray.from_arrays(pa.array(np.arange(0, 32 * n + 1, 32, dtype=np.int32)),
                                         hex_chars.take(pa.array(rng.integers(0, 16, 32 * n, dtype=np.int32)))),
                "",
            )
            use_hex = pa.array(rng.random(n) < 0.25)
            slug = pc.if_else(use_hex, hexs, pc.replace_substring(slug, "'", ""))
            url = pc.binary_join_element_wise(
                hosts.take(h), slug, seps.take(h), _digits(rng, n, 10**6, 10**10), sufs.take(h), ""
            )
            lines = pc.binary_join_element_wise(caption, "\t", url, "\n", "")
            written += _write_lines(f, lines)
            stats["caption_chars"] += pc.sum(pc.utf8_length(caption)).as_py()
            stats["url_chars"] += pc.sum(pc.utf8_length(url)).as_py()
            stats["caption_words"] += int(k.sum())
    os.replace(tmp, path)
    return {
        "rows": rows,
        "bytes": written,
        "mean_caption_chars": stats["caption_chars"] / rows,
        "mean_caption_words": stats["caption_words"] / rows,
        "mean_url_chars": stats["url_chars"] / rows,
    }


def generate_webvid(path: Path, rows: int, seed: int = 7, dup_fraction: float = 0.001) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    V = len(WEBVID_WORDS)
    # word variants: plain, "word,", "\"word", "word\"", "\"word\""; the slug always uses the plain word
    vocab = pa.array(
        WEBVID_WORDS + [w + "," for w in WEBVID_WORDS] + ['"' + w for w in WEBVID_WORDS]
        + [w + '"' for w in WEBVID_WORDS] + ['"' + w + '"' for w in WEBVID_WORDS]
    )
    table, mean_len = _word_sampler(WEBVID_WORDS, 0.5)
    mean_words = 12.0

    # videoids: unique (an odd multiplier is a bijection mod 2**30), in no particular order, then ~0.1% of the
    # rows repeat the id of a random earlier row (a re-crawled page)
    rng = np.random.default_rng([seed, 10**6])
    i = np.arange(rows, dtype=np.uint64)
    ids = (1_000_000 + (i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(1 << 30)).astype(np.int64)
    n_dup = int(round(rows * dup_fraction))
    if n_dup and rows > 1:
        j = np.sort(rng.choice(np.arange(1, rows), size=min(n_dup, rows - 1), replace=False))
        src = rng.integers(0, j)
        ids[j] = ids[src]
    repeated = rows - int(np.unique(ids).size)
    del i

    stats = {"name_chars": 0, "url_chars": 0, "quoted": 0, "with_quote_char": 0}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"videoid,contentUrl,duration,page_dir,name\n")
        written = len(b"videoid,contentUrl,duration,page_dir,name\n")
        for ci, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            rng = np.random.default_rng([seed, ci])
            k, offs, idx = _words_lists(rng, table, n, mean_words, 4)
            plain = vocab.take(pa.array(idx))
            slug = pc.binary_join(pa.ListArray.from_arrays(pa.array(offs), plain), "-")
            # ~12% of the names get a comma after a random word (so the field is quoted), ~0.3% a quoted phrase
            starts = offs[:-1]
            r = rng.random(n)
            comma = r < 0.12
            quote = (r >= 0.12) & (r < 0.123)
            vidx = idx.copy()
            pos = starts + (rng.random(n) * (k - 1)).astype(np.int32)  # never after the last word
            vidx[pos[comma]] += V
            qa = starts + (rng.random(n) * k).astype(np.int32)
            qb = np.minimum(qa + rng.integers(0, 3, n), starts + k - 1)
            single = quote & (qa == qb)
            pair = quote & (qa != qb)
            vidx[qa[single]] += 4 * V
            vidx[qa[pair]] += 2 * V
            vidx[qb[pair]] += 3 * V
            name = pc.utf8_capitalize(pc.binary_join(pa.ListArray.from_arrays(pa.array(offs), vocab.take(pa.array(vidx))), " "))
            needs = pa.array(comma | quote)
            name_csv = pc.if_else(
                needs, pc.binary_join_element_wise('"', pc.replace_substring(name, '"', '""'), '"', ""), name
            )
            vid = pc.cast(pa.array(ids[start : start + n]), pa.string())
            url = pc.binary_join_element_wise(WEBVID_URL, vid, "/preview/stock-footage-", slug, ".mp4", "")
            secs = np.clip(np.rint(rng.gamma(2.0, 9.0, n)) + 3, 4, 3600).astype(np.int64)
            pad2 = lambda a: pc.utf8_lpad(pc.cast(pa.array(a), pa.string()), 2, "0")  # noqa: E731
            duration = pc.binary_join_element_wise("PT", pad2(secs // 3600), "H", pad2(secs // 60 % 60), "M", pad2(secs % 60), "S", "")
            lo = (np.arange(start, start + n, dtype=np.int64) // 4000) * 50 + 1
            pad6 = lambda a: pc.utf8_lpad(pc.cast(pa.array(a), pa.string()), 6, "0")  # noqa: E731
            page_dir = pc.binary_join_element_wise(pad6(lo), "_", pad6(lo + 49), "")
            lines = pc.binary_join_element_wise(vid, ",", url, ",", duration, ",", page_dir, ",", name_csv, "\n", "")
            written += _write_lines(f, lines)
            stats["name_chars"] += pc.sum(pc.utf8_length(name)).as_py()
            stats["url_chars"] += pc.sum(pc.utf8_length(url)).as_py()
            stats["quoted"] += int((comma | quote).sum())
            stats["with_quote_char"] += int(quote.sum())
    os.replace(tmp, path)
    return {
        "rows": rows,
        "bytes": written,
        "repeated_videoids": repeated,
        "quoted_names": stats["quoted"],
        "names_with_quote_chars": stats["with_quote_char"],
        "mean_name_chars": stats["name_chars"] / rows,
        "mean_url_chars": stats["url_chars"] / rows,
    }


def verify(kind: str, path: Path, meta: dict) -> dict:
    """Check the generated file parses as intended: row and field counts, and (WebVid) Python's csv agrees."""
    import csv
    import itertools

    import pyarrow.csv as pacsv

    if kind == "cc3m":
        ro = pacsv.ReadOptions(column_names=["caption", "url"])
        po = pacsv.ParseOptions(delimiter="\t", quote_char=False)
    else:
        ro, po = pacsv.ReadOptions(), pacsv.ParseOptions()
    rows = 0
    reader = pacsv.open_csv(path, read_options=ro, parse_options=po)  # raises on a wrong field count
    for b in reader:
        rows += b.num_rows
    assert rows == meta["rows"], (rows, meta["rows"])
    # a prefix with Python's csv module: field counts, and quotes round-trip
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.reader(f, delimiter="\t" if kind == "cc3m" else ",", quoting=csv.QUOTE_NONE if kind == "cc3m" else csv.QUOTE_MINIMAL)
        first = list(itertools.islice(rd, 200_001))
    want = 2 if kind == "cc3m" else 5
    assert all(len(r) == want for r in first), "a line with the wrong number of fields"
    if kind == "webvid":
        assert first[0] == ["videoid", "contentUrl", "duration", "page_dir", "name"]
        assert any("," in r[4] for r in first[1:]) and any('"' in r[4] for r in first[1:])
    return {"verified_rows": rows}


def generate_main(kind: str, rows: int, path: Path) -> None:
    t0 = time.perf_counter()
    meta = (generate_cc3m if kind == "cc3m" else generate_webvid)(path, rows)
    meta["generate_seconds"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    meta.update(verify(kind, path, meta))
    meta["verify_seconds"] = round(time.perf_counter() - t1, 1)
    meta["gen_version"] = GEN_VERSION
    meta["kind"] = kind
    sidecar(path).write_text(json.dumps(meta, indent=2))


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


# --------------------------------------------------------------------------------------------------------------
# the measured runs (each in its own child process)
# --------------------------------------------------------------------------------------------------------------

def run_baseline(kind: str, src: str, out_dir: str) -> dict:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if kind == "cc3m":
        ro = pacsv.ReadOptions(column_names=["caption", "url"])
        po = pacsv.ParseOptions(delimiter="\t", quote_char=False)
    else:
        ro, po = pacsv.ReadOptions(), pacsv.ParseOptions()
    t0 = time.perf_counter()
    reader = pacsv.open_csv(src, read_options=ro, parse_options=po)
    rows = 0
    with pq.ParquetWriter(os.path.join(out_dir, "baseline.parquet"), reader.schema, compression="zstd") as w:
        for batch in reader:
            w.write_batch(batch)
            rows += batch.num_rows
    return {"seconds": time.perf_counter() - t0, "rows_in": rows}


def run_ours(kind: str, src: str, out_dir: str) -> dict:
    from mllm_pipeline.sources.cc3m import ingest_cc3m
    from mllm_pipeline.sources.webvid import ingest_webvid
    from mllm_pipeline.storage import Storage

    files = loaded_project_files()
    code = source_digest(files)  # the code this child imported (read right after importing it)
    fn = ingest_cc3m if kind == "cc3m" else ingest_webvid
    t0 = time.perf_counter()
    rep = fn([src], Storage(out_dir))
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "code": code,
        "code_files": [str(f) for f in files],
        "report_seconds": rep.seconds,
        "rows_in": rep.rows_in,
        "rows_kept": rep.rows_kept,
        "quarantined": rep.quarantined,
        "shards": len(rep.shards),
        "extra": rep.extra,
    }


def source_digest(files: list[Path]) -> str:
    """A short hash of the given source files, to tell which code a run measured."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(files):
        h.update(str(p).encode() + b"\0" + (p.read_bytes() if p.exists() else b"<missing>") + b"\0")
    return h.hexdigest()[:12]


def loaded_project_files() -> list[Path]:
    """The files of the mllm_pipeline modules this process has imported (what an ingest run executes)."""
    return sorted({Path(m.__file__) for name, m in list(sys.modules.items())
                   if name.split(".")[0] == "mllm_pipeline" and getattr(m, "__file__", None)})


def git_state() -> str:
    """git HEAD of the repository and whether mllm_pipeline/ has uncommitted changes."""
    repo = HERE.parent

    def git(*a):
        r = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--", "mllm_pipeline")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in mllm_pipeline/" if dirty and dirty != "?" else "")


def child_main(run: str, kind: str, src: str, out_dir: str, result_file: str) -> None:
    c0 = time.process_time()
    info = (run_baseline if run == "baseline" else run_ours)(kind, src, out_dir)
    info["cpu_seconds"] = time.process_time() - c0
    info["self_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(result_file).write_text(json.dumps(info))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cpu_busy_seconds() -> float:
    """CPU time used by everything on the machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait: float, threshold: float = 0.2) -> float:
    """Wait (up to max_wait s) until the other processes use less than ``threshold`` cores; returns the seconds waited."""
    t0 = time.perf_counter()
    told = False
    while True:
        b0 = cpu_busy_seconds()
        time.sleep(1.0)
        load = cpu_busy_seconds() - b0
        waited = time.perf_counter() - t0
        if load < threshold or waited >= max_wait:
            if told:
                print(f"    ... machine {'idle' if load < threshold else 'still busy'} after {waited:.0f}s", flush=True)
            return waited
        if not told:
            print(f"    (other processes are using {load:.1f} cores; waiting up to {max_wait:.0f}s for an idle machine)", flush=True)
            told = True
        time.sleep(4.0)


def measure(run: str, kind: str, src: Path, workdir: Path, keep: bool) -> dict:
    """One contender in a fresh child; peak RSS from os.wait4 (this child only) and from psutil polling."""
    try:
        import psutil
    except ImportError:  # only the cross-check needs it
        psutil = None

    out_dir = workdir / f"run-{kind}-{run}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    result_file = workdir / f".result-{kind}-{run}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", run, "--kind", kind, "--file", str(src),
           "--out", str(out_dir), "--result", str(result_file)]
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid) if psutil else None
    polled = 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            polled = max(polled, ps.memory_info().rss) if ps else 0
        except psutil.Error:
            pass
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    busy = cpu_busy_seconds() - busy0
    if proc.returncode != 0:
        raise SystemExit(f"{run} on {kind} failed with exit status {proc.returncode}")
    info = json.loads(result_file.read_text())
    result_file.unlink()
    info["process_seconds"] = wall
    # CPU used meanwhile by other processes (anything but this child): another job on the machine skews the timing
    info["other_load_cores"] = max(0.0, busy - (ru.ru_utime + ru.ru_stime)) / wall
    info["peak_rss_mib"] = ru.ru_maxrss / 1024
    info["polled_rss_mib"] = polled / 2**20
    info["output_mib"] = dir_size(out_dir) / 2**20
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return info


def ensure_data(workdir: Path, cc3m_rows: int, webvid_rows: int) -> dict[str, tuple[Path, dict]]:
    wanted = {}
    if cc3m_rows:
        wanted["cc3m"] = (workdir / f"cc3m-{cc3m_rows}.tsv", cc3m_rows)
    if webvid_rows:
        wanted["webvid"] = (workdir / f"webvid-{webvid_rows}.csv", webvid_rows)
    procs = {}
    for kind, (path, rows) in wanted.items():
        meta_path = sidecar(path)
        ok = False
        if path.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            ok = meta.get("gen_version") == GEN_VERSION and meta.get("rows") == rows and meta.get("bytes") == path.stat().st_size
        if not ok:
            path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            print(f"generating {path.name} ({rows:,} rows) ...", flush=True)
            procs[kind] = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--generate", kind, "--rows", str(rows), "--file", str(path)]
            )
    for kind, p in procs.items():  # the two files are generated in parallel
        if p.wait() != 0:
            raise SystemExit(f"generating the {kind} file failed")
    out = {}
    for kind, (path, rows) in wanted.items():
        meta = json.loads(sidecar(path).read_text())
        if kind in procs:
            print(f"generated {path.name}: {meta['bytes'] / 2**20:,.0f} MiB in {meta['generate_seconds']}s "
                  f"(+{meta['verify_seconds']}s check): {json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in meta.items() if k.startswith(('mean', 'repeated', 'quoted', 'names'))})}",
                  flush=True)
        out[kind] = (path, meta)
    return out


def warm(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def fmt_q(q: dict) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(q.items())) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc3m-rows", type=int, default=CC3M_ROWS, help="rows of the CC3M TSV (0: skip it)")
    ap.add_argument("--webvid-rows", type=int, default=WEBVID_ROWS, help="rows of the WebVid CSV (0: skip it)")
    ap.add_argument("--workdir", default=str(HERE / "out"), help="where inputs are cached and runs write (default bench/out)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each contender; the best time is reported")
    ap.add_argument("--keep", action="store_true", help="keep the last run's outputs (Parquet) in the workdir")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--wait-idle", type=float, default=300, metavar="S",
                    help="before each run, wait up to S seconds for other processes to leave the CPUs idle (default 300)")
    ap.add_argument("--retries", type=int, default=2, help="measure a run again if other processes used the CPUs meanwhile")
    # internal: child processes
    ap.add_argument("--child", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--generate", choices=["cc3m", "webvid"], help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        return generate_main(args.generate, args.rows, Path(args.file))
    if args.child:
        return child_main(args.child, args.kind, args.file, args.out, args.result)

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    print(f"ingest benchmark, {started:%Y-%m-%d %H:%M %Z}; {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python {platform.python_version()}; "
          f"workdir {workdir}", flush=True)
    git0 = git_state()
    print(f"code under test: git {git0}", flush=True)
    files = ensure_data(workdir, args.cc3m_rows, args.webvid_rows)

    results = []
    for kind, (path, meta) in files.items():
        secs = warm(path)
        print(f"\n{path.name}: {meta['rows']:,} rows, {meta['bytes'] / 2**20:,.0f} MiB (read once to warm the page cache: {secs:.1f}s)", flush=True)
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for rep in range(args.repeats):
            for run in ("baseline", "ours"):
                for attempt in range(args.retries + 1):
                    wait_idle(args.wait_idle)
                    info = measure(run, kind, path, workdir, args.keep)
                    if info["other_load_cores"] <= 0.15 or attempt == args.retries:
                        break
                    print(f"  [{rep + 1}/{args.repeats}] {run:<8} {info['seconds']:7.1f}s  CONTENDED (other processes used "
                          f"{info['other_load_cores']:.1f} cores meanwhile): measuring again", flush=True)
                runs[run].append(info)
                extra = ""
                if run == "ours":
                    extra = f"  code {info['code']}  kept {info['rows_kept']:,}, quarantined {{{fmt_q(info['quarantined'])}}}, {info['shards']} shards"
                busy = info["other_load_cores"]
                if busy > 0.15:
                    extra += f"  CONTENDED: other processes used {busy:.1f} cores meanwhile"
                print(f"  [{rep + 1}/{args.repeats}] {run:<8} {info['seconds']:7.1f}s  cpu {info['cpu_seconds']:6.1f}s  "
                      f"peak RSS {info['peak_rss_mib']:6.0f} MiB (polled {info['polled_rss_mib']:5.0f})  "
                      f"out {info['output_mib']:5.0f} MiB{extra}", flush=True)
        results.append((kind, path, meta, runs))

    rows_out = []
    for kind, path, meta, runs in results:
        b = min(runs["baseline"], key=lambda r: r["seconds"])
        o = min(runs["ours"], key=lambda r: r["seconds"])
        b_rss = max(r["peak_rss_mib"] for r in runs["baseline"])
        o_rss = max(r["peak_rss_mib"] for r in runs["ours"])
        ratio = o["seconds"] / b["seconds"]
        rows_out.append({
            "file": kind, "rows": meta["rows"], "mib": meta["bytes"] / 2**20,
            "baseline_s": b["seconds"], "ours_s": o["seconds"], "ratio": ratio,
            "baseline_rss_mib": b_rss, "ours_rss_mib": o_rss,
            "baseline_rows_per_s": meta["rows"] / b["seconds"], "ours_rows_per_s": meta["rows"] / o["seconds"],
            "ratio_met": ratio <= TARGET_RATIO, "rss_met": o_rss < TARGET_RSS_MIB,
            "rss_target_applies": kind == "webvid",
            "rows_in": o["rows_in"], "rows_kept": o["rows_kept"], "quarantined": o["quarantined"], "shards": o["shards"],
            "repeated_videoids_generated": meta.get("repeated_videoids"),
            "runs": runs,
        })

    print(f"\nsummary (best of {args.repeats} for time, highest of {args.repeats} for peak RSS; "
          f"targets: ours/baseline <= {TARGET_RATIO}, ours peak RSS < {TARGET_RSS_MIB} MiB on WebVid)\n")
    hdr = (f"{'file':<7} {'rows':>11} {'MiB':>6} {'base s':>7} {'ours s':>7} {'ratio':>6} {'base RSS':>9} {'ours RSS':>9} "
           f"{'base rows/s':>12} {'ours rows/s':>12}  targets")
    print(hdr)
    print("-" * len(hdr))
    for r in rows_out:
        tgt = f"time {'met' if r['ratio_met'] else 'MISSED'}"
        if r["rss_target_applies"]:
            tgt += f", memory {'met' if r['rss_met'] else 'MISSED'}"
        print(f"{r['file']:<7} {r['rows']:>11,} {r['mib']:>6,.0f} {r['baseline_s']:>7.1f} {r['ours_s']:>7.1f} {r['ratio']:>6.2f} "
              f"{r['baseline_rss_mib']:>5.0f} MiB {r['ours_rss_mib']:>5.0f} MiB {r['baseline_rows_per_s']:>12,.0f} "
              f"{r['ours_rows_per_s']:>12,.0f}  {tgt}")
    print()
    for r in rows_out:
        q = sum(r["quarantined"].values())
        line = (f"{r['file']}: ours read {r['rows_in']:,}, kept {r['rows_kept']:,}, quarantined {q:,} "
                f"({fmt_q(r['quarantined'])}), {r['shards']} shards")
        if r["repeated_videoids_generated"] is not None:
            dup = r["quarantined"].get("duplicate_id", 0)
            line += (f"; repeated videoids generated {r['repeated_videoids_generated']:,} "
                     f"({r['repeated_videoids_generated'] / r['rows']:.3%}), duplicate_id quarantined {dup:,} "
                     f"-> {'matches' if dup == r['repeated_videoids_generated'] else 'DOES NOT MATCH'}")
        ok = r["rows_in"] == r["rows"] and r["rows_kept"] + q == r["rows_in"]
        print(line + ("" if ok else "  ROW COUNTS DO NOT ADD UP"))
    contended = [r for _, _, _, runs in results for rr in runs.values() for r in rr if r["other_load_cores"] > 0.15]
    if contended:
        print(f"\nWARNING: {len(contended)} run(s) shared the CPUs with other processes (up to "
              f"{max(r['other_load_cores'] for r in contended):.1f} cores); the times are not reliable -- run again on an idle machine.")
    ours_runs = [r for _, _, _, runs in results for r in runs["ours"]]
    digests = sorted({r["code"] for r in ours_runs})
    files = sorted({Path(f) for r in ours_runs for f in r["code_files"]})
    now = source_digest(files) if files else None
    git1 = git_state()
    if len(digests) > 1 or (now and now not in digests):
        print(f"\nWARNING: the ingest code changed during the benchmark (digests of the imported mllm_pipeline files: "
              f"{', '.join(digests)}; now {now}); the runs did not all measure the same code -- run again.")
    elif digests:
        print(f"\nall 'ours' runs measured the same code: digest {digests[0]} of the {len(files)} imported "
              f"mllm_pipeline files (git {git0}{'' if git1 == git0 else f'; now {git1}'}).")
    print(f"this (parent) process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(inherited by the children at exec, so it bounds the error of their peak RSS); "
          f"total {time.perf_counter() - T0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "cpus": os.cpu_count(), "git": git0,
                                               "code_digests": digests, "results": rows_out}, indent=2, default=str))


T0 = time.perf_counter()

if __name__ == "__main__":
    main()
