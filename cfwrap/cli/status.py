"""``cfwrap status``: every certificate of a plan's tree, for people, cron and monitoring."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import wait_option, window
from cfwrap.cli.output import emit
from cfwrap.errors import ExitCode

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers

EXAMPLES = """examples:
  cfwrap status cluster.toml
  cfwrap status cluster.toml --json --within 14d
  cfwrap status cluster.toml --connect      # also dial every node that has an address

states: ok, expiring (inside --within), expired, missing, changed (on disk since cfwrap wrote
it, or not what the plan manifest records); with --connect also serving-other and unreachable.
The servers' gossip.key has a row too (missing; changed: no valid key in it, or not 0600).
exit codes: 0 all ok; 9 something needs action; 3 a bad plan; 4 an apply is writing the
tree (or wrote it while status read it): run status again, or pass --wait.
"""


def configure(sub: Subparsers) -> None:
    """Add the ``status`` command."""
    status = sub.add_parser(
        "status",
        help="days left and state of every certificate of a plan",
        description="Print a table of every certificate of a plan's tree: node, role, "
        "region, issuer, days left, state. Exits 9 when anything needs action.",
        epilog=EXAMPLES,
    )
    status.add_argument("plan", type=Path, metavar="PLAN", help="the plan file (TOML)")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    status.add_argument(
        "--within",
        type=window,
        default=timedelta(days=30),
        metavar="WINDOW",
        help="'expiring' inside this window (default 30d)",
    )
    status.add_argument(
        "--connect",
        action="store_true",
        help="dial every node with an address; compare the certificate it serves with the tree",
    )
    wait_option(status, what="an apply is writing the tree")
    status.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap.plan import model, status
    from cfwrap.plan.apply import root_of, unwritten

    plan = model.load(args.plan)

    def read() -> tuple[list[status.Row], str]:
        rows = status.rows(plan, args.plan, within=args.within)
        if args.connect:
            rows = status.connect(plan, args.plan, rows)
        return rows, status.phase(plan, args.plan)

    rows, phase = unwritten(root_of(plan, args.plan), read, wait=args.wait)
    needs = [r for r in rows if r.needs_action]
    if args.json:
        emit(
            json.dumps(
                {
                    "phase": phase,
                    "needs_action": len(needs),
                    "certificates": [r.as_dict() for r in rows],
                },
                indent=2,
            )
        )
    else:
        header = ("NODE", "ROLE", "REGION", "ISSUER", "DAYS", "STATE")
        table = [header] + [
            (
                r.node, r.role, r.region, r.issuer,
                "-" if r.days_left is None else f"{r.days_left:.0f}",
                r.state + (f": {r.detail}" if r.detail else ""),
            )
            for r in rows
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row in table:
            emit("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
        emit(f"{len(rows) - len(needs)} ok, {len(needs)} need action"
             f" (phase: {phase})")  # fmt: skip
    return ExitCode.NEEDS_ACTION if needs else ExitCode.OK
