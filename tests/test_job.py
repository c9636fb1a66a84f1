"""The library job (sppjit.job): JSON round trip, equal jobs give equal outputs, every check
before any work, all-or-nothing outputs; the typed summaries give back the contract's JSON
key for key; library errors name library parameters."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppjit import job as J
from sppjit.compare import compare
from sppjit.datasets import scenarios as S
from sppjit.errors import InputError
from sppjit.summary import CompareDocument, ReplaySummary
from sppjit.vm import VM


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small guarded trace (2 vCPUs) with its protection as access maps, hooks as byte
    ranges, memslots and a timeline."""
    base = tmp_path_factory.mktemp("job")
    scenario = S.make("guarded", 3000, seed=5)
    pq.write_table(pa.table(scenario.columns()), base / "t.parquet")
    gfn, access = scenario.protect_gfn, scenario.protect_access
    (base / "maps.csv").write_text("gfn,access\n" + "".join(
        f"{int(g)},{int(a)}\n" for g, a in zip(gfn, access)))
    (base / "hooks.csv").write_text("gpa,length,name\n" + "".join(
        f"{int(g) << 12 | 0x100},64,h{i}\n" for i, g in enumerate(gfn[:50])))
    (base / "slots.csv").write_text(f"slot,base_gfn,npages\n0,0,{scenario.memory >> 12}\n")
    (base / "ops.csv").write_text(f"at,op,gfn,npages,access\n1500,zap,{int(gfn[0])},1,\n")
    return base


def job_in(files, out_dir, **vm) -> J.Job:
    os.makedirs(out_dir, exist_ok=True)
    return J.Job(
        inputs=J.JobInputs(trace=str(files / "t.parquet"), protection=str(files / "maps.csv"),
                           timeline=str(files / "ops.csv")),
        vm=J.VmSpec(vcpus=2, **vm),
        outputs=J.JobOutputs(results=str(out_dir / "r.parquet"),
                             exit_log=str(out_dir / "e.arrow"),
                             summary=str(out_dir / "s.json"),
                             saved_state=str(out_dir / "st.npz")),
        batch_size=700)


# ------------------------------------------------------------------------------ JSON

def test_job_round_trips_through_json(tmp_path):
    job = J.Job(inputs=J.JobInputs(trace="t.parquet", protection="p.csv", timeline="o.csv"),
                vm=J.VmSpec(memslots=[[0, 16], (64, 8)], vcpus=3, profile="v12",
                            hugepages=True, subpage_check="first", granularity="page",
                            spp_supported=False, nested=True, table_capacity=2048),
                outputs=J.JobOutputs(results="r.arrow", exit_log="e.parquet",
                                     summary="s.json", saved_state="st.npz"),
                engine="reference", batch_size=17)
    text = job.to_json()
    again = J.Job.from_json(text)
    assert again == job and again.to_json() == text
    assert again.vm.memslots == ((0, 16), (64, 8))  # a list from JSON, pairs again
    assert json.loads(text)["vm"]["memslots"] == [[0, 16], [64, 8]]
    # defaults are filled in, and a memslot file stays a file
    small = J.Job.from_dict({"inputs": {"trace": "t.parquet"}, "vm": {"memslots": "m.csv"}})
    assert small.vm.memslots_file == "m.csv" and small.engine == "jit"
    assert J.Job.from_json(small.to_json()) == small


@pytest.mark.parametrize("data, message", [
    ({"inputs": {"trace": "t"}, "oops": 1}, "job: unknown key 'oops'"),
    ({"inputs": {"trace": "t", "protect": "p"}}, "inputs: unknown key 'protect'"),
    ({"vm": {}}, "job: missing key 'inputs'"),
    ({"inputs": {}}, "inputs:"),
    ({"inputs": {"trace": "t"}, "job": "compare"}, "not a replay job"),
    ({"inputs": {"trace": "t"}, "vm": {"memslots": [[1]]}}, "memslots must be"),
])
def test_bad_job_json_is_an_input_error(data, message):
    with pytest.raises(InputError, match=message):
        J.Job.from_dict(data)
    with pytest.raises(InputError, match="job: not JSON"):
        J.Job.from_json("{")


# ------------------------------------------------------------------------------ run

def test_equal_jobs_give_identical_outputs(files, tmp_path):
    first = J.run(job_in(files, tmp_path / "a"))
    second = J.run(J.Job.from_json(job_in(files, tmp_path / "b").to_json()))
    for name in ("r.parquet", "e.arrow"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first.summary.without_timings() == second.summary.without_timings()
    written = [json.loads((tmp_path / d / "s.json").read_text()) for d in "ab"]
    for doc in written:
        for key in ReplaySummary.TIMINGS:
            doc.pop(key)
    assert written[0] == written[1]
    with np.load(tmp_path / "a" / "st.npz") as a, np.load(tmp_path / "b" / "st.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    # what was written, and what the summary says about the job
    assert first.written == tuple(str(tmp_path / "a" / n)
                                  for n in ("r.parquet", "e.arrow", "st.npz", "s.json"))
    summary = first.summary.to_dict()
    assert summary == written[0] | {k: summary[k] for k in ReplaySummary.TIMINGS}
    assert summary["ops"] == {"count": 1, "applied": 1}
    assert summary["config"]["ops_file"] == str(files / "ops.csv")
    assert summary["config"]["protection"]["form"] == "access_maps"
    assert summary["input"]["format"] == "parquet" and summary["input"]["rows"] == 3000
    assert pq.read_table(tmp_path / "a" / "r.parquet").num_rows == 3000
    assert first.note is None  # memory left to the default: the generated trace's own 4GiB


def test_a_job_without_outputs_returns_the_summary(files):
    result = J.run(J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet")),
                         vm=J.VmSpec(vcpus=2)))
    assert result.written == () and result.summary.counts.accesses == 3000
    assert result.summary.exits.total == result.summary.to_dict()["exits"]["total"] > 0


def _recorded_trace(path, gpas, memory=b"16777216", vcpus=b"2"):
    from sppjit.io.trace import schema_metadata

    table = pa.table({"gpa": np.array(gpas, np.uint64),
                      "vcpu": np.array([i % 2 for i in range(len(gpas))], np.uint16)})
    meta = {**schema_metadata(), b"sppjit.scenario": b"guarded", b"sppjit.memory": memory,
            b"sppjit.vcpus": vcpus}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return str(path)


def test_the_vm_a_trace_records_is_the_default(tmp_path):
    # 16 MiB and 2 vCPUs recorded: vCPU 1 exists (no error) and 0xF00000 is RAM, not MMIO.
    trace = _recorded_trace(tmp_path / "t.parquet", [0x1000, 0xF00000])
    result = J.run(J.Job(inputs=J.JobInputs(trace=trace)))
    config = result.summary.config
    assert config["vcpus"] == 2 and config["vm_from"] == {"memory": "trace", "vcpus": "trace"}
    assert config["memory_bytes"] == 16 << 20
    assert result.note is None and result.summary.counts.mmio == 0


def test_options_override_what_the_trace_records(tmp_path):
    trace = _recorded_trace(tmp_path / "t.parquet", [0x1000, 0x2000])
    result = J.run(J.Job(inputs=J.JobInputs(trace=trace), vm=J.VmSpec(memory="8MiB", vcpus=3)))
    config = result.summary.config
    assert config["vcpus"] == 3 and config["vm_from"] == {"memory": "option", "vcpus": "option"}
    assert config["memory_bytes"] == 8 << 20


def test_accesses_beyond_memory_give_a_note_with_the_memory_that_covers_them(tmp_path):
    table = pa.table({"gpa": np.array([0x1000, 0x2_8000_0000], np.uint64)})  # 10 GiB
    pq.write_table(table, tmp_path / "t.parquet")
    result = J.run(J.Job(inputs=J.JobInputs(trace=str(tmp_path / "t.parquet"))))
    assert result.summary.counts.mmio == 1
    assert result.summary.config["vm_from"] == {"memory": "default", "vcpus": "default"}
    # The access's 8 bytes end just past 10 GiB: the next MiB covers it.
    assert result.note == ("1 access fell outside the guest's memory and was treated as MMIO; "
                           "--memory 10241MiB would cover them (or --memslots for a layout "
                           "with holes)")
    # Over several batches the note's memory covers the highest access of any of them: batches
    # wholly inside memory are not scanned, one that ends just inside it is.
    four_gib = 4 << 30
    gpa = np.array([0x1000, 0x2000, four_gib - 8, 0x3000, 0x2_8000_0000, 0x1_4000_0000], np.uint64)
    pq.write_table(pa.table({"gpa": gpa, "size": np.array([8, 8, 8, 8, 8, 4096], np.uint16)}),
                   tmp_path / "batches.parquet")
    several = J.run(J.Job(inputs=J.JobInputs(trace=str(tmp_path / "batches.parquet")),
                          batch_size=2))
    assert several.summary.counts.mmio == 2
    assert "--memory 10241MiB would cover them" in several.note
    slots = tmp_path / "slots.csv"
    slots.write_text("slot,base_gfn,npages\n0,0,1024\n")
    with_slots = J.run(J.Job(inputs=J.JobInputs(trace=str(tmp_path / "t.parquet")),
                             vm=J.VmSpec(memslots=str(slots))))
    assert with_slots.summary.counts.mmio == 1 and with_slots.note is None  # a layout: meant


def test_progress_is_called_after_every_batch(files):
    calls = []
    J.run(J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet")), vm=J.VmSpec(vcpus=2),
                batch_size=1000), progress=lambda rows, total: calls.append((rows, total)))
    assert calls == [(1000, 3000), (2000, 3000), (3000, 3000)]


# ------------------------------------------------------------------------------ checks

def test_check_names_library_parameters_or_the_callers(files, tmp_path):
    both = J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet")),
                 vm=J.VmSpec(memory="16MiB", memslots=str(files / "slots.csv")))
    with pytest.raises(InputError) as caught:
        J.check(both)
    assert str(caught.value) == ("memory and memslots cannot be used together (memslots "
                                 "defines the memory)")
    with pytest.raises(InputError) as caught:
        J.check(both, names={"memory": "--memory", "memslots": "--memslots"})
    assert str(caught.value) == ("--memory and --memslots cannot be used together "
                                 "(--memslots defines the memory)")
    bad = J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet")), vm=J.VmSpec(memory="12345"))
    with pytest.raises(InputError, match=r"^memory: size '12345'"):
        J.check(bad)
    clash = J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet")),
                  outputs=J.JobOutputs(summary=str(files / "t.parquet")))
    with pytest.raises(InputError, match="^summary: .* is the same file as trace$"):
        J.check(clash)
    nowhere = J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet")),
                    outputs=J.JobOutputs(results=str(tmp_path / "r.csv")))
    with pytest.raises(InputError, match="^results: unknown output format"):
        J.check(nowhere)
    with pytest.raises(InputError, match="^engine must be one of jit, reference"):
        J.check(J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet")), engine="fast"))
    # the inputs are read too, and the protection placed
    missing = J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet"),
                                       protection=str(tmp_path / "none.csv")))
    with pytest.raises(InputError, match="none.csv"):
        J.check(missing)
    small = J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet"),
                                     protection=str(files / "maps.csv")),
                  vm=J.VmSpec(memory="1MiB"))
    with pytest.raises(InputError, match="outside every memslot"):
        J.check(small)
    J.check(job_in(files, tmp_path / "ok"))
    assert os.listdir(tmp_path / "ok") == []  # checking writes nothing


def test_failed_run_leaves_no_output(files, tmp_path):
    # Row 2500 uses vCPU 5: found in the third batch, after results and exits were written.
    columns = S.make("guarded", 3000, seed=5).columns()
    columns["vcpu"] = columns["vcpu"].copy()
    columns["vcpu"][2500] = 5
    pq.write_table(pa.table(columns), tmp_path / "bad.parquet")
    job = job_in(files, tmp_path / "out")
    job = J.Job(inputs=J.JobInputs(trace=str(tmp_path / "bad.parquet")), vm=job.vm,
                outputs=job.outputs, batch_size=1000)
    with pytest.raises(InputError, match="2500"):
        J.run(job)
    assert os.listdir(tmp_path / "out") == []


def test_vm_errors_name_its_parameters():
    with pytest.raises(InputError) as caught:
        VM(memory="bad")
    assert str(caught.value) == "memory: cannot parse size 'bad'"
    with pytest.raises(InputError, match="^vcpus must be 1..1024"):
        VM(vcpus=0)


# ------------------------------------------------------------------------------ summaries

def test_typed_summaries_give_back_the_json_key_for_key(files, tmp_path):
    plain = J.run(job_in(files, tmp_path / "a")).summary.to_dict()
    hooks = J.run(J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet"),
                                           protection=str(files / "hooks.csv")),
                        vm=J.VmSpec(vcpus=2, memslots=str(files / "slots.csv")),
                        engine="reference")).summary.to_dict()
    assert "hooks" in hooks and "ops" not in hooks and "ops" in plain
    for summary in (plain, hooks):
        typed = ReplaySummary.from_dict(json.loads(json.dumps(summary)))
        assert typed.to_dict() == summary
        assert json.dumps(typed.to_dict()) == json.dumps(summary)  # the same key order
    doc = compare(str(files / "t.parquet"), str(files / "hooks.csv"), vcpus=2)
    doc = json.loads(json.dumps(doc))
    typed = CompareDocument.from_dict(doc)
    assert json.dumps(typed.to_dict()) == json.dumps(doc)
    assert typed.configs[0].name == "page" and typed.configs[1].summary.hooks is not None
    assert typed.configs[1].derived.hooks["relevant"] == doc["configs"][1]["derived"]["hooks"]["relevant"]
    broken = dict(plain)
    del broken["counts"]
    with pytest.raises(InputError, match="ReplaySummary: missing key 'counts'"):
        ReplaySummary.from_dict(broken)
    with pytest.raises(InputError, match="ReplaySummary.exits: missing key 'total'"):
        ReplaySummary.from_dict({**plain, "exits": {}})
    newer = ReplaySummary.from_dict({**plain, "later": 1})
    assert newer.to_dict() == {**plain, "later": 1}


def test_byte_range_rows_are_named_as_the_file_gives_them(files, tmp_path):
    (tmp_path / "hooks.csv").write_text("gpa,length\n0x1000,8\n0x1000,16\n0x9000000,8\n")
    for protect in (str(tmp_path / "hooks.csv"),):
        with pytest.raises(InputError, match="gfn 0x9000 at row 2 is outside every memslot"):
            J.check(J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet"), protection=protect),
                          vm=J.VmSpec(memory="16MiB", vcpus=2)))
        with pytest.raises(InputError, match="gfn 0x9000 at row 2 is outside every memslot"):
            compare(str(files / "t.parquet"), protect, memory="16MiB", vcpus=2)


# ------------------------------------------------------------------------------ run_many

def _configs(files, out_root, names):
    """Jobs of the same trace under several configurations, each writing every output."""
    base = job_in(files, out_root / names[0])
    vms = {"v4": J.VmSpec(vcpus=2), "v12": J.VmSpec(vcpus=2, profile="v12"),
           "page": J.VmSpec(vcpus=2, granularity="page"),
           "huge": J.VmSpec(vcpus=2, profile="v12", hugepages=True, subpage_check="first")}
    jobs = []
    for name in names:
        one = job_in(files, out_root / name)
        jobs.append(J.Job(inputs=base.inputs, vm=vms[name], outputs=one.outputs,
                          batch_size=base.batch_size))
    return jobs


def _same_outputs(a_dir, b_dir) -> None:
    for name in ("r.parquet", "e.arrow"):
        assert (a_dir / name).read_bytes() == (b_dir / name).read_bytes(), name
    docs = [json.loads((d / "s.json").read_text()) for d in (a_dir, b_dir)]
    for doc in docs:
        for key in ReplaySummary.TIMINGS:
            doc.pop(key)
    assert docs[0] == docs[1]
    with np.load(a_dir / "st.npz") as a, np.load(b_dir / "st.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key


def test_run_many_gives_each_job_what_run_gives_it(files, tmp_path, monkeypatch):
    """Four configurations of one trace, read once (in batches of 700, so the jobs take
    turns batch by batch): every output file and summary is the job's own run's; each
    input file is hashed once."""
    from sppjit import provenance

    names = ["v4", "v12", "page", "huge"]
    alone = [J.run(job) for job in _configs(files, tmp_path / "alone", names)]
    hashed = []
    real = provenance.file_digest
    monkeypatch.setattr(provenance, "file_digest", lambda path: hashed.append(path) or real(path))
    together = J.run_many(_configs(files, tmp_path / "together", names))
    assert sorted(hashed) == sorted({str(files / n) for n in ("t.parquet", "maps.csv",
                                                               "ops.csv")})
    for name, a, b in zip(names, alone, together):
        assert isinstance(b, J.JobResult), b
        assert a.summary.without_timings() == b.summary.without_timings(), name
        assert b.written == tuple(str(tmp_path / "together" / name / n)
                                  for n in ("r.parquet", "e.arrow", "st.npz", "s.json"))
        assert a.note == b.note
        _same_outputs(tmp_path / "alone" / name, tmp_path / "together" / name)
    # the configurations differ: the test would not see a job given another's results
    assert len({json.dumps(r.summary.to_dict()["exits"]) for r in alone}) > 1


def test_run_many_fails_jobs_one_by_one_as_run_does(files, tmp_path):
    """A missing protection file fails its job at the start, a vCPU count below the trace's
    fails its job (read apart from the others: its reader checks fewer vCPUs), a timeline
    op's EFAULT stops one job in the middle: each gets run's own error and leaves no output,
    the others complete with run's results."""
    good = _configs(files, tmp_path / "g", ["v4", "page"])
    missing = J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet"),
                                       protection=str(files / "nope.csv")),
                    vm=J.VmSpec(vcpus=2), outputs=job_in(files, tmp_path / "m").outputs,
                    batch_size=700)
    one_vcpu = J.Job(inputs=good[0].inputs, vm=J.VmSpec(vcpus=1),
                     outputs=job_in(files, tmp_path / "o").outputs, batch_size=700)
    # at row 1600 (the third batch) a set_subpages on a gfn in no memslot: EFAULT
    (tmp_path / "efault.csv").write_text(f"at,op,gfn,npages,access\n1600,set_subpages,{1 << 30},1,0\n")
    efault = J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet"),
                                      protection=str(files / "maps.csv"),
                                      timeline=str(tmp_path / "efault.csv")),
                  vm=J.VmSpec(vcpus=2), outputs=job_in(files, tmp_path / "x").outputs,
                  batch_size=700)
    jobs = [missing, good[0], one_vcpu, efault, good[1]]
    results = J.run_many(jobs)
    for job, result in zip(jobs, results):
        try:
            expected = J.run(job)
        except Exception as exc:  # noqa: BLE001 - the oracle's error
            assert type(result) is type(exc) and str(result) == str(exc)
            out_dir = os.path.dirname(job.outputs.summary)
            assert os.listdir(out_dir) == [], out_dir
        else:
            assert result.summary.without_timings() == expected.summary.without_timings()
    assert [isinstance(r, J.JobResult) for r in results] == [False, True, False, False, True]


def test_run_many_a_bad_row_fails_every_job_and_restores_older_files(files, tmp_path):
    """A bad row in the third batch: every job of the trace fails with the error its run
    gives, none leaves an output, and the files that were there before are back."""
    columns = S.make("guarded", 3000, seed=5).columns()
    columns["vcpu"] = columns["vcpu"].copy()
    columns["vcpu"][2500] = 5
    pq.write_table(pa.table(columns), tmp_path / "bad.parquet")
    jobs = [J.Job(inputs=J.JobInputs(trace=str(tmp_path / "bad.parquet")), vm=job.vm,
                  outputs=job.outputs, batch_size=1000)
            for job in _configs(files, tmp_path / "out", ["v4", "v12"])]
    (tmp_path / "out" / "v4" / "s.json").write_text("older\n")
    results = J.run_many(jobs)
    with pytest.raises(InputError) as alone:
        J.run(jobs[1])
    assert [str(r) for r in results] == [str(alone.value)] * 2 and "2500" in str(alone.value)
    assert os.listdir(tmp_path / "out" / "v4") == ["s.json"]
    assert (tmp_path / "out" / "v4" / "s.json").read_text() == "older\n"
    assert os.listdir(tmp_path / "out" / "v12") == []


def test_run_many_interrupted_rolls_every_job_back(files, tmp_path, monkeypatch):
    from sppjit.replay import Replay

    calls = []
    real = Replay.run

    def interrupted(self, batch, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the first job's third batch
            raise KeyboardInterrupt
        return real(self, batch, **kwargs)

    monkeypatch.setattr(Replay, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        J.run_many(_configs(files, tmp_path / "out", ["v4", "v12"]))
    assert os.listdir(tmp_path / "out" / "v4") == [] == os.listdir(tmp_path / "out" / "v12")
