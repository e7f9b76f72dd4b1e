"""``cfwrap doctor``: Nomad's TLS checks on a kit, loose files or a live peer, and their report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.output import emit
from cfwrap.errors import ExitCode, InputError
from cfwrap.text import printable

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers
    from cfwrap.doctor import Report

EXAMPLES = """examples:
  cfwrap doctor nomad-tls --probe
  cfwrap doctor --ca ca.pem --cert nomad.pem --key nomad-key.pem --role server --region global
  cfwrap doctor nomad-tls --connect 10.0.0.5:4647
"""


def configure(sub: Subparsers) -> None:
    """Add the ``doctor`` command."""
    doc = sub.add_parser(
        "doctor",
        help="check certificates, keys and agent config against Nomad's own TLS rules",
        description="Check a kit folder (or loose files made by anyone) the way Nomad agents "
        "and the CLI will: chain, key pairing, role names per region, key usages, dates, key "
        "file modes, and the agent HCL. Each finding names the error Nomad would print and the "
        "command that fixes it. Exit 0 only when there is no error.",
        epilog=EXAMPLES,
    )
    doc.add_argument(
        "folder",
        type=Path,
        nargs="?",
        metavar="DIR",
        help="kit folder to check (default: the current folder, unless --cert)",
    )
    doc.add_argument("--ca", type=Path, metavar="FILE", help="CA certificate (loose-file mode)")
    doc.add_argument("--cert", type=Path, metavar="FILE", help="certificate to check")
    doc.add_argument("--key", type=Path, metavar="FILE", help="its private key")
    doc.add_argument(
        "--role",
        choices=("server", "client", "cli"),
        help="the role the certificate is for (default: from its names)",
    )
    doc.add_argument(
        "--region",
        default=None,
        help="Nomad region (default: from the file name or the certificate, else global)",
    )
    doc.add_argument(
        "--warn-within",
        default="30",
        metavar="DAYS",
        help="warn about certificates expiring within DAYS days (default 30)",
    )
    doc.add_argument(
        "--probe",
        action="store_true",
        help="also run real handshakes on loopback between the kit's certificates",
    )
    doc.add_argument(
        "--connect",
        metavar="HOST:PORT",
        help="check what a running agent presents (with the kit's CA and cli cert)",
    )
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from datetime import timedelta

    from cfwrap import doctor
    from cfwrap.errors import VerificationError

    if not (args.warn_within.isascii() and args.warn_within.isdigit()) or (
        int(args.warn_within) > _MAX_WARN_DAYS
    ):
        raise InputError(
            f"--warn-within {args.warn_within[:20]}",
            f"expected a number of days from 0 to {_MAX_WARN_DAYS}",
            fix="for example --warn-within 30",
        )
    options = doctor.Options(warn_within=timedelta(days=int(args.warn_within)))
    region = args.region or "global"
    if args.region is not None:
        _spec_region(args.region)
    if args.connect:
        ca, cert, key = _connect_files(args)
        report = doctor.diagnose_peer(
            args.connect,
            ca=ca,
            cert=cert,
            key=key,
            role=args.role or "server",
            region=region,
            options=options,
        )
    elif args.cert is not None:
        if not args.cert.is_file():
            why = "not a regular file" if args.cert.exists() else "no such file"
            raise InputError(str(args.cert), why, fix="give the certificate to check")
        report = doctor.diagnose_files(  # without --region: the file's name or its own names
            cert=args.cert,
            key=args.key,
            ca=args.ca,
            role=args.role,
            region=args.region,
            options=options,
        )
    else:
        folder = args.folder or Path()
        if not folder.is_dir():
            raise InputError(str(folder), "not a folder", fix="give a kit folder, or --cert FILE")
        report = doctor.diagnose_folder(folder, options, region=args.region, run_probes=args.probe)
    if args.json:
        emit(json.dumps(report.to_json(), indent=2))
    else:
        emit(_render_report(report))
    if report.errors:
        raise VerificationError(
            "doctor",
            f"{report.errors} error(s), {report.warnings} warning(s)",
            fix="see the findings above; each has its fix",
        )
    return ExitCode.OK


#: Longer than any certificate cfwrap issues (30 years): a window beyond it means "always".
_MAX_WARN_DAYS = 36500


def _connect_files(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None]:
    """The CA to trust and the client certificate to present: flags, else the kit's cli files."""
    from cfwrap.cfssl import key_path
    from cfwrap.files import is_regular

    ca, cert, key = args.ca, args.cert, args.key
    folder = args.folder or Path()
    ca = ca or folder / "ca.pem"
    if not is_regular(ca):
        raise InputError(str(ca), "no CA certificate here", fix="give --ca or a kit folder")
    if cert is None:
        found = sorted(folder.glob("*-cli-nomad.pem"))
        cert = found[0] if found else None
    fix = "give --cert and --key as the cli certificate's files, or leave both out"
    if cert is not None and not is_regular(cert):
        raise InputError(str(cert), "not a regular file", fix=fix)
    if cert is not None and key is None:
        key = key_path(cert)
    if key is not None and not is_regular(key):
        raise InputError(str(key), "not a regular file", fix=fix)
    if (cert is None) != (key is None):
        raise InputError("--cert/--key", "give both or neither")
    return ca, cert, key


def _spec_region(region: str) -> None:
    from cfwrap.nomad import check_region

    try:
        check_region(region)
    except ValueError as e:
        raise InputError("--region", str(e)) from None


def _render_report(report: Report) -> str:
    from cfwrap.doctor.findings import sort_findings

    lines: list[str] = []
    if report.presented is not None:
        shown = report.presented
        lines.append(f"{shown['address']} presented: {shown.get('subject', '(nothing)')}")
        if "issuer" in shown:
            lines.append(
                f"  issuer {shown['issuer']}; DNS {shown['dns_names']}; "
                f"IP {shown['ip_addresses']}; until {shown['not_after']}"
            )
    current = None
    for finding in sort_findings(report.findings):
        if finding.path != current:
            current = finding.path
            lines.append(current)
        lines.append(f"  {finding.severity.upper():7} {finding.check}: {finding.message}")
        if finding.nomad_error:
            lines.append(f"          nomad says: {finding.nomad_error}")
        if finding.fix:
            lines.append(f"          fix: {finding.fix}")
    if report.probes:
        lines.append(
            "probes (real handshakes on loopback, TLS >= 1.2, client certificate required)"
        )
        for result in report.probes:
            mark = "ok  " if result.as_expected else "FAIL"
            got = "connected" if result.ok else "refused"
            lines.append(f"  {mark} {result.name} [{result.server_name}]: {got}")
    lines.append(f"{report.errors} error(s), {report.warnings} warning(s)")
    # Paths and names come from files anyone may have written: a newline in an HCL path must
    # not start a line that looks like one of doctor's own (a forged "fix:").
    return "\n".join(printable(line) for line in lines)
