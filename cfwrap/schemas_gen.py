"""Write the JSON Schemas generated from cfwrap's models (``python -m cfwrap.schemas_gen DIR``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def generated() -> dict[str, dict[str, Any]]:
    """Every schema cfwrap checks in, by file name."""
    from cfwrap import manifest

    makers: dict[str, Callable[[], dict[str, Any]]] = {
        manifest.SCHEMA_FILE: manifest.json_schema,
    }
    return {name: make() for name, make in makers.items()}


def render(schema: dict[str, Any]) -> str:
    """The checked-in text of a schema."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    """Write each schema into the folder named by ``argv[0]``."""
    folder = Path(argv[0])
    for name, schema in generated().items():
        (folder / name).write_text(render(schema))
        print(folder / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
