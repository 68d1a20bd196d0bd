"""WebVid's CSV (header ``videoid,name,page_idx,page_dir,duration,contentUrl``, as the released
``results_10M_train.csv``) with what quoting does to real dumps: a caption legitimately holding a quoted line break,
and a stray ``"`` that, parsed as CSV, swallows every line up to the next quote or to the end of the file. Line
numbers are physical lines; the accounting check (the commit gate's ``rows_accounted``) must pass on the first and
the stray quote must cost its own line only."""

from __future__ import annotations

import csv
import io
import logging

import pytest

from mllm_pipeline.sources.webvid import ingest_webvid
from mllm_pipeline.stages.verify import verify_raw
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw

log = logging.getLogger(__name__)
HEADER = "videoid,name,page_idx,page_dir,duration,contentUrl"


def _row(i: int, name: str) -> list[str]:
    return [str(1000 + i), name, str(i), "000001_000050", f"PT00H00M1{i % 10}S",
            f"https://ak.picdn.net/shutterstock/videos/{1000 + i}/preview/stock-footage-{i}.mp4"]


def _ingest(tmp_path, text: str):
    p = tmp_path / "results_10M_train.csv"
    p.write_text(text)
    st = Storage(str(tmp_path / "root"))
    rep = ingest_webvid([str(p)], st, logger=log)
    v = verify_raw(st, "webvid")
    assert not v.problems, v.problems
    return st, rep


def test_a_quoted_line_break_is_one_record_over_two_lines(tmp_path):
    rows = [_row(i, f"aerial view of a field {i}") for i in range(40)]
    rows[5][1] = "sunset over the sea\nslow motion"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([HEADER.split(","), *rows])
    st, rep = _ingest(tmp_path, buf.getvalue())
    assert rep.rows_in == rep.rows_kept == 40 and not rep.quarantined
    raw = read_raw(st, "webvid")
    line = dict(zip(raw["sample_id"].to_pylist(), raw["source_line"].to_pylist()))
    assert line["webvid-1005"] == 7 and line["webvid-1006"] == 9  # the record after it starts a line later
    spans = rep.extra["multiline_records"][str(tmp_path / "results_10M_train.csv")]
    assert [tuple(x) for x in spans] == [(7, 2)]  # line 7, two lines


@pytest.mark.parametrize("closed_later", [False, True])
def test_a_stray_quote_costs_its_own_line(tmp_path, closed_later):
    rows = [",".join(_row(i, f"A clip number {i} of a field")) for i in range(1000)]
    rows[10] = rows[10].replace("A clip", '"A clip')  # opens a quote that is never closed on its line
    if closed_later:
        rows[500] = rows[500].replace("A clip", 'A "quoted" clip')
    st, rep = _ingest(tmp_path, HEADER + "\n" + "\n".join(rows) + "\n")
    assert (rep.rows_in, rep.rows_kept, rep.quarantined) == (1000, 999, {"unbalanced_quote": 1})
    assert [(q["line"], q["reason"]) for q in quarantine_rows(st, "webvid")] == [(12, "unbalanced_quote")]
    raw = read_raw(st, "webvid")
    assert dict(zip(raw["sample_id"].to_pylist(), raw["source_line"].to_pylist()))["webvid-1011"] == 13
