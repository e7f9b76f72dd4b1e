"""What the commands share: the parser classes, option groups, and turning flags into specs.

Each command module (``cfwrap/cli/<command>.py``) has ``configure(sub)``, which adds its parser,
and ``execute(args) -> int``, which runs it; the options several commands take are added here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from cfwrap.cli.output import emit, say
from cfwrap.errors import CfwrapError, ExitCode

if TYPE_CHECKING:
    from datetime import timedelta

    from pydantic import BaseModel

    from cfwrap.kit import KitResult
    from cfwrap.tools import Tool

M = TypeVar("M", bound="BaseModel")

FLAGS = {
    "region": "--region",
    "dns_names": "--dns",
    "ip_addresses": "--ip",
    "expiry": "--expiry",
    "key": "--key-algo/--key-size",
    "role": "--role",
    "common_name": "--cn",
}


#: The most cfwrap reads of a file a person writes by hand (a CSR JSON, a gossip key).
SMALL_INPUT = 1024 * 1024


EPILOG = """\
exit codes: 0 ok, 2 usage, 3 bad input, 4 output exists or folder busy, 5 cfssl missing or too
old, 6 cfssl failed, 7 verification failed, 8 file system error, 9 status: something needs
action, 10 renew: renewed, 11 renew: renewed but --exec failed, 130 interrupted, 141 stdout
closed, 143 terminated.

cfssl is found by --cfssl-dir, then $CFWRAP_CFSSL_DIR, then .tools/cfssl/bin in this checkout
(./scripts/install-cfssl), then PATH. cfwrap needs cfssl 1.6 or newer.
"""


class UsageError(CfwrapError):
    """Wrong flags or arguments (exit 2, as argparse uses)."""

    exit_code = ExitCode.USAGE


class HelpFormatter(argparse.HelpFormatter):
    """Wrap descriptions to the terminal; keep examples and the exit-code table as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(("example", "exit codes")):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other cfwrap error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 (argparse's own)
        """Use cfwrap's help layout unless told otherwise."""
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Report a usage error as cfwrap's one line, not argparse's usage text."""
        raise UsageError(f"{self.prog}: {message}", fix=f"see `{self.prog} --help`")


if TYPE_CHECKING:
    # The type of add_subparsers()'s result (argparse names it privately).
    Subparsers = argparse._SubParsersAction[Parser]


@contextlib.contextmanager
def no_gc_pauses() -> Iterator[None]:
    """Python's cyclic garbage collector off for a command that makes one kit, on again after.

    Importing pydantic, cryptography and cfwrap's models runs the collector ~80 times, 40-50 ms
    of a quickstart (issue 11). One kit leaves little cyclic garbage, and the run ends right
    after; commands that run long (signer, apply) keep the collector.
    """
    import gc

    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def key_options(parser: argparse.ArgumentParser, *, default_expiry: str) -> None:
    """Add --expiry, --key-algo and --key-size."""
    # Their defaults are filled in by expiry() and key_of(), so a command can tell what the user
    # typed (ca refuses them beside --csr).
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


def name_options(parser: argparse.ArgumentParser) -> None:
    """Add --region, --dns and --ip."""
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


def output_options(parser: argparse.ArgumentParser, *, what: str) -> None:
    """Add --out (described as ``what``), --force, --json and --wait."""
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help=what)
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing output (a replaced kit folder is kept as a backup)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    wait_option(parser)


def wait_option(
    parser: argparse.ArgumentParser, *, what: str = "another cfwrap is writing the same folder"
) -> None:
    """Add --wait [SECONDS]: ``what`` is what it waits out."""
    parser.add_argument(
        "--wait",
        type=seconds,
        nargs="?",
        const=600.0,
        default=0.0,
        metavar="SECONDS",
        help=f"if {what}, wait for it (default: fail at once; --wait alone waits up to 600 s)",
    )


def seconds(text: str) -> float:
    """A number of seconds for --wait: finite and not negative (``nan`` would wait forever)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}: give 0 or more seconds")
    return value


def out_folder(args: argparse.Namespace) -> Path:
    """The output folder, as an absolute path with a name of its own."""
    from cfwrap.files import output_folder

    return output_folder(args.out)


def find_cfssl(args: argparse.Namespace) -> Tool:
    """Cfssl 1.6.5, found by --cfssl-dir or the usual search."""
    from cfwrap import tools

    return tools.find("cfssl", directory=args.cfssl_dir)


def given(args: argparse.Namespace, *names: str) -> list[str]:
    """The flags among ``names`` (attribute names) that the user typed."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def expiry(args: argparse.Namespace) -> str:
    """--expiry as typed, else the command's default."""
    return str(args.expiry if args.expiry is not None else args.default_expiry)


def key_of(args: argparse.Namespace) -> dict[str, Any]:
    """The key spec from --key-algo and --key-size, with each algorithm's default size."""
    algo = args.key_algo or "ecdsa"
    size = args.key_size if args.key_size is not None else (256 if algo == "ecdsa" else 2048)
    return {"algo": algo, "size": size}


def to_spec(cls: type[M], data: dict[str, Any], *, flags: dict[str, str] | None = None) -> M:
    """Build a spec from flags; a refused field is reported under its flag.

    ``flags``: fields given by other flags than :data:`FLAGS` says (``--ca-expiry``).
    """
    from cfwrap.models import parse_model

    return parse_model(cls, data, what="arguments", flags={**FLAGS, **(flags or {})})


def cert_specs(args: argparse.Namespace, roles: Sequence[str]) -> list[Any]:
    """One certificate spec per role from the name and key flags."""
    from cfwrap.specs import CertSpec

    specs = []
    for role in roles:
        extra = role != "cli"  # the CLI never serves: it gets no server names or addresses
        specs.append(
            to_spec(
                CertSpec,
                {
                    "role": role,
                    "region": args.region,
                    "dns_names": args.dns if extra else [],
                    "ip_addresses": args.ip if extra else [],
                    "expiry": expiry(args),
                    "key": key_of(args),
                },
            )
        )
    return specs


def report(result: KitResult, args: argparse.Namespace) -> int:
    """Print what a command wrote: its paths, or --json."""
    if args.json:
        emit(
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
            emit(result.folder / name)
        if result.backup:
            say(f"cfwrap: the old {result.folder} is kept as {result.backup}")
    return ExitCode.OK


def window(text: str) -> timedelta:
    """A time window: days (``30d``) or a Go duration (``720h``), more than zero."""
    from datetime import timedelta

    from cfwrap.models import parse_duration

    try:
        if text.endswith("d") and text[:-1].isascii() and text[:-1].isdigit():
            value = timedelta(days=int(text[:-1]))
        else:
            value = parse_duration(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{text[:20]!r} is not a window: give days (30d) or hours (720h)"
        ) from None
    if value <= timedelta(0) or value > timedelta(days=36500):
        raise argparse.ArgumentTypeError(f"{text[:20]!r}: give a window of 1 to 36500 days")
    return value
