"""sppjit convert qemu|gem5 (whole-VM traces, guest-physical) and replay/compare protection by
virtual address and by kernel symbol.

Fixtures (tests/fixtures/convert/README.md): qemu_execlog_*.log are REAL QEMU 7.2 execlog
output of a Debian 6.1 guest on 2 vCPUs (tools/qemu-fixtures/), qemu_kallsyms.txt the same
guest's /proc/kallsyms lines; qemu_memc.log is hand-written from mem.c's printing code (QEMU
7.2 has no print-accesses); gem5_monitor.trc is encoded by make_gem5_fixture.py from gem5's
packet.proto. Expected values below are reasoned from the fixture lines, which the tests
quote.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sppjit.cli import app
from sppjit.convert import gem5, physical, qemu
from sppjit.convert.physical import (
    FLAG_DEVICE,
    FLAG_PAGE_CROSSING,
    FLAG_ROM_OFFSET,
    FLAG_SIZE_DEFAULT,
)
from sppjit.convert.vm import convert_vm_trace
from sppjit.errors import InputError
from sppjit.io import symbols

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "convert"
FIRMWARE = FIXTURES / "qemu_execlog_firmware.log"
SMP = FIXTURES / "qemu_execlog_smp.log"
KERNEL = FIXTURES / "qemu_execlog_kernel.log"
USER = FIXTURES / "qemu_execlog_user.log"
MEMC = FIXTURES / "qemu_memc.log"
KALLSYMS = FIXTURES / "qemu_kallsyms.txt"
HOOKS = FIXTURES / "qemu_hooks.csv"
GEM5 = FIXTURES / "gem5_monitor.trc"
R, W, X = 0, 1, 2
MIB = 1 << 20
JIFFIES_64 = 0x2A079C0  # kallsyms: ffffffff82a079c0 D jiffies_64, - __START_KERNEL_map
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def table(path):
    return pq.read_table(str(path)).to_pydict()


def rows(path):
    t = table(path)
    return list(zip(t["gpa"], t["size"], t["vcpu"], t["kind"], t["seq"], t["flags"]))


def convert(tmp_path, fmt, source, **options):
    out = tmp_path / f"{Path(source).stem}.parquet"
    return convert_vm_trace(fmt, source, out, **options), out


# ----------------------------------------------------------------------- qemu: execlog

def test_detect_tells_execlog_from_memc():
    assert qemu.detect(FIRMWARE.read_text().splitlines()) == "execlog"
    assert qemu.detect(MEMC.read_text().splitlines()) == "memc"
    with pytest.raises(InputError, match="not a QEMU plugin log"):
        qemu.detect(["hello", "world"])


@pytest.mark.parametrize("disassembly, size", [
    ("movl %eax, (%esp)", 4), ("pushq %r14", 8), ("movsbl (%edi), %edx", 1),
    ("movzwl 2(%rax), %ecx", 2), ("lock cmpxchgl %edx, (%rdi)", 4), ("movb $0, (%rdi)", 1),
    ("movaps %xmm0, 0x10(%rsp)", 16), ("mov %eax, (%rbx)", 4),
    ("mov dword ptr [rbx], eax", 4), ("movzx eax, byte ptr [rsi]", 1), ("sete (%rax)", 1),
    ("cmovneq 8(%rsp), %rax", 8), ("rep stosq %rax, %es:(%rdi)", 8),
    ("fxsave64 0x40(%rax)", None), ("lidtw %cs:0x61b8", None), ("ljmpl $0x8:$0xfec48", None),
    ("iretq ", 8), ("ret ", None), ("", None)])
def test_operand_size_from_the_disassembly(disassembly, size):
    assert qemu.operand_size(disassembly) == size


def test_firmware_rom_reads_are_flagged_at_the_printed_address(tmp_path):
    # Line 2: '0, 0xfe05b, 0x3e83662e, "cmpl $0, %cs:0x61c8", load, 0x10fff61c8, RAM': a
    # read of the BIOS at 0xf61c8, printed as pc.bios's RAM block offset, beyond the 256 MiB.
    result, out = convert(tmp_path, "qemu", FIRMWARE, guest_memory=256 * MIB)
    got = rows(out)
    assert got[0] == (0x10FFF61C8, 4, 0, R, 2, FLAG_ROM_OFFSET)
    lines = FIRMWARE.read_text().split("\n")
    # 'lidtw %cs:0x61b8' makes two loads whose sizes the mnemonic does not give.
    lidt = next(i for i, line in enumerate(lines, 1) if '"lidtw %cs:0x61b8"' in line)
    assert [r for r in got if r[4] == lidt] == [
        (0x10FFF61B8, 8, 0, R, lidt, FLAG_ROM_OFFSET | FLAG_SIZE_DEFAULT),
        (0x10FFF61BA, 8, 0, R, lidt, FLAG_ROM_OFFSET | FLAG_SIZE_DEFAULT)]
    # The first 'pushl %ebx', store, 0x00006ffc: RAM below 256 MiB, 4 bytes, not flagged.
    push = next(i for i, line in enumerate(lines, 1) if '"pushl %ebx"' in line)
    assert (0x6FFC, 4, 0, W, push, 0) in got
    printed = re.findall(r", (?:load|store), (0x[0-9a-f]+), RAM", FIRMWARE.read_text())
    above = sum(int(a, 16) >= 256 * MIB for a in printed)
    assert result.flagged["rom_offset"] == above > 0
    assert result.accesses == len(printed)
    assert result.vcpus == 1
    # Without --guest-memory nothing is flagged (the layout is unknown) and the summary says so.
    plain, out = convert(tmp_path, "qemu", FIRMWARE)
    assert "rom_offset" not in plain.flagged
    assert any("--guest-memory" in note for note in plain.notes)


def test_glued_lines_of_two_vcpus_are_split_and_the_empty_line_counted(tmp_path):
    text = SMP.read_text()
    lines = text.split("\n")[:-1]
    glued = [i for i, line in enumerate(lines, 1)
             if len(re.findall(r'\d, 0x[0-9a-f]+, 0x[0-9a-f]+, "', line)) > 1]
    assert len(glued) == 1 and lines.count("") == 1  # what the excerpt holds
    (lineno,) = glued
    # vCPU 1's 'lock btsl' store glued to vCPU 0's store to the local APIC (apic-msi).
    assert lines[lineno - 1].startswith('1, 0xfd079, 0x2dba0ff0, "lock btsl $0, 0xf5218", '
                                        'store, 0x000f5218, RAM0, 0xee2ca, ')
    result, out = convert(tmp_path, "qemu", SMP)
    assert [r for r in rows(out) if r[4] == lineno] == [
        (0xF5218, 4, 1, W, lineno, 0),
        (0xFEE00300, 4, 0, W, lineno, FLAG_DEVICE)]
    assert result.counts["glued lines split"] == 1
    assert result.counts["empty lines"] == 1
    assert result.counts["instructions"] == len(lines) - 1 + 1  # one empty, one extra
    assert result.devices == {"apic-msi": 1}
    assert result.vcpus == 2


def test_glued_split_prefers_a_device_already_seen():
    parser = qemu.ExeclogParser(8, None)
    parser.seen_devices.add("pci0")
    line = ('0, 0x1, 0x2, "movl %eax, (%rbx)", store, 0x1000, pci01, 0x3, 0x4, '
            '"movl (%rbx), %eax", load, 0x2000, RAM')
    records = physical.Records()
    parser.parse_chunk([line], 1, records, None)
    assert list(zip(records.addr, records.vcpu, records.flags)) == [
        (0x1000, 0, FLAG_DEVICE), (0x2000, 1, 0)]


def test_many_glued_records_split_or_refused_without_recursion_blowup():
    record = '1, 0x1, 0x2, "movl %eax, (%rbx)", store, 0x1000, RAM'
    parser = qemu.ExeclogParser(8, None)
    records, errors = physical.Records(), []
    parser.parse_chunk([record * 64, record * 500], 1, records,
                       lambda lineno, line, error: errors.append((lineno, str(error))))
    assert len(records) == 64 and set(records.vcpu) == {1}
    assert errors == [(2, "500 execlog records on one line (at most 64 are split apart)")]


def test_kernel_excerpt_fxsave_iretq_and_an_anonymous_mmio_region(tmp_path):
    text = KERNEL.read_text().split("\n")
    result, out = convert(tmp_path, "qemu", KERNEL)
    got = rows(out)
    fx = next(i for i, line in enumerate(text, 1) if '"fxsave64' in line)
    fx_rows = [r for r in got if r[4] == fx]
    assert len(fx_rows) == 55  # fxsave64: 55 stores, sizes not operand-sized
    assert all(r[1] == 8 and r[3] == W and r[5] == FLAG_SIZE_DEFAULT for r in fx_rows)
    iret = next(i for i, line in enumerate(text, 1) if '"iretq' in line)
    assert [(r[1], r[3]) for r in got if r[4] == iret] == [(8, R)] * 9
    hpet = next(i for i, line in enumerate(text, 1) if "0xfed000f0, anon" in line)
    assert [r for r in got if r[4] == hpet] == [(0xFED000F0, 4, 0, R, hpet, FLAG_DEVICE)]
    assert result.devices == {"anona4068430": 1}


def test_userspace_excerpt(tmp_path):
    result, out = convert(tmp_path, "qemu", USER)
    printed = re.findall(r", (load|store), (0x[0-9a-f]+), (\S+?)(?=,|$)", USER.read_text(),
                         flags=re.M)
    assert result.accesses == len(printed)
    assert result.writes == sum(kind == "store" for kind, _, _ in printed)
    assert not result.devices and result.bad_records == 0


def test_bad_execlog_line_is_one_error_naming_the_line_or_counted(tmp_path):
    lines = FIRMWARE.read_text().split("\n")
    lines.insert(4, "qemu-system-x86_64: warning: something else")
    source = tmp_path / "bad.log"
    source.write_text("\n".join(lines))
    out = tmp_path / "bad.parquet"
    r = invoke("convert", "qemu", source, "--out", out)
    assert r.exit_code == 2
    assert "line 5: not an execlog record" in r.output and len(r.output.splitlines()) == 1
    assert not out.exists()
    r = invoke("convert", "qemu", source, "--out", out, "--skip-bad")
    assert r.exit_code == 0, r.output
    assert "skipped 1 malformed line (first: line 5" in r.output
    assert len(table(out)["gpa"]) == len(re.findall(r", (?:load|store), 0x", "\n".join(lines)))


# ------------------------------------------------------------------------- qemu: mem.c

def test_memc_sizes_in_bits_symbols_with_commas_page_crossings_and_vcpu(tmp_path):
    result, out = convert(tmp_path, "qemu", MEMC, vcpu=1)
    assert result.format == "qemu memc"
    assert rows(out) == [
        (0x2A079C0, 8, 1, R, 2, 0), (0x2A079C0, 8, 1, W, 3, 0),
        (0x2A07A00, 4, 1, R, 4, 0), (0x2A07A00, 4, 1, W, 5, 0),
        (0x2A07A40, 1, 1, W, 6, 0),
        (0x3F2A4A58, 2, 1, W, 7, 0),  # symbol 'operator()(int, char) const'
        (0x3F2A4FFE, 4, 1, W, 8, FLAG_PAGE_CROSSING),  # 0xffe + 4 > 4096, empty symbol
        (0x3F2A5000, 16, 1, R, 9, 0),  # 128 bits
        (0x6052FFC, 8, 1, W, 10, FLAG_PAGE_CROSSING)]
    assert result.counts == {"page-crossing records kept whole": 2, "other lines skipped": 2}
    assert any("no vCPU column" in note for note in result.notes)


def test_memc_bad_size_is_named(tmp_path):
    source = tmp_path / "m.log"
    source.write_text(qemu.MEMC_HEADER + "\n0x1,f,0x2,0x3000,12,load,0x1\n")
    with pytest.raises(InputError, match=r"line 2: access_size 12 is not a whole number"):
        convert(tmp_path, "qemu", source)


# --------------------------------------------------------------------------------- gem5

def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_gem5_fixture",
                                                  FIXTURES / "make_gem5_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gem5_fixture_is_the_encoders_output():
    assert GEM5.read_bytes() == _fixture_script().trace()


def test_gem5_reads_writes_fetches_by_requestor(tmp_path):
    # The packets of make_gem5_fixture.py, numbered from 1; seq is the message number
    # (the header is message 1, packet n is message n + 1).
    result, out = convert(tmp_path, "gem5", GEM5)
    assert rows(out) == [
        (0x1000, 4, 0, X, 2, 0), (0x10000, 8, 0, R, 3, 0), (0x10000, 8, 0, W, 4, 0),
        (0x10080, 8, 1, W, 5, 0), (0x10100, 4, 1, R, 6, 0), (0x10100, 4, 1, W, 7, 0),
        (0x20000, 8, 0, R, 8, 0), (0x20000, 8, 0, W, 8, 0),  # SwapReq
        (0x1040, 4, 1, X, 12, 0), (0x10010, 4, 0, W, 13, 0),  # unknown fields skipped
        (0x30000, 8, 1, R, 15, 0)]  # system.cpu1.mmu.dtb.walker
    assert result.counts["packets"] == 14
    assert result.counts["non-CPU requestor packets skipped"] == 1  # the IDE DMA
    assert result.counts["cache-traffic packets skipped"] == 3
    assert (result.reads, result.writes, result.fetches, result.vcpus) == (4, 5, 2, 2)


def test_gem5_gzip_and_errors(tmp_path):
    data = GEM5.read_bytes()
    packed = tmp_path / "monitor.trc.gz"
    packed.write_bytes(gzip.compress(data))
    assert convert(tmp_path, "gem5", packed)[0].accesses == 11
    cut = tmp_path / "cut.trc"
    cut.write_bytes(data[:-3])
    with pytest.raises(InputError, match=r"message 15 \(byte \d+\): the file ends inside"):
        convert(tmp_path, "gem5", cut)
    wrong = tmp_path / "wrong.trc"
    wrong.write_bytes(b"gem4" + data[4:])
    with pytest.raises(InputError, match="not a gem5 trace"):
        convert(tmp_path, "gem5", wrong)
    # A packet without its required addr: one error naming the message, or counted.
    script = _fixture_script()
    bad = script.encode(script.PACKET, {"tick": 1, "cmd": 1, "size": 8})
    header = script.encode(script.PACKET_HEADER, script.HEADER, script.ID_STRING_ENTRY)
    good = script.packet_message(2, 4, 0x5000, 8, 0, 2, None)
    source = tmp_path / "bad.trc"
    source.write_bytes(b"gem5" + b"".join(script.varint(len(m)) + m
                                          for m in (header, bad, good)))
    with pytest.raises(InputError, match=r"message 2 \(byte \d+\): not a gem5 Packet: no addr"):
        convert(tmp_path, "gem5", source)
    result, out = convert(tmp_path, "gem5", source, skip_bad=True)
    assert rows(out) == [(0x5000, 8, 0, W, 3, 0)] and result.bad_records == 1


def test_gem5_requestor_names_to_vcpus():
    assert gem5.cpu_of("system.cpu.inst") == 0
    assert gem5.cpu_of("system.cpu3.dcache.prefetcher") == 3
    assert gem5.cpu_of("board.processor.cores1.core.data") == 1
    assert gem5.cpu_of("system.pc.south_bridge.ide.dma") is None


# ----------------------------------------------------------------------------- streaming

def test_streaming_writes_one_batch_per_chunk(tmp_path):
    # The converter holds one chunk of lines at a time: with chunk=100, 1,000 records make
    # 10 row groups of at most 100 x (accesses per line) rows each.
    source = tmp_path / "long.log"
    source.write_text("".join(f'{i % 2}, 0x{i:x}, 0x0, "movq %rax, (%rbx)", '
                              f"store, 0x{i * 8:08x}, RAM\n" for i in range(1000)))
    seen = []
    result, out = convert(tmp_path, "qemu", source, chunk=100, progress=seen.append)
    assert pq.ParquetFile(out).num_row_groups == 10
    assert seen == list(range(100, 1001, 100))
    assert result.accesses == 1000 and result.counts["sizes inferred"] == 1000
    gem5_out = tmp_path / "g.parquet"
    convert_vm_trace("gem5", GEM5, gem5_out, chunk=3)
    assert pq.ParquetFile(gem5_out).num_row_groups == 4  # 11 accesses, 3 per batch


# ----------------------------------------------- convert -> replay -> compare, by format

def _compare(trace, *protection, vcpus=2, memory="256MiB"):
    r = invoke("compare", trace, *protection, "--memory", memory, "--vcpus", vcpus,
               "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    return {c["name"]: c for c in json.loads(r.output)["configs"]}


def _hooks(config):
    return config["summary"]["hooks"]


def test_execlog_through_replay_and_compare_with_symbol_hooks(tmp_path):
    # The kernel excerpt's first piece is a timer tick (jiffies_64 at gpa 0x2a079c0 by
    # kallsyms): writes on that page are 'lock cmpxchgl' and 'movb $0' on jiffies_lock
    # (0x2a07a40, sub-page 20), two 'addl $1' on jiffies_seq (0x2a07a00, sub-page 20) and
    # 'addq %rdi' on jiffies_64 itself (sub-page 19): 5 writes, 1 on the structure.
    text = KERNEL.read_text()
    assert len(re.findall(r"store, 0x02a07[0-9a-f]{3}, RAM", text)) == 5
    assert len(re.findall(r"store, 0x02a079c0, RAM", text)) == 1
    assert not re.search(r"store, 0x0(?:2a5b|3313)", text)  # init_cred, idt_table pages
    out = tmp_path / "k.parquet"
    r = invoke("convert", "qemu", KERNEL, "--out", out)
    assert r.exit_code == 0, r.output
    protection = ("--protect-symbols", HOOKS, "--symbols", KALLSYMS)
    r = invoke("replay", out, *protection, "--memory", "256MiB", "--vcpus", "2", "--json",
               "--no-progress")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["hooks"]["relevant"] == 1 and summary["hooks"]["irrelevant"] == 0
    assert summary["exits"]["mmio"] == 1  # the HPET read at 0xfed000f0, beyond 256 MiB
    assert "qemu_hooks.csv (symbols of" in summary["config"]["protection"]["path"]
    configs = _compare(out, *protection)
    page, spp = configs["page"], configs["spp_v4"]
    assert page["summary"]["exits"]["write_protect"] == 5
    assert (_hooks(page)["relevant"], _hooks(page)["irrelevant"]) == (1, 4)
    assert spp["summary"]["exits"]["spp_violation"] == 1
    assert (_hooks(spp)["relevant"], _hooks(spp)["irrelevant"]) == (1, 0)
    per_hook = {h["name"]: h for h in _hooks(page)["per_hook"]}
    assert per_hook["jiffies_64"]["relevant"] == 1


def test_memc_through_replay_and_compare(tmp_path):
    # Stores on jiffies' page: 0x2a079c0 (the 8-byte hook), 0x2a07a00 and 0x2a07a40.
    out = tmp_path / "m.parquet"
    assert invoke("convert", "qemu", MEMC, "--out", out).exit_code == 0
    protect = tmp_path / "p.csv"
    protect.write_text(f"gpa,length,name\n{JIFFIES_64:#x},8,jiffies_64\n")
    configs = _compare(out, "--protect", protect, vcpus=1, memory="1GiB")
    assert configs["page"]["summary"]["exits"]["write_protect"] == 3
    assert (_hooks(configs["page"])["relevant"], _hooks(configs["page"])["irrelevant"]) == (1, 2)
    assert configs["spp_v4"]["summary"]["exits"]["spp_violation"] == 1


def test_gem5_through_replay_and_compare(tmp_path):
    # A 64-byte hook at 0x10000 (sub-page 0 of page 0x10): writes on the page are packets 3
    # (0x10000) and 12 (0x10010) inside it, 4 (0x10080, sub-page 1) and 6 (0x10100,
    # sub-page 2) outside.
    out = tmp_path / "g.parquet"
    assert invoke("convert", "gem5", GEM5, "--out", out).exit_code == 0
    protect = tmp_path / "p.csv"
    protect.write_text("gpa,length,name\n0x10000,64,hook\n")
    r = invoke("replay", out, "--protect", protect, "--vcpus", "2", "--memory", "1MiB",
               "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["counts"]["fetches"] == 2
    configs = _compare(out, "--protect", protect, memory="1MiB")
    assert configs["page"]["summary"]["exits"]["write_protect"] == 4
    assert (_hooks(configs["page"])["relevant"], _hooks(configs["page"])["irrelevant"]) == (2, 2)
    assert configs["spp_v4"]["summary"]["exits"]["spp_violation"] == 2
    assert _hooks(configs["spp_v4"])["irrelevant"] == 0


# ------------------------------------------------------------------------ symbols

def test_symbol_map_formats_and_sizes(tmp_path):
    smap = symbols.read_symbol_map(KALLSYMS)
    # System.map/kallsyms give no sizes: the distance to the next address in the map.
    assert smap.lookup("init_cred") == (0xFFFFFFFF82A5BA00, 0xB0)
    assert smap.lookup("sys_call_table") == (0xFFFFFFFF82000360, 0xE20)  # 452 x 8 bytes
    assert smap.lookup("espfix_pud_page")[1] is None  # the last symbol
    nm = tmp_path / "nm.txt"
    nm.write_text("ffffffff82a079c0 0000000000000008 D jiffies_64\n"
                  "ffffffff82a07a00 0000000000000004 D jiffies_seq\n")
    assert symbols.read_symbol_map(nm).lookup("jiffies_64") == (0xFFFFFFFF82A079C0, 8)
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffffffffc0a01000 t foo_init\t[foo]\n")
    assert symbols.read_symbol_map(kallsyms).lookup("foo_init")[0] == 0xFFFFFFFFC0A01000


def test_kernel_virtual_to_guest_physical():
    assert symbols.kernel_gpa(0xFFFFFFFF82A079C0) == JIFFIES_64
    assert symbols.kernel_gpa(0xFFFFFFFF82A079C0, phys_base=0x4000000) == JIFFIES_64 + 0x4000000
    assert symbols.kernel_gpa(0xFFFF888006052E80) == 0x6052E80  # the direct map
    with pytest.raises(InputError, match="per-CPU or module symbol"):
        symbols.kernel_gpa(0x1B000)


def test_symbol_hooks_keep_the_symbol_name(tmp_path):
    ranges = symbols.read_symbol_hooks(HOOKS, symbols.read_symbol_map(KALLSYMS))
    assert ranges.name == ["jiffies_64", "init_cred", "idt_table"]
    assert ranges.gpa.tolist() == [JIFFIES_64, 0x2A5BA00, 0x3313000]
    assert ranges.length.tolist() == [8, 0xB0, 4096]
    offsets = tmp_path / "h.csv"
    offsets.write_text("symbol,offset,length\ninit_task,0x40,16\n")
    got = symbols.read_symbol_hooks(offsets, symbols.read_symbol_map(KALLSYMS))
    assert (got.gpa.tolist(), got.name) == ([0x2A1AA80], ["init_task+0x40"])


@pytest.mark.parametrize("hooks, symbols_text, message", [
    ("symbol\nsys_call_table\n", None,
     r"row 0 \(sys_call_table\+0x0, 3616 bytes up to the next symbol in the map, at gpa "
     r"0x2000360\) crosses a 4 KiB page boundary"),
    ("symbol\nno_such_symbol\n", None, r"'no_such_symbol' is not in .*qemu_kallsyms.txt"),
    ("symbol,length\njiffies_64,9000\n", None, r"row 0: length 9000 is not 1..4096"),
    ("name\nx\n", None, "expected symbol"),
    ("symbol\njiffies_64\n", "this is not a map\n", r"line 1: 'this is not a map' is not a "
                                                    r"System.map"),
])
def test_symbol_errors_are_one_line_exit_2(tmp_path, hooks, symbols_text, message):
    trace = tmp_path / "g.parquet"
    convert_vm_trace("gem5", GEM5, trace)
    hook_file = tmp_path / "hooks.csv"
    hook_file.write_text(hooks)
    smap = KALLSYMS
    if symbols_text is not None:
        smap = tmp_path / "System.map"
        smap.write_text(symbols_text)
    for command in ("replay", "compare"):
        r = invoke(command, trace, "--protect-symbols", hook_file, "--symbols", smap,
                   "--vcpus", 2)
        assert r.exit_code == 2, r.output
        assert re.search(message, r.output) and len(r.output.strip().splitlines()) == 1


def test_protection_option_conflicts(tmp_path):
    trace = tmp_path / "g.parquet"
    convert_vm_trace("gem5", GEM5, trace)
    for args, message in [
        (("--protect-symbols", HOOKS), "--protect-symbols and --symbols go together"),
        (("--protect-virtual", HOOKS), "--protect-virtual and --mapping go together"),
        (("--protect", HOOKS, "--protect-symbols", HOOKS, "--symbols", KALLSYMS),
         "--protect and --protect-symbols cannot be used together"),
        (("--phys-base", "0x1000"), "--phys-base is for --protect-symbols"),
    ]:
        r = invoke("replay", trace, *args, "--vcpus", 2)
        assert r.exit_code == 2 and message in r.output, r.output
    r = invoke("compare", trace, "--vcpus", 2)
    assert r.exit_code == 2 and "--protect (or --protect-virtual" in r.output


def test_protect_virtual_through_a_converters_mapping(tmp_path):
    # A process trace (sppjit's CSV form): the first page touched, 0x7f0000001000, becomes
    # gfn 0; a hook by virtual address lands at its offset there.
    source = tmp_path / "a.csv"
    source.write_text("addr,size,kind\n0x7f0000001010,8,w\n0x7f0000001800,8,w\n")
    trace = tmp_path / "a.parquet"
    assert invoke("convert", "csv", source, "--out", trace).exit_code == 0
    hooks = tmp_path / "v.csv"
    hooks.write_text("addr,length,name\n0x7f0000001010,8,field\n")
    r = invoke("replay", trace, "--protect-virtual", hooks, "--mapping",
               f"{trace}.mapping.parquet", "--memory", "1MiB", "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["hooks"]["relevant"] == 1 and summary["hooks"]["irrelevant"] == 0
    assert summary["exits"]["spp_violation"] == 1
    configs = _compare(trace, "--protect-virtual", hooks, "--mapping",
                       f"{trace}.mapping.parquet", vcpus=1, memory="1MiB")
    assert (_hooks(configs["page"])["relevant"], _hooks(configs["page"])["irrelevant"]) == (1, 1)


def test_convert_cli_summary_and_option_checks(tmp_path):
    out = tmp_path / "f.parquet"
    r = invoke("convert", "qemu", FIRMWARE, "--out", out, "--guest-memory", "256MiB")
    assert r.exit_code == 0, r.output
    assert "sizes inferred" in r.output and "flagged rom_offset" in r.output
    assert "replay with: sppjit replay" in r.output
    r = invoke("convert", "gem5", GEM5, "--out", out, "--vcpu", "1")
    assert r.exit_code == 2 and "--vcpu: not for gem5" in r.output
    r = invoke("convert", "lackey", FIRMWARE, "--out", out, "--default-size", "4")
    assert r.exit_code == 2 and "--default-size is for the whole-VM formats" in r.output
    r = invoke("convert", "qemu", FIRMWARE, "--out", out, "--mapping-out", tmp_path / "m.parquet")
    assert r.exit_code == 2 and "no mapping is made" in r.output


def test_flags_column_survives_the_replay_output(tmp_path):
    trace = tmp_path / "f.parquet"
    convert_vm_trace("qemu", FIRMWARE, trace, guest_memory=256 * MIB)
    results = tmp_path / "r.parquet"
    r = invoke("replay", trace, "--memory", "256MiB", "--out", results, "--no-progress")
    assert r.exit_code == 0, r.output
    flags = np.array(table(results)["flags"])
    assert int(np.count_nonzero(flags & FLAG_ROM_OFFSET)) > 0
