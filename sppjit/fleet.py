"""Fleets: replay jobs over many traces x configurations on a dask.distributed cluster.

A fleet is a manifest (a table of traces and configurations, or lists of both crossed:
``read_manifest``; docs/fleet.md §2) turned into library jobs (sppjit.job.Job, one per trace
and configuration: ``plan``), run on the workers of a Dask cluster and gathered into one
table, a row per (trace, configuration) with the columns of ``sppjit sweep``'s table
(sppjit.sweep.summary_row) after the trace's name and path.

- Tasks ship job descriptions (``Job.to_dict``: plain JSON data), never arrays or compiled
  functions: a worker reads its trace from the path, on its own machine or a shared file
  system, and compiles or loads the kernels itself.
- A task runs the jobs of one trace together (``task_groups``, ``run_tasks``,
  sppjit.job.run_many): the trace is read, checked and hashed once and each batch replayed
  by every configuration in turn, as a sweep does on one machine. By default a task takes
  as many of a trace's jobs as leave two tasks per worker thread (``default_jobs_per_task``:
  compare's three configurations of a trace on two workers); ``jobs_per_task=1`` gives each
  job a task of its own.
- ``warm_worker`` runs once per worker process before its first job: numba's kernels are
  loaded from the on-disk cache, or compiled and cached by ONE process per cache directory
  while the others wait on a file lock (docs/fleet.md §4): no N-fold compile storm, and no
  process wipes or rewrites the cache while another reads it.
- A job that fails (a bad trace, a missing protection file, an internal error) fails its row:
  the row keeps the error line and null figures, the other rows complete. A worker lost
  mid-task is Dask's to retry (``distributed.scheduler.allowed-failures`` times) on another
  worker: a job is idempotent (it writes its outputs under names fixed by the manifest, each
  to a temporary name renamed when complete, sppjit.io.atomic), and each row is the result of
  exactly one future (a retried task runs all its jobs again), so no row is lost or
  duplicated.

Every row equals, but for the timing columns, the row of the same trace and configuration in
``sppjit sweep`` and the summary of ``sppjit replay`` with the same settings
(tests/test_fleet.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from .callable_module import make_callable
from .defaults import DEFAULT_ENGINE, DEFAULT_VCPUS
from .errors import InputError, SppError, VmEntryError
from .sweep import _FALSE, _NAME, _TRUE, NO_PROTECTION, Config, _stem, format_rows, parse_config

DASK_MISSING = "sppjit fleet needs dask.distributed: pip install 'sppjit[dask]'"
# Manifest columns (docs/fleet.md §2): the trace, its configuration, the VM, the outputs.
MANIFEST_COLUMNS = ("trace", "trace_name", "config", "protect", "ops", "memory", "memslots",
                    "vcpus", "hugepages", "engine", "batch_size", "results", "exits", "summary")
_PATH_COLUMNS = ("trace", "protect", "ops", "memslots", "results", "exits", "summary")
_CROSS_KEYS = ("traces", "configs") + tuple(c for c in MANIFEST_COLUMNS
                                            if c not in ("trace", "trace_name", "config"))
ROW_KEY_COLUMNS = ("trace_name", "trace")  # before sppjit sweep's columns
LOOPBACK = "127.0.0.1"  # a local cluster listens here only
CONNECT_TIMEOUT = "10s"  # to reach an existing scheduler


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class FleetTask:
    """One row of a fleet: the trace's name, the configuration and the job that runs it."""

    trace_name: str
    config: Config
    job: object  # sppjit.job.Job

    @property
    def name(self) -> str:
        """``TRACE_NAME/CONFIG``: unique in a fleet."""
        return f"{self.trace_name}/{self.config.label}"

    def described(self) -> dict:
        """The configuration columns of the row, from the job (as sppjit sweep fills them
        from the VM): profile, granularity, subpage_check, hugepages, vcpus, protect, ops."""
        vm, inputs = self.job.vm, self.job.inputs
        return {"profile": vm.profile, "granularity": vm.granularity,
                "subpage_check": vm.subpage_check, "hugepages": vm.hugepages,
                "vcpus": vm.vcpus if vm.vcpus is not None else DEFAULT_VCPUS,
                "protect": inputs.protection, "ops": inputs.timeline}


def read_manifest(source, *, base: str | None = None) -> list[dict]:
    """The manifest's rows as dicts of MANIFEST_COLUMNS (None where not given).

    ``source``: a file (Parquet, Arrow, CSV, a JSON array of rows, JSON Lines, or one JSON
    object with ``traces`` and ``configs`` lists to cross), a pyarrow Table, a list of row
    dicts, or such a dict. Relative paths are taken from ``base``: the manifest file's
    directory, else the current directory. InputError names the bad row or key.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        base = os.path.dirname(os.path.abspath(path)) if base is None else base
        cross = _json_object(path)
        if cross is not None:
            rows = _crossed(cross)
        else:
            from .io.formats import read_table

            rows = _table_rows(read_table(path, "manifest"))
    elif isinstance(source, Mapping):
        rows = _crossed(source)
    elif isinstance(source, (list, tuple)):
        rows = [_checked_row(row, i) for i, row in enumerate(source)]
    elif hasattr(source, "to_pylist"):
        rows = _table_rows(source)
    else:
        raise InputError(f"manifest: a file, a table, a list of rows or a dict, not "
                         f"{type(source).__name__}")
    if not rows:
        raise InputError("manifest: no rows")
    base = os.getcwd() if base is None else base
    return [_resolved(row, base) for row in rows]


def _json_object(path: str) -> Mapping | None:
    """The manifest as one JSON object (the crossed form), or None for any other file."""
    from .io.formats import read_magic

    read_magic(path, "manifest")  # no such file, a directory: one clear error
    try:
        with open(path, encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except (ValueError, UnicodeDecodeError):
        return None  # CSV, Parquet, JSON Lines: read as a table
    except OSError as exc:
        raise InputError(f"manifest: cannot read {path}: {exc.strerror or exc}") from None
    return data if isinstance(data, Mapping) else None


def _table_rows(table) -> list[dict]:
    return [_checked_row(row, i) for i, row in enumerate(table.to_pylist())]


def _checked_row(row, index: int) -> dict:
    if not isinstance(row, Mapping):
        raise InputError(f"manifest: row {index} is not an object")
    unknown = [k for k in row if k not in MANIFEST_COLUMNS]
    if unknown:
        raise InputError(f"manifest: unknown column '{unknown[0]}' (columns: "
                         f"{', '.join(MANIFEST_COLUMNS)})")
    out = {k: row.get(k) for k in MANIFEST_COLUMNS}
    out = {k: (None if isinstance(v, str) and not v.strip() else v) for k, v in out.items()}
    if not isinstance(out["trace"], str):
        raise InputError(f"manifest: row {index}: trace must be a file name, not "
                         f"{out['trace']!r}")
    out["row"] = index
    return out


def _crossed(data: Mapping) -> list[dict]:
    """Every trace of ``traces`` under every configuration of ``configs``; the other keys
    are defaults for every row (a trace given as an object may override them)."""
    unknown = [k for k in data if k not in _CROSS_KEYS]
    if unknown:
        raise InputError(f"manifest: unknown key '{unknown[0]}' (keys: {', '.join(_CROSS_KEYS)})")
    traces, configs = data.get("traces"), data.get("configs", [None])
    if not isinstance(traces, list) or not traces:
        raise InputError("manifest: 'traces' must be a non-empty list")
    if not isinstance(configs, list) or not configs:
        raise InputError("manifest: 'configs' must be a non-empty list")
    defaults = {k: v for k, v in data.items() if k not in ("traces", "configs")}
    for key in ("results", "exits", "summary"):
        if defaults.get(key) is not None:
            raise InputError(f"manifest: '{key}' names one file per row: give it in a "
                             "table manifest, or use --outdir")
    rows = []
    for trace in traces:
        entry = {"trace": trace} if isinstance(trace, str) else trace
        if not isinstance(entry, Mapping):
            raise InputError(f"manifest: a trace is a file name or an object, not {trace!r}")
        for config in configs:
            rows.append({**defaults, **entry, "config": config})
    return [_checked_row(row, i) for i, row in enumerate(rows)]


def _resolved(row: dict, base: str) -> dict:
    """Paths made absolute (workers run in other directories, on other machines)."""
    out = dict(row)
    for key in _PATH_COLUMNS:
        value = out[key]
        if value is None:
            continue
        if not isinstance(value, str):
            raise InputError(f"manifest: row {row['row']}: {key} must be a file name, not "
                             f"{value!r}")
        out[key] = _path(value, base)
    out["base"] = base
    return out


def _path(value: str, base: str) -> str:
    """``value`` taken from ``base`` (``none``, no protection, stays as it is)."""
    if value == NO_PROTECTION:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _bool(value, key: str, where: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InputError(f"{where}: {key} must be true or false, not {value!r}")


def plan(manifest, *, outdir: str | None = None, base: str | None = None,
         engine: str | None = None, batch_size: int | None = None) -> list[FleetTask]:
    """The fleet's tasks, a job per manifest row, checked before any work: configurations,
    names (``TRACE_NAME/CONFIG`` distinct), output paths, no file given twice. The inputs
    are not read here (a bad trace fails its rows, on the workers). ``outdir``: every row
    without outputs of its own writes ``TRACE_NAME.CONFIG.summary.json`` and
    ``TRACE_NAME.CONFIG.exits.parquet`` there."""
    from .io.output import check_output_path
    from .job import Job, JobInputs, JobOutputs, VmSpec

    if outdir is not None:
        outdir = os.path.abspath(os.fspath(outdir))
        if not os.path.isdir(outdir):
            raise InputError(f"outdir: {outdir} is not an existing directory")
    rows = read_manifest(manifest, base=base)
    tasks, seen = [], {}
    for row in rows:
        where = f"manifest: row {row['row']}"
        try:
            config = parse_config(row["config"] if row["config"] is not None else Config())
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        trace_name = row["trace_name"] or _stem(row["trace"])
        if not (isinstance(trace_name, str) and _NAME.match(trace_name)):  # a file name part
            raise InputError(f"{where}: trace_name {trace_name!r} must be letters, digits and "
                             "_ . + @ - (starting with a letter or digit)")
        # A configuration's own files are taken from the manifest's directory too.
        protect = _path(config.protect, row["base"]) if config.protect is not None \
            else row["protect"]
        ops = _path(config.ops, row["base"]) if config.ops is not None else row["ops"]
        hugepages = config.hugepages if config.hugepages is not None else _bool(
            row["hugepages"], "hugepages", where)
        outputs = {"results": row["results"], "exit_log": row["exits"],
                   "summary": row["summary"]}
        task_name = f"{trace_name}/{config.label}"
        if outdir is not None and not any(outputs.values()):
            stem = os.path.join(outdir, f"{trace_name}.{config.label}")
            outputs = {"results": None, "exit_log": stem + ".exits.parquet",
                       "summary": stem + ".summary.json"}
        try:
            job = Job(inputs=JobInputs(trace=row["trace"],
                                       protection=None if protect == NO_PROTECTION else protect,
                                       timeline=ops),
                      vm=VmSpec(memory=row["memory"], memslots=row["memslots"],
                                vcpus=config.vcpus if config.vcpus is not None else (
                                    _int(row["vcpus"], "vcpus", where)),
                                profile=config.profile, hugepages=hugepages,
                                subpage_check=config.subpage_check,
                                granularity=config.granularity),
                      outputs=JobOutputs(**outputs),
                      engine=engine or row["engine"] or DEFAULT_ENGINE,
                      batch_size=batch_size or _int(row["batch_size"], "batch_size", where))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        if task_name in seen:
            raise InputError(f"{where}: {task_name} is row {seen[task_name]} again (give the "
                             "trace a trace_name, or the configuration a name=)")
        seen[task_name] = row["row"]
        for parameter, path in job.outputs.paths():
            if path is not None:
                check_output_path(path, option=f"{where}: {parameter}",
                                  table=parameter in ("results", "exit_log"))
        tasks.append(FleetTask(trace_name, config, job))
    _check_distinct(tasks)
    return tasks


def _check_distinct(tasks: list[FleetTask]) -> None:
    """No output is an input or another output (inputs may repeat: rows share traces and
    protections). By resolved path, in one pass: a fleet may have many thousand rows."""
    seen: dict[str, str] = {}
    for t in tasks:
        for what, path in (("trace", t.job.inputs.trace), ("protect", t.job.inputs.protection),
                           ("ops", t.job.inputs.timeline), ("memslots", t.job.vm.memslots_file)):
            if path is not None:
                seen.setdefault(os.path.realpath(path), f"{t.name} {what}")
    for t in tasks:
        for what, path in t.job.outputs.paths():
            if path is None:
                continue
            key = os.path.realpath(path)
            if key in seen:
                raise InputError(f"{t.name} {what}: {path} is the same file as {seen[key]}")
            seen[key] = f"{t.name} {what}"


def _int(value, key: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{where}: {key} must be a number, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"{where}: {key} must be a number, not {value!r}") from None
    if number != value and not isinstance(value, str):
        raise InputError(f"{where}: {key} must be a whole number, not {value!r}")
    return number


# ----------------------------------------------------------------------------- on a worker

_warm_lock = threading.Lock()
_warm_seconds: float | None = None  # this process's warm-up, once done


def _cache_directory() -> str:
    """Where numba caches the kernels (NUMBA_CACHE_DIR, else __pycache__ beside their
    sources, which is where the lock and the marker go too)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    import importlib.util

    spec = importlib.util.find_spec(f"{__package__}.kernels")
    return os.path.join(list(spec.submodule_search_locations)[0], "__pycache__")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` among the processes of this machine (and of the
    machines that share the file system, where it supports flock); none on Windows."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _cache_listing(directory: str) -> str:
    """The cache's index files (name, size, mtime): changes whenever numba adds or drops an
    entry, or the cache is wiped."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith(".nbi"):
                st = os.stat(os.path.join(root, name))
                found.append(f"{os.path.relpath(os.path.join(root, name), directory)} "
                             f"{st.st_size} {st.st_mtime_ns}")
    return "\n".join(sorted(found))


def warm_worker() -> float:
    """Load (or compile) every kernel a replay uses in this process, once; returns the
    seconds it took (0 after the first call).

    The first process to reach a cache directory holds its file lock while it loads the
    kernels module (sppjit.kernels stamps and, when stale, wipes the cache at import) and
    replays a tiny trace through every kernel path (sppjit.bench.warm_up), compiling what
    the cache lacks; it then records the cache's index files in a marker (per host: a CPU
    model of its own has entries of its own). A later process finding the cache as the
    marker says releases the lock at once and loads in parallel with the others; any
    other finds compiling to do and does it under the lock. numba itself writes each cache
    file to a temporary name and renames it, but reads, extends and rewrites a function's
    index without a lock, so two processes compiling different entries at once could lose
    one or give two entries one data file: the lock is what makes that impossible.
    """
    global _warm_seconds
    with _warm_lock:
        if _warm_seconds is not None:
            return 0.0
        started = time.perf_counter()
        from .bench import warm_up

        directory = _cache_directory()
        try:
            os.makedirs(directory, exist_ok=True)
            lock_path = os.path.join(directory, "sppjit-fleet.lock")
            open(lock_path, "ab").close()
        except OSError:  # a read-only install: numba caches nothing there; nothing shared
            directory = None
        if directory is None:
            warm_up()
        else:
            marker = os.path.join(directory, f"sppjit-fleet-warm.{socket.gethostname()}")
            with contextlib.ExitStack() as held:
                held.enter_context(_file_lock(lock_path))
                from .kernels import _jit

                cached = _jit.NUMBA_CACHE
                warm = cached and _read(marker) == _cache_listing(directory)
                if warm or not cached:
                    held.close()  # loads only (or private compiles): in parallel
                warm_up()
                if cached and not warm:
                    from .io.atomic import atomic_path

                    with atomic_path(marker) as temporary, open(temporary, "w") as f:
                        f.write(_cache_listing(directory))
        _warm_seconds = time.perf_counter() - started
        return _warm_seconds


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def error_line(exc: BaseException) -> str:
    """The one line the command line prints for ``exc`` (without ``sppjit: error:``)."""
    from .errors import ERRNO_NAMES

    if isinstance(exc, SppError):
        return f"{exc.strerror} ({ERRNO_NAMES.get(exc.errno, f'errno {exc.errno}')})"
    if isinstance(exc, (InputError, VmEntryError)):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    else:
        text = f"internal error: {type(exc).__name__}: {exc}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_task(job: dict) -> dict:
    """Run one fleet job on a worker (``job``: Job.to_dict()): its summary (the contract's
    JSON) and the paths written, or the error line; with the worker's host, process and
    seconds (warm-up apart)."""
    return run_tasks([job])[0]


def run_tasks(jobs: list[dict]) -> list[dict]:
    """Run fleet jobs on a worker, each trace they share read once (sppjit.job.run_many): a
    dict each, as run_task gives; ``seconds`` is the job's share of the call (the jobs of a
    trace replay batch by batch in turn, so no job has a wall clock of its own)."""
    from .job import Job, run_many

    warm = warm_worker()
    started = time.perf_counter()
    outs, parsed = [], {}
    for k, job in enumerate(jobs):
        outs.append({"summary": None, "written": [], "note": None, "error": None,
                     "host": socket.gethostname(), "pid": os.getpid(),
                     "warm_seconds": warm if k == 0 else 0.0})
        try:
            parsed[k] = Job.from_dict(job)
        except Exception as exc:  # noqa: BLE001 - the row records it; the other jobs go on
            outs[k]["error"] = error_line(exc)
    for k, result in zip(parsed, run_many(list(parsed.values()))):
        if isinstance(result, BaseException):
            outs[k]["error"] = error_line(result)
        else:
            outs[k].update(summary=result.summary.to_dict(), written=list(result.written),
                           note=result.note)
    share = (time.perf_counter() - started) / max(1, len(jobs))
    for out in outs:
        out["seconds"] = share
    return outs


# ----------------------------------------------------------------------------- the fleet

@dataclass
class FleetResult:
    """``table``: a row per task, in manifest order (ROW_KEY_COLUMNS, then sppjit sweep's
    columns). ``summaries``: task name -> its summary. ``errors``: task name -> the error
    line of a row that failed. ``tasks``: the plan. ``document``: all of it as JSON data,
    with the cluster and the wall clock."""

    table: object  # pyarrow.Table
    tasks: list[FleetTask]
    summaries: dict[str, dict]
    errors: dict[str, str]
    document: dict


def table_schema():
    """The fleet table's columns: the trace's name and path, then sppjit sweep's."""
    import pyarrow as pa

    from .sweep import table_schema as sweep_schema

    schema = sweep_schema()
    fields = [pa.field("trace_name", pa.string(), nullable=False),
              pa.field("trace", pa.string(), nullable=False)]
    return pa.schema(fields + list(schema), metadata=schema.metadata)


def fleet_row(task: FleetTask, summary: dict | None, error: str | None = None) -> dict:
    """The task's row: its trace, then sppjit sweep's row for its configuration."""
    from .sweep import summary_row

    return {"trace_name": task.trace_name, "trace": task.job.inputs.trace,
            **summary_row(task.config.label, task.described(), summary, error)}


def _dask():
    try:
        import distributed
    except ImportError:
        raise InputError(DASK_MISSING) from None
    return distributed


@contextlib.contextmanager
def _client(scheduler, workers: int | None) -> Iterator[tuple[object, dict]]:
    """A client: the one given, one connected to ``scheduler`` (an address), or one of a
    LocalCluster of ``workers`` processes (default: the cores) on the loopback interface."""
    distributed = _dask()
    if scheduler is not None and workers is not None:
        raise InputError("scheduler and workers cannot be given together (workers starts a "
                         "local cluster)")
    if isinstance(scheduler, distributed.Client):
        yield scheduler, {"scheduler": scheduler.scheduler.address, "local": False}
        return
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise InputError(f"scheduler: cannot connect to {scheduler}: {reason}") from None
        with client:
            yield client, {"scheduler": str(scheduler), "local": False}
        return
    with local_cluster(workers) as cluster, distributed.Client(cluster) as client:
        yield client, {"scheduler": cluster.scheduler_address, "local": True,
                       "workers": len(cluster.workers)}


@contextlib.contextmanager
def local_cluster(workers: int | None = None):
    """A LocalCluster of ``workers`` processes (default: the cores), one thread each (a job
    is one replay on one core), reachable from this machine only: the scheduler, the
    nannies, the workers and their HTTP servers (health and metrics routes, no dashboard)
    listen on 127.0.0.1, at ports the system picks. The workers' log lines stay out of the
    caller's output."""
    import logging

    distributed = _dask()
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise InputError(f"workers must be at least 1, not {workers}")
    count = int(workers) if workers is not None else (os.cpu_count() or 1)
    with distributed.LocalCluster(
            n_workers=count, threads_per_worker=1, processes=True, host=LOOPBACK,
            dashboard_address=None, scheduler_kwargs={"dashboard_address": f"{LOOPBACK}:0"},
            silence_logs=logging.ERROR) as cluster:
        yield cluster


def fleet(manifest, *, scheduler=None, workers: int | None = None, outdir: str | None = None,
          engine: str | None = None, batch_size: int | None = None, base: str | None = None,
          jobs_per_task: int | None = None,
          progress: Callable[[int, int, dict], None] | None = None) -> FleetResult:
    """Run every (trace, configuration) of ``manifest`` as a job on a Dask cluster; see the
    module docstring.

    ``manifest``: what read_manifest takes. ``scheduler``: a scheduler's address or a
    distributed.Client (an existing cluster); else ``workers`` processes (default: the
    cores) in a LocalCluster started for this fleet and closed after it. ``outdir``: the
    directory of the rows' summaries and exit logs (plan). ``engine`` and ``batch_size``
    override the manifest's. ``jobs_per_task``: at most this many jobs of one trace run
    together in a task, reading the trace once (task_groups; default
    default_jobs_per_task). ``progress(done, total, row)`` is called as rows complete.
    InputError for a bad manifest, before any job runs; a failing job fails its row only.
    """
    started = time.perf_counter()
    tasks = plan(manifest, outdir=outdir, base=base, engine=engine, batch_size=batch_size)
    if jobs_per_task is not None:
        task_groups([], jobs_per_task)  # a bad value: before the cluster starts
    distributed = _dask()
    outcomes: list[dict | None] = [None] * len(tasks)
    with _client(scheduler, workers) as (client, cluster):
        connected = time.perf_counter()
        jobs = [t.job.to_dict() for t in tasks]
        threads = sum(client.nthreads().values()) or 1
        if jobs_per_task is None:
            jobs_per_task = default_jobs_per_task(len(tasks), threads)
        parts = task_groups(tasks, jobs_per_task)
        # Keys fixed by the jobs and their rows: a retried task keeps its key, and so its rows.
        futures = [client.submit(run_tasks, [jobs[i] for i in part],
                                 key=_task_key(tasks, jobs, part), pure=False) for part in parts]
        index = {f.key: part for f, part in zip(futures, parts)}
        done = 0
        try:
            for future in distributed.as_completed(futures):
                part = index[future.key]
                try:
                    results = future.result()
                except Exception as exc:  # the task itself never raises: its worker died
                    results = [{"summary": None, "error": _lost(exc)} for _ in part]
                for i, outcome in zip(part, results):
                    outcomes[i] = outcome
                    done += 1
                    if progress is not None:
                        progress(done, len(tasks), _row(tasks[i], outcome))
        finally:
            for future in futures:
                future.release()
        workers_seen = len(client.nthreads())
    finished = time.perf_counter()
    task_of = {i: k for k, part in enumerate(parts) for i in part}
    rows = [_row(t, o) for t, o in zip(tasks, outcomes)]
    summaries = {t.name: o["summary"] for t, o in zip(tasks, outcomes) if o["summary"]}
    errors = {t.name: o["error"] for t, o in zip(tasks, outcomes) if o["error"]}
    import pyarrow as pa

    document = {
        "manifest": os.fspath(manifest) if isinstance(manifest, (str, os.PathLike)) else None,
        "cluster": {**cluster, "workers_seen": workers_seen},
        "seconds": {"start": connected - started, "run": finished - connected,
                    "total": finished - started},
        "jobs_per_task": jobs_per_task,
        # a row per job; "task": the index of the Dask task that ran it (with the other
        # jobs of its trace, task_groups), "seconds": its share of that task
        "tasks": [{"name": t.name, "task": task_of[i], "host": o.get("host"),
                   "pid": o.get("pid"), "seconds": o.get("seconds"),
                   "warm_seconds": o.get("warm_seconds"), "written": o.get("written", []),
                   "note": o.get("note")}
                  for i, (t, o) in enumerate(zip(tasks, outcomes))],
        "rows": rows,
        "summaries": summaries,
    }
    return FleetResult(table=pa.Table.from_pylist(rows, schema=table_schema()), tasks=tasks,
                       summaries=summaries, errors=errors, document=document)


def default_jobs_per_task(jobs: int, threads: int) -> int:
    """Jobs of one trace a task runs together, by default: as many as still leave two tasks
    for each of the cluster's worker threads (so that no worker idles while another has a
    queue), which on 2 workers puts compare's three configurations of a trace in one task."""
    return max(1, -(-jobs // (2 * max(1, threads))))


def task_groups(tasks: list[FleetTask], per_task: int) -> list[list[int]]:
    """The fleet's tasks as lists of row indices: the rows of each trace, in manifest order,
    cut into runs of at most ``per_task`` (the trace's first row decides its place)."""
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise InputError(f"jobs per task must be a positive number, not {per_task!r}")
    by_trace: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_trace.setdefault(t.job.inputs.trace, []).append(i)
    return [rows[k:k + per_task] for rows in by_trace.values()
            for k in range(0, len(rows), per_task)]


def _task_key(tasks: list[FleetTask], jobs: list[dict], part: list[int]) -> str:
    """The task's key: its first row's name, its size, a token of its jobs (unique)."""
    from dask.base import tokenize

    first = tasks[part[0]].name
    return f"sppjit-fleet-{first}-{len(part)}-{tokenize(first, [jobs[i] for i in part])}"


def _row(task: FleetTask, outcome: dict) -> dict:
    return fleet_row(task, outcome["summary"], outcome["error"])


def _lost(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return ("worker lost: every worker that ran this job died (Dask's "
                "distributed.scheduler.allowed-failures retries spent)")
    return f"task failed on the cluster: {name}: {error_line(exc)}"


# ----------------------------------------------------------------------------- the printer

_COLUMNS = (  # (heading, row key)
    ("trace", "trace_name"), ("name", "name"), ("profile", "profile"),
    ("gran", "granularity"), ("check", "subpage_check"), ("protect", "protect"),
    ("accesses", "accesses"), ("exits", "exits"), ("violations", "spp_violation"),
    ("touched", "pages_touched"), ("M acc/s", "accesses_per_second"),
)
_LEFT = {"trace_name", "name", "profile", "granularity", "subpage_check", "protect"}


def format_fleet(document: dict, written: list[str] | None = None) -> str:
    """A header, one line per job, then the errors."""
    cluster, rows = document["cluster"], document["rows"]
    kind = "local cluster" if cluster.get("local") else "cluster"
    failed = sum(r["error"] is not None for r in rows)
    out = (f"fleet    {len(rows)} jobs on a {kind} of {cluster['workers_seen']} workers "
           f"({cluster['scheduler']}), {document['seconds']['total']:.1f} s"
           f"{f', {failed} failed' if failed else ''}\n\n")
    out += format_rows(rows, _COLUMNS, left=_LEFT)
    for r in rows:
        if r["error"] is not None:
            out += f"error    {r['trace_name']}/{r['name']}: {r['error']}\n"
    if written:
        out += f"\nwrote    {', '.join(written)}\n"
    return out


# ``sppjit.fleet(...)`` calls fleet(); the module's other names stay reachable.
make_callable(__name__, "fleet")

__all__ = ["FleetResult", "FleetTask", "MANIFEST_COLUMNS", "default_jobs_per_task", "fleet",
           "fleet_row", "plan", "read_manifest", "run_task", "run_tasks", "table_schema",
           "task_groups", "warm_worker"]
