"""Typer command-line interface (installed as ``peftx.cli``)."""
