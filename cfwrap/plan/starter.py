"""The commented starter plan ``cfwrap plan init`` prints: valid as printed."""

from __future__ import annotations

from collections.abc import Sequence


def _nodes(role: str, count: int) -> str:
    return f"{role} = {count}"


def render(*, regions: Sequence[str], servers: int, clients: int, operators: int) -> str:
    """A plan with ``regions``, each with ``servers`` and ``clients``, and ``operators`` people."""
    people = ", ".join(f'"operator-{i}"' for i in range(1, operators + 1))
    lines = [
        "# A cfwrap cluster plan. Apply it with `cfwrap apply THIS_FILE` (add --dry-run to see",
        "# what would change first). Every field is optional unless marked; the values shown",
        "# are the defaults.",
        "version = 1",
        "",
        "# Where the tree goes, relative to this file: ca/, nodes/<region>/<node>/, operators/.",
        'out = "nomad-cluster"',
        "",
        "# Where each node keeps its files, on the node: the agent HCL points here.",
        'node_tls_dir = "/etc/nomad.d/tls"',
        "",
        "# Servers share a gossip encryption key (32 bytes, written to gossip.key).",
        "gossip = true",
        "",
        "# Lifetime of every node and operator certificate (a Go duration in hours).",
        'leaf_expiry = "8760h"',
        "",
        "# People who run the nomad CLI get a cli certificate each (names as DNS labels);",
        '# a table form also takes a region: { name = "alice", region = "global" }.',
        f"operators = [{people}]",
        "",
        "[key]",
        '# "ecdsa" (256, 384, 521) or "rsa" (2048 to 8192).',
        'algo = "ecdsa"',
        "size = 256",
        "",
        "[ca]",
        'common_name = "Nomad Agent CA"',
        'expiry = "43800h"',
        "# true: an offline root signs one intermediate CA per region, which signs that",
        "# region's certificates.",
        "intermediates = false",
        'intermediate_expiry = "26280h"',
        "",
        "# One table per region (required: at least one). servers and clients are each a",
        "# count, or a list of named nodes with extra names and the address status --connect",
        "# dials, for example:",
        "#   servers = [",
        '#     { name = "nomad-1", dns = ["nomad-1.example.com"], ip = ["10.0.0.11"],',
        '#       address = "10.0.0.11:4646" },',
        "#   ]",
    ]
    for region in regions:
        lines += [
            "",
            f"[regions.{region}]",
            _nodes("servers", servers),
            _nodes("clients", clients),
        ]
    return "\n".join(lines) + "\n"
