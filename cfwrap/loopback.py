"""A kept-alive HTTP/1.1 connection to the ``cfssl serve`` this process runs on loopback.

:class:`issuer.LocalSigner` sends a fleet's thousands of requests to its own server. Through
``http.client`` each one cost a second write (the head and the body go apart) and a pass of the
answer's headers through the ``email`` package: 7% of a 1,000-node apply's CPU
(``scripts/bench-apply``). This connection writes a request in one piece and reads its answer as
RFC 9112 frames it: a status line, header lines, then a body framed by ``Content-Length``, by the
chunked transfer coding, or by the end of the connection (Go's ``net/http`` uses the first two).
Only for that server: the central signer is spoken to through ``http.client`` over TLS.

Its failures are ``http.client``'s and ``OSError``'s, as the signer's callers expect: an
end of stream before an answer is :class:`http.client.RemoteDisconnected` (a kept-alive
connection the server had closed); anything else that is not HTTP/1.x is an
:class:`http.client.HTTPException`.
"""

from __future__ import annotations

import http.client
import socket

#: The most an answer's head or body may hold; cfssl's answers are a few KiB.
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_READ_SIZE = 64 * 1024
#: Answers that never have a body (RFC 9112 section 6.3).
_NO_BODY = {204, 304}


class Connection:
    """One connection to ``127.0.0.1:port``: a request, then its answer, then the next request.

    Connects at the first :meth:`post`; after an answer that ends the connection (``Connection:
    close``, an HTTP/1.0 answer, or a body that runs to the end of the stream) it is closed, and
    the next :meth:`post` connects anew.
    """

    def __init__(self, port: int, *, timeout: float) -> None:
        """A connection to the loopback server at ``port``; each read or write waits ``timeout``."""
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buffer = bytearray()
        self._waiting = False

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
        self.sock.sendall(head.encode("ascii") + body)
        self._waiting = True

    def answer(self) -> tuple[int, bytes]:
        """The status and body of the answer to the request just sent.

        Raises:
            http.client.RemoteDisconnected: the stream ended before the answer began.
            http.client.HTTPException: an answer that is not well-formed HTTP/1.x, or too large.
            OSError: a read failed or timed out.
        """
        if not self._waiting or self.sock is None:
            raise RuntimeError("no request on this connection is waiting for its answer")
        status, version, headers = self._head()
        while 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            status, version, headers = self._head()
        keep = version == b"HTTP/1.1" and b"close" not in _tokens(headers, b"connection")
        if status in _NO_BODY:
            body = b""
        elif b"transfer-encoding" in headers:
            codings = _tokens(headers, b"transfer-encoding")
            if codings[-1:] == [b"chunked"]:
                body = self._chunked()
            else:  # framed by the end of the connection (RFC 9112 section 6.3, point 4)
                body, keep = self._to_end(), False
        elif b"content-length" in headers:
            body = self._exactly(_content_length(headers[b"content-length"]))
        else:
            body, keep = self._to_end(), False
        self._waiting = False
        if not keep:
            self.close()
        return status, body

    def close(self) -> None:
        """Close the connection (the next :meth:`post` opens a new one)."""
        sock, self.sock = self.sock, None
        self._waiting = False
        self._buffer.clear()
        if sock is not None:
            sock.close()

    def _fill(self, *, first: bool = False) -> bool:
        """Read what the server sent next into the buffer; False at the end of the stream."""
        assert self.sock is not None  # noqa: S101 (answer() checked)
        data = self.sock.recv(_READ_SIZE)
        if not data and first:
            self.close()
            raise http.client.RemoteDisconnected("the server closed the connection")
        self._buffer += data
        return bool(data)

    def _line(self, limit: int, what: str) -> bytes:
        """The next line (without its CRLF or LF), read whole."""
        start = 0
        while (end := self._buffer.find(b"\n", start)) < 0:
            start = len(self._buffer)
            if start > limit:
                raise http.client.LineTooLong(what)
            if not self._fill():
                raise http.client.IncompleteRead(bytes(self._buffer))
        if end > limit:
            raise http.client.LineTooLong(what)
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line.removesuffix(b"\r")

    def _head(self) -> tuple[int, bytes, dict[bytes, list[bytes]]]:
        """Read a status line and its header lines: the status, the version, the headers."""
        if not self._buffer:
            self._fill(first=True)
        line = self._line(MAX_HEAD, "status line")
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or not (code.isdigit() and len(code) == 3)
            or rest[3:4] not in (b"", b" ")
        ):
            raise http.client.BadStatusLine(repr(line[:80]))
        headers: dict[bytes, list[bytes]] = {}
        size = len(line)
        while line := self._line(MAX_HEAD, "header line"):
            size += len(line)
            if size > MAX_HEAD:
                raise http.client.LineTooLong("header lines")
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
            size_text = self._line(MAX_HEAD, "chunk size").partition(b";")[0].strip(b" \t")
            try:
                size = int(size_text, 16)
            except ValueError:
                raise http.client.HTTPException(f"a bad chunk size: {size_text[:20]!r}") from None
            if size_text[:1] in (b"-", b"+") or b"_" in size_text:  # int() takes these
                raise http.client.HTTPException(f"a bad chunk size: {size_text[:20]!r}")
            if size == 0:
                while self._line(MAX_HEAD, "trailer line"):
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise http.client.HTTPException(f"an answer of over {MAX_BODY} bytes")
            body += self._exactly(size)
            if self._line(2, "chunk end"):
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
    if len(lengths) != 1 or not all(length.isdigit() for length in lengths):
        raise http.client.HTTPException(f"a bad Content-Length: {b', '.join(values)[:40]!r}")
    return int(lengths.pop())
