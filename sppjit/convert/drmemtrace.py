"""DynamoRIO drmemtrace, as printed by its view tool.

Produce the text with ``drrun -t drmemtrace -tool view -indir DIR 2> view.txt`` (older
releases: ``drrun -t drcachesim -simulator_type view -indir DIR``; the view tool writes to
standard error). Every record line starts with a prefix in one of the three shapes the view
tool has used:

- ``    47303: T1774668 <details>`` (record number, ``T`` and the thread id; releases
  before 9.0),
- ``       47446       37770:     2765543 <details>`` (record number, instruction number,
  thread id),
- ``          10           4:       W0.T3 <details>`` (the same, the thread named
  ``W<workload>.T<tid>``; current releases).

The records read as accesses are (size decimal, address hexadecimal, as view.cpp prints
them with ``std::setw``; the rest of the line, disassembly or ``by PC 0x...``, is ignored):

- ``ifetch       3 byte(s) @ 0x0000000000402680 f3 48 a5  rep movsq`` -> kind 2 (fetch);
  an ifetch the view marks ``non-fetched instruction`` (rep-string iterations after the
  first) is not a fetch and is skipped;
- ``read         8 byte(s) @ 0x00007fdf64e2adc8 by PC 0x0000000000404a7e`` -> kind 0;
- ``write        8 byte(s) @ 0x00007ffd90c13950 by PC 0x000000000040257d`` -> kind 1.

Ignored: markers and other bracketed records (``<marker: ...>``, ``<thread N exited>``,
``<entry type N>``); prefetches and cache flushes (``pref*``, ``iflush``, ``dflush``: they
write no memory); the continuation lines that carry the rest of a long instruction's bytes;
the header (``Output format:``, ``<--record#-> ...``, ``<record#>: T<tid> ...``), dashed
separator lines, the ``View tool results:`` footer with its ``N : total instructions`` line,
and blank lines. Anything else (a traced program's own output when the view ran online) is
malformed.

Threads become vCPUs in the order they first appear (the first thread is vCPU 0); the list
is saved in the mapping file's metadata (``sppjit.threads``). All threads are taken to share
one address space: a view of several workloads (``W0.``, ``W1.`` ...) is refused, convert one
workload at a time (the view tool's ``-only_shards`` or a filtered trace).
"""

from __future__ import annotations

import re

from sppjit.convert.engine import BadLine, Parser, Records, check_access
from sppjit.errors import InputError

KIND_READ, KIND_WRITE, KIND_FETCH = 0, 1, 2
_PREFIX = re.compile(r"\s*\d+(?:\s+\d+)?:\s+(T\d+|W\d+\.T\d+|\d+)(?:\s(.*))?")
_ACCESS = re.compile(r"(ifetch|read|write)\s+(\d+) byte\(s\) @ 0x([0-9a-fA-F]+)(?:\s(.*))?")
_OTHER = re.compile(r"[A-Za-z][\w-]*\s+\d+ byte\(s\) @ 0x[0-9a-fA-F]+(?:\s.*)?")
_CONTINUATION = re.compile(r"(?:[0-9a-fA-F]{2,}\s*)*")
_FOOTER = re.compile(r"View tool results:|\s*\d+ : total instructions|Output format:")
_KINDS = {"ifetch": KIND_FETCH, "read": KIND_READ, "write": KIND_WRITE}
NOT_FETCHED = "non-fetched instruction"


class DrmemtraceParser(Parser):
    name = "drmemtrace"

    def __init__(self, threads, label):
        super().__init__(threads, label)
        self.workload: str | None = None

    def feed(self, line: str, lineno: int, out: Records) -> None:
        prefix = _PREFIX.fullmatch(line)
        if prefix is None:
            stripped = line.strip()
            if (not stripped or stripped.startswith("<") or set(stripped) == {"-"}
                    or _FOOTER.fullmatch(line.rstrip())):
                return
            raise BadLine("not a drmemtrace view record (expected 'RECORD[ INSTR]: TID "
                          "details', as drrun -t drmemtrace -tool view prints them)")
        thread, details = prefix.group(1), (prefix.group(2) or "").strip()
        access = _ACCESS.fullmatch(details)
        if access is None:
            if (not details or details.startswith("<") or _OTHER.fullmatch(details)
                    or _CONTINUATION.fullmatch(details)):
                return
            raise BadLine("unrecognised drmemtrace view record (expected ifetch, read or "
                          "write 'N byte(s) @ 0xADDR', or a marker)")
        name, size, addr, rest = access.groups()
        if name == "ifetch" and rest and NOT_FETCHED in rest:
            return
        addr, size = int(addr, 16), int(size)
        check_access(addr, size)
        out.add(addr, size, _KINDS[name], self._vcpu(thread, lineno), lineno)

    def _vcpu(self, thread: str, lineno: int) -> int:
        if thread[0] == "W":
            workload, tid = thread[1:].split(".T", 1)
            if self.workload is None:
                self.workload = workload
            elif workload != self.workload:
                raise InputError(f"convert: {self.label}, line {lineno}: records of workload "
                                 f"W{workload} after W{self.workload}; workloads have "
                                 "separate address spaces, convert one at a time")
            return self.threads.vcpu(tid)
        return self.threads.vcpu(thread.lstrip("T"))
