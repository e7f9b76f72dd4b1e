"""Keys and CSRs made in-process: real OpenSSL reads them, real cfssl 1.6.5 signs them."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from cfwrap import keys, parsers, runner
from cfwrap.errors import InputError
from cfwrap.models import CSR, KeySpec, SubjectName
from tests.handmade import CFSSL, make_ca

SPECS = [
    KeySpec(algo="ecdsa", size=256),
    KeySpec(algo="ecdsa", size=384),
    KeySpec(algo="ecdsa", size=521),
    KeySpec(algo="rsa", size=2048),
]
LABELS = {"ecdsa": b"-----BEGIN EC PRIVATE KEY-----\n", "rsa": b"-----BEGIN RSA PRIVATE KEY-----\n"}
NAMES = (SubjectName(C="DE", ST="Berlin", L="Berlin", O="Example Ops", OU="Nomad"),)
HOSTS = ("server.eu.nomad", "localhost", "127.0.0.1", "10.0.0.5", "::1", "nomad.example.com")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.algo}{s.size}")
def test_keys_load_with_openssl_in_cfssljson_pem_form(tmp_path, spec):
    key = keys.new_private_key(spec)
    pem = keys.private_key_pem(key)
    assert pem.startswith(LABELS[spec.algo])  # SEC1 / PKCS#1, as cfssljson writes them
    facts = parsers.read_private_key(pem)
    assert (facts.algorithm, facts.size) == (spec.algo, spec.size)
    path = tmp_path / "leaf-key.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    subprocess.run(["openssl", "pkey", "-in", path, "-noout"], check=True)
    checked = subprocess.run(
        ["openssl", "pkey", "-in", path, "-pubout"], check=True, capture_output=True
    )
    assert (
        parsers.load_private_key(pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        == checked.stdout
    )


def test_a_made_keys_facts_are_what_openssl_reads_from_its_pem_and_no_other_bytes_get_them(
    tmp_path,
):
    """A key this process made is paired by its PEM's hash, not loaded back: never wrongly."""
    made = [keys.private_key_pem(keys.new_private_key(KeySpec())) for _ in range(3)]
    openssl_hashes = []
    for i, pem in enumerate(made):
        path = tmp_path / f"{i}-key.pem"
        path.write_bytes(pem)
        path.chmod(0o600)
        spki = subprocess.run(
            ["openssl", "pkey", "-in", path, "-pubout", "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        facts = parsers.read_private_key(pem)
        assert facts.public_key_sha256 == hashlib.sha256(spki).hexdigest()
        assert (facts.algorithm, facts.size) == ("ecdsa", 256)
        openssl_hashes.append(facts.public_key_sha256)
        path.unlink()
    # A damaged copy is read as what it is, not as the key it came from.
    lines = made[0].splitlines(keepends=True)
    with pytest.raises(parsers.ParseError):
        parsers.read_private_key(b"".join(lines[:2] + lines[3:]))
    # So is the same key written another way (PKCS#8): the same public half, read afresh.
    pkcs8 = serialization.load_pem_private_key(made[1], None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert parsers.read_private_key(pkcs8) == parsers.read_private_key(made[1])
    # Long after (only the newest few are remembered), a key is still read right, from its bytes.
    for _ in range(100):
        keys.private_key_pem(keys.new_private_key(KeySpec()), remember=False)
    assert parsers.read_private_key(made[2]).public_key_sha256 == openssl_hashes[2]


def test_each_key_is_new():
    one, two = (keys.new_private_key(KeySpec()) for _ in range(2))
    assert keys.private_key_pem(one) != keys.private_key_pem(two)


def test_a_private_key_pem_is_a_secret_from_then_on():
    pem = keys.private_key_pem(keys.new_private_key(KeySpec()))
    body = b"".join(pem.splitlines()[1:-1])
    # Its base64 outside a PEM block (no pattern would catch that) is removed by value.
    assert body not in runner.redact(b"printed: " + body)
    der = keys.new_private_key(KeySpec())
    der_pem = keys.private_key_pem(der)
    numbers = der.private_numbers().private_value.to_bytes(32, "big").hex()  # type: ignore[union-attr]
    assert numbers not in runner.redact_text(f"priv = {numbers}")
    assert b"PRIVATE KEY" not in runner.redact(der_pem)


def test_ed25519_is_refused_and_says_why():
    spec = KeySpec.model_construct(algo="ed25519", size=256)  # type: ignore[arg-type]
    with pytest.raises(InputError) as caught:
        keys.new_private_key(spec)
    message = str(caught.value)
    assert "OpenSSL 3" in message and "Nomad" in message and "ecdsa" in message


@pytest.mark.parametrize(("algo", "size"), [("ecdsa", 224), ("dsa", 2048)])
def test_other_keys_are_refused(algo, size):
    spec = KeySpec.model_construct(algo=algo, size=size)  # what the model itself refuses
    with pytest.raises(InputError, match="not a key cfwrap makes"):
        keys.new_private_key(spec)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]], ids=["ecdsa", "rsa"])
def test_csr_passes_openssl_verify_with_the_names_asked(tmp_path, spec):
    key = keys.new_private_key(spec)
    request = keys.csr_pem(key, CSR(CN="server.eu.nomad", hosts=HOSTS, names=NAMES))
    path = tmp_path / "req.csr"
    path.write_bytes(request)
    verified = subprocess.run(
        ["openssl", "req", "-in", path, "-verify", "-noout", "-subject", "-nameopt", "RFC2253"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "verify OK" in verified.stdout + verified.stderr
    assert "CN=server.eu.nomad,OU=Nomad,O=Example Ops,L=Berlin,ST=Berlin,C=DE" in verified.stdout

    csr = x509.load_pem_x509_csr(request)
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    order = [attribute.oid for attribute in csr.subject]  # as Go's pkix.Name writes them
    assert order == [
        NameOID.COUNTRY_NAME,
        NameOID.STATE_OR_PROVINCE_NAME,
        NameOID.LOCALITY_NAME,
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.COMMON_NAME,
    ]
    facts = parsers.read_csr(request)
    assert facts.signature_valid
    assert facts.dns_names == ("server.eu.nomad", "localhost", "nomad.example.com")
    assert facts.ip_addresses == ("127.0.0.1", "10.0.0.5", "::1")
    assert facts.key == parsers.read_private_key(keys.private_key_pem(key))


def test_csr_carries_no_private_material():
    key = keys.new_private_key(KeySpec())
    request = keys.csr_pem(key, CSR(CN="client.global.nomad", hosts=("client.global.nomad",)))
    der = x509.load_pem_x509_csr(request).public_bytes(serialization.Encoding.DER)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    assert b"PRIVATE" not in request
    assert scalar not in der and scalar.hex().encode() not in request
    assert runner.redact(request) == request  # nothing in it looks like a secret either


def test_csr_without_hosts_or_names_has_cn_only():
    request = keys.csr_pem(keys.new_private_key(KeySpec()), CSR(CN="cli.global.nomad"))
    csr = x509.load_pem_x509_csr(request)
    assert csr.subject.rfc4514_string() == "CN=cli.global.nomad"
    assert list(csr.extensions) == []


@pytest.mark.parametrize("host", ["bücher.example", "fe80::1%eth0", ""])
def test_hosts_that_are_neither_ip_nor_ascii_dns_are_refused(host):
    key = keys.new_private_key(KeySpec())
    with pytest.raises(InputError, match="not an IP address"):
        keys.csr_pem(key, CSR(CN="server.global.nomad", hosts=(host,)))


def _cfssl_sign(folder: Path, request: bytes, *extra: str) -> x509.Certificate:
    ca = make_ca(folder / "ca")
    (folder / "req.csr").write_bytes(request)
    signed = subprocess.run(
        [
            CFSSL,
            "sign",
            "-ca",
            ca,
            "-ca-key",
            ca.with_name("ca-key.pem"),
            *extra,
            folder / "req.csr",
        ],
        check=True,
        capture_output=True,
    )
    cert = x509.load_pem_x509_certificate(json.loads(signed.stdout)["cert"].encode())
    assert parsers.is_issued_by(cert, x509.load_pem_x509_certificate(ca.read_bytes()))
    return cert


def test_real_cfssl_signs_the_csr_with_the_hosts_requested(tmp_path):
    key = keys.new_private_key(KeySpec())
    request = keys.csr_pem(key, CSR(CN="server.eu.nomad", hosts=HOSTS, names=NAMES))
    cert = _cfssl_sign(tmp_path, request, "-hostname", "server.eu.nomad,10.1.2.3")
    facts = parsers.certificate_facts(cert)
    assert facts.common_name == "server.eu.nomad"
    assert facts.dns_names == ("server.eu.nomad",)
    assert facts.ip_addresses == ("10.1.2.3",)
    assert "O=Example Ops" in facts.subject and "C=DE" in facts.subject
    assert facts.key == parsers.read_csr(request).key


def test_real_cfssl_keeps_the_csrs_own_hosts_without_hostname(tmp_path):
    request = keys.csr_pem(
        keys.new_private_key(KeySpec(algo="ecdsa", size=384)),
        CSR(CN="server.eu.nomad", hosts=HOSTS),
    )
    facts = parsers.certificate_facts(_cfssl_sign(tmp_path, request))
    assert set(facts.dns_names) == {"server.eu.nomad", "localhost", "nomad.example.com"}
    assert set(facts.ip_addresses) == {"127.0.0.1", "10.0.0.5", "::1"}
    assert (facts.key.algorithm, facts.key.size) == ("ecdsa", 384)
