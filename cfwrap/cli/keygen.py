"""``cfwrap keygen``: a gossip encryption key, or a check of one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import SMALL_INPUT
from cfwrap.cli.output import emit
from cfwrap.errors import ExitCode, InputError

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers


def configure(sub: Subparsers) -> None:
    """Add the ``keygen`` command."""
    keygen = sub.add_parser(
        "keygen",
        help="a gossip encryption key, or check one",
        description="Print a new gossip key (standard base64), or check one "
        "read from a file or stdin (never from the command line).",
    )
    keygen.add_argument(
        "--bytes",
        type=int,
        choices=(16, 24, 32),
        default=32,
        help="key size (default 32, what current Nomad makes)",
    )
    keygen.add_argument("--check", metavar="FILE", help="check the key in FILE ('-': stdin)")
    keygen.add_argument("--json", action="store_true", help="print the result as JSON")
    keygen.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap import gossip

    if args.check is None:
        key = gossip.generate(args.bytes)
        emit(json.dumps({"key": key, "bytes": args.bytes}) if args.json else key)
        return ExitCode.OK
    from cfwrap import files

    source = "stdin" if args.check == "-" else args.check
    try:
        if args.check == "-":
            if sys.stdin is None:  # started with stdin closed (<&-)
                raise InputError(source, "closed", fix="pipe the key in, or give its file")
            stdin = getattr(sys.stdin, "buffer", None)
            raw = stdin.read(SMALL_INPUT + 1) if stdin else sys.stdin.read(SMALL_INPUT + 1)
            if len(raw) > SMALL_INPUT:
                raise InputError(source, "more than 1 MiB; a gossip key is 24 to 44 characters")
        else:
            raw = files.read_input(Path(args.check), limit=SMALL_INPUT)
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
    except OSError as e:
        raise InputError(source, e.strerror or str(e), fix="give the key's file") from None
    except UnicodeDecodeError:
        raise InputError(source, "not UTF-8 text", fix="give the key's file") from None
    try:
        size = gossip.check(text)
    except ValueError as e:
        raise InputError(
            f"gossip key from {source}", str(e), fix="make a new one with `cfwrap keygen`"
        ) from None
    if args.json:
        emit(json.dumps({"valid": True, "bytes": size}))
    else:
        print(
            f"cfwrap: gossip key from {source} is valid ({size} bytes, AES-{size * 8})",
            file=sys.stderr,
        )
    return ExitCode.OK
