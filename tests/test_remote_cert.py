"""``cfwrap cert --remote``: the key made on the node, only a CSR sent to a real signer.

A recording proxy between cfwrap and the signer terminates TLS with the signer's own
certificate (so cfwrap's CA check passes) and keeps every request body it forwards: the tests
read exactly what left the node.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cfwrap import issuer, keys, parsers, remote, verify
from cfwrap.errors import InputError, ToolFailedError
from cfwrap.specs import CertSpec
from tests.conftest import assert_kit_manifest
from tests.test_signer import ROOT, RunningSigner, make_ca, start_signer
from tests.tlspeer import Party, free_port, handshake


@dataclass
class Proxy:
    """A TLS-terminating HTTP proxy in front of a signer that records each request body."""

    signer: RunningSigner
    port: int = 0
    bodies: list[bytes] = field(default_factory=list)
    before_forward: Callable[[], None] | None = None
    #: Changes the body on its way to the signer (a signer that answers another request).
    rewrite: Callable[[bytes], bytes] | None = None
    server: socketserver.ThreadingTCPServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        proxy = self
        auth = self.signer.auth_dir
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(str(auth / "tls.pem"), str(auth / "tls-key.pem"))
        upstream_ctx = ssl.create_default_context(cafile=str(self.signer.ca_dir / "ca.pem"))

        class Handler(socketserver.StreamRequestHandler):
            def setup(self) -> None:
                self.request = server_ctx.wrap_socket(self.request, server_side=True)
                super().setup()

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    self.request.close()  # the TLS socket: the server closes only the raw one

            def handle(self) -> None:
                request_line = self.rfile.readline().decode()
                headers = {}
                while (line := self.rfile.readline().decode().strip()) != "":
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = self.rfile.read(int(headers.get("content-length", "0")))
                proxy.bodies.append(body)
                if proxy.before_forward is not None:
                    proxy.before_forward()
                if proxy.rewrite is not None:
                    body = proxy.rewrite(body)
                method, path, _ = request_line.split(" ", 2)
                up = http.client.HTTPSConnection(
                    "127.0.0.1", proxy.signer.port, context=upstream_ctx, timeout=10
                )
                try:
                    up.request(
                        method, path, body=body, headers={"Content-Type": "application/json"}
                    )
                    answer = up.getresponse()
                    data = answer.read()
                except OSError:
                    return  # the signer is gone: close the connection, as a dying signer would
                finally:
                    up.close()
                self.wfile.write(
                    f"HTTP/1.1 {answer.status} {answer.reason}\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                    + data
                )

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSigner]:
    ca_dir = make_ca(tmp_path_factory.mktemp("remote"))
    running = start_signer(ca_dir, "--allow-dns", "example.com")
    yield running
    assert running.stop()[0] == 143


@pytest.fixture
def proxy(signer: RunningSigner) -> Iterator[Proxy]:
    recording = Proxy(signer).start()
    yield recording
    recording.stop()


def remote_argv(signer: RunningSigner, address: str, role: str, out: Path, *extra: str | Path):
    return ["cert", "--remote", address, "--auth-key", signer.auth_dir / f"{role}.key",
            "--ca", signer.ca_dir / "ca.pem", "--role", role, "--out", out, *extra]  # fmt: skip


def assert_requests_hold_no_key(bodies: list[bytes], key_file: Path) -> None:
    key_lines = [
        line for line in key_file.read_text().splitlines() if line and not line.startswith("-----")
    ]
    assert bodies
    for body in bodies:
        outer = json.loads(body)
        inner = base64.b64decode(outer["request"])
        text = body.decode() + inner.decode()
        assert "PRIVATE KEY" not in text
        for line in key_lines:
            assert line not in text
        request = json.loads(inner)
        csr = parsers.read_csr(request["certificate_request"].encode())
        key = parsers.read_private_key(key_file.read_bytes())
        assert csr.key.public_key_sha256 == key.public_key_sha256  # the CSR is for this key
        assert set(request) == {"certificate_request", "profile", "hosts"}


def test_every_role_through_the_signer_works_in_tls(tmp_path, cli, signer, proxy):
    out = tmp_path / "node"
    for role in ("server", "client", "cli"):
        extra = ["--dns", "node7.example.com", "--ip", "10.0.0.7"] if role != "cli" else []
        result = cli(*remote_argv(signer, proxy.address, role, out, *extra))
        assert result.code == 0, result.err
    roots = verify.load_pem_certificates((signer.ca_dir / "ca.pem").read_bytes())
    for role in ("server", "client", "cli"):
        stem = out / f"global-{role}-nomad"
        assert (out / f"global-{role}-nomad-key.pem").stat().st_mode & 0o777 == 0o600
        cert = parsers.load_certificate(Path(f"{stem}.pem").read_bytes())
        verify.check_issued(cert, roots=roots, role=role, region="global", now=datetime.now(UTC))
    assert_kit_manifest(out)
    assert (out / "ca.pem").read_bytes() == (signer.ca_dir / "ca.pem").read_bytes()

    def party(role: str) -> Party:
        stem = out / f"global-{role}-nomad"
        return Party(Path(f"{stem}.pem"), Path(f"{stem}-key.pem"), out / "ca.pem")

    assert handshake(party("server"), party("client"), "server.global.nomad").ok
    assert handshake(party("client"), party("server"), "client.global.nomad").ok
    assert handshake(party("server"), party("cli"), "node7.example.com").ok
    assert not handshake(party("client"), party("cli"), "server.global.nomad").ok
    assert len(proxy.bodies) == 3
    for role, body in zip(("server", "client", "cli"), proxy.bodies, strict=True):
        assert_requests_hold_no_key([body], out / f"global-{role}-nomad-key.pem")


def resigned(
    signer: RunningSigner, role: str, change: Callable[[dict[str, Any]], None]
) -> Callable[[bytes], bytes]:
    """A body rewrite: the request ``change``d, signed with ``role``'s key (the test holds all)."""

    def rewrite(body: bytes) -> bytes:
        request = json.loads(base64.b64decode(json.loads(body)["request"]))
        change(request)
        inner = json.dumps(request).encode()
        token = hmac.new(bytes.fromhex(signer.key(role)), inner, hashlib.sha256).digest()
        return json.dumps(
            {"token": base64.b64encode(token).decode(), "request": base64.b64encode(inner).decode()}
        ).encode()

    return rewrite


def signed_as(role: str) -> Callable[[dict[str, Any]], None]:
    """The node's CSR (its key) under ``role``'s profile, names and common name."""

    def change(request: dict[str, Any]) -> None:
        asked = request["profile"]
        request["profile"] = role
        request["hosts"] = [h.replace(f"{asked}.", f"{role}.") for h in request["hosts"]]
        request["subject"] = {"CN": f"{role}.global.nomad"}

    return change


@pytest.mark.parametrize(
    "case", [("client", "server"), ("cli", "client")], ids=["client as server", "cli as client"]
)
def test_a_certificate_that_does_not_fit_the_request_is_refused(tmp_path, cli, signer, proxy, case):
    # A signer that answers another request than the node's: the proxy re-signs the node's CSR
    # under another role's profile with that role's key, and the real signer issues it. It is
    # for the node's key and chains to the CA: only the node's own check stands in the way.
    asked, other = case
    proxy.rewrite = resigned(signer, other, signed_as(other))
    out = tmp_path / "node"
    extra = ["--dns", "node7.example.com"] if asked != "cli" else []
    result = cli(*remote_argv(signer, proxy.address, asked, out, *extra))
    assert result.code == 7, f"exit {result.code}: {result.err or result.out}"
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert f"the {asked} certificate" in result.err, result.err
    assert f"CN is '{other}.global.nomad', not '{asked}.global.nomad'" in result.err
    assert "Traceback" not in result.err
    assert len(proxy.bodies) == 1  # asked once, answered, and the answer refused
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_a_certificate_that_outlives_the_ca_is_refused(tmp_path, cli, signer, proxy):
    """A signer honours a request's own NotAfter (cfssl 1.6.5), past the CA's end: no chain
    verifies then, while the certificate's own date says it has years left. Refused."""

    def far(request: dict[str, Any]) -> None:
        request["NotAfter"] = "2099-01-01T00:00:00Z"

    proxy.rewrite = resigned(signer, "client", far)
    out = tmp_path / "node"
    result = cli(*remote_argv(signer, proxy.address, "client", out))
    assert result.code == 7, f"exit {result.code}: {result.err or result.out}"
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "it outlives its CA (it ends 2099-01-01 00:00, the CA " in result.err
    assert not out.exists()


def test_the_signers_address_as_a_url_with_a_slash_works(tmp_path, cli, signer):
    out = tmp_path / "node"
    result = cli(*remote_argv(signer, f"https://127.0.0.1:{signer.port}/", "client", out))
    assert result.code == 0, result.err
    facts = parsers.read_certificate((out / "global-client-nomad.pem").read_bytes())
    assert facts.common_name == "client.global.nomad"
    assert facts.extended_key_usage == ("serverAuth", "clientAuth")


def test_the_real_command_end_to_end(tmp_path, signer):
    out = tmp_path / "node"
    argv = [str(a) for a in remote_argv(signer, f"127.0.0.1:{signer.port}", "client", out)]
    done = subprocess.run(
        [sys.executable, "-m", "cfwrap", *argv], capture_output=True, check=False, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines()[-1].endswith("manifest.json")


@pytest.mark.parametrize(
    "case",
    [
        ("server", "client", [], 6, "refused: invalid token"),
        ("cli", "server", [], 6, "refused: invalid token"),
        ("client", "client", ["--dns", "node7.evil.org"], 6, "refused: bad request"),
        ("client", "client", ["--dns", "server.global.nomad"], 3, "Nomad role name"),
        ("client", "client", ["--expiry", "1h"], 2, "the signer sets the lifetime"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(tmp_path, cli, signer, case):
    key_role, role, extra, code, text = case
    out = tmp_path / "node"
    argv = remote_argv(signer, f"127.0.0.1:{signer.port}", role, out, *extra)
    argv[argv.index("--auth-key") + 1] = signer.auth_dir / f"{key_role}.key"
    result = cli(*argv)
    assert result.code == code, result.err
    assert text in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_bad_inputs_are_refused_before_anything_is_sent(tmp_path, cli, signer, other_kit):
    out = tmp_path / "node"
    base = remote_argv(signer, f"127.0.0.1:{signer.port}", "client", out)
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key\n")
    bad_key.chmod(0o600)
    open_key = tmp_path / "open.key"
    open_key.write_text(signer.key("client") + "\n")
    open_key.chmod(0o644)
    cases = [
        (["--auth-key", tmp_path / "missing.key"], 3, "No such file"),
        (["--auth-key", bad_key], 3, "not an auth key"),
        (["--auth-key", open_key], 3, "chmod 600"),
        (["--remote", "http://127.0.0.1:1"], 3, "plain http: a signer is reached over TLS only"),
        (["--remote", "https://127.0.0.1:1/api/v1"], 3, "reached over TLS only, at no path"),
        (["--remote", "nonsense"], 3, "not HOST:PORT"),
        (
            ["--ca", other_kit / "ca.pem"],
            6,
            f"did not verify against --ca {other_kit / 'ca.pem'} (CERTIFICATE_VERIFY_FAILED: ",
        ),
        (["--ca", other_kit / "ca.pem"], 6, "; give the CA the signer was made from"),
        (["--ca", other_kit / "global-server-nomad.pem"], 3, "not a CA"),
        (["--remote", f"127.0.0.1:{free_port()}"], 6, "connection refused"),
        (
            ["--remote", f"127.0.0.1:{(port := free_port())}"],
            6,
            f"signer at https://127.0.0.1:{port}: ",
        ),
    ]
    for change, code, text in cases:
        argv = list(base)
        for i in range(0, len(change), 2):
            argv[argv.index(change[i]) + 1] = change[i + 1]
        result = cli(*argv)
        assert result.code == code, (change, result.err)
        assert text in result.err, (change, result.err)
        assert len(result.err.strip().splitlines()) == 1
        assert "Traceback" not in result.err
        assert "cfssl failed" not in result.err
        assert not out.exists()
    # --auth-key without --remote, and --ca-key with --remote
    assert cli("cert", "--ca", signer.ca_dir / "ca.pem", "--auth-key", bad_key, "--role", "client",
               "--out", out).code == 2  # fmt: skip
    argv = [*base, "--ca-key", signer.ca_dir / "ca-key.pem"]
    assert cli(*argv).code == 2
    assert not out.exists()


def test_signer_killed_mid_request_then_retry_succeeds(tmp_path, cli):
    ca_dir = make_ca(tmp_path)
    first = start_signer(ca_dir)
    port = first.port
    recording = Proxy(first)

    def kill_signer() -> None:
        first.process.send_signal(signal.SIGKILL)  # cfwrap and, with it, multirootca
        first.process.communicate(timeout=20)  # and its pipes closed

    recording.before_forward = kill_signer
    recording.start()
    out = tmp_path / "node"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated\n")
    result = cli(*remote_argv(first, recording.address, "server", out))
    assert result.code == 6, result.err
    assert "connection closed by the server" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    recording.stop()

    second = start_signer(ca_dir, port=port)  # the same keys and port: the node just retries
    try:
        result = cli(*remote_argv(second, f"127.0.0.1:{port}", "server", out))
        assert result.code == 0, result.err
        assert (out / "global-server-nomad.pem").exists()
    finally:
        assert second.stop()[0] == 143


def test_existing_certificate_needs_force(tmp_path, cli, signer):
    out = tmp_path / "node"
    argv = remote_argv(signer, f"127.0.0.1:{signer.port}", "client", out)
    assert cli(*argv).code == 0
    before = (out / "global-client-nomad.pem").read_bytes()
    again = cli(*argv)
    assert again.code == 4 and "already exists" in again.err
    assert (out / "global-client-nomad.pem").read_bytes() == before
    assert cli(*argv, "--force").code == 0
    assert (out / "global-client-nomad.pem").read_bytes() != before
    assert_kit_manifest(out)


CONCURRENT_SCRIPT = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from cfwrap import remote
from cfwrap.specs import CertSpec
url, key, ca, role, count = sys.argv[1:6]
signer = remote.load(url=url, auth_key_file=Path(key), ca_file=Path(ca))
spec = CertSpec(role=role, dns_names=() if role == "cli" else ("node.example.com",))
with ThreadPoolExecutor(4) as pool:
    issued = list(pool.map(lambda _: remote.issue(signer, spec), range(int(count))))
for one in issued:
    print(one.cert.decode().replace("\\n", "|"))
"""


def test_200_concurrent_requests_from_several_processes(signer):
    processes = []
    for index in range(4):
        role = ("server", "client", "cli", "client")[index]
        key, ca = signer.auth_dir / f"{role}.key", signer.ca_dir / "ca.pem"
        argv = [sys.executable, "-c", CONCURRENT_SCRIPT, signer.url, str(key), str(ca), role, "50"]
        processes.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        )
    serials = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
        for line in out.decode().splitlines():
            cert = parsers.read_certificate(line.replace("|", "\n").encode())
            serials.append(cert.serial)
    assert len(serials) == 200
    assert len(set(serials)) == 200
    # Every one is in the audit log within moments, once (it follows the signer line by line).
    from cfwrap.signer import audit

    wanted = {str(int(serial, 16)) for serial in serials}
    deadline = time.monotonic() + 5
    while True:
        logged = [e["serial"] for e in audit.entries(signer.auth_dir / "audit.log")]
        if wanted <= set(logged) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert wanted <= set(logged)
    assert len(logged) == len(set(logged))


# --- RemoteSigner: kept-alive connections to the real signer ------------------------------------


class Relay:
    """A TCP relay in front of the signer (TLS passes through untouched).

    It counts the connections it is asked for, can close every open one (as a server closes
    idle keep-alive connections), and can close the next ``cut`` connections that send
    something (a request, a TLS hello) as it arrives, unanswered.
    """

    def __init__(self, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.listener = socket.create_server((host, 0))
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.cut = 0
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self._start(self._accept)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.accepted += 1
                self.sockets += [client, upstream]
            self._start(self._pump, client, upstream, True)
            self._start(self._pump, upstream, client, False)

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests and self.cut > 0:
                    self.cut -= 1
                    break  # the request dies here: the signer never sees it
                sink.sendall(data)
        except OSError:
            pass
        for one in (source, sink):
            with contextlib.suppress(OSError):
                one.shutdown(socket.SHUT_RDWR)

    def drop_all(self) -> None:
        """Close every open connection, as a server closes idle ones."""
        with self.lock:
            sockets = list(self.sockets)
        for one in sockets:
            with contextlib.suppress(OSError):
                one.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.drop_all()
        for thread in self.threads:
            thread.join(5)
        for one in self.sockets:
            one.close()


@pytest.fixture
def relay(signer: RunningSigner) -> Iterator[Relay]:
    one = Relay(signer.port)
    yield one
    one.close()


def role_keys(signer: RunningSigner, *roles: str) -> dict[str, str]:
    return {role: signer.key(role) for role in roles}


def requests_for(role: str, count: int) -> list[tuple[issuer.SignRequest, bytes]]:
    """``count`` requests for ``role``, each with its public key (DER)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    spec = CertSpec(role=role, dns_names=() if role == "cli" else ("node.example.com",))
    made = []
    for index in range(count):
        key = keys.new_private_key(spec.key)
        request = issuer.SignRequest(
            keys.csr_pem(key, spec.csr()), role, spec.hosts(), label=f"{role} {index}"
        )
        spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        made.append((request, spki))
    return made


def issued_count(signer: RunningSigner) -> int:
    from cfwrap.signer import certdb

    return len(certdb.records(signer.auth_dir))


def test_sign_all_keeps_order_and_one_connection_per_worker_across_roles(signer, relay):
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    made = [one for pair in zip(requests_for("server", 20), requests_for("client", 20),
                                requests_for("cli", 20), strict=True) for one in pair]  # fmt: skip
    keys_by_role = role_keys(signer, "server", "client", "cli")
    context = remote.tls_context((signer.ca_dir / "ca.pem").read_bytes())
    with issuer.RemoteSigner(
        relay.url, auth_keys=keys_by_role, ssl_context=context
    ) as remote_signer:
        results = list(remote_signer.sign_all(request for request, _ in made))
        again = list(remote_signer.sign_all(request for request, _ in made[:8]))  # same workers
    assert [request for request, _ in results] == [request for request, _ in made]
    serials = set()
    for (request, pem), (_, spki) in zip(results, made, strict=True):
        cert = parsers.load_certificate(pem)
        public = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        assert public == spki, request.label  # each answer is its own request's certificate
        facts = parsers.certificate_facts(cert)
        assert facts.common_name == f"{request.profile}.global.nomad"
        serials.add(facts.serial)
    assert len(serials) == 60 and len(again) == 8
    assert relay.accepted == 4  # 68 requests, 4 workers: one TLS connection each, kept alive


def test_a_closed_keep_alive_connection_is_replaced_and_nothing_is_signed_twice(signer, relay):
    context = remote.tls_context((signer.ca_dir / "ca.pem").read_bytes())
    (first, _), (second, _), (third, _) = requests_for("client", 3)
    before = issued_count(signer)
    with issuer.RemoteSigner(
        relay.url, auth_keys=role_keys(signer, "client"), ssl_context=context
    ) as remote_signer:
        remote_signer.sign(first)
        remote_signer.sign(first)  # the same connection
        assert relay.accepted == 1
        relay.drop_all()  # closed while idle: seen before the request is sent
        time.sleep(0.1)
        remote_signer.sign(second)
        assert relay.accepted == 2
        assert issued_count(signer) == before + 3
        relay.cut = 1  # closed as the request arrives: sent once more, on a new connection
        remote_signer.sign(third)
        assert relay.accepted == 3
        assert issued_count(signer) == before + 4


def test_a_connection_closed_twice_is_one_clear_error(signer, relay):
    context = remote.tls_context((signer.ca_dir / "ca.pem").read_bytes())
    (request, _), (other, _) = requests_for("client", 2)
    with issuer.RemoteSigner(
        relay.url, auth_keys=role_keys(signer, "client"), ssl_context=context
    ) as remote_signer:
        remote_signer.sign(request)
        relay.cut = 2  # the request on the kept connection, then the new connection's hello
        with pytest.raises(ToolFailedError, match="connection closed by the server"):
            remote_signer.sign(other)
    assert relay.accepted == 2  # the kept connection, then one new one: no more


def test_tls_must_match_the_ca_and_the_name(signer, other_kit):
    ((request, _),) = requests_for("client", 1)
    auth_keys = role_keys(signer, "client")
    wrong_ca = remote.tls_context((other_kit / "ca.pem").read_bytes())
    with (
        issuer.RemoteSigner(signer.url, auth_keys=auth_keys, ssl_context=wrong_ca) as one,
        pytest.raises(ToolFailedError, match=r"TLS failed \(CERTIFICATE_VERIFY_FAILED: unable"),
    ):
        one.sign(request)
    right_ca = remote.tls_context((signer.ca_dir / "ca.pem").read_bytes())
    elsewhere = Relay(signer.port, host="127.0.0.2")  # an address not in the signer's certificate
    try:
        with (
            issuer.RemoteSigner(elsewhere.url, auth_keys=auth_keys, ssl_context=right_ca) as one,
            pytest.raises(ToolFailedError, match=r"VERIFY_FAILED: IP address mismatch"),
        ):
            one.sign(request)
    finally:
        elsewhere.close()
    lax = remote.tls_context((signer.ca_dir / "ca.pem").read_bytes())
    lax.check_hostname = False
    with pytest.raises(InputError, match="does not verify the signer's certificate and name"):
        issuer.RemoteSigner(signer.url, auth_keys=auth_keys, ssl_context=lax)
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(InputError, match="does not verify"):
        issuer.RemoteSigner(signer.url, auth_keys=auth_keys, ssl_context=lax)


def test_each_profile_needs_its_own_key_and_nothing_is_sent_without_one(signer, relay):
    context = remote.tls_context((signer.ca_dir / "ca.pem").read_bytes())
    ((server_request, _),) = requests_for("server", 1)
    with (
        issuer.RemoteSigner(
            relay.url, auth_keys=role_keys(signer, "client"), ssl_context=context
        ) as remote_signer,
        pytest.raises(InputError, match=r"profile 'server'.*no auth key for it"),
    ):
        remote_signer.sign(server_request)
    assert relay.accepted == 0
    swapped = {"server": signer.key("client")}  # another role's key under this profile
    with (
        issuer.RemoteSigner(relay.url, auth_keys=swapped, ssl_context=context) as asking,
        pytest.raises(ToolFailedError, match="refused: invalid token"),
    ):
        asking.sign(server_request)
    for bad, text in (
        ({"client": "not hex"}, "not hexadecimal"),
        ({"client": ""}, "empty"),
    ):
        with pytest.raises(InputError, match=text):
            issuer.RemoteSigner(relay.url, auth_keys=bad, ssl_context=context)
    with pytest.raises(InputError, match="workers 0"):
        issuer.RemoteSigner(relay.url, auth_keys={}, ssl_context=context, workers=0)
    with pytest.raises(InputError, match="not an http"):
        issuer.RemoteSigner("ftp://x", auth_keys={}, ssl_context=context)


def test_a_remote_signer_signs_only_inside_its_block(signer):
    context = remote.tls_context((signer.ca_dir / "ca.pem").read_bytes())
    ((request, _),) = requests_for("client", 1)
    one = issuer.RemoteSigner(
        signer.url, auth_keys=role_keys(signer, "client"), ssl_context=context
    )
    assert signer.key("client") not in repr(one)
    with pytest.raises(RuntimeError, match="with block"):
        one.sign(request)
    with one:
        one.sign(request)
    with pytest.raises(RuntimeError, match="with block"):
        list(one.sign_all([request]))
    with one:  # a second block makes new connections
        one.sign(request)


def test_signer_from_info_issues_every_role_with_its_own_key(tmp_path, signer):
    info_file = signer.auth_dir / "signer.json"
    assert remote.ca_pem(info_file) == (signer.ca_dir / "ca.pem").read_bytes()
    made = [*requests_for("server", 2), *requests_for("client", 2), *requests_for("cli", 2)]
    with remote.signer_from_info(
        info_file, auth_dir=signer.auth_dir, roles=["server", "client", "cli"], workers=2
    ) as from_info:
        results = list(from_info.sign_all(request for request, _ in made))
    assert [r.profile for r, _ in results] == ["server"] * 2 + ["client"] * 2 + ["cli"] * 2
    with pytest.raises(InputError, match="role 'admin'"):
        remote.signer_from_info(info_file, auth_dir=signer.auth_dir, roles=["admin"], workers=1)
    with pytest.raises(InputError, match="No such file"):
        remote.signer_from_info(
            info_file, auth_dir=signer.auth_dir / "missing", roles=["cli"], workers=1
        )
    data = json.loads(info_file.read_text())
    data["roles"]["cli"]["auth_key_file"] = "../signer/cli.key"  # only names in the auth folder
    (tmp_path / "signer.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="not a file name in the auth folder"):
        remote.signer_from_info(
            tmp_path / "signer.json", auth_dir=signer.auth_dir, roles=["cli"], workers=1
        )


def test_issue_all_checks_every_certificate_and_keeps_keys_here(signer, relay):
    node = remote.load(
        url=relay.url,
        auth_key_file=signer.auth_dir / "client.key",
        ca_file=signer.ca_dir / "ca.pem",
    )
    specs = [CertSpec(role="client", dns_names=(f"node{i}.example.com",)) for i in range(6)]
    with node.signer(profiles=["client"], workers=3) as asking:
        issued = list(remote.issue_all(asking, specs, ca_pem=node.ca_pem))
    assert relay.accepted == 3
    for spec, one in zip(specs, issued, strict=True):
        facts = parsers.read_certificate(one.cert)
        assert spec.dns_names[0] in facts.dns_names
        assert parsers.read_private_key(one.key).public_key_sha256 == facts.key.public_key_sha256
