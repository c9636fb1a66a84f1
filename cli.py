"""The sppjit command line (typer)."""
