#!/usr/bin/env python3
"""Cut the execlog fixtures of tests/fixtures/convert/ out of the logs run-guest.sh wrote.

Usage: make_excerpts.py MULTI_LOG SINGLE_LOG OUTDIR
MULTI_LOG: exec.log of `run-guest.sh W multi` (firmware window, MTTCG: glued lines);
SINGLE_LOG: exec.log of `run-guest.sh W single` (kernel and userspace windows).
Each excerpt is a run of consecutive lines found by a pattern, kept byte for byte.
"""

import re
import sys

GLUED = re.compile(r'"[^"]*"[^"]*\d, 0x[0-9a-f]+, 0x[0-9a-f]+, "')


def lines_of(path):
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        return handle.read().split("\n")


def first(lines, test, after=0):
    return next(i for i, line in enumerate(lines) if i >= after and test(line))


def write(path, lines):
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as out:
        out.write("\n".join(lines) + "\n")


def main(multi_path, single_path, outdir):
    multi = lines_of(multi_path)
    single = lines_of(single_path)
    # The firmware from its first instruction: ROM reads printed as RAM block offsets.
    write(f"{outdir}/qemu_execlog_firmware.log", multi[:200])
    # Both vCPUs under MTTCG: the first glued line with a device access, and the empty
    # line that follows it later.
    glued = first(multi, lambda s: GLUED.search(s) is not None and "apic-msi" in s)
    empty = first(multi, lambda s: s == "", after=glued)
    write(f"{outdir}/qemu_execlog_smp.log", multi[glued - 20:max(empty + 20, glued + 180)])
    # The kernel: the timer tick's update of jiffies_64 (gpa 0x2a079c0 by kallsyms.txt,
    # beside jiffies_lock and jiffies_seq on the same page), an interrupt return (iretq,
    # 9 loads), an HPET read (an anonymous MMIO region), fxsave64 (55 stores), each with
    # the lines around it.
    pieces = []
    at = first(single, lambda s: "store, 0x02a079c0" in s)
    pieces += single[at - 15:at + 35]
    for pattern in ('"iretq', "0xfed000f0, anon", '"fxsave64'):
        at = first(single, lambda s, p=pattern: p in s)
        pieces += single[at - 30:at + 30]
    write(f"{outdir}/qemu_execlog_kernel.log", pieces)
    # Userspace (busybox), from the first instruction below the kernel's half.
    user = first(single, lambda s: re.match(r"\d+, 0x[0-7][0-9a-f]{0,11}, ", s) is not None,
                 after=10)
    write(f"{outdir}/qemu_execlog_user.log", single[user - 10:user + 190])


if __name__ == "__main__":
    main(*sys.argv[1:4])
