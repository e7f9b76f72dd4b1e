"""Run the CLI as ``python -m cfwrap``."""

from cfwrap.cli import run

run()
