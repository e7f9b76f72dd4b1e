"""The checked-in schemas are exactly what the models generate."""

from __future__ import annotations

from cfwrap.schema_files import generated, render
from tests.conftest import ROOT


def test_checked_in_schemas_match_the_models():
    for name, schema in generated().items():
        checked_in = (ROOT / "schemas" / name).read_text()
        assert checked_in == render(schema), f"schemas/{name} drifted: run ./scripts/update-schemas"
