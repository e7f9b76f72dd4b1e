"""`cfwrap ca` and `cfwrap cert`: a CA from defaults or a user's CSR JSON, certificates from it."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cfwrap import manifest
from tests.conftest import cert_argv
from tests.tlspeer import Party, handshake, openssl_verify


def test_ca_from_a_users_csr_json_then_certs_that_handshake(cli, tmp_path):
    csr = tmp_path / "ca-csr.json"
    csr.write_text(
        json.dumps(
            {
                "CN": "Acme Nomad CA",
                "key": {"algo": "ecdsa", "size": 384},
                "names": [{"O": "Acme"}],
                "ca": {"expiry": "26280h"},
            }
        )
    )
    ca_dir = tmp_path / "ca"
    result = cli("ca", "--out", ca_dir, "--csr", csr, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["folder"] == str(ca_dir)
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    assert ca.subject.rfc4514_string() == "CN=Acme Nomad CA,O=Acme"
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=3 * 365) <= life <= timedelta(days=3 * 365 + 1)
    assert stat.S_IMODE((ca_dir / "ca-key.pem").stat().st_mode) == 0o600

    out = tmp_path / "certs"
    for role in ("server", "client"):
        result = cli(
            "cert",
            "--ca",
            ca_dir / "ca.pem",
            "--ca-key",
            ca_dir / "ca-key.pem",
            "--role",
            role,
            "--region",
            "ap-south",
            "--expiry",
            "720h",
            "--out",
            out,
        )
        assert result.code == 0, result.err
    server = x509.load_pem_x509_certificate((out / "ap-south-server-nomad.pem").read_bytes())
    assert server.subject.rfc4514_string() == "CN=server.ap-south.nomad"
    assert set(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert server.not_valid_after_utc - datetime.now(UTC) < timedelta(hours=721)
    server.verify_directly_issued_by(ca)
    verify = openssl_verify(
        ca_dir / "ca.pem", out / "ap-south-server-nomad.pem", "server.ap-south.nomad"
    )
    assert verify.returncode == 0
    outcome = handshake(
        Party(
            out / "ap-south-server-nomad.pem",
            out / "ap-south-server-nomad-key.pem",
            ca_dir / "ca.pem",
        ),
        Party(
            out / "ap-south-client-nomad.pem",
            out / "ap-south-client-nomad-key.pem",
            ca_dir / "ca.pem",
        ),
        "server.ap-south.nomad",
    )
    assert outcome.ok, outcome
    # The folder's manifest was rebuilt from disk after each certificate.
    assert cli("manifest", out).code == 0
    recorded = manifest.load(out)
    by_path = {a.path: a for a in recorded.artifacts}
    assert by_path["ap-south-server-nomad.pem"].certificate is not None
    assert by_path["ap-south-server-nomad.pem"].certificate.key_pair_verified is True
    # The CA certificate (not its key) was copied in, so the chain verifies within the folder.
    assert by_path["ca.pem"].kind == "ca-cert"
    assert "ca-key.pem" not in by_path
    assert by_path["ap-south-server-nomad.pem"].certificate.chain_verified is True
    assert by_path["ap-south-server-nomad-cfssl.json"].kind == "config"


def test_cert_force_replaces_a_too_open_key_with_a_new_file(cli, tmp_path, kits):
    kit = kits["global"]
    out = tmp_path / "out"
    args = cert_argv(kit, "client", out)
    assert cli(*args).code == 0
    key = out / "global-client-nomad-key.pem"
    key.chmod(0o644)
    inode = key.stat().st_ino
    assert cli(*args, "--force").code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.stat().st_ino != inode
    assert cli("manifest", out).code == 0


def test_modes_hold_under_any_umask(cli, tmp_path):
    for mask in (0o000, 0o077):
        old = os.umask(mask)
        try:
            out = tmp_path / f"kit-{mask:o}"
            assert cli("quickstart", "--out", out).code == 0
        finally:
            os.umask(old)
        assert stat.S_IMODE(out.stat().st_mode) == 0o700
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert modes["ca-key.pem"] == 0o600
        assert modes["gossip.key"] == 0o600
        assert modes["global-server.hcl"] == 0o600
        assert modes["ca.pem"] == 0o644
        assert modes["manifest.json"] == 0o644


def test_quickstart_json_output_and_tls_dir(cli, tmp_path):
    result = cli(
        "quickstart",
        "--out",
        tmp_path / "kit",
        "--tls-dir",
        "/etc/nomad.d/tls",
        "--json",
        "--region",
        "us-east-2",
    )
    assert result.code == 0
    data = json.loads(result.out)
    assert "manifest.json" in data["files"]
    assert data["backup"] is None
    hcl = (tmp_path / "kit" / "us-east-2-client.hcl").read_text()
    assert 'cert_file = "/etc/nomad.d/tls/us-east-2-client-nomad.pem"' in hcl
    assert result.err == ""


def test_cert_into_a_folder_of_another_ca_is_refused(cli, tmp_path, kits, other_kit):
    from tests.conftest import snapshot

    out = tmp_path / "out"
    out.mkdir()
    (out / "ca.pem").write_bytes((other_kit / "ca.pem").read_bytes())
    before = snapshot(tmp_path)
    kit = kits["global"]
    result = cli(*cert_argv(kit, "client", out))
    assert result.code == 3
    assert "holds another CA" in result.err
    assert snapshot(tmp_path) == before


def test_second_run_on_a_locked_folder_fails_fast(cli, tmp_path):
    from cfwrap.files import FolderLock

    with FolderLock(tmp_path / "kit"):
        result = cli("quickstart", "--out", tmp_path / "kit")
    assert result.code == 4
    assert "another cfwrap" in result.err
    assert not (tmp_path / "kit").exists()
    assert cli("quickstart", "--out", tmp_path / "kit").code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit"]
