"""Sweeps: many configurations replayed over one pass of a trace.

The work users do is rarely one replay: it is the same trace under several profiles,
granularities, sub-page checks, huge-page settings or protections. ``sweep`` reads and decodes
the trace once and hands each batch to every configuration's replay session (one VM, one
state each) on a pool of threads. The kernels release the GIL, so the configurations replay
on as many cores as there are threads, and the trace's batches are shared read-only by all.

Pieces, each usable on its own (a sharded replay or a fleet reuses them):

- ``Config``: one configuration as plain data (a frozen dataclass of strings, ints and
  bools; ``as_dict`` / ``parse_config`` round-trip it through a dict or a spec string such
  as ``"profile=v12,granularity=page,protect=hooks.parquet"``).
- ``Lane``: one replay session plus what to do with its outputs.
- ``run_lanes(reader, lanes, threads)``: the runner. Each lane takes the batches in trace
  order on its own state; a lane never waits for the others except through the bounded
  window of decoded batches (``LOOKAHEAD``), so three configurations on two cores keep both
  busy instead of idling at a barrier after every batch. Results do not depend on the
  schedule: every lane sees the same batches in the same order.
- ``summary_table(names, configs, summaries)``: a row per configuration with its summary's
  figures.

Every output is the one a serial replay of that configuration alone gives (tests/test_sweep.py
checks it); only the timing columns (``seconds``, ``compile_seconds``,
``accesses_per_second``) differ from run to run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from . import bits as B
from .callable_module import make_callable
from .defaults import (
    DEFAULT_MEMORY,
    DEFAULT_VCPUS,
    GRANULARITIES,
    PROFILES,
    SUBPAGE_CHECKS,
    default_batch_size,
)
from .errors import InputError, SppError, VmEntryError

# Decoded batches held at once: the slowest lane may trail the reader by this many. Enough
# for lanes of unequal speed to share the threads without a barrier per batch; the memory a
# sweep holds is this many batches plus each lane's own buffers.
LOOKAHEAD = 4
NO_PROTECTION = "none"  # Config.protect: no protection, whatever the sweep's default
# Names go into file names (--outdir) and column names: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]*\Z")
_FIELDS = ("name", "profile", "granularity", "subpage_check", "hugepages", "vcpus", "protect",
           "ops")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# ----------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Config:
    """One configuration of a sweep, as plain data.

    ``hugepages`` and ``vcpus`` left None take the sweep's values; ``protect`` None takes the
    sweep's protection, ``"none"`` means no protection, any other text is a protection file
    (access maps or byte ranges: sppjit.io.protect). ``ops`` is a timeline file
    (sppjit.io.ops), applied as ``sppjit replay --ops`` does. ``name`` None: derived from the
    fields (``Config.label``).
    """

    name: str | None = None
    profile: str = "v4"
    granularity: str = "spp"
    subpage_check: str = "all"
    hugepages: bool | None = None
    vcpus: int | None = None
    protect: str | None = None
    ops: str | None = None

    def __post_init__(self):
        for name, allowed in (("profile", PROFILES), ("granularity", GRANULARITIES),
                              ("subpage_check", SUBPAGE_CHECKS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"configuration: {name} must be one of {', '.join(allowed)}, "
                                 f"not {getattr(self, name)!r}")
        if self.name is not None and not (isinstance(self.name, str) and _NAME.match(self.name)):
            raise InputError(f"configuration: name {self.name!r} must be letters, digits and "
                             "_ . + @ - (starting with a letter or digit)")
        if self.hugepages is not None and not isinstance(self.hugepages, bool):
            raise InputError(f"configuration: hugepages must be true or false, not {self.hugepages!r}")
        if self.vcpus is not None and (isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int)
                                       or not 1 <= self.vcpus <= 1024):
            raise InputError(f"configuration: vcpus must be 1..1024, not {self.vcpus!r}")
        for name in ("protect", "ops"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InputError(f"configuration: {name} must be a file name, not {value!r}")

    @property
    def label(self) -> str:
        """The name, or one made of the fields: ``v4_spp_all``, ``v12_page_first_huge``, ..."""
        if self.name is not None:
            return self.name
        parts = [self.profile, self.granularity, self.subpage_check]
        if self.hugepages:
            parts.append("huge")
        if self.vcpus is not None:
            parts.append(f"{self.vcpus}vcpu")
        for value in (self.protect, self.ops):
            if value is not None:
                parts.append(_stem(value))
        return "_".join(parts)

    def as_dict(self) -> dict:
        """Every field (plain data: parse_config(config.as_dict()) == config)."""
        return dataclasses.asdict(self)

    @property
    def spec(self) -> str:
        """The spec string of the fields that are not their defaults."""
        default = Config()
        return ",".join(f"{k}={_spec_value(v)}" for k, v in self.as_dict().items()
                        if v != getattr(default, k))


def _stem(path: str) -> str:
    stem = os.path.basename(path.rstrip("/")).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", stem) or "file"


def _spec_value(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def parse_config(value) -> Config:
    """A Config from a Config, a dict of its fields or a spec string.

    A spec is comma-separated ``key=value`` items (keys: the field names, ``-`` for ``_``
    allowed; ``hugepages=on|off``), or bare values that say which field they set: ``v4``,
    ``v12``, ``spp``, ``page``, ``all``, ``first``, ``hugepages``. File names in a spec cannot
    hold commas. InputError names the bad item.
    """
    if isinstance(value, Config):
        return value
    if isinstance(value, dict):
        fields = {str(k).replace("-", "_"): v for k, v in value.items()}
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise InputError(f"configuration: unknown field {unknown[0]!r} (fields: "
                             f"{', '.join(_FIELDS)})")
        return Config(**fields)
    if isinstance(value, str):
        return Config(**_parse_spec(value))
    raise InputError(f"a configuration is a Config, a dict or a spec string, not "
                     f"{type(value).__name__}")


_BARE = {**{p: ("profile", p) for p in PROFILES}, **{g: ("granularity", g) for g in GRANULARITIES},
         **{c: ("subpage_check", c) for c in SUBPAGE_CHECKS}, "hugepages": ("hugepages", True)}


def _parse_spec(text: str) -> dict:
    fields: dict = {}
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise InputError("configuration: empty spec (give key=value items, e.g. "
                         "profile=v12,granularity=page)")
    for item in items:
        if not item:
            raise InputError(f"configuration {text!r}: empty item")
        if "=" in item:
            key, _, raw = item.partition("=")
            key, raw = key.strip().lower().replace("-", "_"), raw.strip()
            if key not in _FIELDS:
                raise InputError(f"configuration {text!r}: unknown key {key!r} (keys: "
                                 f"{', '.join(_FIELDS)})")
            fields[key] = _spec_field(text, key, raw)
        elif item.lower() in _BARE:
            key, val = _BARE[item.lower()]
            if key in fields:
                raise InputError(f"configuration {text!r}: {key} is given twice")
            fields[key] = val
        else:
            raise InputError(f"configuration {text!r}: cannot read {item!r} (use key=value, or "
                             f"one of {', '.join(_BARE)})")
    return fields


def _spec_field(text: str, key: str, raw: str):
    if key == "hugepages":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise InputError(f"configuration {text!r}: hugepages must be on or off, not {raw!r}")
    if key == "vcpus":
        if not raw.isdigit():
            raise InputError(f"configuration {text!r}: vcpus must be a number, not {raw!r}")
        return int(raw)
    if key in ("profile", "granularity", "subpage_check"):
        return raw.lower()
    if not raw:
        raise InputError(f"configuration {text!r}: {key} needs a value")
    return raw


# compare's three: page-granular protection (the baseline), SPP v4, SPP v12.
DEFAULT_CONFIGS = (Config("page", granularity="page"), Config("spp_v4"), Config("spp_v12", profile="v12"))


def expand_configs(configs: Iterable, protections: Iterable[str] = ()) -> list[Config]:
    """Configs (anything parse_config takes), crossed with ``protections`` (file names): with
    two or more, every configuration that names no protection of its own runs once per file,
    its name suffixed with ``@`` and the file's stem. Names must come out distinct."""
    configs = [parse_config(c) for c in configs]
    protections = list(protections)
    if len(protections) > 1:
        crossed = []
        for c in configs:
            if c.protect is not None:
                crossed.append(c)
                continue
            for path in protections:
                crossed.append(dataclasses.replace(c, protect=path,
                                                   name=f"{c.label}@{_stem(path)}"))
        configs = crossed
    names = [c.label for c in configs]
    seen = set()
    for name in names:
        if name in seen:
            raise InputError(f"configuration names must be distinct: {name!r} appears twice "
                             "(give each a name=...)")
        seen.add(name)
    return configs


# ----------------------------------------------------------------------------- the runner

@dataclass
class Lane:
    """One configuration's replay session in a sweep and what happens to its outputs.

    ``on_results`` gets each batch's per-access results (then computed), ``keep_results``
    keeps them in ``results``. Callbacks of one lane run one at a time, in trace order, but
    on any thread, and the callbacks of different lanes may run at the same time.
    """

    name: str
    session: object  # sppjit.replay.Replay
    keep_results: bool = False
    on_results: Callable[[pa.RecordBatch], None] | None = None
    results: list = field(default_factory=list)
    error: BaseException | None = None
    failed_batch: int | None = None  # index of the batch that raised

    def step(self, batch) -> None:
        keep = self.keep_results or self.on_results is not None
        result = self.session.run(batch, keep=keep)
        if self.on_results is not None:
            self.on_results(result)
        if self.keep_results:
            self.results.append(result)


def _read_only(batch):
    """The batch with read-only views of its arrays: every lane reads the same memory, and
    none may write it."""
    views = {}
    for name in ("gpa", "size", "vcpu", "kind", "insn_len"):
        view = getattr(batch, name).view()
        view.flags.writeable = False
        views[name] = view
    return dataclasses.replace(batch, **views)


class _Schedule:
    """The state the runner's threads share, under one condition variable.

    A lane is runnable when it is idle, has not failed and its next batch is decoded. A
    thread runs the runnable lane furthest behind (ties: the first lane); with none, it
    decodes the next batch if the window has room; with neither, it waits. A lane that fails
    stops there; with ``stop_on_error`` the other lanes stop at that batch too (after running
    it, so that the error reported is always the first in (batch, lane) order).
    """

    def __init__(self, reader, lanes, stop_on_error: bool, progress):
        self.cond = threading.Condition()
        self.reader = reader
        self.lanes = lanes
        self.stop_on_error = stop_on_error
        self.progress = progress
        self.batches: dict[int, object] = {}
        self.produced = 0
        self.exhausted = False
        self.reading = False
        self.fatal: BaseException | None = None  # a read error or an interrupt: stop all
        self.next = [0] * len(lanes)
        self.busy = [False] * len(lanes)
        self.stop_at: int | None = None

    def _live(self, i: int) -> bool:
        lane = self.lanes[i]
        return lane.error is None and (self.stop_at is None or self.next[i] <= self.stop_at)

    def _pick(self) -> int | None:
        best = None
        for i in range(len(self.lanes)):
            if not self.busy[i] and self._live(i) and self.next[i] < self.produced:
                if best is None or self.next[i] < self.next[best]:
                    best = i
        return best

    def _can_read(self) -> bool:
        if self.reading or self.exhausted:
            return False
        if self.stop_at is not None and self.produced > self.stop_at:
            return False
        live = [self.next[i] for i in range(len(self.lanes)) if self._live(i)]
        return bool(live) and self.produced - min(live) < LOOKAHEAD

    def _release(self) -> None:
        live = [self.next[i] for i in range(len(self.lanes)) if self._live(i)]
        keep_from = min(live) if live else self.produced
        for index in [k for k in self.batches if k < keep_from]:
            del self.batches[index]

    def work(self) -> None:
        cond = self.cond
        while True:
            with cond:
                while True:
                    if self.fatal is not None:
                        return
                    i = self._pick()
                    if i is not None:
                        self.busy[i] = True
                        index = self.next[i]
                        batch = self.batches[index]
                        break
                    if self._can_read():
                        self.reading = True
                        i = None
                        break
                    if not self.reading and not any(self.busy):
                        cond.notify_all()
                        return  # nothing left to run or read
                    cond.wait()
            if i is None:
                self._read()
            else:
                self._run(i, index, batch)

    def _read(self) -> None:
        batch, done, error = None, False, None
        try:
            batch = _read_only(next(self.reader))
        except StopIteration:
            done = True
        except BaseException as exc:  # a bad row: the same for every lane
            error = exc
        with self.cond:
            self.reading = False
            if error is not None:
                self.fatal = error
            elif done:
                self.exhausted = True
            else:
                self.batches[self.produced] = batch
                self.produced += 1
            self.cond.notify_all()

    def _run(self, i: int, index: int, batch) -> None:
        lane = self.lanes[i]
        try:
            lane.step(batch)
        except Exception as exc:  # this configuration's failure; the others go on
            with self.cond:
                lane.error, lane.failed_batch = exc, index
                if self.stop_on_error and (self.stop_at is None or index < self.stop_at):
                    self.stop_at = index
        except BaseException as exc:  # an interrupt: stop everything
            with self.cond:
                self.fatal = exc
        with self.cond:
            self.busy[i] = False
            self.next[i] = index + 1
            self._release()
            if self.progress is not None and lane.error is None and self.fatal is None:
                self.progress(lane.name, lane.session.rows)
            self.cond.notify_all()


def run_lanes(reader, lanes: list[Lane], threads: int | None = None, *,
              stop_on_error: bool = True,
              progress: Callable[[str, int], None] | None = None) -> None:
    """Replay every batch of ``reader`` (an iterator of TraceBatch, read here and only here)
    on every lane, on ``threads`` threads (default: the cores; never more than the lanes).

    A lane that raises keeps its exception in ``lane.error`` (and ``failed_batch``); the
    other lanes go on, or with ``stop_on_error`` stop at that batch. An error reading the
    trace, or an interrupt, is raised once every thread has stopped. ``progress(name,
    rows)`` is called after each lane's batch, one call at a time.
    """
    if not lanes:
        return
    threads = max(1, min(int(threads or os.cpu_count() or 1), len(lanes)))
    schedule = _Schedule(reader, lanes, stop_on_error, progress)
    helpers = [threading.Thread(target=_guarded, args=(schedule,), name=f"sppjit-sweep-{k}",
                                daemon=True) for k in range(threads - 1)]
    for t in helpers:
        t.start()
    try:
        schedule.work()  # this thread is a worker too (with threads=1, the only one)
    except BaseException as exc:
        with schedule.cond:
            if schedule.fatal is None:
                schedule.fatal = exc
            schedule.cond.notify_all()
    finally:
        for t in helpers:
            t.join()
    if schedule.fatal is not None:
        raise schedule.fatal


def _guarded(schedule: _Schedule) -> None:
    try:
        schedule.work()
    except BaseException as exc:  # a bug in a helper thread: hand it to the caller
        with schedule.cond:
            if schedule.fatal is None:
                schedule.fatal = exc
            schedule.cond.notify_all()


def first_failure(lanes: list[Lane]) -> Lane | None:
    """The failed lane first in (batch, lane) order: the same whatever the schedule."""
    failed = [(lane.failed_batch, k) for k, lane in enumerate(lanes) if lane.error is not None]
    return lanes[min(failed)[1]] if failed else None


def with_config_name(name: str, error: BaseException) -> BaseException:
    """The error of a configuration, of the same type, its message prefixed with the
    configuration's name (so the command line reports it as it reports a replay's)."""
    from .reference import ModelLivelock

    if isinstance(error, SppError):
        return SppError(error.errno, f"configuration {name}: {error.strerror}")
    if isinstance(error, (InputError, VmEntryError, ModelLivelock)):
        return type(error)(f"configuration {name}: {error}")
    return error


# ----------------------------------------------------------------------------- the table

_COUNT_NAMES = ("accesses", "reads", "writes", "fetches") + tuple(n.lower() for n in B.OUTCOME_NAMES)
_PAGE_NAMES = ("touched", "mapped_4k", "mapped_2m", "protected", "protected_left_writable",
               "ept_tables", "sppt_tables", "mmio_pages")
TIMING_COLUMNS = ("seconds", "compile_seconds", "accesses_per_second")


def table_schema() -> pa.Schema:
    """The sweep table's columns: the configuration, then its summary's figures."""
    fields = [pa.field("name", pa.string(), nullable=False), pa.field("profile", pa.string()),
              pa.field("granularity", pa.string()), pa.field("subpage_check", pa.string()),
              pa.field("hugepages", pa.bool_()), pa.field("vcpus", pa.int64()),
              pa.field("protect", pa.string()), pa.field("ops", pa.string())]
    fields += [pa.field(name, pa.int64()) for name in _COUNT_NAMES]
    fields += [pa.field("exits", pa.int64())]
    fields += [pa.field(f"exits_{kind}", pa.int64()) for kind in B.EXIT_KIND_NAMES]
    fields += [pa.field(f"pages_{name}", pa.int64()) for name in _PAGE_NAMES]
    fields += [pa.field("tlb_flushes", pa.int64()), pa.field("hooks_relevant", pa.int64()),
               pa.field("hooks_irrelevant", pa.int64())]
    fields += [pa.field(name, pa.float64()) for name in TIMING_COLUMNS]
    fields += [pa.field("error", pa.string())]
    from .io.trace import schema_metadata

    return pa.schema(fields, metadata=schema_metadata())


def summary_row(name: str, config: dict, summary: dict | None, error: str | None = None) -> dict:
    """One row of the sweep table: ``config`` (the VM's settings: profile, granularity,
    subpage_check, hugepages, vcpus, protect, ops) and the figures of ``summary`` (None for a
    configuration that failed: its figures are null and ``error`` says why)."""
    row = {"name": name, **{k: config.get(k) for k in ("profile", "granularity", "subpage_check",
                                                        "hugepages", "vcpus", "protect", "ops")}}
    s = summary or {}
    counts, exits, pages = s.get("counts", {}), s.get("exits", {}), s.get("pages", {})
    row.update({k: counts.get(k) for k in _COUNT_NAMES})
    row["exits"] = exits.get("total")
    row.update({f"exits_{k}": exits.get(k) for k in B.EXIT_KIND_NAMES})
    row.update({f"pages_{k}": pages.get(k) for k in _PAGE_NAMES})
    row["tlb_flushes"] = s.get("tlb_flushes")
    hooks = s.get("hooks")
    row["hooks_relevant"] = hooks["relevant"] if hooks else None
    row["hooks_irrelevant"] = hooks["irrelevant"] if hooks else None
    row.update({k: s.get(k) for k in TIMING_COLUMNS})
    row["error"] = error
    return row


def summary_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=table_schema())


# ----------------------------------------------------------------------------- sweep

@dataclass
class SweepResult:
    """``table``: a row per configuration (summary_row). ``summaries``: name -> the summary
    JSON of the contract, as `sppjit replay --summary` writes it. ``outputs``: name ->
    sppjit.replay.ReplayResult (results table and exit log, None where not kept).
    ``errors``: name -> the message of a configuration that failed (on_error="record")."""

    table: pa.Table
    configs: list[Config]
    summaries: dict[str, dict]
    outputs: dict[str, object]
    errors: dict[str, str]
    document: dict


def sweep(trace, configs=None, *, protection=None, memory: str | int | None = None,
          memslots: Iterable[tuple[int, int]] | None = None, vcpus: int | None = None,
          hugepages: bool = False, engine: str = "jit", batch_size: int | None = None,
          threads: int | None = None, keep: Iterable[str] = (),
          on_exits: Callable[[str, pa.Schema], Callable[[pa.RecordBatch], None]] | None = None,
          on_results: Callable[[str], Callable[[pa.RecordBatch], None]] | None = None,
          on_error: str = "raise", progress: Callable[[str, int], None] | None = None,
          inputs: dict[str, str | None] | None = None) -> SweepResult:
    """Replay ``trace`` once under every configuration of ``configs``; see the module
    docstring.

    ``trace``: anything sppjit.io.trace.open_trace reads (a path, an Arrow table or stream,
    a dict of columns): read and decoded once. ``configs``: Configs, dicts or spec strings
    (default: page, spp_v4 and spp_v12, as compare's). ``protection``: a path, AccessMaps or
    ByteRanges, or a list of paths (crossed with the configurations: expand_configs), given to
    every configuration without a ``protect`` of its own. ``memory`` (default 4GiB) or
    ``memslots``, ``vcpus`` and ``hugepages``: the VM of every configuration (a Config may set
    its own vcpus and hugepages). ``threads``: default the cores. ``keep``: "results" and/or
    "exits" to keep those in memory (``outputs``). ``on_exits(name, schema)`` and
    ``on_results(name)`` return a sink for that configuration's exit-log or per-access
    batches (called once per configuration before any replay: the sinks of different
    configurations are called from several threads). ``on_error``: "raise" (the first
    configuration to fail, in trace order, stops the sweep: its error, named) or "record"
    (its row gets ``error``, the others complete). ``inputs``: further files to hash.
    """
    from .hooks import HookIndex
    from .io.ops import read_ops
    from .io.protect import ByteRanges
    from .io.trace import open_trace
    from .protection import apply_protection, load_protection, protection_info, protection_maps
    from .provenance import BackgroundDigests, generator_info, versions
    from .replay import ENGINES, Replay, ReplayResult, discard_exits
    from .vm import VM

    started = time.perf_counter()
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if on_error not in ("raise", "record"):
        raise InputError(f"on_error must be raise or record, not {on_error!r}")
    keep = set(keep)
    if keep - {"results", "exits"}:
        raise InputError(f"keep: only results and exits, not {', '.join(sorted(keep - {'results', 'exits'}))}")
    if memory is not None and memslots is not None:
        raise InputError("memory and memslots cannot be given together (memslots defines the memory)")
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise InputError(f"threads must be at least 1, not {threads}")
    if batch_size is None:
        batch_size = default_batch_size(engine)
    shared_paths = protection if isinstance(protection, (list, tuple)) else []
    configs = expand_configs(DEFAULT_CONFIGS if configs is None else configs, [os.fspath(p) for p in shared_paths])
    if not configs:
        raise InputError("a sweep needs at least one configuration")
    default_protection = None
    if len(shared_paths) == 1:
        default_protection = shared_paths[0]
    elif not isinstance(protection, (list, tuple)):
        default_protection = protection
    slots = [(int(b), int(n)) for b, n in memslots] if memslots is not None else None
    base_vcpus = DEFAULT_VCPUS if vcpus is None else int(vcpus)

    # Every input read and every VM built (and protected) before the first access.
    loaded: dict[object, tuple] = {}

    def protection_of(config):
        source = default_protection if config.protect is None else (
            None if config.protect == NO_PROTECTION else config.protect)
        if source is None:
            return None
        key = os.fspath(source) if isinstance(source, (str, os.PathLike)) else id(source)
        if key not in loaded:
            obj, path = load_protection(source)
            maps = protection_maps(obj)
            loaded[key] = (obj, protection_info(obj, path, maps), maps)
        return loaded[key]

    timelines: dict[str, list] = {}
    inputs_of = []
    for config in configs:  # each input file read once, whatever the configurations sharing it
        if config.ops is not None and config.ops not in timelines:
            timelines[config.ops] = read_ops(config.ops)
        inputs_of.append((protection_of(config), timelines.get(config.ops, [])))

    def build(k: int):
        """Configuration k's VM, protected, and its replay session."""
        config, (prot, ops) = configs[k], inputs_of[k]
        try:
            vm = VM(memory=memory if memory is not None else DEFAULT_MEMORY, memslots=slots,
                    vcpus=config.vcpus or base_vcpus, profile=config.profile,
                    hugepages=hugepages if config.hugepages is None else config.hugepages,
                    subpage_check=config.subpage_check, granularity=config.granularity)
            if ops:
                vm.init_spp()  # as sppjit replay --ops: SPP on before the first access
            hooks, info = None, None
            if prot is not None:
                obj, info, maps = prot
                apply_protection(vm, obj, maps)
                if isinstance(obj, ByteRanges):
                    hooks = HookIndex.from_ranges(obj)
        except Exception as exc:
            raise with_config_name(config.label, exc) from exc
        return Replay(vm, engine, on_exits=discard_exits, hooks=hooks, ops=list(ops)), info

    # The VMs are built and protected on the threads too (set_subpages calls are many);
    # the first configuration to fail, in their order, is the error.
    pool = max(1, min(int(threads or os.cpu_count() or 1), len(configs)))
    if pool > 1:
        with ThreadPoolExecutor(pool, thread_name_prefix="sppjit-sweep-setup") as executor:
            built = list(executor.map(build, range(len(configs))))
    else:
        built = [build(k) for k in range(len(configs))]
    lanes, vm_configs, extras = [], [], []
    for config, (session, info) in zip(configs, built):
        name = config.label
        if "exits" in keep:
            session.on_exits = None  # Replay keeps the batches itself
        elif on_exits is not None:
            session.on_exits = on_exits(name, session.exit_schema)
        lanes.append(Lane(name, session, keep_results="results" in keep,
                          on_results=on_results(name) if on_results is not None else None))
        vm_configs.append(session.vm.config)
        extras.append({"protection": info, "ops_file": config.ops, "name": name})

    # Each session checks the batch's vCPUs against its own VM (configurations may differ):
    # one with too few fails alone, with the error its serial replay gives.
    reader = open_trace(trace, batch_size=batch_size)
    generator = generator_info(reader.schema)
    paths = {"trace": reader.path}
    for key, (_, info, _) in loaded.items():
        if isinstance(key, str):
            paths["protect" if len(loaded) == 1 else f"protect:{key}"] = info["path"]
    for path in timelines:
        paths["ops" if len(timelines) == 1 else f"ops:{path}"] = path
    digests = BackgroundDigests({**paths, **(inputs or {})})

    set_up = time.perf_counter()
    run_lanes(reader, lanes, threads, stop_on_error=on_error == "raise", progress=progress)
    replayed = time.perf_counter()
    failed = first_failure(lanes)
    if failed is not None and on_error == "raise":
        raise with_config_name(failed.name, failed.error) from failed.error

    provenance = {"versions": versions(), "digests": digests.result(), "generator": dict(generator)}
    rows, summaries, outputs, errors = [], {}, {}, {}
    for config, lane, vm_config, extra in zip(configs, lanes, vm_configs, extras):
        described = {**vm_config.as_dict(), "protect": _protect_label(extra["protection"]),
                     "ops": config.ops}
        if lane.error is not None:
            message = str(with_config_name(lane.name, lane.error))
            errors[lane.name] = message
            rows.append(summary_row(lane.name, described, None, message))
            continue
        summary = lane.session.summary({"path": reader.path}, generator=generator)
        summary["config"].update(extra)
        summary["provenance"] = provenance
        summaries[lane.name] = summary
        rows.append(summary_row(lane.name, described, summary))
        table = None
        if "results" in keep:
            table = (pa.Table.from_batches(lane.results) if lane.results
                     else _empty_results(reader.schema))
        exits = lane.session.exit_table() if "exits" in keep else None
        outputs[lane.name] = ReplayResult(table=table, exits=exits, summary=summary)
    document = {
        "input": {"path": reader.path, "rows": reader.rows_seen, **generator},
        "config": {"engine": engine, "batch_size": batch_size,
                   "threads": pool,
                   "configs": [c.as_dict() | {"name": c.label} for c in configs]},
        "provenance": provenance,
        # Wall clock: reading inputs, building and protecting the VMs; the pass over the
        # trace; all of it (with the summaries).
        "seconds": {"setup": set_up - started, "replay": replayed - set_up,
                    "total": time.perf_counter() - started},
        "rows": rows,
        "summaries": summaries,
    }
    return SweepResult(table=summary_table(rows), configs=configs, summaries=summaries,
                       outputs=outputs, errors=errors, document=document)


def _protect_label(info: dict | None) -> str | None:
    if info is None:
        return None
    return info.get("path") or f"({info['form']})"


def _empty_results(schema: pa.Schema) -> pa.Table:
    from .replay import RESULT_FIELDS

    return pa.table({f.name: pa.array([], type=f.type) for f in list(schema) + RESULT_FIELDS})


# ----------------------------------------------------------------------------- on files

@dataclass(frozen=True)
class SweepRun:
    """What ``sweep_files`` gives back: the document (the table's rows and every
    configuration's summary), the paths written and a note for the user, or None."""

    document: dict
    written: tuple[str, ...]
    note: str | None = None


def sweep_files(trace: str, configs=None, *, protect: Iterable[str] = (),
                memory: str | None = None, memslots: str | None = None,
                vcpus: int | None = None, hugepages: bool = False, engine: str = "jit",
                threads: int | None = None, out: str | None = None,
                summary: str | None = None, outdir: str | None = None, results: bool = False,
                batch_size: int | None = None,
                progress: Callable[[int, int | None], None] | None = None,
                names: dict[str, str] | None = None) -> SweepRun:
    """``sppjit sweep`` as one library call, on files: check every option and path before
    any work, sweep (``sweep``), and write the table (``out``), the document (``summary``)
    and, under ``outdir``, every configuration's NAME.summary.json and NAME.exits.parquet
    (with ``results``, NAME.results.parquet too), all or nothing. ``protect``: protection
    files, crossed with the configurations as ``expand_configs`` does. ``progress(rows_done,
    rows_total)`` is called as the slowest configuration advances. Errors name the
    parameters or, through ``names``, what the caller calls them."""
    import contextlib

    from .io.atomic import Outputs, check_distinct
    from .io.formats import trace_format
    from .io.memslots import read_memslots
    from .io.output import TableWriter, check_output_path, write_json_atomic
    from .io.trace import open_trace
    from .provenance import vm_settings

    def name(parameter: str) -> str:
        return (names or {}).get(parameter, parameter)

    protect = list(protect)
    # ---- options and paths, before any work
    if memory is not None and memslots is not None:
        raise InputError(f"{name('memory')} and {name('memslots')} cannot be used together "
                         f"({name('memslots')} defines the memory)")
    if results and outdir is None:
        raise InputError(f"{name('results')} needs {name('outdir')} (the directory the "
                         "results go to)")
    expanded = expand_configs(configs if configs is not None else DEFAULT_CONFIGS, protect)
    labels = [c.label for c in expanded]
    if out is not None:
        check_output_path(out, option=name("out"), table=True)
    if summary is not None:
        check_output_path(summary, option=name("summary"))
    per_config: dict[str, dict[str, str]] = {}
    if outdir is not None:
        if not os.path.isdir(outdir):
            raise InputError(f"{name('outdir')}: {outdir} is not an existing directory")
        for label in labels:
            files = {"summary": os.path.join(outdir, f"{label}.summary.json"),
                     "exits": os.path.join(outdir, f"{label}.exits.parquet")}
            if results:
                files["results"] = os.path.join(outdir, f"{label}.results.parquet")
            for kind, path in files.items():
                check_output_path(path, option=name("outdir"), table=kind != "summary")
            per_config[label] = files
    inputs = [(name("trace"), trace), (name("memslots"), memslots)]
    inputs += [(name("protect"), p) for p in protect]
    inputs += [(f"{name('configs')} {c.label}", p) for c in expanded for p in (c.protect, c.ops)
               if p is not None and p != NO_PROTECTION]
    outputs = [(name("out"), out), (name("summary"), summary)]
    outputs += [(name("outdir"), path) for files in per_config.values() for path in files.values()]
    check_distinct(_without_repeats(inputs) + outputs)

    reader = open_trace(trace)
    if reader.num_rows == 0:
        raise InputError("trace: no rows")
    # The memory and vCPUs the trace records are the defaults (options and a
    # configuration's own vcpus= override).
    memory, vcpus, _ = vm_settings(reader.schema, memory=memory, memslots=memslots,
                                   vcpus=vcpus)
    slots = read_memslots(memslots) if memslots is not None else None

    # ---- the sweep, its per-configuration files written as it goes, all or nothing
    rows_done: dict[str, int] = {}

    def update(label: str, rows: int) -> None:  # called one at a time by the runner
        rows_done[label] = rows
        if progress is not None:
            progress(min(rows_done.get(n, 0) for n in labels), reader.num_rows)

    with contextlib.ExitStack() as stack:
        written = stack.enter_context(Outputs())
        with contextlib.ExitStack() as tables:
            lock = threading.Lock()  # the sinks are opened from the runner's threads

            def open_writer(path: str, schema, option: str):
                with lock:
                    tables.push(written.track(path))  # before the writer: runs after its exit
                    return tables.enter_context(TableWriter(path, schema, option=option))

            def exit_sink(label, schema):
                return open_writer(per_config[label]["exits"], schema, name("outdir")).write_batch

            def results_sink(label):
                writer = None

                def write(batch) -> None:
                    nonlocal writer
                    if writer is None:  # the schema is the first result's
                        writer = open_writer(per_config[label]["results"], batch.schema,
                                             name("outdir"))
                    writer.write_batch(batch)

                return write

            result = sweep(trace, expanded,
                           protection=protect[0] if len(protect) == 1 else None,
                           memory=memory, memslots=slots, vcpus=vcpus,
                           hugepages=hugepages, engine=engine, batch_size=batch_size,
                           threads=threads,
                           on_exits=exit_sink if outdir is not None else None,
                           on_results=results_sink if results else None, progress=update,
                           inputs={"memslots": memslots})
        document = result.document
        document["input"]["format"] = trace_format(trace)
        document["config"]["memslots_file"] = memslots
        for label, config_summary in result.summaries.items():
            config_summary["input"]["format"] = document["input"]["format"]
            config_summary["config"]["memslots_file"] = memslots
            if outdir is not None:
                write_json_atomic(per_config[label]["summary"], config_summary)
                written.add(per_config[label]["summary"])
        if out is not None:
            with TableWriter(out, result.table.schema, option=name("out")) as writer:
                writer.write_batch(result.table)
            written.add(out)
        if summary is not None:
            write_json_atomic(summary, document)
            written.add(summary)
        files = tuple(written.committed)
    return SweepRun(document=document, written=files, note=None)


def _without_repeats(named_paths):
    """Inputs may be named more than once (one protection for several configurations)."""
    seen, out = set(), []
    for option, path in named_paths:
        if path is not None and os.path.abspath(path) in seen:
            continue
        if path is not None:
            seen.add(os.path.abspath(path))
        out.append((option, path))
    return out


# ----------------------------------------------------------------------------- the printer

_COLUMNS = (  # (heading, row key); exits by kind follow "exits"
    ("name", "name"), ("profile", "profile"), ("gran", "granularity"),
    ("check", "subpage_check"), ("huge", "hugepages"), ("vcpus", "vcpus"),
    ("protect", "protect"), ("accesses", "accesses"), ("exits", "exits"),
)


def format_sweep(document: dict, written: list[str] | None = None) -> str:
    """A header, then one line per configuration."""
    info, config = document["input"], document["config"]
    facts = [info.get("format", "in memory"), f"{info['rows']:,} rows"]
    for key in ("scenario", "seed"):
        if info.get(key) is not None:
            facts.append(f"{key} {info[key]}")
    out = (f"trace    {info.get('path')} ({', '.join(facts)})\n"
           f"sweep    {len(document['rows'])} configurations, {config['threads']} "
           f"thread{'s' if config['threads'] != 1 else ''}, engine {config['engine']}\n\n")
    rows = document["rows"]
    hooks = any(r["hooks_relevant"] is not None for r in rows)
    columns = list(_COLUMNS) + [(kind, f"exits_{kind}") for kind in B.EXIT_KIND_NAMES]
    columns += [("touched", "pages_touched"), ("sppt", "pages_sppt_tables")]
    if hooks:
        columns += [("relevant", "hooks_relevant"), ("irrelevant", "hooks_irrelevant")]
    columns += [("M acc/s", "accesses_per_second")]
    out += format_rows(rows, columns, left={"name", "profile", "granularity", "subpage_check",
                                            "protect"})
    for r in rows:
        if r["error"] is not None:
            out += f"error    {r['error']}\n"
    if written:
        out += f"\nwrote    {', '.join(written)}\n"
    return out


def format_rows(rows: list[dict], columns, *, left=frozenset()) -> str:
    """A table of ``rows`` for people: a heading line, then a line per row; ``columns`` are
    (heading, row key), the keys in ``left`` aligned left, the others right."""
    cells = [[_cell(key, r[key]) for _, key in columns] for r in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (head, _) in enumerate(columns)]

    def line(values):
        return "  ".join(v.ljust(w) if key in left else v.rjust(w)
                         for v, w, (_, key) in zip(values, widths, columns)).rstrip() + "\n"

    return line([head for head, _ in columns]) + "".join(line(c) for c in cells)


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "accesses_per_second":
        return f"{value / 1e6:.1f}"
    if key == "hugepages":
        return "yes" if value else "no"
    if key == "protect":
        return os.path.basename(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ``sppjit.sweep(...)`` calls sweep(); the module's other names stay reachable.
make_callable(__name__, "sweep")
