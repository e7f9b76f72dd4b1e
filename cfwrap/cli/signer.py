"""``cfwrap signer``: run cfssl's multirootca for a CA, one auth key and name rule per role."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import UsageError
from cfwrap.cli.output import emit, flush_stdout, say
from cfwrap.errors import ExitCode, InputError

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers

ROLE_CHOICES = ("server", "client", "cli")

EXAMPLES = """example:
  cfwrap signer nomad-tls --listen 10.0.0.2:8888 --region global --allow-dns example.com
  cfwrap signer nomad-tls --rotate-key client     # then restart the signer: both keys work
  cfwrap signer nomad-tls --end-overlap client    # then restart it: only the new key works

The first run makes, in --auth-dir (default CA_DIR/signer, 0700): server.key, client.key,
cli.key (hex auth keys, 0600; give each node only its role's key), tls.pem/tls-key.pem (the
signer's certificate from the CA), certdb.sqlite (every certificate issued), audit.log (who
asked, one JSON line per certificate) and signer.json (address, CA, which key is which role).
It runs in the foreground until SIGTERM or Ctrl-C (exit 143 or 130).
"""


def configure(sub: Subparsers) -> None:
    """Add the ``signer`` command."""
    cmd = sub.add_parser(
        "signer",
        help="run a central signer (cfssl multirootca) for a CA",
        description="Run cfssl's multirootca for the CA in CA_DIR (ca.pem, ca-key.pem) over "
        "TLS, with one profile per role, each with its own auth key and a name rule that "
        "admits only that role's names. Nodes keep their keys: `cfwrap cert --remote`.",
        epilog=EXAMPLES,
    )
    cmd.add_argument("ca_dir", type=Path, metavar="CA_DIR", help="folder with ca.pem, ca-key.pem")
    cmd.add_argument("--listen", metavar="HOST:PORT", help="address to serve on")
    cmd.add_argument(
        "--auth-dir", type=Path, metavar="DIR", help="keys, TLS, certdb (default CA_DIR/signer)"
    )
    cmd.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="REGION",
        help="a Nomad region the signer issues for (repeatable; default global)",
    )
    cmd.add_argument(
        "--allow-dns",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="server and client certificates may also name DOMAIN and names below it",
    )
    cmd.add_argument(
        "--tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another name or address nodes use to reach the signer (its TLS certificate)",
    )
    cmd.add_argument(
        "--expiry", default="2160h", help="lifetime of issued certificates (default 2160h)"
    )
    action = cmd.add_mutually_exclusive_group()
    action.add_argument(
        "--rotate-key",
        choices=ROLE_CHOICES,
        metavar="ROLE",
        help="make a new auth key for ROLE; the old one is accepted until --end-overlap",
    )
    action.add_argument(
        "--end-overlap",
        choices=ROLE_CHOICES,
        metavar="ROLE",
        help="stop accepting ROLE's previous auth key (from the signer's next start)",
    )
    cmd.set_defaults(handler=execute)


def _auth_dir(args: argparse.Namespace) -> Path:
    return Path(args.auth_dir if args.auth_dir is not None else args.ca_dir / "signer")


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap.signer import authkeys

    if args.rotate_key or args.end_overlap:
        if args.listen:
            raise UsageError(
                "--listen with --rotate-key/--end-overlap",
                fix="change the keys, then start the signer again with --listen",
            )
        auth_dir = _auth_dir(args)
        if args.rotate_key:
            path = authkeys.rotate(auth_dir, args.rotate_key)
            say(
                f"cfwrap: new {args.rotate_key} key; restart the signer: it accepts both keys "
                f"until `--end-overlap {args.rotate_key}`"
            )
        else:
            path = authkeys.end_overlap(auth_dir, args.end_overlap)
            say(f"cfwrap: restart the signer: the old {args.end_overlap} key is then refused")
        emit(path)
        return ExitCode.OK
    if not args.listen:
        raise UsageError(
            "cfwrap signer: --listen HOST:PORT is required", fix="e.g. --listen 127.0.0.1:8888"
        )
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from cfwrap import kit, tools
    from cfwrap.models import parse_duration
    from cfwrap.nomad import check_region
    from cfwrap.signer import policy, process, setup

    listen = setup.parse_listen(args.listen)
    regions = args.region or ["global"]
    for region in regions:
        try:
            check_region(region)
        except ValueError as e:
            raise InputError(f"--region {region!r}", str(e)) from None
    try:
        domains = [policy.check_domain(d) for d in args.allow_dns]
        parse_duration(args.expiry)
    except ValueError as e:
        raise InputError("--allow-dns/--expiry", str(e)) from None
    ca = kit.load_ca(args.ca_dir / "ca.pem", args.ca_dir / "ca-key.pem")
    cfssl_tool = tools.find("cfssl", directory=args.cfssl_dir)
    multirootca = tools.find("multirootca", directory=args.cfssl_dir)
    prepared = setup.prepare(
        ca=ca,
        auth_dir=_auth_dir(args),
        cfssl_tool=cfssl_tool,
        listen=listen,
        regions=regions,
        domains=domains,
        tls_names=args.tls_name,
        expiry=args.expiry,
    )
    for name in prepared.made:
        say(f"cfwrap: made {prepared.auth_dir / name}")
    signer = process.start(multirootca, prepared, listen)
    rotating = setup.rotating_roles(prepared.auth_dir)
    if rotating:
        say(f"cfwrap: previous keys still accepted for: {', '.join(rotating)}")
    say(f"cfwrap: signer for {', '.join(regions)} on https://{listen.address}; until SIGTERM")
    emit(prepared.info)
    flush_stdout()
    return process.serve(signer)
