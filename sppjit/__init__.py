"""sppjit: a JIT-compiled simulator of Intel EPT-based Sub-Page write Permission (SPP)."""

import os as _os

# In a source checkout kernels/, datasets/ and cli.py sit at the repository root; the wheel
# places them inside this package (pyproject.toml, force-include). Make the checkout resolve
# them as sppjit.kernels, sppjit.datasets and sppjit.cli too, without any top-level name.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
) and _os.path.isfile(_os.path.join(_root, "cli.py")):
    __path__.append(_root)  # type: ignore[name-defined]

__version__ = "0.1.0"

from .errors import InputError, SppError, VmEntryError  # noqa: E402  (light, no numba)

# Names the README uses, loaded on first use: numba and pyarrow load only then, so that
# `sppjit --version` and `--help` stay instant. name -> (module, attribute).
_LAZY = {
    "VM": ("vm", "VM"),
    "ReplayResult": ("replay", "ReplayResult"),
    "ReplayStream": ("replay", "ReplayStream"),
    "open_trace": ("io.trace", "open_trace"),
    "read_protection": ("io.protect", "read_protection"),
    "write_protection": ("io.protect", "write_protection"),
    "ranges_to_maps": ("io.protect", "ranges_to_maps"),
    "AccessMaps": ("io.protect", "AccessMaps"),
    "ByteRanges": ("io.protect", "ByteRanges"),
    "save_state": ("savestate", "save_state"),
    "load_state": ("savestate", "load_state"),
}
# Submodules reachable as attributes; sppjit.replay(vm, trace), sppjit.sweep(trace, configs)
# and sppjit.fleet(manifest) are also callable (their modules call their function).
_MODULES = ("replay", "sweep", "fleet", "abi", "job", "compare", "io", "savestate", "bits")

__all__ = ["SppError", "InputError", "VmEntryError", "__version__", *_LAZY, *_MODULES]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
        globals()[name] = value  # once: later uses do not come back here
        return value
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)  # binds the package attribute
    raise AttributeError(f"module 'sppjit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_MODULES))
