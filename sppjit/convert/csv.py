"""Plain CSV: one access per line, with a header naming the columns.

Columns (names are case-insensitive; others are ignored):

- the address, required: ``addr``, ``address``, ``vaddr`` or ``gpa`` (whichever is
  present; it is mapped page by page like every converted address, see
  sppjit.convert.mapping), written ``0x``-hexadecimal or decimal;
- ``size``, optional (default 8, the trace format's default), decimal or ``0x`` hex,
  1..4096;
- ``kind`` (or ``type``), optional (default write, the trace format's default): ``r``,
  ``read``, ``load`` or ``0`` -> read; ``w``, ``write``, ``store`` or ``1`` -> write; ``x``,
  ``fetch``, ``ifetch``, ``exec`` or ``2`` -> fetch; case-insensitive;
- ``vcpu``, optional: the vCPU index as it is (0..65535); or else ``tid``, optional: thread
  ids, given vCPU indices in the order they first appear (first thread = vCPU 0).

The first non-blank line that is not a ``#`` comment is the header. Fields are separated by
commas and may be double-quoted; a quoted field may not span lines. Blank lines and ``#``
comments are ignored. ``seq`` is the line number, the header being line 1 when it is the
first line.
"""

from __future__ import annotations

import csv as _csv

from sppjit.convert.engine import BadLine, Parser, Records, check_access
from sppjit.errors import InputError

DEFAULT_SIZE = 8
DEFAULT_KIND = 1
ADDRESS_NAMES = ("addr", "address", "vaddr", "gpa")
KIND_NAMES = ("kind", "type")
_KINDS = {"r": 0, "read": 0, "load": 0, "0": 0,
          "w": 1, "write": 1, "store": 1, "1": 1,
          "x": 2, "fetch": 2, "ifetch": 2, "exec": 2, "2": 2}


def _split(line: str) -> list[str]:
    if '"' in line:
        try:
            return next(_csv.reader([line], strict=True))
        except (_csv.Error, StopIteration) as exc:
            raise BadLine(f"cannot split the line into CSV fields ({exc})") from None
    return line.split(",")


def _integer(text: str, column: str) -> int:
    raw = text.strip()
    try:
        value = int(raw[2:], 16) if raw[:2].lower() == "0x" else int(raw, 10)
    except ValueError:
        raise BadLine(f"column '{column}' has {raw!r}, not a decimal or 0x-hex "
                      "integer") from None
    if value < 0:
        raise BadLine(f"column '{column}' is negative")
    return value


class CsvParser(Parser):
    name = "csv"

    def __init__(self, threads, label):
        super().__init__(threads, label)
        self.columns: dict[str, int] | None = None
        self.width = 0

    def _header(self, line: str, lineno: int) -> None:
        try:
            names = [name.strip().lower() for name in _split(line)]
        except BadLine as bad:
            raise InputError(f"convert: {self.label}, line {lineno}: CSV header: {bad}") from None
        for name in set(names):
            if name and names.count(name) > 1:
                raise InputError(f"convert: {self.label}, line {lineno}: CSV header names "
                                 f"column '{name}' twice")
        found = [name for name in ADDRESS_NAMES if name in names]
        if not found:
            raise InputError(f"convert: {self.label}, line {lineno}: the CSV header has no "
                             f"address column ({', '.join(ADDRESS_NAMES)}): {line[:80]!r}")
        if len(found) > 1:
            raise InputError(f"convert: {self.label}, line {lineno}: the CSV header has "
                             f"several address columns ({', '.join(found)}); keep one")
        columns = {"addr": names.index(found[0])}
        if "size" in names:
            columns["size"] = names.index("size")
        kinds = [name for name in KIND_NAMES if name in names]
        if len(kinds) > 1:
            raise InputError(f"convert: {self.label}, line {lineno}: the CSV header has both "
                             "kind and type columns; keep one")
        if kinds:
            columns["kind"] = names.index(kinds[0])
        if "vcpu" in names:
            columns["vcpu"] = names.index("vcpu")
        elif "tid" in names:
            columns["tid"] = names.index("tid")
        self.columns = columns
        self.width = len(names)

    def feed(self, line: str, lineno: int, out: Records) -> None:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            return
        if self.columns is None:
            self._header(line, lineno)
            return
        fields = _split(line)
        if len(fields) != self.width:
            raise BadLine(f"{len(fields)} fields, but the header has {self.width}")
        columns = self.columns
        addr = _integer(fields[columns["addr"]], "addr")
        size = _integer(fields[columns["size"]], "size") if "size" in columns else DEFAULT_SIZE
        if "kind" in columns:
            text = fields[columns["kind"]].strip().lower()
            kind = _KINDS.get(text)
            if kind is None:
                raise BadLine(f"column 'kind' has {text!r}, not r/w/x, read/write/fetch "
                              "or 0/1/2")
        else:
            kind = DEFAULT_KIND
        check_access(addr, size)
        if "vcpu" in columns:
            vcpu = _integer(fields[columns["vcpu"]], "vcpu")
            if vcpu > 0xFFFF:
                raise BadLine(f"column 'vcpu' has {vcpu}, more than 65535")
        elif "tid" in columns:
            tid = fields[columns["tid"]].strip()
            if not tid:
                raise BadLine("column 'tid' is empty")
            vcpu = self.threads.vcpu(tid)
        else:
            vcpu = 0
        out.add(addr, size, kind, vcpu, lineno)
