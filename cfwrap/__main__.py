"""Run the CLI as ``python -m cfwrap``."""

from cfwrap.cli import main

raise SystemExit(main())
