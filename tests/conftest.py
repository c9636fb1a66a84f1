"""Shared test helper modules (conformance_cases.py, strategies.py) import by name.

pytest runs with --import-mode=importlib, so tests/ is not on sys.path by itself.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    group = parser.getgroup("sppjit")
    group.addoption("--fuzz-iterations", type=int, default=None,
                    help="mutants per target in tests/test_fuzz.py (default: its bounded "
                         "FUZZ_ITERATIONS, or SPPJIT_FUZZ_ITERATIONS)")
    group.addoption("--fuzz-seed", type=int, default=None,
                    help="seed of the mutation sequence in tests/test_fuzz.py (default 0)")
