"""Imports flow one way: the library never imports the command line (sppjit.commands,
sppjit.cli), command modules import no other command's private names, and sppjit.defaults
(read by the command modules at start-up) imports nothing heavy. Read with ast, so an import
inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_PACKAGES = ("sppjit.commands", "sppjit.cli")


def module_name(path: Path) -> str:
    """The name a file is imported under (kernels/, datasets/ and cli.py are installed in
    the sppjit package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "sppjit":
        parts.insert(0, "sppjit")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                found.append((base, alias.name))
    return found


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import may load: ``from a import b`` may load a.b."""
    out = set()
    for base, name in imports(source, module, is_package):
        out.add(base)
        if name is not None:
            out.add(f"{base}.{name}")
    return out


def library_files() -> list[Path]:
    # sppjit/__main__.py (`python -m sppjit`) and sppjit/launcher.py (the `sppjit` program's
    # entry point, kept out of sppjit.commands so that a forwarded command does not import
    # typer) are the command line itself, not the library.
    files = [p for p in (ROOT / "sppjit").rglob("*.py")
             if "commands" not in p.parts and p.name not in ("__main__.py", "launcher.py")]
    files += list((ROOT / "kernels").rglob("*.py")) + list((ROOT / "datasets").rglob("*.py"))
    return sorted(files)


def in_cli(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in CLI_PACKAGES)


def test_the_checker_finds_what_it_looks_for():
    source = ("import os\nfrom sppjit import commands\ndef f():\n"
              "    from ..commands.replay import _x\n")
    found = imported_modules(source, "sppjit.convert.engine")
    assert "sppjit.commands" in found and "sppjit.commands.replay" in found
    assert imports(source, "sppjit.convert.engine")[-1] == ("sppjit.commands.replay", "_x")
    assert ("sppjit.io.atomic", "Outputs") in imports("from .atomic import Outputs",
                                                       "sppjit.io", is_package=True)


def test_library_never_imports_the_command_line():
    assert len(library_files()) > 30
    bad = []
    for path in library_files():
        module = module_name(path)
        found = imported_modules(path.read_text(), module, path.name == "__init__.py")
        bad += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(found)
                if in_cli(name)]
    assert bad == []


def test_commands_do_not_import_each_others_private_names():
    bad = []
    for path in sorted((ROOT / "sppjit" / "commands").glob("*.py")):
        module = module_name(path)
        for base, name in imports(path.read_text(), module, path.name == "__init__.py"):
            other = base.startswith("sppjit.commands.") and base != module
            if other and (name or "").startswith("_"):
                bad.append(f"{path.name} imports {name} from {base}")
    assert bad == []


@pytest.mark.parametrize("module", ["defaults"])
def test_shared_names_module_is_plain_python(module):
    path = ROOT / "sppjit" / f"{module}.py"
    assert imported_modules(path.read_text(), f"sppjit.{module}") <= {"__future__",
                                                                       "__future__.annotations"}
