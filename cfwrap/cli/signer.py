"""``cfwrap signer``: run cfssl's multirootca for a CA, one auth key and name rule per role."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import UsageError
from cfwrap.cli.output import emit, flush_stdout, say
from cfwrap.errors import ExitCode, InputError

#: What a signer needs in CA_DIR (kit.load_ca's own fix names `cfwrap cert`'s flags).
CA_DIR_FIX = "give a CA folder (ca.pem, ca-key.pem), e.g. made by cfwrap ca"

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers
    from cfwrap.signer.process import Signer
    from cfwrap.signer.setup import Listen, Prepared

ROLE_CHOICES = ("server", "client", "cli")

EXAMPLES = """example:
  cfwrap signer nomad-tls --listen 10.0.0.2:8888 --region global --allow-dns example.com
  cfwrap signer nomad-tls --rotate-key client     # signer stopped; started again, both keys work
  cfwrap signer nomad-tls --end-overlap client    # signer stopped; started again, only the new

The first run makes, in --auth-dir (default CA_DIR/signer, 0700): server.key, client.key,
cli.key (hex auth keys, 0600; give each node only its role's key), tls.pem/tls-key.pem (the
signer's certificate from the CA), certdb.sqlite (every certificate issued), audit.log (who
asked, one JSON line per certificate) and signer.json (address, CA, which key is which role;
written once the signer answers). One signer runs per auth folder (a lock held while it runs:
a second one exits 4), and keys change only while none runs. A TLS certificate that must be
remade (another CA, a new --listen or --tls-name, under 30 days left) takes tls.pem's place
only once the new signer answers; the old one is kept as tls.replaced-<UTC time>.pem. It runs
in the foreground until SIGTERM or Ctrl-C (exit 143 or 130).
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
    import contextlib

    from cfwrap.signer import setup

    if args.rotate_key or args.end_overlap:
        if args.listen:
            raise UsageError(
                "--listen with --rotate-key/--end-overlap",
                fix="change the keys, then start the signer again with --listen",
            )
        auth_dir = _auth_dir(args)
        # A running signer has read its keys: change them only while none runs (or starts).
        locked = setup.signer_lock(auth_dir) if auth_dir.is_dir() else contextlib.nullcontext()
        with locked:
            return _change_key(args, auth_dir)
    if not args.listen:
        raise UsageError(
            "cfwrap signer: --listen HOST:PORT is required", fix="e.g. --listen 127.0.0.1:8888"
        )
    return _run(args)


def _change_key(args: argparse.Namespace, auth_dir: Path) -> int:
    from cfwrap.signer import authkeys

    if args.rotate_key:
        path = authkeys.rotate(auth_dir, args.rotate_key)
        say(
            f"cfwrap: new {args.rotate_key} key; start the signer: it accepts both keys "
            f"until `--end-overlap {args.rotate_key}`"
        )
    else:
        path = authkeys.end_overlap(auth_dir, args.end_overlap)
        say(f"cfwrap: start the signer: the old {args.end_overlap} key is then refused")
    emit(path)
    return ExitCode.OK


def _run(args: argparse.Namespace) -> int:
    from cfwrap import files, kit, tools
    from cfwrap.models import parse_duration
    from cfwrap.nomad import check_region
    from cfwrap.signer import authkeys, policy, process, setup

    listen = setup.parse_listen(args.listen)
    regions = args.region or ["global"]
    for region in regions:
        try:
            check_region(region)
        except ValueError as e:
            raise InputError(f"--region {region!r}", str(e)) from None
    domains = []
    for domain in args.allow_dns:
        try:
            domains.append(policy.check_domain(domain))
        except ValueError as e:
            raise InputError(f"--allow-dns {domain!r}", str(e)) from None
    try:
        parse_duration(args.expiry)
    except ValueError as e:
        raise InputError(f"--expiry {args.expiry!r}", str(e)) from None
    try:
        ca = kit.load_ca(args.ca_dir / "ca.pem", args.ca_dir / "ca-key.pem")
    except InputError as e:
        if "--ca" not in e.fix:
            raise
        raise InputError(e.what, e.why, fix=CA_DIR_FIX) from None
    _check_outlives(ca.facts.not_after, args.expiry)
    cfssl_tool = tools.find("cfssl", directory=args.cfssl_dir)
    multirootca = tools.find("multirootca", directory=args.cfssl_dir)
    auth_dir = _auth_dir(args).absolute()
    made = files.make_parents(auth_dir)  # the lock file lives beside the folder
    try:
        with setup.signer_lock(auth_dir):
            authkeys.check_trusted(auth_dir)  # before anything: the keys decide who gets what
            process.check_free(listen)  # before a TLS certificate is issued for the address
            prepared = setup.prepare(
                ca=ca,
                auth_dir=auth_dir,
                cfssl_tool=cfssl_tool,
                listen=listen,
                regions=regions,
                domains=domains,
                tls_names=args.tls_name,
                expiry=args.expiry,
            )
            for name in prepared.made:
                say(f"cfwrap: made {prepared.auth_dir / name}")
            try:
                signer = process.start(multirootca, prepared, listen)
            except BaseException:
                setup.discard(prepared)
                raise
            return _serve(signer, prepared, listen, regions)

    except BaseException:
        if not auth_dir.exists():  # a refused start leaves no folder behind
            files.unmake(made)
        raise


def _serve(signer: Signer, prepared: Prepared, listen: Listen, regions: list[str]) -> int:
    """Publish what nodes read, then serve until stopped."""
    from cfwrap.signer import process, setup

    try:  # only a signer that answers names itself in signer.json and takes tls.pem
        kept = setup.publish(prepared)
    except BaseException:
        signer.stop()
        raise
    if prepared.tls_remade:
        say(f"cfwrap: made {prepared.auth_dir / setup.TLS_CERT}")
    for path in kept:
        say(f"cfwrap: kept the replaced {path.name.partition('.')[0]} as {path}")
    rotating = setup.rotating_roles(prepared.auth_dir)
    if rotating:
        say(f"cfwrap: previous keys still accepted for: {', '.join(rotating)}")
    say(f"cfwrap: signer for {', '.join(regions)} on https://{listen.address}; until SIGTERM")
    emit(prepared.info)
    flush_stdout()
    return process.serve(signer)


def _check_outlives(ca_end: datetime, expiry: str) -> None:
    """Refuse an ``--expiry`` that would give certificates past the CA's own end.

    multirootca cannot cut a lifetime to the CA's: each such certificate would fail
    verification (Go's, the agents') before its own end, while renewal reads its end as far
    off. A signer that runs on for months gets there anyway: renew the CA in time.

    Raises:
        InputError: the CA ends before a certificate issued now would.
    """
    from cfwrap.models import parse_duration

    if datetime.now(UTC) + parse_duration(expiry) > ca_end:
        raise InputError(
            f"--expiry {expiry}",
            f"every certificate the signer issued would outlive its CA, which ends "
            f"{ca_end:%Y-%m-%d %H:%M} UTC",
            fix="give a shorter --expiry, or renew the CA",
        )
