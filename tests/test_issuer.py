"""The fleet-scale issuer: a real ``cfssl serve`` 1.6.5 on loopback, spoken to over real HTTP.

Fake ``cfssl`` scripts stand in only for what real cfssl cannot be made to do: answer with
something other than a certificate, or lose its port to another process.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cfwrap import issuer, keys, nomad, parsers, runner, tools, verify
from cfwrap.errors import InputError, ToolFailedError
from cfwrap.models import CSR, KeySpec
from cfwrap.specs import CertSpec, signing_config
from tests.conftest import ROOT
from tests.handmade import CFSSL, make_ca, wrapped_cfssl
from tests.tlspeer import Party, free_port, handshake, wait_for_port

REGION = "eu"
ROLES = ("server", "client", "cli")
SPECS = {role: CertSpec(role=role, region=REGION, ip_addresses=("10.0.0.5",)) for role in ROLES}
CONFIG = signing_config(list(SPECS.values()))
#: Every endpoint cfssl 1.6.5's ``serve`` registers: the ``endpoints`` map in cli/serve/serve.go
#: at tag v1.6.5 (a copy kept apart from the issuer's own list, to catch a change to either).
SERVE_ENDPOINTS = {
    "sign", "authsign", "info", "crl", "gencrl", "newcert", "bundle", "newkey", "init_ca",
    "scan", "scaninfo", "certinfo", "ocspsign", "revoke", "/", "health", "certadd",
}  # fmt: skip


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA made by real cfssl: ``ca.pem`` beside ``ca-key.pem``."""
    return make_ca(tmp_path_factory.mktemp("issuer-ca"))


@pytest.fixture(scope="module")
def cfssl_tool() -> tools.Tool:
    return tools.find("cfssl")


def _signer(cfssl_tool: tools.Tool, ca: Path, **options: object) -> issuer.LocalSigner:
    return issuer.LocalSigner(
        cfssl_tool,
        ca_cert_pem=ca.read_bytes(),
        ca_key_pem=ca.with_name("ca-key.pem").read_bytes(),
        config=options.pop("config", CONFIG),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def signer(cfssl_tool: tools.Tool, ca: Path) -> Iterator[issuer.LocalSigner]:
    """One local signer for the module's read-only tests."""
    with _signer(cfssl_tool, ca) as running:
        yield running


def _request(
    spec: CertSpec, *, label: str = "", cn: str | None = None
) -> tuple[issuer.SignRequest, keys.PrivateKey]:
    key = keys.new_private_key(spec.key)
    csr = spec.csr() if cn is None else CSR(CN=cn, hosts=(cn,))
    hosts = spec.hosts() if cn is None else (cn,)
    request = issuer.SignRequest(keys.csr_pem(key, csr), spec.role, hosts, label=label)
    return request, key


def _gone(pid: int) -> bool:
    """Whether a process has exited (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return False


def _raw(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    if name.endswith("-key.pem"):
        path.chmod(0o600)
    return path


# --- issuance --------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_each_role_is_issued_as_asked_and_chains_to_the_ca(tmp_path, signer, ca, role):
    spec = SPECS[role]
    request, key = _request(spec, label=f"nodes/{REGION}/{role}-1")
    before = datetime.now(UTC)
    pem = signer.sign(request)

    cert = parsers.load_certificate(pem)
    facts = parsers.certificate_facts(cert)
    assert nomad.certificate_problems(spec, facts) == []
    assert facts.common_name == f"{role}.{REGION}.nomad"
    wanted_eku = ["clientAuth"] if role == "cli" else ["clientAuth", "serverAuth"]  # agents serve
    assert sorted(facts.extended_key_usage) == wanted_eku
    assert facts.key_usage == ("digital_signature",)
    assert facts.key.public_key_sha256 == parsers.read_csr(request.csr_pem).key.public_key_sha256
    # cfssl backdates by five minutes; the profile gives 8760h from then.
    assert before - timedelta(minutes=6) <= facts.not_before <= before
    assert facts.not_after - facts.not_before == timedelta(hours=8760)
    assert parsers.is_issued_by(cert, parsers.load_certificate(ca.read_bytes()))
    roots = verify.load_pem_certificates(ca.read_bytes())
    verify.check_issued(cert, roots=roots, role=role, region=REGION, now=datetime.now(UTC))

    path = _write(tmp_path, "leaf.pem", pem)
    purpose = "sslserver" if role == "server" else "sslclient"
    checked = subprocess.run(
        ["openssl", "verify", "-CAfile", ca, "-purpose", purpose, path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and checked.stdout.strip().endswith("OK"), checked
    assert keys.private_key_pem(key) not in pem


def test_issued_server_and_client_complete_a_mutual_tls_handshake(tmp_path, signer, ca):
    parties = {}
    for role in ("server", "client"):
        request, key = _request(SPECS[role])
        cert = _write(tmp_path, f"{role}.pem", signer.sign(request))
        key_file = _write(tmp_path, f"{role}-key.pem", keys.private_key_pem(key))
        parties[role] = Party(cert, key_file, ca)
    outcome = handshake(parties["server"], parties["client"], f"server.{REGION}.nomad")
    assert outcome.ok, outcome


def test_sign_all_returns_300_in_order_with_unique_serials(signer):
    spec = SPECS["client"]
    key = keys.new_private_key(KeySpec())
    requests = [
        issuer.SignRequest(
            keys.csr_pem(key, CSR(CN=f"client-{i}.{REGION}.nomad")),
            "client",
            (f"client-{i}.{REGION}.nomad",),
            label=f"nodes/{REGION}/client-{i}",
        )
        for i in range(300)
    ]
    results = list(signer.sign_all(requests))
    assert [request for request, _ in results] == requests
    names = [parsers.read_certificate(pem).common_name for _, pem in results]
    assert names == [f"client-{i}.{REGION}.nomad" for i in range(300)]
    serials = {parsers.read_certificate(pem).serial for _, pem in results}
    assert len(serials) == 300
    assert spec.role == "client"


def test_sign_all_pulls_requests_lazily(signer):
    pulled = 0
    request, _ = _request(SPECS["cli"])

    def source() -> Iterator[issuer.SignRequest]:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield request

    results = signer.sign_all(source())
    next(results)
    assert pulled <= 2 * signer.workers + 1  # pending stays bounded, so memory stays flat
    results.close()
    assert pulled < 100


def test_every_answer_is_closed_where_it_is_read_never_by_a_finalizer(cfssl_tool, ca, monkeypatch):
    # Signing runs in the main thread, where signal handlers run: a SIGTERM handled inside a
    # close() that a finalizer runs is swallowed by CPython (exit 6 instead of 143). The local
    # signer's requests go through cfwrap.loopback (no answer objects to close); a remote
    # signer's, and the local one's readiness probes, read http.client answers.
    by_finalizer = []
    real_close = http.client.HTTPResponse.close

    def close(self: http.client.HTTPResponse) -> None:
        if getattr(self, "_finalizing", False):
            by_finalizer.append(self)
        real_close(self)

    monkeypatch.setattr(http.client.HTTPResponse, "close", close)
    request, _ = _request(SPECS["client"])
    with _signer(cfssl_tool, ca) as signer:
        assert len(list(signer.sign_all([request] * 3 * signer.workers))) == 3 * signer.workers
        signer.sign(request)
        assert signer.scratch is not None
        auth_key = (signer.scratch / "auth-key.hex").read_text().strip()
        with issuer.RemoteSigner(
            signer.url, auth_keys={"client": auth_key}, ssl_context=None
        ) as remote:
            for _ in range(3):  # on one kept-alive connection, from this (the main) thread
                remote.sign(request)
    gc.collect()
    assert by_finalizer == []


def test_a_failure_sending_a_later_request_comes_after_the_earlier_answers(signer):
    request, _ = _request(SPECS["client"])
    bad = issuer.SignRequest(request.csr_pem, "no-such-profile", request.hosts, label="bad")
    got = []
    with pytest.raises(InputError, match="no-such-profile"):
        for one, _pem in signer.sign_all([request, request, bad, request]):
            got.append(one)
    assert got == [request, request]  # in input order: the two before the bad one, then it


# --- what the server exposes ----------------------------------------------------------------


def test_every_endpoint_but_authsign_and_health_is_disabled(signer):
    assert set(issuer.DISABLED_ENDPOINTS) == SERVE_ENDPOINTS - {"authsign", "health"}
    for endpoint in sorted(SERVE_ENDPOINTS - {"authsign", "health", "/"}):
        path = issuer.API + endpoint
        for method, body in (("GET", None), ("POST", b'{"CN":"x","hosts":["x"]}')):
            status, answer = _raw(signer.url, method, path, body)
            assert (status, answer.strip()) == (404, b"404 page not found"), (endpoint, method)
    for path in ("/", "/index.html", "/scan", "/bundle"):  # the static web UI
        assert _raw(signer.url, "GET", path)[0] == 404
    # newcert and init_ca take no auth: a real request must find nothing there either.
    newcert = {"request": {"CN": "evil", "hosts": ["server.eu.nomad"]}, "profile": "server"}
    assert _raw(signer.url, "POST", issuer.API + "newcert", json.dumps(newcert).encode())[0] == 404
    assert _raw(signer.url, "POST", issuer.API + "init_ca", b'{"CN":"evil CA"}')[0] == 404
    assert _raw(signer.url, "GET", issuer.HEALTH)[0] == 200
    assert _raw(signer.url, "GET", issuer.AUTHSIGN)[0] == 405  # there, but POST only


def test_the_server_listens_on_loopback_only(signer):
    port = int(signer.url.rpartition(":")[2])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and fields[3] == "0A":
                listening.append(address)
    assert listening == ["0100007F"]


def _authsign_body(request: Mapping[str, object], key: bytes | None) -> bytes:
    inner = json.dumps(request).encode()
    body: dict[str, str] = {"request": base64.b64encode(inner).decode()}
    if key is not None:
        body["token"] = base64.b64encode(hmac.new(key, inner, hashlib.sha256).digest()).decode()
    return json.dumps(body).encode()


def test_authsign_without_a_token_or_with_a_wrong_one_is_refused(signer):
    request, _ = _request(SPECS["server"])
    inner = {
        "certificate_request": request.csr_pem.decode(),
        "profile": "server",
        "hosts": list(request.hosts),
    }
    for key in (None, b"\x00" * 32, os.urandom(32)):
        status, answer = _raw(signer.url, "POST", issuer.AUTHSIGN, _authsign_body(inner, key))
        assert status == 400
        assert json.loads(answer)["errors"][0]["message"] == "invalid token"
    with pytest.raises(ToolFailedError) as caught:
        issuer.authsign(signer.url, os.urandom(32).hex(), request)
    message = str(caught.value)
    assert "refused: invalid token (code 400, HTTP 400)" in message
    assert "\n" not in message and request.where in message


def test_a_token_for_other_hosts_is_refused(signer):
    assert signer.scratch is not None
    key = bytes.fromhex((signer.scratch / "auth-key.hex").read_text().strip())
    request, _ = _request(SPECS["client"])
    signed = {"certificate_request": request.csr_pem.decode(), "profile": "client", "hosts": []}
    body = json.loads(_authsign_body(signed, key))
    tampered = dict(signed, hosts=["server.eu.nomad"])
    body["request"] = base64.b64encode(json.dumps(tampered).encode()).decode()
    status, answer = _raw(signer.url, "POST", issuer.AUTHSIGN, json.dumps(body).encode())
    assert (status, json.loads(answer)["errors"][0]["message"]) == (400, "invalid token")


def test_unknown_profiles_are_refused_before_cfssl_sees_them(signer):
    request, _ = _request(SPECS["server"])
    for profile in ("servr", "", "default"):
        with pytest.raises(InputError, match="not in the signing config"):
            signer.sign(issuer.SignRequest(request.csr_pem, profile, request.hosts))
    # Why: with the right token, cfssl signs an unknown profile under the default profile
    # without a word (signer.Profile falls back), so a typo would quietly change the usages.
    assert signer.scratch is not None
    key_hex = (signer.scratch / "auth-key.hex").read_text().strip()
    typo = issuer.SignRequest(request.csr_pem, "servr", request.hosts)
    facts = parsers.read_certificate(issuer.authsign(signer.url, key_hex, typo))
    assert facts.extended_key_usage == ("clientAuth",)  # the default profile's, not a server's


def test_every_profile_requires_the_runs_auth_key(signer):
    assert signer.scratch is not None
    config = json.loads((signer.scratch / "config.json").read_text())
    profiles = [config["signing"]["default"], *config["signing"]["profiles"].values()]
    assert len(profiles) == 1 + len(ROLES)
    assert {p["auth_key"] for p in profiles} == {"cfwrap-run"}
    key_file = signer.scratch / "auth-key.hex"
    assert config["auth_keys"] == {"cfwrap-run": {"type": "standard", "key": f"file:{key_file}"}}


def test_refusals_come_back_in_one_line(signer):
    with pytest.raises(InputError, match="not one PEM certificate request"):
        signer.sign(issuer.SignRequest(b"not a csr", "server", ()))
    # A CSR whose signature does not verify: cfssl refuses it, in its own words, one line.
    request, _ = _request(SPECS["server"])
    der = bytearray(x509.load_pem_x509_csr(request.csr_pem).public_bytes(Encoding.DER))
    der[-1] ^= 0x01
    forged = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(ToolFailedError) as caught:
        signer.sign(issuer.SignRequest(forged, "server", request.hosts, label="forged"))
    message = str(caught.value)
    assert message.startswith("cfssl failed: forged: refused: ") and "\n" not in message


def test_a_request_made_elsewhere_is_read_for_its_own_key(tmp_path, signer):
    """A CSR cfwrap did not make (openssl's here) is parsed: its certificate is for its key."""
    key_file = tmp_path / "other-key.pem"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key_file],
        check=True,
    )
    csr_pem = subprocess.run(
        ["openssl", "req", "-new", "-key", key_file, "-subj", "/CN=client.eu.nomad"],
        check=True,
        capture_output=True,
    ).stdout
    spki = subprocess.run(
        ["openssl", "pkey", "-in", key_file, "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    key_file.unlink()
    hosts = ("client.eu.nomad", "localhost", "127.0.0.1")
    cert_pem = signer.sign(issuer.SignRequest(csr_pem, "client", hosts, label="openssl"))
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == spki
    # One of cfwrap's own requests, its key's bytes changed: read afresh, and refused.
    request, _ = _request(SPECS["client"])
    damaged = request.csr_pem.replace(b"\n", b"\nA", 1)
    with pytest.raises(InputError, match="damaged certificate request"):
        signer.sign(issuer.SignRequest(damaged, "client", request.hosts, label="damaged"))


# --- secrets and lifecycle ------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def records() -> Iterator[_Records]:
    """Every log line of cfwrap's runner and issuer, at DEBUG."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("cfwrap.runner", "cfwrap.issuer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def test_no_key_in_argv_environment_or_logs_and_a_private_scratch_folder(cfssl_tool, ca, records):
    ca_key = ca.with_name("ca-key.pem").read_bytes()
    ca_key_lines = [line for line in ca_key.splitlines() if line and b"-----" not in line]
    with _signer(cfssl_tool, ca) as running:
        assert running.service is not None and running.scratch is not None
        scratch = running.scratch
        pid = running.service.pid
        auth_key = (scratch / "auth-key.hex").read_text().strip()
        assert len(bytes.fromhex(auth_key)) == 32
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert argv[1:3] == [b"serve", b"-address"]
        # One thread of Go code: its idle threads' spinning cost a fleet apply 8% of its CPU.
        assert b"GOMAXPROCS=1" in environ.split(b"\0")
        for blob in (b"\0".join(argv), environ):
            assert auth_key.encode() not in blob
            assert not any(line in blob for line in ca_key_lines)
            assert b"PRIVATE" not in blob
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
        for name in ("ca.pem", "auth-key.hex", "config.json"):
            assert stat.S_IMODE((scratch / name).stat().st_mode) == 0o600, name
        # cfssl has read the CA key: its copy is gone before any request is signed.
        assert not (scratch / "ca-key.pem").exists()
        assert auth_key not in (scratch / "config.json").read_text()
        request, _ = _request(SPECS["client"])
        running.sign(request)
        with pytest.raises(ToolFailedError):
            issuer.authsign(running.url, "00" * 32, request)
        assert running.scratch == scratch
    assert not scratch.exists()
    assert _gone(pid)
    text = "\n".join(records.lines)
    assert "serve" in text and "exited" in text  # the run and its output were logged
    assert auth_key not in text
    assert not any(line.decode() in text for line in ca_key_lines)
    assert "PRIVATE KEY" not in text


def test_the_server_stops_and_the_folder_goes_when_the_block_raises(cfssl_tool, ca):
    with pytest.raises(RuntimeError, match="the body failed"), _signer(cfssl_tool, ca) as running:
        assert running.service is not None and running.scratch is not None
        pid, scratch = running.service.pid, running.scratch
        raise RuntimeError("the body failed")
    assert _gone(pid)
    assert not scratch.exists()
    assert running.service is None and running.scratch is None
    with pytest.raises(RuntimeError, match="not running"):
        running.sign(_request(SPECS["client"])[0])


_SCRIPT = """
import signal, sys, time
from pathlib import Path

from cfwrap import cli, issuer, tools
from cfwrap.specs import CertSpec, signing_config

ca = Path(sys.argv[1])
specs = [CertSpec(role="client")]
signal.signal(signal.SIGTERM, cli._on_sigterm)  # what cfwrap's main installs
try:
    with issuer.LocalSigner(
        tools.find("cfssl"),
        ca_cert_pem=ca.read_bytes(),
        ca_key_pem=ca.with_name("ca-key.pem").read_bytes(),
        config=signing_config(specs),
    ) as signer:
        print(signer.service.pid, signer.scratch, flush=True)
        time.sleep(60)
except cli._Terminated:
    sys.exit(143)
"""


def _start_script(tmp_path: Path, ca: Path) -> tuple[subprocess.Popen[str], int, Path]:
    script = tmp_path / "hold_signer.py"
    script.write_text(_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, script, ca], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    pid, _, scratch = process.stdout.readline().strip().partition(" ")
    assert pid, "the script did not start its signer"
    return process, int(pid), Path(scratch)


def test_sigterm_to_cfwrap_stops_its_signer_and_removes_the_folder(tmp_path, ca):
    process, pid, scratch = _start_script(tmp_path, ca)
    with process:
        assert not _gone(pid) and scratch.is_dir()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 143
    assert _wait_gone(pid)
    assert not scratch.exists()


def test_a_killed_cfwrap_takes_its_signer_with_it(tmp_path, ca):
    process, pid, scratch = _start_script(tmp_path, ca)
    with process:
        process.kill()  # no handler runs: the kernel's parent-death signal stops cfssl
        process.wait(10)
    assert _wait_gone(pid)
    assert scratch.is_dir()  # what no process can clean up after SIGKILL: the 0700 folder
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()


def test_cfssl_killed_mid_run_gives_one_clear_error(cfssl_tool, ca):
    request, _ = _request(SPECS["client"])
    with _signer(cfssl_tool, ca) as running:
        running.sign(request)
        assert running.service is not None
        os.kill(running.service.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ToolFailedError) as caught:
            running.sign(request)
        assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("cfssl failed: cfssl serve was killed by signal 9 while signing ")
    assert "\n" not in message


def test_cfssl_killed_during_sign_all_stops_it_with_one_error(cfssl_tool, ca):
    spec = SPECS["client"]
    key = keys.new_private_key(KeySpec())
    csr = keys.csr_pem(key, spec.csr())
    requests = [issuer.SignRequest(csr, "client", spec.hosts(), label=f"c{i}") for i in range(400)]
    done = 0
    with _signer(cfssl_tool, ca) as running:
        assert running.service is not None
        started = time.monotonic()
        with pytest.raises(ToolFailedError) as caught:
            for _ in running.sign_all(requests):
                done += 1
                if done == 20:
                    os.kill(running.service.pid, signal.SIGKILL)
        assert time.monotonic() - started < 10
    assert 20 <= done < 400
    assert "cfssl serve was killed by signal 9 while signing c" in str(caught.value)


def test_a_ca_key_cfssl_cannot_read_fails_at_start_with_cfssls_reason(cfssl_tool, ca):
    broken = issuer.LocalSigner(
        cfssl_tool, ca_cert_pem=ca.read_bytes(), ca_key_pem=b"not a key\n", config=CONFIG
    )
    with pytest.raises(ToolFailedError) as caught, broken:
        pass
    message = str(caught.value)
    assert "signer did not start: couldn't initialize signer" in message, message
    assert broken.service is None and broken.scratch is None


def test_workers_must_be_positive(cfssl_tool, ca):
    with pytest.raises(InputError, match="workers 0"):
        _signer(cfssl_tool, ca, workers=0)


# --- failures only a fake cfssl can produce -------------------------------------------------

_FAKE_SERVER = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode, args = sys.argv[1], sys.argv[2:]
port = int(args[args.index("-port") + 1])
ca = open(args[args.index("-ca") + 1]).read()
answers = {
    "empty": {"success": True, "result": {"certificate": ""}, "errors": []},
    "not-json": None,
    "two": {"success": True, "result": {"certificate": ca + ca}, "errors": []},
    "other-key": {"success": True, "result": {"certificate": ca}, "errors": []},
    "refuse": {"success": False, "result": None,
               "errors": [{"code": 5300, "message": "bad name\\n\\x1b[31mforged line"}]},
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.endswith("/health"):
            self.send(200, b'{"success":true,"result":{"healthy":true}}')
        else:
            self.send(405 if self.path.endswith("/authsign") else 404, b"{}")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if mode.startswith("slow-second:"):  # counts the requests; the second never in time
            with open(mode.partition(":")[2], "a") as count:
                count.write("post\\n")
            with open(mode.partition(":")[2]) as count:
                if len(count.readlines()) == 2:
                    time.sleep(3)
            self.send(400, json.dumps(answers["refuse"]).encode())
            return
        if mode == "close":
            self.close_connection = True
            return
        answer = answers[mode]
        self.send(200 if mode != "refuse" else 400,
                  b"<html>oops" if answer is None else json.dumps(answer).encode())

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _fake_cfssl(root: Path, mode: str) -> tools.Tool:
    server = root / "fake_serve.py"
    root.mkdir(parents=True, exist_ok=True)
    server.write_text(_FAKE_SERVER)
    folder = wrapped_cfssl(root / "fake", f'exec {sys.executable} {server} {mode} "$@"')
    return tools.find("cfssl", directory=folder)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("empty", "the answer holds no certificate, or more than one"),
        ("two", "the answer holds no certificate, or more than one"),
        ("not-json", "refused: <html>oops (HTTP 200)"),
        ("other-key", "the certificate is not for the request's key"),
        ("refuse", "refused: bad name \\x1b[31mforged line (code 5300, HTTP 400)"),
        ("close", "connection closed by the server"),
    ],
)
def test_answers_that_are_not_one_certificate_for_the_key_are_refused(tmp_path, ca, mode, expected):
    request, _ = _request(SPECS["server"], label="nodes/eu/server-1")
    with _signer(_fake_cfssl(tmp_path, mode), ca) as running:
        for _ in range(2):  # a second time: over a kept-alive connection, or a new one
            with pytest.raises(ToolFailedError) as caught:
                running.sign(request)
            message = str(caught.value)
            assert message.startswith("cfssl failed: nodes/eu/server-1: "), message
            assert expected in message and "\n" not in message and "\x1b" not in message


def test_a_slow_answer_is_never_asked_for_again(tmp_path, ca, monkeypatch):
    """A timeout on a kept-alive connection is a failure, not a closed connection to retry:
    cfssl may have signed the request, and asking again would sign it twice."""
    monkeypatch.setattr(issuer, "ANSWER_WITHIN", 1.0)
    count = tmp_path / "posts"
    request, _ = _request(SPECS["client"], label="nodes/eu/client-1")
    with _signer(_fake_cfssl(tmp_path, f"slow-second:{count}"), ca) as running:
        with pytest.raises(ToolFailedError, match="refused"):  # kept alive after it
            running.sign(request)
        with pytest.raises(ToolFailedError, match="no answer in time"):
            running.sign(request)
        time.sleep(2.5)  # the slow answer's handler is done by now
        assert count.read_text().splitlines() == ["post", "post"]


def test_a_port_taken_by_another_process_is_retried_on_a_new_one(tmp_path, ca):
    marker = tmp_path / "failed-once"
    body = (
        f"if [ ! -e {marker} ]; then touch {marker}; "
        'echo "listen tcp 127.0.0.1:1: bind: address already in use" >&2; exit 1; fi\n'
        'exec "$REAL" "$@"'
    )
    fake = tools.find("cfssl", directory=wrapped_cfssl(tmp_path / "fake", body))
    with _signer(fake, ca) as running:
        assert marker.exists()
        request, _ = _request(SPECS["client"])
        assert parsers.read_certificate(running.sign(request)).common_name == "client.eu.nomad"


def test_a_port_answered_by_another_server_is_not_trusted(tmp_path, ca, monkeypatch):
    # Another process listens on the port picked for cfssl (it won the race): the health check
    # is answered, but not by cfssl, which fails to bind. A new port is tried.
    squatter = socket.create_server(("127.0.0.1", 0))
    taken = squatter.getsockname()[1]
    picks = iter([taken])
    original = issuer._free_port
    monkeypatch.setattr(issuer, "_free_port", lambda: next(picks, None) or original())
    stop = threading.Event()

    def answer() -> None:
        squatter.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = squatter.accept()
            except TimeoutError:
                continue
            with connection:
                connection.recv(4096)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with _signer(tools.find("cfssl"), ca) as running:
            assert not running.url.endswith(f":{taken}")
            request, _ = _request(SPECS["client"])
            running.sign(request)
    finally:
        stop.set()
        thread.join(5)
        squatter.close()


def test_a_cfssl_that_never_answers_fails_within_the_readiness_limit(tmp_path, ca, monkeypatch):
    monkeypatch.setattr(issuer, "READY_WITHIN", 0.5)
    fake = tools.find("cfssl", directory=wrapped_cfssl(tmp_path / "fake", "exec sleep 30"))
    started = time.monotonic()
    with (
        pytest.raises(ToolFailedError, match=r"did not answer on http://127\.0\.0\.1:"),
        _signer(fake, ca),
    ):
        pass
    assert time.monotonic() - started < 5


def test_a_cfssl_that_exits_at_once_says_why(tmp_path, ca):
    body = 'echo "2026/01/01 [CRITICAL] cannot read the config" >&2; exit 3'
    fake = tools.find("cfssl", directory=wrapped_cfssl(tmp_path / "fake", body))
    with pytest.raises(ToolFailedError) as caught, _signer(fake, ca):
        pass
    assert str(caught.value).startswith(
        "cfssl failed: cfssl serve exited (3: cannot read the config) before it answered; "
    )


# --- authsign to any server -------------------------------------------------------------------


def test_authsign_over_tls_to_a_cfssl_serve_with_its_own_key(tmp_path, signer, ca):
    server_request, server_key = _request(SPECS["server"])
    tls_cert = _write(tmp_path, "tls.pem", signer.sign(server_request))
    tls_key = _write(tmp_path, "tls-key.pem", keys.private_key_pem(server_key))
    auth_key = os.urandom(16).hex()
    key_file = _write(tmp_path, "auth.hex", auth_key.encode())
    config = json.loads(CONFIG.model_dump_json(exclude_none=True))
    for profile in [config["signing"]["default"], *config["signing"]["profiles"].values()]:
        profile["auth_key"] = "k"
    config["auth_keys"] = {"k": {"type": "standard", "key": f"file:{key_file}"}}
    config_file = _write(tmp_path, "config.json", json.dumps(config).encode())
    port = free_port()
    server = subprocess.Popen(
        [CFSSL, "serve", "-address", "127.0.0.1", "-port", str(port),
         "-ca", ca, "-ca-key", ca.with_name("ca-key.pem"), "-config", config_file,
         "-tls-cert", tls_cert, "-tls-key", tls_key,
         "-disable", ",".join(issuer.DISABLED_ENDPOINTS)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        trusting = ssl.create_default_context(cafile=str(ca))
        request, _ = _request(SPECS["client"])
        url = f"https://127.0.0.1:{port}"
        pem = issuer.authsign(url, auth_key, request, ssl_context=trusting)
        assert parsers.read_certificate(pem).common_name == "client.eu.nomad"
        with pytest.raises(
            ToolFailedError,
            match=r"TLS failed \(CERTIFICATE_VERIFY_FAILED: unable to get local issuer cert",
        ):
            issuer.authsign(url, auth_key, request)  # the system's roots do not know this CA
        with pytest.raises(ToolFailedError, match="refused: invalid token"):
            issuer.authsign(url, os.urandom(16).hex(), request, ssl_context=trusting)
    finally:
        server.terminate()
        server.wait(10)


def test_authsign_says_when_nothing_listens_or_nothing_answers():
    request, _ = _request(SPECS["client"], label="nodes/eu/client-9")
    port = free_port()
    with pytest.raises(ToolFailedError) as caught:
        issuer.authsign(f"http://127.0.0.1:{port}", "00" * 32, request)
    assert str(caught.value).startswith(
        f"cfssl failed: nodes/eu/client-9: connection refused at http://127.0.0.1:{port}; "
    )
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ToolFailedError, match="no answer in time"):
            issuer.authsign(url, "00" * 32, request, timeout=0.3)


def test_authsign_refuses_bad_addresses_and_keys():
    request, _ = _request(SPECS["client"])
    with pytest.raises(InputError, match="not an http"):
        issuer.authsign("127.0.0.1:8888", "00" * 32, request)
    with pytest.raises(InputError, match="not hexadecimal"):
        issuer.authsign("http://127.0.0.1:1", "not hex", request)


# --- the runner's services, which the signer is built on ------------------------------------


def test_a_service_that_ignores_sigterm_is_killed_after_the_grace():
    service = runner.start_service(runner.Call.of(["bash", "-c", "trap '' TERM; exec sleep 30"]))
    time.sleep(0.2)  # let bash set its trap
    started = time.monotonic()
    result = service.stop(grace=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert result.returncode == -signal.SIGKILL and not service.alive()
    assert service.stop() is result  # a second stop only returns the result
    assert _gone(service.pid)


def test_a_stop_gives_up_on_a_watcher_that_never_reports(monkeypatch):
    """A SIGTERM that landed while this process held logging's lock left sh's threads, and so
    the service's watcher, waiting for good: stop() then waited without end (a renew run seen
    stuck for minutes, holding its folder's lock). It gives up after the kill and a bound."""
    stuck = threading.Event()

    def never_reports(self: runner.Service) -> None:
        stuck.wait()  # sh's wait, blocked on a lock nobody will release

    monkeypatch.setattr(runner.Service, "_watch", never_reports)
    monkeypatch.setattr(runner, "KILLED_WITHIN", 0.5)
    service = runner.start_service(runner.Call.of(["sleep", "30"]))
    stopping = threading.Thread(target=lambda: results.append(service.stop(grace=0.2)), daemon=True)
    results: list[runner.Result] = []
    stopping.start()
    stopping.join(10)
    stuck.set()
    assert results, "stop() waited for a watcher that never reports"
    assert results[0].returncode == -signal.SIGKILL
    assert _gone(service.pid)  # killed, not left running


def test_stop_all_kills_services_too():
    service = runner.start_service(runner.Call.of(["sleep", "30"]))
    assert service.alive()
    runner.stop_all()
    assert service.wait(5)
    assert service.returncode == -signal.SIGKILL
    assert service.stop().returncode == -signal.SIGKILL


def test_a_service_has_no_timeout_and_keeps_its_output_capped():
    script = "head -c 3000000 /dev/zero | tr '\\0' x >&2; exec sleep 30"
    service = runner.start_service(runner.Call.of(["bash", "-c", script], timeout=0.2))
    time.sleep(1.0)  # well past its (ignored) timeout
    assert service.alive()
    result = service.stop()
    assert result.returncode == -signal.SIGTERM
    assert len(result.stderr) <= runner.OUTPUT_CAP + 200 and result.stderr_dropped > 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"success": true, "result": {"certificate": "\\ud800"}}',  # a lone surrogate
        b"[" * 5000 + b"]" * 5000,  # nested past Python's stack
    ],
    ids=["lone-surrogate", "deep-nesting"],
)
def test_a_garbled_answer_is_a_tool_failure_not_a_traceback(body):
    request, _ = _request(SPECS["client"])
    with pytest.raises(ToolFailedError) as caught:
        issuer._certificate(request, b"spki", 200, body)
    assert "\n" not in str(caught.value)
