"""``status``: every certificate of a plan's tree, its days left and a state.

With ``--connect`` it also dials each node that has an address and compares what it serves.

States: ``ok``; ``expiring`` (inside the window); ``expired``; ``missing`` (no folder or no
certificate); ``changed`` (a file or its mode differs from the folder's manifest, or the
certificate is not the one the plan manifest records). With ``--connect``: ``serving-other``
(the agent at the node's address serves another certificate) and ``unreachable``. The servers'
``gossip.key`` has a row of its own (missing; changed: no valid key in it, or not 0600).
"""

from __future__ import annotations

import functools
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cfwrap import files, parsers
from cfwrap.errors import InputError, VerificationError
from cfwrap.plan import cas, members, state
from cfwrap.plan.apply import check_out, missing_cas, moved_reason, root_of
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
    check_out(plan, root, parent_needed=False)
    generations = cas.find(root)
    recorded = state.load(root)
    lost = missing_cas(root, recorded, generations)
    if not generations and (signer := cas.signer_generation(root)) is not None:
        generations = [signer]  # a central signer issues this tree
    table: list[Row] = []
    lost_detail = (
        "plan-manifest.json records it: put the CA folder back (apply refuses to make a new CA "
        "in its place)"
    )
    for relative in lost:
        gen, _, region = relative.partition("/")
        name = f"ca {gen}" + (f" {region}" if region else "")
        table.append(Row(name, "ca", region or "-", "-", None, None, "missing", lost_detail))
    if not generations and not any("/" not in relative for relative in lost):
        detail = "no CA yet: run apply"
        if recorded is not None and recorded.signer:
            detail = (
                f"the signer's CA ({cas.CA_ROOT}/{cas.SIGNER_FOLDER}/ca.pem) is gone: run "
                "apply --remote"
            )
        table.append(Row("ca", "ca", "-", "-", None, None, "missing", detail))
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
    known = state.recorded_members(root) if recorded is not None else None
    phase_3_bundle = None
    if recorded is not None and recorded.phase == "new-leaves" and len(generations) == 2:
        phase_3_bundle = cas.bundle(generations, [generations[-1].number])
    for member in plan.members():
        table.append(
            _member_row(
                plan,
                member,
                root,
                generations,
                known,
                phase_3_bundle=phase_3_bundle,
                within=within,
                now=now,
            )
        )
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
    member: Member,
    current: members.Current,
    known: dict[str, state.Recorded] | None,
    *,
    phase_3_bundle: bytes | None,
) -> str | None:
    """Why a whole folder is not what the plan manifest records; None if it is.

    An apply that did not finish leaves such folders (the plan manifest is written last), and
    so do files copied in from another folder with their manifest. Either way, apply is due.
    A bundle that already drops the old CA while the manifest records phase 2 is a phase 3
    that stopped (``phase_3_bundle``: what phase 3 hands out, during phase 2 only).
    """
    assert current.facts is not None  # noqa: S101 (the caller read a certificate)
    if known is None:
        return "the tree has no plan manifest (an apply that did not finish?): run apply"
    recorded = known.get(member.folder)
    if recorded is None:
        return "not in the plan manifest (an apply that did not finish?): run apply"
    if recorded.fingerprint_sha256 != current.facts.fingerprint_sha256:
        return (
            "its certificate is not the one the plan manifest records (an apply that did not "
            "finish, or files copied in from elsewhere): run apply, or restore the folder"
        )
    differ = sorted(
        name
        for name in recorded.files.keys() | current.hashes.keys()
        if recorded.files.get(name) != current.hashes.get(name)
    )
    if not differ:
        return None
    if differ == [BUNDLE] and phase_3_bundle is not None and current.bundle == phase_3_bundle:
        return (
            f"its {BUNDLE} already drops the old CA, while plan-manifest.json records phase 2 "
            "(a phase 3 that stopped?): run apply --rotate-ca to finish phase 3"
        )
    return (
        f"{differ[0]} is not the one plan-manifest.json records (an apply that did not "
        "finish, or files copied in from elsewhere): run apply, or restore the folder"
    )


def _member_row(
    plan: Plan,
    member: Member,
    root: Path,
    generations: list[cas.Generation],
    known: dict[str, state.Recorded] | None,
    *,
    phase_3_bundle: bytes | None,
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
    if current.renamed is not None:
        return Row(**base, issuer="-", days_left=None, not_after=None, state="missing",
                   detail=f"{moved_reason(current.renamed, spec)}: run apply")  # fmt: skip
    if current.facts is None or current.cert is None:
        # A certificate file that is there but cannot be read or parsed is changed; none at
        # all is missing.
        gone = not os.path.lexists(folder / Names.of(spec).cert) and all(
            c.endswith(" is gone") for c in current.changed
        )
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
    elif (why := _unrecorded(member, current, known, phase_3_bundle=phase_3_bundle)) is not None:
        row_state, detail = "changed", why
    return Row(**base, issuer=issuer, days_left=left, not_after=facts.not_after.isoformat(),
               state=row_state, detail=detail)  # fmt: skip


def connect(plan: Plan, plan_path: Path, table: list[Row]) -> list[Row]:
    """Dial every member with an address; compare what it serves with its folder's certificate.

    The dials run at once, up to :data:`DIALS` at a time (each gives up after doctor's
    timeout). A member whose folder is missing or changed is not dialled: what it holds is not
    the tree's certificate to compare with. The operator's certificate is the client's, when it
    can be used; else the agents are dialled without one, and a refusal says so.
    """
    root = root_of(plan, plan_path)
    by_label = {m.label: m for m in plan.members()}
    client = _operator_pair(plan, root)
    calls: dict[int, Callable[[], Row]] = {}
    for i, row in enumerate(table):
        member = by_label.get(row.node)
        if member is not None and member.node.address is not None and row.state not in _UNDIALLED:
            calls[i] = functools.partial(_dial, plan, root, member, row, client)
    dialled = dict(zip(calls, _at_once(list(calls.values()), width=DIALS), strict=True))
    return [dialled.get(i, row) for i, row in enumerate(table)]


#: How many agents ``status --connect`` dials at a time.
DIALS = 32
#: Rows not dialled: what the folder holds (if anything) is not the tree's certificate.
_UNDIALLED = ("missing", "changed")


@dataclass(frozen=True)
class _Client:
    """The client certificate the dials present (none when ``cert`` is None), and why not."""

    cert: Path | None
    key: Path | None
    why_none: str = ""


def _operator_pair(plan: Plan, root: Path) -> _Client:
    """The first operator's certificate and key, if TLS can use them."""
    from cfwrap.doctor.connect import client_context

    operator = next((m for m in plan.members() if m.role == "cli"), None)
    if operator is None:
        return _Client(None, None)  # nothing to say: the plan has no client certificate
    names = Names.of(members.spec_for(plan, operator))
    cert, key = root / operator.folder / names.cert, root / operator.folder / names.key
    if not (files.is_regular(cert) and files.is_regular(key)):
        return _Client(None, None, f"{operator.label}'s certificate or key is missing")
    try:
        client_context(None, cert, key)
    except InputError as e:
        return _Client(None, None, f"{operator.label}'s certificate and key: {e.why}")
    return _Client(cert, key)


def _dial(plan: Plan, root: Path, member: Member, row: Row, client: _Client) -> Row:
    """Dial one member's address and judge what it serves."""
    from cfwrap.doctor.connect import connect as dial

    folder = root / member.folder
    names = Names.of(members.spec_for(plan, member))
    try:
        mine = parsers.read_certificate(files.read_input(folder / names.cert))
        presented = dial(
            member.node.address or "",
            ca=folder / BUNDLE,
            cert=client.cert,
            key=client.key,
            server_name=f"{member.role}.{member.region}.nomad",
        )
    except (OSError, parsers.ParseError) as e:  # changed since rows() read it
        return _with(row, "changed", f"{names.cert} cannot be read: {e}", "-")
    except InputError as e:  # its bundle: the operator's pair was tried before
        return _with(row, "changed", f"{BUNDLE} cannot be used to dial it: {e.why}", "-")
    if presented.certificate_der is None:
        without = f" (dialled without a client certificate: {client.why_none})"
        return _with(
            row, "unreachable", presented.error + (without if client.why_none else ""), "-"
        )
    served = parsers.certificate_facts(parsers.load_der_certificate(presented.certificate_der))
    if served.fingerprint_sha256 != mine.fingerprint_sha256:
        return _with(
            row,
            "serving-other",
            f"{member.node.address} serves serial {served.serial[:16]}..., "
            f"the tree holds {mine.serial[:16]}...",
            "other",
        )
    if not presented.verified:
        return _with(row, "serving-other", f"does not verify: {presented.error}", "same")
    return _with(row, row.state, row.detail, "same")


def _at_once(calls: list[Callable[[], Row]], *, width: int) -> list[Row]:
    """Run ``calls`` on up to ``width`` threads; their results in order (the first error raised).

    Daemon threads, joined from the main thread: Ctrl-C or SIGTERM ends the wait at once, and
    a dial still waiting on its timeout does not hold the exit up.
    """
    results: list[Row | BaseException | None] = [None] * len(calls)
    todo = iter(range(len(calls)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = calls[i]()
            except BaseException as e:  # handed to the main thread, raised there
                results[i] = e

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(width, len(calls)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows: list[Row] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result is not None  # noqa: S101 (every call ran)
        rows.append(result)
    return rows


def _with(row: Row, new_state: str, detail: str, served: str) -> Row:
    return Row(row.node, row.role, row.region, row.issuer, row.days_left, row.not_after,
               new_state, detail, served)  # fmt: skip


def phase(plan: Plan, plan_path: Path) -> str:
    """The rotation phase the plan manifest records (``steady`` without one)."""
    recorded = state.load(root_of(plan, plan_path))
    return recorded.phase if recorded is not None else "steady"
