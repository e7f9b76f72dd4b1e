"""CA rotation in three phases, each one `cfwrap apply PLAN --rotate-ca`, judged by real handshakes.

The rotation is run once per CA layout; copies of member folders are taken between phases, as
the files a node would still hold when it has not yet taken the next phase's files.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from cfwrap.cli import main
from tests.test_plan import change_lines, load_cert, tree_state, write_plan
from tests.tlspeer import Party, handshake

PLAN = """\
out = "tree"
leaf_expiry = "720h"
operators = ["alice"]

[ca]
intermediates = {intermediates}

[regions.eu]
servers = 1
clients = 1
"""

SERVER, CLIENT = "nodes/eu/server-1", "nodes/eu/client-1"
MEMBERS = (SERVER, CLIENT, "operators/alice")


def run(*argv: str | Path) -> tuple[int, str]:
    """``cfwrap`` in-process, returning its exit code and what it printed on stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue() + err.getvalue()


@dataclass
class Rotation:
    """A tree taken through every phase, with what each step printed and left behind."""

    root: Path
    plan: Path
    intermediates: bool
    out: dict[str, str] = field(default_factory=dict)
    phase: dict[str, str] = field(default_factory=dict)
    saved: dict[str, Path] = field(default_factory=dict)
    state: dict[str, dict[str, tuple[str, int, int]]] = field(default_factory=dict)

    def save(self, step: str, member: str) -> None:
        """Copy a member's folder as it is now (what a node holds until it takes new files)."""
        target = self.root.parent / "saved" / step / member
        shutil.copytree(self.root / member, target)
        self.saved[f"{step}:{member}"] = target

    def record(self, step: str, text: str) -> None:
        self.out[step] = text
        data = json.loads((self.root / "plan-manifest.json").read_text())
        self.phase[step] = data["phase"]
        self.state[step] = tree_state(self.root)


@pytest.fixture(scope="module", params=[False, True], ids=["root", "intermediates"])
def rotation(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rotation:
    folder = tmp_path_factory.mktemp("rotation")
    plan = write_plan(folder, PLAN.format(intermediates=str(request.param).lower()))
    r = Rotation(folder / "tree", plan, request.param)
    code, text = run("apply", plan)
    assert code == 0, text
    r.record("start", text)
    for member in MEMBERS:
        r.save("start", member)
    last = "start"
    for step in ("phase1", "phase2", "phase3"):
        code, dry = run("apply", plan, "--rotate-ca", "--dry-run")
        assert code == 0, dry
        assert tree_state(r.root) == r.state[last], f"{step}: the dry run wrote"
        # It shows the phase's steps as what follows the real apply, never as done.
        assert "Dry run: nothing was made." in dry, dry
        assert " done: " not in dry, dry
        code, text = run("apply", plan, "--rotate-ca")
        assert code == 0, text
        assert change_lines(text) == change_lines(dry), step
        assert f"phase {step[-1]} of 3 done: " in text, text
        r.record(step, text)
        for member in MEMBERS:
            r.save(step, member)
        # A plain apply between phases changes nothing and says which phase comes next.
        code, plain = run("apply", plan)
        assert code == 0, plain
        assert plain.startswith("No changes"), plain
        r.out[f"{step}-plain"] = plain
        assert tree_state(r.root) == r.state[step], f"{step}: a plain apply wrote"
        last = step
    return r


def _roots(bundle: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle.read_bytes())


def _gen_root(r: Rotation, number: int) -> x509.Certificate:
    folder = r.root / "ca" / f"gen-{number}"
    if not folder.exists():  # retired by phase 3
        (folder,) = r.root.glob(f"retired/*/ca/ca/gen-{number}")
    return load_cert(folder / "ca.pem")


def _files(folder: Path, member: str) -> tuple[Path, Path]:
    role = "cli" if member.startswith("operators/") else member.rsplit("/", 1)[-1].split("-", 1)[0]
    return folder / f"eu-{role}-nomad.pem", folder / f"eu-{role}-nomad-key.pem"


def _party(folder: Path, member: str) -> Party:
    cert, key = _files(folder, member)
    return Party(cert, key, folder / "ca.pem")


def _signed_by_generation(r: Rotation, cert: x509.Certificate, number: int) -> bool:
    issuer_folder = r.root / "ca" / f"gen-{number}"
    if not issuer_folder.exists():
        (issuer_folder,) = r.root.glob(f"retired/*/ca/ca/gen-{number}")
    signer = issuer_folder / "eu" / "ca.pem" if r.intermediates else issuer_folder / "ca.pem"
    try:
        cert.verify_directly_issued_by(load_cert(signer))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def test_phase_1_every_bundle_trusts_both_roots_and_leaves_are_unchanged(rotation):
    r = rotation
    assert r.phase == {"start": "steady", "phase1": "trust-both", "phase2": "new-leaves",
                       "phase3": "steady"}  # fmt: skip
    old, new = _gen_root(r, 1), _gen_root(r, 2)
    assert old != new
    for member in MEMBERS:
        folder = r.saved[f"phase1:{member}"]
        assert _roots(folder / "ca.pem") == [old, new]
        cert, key = _files(folder, member)
        before_cert, before_key = _files(r.saved[f"start:{member}"], member)
        assert cert.read_bytes() == before_cert.read_bytes()
        assert key.read_bytes() == before_key.read_bytes()
    lines = change_lines(r.out["phase1"])
    assert "+ ca gen-2 (a new CA)" in lines
    assert sorted(line for line in lines if not line.startswith("+ ca")) == sorted(
        f"~ {m.removeprefix('nodes/')} (the CA bundle changes)" for m in MEMBERS
    ), lines
    # The old CA still signs in phase 1: no folder is reissued.
    assert not any(line.startswith("-/+") for line in lines)


def test_phase_2_every_leaf_is_from_the_new_ca_with_a_new_key(rotation):
    r = rotation
    old, new = _gen_root(r, 1), _gen_root(r, 2)
    for member in MEMBERS:
        folder = r.saved[f"phase2:{member}"]
        assert _roots(folder / "ca.pem") == [old, new]
        cert, key = _files(folder, member)
        leaf = load_cert(cert)
        assert _signed_by_generation(r, leaf, 2)
        assert not _signed_by_generation(r, leaf, 1)
        old_cert, old_key = _files(r.saved[f"phase1:{member}"], member)
        assert key.read_bytes() != old_key.read_bytes()
        assert _signed_by_generation(r, load_cert(old_cert), 1)
        chain = x509.load_pem_x509_certificates(cert.read_bytes())
        assert len(chain) == (2 if r.intermediates else 1)
    lines = change_lines(r.out["phase2"])
    assert len(lines) == len(MEMBERS) and all(line.startswith("-/+ ") for line in lines), lines


def test_during_the_transition_an_old_ca_client_and_a_new_ca_server_shake_hands(rotation):
    r = rotation
    old_client = _party(r.saved[f"phase1:{CLIENT}"], CLIENT)
    new_server = _party(r.saved[f"phase2:{SERVER}"], SERVER)
    # The client agent dials the server (RPC): each side checks the other with its own bundle.
    outcome = handshake(new_server, old_client, "server.eu.nomad")
    assert outcome.ok, outcome
    # And the server dials the client agent's API.
    back = handshake(old_client, new_server, "client.eu.nomad")
    assert back.ok, back
    # And an old operator reaches a new server's HTTPS.
    operator = _party(r.saved["phase1:operators/alice"], "operators/alice")
    assert handshake(new_server, operator, "localhost").ok


def test_before_the_transition_an_old_bundle_refuses_a_new_leaf(rotation):
    """The control case: without phase 1's bundle, the new CA's server is refused."""
    r = rotation
    start_client = _party(r.saved[f"start:{CLIENT}"], CLIENT)
    new_server = _party(r.saved[f"phase2:{SERVER}"], SERVER)
    outcome = handshake(new_server, start_client, "server.eu.nomad")
    assert not outcome.ok
    assert "certificate verify failed" in (outcome.client_error or ""), outcome


def test_phase_3_drops_the_old_ca_and_an_old_leaf_is_refused(rotation):
    r = rotation
    new = _gen_root(r, 2)
    for member in MEMBERS:
        folder = r.root / member
        assert _roots(folder / "ca.pem") == [new]
        # Phase 3 changes bundles only; the new leaves stay.
        cert, key = _files(folder, member)
        cert2, key2 = _files(r.saved[f"phase2:{member}"], member)
        assert cert.read_bytes() == cert2.read_bytes()
        assert key.read_bytes() == key2.read_bytes()
    # The old CA's folder is kept, whole, under retired/.
    assert not (r.root / "ca" / "gen-1").exists()
    (kept,) = r.root.glob("retired/*/ca/ca/gen-1")
    assert (kept / "ca-key.pem").is_file()
    assert (kept / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert (
        r.state["phase2"]["ca/gen-1/ca-key.pem"][0]
        == r.state["phase3"][str((kept / "ca-key.pem").relative_to(r.root))][0]
    )
    assert "- ca gen-1 (the old CA, after rotation)" in change_lines(r.out["phase3"])
    recorded = json.loads((r.root / "plan-manifest.json").read_text())
    assert recorded["trusted_generations"] == [2]
    assert recorded["signing_generation"] == 2
    assert {m["ca_generation"] for m in recorded["members"]} == {2}
    # A node still on its old leaf is refused by a node that took phase 3's bundle.
    new_server = _party(r.root / SERVER, SERVER)
    old_client = _party(r.saved[f"phase1:{CLIENT}"], CLIENT)
    stale = Party(old_client.cert, old_client.key, new_server.ca)
    outcome = handshake(new_server, stale, "server.eu.nomad")
    assert not outcome.ok
    assert "certificate verify failed" in (outcome.server_error or ""), outcome
    # The new leaves work with the new bundle alone.
    assert handshake(new_server, _party(r.root / CLIENT, CLIENT), "server.eu.nomad").ok


def test_each_phase_prints_the_operators_steps(rotation):
    r = rotation
    for step, number in (("phase1", 1), ("phase2", 2), ("phase3", 3)):
        text = r.out[step]
        assert f"phase {number} of 3 done" in text, text
        assert "SIGHUP" in text
    assert "cfwrap apply PLAN --rotate-ca` for phase 2" in r.out["phase1"]
    assert "cfwrap apply PLAN --rotate-ca` for phase 3" in r.out["phase2"]
    assert "--rotate-ca" not in r.out["phase3"].split("phase 3 of 3 done", 1)[1]
    assert "phase 1 of 3 is done" in r.out["phase1-plain"]
    assert "phase 2 of 3 is done" in r.out["phase2-plain"]
    assert "rotation" not in r.out["phase3-plain"].lower()


def test_status_reports_the_phase_and_issuers(rotation):
    r = rotation
    code, text = run("status", r.plan, "--json", "--within", "7d")
    assert code == 0, text
    data = json.loads(text)
    assert data["phase"] == "steady"
    issuers = {row["node"]: row["issuer"] for row in data["certificates"]}
    assert issuers["eu/server-1"] == issuers["eu/client-1"] == "gen-2"


def test_a_phase_1_that_stopped_is_finished_by_the_same_apply(tmp_path):
    # Phase 1 makes the new CA first and records it last. Stopped between the two (here a
    # client's folder is held by another process), the new CA is unrecorded: status says so,
    # and `apply --rotate-ca` again finishes phase 1 with it, not a third CA.
    from cfwrap.files import FolderLock

    plan = write_plan(tmp_path, PLAN.format(intermediates="false"))
    assert run("apply", plan)[0] == 0
    root = tmp_path / "tree"
    with FolderLock(root / CLIENT):
        code, text = run("apply", plan, "--rotate-ca")
    assert code == 4, text
    assert "changes had been made" in text and "run the same apply again to finish" in text
    assert (root / "ca/gen-2/ca.pem").is_file()
    code, text = run("status", plan, "--json")
    assert code == 9
    rows = {r["node"]: r for r in json.loads(text)["certificates"]}
    assert rows["ca gen-2"]["state"] == "changed"
    assert rows["ca gen-2"]["detail"].startswith("not in plan-manifest.json")
    code, text = run("apply", plan)  # a plain apply does not guess: it says what to run
    assert code == 7 and "run apply --rotate-ca again to finish it" in text, text
    gen2 = (root / "ca/gen-2/ca.pem").read_bytes()
    code, text = run("apply", plan, "--rotate-ca")
    assert code == 0, text
    assert "~ ca gen-2 (made by a phase 1 that stopped; it goes on now)" in change_lines(text)
    assert "phase 1 of 3 done" in text
    assert (root / "ca/gen-2/ca.pem").read_bytes() == gen2
    assert not (root / "ca/gen-3").exists()
    for member in MEMBERS:  # every bundle holds both CAs now
        assert (root / member / "ca.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 2
    code, text = run("status", plan, "--json", "--within", "7d")  # the leaves live 30 days
    assert code == 0, text
    assert json.loads(text)["phase"] == "trust-both"


def test_intermediates_turned_off_then_a_region_added_still_applies(tmp_path):
    # The signing CA keeps its intermediates until a rotation: the new region gets one.
    plan = write_plan(tmp_path, PLAN.format(intermediates="true"))
    assert run("apply", plan)[0] == 0
    root = tmp_path / "tree"
    plan.write_text(
        PLAN.format(intermediates="false") + "\n[regions.asia]\nservers = 1\nclients = 1\n"
    )
    code, text = run("apply", plan)
    assert code == 0, text
    assert "+ ca gen-1 asia (an intermediate CA for a new region)" in change_lines(text)
    assert "it has intermediates, the plan has none" in text
    leaf = load_cert(root / "nodes/asia/server-1/asia-server-nomad.pem")
    assert leaf.issuer == load_cert(root / "ca/gen-1/asia/ca.pem").subject
    assert run("status", plan, "--within", "7d")[0] == 0
    for _ in range(3):  # and the rotation the note names goes through
        code, text = run("apply", plan, "--rotate-ca")
        assert code == 0, text
    assert not (root / "ca/gen-2/asia").exists()  # the new CA follows the plan: no intermediates
    assert (
        load_cert(root / "nodes/asia/server-1/asia-server-nomad.pem").issuer
        == load_cert(root / "ca/gen-2/ca.pem").subject
    )
    assert run("status", plan, "--within", "7d")[0] == 0
