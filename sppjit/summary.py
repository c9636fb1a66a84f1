"""The typed results of a replay and of a comparison, and their printers.

``ReplaySummary`` is the summary JSON of the data contract (``sppjit replay --summary``) and
``CompareDocument`` the comparison document (``sppjit compare --json``), as frozen
dataclasses: ``from_dict`` reads the JSON (InputError naming a missing key), ``to_dict``
gives it back key for key, in the same order, so ``to_dict(from_dict(d)) == d`` and the
written JSON is byte for byte what it was. Blocks whose keys are open (the configuration, the
input, provenance, hooks) stay dicts; the counters are typed. ``format_summary`` and
``format_comparison`` print them for people, as ``sppjit replay`` and ``sppjit compare`` do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from . import bits as B
from .errors import InputError
from .io.sizes import format_size

_OPTIONAL = {"optional": True}  # a key written only when the value is not None
_EXTRA = "extra"  # keys a newer writer added: kept, written back after the known ones


class Block:
    """JSON object <-> frozen dataclass, field order = key order. A field whose metadata has
    ``block`` holds a nested Block (``many``: a list of them)."""

    @classmethod
    def from_dict(cls, data: Mapping, what: str | None = None):
        what = what or cls.__name__
        if not isinstance(data, Mapping):
            raise InputError(f"{what}: expected an object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == _EXTRA:
                continue
            if f.name not in data:
                if f.metadata.get("optional"):
                    continue
                raise InputError(f"{what}: missing key '{f.name}'")
            value = data[f.name]
            inner = f.metadata.get("block")
            if inner is not None and value is not None:
                if f.metadata.get("many"):
                    if not isinstance(value, list):
                        raise InputError(f"{what}.{f.name}: expected a list")
                    value = tuple(inner.from_dict(v, f"{what}.{f.name}[{i}]")
                                  for i, v in enumerate(value))
                else:
                    value = inner.from_dict(value, f"{what}.{f.name}")
            values[f.name] = value
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:
            if _EXTRA not in known:
                raise InputError(f"{what}: unknown key '{next(iter(extra))}'")
            values[_EXTRA] = extra
        return cls(**values)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == _EXTRA:
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            if isinstance(value, Block):
                value = value.to_dict()
            elif isinstance(value, tuple) and f.metadata.get("many"):
                value = [v.to_dict() for v in value]
            out[f.name] = value
        out.update(getattr(self, _EXTRA, None) or {})
        return out


def _counter_block(name: str, keys: list[str], doc: str) -> type:
    cls = make_dataclass(name, [(k, int) for k in keys], bases=(Block,), frozen=True)
    cls.__doc__ = doc
    cls.__module__ = __name__
    return cls


# The counters' names live where the model names them (sppjit.bits): built from there.
Counts = _counter_block(
    "Counts", ["accesses", "reads", "writes", "fetches"] + [n.lower() for n in B.OUTCOME_NAMES],
    "Accesses by kind and by outcome.")
Exits = _counter_block("Exits", ["total", *B.EXIT_KIND_NAMES], "VM exits, in total and by kind.")


@dataclass(frozen=True)
class Pages(Block):
    """Pages touched by the replay, and the state of the tables after it (sppjit.stats)."""

    touched: int
    mapped_4k: int
    mapped_2m: int
    protected: int
    protected_left_writable: int
    ept_tables: int
    sppt_tables: int
    mmio_pages: int


def _block(cls, **extra) -> dict:
    return {"block": cls, **extra}


@dataclass(frozen=True)
class ReplaySummary(Block):
    """The summary of one replay (the contract's summary JSON)."""

    schema_version: int
    sppjit_version: str
    engine: str
    config: dict  # VmConfig.as_dict(), engine, and what the job adds (protection, files)
    input: dict  # path, format, rows, seed
    counts: Counts = field(metadata=_block(Counts))
    exits: Exits = field(metadata=_block(Exits))
    pages: Pages = field(metadata=_block(Pages))
    tlb_flushes: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    accesses_per_second: float = 0.0
    provenance: dict = field(default_factory=dict)
    hooks: dict | None = field(default=None, metadata=_OPTIONAL)  # byte-range protection
    ops: dict | None = field(default=None, metadata=_OPTIONAL)  # a timeline: count, applied
    extra: dict | None = None

    TIMINGS = ("seconds", "compile_seconds", "accesses_per_second")

    def without_timings(self) -> ReplaySummary:
        """The same summary with every timing zeroed: equal jobs give equal summaries."""
        return dataclasses.replace(self, **{k: 0.0 for k in self.TIMINGS})


@dataclass(frozen=True)
class Derived(Block):
    """The comparison figures of one configuration (sppjit.compare.derive)."""

    accesses: int
    writes: int
    exits: int
    exits_per_1000_writes: float | None
    protection_exits: int
    protection_exits_per_1000_writes: float | None
    exits_avoided: int | None
    net_exits_avoided: int | None
    exits_to_userspace: int
    exits_in_kernel: int
    protected_left_writable: int
    sppt_tables: int
    sppt_bytes: int
    overhead_seconds: float
    overhead_seconds_per_million_accesses: float | None
    hooks: dict | None  # relevant, irrelevant, noise_ratio (byte-range protection)
    # Added later (absent from older documents): the price of completing the allowed writes
    # (writes, emulate_seconds, mtf_exits, mtf_exits_per_write, mtf_seconds), the overhead
    # with the chosen one, and the changes against the baseline (-0.45: 45% fewer).
    write_through: dict | None = field(default=None, metadata=_OPTIONAL)
    total_overhead_seconds: float | None = field(default=None, metadata=_OPTIONAL)
    change_vs_baseline: dict | None = field(default=None, metadata=_OPTIONAL)


@dataclass(frozen=True)
class ConfigResult(Block):
    """One configuration of a comparison: how it protects, its replay summary, its figures."""

    name: str
    profile: str
    granularity: str
    subpage_check: str
    summary: ReplaySummary = field(metadata=_block(ReplaySummary))
    derived: Derived = field(metadata=_block(Derived))
    protect: str | None = field(default=None, metadata=_OPTIONAL)  # its own protection file
    baseline: str | None = field(default=None, metadata=_OPTIONAL)  # when not the document's


@dataclass(frozen=True)
class CompareDocument(Block):
    """The comparison document (``sppjit compare --json``)."""

    schema_version: int
    sppjit_version: str
    input: dict
    protection: dict
    config: dict
    exit_cost_us: float
    kernel_exit_cost_us: float
    exit_cost_source: str
    baseline: str | None
    provenance: dict
    configs: tuple[ConfigResult, ...] = field(metadata=_block(ConfigResult, many=True))
    # Added later (absent from older documents): the write-through cost model (policy,
    # emulation_cost_us, source), every protection compared when there are several, and the
    # notes on why SPP v4 and v12 differ (sppjit.compare.profile_notes).
    write_through: dict | None = field(default=None, metadata=_OPTIONAL)
    protections: list | None = field(default=None, metadata=_OPTIONAL)
    notes: list | None = field(default=None, metadata=_OPTIONAL)
    extra: dict | None = None


# ------------------------------------------------------------------------------ printers

def _as_dict(value) -> dict:
    return value.to_dict() if isinstance(value, Block) else value


def _pairs(items) -> str:
    return "  ".join(f"{name} {value:,}" for name, value in items)


_UNITS = (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))


def readable_size(nbytes: int) -> str:
    """Bytes in the largest binary unit they reach, for people: "4 GiB", "1.0 MiB" (not
    1048KiB), "268 KiB", "512 B"; one decimal below 100 units unless the size is whole."""
    for unit, shift in _UNITS:
        if nbytes >= 1 << shift:
            value = nbytes / (1 << shift)
            if nbytes % (1 << shift) == 0:
                return f"{nbytes >> shift} {unit}"
            return f"{value:.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    return f"{nbytes:,} B"


def _memory_size(nbytes: int) -> str:
    """Guest memory as the user writes it (4GiB, parse_size's form) when that is exact in
    the largest unit it reaches, else readable_size (1.0 MiB, not 1028KiB)."""
    exact = format_size(nbytes)
    for unit, shift in _UNITS:
        if nbytes >= 1 << shift:
            return exact if exact.endswith(unit) else readable_size(nbytes)
    return exact


def _memory(config: dict) -> str:
    slots = config["memslots"]
    return (_memory_size(config["memory_bytes"]) if len(slots) == 1
            else f"{_memory_size(config['memory_bytes'])} in {len(slots)} memslots")


def format_summary(summary: ReplaySummary | dict, written=()) -> str:
    """The human-readable replay summary: one labelled line per block."""
    summary = _as_dict(summary)
    config, counts, exits = summary["config"], summary["counts"], summary["exits"]
    info = summary["input"]
    vm = (f"profile {config['profile']}, {config['vcpus']} vCPU"
          f"{'s' if config['vcpus'] != 1 else ''}, {_memory(config)}, granularity "
          f"{config['granularity']}, subpage-check {config['subpage_check']}"
          f"{', hugepages' if config['hugepages'] else ''}, engine {summary['engine']}")
    vm += _vm_from(config.get("vm_from"))
    protection = config.get("protection")
    rows = [
        ("trace", f"{info.get('path')} ({info.get('format', '?')}, {info['rows']:,} rows)"),
        ("vm", vm),
    ]
    if protection:
        rows.append(("protection", f"{protection['path']} ({protection['form']}, "
                                   f"{protection['pages']:,} pages)"))
    rows += [
        ("accesses", _pairs([("total", counts["accesses"]), ("reads", counts["reads"]),
                             ("writes", counts["writes"]), ("fetches", counts["fetches"])])),
        ("outcomes", _pairs((name, counts[name.lower()]) for name in B.OUTCOME_NAMES)),
        ("exits", _pairs([("total", exits["total"])]
                         + [(name, exits[name]) for name in B.EXIT_KIND_NAMES])),
        ("pages", _pairs((name, value) for name, value in summary["pages"].items())),
        *([("ops", f"applied {summary['ops']['applied']:,} of {summary['ops']['count']:,} "
                   "timeline operations" + (" (the trace ends before the rest are due)"
                                            if summary['ops']['applied'] < summary['ops']['count']
                                            else ""))]
          if summary.get("ops") else []),
        *([("hooks", f"relevant {summary['hooks']['relevant']:,}  irrelevant "
                     f"{summary['hooks']['irrelevant']:,}  ({len(summary['hooks']['per_hook']):,} hooks)")]
          if "hooks" in summary else []),
        ("time", f"{summary['seconds']:.3f} s, "
                 f"{summary['accesses_per_second']:,.0f} accesses/s"
                 + (f" (kernels compiled or loaded in {summary['compile_seconds']:.1f} s)"
                    if summary.get("compile_seconds", 0) >= 0.05 else "")),
    ]
    if written:
        rows.append(("wrote", ", ".join(written)))
    width = max(len(label) for label, _ in rows)
    return "".join(f"{label:<{width}}  {text}\n" for label, text in rows)


def _vm_from(vm_from) -> str:
    """Where the memory and vCPUs came from, when not from the options: `` (memory and
    vCPUs from the trace's metadata)``, `` (memory: default)``."""
    if not vm_from:
        return ""
    by_source: dict[str, list[str]] = {}
    for setting in ("memory", "vcpus"):
        source = vm_from.get(setting)
        if source in ("trace", "default"):
            by_source.setdefault(source, []).append("vCPUs" if setting == "vcpus" else setting)
    parts = [f"{' and '.join(names)} from the trace's metadata" if source == "trace"
             else f"{' and '.join(names)}: default" for source, names in by_source.items()]
    return f" ({'; '.join(parts)})" if parts else ""


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def readable_seconds(value) -> str:
    """A duration in the unit that suits it: "1.24 s", "3.1 ms", "12 us", "0"."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    unit, scale = next(((u, k) for u, k in (("s", 1.0), ("ms", 1e-3)) if abs(value) >= k),
                       ("us", 1e-6))
    shown = value / scale
    return f"{shown:,.3g} {unit}" if abs(shown) < 1000 else f"{shown:,.0f} {unit}"


def percent_change(value) -> str:
    """A relative change as people read it: -0.45 -> "-45%", 0.031 -> "+3.1%", None -> "-"."""
    if value is None:
        return "-"
    pct = value * 100.0
    if pct == 0:
        return "0%"
    return f"{pct:+.1f}%" if abs(pct) < 10 else f"{pct:+,.0f}%"


def _bytes(value: int) -> str:
    return "0" if value == 0 else readable_size(value)


def savings_lines(document: dict) -> list[str]:
    """One line per configuration with a baseline: "spp_v4: -45% exits (-67% protection
    exits), -51% estimated overhead vs page"."""
    default = document.get("baseline")
    out = []
    for c in document["configs"]:
        change = c["derived"].get("change_vs_baseline")
        base = c.get("baseline") or default
        if not change or base == c["name"]:
            continue
        overhead = change.get("total_overhead_seconds", change.get("overhead_seconds"))
        out.append(f"{c['name']}: {percent_change(change['exits'])} exits "
                   f"({percent_change(change['protection_exits'])} protection exits), "
                   f"{percent_change(overhead)} estimated overhead vs {base}")
    return out


def comparison_rows(document: CompareDocument | dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The comparison table as text cells: (configuration names, [(label, a cell per
    configuration)]), as format_comparison prints it and the HTML report shows it."""
    document = _as_dict(document)
    configs = document["configs"]
    through = document.get("write_through") or {}
    policy = through.get("policy", "none")
    baseline = document.get("baseline")
    vs = f"vs {baseline}" if baseline else "vs baseline"

    def change(c, key):
        ch = c["derived"].get("change_vs_baseline")
        return percent_change(ch.get(key)) if ch and (c.get("baseline") or baseline) != c["name"] else "-"

    derived = [c["derived"] for c in configs]
    rows: list[tuple[str, list[str]]] = [
        ("writes", [_count(d["writes"]) for d in derived]),
        ("exits", [_count(d["exits"]) for d in derived]),
    ]
    for kind in B.EXIT_KIND_NAMES:
        rows.append((f"  {kind}", [_count(c["summary"]["exits"][kind]) for c in configs]))
    rows += [
        (f"  change {vs}", [change(c, "exits") for c in configs]),
        ("protection exits", [_count(d["protection_exits"]) for d in derived]),
        ("  per 1,000 writes", [_number(d["protection_exits_per_1000_writes"]) for d in derived]),
        (f"  change {vs}", [change(c, "protection_exits") for c in configs]),
        (f"exits avoided ({vs})", [_count(d["exits_avoided"]) for d in derived]),
        ("exits to userspace", [_count(d["exits_to_userspace"]) for d in derived]),
        ("exits in kernel", [_count(d["exits_in_kernel"]) for d in derived]),
        ("protected left writable", [_count(d["protected_left_writable"]) for d in derived]),
        ("SPPT memory", [_bytes(d["sppt_bytes"]) for d in derived]),
        ("est. overhead of exits", [readable_seconds(d["overhead_seconds"]) for d in derived]),
        ("  per M accesses",
         [readable_seconds(d["overhead_seconds_per_million_accesses"]) for d in derived]),
    ]
    if all(d.get("write_through") for d in derived):
        wt = [d["write_through"] for d in derived]
        rows += [
            ("letting writes through", [_count(w["writes"]) for w in wt]),
            (f"  emulate ({through.get('emulation_cost_us', 0):g} us each)",
             [readable_seconds(w["emulate_seconds"]) for w in wt]),
            ("  MTF: exits added", [f"+{w['mtf_exits']:,}" for w in wt]),
            ("  MTF: their cost", [readable_seconds(w["mtf_seconds"]) for w in wt]),
        ]
        if policy != "none":
            rows.append((f"est. overhead with {policy}",
                         [readable_seconds(d["total_overhead_seconds"]) for d in derived]))
    rows.append((f"  change {vs}", [change(c, "total_overhead_seconds" if policy != "none"
                                    else "overhead_seconds") for c in configs]))
    if configs and derived[0]["hooks"] is not None:
        hooks = [d["hooks"] for d in derived]
        rows += [
            ("relevant exits", [_count(h["relevant"]) for h in hooks]),
            ("irrelevant exits", [_count(h["irrelevant"]) for h in hooks]),
            ("noise ratio", [_number(h["noise_ratio"], 3) for h in hooks]),
        ]
    return [c["name"] for c in configs], rows


def format_comparison(document: CompareDocument | dict, written=None) -> str:
    """The human-readable comparison: a header, one column per configuration, the savings
    against the baseline and the notes on why v4 and v12 differ."""
    document = _as_dict(document)
    info, protection, config = document["input"], document["protection"], document["config"]
    through = document.get("write_through") or {}
    policy = through.get("policy", "none")
    facts = [f"{info.get('format', 'in memory')}", _plural(info["rows"], "row")]
    if info.get("scenario") is not None:
        facts.append(f"scenario {info['scenario']}")
    if info.get("seed") is not None:
        facts.append(f"seed {info['seed']}")

    def what(p: dict) -> str:
        pages = _plural(p["pages"], "page")
        return (f"{p.get('path')} ({_plural(p['ranges'], 'byte range')} on {pages})"
                if p["form"] == "byte_ranges" else f"{p.get('path')} (access maps on {pages})")

    header = [("trace", f"{info.get('path')} ({', '.join(facts)})")]
    for k, p in enumerate(document.get("protections") or [protection]):
        header.append(("protection" if k == 0 else "", what(p)))
    header += [
        ("vm", f"{config['vcpus']} vCPU{'s' if config['vcpus'] != 1 else ''}, {_memory(config)}"
               f"{', hugepages' if config['hugepages'] else ''}, engine {config['engine']}"),
        ("exit cost", f"{document['exit_cost_us']:g} us to userspace, "
                      f"{document['kernel_exit_cost_us']:g} us in the kernel (estimates)"),
    ]
    if through:
        header.append(("writes let through",
                       {"none": "not charged (--write-through emulate or mtf to add them)",
                        "emulate": f"emulated, {through['emulation_cost_us']:g} us each "
                                   "(added to the overhead)",
                        "mtf": "single-stepped with MTF, its extra exits at the exit "
                               "costs (added to the overhead)"}[policy]))
    width = max(len(label) for label, _ in header)
    out = "".join(f"{label:<{width}}  {text}\n" for label, text in header)

    names, rows = comparison_rows(document)
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(name), *(len(values[i]) for _, values in rows))
              for i, name in enumerate(names)]
    out += "\n" + " " * label_width + "".join(
        f"  {name:>{w}}" for name, w in zip(names, widths)) + "\n"
    for label, values in rows:
        out += f"{label:<{label_width}}" + "".join(
            f"  {v:>{w}}" for v, w in zip(values, widths)) + "\n"
    savings = savings_lines(document)
    if savings:
        out += "\n" + "".join(f"{line}\n" for line in savings)
    notes = document.get("notes") or []
    if notes:
        out += "\nwhy v4 and v12 differ here:\n" + "".join(
            f"- {_wrap(n['text'], 98, '  ')}\n" for n in notes)
    if written:
        out += f"\nwrote {', '.join(written)}\n"
    return out


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _wrap(text: str, width: int, indent: str) -> str:
    import textwrap

    return f"\n{indent}".join(textwrap.wrap(text, width))
