"""``cfwrap apply``: make the plan's tree match the plan, printing what changes first."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import find_cfssl, wait_option, window
from cfwrap.cli.output import ProgressBar, emit
from cfwrap.errors import ExitCode, InputError

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers
    from cfwrap.plan.cas import RemoteCA
    from cfwrap.plan.model import Plan

EXAMPLES = """examples:
  cfwrap apply cluster.toml --dry-run       # show what would change, change nothing
  cfwrap apply cluster.toml                 # issue what is missing or changed
  cfwrap apply cluster.toml --renew-within 30d --keep-key
  cfwrap apply cluster.toml --rotate-ca     # the next phase of a CA rotation (3 in all)

symbols: + create   ~ update in place   -/+ reissue   - retire (moved under retired/)
"""


def configure(sub: Subparsers) -> None:
    """Add the ``apply`` command."""
    apply = sub.add_parser(
        "apply",
        help="issue, renew and rotate a cluster's certificates from a plan",
        description="Compare the plan with its tree and change only what differs: one key "
        "pair and one folder per node, operators' cli folders, the CA, a manifest of the "
        "whole tree. An unchanged plan writes nothing. Removed nodes move under retired/.",
        epilog=EXAMPLES,
    )
    apply.add_argument("plan", type=Path, metavar="PLAN", help="the plan file (TOML)")
    apply.add_argument("--dry-run", action="store_true", help="print the changes, make none")
    apply.add_argument(
        "--renew-within",
        type=window,
        metavar="WINDOW",
        help="reissue certificates that expire within WINDOW (30d, 720h)",
    )
    apply.add_argument(
        "--keep-key",
        action="store_true",
        help="with --renew-within: renew with each node's current key",
    )
    apply.add_argument(
        "--rotate-ca",
        action="store_true",
        help="carry out the next phase of a CA rotation (1: trust both CAs, 2: reissue "
        "every leaf, 3: drop the old CA)",
    )
    apply.add_argument(
        "--workers", type=int, choices=range(1, 33), default=4, metavar="N",
        help="signing requests in flight (default 4)",
    )  # fmt: skip
    apply.add_argument(
        "--remote",
        metavar="HOST:PORT",
        help="issue through a central signer (cfwrap signer) instead of the tree's own CA; "
        "keys are made here and only CSRs are sent",
    )
    apply.add_argument(
        "--auth-dir",
        type=Path,
        metavar="DIR",
        help="with --remote: the folder holding the signer's <role>.key auth keys",
    )
    apply.add_argument(
        "--ca", type=Path, metavar="FILE", help="with --remote: the signer's CA certificate"
    )
    apply.add_argument("--json", action="store_true", help="print the changes as JSON")
    wait_option(apply)
    apply.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap.plan import apply, model, rotation

    if args.keep_key and args.renew_within is None:
        raise InputError("--keep-key", "only means something with --renew-within",
                         fix="add --renew-within 30d, or drop --keep-key")  # fmt: skip
    plan = model.load(args.plan)
    remote = _remote(args, plan)
    rewritten = False
    if args.dry_run:
        result = apply.unwritten(
            apply.root_of(plan, args.plan),
            functools.partial(
                apply.diff, plan, args.plan, renew_within=args.renew_within,
                keep_key=args.keep_key, rotate=args.rotate_ca, remote=remote,
            ),
            wait=args.wait,
        )  # fmt: skip
        steps = (
            rotation.steps(plan, result.new_phase, result, dry_run=True) if result.changes else []
        )
    else:
        outcome = apply.apply(
            plan,
            args.plan,
            cfssl_tool=find_cfssl(args),
            renew_within=args.renew_within,
            keep_key=args.keep_key,
            rotate=args.rotate_ca,
            remote=remote,
            workers=args.workers,
            wait=args.wait,
            progress=ProgressBar("cfwrap: issuing"),
        )
        result, steps = outcome.diff, outcome.steps
        rewritten = outcome.manifest_written and result.empty
    notes = list(result.notes)
    if rewritten:
        notes.append(
            "The plan manifest was rewritten to match the tree (the plan file changed, or an "
            "earlier apply did not finish)."
        )
    if args.json:
        emit(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "root": str(result.root),
                    "phase": result.new_phase,
                    "changes": [
                        {"action": c.symbol, "subject": c.subject, "reason": c.reason}
                        for c in result.changes
                    ],
                    "steps": steps,
                    "notes": notes,
                },
                indent=2,
            )
        )
        return ExitCode.OK
    for change in result.changes:
        emit(change.line())
    emit(
        result.summary()
        + (" (dry run: nothing was changed)" if args.dry_run and result.changes else "")
    )
    for note in notes:
        emit(note)
    if steps:
        emit("")
        for step in steps:
            emit(step)
    return ExitCode.OK


def _remote(args: argparse.Namespace, plan: Plan) -> RemoteCA | None:
    """The central signer from --remote, --auth-dir and --ca (all three, or none)."""
    given = [f for f, v in (("--remote", args.remote), ("--auth-dir", args.auth_dir),
                            ("--ca", args.ca)) if v is not None]  # fmt: skip
    if not given:
        return None
    from cfwrap import remote
    from cfwrap.plan.cas import RemoteCA
    from cfwrap.signer.authkeys import key_path, read_key

    if len(given) != 3:
        raise InputError(
            " ".join(given),
            "--remote, --auth-dir and --ca go together",
            fix="give the signer's HOST:PORT, its auth key folder and its CA certificate",
        )
    url = remote.address(args.remote)
    ca_pem = remote.read_ca(args.ca)
    roles: set[str] = {member.role for member in plan.members()}
    keys = {role: read_key(key_path(args.auth_dir, role)) for role in sorted(roles)}
    return RemoteCA(url=url, ca_pem=ca_pem, auth_keys=keys)
