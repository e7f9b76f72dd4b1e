"""The one door to outside processes. Nothing else in cfwrap imports ``sh`` or ``subprocess``.

Every call passes argv as a list (never a shell string), may feed bytes on stdin, has a timeout,
keeps at most :data:`OUTPUT_CAP` bytes of each output stream, logs its argv at INFO and its output
at DEBUG with secrets removed (by pattern, and by the values this process has seen), and turns
sh's exceptions into cfwrap's errors.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfwrap.errors import ToolFailedError, ToolMissingError

log = logging.getLogger(__name__)
# sh logs every argv (INFO) and the first bytes of every chunk it reads (DEBUG), unredacted:
# keep its loggers quiet even when an application turns the root logger up. Set once, here:
# setLevel takes logging's module lock without a try/finally (Python 3.11), so a SIGTERM
# raised inside it, per call, left the lock held and sh's threads, then every stop, waiting.
logging.getLogger("sh").setLevel(logging.WARNING)

DEFAULT_TIMEOUT = 120.0

# Processes started and not yet finished, so an interrupted cfwrap can stop them before it
# removes its staging folder (a tool still writing there would leave files behind).
_ACTIVE: dict[int, Any] = {}  # by id(): sh's RunningCommand is not hashable
#: The pids of running calls that lead a process group of their own (``Call.group``).
_GROUPS: set[int] = set()

#: The most of one tool's stdout, and of its stderr, that cfwrap keeps. The rest is read and
#: dropped as it comes (so the tool is not blocked or killed by a full pipe), and counted.
OUTPUT_CAP = 1024 * 1024
# How much sh reads at a time. A fixed size, not sh's default line buffering: a stream without
# newlines (``head -c 100000000 /dev/zero``) would otherwise be gathered whole before the cap.
_READ_SIZE = 64 * 1024
#: The longest line a service hands to its ``on_line`` consumer; a longer one is cut into pieces
#: of this size (memory stays bounded for a stream without newlines).
LINE_CAP = 64 * 1024

_PEM_PRIVATE = re.compile(
    rb"-----BEGIN ([A-Za-z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|$)", re.S
)
_JSON_KEY_FIELD = re.compile(rb'"key"\s*:\s*"[^"]*"')
# openssl's -text dumps of a private key (``openssl ec|rsa|pkey|genpkey -text``): the label of a
# private number, then its value as indented hex lines (``priv:\n    00:ab:...``).
_TEXT_DUMP = re.compile(
    rb"(?mi)^([ \t]*(?:priv|private-?key|privateExponent|prime[12]|exponent[12]|coefficient)"
    rb"[ \t]*:)[ \t]*(?:\r?\n[ \t]*[0-9a-f]{2}(?::[0-9a-f]{2})*:?[ \t]*)+$"
)
# openssl asn1parse prints a private key's numbers as ``[HEX DUMP]:...`` (an EC key's scalar is
# an OCTET STRING): any such dump of 16 bytes or more is removed.
_HEX_DUMP = re.compile(rb"(\[HEX DUMP\]:)[0-9A-Fa-f]{32,}")
# A gossip key given as the value of ``encrypt`` (Nomad's HCL, or a step echoing one).
_ENCRYPT = re.compile(rb'(?i)(encrypt\s*=\s*"?|"encrypt"\s*:\s*")[A-Za-z0-9+/]{22,44}={0,2}')
# Long base64 and hex runs: each is tried as a DER private key (a key printed in another form).
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{64,}={0,2}")
_HEX_RUN = re.compile(rb"(?:[0-9A-Fa-f]{2}[:\s]?){48,}")
# A lone base64 token of 16, 24 or 32 bytes is what a symmetric key (a gossip key) looks like.
_LONE_KEY = re.compile(rb"\A\s*([A-Za-z0-9+/]{22,44}={0,2})\s*\Z")
_REMOVED = b"[private key removed]"
# Shorter values would remove ordinary words from logs; no secret cfwrap handles is this short.
_MIN_SECRET = 16


class _Secrets:
    """Every secret value this process has seen, to remove from whatever it logs or records.

    Literal values (gossip keys, the base64 lines of private keys, DER) are removed as they are;
    the private numbers of keys (an EC scalar, RSA's d, p, q, ...) are removed in any hex form
    a tool prints them in (``00:ab:cd`` from ``openssl -text``, ``ABCD`` from asn1parse).
    Deriving those numbers needs a key parse, so it waits until something is redacted.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.literals: set[bytes] = set()
        self.pending: list[bytes] = []  # DER of keys whose numbers are not derived yet
        self.seen: set[bytes] = set()
        self.numbers: list[re.Pattern[bytes]] = []
        self.raw: set[bytes] = set()  # secrets as bytes: a hex dump's bytes are searched for them

    def add_literal(self, value: bytes) -> None:
        value = value.strip()
        if len(value) >= _MIN_SECRET:
            with self.lock:
                self.literals.add(value)

    def add_symmetric(self, raw: bytes) -> None:
        """A key's raw bytes (a gossip key decoded): removed as bytes and in any hex form."""
        pattern = _hex_pattern(raw)
        with self.lock:
            if raw not in self.raw and pattern is not None:
                self.raw.add(raw)
                self.literals.add(raw)
                self.numbers.append(pattern)

    def add_key(self, der: bytes) -> None:
        with self.lock:
            if der not in self.seen:
                self.seen.add(der)
                self.pending.append(der)
                if len(der) >= _MIN_SECRET:
                    self.literals.add(der)

    def patterns(self, *, numbers: bool = True) -> tuple[list[bytes], list[re.Pattern[bytes]]]:
        if not numbers:  # the keys' numbers are derived (about 1 ms a key) only when needed
            with self.lock:
                return sorted(self.literals, key=len, reverse=True), []
        with self.lock:
            pending, self.pending = self.pending, []
        raw = [n for der in pending for n in _private_numbers(der)]
        found = [_hex_pattern(n) for n in raw]
        with self.lock:
            self.raw.update(n for n in raw if len(n) >= _MIN_SECRET // 2)
            self.numbers += [n for n in found if n is not None]
            # Longest first, so a value that contains another is removed whole.
            return sorted(self.literals, key=len, reverse=True), list(self.numbers)


_SECRETS = _Secrets()


def remember_secret(value: str | bytes) -> None:
    """Treat ``value`` as secret from now on: it is removed from every log and recorded output.

    A base64 key of 16, 24 or 32 bytes (a gossip key) is removed decoded too, as bytes and in
    hex (``base64 -d gossip.key | xxd -p``).
    """
    data = value.encode() if isinstance(value, str) else value
    _SECRETS.add_literal(data)
    if _base64_size(data.strip()) in (16, 24, 32):
        _SECRETS.add_symmetric(base64.b64decode(data.strip()))


#: A gossip key as the value of ``encrypt`` in a file (an agent's HCL, or its JSON form).
_GOSSIP_IN_TEXT = re.compile(rb'(?i)(?:encrypt\s*=\s*|"encrypt"\s*:\s*)"([A-Za-z0-9+/=]{20,})"')


def remember_secrets_in(data: bytes) -> None:
    """Remember every secret a file's bytes hold.

    Its PEM private keys, the gossip keys given as ``encrypt = "..."``, and the file itself when
    it is a gossip key alone.
    """
    from cfwrap import gossip

    remember_private_keys(data)
    for key in _GOSSIP_IN_TEXT.findall(data):
        remember_secret(key)
    if len(data) < 128:
        try:
            gossip.check(data.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return
        remember_secret(data.strip())


def remember_private_keys(data: bytes) -> int:
    """Find PEM private keys in ``data`` (a file, or a tool's output) and remember them as secret.

    Each key's base64 lines, its DER and its private numbers in hex are removed from then on.
    Returns how many keys were found.
    """
    if b"PRIVATE KEY-----" not in data:
        return 0
    text = data.replace(b"\\n", b"\n")  # a PEM inside JSON (cfssl's "key" field)
    found = 0
    for match in re.finditer(
        rb"-----BEGIN ([A-Za-z0-9 ]*)PRIVATE KEY-----(.*?)-----END \1PRIVATE KEY-----", text, re.S
    ):
        lines = [line.strip() for line in match.group(2).splitlines()]
        body = [line for line in lines if line and b":" not in line]  # skip Proc-Type headers
        for line in body:
            _SECRETS.add_literal(line)
        try:
            der = base64.b64decode(b"".join(body), validate=True)
        except (binascii.Error, ValueError):
            continue
        _SECRETS.add_key(der)
        found += 1
    return found


def _private_numbers(der: bytes) -> list[bytes]:
    """The private numbers of a DER private key, big-endian; none if it cannot be read."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return []  # encrypted or unknown: its base64 lines and DER are still removed
    numbers: list[int] = []
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = [key.private_numbers().private_value]
    elif isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        numbers = [n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp]
    elif isinstance(key, dsa.DSAPrivateKey):
        numbers = [key.private_numbers().x]
    else:  # Ed25519, Ed448, X25519, X448: raw private bytes
        try:
            return [
                key.private_bytes(
                    serialization.Encoding.Raw,
                    serialization.PrivateFormat.Raw,
                    serialization.NoEncryption(),
                )
            ]
        except (ValueError, TypeError, AttributeError):
            return []
    return [n.to_bytes((n.bit_length() + 7) // 8, "big") for n in numbers if n > 0]


def _hex_pattern(number: bytes) -> re.Pattern[bytes] | None:
    """A number's hex digits in either case, with any colons or white space between bytes."""
    if len(number) < _MIN_SECRET // 2:
        return None
    return re.compile(rb"[\s:]*".join(b"%02x" % b for b in number), re.I)


# The start of any private number's hex form: 16 hex digits, with colons or white space between
# (a fixed count: a match of a whole megabyte-long run would cost its length in memory). Text
# without one cannot hold a number, so it skips them: a plan remembers thousands of keys, and
# each number is a compiled pattern of its own (about 1 ms each, then a scan per redaction).
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f](?:[\s:]*[0-9A-Fa-f]){%d}" % (_MIN_SECRET - 1))


def _redact_values(data: bytes) -> bytes:
    literals, numbers = _SECRETS.patterns(numbers=_HEX_DIGITS.search(data) is not None)
    for literal in literals:
        if literal in data:
            data = data.replace(literal, b"[secret removed]")
    for pattern in numbers:
        data = pattern.sub(_REMOVED, data)
    return data


def redact(data: bytes) -> bytes:
    """Remove secrets from tool output: private keys, openssl's text dumps of them, and values.

    By pattern: PEM private key blocks (also cut short), cfssl's JSON ``"key"`` field, openssl's
    ``priv:`` / ``privateExponent:`` / ``prime1:`` ... hex dumps, and output that is nothing but
    a 16-, 24- or 32-byte base64 key. By value: everything :func:`remember_secret` and
    :func:`remember_private_keys` were given, in this process.
    """
    data = _PEM_PRIVATE.sub(_REMOVED, data)
    data = _JSON_KEY_FIELD.sub(rb'"key":"[removed]"', data)
    data = _TEXT_DUMP.sub(rb"\1 [private key removed]", data)
    data = _HEX_DUMP.sub(rb"\1[removed]", data)
    data = _ENCRYPT.sub(rb"\1[a gossip key, not shown]", data)
    data = _WRAPPED_BASE64.sub(_wrapped_key, data)
    data = _DUMP_LINES.sub(_dumped_secret, data)
    _discover_keys(data)
    data = _redact_values(data)
    lone = _LONE_KEY.match(data)
    if lone and _base64_size(lone.group(1)) in (16, 24, 32):
        return b"[a base64 key, not shown]\n"
    return data


# Base64 wrapped over lines (``base64`` wraps at 76, PEM bodies at 64): a key's DER comes apart
# into lines that no single-line search decodes.
_WRAPPED_BASE64 = re.compile(
    rb"(?m)^[A-Za-z0-9+/]{16,}[ \t]*\r?\n(?:[A-Za-z0-9+/]{16,}[ \t]*\r?\n)*[A-Za-z0-9+/]*={0,2}$"
)
# A hex dump: lines that start with an offset and a byte in hex (xxd, hexdump -C, od -t x1), or
# a C array of bytes (xxd -i). Its bytes are read back and searched for secrets.
_DUMP_LINE = rb"[ \t]*+[0-9a-fA-F]{6,8}+:?[ \t]++[0-9a-fA-F]{2}.*"
_C_LINE = rb"[ \t]*+0x[0-9a-fA-F]{2}(?:,[ \t]*+0x[0-9a-fA-F]{2})*+,?[ \t]*+"
_DUMP_LINES = re.compile(
    rb"(?m)^(?:%s(?:\r?\n%s)*|%s(?:\r?\n%s)*)$" % (_DUMP_LINE, _DUMP_LINE, _C_LINE, _C_LINE)
)
_OFFSET = re.compile(rb"\A[ \t]*[0-9a-fA-F]{6,8}:?[ \t]+")
_HEX_GROUP = re.compile(rb"(?:[0-9a-fA-F]{2}){1,2}")
#: The bytes a dump line shows: a text column after them is never read as bytes.
_PER_LINE = 16


def _dump_bytes(dump: bytes) -> bytes:
    """The bytes a hex dump shows, line by line, in order."""
    if dump.lstrip().startswith(b"0x"):
        return bytes(int(b, 16) for b in re.findall(rb"0x([0-9a-fA-F]{2})", dump))
    shown = bytearray()
    for line in dump.splitlines():
        line_bytes = bytearray()
        for token in _OFFSET.sub(b"", line).split():
            if not _HEX_GROUP.fullmatch(token) or len(line_bytes) >= _PER_LINE:
                break
            line_bytes += bytes.fromhex(token.decode())
        shown += line_bytes[:_PER_LINE]
    return bytes(shown)


def _wrapped_key(match: re.Match[bytes]) -> bytes:
    """A private key's DER in base64 over several lines, removed whole (its key remembered)."""
    joined = re.sub(rb"\s", b"", match.group())
    try:
        der = base64.b64decode(joined + b"=" * (-len(joined) % 4), validate=True)
    except (binascii.Error, ValueError):
        return match.group()
    if not _private_numbers(der):
        return match.group()
    _SECRETS.add_key(der)
    return _REMOVED


def _dumped_secret(match: re.Match[bytes]) -> bytes:
    """A hex dump whose bytes hold a private key, or a secret already known, removed whole."""
    dumped = _dump_bytes(match.group())
    _SECRETS.patterns()  # the private numbers of the keys seen so far, derived
    with _SECRETS.lock:
        known = [*_SECRETS.raw, *_SECRETS.literals]
    if any(secret in dumped for secret in known) or any(
        _private_numbers(dumped[i:]) for i in range(min(len(dumped), 64)) if dumped[i] == 0x30
    ):
        if _private_numbers(dumped):
            _SECRETS.add_key(dumped)
        return b"[a hex dump of a secret removed]"
    return match.group()


def _discover_keys(data: bytes) -> None:
    """Remember any DER private key written out in base64 or hex (``base64``, ``od``, ``xxd``)."""
    candidates = [m.group() for m in _BASE64_RUN.finditer(data)]
    for run in candidates:
        try:
            der = base64.b64decode(run + b"=" * (-len(run) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if _private_numbers(der):
            _SECRETS.add_key(der)
            _SECRETS.add_literal(run)
    for match in _HEX_RUN.finditer(data):
        der = bytes.fromhex(re.sub(rb"[:\s]", b"", match.group()).decode())
        if _private_numbers(der):
            _SECRETS.add_key(der)


def redact_text(text: str) -> str:
    """:func:`redact` for text."""
    return redact(text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")


def _base64_size(token: bytes) -> int:
    try:
        return len(base64.b64decode(token, validate=True))
    except (binascii.Error, ValueError):
        return -1


class _Capture:
    """A tool's stdout or stderr, kept up to a cap: its start and its end.

    What came between is counted and dropped; the end stays because that is where a tool says
    why it failed.

    A reader thread (sh's, or a service's) calls :meth:`write` with each chunk as it is read, so
    memory stays at the cap however much the tool prints; :meth:`value` may be called meanwhile.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.tail_cap = cap // 4
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0
        self.lock = threading.Lock()

    def write(self, chunk: bytes | str) -> None:
        if isinstance(chunk, str):  # sh passes bytes to a file-like object; be safe anyway
            chunk = chunk.encode("utf-8", "surrogateescape")
        with self.lock:
            room = self.cap - self.tail_cap - len(self.head)
            if room > 0:
                self.head += chunk[:room]
                chunk = chunk[room:]
            self.tail += chunk
            if len(self.tail) > self.tail_cap:
                excess = len(self.tail) - self.tail_cap
                del self.tail[:excess]
                self.dropped += excess

    def value(self) -> bytes:
        """What was kept, with a line saying how much was cut where it was cut, if anything."""
        with self.lock:
            if not self.dropped:
                return bytes(self.head + self.tail)
            note = cut_note(self.cap, self.dropped).encode()
            return bytes(self.head) + note + b"\n" + bytes(self.tail)


def cut_note(cap: int, dropped: int) -> str:
    """The line that says output was cut."""
    size = f"{cap // 1024**2} MiB" if cap % 1024**2 == 0 else f"{cap} bytes"
    return f"\n[output cut at {size}; {dropped} bytes dropped]"


@dataclass(frozen=True)
class Call:
    """One invocation: argv (the first item is the binary's path) and optional stdin.

    ``secret_stdout`` says that what the tool prints is a secret (a gossip key, say): it is
    never logged, and its value is remembered so that it is removed wherever it shows up later.
    ``on_exit`` runs when the tool has ended, before its output is logged: replay reads the
    secrets a step wrote into its folder there, so that its output cannot show them.
    ``group``: the tool and whatever it starts are a process group of their own, killed whole
    on a timeout or a stop, and when the tool ends (what it left running in the background
    would outlive the call: a guide's ``sh -c '... &'``).
    ``env``: variables set for the tool on top of cfwrap's own environment (``GOMAXPROCS`` for
    a loopback ``cfssl serve``); the command's display shows them.
    """

    argv: tuple[str, ...]
    stdin: bytes | None = None
    timeout: float = DEFAULT_TIMEOUT
    cwd: Path | None = None
    secret_stdout: bool = False
    on_exit: Callable[[], None] | None = None
    group: bool = False
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(
        cls,
        argv: Sequence[str | Path],
        *,
        stdin: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        cwd: Path | None = None,
        secret_stdout: bool = False,
        on_exit: Callable[[], None] | None = None,
        group: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Call:
        """Build a call from path-or-string arguments."""
        argv_text = tuple(str(a) for a in argv)
        variables = tuple((env or {}).items())
        return cls(argv_text, stdin, timeout, cwd, secret_stdout, on_exit, group, variables)

    @property
    def tool(self) -> str:
        """The tool's short name, for messages."""
        return Path(self.argv[0]).name

    def display(self) -> str:
        """The command as a person would type it."""
        variables = "".join(f"{name}={shlex.quote(value)} " for name, value in self.env)
        return variables + shlex.join(self.argv) + (" < (stdin)" if self.stdin is not None else "")


@dataclass(frozen=True)
class Result:
    """What a finished call returned.

    ``stdout`` and ``stderr`` hold at most :data:`OUTPUT_CAP` bytes each of what the tool
    printed, followed by a line saying how much was cut when it printed more.
    """

    call: Call
    returncode: int
    stdout: bytes = field(repr=False)
    stderr: bytes = field(repr=False)
    seconds: float
    stdout_dropped: int = 0
    stderr_dropped: int = 0


def failure_reason(stderr: bytes) -> str:
    """Pick the line of a tool's stderr that says what went wrong.

    cfssl reports errors as JSON (``{"code":2400,"message":"invalid curve"}``), as log lines
    (``[ERROR] ...``, ``[CRITICAL] ...``) or as plain Go errors; prefer them in that order.
    """
    lines = [line.strip() for line in redact(stderr).decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                message = json.loads(line).get("message")
            except (ValueError, AttributeError):
                continue
            if isinstance(message, str) and message:
                return _one_line(message)
    for line in reversed(lines):
        match = re.search(r"\[(?:ERROR|CRITICAL|FATAL)\]\s*(.*)", line)
        if match:
            return _one_line(match.group(1))
    return _one_line(lines[-1]) if lines else "no error message"


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _one_line(text: str, limit: int = 300) -> str:
    """A tool's line as part of cfwrap's one-line message: controls escaped, length bounded."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class _Running:
    """A started call: sh's RunningCommand and the watchdog that enforces its timeout."""

    call: Call
    command: Any
    watchdog: threading.Timer
    started: float
    timed_out: threading.Event
    stdout: _Capture
    stderr: _Capture
    stderr_fd: int | None = None  # a service's: its stderr pipe, read by the service, not sh


def _options(
    call: Call, *, stdout: _Capture, stderr: _Capture | int, piped: bool
) -> dict[str, Any]:
    """The options that tell sh where output goes (the captures, or a pipe's fd) and the folder."""
    options: dict[str, Any] = {"_err": stderr}
    if isinstance(stderr, _Capture):
        options["_err_bufsize"] = _READ_SIZE
    if piped:
        options["_piped"] = True  # stdout goes straight to the next stage's stdin, unread
    else:
        options |= {"_out": stdout, "_out_bufsize": _READ_SIZE}
    if call.cwd is not None:
        options["_cwd"] = str(call.cwd)
    if call.group:
        options["_new_group"] = True
    if call.env:
        options["_env"] = {**os.environ, **dict(call.env)}
    return options


def _kill(pid: int, *, group: bool) -> None:
    """SIGKILL a tool, or its whole process group; nothing when it is gone already."""
    with contextlib.suppress(OSError):
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _start(
    call: Call,
    *,
    upstream: _Running | None = None,
    piped: bool = False,
    service: bool = False,
) -> _Running:
    """Start a call in the background; ``upstream``'s stdout becomes its stdin (a pipe).

    A ``service`` has no timeout, and is killed by the kernel if this process dies. Its stderr
    is a pipe of its own, read by :class:`Service` (sh would hold back the lines it read
    before it was told not to buffer).
    """
    import sh

    log.info("run: %s", redact_text(call.display()))
    if call.stdin is not None:
        remember_private_keys(call.stdin)
    try:
        command = sh.Command(call.argv[0])
    except sh.CommandNotFound as e:
        raise ToolMissingError(
            call.tool,
            f"{call.argv[0]} is not an executable file",
            fix="run ./scripts/install-cfssl or point --cfssl-dir at cfssl 1.6.5",
        ) from e
    stdout, stderr = _Capture(OUTPUT_CAP), _Capture(OUTPUT_CAP)
    stderr_pipe = os.pipe() if service else None  # both ends close-on-exec; sh dups the child's
    options = _options(
        call, stdout=stdout, stderr=stderr_pipe[1] if stderr_pipe else stderr, piped=piped
    )
    if service:
        options["_preexec_fn"] = _die_with_parent()
    try:
        running = command(
            *call.argv[1:],
            _in=upstream.command if upstream is not None else call.stdin,
            _tty_in=False,
            _tty_out=False,
            _bg=True,
            _bg_exc=False,
            _return_cmd=True,
            **options,
        )
    except BaseException:
        if stderr_pipe:
            os.close(stderr_pipe[0])
        raise
    finally:
        if stderr_pipe:
            os.close(stderr_pipe[1])  # the child's copy is the only writer left: EOF when it ends
    try:
        # Registered first of all: a SIGTERM from here on finds it in stop_all, and one that
        # lands before the registration is caught below and the tool killed all the same.
        _ACTIVE[id(running)] = running
        if call.group:
            _GROUPS.add(running.pid)
    except BaseException:
        with contextlib.suppress(OSError, AttributeError):
            _kill(running.pid, group=call.group)
        if stderr_pipe:
            os.close(stderr_pipe[0])
        raise
    if service:
        # A service's stdout is read while it runs: each chunk is handed over as it is read, not
        # once 64 KiB have gathered. The read size stays 64 KiB (sh's bufsize 0 from the start
        # would read one byte at a time). Its stderr is the Service's own pipe.
        running.process.change_out_bufsize(0)
    timed_out = threading.Event()

    # sh's own _timeout (and wait(timeout=)) polls every 100 ms, which would cost more than a
    # cfssl call takes; a timer that kills the process on expiry costs nothing until then.
    def expire() -> None:
        timed_out.set()
        _kill(running.pid, group=call.group)

    watchdog = threading.Timer(call.timeout, expire)
    watchdog.daemon = True
    if not service:  # a service runs until stopped: its timer is never started
        watchdog.start()
    return _Running(
        call,
        running,
        watchdog,
        time.monotonic(),
        timed_out,
        stdout,
        stderr,
        stderr_pipe[0] if stderr_pipe else None,
    )


def _finish(running: _Running, *, check: bool = True) -> Result:
    import sh

    call = running.call
    try:
        running.command.wait()
    except sh.SignalException as e:  # first: it is a subclass of ErrorReturnCode
        _log_output(_result(running, e.exit_code))
        if running.timed_out.is_set():
            raise ToolFailedError(
                call.tool,
                f"no answer within {call.timeout:.0f}s",
                argv=call.argv,
                fix="check that the tool is not waiting on a terminal or a network",
            ) from e
        raise ToolFailedError(
            call.tool, f"killed by signal {-e.exit_code}", argv=call.argv, returncode=e.exit_code
        ) from e
    except sh.ErrorReturnCode:
        # Waiting on a pipeline's later stage, sh raises an earlier stage's failure (and not
        # again for that stage): each stage is judged below by its own process's exit code.
        pass
    finally:
        running.watchdog.cancel()
        _ACTIVE.pop(id(running.command), None)
        if call.group:  # what it left running in the background ends with it
            _kill(running.command.pid, group=True)
            _GROUPS.discard(running.command.pid)
    own = running.command.process.exit_code
    result = _result(running, own)
    _log_output(result)
    if own != 0 and check:
        raise ToolFailedError(
            call.tool,
            f"{failure_reason(result.stderr)} (exit {own})",
            argv=call.argv,
            returncode=own,
            stderr=redact(result.stderr).decode("utf-8", "replace"),
        )
    return result


def _result(running: _Running, returncode: int) -> Result:
    """The result of a finished call; the keys it printed become known secrets."""
    stdout, stderr = running.stdout.value(), running.stderr.value()
    if running.call.on_exit is not None:
        running.call.on_exit()
    if running.call.secret_stdout:
        remember_secret(stdout)
    remember_private_keys(stdout)
    remember_private_keys(stderr)
    return Result(
        running.call,
        returncode,
        stdout,
        stderr,
        time.monotonic() - running.started,
        running.stdout.dropped,
        running.stderr.dropped,
    )


def _log_output(result: Result) -> None:
    if log.isEnabledFor(logging.DEBUG):
        if result.call.secret_stdout:
            stdout = f"[secret, {len(result.stdout)} bytes, not shown]"
        else:
            stdout = redact(result.stdout).decode("utf-8", "replace")
        log.debug(
            "%s exited %d after %.3fs\nstdout: %s\nstderr: %s",
            result.call.tool,
            result.returncode,
            result.seconds,
            stdout,
            redact(result.stderr).decode("utf-8", "replace"),
        )


def run(call: Call) -> Result:
    """Run one call to completion.

    Raises:
        ToolMissingError: the binary does not exist or is not executable.
        ToolFailedError: non-zero exit (message from the tool's stderr), timeout, or signal.
    """
    return run_all([call])[0]


def run_all(calls: Sequence[Call]) -> list[Result]:
    """Run independent calls concurrently and return their results in order.

    Raises:
        ToolMissingError: a binary does not exist.
        ToolFailedError: the first call (in order) that failed; the others are still awaited.
    """
    running = [_start(call) for call in calls]
    results: list[Result] = []
    first_error: ToolFailedError | None = None
    for one in running:
        try:
            results.append(_finish(one))
        except ToolFailedError as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return results


def run_pipeline(calls: Sequence[Call], *, check: bool = True) -> list[Result]:
    """Run calls joined by pipes, like ``a | b | c``, and return every stage's result.

    Only the last stage's stdout is captured: what flows between stages (a private key in
    cfssl's JSON, say) is never held or logged.

    Raises:
        ToolMissingError: a binary does not exist (nothing was started after it).
        ToolFailedError: with ``check``, the first stage (in pipe order) that failed; always, a
            timeout or a signal.
    """
    started: list[_Running] = []
    for index, call in enumerate(calls):
        upstream = started[-1] if started else None
        started.append(_start(call, upstream=upstream, piped=index < len(calls) - 1))
    results: list[Result] = []
    first_error: ToolFailedError | None = None
    for one in reversed(started):  # the last stage finishes first; earlier ones then see EOF
        try:
            results.append(_finish(one, check=check))
        except ToolFailedError as e:
            first_error = e  # keeps the earliest stage's error: that is the cause
    if first_error is not None:
        raise first_error
    return results[::-1]


#: How long :meth:`Service.stop` waits after SIGTERM before it sends SIGKILL.
STOP_GRACE = 2.0
# Linux's prctl option that has the kernel signal a child when its parent thread ends.
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None]:
    """A pre-exec step: the kernel SIGKILLs the child when the thread that started it ends.

    So a server cannot outlive a cfwrap killed by SIGKILL, when no handler runs. libc's
    ``prctl`` is looked up here, in the parent: loading a library in the forked child of a
    threaded process can deadlock.
    """
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: stop_all and Service.stop still apply
        return lambda: None
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


#: How long :meth:`Service.stop` waits, once the service has exited, for the last of its stderr
#: (a child it left behind may hold the pipe open).
DRAIN_WITHIN = 2.0
#: How long a stop waits for a killed service's end to be seen, before it gives up on it.
KILLED_WITHIN = 5.0


class _Lines:
    """A stream cut into lines for a consumer: secrets removed, none over :data:`LINE_CAP`.

    A consumer that raises gets no more lines (the stream is still read and captured, so the
    service is never blocked on a full pipe); the error is kept and logged.
    """

    def __init__(self, consumer: Callable[[str], None], *, tool: str) -> None:
        self.consumer = consumer
        self.tool = tool
        self.partial = bytearray()
        self.error: Exception | None = None

    def feed(self, chunk: bytes) -> None:
        self.partial += chunk
        while True:
            end = self.partial.find(b"\n")
            if end < 0:
                if len(self.partial) < LINE_CAP:
                    return
                end = LINE_CAP - 1  # no newline yet: hand over a piece of the cap's size
            line = bytes(self.partial[: end + 1])
            del self.partial[: end + 1]
            self._deliver(line)

    def end(self) -> None:
        if self.partial:
            line, self.partial = bytes(self.partial), bytearray()
            self._deliver(line)

    def _deliver(self, line: bytes) -> None:
        if self.error is not None:
            return
        text = redact(line.rstrip(b"\r\n")).decode("utf-8", "replace")
        try:
            self.consumer(text)
        except Exception as e:  # the reader must go on: see the class docstring
            self.error = e
            log.error("%s: its output consumer failed; no more lines go to it", self.tool,
                      exc_info=True)  # fmt: skip


class Service:
    """A tool running in the background until stopped (a server); see :func:`start_service`.

    Its output is captured with the same caps and redaction as :func:`run`'s. A thread waits
    for it, so :meth:`alive` and :meth:`wait` never poll. Its stderr is read by a thread of its
    own as the tool writes it, and each line goes to ``on_line`` at once.
    """

    def __init__(self, running: _Running, *, on_line: Callable[[str], None] | None = None) -> None:
        """Watch a started call until it exits, and read its stderr as it is written."""
        self._running = running
        self._exited = threading.Event()
        self._returncode: int | None = None
        self._result: Result | None = None
        self._lock = threading.Lock()
        tool = running.call.tool
        self._lines = _Lines(on_line, tool=tool) if on_line is not None else None
        self._reader: threading.Thread | None = None
        if running.stderr_fd is not None:
            self._reader = threading.Thread(
                target=self._read_stderr, args=(running.stderr_fd,), name=f"service-{tool}-stderr"
            )
            self._reader.daemon = True
            self._reader.start()
        self._watcher = threading.Thread(target=self._watch, name=f"service-{tool}", daemon=True)
        self._watcher.start()

    def _read_stderr(self, fd: int) -> None:
        """Read the tool's stderr until it closes: into the capture, and line by line."""
        try:
            while chunk := os.read(fd, _READ_SIZE):
                self._running.stderr.write(chunk)
                if self._lines is not None:
                    self._lines.feed(chunk)
        except OSError:
            pass  # the pipe broke: nothing more to read
        finally:
            if self._lines is not None:
                self._lines.end()
            os.close(fd)

    def _watch(self) -> None:
        import sh

        try:
            self._running.command.wait()
        except sh.ErrorReturnCode:  # SignalException among them: the exit code says which
            pass
        finally:
            _ACTIVE.pop(id(self._running.command), None)
            self._returncode = self._running.command.process.exit_code
            self._exited.set()

    @property
    def call(self) -> Call:
        """The call that started the service."""
        return self._running.call

    @property
    def pid(self) -> int:
        """The service's process id."""
        return int(self._running.command.pid)

    @property
    def returncode(self) -> int | None:
        """Its exit code once it has exited (negative: the signal that killed it), else None."""
        return self._returncode if self._exited.is_set() else None

    def alive(self) -> bool:
        """Whether the service is still running."""
        return not self._exited.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the service to exit; True if it has."""
        return self._exited.wait(timeout)

    def stderr_tail(self, limit: int = 4096) -> str:
        """The end of what the service wrote on stderr so far, secrets removed."""
        self._drained()
        return redact(self._running.stderr.value()[-limit:]).decode("utf-8", "replace")

    def failure_reason(self) -> str:
        """The line of its stderr that says why it stopped (see :func:`failure_reason`)."""
        self._drained()
        return failure_reason(self._running.stderr.value()[-4096:])

    def _drained(self) -> None:
        """Once it has exited, wait (briefly) until its last lines are read.

        Its end may be seen before the reader thread has read what it wrote last: why it
        stopped.
        """
        reader = self._reader
        if (
            self._exited.is_set()
            and reader is not None
            and reader is not threading.current_thread()
        ):
            reader.join(DRAIN_WITHIN)

    @property
    def line_error(self) -> Exception | None:
        """What the ``on_line`` consumer raised, if it did (it then got no more lines)."""
        return self._lines.error if self._lines is not None else None

    def stop(self, *, grace: float = STOP_GRACE) -> Result:
        """Stop the service (SIGTERM, then SIGKILL after ``grace`` seconds) and return its result.

        Stopping a service that has exited only collects its result; calling it again returns
        the same result.
        """
        with self._lock:
            if self._result is not None:
                return self._result
            if not self._exited.is_set():
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGTERM)
                if not self._exited.wait(grace):
                    with contextlib.suppress(OSError):
                        os.kill(self.pid, signal.SIGKILL)
                    self._exited.wait(KILLED_WITHIN)
            if not self._exited.is_set():
                # Killed, yet its watcher never said so: sh's threads are stuck (a lock a
                # signal left held). Waiting on would hang the stop for good.
                log.warning("%s did not report its end after SIGKILL; not waiting", self.call.tool)
                self._result = _result(self._running, -signal.SIGKILL)
                return self._result
            self._watcher.join(KILLED_WITHIN)
            if self._reader is not None:
                self._reader.join(DRAIN_WITHIN)  # every line written before the exit is read
            returncode = self._returncode if self._returncode is not None else -signal.SIGKILL
            self._result = _result(self._running, returncode)
            _log_output(self._result)
            return self._result


def start_service(call: Call, *, on_line: Callable[[str], None] | None = None) -> Service:
    """Start a long-lived tool (a server) in the background; stop it with :meth:`Service.stop`.

    It has no timeout. Like every tool, it is killed by :func:`stop_all` (cfwrap's SIGTERM and
    Ctrl-C handlers), and the kernel kills it if this process dies; more exactly, when the
    thread that started it ends, so start it from the thread that will stop it.

    Args:
        call: the tool and its arguments.
        on_line: called with each line of the tool's stderr (secrets removed, no newline) as
            soon as it is written, in order, from the service's reader thread; the last ones
            before :meth:`Service.stop` returns. Keep it quick (a queue's ``put``): the tool's
            output waits while it runs.

    Raises:
        ToolMissingError: the binary does not exist or is not executable.
    """
    return Service(_start(call, service=True), on_line=on_line)


def stop_all() -> None:
    """Kill every tool this process started that is still running (on SIGTERM or Ctrl-C).

    Called from a signal handler, so it only sends signals: waiting on sh's objects here could
    deadlock with the wait the main thread was in when the signal came.
    """
    for running in list(_ACTIVE.values()):
        with contextlib.suppress(AttributeError):
            _kill(running.pid, group=running.pid in _GROUPS)
    for pid in list(_GROUPS):  # a group whose leader has ended may still have members
        _kill(pid, group=True)
    _ACTIVE.clear()
    _GROUPS.clear()
