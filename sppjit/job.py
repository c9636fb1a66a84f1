"""A replay job: the whole of ``sppjit replay`` as one library call, and what a worker receives.

A ``Job`` says everything a replay needs, in frozen dataclasses that round-trip through JSON
(``Job.to_json`` / ``Job.from_json``): the VM (``VmSpec``: everything ``VM(...)`` takes,
memslots from a file or a list), the inputs (``JobInputs``: the trace, the protection in
either form, the timeline), the outputs (``JobOutputs``: per-access results, the exit log,
the summary, the saved state), the engine and the batch size.

- ``check(job)`` does every check the replay does before any work: options, output paths,
  no file given twice, every input read and checked, the VM built and the protection placed.
- ``run(job, progress=None)`` does them, replays, and writes the outputs all or nothing (a
  failed or interrupted run leaves none of them); it returns a ``JobResult``: the typed
  summary, the paths written and any note for the user (a trace generated for another VM).

Equal jobs give byte-identical results and exit logs, and summaries equal apart from timings
(``ReplaySummary.without_timings``). Errors are InputError naming the job's parameters
(``memory``, ``results``, ...); ``names`` maps them to what the caller calls them (the
command line passes its option names, so ``--memory`` and ``--out`` appear instead).
Nothing here prints or knows the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .defaults import (
    DEFAULT_ENGINE,
    DEFAULT_GRANULARITY,
    DEFAULT_MEMORY,
    DEFAULT_PROFILE,
    DEFAULT_SUBPAGE_CHECK,
    ENGINES,
    MAX_VCPUS,
    default_batch_size,
)
from .errors import InputError

if TYPE_CHECKING:  # the summary module loads numpy; a job is described without it
    from .summary import ReplaySummary

JOB_KIND = "replay"
JOB_SCHEMA_VERSION = 1

Progress = Callable[[int, "int | None"], None]  # (rows done, rows in the trace or None)


@dataclass(frozen=True)
class VmSpec:
    """The VM a job replays on: every argument of sppjit.vm.VM. ``memory`` and ``vcpus`` left
    None take the defaults (4GiB, 1) and let the job suggest the VM a generated trace was made
    for; ``memslots`` is a file (CSV, JSON, Parquet) or (base_gfn, npages) pairs."""

    memory: str | int | None = None
    memslots: str | tuple[tuple[int, int], ...] | None = None
    vcpus: int | None = None
    profile: str = DEFAULT_PROFILE
    hugepages: bool = False
    subpage_check: str = DEFAULT_SUBPAGE_CHECK
    granularity: str = DEFAULT_GRANULARITY
    spp_supported: bool = True
    nested: bool = False
    table_capacity: int | None = None

    def __post_init__(self):
        if self.memslots is not None and not isinstance(self.memslots, (str, os.PathLike)):
            try:
                pairs = tuple((int(b), int(n)) for b, n in self.memslots)
            except (TypeError, ValueError):
                raise InputError("memslots must be a file or (base_gfn, npages) pairs") from None
            object.__setattr__(self, "memslots", pairs)
        elif isinstance(self.memslots, os.PathLike):
            object.__setattr__(self, "memslots", os.fspath(self.memslots))

    @property
    def memslots_file(self) -> str | None:
        return self.memslots if isinstance(self.memslots, str) else None


@dataclass(frozen=True)
class JobInputs:
    """What is replayed: the trace (Parquet file or directory, Arrow IPC file or stream), the
    protection placed before the first access (a file of access maps or of byte ranges: the
    form is read from its columns) and the timeline of control-plane operations.

    Instead of ``protection``, a whole VM's protection can be given by guest-virtual address
    (``protect_virtual`` through the page ``mapping`` a converter wrote) or by guest-kernel
    symbol (``protect_symbols`` placed through the ``symbols`` map, ``phys_base`` added):
    see sppjit.io.symbols.resolve_protection."""

    trace: str
    protection: str | None = None
    timeline: str | None = None
    protect_virtual: str | None = None
    mapping: str | None = None
    protect_symbols: str | None = None
    symbols: str | None = None
    phys_base: int | None = None

    def resolve(self):
        """The whole-VM protection as (protection, label), or None when none is given."""
        from .io.symbols import resolve_protection

        resolved = resolve_protection(
            protect=self.protection, protect_virtual=self.protect_virtual,
            mapping=self.mapping, protect_symbols=self.protect_symbols,
            symbols=self.symbols, phys_base=self.phys_base)
        return None if resolved is None else (resolved.protection, resolved.label)


# The files of whole-VM protection (JobInputs), checked and hashed like the others.
WHOLE_VM_PROTECTION_FILES = ("protect_virtual", "mapping", "protect_symbols", "symbols")


@dataclass(frozen=True)
class JobOutputs:
    """Where the results go (each None: not written). ``results`` and ``exit_log`` are
    .parquet or .arrow tables, ``summary`` JSON, ``saved_state`` a .npz VM state."""

    results: str | None = None
    exit_log: str | None = None
    summary: str | None = None
    saved_state: str | None = None

    def paths(self) -> list[tuple[str, str | None]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def _paths(obj) -> Any:
    """Paths as plain strings, so that equal jobs compare (and serialise) equal."""
    changes = {f.name: os.fspath(getattr(obj, f.name)) for f in fields(obj)
               if isinstance(getattr(obj, f.name), os.PathLike)}
    return dataclasses.replace(obj, **changes) if changes else obj


@dataclass(frozen=True)
class Job:
    """One replay: inputs, VM, outputs, engine, batch size (None: the engine's default) and the
    threads replaying each batch (1: serial; N or "auto": sharded, docs/parallel.md)."""

    inputs: JobInputs
    vm: VmSpec = field(default_factory=VmSpec)
    outputs: JobOutputs = field(default_factory=JobOutputs)
    engine: str = DEFAULT_ENGINE
    batch_size: int | None = None
    threads: int | str = 1

    def __post_init__(self):
        object.__setattr__(self, "inputs", _paths(self.inputs))
        object.__setattr__(self, "outputs", _paths(self.outputs))

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        vm = dataclasses.asdict(self.vm)
        if isinstance(self.vm.memslots, tuple):
            vm["memslots"] = [list(pair) for pair in self.vm.memslots]
        return {"job": JOB_KIND, "schema_version": JOB_SCHEMA_VERSION,
                "inputs": dataclasses.asdict(self.inputs), "vm": vm,
                "outputs": dataclasses.asdict(self.outputs), "engine": self.engine,
                "batch_size": self.batch_size, "threads": self.threads}

    @classmethod
    def from_dict(cls, data: Mapping) -> Job:
        if not isinstance(data, Mapping):
            raise InputError(f"job: expected an object, not {type(data).__name__}")
        if data.get("job", JOB_KIND) != JOB_KIND:
            raise InputError(f"job: not a {JOB_KIND} job: {data.get('job')!r}")
        if data.get("schema_version", JOB_SCHEMA_VERSION) != JOB_SCHEMA_VERSION:
            raise InputError(f"job: schema_version {data.get('schema_version')!r} is not "
                             f"{JOB_SCHEMA_VERSION}")
        _known("job", data, {"job", "schema_version", "inputs", "vm", "outputs", "engine",
                             "batch_size", "threads"})
        if "inputs" not in data:
            raise InputError("job: missing key 'inputs'")
        return cls(inputs=_part(JobInputs, data["inputs"], "inputs"),
                   vm=_part(VmSpec, data.get("vm", {}), "vm"),
                   outputs=_part(JobOutputs, data.get("outputs", {}), "outputs"),
                   engine=data.get("engine", DEFAULT_ENGINE),
                   batch_size=data.get("batch_size"), threads=data.get("threads", 1))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Job:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"job: not JSON ({exc})") from None
        return cls.from_dict(data)


def _known(what: str, data: Mapping, allowed) -> None:
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise InputError(f"{what}: unknown key '{unknown[0]}'")


def _part(cls, data, what: str):
    if not isinstance(data, Mapping):
        raise InputError(f"job: {what} must be an object, not {type(data).__name__}")
    _known(what, data, {f.name for f in fields(cls)})
    try:
        return cls(**data)
    except TypeError as exc:  # a required key missing
        raise InputError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class JobResult:
    """What a run gives back: the summary, the paths written (in the order results, exit
    log, saved state, summary) and a note for the user, or None."""

    summary: ReplaySummary
    written: tuple[str, ...]
    note: str | None = None


# ---------------------------------------------------------------- names in messages

class _Names:
    """The name of each job parameter in messages: its own, or the caller's (``names``)."""

    def __init__(self, names: Mapping[str, str] | None):
        self._names = dict(names or {})

    def __call__(self, parameter: str) -> str:
        return self._names.get(parameter, parameter)


# ---------------------------------------------------------------- checks

def _check_options(job: Job, name: _Names) -> None:
    """The checks that read no file: options, output paths, no file given twice."""
    from .io.atomic import check_distinct
    from .io.output import check_output_path
    from .io.sizes import parse_size

    spec = job.vm
    if spec.memory is not None and spec.memslots is not None:
        raise InputError(f"{name('memory')} and {name('memslots')} cannot be used together "
                         f"({name('memslots')} defines the memory)")
    if spec.memory is not None:
        parse_size(spec.memory, name=name("memory"))
    if spec.vcpus is not None and not (isinstance(spec.vcpus, int)
                                       and 1 <= spec.vcpus <= MAX_VCPUS):
        raise InputError(f"{name('vcpus')} must be 1..{MAX_VCPUS}, not {spec.vcpus}")
    if job.engine not in ENGINES:
        raise InputError(f"{name('engine')} must be one of {', '.join(ENGINES)}, "
                         f"not {job.engine!r}")
    if job.batch_size is not None and not (isinstance(job.batch_size, int)
                                           and job.batch_size >= 1):
        raise InputError(f"{name('batch_size')} must be a positive number of rows, "
                         f"not {job.batch_size!r}")
    from .shards import MAX_THREADS, parse_threads  # numba: loaded when a job is checked

    try:
        parse_threads(job.threads)
    except InputError:
        raise InputError(f"{name('threads')} must be 1..{MAX_THREADS} or 'auto', "
                         f"not {job.threads!r}") from None
    outputs = job.outputs
    for parameter, path, table in (("results", outputs.results, True),
                                   ("exit_log", outputs.exit_log, True),
                                   ("summary", outputs.summary, False),
                                   ("saved_state", outputs.saved_state, False)):
        if path is not None:
            check_output_path(path, option=name(parameter), table=table)
    inputs = job.inputs
    from .io.symbols import check_protection_options

    check_protection_options(
        protect=inputs.protection, protect_virtual=inputs.protect_virtual,
        mapping=inputs.mapping, protect_symbols=inputs.protect_symbols,
        symbols=inputs.symbols, phys_base=inputs.phys_base)
    check_distinct([(name("trace"), inputs.trace), (name("protection"), inputs.protection),
                    (name("timeline"), inputs.timeline), (name("memslots"), spec.memslots_file),
                    *((name(p), getattr(inputs, p)) for p in WHOLE_VM_PROTECTION_FILES),
                    *((name(p), path) for p, path in outputs.paths())])


@dataclass
class _Opened:
    """A checked job, ready to replay."""

    reader: Any
    vm: Any
    hooks: Any
    timeline: list
    protection_info: dict | None
    vm_from: dict  # memory, vcpus -> option, trace, default or memslots
    top: int = 0  # one past the highest byte the trace accessed


def _batch_size(job: Job) -> int:
    return job.batch_size or default_batch_size(job.engine)


def _open(job: Job, name: _Names) -> _Opened:
    """Read and check every input, build the VM and place the protection (each reader
    raises InputError naming the file, column and row)."""
    from .io.memslots import read_memslots
    from .io.ops import read_ops
    from .io.trace import open_trace
    from .protection import apply_protection, hook_index, load_protection, protection_info
    from .provenance import vm_settings
    from .vm import VM

    spec, inputs = job.vm, job.inputs
    batch_size = _batch_size(job)
    # The memory and vCPUs the trace records (sppjit generate) are the defaults: a trace
    # replayed on a smaller VM than it was made for would give wrong answers with exit 0.
    schema = open_trace(inputs.trace, batch_size=batch_size).schema
    memory, vcpus, vm_from = vm_settings(schema, memory=spec.memory, memslots=spec.memslots,
                                         vcpus=spec.vcpus)
    reader = open_trace(inputs.trace, batch_size=batch_size, vcpus=vcpus)
    if reader.num_rows == 0:
        raise InputError("trace: no rows")
    slots = spec.memslots
    if isinstance(slots, str):
        slots = read_memslots(slots)
    protection, label = None, inputs.protection
    if inputs.protection is not None:
        protection, _ = load_protection(inputs.protection)
    elif (whole_vm := inputs.resolve()) is not None:
        protection, label = whole_vm
    timeline = read_ops(inputs.timeline) if inputs.timeline is not None else []
    vm = VM(memory=memory if memory is not None else DEFAULT_MEMORY, vcpus=vcpus,
            profile=spec.profile, hugepages=spec.hugepages, subpage_check=spec.subpage_check,
            granularity=spec.granularity, spp_supported=spec.spp_supported, nested=spec.nested,
            memslots=slots, table_capacity=spec.table_capacity)
    if timeline:
        vm.init_spp()  # the VMM enables SPP before its first set, as the protection does
    info = None
    if protection is not None:
        maps = apply_protection(vm, protection)
        info = protection_info(protection, label, maps)
    return _Opened(reader=reader, vm=vm, hooks=hook_index(protection), timeline=timeline,
                   protection_info=info, vm_from=vm_from)


def check(job: Job, *, names: Mapping[str, str] | None = None) -> None:
    """Every check ``run`` does before any work; InputError for the first that fails."""
    name = _Names(names)
    _check_options(job, name)
    _open(job, name)


# ---------------------------------------------------------------- run

def run(job: Job, progress: Progress | None = None, *,
        names: Mapping[str, str] | None = None) -> JobResult:
    """Check, replay and write the job's outputs, all or nothing; see the module docstring.
    ``progress(rows_done, rows_total)`` is called after every batch."""
    from .io.readahead import ReadAhead
    from .provenance import BackgroundDigests

    name = _Names(names)
    _check_options(job, name)
    # The inputs are hashed for the summary on another thread, from now on: a large trace
    # takes about as long to hash as to replay, and the reading and checks below overlap it.
    digests = BackgroundDigests(_digested(job))
    opened = _open(job, name)
    with _JobRun(job, opened, name) as one:
        # The next batches are read and checked on another thread while this one replays.
        with ReadAhead(opened.reader) as batches:
            for batch in batches:
                one.step(batch)
                if progress is not None:
                    progress(one.session.rows, opened.reader.num_rows)
        return one.finish(digests.result())


def run_many(jobs: list[Job], *, names: Mapping[str, str] | None = None) -> list:
    """Run several jobs, reading each trace they share once: what ``run`` gives for each
    job (its JobResult, or the exception it raises), in the order of ``jobs``.

    Jobs that replay the same trace with the same batch size on the same number of vCPUs
    (what the reader checks the rows against) form a group: each batch is read and checked
    once, then replayed by every job of the group in turn, on this thread (a fleet's worker
    runs the configurations of one trace so: sppjit.fleet). The jobs still fail one by one,
    as each would alone: a job's bad option or protection file, or its VM entry failure,
    fails that job only (its outputs are rolled back, as run's are); a bad row of the trace
    fails every job of the group still replaying, with the error each would give. Every
    input file is hashed once, on one thread. An interrupt rolls back every unfinished job
    and is raised."""
    from .io.readahead import ReadAhead
    from .provenance import BackgroundDigests

    name = _Names(names)
    results: list = [None] * len(jobs)
    digested = [_digested(job) for job in jobs]
    digests = BackgroundDigests({path: path for files in digested for path in files.values()
                                 if path is not None})
    groups: dict[tuple, list[int]] = {}
    opened: dict[int, _Opened] = {}
    for k, job in enumerate(jobs):
        try:
            _check_options(job, name)
            opened[k] = _open(job, name)
        except Exception as exc:  # noqa: BLE001 - that job's failure, as run(job) raises it
            results[k] = exc
            continue
        key = (os.path.realpath(job.inputs.trace), _batch_size(job), opened[k].vm.config.vcpus)
        groups.setdefault(key, []).append(k)
    for members in groups.values():
        runs: dict[int, _JobRun] = {}
        try:
            for k in members:
                try:
                    runs[k] = _JobRun(jobs[k], opened[k], name)
                except Exception as exc:  # noqa: BLE001 - an output it cannot open
                    results[k] = exc
            if runs:
                with ReadAhead(opened[members[0]].reader) as batches:
                    for batch in batches:
                        for k in list(runs):
                            try:
                                runs[k].step(batch)
                            except Exception as exc:  # noqa: BLE001 - this job fails alone
                                runs.pop(k).fail(exc)
                                results[k] = exc
                        if not runs:
                            break
        except Exception as exc:  # noqa: BLE001 - the trace itself: every job still replaying
            for k in list(runs):
                runs.pop(k).fail(exc)
                results[k] = exc
        except BaseException as exc:
            for each in runs.values():
                each.fail(exc)
            raise
        pending = list(runs)
        files = digests.result() if pending else {}
        while pending:
            k = pending.pop(0)
            try:
                results[k] = runs[k].finish({label: files[path] for label, path
                                             in digested[k].items() if path is not None})
            except Exception as exc:  # noqa: BLE001 - rolled back by finish
                results[k] = exc
            except BaseException as exc:
                for later in pending:
                    runs[later].fail(exc)
                raise
    digests.result()  # the thread ends before the call returns
    return results


def _digested(job: Job) -> dict[str, str | None]:
    """The job's input files the summary records digests of, by label."""
    inputs = job.inputs
    return {"trace": inputs.trace, "protect": inputs.protection, "ops": inputs.timeline,
            "memslots": job.vm.memslots_file,
            **{p: getattr(inputs, p) for p in WHOLE_VM_PROTECTION_FILES
               if getattr(inputs, p) is not None}}


def _top(batch, memory: int) -> int:
    """One past the highest byte a batch accesses in RAM: a whole-VM trace's device accesses
    (flags bit 0, sppjit.convert.physical.FLAG_DEVICE) are MMIO on purpose. 0 when no access
    of the batch can end beyond ``memory`` (the trace check's gpa maximum tells, without a
    pass over the batch): mmio_note only needs a top beyond memory."""
    import numpy as np

    from .io.trace import MAX_ACCESS_SIZE

    if batch.gpa_max is not None and batch.gpa_max + MAX_ACCESS_SIZE <= memory:
        return 0

    ends = batch.gpa + batch.size
    names = batch.record_batch.schema.names
    if "flags" in names:
        from .convert.physical import FLAG_DEVICE, FLAG_ROM_OFFSET

        flags = batch.record_batch.column(names.index("flags")).to_numpy(zero_copy_only=False)
        ends = ends[(flags & (FLAG_DEVICE | FLAG_ROM_OFFSET)) == 0]
    return int(np.max(ends)) if len(ends) else 0


def _memory_bytes(vm) -> int:
    """One past the guest's highest memslot byte."""
    return max(base + n for base, n in vm.config.memslots) << 12


def mmio_note(summary: ReplaySummary, top: int, vm, *, one_slot: bool) -> str | None:
    """With memory as one slot from gfn 0 (no memslots file), accesses beyond it are MMIO:
    most likely the trace needs more memory. The note says how much would cover every
    access (``top``: one past the highest byte accessed)."""
    from .io.sizes import format_size

    mmio = summary.counts.mmio
    memory = _memory_bytes(vm)
    if not one_slot or mmio == 0 or top <= memory:
        return None  # MMIO from a deleted memslot, not from too little memory
    mib = 1 << 20
    cover = -(-top // mib) * mib
    return (f"{mmio:,} access{'es' if mmio != 1 else ''} fell outside the guest's memory and "
            f"{'were' if mmio != 1 else 'was'} treated as MMIO; --memory {format_size(cover)} "
            "would cover them (or --memslots for a layout with holes)")


class _JobRun:
    """One job's replay session and outputs, fed a batch at a time: ``run`` drives one over
    its own reader, ``run_many`` several over one reading of their trace. Its files are
    published by ``finish`` into an Outputs of its own (entered only while it publishes, so
    that the runs of a group keep apart), all of them or, when the job fails, none."""

    def __init__(self, job: Job, opened: _Opened, name: _Names):
        from .io.atomic import Outputs
        from .io.output import TableWriter
        from .replay import Replay, discard_exits

        self.job, self.opened, self.name = job, opened, name
        self.outputs = Outputs()
        self.tables = contextlib.ExitStack()  # the output tables' writers
        self._ended = False
        self._one_slot = job.vm.memslots is None
        self._memory = _memory_bytes(opened.vm)
        self._results = None  # the per-access results' writer, opened by the first batch
        self.session = Replay(opened.vm, engine=job.engine, on_exits=discard_exits,
                              hooks=opened.hooks, ops=list(opened.timeline), threads=job.threads)
        exits = job.outputs.exit_log
        if exits is not None:
            try:
                self.tables.push(self.outputs.track(exits))  # runs after the writer's exit
                writer = self.tables.enter_context(
                    TableWriter(exits, self.session.exit_schema, option=name("exit_log")))
            except BaseException as exc:
                self.fail(exc)
                raise
            self.session.on_exits = writer.write_batch

    def __enter__(self) -> _JobRun:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if not self._ended:
            self.fail(error if error is not None else RuntimeError("the run did not finish"))

    def step(self, batch) -> None:
        """Replay one batch, writing its per-access results if the job keeps them."""
        from .io.output import TableWriter

        out = self.job.outputs.results
        if self._one_slot and len(batch):  # for the MMIO note (mmio_note)
            self.opened.top = max(self.opened.top, _top(batch, self._memory))
        result = self.session.run(batch, keep=out is not None)
        if out is not None:
            if self._results is None:  # the schema is the first result's
                self.tables.push(self.outputs.track(out))
                self._results = self.tables.enter_context(
                    TableWriter(out, result.schema, option=self.name("results")))
            self._results.write_batch(result)

    def finish(self, digests: dict[str, str] | None) -> JobResult:
        """Publish the outputs (tables, saved state, summary) and give the job's result;
        on any failure none of them is left."""
        from .io.formats import trace_format
        from .io.output import write_json_atomic
        from .provenance import generator_info
        from .summary import ReplaySummary

        job, opened, session = self.job, self.opened, self.session
        outputs, paths = self.outputs, job.outputs
        try:
            if session.rows == 0:
                raise InputError("trace: no rows")
            with outputs.current():
                self.tables.close()  # the writers publish their tables
                summary = session.summary(
                    {"path": job.inputs.trace, "format": trace_format(job.inputs.trace)},
                    digests, generator_info(opened.reader.schema))
                summary["config"].update({
                    "engine": job.engine, "protection": opened.protection_info,
                    "memslots_file": job.vm.memslots_file, "ops_file": job.inputs.timeline,
                    "vm_from": opened.vm_from})
                if paths.saved_state is not None:
                    from .savestate import save_state

                    save_state(opened.vm, paths.saved_state)
                    outputs.add(paths.saved_state)
                if paths.summary is not None:
                    write_json_atomic(paths.summary, summary)
                    outputs.add(paths.summary)
        except BaseException as exc:
            self.fail(exc)
            raise
        self._ended = True
        outputs.end(failed=False)
        written = [path for path in (paths.results, paths.exit_log, paths.saved_state,
                                     paths.summary)
                   if path is not None and path in outputs.committed]
        typed = ReplaySummary.from_dict(summary)
        return JobResult(summary=typed, written=tuple(written),
                         note=mmio_note(typed, opened.top, opened.vm,
                                        one_slot=self._one_slot))

    def fail(self, error: BaseException) -> None:
        """Drop every output: the writers' temporaries, anything already published."""
        if self._ended:
            return
        self._ended = True
        try:
            self.tables.__exit__(type(error), error, error.__traceback__)
        finally:
            self.outputs.end(failed=True)
