"""Tests that kill mutmut's survivors in kit.py's checks (scripts/mutation kit).

A wrapper around the real cfssl 1.6.5 makes it misbehave the way it can (its silent fallback
when ``-profile`` is missing, another CA than asked); certificates for load_ca are made here with
cryptography. Exit codes and messages are written out here.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import CFSSL_DIR


def _wrapped_cfssl(root: Path, body: str) -> Path:
    """A cfssl that runs ``body`` (sh, with $@ the argv) before the real one."""
    (root / "bin").mkdir(parents=True)
    fake = root / "bin" / "cfssl"
    fake.write_text(f'#!/bin/sh\n{body}\nexec {CFSSL_DIR / "cfssl"} "$@"\n')
    fake.chmod(0o755)
    (root / "package.json").write_text(
        json.dumps({"package": "golang-cfssl", "version": "1.6.5-wrapped-test"})
    )
    return root / "bin"


# Drop "-profile NAME": cfssl then signs with its default profile and says nothing.
NO_PROFILE = """
for a; do shift; if [ "$skip" ]; then skip=; continue; fi
  if [ "$a" = -profile ]; then skip=1; continue; fi; set -- "$@" "$a"; done
"""


def test_a_certificate_issued_without_its_profile_is_refused(cli, tmp_path):
    bin_dir = _wrapped_cfssl(tmp_path / "fake", NO_PROFILE)
    result = cli("--cfssl-dir", bin_dir, "quickstart", "--out", tmp_path / "kit")
    assert result.code == 7, result.err
    assert "the server certificate cfssl issued: " in result.err
    assert "check that cfssl is 1.6.5 (cfwrap --version) and report this" in result.err
    assert not (tmp_path / "kit").exists()


def test_a_certificate_signed_by_another_ca_is_refused(cli, tmp_path, other_kit):
    swap = f"""
for a; do shift
  case "$prev" in -ca) a={other_kit / "ca.pem"};; -ca-key) a={other_kit / "ca-key.pem"};; esac
  prev=$a; set -- "$@" "$a"; done
"""
    bin_dir = _wrapped_cfssl(tmp_path / "fake", swap)
    result = cli("--cfssl-dir", bin_dir, "quickstart", "--out", tmp_path / "kit")
    assert result.code == 7, result.err
    assert "certificate cfssl issued: it is not signed by the CA" in result.err
    assert not (tmp_path / "kit").exists()


def test_a_leaf_that_outlives_its_ca_is_refused_before_cfssl_runs(cli, tmp_path):
    calls = tmp_path / "calls"
    bin_dir = _wrapped_cfssl(tmp_path / "fake", f'echo "$@" >> {calls}')
    result = cli(
        "--cfssl-dir", bin_dir, "quickstart", "--out", tmp_path / "kit",
        "--expiry", "50000h", "--ca-expiry", "43800h",
    )  # fmt: skip
    assert result.code == 3, result.err
    assert (
        "--expiry 50000h: the server certificate would outlive its CA (43800h), or end with it: "
        "a leaf must end at least 1h before its CA; shorten --expiry or lengthen --ca-expiry"
    ) in result.err
    assert not calls.exists() or "gencert" not in calls.read_text()
    assert not (tmp_path / "kit").exists()
    equal = cli(
        "--cfssl-dir", bin_dir, "quickstart", "--out", tmp_path / "kit2",
        "--expiry", "43800h", "--ca-expiry", "43800h",
    )  # fmt: skip
    # As long as its CA is refused: cfssl rounds each start to the minute, so such a leaf
    # ends a minute after its CA when the two calls straddle half a minute.
    assert equal.code == 3, equal.err
    shorter = cli(
        "--cfssl-dir", bin_dir, "quickstart", "--out", tmp_path / "kit3",
        "--expiry", "43799h", "--ca-expiry", "43800h",
    )  # fmt: skip
    assert shorter.code == 0, shorter.err


def _self_signed(
    tmp_path: Path, *, ca: bool, days: tuple[int, int], sign: bool | None = None
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca if sign is None else sign,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path / f"ca-{ca}-{days[1]}-{sign}"
    folder.mkdir()
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "ca-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder / "ca.pem", folder / "ca-key.pem"


def _cert(cli, ca: Path, key: Path, out: Path):
    return cli("cert", "--ca", ca, "--ca-key", key, "--role", "server", "--out", out)


def test_load_ca_refuses_an_expired_ca(cli, tmp_path):
    ca, key = _self_signed(tmp_path, ca=True, days=(-30, -1))
    result = _cert(cli, ca, key, tmp_path / "out")
    assert result.code == 3
    expired = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%Y-%m-%d")
    assert f"{ca}: the CA expired on {expired}; make a new CA with `cfwrap ca`" in result.err
    assert not (tmp_path / "out").exists()


def test_load_ca_refuses_a_leaf_and_a_foreign_key(cli, tmp_path, kits, other_kit):
    leaf, leaf_key = _self_signed(tmp_path, ca=False, days=(-1, 30))
    result = _cert(cli, leaf, leaf_key, tmp_path / "out")
    assert result.code == 3
    assert (
        f"{leaf}: CN=Test CA is not a CA certificate (it needs CA:TRUE, and keyCertSign among "
        "its key usages if it lists any); give the CA certificate, not a leaf"
    ) in result.err
    kit = kits["global"]
    foreign = _cert(cli, kit / "ca.pem", other_kit / "ca-key.pem", tmp_path / "out")
    assert foreign.code == 3
    assert (
        f"{other_kit / 'ca-key.pem'}: this key does not belong to {kit / 'ca.pem'}; "
        "give the CA's own key"
    ) in foreign.err
    missing = _cert(cli, tmp_path / "nope.pem", kit / "ca-key.pem", tmp_path / "out")
    assert missing.code == 3
    assert f"{tmp_path / 'nope.pem'}: No such file or directory; give the CA's files" in missing.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["cert", "key"])
def test_load_ca_refuses_files_that_do_not_parse(cli, tmp_path, kits, bad):
    kit = kits["global"]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem\n")
    ca, key = (junk, kit / "ca-key.pem") if bad == "cert" else (kit / "ca.pem", junk)
    result = _cert(cli, ca, key, tmp_path / "out")
    assert result.code == 3
    fix = "give the CA certificate (ca.pem)" if bad == "cert" else "give the CA's private key"
    assert f"{junk}: " in result.err
    assert fix in result.err


# Second round: what the first run of scripts/mutation kit left alive.


def _python_wrapper(root: Path, body: str) -> Path:
    """A cfssl that runs the real one and lets ``body`` change its JSON output."""
    import sys

    (root / "bin").mkdir(parents=True)
    fake = root / "bin" / "cfssl"
    fake.write_text(
        f"#!{sys.executable}\nimport json, subprocess, sys\n"
        f"out = json.loads(subprocess.run([{str(CFSSL_DIR / 'cfssl')!r}, *sys.argv[1:]],"
        " capture_output=True, check=True).stdout)\n"
        f"{body}\nprint(json.dumps(out))\n"
    )
    fake.chmod(0o755)
    (root / "package.json").write_text(
        json.dumps({"package": "golang-cfssl", "version": "1.6.5-wrapped-test"})
    )
    return root / "bin"


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (["key"], "its key does not match it"),
        (["csr"], "its CSR is not signed by the same key"),
        (["key", "csr"], "its key does not match it; its CSR is not signed by the same key"),
    ],
)
def test_a_certificate_with_another_key_or_csr_is_refused(
    cli, tmp_path, other_kit, fields, problem
):
    suffix = {"key": "-key.pem", "csr": ".csr"}
    # Paths, not contents: the wrapper must hold no key (the session's secret scan reads it).
    other = {f: str(other_kit / f"global-server-nomad{suffix[f]}") for f in fields}
    body = (
        "if '-initca' not in sys.argv:\n"
        f"    out.update({{k: open(v).read() for k, v in {other!r}.items()}})"
    )
    bin_dir = _python_wrapper(tmp_path / "fake", body)
    result = cli("--cfssl-dir", bin_dir, "quickstart", "--out", tmp_path / "kit")
    assert result.code == 7, result.err
    assert result.err.splitlines()[-1] == (
        f"cfwrap: error: the server certificate cfssl issued: {problem}; "
        "check that cfssl is 1.6.5 (cfwrap --version) and report this"
    )
    assert not (tmp_path / "kit").exists()


def test_a_certificate_signed_by_another_ca_is_refused_in_one_exact_line(cli, tmp_path, other_kit):
    swap = f"""
for a; do shift
  case "$prev" in -ca) a={other_kit / "ca.pem"};; -ca-key) a={other_kit / "ca-key.pem"};; esac
  prev=$a; set -- "$@" "$a"; done
"""
    bin_dir = _wrapped_cfssl(tmp_path / "fake", swap)
    result = cli("--cfssl-dir", bin_dir, "quickstart", "--out", tmp_path / "kit")
    assert result.err.splitlines()[-1].startswith(
        "cfwrap: error: the server certificate cfssl issued: it is not signed by the CA"
    )


def test_the_kit_check_refuses_a_foreign_chain_or_a_wrong_key_and_only_what_it_is_asked(
    kits, other_kit, tmp_path
):
    from cfwrap import kit as kit_module
    from cfwrap import manifest
    from cfwrap.errors import VerificationError

    good = kits["global"]
    folder = tmp_path / "k"
    folder.mkdir()
    for name in ("ca.pem", "global-client-nomad.pem"):
        (folder / name).write_bytes((good / name).read_bytes())
    (folder / "global-server-nomad.pem").write_bytes(
        (other_kit / "global-server-nomad.pem").read_bytes()
    )
    built = manifest.build(folder, [])
    with pytest.raises(VerificationError) as caught:
        kit_module._check_kit(built)
    assert str(caught.value) == (
        "global-server-nomad.pem: its chain to the CA or its key pairing did not verify"
    )
    kit_module._check_kit(built, only=["ca.pem", "global-client-nomad.pem"])
    with pytest.raises(VerificationError):
        kit_module._check_kit(built, only=["global-server-nomad.pem"])
    # The right chain with the wrong key is refused too.
    (folder / "global-server-nomad.pem").write_bytes(
        (good / "global-server-nomad.pem").read_bytes()
    )
    (folder / "global-server-nomad-key.pem").write_bytes(
        (good / "global-client-nomad-key.pem").read_bytes()
    )
    with pytest.raises(VerificationError, match=r"global-server-nomad\.pem: its chain"):
        kit_module._check_kit(manifest.build(folder, []))
    (folder / "global-server-nomad-key.pem").unlink()
    kit_module._check_kit(manifest.build(folder, []))  # no key in the folder: judged by chain


def test_load_ca_messages_are_exact_lines(cli, tmp_path, kits, other_kit):
    kit = kits["global"]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem\n")
    cases = [
        ((junk, kit / "ca-key.pem"),
         f"{junk}: not a PEM certificate (found: no PEM block); give the CA certificate (ca.pem)"),
        ((kit / "ca.pem", junk),
         f"{junk}: not a PEM private key (found: no PEM block); give the CA's private key "
         "(ca-key.pem)"),
        ((kit / "ca.pem", other_kit / "ca-key.pem"),
         f"{other_kit / 'ca-key.pem'}: this key does not belong to {kit / 'ca.pem'}; give the "
         "CA's own key"),
        ((kit / "ca.pem", tmp_path / "nokey.pem"),
         f"{tmp_path / 'nokey.pem'}: No such file or directory; give the CA's files with --ca "
         "and --ca-key"),
    ]  # fmt: skip
    for (ca, key), line in cases:
        result = _cert(cli, ca, key, tmp_path / "out")
        assert result.code == 3
        assert result.err.splitlines()[-1] == f"cfwrap: error: {line}"
    leaf, leaf_key = _self_signed(tmp_path, ca=False, days=(-1, 30))
    result = _cert(cli, leaf, leaf_key, tmp_path / "out")
    assert result.err.splitlines()[-1] == (
        f"cfwrap: error: {leaf}: CN=Test CA is not a CA certificate (it needs CA:TRUE, "
        "and keyCertSign among its key usages if it lists any); give the CA certificate, not a leaf"
    )
    ca, key = _self_signed(tmp_path, ca=True, days=(-30, -1))
    expired = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%Y-%m-%d")
    assert _cert(cli, ca, key, tmp_path / "out").err.splitlines()[-1] == (
        f"cfwrap: error: {ca}: the CA expired on {expired}; make a new CA with `cfwrap ca`"
    )


def test_a_user_ca_that_is_good_issues_a_certificate_it_signed(cli, tmp_path):
    ca, key = _self_signed(tmp_path, ca=True, days=(-1, 3650))
    result = _cert(cli, ca, key, tmp_path / "out")
    assert result.code == 0, result.err
    issued = x509.load_pem_x509_certificate(
        (tmp_path / "out" / "global-server-nomad.pem").read_bytes()
    )
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
    assert (tmp_path / "out" / "ca.pem").read_bytes() == ca.read_bytes()


def test_a_ca_without_key_cert_sign_is_refused(cli, tmp_path):
    ca, key = _self_signed(tmp_path, ca=True, days=(-1, 3650), sign=False)
    result = _cert(cli, ca, key, tmp_path / "out")
    assert result.err.splitlines()[-1] == (
        f"cfwrap: error: {ca}: CN=Test CA is not a CA certificate (it needs CA:TRUE, "
        "and keyCertSign among its key usages if it lists any); give the CA certificate, not a leaf"
    )


def test_a_folder_of_another_ca_names_the_ca_given(cli, tmp_path, kits, other_kit):
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "ca.pem").write_bytes((other_kit / "ca.pem").read_bytes())
    kit = kits["global"]
    result = _cert(cli, kit / "ca.pem", kit / "ca-key.pem", folder)
    assert result.err.splitlines()[-1] == (
        f"cfwrap: error: {folder / 'ca.pem'}: holds another CA than {kit / 'ca.pem'}; issue "
        "into a folder of this CA's kit, or a new folder"
    )
