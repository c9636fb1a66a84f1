"""report.json: what a report was made from (inputs and their digests, versions, the replay's
configuration and seed) and its headline numbers; and the summary it reads.

A summary is the ``--summary`` JSON of sppjit replay or the document of sppjit compare --json
(docs/contract.md §5.3). It is checked for the shape the report relies on when it is read, so
that a summary of another shape is one clear error, never a failure half-way.
"""

from __future__ import annotations

import json
from importlib import metadata

from sppjit import __version__
from sppjit.errors import InputError
from sppjit.hooks import PROTECTION_EXIT_KINDS
from sppjit.io.formats import cannot_read, read_magic
from sppjit.provenance import file_digest
from sppjit.provenance import versions as tool_versions

from .analysis import TEXT_TOP, ReportStats, top_pages

REPORT_SCHEMA_VERSION = 1

def read_summary(path: str) -> dict:
    """A summary JSON (sppjit replay --summary) or a compare document (sppjit compare --json)."""
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
    check_summary(doc, path)
    return doc


# Keys of a replay summary that the report reads into, and must therefore be objects when
# present (docs/contract.md §5.3).
_OBJECT_KEYS = ("config", "input")


def check_summary(doc, path: str) -> None:
    """InputError unless ``doc`` has the shape of a summary or a compare document: an object,
    whose "config" and "input" are objects, and, for a compare document, whose configurations
    each have a name and exit counts (compare_configs)."""
    what = "(the --summary of sppjit replay or sppjit compare --json)"
    if not isinstance(doc, dict):
        raise InputError(f"summary: {path} holds a JSON {type(doc).__name__}, not an object "
                         f"{what}")
    for key in _OBJECT_KEYS:
        value = doc.get(key)
        if value is not None and not isinstance(value, dict):
            raise InputError(f"summary: {path}: \"{key}\" is a JSON {_json_type(value)}, not an "
                             f"object {what}")
    if is_compare(doc):
        compare_configs(doc)


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def is_compare(doc: dict) -> bool:
    """A compare document (sppjit compare --json) has a "configs" key."""
    return "configs" in doc


def compare_configs(doc: dict) -> list[tuple[str, dict]]:
    """(name, exits by kind) of each configuration of a compare document.

    "configs" is a list of objects (or an object keyed by name); each holds its exits as
    "exits" ({"total": n, "<kind>": n, ...}) or inside "summary"; its name is "name", "label"
    or "id", else made from its "config" (granularity, profile, subpage_check).
    """
    configs = doc.get("configs")
    if isinstance(configs, dict):
        items = [(str(k), v) for k, v in configs.items()]
    elif isinstance(configs, list):
        items = [(None, v) for v in configs]
    else:
        raise InputError("summary: \"configs\" must be a list or an object of configurations")
    if not items:
        raise InputError("summary: the compare document has no configurations")
    out = []
    for index, (key, config) in enumerate(items):
        if not isinstance(config, dict):
            raise InputError(f"summary: configuration {index} is not an object")
        name = key or config.get("name") or config.get("label") or config.get("id")
        if not name:
            name = _config_name(config.get("config")) or f"config {index}"
        exits = config.get("exits")
        if not isinstance(exits, dict) and isinstance(config.get("summary"), dict):
            exits = config["summary"].get("exits")
        if not isinstance(exits, dict):
            raise InputError(f"summary: configuration {name!r} has no \"exits\" object")
        counts = {}
        for kind, value in exits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            counts[str(kind)] = value
        if not counts:
            raise InputError(f"summary: configuration {name!r} has no exit counts")
        out.append((str(name), counts))
    return out


def compare_figures(doc: dict) -> list[dict]:
    """What the compare chart shows, per configuration of a compare document: ``name``,
    ``protection_exits`` (spp_violation + write_protect), ``relevant`` / ``irrelevant``
    (None without hooks), ``is_baseline``, ``overhead`` (the estimated seconds of its exits, with the
    write-through price when the document chose one; None when the document has no
    derived figures), ``change_exits`` / ``change_overhead`` against its baseline (None:
    none)."""
    out = []
    entries = doc["configs"] if isinstance(doc.get("configs"), list) else [
        {"name": k, **v} for k, v in doc["configs"].items()]
    for (name, exits), entry in zip(compare_configs(doc), entries):
        derived = entry.get("derived") if isinstance(entry.get("derived"), dict) else {}
        hooks = derived.get("hooks") or {}
        change = derived.get("change_vs_baseline") or {}
        overhead = derived.get("total_overhead_seconds", derived.get("overhead_seconds"))
        out.append({
            "name": name,
            "is_baseline": name == (entry.get("baseline") or doc.get("baseline")),
            "protection_exits": int(sum(exits.get(k, 0) or 0 for k in PROTECTION_EXIT_KINDS)),
            "relevant": hooks.get("relevant"), "irrelevant": hooks.get("irrelevant"),
            "overhead": overhead,
            "change_exits": change.get("protection_exits"),
            "change_overhead": change.get("total_overhead_seconds",
                                          change.get("overhead_seconds")),
        })
    return out


def describe(summary: dict | None, results: str | None = None) -> str:
    """One line naming what a report shows, for the plots' titles: the trace and the
    configuration ("t.parquet: SPP v4, sub-page check all, 2 vCPUs"; a compare document:
    its configurations)."""
    import os

    trace = None
    if isinstance(summary, dict) and isinstance(summary.get("input"), dict):
        trace = summary["input"].get("path")
    label = os.path.basename(str(trace)) if trace else (
        os.path.basename(str(results)) if results else "an in-memory trace")
    if not isinstance(summary, dict):
        return label
    if is_compare(summary):
        # The compare chart shows every configuration; the other plots show the results of
        # one replay, whose configuration the compare document does not say.
        cfg = summary.get("config") if isinstance(summary.get("config"), dict) else {}
        vcpus = cfg.get("vcpus")
        names = [name for name, _ in compare_configs(summary)]
        compared = ", ".join(names)
        if len(compared) > 60:  # a title line, not a list: say how many
            compared = f"{len(names)} configurations"
        if isinstance(vcpus, int):
            compared += f"; {vcpus} vCPU{'s' if vcpus != 1 else ''}"
        if results is None:
            return f"{label}: {compared}"
        return f"{os.path.basename(str(results))}, a replay of {label} (compared: {compared})"
    cfg = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    bits = []
    if cfg.get("granularity") == "page":
        bits.append("page-granular protection")
    elif "profile" in cfg:
        bits.append(f"SPP {cfg['profile']}")
        if cfg.get("subpage_check"):
            bits.append(f"sub-page check {cfg['subpage_check']}")
    if isinstance(cfg.get("vcpus"), int):
        bits.append(f"{cfg['vcpus']} vCPU{'s' if cfg['vcpus'] != 1 else ''}")
    if cfg.get("hugepages"):
        bits.append("huge pages")
    return f"{label}: {', '.join(bits)}" if bits else label


def _config_name(config) -> str | None:
    if not isinstance(config, dict):
        return None
    if config.get("granularity") == "page":
        name = "page"
    elif "profile" in config:
        name = f"SPP {config['profile']}"
    else:
        return None
    if config.get("granularity") != "page" and config.get("subpage_check") not in (None, "all"):
        name += f" ({config['subpage_check']})"
    return name


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
                    summary_path: str | None, summary: dict | None, epochs: int, top: int,
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
        source = {"kind": "compare" if is_compare(summary) else "replay",
                  "sppjit_version": summary.get("sppjit_version"),
                  "seed": find_seed(summary)}
        if is_compare(summary):
            source["configs"] = [name for name, _ in compare_configs(summary)]
            source["config"] = summary.get("config")
        else:
            source["config"] = summary.get("config")
            source["input"] = summary.get("input")
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


