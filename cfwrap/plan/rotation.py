"""CA rotation in three phases, each one ``cfwrap apply PLAN --rotate-ca``.

1. ``trust-both``: a new CA is made and every member's bundle holds both CAs; leaves are still
   signed by the old CA. Agents that reload now trust leaves from either CA.
2. ``new-leaves``: every leaf is reissued by the new CA (new keys). An agent still holding an
   old leaf and one holding a new leaf trust each other: both hold both CAs.
3. ``steady``: the old CA leaves every bundle and its folder moves under ``retired/``. An old
   leaf is refused from then on.

Nomad reloads its TLS files on SIGHUP (``systemctl reload nomad``) when their content changed
(hashicorp/nomad#3479), so no agent restarts. Between phases every agent must have reloaded:
``cfwrap status PLAN --connect`` shows which CA each reachable agent serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfwrap.plan.model import Plan

if TYPE_CHECKING:
    from cfwrap.plan.apply import Diff
    from cfwrap.plan.state import Phase


def steps(plan: Plan, phase: Phase, d: Diff, *, dry_run: bool = False) -> list[str]:
    """The ordered steps for the operator after an apply that ended in ``phase``.

    Empty outside a rotation (and when a rotation phase changed nothing). ``dry_run``: the
    phase is only shown, so its steps are said to follow the real apply.
    """
    lines = _steps(plan, phase, d)
    if not dry_run or d.phase == phase or not lines:
        return lines
    first = lines[0].replace(" done: ", ", once applied: ", 1)
    return ["Dry run: nothing was made. After the same apply without --dry-run:", first, *lines[1:]]


def _steps(plan: Plan, phase: Phase, d: Diff) -> list[str]:
    tls = plan.node_tls_dir
    reload = "send SIGHUP to its Nomad agent (`systemctl reload nomad`, or `kill -HUP <pid>`)"
    if d.phase == phase:
        if phase == "steady":
            return []
        number, next_step = (
            (1, "2 (reissue every leaf)") if phase == "trust-both" else (2, "3 (drop the old CA)")
        )
        return [
            f"A CA rotation is in progress: phase {number} of 3 is done. When every node has "
            f"its new files and reloaded, run `cfwrap apply PLAN --rotate-ca` for phase "
            f"{next_step}."
        ]
    if phase == "trust-both":
        new = d.trusted[-1]
        return [
            f"CA rotation, phase 1 of 3 done: CA gen-{new} made; every bundle now trusts "
            f"gen-{d.trusted[0]} and gen-{new}; leaves are unchanged.",
            f"1. Copy each node's nodes/<region>/<node>/ca.pem to {tls}/ca.pem on that node, "
            f"and give each operator operators/<name>/ca.pem.",
            f"2. On each node, {reload}. Servers and clients may go in any order.",
            "3. Check that every agent reloaded: `cfwrap status PLAN --connect` (each answers "
            "with a leaf that still verifies against the bundle).",
            "4. When every node holds the new bundle, run `cfwrap apply PLAN --rotate-ca` "
            "for phase 2.",
        ]
    if phase == "new-leaves":
        return [
            f"CA rotation, phase 2 of 3 done: every certificate is reissued by CA gen-{d.signing}"
            " with a new key; the bundles still trust both CAs.",
            f"1. Copy each node's certificate and key (nodes/<region>/<node>/*.pem) to {tls}/ "
            "on that node (key mode 0600), and give each operator their new files.",
            f"2. On each node, {reload}; servers one at a time, waiting for each to rejoin "
            "(`nomad server members`).",
            "3. Check with `cfwrap status PLAN --connect` that every agent serves a "
            f"certificate from gen-{d.signing}.",
            "4. Then run `cfwrap apply PLAN --rotate-ca` for phase 3, which drops the old CA.",
        ]
    if d.retire_generation is not None:
        return [
            f"CA rotation, phase 3 of 3 done: CA gen-{d.retire_generation} is dropped from every "
            "bundle and its folder moved under retired/.",
            f"1. Copy each node's ca.pem to {tls}/ca.pem on that node; operators take theirs.",
            f"2. On each node, {reload}. From now on a leaf of the old CA is refused.",
            f"3. Keep or destroy the old CA's key (retired/.../ca/gen-{d.retire_generation}); "
            "nothing signs with it again.",
        ]
    return []
