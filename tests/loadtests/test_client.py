"""The lean keep-alive client of the latency measurements: whole answers, in order, over one socket."""

from __future__ import annotations

import socket
import threading

import pytest

from ctrserve.loadtests.stack import KeepAliveClient

pytestmark = pytest.mark.quick


def _server(answers: list[bytes]) -> tuple[int, threading.Thread]:
    """Answers each request (read up to its body's end) with the next canned bytes, in small pieces."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            buf = b""
            for answer in answers:
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(4096)
                head, _, rest = buf.partition(b"\r\n\r\n")
                n = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
                while len(rest) < n:
                    rest += conn.recv(4096)
                buf = rest[n:]
                for i in range(0, len(answer), 7):  # the answer arrives in pieces
                    conn.sendall(answer[i:i + 7])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_reads_each_answer_by_its_content_length() -> None:
    bodies = [b'{"scores":[0.5]}', b'{"error":"x"}']
    answers = [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
               % (len(bodies[0]), bodies[0]),
               b"HTTP/1.1 422 Unprocessable Entity\r\nContent-Length: %d\r\n\r\n%s" % (len(bodies[1]), bodies[1])]
    port, thread = _server(answers)
    client = KeepAliveClient(port, timeout=5)
    assert client.post("/v1/score", b'{"user_id":"u"}') == (200, bodies[0])
    assert client.post("/v1/score", b'{"user_id":"v"}') == (422, bodies[1])
    client.close()
    thread.join(5)


def test_an_answer_without_length_or_a_closed_socket_is_an_error() -> None:
    port, _ = _server([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"])
    client = KeepAliveClient(port, timeout=5)
    with pytest.raises(RuntimeError, match="without Content-Length"):
        client.post("/v1/score", b"{}")
    with pytest.raises(RuntimeError, match="closed"):  # the server hung up after its one answer
        client.post("/v1/score", b"{}")
