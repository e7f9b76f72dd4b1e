"""``cfwrap signer``: a real multirootca on a loopback port, judged by a raw authsign client.

The client here is written from cfssl's protocol (``auth/auth.go``: token = HMAC-SHA256 of the
request bytes under the hex-decoded key; body ``{token, request}`` in base64), independently of
cfwrap's own client, so the signer's refusals are shown for any caller.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cfwrap import keys, parsers, verify
from cfwrap.models import CSR
from cfwrap.specs import CertSpec
from tests.tlspeer import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunningSigner:
    """A ``cfwrap signer`` process and where its files are."""

    process: subprocess.Popen[bytes]
    ca_dir: Path
    auth_dir: Path
    port: int
    info: dict[str, Any]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def key(self, role: str) -> str:
        return (self.auth_dir / f"{role}.key").read_text().strip()

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=20)
        return self.process.returncode, err.decode()


def start_signer(ca_dir: Path, *extra: str, port: int | None = None) -> RunningSigner:
    """Start ``cfwrap signer`` for ``ca_dir`` on a (free) loopback port; wait for signer.json."""
    port = port or free_port()
    argv = [sys.executable, "-m", "cfwrap", "signer", str(ca_dir),
            "--listen", f"127.0.0.1:{port}", *extra]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line:
        _, err = process.communicate(timeout=20)
        raise AssertionError(f"signer did not start: {err.decode()}")
    info_path = Path(line)
    return RunningSigner(process, ca_dir, info_path.parent, port, json.loads(info_path.read_text()))


def make_ca(tmp: Path) -> Path:
    out = tmp / "ca"
    done = subprocess.run(
        [sys.executable, "-m", "cfwrap", "ca", "--out", str(out)],
        capture_output=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSigner]:
    ca_dir = make_ca(tmp_path_factory.mktemp("signer"))
    signer = start_signer(
        ca_dir, "--region", "global", "--region", "eu", "--allow-dns", "example.com"
    )
    yield signer
    code, err = signer.stop()
    assert code == 143, err


def csr_for(names: list[str], cn: str) -> bytes:
    key = keys.new_private_key(CSR(CN=cn).key)
    return keys.csr_pem(key, CSR(CN=cn, hosts=tuple(names)))


def authsign(
    signer: RunningSigner,
    key_hex: str | None,
    *,
    profile: str,
    csr: bytes,
    label: str = "nomad",
    path: str = "authsign",
    hosts: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    url: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST one authsign request; returns the HTTP status and the JSON answer."""
    request: dict[str, Any] = {
        "certificate_request": csr.decode(),
        "profile": profile,
        "label": label,
        **(extra or {}),
    }
    if hosts is not None:
        request["hosts"] = hosts
    raw = json.dumps(request).encode()
    token = hmac.new(bytes.fromhex(key_hex), raw, hashlib.sha256).digest() if key_hex else b""
    body = json.dumps(
        {"token": base64.b64encode(token).decode(), "request": base64.b64encode(raw).decode()}
    ).encode()
    ctx = ssl.create_default_context(cafile=str(signer.ca_dir / "ca.pem"))
    url = f"{url or signer.url}/api/v1/cfssl/{path}"
    req = urllib.request.Request(url, data=body, method="POST")  # noqa: S310 (https only)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"raw": text.decode("utf-8", "replace")}


def message(answer: dict[str, Any]) -> str:
    errors = answer.get("errors") or [{}]
    return str(errors[0].get("message", answer.get("raw", "")))


def spec_names(role: str, region: str = "global") -> tuple[list[str], str]:
    spec = CertSpec(role=role, region=region)
    return list(spec.hosts()), spec.common_name


@pytest.mark.parametrize("role", ["server", "client", "cli"])
def test_each_role_is_issued_with_its_own_key_and_passes_nomad_checks(running, role):
    names, cn = spec_names(role)
    status, answer = authsign(running, running.key(role), profile=role, csr=csr_for(names, cn))
    assert status == 200, answer
    cert = parsers.load_certificate(answer["result"]["certificate"].encode())
    roots = verify.load_pem_certificates((running.ca_dir / "ca.pem").read_bytes())
    verify.check_issued(cert, roots=roots, role=role, region="global", now=datetime.now(UTC))


def test_another_region_of_the_signer_is_issued(running):
    names, cn = spec_names("server", "eu")
    status, answer = authsign(
        running, running.key("server"), profile="server", csr=csr_for(names, cn)
    )
    assert status == 200, answer


@pytest.mark.parametrize(
    ("key_role", "profile"),
    [("client", "server"), ("cli", "client"), ("server", "cli")],
)
def test_another_roles_key_is_refused(running, key_role, profile):
    names, cn = spec_names(profile)
    status, answer = authsign(
        running, running.key(key_role), profile=profile, csr=csr_for(names, cn)
    )
    assert status == 400
    assert message(answer) == "invalid token"


def test_wrong_and_missing_keys_are_refused(running):
    names, cn = spec_names("client")
    csr = csr_for(names, cn)
    assert message(authsign(running, "00" * 32, profile="client", csr=csr)[1]) == "invalid token"
    assert message(authsign(running, None, profile="client", csr=csr)[1]) == "invalid token"


@pytest.mark.parametrize(
    ("names", "cn"),
    [
        (["client.global.nomad", "server.global.nomad"], "client.global.nomad"),
        (["server.global.nomad"], "server.global.nomad"),
        (["client.global.nomad"], "server.global.nomad"),
        (["client.global.nomad.evil.com"], "client.global.nomad"),
        (["client-global-nomad"], "client.global.nomad"),
        (["xclient.global.nomad"], "client.global.nomad"),
        (["client.other.nomad"], "client.global.nomad"),
        (["evil.com"], "client.global.nomad"),
        (["example.com.evil.org"], "client.global.nomad"),
        (["CLIENT.global.nomad"], "client.global.nomad"),
    ],
)
def test_names_outside_the_role_are_refused(running, names, cn):
    status, answer = authsign(
        running, running.key("client"), profile="client", csr=csr_for(names, cn)
    )
    assert status == 400, answer
    assert "signature failed" in json.dumps(answer) or message(answer) == "bad request"
    # Names given in the request (cfssl's hosts override) are held to the same rule.
    if set(names) == {"client.global.nomad"}:
        return  # only the common name is wrong here
    ok_csr = csr_for(["client.global.nomad"], "client.global.nomad")
    status, _ = authsign(running, running.key("client"), profile="client", csr=ok_csr, hosts=names)
    assert status == 400


def test_allowed_domain_names_are_issued(running):
    names = ["client.global.nomad", "node7.example.com", "example.com", "localhost", "10.0.0.7"]
    status, answer = authsign(
        running, running.key("client"), profile="client", csr=csr_for(names, "client.global.nomad")
    )
    assert status == 200, answer


def test_cli_profile_takes_no_extra_names(running):
    csr = csr_for(["cli.global.nomad", "localhost"], "cli.global.nomad")
    status, _ = authsign(running, running.key("cli"), profile="cli", csr=csr)
    assert status == 400


def test_unknown_and_default_profiles_are_refused(running):
    names, cn = spec_names("server")
    csr = csr_for(names, cn)
    status, answer = authsign(running, running.key("server"), profile="admin", csr=csr)
    assert (status, message(answer)) == (400, "invalid profile")
    # The default profile (empty name) has a key no node holds.
    status, answer = authsign(running, running.key("server"), profile="", csr=csr)
    assert (status, message(answer)) == (400, "invalid token")
    status, answer = authsign(running, running.key("server"), profile="server", csr=csr, label="x")
    assert status == 400


@pytest.mark.parametrize("path", ["newcert", "init_ca", "sign", "newkey", "certinfo", "scan"])
def test_other_endpoints_do_not_exist(running, path):
    names, cn = spec_names("server")
    status, _ = authsign(
        running, running.key("server"), profile="server", csr=csr_for(names, cn), path=path
    )
    assert status == 404


def test_plain_http_is_not_served(running):
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{running.port}/api/v1/cfssl/info", timeout=5)


def test_files_modes_and_no_key_in_argv(running):
    auth = running.auth_dir
    assert oct(auth.stat().st_mode & 0o777) == "0o700"
    for name in (
        "server.key",
        "client.key",
        "cli.key",
        "default.key",
        "tls-key.pem",
        "certdb.sqlite",
    ):
        assert (auth / name).stat().st_mode & 0o777 == 0o600, name
    secrets = [running.key(r) for r in ("server", "client", "cli", "default")]
    config = (auth / "cfssl.json").read_text() + (auth / "multirootca.ini").read_text()
    info = (auth / "signer.json").read_text()
    for secret in secrets:
        assert secret not in config and secret not in info
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(running.process.pid)], capture_output=True, check=True
    ).stdout.split()
    assert children, "multirootca is not running under cfwrap"
    for pid in children:
        argv = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode()
        assert "multirootca" in argv
        for secret in secrets:
            assert secret not in argv
    assert running.info["roles"]["client"] == {"profile": "client", "auth_key_file": "client.key"}
    assert running.info["address"] == f"https://127.0.0.1:{running.port}"


def test_audit_records_every_issue_with_requester_and_profile(tmp_path):
    from cfwrap.signer import audit, certdb

    signer = start_signer(make_ca(tmp_path))
    names, cn = spec_names("server")
    status, answer = authsign(
        signer, signer.key("server"), profile="server", csr=csr_for(names, cn)
    )
    assert status == 200
    serial = str(int(parsers.read_certificate(answer["result"]["certificate"].encode()).serial, 16))
    # certdb is written by multirootca before it answers.
    assert serial in {r.serial for r in certdb.records(signer.auth_dir)}
    # The audit log follows multirootca's log line by line as it is written: the entry is there
    # within moments, while the signer still runs (not in 64 KiB chunks, nor at stop).
    entry = wait_for_entry(signer, serial)
    assert signer.process.poll() is None
    assert entry["profile"] == "server"
    assert entry["requester"].startswith("127.0.0.1:")
    assert entry["common_name"] == "server.global.nomad"
    assert "server.global.nomad" in entry["dns_names"]
    assert entry["validity"] == "policy"
    assert (signer.auth_dir / "audit.log").stat().st_mode & 0o777 == 0o600
    # A second issue is recorded as soon, and each issue once.
    status, answer = authsign(
        signer, signer.key("client"), profile="client", csr=csr_for(*spec_names("client"))
    )
    second = str(int(parsers.read_certificate(answer["result"]["certificate"].encode()).serial, 16))
    assert wait_for_entry(signer, second)["profile"] == "client"
    assert signer.stop()[0] == 143
    serials = [e["serial"] for e in audit.entries(signer.auth_dir / "audit.log")]
    assert serials == [serial, second]
    # certdb runs in WAL mode (one fsync a commit) and is readable once the signer has stopped.
    with sqlite3.connect(signer.auth_dir / "certdb.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    assert len(certdb.records(signer.auth_dir)) == 2


def test_no_request_can_write_the_audit_log(tmp_path):
    """multirootca logs a refused request's profile as it came, before any key is checked: a
    profile holding a whole log line (or the line's words inside another) once added audit
    entries for any requester, any serial, from anyone who could reach the port."""
    from cfwrap.signer import audit

    signer = start_signer(make_ca(tmp_path))
    try:
        names, cn = spec_names("client")
        status, real = authsign(
            signer, signer.key("client"), profile="client", csr=csr_for(names, cn)
        )
        assert status == 200, real
        serial = serial_of(real)
        wait_for_entry(signer, serial)
        stamp = datetime.now(UTC).strftime("%Y/%m/%d %H:%M:%S")
        forged = [
            f"x\n{stamp} [INFO] signature: requester=10.6.6.6:1234, label=nomad, profile=server, "
            f"serialno={serial}\n",  # a real serial, recorded already
            f"x\n{stamp} [INFO] signature: requester=10.6.6.6:1234, label=nomad, profile=server, "
            "serialno=1234567890\n",  # no such certificate
            f"signature: requester=10.6.6.6:1234, label=nomad, profile=server, serialno={serial}\n",
        ]
        for profile in forged:
            status, answer = authsign(signer, None, profile=profile, csr=csr_for(names, cn))
            assert status == 400, answer
        status, later = authsign(
            signer, signer.key("client"), profile="client", csr=csr_for(names, cn)
        )
        assert status == 200, later
        wait_for_entry(signer, serial_of(later))
    finally:
        code, err = signer.stop()
    assert code == 143, err
    entries = audit.entries(signer.auth_dir / "audit.log")
    assert [e["serial"] for e in entries] == [serial, serial_of(later)]
    assert {e["requester"].partition(":")[0] for e in entries} == {"127.0.0.1"}
    assert {e["profile"] for e in entries} == {"client"}
    assert err.count("not recorded (a line a request wrote into the log?)") == 2


def test_a_lifetime_past_the_cas_end_is_refused_at_start(tmp_path, cli):
    ca_dir = make_ca(tmp_path)  # five years
    auth = tmp_path / "auth"
    with socket.socket() as busy:  # were it not refused, the signer would stop on this port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        result = cli("signer", ca_dir, "--listen", listen, "--auth-dir", auth,
                     "--expiry", "50000h")  # fmt: skip
    assert result.code == 3, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "--expiry 50000h: every certificate the signer issued would outlive its CA" in result.err
    assert not auth.exists()
    bad = cli("signer", ca_dir, "--listen", "127.0.0.1:1", "--expiry", "soon")
    assert bad.code == 3 and bad.err.startswith("cfwrap: error: --expiry 'soon': "), bad.err
    bad = cli("signer", ca_dir, "--listen", "127.0.0.1:1", "--allow-dns", "exa mple.com")
    assert bad.code == 3 and bad.err.startswith("cfwrap: error: --allow-dns 'exa mple.com': "), (
        bad.err
    )


def test_an_auth_folder_another_user_can_write_is_refused(tmp_path, cli):
    """With an auth folder open to writes (or a key file another user owns), that user could
    put their own key in place of the server key: the signer would then give them server
    certificates. It refuses to start."""
    ca_dir = make_ca(tmp_path)
    auth = tmp_path / "auth"
    auth.mkdir(mode=0o700)
    auth.chmod(0o777)
    with socket.socket() as busy:  # were it not refused, the signer would stop on this port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        opened = cli("signer", ca_dir, "--listen", listen, "--auth-dir", auth)
        assert opened.code == 3, opened.err
        assert "the auth folder has mode 0777: other users may write into it" in opened.err
        assert list(auth.iterdir()) == []
        auth.chmod(0o700)
        (auth / "server.key").write_text("00" * 32 + "\n")
        (auth / "server.key").chmod(0o600)
        os.chown(auth / "server.key", 65534, 65534)  # nobody's key, in the server's place
        owned = cli("signer", ca_dir, "--listen", listen, "--auth-dir", auth)
        # A key that is a link to nothing: one line, not a traceback.
        (auth / "server.key").unlink()
        (auth / "server.key").symlink_to(tmp_path / "nothing")
        dangling = cli("signer", ca_dir, "--listen", listen, "--auth-dir", auth)
    assert owned.code == 3, owned.err
    assert "an auth key owned by uid 65534, not by the user running the signer" in owned.err
    assert len(owned.err.strip().splitlines()) == 1
    assert dangling.code == 3, dangling.err
    assert dangling.err == (
        f"cfwrap: error: {auth / 'server.key'}: an auth key cannot be read (No such file or "
        "directory); move it away\n"
    )
    # An auth folder given through a symlink is judged by the folder it names (0700, ours).
    (auth / "server.key").unlink()
    (tmp_path / "link").symlink_to(auth)
    linked = start_signer(ca_dir, "--auth-dir", str(tmp_path / "link"))
    assert linked.stop()[0] == 143


def wait_for_entry(signer: RunningSigner, serial: str, seconds: float = 3.0) -> dict[str, Any]:
    """The audit entry for ``serial``, waiting up to ``seconds`` for it to appear."""
    from cfwrap.signer import audit

    deadline = time.monotonic() + seconds
    while True:
        found = [e for e in audit.entries(signer.auth_dir / "audit.log") if e["serial"] == serial]
        if found:
            assert len(found) == 1
            return found[0]
        assert time.monotonic() < deadline, f"no audit entry for {serial} after {seconds}s"
        time.sleep(0.02)


def test_second_run_keeps_keys_and_rotation_has_an_overlap(tmp_path, cli):
    ca_dir = make_ca(tmp_path)
    first = start_signer(ca_dir)
    old = first.key("client")
    tls = (first.auth_dir / "tls.pem").read_bytes()
    names, cn = spec_names("client")
    assert authsign(first, old, profile="client", csr=csr_for(names, cn))[0] == 200
    assert first.stop()[0] == 143

    result = cli("signer", ca_dir, "--rotate-key", "client")
    assert result.code == 0, result.err
    again = cli("signer", ca_dir, "--rotate-key", "client")
    assert again.code == 4 and "--end-overlap client" in again.err
    overlap = start_signer(ca_dir)
    new = overlap.key("client")
    assert new != old
    assert (overlap.auth_dir / "tls.pem").read_bytes() == tls  # kept, not remade
    assert overlap.key("server") == first.key("server")
    for key in (old, new):
        assert authsign(overlap, key, profile="client", csr=csr_for(names, cn))[0] == 200
    assert overlap.stop()[0] == 143

    assert cli("signer", ca_dir, "--end-overlap", "client").code == 0
    after = start_signer(ca_dir)
    status, answer = authsign(after, old, profile="client", csr=csr_for(names, cn))
    assert (status, message(answer)) == (400, "invalid token")
    assert authsign(after, new, profile="client", csr=csr_for(names, cn))[0] == 200
    assert after.stop()[0] == 143


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        (["--listen", "nonsense"], 3, "not HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], 3, "not HOST:PORT"),
        ([], 2, "--listen HOST:PORT is required"),
        (["--listen", "127.0.0.1:1", "--allow-dns", "global.nomad"], 3, "role names"),
        (["--listen", "127.0.0.1:1", "--region", "a.b"], 3, "--region"),
        (["--end-overlap", "server"], 3, "no rotation"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cli, argv, code, text):
    ca_dir = make_ca(tmp_path)
    before = sorted(p.name for p in ca_dir.iterdir())
    result = cli("signer", ca_dir, *argv)
    assert result.code == code, result.err
    assert text in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert "Traceback" not in result.err
    assert sorted(p.name for p in ca_dir.iterdir()) == before


def test_a_busy_port_is_a_clear_error(tmp_path, running):
    done = subprocess.run(
        [sys.executable, "-m", "cfwrap", "signer", str(running.ca_dir),
         "--auth-dir", str(tmp_path / "new" / "er" / "auth"),
         "--listen", f"127.0.0.1:{running.port}"],
        capture_output=True, check=False, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert b"address already in use" in done.stderr
    assert len(done.stderr.decode().strip().splitlines()) == 1
    assert b"Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # the folders above --auth-dir were not left made


def test_an_open_key_file_is_refused(tmp_path, cli):
    ca_dir = make_ca(tmp_path)
    auth = ca_dir / "signer"
    auth.mkdir(mode=0o700)
    (auth / "server.key").write_text("ab" * 32 + "\n")
    (auth / "server.key").chmod(0o644)
    result = cli("signer", ca_dir, "--listen", f"127.0.0.1:{free_port()}")
    assert result.code == 3
    assert "chmod 600" in result.err


# --- validity a requester chooses: a cfssl 1.6.5 limit, shown and watched ----------------------

CHOSEN = {"NotBefore": "2020-01-01T00:00:00Z", "NotAfter": "2099-01-01T00:00:00Z"}


def serial_of(answer: dict[str, Any]) -> str:
    return str(int(parsers.read_certificate(answer["result"]["certificate"].encode()).serial, 16))


def test_a_requester_chooses_its_validity_the_audit_flags_it_and_the_ca_caps_it(tmp_path):
    """cfssl honours ``NotBefore``/``NotAfter`` in a sign request over the profile's expiry.

    ``signer.SignRequest`` (signer/signer.go, v1.6.5) has no JSON tags on the two fields, so Go
    matches ``NotBefore``/``notbefore``/... (not ``not_before``), and ``signer.FillTemplate``
    takes them before the profile's. A role key holder gets the lifetime it asks for. What caps
    it is the CA: a verifier (Go, openssl) refuses the chain once the CA has expired.
    """
    ca_dir = make_ca(tmp_path)
    signer = start_signer(ca_dir, "--expiry", "48h")
    names, cn = spec_names("client")
    try:
        status, chosen = authsign(
            signer, signer.key("client"), profile="client", csr=csr_for(names, cn), extra=CHOSEN
        )
        assert status == 200, chosen
        snake = {"not_before": CHOSEN["NotBefore"], "not_after": CHOSEN["NotAfter"]}
        status, ignored = authsign(
            signer, signer.key("client"), profile="client", csr=csr_for(names, cn), extra=snake
        )
        assert status == 200, ignored
        flagged = wait_for_entry(signer, serial_of(chosen))
        plain = wait_for_entry(signer, serial_of(ignored))
    finally:
        code, err = signer.stop()
    assert code == 143, err
    leaf_pem = chosen["result"]["certificate"].encode()
    leaf = parsers.read_certificate(leaf_pem)
    assert (leaf.not_before, leaf.not_after) == (
        datetime(2020, 1, 1, tzinfo=UTC),
        datetime(2099, 1, 1, tzinfo=UTC),
    )
    other = parsers.read_certificate(ignored["result"]["certificate"].encode())
    assert other.not_after - other.not_before == timedelta(hours=48)  # snake case is ignored
    # The signer cannot refuse it; it records and reports it.
    assert flagged["validity"] == "requested"
    assert flagged["not_before"].startswith("2020-01-01") and flagged["expiry"].startswith("2099")
    assert plain["validity"] == "policy"
    assert f"serial {serial_of(chosen)} (profile client" in err
    assert "has a validity its requester chose" in err
    # The cap that applies: the CA's own end. The leaf outlives the CA by decades, but no chain
    # to the CA verifies once the CA has expired (Go's rules, and openssl independently).
    ca_end = parsers.read_certificate((ca_dir / "ca.pem").read_bytes()).not_after
    assert leaf.not_after - ca_end > timedelta(days=365 * 60)
    roots = verify.load_pem_certificates((ca_dir / "ca.pem").read_bytes())
    cert = parsers.load_certificate(leaf_pem)
    verify.verify(cert, roots=roots, now=ca_end - timedelta(days=1), usage="clientAuth")
    with pytest.raises(verify.VerifyError, match="expired"):
        verify.verify(cert, roots=roots, now=ca_end + timedelta(minutes=1), usage="clientAuth")
    (tmp_path / "leaf.pem").write_bytes(leaf_pem)
    for when, ok in ((ca_end - timedelta(days=1), True), (ca_end + timedelta(minutes=1), False)):
        done = subprocess.run(
            ["openssl", "verify", "-attime", str(int(when.timestamp())),
             "-CAfile", str(ca_dir / "ca.pem"), str(tmp_path / "leaf.pem")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        assert ok or "certificate has expired" in done.stdout + done.stderr


def test_no_profile_setting_pins_the_validity_against_a_request(tmp_path):
    """A profile's ``not_before``/``not_after`` (the only dates cfssl's config has) lose too.

    multirootca with a profile pinned to 2030: a request without dates gets 2030, a request
    with ``NotAfter`` gets its own. So no signing config can refuse a requester's dates.
    """
    ca_dir = make_ca(tmp_path)
    key = "ab" * 32
    (tmp_path / "k.hex").write_text(key + "\n")
    (tmp_path / "k.hex").chmod(0o600)
    pinned = {"not_before": "2030-01-01T00:00:00Z", "not_after": "2030-06-01T00:00:00Z"}
    profile = {"usages": ["digital signature", "client auth"], "expiry": "48h",
               "auth_key": "k", **pinned}  # fmt: skip
    config = {
        "signing": {"default": profile, "profiles": {"client": profile}},
        "auth_keys": {"k": {"type": "standard", "key": f"file:{tmp_path / 'k.hex'}"}},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "roots.ini").write_text(
        f"[nomad]\nprivate = {(ca_dir / 'ca-key.pem').as_uri()}\n"
        f"certificate = {ca_dir / 'ca.pem'}\nconfig = {tmp_path / 'config.json'}\n"
    )
    port = free_port()
    multirootca = subprocess.Popen(
        [str(ROOT / ".tools" / "cfssl" / "bin" / "multirootca"), "-a", f"127.0.0.1:{port}",
         "-roots", str(tmp_path / "roots.ini"), "-l", "nomad"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        plain = RunningSigner(multirootca, ca_dir, tmp_path, port, {})
        names, cn = spec_names("client")
        url = f"http://127.0.0.1:{port}"
        found = []
        for extra in ({}, {"NotAfter": CHOSEN["NotAfter"]}):
            status, answer = authsign(
                plain, key, profile="client", csr=csr_for(names, cn), extra=extra, url=url
            )
            assert status == 200, answer
            found.append(parsers.read_certificate(answer["result"]["certificate"].encode()))
    finally:
        multirootca.terminate()
        multirootca.wait(10)
    assert (found[0].not_before, found[0].not_after) == (
        datetime(2030, 1, 1, tzinfo=UTC),
        datetime(2030, 6, 1, tzinfo=UTC),
    )
    assert found[1].not_after == datetime(2099, 1, 1, tzinfo=UTC)  # the request wins


# --- one signer per CA: the lock, and nothing published by a run that never answered ------------


def signer_files(auth_dir: Path) -> dict[str, bytes]:
    """The files a node or a restart relies on, and every name in the folder."""
    kept = ("tls.pem", "tls-key.pem", "signer.json", "cfssl.json", "multirootca.ini")
    found = {name: (auth_dir / name).read_bytes() for name in kept}
    found["names"] = "\n".join(sorted(p.name for p in auth_dir.iterdir())).encode()
    return found


def run_signer(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cfwrap", "signer", *map(str, argv)],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_a_second_signer_for_the_same_ca_is_refused_and_changes_nothing(running):
    before = signer_files(running.auth_dir)
    for listen in (
        f"127.0.0.1:{running.port}",  # its own address: in use
        f"8.8.8.8:{free_port()}",  # not this machine's
        f"0.0.0.0:{free_port()}",  # would bind: two multirootca on one certdb
    ):
        done = run_signer(running.ca_dir, "--listen", listen)
        assert done.returncode == 4, (listen, done.stderr)
        assert "another cfwrap signer runs for this CA" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not done.stdout
        assert signer_files(running.auth_dir) == before, listen
    # Keys are changed only while no signer runs: the running one has read them.
    for change in (["--rotate-key", "client"], ["--end-overlap", "client"]):
        done = run_signer(running.ca_dir, *change)
        assert done.returncode == 4, (change, done.stderr)
        assert "another cfwrap signer runs for this CA" in done.stderr
        assert signer_files(running.auth_dir) == before, change
    assert running.process.poll() is None
    names, cn = spec_names("client")
    status, _ = authsign(running, running.key("client"), profile="client", csr=csr_for(names, cn))
    assert status == 200


def test_a_start_that_fails_replaces_nothing_and_a_needed_new_tls_keeps_the_old(tmp_path):
    import socket

    ca_dir = make_ca(tmp_path)
    first = start_signer(ca_dir)
    assert first.stop()[0] == 143
    auth = first.auth_dir
    before = signer_files(auth)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for listen, text in (
            (f"127.0.0.1:{busy}", "address already in use"),
            (f"8.8.8.8:{free_port()}", "cannot assign requested address"),
        ):
            done = run_signer(ca_dir, "--listen", listen, "--tls-name", "new.example.com")
            assert done.returncode == 3, (listen, done.stderr)
            assert f"--listen {listen}: cannot listen there: {text}" in done.stderr
            assert "multirootca failed" not in done.stderr  # it never ran
            assert "Traceback" not in done.stderr
            # No TLS certificate was issued or put in place, signer.json still names the
            # signer that last ran, and the lock is gone with the run.
            assert signer_files(auth) == before, listen
            assert not list(ca_dir.glob(".*.lock"))
    # A new name needs a new TLS certificate: it takes tls.pem's place once the signer answers,
    # and the old pair is kept beside it, not lost.
    second = start_signer(ca_dir, "--tls-name", "signer.example.com")
    try:
        tls = parsers.read_certificate((auth / "tls.pem").read_bytes())
        assert "signer.example.com" in tls.dns_names
        assert second.info["address"] == f"https://127.0.0.1:{second.port}"
        (old_cert,) = auth.glob("tls.replaced-*.pem")
        (old_key,) = auth.glob("tls-key.replaced-*.pem")
        assert old_cert.read_bytes() == before["tls.pem"]
        assert old_key.read_bytes() == before["tls-key.pem"]
        assert old_key.stat().st_mode & 0o777 == 0o600
        assert not (auth / "tls.next.pem").exists() and not (auth / "tls-key.next.pem").exists()
        names, cn = spec_names("client")
        status, _ = authsign(second, second.key("client"), profile="client", csr=csr_for(names, cn))
        assert status == 200  # its TLS verifies against the CA
    finally:
        assert second.stop()[0] == 143
    # A TLS certificate that is still usable is kept as it is.
    now = signer_files(auth)
    third = start_signer(ca_dir, "--tls-name", "signer.example.com", port=second.port)
    assert third.stop()[0] == 143
    assert (auth / "tls.pem").read_bytes() == now["tls.pem"]
    assert len(list(auth.glob("tls.replaced-*.pem"))) == 1


def test_a_missing_ca_folder_names_what_the_signer_needs(tmp_path, cli):
    for ca_dir in (tmp_path / "nonexist", tmp_path):
        result = cli("signer", ca_dir, "--listen", f"127.0.0.1:{free_port()}")
        assert result.code == 3, result.err
        assert "give a CA folder (ca.pem, ca-key.pem), e.g. made by cfwrap ca" in result.err
        assert "--ca-key" not in result.err
        assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "nonexist").exists()
    assert not list(tmp_path.iterdir())
