"""scripts/sabotage in the suite: every safety mechanism switched off must turn its tests red."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_every_sabotage_turns_the_suite_red():
    listed = subprocess.run(
        [sys.executable, ROOT / "scripts" / "sabotage", "--list"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "sabotage"],
        capture_output=True, text=True, check=False, timeout=1800,
    )  # fmt: skip
    print(result.stdout)  # the table, named sabotage by sabotage, in the CI log
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(listed) >= 9
    for name in listed:
        assert any(
            line.startswith("red ") and name in line for line in result.stdout.splitlines()
        ), name
