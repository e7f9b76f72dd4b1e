"""The signer's foreground run: start multirootca, wait until it answers, keep the audit, stop.

multirootca is started through the runner (the one door to outside tools), so cfwrap's SIGTERM
and Ctrl-C handlers kill it, and the kernel kills it if cfwrap itself dies. Each line it logs
is handed over as it is written (a queue the foreground loop waits on), so an issue reaches
``audit.log`` within moments of being signed, and lines that come together are appended with
one fsync.
"""

from __future__ import annotations

import logging
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding

from cfwrap import runner
from cfwrap.errors import InputError, ToolFailedError
from cfwrap.signer.audit import AuditLog
from cfwrap.signer.setup import Listen, Prepared
from cfwrap.tools import Tool

log = logging.getLogger(__name__)

#: How long multirootca may take to start answering.
READY_TIMEOUT = 15.0
#: How often the foreground loop checks that multirootca still runs (and calls ``on_tick``);
#: issues are recorded as soon as they are logged, not on this beat.
AUDIT_EVERY = 0.5
#: The most log lines recorded with one fsync (the rest wait for the next round).
_BATCH = 1000
_DER = Encoding.DER


def argv(multirootca: Tool, prepared: Prepared, listen: Listen) -> list[str]:
    """The argv of multirootca: paths and the address only, never a key."""
    from cfwrap.signer.info import LABEL

    return [
        str(multirootca.path),
        "-a", listen.address,
        "-roots", str(prepared.roots),
        "-l", LABEL,
        "-tls-cert", str(prepared.tls_cert),
        "-tls-key", str(prepared.tls_key),
        "-loglevel", "1",
    ]  # fmt: skip


def check_free(listen: Listen) -> None:
    """Refuse an address this machine cannot listen on, before anything is issued for it.

    A bind and close, with SO_REUSEADDR as Go's ``net.Listen`` sets it; multirootca's own bind
    still decides (something may take the port in between).

    Raises:
        InputError: the address is in use, or not one of this machine's.
    """
    try:
        found = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError):
        return  # a name that does not resolve: multirootca says so itself
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            why = e.strerror or str(e)
            raise InputError(  # found before multirootca runs: it did not fail
                f"--listen {listen.address}",
                f"cannot listen there: {why[:1].lower()}{why[1:]}",
                fix="give a free port on an address of this machine",
            ) from None


def _probe_host(listen: Listen) -> str:
    if listen.wildcard:
        return "::1" if listen.host == "::" else "127.0.0.1"
    return listen.host


def _answers(listen: Listen, prepared: Prepared) -> bool:
    """Whether this signer answers: a TLS handshake shows its own certificate.

    A connection alone proves nothing: another process may hold the port (multirootca then
    fails to bind, a moment later).
    """
    import ssl

    from cfwrap import parsers

    context = ssl.create_default_context(cafile=str(prepared.tls_cert))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # compared below, byte for byte
    try:
        with (
            socket.create_connection((_probe_host(listen), listen.port), timeout=1) as raw,
            context.wrap_socket(raw) as tls,
        ):
            presented = tls.getpeercert(binary_form=True)
    except OSError:
        return False
    own = parsers.load_certificate(prepared.tls_cert.read_bytes())
    return presented == own.public_bytes(_DER)


@dataclass
class Signer:
    """A started multirootca, the lines of its log not recorded yet, and the audit log."""

    service: runner.Service
    audit: AuditLog
    lines: queue.SimpleQueue[str]

    def catch_up(self, *, wait: float = 0.0) -> int:
        """Record the issues logged since the last call; wait up to ``wait`` s for a first line.

        Returns how many were recorded.
        """
        batch: list[str] = []
        try:
            batch.append(self.lines.get(timeout=wait) if wait > 0 else self.lines.get_nowait())
            while len(batch) < _BATCH:
                batch.append(self.lines.get_nowait())
        except queue.Empty:
            pass
        return self.audit.record("\n".join(batch)) if batch else 0

    def stop(self) -> None:
        """Stop multirootca and record its last issues."""
        self.service.stop()  # its last lines are queued before this returns
        while not self.lines.empty():
            self.catch_up()


def start(multirootca: Tool, prepared: Prepared, listen: Listen) -> Signer:
    """Start multirootca and wait until it accepts connections.

    Raises:
        ToolFailedError: it exited, or did not answer within :data:`READY_TIMEOUT` seconds.
    """
    from cfwrap.models import parse_duration

    call = runner.Call.of(argv(multirootca, prepared, listen))
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    service = runner.start_service(call, on_line=lines.put)
    audit = AuditLog(prepared.audit_log, prepared.auth_dir, parse_duration(prepared.expiry))
    signer = Signer(service, audit, lines)
    deadline = time.monotonic() + READY_TIMEOUT
    while not _answers(listen, prepared):
        if not service.alive():
            signer.stop()
            raise ToolFailedError(
                "multirootca",
                f"{service.failure_reason()} (exit {service.returncode})",
                argv=call.argv,
                returncode=service.returncode,
                fix=f"check that {listen.address} is free and this machine's own address",
            )
        if time.monotonic() > deadline:
            signer.stop()
            raise ToolFailedError(
                "multirootca", f"not answering on {listen.address} after {READY_TIMEOUT:.0f}s"
            )
        time.sleep(0.05)
    return signer


def serve(signer: Signer, *, on_tick: Callable[[], None] | None = None) -> int:
    """Run until multirootca exits (or cfwrap is stopped); returns multirootca's exit code.

    Raises:
        ToolFailedError: multirootca exited on its own.
    """
    try:
        tick = time.monotonic() + AUDIT_EVERY
        while signer.service.alive():
            signer.catch_up(wait=AUDIT_EVERY)
            if on_tick is not None and time.monotonic() >= tick:
                tick = time.monotonic() + AUDIT_EVERY
                on_tick()
    finally:
        signer.stop()
    code = signer.service.returncode
    raise ToolFailedError(
        "multirootca",
        f"stopped on its own: {signer.service.failure_reason()} (exit {code})",
        returncode=code,
        fix="see its log above with -v, then start the signer again",
    )
