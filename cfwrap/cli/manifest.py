"""``cfwrap manifest``: a kit's manifest rebuilt from disk and compared, or written."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import wait_option
from cfwrap.cli.output import emit, say
from cfwrap.errors import ConflictError, ExitCode, InputError
from cfwrap.text import printable

if TYPE_CHECKING:
    from cfwrap import manifest
    from cfwrap.cli.options import Subparsers


def configure(sub: Subparsers) -> None:
    """Add the ``manifest`` command."""
    man = sub.add_parser(
        "manifest",
        help="rebuild a kit's manifest from disk and compare",
        description="Rebuild DIR's manifest from the files on disk and report "
        "where it disagrees with manifest.json (exit 7 if it does).",
    )
    man.add_argument("folder", type=Path, metavar="DIR")
    man.add_argument(
        "--write", action="store_true", help="write the rebuilt manifest instead of comparing"
    )
    man.add_argument("--json", action="store_true", help="print the result as JSON")
    wait_option(man)
    man.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap import manifest
    from cfwrap.errors import VerificationError

    folder: Path = args.folder
    if not folder.is_dir():
        raise InputError(str(folder), "not a folder", fix="give a kit folder")
    if args.write:
        from cfwrap import files

        path = folder / manifest.FILE_NAME
        if path.is_symlink():  # before anything is said about what it holds
            raise ConflictError(
                path, "is a symlink", fix="remove it; cfwrap never writes through links"
            )
        with files.FolderLock(Path(os.path.realpath(folder)), wait=args.wait):
            tools = []
            if (folder / manifest.FILE_NAME).exists():
                try:
                    tools = manifest.load(folder).tools
                except VerificationError as e:
                    # --write is how a damaged manifest is repaired: it is rebuilt from disk.
                    say(f"cfwrap: replacing a damaged manifest ({e.why}); its tool list is lost")
            rebuilt = manifest.build(folder, tools)
            path = manifest.write(folder, rebuilt)
        emit(path)
        for line in _unverified(rebuilt):
            say(printable(f"cfwrap: warning: {folder / line}; recorded as it is: run `cfwrap "
                          "doctor` on the folder before any node uses it"))  # fmt: skip
        return ExitCode.OK
    recorded = manifest.load(folder)
    problems = manifest.differences(recorded, manifest.scan(folder))
    if args.json:
        emit(
            json.dumps(
                {"folder": str(folder), "matches": not problems, "differences": problems}, indent=2
            )
        )
    else:
        for line in problems:
            emit(printable(f"{folder / line}"))  # the differences are this command's data
    if problems:
        raise VerificationError(
            str(folder / manifest.FILE_NAME),
            f"{len(problems)} difference(s) from the files on disk",
            fix="inspect the changes; `cfwrap manifest --write DIR` records the folder as it is",
        )
    if not args.json:
        say(f"cfwrap: {folder / manifest.FILE_NAME} matches the files on disk")
    return ExitCode.OK


def _unverified(recorded: manifest.Manifest) -> list[str]:
    """A line for each certificate whose chain or key pairing did not verify."""
    lines = []
    for artifact in recorded.artifacts:
        info = artifact.certificate
        if info is None:
            continue
        why = []
        if not info.chain_verified:
            why.append("it does not chain to a CA in the folder")
        if info.key_pair_verified is False:
            why.append("its key file holds another key")
        if why:
            lines.append(f"{artifact.path}: {' and '.join(why)}")
    return lines
