"""cert and quickstart verify what they issue as Go would; doctor's agent checks (issue 10)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from cfwrap import verify
from tests.conftest import cert_argv, snapshot
from tests.handmade import copy_kit
from tests.test_go_agreement import (
    CLIENT_AUTH,
    SERVER_AUTH,
    Case,
    go_verdicts,
    make_ca,
    make_cert,
    new_key,
    write_pem,
)

NOW = datetime.now(UTC)

#: The three CAs of issue 10: cfssl signs under each without a word; Go refuses what it signs.
#: A CA not valid yet is refused before cfssl runs (bad input), the others after (exit 7).
BAD_CAS: dict[str, tuple[dict[str, Any], int, str]] = {
    "name-constrained": (
        {"extensions": [(x509.NameConstraints(None, [x509.DNSName("nomad")]), True)]},
        7,
        "Go would refuse it (name-constraints)",
    ),
    "codesigning-only": (
        {"eku": [ExtendedKeyUsageOID.CODE_SIGNING]},
        7,
        "Go would refuse it (extended-key-usage)",
    ),
    "not-yet-valid": (
        {"not_before": NOW + timedelta(days=30), "not_after": NOW + timedelta(days=400)},
        3,
        "the CA is not valid before",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CAS))
@pytest.mark.parametrize("into", ["new folder", "existing kit"])
def test_cert_refuses_what_go_would_refuse_and_writes_nothing(cli, kits, tmp_path, name, into):
    kwargs, code, said = BAD_CAS[name]
    ca_dir = tmp_path / "ca"
    ca_cert, ca_key = make_ca(name, **kwargs)
    write_pem(ca_dir, "ca", [ca_cert], ca_key)
    if into == "new folder":
        out = tmp_path / "out"
    else:
        # A folder that already holds this CA (and nothing it could damage).
        out = tmp_path / "kit"
        out.mkdir()
        (out / "ca.pem").write_bytes((ca_dir / "ca.pem").read_bytes())
    before = snapshot(tmp_path)
    result = cli(*cert_argv(ca_dir, "server", out, "--expiry", "720h"))
    assert result.code == code, result.err
    assert snapshot(tmp_path) == before  # nothing written, nothing left behind
    assert len(result.err.strip().splitlines()) == 1
    assert said in result.err
    assert result.out == ""


def test_quickstart_and_cert_issue_what_go_accepts(kits):
    """Every certificate of a kit passes verify.check_issued (kit.py ran it before writing)."""
    kit = kits["eu-west-1"]
    roots = verify.load_pem_certificates((kit / "ca.pem").read_bytes())
    for role in ("server", "client", "cli"):
        leaf = x509.load_pem_x509_certificate((kit / f"eu-west-1-{role}-nomad.pem").read_bytes())
        verify.check_issued(leaf, roots=roots, role=role, region="eu-west-1", now=NOW)
        if role == "cli":
            continue  # nothing checks a CLI certificate's name: any region's works
        with pytest.raises(verify.VerifyError) as refused:
            verify.check_issued(leaf, roots=roots, role=role, region="global", now=NOW)
        assert refused.value.rule == "hostname"


def _cryptography_accepts(ca: x509.Certificate, leaf: x509.Certificate) -> bool:
    verifier = (
        PolicyBuilder()
        .store(Store([ca]))
        .time(NOW)
        .build_server_verifier(x509.DNSName("server.global.nomad"))
    )
    try:
        verifier.verify(leaf, [])
    except VerificationError:
        return False
    return True


def test_where_cryptography_and_go_differ_go_wins(tmp_path):
    """cryptography's x509.verification refuses these; Go (and so cfwrap.verify) accepts them."""
    plain_ca, plain_key = make_ca("Plain CA")
    no_ku_ca, no_ku_key = make_ca("No-KU CA", key_usage=None)
    samples: dict[str, tuple[x509.Certificate, Any, dict[str, Any]]] = {
        "no key identifiers": (plain_ca, plain_key, {"aki": "none"}),
        "CA without key usage": (no_ku_ca, no_ku_key, {}),
        "leaf is a CA": (plain_ca, plain_key, {"ca": True, "key_usage": "ca"}),
    }
    cases = []
    for name, (ca, ca_key, kwargs) in samples.items():
        key = new_key()
        leaf = make_cert("server.global.nomad", key, issuer=(ca, ca_key),
                         dns=["server.global.nomad", "localhost"], ips=["127.0.0.1"],
                         eku=[SERVER_AUTH, CLIENT_AUTH], **kwargs)  # fmt: skip
        assert not _cryptography_accepts(ca, leaf), name
        verify.verify(leaf, roots=[ca], now=NOW, usage="serverAuth", host="server.global.nomad")
        folder = tmp_path / name.replace(" ", "-")
        ca_path, _ = write_pem(folder, "ca", [ca], None)
        cert, key_path = write_pem(folder, "leaf", [leaf], key)
        cases.append(Case(name, "cryptography", ca_path, cert, key_path))
    verdicts = go_verdicts(cases)
    for case in cases:
        # A CA leaf under a CA without a path length could mint certificates: Go refuses that
        # as a must-fail (issue-under), not on the chain itself.
        expected = "refuse" if case.name == "leaf is a CA" else "accept"
        assert verdicts[(case.name, "server")]["verdict"] == expected, verdicts[
            (case.name, "server")
        ]
        if expected == "refuse":
            assert verdicts[(case.name, "server")]["rule"] == "issue-under"


def test_go_hostname_rules():
    key, (ca, ca_key) = new_key(), make_ca("CA")
    leaf = make_cert("server.global.nomad", key, issuer=(ca, ca_key),
                     dns=["*.Global.NOMAD", "localhost"], ips=["127.0.0.1"])  # fmt: skip
    assert verify.matches_host(leaf, "server.global.nomad")  # wildcard, any case
    assert not verify.matches_host(leaf, "a.server.global.nomad")  # one label only
    assert verify.matches_host(leaf, "127.0.0.1")
    assert not verify.matches_host(leaf, "10.0.0.1")
    assert verify.raft_ok(leaf, "global")  # the CN counts for Raft
    assert verify.rpc_peer_ok(leaf, "global")  # ... and for the RPC check (CN server.*)
    cn_only = make_cert("server.global.nomad", key, issuer=(ca, ca_key), dns=["localhost"])
    assert not verify.matches_host(cn_only, "server.global.nomad")  # Go ignores the CN
    assert verify.host_error(cn_only, "server.global.nomad") == (
        "x509: certificate is valid for localhost, not server.global.nomad"
    )


# --- doctor's agent checks ----------------------------------------------------------------------


def _doctor(cli, *args: str | Path) -> tuple[int, dict[str, dict[str, Any]]]:
    result = cli("doctor", "--json", *args)
    report = json.loads(result.out)
    return result.code, {f"{Path(f['path']).name}:{f['check']}": f for f in report["findings"]}


def test_server_without_encrypt_is_a_warning(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    hcl = kit / "global-server.hcl"
    lines = hcl.read_text().splitlines(keepends=True)
    start = lines.index("server {\n")
    hcl.write_text("".join(lines[:start] + lines[start + lines[start:].index("}\n") + 1 :]))
    code, found = _doctor(cli, kit)
    assert found["global-server.hcl:hcl.gossip"]["severity"] == "warning"
    assert "gossip between servers is in clear" in found["global-server.hcl:hcl.gossip"]["message"]
    errors = [k for k, f in found.items() if f["severity"] == "error"]
    assert errors == [] and code == 0


@pytest.mark.parametrize("version", ["tls10", "tls11", "ssl3"])
def test_tls_below_1_2_is_an_error(cli, kits, tmp_path, version):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    hcl = kit / "global-client.hcl"
    hcl.write_text(
        hcl.read_text().replace(
            "  rpc  = true\n", f'  rpc  = true\n  tls_min_version = "{version}"\n'
        )
    )
    code, found = _doctor(cli, kit)
    assert code == 7
    finding = found["global-client.hcl:hcl.tls_min_version"]
    assert finding["severity"] == "error"
    assert finding["fix"].startswith('set tls_min_version = "tls12"')


def test_tls_1_2_and_1_3_are_fine(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    for name, version in (("global-client.hcl", "tls12"), ("global-server.hcl", "tls13")):
        hcl = kit / name
        hcl.write_text(
            hcl.read_text().replace(
                "  rpc  = true\n", f'  rpc  = true\n  tls_min_version = "{version}"\n'
            )
        )
    _, found = _doctor(cli, kit)
    assert not any(k.endswith("hcl.tls_min_version") for k in found)


def test_secret_files_wider_than_0600_are_errors(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    (kit / "global-server.hcl").chmod(0o644)  # it holds the gossip key
    (kit / "gossip.key").chmod(0o640)
    (kit / "ca-key.pem").chmod(0o644)
    (kit / "global-client.hcl").chmod(0o644)  # no secret in it: fine
    code, found = _doctor(cli, kit)
    assert code == 7
    hcl = found["global-server.hcl:hcl.mode"]
    assert hcl["severity"] == "error"
    assert hcl["message"] == "mode 0644 lets other users read or change the gossip key it holds"
    assert hcl["fix"] == f"chmod 0600 {kit / 'global-server.hcl'}"
    assert found["gossip.key:key.mode"]["message"].endswith("the gossip key")
    assert found["ca-key.pem:key.mode"]["severity"] == "error"
    assert "global-client.hcl:hcl.mode" not in found


def test_fix_line_names_the_ca_key_beside_a_nomad_named_ca(cli, tmp_path):
    """`nomad tls ca create` names its files nomad-agent-ca.pem and nomad-agent-ca-key.pem."""
    folder = tmp_path / "nomad"
    ca, ca_key = make_ca("Nomad Agent CA 1")
    ca_path, _ = write_pem(folder, "nomad-agent-ca", [ca], ca_key)
    key = new_key()
    leaf = make_cert("server.eu.nomad", key, issuer=(ca, ca_key),
                     dns=["server.eu.nomad", "localhost"], ips=["127.0.0.1"])  # fmt: skip
    cert, _ = write_pem(folder, "global-server-nomad", [leaf], key)
    code, found = _doctor(cli, "--ca", ca_path, "--cert", cert, "--role", "server")
    assert code == 7
    fix = found["global-server-nomad.pem:names.server"]["fix"]
    assert f"--ca {ca_path} --ca-key {folder / 'nomad-agent-ca-key.pem'} " in fix
    # In a folder, the same: the key's name comes from the CA's.
    code, found = _doctor(cli, folder, "--region", "global")
    fix = found["global-server-nomad.pem:names.server"]["fix"]
    assert f"--ca-key {folder / 'nomad-agent-ca-key.pem'} " in fix
