"""schema_files.conforms, the quick check before jsonschema: whatever it passes, jsonschema passes.

A manifest cfwrap has just made is checked by ``conforms`` first and by jsonschema only when
``conforms`` doubts it (importing jsonschema costs ~50 ms of a quickstart). That is only as
strict as before if ``conforms`` never passes what jsonschema refuses: these tests mutate real
manifests, hostile values included, and compare.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfwrap import schema_files

SCHEMA = schema_files.load("manifest.schema.json")
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "0644", "0600", "a" * 64, "f" * 64, "ca", "cert", "x\n", "0999"])
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def manifest_data(kits: dict[str, Path]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((kits["global"] / "manifest.json").read_text())
    return data


def test_a_real_manifest_passes_without_jsonschema(manifest_data: dict[str, Any]) -> None:
    assert not list(VALIDATOR.iter_errors(manifest_data))
    assert schema_files.conforms(SCHEMA, manifest_data)


def _paths(data: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value, the value itself first."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*prefix, index))
    return found


def _mutate(
    original: Any, data: st.DataObject, actions: list[str], values: st.SearchStrategy[Any]
) -> Any:
    """A copy of ``original`` changed in one to three places, each by one of ``actions``.

    ``replace`` a value (with one of ``values``), ``swap`` in another value of the same
    document (often still valid), ``delete`` it, ``empty`` it (a list with nothing in it: what
    minItems refuses), or ``add`` a key or item beside it.
    """
    mutated: Any = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(mutated)
        where = data.draw(st.sampled_from(paths))
        if not where:
            mutated = data.draw(JSON)
            continue
        parent = mutated
        for step in where[:-1]:
            parent = parent[step]
        action = data.draw(st.sampled_from(actions))
        if action == "replace":
            parent[where[-1]] = data.draw(values)
        elif action == "swap":
            source: Any = mutated
            for step in data.draw(st.sampled_from(paths)):
                source = source[step]
            parent[where[-1]] = copy.deepcopy(source)
        elif action == "delete":
            del parent[where[-1]]
        elif action == "empty":
            parent[where[-1]] = []
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(JSON)
        else:
            parent.append(data.draw(JSON))
    return mutated


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_what_conforms_passes_jsonschema_passes(
    manifest_data: dict[str, Any], data: st.DataObject
) -> None:
    mutated = _mutate(manifest_data, data, ["replace", "swap", "delete", "add"], JSON)
    if schema_files.conforms(SCHEMA, mutated):
        assert not list(VALIDATOR.iter_errors(mutated))


PLAN_SCHEMA = schema_files.load("plan-manifest.schema.json")
PLAN_VALIDATOR = jsonschema.Draft202012Validator(PLAN_SCHEMA)


@pytest.fixture(scope="module")
def plan_manifest_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plan manifest as apply writes it: a CA, two members, a retired folder."""
    from cfwrap.plan import state
    from tests.test_plan_state import manifest_head, member_record

    root = tmp_path_factory.mktemp("plan-manifest")
    head = manifest_head().model_copy(
        update={"retired": ["retired/20260101T000000Z/removed/nodes/a"]}
    )
    state.write(root, head, lambda: [member_record(1), member_record(2)])
    data: dict[str, Any] = json.loads((root / state.FILE_NAME).read_text())
    return data


def test_a_real_plan_manifest_passes_without_jsonschema(
    plan_manifest_data: dict[str, Any],
) -> None:
    assert not list(PLAN_VALIDATOR.iter_errors(plan_manifest_data))
    assert schema_files.conforms(PLAN_SCHEMA, plan_manifest_data)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_what_conforms_passes_of_a_plan_manifest_jsonschema_passes(
    plan_manifest_data: dict[str, Any], data: st.DataObject
) -> None:
    """Its schema has ``minimum`` and ``minItems`` besides the kit manifest's keywords."""
    values = JSON | st.sampled_from([-1, 0, -0.5, 1.5, [], True])
    mutated = _mutate(plan_manifest_data, data, ["replace", "delete", "empty", "add"], values)
    if schema_files.conforms(PLAN_SCHEMA, mutated):
        assert not list(PLAN_VALIDATOR.iter_errors(mutated))


@pytest.mark.parametrize(
    ("schema", "data"),
    [
        ({"minimum": 0}, -1),
        ({"minimum": 0}, -0.5),
        ({"minimum": "0"}, 1),  # a malformed schema: doubted
        ({"minItems": 1}, []),
        ({"minItems": 1.5}, [1, 2]),
    ],
)
def test_conforms_refuses_below_minimum_and_minitems(schema: dict[str, Any], data: object) -> None:
    assert not schema_files.conforms(schema, data)


@pytest.mark.parametrize(
    ("schema", "data"),
    [
        ({"minimum": 0}, 0),
        ({"minimum": 0}, True),  # no number to JSON Schema: minimum does not apply
        ({"minimum": 0}, "x"),
        ({"minItems": 1}, [0]),
        ({"minItems": 1}, {}),
    ],
)
def test_conforms_passes_what_minimum_and_minitems_allow(
    schema: dict[str, Any], data: object
) -> None:
    assert schema_files.conforms(schema, data)
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(data))


@pytest.mark.parametrize(
    ("schema", "data"),
    [
        ({"type": "integer"}, True),  # a bool is no integer to JSON Schema
        ({"type": "integer"}, 1.0),  # an integer to JSON Schema: doubted, jsonschema decides
        ({"const": 1}, True),
        ({"enum": [0]}, False),
        ({"type": ["string", "null"]}, None),  # a form cfwrap's schemas do not use
        ({"minLength": 1}, "x"),  # a keyword it does not know
        ({"$ref": "#/$defs/A/b"}, 1),
        ({"$ref": "https://example.invalid/s.json"}, 1),
        ({"items": [{"type": "string"}]}, ["x"]),
    ],
)
def test_conforms_doubts_what_it_does_not_know(schema: dict[str, Any], data: object) -> None:
    assert not schema_files.conforms(schema, data)
