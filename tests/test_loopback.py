"""The loopback signer's HTTP/1.1 connection, judged by ``http.client`` reading the same bytes.

A small server thread on loopback plays the answers (real cfssl never sends most of these
framings, so the server is a stand-in here; tests/test_issuer.py drives the real one). Each
answer is also handed to ``http.client.HTTPResponse``, the standard library's reading of HTTP:
status, body and whether the connection stays open must agree.
"""

from __future__ import annotations

import http.client
import io
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfwrap import loopback

#: In an answer's fragments: reset the connection there.
RESET = b"<reset>"
BODY = b'{"success":true,"result":{"certificate":"-----BEGIN CERTIFICATE-----\\n"}}'


class _Server:
    """Accepts connections on loopback; answers each request with the next of ``answers``.

    Each answer is a list of fragments, sent one write each; ``None`` after an answer closes
    the connection. What each request held is kept in ``requests``.
    """

    def __init__(self, answers: list[list[bytes] | None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        answers = iter(self.answers)
        self.listener.settimeout(0.05)  # a closed listener does not wake accept(): look again
        with self.listener:
            while not self.stopped:
                try:
                    sock, _ = self.listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                sock.settimeout(5)
                self.connections += 1
                with sock:
                    for answer in answers:
                        if answer is None:
                            break
                        request = _read_request(sock)
                        if request is None:
                            return
                        self.requests.append(request)
                        for fragment in answer:
                            if fragment is RESET:  # a reset (RST), not a close (FIN)
                                sock.setsockopt(
                                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                                )
                                break
                            sock.sendall(fragment)
                        else:
                            continue
                        break  # reset: this connection is over
                    else:  # no more answers: hold the connection open until the test ends
                        while not self.stopped:
                            time.sleep(0.01)
                        return

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        assert not self.thread.is_alive()


def _read_request(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return data


@pytest.fixture
def serve() -> Iterator[list[_Server | loopback.Connection]]:
    """What a test starts: its servers and connections, closed after it."""
    made: list[_Server | loopback.Connection] = []
    yield made
    for thing in reversed(made):
        thing.close()


def _start(
    serve: list[_Server | loopback.Connection], answers: list[list[bytes] | None]
) -> _Server:
    server = _Server(answers)
    serve.append(server)
    return server


def _connect(
    serve: list[_Server | loopback.Connection], server: _Server, *, timeout: float = 5
) -> loopback.Connection:
    connection = loopback.Connection(server.port, timeout=timeout)
    serve.append(connection)
    return connection


class _Bytes:
    """What http.client.HTTPResponse reads an answer from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.data))


def _stdlib(data: bytes) -> tuple[int, bytes, bool]:
    """How http.client reads ``data``: status, body, and whether the connection then closes."""
    response = http.client.HTTPResponse(_Bytes(data), method="POST")  # type: ignore[arg-type]
    response.begin()
    body = response.read()
    return response.status, body, response.will_close


@st.composite
def _answers(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A well-formed answer, and the fragments it is sent in."""
    status = draw(st.sampled_from([200, 201, 400, 404, 405, 500, 503]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    reason = draw(st.sampled_from([b" OK", b" Bad Request", b" ", b""]))
    body = draw(st.binary(max_size=3000))
    framing = draw(st.sampled_from(["length", "chunked", "end"]))
    close = draw(st.booleans())
    headers = [b"Content-Type: application/json", b"Date: Sun, 29 Nov 2026 09:00:00 GMT"]
    headers += draw(st.lists(st.sampled_from([b"X-Extra: a, b", b"Vary:  Origin  "]), max_size=2))
    if close:
        headers.append(
            draw(st.sampled_from([b"Connection: close", b"connection: Keep-Alive, CLOSE"]))
        )
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked" and version == b"HTTP/1.1":
        headers.append(
            draw(st.sampled_from([b"Transfer-Encoding: chunked", b"transfer-encoding: CHUNKED"]))
        )
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        payload = b"".join(
            b"%x%s\r\n%s\r\n" % (len(p), draw(st.sampled_from([b"", b";ext=1"])), p)
            for p in pieces
            if p
        )
        payload += b"0\r\n" + draw(st.sampled_from([b"", b"Trailer-One: x\r\n"])) + b"\r\n"
    else:
        framing, payload = "end", body
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    data = eol.join([version + b" %d" % status + reason, *headers]) + eol + eol + payload
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    fragments = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return data, [f for f in fragments if f]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(answer=_answers())
def test_every_answer_is_read_as_http_client_reads_it(serve, answer):
    data, fragments = answer
    status, body, closes = _stdlib(data)
    server = _start(serve, [fragments, None])
    connection = _connect(serve, server)
    connection.post("/api/v1/cfssl/authsign", b"{}")
    assert connection.answer() == (status, body)
    if data.startswith(b"HTTP/1.1"):  # kept open exactly when http.client keeps it open
        assert (connection.sock is None) == closes
    else:  # an HTTP/1.0 answer always ends it (http.client may keep it, for a Keep-Alive)
        assert connection.sock is None
    connection.close()


def test_a_request_is_one_well_formed_post(serve):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    server = _start(serve, [[answer], [answer]])
    connection = _connect(serve, server)
    for body in (b'{"token":"x"}', b"{}"):
        connection.post("/api/v1/cfssl/authsign", body)
        assert connection.answer() == (200, BODY)
    assert server.connections == 1  # kept alive
    assert server.requests == [
        b"POST /api/v1/cfssl/authsign HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (server.port, len(body), body)
        for body in (b'{"token":"x"}', b"{}")
    ]
    assert _stdlib(answer)[:2] == (200, BODY)


def test_bytes_past_the_answer_end_the_connection_and_the_next_answer_is_asked_anew(serve):
    """A server that sends what was not asked for is out of step: nothing of it is taken."""
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab"
    two = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2\r\ncd\r\n0\r\n\r\n"
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nzz"
    server = _start(serve, [[one + stray], None, [two]])
    connection = _connect(serve, server)
    connection.post("/a", b"1")
    assert connection.answer() == (200, b"ab")
    assert connection.sock is None  # closed: the stray answer is never read as the next one
    connection.post("/b", b"2")
    assert connection.answer() == (404, b"cd")
    assert server.connections == 2


def test_an_interim_answer_is_skipped(serve):
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    server = _start(serve, [[answer]])
    connection = _connect(serve, server)
    connection.post("/a", b"1")
    assert connection.answer() == (200, b"x") == _stdlib(answer)[:2]


def test_a_closed_connection_is_opened_anew_for_the_next_request(serve):
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    server = _start(serve, [[answer], None, [answer], None])
    connection = _connect(serve, server)
    for _ in range(2):
        connection.post("/a", b"1")
        assert connection.answer() == (200, b"x")
        assert connection.sock is None
    assert server.connections == 2


def test_a_kept_alive_connection_the_server_closed_reads_as_remote_disconnected(serve):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    server = _start(serve, [[answer], None])  # it answers, then closes while idle
    connection = _connect(serve, server)
    connection.post("/a", b"1")
    assert connection.answer() == (200, b"x")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        connection.post("/a", b"2")
        connection.answer()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"", http.client.RemoteDisconnected),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", http.client.IncompleteRead),
        (b"HTTP/1.1 200 OK\r\nContent-Len", http.client.IncompleteRead),
        (b"ICY 200 OK\r\n\r\n", http.client.BadStatusLine),
        (b"HTTP/2 200\r\n\r\n", http.client.BadStatusLine),
        (b"HTTP/1.1 20 OK\r\n\r\n", http.client.BadStatusLine),
        (b"HTTP/1.1 2000 OK\r\n\r\n", http.client.BadStatusLine),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
            http.client.HTTPException,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", http.client.HTTPException),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", http.client.HTTPException),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", http.client.HTTPException),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n", http.client.HTTPException),
        (b"HTTP/1.1 200 OK\r\nName : value\r\n\r\n", http.client.HTTPException),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", http.client.HTTPException),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", http.client.HTTPException),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n0\r\n\r\n",
            http.client.HTTPException,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab",
            http.client.IncompleteRead,
        ),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", http.client.LineTooLong),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 5000 + b"1\r\n\r\nx",
            http.client.HTTPException,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx", http.client.HTTPException),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            http.client.HTTPException,
        ),
        (
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            http.client.HTTPException,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\na\r\n0\r\n\r\n",
            http.client.HTTPException,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 5000 + b"1\r\n",
            http.client.HTTPException,
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", http.client.HTTPException),
        (
            b"HTTP/1.1 100 Continue\r\n\r\n" * 5 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            http.client.HTTPException,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"T: x\r\n" * 20000
            + b"\r\n",
            http.client.LineTooLong,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"1;" + b"e" * 1000 + b"\r\nx\r\n") * 100
            + b"0\r\n\r\n",
            http.client.LineTooLong,
        ),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000 + b"\r\n", http.client.LineTooLong),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_a_broken_answer_is_an_http_error_never_a_wrong_body(serve, answer, error):
    server = _start(serve, [[answer] if answer else [], None])
    connection = _connect(serve, server)
    connection.post("/a", b"1")
    with pytest.raises(error):
        connection.answer()
    connection.close()


def test_an_answer_past_the_body_limit_is_refused(serve, monkeypatch):
    monkeypatch.setattr(loopback, "MAX_BODY", 100)
    for answer in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n" + b"x" * 101,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"40\r\n" + b"x" * 64 + b"\r\n") * 2
        + b"0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 200,
    ):
        server = _start(serve, [[answer], None])
        connection = _connect(serve, server)
        connection.post("/a", b"1")
        with pytest.raises(http.client.HTTPException, match="100"):
            connection.answer()
        connection.close()


def test_an_answer_that_never_ends_times_out_whole_not_per_read(serve):
    """A server that sends a byte now and then gets the timeout for the whole answer."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        sock, _ = listener.accept()
        with sock:
            _read_request(sock)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(30):  # a byte every 0.1 s for 3 s (then silence), never all 1000
                if stop.wait(0.1):
                    return
                sock.sendall(b"x")
            stop.wait()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    connection = loopback.Connection(listener.getsockname()[1], timeout=0.5)
    try:
        connection.post("/a", b"1")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            connection.answer()
        assert time.monotonic() - started < 2
        assert connection.sock is None
    finally:
        stop.set()
        connection.close()
        thread.join(5)
        listener.close()


def test_an_answer_that_never_comes_times_out(serve):
    server = _start(serve, [[]])  # reads the request, never answers
    connection = _connect(serve, server, timeout=0.3)
    connection.post("/a", b"1")
    with pytest.raises(TimeoutError):
        connection.answer()
    connection.close()


def test_a_second_request_before_the_first_answer_is_a_mistake(serve):
    server = _start(serve, [[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]])
    connection = _connect(serve, server)
    connection.post("/a", b"1")
    with pytest.raises(RuntimeError):
        connection.post("/a", b"2")
    assert connection.answer() == (200, b"")
    connection.close()


@pytest.mark.parametrize(
    "answer",
    [
        [b"HTTP/1.1 200 OK\r\n", RESET],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", RESET],
        [b"HTTP/1.1 100 Continue\r\n\r\n", RESET],
        [b"HTTP/1.1 100 Continue\r\n\r\n"],  # then a close (FIN)
    ],
    ids=["status-then-reset", "half-body-then-reset", "continue-then-reset", "continue-then-close"],
)
def test_a_connection_cut_after_the_answer_began_is_not_a_closed_idle_one(serve, answer):
    """Once any byte of the answer came, cfssl has read the request: the signer must not take
    the cut for an idle connection the server closed, and send the request again."""
    server = _start(serve, [answer, None])
    connection = _connect(serve, server)
    connection.post("/a", b"1")
    with pytest.raises(http.client.HTTPException) as caught:
        connection.answer()
    assert not isinstance(caught.value, ConnectionError)
    assert connection.sock is None


def test_a_connection_reset_before_any_answer_reads_as_closed(serve):
    server = _start(serve, [[RESET]])
    connection = _connect(serve, server)
    connection.post("/a", b"1")
    with pytest.raises(ConnectionResetError):  # RemoteDisconnected is one too: retried once
        connection.answer()
    assert connection.sock is None
