"""``cfwrap cert``: one role certificate from an existing CA, all or nothing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import (
    UsageError,
    cert_specs,
    find_cfssl,
    key_options,
    name_options,
    out_folder,
    output_options,
    report,
)
from cfwrap.errors import InputError

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers
    from cfwrap.specs import CertSpec

EXAMPLES = """example:
  cfwrap cert --ca nomad-tls/ca.pem --ca-key nomad-tls/ca-key.pem --role client \\
      --region global --dns node7.example.com --out node7-tls
  cfwrap cert --remote ca.example.com:8888 --auth-key client.key --ca ca.pem \\
      --role client --region global --out /etc/nomad.d/tls    # key made here, CSR sent
"""


def configure(sub: Subparsers) -> None:
    """Add the ``cert`` command."""
    cert = sub.add_parser(
        "cert",
        help="one role certificate from an existing CA",
        description="Issue one Nomad role certificate from an existing CA into "
        "a folder: <region>-<role>-nomad.pem, -key.pem, .csr and the JSON "
        "given to cfssl. The folder's manifest is rebuilt.",
        epilog=EXAMPLES,
    )
    cert.add_argument("--ca", type=Path, required=True, metavar="FILE", help="CA certificate")
    cert.add_argument("--ca-key", type=Path, metavar="FILE", help="CA private key (local issue)")
    cert.add_argument(
        "--remote",
        metavar="HOST:PORT",
        help="issue through a `cfwrap signer` instead: the key stays here, only the CSR is sent "
        "(TLS checked against --ca)",
    )
    cert.add_argument(
        "--auth-key",
        type=Path,
        metavar="FILE",
        help="with --remote: the signer's auth key for this role (<role>.key)",
    )
    cert.add_argument("--role", choices=("server", "client", "cli"), required=True)
    output_options(cert, what="folder for the certificate (created if missing)")
    name_options(cert)
    key_options(cert, default_expiry="8760h")
    cert.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap import kit

    (spec,) = cert_specs(args, (args.role,))
    if args.role == "cli" and (args.dns or args.ip):
        raise InputError(
            "--dns/--ip",
            "a cli certificate carries no server names",
            fix="drop --dns and --ip for --role cli",
        )
    if args.remote is not None or args.auth_key is not None:
        return _remote(args, spec)
    if args.ca_key is None:
        raise UsageError(
            "cfwrap cert: the following arguments are required: --ca-key (or --remote and "
            "--auth-key)",
            fix="see `cfwrap cert --help`",
        )
    ca = kit.load_ca(args.ca, args.ca_key)
    kit.check_lone_root(ca)
    tool = find_cfssl(args)
    result = kit.issue_cert(
        out=out_folder(args), cfssl_tool=tool, ca=ca, spec=spec, force=args.force, wait=args.wait
    )
    return report(result, args)


def _remote(args: argparse.Namespace, spec: CertSpec) -> int:
    """Issue through a signer (``cfwrap.remote``): key made here, CSR sent, result checked."""
    from cfwrap import remote

    if args.remote is None or args.auth_key is None or args.ca_key is not None:
        raise UsageError(
            "cfwrap cert: --remote and --auth-key go together, without --ca-key",
            fix="give --remote HOST:PORT --auth-key FILE --ca ca.pem, or --ca and --ca-key",
        )
    if args.expiry is not None:
        raise UsageError(
            "cfwrap cert: --expiry with --remote", fix="the signer sets the lifetime (its --expiry)"
        )
    url = remote.address(args.remote)
    signer = remote.load(url=url, auth_key_file=args.auth_key, ca_file=args.ca)
    result = remote.issue_cert(
        out=out_folder(args), remote=signer, spec=spec, force=args.force, wait=args.wait
    )
    return report(result, args)
