"""``cfwrap renew``: renew the role certificates of a folder that expire within a window."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import UsageError, wait_option
from cfwrap.cli.output import emit, say
from cfwrap.errors import CfwrapError, ExitCode

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import AbstractContextManager

    from cfwrap.cli.options import Subparsers
    from cfwrap.renewal import Outcome
    from cfwrap.specs import CertSpec

EXAMPLES = """exit codes (renew): 0 nothing was due, 10 renewed (and --exec ran), 11 renewed but
--exec failed; a failure to renew exits with its error's code (3 bad input, 4 folder busy,
6 signer or cfssl failed, 7 verification failed, 8 file system).

example:
  cfwrap renew /etc/nomad.d/tls --remote ca.example.com:8888 \\
      --auth-key /etc/nomad.d/client.key --ca /etc/nomad.d/tls/ca.pem \\
      --within 30d --exec 'systemctl reload nomad'
  cfwrap renew nomad-tls --ca nomad-tls/ca.pem --ca-key nomad-tls/ca-key.pem --within 30d

contrib/cfwrap-renew.service and .timer run it twice a day (systemd).
"""


def configure(sub: Subparsers) -> None:
    """Add the ``renew`` command."""
    cmd = sub.add_parser(
        "renew",
        help="renew a folder's certificates that expire soon",
        description="Renew every <region>-<role>-nomad.pem in DIR with less than --within "
        "left, through a signer (--remote) or a local CA (--ca-key), each with a new key made "
        "here unless --keep-key. Idempotent: a second run finds nothing due. --exec runs only "
        "when something was renewed.",
        epilog=EXAMPLES,
    )
    cmd.add_argument("folder", type=Path, metavar="DIR", help="folder with the certificates")
    cmd.add_argument("--within", required=True, metavar="WINDOW", help="e.g. 30d or 720h")
    cmd.add_argument("--ca", type=Path, required=True, metavar="FILE", help="the CA certificate")
    cmd.add_argument("--ca-key", type=Path, metavar="FILE", help="the CA's key (local renewal)")
    cmd.add_argument("--remote", metavar="HOST:PORT", help="a `cfwrap signer` to renew through")
    cmd.add_argument("--auth-key", type=Path, metavar="FILE", help="with --remote: <role>.key")
    cmd.add_argument("--keep-key", action="store_true", help="keep each certificate's key")
    cmd.add_argument(
        "--force-renewal", action="store_true", help="renew every certificate, due or not"
    )
    cmd.add_argument(
        "--exec",
        metavar="CMD",
        help="run CMD (split like a shell, run without one) after a renewal, e.g. "
        "'systemctl reload nomad'",
    )
    cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    wait_option(cmd)
    cmd.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap import kit, remote, renewal

    within = renewal.parse_window(args.within)
    if (args.remote is None) == (args.ca_key is None) or (args.remote and not args.auth_key):
        raise UsageError(
            "cfwrap renew: give --remote HOST:PORT with --auth-key, or --ca-key",
            fix="see `cfwrap renew --help`",
        )
    if args.exec is not None:
        import shlex

        try:
            if not shlex.split(args.exec):
                raise ValueError("empty command")
        except ValueError as e:
            raise UsageError(
                f"cfwrap renew: --exec: {e}", fix="e.g. --exec 'systemctl reload nomad'"
            ) from None
    folder = args.folder.absolute()
    if args.remote is not None:
        signer = remote.load(
            url=remote.address(args.remote), auth_key_file=args.auth_key, ca_file=args.ca
        )
        ca_pem = signer.ca_pem

        def sign_for(specs: Sequence[CertSpec]) -> AbstractContextManager[renewal.Sign]:
            return renewal.through_signer(signer)
    else:
        from cfwrap import tools

        ca = kit.load_ca(args.ca, args.ca_key)
        ca_pem = ca.cert_pem
        cfssl_tool = tools.find("cfssl", directory=args.cfssl_dir)

        def sign_for(specs: Sequence[CertSpec]) -> AbstractContextManager[renewal.Sign]:
            return renewal.through_local_ca(cfssl_tool, ca, specs)

    outcome = renewal.renew(
        folder,
        sign_for=sign_for,
        ca_pem=ca_pem,
        within=within,
        keep_key=args.keep_key,
        force=args.force_renewal,
        same_lifetime=args.remote is None,
        wait=args.wait,
        source=signer.url if args.remote is not None else None,
    )
    exec_error: CfwrapError | None = None
    if outcome.renewed and args.exec is not None:
        try:
            renewal.run_exec(args.exec, folder=folder)
        except CfwrapError as e:
            exec_error = e
    _report(outcome, args, exec_error)
    if outcome.failed:
        return outcome.failed[0][1].exit_code
    if exec_error is not None:
        return ExitCode.EXEC_FAILED
    return ExitCode.RENEWED if outcome.renewed else ExitCode.OK


def _report(outcome: Outcome, args: argparse.Namespace, exec_error: CfwrapError | None) -> None:
    if args.json:
        emit(
            json.dumps(
                {
                    "renewed": [str(p) for p in outcome.renewed],
                    "not_due": [
                        {"path": str(p), "not_after": t.isoformat()} for p, t in outcome.not_due
                    ],
                    "failed": [{"path": str(p), "error": str(e)} for p, e in outcome.failed],
                    "exec": None
                    if args.exec is None or not outcome.renewed
                    else ("failed: " + str(exec_error) if exec_error else "ok"),
                },
                indent=2,
            )
        )
    else:
        for path in outcome.renewed:
            emit(path)
    for path, error in outcome.failed:
        say(f"cfwrap: error: {path.name}: {error}")
    if exec_error is not None:
        say(f"cfwrap: error: --exec: {exec_error}")
    if not outcome.renewed and not outcome.failed:
        soonest = min((t for _, t in outcome.not_due), default=None)
        when = f"; the first expires {soonest:%Y-%m-%d %H:%M}Z" if soonest else ""
        say(f"cfwrap: nothing due within {args.within} ({len(outcome.not_due)} certificates{when})")
    elif outcome.renewed:
        say(f"cfwrap: renewed {len(outcome.renewed)}, not due {len(outcome.not_due)}, "
            f"failed {len(outcome.failed)}")  # fmt: skip
