"""The ``cfwrap`` command: arguments in, results and one-line errors out, named exit codes.

The only module that prints or decides an exit code. Standard output carries data (paths, keys,
``--json``); standard error carries messages for people. Each command imports only what it
needs, so ``cfwrap keygen`` does not pay for cfssl, X.509 or JSON Schema.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from cfwrap import __version__
from cfwrap.errors import CfwrapError, ExitCode, InputError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from cfwrap.doctor import Report
    from cfwrap.kit import KitResult
    from cfwrap.nomad import CASpec
    from cfwrap.tools import Tool

M = TypeVar("M", bound="BaseModel")

log = logging.getLogger("cfwrap")

# Which flag a spec field comes from, so a refused value is reported under the flag the user typed.
_FLAGS = {
    "region": "--region",
    "dns_names": "--dns",
    "ip_addresses": "--ip",
    "expiry": "--expiry",
    "key": "--key-algo/--key-size",
    "role": "--role",
    "common_name": "--cn",
}

#: The most cfwrap reads of a file a person writes by hand (a CSR JSON, a gossip key).
_SMALL_INPUT = 1024 * 1024

_EPILOG = """\
exit codes: 0 ok, 2 usage, 3 bad input, 4 output exists or folder busy, 5 cfssl missing or too
old, 6 cfssl failed, 7 verification failed, 8 file system error, 130 interrupted, 141 stdout
closed, 143 terminated.

cfssl is found by --cfssl-dir, then $CFWRAP_CFSSL_DIR, then .tools/cfssl/bin in this checkout
(./scripts/install-cfssl), then PATH. cfwrap needs cfssl 1.6 or newer.
"""


_EXAMPLES = {
    "quickstart": """examples:
  cfwrap quickstart --out nomad-tls
  cfwrap quickstart --out eu-tls --region eu-west-1 --dns nomad.example.com --ip 10.0.0.5
  cfwrap quickstart --out nomad-tls --tls-dir /etc/nomad.d/tls --force
""",
    "cert": """example:
  cfwrap cert --ca nomad-tls/ca.pem --ca-key nomad-tls/ca-key.pem --role client \\
      --region global --dns node7.example.com --out node7-tls
""",
    "doctor": """examples:
  cfwrap doctor nomad-tls --probe
  cfwrap doctor --ca ca.pem --cert nomad.pem --key nomad-key.pem --role server --region global
  cfwrap doctor nomad-tls --connect 10.0.0.5:4647
""",
    "replay": """examples:
  cfwrap replay --list
  cfwrap replay nomad-encryption-2017 --out replay-2017
  cfwrap replay my-guide.toml --print > guide.sh
""",
}


class _UsageError(CfwrapError):
    exit_code = ExitCode.USAGE


class _HelpFormatter(argparse.HelpFormatter):
    """Wrap descriptions to the terminal; keep examples and the exit-code table as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(("example", "exit codes")):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other cfwrap error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 (argparse's own)
        """Use cfwrap's help layout unless told otherwise."""
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}", fix=f"see `{self.prog} --help`")


if TYPE_CHECKING:
    # The type of add_subparsers()'s result (argparse names it privately).
    _Subparsers = argparse._SubParsersAction[_Parser]


def _key_options(parser: argparse.ArgumentParser, *, default_expiry: str) -> None:
    # Defaults are filled in by _with_defaults, so a command can tell what the user typed.
    parser.set_defaults(default_expiry=default_expiry)
    parser.add_argument(
        "--expiry",
        default=None,
        help=f"lifetime as a Go duration in hours/minutes (default {default_expiry})",
    )
    parser.add_argument(
        "--key-algo",
        choices=("ecdsa", "rsa"),
        default=None,
        help="key algorithm (default ecdsa)",
    )
    parser.add_argument(
        "--key-size",
        type=int,
        default=None,
        help="key size: ecdsa 256/384/521 (default 256), rsa 2048-8192 (default 2048)",
    )


def _name_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", default="global", help="Nomad region (default global)")
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name for server and client certificates (repeatable)",
    )
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="extra IP address for server and client certificates (repeatable)",
    )


def _output_options(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help=what)
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing output (a replaced kit folder is kept as a backup)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _wait_option(parser)


def _wait_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=_seconds,
        nargs="?",
        const=600.0,
        default=0.0,
        metavar="SECONDS",
        help="if another cfwrap is writing the same folder, wait for it (default: fail at once; "
        "--wait alone waits up to 600 s)",
    )


def _seconds(text: str) -> float:
    """A number of seconds for --wait: finite and not negative (``nan`` would wait forever)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}: give 0 or more seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and documentation)."""
    parser = _Parser(
        prog="cfwrap",
        description="Make Nomad TLS kits (CA, role certificates, gossip key, agent config) with "
        "real cfssl, check them, and describe them in a manifest.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="store_true", help="show versions of cfwrap and cfssl")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    parser.add_argument(
        "--cfssl-dir",
        type=Path,
        metavar="DIR",
        help="folder holding cfssl 1.6.5 (overrides the search)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_quickstart(sub)
    _add_ca(sub)
    _add_cert(sub)
    _add_keygen(sub)
    _add_doctor(sub)
    _add_replay(sub)
    _add_manifest(sub)
    return parser


def _add_quickstart(sub: _Subparsers) -> None:
    """Add the ``quickstart`` command."""
    quick = sub.add_parser(
        "quickstart",
        help="all of a region's kit: CA, server/client/cli certificates, gossip key, configs",
        description="Make a complete Nomad TLS kit for one region in a new folder: CA, "
        "server, client and cli certificates, gossip key, server and client HCL, the CLI's "
        "environment file, and manifest.json. Built beside DIR and moved into place whole.",
        epilog=_EXAMPLES["quickstart"],
    )
    _output_options(quick, what="folder to create (must not exist or be empty, unless --force)")
    _name_options(quick)
    _key_options(quick, default_expiry="8760h")
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
    quick.set_defaults(handler=_quickstart)


def _add_ca(sub: _Subparsers) -> None:
    """Add the ``ca`` command."""
    ca = sub.add_parser(
        "ca",
        help="a new CA in its own folder",
        description="Make a new CA (ca.pem, ca-key.pem, ca.csr) in a new folder.",
    )
    _output_options(ca, what="folder to create for the CA")
    ca.add_argument(
        "--csr",
        type=Path,
        metavar="FILE",
        help="your own cfssl CSR JSON for the CA (instead of the defaults)",
    )
    ca.add_argument("--cn", default=None, help="CA common name (default Nomad Agent CA)")
    _key_options(ca, default_expiry="43800h")
    ca.set_defaults(handler=_ca)


def _add_cert(sub: _Subparsers) -> None:
    """Add the ``cert`` command."""
    cert = sub.add_parser(
        "cert",
        help="one role certificate from an existing CA",
        description="Issue one Nomad role certificate from an existing CA into "
        "a folder: <region>-<role>-nomad.pem, -key.pem, .csr and the JSON "
        "given to cfssl. The folder's manifest is rebuilt.",
        epilog=_EXAMPLES["cert"],
    )
    cert.add_argument("--ca", type=Path, required=True, metavar="FILE", help="CA certificate")
    cert.add_argument("--ca-key", type=Path, required=True, metavar="FILE", help="CA private key")
    cert.add_argument("--role", choices=("server", "client", "cli"), required=True)
    _output_options(cert, what="folder for the certificate (created if missing)")
    _name_options(cert)
    _key_options(cert, default_expiry="8760h")
    cert.set_defaults(handler=_cert)


def _add_keygen(sub: _Subparsers) -> None:
    """Add the ``keygen`` command."""
    keygen = sub.add_parser(
        "keygen",
        help="a gossip encryption key, or check one",
        description="Print a new gossip key (standard base64), or check one "
        "read from a file or stdin (never from the command line).",
    )
    keygen.add_argument(
        "--bytes",
        type=int,
        choices=(16, 24, 32),
        default=32,
        help="key size (default 32, what current Nomad makes)",
    )
    keygen.add_argument("--check", metavar="FILE", help="check the key in FILE ('-': stdin)")
    keygen.add_argument("--json", action="store_true", help="print the result as JSON")
    keygen.set_defaults(handler=_keygen)


def _add_doctor(sub: _Subparsers) -> None:
    """Add the ``doctor`` command."""
    doc = sub.add_parser(
        "doctor",
        help="check certificates, keys and agent config against Nomad's own TLS rules",
        description="Check a kit folder (or loose files made by anyone) the way Nomad agents "
        "and the CLI will: chain, key pairing, role names per region, key usages, dates, key "
        "file modes, and the agent HCL. Each finding names the error Nomad would print and the "
        "command that fixes it. Exit 0 only when there is no error.",
        epilog=_EXAMPLES["doctor"],
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
    doc.add_argument("--region", default=None, help="Nomad region (default global)")
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
    doc.set_defaults(handler=_doctor)


def _add_replay(sub: _Subparsers) -> None:
    """Add the ``replay`` command."""
    rep = sub.add_parser(
        "replay",
        help="run a published guide's steps for real, record them, say where it goes wrong",
        description="Run a guide's steps with the real binaries (pipes included) in DIR/files, "
        "record a transcript (DIR/transcript.md and .json), compare the folder with the "
        "guide's table of files, and check the result against Nomad's rules. GUIDE is a "
        "shipped guide's name (see --list) or a guide file (TOML, schemas/guide.schema.json).",
        epilog=_EXAMPLES["replay"],
    )
    rep.add_argument("guide", nargs="?", metavar="GUIDE")
    rep.add_argument("--out", type=Path, metavar="DIR", help="folder to create for the replay")
    rep.add_argument(
        "--force",
        action="store_true",
        help="replace an existing DIR (the old one is kept as a backup)",
    )
    rep.add_argument(
        "--print",
        action="store_true",
        dest="print_script",
        help="print the guide as a shell script instead of running it",
    )
    rep.add_argument("--list", action="store_true", help="list the guides cfwrap ships")
    rep.add_argument("--json", action="store_true", help="print the transcript as JSON")
    _wait_option(rep)
    rep.set_defaults(handler=_replay)


def _add_manifest(sub: _Subparsers) -> None:
    """Add the ``manifest`` command."""
    man = sub.add_parser(
        "manifest",
        help="rebuild a kit's manifest from disk and compare",
        description="Rebuild DIR's manifest from the files on disk and report "
        "where it disagrees with manifest.json (exit 7 if it does).",
    )
    man.add_argument("folder", type=Path, metavar="DIR")
    man.add_argument(
        "--write", action="store_true", help="write the rebuilt manifest instead of comparing"
    )
    man.add_argument("--json", action="store_true", help="print the result as JSON")
    _wait_option(man)
    man.set_defaults(handler=_manifest)


def _out(args: argparse.Namespace) -> Path:
    """The output folder, as an absolute path with a name of its own."""
    from cfwrap.files import output_folder

    return output_folder(args.out)


def _find_cfssl(args: argparse.Namespace) -> Tool:
    from cfwrap import tools

    return tools.find("cfssl", directory=args.cfssl_dir)


def _given(args: argparse.Namespace, *names: str) -> list[str]:
    """The flags among ``names`` (attribute names) that the user typed."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def _expiry(args: argparse.Namespace) -> str:
    return str(args.expiry if args.expiry is not None else args.default_expiry)


def _key(args: argparse.Namespace) -> dict[str, Any]:
    algo = args.key_algo or "ecdsa"
    size = args.key_size if args.key_size is not None else (256 if algo == "ecdsa" else 2048)
    return {"algo": algo, "size": size}


def _spec(cls: type[M], data: dict[str, Any]) -> M:
    """Build a spec from flags; a refused field is reported under its flag."""
    from cfwrap.models import parse_model

    return parse_model(cls, data, what="arguments", flags=_FLAGS)


def _cert_specs(args: argparse.Namespace, roles: Sequence[str]) -> list[Any]:
    from cfwrap.nomad import CertSpec

    specs = []
    for role in roles:
        extra = role != "cli"  # the CLI never serves: it gets no server names or addresses
        specs.append(
            _spec(
                CertSpec,
                {
                    "role": role,
                    "region": args.region,
                    "dns_names": args.dns if extra else [],
                    "ip_addresses": args.ip if extra else [],
                    "expiry": _expiry(args),
                    "key": _key(args),
                },
            )
        )
    return specs


def _report(result: KitResult, args: argparse.Namespace) -> int:
    if args.json:
        _print(
            json.dumps(
                {
                    "folder": str(result.folder),
                    "files": list(result.files),
                    "backup": str(result.backup) if result.backup else None,
                },
                indent=2,
            )
        )
    else:
        for name in result.files:
            _print(result.folder / name)
        if result.backup:
            _say(f"cfwrap: the old {result.folder} is kept as {result.backup}")
    return ExitCode.OK


def _quickstart(args: argparse.Namespace) -> int:
    from cfwrap import kit
    from cfwrap.nomad import CASpec

    specs = _cert_specs(args, ("server", "client", "cli"))
    ca = _spec(CASpec, {"expiry": args.ca_expiry, "key": specs[0].key.model_dump()})
    result = kit.quickstart(
        out=_out(args),
        cfssl_tool=_find_cfssl(args),
        ca=ca,
        specs=specs,
        gossip_bytes=args.gossip_bytes,
        tls_dir=args.tls_dir,
        force=args.force,
        wait=args.wait,
    )
    return _report(result, args)


def _ca(args: argparse.Namespace) -> int:
    from cfwrap import kit
    from cfwrap.nomad import CASpec

    if args.csr is not None:
        clashing = _given(args, "cn", "expiry", "key_algo", "key_size")
        if clashing:
            raise InputError(
                " ".join(clashing),
                "given with --csr, which already says what the CA is",
                fix=f"set them in {args.csr} (CN, ca.expiry, key), or drop --csr",
            )
        spec = _ca_from_csr_file(args.csr)
    else:
        cn = args.cn if args.cn is not None else "Nomad Agent CA"
        spec = _spec(CASpec, {"common_name": cn, "expiry": _expiry(args), "key": _key(args)})
    result = kit.make_ca(
        out=_out(args), cfssl_tool=_find_cfssl(args), spec=spec, force=args.force, wait=args.wait
    )
    return _report(result, args)


def _ca_from_csr_file(path: Path) -> CASpec:
    """Read a user's cfssl CSR JSON for a CA, refusing what cfssl would silently ignore.

    Everything the file says reaches the CA (every subject name, the path length, the key and
    the lifetime); what cfwrap would not keep is refused rather than dropped.
    """
    from cfwrap import files
    from cfwrap.models import CSR, parse_model
    from cfwrap.nomad import CASpec

    try:
        data = json.loads(files.read_input(path, limit=_SMALL_INPUT))
    except OSError as e:
        raise InputError(
            str(path), e.strerror or str(e), fix="give a readable CSR JSON file"
        ) from None
    except RecursionError:
        raise InputError(str(path), "nested too deeply to be a CSR") from None
    except ValueError as e:
        raise InputError(str(path), f"not JSON ({e})") from None
    csr = parse_model(CSR, data, what=str(path))
    if csr.hosts:
        raise InputError(
            f"{path}: hosts",
            "a CA certificate should carry no host names",
            fix="remove hosts from the CA's CSR",
        )
    zero = csr.ca.pathlenzero if csr.ca else None
    if csr.ca is not None and zero is not None and zero != (not csr.ca.pathlen):
        raise InputError(
            f"{path}: ca",
            "pathlenzero and pathlen disagree (cfwrap issues no CA without a path length)",
            fix='give "pathlen": N alone, or "pathlen": 0 with "pathlenzero": true',
        )
    return parse_model(CASpec, CASpec.from_csr(csr), what=str(path))


def _cert(args: argparse.Namespace) -> int:
    from cfwrap import kit

    (spec,) = _cert_specs(args, (args.role,))
    if args.role == "cli" and (args.dns or args.ip):
        raise InputError(
            "--dns/--ip",
            "a cli certificate carries no server names",
            fix="drop --dns and --ip for --role cli",
        )
    ca = kit.load_ca(args.ca, args.ca_key)
    tool = _find_cfssl(args)
    result = kit.issue_cert(
        out=_out(args), cfssl_tool=tool, ca=ca, spec=spec, force=args.force, wait=args.wait
    )
    return _report(result, args)


def _keygen(args: argparse.Namespace) -> int:
    from cfwrap import gossip

    if args.check is None:
        key = gossip.generate(args.bytes)
        _print(json.dumps({"key": key, "bytes": args.bytes}) if args.json else key)
        return ExitCode.OK
    from cfwrap import files

    source = "stdin" if args.check == "-" else args.check
    try:
        if args.check == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            raw = stdin.read(_SMALL_INPUT + 1) if stdin else sys.stdin.read(_SMALL_INPUT + 1)
            if len(raw) > _SMALL_INPUT:
                raise InputError(source, "more than 1 MiB; a gossip key is 24 to 44 characters")
        else:
            raw = files.read_input(Path(args.check), limit=_SMALL_INPUT)
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
    except OSError as e:
        raise InputError(source, e.strerror or str(e), fix="give the key's file") from None
    except UnicodeDecodeError:
        raise InputError(source, "not UTF-8 text", fix="give the key's file") from None
    try:
        size = gossip.check(text)
    except ValueError as e:
        raise InputError(
            f"gossip key from {source}", str(e), fix="make a new one with `cfwrap keygen`"
        ) from None
    if args.json:
        _print(json.dumps({"valid": True, "bytes": size}))
    else:
        print(
            f"cfwrap: gossip key from {source} is valid ({size} bytes, AES-{size * 8})",
            file=sys.stderr,
        )
    return ExitCode.OK


def _manifest(args: argparse.Namespace) -> int:
    from cfwrap import manifest
    from cfwrap.errors import VerificationError

    folder: Path = args.folder
    if not folder.is_dir():
        raise InputError(str(folder), "not a folder", fix="give a kit folder")
    if args.write:
        from cfwrap import files

        with files.FolderLock(folder, wait=args.wait):
            tools = []
            if (folder / manifest.FILE_NAME).exists():
                try:
                    tools = manifest.load(folder).tools
                except VerificationError as e:
                    # --write is how a damaged manifest is repaired: it is rebuilt from disk.
                    _say(f"cfwrap: replacing a damaged manifest ({e.why}); its tool list is lost")
            path = manifest.write(folder, manifest.build(folder, tools))
        _print(path)
        return ExitCode.OK
    recorded = manifest.load(folder)
    problems = manifest.differences(recorded, manifest.scan(folder))
    if args.json:
        _print(
            json.dumps(
                {"folder": str(folder), "matches": not problems, "differences": problems}, indent=2
            )
        )
    else:
        for line in problems:
            _say(f"{folder / line}")
    if problems:
        raise VerificationError(
            str(folder / manifest.FILE_NAME),
            f"{len(problems)} difference(s) from the files on disk",
            fix="inspect the changes; `cfwrap manifest --write DIR` records the folder as it is",
        )
    if not args.json:
        _say(f"cfwrap: {folder / manifest.FILE_NAME} matches the files on disk")
    return ExitCode.OK


def _doctor(args: argparse.Namespace) -> int:
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
        report = doctor.diagnose_files(
            cert=args.cert, key=args.key, ca=args.ca, role=args.role, region=region, options=options
        )
    else:
        folder = args.folder or Path()
        if not folder.is_dir():
            raise InputError(str(folder), "not a folder", fix="give a kit folder, or --cert FILE")
        report = doctor.diagnose_folder(folder, options, region=args.region, run_probes=args.probe)
    if args.json:
        _print(json.dumps(report.to_json(), indent=2))
    else:
        _print(_render_report(report))
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
    return "\n".join(lines)


def _replay(args: argparse.Namespace) -> int:
    from cfwrap import replay
    from cfwrap.errors import ToolFailedError, ToolMissingError, VerificationError
    from cfwrap.replay import guide

    if args.list:
        for name in guide.shipped():
            _print(name)
        return ExitCode.OK
    if args.guide is None:
        raise _UsageError("cfwrap replay: give a GUIDE", fix="see `cfwrap replay --list`")
    loaded = guide.load(args.guide)
    if args.print_script:
        _print(guide.to_shell(loaded), end="")
        return ExitCode.OK
    if args.out is None:
        raise _UsageError(
            "cfwrap replay: --out DIR is required to run a guide",
            fix="or pass --print to see it as a script",
        )
    result = replay.replay(
        loaded, out=_out(args), cfssl_dir=args.cfssl_dir, force=args.force, wait=args.wait
    )
    transcript = result.transcript
    if args.json:
        _print(transcript.model_dump_json(indent=2))
    else:
        _print(result.markdown)
        _print(result.json)
    where = f"see {result.markdown}"
    if transcript.outcome == "tool-missing":
        raise ToolMissingError("replay", transcript.stopped_because, fix=where)
    if transcript.outcome == "step-failed":
        raise ToolFailedError("replay", transcript.stopped_because, fix=where)
    if transcript.outcome == "findings":
        errors = sum(f.severity == "error" for f in transcript.findings)
        missing = len(transcript.missing_files)
        raise VerificationError(
            f"guide {loaded.name}",
            f"its result fails {errors} of Nomad's checks and lacks {missing} of its own files",
            fix=f"{where} for the findings and the corrected commands",
        )
    return ExitCode.OK


def _version(args: argparse.Namespace) -> int:
    info: dict[str, Any] = {"cfwrap": __version__}
    try:
        tool = _find_cfssl(args)
    except CfwrapError as e:
        info["cfssl"] = {"error": str(e)}
    else:
        info["cfssl"] = {
            "path": str(tool.path),
            "package": tool.package,
            "version": tool.version,
            "sha256": tool.sha256,
        }
    _print(json.dumps(info, indent=2))
    return ExitCode.OK


def _setup_logging(*, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cfwrap: %(levelname)s: %(name)s: %(message)s"))
    root = logging.getLogger("cfwrap")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so every ``with`` block rolls its work back."""


def _on_sigterm(signum: int, frame: object) -> None:
    _stop_tools()
    raise _Terminated


def _on_sigint(signum: int, frame: object) -> None:
    _stop_tools()
    raise KeyboardInterrupt


def _stop_tools() -> None:
    """Kill the tools cfwrap started, before the with blocks remove folders they write into."""
    runner = sys.modules.get("cfwrap.runner")  # not imported: no tool was ever started
    if runner is not None:
        runner.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cfwrap command line; returns the exit code."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_int = signal.signal(signal.SIGINT, _on_sigint)
    try:
        try:
            return _main(argv)
        except _Terminated:  # came while an error was being reported: still a clean stop
            return _stopped(ExitCode.TERMINATED)
        except KeyboardInterrupt:
            return _stopped(ExitCode.INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _stopped(code: ExitCode) -> int:
    _say("cfwrap: stopped; nothing was left half-written")
    return code


def _print(*values: object, end: str = "\n") -> None:
    """Print data on stdout; a failed write names standard output in the error."""
    try:
        print(*values, end=end)
    except BrokenPipeError:
        raise
    except OSError as e:
        _drop_stdout()
        raise OSError(e.errno, e.strerror, "standard output") from None


def _say(line: str) -> None:
    """One line for people on stderr; a closed or full stderr is not worth a traceback.

    Control characters from the input (a newline in a flag's value, an escape sequence) are
    shown escaped, so the line stays one line and cannot rewrite the terminal.
    """
    import re

    line = re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: ascii(m.group())[1:-1], line)
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def _main(argv: Sequence[str] | None) -> int:
    # Paths from argv may hold bytes that are not UTF-8: data on stdout goes back as given,
    # messages on stderr show them escaped.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors=errors)  # type: ignore[union-attr]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _setup_logging(verbose=args.verbose)
        _check_paths(args)
        if args.version:
            code = _version(args)
        else:
            handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
            if handler is None:
                parser.print_help(sys.stderr)
                return ExitCode.USAGE
            code = handler(args)
        _flush_stdout()
        return code
    except BrokenPipeError:
        _drop_stdout()
        return ExitCode.BROKEN_PIPE  # quiet, as Unix tools are when their reader goes away
    except CfwrapError as e:
        detail = getattr(e, "stderr", "")
        if detail:
            log.debug("tool stderr:\n%s", detail)
        _say(f"cfwrap: error: {e}")
        return e.exit_code
    except OSError as e:
        # The operating system refused something no command anticipated (a name too long, a
        # permission, a full stdout): one line naming the file, never a traceback.
        where = f"{e.filename}: " if e.filename is not None else ""
        with contextlib.suppress(OSError):
            _flush_stdout()  # keep what was printed if stdout can take it; else drop it
        _say(f"cfwrap: error: {where}{e.strerror or e}; check the path and try again")
        return ExitCode.FILESYSTEM
    except (KeyboardInterrupt, _Terminated) as e:
        # The with blocks have already removed staging folders and temporary files.
        return _stopped(ExitCode.TERMINATED if isinstance(e, _Terminated) else ExitCode.INTERRUPTED)


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse a path that is not UTF-8: cfwrap hands paths to cfssl, which takes text argv.

    Raises:
        InputError: the first such path, shown with its bad bytes escaped.
    """
    for name, value in vars(args).items():
        if isinstance(value, Path):
            try:
                str(value).encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(value).decode("utf-8", "backslashreplace")
                flag = "--" + name.replace("_", "-") if name != "folder" else "DIR"
                raise InputError(
                    f"{flag} {shown}", "is not UTF-8", fix="give a path in UTF-8"
                ) from None


def _flush_stdout() -> None:
    """Flush what the command printed; a full stdout (``> /dev/full``) is this run's error."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        _drop_stdout()
        raise OSError(e.errno, e.strerror, "standard output") from None


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
