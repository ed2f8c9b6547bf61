"""A dependency-light ``ping`` over the MongoDB wire protocol (OP_MSG).

The supervisor uses it to wait for the embedded database without a driver client: a driver starts monitor
threads, and the supervisor forks the services afterwards.
"""
from __future__ import annotations

import socket
import struct

import bson

OP_MSG = 2013


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when the server at host:port answers ``{ping: 1}`` with ``ok: 1``."""
    body = struct.pack("<I", 0) + b"\x00" + bson.encode({"ping": 1, "$db": "admin"})
    message = struct.pack("<iiii", 16 + len(body), 1, 0, OP_MSG) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(message)
            length, _, _, opcode = struct.unpack("<iiii", _read(sock, 16))
            payload = _read(sock, length - 16)
    except OSError:
        return False
    if opcode != OP_MSG or len(payload) < 5 or payload[4] != 0:
        return False
    try:
        reply = bson.decode(payload[5:])
    except Exception:  # noqa: BLE001 - anything unparsable is "not ready"
        return False
    return reply.get("ok") == 1
