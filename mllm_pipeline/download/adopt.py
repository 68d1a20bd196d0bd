"""Media that already sits in webdataset tars (pixparse/cc3m-wds and the like): adopted, not downloaded.

A raw row of such a source names its image as ``tar://<member>::<shard path>`` (see
:mod:`mllm_pipeline.sources.cc3m_wds`). :func:`adopt_from_tars` is a fetcher for
:func:`mllm_pipeline.stages.media.materialize_shard`: it reads each source tar once, front to back, takes the
members the rows name, decodes each image fully (a corrupt or truncated JPEG is a ``decode_error``, as it would be
after a download) and yields one :class:`~mllm_pipeline.stages.media.Fetched` per row. The runner then writes a
committed media shard with its status table exactly as for downloaded media, so captions, manifests, exports and
training read pre-downloaded and downloaded media the same way, with the same accounting
(``attempted == succeeded + failed by reason``). No network request is made.

The images are copied once into the media shard's ``media.tar`` (sequential reads and writes; nothing is
re-encoded): the committed shard is then owned by the storage root, versioned and protected by retention like
every other output, whatever happens to the source directory later.

Videos in tars (an earlier video2dataset output, see :mod:`mllm_pipeline.sources.local_media`) go through the same
reader with a video check instead of the image decode (``check``; :func:`mllm_pipeline.download.videos.fetch_videos`
passes it). A tar is read until every member its rows name has been seen.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from mllm_pipeline.download.fetched import Fetched
from mllm_pipeline.storage import open_source

#: What a media shard adopted from tars is made of (its content options): bump when adopting changes.
ADOPT_OPTIONS = {"source": "webdataset", "adopt": 1}


def parse_tar_path(path: str) -> tuple[str, str] | None:
    """``tar://<member>::<tar path>`` -> (member, tar path); None for anything else."""
    if not path or not path.startswith("tar://") or "::" not in path:
        return None
    member, tar = path[len("tar://"):].split("::", 1)
    return (member, tar) if member and tar else None


def _decode(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


#: check(row, member name, member bytes) -> the row's Fetched: the media verified (decoded), or why not
Check = Callable[[dict[str, Any], str, bytes], Fetched]


def adopt_from_tars(rows: list[dict[str, Any]], log: Any, check: Check | None = None, what: str = "image(s)") -> Iterator[Fetched]:
    """One :class:`Fetched` per row, reading every source tar once (rows grouped by tar, in first-seen order).
    ``check`` verifies each member (default: a full image decode)."""
    check = check or _one
    by_tar: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        parsed = parse_tar_path(r.get("path") or "")
        if parsed is None:
            yield Fetched(r["row"], False, "download_error",
                          f"not a tar:// path (expected tar://<member>::<shard>): {str(r.get('path'))[:200]}")
            continue
        member, tar = parsed
        by_tar.setdefault(tar, {}).setdefault(member, []).append(r)
    for tar, wanted in by_tar.items():
        log.info(f"adopting {sum(len(v) for v in wanted.values())} {what} from {tar}")
        seen: set[str] = set()
        try:
            with open_source(tar) as f, tarfile.open(fileobj=f, mode="r|") as tf:
                for info in tf:
                    name = info.name.rsplit("/", 1)[-1]
                    if not info.isfile() or name not in wanted or name in seen:
                        continue
                    seen.add(name)
                    data = tf.extractfile(info).read()
                    for r in wanted[name]:
                        yield check(r, name, data)
                    if len(seen) == len(wanted):
                        break  # the rest of the tar holds nothing these rows name
        except FileNotFoundError:
            pass  # every row of this tar is reported missing below
        except (tarfile.TarError, OSError) as e:
            for name in sorted(set(wanted) - seen):
                for r in wanted[name]:
                    yield Fetched(r["row"], False, "truncated", f"{tar}: {type(e).__name__}: {e}")
            seen |= set(wanted)
        for name in sorted(set(wanted) - seen):
            for r in wanted[name]:
                yield Fetched(r["row"], False, "missing_file", f"{name} is not in {tar}")


def _one(row: dict[str, Any], name: str, data: bytes) -> Fetched:
    try:
        w, h = _decode(data)
    except Exception as e:  # noqa: BLE001 -- any decoder error means: not a usable image
        return Fetched(row["row"], False, "decode_error", f"{name}: {type(e).__name__}: {e}")
    ext = os.path.splitext(name)[1].lstrip(".").lower() or "jpg"
    return Fetched(row["row"], True, media=("jpg" if ext == "jpeg" else ext, data), width=w, height=h)
