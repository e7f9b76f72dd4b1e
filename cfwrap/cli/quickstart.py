"""``cfwrap quickstart``: one region's whole kit, staged beside its folder and moved in whole."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import (
    cert_specs,
    find_cfssl,
    key_options,
    name_options,
    no_gc_pauses,
    out_folder,
    output_options,
    report,
    to_spec,
)

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers

EXAMPLES = """examples:
  cfwrap quickstart --out nomad-tls
  cfwrap quickstart --out eu-tls --region eu-west-1 --dns nomad.example.com --ip 10.0.0.5
  cfwrap quickstart --out nomad-tls --tls-dir /etc/nomad.d/tls --force
"""


def configure(sub: Subparsers) -> None:
    """Add the ``quickstart`` command."""
    quick = sub.add_parser(
        "quickstart",
        help="all of a region's kit: CA, server/client/cli certificates, gossip key, configs",
        description="Make a complete Nomad TLS kit for one region in a new folder: CA, "
        "server, client and cli certificates, gossip key, server and client HCL, the CLI's "
        "environment file, and manifest.json. Built beside DIR and moved into place whole.",
        epilog=EXAMPLES,
    )
    output_options(quick, what="folder to create (must not exist or be empty, unless --force)")
    name_options(quick)
    key_options(quick, default_expiry="8760h")
    quick.add_argument("--ca-expiry", default="43800h", help="CA lifetime (default 43800h, 5y)")
    quick.add_argument(
        "--gossip-bytes",
        type=int,
        choices=(16, 24, 32),
        default=32,
        help="gossip key size in bytes (default 32, AES-256)",
    )
    quick.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="where the files will live on the nodes, for the HCL paths (default: the kit folder)",
    )
    quick.set_defaults(handler=execute)


@no_gc_pauses()
def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap import kit
    from cfwrap.specs import CASpec

    specs = cert_specs(args, ("server", "client", "cli"))
    ca = to_spec(
        CASpec,
        {"expiry": args.ca_expiry, "key": specs[0].key.model_dump()},
        flags={"expiry": "--ca-expiry"},
    )
    result = kit.quickstart(
        out=out_folder(args),
        cfssl_tool=find_cfssl(args),
        ca=ca,
        specs=specs,
        gossip_bytes=args.gossip_bytes,
        tls_dir=args.tls_dir,
        force=args.force,
        wait=args.wait,
    )
    return report(result, args)
