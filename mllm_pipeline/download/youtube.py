"""The YouTube preflight: before a video shard with YouTube rows fetches anything, check that yt-dlp can fetch them.

yt-dlp (since late 2025) extracts YouTube formats only with an external JavaScript runtime (deno by default; node,
quickjs, bun when enabled through its ``js_runtimes``) and its challenge solver scripts (the ``yt-dlp-ejs``
package). Without them, and with a cookies file that is missing or not in Netscape format (yt-dlp then goes on
without cookies, silently), every row of a shard fails, one by one. :func:`youtube_preflight` asks the
video2dataset environment's yt-dlp what it has (``yt_dlp_probe.py``, run with that environment's Python and the
worker's ``PATH``; the discovery is yt-dlp's own code), checks the cookies file here, and raises
:class:`YouTubePreflightError` with one message that names everything missing and the command that fixes it.

Only rows fetched from YouTube need it (:func:`is_youtube_url`): direct MP4 URLs and files on disk do not.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PROBE = Path(__file__).with_name("yt_dlp_probe.py")
YOUTUBE_HOSTS = ("youtube.com", "youtu.be", "youtube-nocookie.com")
PROBE_TIMEOUT_S = 120
#: the first line MozillaCookieJar (and so yt-dlp's YoutubeDLCookieJar) requires of a cookies file
_NETSCAPE_HEADER = getattr(http.cookiejar, "NETSCAPE_MAGIC_RGX", re.compile("#( Netscape)? HTTP Cookie File"))

_lock = threading.Lock()
_passed: dict[tuple[str, str, str], dict[str, Any]] = {}  # probes that found everything, per python/params/PATH


class YouTubePreflightError(RuntimeError):
    """yt-dlp cannot fetch YouTube videos as configured; the message names what is missing and how to fix it."""


def is_youtube_url(url: str | None) -> bool:
    """A YouTube watch / short / embed URL (``youtube.com``, ``youtu.be``, ``youtube-nocookie.com`` and their
    subdomains); yt-dlp's YouTube extractor fetches these."""
    if not url:
        return False
    try:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    return any(host == h or host.endswith("." + h) for h in YOUTUBE_HOSTS)


def js_runtimes_param(specs: Iterable[str]) -> dict[str, dict[str, str | None]]:
    """yt-dlp's ``js_runtimes`` param from ``RUNTIME[:PATH]`` strings, as its ``--js-runtimes`` option builds it
    (yt_dlp/__init__.py): ``["deno", "node:/opt/node/bin/node"]`` -> ``{"deno": {"path": None}, "node": {...}}``.
    PATH is the executable or the folder holding it."""
    out: dict[str, dict[str, str | None]] = {}
    for spec in specs:
        name, _, path = str(spec).strip().partition(":")
        if not name.strip():
            raise ValueError(f"js_runtimes: {spec!r} names no runtime (RUNTIME or RUNTIME:PATH, e.g. deno or node:/usr/bin/node)")
        out[name.strip().lower()] = {"path": path.strip() or None}
    return out


def youtube_preflight(yt_dlp_params: dict[str, Any], *, rows: int = 0, python: str | None = None, log: Any = None) -> str:
    """Check that yt-dlp can fetch YouTube videos with these params (the ones the worker merges into every yt-dlp
    call); returns a one-line summary (also logged) or raises :class:`YouTubePreflightError` naming every problem
    and its fix. ``python``: the video2dataset environment's interpreter (default: the one the worker runs in)."""
    problems: list[str] = []
    facts: list[str] = []
    try:
        if python is None:
            from mllm_pipeline.download.videos import video2dataset_python

            python = video2dataset_python()
    except FileNotFoundError as e:
        problems.append(f"yt-dlp runs in the video2dataset environment, and there is none: {e}")
    else:
        probe = _probe(python, yt_dlp_params)
        found, fixes = _yt_dlp_problems(probe, python, yt_dlp_params)
        problems += fixes
        facts += found
    cookiefile = yt_dlp_params.get("cookiefile")
    if cookiefile:
        problem, fact = check_cookies_file(cookiefile)
        if problem:
            problems.append(problem)
        else:
            facts.append(fact)
    else:
        facts.append("cookies: none configured")
    if problems:
        what = f"{rows} row(s) of this shard are" if rows else "this shard has"
        raise YouTubePreflightError(
            f"YouTube preflight failed: {what} YouTube videos, and yt-dlp cannot fetch them as configured; nothing "
            "was fetched.\n" + "\n".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
    summary = "YouTube preflight passed: " + "; ".join(facts)
    if log is not None:
        log.info(summary)
    return summary


def check_cookies_file(path: str) -> tuple[str | None, str]:
    """(problem or None, summary) for a yt-dlp ``cookiefile``: it exists, this process can read it, and it is in
    the Netscape format yt-dlp loads (the header check of http.cookiejar.MozillaCookieJar._really_load, which
    yt-dlp's ``YoutubeDLCookieJar`` inherits). yt-dlp itself skips a missing or unreadable file without a word."""
    p = os.path.expandvars(os.path.expanduser(str(path)))  # yt-dlp's expand_path
    export = (f"export YouTube cookies in Netscape format, e.g. on a machine with a signed-in browser: yt-dlp "
              f"--cookies-from-browser firefox --cookies {p} --skip-download https://www.youtube.com/ (see yt-dlp's "
              "FAQ on passing cookies)")
    if not os.path.exists(p):
        return (f"the cookies file {p} (yt_dlp_options cookiefile) does not exist; yt-dlp would go on without "
                f"cookies. Fix: {export}, or remove cookiefile."), ""
    if os.path.isdir(p):
        return f"the cookies file {p} (yt_dlp_options cookiefile) is a directory. Fix: point cookiefile at the file.", ""
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        return (f"the cookies file {p} (yt_dlp_options cookiefile) is not readable by this process "
                f"({e.strerror or e}). Fix: let the run's user read it (chown it to that user, chmod 600)."), ""
    first = text.splitlines()[0] if text else ""
    if not _NETSCAPE_HEADER.match(first):
        kind = "holds JSON, not" if text.lstrip()[:1] in ("[", "{") else "is not in"
        return (f"the cookies file {p} (yt_dlp_options cookiefile) {kind} the Netscape format yt-dlp loads: its first "
                f"line must be '# Netscape HTTP Cookie File' (or '# HTTP Cookie File'), and it starts {first[:60]!r}. "
                f"Fix: {export}."), ""
    youtube = 0
    for line in text.splitlines()[1:]:
        line = line.removeprefix("#HttpOnly_")
        fields = line.split("\t")
        if not line.startswith("#") and len(fields) == 7 and fields[0].lower().lstrip(".").endswith("youtube.com"):
            youtube += 1
    note = "" if youtube else "; none for youtube.com, so YouTube gets no cookies from it"
    return None, f"cookies: {p} ({youtube} youtube.com cookie(s){note})"


def _probe(python: str, params: dict[str, Any]) -> dict[str, Any]:
    key = (python, json.dumps(params, sort_keys=True, default=str), os.environ.get("PATH", ""))
    with _lock:
        if key in _passed:
            return _passed[key]
    try:
        done = subprocess.run([python, str(PROBE)], input=json.dumps(params, default=str), capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, env=dict(os.environ))
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"probe_error": f"{type(e).__name__}: {e}"}
    try:
        probe = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"probe_error": f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"}
    if not _yt_dlp_problems(probe, python, params)[1]:
        with _lock:
            _passed[key] = probe
    return probe


def _yt_dlp_problems(probe: dict[str, Any], python: str, params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(facts, problems) from the probe's answer."""
    pip = f"{python} -m pip install"
    if "probe_error" in probe:
        return [], [f"could not ask {python} about yt-dlp ({probe['probe_error']}). Fix: scripts/setup.sh creates "
                    ".venv-video2dataset; MLLM_VIDEO2DATASET_PYTHON, where set, must name that environment's Python."]
    if "yt_dlp_error" in probe:
        return [], [f"yt-dlp is not importable in the video2dataset environment ({probe['yt_dlp_error']}). "
                    f"Fix: {pip} yt-dlp yt-dlp-ejs deno"]
    version = probe["yt_dlp"]
    facts = [f"yt-dlp {version} ({python})"]
    if not probe.get("supported_runtimes"):
        return facts, [f"yt-dlp {version} predates the external JavaScript runtimes YouTube extraction needs "
                       f"(its --js-runtimes option). Fix: {pip} -U yt-dlp yt-dlp-ejs deno"]
    js = probe["js"]
    if "error" in js:
        return facts, [f"yt-dlp's js_runtimes param is malformed: {js['error']}. Fix: set the js_runtimes config "
                       "option (a list of RUNTIME or RUNTIME:PATH) instead of yt_dlp_options js_runtimes."]
    problems: list[str] = []
    runtimes = js["runtimes"]
    usable = [r for r in runtimes if r["enabled"] and r["found"] and r["supported"]]
    if usable:
        r = usable[0]
        facts.append(f"JavaScript runtime {r['runtime']} {r['version']} ({r['path']})")
    else:
        problems.append(_no_runtime(version, js, runtimes, probe["supported_runtimes"], pip, "js_runtimes" in params))
    solver = probe.get("solver") or {}
    if solver.get("checked"):
        npm = solver.get("npm") and usable and usable[0]["name"] in ("deno", "bun")
        sources = solver["lib"] + ([f"{usable[0]['name']}'s npm imports (remote_components: ejs:npm)"] if npm else [])
        if sources and solver["core"]:
            facts.append(f"challenge solver scripts: {sources[0]}")
        else:
            have = f"yt-dlp-ejs {solver['ejs_version']} is installed" if solver.get("ejs_version") else "yt-dlp-ejs is not installed"
            problems.append(
                f"yt-dlp's JavaScript challenge solver scripts are missing: yt-dlp {version} needs yt-dlp-ejs "
                f"{solver['needed']} ({have}). Fix: {pip} 'yt-dlp-ejs=={solver['needed']}' (or let yt-dlp download "
                "them: yt_dlp_options remote_components: '[\"ejs:github\"]').")
    return facts, problems


def _no_runtime(version: str, js: dict, runtimes: list[dict], supported: list[str], pip: str, configured: bool) -> str:
    enabled = ", ".join(js["enabled"]) or "none"
    seen = []
    for r in runtimes:
        state = "enabled" if r["enabled"] else "not enabled"
        where = f" ({r['configured_path']})" if r.get("configured_path") else ""
        if not r["found"]:
            if r["enabled"]:
                seen.append(f"{r['name']}{where}: not found (yt-dlp looks beside its Python, then on PATH)")
        elif not r["supported"]:
            seen.append(f"{r['name']} {r['version']} at {r['path']}: older than the {r['min_version']} yt-dlp "
                        f"supports ({state})")
        else:
            seen.append(f"{r['name']} {r['version']} at {r['path']}: usable but not enabled")
    if js["unknown"]:
        seen.append(f"unknown to yt-dlp {version}: {', '.join(js['unknown'])} (it supports {', '.join(supported)})")
    deno = next((r for r in runtimes if r["name"] == "deno"), None)
    if deno is None:
        fix = f"install one of {', '.join(supported)} and name it in the js_runtimes config option"
    else:
        fix = (f"{pip} 'deno>={deno['min_version']}' (puts deno beside yt-dlp, where yt-dlp looks first) or put "
               f"deno >= {deno['min_version']} on PATH")
        if not deno["enabled"]:
            fix = f"add deno to the js_runtimes config option and {fix}"
    spare = [r for r in runtimes if r["found"] and r["supported"] and not r["enabled"]]
    if spare:
        fix += f"; or enable {spare[0]['name']} {spare[0]['version']}, which is there: js_runtimes: [{spare[0]['name']}]"
    else:
        fix += "; or name another runtime you have in the js_runtimes config option (RUNTIME or RUNTIME:PATH)"
    default = "" if configured else " (yt-dlp's default)"
    return (f"no JavaScript runtime that yt-dlp {version} can use for YouTube: enabled: {enabled}{default}; "
            f"{'; '.join(seen) or 'none found'}. Fix: {fix}.")
