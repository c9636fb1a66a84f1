"""sppjit convert: lackey, pinatrace, drmemtrace view and CSV text traces to sppjit traces.

Fixtures (tests/fixtures/convert/README.md): lackey_true.txt is REAL valgrind 3.19 lackey
output of /bin/true, trimmed; Pin and DynamoRIO cannot run on the machine that made the
fixtures, so pinatrace_*.out and drmemtrace_view.txt are hand-written in the exact formats of
pinatrace.cpp and DynamoRIO's view.cpp (column widths included); accesses.csv is sppjit's own
CSV form. Expected rows below are computed by hand from the fixture lines.
"""

from __future__ import annotations

import bz2
import gzip
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

import sppjit
from sppjit.cli import SppjitGroup
from sppjit.commands import convert as convert_command
from sppjit.convert import convert_trace, default_mapping_path
from sppjit.convert.mapping import PageMapper, read_mapping, translate_protection
from sppjit.errors import InputError
from sppjit.io.protect import AccessMaps, ByteRanges, ranges_to_maps, read_protection
from sppjit.io.trace import open_trace
from sppjit.replay import replay

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "convert"
LACKEY = FIXTURES / "lackey_true.txt"
PIN_MANUAL = FIXTURES / "pinatrace_manual.out"
PIN_SIZED = FIXTURES / "pinatrace_sized.out"
DRMEMTRACE = FIXTURES / "drmemtrace_view.txt"
CSV = FIXTURES / "accesses.csv"
R, W, X = 0, 1, 2

# A local app with the real root group (its error handling gives the exit codes); the lead
# mounts the same function on sppjit.cli.app.
app = typer.Typer(cls=SppjitGroup, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _root() -> None:
    """Test root."""


app.command("convert", no_args_is_help=True, help=convert_command.HELP,
            epilog=convert_command.EPILOG)(convert_command.convert)
runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def rows(path) -> list[tuple[int, int, int, int, int]]:
    table = read(path)
    return list(zip(*(table.column(name).to_pylist()
                      for name in ("gpa", "size", "vcpu", "kind", "seq"))))


def read(path) -> pa.Table:
    path = str(path)
    if path.endswith(".arrow"):
        return ipc.open_file(path).read_all()
    return pq.read_table(path)


def mapping_rows(path) -> list[tuple[int, int]]:
    table = read(path)
    return list(zip(table.column("vpage").to_pylist(), table.column("gfn").to_pylist()))


def write(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- lackey

def test_lackey_real_fixture_first_rows_and_mapping(tmp_path):
    out = tmp_path / "t.parquet"
    result = convert_trace("lackey", LACKEY, out)
    got = rows(out)
    # Lines 1-6 are the ==PID== banner. Line 7 "I  0401ab70,3": first page 0x401a -> gfn 0;
    # line 9 " S 1fff000778,8": page 0x1fff000 -> gfn 1; line 10 "I  0401b770,1": 0x401b -> 2.
    assert got[:5] == [
        (0x0B70, 3, 0, X, 7),
        (0x0B73, 5, 0, X, 8),
        (0x1000 + 0x778, 8, 0, W, 9),
        (0x2000 + 0x770, 1, 0, X, 10),
        (0x1000 + 0x770, 8, 0, W, 11),
    ]
    assert mapping_rows(default_mapping_path(out))[:3] == [(0x401A, 0), (0x1FFF000, 1),
                                                           (0x401B, 2)]
    # Line 35 " M 04033e06,1": a read then a write of the same byte, both seq 35.
    modify = [row for row in got if row[4] == 35]
    assert [row[3] for row in modify] == [R, W]
    assert modify[0][:3] == modify[1][:3] and modify[0][1] == 1
    assert modify[0][0] & 0xFFF == 0xE06
    # Every access line is one row, every M line two; the closing banner adds nothing.
    text = LACKEY.read_text().splitlines()
    access_lines = [line for line in text if not line.startswith("==")]
    modifies = sum(line.startswith(" M") for line in access_lines)
    assert result.accesses == len(access_lines) + modifies + result.split == len(got)
    assert result.lines == len(text) == 320
    assert result.bad_lines == 0 and result.vcpus == 1 and result.threads == []
    assert {row[2] for row in got} == {0}
    table = read(out)
    assert table.schema.field("gpa").type == pa.uint64()
    assert table.schema.field("size").type == pa.uint16()
    assert table.schema.field("vcpu").type == pa.uint16()
    assert table.schema.field("kind").type == pa.uint8()
    assert table.schema.field("seq").type == pa.uint64()
    meta = table.schema.metadata
    assert meta[b"sppjit.converted_from"] == b"lackey"
    assert meta[b"sppjit.schema_version"] == b"1"


def test_lackey_other_line_shapes(tmp_path):
    src = write(tmp_path, "l.txt",
                "==1== Lackey, an example Valgrind tool\n"
                "--1-- WARNING: unhandled syscall\n"
                "SB 04016b70\n"
                "\n"
                " L 7ff0001000,16\n"
                " M 7ff0001ffc,8\n")
    out = tmp_path / "t.parquet"
    convert_trace("lackey", src, out)
    # The M access crosses 0x7ff0002000: read 4+4 then write 4+4, all seq 6.
    assert rows(out) == [
        (0x000, 16, 0, R, 5),
        (0xFFC, 4, 0, R, 6), (0x1000, 4, 0, R, 6),
        (0xFFC, 4, 0, W, 6), (0x1000, 4, 0, W, 6),
    ]


# ---------------------------------------------------------------------------- pinatrace

def test_pinatrace_manual_fixture_default_size_and_split(tmp_path):
    out = tmp_path / "t.arrow"
    result = convert_trace("pinatrace", PIN_MANUAL, out, mapping_out=tmp_path / "m.arrow")
    # Lines 1-4 are comments. No size in this form: 8 bytes each. Pages in first-touch
    # order: 0x7ffd2c81a -> 0, 0x7f3c1e8c6 -> 1, 0x7f3c1e8c7 -> 2, 0x7ffd2c81b -> 3
    # (second half of line 11), 0x55d1a3e02 -> 4.
    assert rows(out) == [
        (0x06F8, 8, 0, W, 5),
        (0x06F0, 8, 0, W, 6),
        (0x06E8, 8, 0, W, 7),
        (0x1E68, 8, 0, R, 8),
        (0x2A40, 8, 0, W, 9),
        (0x06F8, 8, 0, R, 10),
        (0x0FFC, 4, 0, W, 11), (0x3000, 4, 0, W, 11),  # 0x7ffd2c81affc+8 crosses a page
        (0x1E70, 8, 0, R, 12),
        (0x3008, 8, 0, W, 13),
        (0x2A40, 8, 0, R, 14),
        (0x4010, 8, 0, W, 15),
        (0x4010, 8, 0, R, 16),
        (0x06E0, 8, 0, W, 17),
        (0x06E0, 8, 0, R, 18),
        (0x06E8, 8, 0, R, 19),
        (0x06F0, 8, 0, R, 20),
    ]
    assert result.split == 1 and result.pages == 5 and result.lines == 21
    assert mapping_rows(tmp_path / "m.arrow") == [
        (0x7FFD2C81A, 0), (0x7F3C1E8C6, 1), (0x7F3C1E8C7, 2), (0x7FFD2C81B, 3),
        (0x55D1A3E02, 4)]


def test_pinatrace_sized_fixture(tmp_path):
    out = tmp_path / "t.parquet"
    convert_trace("pinatrace", PIN_SIZED, out)
    # Lines 1-7 are the header and comments; sizes come from the lines; values are ignored.
    assert rows(out) == [
        (0x06F8, 8, 0, W, 8),
        (0x06F0, 8, 0, W, 9),
        (0x1040, 4, 0, R, 10),
        (0x1044, 4, 0, W, 11),
        (0x1FFE, 2, 0, W, 12), (0x2000, 2, 0, W, 12),  # 0x601ffe+4 crosses into 0x602
        (0x06F0, 8, 0, R, 13),
        (0x06C0, 16, 0, W, 14),
        (0x1040, 1, 0, R, 15),
        (0x1040, 2, 0, W, 16),
    ]


def test_pinatrace_nil_and_lowercase(tmp_path):
    src = write(tmp_path, "p.out", "(nil): r 0x1000\n0x40: w 2000 4\n#eof\n")
    out = tmp_path / "t.parquet"
    convert_trace("pinatrace", src, out)
    assert rows(out) == [(0x0000, 8, 0, R, 1), (0x1000, 4, 0, W, 2)]


# --------------------------------------------------------------------------- drmemtrace

def test_drmemtrace_fixture(tmp_path):
    out = tmp_path / "t.parquet"
    result = convert_trace("drmemtrace", DRMEMTRACE, out)
    got = rows(out)
    # Line 11 is record 8, the first ifetch (page 0x402 -> gfn 0); line 12 its write
    # (0x7ffd90c13 -> gfn 1); line 19 reads 0x4e34f4 (0x4e3 -> gfn 2).
    assert got[:9] == [
        (0x057D, 1, 0, X, 11),
        (0x1950, 8, 0, W, 12),
        (0x057E, 3, 0, X, 13),
        (0x0581, 3, 0, X, 14),
        (0x194C, 4, 0, W, 15),
        (0x058C, 4, 0, X, 16),
        (0x194C, 4, 0, R, 17),
        (0x0592, 6, 0, X, 18),
        (0x24F4, 4, 0, R, 19),
    ]
    # Line 24, the spilled instruction bytes, adds nothing; line 26 writes 8 bytes at
    # 0x7ffd90c13ffc: split into 4 bytes on gfn 1 and 4 on the new page 0x7ffd90c14 (gfn 3).
    assert [row for row in got if row[4] in (23, 24, 25, 26)] == [
        (0x05A1, 10, 0, X, 23),
        (0x05AB, 4, 0, X, 25),
        (0x1FFC, 4, 0, W, 26), (0x3000, 4, 0, W, 26),
    ]
    # The prefetch (line 28) is not an access.
    assert not [row for row in got if row[4] == 28]
    # Thread 2765543 appears second: vCPU 1, first page 0x404 -> gfn 4.
    second = [row for row in got if row[2] == 1]
    assert second[0] == (0x4A7E, 5, 1, X, 34)
    assert second[1] == (0x5000 + 0xDC8, 8, 1, R, 35)  # 0x7fdf64e2a -> gfn 5
    assert got[-1] == (0x1958, 8, 0, R, 47)
    assert len(got) == 28 and result.split == 1
    assert result.vcpus == 2 and result.threads == ["2765542", "2765543"]
    meta = read(default_mapping_path(out)).schema.metadata
    assert meta[b"sppjit.threads"] == b'["2765542", "2765543"]'


def test_drmemtrace_older_and_newer_prefixes(tmp_path):
    src = write(tmp_path, "v.txt",
                "Output format:\n"
                "<record#>: T<tid> <record details>\n"
                "------------------------------------------------------------\n"
                "        1: T1774673 <marker: version 4>\n"
                "   173369: T1774669 ifetch       3 byte(s) @ 0x0000000000402680 f3 48 a5  "
                "           rep movsq\n"
                "   173370: T1774669 read         8 byte(s) @ 0x00007f8881e37c70 by PC "
                "0x0000000000402680\n"
                "   173371: T1774669 ifetch       3 byte(s) @ 0x0000000000402680 "
                "non-fetched instruction\n"
                "   173372: T1774668 write        8 byte(s) @ 0x00007f8881e37a70 by PC "
                "0x0000000000402680\n"
                "          10           4:       W0.T3 ifetch      10 byte(s) @ "
                "0x00007f86ef03d107 00001931 04020204 load store [4byte]\n"
                "          10           4:       W0.T3                                  "
                "           00000026\n"
                "          11           5:       W0.T3 ifetch       4 byte(s) @ "
                "0x0000002a non-branch\n"
                "<...>\n")
    out = tmp_path / "t.parquet"
    result = convert_trace("drmemtrace", src, out)
    assert rows(out) == [
        (0x0680, 3, 0, X, 5),
        (0x1C70, 8, 0, R, 6),
        (0x1A70, 8, 1, W, 8),  # the non-fetched instruction (line 7) is skipped
        (0x2107, 10, 2, X, 9),
        (0x302A, 4, 2, X, 11),
    ]
    assert result.threads == ["1774669", "1774668", "3"]


def test_drmemtrace_refuses_two_workloads(tmp_path):
    src = write(tmp_path, "v.txt",
                "           1           1:       W0.T3 ifetch       4 byte(s) @ 0x0000002a x\n"
                "           2           2:       W1.T3 ifetch       4 byte(s) @ 0x0000002a x\n")
    with pytest.raises(InputError, match=r"line 2: records of workload W1 after W0"):
        convert_trace("drmemtrace", src, tmp_path / "t.parquet", skip_bad=True)
    assert os.listdir(tmp_path) == ["v.txt"]


# --------------------------------------------------------------------------------- csv

def test_csv_fixture(tmp_path):
    out = tmp_path / "t.parquet"
    result = convert_trace("csv", CSV, out)
    # Line 1 is a comment, line 2 the header. Pages: 0x7ffd2c81a -> 0, 0x55d1a3e02 -> 1,
    # 0x400 -> 2, 0x7ffd2c81b -> 3 (second half of line 8). tid 1001 -> vCPU 0, 1002 -> 1.
    got = rows(out)
    assert got[:7] == [
        (0x06F8, 8, 0, W, 3),
        (0x06F0, 8, 0, W, 4),
        (0x1010, 4, 1, R, 5),
        (0x1010, 4, 1, W, 6),
        (0x2000, 3, 0, X, 7),
        (0x0FFC, 4, 1, W, 8), (0x3000, 4, 1, W, 8),
    ]
    # Line 9: decimal 4198400 = 0x401000, a new page -> gfn 4; line 10 is blank; line 11 a
    # quoted kind on page 0x55d1a3e02 (gfn 1); line 12 kind 0 at 0x7ffd2c81b000 (gfn 3).
    assert got[7:] == [
        (0x4000, 16, 0, X, 9),
        (0x1FF8, 8, 0, R, 11),
        (0x3000, 1, 1, R, 12),
    ]
    assert result.vcpus == 2 and result.threads == ["1001", "1002"]


def test_csv_defaults_and_vcpu_column(tmp_path):
    src = write(tmp_path, "a.csv", "GPA,VCPU\n0x1000,3\n8192,0\n")
    out = tmp_path / "t.parquet"
    result = convert_trace("csv", src, out)
    # Size 8 and kind write by default (the trace format's defaults); vcpu as given.
    assert rows(out) == [(0x0000, 8, 3, W, 2), (0x1000, 8, 0, W, 3)]
    assert result.vcpus == 4 and result.threads == []


@pytest.mark.parametrize("header, message", [
    ("size,kind\n", "no address column"),
    ("addr,gpa\n", "several address columns"),
    ("addr,addr\n", "names column 'addr' twice"),
    ("addr,kind,type\n", "both kind and type"),
])
def test_csv_bad_header(tmp_path, header, message):
    src = write(tmp_path, "a.csv", header + "1,2,3\n")
    with pytest.raises(InputError, match=message):
        convert_trace("csv", src, tmp_path / "t.parquet", skip_bad=True)
    assert os.listdir(tmp_path) == ["a.csv"]


@pytest.mark.parametrize("line, reason", [
    ("0x1000,8,q", "column 'kind' has 'q'"),
    ("0x1000,8", "2 fields, but the header has 3"),
    ("zz,8,w", "column 'addr' has 'zz'"),
    ("-5,8,w", "column 'addr' is negative"),
    ("0x1000,0,w", "size 0 is not 1..4096"),
    ("0x1000,4097,w", "size 4097 is not 1..4096"),
    ("0xfffffffffffffffc,8,w", "wraps past the end"),
])
def test_csv_bad_rows(tmp_path, line, reason):
    src = write(tmp_path, "a.csv", "addr,size,kind\n0x2000,8,w\n" + line + "\n")
    with pytest.raises(InputError) as info:
        convert_trace("csv", src, tmp_path / "t.parquet")
    assert reason in str(info.value) and "line 3" in str(info.value)


# ------------------------------------------------------------------- malformed and empty

def test_malformed_line_names_file_line_and_text_and_leaves_nothing(tmp_path):
    lines = ["I  0401ab70,3"] * 10 + ["this is not lackey " + "x" * 200] + [" S 1000,8"]
    src = write(tmp_path, "in.txt", "\n".join(lines) + "\n")
    with pytest.raises(InputError) as info:
        # chunk_lines=4: two batches were already written when line 11 fails.
        convert_trace("lackey", src, tmp_path / "t.parquet", chunk_lines=4)
    message = str(info.value)
    assert message.startswith(f"convert: {src}, line 11: not a lackey record")
    assert "'this is not lackey xxx" in message and "...'" in message
    assert len(message) < 400 and "\n" not in message
    assert os.listdir(tmp_path) == ["in.txt"]  # no trace, no mapping, no temporary file


@pytest.mark.parametrize("fmt, line, reason", [
    ("lackey", "I  0401ab70,0", "size 0 is not 1..4096"),
    ("lackey", " S 1000,4097", "size 4097 is not 1..4096"),
    ("lackey", " S ffffffffffffffff,2", "access at 0xffffffffffffffff of 2 bytes wraps "
                                        "past the end of the 64-bit address space"),
    ("lackey", " X 1000,8", "not a lackey record"),
    ("pinatrace", "0x40: W 0x1000 0", "size 0 is not 1..4096"),
    ("pinatrace", "0x40: Q 0x1000", "not a pinatrace record"),
    ("pinatrace", "0x40 W 0x1000", "not a pinatrace record"),
    ("drmemtrace", "   12   3:   77 write     9000 byte(s) @ 0x0000000000001000 by PC 0x1",
     "size 9000 is not 1..4096"),
    ("drmemtrace", "   12   3:   77 bogus", "unrecognised drmemtrace view record"),
    ("drmemtrace", "Adios world!", "not a drmemtrace view record"),
])
def test_malformed_lines_per_format(tmp_path, fmt, line, reason):
    src = write(tmp_path, "in.txt", line + "\n")
    with pytest.raises(InputError) as info:
        convert_trace(fmt, src, tmp_path / "t.parquet")
    assert f"line 1: {reason}" in str(info.value)


def test_skip_bad_counts_and_reports_the_first(tmp_path):
    src = write(tmp_path, "in.txt",
                "I  1000,4\nhello\n S 2000,8\n L 3000,0\nworld\n M 1008,2\n")
    out = tmp_path / "t.parquet"
    result = convert_trace("lackey", src, out, skip_bad=True, chunk_lines=2)
    assert result.bad_lines == 3 and result.first_bad_line == 2
    assert result.first_bad_reason.startswith("not a lackey record")
    assert rows(out) == [(0x0000, 4, 0, X, 1), (0x1000, 8, 0, W, 3),
                         (0x0008, 2, 0, R, 6), (0x0008, 2, 0, W, 6)]


@pytest.mark.parametrize("fmt, text", [
    ("lackey", ""),
    ("lackey", "==1== Lackey\n==1== \n"),
    ("pinatrace", "#\n#eof\n"),
    ("drmemtrace", "Output format:\n        1: T5 <marker: version 4>\n"),
    ("csv", "addr,size\n"),
])
def test_no_accesses(tmp_path, fmt, text):
    src = write(tmp_path, "in.txt", text)
    with pytest.raises(InputError, match=rf"^convert: no accesses in {src}$"):
        convert_trace(fmt, src, tmp_path / "t.parquet")
    assert os.listdir(tmp_path) == ["in.txt"]


def test_all_lines_bad_with_skip_bad_is_no_accesses(tmp_path):
    src = write(tmp_path, "in.txt", "junk\nmore junk\n")
    with pytest.raises(InputError, match=r"no accesses in .*\(2 malformed lines skipped\)"):
        convert_trace("lackey", src, tmp_path / "t.parquet", skip_bad=True)


def test_bad_arguments(tmp_path):
    src = write(tmp_path, "in.txt", "I  1000,4\n")
    with pytest.raises(InputError, match="unknown format 'valgrind'"):
        convert_trace("valgrind", src, tmp_path / "t.parquet")
    with pytest.raises(InputError, match="--page-size: page size must be a power of two"):
        convert_trace("lackey", src, tmp_path / "t.parquet", page_size=3000)
    with pytest.raises(InputError, match="--page-size"):
        convert_trace("lackey", src, tmp_path / "t.parquet", page_size=2048)
    with pytest.raises(InputError, match="--out: unknown output format"):
        convert_trace("lackey", src, tmp_path / "t.csv")
    with pytest.raises(InputError, match="--mapping-out: .* is the same file as --out"):
        convert_trace("lackey", src, tmp_path / "t.parquet", mapping_out=tmp_path / "t.parquet")
    same = write(tmp_path, "in.parquet", "I  1000,4\n")
    with pytest.raises(InputError, match="--out: .* is the same file as IN"):
        convert_trace("lackey", same, same)
    same.unlink()
    with pytest.raises(InputError, match="convert: no such file"):
        convert_trace("lackey", tmp_path / "missing.txt", tmp_path / "t.parquet")
    assert os.listdir(tmp_path) == ["in.txt"]


# ---------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("fmt, path", [
    ("lackey", LACKEY), ("pinatrace", PIN_MANUAL), ("pinatrace", PIN_SIZED),
    ("drmemtrace", DRMEMTRACE), ("csv", CSV)])
@pytest.mark.parametrize("chunk_lines", [1, 3, 64])
def test_chunk_boundaries_change_nothing(tmp_path, fmt, path, chunk_lines):
    whole, chunked = tmp_path / "whole.parquet", tmp_path / "chunked.parquet"
    convert_trace(fmt, path, whole)
    convert_trace(fmt, path, chunked, chunk_lines=chunk_lines)
    assert read(chunked).equals(read(whole))
    assert read(default_mapping_path(chunked)).equals(read(default_mapping_path(whole)))
    lines = len(path.read_text().splitlines())
    if chunk_lines < lines:
        assert pq.ParquetFile(chunked).num_row_groups > 1  # really written batch by batch


def test_first_touch_order_across_chunks(tmp_path):
    # Page 0x5 first seen in chunk 1, page 0x3 in chunk 2, then 0x5 again in chunk 3.
    src = write(tmp_path, "in.txt", " S 5010,8\n S 5020,8\n S 3ff8,16\n L 5030,8\n")
    out = tmp_path / "t.parquet"
    convert_trace("lackey", src, out, chunk_lines=2)
    assert rows(out) == [(0x0010, 8, 0, W, 1), (0x0020, 8, 0, W, 2),
                         (0x1FF8, 8, 0, W, 3), (0x2000, 8, 0, W, 3),
                         (0x0030, 8, 0, R, 4)]
    assert mapping_rows(default_mapping_path(out)) == [(0x5, 0), (0x3, 1), (0x4, 2)]


def test_compressed_inputs(tmp_path):
    text = LACKEY.read_bytes()
    plain = tmp_path / "plain.parquet"
    convert_trace("lackey", LACKEY, plain)
    for name, data in (("in.gz", gzip.compress(text)), ("in.bz2", bz2.compress(text))):
        src = tmp_path / name
        src.write_bytes(data)
        out = tmp_path / f"{name}.parquet"
        convert_trace("lackey", src, out)
        assert read(out).equals(read(plain))
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(gzip.compress(text)[:-40])
    with pytest.raises(InputError, match="cannot read"):
        convert_trace("lackey", truncated, tmp_path / "cut.parquet")
    assert not (tmp_path / "cut.parquet").exists()


# ------------------------------------------------------------------------------ mapping

def test_mapper_split_and_translate_directly():
    mapper = PageMapper(4096)
    addr = np.array([0x7000_0FFE, 0x1234, 0x7000_0000 + 4096 * 3 + 10], dtype=np.uint64)
    size = np.array([4, 4096, 2], dtype=np.uint16)
    seq = np.array([1, 2, 3], dtype=np.uint64)
    a, s, q = mapper.split(addr, size, seq)
    assert a.tolist() == [0x7000_0FFE, 0x7000_1000, 0x1234, 0x2000, 0x7000_300A]
    assert s.tolist() == [2, 2, 0x1000 - 0x234, 0x234, 2]
    assert q.tolist() == [1, 1, 2, 2, 3]
    gpa = mapper.translate(a)
    assert gpa.tolist() == [0x0FFE, 0x1000, 0x2234, 0x3000, 0x400A]
    assert len(mapper) == 5 and mapper.memory_bytes == 5 * 4096


def test_huge_page_size_keeps_pages_whole(tmp_path):
    src = write(tmp_path, "in.txt",
                " S 7f0000201000,8\n S 7f0000000ff8,16\n S 7f00003ffffc,8\n")
    out = tmp_path / "t.parquet"
    result = convert_trace("lackey", src, out, page_size=2 << 20)
    two_mib = 2 << 20
    # 2 MiB virtual pages: 0x7f0000200000 -> frame 0 (gfn 0), 0x7f0000000000 -> frame 1
    # (gfn 512); the 4 KiB crossing at 0x...0ff8 is NOT split, the 2 MiB one at 0x...3ffffc is.
    assert rows(out) == [
        (0x1000, 8, 0, W, 1),
        (two_mib + 0xFF8, 16, 0, W, 2),
        (0x1FFFFC, 4, 0, W, 3), (two_mib * 2, 4, 0, W, 3),
    ]
    assert mapping_rows(default_mapping_path(out)) == [
        (0x7F0000200000 // two_mib, 0), (0x7F0000000000 // two_mib, 512),
        (0x7F0000400000 // two_mib, 1024)]
    assert result.memory_bytes == 3 * two_mib and result.replay_memory() == 6 << 20
    assert read_mapping(default_mapping_path(out)).page_size == two_mib


def test_mapping_round_trip_matches_every_access(tmp_path):
    out = tmp_path / "t.parquet"
    convert_trace("pinatrace", PIN_MANUAL, out)
    mapping = read_mapping(default_mapping_path(out))
    assert mapping.page_size == 4096
    # Every converted gpa is the virtual address moved through the saved mapping.
    text = [line.split() for line in PIN_MANUAL.read_text().splitlines()
            if not line.startswith("#")]
    vaddrs = [int(fields[2], 16) for fields in text]
    seqs = [i + 5 for i in range(len(text))]
    by_seq = {}
    for gpa, _size, _vcpu, _kind, seq in rows(out):
        by_seq.setdefault(seq, gpa)  # the first piece starts at the virtual address
    expected = mapping.gpa(np.array(vaddrs, dtype=np.uint64), "t", str)
    assert [by_seq[s] for s in seqs] == expected.tolist()


def test_translate_protection_byte_ranges_and_maps(tmp_path):
    out = tmp_path / "t.parquet"
    convert_trace("pinatrace", PIN_MANUAL, out)
    mapping = default_mapping_path(out)
    # A hook on the stack slot written at line 5 and one on the heap word of line 15.
    ranges = ByteRanges(gpa=np.array([0x7FFD2C81A6F8, 0x55D1A3E02010], dtype=np.uint64),
                        length=np.array([8, 16], dtype=np.uint32), name=["ret", "heap"])
    moved = translate_protection(mapping, ranges)
    assert isinstance(moved, ByteRanges)
    assert moved.gpa.tolist() == [0x06F8, 0x4010]
    assert moved.length.tolist() == [8, 16] and moved.name == ["ret", "heap"]
    # Tuples work too.
    assert translate_protection(mapping, [(0x7F3C1E8C7A40, 8)]).gpa.tolist() == [0x2A40]
    # Access maps by virtual page number (vaddr >> 12).
    maps = AccessMaps(gfn=np.array([0x7FFD2C81B, 0x7F3C1E8C6], dtype=np.uint64),
                      access=np.array([0, 0xFFFF0000], dtype=np.uint32))
    moved = translate_protection(mapping, maps)
    assert moved.gfn.tolist() == [3, 1] and moved.access.tolist() == [0, 0xFFFF0000]
    # A page the trace never touched has no guest-physical place.
    with pytest.raises(InputError, match=r"range at row 1 \(address 0x1000\) is on virtual "
                                         r"page 0x1 .* never touched"):
        translate_protection(mapping, [(0x7FFD2C81A6F8, 8), (0x1000, 8)])
    with pytest.raises(InputError, match="crosses a 4 KiB page boundary"):
        translate_protection(mapping, [(0x7FFD2C81AFFC, 8)])


def test_translate_protection_from_files(tmp_path):
    # Kernel-style 64-bit virtual addresses, and a protection file to translate.
    src = write(tmp_path, "k.txt", " S ffff888000123040,8\n S ffff888000ab1000,8\n")
    out = tmp_path / "t.parquet"
    convert_trace("lackey", src, out)
    virtual = write(tmp_path, "hooks.csv",
                    "gpa,length,name\n0xffff888000123040,16,cred\n0xffff888000ab1ff0,16,ops\n")
    moved = translate_protection(default_mapping_path(out), virtual)
    assert moved.gpa.tolist() == [0x0040, 0x1FF0] and moved.name == ["cred", "ops"]
    # The result is a valid guest-physical protection: write it and read it back.
    table = pa.table({"gpa": pa.array(moved.gpa), "length": pa.array(moved.length),
                      "name": pa.array(moved.name)})
    pq.write_table(table, tmp_path / "p.parquet")
    back = read_protection(tmp_path / "p.parquet")
    assert back.gpa.tolist() == [0x0040, 0x1FF0]
    maps = write(tmp_path, "maps.csv", "gfn,access\n0xffff888000ab1,0\n")
    assert translate_protection(default_mapping_path(out), maps).gfn.tolist() == [1]
    with pytest.raises(InputError, match="expected gfn and access"):
        translate_protection(default_mapping_path(out), write(tmp_path, "x.csv", "a,b\n1,2\n"))


def test_read_mapping_errors(tmp_path):
    bad = tmp_path / "m.parquet"
    pq.write_table(pa.table({"vpage": pa.array([1], pa.uint64())}), bad)
    with pytest.raises(InputError, match="no column gfn"):
        read_mapping(bad)
    twice = tmp_path / "twice.parquet"
    pq.write_table(pa.table({"vpage": pa.array([1, 1], pa.uint64()),
                             "gfn": pa.array([0, 1], pa.uint64())}), twice)
    with pytest.raises(InputError, match="maps virtual page 0x1 twice"):
        read_mapping(twice)


# ------------------------------------------------------------------------------- replay

@pytest.mark.parametrize("fmt, path, vcpus", [
    ("lackey", LACKEY, 1), ("pinatrace", PIN_MANUAL, 1), ("pinatrace", PIN_SIZED, 1),
    ("drmemtrace", DRMEMTRACE, 2), ("csv", CSV, 2)])
def test_converted_traces_replay(tmp_path, fmt, path, vcpus):
    out = tmp_path / "t.parquet"
    result = convert_trace(fmt, path, out)
    assert result.vcpus == vcpus
    assert sum(len(batch) for batch in open_trace(out)) == result.accesses
    res = replay(sppjit.VM(memory="64MiB", vcpus=vcpus), str(out))
    counts = res.summary["counts"]
    assert counts["accesses"] == result.accesses == counts["allowed"]
    # Every mapped page faults in once (EPT violation), nothing else exits.
    assert res.summary["exits"]["ept_fault"] == result.pages
    assert res.table.column("seq").to_pylist() == read(out).column("seq").to_pylist()


def test_protection_by_virtual_address_replays(tmp_path):
    """The point of the mapping: protect by virtual address, replay the converted trace."""
    out = tmp_path / "t.parquet"
    convert_trace("pinatrace", PIN_MANUAL, out)
    # Hook the 8-byte stack slot 0x7ffd2c81a6f8 (written at line 5, read at line 10).
    hooks = translate_protection(default_mapping_path(out), [(0x7FFD2C81A6F8, 8, "slot")])
    assert hooks.gpa.tolist() == [0x6F8]
    vm = sppjit.VM(memory="64MiB")
    maps = ranges_to_maps(hooks)
    vm.protect(maps.gfn, maps.access)
    res = replay(vm, str(out), hooks=hooks)
    exits = [e for e in res.exits.to_pylist() if e["kind"] == "spp_violation"]
    # The write of line 5 (row 0) hits the slot; the writes of lines 6, 7 and 17 (rows 1, 2
    # and 13) land in the same 128-byte sub-page (0x680..0x6ff) but outside the slot.
    assert [(e["row"], e["relevant"], e["hook"]) for e in exits] == [
        (0, True, "slot"), (1, False, None), (2, False, None), (13, False, None)]
    assert res.summary["hooks"]["relevant"] == 1
    assert res.summary["hooks"]["irrelevant"] == 3


# ---------------------------------------------------------------------------------- CLI

def test_cli_convert_prints_one_line(tmp_path):
    out = tmp_path / "t.parquet"
    result = invoke("convert", "drmemtrace", DRMEMTRACE, "--out", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert f"wrote {out} (28 accesses, 1 split at a page boundary" in line
    assert "2 threads -> vCPUs 0..1" in line
    assert f"and {default_mapping_path(out)}" in line
    assert line.endswith(f"replay with: sppjit replay {out} --memory 1MiB --vcpus 2")
    assert out.exists() and Path(default_mapping_path(out)).exists()


def test_cli_mapping_out_and_page_size(tmp_path):
    out, mapping = tmp_path / "t.arrow", tmp_path / "map.parquet"
    result = invoke("convert", "lackey", LACKEY, "--out", out, "--mapping-out", mapping,
                    "--page-size", "2MiB")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["map.parquet", "t.arrow"]
    assert read_mapping(mapping).page_size == 2 << 20
    assert convert_command.parse_page_size("4K") == 4096
    assert convert_command.parse_page_size("1GiB") == 1 << 30
    with pytest.raises(InputError, match="--page-size: cannot parse"):
        convert_command.parse_page_size("huge")


def test_cli_malformed_exit_2_one_line_no_output(tmp_path):
    src = write(tmp_path, "in.txt", "I  1000,4\nnot lackey\n")
    result = invoke("convert", "lackey", src, "--out", tmp_path / "t.parquet")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"sppjit: error: convert: {src}, line 2: not a lackey record (\"I  addr,size\", "
        "\" L addr,size\", \" S addr,size\" or \" M addr,size\", address in hex): "
        "'not lackey' (--skip-bad skips such lines)"]
    assert os.listdir(tmp_path) == ["in.txt"]


def test_cli_skip_bad_reports_count(tmp_path):
    src = write(tmp_path, "in.txt", "I  1000,4\nnot lackey\n S 1000,8\nnor this\n")
    result = invoke("convert", "lackey", src, "--out", tmp_path / "t.parquet", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "skipped 2 malformed lines (first: line 2, not a lackey record" in result.stdout


def test_cli_bad_usage(tmp_path):
    src = write(tmp_path, "in.txt", "I  1000,4\n")
    result = invoke("convert", "valgrind", src, "--out", tmp_path / "t.parquet")
    assert result.exit_code == 2
    assert "unknown format 'valgrind' (one of lackey, pinatrace, drmemtrace, csv, qemu, gem5)" in \
        result.stderr
    result = invoke("convert", "lackey", src)
    assert result.exit_code == 2 and "--out" in result.stderr
    result = invoke("convert", "lackey", src, "--out", tmp_path / "t.parquet",
                    "--page-size", "5000")
    assert result.exit_code == 2 and "power of two" in result.stderr
    assert os.listdir(tmp_path) == ["in.txt"]


def test_cli_reads_standard_input(tmp_path):
    out = tmp_path / "t.parquet"
    result = invoke("convert", "pinatrace", "-", "--out", out,
                    input=PIN_MANUAL.read_text())
    assert result.exit_code == 0, result.output
    assert "converted standard input (pinatrace, 21 lines)" in result.stdout
    assert len(rows(out)) == 17


def test_cli_help():
    result = invoke("convert", "--help")
    assert result.exit_code == 0
    for word in ("lackey", "pinatrace", "drmemtrace", "csv", "--mapping-out", "--skip-bad",
                 "--page-size", "first-touch"):
        assert word in result.stdout
