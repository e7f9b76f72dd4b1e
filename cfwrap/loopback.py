"""A kept-alive HTTP/1.1 connection to the ``cfssl serve`` this process runs on loopback.

:class:`issuer.LocalSigner` sends a fleet's thousands of requests to its own server. Through
``http.client`` each one cost a second write (the head and the body go apart) and a pass of the
answer's headers through the ``email`` package: 7% of a 1,000-node apply's CPU
(``scripts/bench-apply``). This connection writes a request in one piece and reads its answer as
RFC 9112 frames it: a status line, header lines, then a body framed by ``Content-Length``, by the
chunked transfer coding, or by the end of the connection (Go's ``net/http`` uses the first two).
Only for that server: the central signer is spoken to through ``http.client`` over TLS.

Its failures are ``http.client``'s and ``OSError``'s, as the signer's callers expect: an end
or a reset of the stream before any byte of an answer is :class:`http.client.RemoteDisconnected`
or :class:`ConnectionResetError` (a kept-alive connection the server had closed, which the
signer tries once more); a cut once the answer began, and anything that is not HTTP/1.x, is an
:class:`http.client.HTTPException` (the server read the request: it is never sent again).
"""

from __future__ import annotations

import http.client
import re
import socket
import time

#: The most an answer's head or body may hold; cfssl's answers are a few KiB.
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_READ_SIZE = 64 * 1024
#: Answers that never have a body (RFC 9112 section 6.3).
_NO_BODY = {204, 304}
#: What a connection the server closed or reset raises (http.client.RemoteDisconnected too).
CLOSED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
#: How many interim (1xx) answers may come before the answer.
_INTERIM = 4
#: A length or a chunk size: digits only (``int()`` also takes signs, blanks, ``_`` and ``0x``),
#: and few enough to stay far below the 4,300 digits past which ``int()`` refuses a number.
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class Connection:
    """One connection to ``127.0.0.1:port``: a request, then its answer, then the next request.

    Connects at the first :meth:`post`; after an answer that ends the connection (``Connection:
    close``, an HTTP/1.0 answer, or a body that runs to the end of the stream) it is closed, and
    the next :meth:`post` connects anew.
    """

    def __init__(self, port: int, *, timeout: float) -> None:
        """A connection to the loopback server at ``port``.

        A request's write may take ``timeout`` seconds, and so may its whole answer.
        """
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buffer = bytearray()
        self._waiting = False
        self._deadline = 0.0
        self._lines_left = MAX_HEAD
        self._received = 0  # bytes of the answer being read

    def post(self, path: str, body: bytes, *, content_type: str = "application/json") -> None:
        """Send a POST of ``body`` to ``path``; read its answer with :meth:`answer`.

        Raises:
            OSError: the connection or the write failed.
            RuntimeError: the last request's answer was not read.
        """
        if self._waiting:
            raise RuntimeError("the answer to the last request on this connection was not read")
        if self.sock is None:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            self._buffer.clear()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.settimeout(self.timeout)  # the last answer's read left its remainder set
        self.sock.sendall(head.encode("ascii") + body)
        self._waiting = True

    def answer(self) -> tuple[int, bytes]:
        """The status and body of the answer to the request just sent.

        The whole answer must come within the connection's timeout, and hold at most
        :data:`MAX_HEAD` bytes of status, header, chunk-size and trailer lines and
        :data:`MAX_BODY` bytes of body. The connection is closed after an answer that ends it,
        after any failure, and when more bytes came than the answer holds (a server that sends
        what was not asked for is out of step with its requests).

        Raises:
            http.client.RemoteDisconnected: the stream ended before the answer began.
            http.client.HTTPException: an answer that is not well-formed HTTP/1.x, or too large.
            OSError: a read failed, or the answer did not come whole in time (TimeoutError).
        """
        if not self._waiting or self.sock is None:
            raise RuntimeError("no request on this connection is waiting for its answer")
        self._deadline = time.monotonic() + self.timeout
        self._lines_left = MAX_HEAD
        self._received = 0
        try:
            status, body, keep = self._read_answer()
        except CLOSED as e:
            self.close()
            if not self._received:  # closed before answering: the request was never read
                raise
            # Part of an answer came: cfssl read the request, and may have signed it. Not a
            # closed idle connection, which the signer would send the request again on.
            raise http.client.HTTPException(
                f"the connection was cut in the middle of an answer ({type(e).__name__})"
            ) from e
        except BaseException:
            self.close()
            raise
        self._waiting = False
        if not keep or self._buffer:
            self.close()
        return status, body

    def close(self) -> None:
        """Close the connection (the next :meth:`post` opens a new one)."""
        sock, self.sock = self.sock, None
        self._waiting = False
        self._buffer.clear()
        if sock is not None:
            sock.close()

    def _read_answer(self) -> tuple[int, bytes, bool]:
        """Status, body, and whether the connection may carry the next request."""
        status, version, headers = self._head()
        for _ in range(_INTERIM):
            if not 100 <= status < 200:
                break
            if status == 101:  # nothing here asks to switch protocols
                raise http.client.HTTPException("an answer switching protocols (101)")
            status, version, headers = self._head()  # after 100 Continue: the real answer
        else:
            raise http.client.HTTPException(f"more than {_INTERIM} interim answers")
        keep = version == b"HTTP/1.1" and b"close" not in _tokens(headers, b"connection")
        framed = b"transfer-encoding" in headers
        if framed and (b"content-length" in headers or version != b"HTTP/1.1"):
            # RFC 9112 section 6.1: either one is a sign of a message built to be misread.
            raise http.client.HTTPException("an answer framed by Transfer-Encoding and more")
        if status in _NO_BODY:
            return status, b"", keep
        if framed:
            if _tokens(headers, b"transfer-encoding")[-1:] == [b"chunked"]:
                return status, self._chunked(), keep
            return status, self._to_end(), False  # framed by the end (section 6.3, point 4)
        if b"content-length" in headers:
            return status, self._exactly(_content_length(headers[b"content-length"])), keep
        return status, self._to_end(), False

    def _fill(self) -> bool:
        """Read what the server sent next into the buffer; False at the end of the stream.

        Raises:
            http.client.RemoteDisconnected: the stream ended before any byte of the answer.
        """
        assert self.sock is not None  # noqa: S101 (answer() checked)
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the answer did not come whole within {self.timeout:g}s")
        self.sock.settimeout(left)
        data = self.sock.recv(_READ_SIZE)
        if not data and not self._received:
            raise http.client.RemoteDisconnected("the server closed the connection")
        self._received += len(data)
        self._buffer += data
        return bool(data)

    def _line(self, what: str) -> bytes:
        """The next line (without its CRLF or LF), read whole, counted against MAX_HEAD."""
        start = 0
        while (end := self._buffer.find(b"\n", start)) < 0:
            start = len(self._buffer)
            if start > self._lines_left:
                raise http.client.LineTooLong(what)
            if not self._fill():
                raise http.client.IncompleteRead(bytes(self._buffer))
        if end + 1 > self._lines_left:
            raise http.client.LineTooLong(what)
        self._lines_left -= end + 1
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line.removesuffix(b"\r")

    def _head(self) -> tuple[int, bytes, dict[bytes, list[bytes]]]:
        """Read a status line and its header lines: the status, the version, the headers."""
        if not self._buffer:
            self._fill()
        line = self._line("status line")
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or not (code.isdigit() and len(code) == 3)
            or rest[3:4] not in (b"", b" ")
        ):
            raise http.client.BadStatusLine(repr(line[:80]))
        headers: dict[bytes, list[bytes]] = {}
        while line := self._line("header lines"):
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                raise http.client.HTTPException(f"a malformed header line: {line[:80]!r}")
            headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
        return int(code), version, headers

    def _exactly(self, size: int) -> bytes:
        """The next ``size`` bytes."""
        if size > MAX_BODY:
            raise http.client.HTTPException(f"an answer of {size} bytes (at most {MAX_BODY})")
        while len(self._buffer) < size:
            if not self._fill():
                raise http.client.IncompleteRead(bytes(self._buffer), size - len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _chunked(self) -> bytes:
        """A body in the chunked transfer coding, its trailer lines read and dropped."""
        body = bytearray()
        while True:
            size_text = self._line("chunk size").partition(b";")[0].strip(b" \t")
            if _HEX.fullmatch(size_text) is None:
                raise http.client.HTTPException(f"a bad chunk size: {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                while self._line("trailer lines"):
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise http.client.HTTPException(f"an answer of over {MAX_BODY} bytes")
            body += self._exactly(size)
            if self._line("chunk end"):
                raise http.client.HTTPException("a chunk longer than its size")

    def _to_end(self) -> bytes:
        """Everything up to the end of the stream."""
        while len(self._buffer) <= MAX_BODY and self._fill():
            pass
        if len(self._buffer) > MAX_BODY:
            raise http.client.HTTPException(f"an answer of over {MAX_BODY} bytes")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _tokens(headers: dict[bytes, list[bytes]], name: bytes) -> list[bytes]:
    """The comma-separated values of every ``name`` header, lower-cased."""
    return [
        token.strip(b" \t").lower()
        for value in headers.get(name, [])
        for token in value.split(b",")
        if token.strip(b" \t")
    ]


def _content_length(values: list[bytes]) -> int:
    """The one length all ``Content-Length`` values give (RFC 9112 section 6.3, point 5)."""
    lengths = {part.strip(b" \t") for value in values for part in value.split(b",")}
    if len(lengths) != 1 or not all(_DIGITS.fullmatch(length) for length in lengths):
        raise http.client.HTTPException(f"a bad Content-Length: {b', '.join(values)[:40]!r}")
    return int(lengths.pop())
