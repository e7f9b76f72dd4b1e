"""``cfwrap ca``: a new CA in its own folder, from defaults or a user's CSR JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.cli.options import (
    SMALL_INPUT,
    expiry,
    find_cfssl,
    given,
    key_of,
    key_options,
    out_folder,
    output_options,
    report,
    to_spec,
)
from cfwrap.errors import InputError

if TYPE_CHECKING:
    from cfwrap.cli.options import Subparsers
    from cfwrap.specs import CASpec


def configure(sub: Subparsers) -> None:
    """Add the ``ca`` command."""
    ca = sub.add_parser(
        "ca",
        help="a new CA in its own folder",
        description="Make a new CA (ca.pem, ca-key.pem, ca.csr) in a new folder.",
    )
    output_options(ca, what="folder to create for the CA")
    ca.add_argument(
        "--csr",
        type=Path,
        metavar="FILE",
        help="your own cfssl CSR JSON for the CA (instead of the defaults)",
    )
    ca.add_argument("--cn", default=None, help="CA common name (default Nomad Agent CA)")
    key_options(ca, default_expiry="43800h")
    ca.set_defaults(handler=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the command; returns its exit code."""
    from cfwrap import kit
    from cfwrap.specs import CASpec

    if args.csr is not None:
        clashing = given(args, "cn", "expiry", "key_algo", "key_size")
        if clashing:
            raise InputError(
                " ".join(clashing),
                "given with --csr, which already says what the CA is",
                fix=f"set them in {args.csr} (CN, ca.expiry, key), or drop --csr",
            )
        spec = _ca_from_csr_file(args.csr)
    else:
        cn = args.cn if args.cn is not None else "Nomad Agent CA"
        spec = to_spec(CASpec, {"common_name": cn, "expiry": expiry(args), "key": key_of(args)})
    result = kit.make_ca(
        out=out_folder(args),
        cfssl_tool=find_cfssl(args),
        spec=spec,
        force=args.force,
        wait=args.wait,
    )
    return report(result, args)


def _ca_from_csr_file(path: Path) -> CASpec:
    """Read a user's cfssl CSR JSON for a CA, refusing what cfssl would silently ignore.

    Everything the file says reaches the CA (every subject name, the path length, the key and
    the lifetime); what cfwrap would not keep is refused rather than dropped.
    """
    from cfwrap import files
    from cfwrap.models import CSR, parse_model
    from cfwrap.specs import CASpec

    try:
        data = json.loads(files.read_input(path, limit=SMALL_INPUT))
    except OSError as e:
        raise InputError(
            str(path), e.strerror or str(e), fix="give a readable CSR JSON file"
        ) from None
    except RecursionError:
        raise InputError(str(path), "nested too deeply to be a CSR") from None
    except ValueError as e:
        raise InputError(str(path), f"not JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(
            str(path),
            f"is not a CSR: a JSON object is expected, not {type(data).__name__}",
            fix='give a cfssl CSR JSON object, e.g. {"CN": "Nomad Agent CA"}',
        )
    # Exact types, as cfssl's JSON decoder takes them: "pathlen": true or "1" is refused here,
    # never turned into 1.
    csr = parse_model(CSR, data, what=str(path), exact=True)
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
