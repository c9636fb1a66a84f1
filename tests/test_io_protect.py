"""Protection files: every format, both forms, each error, runs and hvmi's range-to-map rule."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from sppjit.errors import InputError
from sppjit.io.protect import AccessMaps, ByteRanges, ranges_to_maps, read_protection, runs

GFNS = [0x100, 0x101, 0x7, 0xFFFFF]
ACCESS = [0xFFFF0000, 0x0, 0xFFFFFFFF, 0x5]


def maps_table() -> pa.Table:
    return pa.table({"gfn": pa.array(GFNS, pa.uint64()), "access": pa.array(ACCESS, pa.uint32())})


def write_maps(kind: str, path) -> None:
    """The access maps GFNS/ACCESS written as ``kind``."""
    rows = list(zip(GFNS, ACCESS))
    if kind == "parquet":
        pq.write_table(maps_table(), path)
    elif kind == "arrow_file":
        with ipc.new_file(str(path), maps_table().schema) as writer:
            writer.write_table(maps_table())
    elif kind == "arrow_stream":
        with ipc.new_stream(str(path), maps_table().schema) as writer:
            writer.write_table(maps_table())
    elif kind == "csv_decimal":
        path.write_text("gfn,access\n" + "".join(f"{g},{a}\n" for g, a in rows))
    elif kind == "csv_hex":
        path.write_text("gfn,access\n" + "".join(f"{g:#x},{a:#X}\n" for g, a in rows))
    elif kind == "csv_mixed":  # one column in both spellings
        path.write_text("gfn,access\n" + "".join(
            f"{g},{a if i % 2 else hex(a)}\n" for i, (g, a) in enumerate(rows)))
    elif kind == "json_array":
        path.write_text(json.dumps([{"gfn": g, "access": hex(a)} for g, a in rows]))
    elif kind == "json_lines":
        path.write_text("".join(json.dumps({"gfn": g, "access": a}) + "\n" for g, a in rows))
    elif kind == "json_lines_mixed":
        path.write_text("".join(
            json.dumps({"gfn": g, "access": a if i % 2 else hex(a)}) + "\n\n"
            for i, (g, a) in enumerate(rows)))
    else:
        raise AssertionError(kind)


KINDS = ["parquet", "arrow_file", "arrow_stream", "csv_decimal", "csv_hex", "csv_mixed",
         "json_array", "json_lines", "json_lines_mixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_access_maps_read_the_same_from_every_format(kind, tmp_path):
    # Neutral extension: the content decides the format.
    path = tmp_path / ("maps.csv" if kind.startswith("csv") else "maps.data")
    write_maps(kind, path)
    maps = read_protection(path)
    assert isinstance(maps, AccessMaps)
    assert maps.gfn.dtype == np.uint64 and maps.access.dtype == np.uint32
    assert maps.gfn.tolist() == GFNS and maps.access.tolist() == ACCESS


def test_byte_ranges_with_names(tmp_path):
    path = tmp_path / "hooks.csv"
    path.write_text("gpa,length,name\n0x1f00,16,GetCpuClock\n0x5000,4096,hal\n8200,1,\n")
    ranges = read_protection(path)
    assert isinstance(ranges, ByteRanges)
    assert ranges.gpa.tolist() == [0x1F00, 0x5000, 8200] and ranges.gpa.dtype == np.uint64
    assert ranges.length.tolist() == [16, 4096, 1] and ranges.length.dtype == np.uint32
    assert ranges.name[:2] == ["GetCpuClock", "hal"]


def test_byte_ranges_without_names_and_numeric_names(tmp_path):
    (tmp_path / "a.json").write_text('[{"gpa": 4096, "length": 8}]')
    assert read_protection(tmp_path / "a.json").name == [None]
    (tmp_path / "b.csv").write_text("gpa,length,name\n4096,8,17\n")
    assert read_protection(tmp_path / "b.csv").name == ["17"]


@pytest.mark.parametrize("header, found", [
    ("gfn,length", "columns gfn, length"),
    ("gfn,access,gpa,length", "both forms' columns"),
])
def test_unknown_form_names_what_was_found(header, found, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(header + "\n" + ",".join(["1"] * len(header.split(","))) + "\n")
    with pytest.raises(InputError) as caught:
        read_protection(path)
    assert str(caught.value).startswith(f"protection: {path} has {found}; expected gfn and access")


@pytest.mark.parametrize("text, message", [
    ("gfn,access\n1,0\n2,\n", "protection: column 'access' has a null at row 1"),
    ("gfn,access\n1,0\n-2,0\n", "protection: column 'gfn' has a negative value at row 1"),
    ("gfn,access\n1,0\n2,-0x10\n", "protection: column 'access' has a negative value at row 1"),
    ("gfn,access\n1,0\n2,0\n3,0x100000000\n",
     "protection: column 'access' has value 4294967296 at row 2 (must fit 32 bits, "
     "at most 0xFFFFFFFF)"),
    ("gfn,access\n1,0\n2,0xZZ\n",
     "protection: column 'access' has value '0xZZ' at row 1, not a decimal or 0x-hex integer"),
    ("gfn,access\n1,1.5\n", "protection: column 'access' has type double, "
                            "expected an unsigned integer"),
    ("gpa,length\n0x1000,8\n0x2000,0\n",
     "protection: column 'length' has value 0 at row 1 (must be 1..4096)"),
    ("gpa,length\n0x1000,8\n0x1000000000000,8\n",
     "protection: column 'gpa' has value 281474976710656 at row 1 "
     "(beyond the 48-bit guest-physical space)"),
    ("gpa,length\n0x1000,8\n0x1000,8\n0x1000,8\n0x1f80,256\n",
     "protection: range at row 3 (gpa 0x1f80, length 256) crosses a 4 KiB page boundary"),
])
def test_bad_rows_are_named(text, message, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        read_protection(path)
    assert str(caught.value) == message


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="protection: no such file: "):
        read_protection(tmp_path / "none.csv")
    (tmp_path / "bad.json").write_text('[{"gfn": 1, "access": 2},')
    with pytest.raises(InputError, match="protection: cannot read .*bad.json: "):
        read_protection(tmp_path / "bad.json")
    pq.write_table(maps_table(), tmp_path / "cut.parquet")
    data = (tmp_path / "cut.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="protection: cannot read .*cut.parquet: "):
        read_protection(tmp_path / "cut.parquet")


# --------------------------------------------------------------------------- ranges_to_maps

def byte_ranges(pairs) -> ByteRanges:
    gpa, length = zip(*pairs)
    return ByteRanges(gpa=np.array(gpa, np.uint64), length=np.array(length, np.uint32),
                      name=[None] * len(pairs))


def test_a_16_byte_hook_at_offset_120_covers_two_subpages():
    maps = ranges_to_maps(byte_ranges([(0x5000 + 120, 16)]))
    assert maps.gfn.tolist() == [5] and maps.access.tolist() == [0xFFFFFFFC]
    assert maps.access.dtype == np.uint32


def test_whole_page_and_last_byte():
    maps = ranges_to_maps(byte_ranges([(0x3000, 4096), (0x4FFF, 1)]))
    assert maps.gfn.tolist() == [3, 4] and maps.access.tolist() == [0, 0x7FFFFFFF]


def hvmi_reference(pairs) -> dict[int, int]:
    """hook_gpa.c as written: per-page counts per 128 B sub-page, a bit cleared at 0 -> 1."""
    counts: dict[int, list[int]] = {}
    for gpa, length in pairs:
        page, offset = gpa >> 12, gpa & 0xFFF
        count = counts.setdefault(page, [0] * 32)
        for subpage in range(offset // 128, -(-(offset + length) // 128)):
            count[subpage] += 1
    return {page: sum(1 << i for i in range(32) if not c[i]) for page, c in counts.items()}


def test_overlapping_ranges_are_reference_counted_like_hvmi():
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(400):
        page = int(rng.integers(0, 40))
        offset = int(rng.integers(0, 4096))
        pairs.append(((page << 12) + offset, int(rng.integers(1, 4096 - offset + 1))))
    pairs += [(0x1000 + 8, 8), (0x1000 + 12, 8), (0x1000 + 130, 1)]  # shared sub-page 0
    maps = ranges_to_maps(byte_ranges(pairs))
    expected = hvmi_reference(pairs)
    assert maps.gfn.tolist() == sorted(expected)
    assert maps.access.tolist() == [expected[page] for page in sorted(expected)]


def test_no_ranges_give_no_maps():
    maps = ranges_to_maps(ByteRanges(np.zeros(0, np.uint64), np.zeros(0, np.uint32), []))
    assert maps.gfn.size == 0 and maps.access.size == 0


# --------------------------------------------------------------------------- runs

def as_lists(result):
    return [(base, values.tolist()) for base, values in result]


def test_runs_split_at_gaps_and_at_max_pages():
    gfns = [10, 11, 12, 13, 14, 20, 21, 30]
    values = [1, 2, 3, 4, 5, 6, 7, 8]
    assert as_lists(runs(gfns, values, 512)) == [(10, [1, 2, 3, 4, 5]), (20, [6, 7]), (30, [8])]
    assert as_lists(runs(gfns, values, 2)) == [
        (10, [1, 2]), (12, [3, 4]), (14, [5]), (20, [6, 7]), (30, [8])]
    assert all(values.dtype == np.uint32 for _, values in runs(gfns, values, 2))


def test_runs_sort_first():
    assert as_lists(runs([5, 3, 4, 9], [50, 30, 40, 90], 8)) == [(3, [30, 40, 50]), (9, [90])]
    assert runs([], [], 4) == []


def test_runs_refuse_a_gfn_given_twice():
    with pytest.raises(InputError) as caught:
        runs([7, 0x42, 3, 0x42], [0, 1, 2, 3], 8)
    assert str(caught.value) == "protection: gfn 0x42 is given twice (rows 1 and 3)"


def test_access_map_file_to_runs(tmp_path):
    path = tmp_path / "maps.csv"
    path.write_text("gfn,access\n0x11,1\n0x10,0\n0x12,2\n0x20,3\n")
    maps = read_protection(path)
    assert as_lists(runs(maps.gfn, maps.access, 2)) == [(0x10, [0, 1]), (0x12, [2]), (0x20, [3])]
