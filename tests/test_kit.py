"""A quickstart kit, made by real cfssl 1.6.5, checked the way a Nomad agent and openssl see it."""

from __future__ import annotations

import json
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cfwrap import manifest
from tests.conftest import CFSSL_DIR, ROOT, assert_no_secrets, cert_argv
from tests.tlspeer import openssl_verify

REGIONS = ("global", "eu-west-1")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.mark.parametrize("region", REGIONS)
def test_role_certificates_carry_nomads_names_usages_and_dates(kits, region):
    kit = kits[region]
    ca = _cert(kit / "ca.pem")
    now = datetime.now(UTC)
    expected = {
        "server": (
            {f"server.{region}.nomad", "nomad.example.com", "localhost"},
            {"127.0.0.1", "10.0.0.5"},
            {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
        ),
        "client": (
            {f"client.{region}.nomad", "nomad.example.com", "localhost"},
            {"127.0.0.1", "10.0.0.5"},
            {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
        ),
        "cli": ({f"cli.{region}.nomad"}, set(), {ExtendedKeyUsageOID.CLIENT_AUTH}),
    }
    for role, (dns, ips, eku) in expected.items():
        cert = _cert(kit / f"{region}-{role}-nomad.pem")
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == f"{role}.{region}.nomad"
        assert _sans(cert) == (dns, ips)
        assert _eku(cert) == eku
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature
        assert not usage.key_encipherment, "EC keys must not carry keyEncipherment (RFC 5480)"
        assert not usage.key_cert_sign
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp256r1"
        # One year, backdated five minutes by cfssl, and never past the CA.
        assert cert.not_valid_before_utc <= now
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert timedelta(days=365) <= life <= timedelta(days=365, minutes=10)
        assert cert.not_valid_after_utc <= ca.not_valid_after_utc
        cert.verify_directly_issued_by(ca)
        both = {f"server.{region}.nomad", f"client.{region}.nomad"}
        assert not both <= dns, "one certificate must never carry both roles"


@pytest.mark.parametrize("region", REGIONS)
def test_ca_is_a_five_year_ca_that_signs_leaves_only(kits, region):
    ca = _cert(kits[region] / "ca.pem")
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca
    assert basic.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=5 * 365) <= life <= timedelta(days=5 * 365 + 2)
    assert ca.subject == ca.issuer


@pytest.mark.parametrize("region", REGIONS)
def test_openssl_verifies_server_name_for_server_cert_only(kits, region):
    kit = kits[region]
    name = f"server.{region}.nomad"
    good = openssl_verify(kit / "ca.pem", kit / f"{region}-server-nomad.pem", name)
    assert good.returncode == 0, good.stdout + good.stderr
    for role in ("client", "cli"):
        bad = openssl_verify(kit / "ca.pem", kit / f"{region}-{role}-nomad.pem", name)
        assert bad.returncode != 0
        assert "hostname mismatch" in bad.stdout + bad.stderr
    wrong_region = openssl_verify(
        kit / "ca.pem", kit / f"{region}-server-nomad.pem", "server.elsewhere.nomad"
    )
    assert wrong_region.returncode != 0


def test_other_ca_does_not_verify(kits, other_kit):
    result = openssl_verify(
        other_kit / "ca.pem", kits["global"] / "global-server-nomad.pem", "server.global.nomad"
    )
    assert result.returncode != 0


@pytest.mark.parametrize("region", REGIONS)
def test_manifest_validates_and_matches_disk(kits, region, cli):
    kit = kits[region]
    data = json.loads((kit / "manifest.json").read_text())
    schema = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(data)
    assert data["schema_version"] == 1
    on_disk = {p.name for p in kit.iterdir()} - {"manifest.json"}
    assert {a["path"] for a in data["artifacts"]} == on_disk
    (tool,) = data["tools"]
    assert tool["name"] == "cfssl"
    assert tool["package"] == "golang-cfssl"
    assert tool["version"].startswith("1.6.5")
    assert (
        tool["sha256"]
        == json.loads((CFSSL_DIR.parent / "package.json").read_text())["sha256"]["cfssl"]
    )
    by_path = {a["path"]: a for a in data["artifacts"]}
    for role in ("server", "client", "cli"):
        cert = by_path[f"{region}-{role}-nomad.pem"]
        assert (cert["kind"], cert["role"], cert["region"]) == ("cert", role, region)
        info = cert["certificate"]
        assert info["chain_verified"] is True
        assert info["key_pair_verified"] is True
        assert info["key_algorithm"] == "ecdsa"
        assert info["key_size"] == 256
        assert info["dns_names"][0] == f"{role}.{region}.nomad"
        key = by_path[f"{region}-{role}-nomad-key.pem"]
        assert (key["kind"], key["mode"], key["role"]) == ("key", "0600", role)
    assert by_path["ca.pem"]["kind"] == "ca-cert"
    assert by_path["ca-key.pem"]["kind"] == "ca-key"
    assert by_path["ca-key.pem"]["mode"] == "0600"
    assert by_path["gossip.key"]["kind"] == "gossip-key"
    assert by_path["gossip.key"]["mode"] == "0600"
    assert by_path[f"{region}-server.hcl"]["mode"] == "0600"
    assert by_path["cfssl.json"]["kind"] == "config"
    # No secret values: no key PEM, no gossip key.
    assert_no_secrets(json.dumps(data), (kit / "gossip.key").read_text())
    result = cli("manifest", kit)
    assert result.code == 0, result.err
    assert "matches" in result.err


def test_key_files_are_0600_and_the_kit_folder_0700(kits):
    kit = kits["global"]
    assert stat.S_IMODE(kit.stat().st_mode) == 0o700
    for path in kit.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        secret = path.name.endswith("-key.pem") or path.name in ("gossip.key", "global-server.hcl")
        assert mode == (0o600 if secret else 0o644), path.name


def test_agent_config_and_cli_env_point_at_the_kit(kits):
    """Read the way Nomad and a shell read them: HCL parsed, the env file sourced by bash."""
    import hashlib

    import hcl2
    from hcl2 import SerializationOptions

    kit = kits["global"]
    plain = SerializationOptions(
        with_comments=False, strip_string_quotes=True, explicit_blocks=False
    )
    server = hcl2.loads((kit / "global-server.hcl").read_text(), serialization_options=plain)
    client = hcl2.loads((kit / "global-client.hcl").read_text(), serialization_options=plain)

    def tls(role: str) -> dict[str, object]:
        return {
            "http": True,
            "rpc": True,
            "ca_file": f"{kit}/ca.pem",
            "cert_file": f"{kit}/global-{role}-nomad.pem",
            "key_file": f"{kit}/global-{role}-nomad-key.pem",
            "verify_server_hostname": True,
            "verify_https_client": True,
        }

    def digest(text: str) -> str:  # compared by hash: a failing assert must not print the key
        return hashlib.sha256(text.strip().encode()).hexdigest()

    assert server["region"] == "global"
    assert server["tls"][0] == tls("server")
    assert list(server["server"][0]) == ["encrypt"]
    assert digest(server["server"][0]["encrypt"]) == digest((kit / "gossip.key").read_text())
    assert set(server) == {"region", "server", "tls"}
    assert client["region"] == "global"
    assert client["tls"][0] == tls("client")
    assert set(client) == {"region", "tls"}  # no gossip key for a client agent
    sourced = subprocess.run(
        ["bash", "-c", 'set -a; . "$1"; env -0', "bash", kit / "global-cli.env"],
        capture_output=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout.decode()
    env = dict(item.split("=", 1) for item in sourced.split("\0") if item.startswith("NOMAD_"))
    assert env == {
        "NOMAD_ADDR": "https://127.0.0.1:4646",
        "NOMAD_CACERT": f"{kit}/ca.pem",
        "NOMAD_CLIENT_CERT": f"{kit}/global-cli-nomad.pem",
        "NOMAD_CLIENT_KEY": f"{kit}/global-cli-nomad-key.pem",
    }


def test_every_file_cert_and_ca_write_has_its_mode(cli, tmp_path, kits):
    """Keys 0600, everything else 0644, folders 0700: for ca and cert as for quickstart."""
    ca_dir, node = tmp_path / "ca", tmp_path / "node"
    assert cli("ca", "--out", ca_dir).code == 0
    assert cli(*cert_argv(ca_dir, "server", node)).code == 0
    assert cli(*cert_argv(ca_dir, "cli", node)).code == 0
    for folder, expected in (
        (ca_dir, {"ca.pem", "ca-key.pem", "ca.csr", "ca-csr.json", "manifest.json"}),
        (node, {"ca.pem", "manifest.json"} | {
            f"global-{r}-nomad{s}" for r in ("server", "cli")
            for s in (".pem", "-key.pem", ".csr", "-csr.json", "-cfssl.json")
        }),
    ):  # fmt: skip
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert {p.name for p in folder.iterdir()} == expected
        for path in folder.iterdir():
            want = 0o600 if path.name.endswith("-key.pem") else 0o644
            assert stat.S_IMODE(path.stat().st_mode) == want, path.name


def test_written_cfssl_inputs_reproduce_the_certificate_by_hand(kits, tmp_path):
    """A person can re-run cfssl with the JSON the kit holds and get the same kind of cert."""
    kit = kits["global"]
    made = subprocess.run(
        [
            CFSSL_DIR / "cfssl",
            "gencert",
            "-ca",
            kit / "ca.pem",
            "-ca-key",
            kit / "ca-key.pem",
            "-config",
            kit / "cfssl.json",
            "-profile",
            "server",
            kit / "global-server-nomad-csr.json",
        ],
        capture_output=True,
        check=True,
    )
    again = x509.load_pem_x509_certificate(json.loads(made.stdout)["cert"].encode())
    original = _cert(kit / "global-server-nomad.pem")
    assert _sans(again) == _sans(original)
    assert _eku(again) == _eku(original)
    assert again.subject == original.subject


def test_manifest_module_reports_tampering(kits, tmp_path, cli):
    import shutil

    copy = tmp_path / "kit"
    shutil.copytree(kits["global"], copy)
    (copy / "global-client-nomad.pem").write_bytes((copy / "ca.pem").read_bytes())
    (copy / "gossip.key").chmod(0o644)
    (copy / "global-cli.env").unlink()
    (copy / "notes.txt").write_text("extra")
    result = cli("manifest", copy)
    assert result.code == 7
    # The differences are the command's data (stdout); stderr holds the one-line verdict.
    assert "global-cli.env: in the manifest but not on disk" in result.out
    assert "notes.txt: on disk but not in the manifest" in result.out
    assert "global-client-nomad.pem: content changed" in result.out
    assert len(result.err.strip().splitlines()) == 1
    assert "gossip.key: mode 0644, manifest says 0600" in result.out
    assert result.err.strip().splitlines()[-1].startswith("cfwrap: error: ")
    # The client key and CSR lose their pairing with a certificate: they are reported too.
    assert "global-client-nomad-key.pem: facts differ" in result.out
    rebuilt = manifest.differences(manifest.load(copy), manifest.scan(copy))
    printed = result.out.splitlines()
    assert len(rebuilt) == len(printed) >= 5
    wrote = cli("manifest", "--write", copy)
    assert wrote.code == 0
    assert cli("manifest", copy).code == 0
