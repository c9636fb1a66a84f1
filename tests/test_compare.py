"""``sppjit compare`` and sppjit.compare.compare, computed by hand.

The issue's case: one hook of 16 bytes at offset 120 of gfn 0x100 covers sub-pages 0 and 1
(bytes 0..255 write-protected under SPP, the whole page under page-granular protection).
Writes of 8 bytes at offsets 124 (inside the hook), 200 (sub-page 1, outside the hook) and
1000 (sub-page 7):

- page:    the first write maps the page (ept_fault), then all three exit (write_protect):
           relevant 1 (124), irrelevant 2 (200, 1000);
- spp_v4:  ept_fault, then 124 and 200 exit (spp_violation; relevant 1, irrelevant 1); 1000
           is allowed by SPP. v4 builds the SPPT on the EPT fault: 4 tables, no miss;
- spp_v12: the same, plus one spp_miss (v12 builds the SPPT lazily, on the first eligible
           write).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

import sppjit.cli as cli
from sppjit import compare as C
from sppjit.commands import compare as command
from sppjit.errors import InputError
from sppjit.io.protect import AccessMaps, ByteRanges

GFN = 0x100
PAGE = GFN << 12
HOOK = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                  length=np.array([16], dtype=np.uint32), name=["cred"])
OFFSETS = (124, 200, 1000)
KINDS = ("ept_fault", "mmio", "spp_miss", "spp_misconfig", "spp_violation", "write_protect",
         "wp_fault")


def writes(offsets, size=8, page=PAGE) -> dict:
    n = len(offsets)
    return {"gpa": np.array([page + o for o in offsets], dtype=np.uint64),
            "size": np.full(n, size, dtype=np.uint16), "kind": np.ones(n, dtype=np.uint8)}


def exits(**nonzero) -> dict:
    out = {kind: nonzero.get(kind, 0) for kind in KINDS}
    out["total"] = sum(out.values())
    return out


def by_name(document) -> dict:
    return {c["name"]: c for c in document["configs"]}


# ------------------------------------------------------------------------ hand-computed

@pytest.mark.parametrize("engine", ["jit", "reference"])
def test_issue_case_exact_counts_per_configuration(engine):
    doc = C.compare(writes(OFFSETS), HOOK, memory="16MiB", engine=engine)
    configs = by_name(doc)
    assert list(configs) == ["page", "spp_v4", "spp_v12"]
    assert doc["baseline"] == "page"
    page, v4, v12 = configs["page"], configs["spp_v4"], configs["spp_v12"]
    assert (page["granularity"], page["profile"]) == ("page", "v4")
    assert (v4["granularity"], v4["profile"], v12["profile"]) == ("spp", "v4", "v12")

    assert page["summary"]["exits"] == exits(ept_fault=1, write_protect=3)
    assert v4["summary"]["exits"] == exits(ept_fault=1, spp_violation=2)
    assert v12["summary"]["exits"] == exits(ept_fault=1, spp_miss=1, spp_violation=2)

    expect = {"page": (1, 2, 2 / 3), "spp_v4": (1, 1, 0.5), "spp_v12": (1, 1, 0.5)}
    for name, (relevant, irrelevant, noise) in expect.items():
        derived = configs[name]["derived"]
        assert derived["hooks"] == {"relevant": relevant, "irrelevant": irrelevant,
                                    "noise_ratio": pytest.approx(noise)}
        (hook,) = configs[name]["summary"]["hooks"]["per_hook"]
        assert hook == {"name": "cred", "relevant": relevant, "irrelevant": irrelevant,
                        "gpa": PAGE + 120, "length": 16}

    # exits avoided = page's protection exits (3) - this configuration's
    assert [configs[n]["derived"]["exits_avoided"] for n in configs] == [0, 1, 1]
    assert [configs[n]["derived"]["net_exits_avoided"] for n in configs] == [0, 1, 0]
    assert [configs[n]["derived"]["protection_exits"] for n in configs] == [3, 2, 2]
    assert [configs[n]["derived"]["exits_to_userspace"] for n in configs] == [3, 2, 2]
    assert [configs[n]["derived"]["exits_in_kernel"] for n in configs] == [1, 1, 2]
    assert [configs[n]["derived"]["protected_left_writable"] for n in configs] == [0, 0, 0]
    assert [configs[n]["derived"]["sppt_bytes"] for n in configs] == [0, 4 * 4096, 4 * 4096]
    assert configs["page"]["derived"]["exits_per_1000_writes"] == pytest.approx(4000 / 3)
    assert configs["spp_v4"]["derived"]["exits_per_1000_writes"] == pytest.approx(1000.0)
    # the write at offset 1000 goes through under SPP only
    assert v4["summary"]["counts"]["allowed"] == 1
    assert page["summary"]["counts"]["allowed"] == 0


def test_subpage_check_both_a_write_starting_before_the_hook():
    # A hook at offset 256 (sub-page 2). 8 bytes at 252 touch sub-pages 1 and 2 and the hook:
    # "all" exits (relevant), "first" checks sub-page 1 only and lets it through. 240 stays
    # in sub-page 1 (exits only under page protection); 300 is in sub-page 2, off the hook.
    hook = ByteRanges(gpa=np.array([PAGE + 256], dtype=np.uint64),
                      length=np.array([16], dtype=np.uint32), name=["h"])
    doc = C.compare(writes([252, 240, 300]), hook, memory="16MiB", subpage_check="both")
    configs = by_name(doc)
    assert list(configs) == ["page", "spp_v4_all", "spp_v4_first", "spp_v12_all",
                             "spp_v12_first"]
    assert [(c["subpage_check"]) for c in doc["configs"][1:]] == ["all", "first"] * 2
    got = {name: (c["summary"]["exits"]["spp_violation"] + c["summary"]["exits"]["write_protect"],
                  c["derived"]["hooks"]["relevant"], c["derived"]["hooks"]["irrelevant"],
                  c["derived"]["exits_avoided"])
           for name, c in configs.items()}
    assert got == {"page": (3, 1, 2, 0), "spp_v4_all": (2, 1, 1, 1), "spp_v4_first": (1, 0, 1, 2),
                   "spp_v12_all": (2, 1, 1, 1), "spp_v12_first": (1, 0, 1, 2)}


def test_per_hook_irrelevant_counts_every_hook_that_caused_the_exit():
    # Hooks a (sub-page 0) and b (sub-page 4) on one page; a write at offset 64 is in
    # sub-page 0 but off a: under page protection both hooks protect the page it hit, under
    # SPP only a protects its sub-page. The totals count the exit once.
    ranges = ByteRanges(gpa=np.array([PAGE + 512, PAGE], dtype=np.uint64),
                        length=np.array([8, 8], dtype=np.uint32), name=["b", "a"])
    doc = C.compare(writes([64]), ranges, memory="16MiB")
    for name, expect in (("page", {"a": 1, "b": 1}), ("spp_v4", {"a": 1, "b": 0}),
                         ("spp_v12", {"a": 1, "b": 0})):
        hooks = by_name(doc)[name]["summary"]["hooks"]
        assert hooks["irrelevant"] == 1
        assert {h["name"]: h["irrelevant"] for h in hooks["per_hook"]} == expect
    table = C.hooks_table(doc)
    assert table.column_names == ["hook", "page_relevant", "page_irrelevant",
                                  "spp_v4_relevant", "spp_v4_irrelevant", "spp_v12_relevant",
                                  "spp_v12_irrelevant", "gpa", "length"]
    assert table.column("hook").to_pylist() == ["a", "b"]  # by address
    assert table.column("page_irrelevant").to_pylist() == [1, 1]
    assert table.column("gpa").to_pylist() == [PAGE, PAGE + 512]


def test_huge_pages_v4_leaves_the_page_writable_v12_does_not():
    # v4 maps the 2 MiB region huge and leaves the protected gfn writable: no exits to avoid,
    # the protection is simply lost; v12 caps the mapping to 4 KiB.
    doc = C.compare(writes(OFFSETS), HOOK, memory="16MiB", hugepages=True)
    configs = by_name(doc)
    assert configs["spp_v4"]["derived"]["protected_left_writable"] == 1
    assert configs["spp_v4"]["derived"]["protection_exits"] == 0
    assert configs["spp_v12"]["derived"]["protected_left_writable"] == 0
    assert configs["spp_v12"]["derived"]["protection_exits"] == 2


# ------------------------------------------------------------------------ overhead arithmetic

def test_estimated_overhead_arithmetic():
    doc = C.compare(writes(OFFSETS), HOOK, memory="16MiB", exit_cost_us=10.0,
                    kernel_exit_cost_us=2.0)
    assert (doc["exit_cost_us"], doc["kernel_exit_cost_us"]) == (10.0, 2.0)
    configs = by_name(doc)
    # page: 3 exits to userspace x 10 us + 1 in-kernel x 2 us = 32 us over 3 accesses
    for name, micros in (("page", 3 * 10 + 1 * 2), ("spp_v4", 2 * 10 + 1 * 2),
                         ("spp_v12", 2 * 10 + 2 * 2)):
        derived = configs[name]["derived"]
        assert derived["overhead_seconds"] == pytest.approx(micros * 1e-6)
        assert derived["overhead_seconds_per_million_accesses"] == pytest.approx(micros / 3)


def test_derive_without_writes_or_baseline():
    summary = {"exits": exits(mmio=2), "counts": {"writes": 0, "accesses": 2},
               "pages": {"protected_left_writable": 0, "sppt_tables": 0}}
    derived = C.derive(summary, None, exit_cost_us=5.0, kernel_exit_cost_us=1.0)
    assert derived["exits_per_1000_writes"] is None
    assert derived["exits_avoided"] is None and derived["hooks"] is None
    assert derived["exits_to_userspace"] == 2  # MMIO exits go to userspace
    assert derived["overhead_seconds"] == pytest.approx(10e-6)
    assert derived["overhead_seconds_per_million_accesses"] == pytest.approx(5.0)


def test_default_costs_are_documented():
    assert C.DEFAULT_KERNEL_EXIT_COST_US < C.DEFAULT_EXIT_COST_US
    assert "inl_from_qemu" in C.__doc__ and "SplitX" in C.__doc__
    assert "inl_from_qemu" in command.HELP and "SplitX" in command.HELP


# ------------------------------------------------------------------------ API options

def test_access_maps_custom_configs_and_bad_configs():
    maps = AccessMaps(gfn=np.array([GFN], dtype=np.uint64),
                      access=np.array([0xFFFFFFFF & ~0b11], dtype=np.uint32))
    doc = C.compare(writes(OFFSETS), maps, memory="16MiB",
                    configs=[{"name": "v12", "profile": "v12"}, C.Config("v4")])
    assert [c["name"] for c in doc["configs"]] == ["v12", "v4"]
    assert doc["baseline"] is None
    assert all(c["derived"]["exits_avoided"] is None for c in doc["configs"])
    assert all(c["derived"]["hooks"] is None for c in doc["configs"])
    assert doc["protection"]["form"] == "access_maps"
    with pytest.raises(InputError, match="byte-range"):
        C.hooks_table(doc)
    with pytest.raises(InputError, match="distinct"):
        C.compare(writes(OFFSETS), maps, memory="16MiB", configs=[C.Config("x"), C.Config("x")])
    with pytest.raises(InputError, match="granularity"):
        C.compare(writes(OFFSETS), maps, memory="16MiB",
                  configs=[{"name": "x", "granularity": "4k"}])
    with pytest.raises(InputError, match="outside every memslot"):
        C.compare(writes(OFFSETS), maps, memory="512KiB")
    with pytest.raises(InputError, match="exit_cost_us"):
        C.compare(writes(OFFSETS), maps, memory="16MiB", exit_cost_us=math.inf)


def test_stream_is_read_once_and_replayed_per_configuration():
    table = pa.table(writes(OFFSETS))
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches())
    doc = C.compare(reader, HOOK, memory="16MiB")
    assert doc["input"]["rows"] == 3
    assert by_name(doc)["spp_v12"]["summary"]["exits"]["spp_violation"] == 2


def test_reproducibility_seed_versions_and_digests(tmp_path):
    schema = pa.schema([("gpa", pa.uint64()), ("size", pa.uint16())],
                       metadata={b"sppjit.seed": b"42", b"sppjit.scenario": b"hand"})
    data = writes(OFFSETS)
    trace = tmp_path / "t.parquet"
    pq.write_table(pa.table({"gpa": data["gpa"], "size": data["size"]}, schema=schema), trace)
    protect = tmp_path / "p.csv"
    protect.write_text(f"gpa,length,name\n{PAGE + 120},16,cred\n")
    doc = C.compare(str(trace), str(protect), memory="16MiB")
    assert doc["input"]["seed"] == 42 and doc["input"]["scenario"] == "hand"
    provenance = doc["provenance"]
    assert provenance["generator"] == {"scenario": "hand", "seed": 42}
    blake3 = pytest.importorskip("blake3").blake3  # the digest the summaries record
    assert provenance["digests"] == {
        "trace": "blake3:" + blake3(trace.read_bytes()).hexdigest(),
        "protect": "blake3:" + blake3(protect.read_bytes()).hexdigest()}
    assert set(provenance["versions"]) >= {"sppjit", "numba", "numpy", "pyarrow"}
    assert all(c["summary"]["provenance"] == provenance for c in doc["configs"])
    assert doc["protection"]["path"] == str(protect)
    assert doc["config"]["memory_bytes"] == 16 << 20
    assert [c["name"] for c in doc["config"]["configs"]] == ["page", "spp_v4", "spp_v12"]
    assert by_name(doc)["spp_v4"]["summary"]["exits"]["spp_violation"] == 2
    json.dumps(doc)  # plain JSON all the way down


@pytest.mark.parametrize("size", [0, 1, (1 << 23) * 2 + 5])
def test_file_digest_is_the_sha256_of_the_bytes(tmp_path, size):
    """Read in chunks (the largest size spans three, the last one short); SHA-256 on
    request, as summaries recorded it before BLAKE3 (tests/test_digest.py)."""
    from sppjit.provenance import CHUNK, file_digest

    assert CHUNK == 1 << 23
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_digest(path, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()


def test_parquet_directory_trace_is_read_per_configuration(tmp_path):
    data = writes(OFFSETS)
    directory = tmp_path / "trace"
    directory.mkdir()
    for i in range(3):  # one row per file
        pq.write_table(pa.table({k: v[i:i + 1] for k, v in data.items()}),
                       directory / f"part-{i}.parquet")
    doc = C.compare(str(directory), HOOK, memory="16MiB")
    assert doc["input"]["rows"] == 3
    assert doc["provenance"]["digests"]["trace"].startswith("blake3:")
    assert by_name(doc)["page"]["summary"]["exits"] == exits(ept_fault=1, write_protect=3)


# ------------------------------------------------------------------------ command line

runner = CliRunner()


def local_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """A group, so that compare stays a sub-command."""

    app.command("compare", help=command.HELP, epilog=command.EPILOG)(command.compare)
    return app


def project_app() -> typer.Typer:
    """sppjit's own app (its SppjitGroup maps errors to exit codes), with compare mounted."""
    if not any(c.name == "compare" for c in cli.app.registered_commands):
        cli.app.command("compare", no_args_is_help=True, help=command.HELP,
                        epilog=command.EPILOG)(command.compare)
    return cli.app


@pytest.fixture()
def files(tmp_path):
    data = writes(OFFSETS)
    trace = tmp_path / "t.parquet"
    pq.write_table(pa.table(data), trace)
    protect = tmp_path / "hooks.parquet"
    pq.write_table(pa.table({"gpa": pa.array([PAGE + 120], pa.uint64()),
                             "length": pa.array([16], pa.uint32()),
                             "name": ["cred"]}), protect)
    return tmp_path, trace, protect


def test_cli_json_parses(files):
    _, trace, protect = files
    result = runner.invoke(local_app(), ["compare", str(trace), "--protect", str(protect),
                                         "--memory", "16MiB", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"schema_version", "sppjit_version", "input", "protection", "exit_cost_us",
            "configs"} <= set(doc)
    assert doc["exit_cost_us"] == C.DEFAULT_EXIT_COST_US
    assert doc["input"]["format"] == "parquet" and doc["input"]["rows"] == 3
    assert doc["protection"]["path"] == str(protect)
    configs = by_name(doc)
    for config in doc["configs"]:
        assert set(config) == {"name", "profile", "granularity", "subpage_check", "summary",
                               "derived"}
    assert configs["page"]["summary"]["exits"] == exits(ept_fault=1, write_protect=3)
    assert configs["spp_v4"]["derived"]["exits_avoided"] == 1
    assert set(doc["provenance"]["digests"]) == {"trace", "protect"}

    slots = trace.parent / "slots.csv"
    slots.write_text("slot,base_gfn,npages\n0,0,4096\n")
    result = runner.invoke(local_app(), ["compare", str(trace), "--protect", str(protect),
                                         "--memslots", str(slots), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["provenance"]["digests"]) == {"trace", "protect", "memslots"}
    assert doc["config"]["memslots_file"] == str(slots)
    assert by_name(doc)["spp_v12"]["summary"]["exits"] == exits(ept_fault=1, spp_miss=1,
                                                                spp_violation=2)


def test_cli_table_summary_and_hooks_out(files):
    tmp, trace, protect = files
    summary, hooks = tmp / "s.json", tmp / "per-hook.parquet"
    result = runner.invoke(project_app(), [
        "compare", str(trace), "--protect", str(protect), "--memory", "16MiB",
        "--subpage-check", "both", "--exit-cost-us", "10", "--kernel-exit-cost-us", "2",
        "--summary", str(summary), "--hooks-out", str(hooks)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("page", "spp_v4_all", "spp_v12_first", "noise ratio", "exits avoided",
                 "SPPT memory", "16 KiB", "10 us to userspace"):
        assert text in out, text
    doc = json.loads(summary.read_text())
    assert [c["name"] for c in doc["configs"]] == ["page", "spp_v4_all", "spp_v4_first",
                                                   "spp_v12_all", "spp_v12_first"]
    assert by_name(doc)["page"]["derived"]["overhead_seconds"] == pytest.approx(32e-6)
    table = pq.read_table(hooks)
    assert table.column_names[0] == "hook"
    assert table.column("page_irrelevant").to_pylist() == [2]
    assert table.column("spp_v12_first_relevant").to_pylist() == [1]


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppjit: error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_bad_input_exits_2_with_one_line(files):
    tmp, trace, protect = files
    app = project_app()
    summary = tmp / "s.json"
    line = one_error_line(runner.invoke(app, [
        "compare", str(trace), "--protect", str(tmp / "missing.csv"), "--memory", "16MiB",
        "--summary", str(summary)]))
    assert "missing.csv" in line
    # gfn 0x100 lies beyond 512 KiB of memory
    line = one_error_line(runner.invoke(app, [
        "compare", str(trace), "--protect", str(protect), "--memory", "512KiB",
        "--summary", str(summary)]))
    assert "outside every memslot" in line
    slots = tmp / "slots.csv"
    slots.write_text("slot,base_gfn,npages\n0,0,256\n1,512,256\n")  # gfn 0x100 is a gap
    line = one_error_line(runner.invoke(app, [
        "compare", str(trace), "--protect", str(protect), "--memslots", str(slots)]))
    assert "0x100" in line
    one_error_line(runner.invoke(app, [
        "compare", str(trace), "--protect", str(protect), "--memory", "16MiB", "--memslots",
        str(slots)]))
    maps = tmp / "maps.csv"
    maps.write_text(f"gfn,access\n{GFN},{0xFFFFFFFC}\n")
    line = one_error_line(runner.invoke(app, [
        "compare", str(trace), "--protect", str(maps), "--memory", "16MiB", "--hooks-out",
        str(tmp / "h.parquet")]))
    assert "--hooks-out" in line
    one_error_line(runner.invoke(app, [
        "compare", str(trace), "--protect", str(protect), "--exit-cost-us", "-1"]))
    assert not summary.exists() and not (tmp / "h.parquet").exists()
