"""``convert_vm_trace``: the whole-VM formats (qemu, gem5), whose addresses are guest-physical
already; see sppjit.convert.physical (the streaming core), sppjit.convert.qemu and
sppjit.convert.gem5."""

from __future__ import annotations

import os
from collections.abc import Callable

from sppjit.convert.physical import PhysicalResult
from sppjit.defaults import VM_CONVERT_FORMATS
from sppjit.errors import InputError

VM_FORMATS = VM_CONVERT_FORMATS  # sppjit.defaults
DEFAULT_CHUNK = 1 << 16  # lines (qemu) or messages (gem5) per output batch


def convert_vm_trace(fmt: str, source: str | os.PathLike, out: str | os.PathLike, *,
                     skip_bad: bool = False, default_size: int | None = None,
                     vcpu: int | None = None, guest_memory: int | None = None,
                     chunk: int = DEFAULT_CHUNK,
                     progress: Callable[[int], None] | None = None) -> PhysicalResult:
    """Convert the QEMU plugin log or gem5 packet trace ``source`` into the trace ``out``.

    ``default_size``: bytes per execlog access whose size the disassembly does not give
    (default 8); ``vcpu``: the vCPU of every mem.c access (default 0; mem.c has no vCPU
    column); ``guest_memory``: QEMU's -m in bytes, to flag RAM block offsets (execlog).
    ``progress(records_read)`` is called after each chunk. InputError for bad input,
    leaving no output file.
    """
    from sppjit.convert import physical, qemu
    from sppjit.io.output import check_output_path

    if fmt not in VM_FORMATS:
        raise InputError(f"convert: unknown whole-VM format '{fmt}' (one of "
                         f"{', '.join(VM_FORMATS)})")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if fmt == "gem5":
        for name, value in (("--default-size", default_size), ("--vcpu", vcpu),
                            ("--guest-memory", guest_memory)):
            if value is not None:
                raise InputError(f"{name}: not for gem5 traces (they give sizes, "
                                 "requestors and physical addresses)")
    if default_size is not None and not 1 <= default_size <= 4096:
        raise InputError(f"--default-size: {default_size} is not 1..4096")
    if vcpu is not None and not 0 <= vcpu <= 0xFFFF:
        raise InputError(f"--vcpu: {vcpu} is not 0..65535")
    source, out = os.fspath(source), os.fspath(out)
    check_output_path(out, option="--out", table=True)
    if source != "-" and os.path.exists(out) and os.path.samefile(source, out):
        raise InputError(f"--out: {out} is the same file as IN")
    label = "standard input" if source == "-" else source
    if fmt == "gem5":
        from sppjit.convert import gem5

        chunks = gem5.chunks(source, chunk_records=chunk)
        noun = "message"
    else:
        chunks = qemu.chunks(source, default_size=default_size or qemu.DEFAULT_SIZE,
                             vcpu=vcpu or 0, guest_memory=guest_memory, chunk_lines=chunk)
        noun = "line"
    return physical.run(fmt, source, out, chunks, skip_bad=skip_bad, label=label,
                        record_noun=noun, progress=progress)
