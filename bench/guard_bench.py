"""Benchmark: the guard proxy alone, under high client concurrency on loopback, against the same client talking
to the server directly, in the same run.

    .venv/bin/python bench/guard_bench.py                   # 3,000 requests of ~110 KiB, 64 client threads
    .venv/bin/python bench/guard_bench.py --https           # the same over HTTPS (the guard intercepts TLS)

The media server (``mllm_pipeline_tests.media_server``) and the client (``--threads`` threads of ``urllib``, which is what
img2dataset uses, through ``http_proxy`` / ``https_proxy`` or not) each run in their own process; the guard
proxy runs in this process, alone, as it does in the asset's process. Per contender: requests/s; for the guard also
its CPU: the event-loop thread's CPU time (``GuardProxy.cpu_seconds``) and this whole process's CPU (the loop
thread plus the resolver threads asyncio uses for ``getaddrinfo``), per request, and the request rate one guard
process could sustain at that cost (1 / CPU seconds per request).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CLIENT = r"""
import json, os, ssl, sys, threading, time, urllib.request
urls = [l.strip() for l in open(sys.argv[1]) if l.strip()]
threads = int(sys.argv[2])
ok = [0]
lock = threading.Lock()
it = iter(urls)
def work():
    while True:
        with lock:
            u = next(it, None)
        if u is None:
            return
        with urllib.request.urlopen(u, timeout=30) as r:
            n = len(r.read())
        with lock:
            ok[0] += n > 0
t0 = time.perf_counter()
ts = [threading.Thread(target=work) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"seconds": time.perf_counter() - t0, "ok": ok[0]}))
"""


def run_client(urls: Path, threads: int, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CLIENT, str(urls), str(threads)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--files", type=int, default=200, help="distinct files served (cycled)")
    ap.add_argument("--size-kib", type=int, default=110)
    ap.add_argument("--https", action="store_true")
    ap.add_argument("--bundle", action="store_true",
                    help="HTTPS: the client trusts the guard's CA plus the system bundle (as the video downloaders "
                    "do) instead of the guard's CA alone (as img2dataset does)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--guard-processes", type=int, nargs="+", default=[1],
                    help="relay processes of the guard; several values are measured one after the other")
    ap.add_argument("--workdir", default=str(HERE / "out" / "guard"))
    args = ap.parse_args()

    from mllm_pipeline.download.guard.proxy import GuardProxy
    from mllm_pipeline.download.guard.url_policy import UrlPolicy

    work = Path(args.workdir)
    (work / "www").mkdir(parents=True, exist_ok=True)
    for i in range(args.files):
        p = work / "www" / f"{i:04d}.jpg"
        if not p.exists() or p.stat().st_size != args.size_kib * 1024:
            p.write_bytes(os.urandom(args.size_kib * 1024))
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    scheme = "https" if args.https else "http"
    server_code = (
        "import sys\nfrom pathlib import Path\nfrom mllm_pipeline_tests.media_server import serve_directory\nctx = None\n"
        "if sys.argv[2] == 'https':\n"
        "    from mllm_pipeline_tests.download.tls import TestCA\n"
        "    ca = TestCA(Path(sys.argv[3]))\n    ctx = ca.server_context('127.0.0.1')\n    print('CA', ca.ca_file, flush=True)\n"
        "with serve_directory(sys.argv[1], ssl_context=ctx) as s:\n    print(s.base_url, flush=True)\n    sys.stdin.read()\n")
    server_cmd = [sys.executable, "-c", server_code, str(work / "www"), scheme, str(work / "ca")]
    server = subprocess.Popen(server_cmd, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = server.stdout.readline().split()
        if line[0] == "CA":  # the client and the guard trust the server's CA through the usual variable
            env["SSL_CERT_FILE"] = env["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = line[1]
            line = server.stdout.readline().split()
        base = line[0]
        urls = work / "urls.txt"
        urls.write_text("".join(f"{base}/{i % args.files:04d}.jpg\n" for i in range(args.requests)))
        print(f"{args.requests} {scheme.upper()} requests of {args.size_kib} KiB, {args.threads} client threads, "
              f"{os.cpu_count()} cores", flush=True)
        direct, guarded = [], []
        for rep in range(args.repeats):
            d = run_client(urls, args.threads, env)
            direct.append(d)
            print(f"  direct: {d['seconds']:.2f}s  {args.requests / d['seconds']:.0f} req/s  ({d['ok']} ok)", flush=True)
            for gp in args.guard_processes:
                c0 = cpu_self()
                with GuardProxy(UrlPolicy(allow_loopback=True), processes=gp) as proxy:
                    g = run_client(urls, args.threads, {**env, **proxy.env(ca_only=not args.bundle)})
                # the relay processes' CPU comes back with their records; a spawned child's is not in RUSAGE_SELF
                g["loop_cpu_s"] = proxy.cpu_seconds or 0.0
                g["process_cpu_s"] = cpu_self() - c0 if gp == 1 else g["loop_cpu_s"]
                g["requests"], g["processes"] = proxy.stats.requests, gp
                guarded.append(g)
                print(f"  guard x{gp}: {g['seconds']:.2f}s  {args.requests / g['seconds']:.0f} req/s  ({g['ok']} ok); "
                      f"guard CPU {1000 * g['loop_cpu_s'] / args.requests:.3f} ms/request (loop threads), "
                      f"{1000 * g['process_cpu_s'] / args.requests:.3f} ms/request (process{'es' if gp > 1 else ''})",
                      flush=True)
    finally:
        server.terminate()
        server.wait()
    best_d = min(d["seconds"] for d in direct)
    for gp in args.guard_processes:
        mine = [g for g in guarded if g["processes"] == gp]
        best_g = min(g["seconds"] for g in mine)
        ms = 1000 * min(g["process_cpu_s"] for g in mine) / args.requests
        print(f"guard x{gp}: ratio guard/direct throughput (best of {args.repeats}): {best_d / best_g:.2f}; guard CPU "
              f"{ms:.3f} ms/request -> {gp} guard process(es) sustain at most ~{gp * 1000 / ms:.0f} requests/s "
              f"of this size at 100% of {gp} core(s)", flush=True)

if __name__ == "__main__":
    main()
