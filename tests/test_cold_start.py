"""Each command loads only what it uses (issue 11): the lazy imports that keep cfwrap's start cheap.

Import time is most of a short command's run (``python -X importtime``; the numbers are in
scripts/bench-quickstart, never in tests): pydantic, cryptography, jsonschema, python-hcl2 and sh
each cost tens of milliseconds. These tests run cfwrap in a fresh interpreter and check which
modules it loaded, so a top-level import added somewhere cannot silently undo the win.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cfwrap import cli

HEAVY = ("pydantic", "cryptography", "jsonschema", "hcl2", "lark", "sh")
CLI_DIR = Path(cli.__file__).parent
# Modules of cfwrap/cli that are not commands.
NOT_COMMANDS = {"__init__", "options", "output"}

LOADED = """
import json, sys
from cfwrap.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
with open(sys.argv[1], "w") as f:
    json.dump(sorted(sys.modules), f)
"""


def loaded(tmp_path: Path, *argv: str | Path) -> set[str]:
    """The modules a fresh interpreter holds after running ``cfwrap ARGV``."""
    record = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", LOADED, record, *argv],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    return set(json.loads(record.read_text()))


def heavy(modules: set[str]) -> set[str]:
    """The heavy libraries among ``modules``."""
    return {m.partition(".")[0] for m in modules} & set(HEAVY)


def commands(modules: set[str]) -> set[str]:
    """The command modules among ``modules``."""
    return {m.removeprefix("cfwrap.cli.") for m in modules if m.startswith("cfwrap.cli.")} - {
        "options",
        "output",
    }


def test_help_loads_no_command_and_no_library(tmp_path: Path) -> None:
    modules = loaded(tmp_path, "--help")
    assert heavy(modules) == set()
    assert commands(modules) == set()


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["keygen"], "keygen"),
        (["keygen", "--help"], "keygen"),
        (["quickstart", "--help"], "quickstart"),
    ],
)
def test_a_light_command_loads_only_its_own_module(
    tmp_path: Path, argv: list[str], command: str
) -> None:
    modules = loaded(tmp_path, *argv)
    assert heavy(modules) == set()
    assert commands(modules) == {command}


def test_quickstart_and_manifest_need_neither_jsonschema_nor_hcl2(tmp_path: Path) -> None:
    # The kit's HCL is read back by nomad.read_own_hcl, its manifest passes
    # schema_files.conforms: jsonschema and python-hcl2 stay for what they must decide.
    kit = tmp_path / "kit"
    modules = loaded(tmp_path, "quickstart", "--out", kit)
    assert (kit / "manifest.json").is_file()
    assert heavy(modules) & {"jsonschema", "hcl2", "lark"} == set()
    assert commands(modules) == {"quickstart"}
    assert heavy(loaded(tmp_path, "manifest", kit)) & {"jsonschema", "hcl2", "lark", "sh"} == set()


def test_replay_lists_its_guides_with_nothing_else_and_prints_one_without_running_parts(
    tmp_path: Path,
) -> None:
    # --list reads a folder's names; --print loads and validates a guide (pydantic, jsonschema)
    # but runs nothing, so it needs neither sh nor the checks a run ends with.
    listed = subprocess.run(
        [sys.executable, "-m", "cfwrap", "replay", "--list"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "nomad-cfssl-corrected" in listed
    modules = loaded(tmp_path, "replay", "--list")
    assert heavy(modules) == set()
    assert commands(modules) == {"replay"}
    assert {m for m in modules if m.startswith("cfwrap.replay.")} == set()
    printed = loaded(tmp_path, "replay", "nomad-cfssl-corrected", "--print")
    assert heavy(printed) == {"pydantic", "jsonschema"}
    assert {m for m in printed if m.startswith("cfwrap.replay.")} == {"cfwrap.replay.guide"}


def test_doctor_loads_pydantic_only_for_a_kit_with_a_manifest(tmp_path: Path) -> None:
    # A folder made by hand (cfssl from a guide) has no manifest: its check needs cryptography
    # and python-hcl2 only. A cfwrap kit's manifest is loaded (and compared) with its model.
    from cfwrap import doctor, manifest

    assert doctor.MANIFEST_FILE == manifest.FILE_NAME
    kit = tmp_path / "kit"
    assert cli.main(["quickstart", "--out", str(kit)]) == 0
    with_manifest = loaded(tmp_path, "doctor", kit)
    assert {"pydantic", "cryptography", "hcl2"} <= heavy(with_manifest)
    (kit / manifest.FILE_NAME).unlink()
    by_hand = loaded(tmp_path, "doctor", kit)
    assert heavy(by_hand) == {"cryptography", "hcl2", "lark"}
    assert commands(by_hand) == {"doctor"}
    # The loopback handshakes (and ssl) are for --probe only.
    assert {"ssl", "cfwrap.doctor.probe"} & (with_manifest | by_hand) == set()
    assert {"ssl", "cfwrap.doctor.probe"} <= loaded(tmp_path, "doctor", kit, "--probe")


def test_every_command_module_is_in_the_table_with_its_own_help_line() -> None:
    on_disk = {p.stem for p in CLI_DIR.glob("*.py")} - NOT_COMMANDS
    assert set(cli.COMMANDS) == on_disk
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, line in cli.COMMANDS.items():
        command = sub.choices[name]
        assert isinstance(command, cli._Command)
        assert command.load().module_help == line, name


def test_quickstart_runs_without_gc_pauses_and_turns_the_collector_back_on(tmp_path: Path) -> None:
    import gc
    from unittest import mock

    from cfwrap import kit

    seen: list[bool] = []
    real = kit.quickstart

    def record(**kwargs: Any) -> kit.KitResult:
        seen.append(gc.isenabled())
        return real(**kwargs)

    with mock.patch.object(kit, "quickstart", autospec=True, side_effect=record):
        assert cli.main(["quickstart", "--out", str(tmp_path / "kit")]) == 0
        assert cli.main(["quickstart", "--out", str(tmp_path / "kit")]) != 0  # exists: refused
    assert seen == [False, False]
    assert gc.isenabled()


def test_no_gc_pauses_leaves_a_collector_that_was_off_off() -> None:
    import gc

    from cfwrap.cli.options import no_gc_pauses

    gc.disable()
    try:
        with no_gc_pauses():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(KeyboardInterrupt), no_gc_pauses():
        raise KeyboardInterrupt
    assert gc.isenabled()
