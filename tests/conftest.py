"""Shared test helper modules (conformance_cases.py, strategies.py) import by name.

pytest runs with --import-mode=importlib, so tests/ is not on sys.path by itself.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
