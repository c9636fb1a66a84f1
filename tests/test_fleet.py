"""Fleets (sppjit.fleet): traces x configurations as library jobs on a Dask cluster.

The logic runs on an in-process client (no worker process, no spawn): the manifest's forms,
its errors, every row equal to the serial job's (sppjit.job.run) and to sppjit sweep's row of
the same trace and configuration, a failing job among good ones, the outputs. Then ONE
LocalCluster of two worker processes (loopback only, no dashboard) runs a fleet end to end,
through the command line too, and loses a worker in the middle of a job: Dask retries the job
on another worker, and its row appears once, with the serial job's figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

distributed = pytest.importorskip("distributed")

import sppjit.cli as cli  # noqa: E402
from sppjit import fleet as F  # noqa: E402
from sppjit import job as J  # noqa: E402
from sppjit.errors import InputError  # noqa: E402
from sppjit.sweep import TIMING_COLUMNS, sweep  # noqa: E402

CONFIGS = ["page", "v4", "v12,first", "v12,hugepages,name=v12h"]
runner = CliRunner()


# ------------------------------------------------------------------------ inputs

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two traces (a hand-made one with hooks, a generated one with access maps), their
    protections, a trace that is not one, and the manifest crossing them with CONFIGS."""
    from sppjit.datasets import scenarios as S
    from sppjit.io.output import TableWriter

    d = tmp_path_factory.mktemp("fleet")
    page = 0x100 << 12
    pq.write_table(pa.table({"gpa": pa.array([page + 124, page + 200, page + 1000, page + 4090],
                                             pa.uint64()),
                             "size": pa.array([8, 8, 8, 8], pa.uint16()),
                             "vcpu": pa.array([0, 1, 0, 1], pa.uint16())}), d / "hand.parquet")
    (d / "hooks.csv").write_text(f"gpa,length,name\n{page + 120},16,cred\n{page + 4000},64,\n")
    sc = S.make("guarded", 3000, seed=5)
    table = pa.table(sc.columns())
    with TableWriter(str(d / "guarded.parquet"), table.schema) as writer:
        writer.write_batch(table)
    pq.write_table(pa.table({"gfn": sc.protect_gfn, "access": sc.protect_access}),
                   d / "maps.parquet")
    (d / "bad.parquet").write_text("not a trace\n")
    manifest = {"traces": [{"trace": "hand.parquet", "protect": "hooks.csv"},
                           {"trace": "guarded.parquet", "protect": "maps.parquet"}],
                "configs": CONFIGS, "vcpus": 2}
    (d / "crossed.json").write_text(json.dumps(manifest))
    return d


def timeless(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_COLUMNS}


def serial_row(task: F.FleetTask) -> dict:
    """The task's job run here, alone (the oracle), as a fleet row."""
    try:
        return F.fleet_row(task, J.run(task.job).summary.to_dict())
    except InputError as exc:
        return F.fleet_row(task, None, F.error_line(exc))


@pytest.fixture(scope="module")
def inproc():
    # loopback only: the scheduler's and the worker's HTTP servers too (not 0.0.0.0)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None, worker_dashboard_address="127.0.0.1:0",
                            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as client:
        yield client


# ------------------------------------------------------------------------ the manifest

def test_every_manifest_form_gives_the_same_jobs(files, tmp_path, monkeypatch):
    crossed = F.plan(files / "crossed.json")
    assert [t.name for t in crossed] == [f"{trace}/{c}" for trace in ("hand", "guarded") for c in
                                         ("v4_page_all", "v4_spp_all", "v12_spp_first", "v12h")]
    rows = [{"trace": str(files / t.job.inputs.trace), "config": c, "vcpus": 2,
             "protect": os.path.relpath(t.job.inputs.protection, tmp_path)}
            for t, c in zip(crossed, CONFIGS * 2)]
    # as a table in another directory: relative paths are the manifest's, not the caller's
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = "trace,config,vcpus,protect\n" + "".join(
        f'{r["trace"]},"{r["config"]}",2,{r["protect"]}\n' for r in rows)
    (tmp_path / "m.csv").write_text(csv)
    for name in ("m.parquet", "m.json", "m.jsonl", "m.csv"):
        assert [t.job for t in F.plan(tmp_path / name)] == [t.job for t in crossed], name
    # a list of rows in Python: relative to the current directory
    monkeypatch.chdir(tmp_path)
    assert [t.job for t in F.plan(rows)] == [t.job for t in crossed]
    # paths are absolute, the configuration is the job's VM
    job = crossed[3].job
    assert os.path.isabs(job.inputs.trace) and os.path.isabs(job.inputs.protection)
    assert (job.vm.profile, job.vm.hugepages, job.vm.vcpus) == ("v12", True, 2)
    assert J.Job.from_json(job.to_json()) == job  # what a worker receives


@pytest.mark.parametrize("manifest, message", [
    ({"traces": ["a.parquet"], "configs": ["v5"]}, "row 0: configuration 'v5'"),
    ({"traces": ["a.parquet"], "configs": ["v4", "name=v4_spp_all"]},
     "a/v4_spp_all is row 0 again"),
    ({"traces": ["x/a.parquet", "y/a.parquet"]}, "a/v4_spp_all is row 0 again"),
    ({"traces": ["a.parquet"], "threads": 2}, "unknown key 'threads'"),
    ({"traces": []}, "'traces' must be a non-empty list"),
    ({"traces": ["a.parquet"], "exits": "e.parquet"}, "'exits' names one file per row"),
    ([{"trace": "a.parquet", "colour": "red"}], "unknown column 'colour'"),
    ([{"config": "v4"}], "row 0: trace must be a file name"),
    ([{"trace": "a.parquet", "vcpus": "two"}], "row 0: vcpus must be a number"),
    ([{"trace": "a.parquet", "hugepages": "maybe"}], "row 0: hugepages must be true or false"),
    ([{"trace": "a.parquet", "trace_name": "../up"}], "row 0: trace_name '../up' must be"),
    ([{"trace": "a.parquet", "exits": "e.csv"}], "row 0: exit_log"),
    ([{"trace": "a.parquet", "exits": "e.parquet"}, {"trace": "b.parquet", "exits": "e.parquet"}],
     "is the same file as"),
    ([{"trace": "a.parquet", "summary": "a.parquet"}], "is the same file as"),
    ([], "manifest: no rows"),
])
def test_bad_manifests_fail_before_any_job(manifest, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        F.plan(manifest)


def test_bad_manifest_files(tmp_path):
    with pytest.raises(InputError, match="manifest: no such file"):
        F.plan(tmp_path / "none.json")
    (tmp_path / "m.json").write_text('{"traces": "a.parquet"}')
    with pytest.raises(InputError, match="'traces' must be a non-empty list"):
        F.plan(tmp_path / "m.json")
    with pytest.raises(InputError, match="outdir: .* is not an existing directory"):
        F.plan([{"trace": "a.parquet"}], outdir=tmp_path / "nope")


# ------------------------------------------------------------------------ the logic, in process

def test_rows_equal_the_serial_jobs_and_the_sweeps(files, inproc):
    result = F.fleet(files / "crossed.json", scheduler=inproc)
    assert result.errors == {}
    rows = result.table.to_pylist()
    assert [(r["trace_name"], r["name"]) for r in rows] == [
        (t.trace_name, t.config.label) for t in result.tasks]
    assert [timeless(r) for r in rows] == [timeless(serial_row(t)) for t in result.tasks]
    # hand: every write to the hooked page exits page-granular; under SPP the write at +124
    # hits the hook (bytes 120-135: sub-pages 0 and 1), those at +200 and +4090 only the
    # hooks' 128-byte sub-pages, and the one at +1000 none
    assert rows[0]["exits_write_protect"] == 4
    assert (rows[1]["hooks_relevant"], rows[1]["hooks_irrelevant"]) == (1, 2)
    assert rows[4]["pages_protected"] > 0 and rows[5]["exits_spp_violation"] > 0
    # sppjit sweep of one trace under the same configurations: the same rows, column for column
    for trace_name, protect in (("hand", "hooks.csv"), ("guarded", "maps.parquet")):
        swept = sweep(str(files / f"{trace_name}.parquet"), CONFIGS, vcpus=2,
                      protection=str(files / protect)).table.to_pylist()
        ours = [r for r in rows if r["trace_name"] == trace_name]
        assert [timeless(r) for r in swept] == [
            {k: v for k, v in timeless(r).items() if k not in F.ROW_KEY_COLUMNS} for r in ours]
    for task in result.tasks:
        assert result.summaries[task.name]["input"]["path"] == task.job.inputs.trace
    assert result.table.schema.names[:2] == list(F.ROW_KEY_COLUMNS)


def test_the_jobs_of_a_trace_share_a_task_and_give_the_rows_of_a_task_each(files, inproc):
    """By default the in-process client's 2 threads get 8 jobs as 4 tasks of one trace's 2
    configurations (each trace read once per task); one job a task gives the same rows."""
    grouped = F.fleet(files / "crossed.json", scheduler=inproc)
    apart = F.fleet(files / "crossed.json", scheduler=inproc, jobs_per_task=1)
    assert grouped.document["jobs_per_task"] == 2 and apart.document["jobs_per_task"] == 1
    assert [t["task"] for t in grouped.document["tasks"]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [t["task"] for t in apart.document["tasks"]] == list(range(8))
    assert [timeless(r) for r in grouped.table.to_pylist()] == [
        timeless(r) for r in apart.table.to_pylist()]
    with pytest.raises(InputError, match="jobs per task must be a positive number"):
        F.fleet(files / "crossed.json", scheduler=inproc, jobs_per_task=0)


def test_task_groups_cut_each_traces_rows_in_manifest_order():
    tasks = [F.FleetTask(name, None, J.Job(inputs=J.JobInputs(trace=f"/t/{name}.parquet")))
             for name in ("a", "b", "a", "c", "a", "b")]
    assert F.task_groups(tasks, 2) == [[0, 2], [4], [1, 5], [3]]
    assert F.task_groups(tasks, 3) == [[0, 2, 4], [1, 5], [3]]
    assert F.task_groups(tasks, 1) == [[0], [2], [4], [1], [5], [3]]
    # two tasks per worker thread, at least one job each
    assert [F.default_jobs_per_task(12, t) for t in (1, 2, 4, 6, 64)] == [6, 3, 2, 1, 1]
    assert F.default_jobs_per_task(1, 2) == 1


def test_a_failing_job_fails_its_row_only(files, inproc):
    manifest = [{"trace": str(files / "bad.parquet")},
                {"trace": str(files / "hand.parquet"), "vcpus": 2},
                {"trace": str(files / "hand.parquet"), "config": "v12", "vcpus": 1},
                {"trace": str(files / "hand.parquet"), "protect": str(files / "nope.csv"),
                 "config": "page", "vcpus": 2}]
    result = F.fleet(manifest, scheduler=inproc)
    rows = result.table.to_pylist()
    assert [r["error"] is None for r in rows] == [False, True, False, False]
    assert [timeless(r) for r in rows] == [timeless(serial_row(t)) for t in result.tasks]
    assert rows[0]["error"].startswith("trace: cannot read")
    assert "column 'vcpu'" in rows[2]["error"]
    assert rows[3]["error"].startswith("protection: no such file")
    assert rows[0]["accesses"] is None and rows[1]["accesses"] == 4
    assert set(result.errors) == {"bad/v4_spp_all", "hand/v12_spp_all", "hand/v4_page_all"}


def test_outdir_outputs_under_fixed_names_equal_the_serial_jobs(files, inproc, tmp_path):
    first = F.fleet(files / "crossed.json", scheduler=inproc, outdir=tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(f"{t.trace_name}.{t.config.label}.{kind}" for t in first.tasks
                           for kind in ("exits.parquet", "summary.json"))
    task = first.tasks[5]
    serial = tmp_path / "serial"
    serial.mkdir()
    J.run(J.Job(inputs=task.job.inputs, vm=task.job.vm,
                outputs=J.JobOutputs(exit_log=str(serial / "e.parquet"))))
    assert pq.read_table(task.job.outputs.exit_log).equals(pq.read_table(serial / "e.parquet"))
    summary = json.loads(open(task.job.outputs.summary).read())
    assert summary["counts"] == first.summaries[task.name]["counts"]
    # run again (as a retried task would): the same files, nothing else left beside them
    again = F.fleet(files / "crossed.json", scheduler=inproc, outdir=tmp_path)
    assert sorted(p for p in os.listdir(tmp_path) if p != "serial") == names
    assert [timeless(r) for r in again.table.to_pylist()] == [
        timeless(r) for r in first.table.to_pylist()]


def test_warm_up_happens_once_per_process_under_a_machine_wide_lock(tmp_path):
    F.warm_worker()
    assert F.warm_worker() == 0.0
    directory = F._cache_directory()
    marker = os.path.join(directory, f"sppjit-fleet-warm.{os.uname().nodename}")
    from sppjit.kernels import _jit

    if _jit.NUMBA_CACHE:  # the marker records the cache a completed warm-up left
        assert open(marker).read() == F._cache_listing(directory)
    # the lock excludes another process while held
    lock = tmp_path / "lock"
    probe = ("import fcntl, sys\nf = open(sys.argv[1], 'a+b')\n"
             "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n"
             "    sys.exit(3)\n")
    with F._file_lock(str(lock)):
        assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 0


def test_without_dask_one_line_says_what_to_install(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    with pytest.raises(InputError, match=r"pip install 'sppjit\[dask\]'"):
        F.fleet(files / "crossed.json", workers=1)
    result = runner.invoke(cli.app, ["fleet", "--help"])
    assert result.exit_code == 0 and "--scheduler" in result.stdout


def test_scheduler_and_workers_exclude_each_other(files):
    with pytest.raises(InputError, match="cannot be given together"):
        F.fleet(files / "crossed.json", scheduler="tcp://127.0.0.1:1", workers=2)
    result = runner.invoke(cli.app, ["fleet", str(files / "crossed.json"), "--scheduler",
                                     "tcp://127.0.0.1:1", "--workers", "2"])
    assert result.exit_code == 2 and "cannot be used together" in result.stderr


# ------------------------------------------------------------------------ one LocalCluster

@pytest.fixture(scope="module")
def cluster():
    with F.local_cluster(2) as local:  # what sppjit fleet --workers 2 starts
        yield local


def listening(pids) -> set[str]:
    """The addresses the processes ``pids`` listen on (TCP)."""
    import psutil  # a dependency of distributed

    found = set()
    for pid in pids:
        process = psutil.Process(pid)
        connections = getattr(process, "net_connections", process.connections)(kind="tcp")
        found |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def test_local_cluster_end_to_end_through_the_command_line(files, cluster, tmp_path):
    address = cluster.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    with distributed.Client(address) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)
        pids = set(client.run(os.getpid).values())
        import psutil

        # the nannies and workers are this process's children; the scheduler runs here
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        assert pids <= children and listening(children) == {"127.0.0.1"}
        assert cluster.scheduler.http_server.address == "127.0.0.1"
    out = tmp_path / "fleet.parquet"
    result = runner.invoke(cli.app, ["fleet", str(files / "crossed.json"), "--scheduler",
                                     address, "--out", str(out), "--json", "--jobs-per-task", "3"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [t["task"] for t in document["tasks"]] == [0, 0, 0, 1, 2, 2, 2, 3]
    assert {t["pid"] for t in document["tasks"]} <= pids  # run by the workers, not here
    tasks = F.plan(files / "crossed.json")
    assert [timeless(r) for r in pq.read_table(out).to_pylist()] == [
        timeless(serial_row(t)) for t in tasks]
    # a bad job among good ones: its row says why, the others complete, exit code 2
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"trace,vcpus\n{files / 'bad.parquet'},2\n{files / 'hand.parquet'},2\n")
    result = runner.invoke(cli.app, ["fleet", str(manifest), "--scheduler", address])
    assert result.exit_code == 2
    assert result.stderr.strip() == "sppjit: error: 1 of 2 jobs failed (their rows say why)"
    assert "error    bad/v4_spp_all: trace: cannot read" in result.stdout


def test_a_worker_lost_during_a_job_is_retried_and_its_row_appears_once(files, cluster,
                                                                        tmp_path):
    marker = tmp_path / "killed"
    victim = "sppjit-fleet-guarded/v12_spp_first-"

    class KillOnce(distributed.WorkerPlugin):
        """Kills its worker's process as the victim's job starts running there, once."""

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and str(key).startswith(victim) \
                    and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)

    with distributed.Client(cluster.scheduler_address) as client:
        client.register_plugin(KillOnce(), name="kill-once")
        try:
            result = F.fleet(files / "crossed.json", scheduler=client, outdir=tmp_path)
        finally:
            client.unregister_worker_plugin("kill-once")
        client.wait_for_workers(2, timeout=60)  # the nanny restarted the lost one
    killed = int(marker.read_text())
    rows = result.table.to_pylist()
    names = [(r["trace_name"], r["name"]) for r in rows]
    assert len(names) == len(set(names)) == len(result.tasks) == 8
    assert result.errors == {}
    assert [timeless(r) for r in rows] == [timeless(serial_row(t)) for t in result.tasks]
    retried = next(t for t in result.document["tasks"] if t["name"] == "guarded/v12_spp_first")
    assert retried["pid"] != killed
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["killed"] + [f"{t.trace_name}.{t.config.label}.{kind}" for t in result.tasks
                      for kind in ("exits.parquet", "summary.json")])


# ------------------------------------------------------------------------ sppjit bench --fleet

def test_bench_fleet_through_the_command_line(cluster, tmp_path, monkeypatch):
    """`sppjit bench --fleet` end to end, on the module's cluster (what it would start: two
    local workers): every job of 4 traces x 3 configurations runs on the fleet and here, the
    figures it prints are those of its JSON, and the ratios are the ones its docstring defines."""
    import contextlib

    from sppjit import bench as B

    monkeypatch.setattr(F, "local_cluster", lambda workers: contextlib.nullcontext(cluster))
    out = tmp_path / "fleet-bench.json"
    result = runner.invoke(cli.app, ["bench", "--fleet", "--accesses", "20000", "--json", str(out),
                                     "--no-progress"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert (doc["traces"], doc["workers"], doc["jobs"]) == (B.FLEET_TRACES, 2, 3 * B.FLEET_TRACES)
    assert doc["ideal_seconds"] == pytest.approx(doc["serial_seconds"] / 2)
    assert doc["fleet_over_ideal"] == pytest.approx(doc["fleet_seconds"] / doc["ideal_seconds"])
    # the fleet ran compare's 3 configurations of a trace in one task; also a task per job
    assert doc["jobs_per_task"] == 3
    assert doc["fleet_over_grouped_ideal"] == pytest.approx(
        doc["fleet_seconds"] / (doc["serial_grouped_seconds"] / 2))
    assert doc["fleet_apart_over_ideal"] == pytest.approx(
        doc["fleet_apart_seconds"] / doc["ideal_seconds"])
    # the jobs ran on the workers, each of which warmed once
    assert len(doc["worker_warm_seconds"]) == 2 and 1 <= len(doc["worker_busy_seconds"]) <= 2
    assert doc["scheduling_seconds"] == pytest.approx(doc["fleet_seconds"] - max(doc["worker_busy_seconds"]))
    assert result.stdout.strip() == B.format_fleet_bench(doc)


def test_bench_fleet_refuses_a_fleet_whose_rows_differ(cluster, monkeypatch):
    """The bench checks the fleet's rows against the serial jobs': a fleet that got one figure
    wrong is an error, not a timing."""
    import contextlib

    from sppjit import bench as B

    monkeypatch.setattr(F, "local_cluster", lambda workers: contextlib.nullcontext(cluster))
    real = F.fleet

    def off_by_one(manifest, **kwargs):
        run = real(manifest, **kwargs)
        column = run.table.column("exits").to_pylist()
        column[0] += 1
        run.table = run.table.set_column(run.table.schema.get_field_index("exits"), "exits",
                                         pa.array(column, run.table.schema.field("exits").type))
        return run

    monkeypatch.setattr(F, "fleet", off_by_one)
    with pytest.raises(RuntimeError, match="differ from the serial jobs"):
        B.run_fleet_bench(accesses=5000, traces=1, repeat=1)
