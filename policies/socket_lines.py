"""One newline-ended message read off a local socket, bounded: the admin channel and the
researcher's agent both speak one JSON line per message, and both must refuse a peer that sends
more than they will hold."""

from __future__ import annotations

import socket


def read_line(sock: socket.socket, limit: int, error: type[Exception]) -> bytes:
    """Bytes up to the first newline (or the end); ``error`` (the caller's own exception type,
    so each wing keeps its one error tree) when more than ``limit`` bytes come first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
        if size > limit:
            raise error(f"message larger than {limit} bytes")
    return b"".join(chunks).split(b"\n", 1)[0]
