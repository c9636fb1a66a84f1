"""A module that is also its main function: ``sppjit.replay(vm, trace)`` and
``sppjit.sweep(trace, configs)`` call the function of the same name, while every other name of
the module (``sppjit.replay.ReplayStream``, ``sppjit.sweep.Config``, ...) stays reachable."""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function_name: str) -> None:
    """Let module ``module_name`` be called as its function ``function_name``."""
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        __doc__ = module.__doc__

        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    module.__class__ = CallableModule
