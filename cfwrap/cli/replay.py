"""``cfwrap replay``: a published guide run for real, recorded and judged."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import UsageError, out_folder, wait_option
from cfwrap.cli.output import emit
from cfwrap.errors import ExitCode

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers

EXAMPLES = """examples:
  cfwrap replay --list
  cfwrap replay nomad-encryption-2017 --out replay-2017
  cfwrap replay my-guide.toml --print > guide.sh
"""


def configure(sub: Subparsers) -> None:
    """Add the ``replay`` command."""
    rep = sub.add_parser(
        "replay",
        help="run a published guide's steps for real, record them, say where it goes wrong",
        description="Run a guide's steps with the real binaries (pipes included) in DIR/files, "
        "record a transcript (DIR/transcript.md and .json), compare the folder with the "
        "guide's table of files, and check the result against Nomad's rules. GUIDE is a "
        "shipped guide's name (see --list) or a guide file (TOML, schemas/guide.schema.json).",
        epilog=EXAMPLES,
    )
    rep.add_argument("guide", nargs="?", metavar="GUIDE")
    rep.add_argument("--out", type=Path, metavar="DIR", help="folder to create for the replay")
    rep.add_argument(
        "--force",
        action="store_true",
        help="replace an existing DIR (the old one is kept as a backup)",
    )
    rep.add_argument(
        "--print",
        action="store_true",
        dest="print_script",
        help="print the guide as a shell script instead of running it",
    )
    rep.add_argument("--list", action="store_true", help="list the guides cfwrap ships")
    rep.add_argument("--json", action="store_true", help="print the transcript as JSON")
    wait_option(rep)
    rep.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap.replay import shipped

    if args.list:
        for name in shipped():
            emit(name)
        return ExitCode.OK
    from cfwrap.errors import ToolFailedError, ToolMissingError, VerificationError
    from cfwrap.replay import guide

    if args.guide is None:
        raise UsageError("cfwrap replay: give a GUIDE", fix="see `cfwrap replay --list`")
    loaded = guide.load(args.guide)
    if args.print_script:
        emit(guide.to_shell(loaded), end="")
        return ExitCode.OK
    if args.out is None:
        raise UsageError(
            "cfwrap replay: --out DIR is required to run a guide",
            fix="or pass --print to see it as a script",
        )
    from cfwrap.replay import run

    result = run.replay(
        loaded, out=out_folder(args), cfssl_dir=args.cfssl_dir, force=args.force, wait=args.wait
    )
    transcript = result.transcript
    if args.json:
        emit(transcript.model_dump_json(indent=2))
    else:
        emit(result.markdown)
        emit(result.json)
    where = f"see {result.markdown}"
    if transcript.outcome == "tool-missing":
        raise ToolMissingError("replay", transcript.stopped_because, fix=where)
    if transcript.outcome == "step-failed":
        raise ToolFailedError("replay", transcript.stopped_because, fix=where)
    if transcript.outcome == "findings":
        errors = sum(f.severity == "error" for f in transcript.findings)
        missing = len(transcript.missing_files)
        raise VerificationError(
            f"guide {loaded.name}",
            f"its result fails {errors} of Nomad's checks and lacks {missing} of its own files",
            fix=f"{where} for the findings and the corrected commands",
        )
    return ExitCode.OK
