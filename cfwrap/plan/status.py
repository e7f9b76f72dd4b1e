"""``status``: every certificate of a plan's tree, its days left and a state.

With ``--connect`` it also dials each node that has an address and compares what it serves.

States: ``ok``; ``expiring`` (inside the window); ``expired``; ``missing`` (no folder or no
certificate); ``changed`` (a file or its mode differs from the folder's manifest, or the
certificate is not the one the plan manifest records). With ``--connect``: ``serving-other``
(the agent at the node's address serves another certificate) and ``unreachable``. The servers'
``gossip.key`` has a row of its own (missing; changed: no valid key in it, or not 0600).
"""

from __future__ import annotations

import stat
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cfwrap import files, parsers
from cfwrap.errors import VerificationError
from cfwrap.plan import cas, members, state
from cfwrap.plan.apply import root_of
from cfwrap.plan.members import BUNDLE, Names
from cfwrap.plan.model import Member, Plan

OK_STATES = ("ok",)


@dataclass(frozen=True)
class Row:
    """One certificate's line in the table."""

    node: str
    role: str
    region: str
    issuer: str
    days_left: float | None
    not_after: str | None
    state: str
    detail: str = ""
    served: str | None = None

    @property
    def needs_action(self) -> bool:
        """Anything but ``ok`` asks for action."""
        return self.state not in OK_STATES

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return asdict(self)


def _issuer_name(cert: object, generations: list[cas.Generation], region: str) -> str:
    for g in generations:
        try:
            signer = g.signer(region)
        except VerificationError:  # a generation without this region's intermediate
            continue
        if parsers.is_issued_by(cert, parsers.load_certificate(signer.cert_pem)):
            return "signer" if g.number == cas.SIGNER_GENERATION else f"gen-{g.number}"
    return "unknown"


def rows(
    plan: Plan, plan_path: Path, *, within: timedelta, now: datetime | None = None
) -> list[Row]:
    """A row for each CA generation and each member of the plan."""
    now = now or datetime.now(UTC)
    root = root_of(plan, plan_path)
    generations = cas.find(root)
    if not generations and (signer := cas.signer_generation(root)) is not None:
        generations = [signer]  # a central signer issues this tree
    table: list[Row] = []
    if not generations:
        table.append(Row("ca", "ca", "-", "-", None, None, "missing", "no CA yet: run apply"))
    recorded = state.load(root)
    for g in generations:
        name = "ca signer" if g.number == cas.SIGNER_GENERATION else f"ca gen-{g.number}"
        changed = cas.changed_on_disk(g, recorded)
        if recorded is not None and g.number not in {c.generation for c in recorded.cas}:
            changed["-"] = (
                "not in plan-manifest.json (a rotation's phase 1 that stopped?): run apply "
                "--rotate-ca to finish it"
            )
        for region, ca in [("-", g.root), *g.intermediates.items()]:
            left = (ca.facts.not_after - now) / timedelta(days=1)
            row_state = _dated_state(ca.facts.not_after, now, within)
            if changed.get(region):
                row_state = "changed"
            table.append(
                Row(
                    name + (f" {region}" if region != "-" else ""),
                    "ca",
                    region,
                    "gen-" + str(g.number) if region != "-" else "self",
                    round(left, 1),
                    ca.facts.not_after.isoformat(),
                    row_state,
                    changed.get(region, ""),
                )
            )
    known = state.fingerprints(root) if recorded is not None else None
    for member in plan.members():
        table.append(_member_row(plan, member, root, generations, known, within=within, now=now))
    gossip_row = _gossip_row(plan, root)
    if gossip_row is not None:
        table.append(gossip_row)
    return table


def _gossip_row(plan: Plan, root: Path) -> Row | None:
    """The servers' gossip key (``gossip.key``), when the plan has servers that use one.

    Missing while servers exist, or not a key Nomad takes: apply would refuse to go on (a new
    key would not reach the running cluster), so it needs action.
    """
    from cfwrap.plan.apply import GOSSIP_FILE, servers_holding_a_key

    servers = [m for m in plan.members() if m.role == "server"]
    if not plan.gossip or not servers:
        return None

    kind, detail = _gossip_state(root / GOSSIP_FILE, held=bool(servers_holding_a_key(root)))
    return Row(GOSSIP_FILE, "gossip-key", "-", "-", None, None, kind, detail)


def _gossip_state(path: Path, *, held: bool) -> tuple[str, str]:
    """The gossip key file's state and why: ``held``, server folders on disk hold a key."""
    from cfwrap import gossip

    try:
        gossip.check(files.read_input_text(path))
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        if not held:
            return "missing", "not made yet: run apply"
        return "missing", "restore it: the servers' agent files hold the key (encrypt)"
    except ValueError as e:
        return "changed", f"{e}; restore it"
    except (OSError, UnicodeDecodeError) as e:
        return "changed", f"cannot be read ({e}); restore it"
    if mode != files.SECRET_MODE:
        return "changed", f"mode 0{mode:03o}: it holds the servers' secret; chmod 600 it"
    return "ok", ""


def _dated_state(not_after: datetime, now: datetime, within: timedelta) -> str:
    if not_after <= now:
        return "expired"
    if not_after - now < within:
        return "expiring"
    return "ok"


def _unrecorded(
    member: Member, facts: parsers.CertFacts, known: dict[str, str] | None
) -> str | None:
    """Why a whole folder's certificate is not the one the plan manifest records; None if it is.

    An apply that did not finish leaves such folders (the plan manifest is written last), and
    so do files copied in from another folder with their manifest. Either way, apply is due.
    """
    if known is None:
        return "the tree has no plan manifest (an apply that did not finish?): run apply"
    fingerprint = known.get(member.folder)
    if fingerprint is None:
        return "not in the plan manifest (an apply that did not finish?): run apply"
    if fingerprint != facts.fingerprint_sha256:
        return (
            "its certificate is not the one the plan manifest records (an apply that did not "
            "finish, or files copied in from elsewhere): run apply, or restore the folder"
        )
    return None


def _member_row(
    plan: Plan,
    member: Member,
    root: Path,
    generations: list[cas.Generation],
    known: dict[str, str] | None,
    *,
    within: timedelta,
    now: datetime,
) -> Row:
    spec = members.spec_for(plan, member)
    folder = root / member.folder
    base = {"node": member.label, "role": member.role, "region": member.region}
    if not folder.is_dir():
        return Row(**base, issuer="-", days_left=None, not_after=None, state="missing",
                   detail="not issued yet: run apply")  # fmt: skip
    current = members.read_current(folder, spec)
    if current.facts is None or current.cert is None:
        # A certificate file that no longer parses is there, but changed; none at all is missing.
        gone = current.cert_pem is None
        return Row(**base, issuer="-", days_left=None, not_after=None,
                   state="missing" if gone else "changed",
                   detail=current.changed[0] if current.changed else "no certificate")  # fmt: skip
    facts = current.facts
    issuer = _issuer_name(current.cert, generations, member.region)
    left = round(members.days_left(facts, now), 1)
    row_state = _dated_state(facts.not_after, now, within)
    detail = ""
    if current.changed:
        row_state, detail = "changed", current.changed[0]
    elif (why := _unrecorded(member, facts, known)) is not None:
        row_state, detail = "changed", why
    return Row(**base, issuer=issuer, days_left=left, not_after=facts.not_after.isoformat(),
               state=row_state, detail=detail)  # fmt: skip


def connect(plan: Plan, plan_path: Path, table: list[Row]) -> list[Row]:
    """Dial every member with an address; compare what it serves with its folder's certificate."""
    from cfwrap.doctor.connect import connect as dial

    root = root_of(plan, plan_path)
    by_label = {m.label: m for m in plan.members()}
    operator = next((m for m in plan.members() if m.role == "cli"), None)
    cert = key = None
    if operator is not None:
        names = Names.of(members.spec_for(plan, operator))
        cert, key = root / operator.folder / names.cert, root / operator.folder / names.key
        if not (cert.exists() and key.exists()):
            cert = key = None
    out: list[Row] = []
    for row in table:
        member = by_label.get(row.node)
        if member is None or member.node.address is None or row.state == "missing":
            out.append(row)
            continue
        folder = root / member.folder
        names = Names.of(members.spec_for(plan, member))
        presented = dial(
            member.node.address,
            ca=folder / BUNDLE,
            cert=cert,
            key=key,
            server_name=f"{member.role}.{member.region}.nomad",
        )
        mine = parsers.read_certificate(files.read_input(folder / names.cert))
        if presented.certificate_der is None:
            out.append(_with(row, "unreachable", presented.error, "-"))
            continue
        served = parsers.certificate_facts(parsers.load_der_certificate(presented.certificate_der))
        if served.fingerprint_sha256 != mine.fingerprint_sha256:
            out.append(
                _with(
                    row,
                    "serving-other",
                    f"{member.node.address} serves serial {served.serial[:16]}..., "
                    f"the tree holds {mine.serial[:16]}...",
                    "other",
                )
            )
        elif not presented.verified:
            out.append(_with(row, "serving-other", f"does not verify: {presented.error}", "same"))
        else:
            out.append(_with(row, row.state, row.detail, "same"))
    return out


def _with(row: Row, new_state: str, detail: str, served: str) -> Row:
    return Row(row.node, row.role, row.region, row.issuer, row.days_left, row.not_after,
               new_state, detail, served)  # fmt: skip


def phase(plan: Plan, plan_path: Path) -> str:
    """The rotation phase the plan manifest records (``steady`` without one)."""
    recorded = state.load(root_of(plan, plan_path))
    return recorded.phase if recorded is not None else "steady"
