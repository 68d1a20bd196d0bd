"""Streaming TSV/CSV reading with a line number for every row and a quarantine for every bad one.

pyarrow's CSV reader does the parsing (multi-threaded conversion, no Python per row). Three things are added on
top, because the official dumps need them and pyarrow alone would either stop or drop rows:

* rows with the wrong number of fields are caught by pyarrow's ``invalid_row_handler`` and set aside with
  their physical line number and text (so is an empty line, which is a one-field row);
* columns are read as bytes and checked for UTF-8 per batch; a row with bytes that are not UTF-8 is set aside
  with its original bytes instead of failing the whole file;
* each kept row gets its physical line number, reconstructed from the numbers of the rows set aside before it and
  the line breaks inside quoted values of the rows before it (a legitimately quoted newline makes one record of two
  lines; :attr:`Chunk.spans` lists such records so the accounting check counts their continuation lines);
* a quoted value that runs over more than :data:`MAX_LINES_IN_VALUE` lines is a stray quote, not a caption: the
  lines it swallowed are read again one by one, each kept or set aside on its own, and the lines whose quotes do
  not balance are set aside as ``unbalanced_quote``. So one stray ``"`` costs its own line, not the hundreds of
  records after it.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mllm_pipeline.sources.common import DEFAULT_MAX_QUARANTINE_RATE, FAIL_FAST_ROWS, SourceFormatError, quarantine_table
from mllm_pipeline.storage import is_local, open_source

BLOCK_SIZE = 16 << 20
#: A quoted value spanning more physical lines than this is taken for a stray quote (see the module doc).
MAX_LINES_IN_VALUE = 4


@dataclasses.dataclass
class Chunk:
    table: pa.Table  # string columns, rows with valid UTF-8 only
    lines: np.ndarray  # int64 physical line number of each row of ``table``
    rejected: pa.Table  # quarantine rows found while reading this chunk (field count, UTF-8)
    rows_read: int  # table rows + rejected rows
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (line, lines) of records over >1 line


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
    max_set_aside_rate: float = DEFAULT_MAX_QUARANTINE_RATE,
) -> Iterator[Chunk]:
    """Yield :class:`Chunk`s of ``path``.

    ``column_names=None`` means the file has a header line naming the columns; otherwise the file has no header
    and these are its columns.
    """
    invalid_lines = np.empty(0, np.int64)  # record numbers of every row set aside so far, sorted
    invalid_rows: list[tuple[int | None, int, int, str]] = []

    empty_lines = array("q")  # empty lines, by number only: a file of millions of them stays small in memory

    def on_invalid(row) -> str:
        if row.actual_columns == 1 and row.number is not None and not row.text.strip():
            empty_lines.append(row.number)
        else:
            invalid_rows.append((row.number, row.expected_columns, row.actual_columns, row.text))
        return "skip"

    def take_empties() -> np.ndarray:
        """The record numbers of the empty lines met so far (now counted as set aside), and forget them."""
        nums = np.frombuffer(empty_lines, dtype=np.int64).copy() if empty_lines else np.empty(0, np.int64)
        del empty_lines[:]
        return nums

    def empty_rows(nums: np.ndarray) -> list[pa.Table]:
        """Quarantine rows of empty lines, at their physical lines."""
        if not len(nums):
            return []
        n_ = len(nums)
        return [quarantine_table(dataset, path, pa.repeat(pa.scalar("empty_line"), n_), lines=pa.array(physical(nums)),
                                 details=pa.repeat(pa.scalar("the line is empty"), n_),
                                 raws=pa.repeat(pa.scalar(b"", pa.binary()), n_))]

    header_lines = 0 if column_names is not None else 1
    read_opts = pacsv.ReadOptions(
        column_names=column_names, autogenerate_column_names=False, block_size=block_size, use_threads=False
    )
    parse_opts = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if quoting else False,
        double_quote=quoting,
        newlines_in_values=True,
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
    # (row number, extra lines) of every kept row that spans more than one line so far: rows are numbered as
    # records, lines physically, and each such row shifts the lines of every record after it
    extra_rows = np.empty(0, np.int64)
    extra_cum = np.empty(0, np.int64)

    def physical(rows: np.ndarray) -> np.ndarray:
        """Record numbers -> physical lines: plus the extra lines of the multi-line rows before them."""
        if not len(extra_rows):
            return rows
        before = np.searchsorted(extra_rows, rows, side="left")
        return rows + np.where(before > 0, extra_cum[np.maximum(before - 1, 0)], 0)

    try:
        for batch in reader:
            n = batch.num_rows
            blank = _blank_rows(batch)
            if n >= FAIL_FAST_ROWS and blank > max_set_aside_rate * n:
                raise SourceFormatError(  # a file of line breaks (a decompression bomb): stop before parsing rows
                    path, "a file whose lines are mostly records",
                    f"{blank:,} of {n:,} lines in one block are empty, more than max_quarantine_rate "
                    f"{max_set_aside_rate:g}", "Nothing was committed; the current version stays.")
            # record number of each kept row: the (k+1)-th data row not set aside, plus the header
            empty_nums = take_empties()
            met = np.concatenate([empty_nums, np.asarray([r[0] for r in invalid_rows if r[0] is not None], np.int64)])
            invalid_lines = np.concatenate([invalid_lines, np.sort(met)])  # later records: stays sorted
            adj = invalid_lines - header_lines
            adj = adj - np.arange(len(adj))
            k1 = np.arange(kept_so_far + 1, kept_so_far + n + 1, dtype=np.int64)
            rows = k1 + np.searchsorted(adj, k1, side="right") + header_lines
            kept_so_far += n
            extra = _newlines_per_row(batch)
            multi = np.flatnonzero(extra)
            # set-aside rows over several lines (a quote never closed before the field count went wrong)
            inv_multi = [(r[0], r[3].count("\n")) for r in invalid_rows if r[0] is not None and "\n" in r[3]]
            pairs = sorted([*zip(rows[multi].tolist(), extra[multi].tolist()), *inv_multi])
            if pairs:
                total = extra_cum[-1] if len(extra_cum) else 0
                extra_rows = np.concatenate([extra_rows, np.asarray([p[0] for p in pairs], np.int64)])
                extra_cum = np.concatenate([extra_cum, total + np.cumsum([p[1] for p in pairs])])
            lines = physical(rows)
            empty_rejects = empty_rows(empty_nums)
            invalid = [(physical(np.asarray([r[0]]))[0] if r[0] is not None else None, *r[1:]) for r in invalid_rows]
            invalid_rows.clear()
            swallowed = [(int(r[0]), r[3]) for r in invalid if r[0] is not None and "\n" in r[3]]
            invalid = [r for r in invalid if not (r[0] is not None and "\n" in r[3])]
            rejected = ([_field_count_rejects(dataset, path, invalid)] if invalid else []) + empty_rejects
            rows_read = n + len(invalid) + sum(t.num_rows for t in empty_rejects)
            table, lines, utf8_rejects, extra = _decode_utf8(pa.Table.from_batches([batch]), lines, dataset, path,
                                                             delimiter, extra)
            if utf8_rejects is not None:
                rejected.append(utf8_rejects)
            runaway = extra >= MAX_LINES_IN_VALUE
            if runaway.any() or swallowed:
                table, lines, extra, records, lost = _recover_runaway(table, lines, extra, runaway, swallowed, path,
                                                                      dataset, delimiter, quoting)
                rejected.append(lost)
                rows_read += records - int(runaway.sum())
            spans = [(int(ln), int(e) + 1) for ln, e in zip(lines[extra > 0], extra[extra > 0])]
            rej = pa.concat_tables(rejected) if rejected else quarantine_table(dataset, path, [])
            yield Chunk(table=table, lines=lines, rejected=rej, rows_read=rows_read, spans=spans)
    except pa.ArrowInvalid as e:
        raise SourceFormatError(path, "a delimited text file", f"a parse error pyarrow cannot recover from ({e})") from None
    if invalid_rows or empty_lines:  # rows set aside after the last batch
        empty_rejects = empty_rows(take_empties())
        invalid = [(physical(np.asarray([r[0]]))[0] if r[0] is not None else None, *r[1:]) for r in invalid_rows]
        swallowed = [(int(r[0]), r[3]) for r in invalid if r[0] is not None and "\n" in r[3]]
        invalid = [r for r in invalid if not (r[0] is not None and "\n" in r[3])]
        rejected = [_field_count_rejects(dataset, path, invalid)] if invalid else []
        table, lines, records = None, np.empty(0, np.int64), 0
        if swallowed:
            names = column_names or read_header(path, delimiter)
            empty = pa.table({c: pa.array([], pa.string()) for c in names})
            table, lines, _, records, lost = _recover_runaway(empty, lines, np.empty(0, np.int64), np.zeros(0, bool),
                                                              swallowed, path, dataset, delimiter, quoting)
            rejected.append(lost)
        rejected += empty_rejects
        rej = pa.concat_tables(rejected) if rejected else quarantine_table(dataset, path, [])
        yield Chunk(table=table, lines=lines, rejected=rej,  # type: ignore[arg-type]
                    rows_read=len(invalid) + records + sum(t.num_rows for t in empty_rejects))


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


def _blank_rows(batch: pa.RecordBatch) -> int:
    """How many rows of ``batch`` have nothing in any field (empty lines)."""
    empty = None
    for col in batch.columns:
        e = pc.fill_null(pc.equal(pc.binary_length(col), 0), True)
        empty = e if empty is None else pc.and_(empty, e)
    return int(pc.sum(empty.cast(pa.int64())).as_py() or 0) if empty is not None else 0


def _newlines_per_row(batch: pa.RecordBatch) -> np.ndarray:
    """How many line breaks each row's quoted values hold (0 for nearly every row)."""
    total = np.zeros(batch.num_rows, np.int64)
    for col in batch.columns:
        total += pc.fill_null(pc.count_substring(col, "\n"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return total


def _recover_runaway(table: pa.Table, lines: np.ndarray, extra: np.ndarray, runaway: np.ndarray,
                     swallowed: list[tuple[int, str]], path: str, dataset: str, delimiter: str, quoting: bool):
    """Replace the records a stray quote made of many lines by those lines read one by one: the kept rows whose
    quoted value ran over :data:`MAX_LINES_IN_VALUE` lines or more (``runaway``: their lines are read from the
    file again) and the rows set aside whose text ran over several lines (``swallowed``: (first line, text)). A
    line that is a whole record is kept with its own line number; one whose quotes do not balance, or whose field
    count is wrong, is set aside. Returns (table, lines, extra, records now read from those lines, set-asides)."""
    import csv

    items: dict[int, bytes] = {}
    wanted: dict[int, int] = {int(ln): int(e) for ln, e in zip(lines[runaway], extra[runaway])}
    if wanted:
        need = {ln + k for ln, e in wanted.items() for k in range(e + 1)}
        with open_source(path) as f:
            for n, raw in enumerate(f, start=1):  # rare: a second pass over the file, for these lines only
                if n in need:
                    items[n] = raw.rstrip(b"\r\n")
                if n >= max(need):
                    break
    for start, text in swallowed:
        for k, part in enumerate(text.split("\n")):
            items[start + k] = part.rstrip("\r").encode("utf-8", errors="surrogateescape")
    width = table.num_columns
    keep_rows: list[dict[str, str]] = []
    keep_lines: list[int] = []
    bad: list[tuple[int, str, str, bytes]] = []
    for ln, raw in sorted(items.items()):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append((ln, "invalid_utf8", "bytes that are not UTF-8", raw))
            continue
        if quoting and line.count('"') % 2:
            bad.append((ln, "unbalanced_quote", "a quote opened on this line is not closed on it (a stray \")", raw))
            continue
        fields = next(csv.reader([line], delimiter=delimiter, quotechar='"' if quoting else None,
                                 quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE), [])
        if len(fields) != width:
            bad.append((ln, "empty_line" if not line.strip() else "wrong_field_count",
                        "the line is empty" if not line.strip() else f"expected {width} fields, found {len(fields)}", raw))
            continue
        keep_rows.append(dict(zip(table.column_names, fields)))
        keep_lines.append(ln)
    stay = ~runaway
    parts = [table.filter(pa.array(stay, pa.bool_()))]
    if keep_rows:
        parts.append(pa.Table.from_pylist(keep_rows, schema=table.schema))
    out = pa.concat_tables(parts)
    all_lines = np.concatenate([lines[stay], np.asarray(keep_lines, np.int64)])
    all_extra = np.concatenate([extra[stay], np.zeros(len(keep_lines), np.int64)])
    order = np.argsort(all_lines, kind="stable")
    lost = quarantine_table(dataset, path, [b[1] for b in bad], lines=[b[0] for b in bad], details=[b[2] for b in bad],
                            raws=[b[3] for b in bad])
    return out.take(pa.array(order, pa.int64())), all_lines[order], all_extra[order], len(keep_rows) + len(bad), lost


def _decode_utf8(table: pa.Table, lines: np.ndarray, dataset: str, path: str, sep: str, extra: np.ndarray):
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
        return pa.table(decoded), lines, None, extra
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
    return (pa.table({n: pc.cast(table.column(n), pa.string()) for n in table.column_names}), lines[~bad_mask], rejects,
            extra[~bad_mask])


def _is_utf8(value: bytes | None) -> bool:
    if value is None:
        return True
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
