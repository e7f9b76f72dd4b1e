"""cfwrap doctor: a clean kit passes; each broken thing is found with its message and fix."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import CFSSL_DIR, assert_no_secrets
from tests.handmade import EC_USAGES, copy_kit, issue, make_ca
from tests.tlspeer import free_port, wait_for_port


def _doctor(cli, *args: str | Path) -> tuple[int, dict[str, Any]]:
    result = cli("doctor", "--json", *args)
    assert "Traceback" not in result.err
    return result.code, json.loads(result.out)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _checks(report: dict[str, Any], severity: str = "error") -> dict[str, dict[str, Any]]:
    return {
        f"{Path(f['path']).name}:{f['check']}": f
        for f in report["findings"]
        if f["severity"] == severity
    }


def test_clean_kit_has_no_findings_and_probes_as_expected(cli, kits):
    code, report = _doctor(cli, kits["global"], "--probe")
    assert code == 0
    assert report["findings"] == []
    names = {p["name"]: p for p in report["probes"]}
    assert all(p["as_expected"] for p in names.values())
    # Every connection a cluster makes succeeds, every one Nomad must refuse is refused.
    assert names["rpc: client agent -> server"]["ok"] is True
    assert names["must fail: client certificate posing as a server"]["ok"] is False
    assert names["must fail: server dialled for another region"]["ok"] is False
    assert names["must fail: no client certificate"]["ok"] is False
    assert names["https: cli -> server as 127.0.0.1"]["ok"] is True
    assert names["api: cli -> client agent"]["ok"] is True


def test_clean_kit_in_another_region(cli, kits):
    code, report = _doctor(cli, kits["eu-west-1"], "--probe")
    assert code == 0, report
    assert {p["server_name"] for p in report["probes"]} >= {"server.eu-west-1.nomad"}


def test_human_output_groups_by_file(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    (kit / "global-server-nomad-key.pem").chmod(0o644)
    result = cli("doctor", kit)
    assert result.code == 7
    lines = result.out.splitlines()
    header = lines.index(str(kit / "global-server-nomad-key.pem"))
    assert lines[header + 1].startswith("  ERROR   key.mode: mode 0644")
    assert f"fix: chmod 0600 {kit / 'global-server-nomad-key.pem'}" in result.out
    # ... and the manifest notices that the mode changed since the kit was made.
    assert "WARNING manifest.drift: global-server-nomad-key.pem: mode 0644, manifest says 0600" in (
        result.out
    )
    assert result.err.strip() == (
        "cfwrap: error: doctor: 1 error(s), 1 warning(s); see the findings above; each has its fix"
    )
    assert_no_secrets(result.out + result.err)


def test_seed_guide_certificate(cli, tmp_path):
    """Made with cfssl exactly as the old guide says: regionglobal, both roles, default profile."""
    folder = tmp_path / "guide"
    ca = make_ca(folder)
    cert = issue(
        folder,
        "nomad",
        cn="regionglobal.nomad",
        hosts=["server.regionglobal.nomad", "client.regionglobal.nomad"],
        ca=ca,
    )
    code, report = _doctor(
        cli,
        "--ca",
        ca,
        "--cert",
        cert,
        "--key",
        folder / "nomad-key.pem",
        "--role",
        "server",
        "--region",
        "global",
    )
    assert code == 7
    errors = _checks(report)
    assert set(errors) == {"nomad.pem:names.server", "nomad.pem:names.both-roles"}
    server = errors["nomad.pem:names.server"]
    assert server["message"] == "made for region regionglobal, not global"
    assert server["nomad_error"] == (
        "x509: certificate is valid for server.regionglobal.nomad, client.regionglobal.nomad, "
        "not server.global.nomad"
    )
    assert server["fix"].startswith(f"cfwrap cert --ca {ca} --ca-key ")
    assert "--role server --region global" in server["fix"]
    # cfssl's default profile also gives the EC key keyEncipherment, and no localhost.
    warnings = _checks(report, "warning")
    assert "nomad.pem:usage.key-encipherment" in warnings
    assert "nomad.pem:names.local" in warnings


def test_kit_changed_since_its_manifest(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    (kit / "global-client.hcl").write_text((kit / "global-client.hcl").read_text() + "# edited\n")
    code, report = _doctor(cli, kit)
    assert code == 0  # a warning: the kit still works, but is not what was issued
    drift = [f for f in report["findings"] if f["check"] == "manifest.drift"]
    assert len(drift) == 1
    assert drift[0]["message"].startswith("global-client.hcl: content changed (sha256 ")
    assert drift[0]["fix"].startswith("inspect the change; cfwrap manifest --write")


def test_client_certificate_in_the_servers_place(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    for suffix in (".pem", "-key.pem"):
        (kit / f"global-server-nomad{suffix}").write_bytes(
            (kit / f"global-client-nomad{suffix}").read_bytes()
        )
    code, report = _doctor(cli, kit)
    assert code == 7
    finding = _checks(report)["global-server-nomad.pem:names.server"]
    assert "not a server certificate" in finding["message"]
    assert finding["nomad_error"].endswith("not server.global.nomad")
    assert "--role server --region global" in finding["fix"]
    # The server's HCL names that file: the same certificate is judged as the server's.
    assert all(f["path"] != str(kit / "global-server.hcl") for f in report["findings"])


def test_wrong_region(cli, kits):
    kit = kits["global"]
    code, report = _doctor(
        cli,
        "--ca",
        kit / "ca.pem",
        "--cert",
        kit / "global-server-nomad.pem",
        "--role",
        "server",
        "--region",
        "eu-west-1",
    )
    assert code == 7
    finding = _checks(report)["global-server-nomad.pem:names.server"]
    assert finding["message"] == "made for region global, not eu-west-1"
    assert "not server.eu-west-1.nomad" in finding["nomad_error"]


def test_certificate_from_another_ca(cli, kits, other_kit, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    for suffix in (".pem", "-key.pem"):
        (kit / f"global-client-nomad{suffix}").write_bytes(
            (other_kit / f"global-client-nomad{suffix}").read_bytes()
        )
    code, report = _doctor(cli, kit)
    assert code == 7
    finding = _checks(report)["global-client-nomad.pem:chain"]
    assert finding["nomad_error"] == "x509: certificate signed by unknown authority"
    assert "--role client" in finding["fix"]


def test_key_that_does_not_match(cli, kits, other_kit, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    (kit / "global-cli-nomad-key.pem").write_bytes(
        (other_kit / "global-cli-nomad-key.pem").read_bytes()
    )
    code, report = _doctor(cli, kit)
    assert code == 7
    finding = _checks(report)["global-cli-nomad-key.pem:key.pair"]
    assert finding["nomad_error"] == "tls: private key does not match public key"
    # The server's key given for the server's certificate, its own key beside it: the fix names
    # that key (helper-29), not a reissue that would replace a certificate whose key is there.
    server = kit / "global-server-nomad.pem"
    code, report = _doctor(cli, "--cert", server, "--key", kit / "global-client-nomad-key.pem",
                           "--ca", kit / "ca.pem", "--role", "server")  # fmt: skip
    assert code == 7
    fix = _checks(report)["global-client-nomad-key.pem:key.pair"]["fix"]
    assert fix == f"use {kit / 'global-server-nomad-key.pem'}, which does (key_file)"


def test_expired_and_expiring_certificates(cli, kits, tmp_path):
    kit = kits["global"]
    now = datetime.now(UTC)
    folder = tmp_path / "dated"
    folder.mkdir()
    expired = issue(
        folder,
        "expired",
        cn="server.global.nomad",
        hosts=["server.global.nomad", "localhost", "127.0.0.1"],
        ca=kit / "ca.pem",
        profile={
            "usages": EC_USAGES,
            "expiry": "1h",
            "not_before": "2020-01-01T00:00:00Z",
            "not_after": "2020-06-01T00:00:00Z",
        },
    )
    soon = issue(
        folder,
        "soon",
        cn="server.global.nomad",
        hosts=["server.global.nomad", "localhost", "127.0.0.1"],
        ca=kit / "ca.pem",
        profile={"usages": EC_USAGES, "expiry": "240h"},
    )
    code, report = _doctor(cli, "--ca", kit / "ca.pem", "--cert", expired, "--role", "server")
    assert code == 7
    finding = _checks(report)["expired.pem:dates.expired"]
    assert finding["message"] == "expired on 2020-06-01 00:00 UTC"
    assert finding["nomad_error"].startswith(
        "x509: certificate has expired or is not yet valid: current time "
    )
    assert finding["nomad_error"].endswith("is after 2020-06-01T00:00:00Z")
    code, report = _doctor(cli, "--ca", kit / "ca.pem", "--cert", soon, "--role", "server")
    assert code == 0  # a warning only
    warning = _checks(report, "warning")["soon.pem:dates.expiring"]
    assert "expires in 9 days" in warning["message"]
    code, report = _doctor(
        cli, "--ca", kit / "ca.pem", "--cert", soon, "--role", "server", "--warn-within", "5"
    )
    assert code == 0
    assert report["findings"] == []
    # The warning window is measured from now: 9 days left, as cryptography reads the dates.
    left = _load_cert(soon).not_valid_after_utc - now
    assert timedelta(days=9) < left <= timedelta(days=10)


def test_leaf_that_outlives_its_ca(cli, tmp_path):
    folder = tmp_path / "short"
    ca = make_ca(folder, expiry="2160h")  # 90 days
    leaf = issue(
        folder,
        "global-server-nomad",
        cn="server.global.nomad",
        hosts=["server.global.nomad", "localhost", "127.0.0.1"],
        ca=ca,
        profile={"usages": EC_USAGES, "expiry": "8760h"},
    )
    code, report = _doctor(cli, "--ca", ca, "--cert", leaf)
    assert code == 0
    warning = _checks(report, "warning")["global-server-nomad.pem:dates.outlives-ca"]
    assert "after its CA expires" in warning["message"]


def test_wildcard_and_key_encipherment(cli, kits, tmp_path):
    kit = kits["global"]
    folder = tmp_path / "wild"
    folder.mkdir()
    cert = issue(
        folder,
        "wild",
        cn="server.global.nomad",
        hosts=["*.global.nomad", "server.global.nomad", "localhost", "127.0.0.1"],
        ca=kit / "ca.pem",
        profile={"usages": [*EC_USAGES, "key encipherment"], "expiry": "720h"},
    )
    code, report = _doctor(cli, "--ca", kit / "ca.pem", "--cert", cert, "--role", "server")
    assert code == 7
    assert "wild.pem:names.wildcard" in _checks(report)
    assert "wild.pem:usage.key-encipherment" in _checks(report, "warning")


def test_missing_extended_key_usage(cli, kits, tmp_path):
    kit = kits["global"]
    code, report = _doctor(
        cli, "--ca", kit / "ca.pem", "--cert", kit / "global-cli-nomad.pem", "--role", "client"
    )
    assert code == 7
    errors = _checks(report)
    assert errors["global-cli-nomad.pem:usage.extended"]["nomad_error"] == (
        "x509: certificate specifies an incompatible key usage"
    )
    assert "global-cli-nomad.pem:names.client" in errors


def test_hcl_pointing_at_a_missing_file_and_weak_settings(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    hcl = kit / "global-client.hcl"
    text = hcl.read_text().replace("global-client-nomad-key.pem", "gone-key.pem")
    text = text.replace("verify_https_client    = true", "verify_https_client    = false")
    text = text.replace(
        "  rpc  = true\n",
        '  rpc  = true\n  tls_cipher_suites = "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"\n',
    )
    hcl.write_text(text)
    code, report = _doctor(cli, kit)
    assert code == 7
    errors = _checks(report)
    missing = errors["global-client.hcl:hcl.key_file"]
    gone = kit / "gone-key.pem"  # the copy's HCL names the copy's files
    assert missing["message"] == f"key_file names {gone}, which does not exist"
    assert errors["global-client.hcl:hcl.tls_cipher_suites"]["nomad_error"] == (
        # helper/tlsutil/config.go ParseCiphers: the agent does not start.
        "Specified cipher suites don't support the certificate signature algorithm ECDSA"
    )
    assert "global-client.hcl:hcl.verify_https_client" in _checks(report, "warning")


TLS_BLOCK_END = "  verify_https_client    = true\n}\n"
ECDSA_GCM = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"


def _in_tls(*lines: str) -> Callable[[str], str]:
    """A change that adds ``lines`` at the end of the server HCL's tls block."""
    return lambda text: text.replace(
        TLS_BLOCK_END, TLS_BLOCK_END[:-2] + "".join(f"  {line}\n" for line in lines) + "}\n"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # HCL 1 decodes every tls block into one struct, a later value winning (decoder.go).
        pytest.param(lambda t: t + "tls {\n  rpc = false\n  verify_server_hostname = false\n}\n",
                     ({"hcl.rpc", "hcl.verify_server_hostname"}, set()), id="a second tls block"),
        # ... and matches keys whatever their case (ast.ObjectList.Filter, strings.EqualFold).
        pytest.param(_in_tls("Verify_Server_Hostname = false"),
                     ({"hcl.verify_server_hostname"}, set()), id="a key in other case"),
        pytest.param(lambda t: t.replace("tls {", "TLS {"), (set(), set()),
                     id="the block named in capitals"),
        # decodeBool takes "true", "1", 1, TRUE as true.
        pytest.param(lambda t: t.replace("http = true", 'http = "true"').replace(
            "rpc  = true", "rpc  = 1").replace("verify_server_hostname = true",
                                               'verify_server_hostname = "1"').replace(
            "verify_https_client    = true", 'verify_https_client = "TRUE"'),
                     (set(), set()), id="booleans as strings and numbers"),
        pytest.param(lambda t: t.replace("http = true", 'http = "yes"'),
                     ({"hcl.http"}, {"hcl.http"}), id="a boolean HCL 1 cannot read"),
        # nomad/rpc.go: upgrade mode takes plaintext RPC and skips validateRaftTLS.
        pytest.param(_in_tls("rpc_upgrade_mode = true"), ({"hcl.rpc_upgrade_mode"}, set()),
                     id="rpc_upgrade_mode"),
        # ParseCiphers splits at "," without trimming, and checks the key type even for tls13.
        pytest.param(_in_tls(f'tls_cipher_suites = "{", ".join(ECDSA_GCM)}"'),
                     ({"hcl.tls_cipher_suites"}, set()), id="a space after a comma"),
        pytest.param(_in_tls('tls_min_version = "tls13"',
                             'tls_cipher_suites = "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"'),
                     ({"hcl.tls_cipher_suites"}, set()), id="RSA suites for an EC key, tls13"),
        pytest.param(_in_tls(f'tls_cipher_suites = "{",".join(ECDSA_GCM)}"'), (set(), set()),
                     id="suites as Nomad takes them"),
        # base64.StdEncoding.DecodeString of the text as it is: blanks are no base64.
        pytest.param(lambda t: re.sub(r'encrypt = "([^"]+)"', r'encrypt = " \1 "', t),
                     ({"hcl.encrypt"}, set()), id="blanks around the gossip key"),
        # helper/tlsutil opens the paths as given: from the agent's working folder.
        pytest.param(lambda t: re.sub(r'(ca_file\s+=\s+)"[^"]+/', r'\1"', t),
                     (set(), {"hcl.relative-path"}), id="a relative path"),
    ],
)  # fmt: skip
def test_the_server_hcl_is_read_as_nomads_hcl_1_reads_it(cli, kits, tmp_path, change, expected):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    (kit / "manifest.json").unlink()  # the HCL changes: judged on its own, not against it
    (kit / "global-client.hcl").unlink()
    hcl = kit / "global-server.hcl"
    before = hcl.read_text()
    assert before.endswith(TLS_BLOCK_END)
    hcl.write_text(change(before))
    assert hcl.read_text() != before
    code, report = _doctor(cli, kit)
    errors, warnings = expected
    assert {f["check"] for f in report["findings"] if f["severity"] == "error"} == errors, report
    assert {f["check"] for f in report["findings"] if f["severity"] == "warning"} == warnings
    assert code == (7 if errors else 0)
    key = (kit / "gossip.key").read_text().strip()
    assert_no_secrets(json.dumps(report), key)


def test_an_agent_is_a_client_or_a_server_as_its_enabled_says(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    (kit / "manifest.json").unlink()
    client = kit / "global-client.hcl"
    text = client.read_text().replace('region = "global"\n', 'region = "global"\n'
                                      "server {\n  enabled = false\n}\n"
                                      "client {\n  enabled = true\n}\n")  # fmt: skip
    client.unlink()
    (kit / "nomad.hcl").write_text(text)  # the name says nothing; the server block says off
    code, report = _doctor(cli, kit)
    assert code == 0, report
    # The same client agent with the server's certificate: refused as a client's.
    (kit / "nomad.hcl").write_text(text.replace("global-client-nomad", "global-server-nomad"))
    code, report = _doctor(cli, kit)
    assert code == 7
    assert "global-server-nomad.pem:names.client" in _checks(report)
    # A file named for a client that runs a server: a server, with the server's certificate.
    (kit / "nomad.hcl").unlink()
    server = (
        (kit / "global-server.hcl").read_text().replace("server {", "server {\n  enabled = true")
    )
    (kit / "global-server.hcl").unlink()
    renamed = kit / "client-node.hcl"  # holds the gossip key: removed, as no kit file is named so
    renamed.write_text(server)
    renamed.chmod(0o600)
    try:
        code, report = _doctor(cli, kit)
    finally:
        renamed.unlink()
    assert code == 0, report


def test_one_certificate_used_by_a_server_and_a_client_must_pass_as_both(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    (kit / "manifest.json").unlink()
    client = kit / "global-client.hcl"
    client.write_text(client.read_text().replace("global-client-nomad", "global-server-nomad"))
    code, report = _doctor(cli, kit)
    assert code == 7
    assert "global-server-nomad.pem:names.client" in _checks(report)


def test_bad_gossip_key_in_hcl_is_reported_without_the_key(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    hcl = kit / "global-server.hcl"
    key = (kit / "gossip.key").read_text().strip()
    hcl.write_text(hcl.read_text().replace(key, key[:10]))
    code, report = _doctor(cli, kit)
    assert code == 7
    assert "global-server.hcl:hcl.encrypt" in _checks(report)
    assert_no_secrets(json.dumps(report), key, key[:10])


@pytest.mark.parametrize(
    "value", ['file("gossip.key")', '"${file(\\"gossip.key\\")}"', '"k${var.gossip}"']
)
def test_gossip_key_given_as_an_expression_is_named_as_one(cli, kits, tmp_path, value):
    # Nomad's HCL 1 evaluates no expression or template: say so, not "not standard base64".
    kit = copy_kit(kits["global"], tmp_path / "kit")
    hcl = kit / "global-server.hcl"
    key = (kit / "gossip.key").read_text().strip()
    hcl.write_text(hcl.read_text().replace(f'"{key}"', value))
    code, report = _doctor(cli, kit)
    assert code == 7
    finding = _checks(report)["global-server.hcl:hcl.encrypt"]
    assert finding["message"].startswith("encrypt is an expression or template (${...}), not")
    assert finding["fix"].startswith("write the base64 key itself in quotes")
    assert_no_secrets(json.dumps(report), key)


def test_unparseable_hcl(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    (kit / "global-client.hcl").write_text("tls {\n  http = \n")
    code, report = _doctor(cli, kit)
    assert code == 7
    assert "global-client.hcl:hcl.parse" in _checks(report)


def test_doctor_bad_arguments(cli, tmp_path):
    result = cli("doctor", tmp_path / "nope")
    assert result.code == 3
    assert result.err.startswith("cfwrap: error: ")
    result = cli("doctor", "--warn-within", "soon", tmp_path)
    assert result.code == 3
    result = cli("doctor", "--connect", "nohost", "--ca", tmp_path / "x.pem")
    assert result.code == 3


# --connect against real TLS servers: openssl s_server and nginx.


@pytest.fixture
def s_server(kits):
    """Start openssl s_server with a given certificate (client certificates required)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(cert: Path, key: Path) -> int:
        port = free_port()
        ca = kits["global"] / "ca.pem"
        proc = subprocess.Popen(
            [
                "openssl",
                "s_server",
                "-accept",
                f"127.0.0.1:{port}",
                "-cert",
                cert,
                "-key",
                key,
                "-CAfile",
                ca,
                "-Verify",
                "1",
                "-quiet",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        wait_for_port(port)
        return port

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


@pytest.mark.slow
def test_connect_to_openssl_server(cli, kits, s_server):
    kit = kits["global"]
    good = s_server(kit / "global-server-nomad.pem", kit / "global-server-nomad-key.pem")
    code, report = _doctor(cli, kit, "--connect", f"127.0.0.1:{good}")
    assert code == 0, report
    assert report["presented"]["subject"] == "CN=server.global.nomad"
    assert report["presented"]["verified"] is True
    bad = s_server(kit / "global-client-nomad.pem", kit / "global-client-nomad-key.pem")
    code, report = _doctor(cli, kit, "--connect", f"127.0.0.1:{bad}")
    assert code == 7
    errors = _checks(report)
    assert f"127.0.0.1:{bad}:names.server" in errors
    assert "Hostname mismatch" in errors[f"127.0.0.1:{bad}:connect.verify"]["nomad_error"]
    assert report["presented"]["subject"] == "CN=client.global.nomad"
    # The fix is a command cfwrap runs: a new folder, not "--out ." (which cert refuses).
    fix = errors[f"127.0.0.1:{bad}:names.server"]["fix"]
    assert fix.endswith("--role server --region global --out NEW-DIR"), fix


NGINX_CONF = """
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 16; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp;
  fastcgi_temp_path {prefix}/tmp; uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("role", ["server", "client"])
def test_connect_to_nginx_with_mutual_tls(cli, kits, tmp_path, role):
    from tests.conftest import ROOT

    nginx = ROOT / ".tools" / "nginx" / "bin" / "nginx"
    if not nginx.is_file():
        subprocess.run([ROOT / "scripts" / "install-nginx"], check=True)
    kit = kits["global"]
    prefix = tmp_path / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            prefix=prefix,
            port=port,
            cert=kit / f"global-{role}-nomad.pem",
            key=kit / f"global-{role}-nomad-key.pem",
            ca=kit / "ca.pem",
        )
    )
    with subprocess.Popen(
        [nginx, "-p", prefix, "-c", conf, "-e", prefix / "error.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            wait_for_port(port)
            # nginx really demands the client certificate: without one, HTTP 400.
            curl = subprocess.run(
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--cacert",
                    kit / "ca.pem",
                    "--resolve",
                    f"{role}.global.nomad:{port}:127.0.0.1",
                    f"https://{role}.global.nomad:{port}/",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert curl.stdout == "400"
            code, report = _doctor(cli, kit, "--connect", f"127.0.0.1:{port}")
        finally:
            proc.terminate()
            proc.wait()
    assert report["presented"]["subject"] == f"CN={role}.global.nomad"
    if role == "server":
        assert code == 0, report
    else:
        assert code == 7
        assert f"127.0.0.1:{port}:names.server" in _checks(report)


def test_doctor_finds_no_keys_in_its_own_output(cli, kits):
    result = cli("doctor", kits["global"], "--probe", "--json")
    for path in kits["global"].glob("*-key.pem"):
        body = "".join(path.read_text().splitlines()[1:-1])
        assert body[:40] not in result.out
    assert_no_secrets(result.out + result.err, (kits["global"] / "gossip.key").read_text())
    assert CFSSL_DIR.is_dir()


def test_hcl_naming_a_certificate_of_the_wrong_role(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    hcl = kit / "global-server.hcl"
    hcl.write_text(
        hcl.read_text().replace(str(kits["global"]), str(kit))
        .replace("global-server-nomad.pem", "global-client-nomad.pem")
        .replace("global-server-nomad-key.pem", "global-client-nomad-key.pem")
    )  # fmt: skip
    code, report = _doctor(cli, kit)
    assert code == 7
    # The server's config uses the client certificate: judged as the server's, it fails.
    finding = _checks(report)["global-client-nomad.pem:names.server"]
    assert finding["nomad_error"].endswith("not server.global.nomad")


# --- checks no other test reached (issue 13) ---------------------------------------------------


def test_not_yet_valid_certificate_is_an_error(cli, kits, tmp_path):
    kit = kits["global"]
    future = issue(
        tmp_path,
        "future",
        cn="server.global.nomad",
        hosts=["server.global.nomad", "localhost", "127.0.0.1"],
        ca=kit / "ca.pem",
        profile={
            "usages": EC_USAGES,
            "expiry": "1h",
            "not_before": "2030-01-01T00:00:00Z",
            "not_after": "2030-06-01T00:00:00Z",
        },
    )
    assert _load_cert(future).not_valid_before_utc > datetime.now(UTC)  # judged by cryptography
    code, report = _doctor(cli, "--ca", kit / "ca.pem", "--cert", future, "--role", "server")
    assert code == 7
    finding = _checks(report)["future.pem:dates.not-yet-valid"]
    assert finding["nomad_error"].endswith("is before 2030-01-01T00:00:00Z")


def test_a_key_owned_by_someone_else_is_a_warning(cli, kits, tmp_path):
    import os

    kit = copy_kit(kits["global"], tmp_path / "kit")
    key = kit / "global-client-nomad-key.pem"
    os.chown(key, 65534, 65534)
    assert key.stat().st_uid != os.geteuid()
    code, report = _doctor(cli, kit)
    assert code == 0  # a warning: the agent may well run as that user
    warning = _checks(report, "warning")["global-client-nomad-key.pem:key.owner"]
    assert warning["fix"].startswith(f"chown {os.geteuid()} ")


def test_verify_server_hostname_off_is_an_error(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    hcl = kit / "global-client.hcl"
    hcl.write_text(
        hcl.read_text().replace("verify_server_hostname = true", "verify_server_hostname = false")
    )
    code, report = _doctor(cli, kit)
    assert code == 7
    assert "global-client.hcl:hcl.verify_server_hostname" in _checks(report)


def test_a_leaf_given_as_the_ca_fails_the_ca_constraints(cli, kits):
    kit = kits["global"]
    leaf = kit / "global-client-nomad.pem"
    basic = _load_cert(leaf).extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.value.ca is False  # judged by cryptography: it really is no CA
    code, report = _doctor(
        cli, "--ca", leaf, "--cert", kit / "global-server-nomad.pem", "--role", "server"
    )
    assert code == 7
    errors = _checks(report)
    assert "global-client-nomad.pem:ca.constraints" in errors
    assert "global-server-nomad.pem:chain" in errors


def test_a_ca_file_that_holds_a_private_key_is_an_error(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    bundle = kit / "ca.pem"
    bundle.write_bytes(bundle.read_bytes() + (kit / "ca-key.pem").read_bytes())
    try:
        # Judged by cryptography: the file holds the CA and its key, and Nomad would load it.
        assert x509.load_pem_x509_certificates(bundle.read_bytes())
        assert serialization.load_pem_private_key(bundle.read_bytes(), None)
        code, report = _doctor(cli, kit)
    finally:
        bundle.unlink()  # the key must not outlive the test in a file no scan takes for a key
    assert code == 7
    found = _checks(report)["ca.pem:ca.private-key"]
    assert "every agent and CLI user" in found["message"]
    assert "offline" in found["fix"]


def test_a_ca_certificate_in_a_role_certificates_place(cli, kits, tmp_path):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    for suffix in (".pem", "-key.pem"):
        (kit / f"global-server-nomad{suffix}").write_bytes((kit / f"ca{suffix}").read_bytes())
    assert (
        _load_cert(kit / "global-server-nomad.pem")
        .extensions.get_extension_for_class(x509.BasicConstraints)
        .value.ca
    )
    code, report = _doctor(cli, kit)
    assert code == 7
    assert "global-server-nomad.pem:cert.is-ca" in _checks(report)


@pytest.mark.parametrize("held", ["empty", "der", "csr", "random"])
def test_a_role_certificate_file_without_a_certificate_is_an_error(cli, kits, tmp_path, held):
    """Named as a role certificate but holding none (no agent config names it: a cli
    certificate, a `cfwrap cert` folder): doctor skipped it and passed the kit, exit 0, while
    Nomad fails to load the pair."""
    kit = copy_kit(kits["global"], tmp_path / "kit")
    cert = kit / "global-cli-nomad.pem"
    data = {
        "empty": b"",
        "der": _load_cert(cert).public_bytes(serialization.Encoding.DER),
        "csr": (kit / "global-cli-nomad.csr").read_bytes(),
        "random": bytes(range(256)) * 4,
    }[held]
    cert.write_bytes(data)
    (kit / "manifest.json").unlink()  # its drift warnings aside
    code, report = _doctor(cli, kit)
    assert code == 7
    errors = _checks(report)
    assert list(errors) == ["global-cli-nomad.pem:cert.read"], errors
    assert "not a PEM certificate" in errors["global-cli-nomad.pem:cert.read"]["message"]


def test_loose_files_of_another_region_are_judged_for_their_own_region(cli, kits):
    # helper-29: without --region, doctor --cert took every certificate for region global.
    kit = kits["eu-west-1"]
    for role in ("server", "client"):
        code, report = _doctor(cli, "--cert", kit / f"eu-west-1-{role}-nomad.pem",
                               "--key", kit / f"eu-west-1-{role}-nomad-key.pem",
                               "--ca", kit / "ca.pem")  # fmt: skip
        assert code == 0, report
    renamed_copy = kits["eu-west-1"] / "eu-west-1-server-nomad.pem"
    code, report = _doctor(cli, "--cert", renamed_copy, "--region", "global")
    assert code == 7  # a region given is the one judged
    assert "eu-west-1-server-nomad.pem:names.server" in _checks(report)


def test_connect_builds_the_chain_with_the_intermediates_the_peer_sends(cli, tmp_path):
    """helper-29: a node of a plan with intermediates sends its leaf and its region's CA; doctor
    used only the leaf and reported no chain, where Go's handshake succeeds."""
    w = tmp_path
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=w, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "root-key.pem", "-out", "root.pem", "-subj",
            "/CN=Root", "-days", "3650", "-addext",
            "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    (w / "int.ext").write_text("basicConstraints=critical,CA:TRUE,pathlen:0\n"
                               "keyUsage=critical,keyCertSign,cRLSign\n")  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "int-key.pem", "-out", "int.csr", "-subj", "/CN=Int")
    openssl("x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root-key.pem",
            "-CAcreateserial", "-days", "3000", "-extfile", "int.ext", "-out",
            "int.pem")  # fmt: skip
    (w / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=DNS:server.global.nomad,DNS:localhost,IP:127.0.0.1\n"
    )
    openssl("req", "-new", *ec, "-keyout", "leaf-key.pem", "-out", "leaf.csr", "-subj",
            "/CN=server.global.nomad")  # fmt: skip
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "int.pem", "-CAkey", "int-key.pem",
            "-CAcreateserial", "-days", "300", "-extfile", "leaf.ext", "-out",
            "leaf.pem")  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", "leaf.pem", "-key",
         "leaf-key.pem", "-cert_chain", "int.pem", "-quiet"],
        cwd=w, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        code, report = _doctor(cli, "--connect", f"127.0.0.1:{port}", "--ca", w / "root.pem",
                               "--role", "server")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert code == 0, report
    assert report["presented"]["issuer"] == "CN=Int"


def test_a_file_name_that_names_no_region_does_not_override_the_certificates_names(
    cli, kits, tmp_path
):
    # helper-30: nomad-server.pem was judged for region "nomad", with a fix to reissue so.
    shutil.copy(kits["global"] / "global-server-nomad.pem", tmp_path / "nomad-server.pem")
    code, report = _doctor(cli, "--cert", tmp_path / "nomad-server.pem",
                           "--ca", kits["global"] / "ca.pem")  # fmt: skip
    assert code == 0, report
