"""Build hook: place kernels/, datasets/ and cli.py inside the sppjit package of the wheel.

The repository keeps them at its root (see README, "Layout"); installed, they are
sppjit.kernels, sppjit.datasets and sppjit.cli, so no generic top-level name is claimed.
Editable installs need nothing copied: sppjit/__init__.py resolves them from the checkout
(copies in site-packages would go stale and shadow the sources).
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

INSIDE_PACKAGE = {"kernels": "sppjit/kernels", "datasets": "sppjit/datasets", "cli.py": "sppjit/cli.py"}


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"].update(INSIDE_PACKAGE)
