"""``python -m sppjit``: the ``sppjit`` command, for an environment without its script."""

from sppjit.cli import main

if __name__ == "__main__":
    main()
