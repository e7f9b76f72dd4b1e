"""``cfwrap cert``: one role certificate from an existing CA, all or nothing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import (
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

EXAMPLES = """example:
  cfwrap cert --ca nomad-tls/ca.pem --ca-key nomad-tls/ca-key.pem --role client \\
      --region global --dns node7.example.com --out node7-tls
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
    cert.add_argument("--ca-key", type=Path, required=True, metavar="FILE", help="CA private key")
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
    ca = kit.load_ca(args.ca, args.ca_key)
    tool = find_cfssl(args)
    result = kit.issue_cert(
        out=out_folder(args), cfssl_tool=tool, ca=ca, spec=spec, force=args.force, wait=args.wait
    )
    return report(result, args)
