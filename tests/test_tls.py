"""Real mutual-TLS handshakes on loopback between the certificates of a quickstart kit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.tlspeer import Party, free_port, handshake, wait_for_port


def _party(kit: Path, region: str, role: str, ca: Path | None = None) -> Party:
    stem = kit / f"{region}-{role}-nomad"
    return Party(Path(f"{stem}.pem"), Path(f"{stem}-key.pem"), ca or kit / "ca.pem")


@pytest.mark.parametrize("region", ["global", "eu-west-1"])
def test_client_agent_reaches_server_under_its_role_name(kits, region):
    kit = kits[region]
    outcome = handshake(
        _party(kit, region, "server"), _party(kit, region, "client"), f"server.{region}.nomad"
    )
    assert outcome.ok, outcome


@pytest.mark.parametrize("name", ["localhost", "nomad.example.com"])
def test_cli_reaches_server_https_under_extra_names(kits, name):
    kit = kits["global"]
    outcome = handshake(_party(kit, "global", "server"), _party(kit, "global", "cli"), name)
    assert outcome.ok, outcome


def test_api_reaches_client_agent_under_client_name(kits):
    kit = kits["global"]
    outcome = handshake(
        _party(kit, "global", "client"), _party(kit, "global", "server"), "client.global.nomad"
    )
    assert outcome.ok, outcome


def test_server_presenting_client_certificate_is_rejected(kits):
    kit = kits["global"]
    outcome = handshake(
        _party(kit, "global", "client"), _party(kit, "global", "client"), "server.global.nomad"
    )
    assert not outcome.ok
    assert "Hostname mismatch" in (outcome.client_error or "")


def test_wrong_region_server_name_is_rejected(kits):
    kit = kits["eu-west-1"]
    outcome = handshake(
        _party(kit, "eu-west-1", "server"),
        _party(kit, "eu-west-1", "client"),
        "server.global.nomad",
    )
    assert not outcome.ok
    assert "Hostname mismatch" in (outcome.client_error or "")


def test_client_certificate_from_another_ca_is_rejected(kits, other_kit):
    kit = kits["global"]
    foreign = _party(other_kit, "global", "client", ca=kit / "ca.pem")
    outcome = handshake(_party(kit, "global", "server"), foreign, "server.global.nomad")
    assert not outcome.ok
    assert "certificate verify failed" in (outcome.server_error or "")


def test_missing_client_certificate_is_rejected(kits):
    kit = kits["global"]
    anonymous = Party(None, None, kit / "ca.pem")
    outcome = handshake(_party(kit, "global", "server"), anonymous, "server.global.nomad")
    assert not outcome.ok
    # The server refused for this reason, not a timeout or any other failure.
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in (outcome.server_error or ""), outcome


def test_cli_certificate_cannot_serve(kits):
    """The cli certificate lacks serverAuth: refused as a server even under its own name."""
    kit = kits["global"]
    outcome = handshake(
        _party(kit, "global", "cli"), _party(kit, "global", "client"), "cli.global.nomad"
    )
    assert not outcome.ok
    assert "unsuitable certificate purpose" in (outcome.client_error or "")


@pytest.mark.slow
def test_openssl_peers_complete_mutual_tls(kits, other_kit, tmp_path):
    """openssl s_server/s_client, as a second, independent TLS stack."""
    kit = kits["global"]
    port = free_port()
    server_log = tmp_path / "s_server.log"
    with server_log.open("wb") as log, subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}",
         "-cert", kit / "global-server-nomad.pem", "-key", kit / "global-server-nomad-key.pem",
         "-CAfile", kit / "ca.pem", "-Verify", "1", "-verify_return_error"],
        stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
    ) as server:  # fmt: skip
        try:
            wait_for_port(port)

            def client(party_kit: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
                return subprocess.run(
                    ["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                     "-CAfile", kit / "ca.pem",
                     "-cert", party_kit / "global-client-nomad.pem",
                     "-key", party_kit / "global-client-nomad-key.pem",
                     "-verify_hostname", "server.global.nomad", "-verify_return_error", "-brief",
                     *extra],
                    input=b"ping\n", capture_output=True, timeout=20, check=False,
                )  # fmt: skip

            good = client(kit)
            assert good.returncode == 0, good.stderr
            assert b"Verification: OK" in good.stderr
            assert b"Verified peername: server.global.nomad" in good.stderr
            # Under TLS 1.2 the server's rejection ends the client's handshake: a sure failure.
            bad = client(other_kit, "-tls1_2")
            assert bad.returncode != 0, bad.stderr
            assert b"alert unknown ca" in bad.stderr
            # Under TLS 1.3 the client may finish first; the server's log shows the rejection.
            client(other_kit)
        finally:
            server.kill()
            server.wait()
    logged = server_log.read_bytes()
    assert logged.count(b"unable to get local issuer certificate") >= 2, logged
