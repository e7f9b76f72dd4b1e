"""The signer's policy: one profile per role, each with its own auth key and name rule.

cfssl checks ``name_whitelist`` with Go's ``Regexp.Find`` (``signer/local/local.go``), which
searches anywhere in the name: every rule here is anchored with ``^(?:...)$`` (Go's ``$`` without
``(?m)`` matches only at the very end), and dots are escaped, so ``client.global.nomad`` does
not admit ``client-global-nomad`` nor ``server.global.nomad.evil``. The rule is matched against
the common name, every DNS name, e-mail address and URI; IP addresses are not checked by cfssl.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cfwrap.nomad import ROLES, Role, check_dns_name, role_name
from cfwrap.signer import authkeys
from cfwrap.specs import usages_for

#: Names under an allowed domain: lowercase DNS labels, any depth.
_LABELS = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
#: A Go regular expression that matches no string at all (the locked default profile's rule).
NOTHING = r"^[^\x00-\x{10FFFF}]$"


def check_domain(text: str) -> str:
    """Check an ``--allow-dns`` domain; a domain that could hold a Nomad role name is refused.

    Raises:
        ValueError: with the reason.
    """
    name = check_dns_name(text.removeprefix("*."))
    if name == "nomad" or name.endswith(".nomad") or name == "localhost":
        raise ValueError(
            f"--allow-dns {text!r} would admit Nomad role names (server.<region>.nomad); "
            "each role's own name is allowed already"
        )
    return name


def _escape(name: str) -> str:
    """A name as a Go regular expression: only dots and hyphens occur, both made literal."""
    return re.escape(name)


def name_rule(role: Role, *, regions: Sequence[str], domains: Sequence[str] = ()) -> str:
    """The ``name_whitelist`` of a role: its own names in these regions, and nothing else.

    Server and client certificates may also carry ``localhost`` and names under ``domains``;
    the CLI's certificate carries only ``cli.<region>.nomad``.
    """
    names = [_escape(role_name(role, region)) for region in regions]
    if role != "cli":
        names.append("localhost")
        names += [_LABELS + _escape(domain) for domain in domains]
    return "^(?:" + "|".join(names) + ")$"


def signing_config(
    auth_dir: Path,
    *,
    regions: Sequence[str],
    domains: Sequence[str],
    expiry: str,
    rotating: Sequence[Role] = (),
) -> dict[str, Any]:
    """The signing config for the signer (cfssl.json): keys only as ``file:`` paths, never values.

    Every profile, the default one included, has an ``auth_key`` (cfssl#581: a profile does not
    inherit the default's); the default profile's key is given to no node and its name rule
    matches nothing. ``rotating`` roles also accept their previous key (``prev_auth_key``).
    """
    from cfwrap.models import KeySpec

    keys: dict[str, Any] = {}

    def key(name: str, path: Path) -> str:
        keys[name] = {"type": "standard", "key": f"file:{path.absolute()}"}
        return name

    profiles: dict[str, Any] = {}
    for role in ROLES:
        profile: dict[str, Any] = {
            "usages": list(usages_for(role, KeySpec())),
            "expiry": expiry,
            "auth_key": key(role, authkeys.key_path(auth_dir, role)),
            "name_whitelist": name_rule(role, regions=regions, domains=domains),
        }
        if role in rotating:
            profile["prev_auth_key"] = key(f"{role}-prev", authkeys.prev_path(auth_dir, role))
        profiles[role] = profile
    default = {
        "usages": ["digital signature", "client auth"],
        "expiry": "1h",
        "auth_key": key(authkeys.LOCKED, authkeys.key_path(auth_dir, authkeys.LOCKED)),
        "name_whitelist": NOTHING,
    }
    return {"signing": {"default": default, "profiles": profiles}, "auth_keys": keys}


def to_json(config: dict[str, Any]) -> bytes:
    """The config as the JSON file cfssl reads."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
