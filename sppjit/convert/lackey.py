"""valgrind lackey: ``valgrind --tool=lackey --trace-mem=yes --log-file=FILE PROGRAM``.

Lines accepted (lackey's lk_main.c prints them with ``"I  %08lx,%lu"``, ``" L %08lx,%lu"``,
``" S %08lx,%lu"`` and ``" M %08lx,%lu"``: hexadecimal address without ``0x``, decimal
size):

- ``I  04016b70,3``  instruction fetch -> one access, kind 2 (fetch);
- `` L 1fff000778,8``  data load -> kind 0 (read);
- `` S 1fff000770,8``  data store -> kind 1 (write);
- `` M 04033e06,1``  data modify (a load and a store of the same bytes, as ``inc`` or
  ``add [mem], r``) -> two accesses, a read then a write, both with the line's ``seq``.

Ignored: valgrind's own lines (``==PID== ...``, and ``--PID-- ...``/``**PID** ...`` warnings),
``SB addr`` lines (``--trace-superblocks=yes``) and blank lines. Anything else (for example
the traced program's own output, when the trace was not sent to ``--log-file``) is
malformed. Lackey records no thread: every access is on vCPU 0.
"""

from __future__ import annotations

import re

from sppjit.convert.engine import (
    MAX_ACCESS_SIZE,
    UINT64_LIMIT,
    BadLine,
    Parser,
    Records,
    check_access,
)

KIND_READ, KIND_WRITE, KIND_FETCH = 0, 1, 2
_RECORD = re.compile(r"\s?([ILSM])\s+([0-9a-fA-F]+),(\d+)\s*")
_VALGRIND = re.compile(r"(==\d+==|--\d+--|\*\*\d+\*\*)")
_SUPERBLOCK = re.compile(r"SB\s+[0-9a-fA-F]+\s*")
_KINDS = {"I": (KIND_FETCH,), "L": (KIND_READ,), "S": (KIND_WRITE,),
          "M": (KIND_READ, KIND_WRITE)}


class LackeyParser(Parser):
    name = "lackey"

    def feed(self, line: str, lineno: int, out: Records) -> None:
        match = _RECORD.fullmatch(line)
        if match is None:
            _other(line)
            return
        code, addr, size = match.groups()
        addr, size = int(addr, 16), int(size)
        check_access(addr, size)
        for kind in _KINDS[code]:
            out.add(addr, size, kind, 0, lineno)

    def parse_chunk(self, lines: list[str], first_lineno: int, out: Records, bad) -> None:
        # The same as feed line by line, without a call per line: lackey traces are long.
        match = _RECORD.fullmatch
        add_addr, add_size, add_kind = out.addr.append, out.size.append, out.kind.append
        add_vcpu, add_seq = out.vcpu.append, out.seq.append
        kinds = _KINDS
        for lineno, line in enumerate(lines, first_lineno):
            found = match(line)
            if found is None:
                try:
                    _other(line)
                except BadLine as error:
                    bad(lineno, line, error)
                continue
            code, addr, size = found.groups()
            addr, size = int(addr, 16), int(size)
            if size < 1 or size > MAX_ACCESS_SIZE or addr + size > UINT64_LIMIT:
                try:
                    check_access(addr, size)
                except BadLine as error:
                    bad(lineno, line, error)
                continue
            for kind in kinds[code]:
                add_addr(addr)
                add_size(size)
                add_kind(kind)
                add_vcpu(0)
                add_seq(lineno)


def _other(line: str) -> None:
    """Return for a line lackey's trace may hold besides records; BadLine otherwise."""
    if not line.strip() or _VALGRIND.match(line) or _SUPERBLOCK.fullmatch(line):
        return
    raise BadLine('not a lackey record ("I  addr,size", " L addr,size", " S addr,size" or '
                  '" M addr,size", address in hex)')
