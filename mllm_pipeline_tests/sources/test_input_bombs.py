"""Raw input that would take the machine: a compressed TSV of nothing but line breaks, a JSON-lines file whose one
line never ends, a file that decompresses past the input limit. Each stops early with a message naming the file,
in bounded memory; and ``.zst`` inputs are read like ``.gz``."""

from __future__ import annotations

import gzip
import json
import logging
import resource

import pytest

from mllm_pipeline.sources.cc3m import ingest_cc3m
from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.sources.internvid import ingest_internvid
from mllm_pipeline.storage import InputTooLarge, Storage

log = logging.getLogger(__name__)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_compressed_file_of_line_breaks_stops_early(tmp_path):
    p = tmp_path / "Train_GCC-training.tsv.gz"
    with gzip.open(p, "wb", compresslevel=1) as f:
        f.write(b"a photo of a dog\thttp://example.org/1.jpg\n")
        for _ in range(48):
            f.write(b"\n" * (4 << 20))  # 200 MB of empty lines, 200 KB on disk
    st = Storage(str(tmp_path / "root"))
    before = _peak_mb()
    with pytest.raises(SourceFormatError, match="more than max_quarantine_rate") as e:  # in the first block
        ingest_cc3m([str(p)], st, logger=log)
    assert "Train_GCC-training.tsv.gz" in str(e.value) and "lines in one block are empty" in str(e.value)
    assert st.current("raw/cc3m") is None
    assert _peak_mb() - before < 1500, f"peak RSS grew by {_peak_mb() - before:.0f} MB"


def test_a_json_line_that_never_ends(tmp_path):
    p = tmp_path / "InternVid-10M-flt.jsonl.gz"
    with gzip.open(p, "wb", compresslevel=1) as f:
        f.write(json.dumps({"YoutubeID": "abcdefghijk", "Caption": "x" * 10}).encode()[:-1])
        for _ in range(70):
            f.write(b"x" * (1 << 20))  # 70 MB without a line break
    with pytest.raises(SourceFormatError, match="line 1 running past"):
        ingest_internvid([str(p)], Storage(str(tmp_path / "root")), logger=log)


def test_decompressing_past_the_input_limit(tmp_path, monkeypatch):
    p = tmp_path / "Train_GCC-training.tsv.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"a photo of a dog\thttp://example.org/1.jpg\n" * 200_000)  # 8.6 MB decompressed
    monkeypatch.setenv("MLLM_MAX_INPUT_BYTES", str(4 << 20))
    with pytest.raises(InputTooLarge, match="MLLM_MAX_INPUT_BYTES"):
        ingest_cc3m([str(p)], Storage(str(tmp_path / "root")), logger=log)


def test_zstd_inputs_are_decompressed(tmp_path):
    import zstandard

    p = tmp_path / "Train_GCC-training.tsv.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(b"".join(
        f"a photo of thing {i}\thttp://example.org/{i}.jpg\n".encode() for i in range(100))))
    rep = ingest_cc3m([str(p)], Storage(str(tmp_path / "root")), logger=log)
    assert rep.rows_kept == 100 and not rep.quarantined
