"""A two-region plan with named nodes and extra names: every certificate, and real handshakes.

Applied once per module for each CA layout (one root; an offline root with one intermediate per
region). Certificates are read with ``cryptography`` and checked field by field, chains with real
``openssl verify``, and cross-region RPC with real TLS: Python's ``ssl`` for the handshake, and
the Go peer (tests/gopeer ``rpc-pair``) for Nomad's own role and region check.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import hcl2
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cfwrap import verify
from cfwrap.cli import main
from tests.test_go_agreement import build_gopeer
from tests.test_plan import change_lines, load_cert, write_plan
from tests.tlspeer import Party, handshake

PLAN = """\
out = "tree"
node_tls_dir = "/opt/nomad/tls"
leaf_expiry = "2160h"
operators = ["alice", {{ name = "bob", region = "eu" }}]

[key]
algo = "ecdsa"
size = 256

[ca]
intermediates = {intermediates}

[[regions.global.servers]]
name = "nomad-a1"
dns = ["a1.example.com", "nomad.example.com"]
ip = ["10.0.0.11"]
address = "10.0.0.11:4646"

[[regions.global.servers]]
name = "nomad-a2"

[[regions.global.clients]]
name = "worker-a1"
dns = ["w1.example.com"]
ip = ["10.0.1.1"]

[regions.eu]
clients = 1

[[regions.eu.servers]]
name = "nomad-b1"
dns = ["b1.example.eu"]
ip = ["10.1.0.11", "fd00::11"]
"""


@dataclass(frozen=True)
class Want:
    """What one member's certificate must say."""

    folder: str
    role: str
    region: str
    dns: tuple[str, ...]
    ips: tuple[str, ...]


AGENT = ("localhost",)
WANT = [
    Want("nodes/global/nomad-a1", "server", "global",
         ("server.global.nomad", "a1.example.com", "nomad.example.com", "localhost"),
         ("127.0.0.1", "10.0.0.11")),
    Want("nodes/global/nomad-a2", "server", "global", ("server.global.nomad", "localhost"),
         ("127.0.0.1",)),
    Want("nodes/global/worker-a1", "client", "global",
         ("client.global.nomad", "w1.example.com", "localhost"), ("127.0.0.1", "10.0.1.1")),
    Want("nodes/eu/nomad-b1", "server", "eu", ("server.eu.nomad", "b1.example.eu", "localhost"),
         ("127.0.0.1", "10.1.0.11", "fd00::11")),
    Want("nodes/eu/client-1", "client", "eu", ("client.eu.nomad", "localhost"), ("127.0.0.1",)),
    Want("operators/alice", "cli", "global", ("cli.global.nomad",), ()),
    Want("operators/bob", "cli", "eu", ("cli.eu.nomad",), ()),
]  # fmt: skip


@dataclass(frozen=True)
class Tree:
    """An applied plan."""

    plan: Path
    root: Path
    intermediates: bool


@pytest.fixture(scope="module", params=[False, True], ids=["root", "intermediates"])
def tree(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tree:
    folder = tmp_path_factory.mktemp("plan-tls")
    plan = write_plan(folder, PLAN.format(intermediates=str(request.param).lower()))
    assert main(["apply", str(plan)]) == 0
    return Tree(plan, folder / "tree", request.param)


def _files(tree: Tree, want: Want) -> tuple[Path, Path, Path]:
    folder = tree.root / want.folder
    stem = f"{want.region}-{want.role}-nomad"
    return folder / f"{stem}.pem", folder / f"{stem}-key.pem", folder / "ca.pem"


def _party(tree: Tree, folder: str) -> Party:
    want = next(w for w in WANT if w.folder == folder)
    cert, key, ca = _files(tree, want)
    return Party(cert, key, ca)


def test_the_tree_holds_exactly_the_planned_folders(tree):
    nodes = [str(p.relative_to(tree.root)) for p in tree.root.glob("nodes/*/*")] + [
        str(p.relative_to(tree.root)) for p in (tree.root / "operators").iterdir()
    ]
    assert sorted(nodes) == sorted(w.folder for w in WANT)
    (generation,) = (tree.root / "ca").iterdir()
    assert generation.name == "gen-1"
    regions = sorted(p.name for p in generation.iterdir() if p.is_dir())
    assert regions == (["eu", "global"] if tree.intermediates else [])
    # The CA's key stays in the CA's folder: no member folder holds it.
    ca_key = (generation / "ca-key.pem").read_bytes()
    for want in WANT:
        for path in (tree.root / want.folder).iterdir():
            assert path.read_bytes() != ca_key


@pytest.mark.parametrize("want", WANT, ids=[w.folder for w in WANT])
def test_every_certificate_has_exactly_the_planned_names_and_usages(tree, want):
    cert_path, key_path, ca_path = _files(tree, want)
    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    leaf = chain[0]
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [f"{want.role}.{want.region}.nomad"]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(want.dns)
    assert sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)) == sorted(
        str(ipaddress.ip_address(i)) for i in want.ips
    )
    # A certificate never carries both role names.
    other = {"server": "client", "client": "server", "cli": "server"}[want.role]
    assert not any(n.startswith(f"{other}.") for n in san.get_values_for_type(x509.DNSName))
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    assert not usage.value.key_encipherment  # an EC key cannot encrypt
    ekus = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    if want.role == "cli":
        assert ekus == {ExtendedKeyUsageOID.CLIENT_AUTH}
    else:
        assert ekus == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=2160)
    assert key_path.stat().st_mode & 0o777 == 0o600
    # The chain: leaf (+ its region's intermediate) up to the one root every member trusts.
    roots = x509.load_pem_x509_certificates(ca_path.read_bytes())
    (root,) = roots
    assert root == load_cert(tree.root / "ca" / "gen-1" / "ca.pem")
    if tree.intermediates:
        assert len(chain) == 2
        intermediate = chain[1]
        assert intermediate == load_cert(tree.root / "ca" / "gen-1" / want.region / "ca.pem")
        leaf.verify_directly_issued_by(intermediate)
        intermediate.verify_directly_issued_by(root)
        assert (
            intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
            == 0
        )
    else:
        assert len(chain) == 1
        leaf.verify_directly_issued_by(root)
    # Real openssl agrees: the file's own intermediate, the bundle as the only trust.
    run = subprocess.run(
        ["openssl", "verify", "-CAfile", ca_path, "-untrusted", cert_path, "-purpose",
         "sslclient", "-verify_hostname", want.dns[0], cert_path],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == f"{cert_path}: OK"


def test_every_region_trusts_the_same_root(tree):
    bundles = {(tree.root / w.folder / "ca.pem").read_bytes() for w in WANT}
    assert len(bundles) == 1
    assert bundles == {(tree.root / "ca" / "gen-1" / "ca.pem").read_bytes()}


def test_openssl_on_a_leaf_alone(tree):
    """One root: a leaf verifies against it alone. Intermediates: eu's intermediate did not
    sign global's leaves, so a global leaf without its own intermediate does not verify."""
    server = next(w for w in WANT if w.folder == "nodes/global/nomad-a1")
    cert_path, _, _ = _files(tree, server)
    leaf_only = cert_path.with_name("leaf-only.pem.tmp")
    leaf_only.write_bytes(cert_path.read_bytes().split(b"-----END CERTIFICATE-----")[0]
                          + b"-----END CERTIFICATE-----\n")  # fmt: skip
    untrusted = ["-untrusted", tree.root / "ca/gen-1/eu/ca.pem"] if tree.intermediates else []
    try:
        run = subprocess.run(
            ["openssl", "verify", "-CAfile", tree.root / "ca/gen-1/ca.pem", *untrusted, leaf_only],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        leaf_only.unlink()
    if not tree.intermediates:
        assert run.returncode == 0, run.stdout + run.stderr
        return
    assert run.returncode != 0
    assert "unable to get local issuer certificate" in run.stdout + run.stderr


def _unquoted(value: object) -> Any:
    """python-hcl2 keeps the quotes of string values."""
    if isinstance(value, dict):
        return {k: _unquoted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unquoted(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def test_agent_configuration_and_operator_environment(tree):
    gossip = (tree.root / "gossip.key").read_text().strip()
    assert (tree.root / "gossip.key").stat().st_mode & 0o777 == 0o600
    for want in WANT:
        folder = tree.root / want.folder
        if want.role == "cli":
            lines = (folder / f"{want.region}-cli.env").read_text().splitlines()
            env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
            paths = {k: v.strip("'\"") for k, v in env.items() if k != "NOMAD_ADDR"}
            cert, key, ca = _files(tree, want)
            assert paths == {
                "NOMAD_CACERT": str(ca),
                "NOMAD_CLIENT_CERT": str(cert),
                "NOMAD_CLIENT_KEY": str(key),
            }
            assert all(Path(p).is_file() for p in paths.values())
            # alice is of global, whose first server has an address; bob's region has none.
            address = (
                "https://10.0.0.11:4646" if want.region == "global" else "https://127.0.0.1:4646"
            )
            assert env["NOMAD_ADDR"].strip("'\"") == address
            assert gossip not in (folder / f"{want.region}-cli.env").read_text()
            continue
        hcl_path = folder / f"{want.region}-{want.role}.hcl"
        text = hcl_path.read_text()
        parsed = _unquoted(hcl2.loads(text))
        assert parsed["region"] == want.region
        (tls,) = parsed["tls"]
        stem = f"/opt/nomad/tls/{want.region}-{want.role}-nomad"
        assert tls["ca_file"] == "/opt/nomad/tls/ca.pem"
        assert tls["cert_file"] == f"{stem}.pem"
        assert tls["key_file"] == f"{stem}-key.pem"
        assert tls["verify_server_hostname"] is True
        assert tls["verify_https_client"] is True
        assert tls["http"] is True and tls["rpc"] is True
        if want.role == "server":
            (server,) = parsed["server"]
            assert server["encrypt"] == gossip
            assert hcl_path.stat().st_mode & 0o777 == 0o600
        else:
            assert "server" not in parsed
            assert gossip not in text
            assert "encrypt" not in text


# --- real handshakes across regions, as Nomad allows them ------------------------------------


def test_a_server_of_one_region_dials_a_server_of_the_other(tree):
    """Federation: global's server dials eu's server for RPC (mutual TLS, name server.eu.nomad)."""
    eu, glob = _party(tree, "nodes/eu/nomad-b1"), _party(tree, "nodes/global/nomad-a1")
    outcome = handshake(eu, glob, "server.eu.nomad")
    assert outcome.ok, outcome
    back = handshake(glob, _party(tree, "nodes/eu/nomad-b1"), "server.global.nomad")
    assert back.ok, back
    # Dialling under the wrong region's name fails: the name is what ties a server to a region.
    wrong = handshake(eu, glob, "server.global.nomad")
    assert not wrong.ok
    assert "Hostname mismatch" in (wrong.client_error or ""), wrong


def test_a_client_agent_completes_tls_with_another_regions_server(tree):
    """TLS alone accepts global's client at eu's server (same root): Nomad's check must refuse."""
    outcome = handshake(
        _party(tree, "nodes/eu/nomad-b1"), _party(tree, "nodes/global/worker-a1"), "server.eu.nomad"
    )
    assert outcome.ok, outcome


def _side(tree: Tree, folder: str) -> dict[str, str]:
    want = next(w for w in WANT if w.folder == folder)
    cert, key, ca = _files(tree, want)
    return {"ca": str(ca), "cert": str(cert), "key": str(key), "region": want.region}


# (name, listener: a server's RPC port, dialer, Nomad accepts, Raft accepts)
PAIRS = [
    ("global server -> eu server", "nodes/eu/nomad-b1", "nodes/global/nomad-a1", True, False),
    ("eu server -> global server", "nodes/global/nomad-a1", "nodes/eu/nomad-b1", True, False),
    ("global server -> same", "nodes/global/nomad-a1", "nodes/global/nomad-a2", True, True),
    ("eu client -> eu server", "nodes/eu/nomad-b1", "nodes/eu/client-1", True, False),
    ("global client -> eu server", "nodes/eu/nomad-b1", "nodes/global/worker-a1", False, False),
    ("eu client -> global server", "nodes/global/nomad-a2", "nodes/eu/client-1", False, False),
    ("cli -> eu server rpc", "nodes/eu/nomad-b1", "operators/bob", False, False),
]  # fmt: skip


def test_go_judges_cross_region_rpc_as_nomad_does(tree):
    """A client agent of one region is refused by the servers of the other.

    The refusal is not TLS (the handshake above completes) but Nomad's
    ``rpcNameAndRegionValidator`` (hashicorp/nomad ``nomad/server.go``, set as the RPC
    listener's ``VerifyPeerCertificate`` by ``getTLSConf`` under ``verify_server_hostname``):
    the peer must be ``client.<listener region>.nomad`` or ``server.<any>.nomad``. The Go peer
    runs that listener with the real certificates; cfwrap's own ``rpc_peer_ok`` must agree.
    """
    gopeer = build_gopeer()
    pairs = [
        {"name": name, "listener": _side(tree, listener), "dialer": _side(tree, dialer)}
        for name, listener, dialer, _, _ in PAIRS
    ]
    run = subprocess.run(
        [gopeer, "rpc-pair"], input=json.dumps(pairs), capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    verdicts = {v["name"]: v for v in json.loads(run.stdout)}
    for name, listener, dialer, accepted, raft in PAIRS:
        verdict = verdicts[name]
        assert verdict["ok"] is accepted, verdict
        if not accepted:
            assert verdict["server_error"] == "invalid role or region for certificate", verdict
        else:
            assert (verdict.get("raft_error", "") == "") is raft, verdict
        leaf = load_cert(Path(_side(tree, dialer)["cert"]))
        region = _side(tree, listener)["region"]
        assert verify.rpc_peer_ok(leaf, region) is accepted, name
        assert verify.raft_ok(leaf, region) is raft, name


_GROWN = """\
out = "tree"
leaf_expiry = "720h"

[ca]
intermediates = true

[[regions.global.servers]]
name = "nomad-a1"
"""


def test_a_region_added_to_a_plan_with_intermediates_gets_its_own(tmp_path):
    # The generation's root signs an intermediate for the new region; nothing else changes,
    # and the new region's server federates with the old one's under the same root.
    plan = write_plan(tmp_path, _GROWN)
    assert main(["apply", str(plan)]) == 0
    root = tmp_path / "tree"
    global_files = sorted((root / "nodes/global/nomad-a1").iterdir())
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in global_files}
    plan.write_text(_GROWN + '\n[[regions.us.servers]]\nname = "nomad-u1"\n')
    dry = subprocess.run(
        [sys.executable, "-m", "cfwrap", "apply", plan, "--dry-run"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert change_lines(dry.stdout) == [
        "+ ca gen-1 us (an intermediate CA for a new region)",
        "+ us/nomad-u1 (server)",
    ], dry.stdout
    assert main(["apply", str(plan)]) == 0
    gen = root / "ca/gen-1"
    intermediate = load_cert(gen / "us/ca.pem")
    assert intermediate.subject.rfc4514_string() == "CN=Nomad Agent CA 1 us"
    assert intermediate.issuer == load_cert(gen / "ca.pem").subject
    assert (gen / "us/ca-key.pem").stat().st_mode & 0o777 == 0o600
    leaf = root / "nodes/us/nomad-u1/us-server-nomad.pem"
    assert load_cert(leaf).issuer == intermediate.subject
    # openssl, with the bundle as the only trust and the leaf file's own chain.
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", root / "nodes/us/nomad-u1/ca.pem", "-untrusted", leaf,
         "-purpose", "sslserver", "-verify_hostname", "server.us.nomad", leaf],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    us = Party(leaf, leaf.with_name("us-server-nomad-key.pem"), leaf.with_name("ca.pem"))
    glob = _party(Tree(plan, root, True), "nodes/global/nomad-a1")
    assert handshake(us, glob, "server.us.nomad").ok
    assert handshake(glob, us, "server.global.nomad").ok
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in global_files}
    assert after == before
    recorded = json.loads((root / "plan-manifest.json").read_text())
    assert sorted(recorded["cas"][0]["intermediates"]) == ["global", "us"]
    assert main(["apply", str(plan)]) == 0  # and then nothing more to do


def test_the_roots_key_kept_offline_leaves_renewal_and_rotation_working(tmp_path, capsys):
    """With intermediates the root signs only them: its key may leave the machine. apply,
    renewal, status and a rotation go on without it; only a new region's intermediate needs it
    back, and then apply says so (once: "ca/gen-1: No such file or directory")."""
    plan = write_plan(tmp_path, _GROWN)
    assert main(["apply", str(plan)]) == 0
    root = tmp_path / "tree"
    gen = root / "ca/gen-1"
    (gen / "ca-key.pem").rename(tmp_path / "root-key.pem")
    assert main(["status", str(plan), "--within", "7d"]) == 0
    assert main(["apply", str(plan), "--renew-within", "400d"]) == 0
    capsys.readouterr()
    leaf = root / "nodes/global/nomad-a1/global-server-nomad.pem"
    assert load_cert(leaf).issuer == load_cert(gen / "global/ca.pem").subject
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", leaf.with_name("ca.pem"), "-untrusted", leaf,
         "-purpose", "sslserver", "-verify_hostname", "server.global.nomad", leaf],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # A new region needs the root to sign its intermediate: refused, nothing written.
    plan.write_text(_GROWN + '\n[[regions.us.servers]]\nname = "nomad-u1"\n')
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    for argv in (["apply", str(plan), "--dry-run"], ["apply", str(plan)]):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert "ca/gen-1/ca-key.pem: is offline" in err, err
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    # Put back as a symlink: refused, and said so (once "in the manifest but not on disk").
    (gen / "ca-key.pem").symlink_to(tmp_path / "root-key.pem")
    assert main(["apply", str(plan), "--dry-run"]) == 4
    err = capsys.readouterr().err
    assert "ca-key.pem is a symlink (cfwrap never reads a CA's files through one)" in err, err
    (gen / "ca-key.pem").unlink()
    # Back for one apply, the region gets its intermediate; offline again, a rotation starts.
    (tmp_path / "root-key.pem").rename(gen / "ca-key.pem")
    assert main(["apply", str(plan)]) == 0
    (gen / "ca-key.pem").rename(tmp_path / "root-key.pem")
    assert main(["apply", str(plan), "--rotate-ca"]) == 0
    assert sorted(p.name for p in (root / "ca/gen-2").iterdir() if p.is_dir()) == [
        "global", "us"
    ]  # fmt: skip
    assert main(["status", str(plan), "--within", "7d"]) == 0
