"""Where the time and memory of ``ingest_cc3m`` / ``ingest_webvid`` go, phase by phase.

    .venv/bin/python bench/profile_ingest.py webvid bench/out/webvid-10727607.csv
    .venv/bin/python bench/profile_ingest.py cc3m bench/out/cc3m-3318333.tsv
    .venv/bin/python bench/profile_ingest.py webvid bench/out/webvid-10727607.csv --baseline   # the bare baseline, split
    .venv/bin/python bench/profile_ingest.py cc3m bench/out/cc3m-3318333.tsv --write-experiments 1000000
    what-ifs (this process only): --block-size MIB, --in-flight N, --writers N, --inline-writes, --caller-runs

Nothing in ``mllm_pipeline/`` is copied or changed: in this process only, the names the ingest code looks up at
call time are wrapped with timers -- the module-level helpers (``is_blank``, ``bad_url``, ``first_reason``,
``base_table``, ``const``, ``list_of_one``, ``parse_iso_duration``, ``_decode_utf8``...), the ``RawIngest`` and
``_ShardBuffer`` methods, ``SeenIds.first_seen``, each ``pyarrow.compute`` function the parsers call directly
(through a proxy for their ``pc`` module), the pyarrow CSV reader's batches and ``pyarrow.parquet.write_table``.
So the profile follows whatever the code is now, even while it is being edited (a wrapper whose target has gone is
skipped and listed).

Main-thread time is shown inclusive and exclusive (self) per wrapped call site; work done on other threads (the
background shard writer) is shown separately, since it overlaps the main thread. Peak RSS and the Arrow memory
pool's peak are sampled after every batch.
"""

from __future__ import annotations

import argparse
import functools
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

import mllm_pipeline.sources.cc3m as cc3m_mod
import mllm_pipeline.sources.common as common_mod
import mllm_pipeline.sources.delimited as delim_mod
import mllm_pipeline.sources.webvid as webvid_mod
from mllm_pipeline.storage import Storage

HERE = Path(__file__).resolve().parent
_END = object()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class Profiler:
    def __init__(self) -> None:
        self.main = threading.get_ident()
        self.incl: dict[str, float] = defaultdict(float)
        self.excl: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.bg: dict[str, float] = defaultdict(float)
        self.bg_calls: Counter[str] = Counter()
        self.bg_threads: dict[str, set] = defaultdict(set)
        self.stack: list[float] = []
        self.missing: list[str] = []
        self.peak_rss = 0.0
        self.peak_pool = 0
        self.rss_samples: list[tuple[float, float]] = []

    def call(self, name: str, fn, *a, **k):
        if threading.get_ident() != self.main:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.bg[name] += time.perf_counter() - t0
                self.bg_calls[name] += 1
                self.bg_threads[name].add(threading.current_thread().name)
        self.stack.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t0
            child = self.stack.pop()
            self.incl[name] += dt
            self.excl[name] += dt - child
            self.calls[name] += 1
            if self.stack:
                self.stack[-1] += dt

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            return self.call(name, fn, *a, **k)

        return wrapper

    def wrap_gen(self, name: str, fn):
        """A generator function whose every ``next`` is timed as ``name``."""

        @functools.wraps(fn)
        def wrapper(*a, **k):
            gen = fn(*a, **k)
            while True:
                item = self.call(name, next, gen, _END)
                if item is _END:
                    return
                self.sample()
                yield item

        return wrapper

    def patch(self, obj, attr: str, name: str | None = None, gen: bool = False) -> None:
        fn = getattr(obj, attr, None)
        label = name or f"{getattr(obj, '__name__', type(obj).__name__)}.{attr}"
        if fn is None:
            self.missing.append(label)
            return
        setattr(obj, attr, (self.wrap_gen if gen else self.wrap)(label, fn))

    def sample(self) -> None:
        r = rss_mib()
        self.peak_rss = max(self.peak_rss, r)
        self.peak_pool = max(self.peak_pool, pa.total_allocated_bytes())
        self.rss_samples.append((time.perf_counter(), r))


class ModuleProxy:
    """Stands in for ``pyarrow.compute`` (or ``pyarrow.csv``) in one module: every function it hands out is timed."""

    def __init__(self, prof: Profiler, module, prefix: str, special: dict | None = None):
        self._prof, self._module, self._prefix, self._special = prof, module, prefix, special or {}

    def __getattr__(self, attr):
        value = getattr(self._module, attr)
        if attr in self._special:
            value = self._special[attr]
        elif callable(value) and not isinstance(value, type):
            value = self._prof.wrap(f"{self._prefix}.{attr}", value)
        setattr(self, attr, value)
        return value


class TimedReader:
    """Wraps the pyarrow CSV streaming reader so that producing each batch (read + parse + convert) is timed."""

    def __init__(self, prof: Profiler, reader):
        self._prof, self._reader = prof, reader

    def __getattr__(self, attr):
        return getattr(self._reader, attr)

    def __iter__(self):
        while True:
            try:
                batch = self._prof.call("pyarrow CSV reader: next batch (read, parse, to binary)", self._reader.read_next_batch)
            except StopIteration:
                return
            yield batch


def instrument(prof: Profiler) -> None:
    def open_csv(*a, **k):
        return TimedReader(prof, prof.call("pyarrow CSV reader: open_csv", pacsv.open_csv, *a, **k))

    delim_mod.pacsv = ModuleProxy(prof, pacsv, "pacsv", {"open_csv": open_csv})
    for name in ("_decode_utf8", "_field_count_rejects", "quarantine_table", "read_header"):
        prof.patch(delim_mod, name, f"delimited.{name}")
    for mod, short in ((cc3m_mod, "cc3m"), (webvid_mod, "webvid")):
        prof.patch(mod, "stream_delimited", "delimited.stream_delimited (glue per chunk)", gen=True)
        for name in ("first_reason", "is_blank", "bad_url", "base_table", "const", "list_of_one", "zero_pad",
                     "joined_raw", "parse_iso_duration", "has_header", "read_header", "check_columns"):
            if hasattr(mod, name):
                prof.patch(mod, name, f"{name}()")
        mod.pc = ModuleProxy(prof, pc, f"{short}: pc")
    for name in ("count_in", "quarantine", "add", "partition", "add_checked", "commit"):
        prof.patch(common_mod.RawIngest, name, f"RawIngest.{name}")
    for name in ("add", "_flush", "close", "drain"):
        prof.patch(common_mod._ShardBuffer, name, f"_ShardBuffer.{name}")
    prof.patch(common_mod.SeenIds, "first_seen", "SeenIds.first_seen")
    prof.patch(common_mod, "quarantine_table", "quarantine_table()")
    prof.patch(common_mod, "reason_details", "reason_details()")
    # the shard files: pq.write_table is looked up on the pyarrow.parquet module at call time
    prof.patch(pq, "write_table", "pq.write_table (one shard file)")
    prof.patch(Storage, "atomic_write", "Storage.atomic_write (open)")


def report(prof: Profiler, wall: float, title: str) -> None:
    print(f"\n{title}: {wall:.1f}s wall; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(sampled per batch {prof.peak_rss:.0f}), Arrow pool ({pa.default_memory_pool().backend_name}) peak "
          f"{pa.default_memory_pool().max_memory() / 2**20:.0f} MiB, allocated at a batch boundary at most "
          f"{prof.peak_pool / 2**20:.0f} MiB")
    print(f"\nmain thread (self = time not spent in another wrapped call), sorted by self time:")
    print(f"  {'self s':>7} {'%wall':>6} {'incl s':>7} {'calls':>7}  call")
    for name in sorted(prof.excl, key=lambda k: -prof.excl[k]):
        if prof.excl[name] < 0.005 * wall and prof.incl[name] < 0.01 * wall:
            continue
        print(f"  {prof.excl[name]:7.2f} {100 * prof.excl[name] / wall:5.1f}% {prof.incl[name]:7.2f} {prof.calls[name]:7d}  {name}")
    accounted = sum(prof.excl.values())
    print(f"  {wall - accounted:7.2f} {100 * (wall - accounted) / wall:5.1f}%                   (not inside any wrapped call: "
          f"the parser's own lines, pa.array(...) etc.)")
    if prof.bg:
        print("\nother threads (overlap the main thread):")
        for name in sorted(prof.bg, key=lambda k: -prof.bg[k]):
            print(f"  {prof.bg[name]:7.2f}s {prof.bg_calls[name]:7d} calls  {name}  [{', '.join(sorted(prof.bg_threads[name]))}]")
    if prof.missing:
        print(f"\n(not found in the current code, not timed: {', '.join(prof.missing)})")


class InlineExecutor:
    """Stand-in for the shard buffer's ThreadPoolExecutor: runs each write at once on the calling thread."""

    def __init__(self, *a, **k):
        pass

    def submit(self, fn, *a, **k):
        from concurrent.futures import Future

        fut: Future = Future()
        try:
            fut.set_result(fn(*a, **k))
        except BaseException as e:  # noqa: BLE001
            fut.set_exception(e)
        return fut

    def shutdown(self, wait=True):
        pass


class CallerRunsExecutor:
    """What-if writer pool: one background thread; a shard that arrives while it is busy is written by the caller.

    So the main thread never sits idle waiting for the writer (it writes instead), and never more than two threads
    (the main one and the writer) compete for the CPUs; nothing queues, so memory stays bounded.
    """

    def __init__(self, *a, **k):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=k.get("thread_name_prefix", "write"))
        self._busy = threading.Event()

    def submit(self, fn, *a, **k):
        if self._busy.is_set():
            return InlineExecutor().submit(fn, *a, **k)
        self._busy.set()
        fut = self._pool.submit(fn, *a, **k)
        fut.add_done_callback(lambda _: self._busy.clear())
        return fut

    def shutdown(self, wait=True):
        self._pool.shutdown(wait=wait)


def write_experiments(kind: str, path: str, rows: int) -> None:
    """Write the very table ``ours`` writes (first ``rows`` rows of the file) in several ways, single-threaded.

    The table is produced by the real ingest (on a prefix of the file) and read back from its shards, so it has
    exactly the columns and types of the raw shards.
    """
    import itertools
    import os

    with tempfile.TemporaryDirectory(dir=HERE / "out", prefix="writes-") as d:
        prefix = f"{d}/input{Path(path).suffix}"
        with open(path, "rb") as src, open(prefix, "wb") as dst:
            dst.writelines(itertools.islice(src, rows + (1 if kind == "webvid" else 0)))
        storage = Storage(f"{d}/root")
        fn = cc3m_mod.ingest_cc3m if kind == "cc3m" else webvid_mod.ingest_webvid
        fn([prefix], storage)
        shards = common_mod.read_raw_shards(storage, kind)
        table = pa.concat_tables([pq.read_table(s) for s in shards])
        table = table.combine_chunks()
        labels = [f.name for f in table.schema if pa.types.is_dictionary(f.type)]
        n = table.num_rows
        src_cols = {"cc3m": ["captions", "url"], "webvid": ["src_videoid", "url", "src_duration", "src_page_dir", "captions"]}[kind]
        flat = table.set_column(table.schema.get_field_index("captions"), "captions",
                                pc.list_flatten(table.column("captions")))
        print(f"\nwrite experiments, {kind}: the {n:,} rows x {table.num_columns} columns that ours writes for the first "
              f"{rows:,} lines ({table.nbytes / 2**20:.0f} MiB in memory); one thread, no GIL contention\n")

        def timeit(label, fn):
            out = f"{d}/w"
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            t0 = time.perf_counter()
            fn(out)
            dt = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in Path(out).iterdir())
            print(f"  {dt:6.2f}s  {n / dt:>10,.0f} rows/s  {size / 2**20:6.1f} MiB  {label}")

        def per_file(t, **kw):
            def go(out):
                for i in range(0, n, 10_000):
                    pq.write_table(t.slice(i, 10_000), f"{out}/s{i}.parquet", **kw)
            return go

        def per_file_fsspec(out):  # what _ShardBuffer does: Storage.atomic_write (fsspec file object)
            st = Storage(out)
            for i in range(0, n, 10_000):
                with st.atomic_write(f"s{i}.parquet") as f:
                    pq.write_table(table.slice(i, 10_000), f, compression="zstd", use_dictionary=labels or False)

        def one_writer(t, rg, **kw):
            def go(out):
                with pq.ParquetWriter(f"{out}/all.parquet", t.schema, **kw) as w:
                    for i in range(0, n, rg):
                        w.write_table(t.slice(i, rg))
            return go

        base = dict(compression="zstd", use_dictionary=labels or False)
        timeit("as ours: 10k-row files via Storage.atomic_write (fsspec file object)", per_file_fsspec)
        timeit("10k-row files, native local path (pq.write_table(t, '/path'))", per_file(table, **base))
        timeit("10k-row files, native path, captions as plain string instead of list<string>", per_file(flat, **base))
        timeit("10k-row files, native path, use_dictionary=True (all columns)", per_file(table, compression="zstd"))
        timeit("10k-row files, native path, write_statistics=False", per_file(table, write_statistics=False, **base))
        timeit("10k-row files, native path, snappy instead of zstd", per_file(table, compression="snappy", use_dictionary=labels or False))
        timeit("10k-row files, native path, no compression", per_file(table, compression="none", use_dictionary=labels or False))
        timeit("one file, 10k-row row groups", one_writer(table, 10_000, **base))
        timeit("one file, 100k-row row groups", one_writer(table, 100_000, **base))
        timeit(f"10k-row files, native path, only the {len(src_cols)} source columns (what the baseline writes)",
               per_file(table.select(src_cols), **base))
        timeit(f"one file, 64k-row row groups, only the source columns, dictionary on (~ the baseline's writer)",
               one_writer(table.select(src_cols), 65_536, compression="zstd"))


def baseline_split(kind: str, path: str, threads: bool) -> None:
    """The bare baseline with the read and the Parquet write timed separately."""
    ro = pacsv.ReadOptions(column_names=["caption", "url"] if kind == "cc3m" else None, use_threads=threads)
    po = pacsv.ParseOptions(delimiter="\t" if kind == "cc3m" else ",", quote_char=False if kind == "cc3m" else '"')
    t_read = t_write = 0.0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=HERE / "out") as d:
        reader = pacsv.open_csv(path, read_options=ro, parse_options=po)
        with pq.ParquetWriter(f"{d}/b.parquet", reader.schema, compression="zstd") as w:
            while True:
                t1 = time.perf_counter()
                try:
                    b = reader.read_next_batch()
                except StopIteration:
                    break
                t2 = time.perf_counter()
                w.write_batch(b)
                t_read += t2 - t1
                t_write += time.perf_counter() - t2
        total = time.perf_counter() - t0
    print(f"baseline {kind}, use_threads={threads}: {total:.1f}s = read+parse {t_read:.1f}s + Parquet write {t_write:.1f}s; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["cc3m", "webvid"])
    ap.add_argument("file")
    ap.add_argument("--baseline", action="store_true", help="split the bare baseline into read and write instead")
    ap.add_argument("--no-threads", action="store_true", help="with --baseline: ReadOptions(use_threads=False)")
    ap.add_argument("--inline-writes", action="store_true",
                    help="write the shards on the main thread (replaces the shard buffer's ThreadPoolExecutor)")
    ap.add_argument("--in-flight", type=int, help="what-if: _ShardBuffer.MAX_WRITES_IN_FLIGHT (the code's default: 2)")
    ap.add_argument("--writers", type=int, help="what-if: threads of the shard buffer's writer pool (the code's: 1)")
    ap.add_argument("--block-size", type=int, metavar="MIB",
                    help="what-if: stream_delimited's block_size in MiB (the code's default: BLOCK_SIZE)")
    ap.add_argument("--caller-runs", action="store_true",
                    help="what-if: one writer thread, and the main thread writes a shard itself when the writer is busy")
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval (GIL hand-over), default 0.005 s")
    ap.add_argument("--write-experiments", type=int, metavar="ROWS",
                    help="instead: write the table ours writes for the first ROWS lines in several ways")
    args = ap.parse_args()
    if args.baseline:
        return baseline_split(args.kind, args.file, not args.no_threads)
    if args.write_experiments:
        return write_experiments(args.kind, args.file, args.write_experiments)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.inline_writes:
        common_mod.ThreadPoolExecutor = InlineExecutor
    if args.block_size:
        delim_mod.stream_delimited.__kwdefaults__["block_size"] = args.block_size << 20
    if args.caller_runs:
        common_mod.ThreadPoolExecutor = CallerRunsExecutor
        common_mod._ShardBuffer.MAX_WRITES_IN_FLIGHT = 1_000_000  # the executor never holds more than one
    if args.in_flight:
        common_mod._ShardBuffer.MAX_WRITES_IN_FLIGHT = args.in_flight
    if args.writers:
        from concurrent.futures import ThreadPoolExecutor

        common_mod.ThreadPoolExecutor = functools.partial(
            lambda *a, n, **k: ThreadPoolExecutor(*a, **{**k, "max_workers": n}), n=args.writers)
    prof = Profiler()
    instrument(prof)
    print(f"stream_delimited block_size: {delim_mod.stream_delimited.__kwdefaults__['block_size'] >> 20} MiB")
    fn = cc3m_mod.ingest_cc3m if args.kind == "cc3m" else webvid_mod.ingest_webvid
    with tempfile.TemporaryDirectory(dir=HERE / "out", prefix="profile-") as root:
        t0 = time.perf_counter()
        rep = fn([args.file], Storage(root))
        wall = time.perf_counter() - t0
    mode = "writes inline" if args.inline_writes else "background writer"
    if args.block_size:
        mode += f", block_size {args.block_size} MiB"
    if args.caller_runs:
        mode += ", caller-runs writes"
    if args.in_flight:
        mode += f", MAX_WRITES_IN_FLIGHT={args.in_flight}"
    if args.writers:
        mode += f", {args.writers} writer threads"
    if args.switch_interval:
        mode += f", switch interval {args.switch_interval * 1e3:g} ms"
    report(prof, wall, f"[{mode}] {args.kind}: {rep.rows_in:,} rows in, {rep.rows_kept:,} kept, quarantined {rep.quarantined}, "
                       f"{len(rep.shards)} shards")


if __name__ == "__main__":
    main()
