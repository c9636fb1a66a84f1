"""Memory layout files: slot order, formats and every layout error."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppjit.errors import InputError
from sppjit.io.memslots import read_memslots


def test_slots_come_back_in_slot_order_from_every_format(tmp_path):
    rows = [(2, 0x100000, 0x40000), (0, 0, 0xA0), (1, 0xC0, 0xFFF40)]
    expected = [(0, 0xA0), (0xC0, 0xFFF40), (0x100000, 0x40000)]
    (tmp_path / "m.csv").write_text(
        "slot,base_gfn,npages\n" + "".join(f"{s},{b:#x},{n}\n" for s, b, n in rows))
    (tmp_path / "m.json").write_text(
        json.dumps([{"slot": s, "base_gfn": b, "npages": n} for s, b, n in rows]))
    slot, base, npages = zip(*rows)
    pq.write_table(pa.table({"slot": list(slot), "base_gfn": pa.array(base, pa.uint64()),
                             "npages": pa.array(npages, pa.uint64())}), tmp_path / "m.parquet")
    for name in ("m.csv", "m.json", "m.parquet"):
        assert read_memslots(tmp_path / name) == expected


@pytest.mark.parametrize("rows, message", [
    ("0,0,16\n1,8,16\n", "memslots: slots 0 and 1 overlap (gfns 0x0..0xf and 0x8..0x17)"),
    ("5,0x100,16\n2,0x80,0x81\n", "memslots: slots 2 and 5 overlap (gfns 0x80..0x100 and "
                                  "0x100..0x10f)"),
    ("0,0,16\n3,0x100,0\n", "memslots: slot 3 has npages 0"),
    ("1,0,16\n1,0x100,16\n", "memslots: slot 1 is given twice"),
    ("0,0xFFFFFFFFF,2\n", "memslots: slot 0 (base_gfn 0xfffffffff, 2 pages) ends beyond the "
                          "48-bit guest-physical space"),
    ("0,0,16\n1,-5,16\n", "memslots: column 'base_gfn' has a negative value at row 1"),
    ("0,0,16\n1,,16\n", "memslots: column 'base_gfn' has a null at row 1"),
])
def test_layout_errors(rows, message, tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("slot,base_gfn,npages\n" + rows)
    with pytest.raises(InputError) as caught:
        read_memslots(path)
    assert str(caught.value) == message


def test_adjacent_slots_are_fine(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("slot,base_gfn,npages\n0,0,16\n1,16,16\n")
    assert read_memslots(path) == [(0, 16), (16, 16)]


def test_missing_columns_and_empty_layout(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("slot,base\n0,0\n")
    with pytest.raises(InputError, match=r"lacks column\(s\) base_gfn, npages"):
        read_memslots(path)
    path.write_text("slot,base_gfn,npages\n")
    with pytest.raises(InputError, match="defines no slots"):
        read_memslots(path)
