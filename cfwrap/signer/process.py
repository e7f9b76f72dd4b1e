"""The signer's foreground run: start multirootca, wait until it answers, keep the audit, stop.

multirootca is started through the runner (the one door to outside tools), so cfwrap's SIGTERM
and Ctrl-C handlers kill it, and the kernel kills it if cfwrap itself dies.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding

from cfwrap import runner
from cfwrap.errors import ToolFailedError
from cfwrap.signer.audit import AuditLog
from cfwrap.signer.setup import Listen, Prepared
from cfwrap.tools import Tool

log = logging.getLogger(__name__)

#: How long multirootca may take to start answering.
READY_TIMEOUT = 15.0
#: How often the audit log catches up with the signer's log while it runs.
AUDIT_EVERY = 0.5
#: How much of the signer's log is read back each time (its recent lines).
_TAIL = 256 * 1024
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
    """A started multirootca, with the audit log that follows it."""

    service: runner.Service
    audit: AuditLog

    def catch_up(self) -> None:
        """Record every issue logged so far in the audit log."""
        self.audit.record(self.service.stderr_tail(_TAIL))

    def stop(self) -> None:
        """Stop multirootca and record its last issues."""
        result = self.service.stop()
        self.audit.record(result.stderr[-_TAIL:].decode("utf-8", "replace"))


def start(multirootca: Tool, prepared: Prepared, listen: Listen) -> Signer:
    """Start multirootca and wait until it accepts connections.

    Raises:
        ToolFailedError: it exited, or did not answer within :data:`READY_TIMEOUT` seconds.
    """
    call = runner.Call.of(argv(multirootca, prepared, listen))
    service = runner.start_service(call)
    signer = Signer(service, AuditLog(prepared.audit_log, prepared.auth_dir))
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
        while not signer.service.wait(AUDIT_EVERY):
            signer.catch_up()
            if on_tick is not None:
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
