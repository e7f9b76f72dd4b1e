"""The JSON Schemas under ``schemas/``: finding them at run time, and generating them.

``python -m cfwrap.schema_files DIR`` (``scripts/update-schemas``) writes them from the models.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cfwrap.errors import VerificationError


def path(name: str) -> Path:
    """Where a checked-in schema is: ``schemas/`` of a checkout, or inside an installed wheel.

    Raises:
        VerificationError: the schema is not installed.
    """
    package = Path(__file__).resolve().parent
    for folder in (package.parent / "schemas", package / "schemas"):
        if (folder / name).is_file():
            return folder / name
    raise VerificationError(name, "not found beside the cfwrap package", fix="reinstall cfwrap")


def load(name: str) -> dict[str, Any]:
    """Read a checked-in schema."""
    loaded: dict[str, Any] = json.loads(path(name).read_text())
    return loaded


def generated() -> dict[str, dict[str, Any]]:
    """Every schema cfwrap checks in, by file name, generated from the models."""
    from cfwrap import manifest
    from cfwrap.plan import model, state
    from cfwrap.replay import guide, transcript

    makers: dict[str, Callable[[], dict[str, Any]]] = {
        manifest.SCHEMA_FILE: manifest.json_schema,
        guide.SCHEMA_FILE: guide.json_schema,
        transcript.SCHEMA_FILE: transcript.json_schema,
        model.PLAN_SCHEMA_FILE: model.json_schema,
        state.SCHEMA_FILE: state.json_schema,
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
