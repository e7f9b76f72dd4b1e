"""Signing certificate requests at fleet scale: cfssl's authsign protocol, and a local signer.

One ``cfssl gencert | cfssljson`` per certificate costs about 7 ms; one long-lived ``cfssl serve``
answers a request in under 1 ms with a few in flight (notes/cfssl.md). :class:`LocalSigner` runs
that server on loopback for the life of a ``with`` block and signs CSRs made in this process
(:mod:`cfwrap.keys`): no private key ever leaves the process, only requests go to cfssl.

A loopback server can be reached by every local user while it runs, and cfssl's ``newcert``,
``sign`` and ``init_ca`` take no authentication. So every endpoint but ``authsign`` and
``health`` is disabled, and each run has its own random auth key, set on every profile (a
profile does not inherit the default's: cloudflare/cfssl#581).

:class:`RemoteSigner` speaks the protocol to any cfssl server (``cfwrap signer``'s multirootca,
``cfssl serve``), over TLS checked against the signer's CA and name, with one kept-alive
connection per thread: a TLS handshake costs more than a signature. :func:`authsign` is its
one-shot form (issue 12).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import http.client
import json
import logging
import secrets
import select
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

from cfwrap import files, loopback, parsers
from cfwrap.errors import CfwrapError, InputError, ToolFailedError
from cfwrap.models import SigningConfig
from cfwrap.runner import Call, Service, remember_private_keys, remember_secret, start_service
from cfwrap.text import printable
from cfwrap.tools import Tool

log = logging.getLogger(__name__)

API = "/api/v1/cfssl/"
AUTHSIGN = API + "authsign"
HEALTH = API + "health"

#: Every endpoint ``cfssl serve`` 1.6.5 registers (the ``endpoints`` map in cli/serve/serve.go,
#: tag v1.6.5), except ``authsign`` and ``health``: the local signer disables all of them.
#: ``"/"`` is the static web UI; ``certadd`` is enabled even without a database.
DISABLED_ENDPOINTS = (
    "sign", "info", "crl", "gencrl", "newcert", "bundle", "newkey", "init_ca",
    "scan", "scaninfo", "certinfo", "ocspsign", "revoke", "/", "certadd",
)  # fmt: skip

#: How long the local signer may take to answer its health check after it starts.
READY_WITHIN = 5.0
#: How long the local signer's answer to one request may take, whole.
ANSWER_WITHIN = 30.0
# How many times a new port is tried when another process took the one picked first.
_BIND_ATTEMPTS = 4
_AUTH_KEY_NAME = "cfwrap-run"
_CONNECTION_ERRORS = (OSError, http.client.HTTPException)
_RESTART_FIX = "run again; if it keeps failing, run with --verbose and report cfssl's messages"


@dataclass(frozen=True)
class SignRequest:
    """One certificate to sign: a PEM CSR, the profile to sign it under, and its SANs.

    cfssl replaces the CSR's SANs with ``hosts`` (an empty tuple gives a certificate without
    SANs). ``label`` names the request in error messages only; it is not sent (for cfssl a
    label selects a signer).
    """

    csr_pem: bytes = field(repr=False)
    profile: str
    hosts: tuple[str, ...]
    label: str = ""

    @property
    def where(self) -> str:
        """The request's name for messages."""
        return printable(self.label) if self.label else f"the {self.profile} certificate request"


class Issuer(Protocol):
    """Something that signs a certificate request and returns the certificate PEM."""

    def sign(self, request: SignRequest) -> bytes:
        """Sign ``request``; returns one PEM certificate."""
        ...


def _body(auth_key: bytes, request: SignRequest) -> bytes:
    """The authsign body: the request JSON, and its HMAC-SHA256 under the auth key (base64)."""
    inner = json.dumps(
        {
            "certificate_request": request.csr_pem.decode("ascii"),
            "profile": request.profile,
            "hosts": list(request.hosts),
        }
    ).encode()
    token = hmac.new(auth_key, inner, hashlib.sha256).digest()
    return json.dumps(
        {"token": base64.b64encode(token).decode(), "request": base64.b64encode(inner).decode()}
    ).encode()


def _auth_key(auth_key_hex: str, *, what: str = "the auth key") -> bytes:
    try:
        key = bytes.fromhex(auth_key_hex)
    except ValueError:
        raise InputError(
            what, "not hexadecimal", fix="give the key as cfssl's auth_keys hold it"
        ) from None
    if not key:
        raise InputError(what, "empty", fix="give the key as cfssl's auth_keys hold it")
    return key


def _csr_public_key(request: SignRequest) -> bytes:
    """The DER SubjectPublicKeyInfo of the request's CSR; refuses anything but one PEM CSR."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if parsers.pem_kind(request.csr_pem) != "csr" or request.csr_pem.count(b"-----BEGIN ") != 1:
        raise InputError(request.where, "not one PEM certificate request")
    made = parsers.made_csr_public_key(request.csr_pem)  # one of ours, just made: known
    if made is not None:
        return made
    try:
        csr = x509.load_pem_x509_csr(request.csr_pem)
        return csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except ValueError as e:
        raise InputError(request.where, f"damaged certificate request ({e})") from None


def _one_line(text: str, limit: int = 300) -> str:
    text = printable(" ".join(text.split()))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _refusal(status: int, body: bytes) -> str:
    """The reason cfssl gave for refusing a request, in one line."""
    try:
        data = json.loads(body)
        errors = data.get("errors") if isinstance(data, dict) else None
        first = errors[0] if isinstance(errors, list) and errors else None
    except (ValueError, RecursionError):
        first = None
    if isinstance(first, dict) and isinstance(first.get("message"), str):
        return _one_line(f"{first['message']} (code {first.get('code')}, HTTP {status})")
    text = body.decode("utf-8", "replace").strip() or "no message"
    return _one_line(f"{text} (HTTP {status})")


def _certificate(request: SignRequest, spki: bytes, status: int, body: bytes) -> bytes:
    """The certificate PEM in an authsign answer: one PEM certificate for the public key ``spki``.

    Raises:
        ToolFailedError: a refusal (cfssl's message), or an answer that is not one certificate.
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
        data = None
    result = data.get("result") if isinstance(data, dict) else None
    if status != 200 or not isinstance(data, dict) or data.get("success") is not True:
        raise ToolFailedError(
            "cfssl",
            f"{request.where}: refused: {_refusal(status, body)}",
            fix="check the request's profile and names against the signer's policy",
        )
    cert = result.get("certificate") if isinstance(result, dict) else None
    pem = b""
    if isinstance(cert, str) and cert.isascii():  # a PEM is ASCII (a lone surrogate is not)
        pem = cert.encode().strip() + b"\n"
    if (
        not pem.startswith(b"-----BEGIN CERTIFICATE-----\n")
        or not pem.endswith(b"-----END CERTIFICATE-----\n")
        or pem.count(b"-----BEGIN ") != 1
    ):
        raise ToolFailedError(
            "cfssl",
            f"{request.where}: the answer holds no certificate, or more than one",
            fix="check that the server is cfssl 1.6.5",
        )
    try:
        public = parsers.load_certificate(pem).public_key()
    except parsers.ParseError as e:
        raise ToolFailedError(
            "cfssl", f"{request.where}: the certificate is damaged: {e}"
        ) from None
    if public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != spki:
        raise ToolFailedError(
            "cfssl",
            f"{request.where}: the certificate is not for the request's key",
            fix="check that the server is cfssl 1.6.5 and no other server holds its port",
        )
    return pem


@dataclass(frozen=True)
class _Target:
    """Where a signer's authsign endpoint is: host, port, path, and the TLS to use."""

    host: str
    port: int | None
    path: str
    context: ssl.SSLContext | None  # None: plain http

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        """A new (unconnected) connection to the signer; http.client sets TCP_NODELAY on it."""
        if self.context is not None:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self.context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def _target(url: str, ssl_context: ssl.SSLContext | None) -> _Target:
    """Parse a signer's address: the server (authsign is added) or the full endpoint.

    Raises:
        InputError: not an http(s) address, or a TLS context that does not check the signer.
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise InputError(
            f"signer address {url!r}",
            "not an http:// or https:// address",
            fix="give one like https://ca.example.com:8888",
        )
    path = parts.path if parts.path not in ("", "/") else AUTHSIGN
    if parts.scheme == "http":
        return _Target(parts.hostname, port, path, None)
    context = ssl_context or ssl.create_default_context()
    if context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname:
        raise InputError(
            "the TLS context for the signer",
            "does not verify the signer's certificate and name",
            fix="use ssl.create_default_context(cadata=<the signer's CA>)",
        )
    return _Target(parts.hostname, port, path, context)


def _post(connection: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    return _answer(connection)


def _answer(connection: http.client.HTTPConnection) -> tuple[int, bytes]:
    """Read the answer to the request just sent on ``connection``: its status and body.

    The response is closed here, not left to its finalizer (when the connection's next request
    drops it): a SIGTERM handled inside that close() would be swallowed by CPython.
    """
    response = connection.getresponse()
    try:
        return response.status, response.read()
    finally:
        response.close()


# What a kept-alive connection the server has closed raises on its next request (EOF before the
# status line, a reset, a broken pipe, or TLS's own end of stream): one retry on a new one.
_CLOSED_BY_PEER = (*loopback.CLOSED, ssl.SSLEOFError, ssl.SSLZeroReturnError)


def _connection_failure(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, _CLOSED_BY_PEER):
        return "connection closed by the server"
    if isinstance(error, ssl.SSLCertVerificationError):  # say why: another CA, another name
        return f"TLS failed ({_one_line(f'{error.reason}: {error.verify_message}')})"
    if isinstance(error, ssl.SSLError):
        return f"TLS failed ({_one_line(error.reason or str(error))})"
    return _one_line(f"{type(error).__name__}: {error}")


def _stale(connection: http.client.HTTPConnection | loopback.Connection) -> bool:
    """Whether an idle kept-alive connection has something to read: the server closed it.

    Checked before a request is sent, so a connection the server closed while idle is replaced
    without the request being sent twice (a second send could sign it twice).
    """
    sock = connection.sock
    if sock is None:
        return False
    poller = select.poll()  # not select.select: it fails for descriptors past 1023
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _in_order(
    sign: Callable[[SignRequest], bytes],
    requests: Iterable[SignRequest],
    *,
    pool: ThreadPoolExecutor,
    workers: int,
) -> Iterator[tuple[SignRequest, bytes]]:
    """``sign`` every request on ``pool``, yielding each with its certificate in input order.

    At most twice ``workers`` requests are pending at once; the first failure (in input order)
    is raised, and the requests not yet sent are dropped.
    """
    pending: collections.deque[tuple[SignRequest, Future[bytes]]] = collections.deque()
    try:
        for request in requests:
            pending.append((request, pool.submit(sign, request)))
            if len(pending) >= 2 * workers:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        for _, future in pending:
            future.cancel()


class RemoteSigner:
    """A cfssl signer reached by authsign: ``cfwrap signer`` (multirootca) or ``cfssl serve``.

    Use it in a ``with`` block. Each thread that signs keeps one connection open to the signer
    (a TLS handshake costs more than the signature); :meth:`sign_all` signs on ``workers``
    threads of its own. A kept-alive connection the server has closed while idle is replaced
    before a request is sent on it; a request that meets a closed connection is sent once more
    on a new one (should the server have signed it before closing, it is signed twice: both are
    in its audit). Every answer must be one certificate for the request's key. Only CSRs are
    sent.
    """

    def __init__(
        self,
        url: str,
        *,
        auth_keys: Mapping[str, str],
        ssl_context: ssl.SSLContext | None,
        workers: int = 4,
        timeout: float = 30.0,
    ) -> None:
        """Check the address and the keys; nothing is connected before ``with``.

        Args:
            url: ``https://host:port`` (the authsign path is added) or the full endpoint;
                ``http://`` for a loopback server only.
            auth_keys: each profile the signer is asked for, and its auth key (hex, as cfssl's
                ``auth_keys`` hold it): the central signer has a key per role.
            ssl_context: TLS that trusts the signer's CA and checks its name (None: the
                system's roots). A context that checks neither is refused.
            workers: how many requests :meth:`sign_all` keeps in flight.
            timeout: seconds to wait for a connection and for each answer.

        Raises:
            InputError: a bad address, auth key, TLS context, ``workers`` or ``timeout``.
        """
        if workers < 1:
            raise InputError(f"workers {workers}", "at least one request must be in flight")
        if not timeout > 0:
            raise InputError(f"timeout {timeout}", "must be more than 0 seconds")
        self._target = _target(url, ssl_context)
        self._keys = {
            profile: _auth_key(key, what=f"the auth key of profile {profile!r}")
            for profile, key in auth_keys.items()
        }
        self.url = url
        self.workers = workers
        self.timeout = timeout
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._open = False

    def __repr__(self) -> str:
        """Name the signer and its profiles, never their keys."""
        return f"RemoteSigner({self.url!r}, profiles={sorted(self._keys)})"

    def __enter__(self) -> RemoteSigner:
        """Open for signing (connections are made as threads first sign)."""
        with self._lock:
            if self._open:
                raise RuntimeError("the remote signer is open already: it is not reentrant")
            self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the workers and close every connection, whatever happened in the block."""
        with self._lock:
            self._open = False
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()  # a later block makes new connections
        for connection in connections:
            connection.close()

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's connection to the signer (made on its first request)."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._target.connection(self.timeout)
            with self._lock:
                if not self._open:
                    raise RuntimeError("the remote signer is closed: use it inside its with block")
                self._connections.append(connection)
            self._local.connection = connection
        return connection

    def _send(self, request: SignRequest, body: bytes) -> tuple[int, bytes]:
        """Post ``body``; on a kept-alive connection the server closed, once more on a new one."""
        connection = self._connection()
        if _stale(connection):
            connection.close()
        for attempt in range(2):
            reused = connection.sock is not None
            try:
                return _post(connection, self._target.path, body)
            except _CONNECTION_ERRORS as e:
                connection.close()
                if reused and attempt == 0 and isinstance(e, _CLOSED_BY_PEER):
                    log.debug("%s: the signer closed a kept-alive connection; again", request.where)
                    continue
                raise ToolFailedError(
                    "cfssl",
                    f"{request.where}: {_connection_failure(e)} at {self.url}",
                    fix="check that the signer runs and the address is right",
                ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def sign(self, request: SignRequest) -> bytes:
        """Sign one request; returns its certificate PEM. Safe to call from several threads.

        Raises:
            InputError: a profile with no auth key here, or not one PEM CSR.
            ToolFailedError: the signer refused (its message), could not be reached, did not
                answer in time, or answered with something other than one certificate for
                the request's key.
            RuntimeError: called outside the ``with`` block.
        """
        if not self._open:
            raise RuntimeError("the remote signer is closed: use it inside its with block")
        key = self._keys.get(request.profile)
        if key is None:
            known = ", ".join(sorted(self._keys)) or "none"
            raise InputError(
                f"{request.where}: profile {request.profile!r}",
                f"no auth key for it (keys are given for: {known})",
                fix="give the auth key of that role",
            )
        spki = _csr_public_key(request)
        status, answer = self._send(request, _body(key, request))
        return _certificate(request, spki, status, answer)

    def sign_all(self, requests: Iterable[SignRequest]) -> Iterator[tuple[SignRequest, bytes]]:
        """Sign many requests, ``workers`` at a time, yielding each with its certificate in order.

        At most twice ``workers`` requests are pending at once, so memory stays flat however
        many there are. The first failure (in input order) is raised, and the requests not yet
        sent are dropped. The worker threads, and their connections, last until the block ends.

        Raises:
            InputError: see :meth:`sign`.
            ToolFailedError: see :meth:`sign`.
            RuntimeError: called outside the ``with`` block.
        """
        with self._lock:
            if not self._open:
                raise RuntimeError("the remote signer is closed: use it inside its with block")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cfwrap-remote")
            pool = self._pool
        return _in_order(self.sign, requests, pool=pool, workers=self.workers)


def authsign(
    url: str,
    auth_key_hex: str,
    request: SignRequest,
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> bytes:
    """Have the cfssl server at ``url`` sign one request: a :class:`RemoteSigner` used once.

    The body is ``{"token", "request"}``, both base64: the token is the HMAC-SHA256 of the
    request JSON under the hex auth key.

    Args:
        url: the server's address (``https://host:port``; the authsign path is added).
        auth_key_hex: the profile's auth key, as cfssl's ``auth_keys`` hold it (hex).
        request: the CSR, profile and SANs.
        ssl_context: for https, the context that trusts the server (default: the system's).
        timeout: seconds to wait for the connection and for the answer.

    Raises:
        InputError: a bad address or auth key, or a request that is not one PEM CSR.
        ToolFailedError: the server refused (its message), could not be reached, did not
            answer in time, or answered with something other than one certificate for the
            request's key.
    """
    keys = {request.profile: auth_key_hex}
    with RemoteSigner(
        url, auth_keys=keys, ssl_context=ssl_context, workers=1, timeout=timeout
    ) as signer:
        return signer.sign(request)


def _free_port() -> int:
    """A loopback port free right now (the kernel's pick; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening_inodes(port: int) -> set[str] | None:
    """The socket inodes listening on 127.0.0.1:``port`` (None where /proc cannot tell)."""
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        return None
    wanted = f"0100007F:{port:04X}"
    inodes = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(fields[9])
    return inodes


def _owns_port(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the listening socket on 127.0.0.1:``port``.

    The port was free when picked, but another local process may bind it before cfssl does;
    then cfssl exits, and the health check could be answered by the other process.
    """
    inodes = _listening_inodes(port)
    if inodes is None:
        return True  # no /proc: the certificate checks in each answer still apply
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _signing_config(config: SigningConfig, key_file: Path) -> bytes:
    """``config`` with the run's auth key on the default profile and on every named one."""
    data: dict[str, Any] = config.model_dump(mode="json", exclude_none=True)
    signing = data["signing"]
    for profile in [signing["default"], *signing.get("profiles", {}).values()]:
        profile["auth_key"] = _AUTH_KEY_NAME  # not inherited: cloudflare/cfssl#581
    data["auth_keys"] = {_AUTH_KEY_NAME: {"type": "standard", "key": f"file:{key_file}"}}
    return (json.dumps(data, indent=2) + "\n").encode()


def _how_it_ended(service: Service) -> str:
    """How a service that has exited ended: the signal that killed it, or its exit and reason.

    A killed cfssl said nothing about why: its last line (a startup warning) would mislead.
    """
    code = service.returncode
    if code is not None and code < 0:
        return f"was killed by signal {-code}"
    return f"exited ({code}: {service.failure_reason()})"


class _NotReadyError(Exception):
    """cfssl did not come up; ``retry`` when another process took its port."""

    def __init__(self, error: ToolFailedError, *, retry: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry = retry


class LocalSigner:
    """One ``cfssl serve`` on loopback for the life of a ``with`` block, signing by authsign.

    Only CSRs are sent; the CA's key is handed to cfssl in a 0600 file of a 0700 scratch folder
    that is removed on exit, and the run's auth key is a file too, so neither is in cfssl's
    argv. Every endpoint but authsign and health is disabled.
    """

    def __init__(
        self,
        cfssl_tool: Tool,
        *,
        ca_cert_pem: bytes,
        ca_key_pem: bytes,
        config: SigningConfig,
        workers: int = 4,
    ) -> None:
        """Keep what the server needs; nothing starts before ``with``.

        Raises:
            InputError: ``workers`` below 1.
        """
        if workers < 1:
            raise InputError(f"workers {workers}", "at least one request must be in flight")
        self.cfssl_tool = cfssl_tool
        self.config = config
        self.workers = workers
        self._ca_cert_pem = ca_cert_pem
        self._ca_key_pem = ca_key_pem
        remember_private_keys(ca_key_pem)
        self._auth_key = b""
        self._scratch: Path | None = None
        self._service: Service | None = None
        self._port = 0
        self._idle: list[loopback.Connection] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        """Name the server, never its keys."""
        return f"LocalSigner({self.url if self._service else 'not running'})"

    @property
    def url(self) -> str:
        """The server's address, ``http://127.0.0.1:PORT``.

        Raises:
            RuntimeError: the signer is not running (outside its ``with`` block).
        """
        if self._service is None:
            raise RuntimeError("the local signer is not running: use it inside its with block")
        return f"http://127.0.0.1:{self._port}"

    @property
    def service(self) -> Service | None:
        """The running ``cfssl serve`` (None outside the ``with`` block)."""
        return self._service

    @property
    def scratch(self) -> Path | None:
        """The scratch folder cfssl reads its files from (None outside the ``with`` block)."""
        return self._scratch

    def __enter__(self) -> LocalSigner:
        """Write the scratch folder, start cfssl on a free loopback port and wait until it answers.

        Raises:
            ToolMissingError: cfssl does not exist.
            ToolFailedError: cfssl exited or did not answer (its reason in the message).
            FileSystemError: the scratch folder could not be written.
        """
        if self._service is not None or self._scratch is not None:
            raise RuntimeError("the local signer is running already: it is not reentrant")
        try:
            self._scratch = self._write_scratch()
            self._start(self._scratch)
            # cfssl read the CA's key when it started its signer (a ready signer answers
            # authsign): the copy goes now, so a cfwrap killed later leaves no CA key behind.
            (self._scratch / "ca-key.pem").unlink()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop cfssl and remove the scratch folder, whatever happened in the block."""
        self._close()

    def _write_scratch(self) -> Path:
        # The owner's pid in the name: a later run sweeps it if this one is SIGKILLed before
        # cfssl has read (and cfwrap removed) the CA key's copy.
        scratch = files.new_scratch("signer-")
        auth_key = secrets.token_hex(32)
        remember_secret(auth_key)
        self._auth_key = bytes.fromhex(auth_key)
        key_file = scratch / "auth-key.hex"
        files.write_new(key_file, auth_key.encode() + b"\n", mode=files.SECRET_MODE)
        files.write_new(scratch / "ca.pem", self._ca_cert_pem, mode=files.SECRET_MODE)
        files.write_new(scratch / "ca-key.pem", self._ca_key_pem, mode=files.SECRET_MODE)
        files.write_new(
            scratch / "config.json",
            _signing_config(self.config, key_file),
            mode=files.SECRET_MODE,
        )
        return scratch

    def _call(self, scratch: Path, port: int) -> Call:
        argv: list[str | Path] = [
            self.cfssl_tool.path, "serve",
            "-address", "127.0.0.1", "-port", str(port),
            "-ca", scratch / "ca.pem", "-ca-key", scratch / "ca-key.pem",
            "-config", scratch / "config.json",
            "-disable", ",".join(DISABLED_ENDPOINTS),
            "-loglevel", "2",  # warnings and errors: cfssl logs two INFO lines per request
        ]  # fmt: skip
        # One OS thread runs its Go code: it serves one process's few requests in flight, and
        # beside a fleet's two cfwrap processes and their two servers on two cores, Go's idle
        # threads spinning for work cost 8% of a 1,000-node apply's CPU (scripts/bench-apply).
        return Call.of(argv, cwd=scratch, env={"GOMAXPROCS": "1"})

    def _start(self, scratch: Path) -> None:
        for attempt in range(_BIND_ATTEMPTS):
            self._port = _free_port()
            self._service = start_service(self._call(scratch, self._port))
            try:
                self._wait_ready(self._service)
            except _NotReadyError as e:
                self._service.stop()
                self._service = None
                if e.retry and attempt + 1 < _BIND_ATTEMPTS:
                    log.info("cfssl serve could not bind port %d; trying another", self._port)
                    continue
                raise e.error from None
            log.info("cfssl serve is signing at %s (pid %d)", self.url, self._service.pid)
            return

    def _wait_ready(self, service: Service) -> None:
        """Poll health until it answers, then check authsign is up and cfssl owns the port."""
        deadline = time.monotonic() + READY_WITHIN
        delay = 0.002
        while True:
            if not service.alive():
                raise self._exited_early(service, port_taken=False)
            status = self._probe(HEALTH)
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise _NotReadyError(
                    ToolFailedError(
                        "cfssl",
                        f"cfssl serve did not answer on {self.url} within {READY_WITHIN:.0f}s",
                        argv=service.call.argv,
                        stderr=service.stderr_tail(),
                        fix="check that nothing blocks loopback connections, then run again",
                    ),
                    retry=False,
                )
            service.wait(delay)
            delay = min(delay * 2, 0.05)
        if not _owns_port(service.pid, self._port):
            service.wait(0.5)  # it lost the port to another process and is exiting
            raise self._exited_early(service, port_taken=True)
        if self._probe(AUTHSIGN) != 405:  # GET on a live authsign: "method not allowed"
            raise _NotReadyError(
                ToolFailedError(
                    "cfssl",
                    f"cfssl serve's signer did not start: {self._signer_reason(service)}",
                    argv=service.call.argv,
                    stderr=service.stderr_tail(),
                    fix="check the CA certificate, its key and the signing config",
                ),
                retry=False,
            )

    def _probe(self, path: str) -> int | None:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=1.0)
        try:
            connection.request("GET", path)
            return _answer(connection)[0]
        except _CONNECTION_ERRORS:
            return None
        finally:
            connection.close()

    @staticmethod
    def _signer_reason(service: Service) -> str:
        for line in service.stderr_tail().splitlines():
            if "couldn't initialize signer" in line:
                return _one_line(line.partition("[WARNING] ")[2] or line)
        return service.failure_reason()

    @staticmethod
    def _exited_early(service: Service, *, port_taken: bool) -> _NotReadyError:
        if service.wait(0):
            how = _how_it_ended(service)
            port_taken = port_taken or "address already in use" in how
        else:
            how = "lost its port to another process"
        error = ToolFailedError(
            "cfssl",
            f"cfssl serve {how} before it answered",
            argv=service.call.argv,
            returncode=service.returncode,
            stderr=service.stderr_tail(),
            fix=_RESTART_FIX,
        )
        return _NotReadyError(error, retry=port_taken)

    def _close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        if self._service is not None:
            self._service.stop()
            self._service = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _check_profile(self, request: SignRequest) -> None:
        if request.profile not in self.config.signing.profiles:
            known = ", ".join(sorted(self.config.signing.profiles)) or "none"
            raise InputError(
                f"{request.where}: profile {request.profile!r}",
                f"not in the signing config (it has: {known})",
                fix="use one of its profiles; cfssl would silently use the default one instead",
            )

    def _died(self, request: SignRequest, service: Service) -> ToolFailedError:
        return ToolFailedError(
            "cfssl",
            f"cfssl serve {_how_it_ended(service)} while signing {request.where}",
            argv=service.call.argv,
            returncode=service.returncode,
            stderr=service.stderr_tail(),
            fix=_RESTART_FIX,
        )

    def sign(self, request: SignRequest) -> bytes:
        """Sign one request; returns its certificate PEM. Safe to call from several threads.

        Raises:
            InputError: a profile the signing config does not have, or not one PEM CSR.
            ToolFailedError: cfssl refused it (its message), stopped, or answered with
                something other than one certificate for the request's key.
            RuntimeError: called outside the ``with`` block.
        """
        return self._receive(self._send(request))

    def sign_all(self, requests: Iterable[SignRequest]) -> Iterator[tuple[SignRequest, bytes]]:
        """Sign many requests, ``workers`` in flight, yielding each with its certificate in order.

        All from the calling thread: each request is sent on a kept-alive connection of its own
        and the answers are read oldest first, so cfssl works on the next ones while the caller
        handles one. (Worker threads cost more than they saved: handing each request to one and
        its answer back took more than the HTTP exchange itself.) Requests are pulled as they
        are sent, so memory stays flat however many there are. The first failure (in input
        order) is raised, and the requests not yet sent are dropped.

        Raises:
            InputError: see :meth:`sign`.
            ToolFailedError: see :meth:`sign`.
        """
        in_flight: collections.deque[_Sent] = collections.deque()
        try:
            for request in requests:
                try:
                    in_flight.append(self._send(request))
                except CfwrapError:  # the earlier requests' answers come first, failures too
                    while in_flight:
                        sent = in_flight.popleft()
                        yield sent.request, self._receive(sent)
                    raise
                if len(in_flight) >= self.workers:
                    sent = in_flight.popleft()
                    yield sent.request, self._receive(sent)
            while in_flight:
                sent = in_flight.popleft()
                yield sent.request, self._receive(sent)
        finally:
            for sent in in_flight:  # sent, never read: its connection cannot be used again
                sent.connection.close()

    def _send(self, request: SignRequest, *, fresh: bool = False) -> _Sent:
        """Check ``request`` and send it on an idle connection (a new one if ``fresh``)."""
        service = self._running()
        self._check_profile(request)
        spki = _csr_public_key(request)
        body = _body(self._auth_key, request)
        for attempt in range(2):
            connection = None
            if not fresh:
                with self._lock:
                    connection = self._idle.pop() if self._idle else None
            if connection is not None and _stale(connection):
                connection.close()  # the server closed it while idle: a new one, before sending
            reused = connection is not None and connection.sock is not None
            if connection is None:
                connection = loopback.Connection(self._port, timeout=ANSWER_WITHIN)
            try:
                connection.post(AUTHSIGN, body)
            except _CONNECTION_ERRORS as e:
                connection.close()
                if reused and attempt == 0 and isinstance(e, _CLOSED_BY_PEER) and service.alive():
                    log.debug(
                        "%s: cfssl serve closed a kept-alive connection; again", request.where
                    )
                    continue  # a kept-alive connection the server had closed: once more, new
                self._raise_if_died(request, service, e)
                raise self._unreachable(request, service, e) from e
            return _Sent(request, spki, connection, reused=reused)
        raise AssertionError("unreachable")  # pragma: no cover

    def _receive(self, sent: _Sent) -> bytes:
        """Read the answer to ``sent``; once more on a new connection if a kept-alive one failed."""
        service = self._running()
        try:
            status, answer = sent.connection.answer()
        except _CONNECTION_ERRORS as e:
            sent.connection.close()
            # Only a kept-alive connection the server had closed, before it read the request,
            # is tried once more: after a timeout or a damaged answer cfssl may have signed it.
            if sent.reused and isinstance(e, _CLOSED_BY_PEER) and service.alive():
                log.debug(
                    "%s: cfssl serve closed a kept-alive connection; again", sent.request.where
                )
                return self._receive(self._send(sent.request, fresh=True))
            self._raise_if_died(sent.request, service, e)
            raise self._unreachable(sent.request, service, e) from e
        if sent.connection.sock is not None:  # the answer did not end it
            with self._lock:
                self._idle.append(sent.connection)
        return _certificate(sent.request, sent.spki, status, answer)

    def _running(self) -> Service:
        if self._service is None:
            raise RuntimeError("the local signer is not running: use it inside its with block")
        return self._service

    def _raise_if_died(self, request: SignRequest, service: Service, error: BaseException) -> None:
        if service.wait(0.2):  # a reset comes before the exit is seen: wait a moment
            raise self._died(request, service) from error

    def _unreachable(
        self, request: SignRequest, service: Service, error: BaseException
    ) -> ToolFailedError:
        return ToolFailedError(
            "cfssl",
            f"{request.where}: {_connection_failure(error)} at {self.url}",
            argv=service.call.argv,
            fix=_RESTART_FIX,
        )


@dataclass(frozen=True)
class _Sent:
    """A request sent to the local signer, its answer not read yet."""

    request: SignRequest
    spki: bytes
    connection: loopback.Connection
    reused: bool
