"""``cfwrap cert --remote``: the key made on the node, only a CSR sent to a real signer.

A recording proxy between cfwrap and the signer terminates TLS with the signer's own
certificate (so cfwrap's CA check passes) and keeps every request body it forwards: the tests
read exactly what left the node.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socketserver
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cfwrap import parsers, verify
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
        (["--remote", "http://127.0.0.1:1"], 3, "TLS only"),
        (["--remote", "nonsense"], 3, "not HOST:PORT"),
        (["--ca", other_kit / "ca.pem"], 6, "TLS failed"),
        (["--ca", other_kit / "global-server-nomad.pem"], 3, "not a CA"),
        (["--remote", f"127.0.0.1:{free_port()}"], 6, "connection refused"),
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
from cfwrap.nomad import CertSpec
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
