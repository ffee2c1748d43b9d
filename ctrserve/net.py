"""Small networking helpers shared by the local process launcher (``ctrserve.launch``), the demo
and the benchmarks: stdlib only, loopback by default."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def connect_host(bind_host: str) -> str:
    """The address to reach a server bound to ``bind_host`` from this machine (a wildcard bind is
    reached on loopback)."""
    return LOOPBACK if bind_host in ("", "0.0.0.0", "::") else bind_host


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are answers too. Raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # local servers only
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def redis_ping(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING on ``host:port`` (raw RESP: no client library needed)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")
