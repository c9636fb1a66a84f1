"""sppjit compare for the people it is for: relative savings, protection exits per 1,000
writes, readable units, configurations and protections chosen by the user, the price of
letting a write through, and the notes on why v4 and v12 differ.

The figures of the comparison are checked against figures derived here, independently, from
the exit log of a separate replay of each configuration (sppjit.VM.replay): the count of
protection exits (spp_violation, write_protect) in the log, the writes of the trace, and
their ratios.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import sppjit
from datasets.scenarios import kernel_guard
from sppjit import compare as C
from sppjit.cli import app
from sppjit.errors import InputError
from sppjit.io.protect import ByteRanges, ranges_to_maps
from sppjit.summary import (
    CompareDocument,
    format_comparison,
    percent_change,
    readable_seconds,
    readable_size,
)

runner = CliRunner()
PROTECTION_KINDS = ("spp_violation", "write_protect")
USERSPACE_KINDS = ("mmio", "spp_misconfig", "spp_violation", "write_protect")
GFN = 0x100
PAGE = GFN << 12


@pytest.fixture(scope="module")
def guard():
    """A small kernel-guard trace (hooks on kernel structures, 2 vCPUs) and its hooks."""
    s = kernel_guard(4000, seed=7, vcpus=2, structures=60)
    trace = pa.table(s.columns())
    hooks = ByteRanges(gpa=np.asarray(s.hook_gpa, dtype=np.uint64),
                       length=np.asarray(s.hook_length, dtype=np.uint32),
                       name=list(s.hook_name))
    return trace, hooks


def write_protection(ranges: ByteRanges, path: str) -> None:
    pq.write_table(pa.table({"gpa": pa.array(ranges.gpa, pa.uint64()),
                             "length": pa.array(ranges.length, pa.uint32()),
                             "name": pa.array(list(ranges.name), pa.string())}), path)


def replay_alone(trace, protection, *, granularity, profile, subpage_check="all",
                 memory="2GiB", vcpus=2, hugepages=False):
    """One configuration replayed on its own VM: its exit log, as a list of kinds."""
    vm = sppjit.VM(memory=memory, vcpus=vcpus, profile=profile, granularity=granularity,
                   subpage_check=subpage_check, hugepages=hugepages)
    maps = ranges_to_maps(protection) if isinstance(protection, ByteRanges) else protection
    vm.protect(maps.gfn, maps.access)
    result = vm.replay(trace)
    return result.exits.column("kind").to_pylist()


def figures_from_log(kinds: list[str], writes: int) -> dict:
    protection = sum(k in PROTECTION_KINDS for k in kinds)
    userspace = sum(k in USERSPACE_KINDS for k in kinds)
    return {"exits": len(kinds), "protection": protection,
            "per_1000": 1000.0 * protection / writes,
            "overhead": (userspace * 3.0 + (len(kinds) - userspace) * 1.0) * 1e-6}


# ------------------------------------------------------------------ savings and per 1,000

def test_savings_and_per_1000_writes_match_the_exit_logs(guard):
    trace, hooks = guard
    doc = C.compare(trace, hooks, memory="2GiB", vcpus=2)
    writes = int(np.count_nonzero(trace.column("kind").to_numpy() == 1))
    settings = {"page": ("page", "v4"), "spp_v4": ("spp", "v4"), "spp_v12": ("spp", "v12")}
    logs = {name: figures_from_log(replay_alone(trace, hooks, granularity=g, profile=p), writes)
            for name, (g, p) in settings.items()}
    base = logs["page"]
    assert base["protection"] > 0 and logs["spp_v4"]["protection"] < base["protection"]
    printed = format_comparison(doc)
    for entry in doc["configs"]:
        name, d, log = entry["name"], entry["derived"], logs[entry["name"]]
        assert d["writes"] == writes
        assert d["exits"] == log["exits"]
        assert d["protection_exits"] == log["protection"]
        assert d["protection_exits_per_1000_writes"] == pytest.approx(log["per_1000"])
        assert d["overhead_seconds"] == pytest.approx(log["overhead"])
        change = d["change_vs_baseline"]
        assert change["exits"] == pytest.approx((log["exits"] - base["exits"]) / base["exits"])
        assert change["protection_exits"] == pytest.approx(
            (log["protection"] - base["protection"]) / base["protection"])
        assert change["overhead_seconds"] == pytest.approx(
            (log["overhead"] - base["overhead"]) / base["overhead"])
        if name != "page":
            line = (f"{name}: {percent_change(change['exits'])} exits "
                    f"({percent_change(change['protection_exits'])} protection exits), "
                    f"{percent_change(change['overhead_seconds'])} estimated overhead vs page")
            assert line in printed
    assert f"{logs['spp_v4']['per_1000']:,.1f}" in printed
    assert "per 1,000 writes" in printed


def test_percent_and_readable_forms():
    assert percent_change(-0.45) == "-45%"
    assert percent_change(-0.5149) == "-51%"
    assert percent_change(0.031) == "+3.1%"
    assert percent_change(0.0) == "0%"
    assert percent_change(None) == "-"
    assert readable_seconds(1.5) == "1.5 s"
    assert readable_seconds(0.0031) == "3.1 ms"
    assert readable_seconds(12e-6) == "12 us"
    assert readable_seconds(0) == "0"


# ------------------------------------------------------------------------------ units

@pytest.mark.parametrize("nbytes, text", [
    (1048 * 1024, "1.0 MiB"),  # the 1048KiB
    (1 << 20, "1 MiB"),
    (268 * 4096, "1.0 MiB"),
    (16 * 4096, "64 KiB"),
    (3 * (1 << 30) + (1 << 29), "3.5 GiB"),
    (150 * (1 << 20) + 4096, "150 MiB"),
    (512, "512 B"),
])
def test_readable_size(nbytes, text):
    assert readable_size(nbytes) == text


def test_printers_choose_the_unit_for_the_number():
    # Memory of 1 MiB + 4 KiB: exact forms would be 1028KiB; guest memory reads 1.0 MiB.
    trace = {"gpa": np.array([PAGE + 8], dtype=np.uint64), "kind": np.ones(1, dtype=np.uint8)}
    hook = ByteRanges(gpa=np.array([PAGE], dtype=np.uint64),
                      length=np.array([8], dtype=np.uint32), name=["h"])
    doc = C.compare(trace, hook, memslots=[(0, 257)])
    printed = format_comparison(doc)
    assert "1.0 MiB" in printed and "1028KiB" not in printed
    assert "16 KiB" in printed  # 4 SPPT tables
    vm = sppjit.VM(memslots=[(0, 257)])
    summary = vm.replay(trace).summary
    assert "1.0 MiB" in sppjit.summary.format_summary(summary)


# ----------------------------------------------------------------- configurations chosen

def test_configurations_given_as_sweep_specs(guard):
    trace, hooks = guard
    doc = C.compare(trace, hooks, memory="2GiB", vcpus=2,
                    configs=["v12,first", "granularity=page,name=base", "profile=v4"])
    assert [c["name"] for c in doc["configs"]] == ["spp_v12_first", "base", "spp_v4"]
    assert doc["baseline"] == "base"
    writes = int(np.count_nonzero(trace.column("kind").to_numpy() == 1))
    base = figures_from_log(replay_alone(trace, hooks, granularity="page", profile="v4"),
                            writes)
    first = figures_from_log(replay_alone(trace, hooks, granularity="spp", profile="v12",
                                          subpage_check="first"), writes)
    entry = doc["configs"][0]
    assert (entry["profile"], entry["subpage_check"]) == ("v12", "first")
    assert entry["derived"]["protection_exits"] == first["protection"]
    assert entry["derived"]["exits_avoided"] == base["protection"] - first["protection"]


@pytest.mark.parametrize("spec, message", [
    ("v4,hugepages", "hugepages is the same for every configuration"),
    ("vcpus=2", "vcpus is the same for every configuration"),
    ("profile=v9", "profile must be one of"),
    ("protect=none", "a comparison compares protections"),
])
def test_bad_configuration_specs(spec, message):
    trace = {"gpa": np.array([PAGE], dtype=np.uint64)}
    hook = ByteRanges(gpa=np.array([PAGE], dtype=np.uint64),
                      length=np.array([8], dtype=np.uint32), name=["h"])
    with pytest.raises(InputError, match=message):
        C.compare(trace, hook, memory="16MiB", configs=[spec])


# ------------------------------------------------------------- two protections side by side

def test_two_protections_side_by_side(guard, tmp_path):
    trace, hooks = guard
    half = len(hooks.name) // 2
    a = ByteRanges(gpa=hooks.gpa[:half], length=hooks.length[:half], name=hooks.name[:half])
    b = ByteRanges(gpa=hooks.gpa[half:], length=hooks.length[half:], name=hooks.name[half:])
    pa_, pb = tmp_path / "first.parquet", tmp_path / "second.parquet"
    write_protection(a, str(pa_))
    write_protection(b, str(pb))
    doc = C.compare(trace, [str(pa_), str(pb)], memory="2GiB", vcpus=2)
    names = [c["name"] for c in doc["configs"]]
    assert names == ["page@first", "page@second", "spp_v4@first", "spp_v4@second",
                     "spp_v12@first", "spp_v12@second"]
    assert [p["path"] for p in doc["protections"]] == [str(pa_), str(pb)]
    writes = int(np.count_nonzero(trace.column("kind").to_numpy() == 1))
    by_name = {c["name"]: c for c in doc["configs"]}
    for label, prot in (("first", a), ("second", b)):
        base = figures_from_log(replay_alone(trace, prot, granularity="page", profile="v4"),
                                writes)
        for name, (g, p) in {"page": ("page", "v4"), "spp_v12": ("spp", "v12")}.items():
            entry = by_name[f"{name}@{label}"]
            log = figures_from_log(replay_alone(trace, prot, granularity=g, profile=p), writes)
            assert entry["derived"]["protection_exits"] == log["protection"]
            assert entry["summary"]["config"]["protection"]["path"].endswith(f"{label}.parquet")
            # compared with the page configuration of the same protection
            assert entry["derived"]["exits_avoided"] == base["protection"] - log["protection"]
    assert by_name["spp_v4@second"]["baseline"] == "page@second"
    assert "baseline" not in by_name["spp_v4@first"]  # the document's baseline
    assert CompareDocument.from_dict(doc).to_dict() == doc

    pq.write_table(trace, tmp_path / "t.parquet")
    result = runner.invoke(app, ["compare", str(tmp_path / "t.parquet"), "--protect", str(pa_),
                                 "--protect", str(pb), "--memory", "2GiB", "--vcpus", "2"])
    assert result.exit_code == 0, result.output
    assert "page@second" in result.stdout and str(pb) in result.stdout
    assert "spp_v4@second: " in result.stdout and "vs page@second" in result.stdout


# ------------------------------------------------------------------ letting a write through

def test_mtf_extra_exits_are_the_models():
    """Single-stepping a protection exit's write: unprotect the page (set_subpages FULL),
    let the write run (the MTF exit follows it, not modelled: one exit to the monitor),
    re-protect, and write again. The exits the model takes on top of the protection exit
    itself are mtf_extra_exits' kernel exits."""
    protected, full = 0xFFFFFFFC, 0xFFFFFFFF
    write = {"gpa": np.array([PAGE + 8], dtype=np.uint64), "size": np.array([8], dtype=np.uint16),
             "kind": np.ones(1, dtype=np.uint8)}
    for granularity, profile in (("page", "v4"), ("spp", "v4"), ("spp", "v12")):
        vm = sppjit.VM(memory="16MiB", granularity=granularity, profile=profile)
        vm.init_spp()
        vm.set_subpages(GFN, [protected])
        vm.replay(write)  # maps the page; its protection exit
        first = vm.replay(write).exits.column("kind").to_pylist()
        assert first[-1] in PROTECTION_KINDS
        vm.set_subpages(GFN, [full])  # the monitor lets the write through
        through = vm.replay(write).exits.column("kind").to_pylist()
        vm.set_subpages(GFN, [protected])  # and protects the page again
        again = vm.replay(write).exits.column("kind").to_pylist()
        extra_kernel = len(through) + len(again) - 1  # the next protection exit is not extra
        assert again[-1] in PROTECTION_KINDS
        assert C.mtf_extra_exits(granularity, profile) == (1, extra_kernel), \
            (granularity, profile, through, again)


def test_write_through_prices():
    trace = {"gpa": np.array([PAGE + o for o in (124, 200, 1000)], dtype=np.uint64),
             "size": np.full(3, 8, dtype=np.uint16), "kind": np.ones(3, dtype=np.uint8)}
    hook = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                      length=np.array([16], dtype=np.uint32), name=["cred"])
    doc = C.compare(trace, hook, memory="16MiB", write_through="mtf", emulation_cost_us=2.0)
    by = {c["name"]: c["derived"] for c in doc["configs"]}
    # page: 3 protection exits, 1 + 3 write_protect... see tests/test_compare.py's case
    assert by["page"]["write_through"] == {"writes": 3, "emulate_seconds": pytest.approx(6e-6),
                                           "mtf_exits": 3, "mtf_exits_per_write": 1,
                                           "mtf_seconds": pytest.approx(9e-6)}
    assert by["spp_v12"]["write_through"]["mtf_exits"] == 6
    assert by["spp_v12"]["write_through"]["mtf_seconds"] == pytest.approx(2 * (3 + 2) * 1e-6)
    for d in by.values():
        assert d["total_overhead_seconds"] == pytest.approx(
            d["overhead_seconds"] + d["write_through"]["mtf_seconds"])
    assert doc["write_through"]["policy"] == "mtf"
    assert "est. overhead with mtf" in format_comparison(doc)
    with pytest.raises(InputError, match="write_through must be one of"):
        C.compare(trace, hook, memory="16MiB", write_through="pray")


# ------------------------------------------------------------------ why v4 and v12 differ

def test_notes_only_where_v4_and_v12_differ():
    hook = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                      length=np.array([16], dtype=np.uint32), name=["cred"])
    protected = {"gpa": np.array([PAGE + 124], dtype=np.uint64), "kind": np.ones(1, np.uint8)}
    doc = C.compare(protected, hook, memory="16MiB")
    (note,) = doc["notes"]
    assert note["mechanism"] == "lazy_sppt_build" and note["configs"] == ["spp_v4", "spp_v12"]
    assert "why v4 and v12 differ here" in format_comparison(doc)
    assert note["text"].endswith("(docs/semantics.md \u00a74.3, \u00a74.5, \u00a73.4, \u00a73.5)")
    elsewhere = {"gpa": np.array([0x300 << 12], dtype=np.uint64), "kind": np.ones(1, np.uint8)}
    doc = C.compare(elsewhere, hook, memory="16MiB")
    assert "notes" not in doc and "why v4 and v12" not in format_comparison(doc)


def test_huge_pages_note():
    hook = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                      length=np.array([16], dtype=np.uint32), name=["cred"])
    trace = {"gpa": np.array([PAGE + 124, PAGE + 124], dtype=np.uint64),
             "kind": np.ones(2, np.uint8)}
    doc = C.compare(trace, hook, memory="16MiB", hugepages=True)
    mechanisms = {n["mechanism"]: n["text"] for n in doc["notes"]}
    assert "huge_pages_left_writable" in mechanisms
    assert "no SPPT path for the protected pages it leaves writable" in mechanisms["sppt_memory"]
    by = {c["name"]: c["derived"] for c in doc["configs"]}
    assert by["spp_v4"]["protected_left_writable"] == 1
    assert by["spp_v12"]["protected_left_writable"] == 0


# ------------------------------------------------------------------------ the contract

# The keys of the comparison document before these additions: every one is kept.
OLD_TOP = ("schema_version", "sppjit_version", "input", "protection", "config", "exit_cost_us",
           "kernel_exit_cost_us", "exit_cost_source", "baseline", "provenance", "configs")
OLD_DERIVED = ("accesses", "writes", "exits", "exits_per_1000_writes", "protection_exits",
               "protection_exits_per_1000_writes", "exits_avoided", "net_exits_avoided",
               "exits_to_userspace", "exits_in_kernel", "protected_left_writable",
               "sppt_tables", "sppt_bytes", "overhead_seconds",
               "overhead_seconds_per_million_accesses", "hooks")


def test_document_keeps_every_key_and_reads_old_documents():
    hook = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                      length=np.array([16], dtype=np.uint32), name=["cred"])
    trace = {"gpa": np.array([PAGE + 124], dtype=np.uint64), "kind": np.ones(1, np.uint8)}
    doc = C.compare(trace, hook, memory="16MiB")
    assert list(doc)[:len(OLD_TOP)] == list(OLD_TOP)
    for entry in doc["configs"]:
        assert list(entry)[:6] == ["name", "profile", "granularity", "subpage_check",
                                   "summary", "derived"]
        assert list(entry["derived"])[:len(OLD_DERIVED)] == list(OLD_DERIVED)
    assert CompareDocument.from_dict(doc).to_dict() == doc
    # a document written before the additions still reads, and prints
    old = json.loads(json.dumps({k: doc[k] for k in OLD_TOP}))
    for entry in old["configs"]:
        entry["derived"] = {k: entry["derived"][k] for k in OLD_DERIVED}
    assert CompareDocument.from_dict(old).to_dict() == old
    assert "spp_v12" in format_comparison(old)


# ----------------------------------------------------------------------- command line

def test_cli_config_and_errors(tmp_path):
    trace = tmp_path / "t.parquet"
    pq.write_table(pa.table({"gpa": pa.array([PAGE + 124], pa.uint64()),
                             "kind": pa.array([1], pa.uint8())}), trace)
    hook = tmp_path / "h.parquet"
    write_protection(ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                                length=np.array([16], dtype=np.uint32), name=["cred"]),
                     str(hook))
    ok = runner.invoke(app, ["compare", str(trace), "--protect", str(hook), "--memory", "16MiB",
                             "--config", "page", "--config", "v12,first", "--json",
                             "--write-through", "emulate"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert [c["name"] for c in doc["configs"]] == ["page", "spp_v12_first"]
    assert doc["write_through"]["policy"] == "emulate"
    for args, message in (
        (["--config", "v4,vcpus=2"], "--config: configuration 'v4,vcpus=2': vcpus"),
        (["--config", "v4", "--subpage-check", "first"], "--subpage-check chooses among"),
        (["--config", "colour=red"], "--config: configuration 'colour=red': unknown key"),
    ):
        bad = runner.invoke(app, ["compare", str(trace), "--protect", str(hook), "--memory",
                                  "16MiB", *args])
        assert bad.exit_code == 2, bad.output
        assert message in bad.output
        assert "Traceback" not in bad.output


def test_sppt_memory_note_names_the_per_vcpu_trees(guard):
    trace, hooks = guard
    doc = C.compare(trace, hooks, memory="2GiB", vcpus=2)
    by = {c["name"]: c["derived"] for c in doc["configs"]}
    assert by["spp_v4"]["sppt_tables"] > by["spp_v12"]["sppt_tables"]
    texts = {n["mechanism"]: n["text"] for n in doc["notes"]}
    assert "in each vCPU's own tree (2 trees here)" in texts["sppt_memory"]
    assert "shared by the 2 vCPUs" in texts["lazy_sppt_build"]
