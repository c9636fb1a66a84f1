"""``python -m sppjit``: the ``sppjit`` program, for an environment without its script."""

from sppjit.launcher import main

if __name__ == "__main__":
    main()
