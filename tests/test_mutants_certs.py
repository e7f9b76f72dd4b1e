"""Tests that kill mutmut's survivors in cfwrap/doctor/certs.py (scripts/mutation certs).

Certificates are made here with cryptography; file modes and owners are set with os.chmod and
os.chown; the expected findings and Go's messages are written out here.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cfwrap import parsers
from cfwrap.doctor import certs

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


def _cert(
    *,
    cn: str = "server.global.nomad",
    dns: tuple[str, ...] = ("server.global.nomad",),
    ips: tuple[str, ...] = (),
    eku: tuple[x509.ObjectIdentifier, ...] = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    key_encipherment: bool = False,
    ca: bool = False,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=365),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
                key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )  # fmt: skip
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(key, hashes.SHA256()), key


def _facts(cert: x509.Certificate) -> parsers.CertFacts:
    return parsers.certificate_facts(cert)


def _write(folder: Path, name: str, cert: x509.Certificate) -> Path:
    (folder / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / name


def _write_key(folder: Path, name: str, key: ec.EllipticCurvePrivateKey) -> Path:
    path = folder / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def test_reissue_command_quotes_every_value(tmp_path):
    (tmp_path / "a b").mkdir()
    for held in (tmp_path / "a b" / "c.pem", tmp_path / "x.pem"):
        held.write_text("a certificate's place\n")
    leaf = certs.Leaf("client", "eu west", tmp_path / "a b" / "c.pem", None)
    assert certs.reissue_command(leaf, None) == (
        "cfwrap cert --ca ca.pem --ca-key CA-KEY --role client --region 'eu west' "
        f"--out '{tmp_path / 'a b'}' --force"
    )
    cert, _ = _cert(ca=True)
    # A CA's key is named only where it is: a cert folder holds the CA's certificate alone.
    lone = certs.LoadedCA(tmp_path / "nomad-ca.pem", None, cert, _facts(cert))
    assert " --ca-key CA-KEY " in certs.reissue_command(leaf, lone)
    for key in ("nomad-ca-key.pem", "k.pem"):
        (tmp_path / key).write_text("a key's place\n")
    ca = certs.LoadedCA(tmp_path / "nomad-ca.pem", None, cert, _facts(cert))
    no_role = certs.Leaf(None, "global", tmp_path / "x.pem", None)
    assert certs.reissue_command(no_role, ca) == (
        f"cfwrap cert --ca {tmp_path / 'nomad-ca.pem'} --ca-key {tmp_path / 'nomad-ca-key.pem'} "
        f"--role server --region global --out {tmp_path} --force"
    )
    with_key = certs.LoadedCA(tmp_path / "nomad-ca.pem", tmp_path / "k.pem", cert, _facts(cert))
    assert f"--ca-key {tmp_path / 'k.pem'} " in certs.reissue_command(no_role, with_key)
    # A dialled address has no folder: the command names a new one (cert refuses --out .).
    dialled = certs.Leaf("server", "global", Path("127.0.0.1:4646"), None)
    assert certs.reissue_command(dialled, ca).endswith("--region global --out NEW-DIR")


def test_go_hostname_errors_are_gos_words():
    named, _ = _cert(dns=("a.example", "b.example"), ips=("10.0.0.1", "10.0.0.2"))
    bare, _ = _cert(dns=(), ips=())
    facts, none = _facts(named), _facts(bare)
    assert certs.go_hostname_error(facts, "c.example") == (
        "x509: certificate is valid for a.example, b.example, not c.example"
    )
    assert certs.go_hostname_error(facts, "10.9.9.9") == (
        "x509: certificate is valid for 10.0.0.1, 10.0.0.2, not 10.9.9.9"
    )
    assert certs.go_hostname_error(none, "10.9.9.9") == (
        "x509: cannot validate certificate for 10.9.9.9 because it doesn't contain any IP SANs"
    )
    assert certs.go_hostname_error(none, "::1") == (
        "x509: cannot validate certificate for ::1 because it doesn't contain any IP SANs"
    )
    assert certs.go_hostname_error(none, "c.example") == (
        "x509: certificate relies on legacy Common Name field, use SANs instead"
    )


def test_load_ca_reads_trusts_all_and_refuses_what_cannot_sign(tmp_path):
    missing = tmp_path / "missing.pem"
    loaded, findings = certs.load_ca(missing, None)
    assert loaded is None
    assert [(f.severity, f.path, f.check, f.message, f.fix) for f in findings] == [
        ("error", str(missing), "ca.read", "cannot read the CA: No such file or directory",
         "give the CA certificate (ca.pem) with --ca"),
    ]  # fmt: skip
    (tmp_path / "junk.pem").write_text("junk\n")
    loaded, findings = certs.load_ca(tmp_path / "junk.pem", None)
    assert loaded is None
    assert findings[0].message == "cannot read the CA: not a PEM certificate (found: no PEM block)"
    first, _ = _cert(cn="One CA", ca=True)
    second, _ = _cert(cn="Two CA", ca=True)
    both = tmp_path / "both.pem"
    both.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (first, second)))
    loaded, findings = certs.load_ca(both, tmp_path / "key.pem")
    assert findings == []
    assert loaded is not None
    assert (loaded.path, loaded.key_path, loaded.cert) == (both, tmp_path / "key.pem", first)
    assert list(loaded.roots) == [first, second]
    leaf, _ = _cert()
    _, findings = certs.load_ca(_write(tmp_path, "leaf.pem", leaf), None)
    assert [(f.severity, f.check, f.message, f.nomad_error, f.fix) for f in findings] == [
        ("error", "ca.constraints", "CN=server.global.nomad is not a CA (needs CA:TRUE, and "
         "keyCertSign if it has a key usage)", "x509: certificate signed by unknown authority",
         "cfwrap ca --out NEW-CA-DIR, then reissue the certificates from it"),
    ]  # fmt: skip


def test_dates_expired_not_yet_valid_expiring_and_fine(tmp_path):
    path = tmp_path / "c.pem"
    window = timedelta(days=30)

    def dates(not_before: datetime, not_after: datetime) -> list[tuple[str, ...]]:
        cert, _ = _cert(not_before=not_before, not_after=not_after)
        found = certs.check_dates(path, _facts(cert), now=NOW, warn_within=window, fix="FIX")
        return [(f.severity, f.path, f.check, f.message, f.nomad_error, f.fix) for f in found]

    assert dates(NOW - timedelta(days=10), NOW) == [
        ("error", str(path), "dates.expired", "expired on 2030-06-01 12:00 UTC",
         "x509: certificate has expired or is not yet valid: current time 2030-06-01T12:00:00Z "
         "is after 2030-06-01T12:00:00Z", "FIX"),
    ]  # fmt: skip
    assert dates(NOW + timedelta(seconds=1), NOW + timedelta(days=100)) == [
        ("error", str(path), "dates.not-yet-valid", "not valid before 2030-06-01 12:00 UTC",
         "x509: certificate has expired or is not yet valid: current time 2030-06-01T12:00:00Z "
         "is before 2030-06-01T12:00:01Z", "check this machine's clock, or FIX"),
    ]  # fmt: skip
    assert dates(NOW, NOW + window) == [
        ("warning", str(path), "dates.expiring",
         "expires in 30 days, on 2030-07-01 (warning window 30 days)", "", "FIX"),
    ]  # fmt: skip
    assert dates(NOW - timedelta(days=1), NOW + window + timedelta(seconds=1)) == []


def test_key_file_mode_and_owner(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    key.chmod(0o600)
    assert certs.check_key_file(key) == []
    key.chmod(0o640)
    (found,) = certs.check_key_file(key, what="the gossip key")
    assert (found.severity, found.check, found.message, found.fix) == (
        "error", "key.mode", "mode 0640 lets other users read or change the gossip key",
        f"chmod 0600 {key}",
    )  # fmt: skip
    key.chmod(0o604)
    assert certs.check_key_file(key)[0].message == (
        "mode 0604 lets other users read or change a private key"
    )
    key.chmod(0o600)
    os.chown(key, 12345, -1)
    (owner,) = certs.check_key_file(key)
    assert (owner.severity, owner.check, owner.message, owner.fix) == (
        "warning", "key.owner",
        f"owned by uid 12345, not by uid {os.geteuid()} that runs this check",
        f"chown {os.geteuid()} {key}  (the user the Nomad agent runs as)",
    )  # fmt: skip
    (gone,) = certs.check_key_file(tmp_path / "missing")
    assert (gone.severity, gone.check, gone.message) == (
        "error", "key.read", "cannot read: No such file or directory",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("role", "eku", "message"),
    [
        ("server", (ExtendedKeyUsageOID.CLIENT_AUTH,),
         "a server certificate without serverAuth: it cannot serve TLS"),
        ("client", (ExtendedKeyUsageOID.SERVER_AUTH,),
         "a client certificate without clientAuth: it cannot dial with TLS"),
        ("cli", (ExtendedKeyUsageOID.SERVER_AUTH,),
         "a cli certificate without clientAuth: it cannot dial with TLS"),
        ("server", (ExtendedKeyUsageOID.CODE_SIGNING,),
         "a server certificate without serverAuth, clientAuth: it cannot serve TLS; it cannot "
         "dial with TLS"),
        ("server", (), None),
        (None, (ExtendedKeyUsageOID.CODE_SIGNING,), None),
        ("cli", (ExtendedKeyUsageOID.CLIENT_AUTH,), None),
    ],
)  # fmt: skip
def test_extended_key_usage_per_role(tmp_path, role, eku, message):
    cert, _ = _cert(eku=eku)
    leaf = certs.Leaf(role, "global", tmp_path / "c.pem", None)
    found = [(f.severity, f.path, f.check, f.message, f.nomad_error, f.fix)
             for f in certs.check_usages(leaf, _facts(cert), "FIX")]  # fmt: skip
    expected = [("error", str(tmp_path / "c.pem"), "usage.extended", message,
                 "x509: certificate specifies an incompatible key usage", "FIX")]  # fmt: skip
    assert found == (expected if message else [])


def test_any_extended_key_usage_serves_every_role(tmp_path):
    cert, _ = _cert(eku=(ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,))
    leaf = certs.Leaf("server", "global", tmp_path / "c.pem", None)
    assert certs.check_usages(leaf, _facts(cert), "FIX") == []


def test_an_ec_key_with_key_encipherment_is_a_warning(tmp_path):
    cert, _ = _cert(key_encipherment=True)
    leaf = certs.Leaf("server", "global", tmp_path / "c.pem", None)
    (found,) = certs.check_usages(leaf, _facts(cert), "FIX")
    assert (found.severity, found.check, found.fix) == ("warning", "usage.key-encipherment", "FIX")
    assert found.message == (
        "an EC key with keyEncipherment: an EC key cannot encrypt (RFC 5480); strict TLS "
        "stacks refuse it"
    )


def test_a_leaf_that_cannot_be_read_and_a_key_that_is_not_its_own(tmp_path):
    leaf = certs.Leaf("server", "global", tmp_path / "missing.pem", None)
    (found,) = certs.check_leaf(leaf, None, now=NOW, warn_within=timedelta(days=30))
    assert (found.severity, found.path, found.check, found.message) == (
        "error", str(tmp_path / "missing.pem"), "cert.read",
        "cannot read: No such file or directory",
    )  # fmt: skip
    assert found.fix == certs.reissue_command(leaf, None)
    cert, _ = _cert(dns=("server.global.nomad", "localhost"), ips=("127.0.0.1",))
    _, other_key = _cert()
    path = _write(tmp_path, "global-server-nomad.pem", cert)
    key = _write_key(tmp_path, "global-server-nomad-key.pem", other_key)
    with_key = certs.Leaf("server", "global", path, key)
    found_all = certs.check_leaf(with_key, None, now=NOW, warn_within=timedelta(days=30))
    pair = [f for f in found_all if f.check == "key.pair"]
    assert [(f.severity, f.path, f.message, f.nomad_error) for f in pair] == [
        ("error", str(key), "does not belong to global-server-nomad.pem",
         "tls: private key does not match public key"),
    ]  # fmt: skip
    key.write_text("junk\n")
    unreadable = certs.check_leaf(with_key, None, now=NOW, warn_within=timedelta(days=30))
    assert [(f.check, f.message) for f in unreadable if f.path == str(key)] == [
        ("key.read", "cannot read: not a PEM private key (found: no PEM block)")
    ]


def test_a_ca_where_a_leaf_belongs_and_a_role_less_certificate(tmp_path):
    cert, _ = _cert(ca=True, dns=("server.global.nomad", "localhost"), ips=("127.0.0.1",))
    path = _write(tmp_path, "c.pem", cert)
    found = certs.check_leaf(
        certs.Leaf("server", "global", path, None), None, now=NOW, warn_within=timedelta(days=1)
    )
    is_ca = [(f.severity, f.message) for f in found if f.check == "cert.is-ca"]
    assert is_ca == [("error", "a CA certificate where a role certificate belongs")]
    plain, _ = _cert(cn="web", dns=("web.example",))
    found = certs.check_leaf(
        certs.Leaf(None, "global", _write(tmp_path, "p.pem", plain), None),
        None, now=NOW, warn_within=timedelta(days=1),
    )  # fmt: skip
    info = [(f.severity, f.message, f.fix) for f in found if f.check == "cert.role"]
    assert info == [
        ("info", "no Nomad role name in ['web', 'web.example']; only generic checks were run",
         "name the role with --role, or name the file <region>-<role>-nomad.pem"),
    ]  # fmt: skip


def test_a_leaf_that_outlives_its_ca_and_one_from_another_ca(tmp_path):
    ca_cert, ca_key = _cert(cn="CA", ca=True, dns=(), eku=(), not_after=NOW + timedelta(days=10))
    ca = certs.LoadedCA(tmp_path / "ca.pem", None, ca_cert, _facts(ca_cert), (ca_cert,))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.global.nomad")]))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=9) + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("server.global.nomad")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    path = _write(tmp_path, "l.pem", leaf)
    found = certs.check_leaf(
        certs.Leaf("server", "global", path, None), ca, now=NOW, warn_within=timedelta(days=1)
    )
    assert [f.check for f in found if f.check.startswith(("chain", "dates"))] == []
    late = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=11))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("server.global.nomad")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    found = certs.check_leaf(
        certs.Leaf("server", "global", _write(tmp_path, "late.pem", late), None),
        ca, now=NOW, warn_within=timedelta(days=1),
    )  # fmt: skip
    outlives = [(f.severity, f.message) for f in found if f.check == "dates.outlives-ca"]
    assert outlives == [
        ("warning", "valid until 2030-06-12, after its CA expires on 2030-06-11; from then on it "
         "fails verification"),
    ]  # fmt: skip
    stranger, _ = _cert(dns=("server.global.nomad",))
    found = certs.check_leaf(
        certs.Leaf("server", "global", _write(tmp_path, "s.pem", stranger), None),
        ca, now=NOW, warn_within=timedelta(days=1),
    )  # fmt: skip
    chain = [(f.severity, f.nomad_error) for f in found if f.check == "chain"]
    assert chain == [("error", "x509: certificate signed by unknown authority")]
    assert next(f.message for f in found if f.check == "chain").startswith(
        f"not signed by the CA {tmp_path / 'ca.pem'} (issuer: CN=server.global.nomad); "
    )
