"""doctor agrees with Go: a corpus of certificates judged by a Go peer and by doctor, per role.

The Go peer (tests/gopeer, standard library only, built by scripts/test) acts as a Nomad
server, client agent and CLI would: real crypto/tls handshakes with TLS >= 1.2 and client
certificates required and verified, ServerName ``server.<region>.nomad`` or
``client.<region>.nomad``, Nomad's RPC role/region validator and Raft exact-name check on the
peer, and the key types an agent starts with. doctor must report an error exactly where the peer
refuses; warnings stay warnings. The corpus is made here: with real cfssl wherever cfssl can make
a case, with cryptography where it cannot (bad signatures, broken CAs, odd extensions).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cfwrap.cli import main
from tests.conftest import CFSSL_DIR, ROOT, cert_argv

GOPEER_SRC = ROOT / "tests" / "gopeer"
GOPEER = ROOT / ".tools" / "gopeer" / "gopeer"
CFSSL = CFSSL_DIR / "cfssl"
ROLES = ("server", "client", "cli")
NOW = datetime.now(UTC)
SERVER_AUTH, CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def build_gopeer() -> Path:
    """Build the Go peer into .tools/gopeer when its source is newer (offline, stdlib only)."""
    sources = [*GOPEER_SRC.glob("*.go"), GOPEER_SRC / "go.mod"]
    if GOPEER.is_file() and all(s.stat().st_mtime <= GOPEER.stat().st_mtime for s in sources):
        return GOPEER
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain is missing: ./scripts/test installs golang-go")
    tools = ROOT / ".tools" / "go"
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOPATH": str(tools / "path"),
        "GOCACHE": str(tools / "cache"),
    }
    subprocess.run(
        [go, "build", "-o", str(GOPEER), "."], cwd=GOPEER_SRC, env=env, check=True, timeout=300
    )
    return GOPEER


# --- making certificates with cryptography ---------------------------------------------------


def new_key(kind: str = "p256") -> Key:
    """A private key: p256, p384, rsa<bits> or ed25519."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    curves = {"p224": ec.SECP224R1(), "p521": ec.SECP521R1(), "k256": ec.SECP256K1()}
    if kind in curves:
        return ec.generate_private_key(curves[kind])
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    bits = int(kind.removeprefix("rsa"))
    if bits >= 1024:
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    # cryptography makes no RSA key under 1024 bits; openssl does (into a file: never stdout).
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "small-key.pem"
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}",
             "-out", path],
            check=True, capture_output=True,
        )  # fmt: skip
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def make_cert(
    cn: str,
    key: Key,
    *,
    issuer: tuple[x509.Certificate, Key] | None = None,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    ca: bool | None = False,
    path_length: int | None = None,
    key_usage: str | None = "leaf",
    eku: Sequence[x509.ObjectIdentifier] | None = (SERVER_AUTH, CLIENT_AUTH),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    digest: hashes.HashAlgorithm | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    aki: str = "match",
    rsa_padding: padding.PSS | None = None,
) -> x509.Certificate:
    """A certificate as a careful (or careless) tool would make it."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - timedelta(hours=1))
        .not_valid_after(not_after or NOW + timedelta(days=365))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if aki == "match":
        signer_public = issuer_cert.public_key() if issuer_cert else key.public_key()
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_public),  # type: ignore[arg-type]
            critical=False,
        )
    elif aki == "mismatch":
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(os.urandom(20), None, None), critical=False
        )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca, path_length), critical=True)
    usages = {
        "leaf": {"digital_signature": True},
        "leaf+ke": {"digital_signature": True, "key_encipherment": True},
        "ca": {"digital_signature": True, "key_cert_sign": True, "crl_sign": True},
        "no-certsign": {"digital_signature": True, "crl_sign": True},
    }
    if key_usage is not None:
        flags = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
            False,
        )  # fmt: skip
        flags.update(usages[key_usage])
        builder = builder.add_extension(x509.KeyUsage(**flags), critical=True)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    names += [x509.IPAddress(IPv4Address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else digest
    if rsa_padding is not None:
        return builder.sign(issuer_key, algorithm or hashes.SHA256(), rsa_padding=rsa_padding)  # type: ignore[arg-type]
    return builder.sign(issuer_key, algorithm or hashes.SHA256())  # type: ignore[arg-type]


def make_ca(name: str, key: Key | None = None, **kwargs: Any) -> tuple[x509.Certificate, Key]:
    """A self-signed CA (Nomad's shape: no path length, keyCertSign) unless told otherwise."""
    key = key or new_key()
    kwargs.setdefault("ca", True)
    kwargs.setdefault("key_usage", "ca")
    kwargs.setdefault("eku", None)
    return make_cert(name, key, **kwargs), key


def write_pem(
    folder: Path, stem: str, certs: Sequence[x509.Certificate], key: Key | None
) -> tuple[Path, Path]:
    """``stem.pem`` (the certificates in order) and ``stem-key.pem`` (PKCS#8, 0600)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}-key.pem"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
    return cert_path, key_path


def cfssl_issue(
    folder: Path,
    stem: str,
    *,
    ca: Path,
    ca_key: Path,
    cn: str,
    hosts: Sequence[str],
    key: dict[str, Any] | None = None,
    usages: Sequence[str] = ("signing", "digital signature", "server auth", "client auth"),
    expiry: str = "8760h",
) -> Path:
    """A leaf made by real cfssl 1.6.5 (``gencert`` with a one-off profile), key 0600."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f".{stem}-config.json"
    config.write_text(json.dumps({"signing": {"default": {"usages": usages, "expiry": expiry}}}))
    csr = {"CN": cn, "hosts": list(hosts), "key": key or {"algo": "ecdsa", "size": 256}}
    # cfssl prints the key: its output goes to a file (named as a key file), never to a pipe
    # that the secret scan reads.
    raw = folder / f".{stem}-raw-key.pem"
    with raw.open("wb") as out:
        subprocess.run(
            [CFSSL, "gencert", "-ca", ca, "-ca-key", ca_key, "-config", config, "-"],
            input=json.dumps(csr).encode(),
            stdout=out,
            stderr=subprocess.DEVNULL,
            check=True,
        )
    data = json.loads(raw.read_bytes())
    raw.unlink()
    assert data.get("cert"), f"cfssl made no certificate for {stem}"
    (folder / f"{stem}.pem").write_text(data["cert"])
    (folder / f"{stem}-key.pem").write_text(data["key"])
    (folder / f"{stem}-key.pem").chmod(0o600)
    return folder / f"{stem}.pem"


def openssl_issue(folder: Path, ca: Path, ca_key: Path, digest: str) -> Path:
    """A server leaf signed by ``openssl x509 -req`` with ``digest`` (sha1, md5)."""
    key = new_key()
    write_pem(folder, "leaf", [], key)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.global.nomad")]))
        .sign(key, hashes.SHA256())
    )
    (folder / "leaf.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    (folder / "ext.cnf").write_text(
        "subjectAltName=DNS:server.global.nomad,DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n"
    )
    subprocess.run(
        ["openssl", "x509", "-req", "-in", folder / "leaf.csr", "-CA", ca, "-CAkey", ca_key,
         "-set_serial", "7", f"-{digest}", "-days", "30", "-extfile", folder / "ext.cnf",
         "-out", folder / "leaf.pem"],
        check=True, capture_output=True,
    )  # fmt: skip
    return folder / "leaf.pem"


# --- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One certificate (with its key and CA file) to judge in every role."""

    name: str
    made_by: str
    ca: Path
    cert: Path
    key: Path
    region: str = "global"


SERVER_HOSTS = ["server.global.nomad", "localhost", "127.0.0.1"]


def build_corpus(root: Path, kit: Path, other_kit: Path) -> list[Case]:
    """Every case: name, how it was made, and its files."""
    cases: list[Case] = []

    def add(
        name: str, made_by: str, ca: Path, cert: Path, key: Path | None = None, **kw: Any
    ) -> None:
        key = key or cert.with_name(cert.name.removesuffix(".pem") + "-key.pem")
        cases.append(Case(name, made_by, ca, cert, key, **kw))

    def folder(name: str) -> Path:
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    kit_ca, kit_key = kit / "ca.pem", kit / "ca-key.pem"
    for role in ROLES:
        add(f"cfwrap {role}", "cfwrap", kit_ca, kit / f"global-{role}-nomad.pem")

    # cfwrap cert for a region with capitals, and cfssl spelling that region in lowercase.
    eu = folder("eu") / "kit"
    assert main([str(a) for a in cert_argv(kit, "server", eu, "--region", "EU")]) == 0
    add("cfwrap server EU", "cfwrap", kit_ca, eu / "EU-server-nomad.pem", region="EU")
    f = folder("eu-lower")
    lower = cfssl_issue(f, "s", ca=kit_ca, ca_key=kit_key, cn="server.eu.nomad",
                        hosts=["server.eu.nomad", "localhost", "127.0.0.1"])  # fmt: skip
    add("server.eu.nomad for region EU", "cfssl", kit_ca, lower, region="EU")
    f = folder("upper")
    upper = cfssl_issue(f, "s", ca=kit_ca, ca_key=kit_key, cn="SERVER.GLOBAL.NOMAD",
                        hosts=["SERVER.GLOBAL.NOMAD", "localhost", "127.0.0.1"])  # fmt: skip
    add("SAN in capitals", "cfssl", kit_ca, upper)

    # Made the way `nomad tls ca create` / `nomad tls cert create` make them (generate.go).
    f = folder("nomad-tls")
    nca, nca_key = make_ca("Nomad Agent CA 1")
    ca_path, _ = write_pem(f, "nomad-agent-ca", [nca], nca_key)
    for role, dns, ips in (
        ("server", ["server.global.nomad", "localhost"], ["127.0.0.1"]),
        ("client", ["client.global.nomad", "localhost"], ["127.0.0.1"]),
        ("cli", ["cli.global.nomad", "localhost"], []),
    ):
        key = new_key()
        cert = make_cert(f"{role}.global.nomad", key, issuer=(nca, nca_key), dns=dns, ips=ips,
                         key_usage="leaf+ke")  # fmt: skip
        path, _ = write_pem(f, f"global-{role}-nomad", [cert], key)
        add(f"nomad tls {role}", "cryptography", ca_path, path)
    f = folder("nomad-tls-constrained")
    constraint = x509.NameConstraints(
        [x509.DNSName("global.nomad"), x509.DNSName("localhost")], None
    )
    cca, cca_key = make_ca("Nomad Agent CA 2", extensions=[(constraint, True)])
    ca_path, _ = write_pem(f, "nomad-agent-ca", [cca], cca_key)
    key = new_key()
    cert = make_cert("server.global.nomad", key, issuer=(cca, cca_key),
                     dns=["server.global.nomad", "localhost"], ips=["127.0.0.1"])  # fmt: skip
    path, _ = write_pem(f, "global-server-nomad", [cert], key)
    add("CA permits global.nomad", "cryptography", ca_path, path)

    # Names, with cfssl as users run it.
    def cfssl_case(name: str, cn: str, hosts: list[str], **kw: Any) -> None:
        cert = cfssl_issue(
            folder(name), "leaf", ca=kit_ca, ca_key=kit_key, cn=cn, hosts=hosts, **kw
        )
        add(name, "cfssl", kit_ca, cert)

    cfssl_case("CN only, SANs localhost", "server.global.nomad", ["localhost", "127.0.0.1"])
    cfssl_case("wildcard only", "*.global.nomad", ["*.global.nomad", "localhost", "127.0.0.1"])
    cfssl_case("wildcard beside server name", "server.global.nomad",
               ["*.global.nomad", *SERVER_HOSTS])  # fmt: skip
    cfssl_case("server and client names", "server.global.nomad",
               [*SERVER_HOSTS, "client.global.nomad"])  # fmt: skip
    cfssl_case("seed guide regionglobal", "regionglobal.nomad",
               ["server.regionglobal.nomad", "client.regionglobal.nomad"],
               usages=["signing", "key encipherment", "server auth", "client auth"])  # fmt: skip
    cfssl_case("no localhost, other IP", "server.global.nomad", ["server.global.nomad", "10.0.0.5"])
    cfssl_case("expiring in 10 days", "server.global.nomad", SERVER_HOSTS, expiry="240h")
    cfssl_case("RSA 2048 leaf", "server.global.nomad", SERVER_HOSTS,
               key={"algo": "rsa", "size": 2048},
               usages=["signing", "digital signature", "key encipherment", "server auth",
                       "client auth"])  # fmt: skip
    cfssl_case(
        "P-384 leaf", "server.global.nomad", SERVER_HOSTS, key={"algo": "ecdsa", "size": 384}
    )
    cfssl_case("serverAuth only", "server.global.nomad", SERVER_HOSTS,
               usages=["digital signature", "server auth"])  # fmt: skip

    # CAs that cfssl signs under without a word, and Go refuses (or accepts).
    def cfssl_under(name: str, ca_cert: x509.Certificate, ca_key: Key, *, made_by: str = "cfssl",
                    hosts: list[str] | None = None, expiry: str = "8760h") -> None:  # fmt: skip
        f = folder(name)
        ca_path, ca_key_path = write_pem(f, "ca", [ca_cert], ca_key)
        cert = cfssl_issue(f, "leaf", ca=ca_path, ca_key=ca_key_path, cn="server.global.nomad",
                           hosts=hosts or SERVER_HOSTS, expiry=expiry)  # fmt: skip
        add(name, made_by, ca_path, cert)

    excluded = x509.NameConstraints(None, [x509.DNSName("nomad")])
    cfssl_under("CA excludes .nomad", *make_ca("Excluding CA", extensions=[(excluded, True)]))
    permitted = x509.NameConstraints([x509.DNSName("example.com")], None)
    cfssl_under(
        "CA permits example.com only", *make_ca("Elsewhere CA", extensions=[(permitted, True)])
    )
    ip_only = x509.NameConstraints([x509.IPAddress(IPv4Network("10.0.0.0/8"))], None)
    cfssl_under("CA permits 10/8 IPs only", *make_ca("IP CA", extensions=[(ip_only, True)]))
    cfssl_under("CA codeSigning only", *make_ca("Code CA", eku=[ExtendedKeyUsageOID.CODE_SIGNING]))
    cfssl_under("CA serverAuth+clientAuth EKU", *make_ca("TLS CA", eku=[SERVER_AUTH, CLIENT_AUTH]))
    cfssl_under("CA not yet valid", *make_ca("Future CA", not_before=NOW + timedelta(days=30),
                                            not_after=NOW + timedelta(days=400)))  # fmt: skip
    cfssl_under("CA expired", *make_ca("Past CA", not_before=NOW - timedelta(days=400),
                                      not_after=NOW - timedelta(days=1)))  # fmt: skip
    cfssl_under("CA without key usage", *make_ca("No-KU CA", key_usage=None))
    cfssl_under("leaf outlives CA", *make_ca("Short CA", not_after=NOW + timedelta(days=30)))

    # Leaves cfssl will not make.
    def crafted(name: str, *, key: Key | None = None,
                issuer: tuple[x509.Certificate, Key] | None = None,
                chain: Sequence[x509.Certificate] = (), **kw: Any) -> None:  # fmt: skip
        f = folder(name)
        issuer = issuer or (nca, nca_key)
        ca_path, _ = write_pem(f, "ca", [issuer[0]], None)
        key = key or new_key()
        kw.setdefault("dns", ["server.global.nomad", "localhost"])
        kw.setdefault("ips", ["127.0.0.1"])
        cert = make_cert(kw.pop("cn", "server.global.nomad"), key, issuer=issuer, **kw)
        path, _ = write_pem(f, "leaf", [cert, *chain], key)
        add(name, "cryptography", ca_path, path)

    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    crafted("unknown critical extension", extensions=[(unknown, True)])
    crafted("unknown non-critical extension", extensions=[(unknown, False)])
    crafted("expired leaf", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1))
    crafted("leaf not yet valid", not_before=NOW + timedelta(days=1))
    # cryptography refuses to sign with SHA-1 or MD5; openssl still does.
    for name, digest, ca_key_kind in (("SHA-1 signature", "sha1", "p256"),
                                      ("MD5 signature", "md5", "rsa2048")):  # fmt: skip
        f = folder(name)
        weak_ca, weak_key = make_ca(f"{digest} CA", new_key(ca_key_kind))
        ca_path, ca_key_path = write_pem(f, "ca", [weak_ca], weak_key)
        add(name, "openssl", ca_path, openssl_issue(f, ca_path, ca_key_path, digest))
    crafted("RSA 512 leaf", key=new_key("rsa512"))
    crafted("RSA 1024 leaf", key=new_key("rsa1024"))
    crafted("Ed25519 leaf", key=new_key("ed25519"))
    # Curves: TLS signs with P-256, P-384 and P-521 only; Go's x509 cannot parse secp256k1.
    crafted("P-224 leaf", key=new_key("p224"))
    crafted("P-521 leaf", key=new_key("p521"))
    crafted("secp256k1 leaf", key=new_key("k256"))
    # A signature algorithm Go does not implement (SHA-224), from a CA it trusts.
    crafted("ECDSA-SHA224 signature", digest=hashes.SHA224())
    # RSASSA-PSS: Go takes it only with the salt as long as the hash, and MGF1 of that hash.
    rsa_ca = make_ca("RSA CA", new_key("rsa2048"))
    for name, mgf_hash, salt in (
        ("RSA-PSS signature, salt 32", hashes.SHA256(), 32),
        ("RSA-PSS signature, salt max", hashes.SHA256(), padding.PSS.MAX_LENGTH),
        ("RSA-PSS signature, MGF1 SHA-384", hashes.SHA384(), 32),
    ):
        pss = padding.PSS(mgf=padding.MGF1(mgf_hash), salt_length=salt)
        crafted(name, issuer=rsa_ca, rsa_padding=pss)
    # A CA, or an intermediate, on a curve Go's crypto/x509 cannot parse.
    k1_ca = make_ca("secp256k1 CA", new_key("k256"))
    crafted("secp256k1 CA", issuer=k1_ca)
    k1_key = new_key("k256")
    # Named so that the leaf's public key does not fall on the same base64 line as in its key
    # file (the suite's secret scan takes each long line of a key file for secret).
    k1_int = make_cert("Intermediate CA on secp256k1", k1_key, issuer=(nca, nca_key), ca=True,
                       key_usage="ca", eku=None)  # fmt: skip
    crafted("secp256k1 intermediate", issuer=(k1_int, k1_key), chain=[k1_int])
    # Key files Go reads past other blocks (tls.X509KeyPair takes the first *PRIVATE KEY).
    for name, before in (("key file: EC parameters first (openssl ecparam -genkey)", "params"),
                         ("key file: certificate first", "cert")):  # fmt: skip
        crafted(name)
        made = cases[-1]
        ec_key = serialization.load_pem_private_key(made.key.read_bytes(), None)
        assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
        sec1 = ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        first = (
            b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
            if before == "params"
            else made.cert.read_bytes()
        )
        made.key.write_bytes(first + sec1)
    # Labels Go does not go by (it tries PKCS #1, PKCS #8 and SEC 1 on any key block), and a
    # block that is not base64 (pem.Decode skips it).
    for name, label, fmt, junk in (
        ("key file: PKCS #8 labelled EC PRIVATE KEY", b"EC PRIVATE KEY",
         serialization.PrivateFormat.PKCS8, b""),
        ("key file: SEC 1 labelled PRIVATE KEY", b"PRIVATE KEY",
         serialization.PrivateFormat.TraditionalOpenSSL, b""),
        ("key file: a broken key block first", b"PRIVATE KEY", serialization.PrivateFormat.PKCS8,
         b"-----BEGIN PRIVATE KEY-----\nMIIB!!!!\n-----END PRIVATE KEY-----\n"),
    ):  # fmt: skip
        crafted(name)
        made = cases[-1]
        ec_key = serialization.load_pem_private_key(made.key.read_bytes(), None)
        assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
        der = ec_key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
        body = base64.encodebytes(der)
        made.key.write_bytes(
            junk + b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"
        )
    crafted("mismatched key identifier", aki="mismatch")
    crafted("no key identifiers", aki="none")
    crafted(
        "127.0.0.1 as a DNS name", dns=["server.global.nomad", "localhost", "127.0.0.1"], ips=[]
    )
    crafted("no EKU extension", eku=None)
    crafted("leaf is a CA, CA without path length", ca=True, key_usage="ca")
    f = folder("kit-ca")
    kit_ca_cert = x509.load_pem_x509_certificate(kit_ca.read_bytes())
    kit_ca_key = serialization.load_pem_private_key(kit_key.read_bytes(), None)
    assert isinstance(kit_ca_key, ec.EllipticCurvePrivateKey)
    crafted("leaf is a CA, CA with path length 0", issuer=(kit_ca_cert, kit_ca_key), ca=True,
            key_usage="ca")  # fmt: skip
    no_sign = make_ca("No-certsign CA", key_usage="no-certsign")
    crafted("CA without keyCertSign", issuer=no_sign)
    not_ca = make_ca("Not-a-CA CA", ca=False, key_usage="ca")
    crafted("CA is not a CA (CA:FALSE)", issuer=not_ca)
    crafted("CA without basic constraints", issuer=make_ca("Bare CA", ca=None))

    # Chains through intermediates; ca_file holds the root only.
    root_ca, root_key = make_ca("Root CA")
    ik1 = new_key()
    int1 = make_cert(
        "Intermediate 1", ik1, issuer=(root_ca, root_key), ca=True, key_usage="ca", eku=None
    )
    ik2 = new_key()
    int2 = make_cert("Intermediate 2", ik2, issuer=(int1, ik1), ca=True, key_usage="ca", eku=None)
    crafted("chain: leaf + intermediate", issuer=(int1, ik1), chain=[int1])
    root_path = write_pem(folder("root"), "root", [root_ca], None)[0]
    cases[-1] = Case(cases[-1].name, "cryptography", root_path, cases[-1].cert, cases[-1].key)

    def chained(name: str, issuer: tuple[x509.Certificate, Key], chain: Sequence[x509.Certificate],
                **kw: Any) -> None:  # fmt: skip
        crafted(name, issuer=issuer, chain=chain, **kw)
        last = cases[-1]
        cases[-1] = Case(last.name, last.made_by, root_path, last.cert, last.key)

    chained("chain: intermediate missing", (int1, ik1), [])
    chained("chain: two intermediates, top one first", (int2, ik2), [int1, int2])
    chained("chain: two intermediates in order", (int2, ik2), [int2, int1])
    expired_int = make_cert("Old Intermediate", ik1, issuer=(root_ca, root_key), ca=True,
                            key_usage="ca", eku=None, not_before=NOW - timedelta(days=400),
                            not_after=NOW - timedelta(days=1))  # fmt: skip
    chained("chain: intermediate expired", (expired_int, ik1), [expired_int])
    code_int = make_cert("Code Intermediate", ik1, issuer=(root_ca, root_key), ca=True,
                         key_usage="ca", eku=[ExtendedKeyUsageOID.CODE_SIGNING])  # fmt: skip
    chained("chain: intermediate codeSigning only", (code_int, ik1), [code_int])
    f = folder("order")
    good = cases[[c.name for c in cases].index("chain: leaf + intermediate")]
    leaf_cert = x509.load_pem_x509_certificate(good.cert.read_bytes())
    wrong = f / "leaf.pem"
    wrong.write_bytes(int1.public_bytes(serialization.Encoding.PEM)
                      + leaf_cert.public_bytes(serialization.Encoding.PEM))  # fmt: skip
    shutil.copy(good.key, f / "leaf-key.pem")
    add("chain: intermediate before leaf", "cryptography", root_path, wrong)
    # Path length: cfwrap's CA says 0, so nothing may sit between it and a leaf.
    pl_int = make_cert("Under pathlen 0", ik1, issuer=(kit_ca_cert, kit_ca_key), ca=True,
                       key_usage="ca", eku=None)  # fmt: skip
    crafted("chain: intermediate under path length 0", issuer=(pl_int, ik1), chain=[pl_int])
    cases[-1] = Case(cases[-1].name, "cfssl+cryptography", kit_ca, cases[-1].cert, cases[-1].key)

    # Wrong pairings with cfwrap's own files.
    add("signed by another CA", "cfwrap", kit_ca, other_kit / "global-server-nomad.pem")
    f = folder("mismatch")
    shutil.copy(kit / "global-server-nomad.pem", f / "leaf.pem")
    shutil.copy(kit / "global-client-nomad-key.pem", f / "leaf-key.pem")
    add("key of another certificate", "cfwrap", kit_ca, f / "leaf.pem")

    # PEM as Go's encoding/pem reads it: blanks after a BEGIN line, CRLF, indented base64 and
    # text around blocks are fine, a label in lower case is not; and in a CA file a CERTIFICATE
    # block with headers, or under another label, is skipped (CertPool.AppendCertsFromPEM).
    base = cases[[c.name for c in cases].index("nomad tls server")]

    def respelled(name: str, part: str, change: Callable[[bytes], bytes]) -> None:
        f = folder(name)
        made = {"ca": f / "ca.pem", "cert": f / "leaf.pem", "key": f / "leaf-key.pem"}
        for which, source in (("ca", base.ca), ("cert", base.cert), ("key", base.key)):
            data = source.read_bytes()
            made[which].write_bytes(change(data) if which == part else data)
        made["key"].chmod(0o600)
        add(name, "cryptography", made["ca"], made["cert"])

    def blanks(pem: bytes) -> bytes:
        return re.sub(rb"(-----BEGIN [A-Z ]+-----)\n", rb"\1 \t\n", pem)

    def crlf_indented(pem: bytes) -> bytes:
        return re.sub(rb"\n(?=[A-Za-z0-9+/])", b"\n  ", pem).replace(b"\n", b"\r\n")

    def lower_labels(pem: bytes) -> bytes:
        return re.sub(rb"(BEGIN|END) ([A-Z ]+)-----", lambda m: m[0].lower(), pem)

    def with_headers(pem: bytes) -> bytes:
        return re.sub(rb"(-----BEGIN [A-Z ]+-----)\n", rb"\1\nComment: a header\n\n", pem)

    broken = b"-----BEGIN CERTIFICATE-----\nMIIBaaaa\n-----END CERTIFICATE-----\n"
    for name, part, change in (
        ("PEM: blanks after BEGIN in the cert file", "cert", blanks),
        ("PEM: cert file in CRLF, indented", "cert", crlf_indented),
        ("PEM: cert file label in lower case", "cert", lower_labels),
        ("PEM: text before the certificate", "cert", lambda b: b"issued today\n" + b),
        ("PEM: a damaged certificate after the leaf", "cert", lambda b: b + broken),
        ("PEM: a damaged certificate before the leaf", "cert", lambda b: broken + b),
        # Go skips the block whose END line has more on it, and takes the client's as the leaf.
        ("PEM: the leaf's END line damaged, another certificate after", "cert",
         lambda b: b.replace(b"-----END CERTIFICATE-----", b"-----END CERTIFICATE----- x")
         + (base.cert.parent / "global-client-nomad.pem").read_bytes()),
        ("PEM: a header in the key file", "key", with_headers),
        ("PEM: blanks after BEGIN in the key file", "key", blanks),
        ("PEM: key file in CRLF, indented", "key", crlf_indented),
        ("PEM: key file label in lower case", "key", lower_labels),
        ("PEM: CA file in CRLF, indented", "ca", crlf_indented),
        ("PEM: CA with headers, alone", "ca", with_headers),
        ("PEM: CA with headers, then without", "ca", lambda b: with_headers(b) + b),
        ("PEM: a damaged block before the CA", "ca", lambda b: broken + b),
        ("PEM: X509 CERTIFICATE label before the CA", "ca",
         lambda b: b.replace(b"CERTIFICATE", b"X509 CERTIFICATE") + b),
        ("PEM: CA as TRUSTED CERTIFICATE", "ca", lambda b: b.replace(b"CERTIFICATE",
                                                                     b"TRUSTED CERTIFICATE")),
    ):  # fmt: skip
        respelled(name, part, change)
    # A CA file of many CAs with the CA's own name (Go orders them by key identifier, and keeps
    # one of each copy): past Go's bound of 100 signature checks if taken in file order.
    namesakes = b"".join(
        make_ca("Nomad Agent CA 1")[0].public_bytes(serialization.Encoding.PEM) for _ in range(120)
    )
    respelled("CA file: 120 other CAs of its name first", "ca", lambda b: namesakes + b)
    copy = make_ca("Nomad Agent CA 1")[0].public_bytes(serialization.Encoding.PEM)
    respelled("CA file: 150 copies of a CA of its name first", "ca", lambda b: copy * 150 + b)
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, kits, other_kit) -> list[Case]:
    """The corpus, made once for this module."""
    return build_corpus(tmp_path_factory.mktemp("corpus"), kits["global"], other_kit)


def go_verdicts(cases: Sequence[Case]) -> dict[tuple[str, str], dict[str, Any]]:
    """The Go peer's verdict for every case in every role."""
    peer = build_gopeer()
    request = [
        {"name": c.name, "ca": str(c.ca), "cert": str(c.cert), "key": str(c.key), "role": role,
         "region": c.region}
        for c in cases
        for role in ROLES
    ]  # fmt: skip
    done = subprocess.run(
        [peer], input=json.dumps(request), capture_output=True, text=True, check=True, timeout=600
    )
    return {(v["name"], v["role"]): v for v in json.loads(done.stdout)}


def doctor_verdict(case: Case, role: str) -> tuple[str, str]:
    """doctor on the loose files: ("error"|"warning"|"ok", the checks that say so)."""
    from cfwrap import doctor

    report = doctor.diagnose_files(
        cert=case.cert, key=case.key, ca=case.ca, role=role, region=case.region,  # type: ignore[arg-type]
        options=doctor.Options(),
    )  # fmt: skip
    for severity in ("error", "warning"):
        checks = sorted({f.check for f in report.findings if f.severity == severity})
        if checks:
            return severity, ",".join(checks)
    return "ok", ""


def agreement_table(cases: Sequence[Case]) -> tuple[list[tuple[str, ...]], int]:
    """Every row (case, made by, role, Go, Go's rule, doctor, doctor's checks) and disagreements."""
    verdicts = go_verdicts(cases)
    rows: list[tuple[str, ...]] = []
    disagreements = 0
    for case in cases:
        for role in ROLES:
            go = verdicts[(case.name, role)]
            severity, checks = doctor_verdict(case, role)
            agree = (go["verdict"] == "refuse") == (severity == "error")
            disagreements += not agree
            rows.append((
                "" if agree else "DISAGREE", case.name, case.made_by, role, go["verdict"],
                go.get("rule") or "", (go.get("error") or "")[:70], severity, checks[:60],
            ))  # fmt: skip
    return rows, disagreements


def render(rows: Sequence[tuple[str, ...]]) -> str:
    """The table as aligned text."""
    header = ("", "case", "made by", "role", "Go", "Go rule", "Go error", "doctor", "doctor checks")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def test_doctor_agrees_with_the_go_peer_on_every_case(corpus, capsys):
    assert len(corpus) >= 30
    started = time.monotonic()
    rows, disagreements = agreement_table(corpus)
    with capsys.disabled():
        print(f"\n{render(rows)}")
        print(
            f"{len(corpus)} cases x {len(ROLES)} roles = {len(rows)} rows, "
            f"{sum(r[4] == 'refuse' for r in rows)} refused by Go, "
            f"{disagreements} disagreement(s), {time.monotonic() - started:.1f}s"
        )
    assert disagreements == 0


def test_the_peer_accepts_each_good_certificate_in_its_own_role(corpus):
    """The oracle itself: good certificates pass in their role and are refused in the others."""
    verdicts = go_verdicts([c for c in corpus if c.name.startswith(("cfwrap ", "nomad tls "))])
    for role in ROLES:
        for made in ("cfwrap", "nomad tls"):
            assert verdicts[(f"{made} {role}", role)]["verdict"] == "accept", (made, role)
            for other in set(ROLES) - {role}:
                assert verdicts[(f"{made} {role}", other)]["verdict"] == "refuse", (made, role)


#: The rule doctor must name for a case judged as a server (the verdict alone can hide a check
#: that another one masks: cryptography refuses SHA-1 too, ca.constraints flags the CA too).
RULES = {
    "SHA-1 signature": ("chain.insecure-signature", "signed with ECDSA-SHA1"),
    "MD5 signature": ("chain.insecure-signature", "signed with MD5-RSA"),
    "CA without keyCertSign": ("chain", "without keyCertSign"),
    "CA is not a CA (CA:FALSE)": ("chain", "is not a CA"),
    "CA excludes .nomad": ("chain.name-constraints", "excludes server.global.nomad"),
    "CA permits 10/8 IPs only": ("chain.name-constraints", "does not permit 127.0.0.1"),
    "CA codeSigning only": ("chain.usage", "restricts extended key usage"),
    "chain: intermediate codeSigning only": ("chain.usage", "restricts extended key usage"),
    "CA not yet valid": ("chain.dates", "is not valid before"),
    "chain: intermediate expired": ("chain.dates", "expired on"),
    "chain: intermediate under path length 0": ("chain.path-length", "allows 0 intermediate"),
    "unknown critical extension": ("cert.critical-extension", "1.3.6.1.4.1.99999.1"),
    "Ed25519 leaf": ("key.type", "Nomad cannot use"),
    "RSA 512 leaf": ("key.type", "Nomad cannot use"),
    "P-224 leaf": ("key.type", "Nomad cannot use"),
    "secp256k1 leaf": ("key.type", "Nomad cannot use"),
    "ECDSA-SHA224 signature": ("chain.unsupported-signature", "which Go does not implement"),
    "CN only, SANs localhost": ("names.server", "Go checks the SANs only"),
    "server.eu.nomad for region EU": ("names.server", "not spelled exactly"),
    "SAN in capitals": ("names.server", "not spelled exactly"),
    "wildcard beside server name": ("names.wildcard", "Go accepts it as client.global.nomad"),
    "leaf is a CA, CA without path length": ("cert.is-ca", "a CA certificate"),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_doctor_names_the_rule(corpus, name):
    from cfwrap import doctor

    case = next(c for c in corpus if c.name == name)
    report = doctor.diagnose_files(
        cert=case.cert, key=case.key, ca=case.ca, role="server", region=case.region,
        options=doctor.Options(),
    )  # fmt: skip
    check, words = RULES[name]
    errors = {f.check: f.message for f in report.findings if f.severity == "error"}
    assert check in errors, errors
    assert words in errors[check]
