"""A tiny authoritative DNS server for tests: what CoreDNS answers a Pod
about Services, and nothing else. UDP, A records, NXDOMAIN for names it
does not hold (and an empty answer for other types of a name it holds, so
a resolver asking A and AAAA at once gets the A). Standard library only.

The table (name -> IPv4) may change while it runs (`set`, `remove`).
Messages: RFC 1035 section 4 (header, question, resource records).
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import struct
import threading
from collections.abc import Mapping

TYPE_A = 1
TYPE_ANY = 255
CLASS_IN = 1
NOERROR = 0
FORMERR = 1
NXDOMAIN = 3
NOTIMP = 4
# RFC 1035 4.1.1: QR bit, opcode, AA bit, RD bit.
_QR = 0x8000
_AA = 0x0400
_OPCODE = 0x7800
_RD = 0x0100
# RFC 1035 4.1.4: a pointer to the question's name, which follows the header.
_QUESTION_NAME = 0xC00C
_HEADER = struct.Struct("!6H")


def service_name(service: str, namespace: str, domain: str = "cluster.local") -> str:
    """A Service's name in the cluster's DNS."""
    return f"{service}.{namespace}.svc.{domain}"


def _normal(name: str) -> str:
    return name.lower().rstrip(".")


def _question(message: bytes) -> tuple[str, int, int, int] | None:
    """The first question's (name, type, class) and where it ends, or None
    when the message holds no well-formed question."""
    labels: list[str] = []
    at = _HEADER.size
    while True:
        if at >= len(message):
            return None
        length = message[at]
        at += 1
        if length == 0:
            break
        # Compression in a question is legal but no resolver sends it.
        if length > 63 or at + length > len(message):
            return None
        try:
            labels.append(message[at : at + length].decode("ascii"))
        except UnicodeDecodeError:
            return None
        at += length
    if at + 4 > len(message):
        return None
    qtype, qclass = struct.unpack_from("!HH", message, at)
    return ".".join(labels), qtype, qclass, at + 4


def answer(query: bytes, records: Mapping[str, str], ttl: int = 5) -> bytes | None:
    """The response to `query` from `records` (names without the final dot,
    any case), or None when it is not a query worth a response."""
    if len(query) < _HEADER.size:
        return None
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(query)
    if flags & _QR:
        return None  # a response, not a query: never answer one (no loops)
    question = _question(query) if qdcount == 1 else None
    if question is None:
        return _HEADER.pack(ident, _QR | (flags & (_OPCODE | _RD)) | FORMERR, 0, 0, 0, 0)
    name, qtype, qclass, end = question
    head = _QR | _AA | (flags & (_OPCODE | _RD))
    asked = query[_HEADER.size : end]
    if flags & _OPCODE:
        return _HEADER.pack(ident, head | NOTIMP, 1, 0, 0, 0) + asked
    address = {_normal(k): v for k, v in records.items()}.get(_normal(name))
    if address is None or qclass != CLASS_IN:
        return _HEADER.pack(ident, head | NXDOMAIN, 1, 0, 0, 0) + asked
    if qtype not in (TYPE_A, TYPE_ANY):
        return _HEADER.pack(ident, head | NOERROR, 1, 0, 0, 0) + asked
    record = struct.pack("!HHHIH", _QUESTION_NAME, TYPE_A, CLASS_IN, ttl, 4)
    record += ipaddress.IPv4Address(address).packed
    return _HEADER.pack(ident, head | NOERROR, 1, 1, 0, 0) + asked + record


class Server:
    """Answers on a bound UDP socket (made wherever it must listen, e.g. in
    a node's network namespace) from a thread of its own. A context
    manager: serving between enter and exit; the socket is closed on exit."""

    def __init__(self, sock: socket.socket, records: Mapping[str, str] | None = None) -> None:
        self.sock = sock
        self._records = {_normal(k): v for k, v in (records or {}).items()}
        self._lock = threading.Lock()
        # Names asked, in order, for tests that check what a resolver sent.
        self.asked: list[str] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def records(self) -> dict[str, str]:
        with self._lock:
            return dict(self._records)

    def set(self, name: str, address: str) -> None:
        ipaddress.IPv4Address(address)
        with self._lock:
            self._records[_normal(name)] = address

    def remove(self, name: str) -> None:
        with self._lock:
            self._records.pop(_normal(name), None)

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=10)
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            with contextlib.suppress(OSError):
                query, peer = self.sock.recvfrom(4096)
                question = _question(query)
                with self._lock:
                    if question is not None:
                        self.asked.append(question[0])
                    records = dict(self._records)
                reply = answer(query, records)
                if reply is not None:
                    self.sock.sendto(reply, peer)
