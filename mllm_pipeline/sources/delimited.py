"""Streaming TSV/CSV reading with a line number for every row and a quarantine for every bad one.

pyarrow's CSV reader does the parsing (multi-threaded conversion, no Python per row). Three things are added on
top, because the official dumps need them and pyarrow alone would either stop or drop rows:

* rows with the wrong number of fields are caught by pyarrow's ``invalid_row_handler`` and set aside with
  their physical line number and text (so is an empty line, which is a one-field row);
* columns are read as bytes and checked for UTF-8 per batch; a row with bytes that are not UTF-8 is set aside
  with its original bytes instead of failing the whole file;
* each kept row gets its physical line number, reconstructed from the numbers of the rows set aside before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mllm_pipeline.sources.common import SourceFormatError, quarantine_table
from mllm_pipeline.storage import is_local, open_source

BLOCK_SIZE = 16 << 20


@dataclasses.dataclass
class Chunk:
    table: pa.Table  # string columns, rows with valid UTF-8 only
    lines: np.ndarray  # int64 physical line number of each row of ``table``
    rejected: pa.Table  # quarantine rows found while reading this chunk (field count, UTF-8)
    rows_read: int  # table rows + rejected rows


def read_header(path: str, delimiter: str) -> list[str]:
    """The first line of ``path`` split on ``delimiter`` (quotes stripped), for format detection."""
    with open_source(path) as f:
        first = f.read(1 << 16).split(b"\n", 1)[0]
    text = first.decode("utf-8", errors="replace").rstrip("\r\n")
    return [c.strip().strip('"') for c in text.split(delimiter)]


def stream_delimited(
    path: str,
    dataset: str,
    *,
    delimiter: str,
    column_names: list[str] | None,
    quoting: bool,
    block_size: int = BLOCK_SIZE,
) -> Iterator[Chunk]:
    """Yield :class:`Chunk`s of ``path``.

    ``column_names=None`` means the file has a header line naming the columns; otherwise the file has no header
    and these are its columns.
    """
    invalid_lines: list[int] = []
    invalid_rows: list[tuple[int | None, int, int, str]] = []

    def on_invalid(row) -> str:
        invalid_rows.append((row.number, row.expected_columns, row.actual_columns, row.text))
        return "skip"

    header_lines = 0 if column_names is not None else 1
    read_opts = pacsv.ReadOptions(
        column_names=column_names, autogenerate_column_names=False, block_size=block_size, use_threads=False
    )
    parse_opts = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if quoting else False,
        double_quote=quoting,
        newlines_in_values=False,
        ignore_empty_lines=False,
        invalid_row_handler=on_invalid,
    )
    source = path.removeprefix("file://") if is_local(path) and not _compressed(path) else open_source(path)
    try:
        # column types: read everything as bytes; UTF-8 is checked below, row by row where needed
        probe_names = column_names or read_header(path, delimiter)
        convert_opts = pacsv.ConvertOptions(
            column_types={n: pa.binary() for n in probe_names}, strings_can_be_null=False, quoted_strings_can_be_null=False
        )
        reader = pacsv.open_csv(source, read_options=read_opts, parse_options=parse_opts, convert_options=convert_opts)
    except pa.ArrowInvalid as e:
        raise SourceFormatError(path, "a delimited text file", f"something pyarrow cannot parse ({e})") from None

    kept_so_far = 0
    try:
        for batch in reader:
            n = batch.num_rows
            # physical line of each kept row: the (k+1)-th data row not set aside, plus the header
            invalid_lines.extend(r[0] for r in invalid_rows if r[0] is not None)
            adj = np.asarray(sorted(invalid_lines), dtype=np.int64) - header_lines
            adj = adj - np.arange(len(adj))
            k1 = np.arange(kept_so_far + 1, kept_so_far + n + 1, dtype=np.int64)
            lines = k1 + np.searchsorted(adj, k1, side="right") + header_lines
            kept_so_far += n

            rejected = [_field_count_rejects(dataset, path, invalid_rows)] if invalid_rows else []
            invalid_rows.clear()
            rows_read = n + sum(len(r) for r in rejected)
            table, lines, utf8_rejects = _decode_utf8(pa.Table.from_batches([batch]), lines, dataset, path, delimiter)
            if utf8_rejects is not None:
                rejected.append(utf8_rejects)
            rej = pa.concat_tables(rejected) if rejected else quarantine_table(dataset, path, [])
            yield Chunk(table=table, lines=lines, rejected=rej, rows_read=rows_read)
    except pa.ArrowInvalid as e:
        raise SourceFormatError(path, "a delimited text file", f"a parse error pyarrow cannot recover from ({e})") from None
    if invalid_rows:  # rows set aside after the last batch
        rej = _field_count_rejects(dataset, path, invalid_rows)
        yield Chunk(table=None, lines=np.empty(0, np.int64), rejected=rej, rows_read=len(rej))  # type: ignore[arg-type]


def _compressed(path: str) -> bool:
    return path.endswith((".gz", ".bz2", ".xz", ".zst", ".zip"))


def _field_count_rejects(dataset: str, path: str, rows: list[tuple[int | None, int, int, str]]) -> pa.Table:
    reasons, details, lines, raws = [], [], [], []
    for number, expected, actual, text in rows:
        if actual == 1 and text.strip() == "":
            reasons.append("empty_line")
            details.append("the line is empty")
        else:
            reasons.append("wrong_field_count")
            details.append(f"expected {expected} fields, found {actual}")
        lines.append(number)
        raws.append(text.encode("utf-8", errors="surrogateescape"))
    return quarantine_table(dataset, path, reasons, lines=lines, details=details, raws=raws)


def _decode_utf8(table: pa.Table, lines: np.ndarray, dataset: str, path: str, sep: str):
    """Cast binary columns to string; rows with invalid UTF-8 are returned as quarantine rows."""
    decoded: dict[str, pa.Array] = {}
    bad_mask = None
    for name in table.column_names:
        try:
            decoded[name] = pc.cast(table.column(name), pa.string())
        except pa.ArrowInvalid:  # rare: find the offending rows in Python
            values = table.column(name).to_pylist()
            col_bad = np.fromiter((not _is_utf8(v) for v in values), dtype=bool, count=len(values))
            bad_mask = col_bad if bad_mask is None else (bad_mask | col_bad)
    if bad_mask is None:
        return pa.table(decoded), lines, None
    bad_idx = np.flatnonzero(bad_mask)
    bad_rows = table.take(bad_idx).to_pylist()
    raws = [sep.encode().join(v or b"" for v in row.values()) for row in bad_rows]
    details = [
        f"bytes that are not UTF-8 in column(s) {', '.join(k for k, v in row.items() if not _is_utf8(v))}"
        for row in bad_rows
    ]
    rejects = quarantine_table(dataset, path, ["invalid_utf8"] * len(bad_idx), lines=lines[bad_idx], details=details, raws=raws)
    keep = pa.array(~bad_mask)
    table = table.filter(keep)
    return pa.table({n: pc.cast(table.column(n), pa.string()) for n in table.column_names}), lines[~bad_mask], rejects


def _is_utf8(value: bytes | None) -> bool:
    if value is None:
        return True
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
