"""``cfwrap plan init``: a commented starter plan, valid as printed."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cfwrap.cli.output import emit
from cfwrap.errors import ExitCode

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers

EXAMPLES = """example:
  cfwrap plan init --regions global,eu --servers 3 --clients 20 --operators 2 > cluster.toml
  cfwrap apply cluster.toml --dry-run
"""


def _regions(text: str) -> list[str]:
    from cfwrap.nomad import check_region

    names = [part.strip() for part in text.split(",")]
    try:
        checked = [check_region(name) for name in names]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if len({name.lower() for name in checked}) != len(checked):
        raise argparse.ArgumentTypeError("a region is named twice (Go compares names in any case)")
    return checked


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 10_000:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}: give a count from 0 to 10000")
    return int(text)


def configure(sub: Subparsers) -> None:
    """Add the ``plan`` command and its ``init``."""
    plan = sub.add_parser(
        "plan",
        help="a cluster plan: every region, node and operator in one file",
        description="Work with cluster plans (TOML). `plan init` prints a commented starter.",
        epilog=EXAMPLES,
    )
    verbs = plan.add_subparsers(dest="verb", metavar="VERB", required=True)
    init = verbs.add_parser(
        "init",
        help="print a commented starter plan",
        description="Print a commented starter plan on stdout; it is valid as printed.",
        epilog=EXAMPLES,
    )
    init.add_argument("--regions", type=_regions, default=["global"], metavar="A,B",
                      help="region names (default global)")  # fmt: skip
    init.add_argument("--servers", type=_count, default=3, metavar="N",
                      help="servers per region (default 3)")  # fmt: skip
    init.add_argument("--clients", type=_count, default=2, metavar="N",
                      help="client nodes per region (default 2)")  # fmt: skip
    init.add_argument("--operators", type=_count, default=1, metavar="N",
                      help="operators with cli certificates (default 1)")  # fmt: skip
    init.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap.plan import starter

    emit(
        starter.render(
            regions=args.regions,
            servers=args.servers,
            clients=args.clients,
            operators=args.operators,
        ),
        end="",
    )
    return ExitCode.OK
