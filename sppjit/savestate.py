"""Save a VM's state to one .npz file and load it back as an equal VM.

The file holds every array of the kernels.layout.State (the table pool only up to the tables
in use, scal[SC_NTABLES]) and a JSON document with the format version and the VmConfig. It is
written to a temporary name and renamed, so a failed save leaves nothing behind; it is read
with allow_pickle=False, so loading a file runs no code from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np

from . import __version__
from .errors import InputError
from .kernels import layout as L

FORMAT = "sppjit-state"
FORMAT_VERSION = 2  # 2: sparse access maps (map_dir/map_nodes/map_blocks), tagged region caches
_META = "__meta__"
# State fields indexed by a pool's entries, and the scal counter of the entries in use: saved
# only up to those.
_POOL_FIELDS = {
    "tables": L.SC_NTABLES,
    "table_kind": L.SC_NTABLES,
    "table_level": L.SC_NTABLES,
    "map_nodes": L.SC_MAP_NODES,
    "map_blocks": L.SC_MAP_BLOCKS,
}
_POOL_FILL = {"map_nodes": L.MAP_NONE, "map_blocks": L.FULL_SPP_ACCESS}  # spare rows; others 0
# Caches of walks: not part of what a VM is. Saved empty; a loaded state starts with them empty.
_CACHE_FIELDS = ("ept_cache", "sppt_cache")
# Derived from the rest and sized by the budget of this sppjit (kernels.layout): not saved at
# all; a loaded state gets an empty one (files from before it existed load as they did).
_DERIVED_FIELDS = ("write_view",)


def state_arrays(vm) -> dict[str, np.ndarray]:
    """The arrays that define ``vm``: every State field, the pools cut to the entries in use,
    the region caches empty (they only spare walks: a VM is the same with or without them).

    Two VMs are equal when their configs are equal and these arrays are (capacity aside)."""
    st = vm.state
    arrays = {}
    for name in L.State._fields:
        if name in _DERIVED_FIELDS:
            continue
        value = getattr(st, name)
        if name in _POOL_FIELDS:
            value = value[: int(st.scal[_POOL_FIELDS[name]])]
        elif name in _CACHE_FIELDS:
            value = np.full_like(value, L.CACHE_INVALID)
        arrays[name] = value
    return arrays


def save_state(vm, path: str | os.PathLike) -> None:
    """Write ``vm``'s state and config to ``path`` (.npz), atomically."""
    path = os.fspath(path)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sppjit_version": __version__,
        "config": dataclasses.asdict(vm.config),
    }
    arrays = {name: np.ascontiguousarray(value) for name, value in state_arrays(vm).items()}
    arrays[_META] = np.array(json.dumps(meta))
    from .io.atomic import atomic_path

    # Published like every other output (sppjit.io.atomic): inside a run's Outputs, a file
    # it replaces comes back if the run fails, and a killed run's temporary is swept later.
    with atomic_path(path) as temporary, vm.mmu_lock, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)  # a file object: numpy adds no ".npz" to the name


def load_state(path: str | os.PathLike):
    """Read a file written by save_state and return an equal VM (its table pool may have
    more spare capacity). Raises InputError for a missing, corrupt or foreign file."""
    from .vm import VM

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"state: no such file: {path}")
    if os.path.isdir(path):
        raise InputError(f"state: {path} is a directory")
    if not zipfile.is_zipfile(path):
        raise InputError(f"state: {path} is not an sppjit state file (an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if _META not in data.files:
                raise InputError(f"state: {path} is not an sppjit state file")
            meta = json.loads(str(data[_META]))
            arrays = {name: data[name] for name in data.files if name != _META}
    except InputError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, MemoryError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"state: cannot read {path}: {reason}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"state: {path} is not an sppjit state file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"state: {path} has format version {meta.get('format_version')}; "
                         f"this sppjit reads {FORMAT_VERSION}")
    try:
        config = meta["config"]
        _check_config_types(config)
        vm = VM(
            vcpus=config["vcpus"],
            profile=config["profile"],
            hugepages=config["hugepages"],
            subpage_check=config["subpage_check"],
            granularity=config["granularity"],
            spp_supported=config["spp_supported"],
            nested=config["nested"],
            memslots=[tuple(slot) for slot in config["memslots"]],
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"state: {path} has a damaged config ({reason})") from None
    state = _restore(vm.state, arrays, path)
    from .statecheck import check_state

    problem = check_state(state, vm.config)
    if problem:
        raise InputError(f"state: {path} is damaged: {problem}")
    vm.state = state
    vm.invalidate_caches()  # checked, and still dropped: the first walks refill them
    return vm


def _check_config_types(config) -> None:
    """The saved config's values have the types save_state writes (a float or a string where an
    integer belongs would otherwise be converted silently); TypeError names the first one."""
    if not isinstance(config, dict):
        raise TypeError("the config is not a mapping")
    types = {"vcpus": int, "profile": str, "hugepages": bool, "subpage_check": str, "granularity": str,
             "spp_supported": bool, "nested": bool, "memslots": list}
    for key, kind in types.items():
        value = config.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"{key} is {value!r}")
    for slot in config["memslots"]:
        if (not isinstance(slot, list) or len(slot) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in slot)):
            raise TypeError(f"memslot {slot!r} is not a pair of integers")


def _restore(fresh: L.State, arrays: dict[str, np.ndarray], path: str) -> L.State:
    """A State from the saved arrays, checked field by field against a fresh VM's."""
    fields = {name: getattr(fresh, name) for name in _DERIVED_FIELDS}  # the fresh VM's, empty
    for name in L.State._fields:
        if name in _DERIVED_FIELDS:
            continue
        if name not in arrays:
            raise InputError(f"state: {path} lacks the array '{name}'")
        saved, like = arrays[name], getattr(fresh, name)
        if saved.dtype != like.dtype:
            raise InputError(f"state: {path}: array '{name}' has dtype {saved.dtype}, "
                             f"expected {like.dtype}")
        if name not in _POOL_FIELDS and saved.shape != like.shape:
            raise InputError(f"state: {path}: array '{name}' has shape {saved.shape}, "
                             f"expected {like.shape} for this config")
        fields[name] = saved
    scal = fields["scal"]
    for name, counter in _POOL_FIELDS.items():
        used, saved, like = int(scal[counter]), fields[name], getattr(fresh, name)
        if used < 0 or saved.shape != (used,) + like.shape[1:]:
            raise InputError(f"state: {path}: array '{name}' has shape {saved.shape}, not the "
                             f"{used} entries in use that scal[{counter}] says")
        if counter == L.SC_NTABLES and not 1 <= used <= L.MAX_TABLES:
            raise InputError(f"state: {path}: {used} tables in use (1..{L.MAX_TABLES})")
    for name in _POOL_FIELDS:
        saved, like = fields[name], getattr(fresh, name)
        used = saved.shape[0]
        grown = np.full((max(used, like.shape[0]),) + saved.shape[1:], _POOL_FILL.get(name, 0), dtype=saved.dtype)
        grown[:used] = saved
        fields[name] = grown
    for name in L.State._fields:
        if name not in _POOL_FIELDS and name not in _DERIVED_FIELDS:
            fields[name] = np.array(fields[name], copy=True)  # writable, owned
    if not np.array_equal(fields["cfg"], fresh.cfg):
        raise InputError(f"state: {path}: its settings array does not match its config")
    return L.State(**fields)
