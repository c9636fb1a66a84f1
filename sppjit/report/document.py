"""report.json: what a report was made from (inputs and their digests, versions, the replay's
configuration and seed) and its headline numbers; and the summary it reads.

A summary is the ``--summary`` JSON of sppjit replay or the document of sppjit compare --json
(docs/contract.md §5.3), read into its typed form (sppjit.summary: ReplaySummary or
CompareDocument) when it is read, so that a summary of another shape is one clear error
naming the key, never a failure half-way; the report's code reads attributes from there on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import metadata

from sppjit import __version__
from sppjit.errors import InputError
from sppjit.hooks import PROTECTION_EXIT_KINDS
from sppjit.io.formats import cannot_read, read_magic
from sppjit.provenance import file_digest
from sppjit.provenance import versions as tool_versions
from sppjit.summary import CompareDocument, ReplaySummary

from .analysis import TEXT_TOP, ReportStats, top_pages

REPORT_SCHEMA_VERSION = 1

Summary = ReplaySummary | CompareDocument


def read_summary(path: str) -> Summary:
    """A summary JSON (sppjit replay --summary) or a compare document (sppjit compare --json),
    typed."""
    read_magic(path, "summary")  # missing file, directory, unreadable: one clear message
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read("summary", path, getattr(exc, "strerror", None) or exc) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"summary: {path} is not JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except RecursionError:
        raise InputError(f"summary: {path} is nested too deeply to be a summary") from None
    return as_summary(doc, path)


def as_summary(doc, path: str | None = None) -> Summary:
    """``doc`` typed: a ReplaySummary or CompareDocument as it is, the JSON of either read
    with its ``from_dict`` (a compare document has "configs"). InputError ("summary: ...",
    naming the key) for any other shape."""
    if isinstance(doc, (ReplaySummary, CompareDocument)):
        return doc
    where = f"{path}: " if path is not None else ""
    check_summary(doc, path if path is not None else "the document")
    cls = CompareDocument if is_compare(doc) else ReplaySummary
    try:
        return cls.from_dict(doc)
    except InputError as exc:
        raise InputError(f"summary: {where}{exc} {_WHAT}") from None


_WHAT = "(the --summary of sppjit replay or sppjit compare --json)"

# Keys of a replay summary that the report reads into, and must therefore be objects when
# present (docs/contract.md §5.3).
_OBJECT_KEYS = ("config", "input")


def check_summary(doc, path: str) -> None:
    """InputError unless ``doc`` has the outline of a summary or a compare document: an
    object, whose "config" and "input" are objects, and, for a compare document, whose
    configurations each have exit counts. The typed reading (as_summary) checks the rest."""
    if not isinstance(doc, Mapping):
        raise InputError(f"summary: {path} holds a JSON {type(doc).__name__}, not an object "
                         f"{_WHAT}")
    for key in _OBJECT_KEYS:
        value = doc.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise InputError(f"summary: {path}: \"{key}\" is a JSON {_json_type(value)}, not an "
                             f"object {_WHAT}")
    if is_compare(doc):
        _check_configs(doc["configs"])


def _check_configs(configs) -> None:
    """Each configuration of a compare document's JSON has an exits object with counts, in
    itself or in its "summary" (the messages the report has always given)."""
    if isinstance(configs, Mapping):
        items = [(str(k), v) for k, v in configs.items()]
    elif isinstance(configs, list):
        items = [(None, v) for v in configs]
    else:
        raise InputError("summary: \"configs\" must be a list or an object of configurations")
    if not items:
        raise InputError("summary: the compare document has no configurations")
    for index, (key, config) in enumerate(items):
        if not isinstance(config, Mapping):
            raise InputError(f"summary: configuration {index} is not an object")
        name = key or config.get("name") or f"config {index}"
        exits = config.get("exits")
        if not isinstance(exits, Mapping) and isinstance(config.get("summary"), Mapping):
            exits = config["summary"].get("exits")
        if not isinstance(exits, Mapping):
            raise InputError(f"summary: configuration {name!r} has no \"exits\" object")
        if not any(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in exits.values()):
            raise InputError(f"summary: configuration {name!r} has no exit counts")


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def is_compare(doc) -> bool:
    """A compare document (sppjit compare --json): its JSON has a "configs" key."""
    if isinstance(doc, CompareDocument):
        return True
    return isinstance(doc, Mapping) and "configs" in doc


def compare_configs(doc: CompareDocument | Mapping) -> list[tuple[str, dict]]:
    """(name, exits by kind) of each configuration of a compare document."""
    doc = as_summary(doc)
    if not isinstance(doc, CompareDocument):
        raise InputError("summary: not a compare document (no \"configs\")")
    return [(c.name, c.summary.exits.to_dict()) for c in doc.configs]


def compare_figures(doc: CompareDocument | Mapping) -> list[dict]:
    """What the compare chart shows, per configuration of a compare document: ``name``,
    ``protection_exits`` (spp_violation + write_protect), ``relevant`` / ``irrelevant``
    (None without hooks), ``is_baseline``, ``overhead`` (the estimated seconds of its exits,
    with the write-through price when the document chose one; the exits' alone in a
    document older than the write-through figures), ``change_exits`` / ``change_overhead``
    against its baseline (None: none)."""
    doc = as_summary(doc)
    out = []
    for (name, exits), entry in zip(compare_configs(doc), doc.configs):
        derived = entry.derived
        hooks = derived.hooks or {}
        change = derived.change_vs_baseline or {}
        overhead = (derived.total_overhead_seconds if derived.total_overhead_seconds is not None
                    else derived.overhead_seconds)
        out.append({
            "name": name,
            "is_baseline": name == (entry.baseline or doc.baseline),
            "protection_exits": int(sum(exits.get(k, 0) or 0 for k in PROTECTION_EXIT_KINDS)),
            "relevant": hooks.get("relevant"), "irrelevant": hooks.get("irrelevant"),
            "overhead": overhead,
            "change_exits": change.get("protection_exits"),
            "change_overhead": change.get("total_overhead_seconds",
                                          change.get("overhead_seconds")),
        })
    return out


def describe(summary: Summary | Mapping | None, results: str | None = None) -> str:
    """One line naming what a report shows, for the plots' titles: the trace and the
    configuration ("t.parquet: SPP v4, sub-page check all, 2 vCPUs"; a compare document:
    its configurations)."""
    import os

    summary = None if summary is None else as_summary(summary)
    trace = summary.input.get("path") if summary is not None else None
    label = os.path.basename(str(trace)) if trace else (
        os.path.basename(str(results)) if results else "an in-memory trace")
    if summary is None:
        return label
    cfg = summary.config
    vcpus = cfg.get("vcpus")
    if isinstance(summary, CompareDocument):
        # The compare chart shows every configuration; the other plots show the results of
        # one replay, whose configuration the compare document does not say.
        names = [c.name for c in summary.configs]
        compared = ", ".join(names)
        if len(compared) > 60:  # a title line, not a list: say how many
            compared = f"{len(names)} configurations"
        if isinstance(vcpus, int):
            compared += f"; {vcpus} vCPU{'s' if vcpus != 1 else ''}"
        if results is None:
            return f"{label}: {compared}"
        return f"{os.path.basename(str(results))}, a replay of {label} (compared: {compared})"
    bits = []
    if cfg.get("granularity") == "page":
        bits.append("page-granular protection")
    elif "profile" in cfg:
        bits.append(f"SPP {cfg['profile']}")
        if cfg.get("subpage_check"):
            bits.append(f"sub-page check {cfg['subpage_check']}")
    if isinstance(vcpus, int):
        bits.append(f"{vcpus} vCPU{'s' if vcpus != 1 else ''}")
    if cfg.get("hugepages"):
        bits.append("huge pages")
    return f"{label}: {', '.join(bits)}" if bits else label


def find_seed(doc) -> object:
    """The first "seed" found in a summary (top level, input, generator, ...), else None.

    Depth first, in document order; iterative, so that no nesting depth can exhaust the
    interpreter's stack."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "seed" in node:
                if node["seed"] is not None:
                    return node["seed"]
                continue
            children = [v for v in node.values() if isinstance(v, (dict, list))]
        elif isinstance(node, list):
            children = node
        else:
            continue
        stack.extend(reversed(children))
    return None


def versions() -> dict[str, str | None]:
    """The versions a summary records (sppjit.provenance), and matplotlib's, which draws the
    plots (None when it is not installed; read from its metadata, not imported)."""
    out: dict[str, str | None] = dict(tool_versions())
    try:
        out["matplotlib"] = metadata.version("matplotlib")
    except metadata.PackageNotFoundError:
        out["matplotlib"] = None
    return out


def report_document(stats: ReportStats, *, results: str | None, exits: str | None,
                    summary_path: str | None, summary: Summary | None, epochs: int, top: int,
                    outputs: list[str]) -> dict:
    """The report.json: what was read (paths, digests), with what, and the headline numbers."""
    inputs = {}
    for key, path in (("results", results), ("exits", exits), ("summary", summary_path)):
        if path is None:
            inputs[key] = None
            continue
        entry = dict(stats.inputs.get(key, {}))
        entry["path"] = path
        entry["digest"] = file_digest(path)
        inputs[key] = entry
    source = None
    if summary is not None:
        # the seed wherever the summary's JSON holds it: to_dict gives that JSON back
        source = {"kind": "compare" if isinstance(summary, CompareDocument) else "replay",
                  "sppjit_version": summary.sppjit_version,
                  "seed": find_seed(summary.to_dict())}
        if isinstance(summary, CompareDocument):
            source["configs"] = [c.name for c in summary.configs]
            source["config"] = summary.config
        else:
            source["config"] = summary.config
            source["input"] = summary.input
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "report": "sppjit report",
        "sppjit_version": __version__,
        "versions": versions(),
        "inputs": inputs,
        "source": source,
        "options": {"epochs": epochs, "epochs_used": stats.epochs.num_rows, "top": top},
        "totals": stats.totals,
        "top_pages": [_page_json(p) for p in top_pages(stats.per_page, TEXT_TOP)],
        "warnings": stats.warnings,
        "outputs": outputs,
    }


def _page_json(page: dict) -> dict:
    return {"gfn": f"{page['gfn']:#x}", **{k: v for k, v in page.items() if k != "gfn"}}


