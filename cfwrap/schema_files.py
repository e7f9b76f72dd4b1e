"""The JSON Schemas under ``schemas/``: finding them at run time, a quick check, generating them.

``python -m cfwrap.schema_files DIR`` (``scripts/update-schemas``) writes them from the models.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfwrap.errors import VerificationError

if TYPE_CHECKING:
    import jsonschema


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


@functools.cache
def checked_in(name: str) -> dict[str, Any]:
    """A checked-in schema, read once per process (shared: never change it)."""
    return load(name)


def surely_valid(name: str, data: object) -> bool:
    """True if ``data`` surely satisfies the checked-in schema ``name``, without jsonschema.

    Importing jsonschema costs ~50 ms, a fifth of a quickstart: :func:`conforms` passes only
    what jsonschema passes, and jsonschema (:func:`validator`) decides, and words, the rest.
    """
    return conforms(checked_in(name), data)


@functools.cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    """Jsonschema's validator of the checked-in schema ``name``, compiled once per process."""
    import jsonschema

    return jsonschema.Draft202012Validator(checked_in(name))


#: Keywords that only describe (``format`` too: cfwrap's validators check no formats).
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$defs", "title", "description", "default", "examples", "format"}
)
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def conforms(schema: dict[str, Any], data: object) -> bool:
    """True if ``data`` surely satisfies ``schema``; False if it may not (jsonschema then decides).

    For data cfwrap has just made (a manifest), so the common case does not import jsonschema
    (~50 ms of a quickstart). Each keyword cfwrap's schemas use is checked at least as strictly
    as JSON Schema 2020-12 does (``pattern`` with ``re.search``, as jsonschema does); a keyword
    it does not know, or a ``$ref`` outside ``#/$defs/``, is a doubt, never a pass. Tests hold
    it to jsonschema on generated data: whatever passes here, jsonschema passes too.
    """
    return _conforms(schema, data, schema)


def _conforms(node: object, data: object, root: dict[str, Any]) -> bool:  # noqa: PLR0911, PLR0912
    if node is True or node is False:
        return node is True
    if not isinstance(node, dict):
        return False
    for keyword, value in node.items():
        if keyword in _ANNOTATIONS:
            continue
        if keyword == "$ref":
            name = value.removeprefix("#/$defs/") if isinstance(value, str) else ""
            target = root.get("$defs", {}).get(name) if "/" not in name else None
            if target is None or not _conforms(target, data, root):
                return False
        elif keyword == "type":
            kinds = _TYPES.get(value) if isinstance(value, str) else None
            # bool is an int to Python, never an integer or number to JSON.
            if (
                kinds is None
                or not isinstance(data, kinds)
                or (isinstance(data, bool) != (value == "boolean"))
            ):
                return False
        elif keyword == "properties":
            if isinstance(data, dict) and not all(
                _conforms(sub, data[key], root) for key, sub in value.items() if key in data
            ):
                return False
        elif keyword == "required":
            if isinstance(data, dict) and not all(key in data for key in value):
                return False
        elif keyword == "additionalProperties":
            if isinstance(data, dict) and not all(
                _conforms(value, item, root)
                for key, item in data.items()
                if key not in node.get("properties", {})
            ):
                return False
        elif keyword == "items":
            if isinstance(data, list) and not all(_conforms(value, item, root) for item in data):
                return False
        elif keyword == "anyOf":
            if not any(_conforms(sub, data, root) for sub in value):
                return False
        elif keyword == "const":
            if not _same(value, data):
                return False
        elif keyword == "enum":
            if not any(_same(choice, data) for choice in value):
                return False
        elif keyword == "pattern":
            if isinstance(data, str) and not re.search(value, data):
                return False
        elif keyword == "minimum":
            if not _number(value) or (_number(data) and data < value):
                return False
        elif keyword == "minItems":
            if not isinstance(value, int) or (isinstance(data, list) and len(data) < value):
                return False
        else:
            return False
    return True


def _number(value: object) -> bool:
    """A JSON number (a bool is none, though Python calls it an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a: object, b: object) -> bool:
    """Equal as JSON values, and of the same Python type (stricter than JSON's 1 == 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


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
