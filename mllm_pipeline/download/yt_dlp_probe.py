"""What the video2dataset environment's yt-dlp has for YouTube, as one JSON object on stdout.

Run by :func:`mllm_pipeline.download.youtube.youtube_preflight` with that environment's Python (the one the
video2dataset worker runs in), with the worker's environment (``PATH``) and, on stdin, the yt-dlp params the worker
merges into every ``YoutubeDL`` call (``js_runtimes``, ``remote_components``, ``cachedir`` ...). Like
``v2d_worker.py`` it imports only the standard library and ``yt_dlp``, never ``mllm_pipeline``.

The discovery is yt-dlp's own, read from its source (yt-dlp 2026.11.23):

* ``YoutubeDL.__init__`` enables ``params.get('js_runtimes', {'deno': {}})`` (deno only by default) and
  ``YoutubeDL._js_runtimes`` builds ``supported_js_runtimes.value[name](path=config.get('path'))`` for each
  (``yt_dlp/globals.py``, registered in ``yt_dlp/__init__.py``);
* each runtime class (``yt_dlp/utils/_jsruntime.py``) looks for its executable in the Python scripts directory
  first (where ``pip install deno`` puts it), then ``PATH`` (or the configured path), runs ``<exe> --version``
  (``qjs --help`` for QuickJS) and parses the version; ``info.supported`` compares it with
  ``MIN_SUPPORTED_VERSION``. A provider is usable when its runtime's ``info`` is set and supported
  (``EJSBaseJCP.runtime_info``);
* the challenge solver scripts (``yt_dlp/extractor/youtube/jsc/_builtin/ejs.py``): the core script ships with
  yt-dlp (``vendor/yt.solver.core.js``); the lib script comes from the ``yt-dlp-ejs`` package (same major.minor
  as ``vendor.VERSION``), yt-dlp's cache, the vendored file where there is one, GitHub (``remote_components``
  ``ejs:github``) or, for deno and bun, npm (``ejs:npm``).
"""

import json
import shutil
import sys

#: yt-dlp's preference among runtimes, highest first (the deno/node/quickjs/bun JCP providers' preferences)
RUNTIME_ORDER = ("deno", "node", "quickjs", "bun")


def _version_str(vt) -> str:
    return ".".join(str(p) for p in vt) if vt else ""


def _runtimes(params: dict, supported: dict) -> dict:
    enabled = params.get("js_runtimes", {"deno": {}})  # YoutubeDL.__init__'s default
    if not isinstance(enabled, dict):
        return {"error": f"js_runtimes must be a dict of {{runtime: {{config}}}}, got {enabled!r}"}
    names = sorted(supported, key=lambda n: (RUNTIME_ORDER.index(n) if n in RUNTIME_ORDER else len(RUNTIME_ORDER), n))
    found = []
    for name in names:
        cls = supported[name]
        config = enabled.get(name) if name in enabled else None
        path = (config or {}).get("path")
        entry = {"name": name, "enabled": name in enabled, "configured_path": path,
                 "min_version": _version_str(getattr(cls, "MIN_SUPPORTED_VERSION", ()))}
        try:
            info = cls(path=path).info if cls is not None else None
        except Exception as e:  # noqa: BLE001 -- reported, never fatal here
            info, entry["error"] = None, f"{type(e).__name__}: {e}"
        if info is not None:
            entry.update(found=True, runtime=info.name, path=shutil.which(info.path) or info.path, version=info.version,
                         supported=bool(info.supported))
        else:
            entry["found"] = False
        found.append(entry)
    return {"enabled": sorted(enabled), "unknown": sorted(set(enabled) - set(supported)), "runtimes": found}


class _QuietYdl:
    """What ``yt_dlp.cache.Cache`` needs of a YoutubeDL: its params and two no-op loggers."""

    def __init__(self, params):
        self.params = params

    def write_debug(self, *a, **k):
        pass

    def report_warning(self, *a, **k):
        pass


def _solver(params: dict) -> dict:
    try:
        from yt_dlp.extractor.youtube.jsc._builtin import vendor
        from yt_dlp.utils import version_tuple
    except ImportError as e:
        return {"checked": False, "why": f"{type(e).__name__}: {e}"}
    needed = vendor.VERSION

    def same(v):
        return bool(v) and version_tuple(str(v), lenient=True)[:2] == version_tuple(needed, lenient=True)[:2]

    out = {"checked": True, "needed": needed, "core": bool(vendor.load_script("yt.solver.core.js")), "lib": [],
           "ejs_version": None}
    try:
        import yt_dlp_ejs

        out["ejs_version"] = str(getattr(yt_dlp_ejs, "version", "unknown"))
        if same(out["ejs_version"]):
            out["lib"].append(f"python package yt-dlp-ejs {out['ejs_version']}")
    except ImportError:
        pass
    try:
        from yt_dlp.cache import Cache

        cache = Cache(_QuietYdl(params))
        for kind in ("lib", "core"):
            data = cache.load("challenge-solver", kind)
            if isinstance(data, dict) and same(data.get("version")):
                out.setdefault("cached", []).append(kind)
        if "lib" in out.get("cached", []):
            out["lib"].append(f"yt-dlp's cache ({cache._get_root_dir()})")
    except Exception as e:  # noqa: BLE001 -- the cache is one source among others
        out["cache_error"] = f"{type(e).__name__}: {e}"
    if vendor.load_script("yt.solver.lib.js"):
        out["lib"].append("vendored in yt-dlp")
    remote = set(params.get("remote_components") or ())
    if "ejs:github" in remote:
        out["lib"].append("downloaded from GitHub (remote_components: ejs:github)")
    if "ejs:npm" in remote:
        out["npm"] = True  # deno / bun import the lib from npm
    return out


def probe(params: dict) -> dict:
    out = {"python": sys.executable}
    try:
        import yt_dlp  # noqa: F401 -- registers the supported runtimes
        from yt_dlp.version import __version__
    except Exception as e:  # noqa: BLE001
        out["yt_dlp_error"] = f"{type(e).__name__}: {e}"
        return out
    out["yt_dlp"] = __version__
    try:
        from yt_dlp.globals import supported_js_runtimes
    except ImportError:
        supported = {}
    else:
        supported = dict(supported_js_runtimes.value)
    out["supported_runtimes"] = sorted(supported)
    if supported:
        out["js"] = _runtimes(params, supported)
        out["solver"] = _solver(params)
    return out


def main() -> int:
    params = json.loads(sys.stdin.read() or "{}")
    print(json.dumps(probe(params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
