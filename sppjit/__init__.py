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

__all__ = ["VM", "SppError", "InputError", "VmEntryError", "ReplayResult", "sweep", "fleet",
           "__version__"]


def __getattr__(name):
    # numba and pyarrow load on first use, so `sppjit --version` and `--help` stay instant.
    if name == "VM":
        from .vm import VM

        return VM
    if name in ("sweep", "fleet"):  # the modules, callable: sppjit.sweep(trace, configs, ...)
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "ReplayResult":
        from .replay import ReplayResult

        return ReplayResult
    raise AttributeError(f"module 'sppjit' has no attribute {name!r}")
