"""``apply``: compare the plan with the tree, say what will change, then change exactly that.

It reads like a plan a person would make: :func:`diff` reads the tree and lists the changes
(``--dry-run`` stops there); :func:`apply` carries them out. New folders are built in one stage
inside the tree, flushed with one sync and renamed into place whole; changed folders are
updated with :class:`files.FileSet` (all of a folder's files or none); what a change replaces
or a plan no longer names is moved under ``retired/``, never deleted; the plan manifest is
written last, and only when its bytes change. An unchanged plan writes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from cfwrap import files, gossip, manifest, parsers, verify
from cfwrap.errors import CfwrapError, ConflictError, ExitCode, InputError, VerificationError
from cfwrap.models import SigningConfig
from cfwrap.plan import cas, members, rotation, shards, state
from cfwrap.plan.members import BUNDLE, Configs, Current, Names
from cfwrap.plan.model import Member, Plan
from cfwrap.specs import CertSpec, signing_config
from cfwrap.tools import Tool

if TYPE_CHECKING:
    from cfwrap.issuer import SignRequest

log = logging.getLogger(__name__)

GOSSIP_FILE = "gossip.key"
RETIRED = "retired"
NODES = "nodes"
OPERATORS = "operators"

Kind = Literal["create", "reissue", "renew", "update"]


class _Engine(Protocol):
    """What signs a run's requests: :class:`issuer.LocalSigner` or :class:`issuer.RemoteSigner`."""

    def __enter__(self) -> _Engine: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def sign_all(self, requests: Iterable[SignRequest]) -> Iterator[tuple[SignRequest, bytes]]: ...


Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Change:
    """One line of the plan: ``+`` create, ``~`` update in place, ``-/+`` reissue, ``-`` retire."""

    symbol: str
    subject: str
    reason: str

    def line(self) -> str:
        """As printed: ``+ global/server-1 (server)``."""
        return f"{self.symbol:>3} {self.subject}" + (f" ({self.reason})" if self.reason else "")


@dataclass
class Work:
    """What to do to one member."""

    member: Member
    plan: Plan = field(repr=False)
    kind: Kind = "create"
    reason: str = ""
    current: Current | None = None
    new_key: bool = True
    _spec: CertSpec | None = field(default=None, repr=False, compare=False)

    @property
    def spec(self) -> CertSpec:
        """The certificate the plan wants, made when first asked and kept until :meth:`done`.

        Made when asked, not with the work: 10,000 kept specs cost memory.
        """
        if self._spec is None:
            self._spec = members.spec_for(self.plan, self.member)
        return self._spec

    def done(self) -> None:
        """Let the spec go once the member is written."""
        self._spec = None


@dataclass
class Diff:
    """Everything an apply will do, worked out before anything is written."""

    root: Path
    plan_sha256: str
    generations: list[cas.Generation]
    phase: state.Phase
    new_phase: state.Phase
    signing: int
    trusted: list[int]
    make_generation: int | None
    retire_generation: int | None
    work: list[Work]
    #: The plan manifest's records of the members that stay as they are (kept in a temporary
    #: file: memory stays flat however large the plan).
    unchanged: state.Records
    retire: list[str]
    make_gossip: bool
    #: Members whose folder is moved under retired/ whole and issued anew in its place: the
    #: plan moved them to another region or role (their files' names change).
    replace: list[str] = field(default_factory=list)
    previously_retired: list[str] = field(default_factory=list)
    remote: cas.RemoteCA | None = None
    #: Regions added to a plan with intermediates: the signing generation's root signs one
    #: for each before their leaves.
    add_intermediates: list[str] = field(default_factory=list)
    #: What the apply cannot change and the operator should know (printed after the summary).
    notes: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    wanted: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        """True when the apply would write nothing but (perhaps) the plan manifest."""
        return not self.changes

    def summary(self) -> str:
        """Terraform's closing line: counts, or an explicit "No changes."."""
        if self.empty:
            return "No changes. The tree matches the plan."
        add = sum(c.symbol == "+" for c in self.changes)
        change = sum(c.symbol in ("~", "-/+") for c in self.changes)
        gone = sum(c.symbol == "-" for c in self.changes)
        return f"Plan: {add} to add, {change} to change, {gone} to retire."


def root_of(plan: Plan, plan_path: Path) -> Path:
    """The tree's root: ``out`` relative to the plan file's folder."""
    return (plan_path.parent / plan.out).absolute()


def _phase_after(
    phase: state.Phase, generations: list[int], *, rotate: bool
) -> tuple[state.Phase, int | None, int | None]:
    """The phase this apply leaves the tree in, and the generation it makes or retires."""
    if not generations:
        return "steady", 1, None
    if not rotate:
        return phase, None, None
    if phase == "steady":
        return "trust-both", generations[-1] + 1, None
    if phase == "trust-both":
        return "new-leaves", None, None
    return "steady", None, generations[0]


def _trust(
    numbers: list[int], phase: state.Phase, make_gen: int | None, retire_gen: int | None
) -> tuple[list[int], int]:
    """The generations every bundle trusts after this apply, and the one that signs."""
    if make_gen is not None:
        return [*numbers, make_gen], numbers[-1] if numbers else make_gen
    if phase == "steady":
        trusted = [n for n in numbers if n != retire_gen]
        return trusted, trusted[-1]
    return numbers, numbers[-1] if phase == "new-leaves" else numbers[0]


def _current_phase(recorded: state.PlanManifest | None, numbers: list[int]) -> state.Phase:
    if len(numbers) <= 1:
        return "steady"
    if len(numbers) > 2:
        raise VerificationError(
            f"{cas.CA_ROOT}/", f"holds {len(numbers)} CA generations; a rotation has two at most"
        )
    if recorded is not None and recorded.phase != "steady":
        return recorded.phase
    return "trust-both"  # two CAs and no record of a phase: trust both, sign with the older


def diff(
    plan: Plan,
    plan_path: Path,
    *,
    renew_within: timedelta | None = None,
    keep_key: bool = False,
    rotate: bool = False,
    remote: cas.RemoteCA | None = None,
    now: datetime | None = None,
) -> Diff:
    """Compare the plan with its tree and list what an apply would do; writes nothing.

    ``remote``: a central signer issues the leaves; the tree trusts its CA and has none of its
    own (the plan's ``ca`` settings are the signer's business then).

    Raises:
        InputError: a member's names, a rotation asked for while one cannot start, or a
            signer for a tree that has its own CA.
        ConflictError: a member's folder changed on disk since cfwrap wrote it.
        VerificationError: the tree's CA or plan manifest is damaged.
    """
    now = now or datetime.now(UTC)
    root = root_of(plan, plan_path)
    check_out(plan, root)
    plan_sha = members.pem_hash(files.read_input(plan_path))
    recorded = state.load(root)
    generations = cas.find(root)
    numbers = [g.number for g in generations]
    resumed = _cut_short_rotation(recorded, numbers) if rotate and remote is None else None
    finishing = phase_3_cut_short(root, recorded, numbers) if remote is None else None
    _check_generations(root, recorded, generations, remote=remote, resumed=resumed)
    _refuse_changed_cas(generations, recorded)
    _refuse_case_renames(plan, root, generations)
    if remote is not None:
        _remote_fits(generations, rotate=rotate)
        generations = [remote.generation(root)]
        numbers = [cas.SIGNER_GENERATION]
        _refuse_another_signer(recorded, generations[0])
    if rotate and not numbers:
        raise InputError("--rotate-ca", "the tree has no CA yet", fix="run apply without it first")
    phase, new_phase, make_gen, retire_gen = _phases(
        recorded, numbers, rotate, resumed, finishing=finishing
    )
    trusted, signing = _trust(numbers, new_phase, make_gen, retire_gen)
    result = Diff(
        root=root,
        plan_sha256=plan_sha,
        generations=generations,
        phase=phase,
        new_phase=new_phase,
        signing=signing,
        trusted=trusted,
        make_generation=make_gen,
        retire_generation=retire_gen,
        work=[],
        unchanged=state.Records(),
        retire=[],
        make_gossip=plan.gossip and not (root / GOSSIP_FILE).exists(),
        previously_retired=_previously_retired(root, recorded),
        remote=remote,
    )
    _ca_changes(plan, result, resumed=resumed)
    try:
        _diff_members(plan, result, renew_within=renew_within, keep_key=keep_key, now=now)
    except BaseException:
        result.unchanged.close()
        raise
    issuing = [
        w
        for w in result.work
        if w.kind != "update" and w.member.region not in result.add_intermediates
    ]
    if issuing and make_gen != signing and remote is None:
        by_number = {g.number: g for g in generations}
        _check_signer_outlives(plan, by_number[signing], issuing, now)
    for relative in _existing_members(root):
        if relative not in result.wanted:
            result.retire.append(relative)
            result.changes.append(
                Change("-", relative.removeprefix(f"{NODES}/"), "not in the plan")
            )
    return result


def _ca_changes(plan: Plan, result: Diff, *, resumed: int | None) -> None:
    """Add the CA's and the gossip key's changes (and notes) to ``result``."""
    make_gen, retire_gen, signing = result.make_generation, result.retire_generation, result.signing
    if make_gen is not None:
        what = "a new CA" if result.generations else "the CA"
        result.changes.append(Change("+", f"ca gen-{make_gen}", what))
    if resumed is not None:
        result.changes.append(
            Change("~", f"ca gen-{resumed}", "made by a phase 1 that stopped; it goes on now")
        )
    if retire_gen is not None:
        result.changes.append(Change("-", f"ca gen-{retire_gen}", "the old CA, after rotation"))
    if result.make_gossip:
        result.changes.append(Change("+", GOSSIP_FILE, "the servers' gossip key"))
    if result.remote is not None:
        _signer_ca_change(result)
    if make_gen == signing or result.remote is not None:
        return
    by_number = {g.number: g for g in result.generations}
    result.add_intermediates = cas.missing_intermediates(plan, by_number[signing])
    cas.check_root_key(by_number[signing], result.add_intermediates)
    for region in result.add_intermediates:
        result.changes.append(
            Change("+", f"ca gen-{signing} {region}", "an intermediate CA for a new region")
        )
    # During a rotation the newest generation, made from the plan, is not yet signing.
    drift = _ca_drift(plan, by_number[signing]) if signing == max(by_number) else []
    if drift:
        result.notes.append(
            f"The plan's ca settings differ from CA gen-{signing} ({'; '.join(drift)}): a CA "
            "cannot change, so they take effect with the next rotation (apply --rotate-ca)."
        )


def _signer_ca_change(result: Diff) -> None:
    """Put back (or replace) the signer's CA the tree keeps, when it is not ``--ca``'s.

    Written only after the signer has answered over TLS verified with ``--ca``; with nothing
    to issue, every leaf of the tree is already signed by ``--ca``'s CA (else it would be
    reissued), which proves it as well.
    """
    assert result.remote is not None  # noqa: S101 (caller checked)
    path = result.root / cas.CA_ROOT / cas.SIGNER_FOLDER / "ca.pem"
    if path.is_symlink() or (path.exists() and not files.is_regular(path)):
        why = "is a symlink" if path.is_symlink() else files.why_not_regular(path).partition(";")[0]
        raise ConflictError(
            path, why, fix="remove it; apply --remote writes the signer's CA there from --ca"
        )
    try:
        if files.read_input(path) == result.remote.ca_pem:
            return
        symbol = "~"
    except FileNotFoundError:
        symbol = "+"
    result.changes.append(Change(symbol, "ca signer", "the signer's CA, from --ca"))


def _ca_drift(plan: Plan, generation: cas.Generation) -> list[str]:
    """Where the plan's ``ca`` settings (and key) differ from a generation that exists."""
    from cfwrap.models import parse_duration

    facts = generation.root.facts
    drift = []
    name = f"{plan.ca.common_name} {generation.number}"
    if facts.common_name != name:
        drift.append(f"its name is {facts.common_name!r}, the plan's would be {name!r}")
    lifetime = facts.not_after - facts.not_before
    if abs(lifetime - parse_duration(plan.ca.expiry)) > timedelta(days=1):
        drift.append(f"it lives {lifetime.days} days, ca.expiry says {plan.ca.expiry}")
    if plan.ca.intermediates != bool(generation.intermediates):
        drift.append(
            "it has intermediates, the plan has none"
            if generation.intermediates
            else "its root signs the leaves, the plan wants intermediates"
        )
    if (facts.key.algorithm, facts.key.size) != (plan.key.algo, plan.key.size):
        drift.append(f"its key is {facts.key.algorithm} {facts.key.size}, the plan's "
                     f"{plan.key.algo} {plan.key.size}")  # fmt: skip
    want = parse_duration(plan.ca.intermediate_expiry)
    lives = {
        r: ca.facts.not_after - ca.facts.not_before for r, ca in generation.intermediates.items()
    }
    odd = sorted(r for r, life in lives.items() if abs(life - want) > timedelta(days=1))
    if plan.ca.intermediates and odd:
        drift.append(
            f"its intermediate of {odd[0]} lives {lives[odd[0]].days} days, "
            f"ca.intermediate_expiry says {plan.ca.intermediate_expiry}"
        )
    return drift


def _diff_members(
    plan: Plan,
    result: Diff,
    *,
    renew_within: timedelta | None,
    keep_key: bool,
    now: datetime,
) -> None:
    """Add each member's work (or its place among the unchanged) to ``result``.

    Raises:
        ConflictError: a member's folder changed on disk since cfwrap wrote it.
    """
    root, signing, remote = result.root, result.signing, result.remote
    make_gen = result.make_generation
    signers = {g.number: g for g in result.generations}
    configs = Configs(plan, root=root, gossip_key=_gossip_key(plan, root))
    changed: list[str] = []
    ahead: list[str] = []  # members a phase 2 that stopped had already reissued
    holders: dict[str, str] = {}  # certificate fingerprint -> the first member holding it
    shared: list[tuple[str, str]] = []
    # A bundle holding a CA made by this apply cannot be known yet; it differs from every one.
    bundle = None if make_gen is not None else cas.bundle(result.generations, result.trusted)
    for member in plan.members():
        spec = members.spec_for(plan, member)
        result.wanted.add(member.folder)
        folder = root / member.folder
        if not folder.exists():
            result.work.append(Work(member, plan, "create", member.role))
            result.changes.append(Change("+", member.label, member.role))
            continue
        current = members.read_current(folder, spec)
        if current.changed:
            changed.append(f"{member.folder}: {current.changed[0]}")
            continue
        if current.renamed is not None:
            result.work.append(Work(member, plan, "create", member.role))
            result.replace.append(member.folder)
            result.changes.append(
                Change(
                    "-/+",
                    member.label,
                    f"{moved_reason(current.renamed, spec)}; its folder is retired",
                )
            )
            continue
        if current.facts is not None:
            first = holders.setdefault(current.facts.fingerprint_sha256, member.folder)
            if first != member.folder:
                shared.append((member.folder, first))
        new_gossip = result.make_gossip and member.role == "server"
        work = _member_work(
            plan,
            member,
            spec,
            current,
            signer=None
            if make_gen == signing or member.region in result.add_intermediates
            else signers[signing].signer(member.region),
            signer_name=f"gen-{signing}",
            bundle=bundle,
            config=None if new_gossip else configs.text(member, spec),
            # A signer sets the lifetime itself (its --expiry), whatever the plan says.
            lifetime=remote is None,
            renew_within=renew_within,
            keep_key=keep_key,
            now=now,
        )
        if work is not None and work.kind == "reissue" and _ahead_of_phase(result, member, current):
            ahead.append(member.label)
            continue
        if work is None:
            assert current.facts is not None  # noqa: S101 (read_current refuses it otherwise)
            record = members.record(member, current.facts, current.hashes, generation=signing)
            result.unchanged.put(member.folder, state.record_json(record))
        else:
            result.work.append(work)
            symbol = "~" if work.kind == "update" else "-/+"
            result.changes.append(Change(symbol, member.label, work.reason))
    _refuse_changed(root, changed)
    _refuse_ahead_or_shared(root, ahead, shared, newest=max(signers, default=0))
    if result.make_gossip:
        _refuse_new_gossip_key(root, servers_holding_a_key(root))


def _refuse_ahead_or_shared(
    root: Path, ahead: list[str], shared: list[tuple[str, str]], *, newest: int
) -> None:
    """Refuse leaves a stopped phase 2 reissued, and two members holding one certificate.

    Raises:
        VerificationError: ``ahead`` (run ``apply --rotate-ca`` to finish phase 2).
        ConflictError: ``shared``.
    """
    if ahead:
        raise VerificationError(
            ahead[0],
            f"is already signed by CA gen-{newest}"
            + (f" (and {len(ahead) - 1} more)" if len(ahead) > 1 else "")
            + ": a rotation's phase 2 stopped before it was recorded (a plain apply would reissue "
            "it under the old CA)",
            fix="run apply --rotate-ca to finish phase 2",
        )
    if shared:
        later, first = shared[0]
        raise ConflictError(
            root / first,
            f"holds the same certificate (and so the same key) as {later}: no two nodes may "
            "share a key",
            fix="move the copy away so that apply issues it anew (`cfwrap status` names the "
            "one the plan manifest does not record)",
        )


def _ahead_of_phase(result: Diff, member: Member, current: Current) -> bool:
    """The member is signed by the newer of two CAs while the tree still signs with the older.

    Only a rotation's phase 2 issues such leaves; stopped before it recorded the phase, it
    leaves some done. A plain apply (or a renewal) must not take them back to the old CA.
    """
    if result.phase != "trust-both" or result.new_phase != "trust-both" or current.cert is None:
        return False
    newest = max(result.generations, key=lambda g: g.number)
    if newest.number == result.signing:
        return False
    try:
        signer = newest.signer(member.region)
    except VerificationError:
        return False
    return parsers.is_issued_by(current.cert, signer.cert)


def moved_reason(held: str, spec: CertSpec) -> str:
    """Why a member whose folder holds another region's or role's certificate is issued anew."""
    return f"it holds {held}, the plan now gives it {Names.of(spec).cert}"


def _refuse_changed_cas(
    generations: list[cas.Generation], recorded: state.PlanManifest | None
) -> None:
    """Refuse a tree whose CA folders changed on disk: their bundles and keys sign and trust.

    Raises:
        ConflictError: the first change, named (a foreign CA appended to ca.pem, a key's mode).
    """
    for generation in generations:
        for region, why in cas.changed_on_disk(generation, recorded).items():
            folder = generation.folder if region == "-" else generation.folder / region
            mode = " mode " in why or "has mode" in why
            raise ConflictError(
                folder,
                f"changed on disk since cfwrap wrote it: {why}",
                fix=("chmod it back to what its manifest says" if mode else "restore it from a "
                     "backup") + "; every member's bundle and signature comes from it",
            )  # fmt: skip


def _refuse_case_renames(plan: Plan, root: Path, generations: list[cas.Generation]) -> None:
    """Refuse a plan region that differs only in case from one the tree already has.

    Go compares names without case: ``server.EU.nomad`` passes as ``server.eu.nomad``, so the
    two would be one region to Nomad with two intermediates, and on a file system that ignores
    case their folders would be one.

    Raises:
        ConflictError: such a region.
    """
    have = set()
    if (root / NODES).is_dir():  # a region's folder that its retired members left empty: no
        have |= {p.name for p in (root / NODES).iterdir() if p.is_dir() and any(p.iterdir())}
    for generation in generations:
        have |= set(generation.intermediates)
    for region in plan.regions:
        other = next((h for h in sorted(have) if h != region and h.lower() == region.lower()), None)
        if other is not None:
            raise ConflictError(
                root,
                f"the tree's region {other!r} and the plan's {region!r} differ only in case; "
                "Go's name checks ignore case, so they would pass for one region",
                fix=f"name it {other!r} in the plan: to Nomad it is the same region",
            )


#: A gossip key set in an agent file (a path may hold the word "encrypt" too).
_ENCRYPT = re.compile(rb"^\s*encrypt\s*=", re.MULTILINE)


def servers_holding_a_key(root: Path) -> list[str]:
    """The server folders on disk whose agent file holds a gossip key (in the plan or not)."""
    holding = []
    for relative in _existing_members(root):
        folder = root / relative
        for hcl in sorted(folder.glob("*-server.hcl")):
            if hcl.is_file() and not hcl.is_symlink() and _ENCRYPT.search(files.read_input(hcl)):
                holding.append(relative.removeprefix(f"{NODES}/"))
                break
    return holding


def _refuse_new_gossip_key(root: Path, keyed: list[str]) -> None:
    """Refuse to make a gossip key when the tree's servers hold one already.

    ``gossip.key`` went missing: a new one would be written into every server's agent file,
    the running cluster's key would be gone from the tree, and servers set up from it later
    would not join (Nomad seeds its keyring from ``encrypt`` once, and keeps it).

    Raises:
        ConflictError: ``keyed`` (servers with a key in their agent file) is not empty.
    """
    if keyed:
        raise ConflictError(
            root / GOSSIP_FILE,
            f"is missing, but {len(keyed)} servers' agent files hold the cluster's gossip key "
            f"(the first: {keyed[0]}); a new one would not reach the running cluster",
            fix="restore it (it is the encrypt value in a server's HCL under nodes/); to change "
            "the key, rotate it with nomad operator gossip keyring, then write it there",
        )


def _phases(
    recorded: state.PlanManifest | None,
    numbers: list[int],
    rotate: bool,
    resumed: int | None,
    *,
    finishing: int | None = None,
) -> tuple[state.Phase, state.Phase, int | None, int | None]:
    """The phase now, the one this apply leaves, and the generation it makes or retires.

    ``resumed``: the CA a stopped phase 1 made; ``finishing``: the old CA a stopped phase 3
    had already retired. Either way this apply finishes that phase, with or without
    ``--rotate-ca`` (which would otherwise start the next one).
    """
    if resumed is not None:  # phase 1 made its CA, then stopped: this run finishes phase 1
        return "steady", "trust-both", None, None
    if finishing is not None:
        return "new-leaves", "steady", None, None
    phase = _current_phase(recorded, numbers)
    return (phase, *_phase_after(phase, numbers, rotate=rotate))


def _cut_short_rotation(recorded: state.PlanManifest | None, numbers: list[int]) -> int | None:
    """The CA generation a rotation's phase 1 made before it stopped, unrecorded; else None.

    Phase 1 makes the next generation first and records it last, with the bundles. Cut short
    between the two (Ctrl-C, a member's folder locked), the tree holds one recorded generation
    in the steady phase and the next one, unrecorded: ``apply --rotate-ca`` again finishes
    phase 1 with it instead of refusing it as placed by hand.
    """
    if recorded is None or recorded.phase != "steady" or len(numbers) != 2:
        return None
    known = {ca.generation for ca in recorded.cas}
    old, new = numbers
    return new if old in known and new not in known and new == old + 1 else None


def _check_generations(
    root: Path,
    recorded: state.PlanManifest | None,
    generations: list[cas.Generation],
    *,
    remote: cas.RemoteCA | None,
    resumed: int | None = None,
) -> None:
    """Refuse CA folders that disagree with the plan manifest, and a signer's tree without it.

    Only ``apply`` makes a CA generation, and it records each one; a generation the manifest
    does not know (or knows with another certificate) was placed or swapped by hand, and would
    change what every node trusts.

    Raises:
        InputError: a signer's tree applied without ``--remote``.
        VerificationError: a generation unknown to the manifest, or another CA in its folder;
            two generations and no manifest (the rotation's phase is unknown).
    """
    signer = recorded.signer if recorded is not None else None
    if remote is None and (signer or (root / cas.CA_ROOT / cas.SIGNER_FOLDER).exists()):
        raise InputError(
            str(root),
            f"this tree is issued by a central signer ({signer or 'ca/signer/'}); a plain "
            "apply would make a CA of its own and reissue every member",
            fix="pass --remote HOST:PORT --auth-dir DIR --ca FILE as before",
        )
    if recorded is None:
        if len(generations) > 1:
            raise VerificationError(
                str(root / state.FILE_NAME),
                "missing, and the tree holds two CA generations: the rotation's phase is unknown",
                fix="restore plan-manifest.json from a backup",
            )
        return
    known = {ca.generation: ca.fingerprint_sha256 for ca in recorded.cas}
    for generation in generations:
        fingerprint = generation.root.facts.fingerprint_sha256
        if generation.number == resumed:
            continue
        if generation.number not in known:
            raise VerificationError(
                str(generation.folder),
                "is not in plan-manifest.json: placed by hand, or a rotation cut short",
                fix="if a rotation's phase 1 stopped, run apply --rotate-ca again to finish it; "
                "else move it away",
            )
        if known[generation.number] != fingerprint:
            raise VerificationError(
                str(generation.folder),
                "holds another CA than plan-manifest.json records",
                fix="restore the CA folder from a backup",
            )
    lost = missing_cas(root, recorded, generations)
    if lost:
        raise VerificationError(
            str(root / cas.CA_ROOT / lost[0]),
            "is missing, but plan-manifest.json records it: apply would make a new CA in its "
            "place, and the nodes it serves would trust only that one",
            fix="put it back",
        )


def missing_cas(
    root: Path, recorded: state.PlanManifest | None, generations: list[cas.Generation]
) -> list[str]:
    """The CAs the plan manifest records that are gone from ``ca/``: ``gen-N``, ``gen-N/<region>``.

    Not the central signer's (it has no folder of its own), and not the old generation that a
    rotation's phase 3 had already moved under retired/ when it stopped before recording it.
    """
    if recorded is None:
        return []
    present = {g.number: g for g in generations}
    cut_short = phase_3_cut_short(root, recorded, sorted(present))
    lost = []
    for ca in recorded.cas:
        generation = present.get(ca.generation)
        if generation is not None:
            lost += [
                f"gen-{ca.generation}/{r}"
                for r in ca.intermediates
                if r not in generation.intermediates
            ]
        elif ca.generation not in (cas.SIGNER_GENERATION, cut_short):
            lost.append(f"gen-{ca.generation}")
    return lost


def phase_3_cut_short(
    root: Path, recorded: state.PlanManifest | None, numbers: list[int]
) -> int | None:
    """The old generation a rotation's phase 3 retired before it could record so; else None.

    Phase 3 moves the old CA under retired/ last and writes the plan manifest after: a stop
    between the two leaves the manifest in ``new-leaves`` with two generations, one of them
    (the older) gone from ``ca/`` and kept under ``retired/<stamp>/ca/``.
    """
    if recorded is None or recorded.phase != "new-leaves" or len(recorded.cas) != 2:
        return None
    old, new = sorted(c.generation for c in recorded.cas)
    if numbers == [new] and _retired_generation(root, old):
        return old
    return None


def _retired_generation(root: Path, number: int) -> bool:
    """True when ``retired/<stamp>/ca/ca/gen-<number>`` is a folder (no symlinks followed)."""
    return any(
        f"{cas.CA_ROOT}/gen-{number}" in _real_folders(root / RETIRED / stamp / "ca", depth=2)
        for stamp in filter(_STAMP.fullmatch, _real_folders(root / RETIRED))
        if not (root / RETIRED / stamp / "ca").is_symlink()
    )


def _remote_fits(generations: list[cas.Generation], *, rotate: bool) -> None:
    """Refuse a signer where the tree has its own CA, and a rotation of the signer's CA.

    Raises:
        InputError: either.
    """
    if rotate:
        raise InputError(
            "--rotate-ca with --remote",
            "a central signer's CA is rotated at the signer, not by a plan",
            fix="drop --rotate-ca",
        )
    if generations:
        raise InputError(
            "--remote",
            f"this tree has its own CA ({generations[0].relative}); a tree is issued by its "
            "own CA or by a signer, not both",
            fix="give the plan a new out for the signer's tree",
        )


def _refuse_another_signer(recorded: state.PlanManifest | None, given: cas.Generation) -> None:
    """Refuse a signer's CA other than the one the tree was issued by.

    Every member would be reissued under it at once, each bundle trusting it alone: nodes
    not yet given their new files would refuse those that were (a rotation without its
    phases). Mostly it is a wrong ``--ca`` (or ``--remote``).

    Raises:
        InputError: ``--ca`` is not the signer's CA the plan manifest records.
    """
    known = next(
        (c for c in (recorded.cas if recorded else []) if c.generation == cas.SIGNER_GENERATION),
        None,
    )
    if known is None or known.fingerprint_sha256 == given.root.facts.fingerprint_sha256:
        return
    raise InputError(
        "--ca",
        f"is not the CA this tree was issued by ({given.root.facts.subject}, sha256 "
        f"{given.root.facts.fingerprint_sha256[:16]}...; plan-manifest.json records sha256 "
        f"{known.fingerprint_sha256[:16]}...): every member would be reissued under it at "
        "once, and nodes still on the old CA would refuse the new ones",
        fix="give the signer and CA this tree was issued by; for a signer whose CA changed, "
        "give the plan a new out and move the nodes over to that tree",
    )


def _gossip_key(plan: Plan, root: Path) -> str | None:
    """The servers' gossip key, when the plan wants one and the tree has it.

    Raises:
        VerificationError: the key file holds no valid key.
    """
    path = root / GOSSIP_FILE
    if not plan.gossip or not path.exists():
        return None
    key = files.read_input_text(path).strip()
    try:
        gossip.check(key)
    except ValueError as e:
        raise VerificationError(
            str(path), str(e), fix="restore it (the encrypt value of a server's HCL under nodes/)"
        ) from None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != files.SECRET_MODE:
        raise ConflictError(
            path,
            f"has mode 0{mode:03o}, but it holds the servers' shared secret",
            fix="chmod 600 it",
        )
    return key


def _refuse_changed(root: Path, changed: list[str]) -> None:
    """Refuse to touch a tree in which a member's folder changed since cfwrap wrote it.

    Raises:
        ConflictError: naming the first such folder and how many more there are.
    """
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        why = changed[0].partition(": ")[2]
        if why == members.CUT_SHORT:  # a dry run, or status: only apply may put it back
            raise ConflictError(
                root / changed[0].partition(":")[0],
                f"{why}{more}",
                fix="run the apply itself: it puts the folder back first, then compares it",
            )
        raise ConflictError(
            root / changed[0].partition(":")[0],
            f"changed on disk since cfwrap wrote it: {why}{more}",
            fix="restore it (a mode: chmod it back to what its manifest says), or move the folder "
            "away so that apply issues it anew",
        )


def _check_signer_outlives(
    plan: Plan, generation: cas.Generation, work: list[Work], now: datetime
) -> None:
    """Refuse to issue leaves that would outlive the CA that signs them (cfssl does not cap).

    Raises:
        InputError: the signing CA (or a region's intermediate) expires first.
    """
    from cfwrap.models import parse_duration

    ends = now + parse_duration(plan.leaf_expiry)
    for region in dict.fromkeys(w.member.region for w in work):
        signer = generation.signer(region)
        if signer.facts.not_after < ends:
            raise InputError(
                f"CA gen-{generation.number}" + (f" ({region})" if signer.chain_pem else ""),
                f"expires on {signer.facts.not_after:%Y-%m-%d}, before certificates issued "
                f"now would (leaf_expiry {plan.leaf_expiry})",
                fix="rotate the CA first (cfwrap apply PLAN --rotate-ca), or shorten leaf_expiry",
            )


def _member_work(
    plan: Plan,
    member: Member,
    spec: CertSpec,
    current: Current,
    *,
    signer: cas.Signer | None,
    signer_name: str,
    bundle: bytes | None,
    config: bytes | None,
    lifetime: bool,
    renew_within: timedelta | None,
    keep_key: bool,
    now: datetime,
) -> Work | None:
    """What one existing member needs, if anything."""
    assert current.facts is not None  # noqa: S101 (read_current refuses a folder without it)
    if signer is None:  # the signing CA is made by this apply
        return Work(member, plan, "reissue", "the new CA signs it", current)
    reason = members.why_reissue(
        spec, current, signer=signer.cert, signer_name=signer_name, lifetime=lifetime
    )
    if reason is not None:
        return Work(member, plan, "reissue", reason, current)
    left = current.facts.not_after - now
    if renew_within is not None and left < renew_within:
        days = left / timedelta(days=1)
        why = f"expires in {days:.0f} days" if days >= 0 else f"expired {-days:.0f} days ago"
        return Work(member, plan, "renew", why, current, new_key=not keep_key)
    if current.cert_pem is not None and not _chain_matches(current.cert_pem, signer.chain_pem):
        return Work(member, plan, "renew", "its chain file lacks the intermediate", current, False)
    changes = []
    if bundle is None or current.bundle != bundle:
        changes.append("the CA bundle changes")
    if config is None or current.config != config:
        changes.append(
            "its " + ("environment file" if member.role == "cli" else "agent HCL") + " changes"
        )
    if changes:
        return Work(member, plan, "update", "; ".join(changes), current)
    return None


def _chain_matches(cert_pem: bytes, chain_pem: bytes) -> bool:
    """The certificate file holds the leaf followed by exactly ``chain_pem``."""
    marker = b"-----END CERTIFICATE-----"
    end = cert_pem.find(marker)
    return cert_pem[end + len(marker) :].strip() == chain_pem.strip()


def _existing_members(root: Path) -> Iterator[str]:
    """Member folders on disk: ``nodes/<region>/<name>`` and ``operators/<name>``."""
    nodes = root / NODES
    if nodes.is_dir():
        for region in sorted(nodes.iterdir()):
            if region.is_dir() and not region.is_symlink():
                for node in sorted(region.iterdir()):
                    if node.is_dir() and not node.is_symlink():
                        yield f"{NODES}/{region.name}/{node.name}"
    operators = root / OPERATORS
    if operators.is_dir():
        for person in sorted(operators.iterdir()):
            if person.is_dir() and not person.is_symlink():
                yield f"{OPERATORS}/{person.name}"


# --- carrying it out -------------------------------------------------------------------------


@dataclass
class Outcome:
    """What an apply did."""

    diff: Diff
    steps: list[str]
    manifest_written: bool


def _previously_retired(root: Path, recorded: state.PlanManifest | None) -> list[str]:
    """What earlier runs moved under retired/: the plan manifest's list, then any it lacks.

    A run that failed after moving folders there (a later write refused, a full disk) ended
    before it could record them; the folders themselves are the record that survives. Only
    the shapes a run makes count (``<stamp>/removed/nodes/<region>/<node>``,
    ``<stamp>/removed/operators/<name>``, ``<stamp>/ca/ca/gen-N``), and no symlink is followed.
    """
    listed = list(recorded.retired) if recorded is not None else []
    known = set(listed)
    shapes = (("removed", NODES, 2), ("removed", OPERATORS, 1), ("ca", cas.CA_ROOT, 1))
    for stamp in filter(_STAMP.fullmatch, _real_folders(root / RETIRED)):
        for why, top, depth in shapes:
            if (root / RETIRED / stamp / why).is_symlink():
                continue
            for found in _real_folders(root / RETIRED / stamp / why / top, depth=depth):
                relative = f"{RETIRED}/{stamp}/{why}/{top}/{found}"
                if relative not in known and (why != "ca" or cas.is_generation(found)):
                    listed.append(relative)
    return listed


def _real_folders(folder: Path, *, depth: int = 1) -> list[str]:
    """The folders ``depth`` levels down in ``folder`` ("a/b" for two), sorted; no symlinks."""
    if folder.is_symlink():
        return []
    try:
        entries = sorted(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    if depth == 1:
        return entries
    return [f"{e}/{below}" for e in entries for below in _real_folders(folder / e, depth=depth - 1)]


#: A run's folder under retired/ (:func:`_retired_folder`).
_STAMP = re.compile(r"[0-9]{8}T[0-9]{6}Z(-[0-9]+)?")


def _retired_folder(root: Path, now: datetime) -> str:
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    relative, n = f"{RETIRED}/{stamp}", 1
    while (root / relative).exists():
        n += 1
        relative = f"{RETIRED}/{stamp}-{n}"
    return relative


def apply(
    plan: Plan,
    plan_path: Path,
    *,
    cfssl_tool: Tool,
    renew_within: timedelta | None = None,
    keep_key: bool = False,
    rotate: bool = False,
    remote: cas.RemoteCA | None = None,
    workers: int = 4,
    wait: float = 0.0,
    progress: Progress | None = None,
) -> Outcome:
    """Bring the tree in line with the plan (see the module's docstring).

    Raises:
        InputError, ConflictError, VerificationError: see :func:`diff`.
        ToolFailedError: cfssl failed.
        FileSystemError: a write failed.
    """
    root = root_of(plan, plan_path)
    check_out(plan, root)
    with files.FolderLock(root, wait=wait):
        _check_root(root)
        _refuse_links(root)
        files.sweep_stages(root)
        for relative in _existing_members(root):
            members.recover(root / relative)
        result = diff(
            plan,
            plan_path,
            renew_within=renew_within,
            keep_key=keep_key,
            rotate=rotate,
            remote=remote,
        )
        made_root = not root.exists()
        if made_root:  # only now: a refused plan leaves no trace
            root.mkdir(mode=files.DIR_MODE)
        run = _Run(plan, result, cfssl_tool=cfssl_tool, workers=workers, progress=progress)
        try:
            run.go()
            written = state.write(root, run.plan_manifest(), run.member_records)
        except BaseException as e:  # a stop (Ctrl-C, SIGTERM) too: say what is on disk
            if made_root and not run.landed:  # nor does a first run that made nothing
                with contextlib.suppress(OSError):
                    root.rmdir()  # only if empty: its stage is gone by now
            if run.landed:
                e.add_note(
                    f"{run.landed} of the {len(result.changes)} changes had been made, each "
                    "whole (what a reissue replaced is under retired/); run the same apply "
                    "again to finish"
                )
            raise
        finally:
            run.records.close()
    return Outcome(result, rotation.steps(plan, result.new_phase, result), written)


#: A member's folder updated in place: the work, the files that change, its certificate.
_Update = tuple[Work, dict[str, tuple[bytes, int]], parsers.CertFacts]


def _refuse_links(root: Path) -> None:
    """Refuse a tree whose folders are symlinks: apply would write (keys too) where they point.

    Member folders and their files are checked as each is read (:func:`members.read_current`).

    Raises:
        ConflictError: the first symlink, named.
    """
    folders = [root / name for name in (NODES, OPERATORS, RETIRED, cas.CA_ROOT)]
    for sub in (root / NODES, root / cas.CA_ROOT, root / OPERATORS):
        if sub.is_dir() and not sub.is_symlink():
            folders += sorted(sub.iterdir())
    if (root / NODES).is_dir() and not (root / NODES).is_symlink():
        for region in sorted((root / NODES).iterdir()):
            if region.is_dir() and not region.is_symlink():
                folders += sorted(region.iterdir())
    for folder in folders:
        if folder.is_symlink():
            raise ConflictError(
                folder,
                "is a symlink; cfwrap never writes through one (keys would land where it points)",
                fix="replace it with the folder itself, or move it away",
            )


_T = TypeVar("_T")
#: How often a read waiting for an apply to end looks again.
_POLL = 0.1


def unwritten(root: Path, read: Callable[[], _T], *, wait: float = 0.0) -> _T:
    """``read()`` of the tree (status, a dry run) while no apply writes it.

    It takes no lock (a reader holding one would make an apply that does not wait fail): it
    waits up to ``wait`` seconds for an apply at work to end, and a read that an apply
    overlapped (one holding the lock at the end, or a plan manifest written meanwhile: what
    was read may be half the old tree and half the new) is read again while ``wait`` lasts.

    Raises:
        ConflictError: an apply writes the tree (after ``wait``), or wrote it during the read.
    """
    deadline = time.monotonic() + wait
    while True:
        while files.lock_held(root):
            if time.monotonic() >= deadline:
                raise ConflictError(
                    root,
                    "an apply is writing this tree now",
                    fix="run this again when it ends, or pass --wait SECONDS",
                )
            time.sleep(_POLL)
        before = _written(root)
        try:
            result = read()
        except CfwrapError:
            # What an apply half-way through looks like ("changed on disk ...") is no answer.
            if not _overlapped(root, before):
                raise
        else:
            if not _overlapped(root, before):
                return result
        if time.monotonic() >= deadline:
            raise ConflictError(
                root,
                "an apply wrote this tree while it was read",
                fix="run this again, or pass --wait SECONDS",
            )


def _overlapped(root: Path, before: tuple[int, int, int] | None) -> bool:
    """Whether an apply holds the tree now, or wrote its plan manifest since ``before``."""
    return files.lock_held(root) or _written(root) != before


def _written(root: Path) -> tuple[int, int, int] | None:
    """The plan manifest's inode, mtime and size: an apply that changed anything replaced it."""
    try:
        info = (root / state.FILE_NAME).stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def check_out(plan: Plan, root: Path, *, parent_needed: bool = True) -> None:
    """Refuse an ``out`` that apply cannot fill: a file on its way, no parent, not a tree.

    ``parent_needed=False`` (``status``): a parent folder that does not exist yet is no error.

    Raises:
        InputError: the parent folder does not exist.
        ConflictError: a file where a folder of the path should be, or see :func:`_check_root`.
    """
    try:
        parent = root.parent.stat()
    except FileNotFoundError:
        if not parent_needed:
            return
        raise InputError(
            f"out {plan.out!r}", f"{root.parent} is not an existing folder", fix="create it first"
        ) from None
    except NotADirectoryError:
        parent = None
    if parent is None or not stat.S_ISDIR(parent.st_mode):
        raise ConflictError(
            root.parent, "is not a folder", fix="point the plan's out at a folder"
        ) from None
    _check_root(root)


def _check_root(root: Path) -> None:
    """Refuse to fill a folder that holds something other than a plan's tree.

    Raises:
        ConflictError: ``root`` is a symlink or a file, or a non-empty folder with neither a
            plan manifest nor a CA of a plan.
    """
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise ConflictError(root, "is not a folder", fix="point the plan's out at a folder")
    if not root.exists() or (root / state.FILE_NAME).exists():
        return
    ca = root / cas.CA_ROOT
    if ca.is_dir() and (
        any(cas.is_generation(p.name) for p in ca.iterdir()) or (ca / cas.SIGNER_FOLDER).is_dir()
    ):
        return  # a tree whose first apply was cut short before its manifest
    if any(not files.is_stage(p.name) for p in root.iterdir()):
        raise ConflictError(
            root,
            "holds files, but no plan's tree (no plan-manifest.json, no ca/gen-N)",
            fix="point the plan's out at a new or empty folder",
        )


class _Run:
    """One apply's actions, in order: CA, gossip key, leaves, placing, retiring."""

    def __init__(
        self,
        plan: Plan,
        result: Diff,
        *,
        cfssl_tool: Tool,
        workers: int,
        progress: Progress | None,
    ) -> None:
        self.plan = plan
        self.d = result
        self.root = result.root
        self.tool = cfssl_tool
        self.workers = workers
        self.progress = progress
        self.now = datetime.now(UTC)
        self.retired = _retired_folder(self.root, self.now)
        self.tools = [manifest.tool_record(cfssl_tool)]
        self.checked: set[tuple[str, str, str]] = set()
        self._by_label: dict[str, Work] = {}
        self._kept: list[str] = []
        self.schema_checked = False
        self.retired_now: list[str] = []
        #: How many of the diff's changes are on disk, each whole (for a run cut short).
        self.landed = 0
        #: Each member's record in the plan manifest, as a line of JSON, by folder.
        self.records = result.unchanged

    def go(self) -> None:
        d = self.d
        if d.empty:
            return
        with files.TreeStaging(self.root) as stage:
            if d.make_generation is not None:
                made = cas.make(
                    self.plan, stage=stage, number=d.make_generation, cfssl_tool=self.tool
                )
                stage.sync()
                stage.place(made, self.root / made)
                self.landed += 1
                stage.settle(self.root / cas.CA_ROOT)
                d.generations = cas.find(self.root)
            if d.add_intermediates:
                self._add_intermediates(stage)
            # A new gossip key goes into the servers' HCL as they are staged, and into its file
            # once every certificate is issued: a run that fails before leaves none behind.
            made_key = gossip.generate(gossip.DEFAULT_SIZE) if d.make_gossip else None
            key = made_key or _gossip_key(self.plan, self.root)
            self.configs = Configs(self.plan, root=self.root, gossip_key=key)
            self.bundle = cas.bundle(d.generations, d.trusted)
            self.signing = {g.number: g for g in d.generations}[d.signing]
            updates = self._issue(stage)
            if d.remote is not None:  # only now: the signer has proved it is --ca's (TLS)
                self._keep_signer_ca(d.remote)  # first: it marks a first run's folder as a tree
            if made_key is not None:  # before any server folder that holds it is placed
                files.write_new(
                    self.root / GOSSIP_FILE, made_key.encode() + b"\n", mode=files.SECRET_MODE
                )
                self.landed += 1
            stage.sync()
            placed: list[Path] = []
            for relative in d.replace:  # out of the way of the member issued in its place
                self._retire(relative, "replaced", counted=False)  # counted when placed
            for work in d.work:
                if work.kind == "create":
                    target = self.root / work.member.folder
                    stage.place(work.member.folder, target)
                    self.landed += 1
                    placed.append(target.parent)
            for relative in self._kept:
                stage.place(relative, self.root / relative)
            for relative in d.retire:
                self._retire(relative, "removed")
            stage.settle(*placed)
        for work, new_files, facts in updates:
            self._update(work, new_files, facts)
            self.landed += 1
            work.done()
        if d.retire_generation is not None:
            self._retire(f"{cas.CA_ROOT}/gen-{d.retire_generation}", "ca")

    def _add_intermediates(self, stage: files.TreeStaging) -> None:
        """Give the signing generation an intermediate for each region added to the plan."""
        d = self.d
        generation = {g.number: g for g in d.generations}[d.signing]
        made = cas.add_intermediates(
            self.plan,
            stage=stage,
            generation=generation,
            regions=d.add_intermediates,
            cfssl_tool=self.tool,
        )
        stage.sync()
        for relative in made:
            stage.place(relative, self.root / relative)
            self.landed += 1
        stage.settle(generation.folder)
        d.generations = cas.find(self.root)

    def _issue(self, stage: files.TreeStaging) -> list[_Update]:
        """Sign every certificate the work needs; stage new folders, return in-place updates."""
        updates: list[_Update] = []
        by_region: dict[str, list[Work]] = {}
        for work in self.d.work:
            if work.kind == "update":
                assert work.current is not None and work.current.facts is not None  # noqa: S101
                updates.append((work, self._files(work, None, None), work.current.facts))
            else:
                by_region.setdefault(self._signer_key(work), []).append(work)
        total = sum(len(w) for w in by_region.values())
        config = signing_config(
            [members.spec_for(self.plan, w.member) for w in _one_per_role(self.d.work)]
        )
        self._done, self._total = 0, total
        for region_key, works in by_region.items():
            signer = self.signing.signer(region_key)
            shared = self._shared(works)
            if not shared:
                updates += self._sign(stage, signer, config, works, helper=None)
                continue
            rest = [w for w in works if w.kind != "create"]
            with shards.Claims(len(shared)) as claims:
                helper = shards.fork(self._child(stage, signer, config, shared, claims))
                try:
                    mine = itertools.chain(rest, _claimed(shared, claims, give_up=helper.failed))
                    updates += self._sign(stage, signer, config, mine, helper=helper)
                    for line in helper.join(on_wait=functools.partial(self._tick, helper)):
                        folder, _, data = line.partition("\t")
                        self.records.put(folder, data.encode())
                    self._done += helper.done()
                finally:
                    helper.stop()
                missing = [w.member.label for w in shared if w.member.folder not in self.records]
                if missing:  # every member is signed and staged by one process or the other
                    raise shards.HelperFailedError(
                        f"{len(missing)} new members were never signed (the first: {missing[0]})",
                        code=ExitCode.TOOL_FAILED,
                    )
        return updates

    def _shared(self, works: list[Work]) -> list[Work]:
        """The new members this process and a second one share, for a large plan; else none.

        One Python process is the bottleneck of a fleet's issuance (keys, requests, checks,
        files); a second one, with a cfssl of its own, uses the machine's other core. Only
        new members: they land in the shared stage, placed by this process afterwards. Each
        process takes the next few of them whenever it is free (:class:`shards.Claims`).
        """
        if self.d.remote is not None or (os.cpu_count() or 1) < 2:
            return []
        creates = [w for w in works if w.kind == "create"]
        return creates if len(creates) >= shards.MIN_SHARE else []

    def _child(
        self,
        stage: files.TreeStaging,
        signer: cas.Signer,
        config: SigningConfig,
        shared: list[Work],
        claims: shards.Claims,
    ) -> Callable[[shards.Report], Iterator[str]]:
        """What the second process runs: its claims of ``shared``; its records, as JSON lines."""

        def run(report: shards.Report) -> Iterator[str]:
            self.progress = None
            self.records = state.Records()
            self._done = 0
            mine = _claimed(shared, claims)
            self._sign(stage, signer, config, mine, helper=None, report=report)
            return (f"{folder}\t{data.decode()}" for folder, data in self.records.items())

        return run

    def _tick(self, helper: shards.Helper | None) -> None:
        if self.progress is not None:
            self.progress(self._done + (helper.done() if helper else 0), self._total)

    def _sign(
        self,
        stage: files.TreeStaging,
        signer: cas.Signer,
        config: SigningConfig,
        works: Iterable[Work],
        *,
        helper: shards.Helper | None,
        report: shards.Report | None = None,
    ) -> list[_Update]:
        """Sign ``works`` through one engine; stage new folders, return in-place updates."""
        updates: list[_Update] = []
        keys: dict[str, bytes] = {}
        with self._engine(signer, config) as engine:
            for request, cert_pem in engine.sign_all(self._requests(works, keys)):
                work = self._by_label.pop(request.label)
                key_pem = keys.pop(request.label)
                facts = self._check(work, cert_pem, signer)
                new_files = self._files(work, cert_pem + signer.chain_pem, key_pem)
                if work.kind == "create":
                    self._stage_new(stage, work, new_files, facts)
                else:
                    self._stage_replaced(stage, work, new_files)
                    updates.append((work, new_files, facts))
                work.done()
                self._done += 1
                if report is not None:
                    report(self._done)
                self._tick(helper)
        return updates

    def _engine(self, signer: cas.Signer, config: SigningConfig) -> _Engine:
        """What signs: a loopback ``cfssl serve`` for the tree's CA, or the central signer."""
        from cfwrap import issuer

        remote = self.d.remote
        if remote is None:
            return issuer.LocalSigner(
                self.tool,
                ca_cert_pem=signer.cert_pem,
                ca_key_pem=signer.key_pem,
                config=config,
                workers=self.workers,
            )
        from cfwrap.remote import NamedSigner, tls_context

        return NamedSigner(  # its failures name the signer, not cfssl
            remote.url,
            ca_name="--ca",
            auth_keys=remote.auth_keys,
            ssl_context=tls_context(remote.ca_pem),
            workers=self.workers,
        )

    def _keep_signer_ca(self, remote: cas.RemoteCA) -> None:
        """Keep the signer's CA in the tree (``ca/signer/ca.pem``), for ``status``."""
        path = self.root / cas.CA_ROOT / cas.SIGNER_FOLDER / "ca.pem"
        for folder in (path.parent.parent, path.parent):
            folder.mkdir(mode=files.DIR_MODE, exist_ok=True)
        try:
            if files.read_input(path) == remote.ca_pem:
                return
        except FileNotFoundError:
            pass
        files.write_replace(path, remote.ca_pem, mode=files.PUBLIC_MODE)
        self.landed += 1

    def _signer_key(self, work: Work) -> str:
        """Which of the signing generation's signers signs ``work`` ("": its root).

        Its region's intermediate when the generation has them: not the plan's
        ``ca.intermediates``, which the next rotation's CA follows.
        """
        intermediates = bool(self.signing.intermediates) and self.d.remote is None
        return work.member.region if intermediates else ""

    def _requests(self, works: Iterable[Work], keys: dict[str, bytes]) -> Iterator[SignRequest]:
        from cfwrap import keys as keymaker
        from cfwrap.issuer import SignRequest

        for work in works:
            if work.new_key or work.current is None or work.current.key_pem is None:
                key = keymaker.new_private_key(work.spec.key)
                # Not remembered as a secret to redact: a key made here only ever goes into its
                # file (cfssl sees the CSR), and 10,000 remembered keys cost memory and time.
                key_pem = keymaker.private_key_pem(key, remember=False)
            else:
                key_pem = work.current.key_pem
                key = parsers.load_private_key(key_pem)  # type: ignore[assignment]
            keys[work.member.folder] = key_pem
            self._by_label[work.member.folder] = work
            yield SignRequest(
                csr_pem=keymaker.csr_pem(key, work.spec.csr()),
                profile=work.spec.role,
                hosts=work.spec.hosts(),
                label=work.member.folder,
            )

    def _check(self, work: Work, cert_pem: bytes, signer: cas.Signer) -> parsers.CertFacts:
        """Refuse a certificate that is not exactly what the plan asked for.

        Every one is parsed and its names and usages checked here; its chain to the bundle and
        its key pairing are checked by the folder's manifest (:func:`_check_folder`). The first
        of each role and region from each CA also goes through Go's path validation and
        Nomad's role checks (:mod:`cfwrap.verify`): the rest differ from it only in names.
        """
        from cfwrap.kit import outlives_ca
        from cfwrap.nomad import certificate_problems

        cert = parsers.load_certificate(cert_pem)
        facts = parsers.certificate_facts(cert)
        problems = certificate_problems(work.spec, facts)
        if (outlives := outlives_ca(facts, parsers.certificate_facts(signer.cert))) is not None:
            problems.append(outlives)
        if problems:
            raise VerificationError(
                f"the certificate cfssl issued for {work.member.label}", "; ".join(problems)
            )
        once = (work.spec.role, work.spec.region, facts.issuer)
        if once not in self.checked:
            try:
                verify.check_issued(
                    cert,
                    roots=[signer.cert],
                    role=work.spec.role,
                    region=work.spec.region,
                    now=self.now,
                )
            except verify.VerifyError as e:
                raise VerificationError(
                    f"the certificate cfssl issued for {work.member.label}",
                    f"Go would refuse it ({e.rule}): {e.message} [{e.go_error}]",
                ) from None
            self.checked.add(once)
        return facts

    def _files(
        self, work: Work, cert_file: bytes | None, key_pem: bytes | None
    ) -> dict[str, tuple[bytes, int]]:
        """The member's folder content; for an update, only what changes."""
        names = Names.of(work.spec)
        new: dict[str, tuple[bytes, int]] = {BUNDLE: (self.bundle, files.PUBLIC_MODE)}
        if cert_file is not None:
            new[names.cert] = (cert_file, files.PUBLIC_MODE)
        if key_pem is not None:
            new[names.key] = (key_pem, files.SECRET_MODE)
        new[names.config] = (self.configs.text(work.member, work.spec), Configs.mode(work.member))
        if work.current is not None:
            old = {
                BUNDLE: work.current.bundle,
                names.cert: work.current.cert_pem,
                names.key: work.current.key_pem,
                names.config: work.current.config,
            }
            new = {k: v for k, v in new.items() if old.get(k) != v[0]}
        return new

    def _stage_new(
        self,
        stage: files.TreeStaging,
        work: Work,
        new: dict[str, tuple[bytes, int]],
        facts: parsers.CertFacts,
    ) -> None:
        relative = work.member.folder
        for name, (data, mode) in new.items():
            stage.write(f"{relative}/{name}", data, mode=mode)
        folder = files.StagedFolder(stage, relative)
        kit_manifest = manifest.build_written(new, self.tools)
        _check_folder(kit_manifest, work.member.label)
        self._write_manifest(folder.path, kit_manifest, into=folder)
        self._record(work.member, facts, kit_manifest)

    def _write_manifest(
        self,
        folder: Path,
        kit_manifest: manifest.Manifest,
        *,
        into: files.FileSet | files.StagedFolder,
    ) -> None:
        """Write a member's manifest; the first of the run is checked against the schema.

        Every member's manifest has the same shape and the model validated each; a schema
        check costs more than the rest of a member's work together.
        """
        manifest.write(folder, kit_manifest, into=into, check_schema=not self.schema_checked)
        self.schema_checked = True

    def _record(
        self, member: Member, facts: parsers.CertFacts, kit_manifest: manifest.Manifest
    ) -> None:
        """Index a member for the plan manifest (its files' hashes from its own manifest)."""
        hashes = {a.path: a.sha256 for a in kit_manifest.artifacts}
        self.records.put(
            member.folder,
            state.record_json(members.record(member, facts, hashes, generation=self.d.signing)),
        )

    def _stage_replaced(
        self, stage: files.TreeStaging, work: Work, new: dict[str, tuple[bytes, int]]
    ) -> None:
        """Keep what a reissue replaces (certificate, and the key when it changes)."""
        assert work.current is not None  # noqa: S101 (only existing members are replaced)
        names = Names.of(work.spec)
        old = {names.cert: work.current.cert_pem, names.key: work.current.key_pem}
        relative = f"{self.retired}/replaced/{work.member.folder}"
        kept = False
        for name, data in old.items():
            if name in new and data is not None:
                mode = files.SECRET_MODE if name == names.key else files.PUBLIC_MODE
                stage.write(f"{relative}/{name}", data, mode=mode)
                kept = True
        if kept:
            self._kept.append(relative)

    def _update(
        self, work: Work, new: dict[str, tuple[bytes, int]], facts: parsers.CertFacts
    ) -> None:
        """Replace a member's changed files and its manifest together."""
        folder = self.root / work.member.folder
        with files.FolderLock(folder, sweep_beside=False):
            batch = files.FileSet(folder, replace=True, later=(manifest.FILE_NAME,))
            for name, (data, mode) in new.items():
                batch.add(name, data, mode=mode)
            with batch:
                batch.apply()
                kit_manifest = manifest.build(folder, self.tools)
                _check_folder(kit_manifest, work.member.label)
                self._write_manifest(folder, kit_manifest, into=batch)
        self._record(work.member, facts, kit_manifest)

    def member_records(self) -> Iterator[bytes]:
        """Every member's record, in the plan's order."""
        for member in self.plan.members():
            yield self.records[member.folder]

    def plan_manifest(self) -> state.PlanManifest:
        """The plan manifest (its members apart: :meth:`member_records`), CAs on disk now."""
        remote = self.d.remote
        generations = cas.find(self.root) if remote is None else self.d.generations
        return state.PlanManifest(
            plan_sha256=self.d.plan_sha256,
            phase=self.d.new_phase,
            signer=remote.url if remote is not None else None,
            signing_generation=self.d.signing,
            trusted_generations=self.d.trusted,
            cas=[
                state.CARecord(
                    generation=g.number,
                    folder=g.relative,
                    subject=g.root.facts.subject,
                    serial=g.root.facts.serial,
                    fingerprint_sha256=g.root.facts.fingerprint_sha256,
                    not_after=g.root.facts.not_after,
                    intermediates={
                        r: ca.facts.fingerprint_sha256 for r, ca in g.intermediates.items()
                    },
                )
                for g in generations
            ],
            members=[],
            retired=[*self.d.previously_retired, *self.retired_now],
            tools=self.tools,
        )

    def _retire(self, relative: str, why: str, *, counted: bool = True) -> None:
        source = self.root / relative
        target = self.root / self.retired / why / relative
        self.retired_now.append(f"{self.retired}/{why}/{relative}")
        target.parent.mkdir(mode=files.DIR_MODE, parents=True, exist_ok=True)
        try:
            source.rename(target)
        except OSError as e:
            from cfwrap.errors import FileSystemError

            raise FileSystemError(source, e) from e
        self.landed += counted


def _claimed(
    shared: list[Work], claims: shards.Claims, *, give_up: Callable[[], bool] = lambda: False
) -> Iterator[Work]:
    """The members of ``shared`` this process claims, as it gets free for each next chunk.

    ``give_up``: asked before each claim; once true (the other process failed), claim no more.
    """
    for chunk in claims.take():
        if give_up():
            return
        yield from (shared[i] for i in chunk)


def _one_per_role(work: list[Work]) -> list[Work]:
    seen: dict[str, Work] = {}
    for one in work:
        seen.setdefault(one.member.role, one)
    return list(seen.values())


def _check_folder(kit_manifest: manifest.Manifest, label: str) -> None:
    """Refuse a member's folder whose certificate does not chain to its bundle or fit its key."""
    for artifact in kit_manifest.artifacts:
        cert = artifact.certificate
        if (
            cert is not None
            and not cert.is_ca
            and (not cert.chain_verified or not cert.key_pair_verified)
        ):
            raise VerificationError(
                f"{label}/{artifact.path}",
                "its chain to the CA bundle or its key pairing did not verify",
            )
