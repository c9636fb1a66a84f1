"""Timeline operations in a replay (docs/contract.md §4): --ops and replay(ops=...)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import sppjit
from sppjit.cli import app
from sppjit.replay import replay

G = 0x100  # the page the timeline protects
H = 0x480  # a page of the second memslot, which the timeline deletes
SLOTS = [(0, 0x400), (0x400, 0x400)]


def trace(n=40):
    rng = np.random.default_rng(5)
    gfn = rng.choice([G, G + 1, H], n)
    gpa = (gfn.astype(np.uint64) << np.uint64(12)) + (rng.integers(0, 512, n).astype(np.uint64) << np.uint64(3))
    return {"gpa": gpa, "kind": rng.choice([0, 1], n).astype(np.uint8), "size": np.full(n, 8, np.uint16)}


OPS = [
    {"at": 5, "op": "set_subpages", "gfn": G, "npages": 2, "access": 0},
    {"at": 12, "op": "zap", "gfn": G, "npages": 1},
    {"at": 12, "op": "remap", "gfn": H, "npages": 1},
    {"at": 20, "op": "set_subpages", "gfn": G, "npages": 1, "access": 0xFFFFFFFF},
    {"at": 30, "op": "delete_memslot", "gfn": H},
]


def vm(profile):
    v = sppjit.VM(memslots=SLOTS, profile=profile)
    v.init_spp()
    return v


@pytest.mark.filterwarnings("ignore::UserWarning")  # v12 memslot-delete quirk
@pytest.mark.parametrize("profile", ["v4", "v12"])
@pytest.mark.parametrize("engine", ["jit", "reference"])
@pytest.mark.parametrize("batch_size", [7, 1000])
def test_timeline_equals_applying_ops_between_pieces(profile, engine, batch_size):
    t = trace()
    got = replay(vm(profile), t, engine=engine, batch_size=batch_size, ops=OPS)

    manual = vm(profile)
    cuts = [0, 5, 12, 20, 30, 40]
    outcomes, exits = [], []
    for a, b in zip(cuts, cuts[1:]):
        for op in OPS:
            if op["at"] == a:
                manual.apply(op)
        piece = {k: v[a:b] for k, v in t.items()}
        res = replay(manual, piece, engine=engine)
        outcomes += res.table["outcome"].to_pylist()
        exits += [(r["row"] + a, r["kind"], r["reason"]) for r in res.exits.to_pylist()]
    assert got.table["outcome"].to_pylist() == outcomes
    assert [(r["row"], r["kind"], r["reason"]) for r in got.exits.to_pylist()] == exits
    assert got.summary["ops"] == {"count": len(OPS), "applied": len(OPS)}
    # the page protected at row 5 blocks writes from then until row 20 unprotects it
    out = got.table["outcome"].to_pylist()
    kinds, gpas = t["kind"], t["gpa"] >> np.uint64(12)
    for i in range(40):
        if kinds[i] == 1 and gpas[i] == G:
            assert (out[i] == 1) == (5 <= i < 20), i


def test_cli_ops_file(tmp_path):
    t = trace()
    pq.write_table(pa.table(t), tmp_path / "t.parquet")
    (tmp_path / "ops.csv").write_text(
        "at,op,gfn,npages,access\n" + "\n".join(
            f"{o['at']},{o['op']},{o['gfn']:#x},{o.get('npages', 1)},{o.get('access', '')}" for o in OPS))
    (tmp_path / "slots.csv").write_text("slot,base_gfn,npages\n0,0,1024\n1,1024,1024\n")
    r = CliRunner().invoke(app, ["replay", str(tmp_path / "t.parquet"), "--memslots",
                                 str(tmp_path / "slots.csv"), "--ops", str(tmp_path / "ops.csv"),
                                 "--json", "--out", str(tmp_path / "r.parquet")])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    want = replay(vm("v4"), t, ops=OPS)
    assert pq.read_table(tmp_path / "r.parquet")["outcome"].to_pylist() == want.table["outcome"].to_pylist()
    assert summary["exits"] == want.summary["exits"]


@pytest.mark.parametrize("text, message", [
    ("at,op,gfn\n0,explode,1\n", "column 'op' has value 'explode' at row 0"),
    ("at,op,gfn\n0,set_subpages,1\n", "column 'access'"),
    ("op,gfn\nzap,1\n", "lacks column 'at'"),
])
def test_cli_bad_ops_file(tmp_path, text, message):
    pq.write_table(pa.table({"gpa": np.array([0], np.uint64)}), tmp_path / "t.parquet")
    (tmp_path / "ops.csv").write_text(text)
    r = CliRunner().invoke(app, ["replay", str(tmp_path / "t.parquet"), "--ops", str(tmp_path / "ops.csv"),
                                 "--out", str(tmp_path / "r.parquet")])
    assert r.exit_code == 2
    assert message in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "r.parquet").exists()
