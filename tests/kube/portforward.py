"""The server side of `pods/{name}/portforward`, as kube-apiserver and
kubelet answer the real kubectl, for tests/kube/emulator.py.

Wire facts this follows (Kubernetes client-go tools/portforward and
apimachinery httpstream; the SPDY/3 draft, section 2 framing and 2.6.10.1
the header-compression dictionary; moby/spdystream, which both ends of a
real cluster run):

- Two ways in. kubectl (1.31 and later, KEP-4006 PortForwardWebsockets on by
  default) first sends a GET WebSocket upgrade asking for the subprotocol
  "SPDY/3.1+portforward.k8s.io" and then speaks SPDY/3.1 inside binary
  WebSocket messages: the messages are a byte pipe, SPDY frames may span or
  share them. If that handshake fails (any answer but 101, or no subprotocol
  chosen) it falls back to a POST with `Upgrade: SPDY/3.1` and
  `X-Stream-Protocol-Version: portforward.k8s.io`, and SPDY runs on the bare
  connection after the 101.
- Per forwarded connection the client opens two streams with headers
  streamtype (error|data), port and requestid; it waits for each SYN_REPLY
  before the next, so a reply never waits for the pair. The client closes its
  half of the error stream at once (it only reads it); data flows on the data
  stream both ways; a FIN is a half-close. What goes wrong is written as text
  on the error stream, which then ends; a non-empty message makes kubectl
  print it and drop the whole connection ("lost connection to pod").
- After the remote side of the data stream ends the client resets it
  (RST_STREAM CANCEL) and reads the error stream to its end, so that stream
  must end when the forward does.
- spdystream implements no flow control: it never sends WINDOW_UPDATE and
  ignores those it gets. A server that held its sends to the 64 KiB initial
  window would stall every transfer after 64 KiB, so this one does not (as
  kubelet's spdystream does not); it does send per-stream WINDOW_UPDATEs for
  what it consumed, as SPDY/3 asks of a receiver, which spdystream reads and
  ignores. Never one for stream 0 (SPDY/3.1's session window): spdystream's
  SPDY/3 framer refuses stream id 0 on WINDOW_UPDATE and would drop the
  connection. Backpressure is TCP's: the frame loop waits while a stream's
  queue toward its target is full.
- PING with an odd id comes from the client (every 10 s over WebSocket) and
  is echoed; GOAWAY means no new streams; the connection ending ends every
  forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import WSMsgType, web

# Subprotocol names (apimachinery pkg/util/portforward and httpstream).
PORT_FORWARD_PROTOCOL = "portforward.k8s.io"
WEBSOCKET_TUNNEL_PREFIX = "SPDY/3.1+"
WEBSOCKET_PROTOCOL = WEBSOCKET_TUNNEL_PREFIX + PORT_FORWARD_PROTOCOL
SPDY_UPGRADE = "SPDY/3.1"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Where a forwarded port goes: "host:port", or a coroutine function that
# connects (e.g. inside a Pod's network namespace, tests/netns.py).
Target = str | Callable[[], Awaitable[Connection]]

# --------------------------------------------------------------------------- SPDY/3 framing

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS = 1, 2, 3, 4
PING, GOAWAY, HEADERS, WINDOW_UPDATE = 6, 7, 8, 9
FLAG_FIN = 0x01
# RST_STREAM status codes (SPDY/3 2.6.3).
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL = 1, 2, 3, 5
# GOAWAY status codes (2.6.6).
GOAWAY_OK = 0
INITIAL_WINDOW = 64 * 1024
# What one DATA frame carries at most from here (Go's io.Copy writes 32 KiB).
MAX_DATA = 32 * 1024
# Chunks a stream may queue toward its target before the frame loop waits.
QUEUED = 64


# The dictionary's length-prefixed words, in order (see _dictionary).
_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding "
    "accept-language accept-ranges age allow authorization cache-control connection "
    "content-base content-encoding content-language content-length content-location "
    "content-md5 content-range content-type date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified location "
    "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after "
    "server te trailer transfer-encoding upgrade user-agent vary via warning "
    "www-authenticate method get status"
)


def _dictionary() -> bytes:
    """The SPDY/3 header-compression dictionary (draft 3, 2.6.10.1): words
    each preceded by its 32-bit length, then a run of bare text. zlib checks
    its Adler-32 against the peer's, so a wrong byte fails the first header
    block rather than anything subtle."""
    words = _WORDS.split()
    words += ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive"]
    words += ["origin"]
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8"
        "charset=iso-8859-1,utf-,*,enq=0."
    )
    out = b"".join(struct.pack(">I", len(w)) + w.encode() for w in words)
    return out + tail.encode()


DICTIONARY = _dictionary()


class ProtocolError(Exception):
    """The peer broke SPDY framing: the session ends (GOAWAY PROTOCOL_ERROR)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One parsed frame. Data frames have kind 0 and `data`; control frames
    their type, `stream_id` where they name one, and what they carry."""

    kind: int
    flags: int
    stream_id: int = 0
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    value: int = 0  # RST status, PING id, GOAWAY status, WINDOW_UPDATE delta

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


class Framer:
    """SPDY/3 frames to and from bytes for one connection. Header blocks are
    one zlib stream per direction for the whole connection (each block ends
    with a sync flush), so frames must be encoded in the order they are sent
    and decoded in the order they arrive."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zdict=DICTIONARY)

    def parse(self, buffer: bytearray) -> list[Frame]:
        """Every whole frame at the front of `buffer`, removed from it."""
        frames = []
        while len(buffer) >= 8:
            first, flags_length = struct.unpack_from(">II", buffer)
            flags, length = flags_length >> 24, flags_length & 0xFFFFFF
            if len(buffer) < 8 + length:
                break
            payload = bytes(buffer[8 : 8 + length])
            del buffer[: 8 + length]
            if not first & 0x80000000:
                frames.append(Frame(0, flags, first & 0x7FFFFFFF, data=payload))
                continue
            version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
            if version != VERSION:
                raise ProtocolError(f"SPDY version {version}")
            frames.append(self._control(kind, flags, payload))
        return frames

    def _control(self, kind: int, flags: int, payload: bytes) -> Frame:
        def word(at: int) -> int:
            if len(payload) < at + 4:
                raise ProtocolError(f"control frame {kind} too short")
            value: int = struct.unpack_from(">I", payload, at)[0]
            return value

        if kind == SYN_STREAM:
            # stream id, associated-to id, priority (3 bits) + unused, slot, headers
            return Frame(kind, flags, word(0) & 0x7FFFFFFF, headers=self._headers(payload[10:]))
        if kind in (SYN_REPLY, HEADERS):
            return Frame(kind, flags, word(0) & 0x7FFFFFFF, headers=self._headers(payload[4:]))
        if kind in (RST_STREAM, WINDOW_UPDATE):
            return Frame(kind, flags, word(0) & 0x7FFFFFFF, value=word(4) & 0x7FFFFFFF)
        if kind == PING:
            return Frame(kind, flags, value=word(0))
        if kind == GOAWAY:
            return Frame(kind, flags, word(0) & 0x7FFFFFFF, value=word(4))
        # SETTINGS (what a client tells the server; nothing here depends on
        # it) and types this version does not know, which a receiver ignores.
        return Frame(kind, flags)

    def _headers(self, block: bytes) -> dict[str, str]:
        """A name/value block (2.6.10): count, then length-prefixed names and
        values; several values of one name are joined by NUL."""
        try:
            raw = self._inflate.decompress(block)
        except zlib.error as err:
            raise ProtocolError(f"header block: {err}") from err
        (count,), at, out = struct.unpack_from(">I", raw), 4, {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", raw, at)
            name = raw[at + 4 : at + 4 + n].decode()
            at += 4 + n
            (n,) = struct.unpack_from(">I", raw, at)
            out[name] = raw[at + 4 : at + 4 + n].decode()
            at += 4 + n
        return out

    def _block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack(">I", len(headers))
        for name, value in headers.items():
            # Names are lower case on the wire (2.6.10).
            for part in (name.lower().encode(), value.encode()):
                raw += struct.pack(">I", len(part)) + part
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    @staticmethod
    def _control_frame(kind: int, flags: int, payload: bytes) -> bytes:
        head = struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload))
        return head + payload

    def syn_reply(self, stream_id: int, headers: dict[str, str], fin: bool = False) -> bytes:
        payload = struct.pack(">I", stream_id) + self._block(headers)
        return self._control_frame(SYN_REPLY, FLAG_FIN if fin else 0, payload)

    def rst_stream(self, stream_id: int, status: int) -> bytes:
        return self._control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, status))

    def ping(self, ping_id: int) -> bytes:
        return self._control_frame(PING, 0, struct.pack(">I", ping_id))

    def goaway(self, last_stream_id: int, status: int) -> bytes:
        return self._control_frame(GOAWAY, 0, struct.pack(">II", last_stream_id, status))

    def window_update(self, stream_id: int, delta: int) -> bytes:
        return self._control_frame(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))

    @staticmethod
    def data(stream_id: int, data: bytes, fin: bool = False) -> bytes:
        flags = FLAG_FIN if fin else 0
        return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


# --------------------------------------------------------------------------- byte pipes


class Pipe(Protocol):
    """The byte stream SPDY runs on: a bare upgraded connection, or binary
    WebSocket messages. read() returns b"" at the end."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class WebSocketPipe:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    async def read(self) -> bytes:
        message = await self._ws.receive()
        if message.type == WSMsgType.BINARY:
            data: bytes = message.data
            return data or await self.read()
        # Text is not part of the tunnelling protocol; a close or an error ends it.
        return b""

    async def write(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def close(self) -> None:
        await self._ws.close()


class _UpgradedReader:
    """What aiohttp's request handler feeds a connection's bytes to once it is
    upgraded (the parser slot a WebSocketResponse also uses)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class UpgradedPipe:
    """The connection itself after `101 Switching Protocols` to SPDY/3.1."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        transport = request.transport
        assert transport is not None
        self._transport = transport
        self._response = response
        # The StreamReader pauses the socket while 256 KiB wait unread.
        self._reader = asyncio.StreamReader(limit=128 * 1024)
        self._reader.set_transport(transport)
        request.protocol.set_parser(_UpgradedReader(self._reader))  # type: ignore[arg-type]
        request.protocol.keep_alive(False)

    async def read(self) -> bytes:
        return await self._reader.read(64 * 1024)

    async def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            raise ConnectionResetError("connection closed")
        self._transport.write(data)
        writer = self._response._payload_writer
        if writer is not None:
            await writer.drain()

    async def close(self) -> None:
        self._transport.close()


# --------------------------------------------------------------------------- the session


@dataclass
class _Stream:
    id: int
    kind: str  # "data" or "error"
    port: int
    request_id: str
    # Bytes from the client toward the target; None: the client's FIN (or
    # a reset). Unbounded, so a reset's None always fits; the frame loop
    # waits on `drained` while more than QUEUED chunks wait.
    inbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    target: asyncio.StreamWriter | None = None
    remote_done: bool = False  # FIN or RST received
    local_done: bool = False  # FIN or RST sent
    reset: bool = False
    unacked: int = 0  # consumed bytes not yet given back by WINDOW_UPDATE
    discard: bool = False  # nobody will read the inbox


Dial = Callable[[int], Awaitable[Connection]]
Explain = Callable[[int, BaseException], str]


class Session:
    """One port-forward connection: streams paired by requestID, one forward
    per pair to where `dial(port)` connects; `explain(port, error)` words a
    failure as the runtime would, for the error stream."""

    def __init__(self, pipe: Pipe, dial: Dial, explain: Explain) -> None:
        self._pipe = pipe
        self._dial = dial
        self._explain = explain
        self._framer = Framer()
        self._lock = asyncio.Lock()  # one writer at a time: frames and zlib state in order
        self._streams: dict[int, _Stream] = {}
        self._pairs: dict[str, dict[str, _Stream]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_stream = 0
        self._going_away = False
        self._broken = False
        self.forwards = 0  # pairs served, for tests

    async def serve(self) -> None:
        buffer = bytearray()
        try:
            while True:
                chunk = await self._pipe.read()
                if not chunk:
                    break
                buffer += chunk
                for frame in self._framer.parse(buffer):
                    await self._on_frame(frame)
        except ProtocolError:
            with contextlib.suppress(ConnectionError):
                await self._send(self._framer.goaway(self._last_stream, PROTOCOL_ERROR))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._broken = True
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._pipe.close()

    async def _send(self, frame: bytes | Callable[[], bytes]) -> None:
        """Write one frame; a callable builds it under the lock (header
        blocks must be compressed in the order they are sent)."""
        if self._broken:
            raise ConnectionResetError("port-forward connection closed")
        async with self._lock:
            await self._pipe.write(frame() if callable(frame) else frame)

    async def _on_frame(self, frame: Frame) -> None:
        if frame.kind == 0:
            await self._on_data(frame)
        elif frame.kind == SYN_STREAM:
            await self._on_syn_stream(frame)
        elif frame.kind == RST_STREAM:
            self._on_reset(frame.stream_id)
        elif frame.kind == PING:
            # Odd ids are the client's to start; the server answers with the same id.
            if frame.value % 2 == 1:
                await self._send(self._framer.ping(frame.value))
        elif frame.kind == GOAWAY:
            self._going_away = True
        # SETTINGS, WINDOW_UPDATE (no flow control in spdystream, see the
        # module docstring), HEADERS on a stream, unknown types: nothing to do.

    async def _on_syn_stream(self, frame: Frame) -> None:
        sid = frame.stream_id
        # Client streams are odd and increase (2.3.2).
        if sid % 2 == 0 or sid <= self._last_stream or self._going_away:
            await self._send(self._framer.rst_stream(sid, PROTOCOL_ERROR))
            return
        self._last_stream = sid
        headers = frame.headers
        kind, request_id = headers.get("streamtype", ""), headers.get("requestid", "")
        try:
            port = int(headers.get("port", ""))
        except ValueError:
            port = 0
        if kind not in ("data", "error") or not 0 < port < 65536 or not request_id:
            await self._send(self._framer.rst_stream(sid, PROTOCOL_ERROR))
            return
        stream = _Stream(sid, kind, port, request_id, remote_done=frame.fin)
        self._streams[sid] = stream
        # Replied to at once: the client waits for it before its next stream.
        await self._send(lambda: self._framer.syn_reply(sid, {}))
        pair = self._pairs.setdefault(request_id, {})
        if kind in pair:
            await self._send(self._framer.rst_stream(sid, PROTOCOL_ERROR))
            return
        pair[kind] = stream
        if len(pair) == 2:
            del self._pairs[request_id]
            self.forwards += 1
            task = asyncio.create_task(self._forward(pair["data"], pair["error"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _on_data(self, frame: Frame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.remote_done:
            # After a reset both sides may still have frames in flight.
            return
        if frame.data and not stream.discard:
            stream.inbox.put_nowait(frame.data)
        if frame.fin:
            stream.remote_done = True
            stream.inbox.put_nowait(None)
        # Backpressure: while this stream's target lags, read no more frames
        # (TCP then slows the client), as spdystream's blocking reads do.
        while stream.inbox.qsize() > QUEUED and not stream.discard:
            stream.drained.clear()
            await stream.drained.wait()

    def _on_reset(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        stream.reset = stream.remote_done = stream.local_done = True
        self._discard(stream)
        # Wake whoever reads the inbox, and whoever waits on the target.
        stream.inbox.put_nowait(None)
        if stream.target is not None:
            stream.target.transport.abort()

    @staticmethod
    def _discard(stream: _Stream) -> None:
        """Nobody reads what the client sends on `stream` any more."""
        stream.discard = True
        while not stream.inbox.empty():
            stream.inbox.get_nowait()
        stream.drained.set()

    async def _finish(self, stream: _Stream, message: bytes = b"") -> None:
        """Send what is left and FIN, once."""
        if stream.local_done:
            return
        stream.local_done = True
        with contextlib.suppress(ConnectionError):
            if message:
                await self._send(self._framer.data(stream.id, message))
            await self._send(self._framer.data(stream.id, b"", fin=True))
        if stream.remote_done:
            self._streams.pop(stream.id, None)

    async def _forward(self, data: _Stream, error: _Stream) -> None:
        # The client sends nothing on the error stream but its FIN.
        self._discard(error)
        try:
            reader, writer = await self._dial(data.port)
        except Exception as err:
            self._discard(data)
            await self._finish(error, self._explain(data.port, err).encode())
            await self._finish(data)
            return
        data.target = writer
        if data.reset:
            writer.transport.abort()
        upstream = asyncio.create_task(self._to_target(data, writer))
        try:
            await self._from_target(data, reader)
            # As the runtime's forward returns once the target's side ends:
            # the data stream ends, then the error stream, empty.
            await self._finish(data)
            await self._finish(error)
            if not data.remote_done:
                # The client answers the data stream's end with a reset or a
                # FIN; until then the target still takes what it sends.
                await upstream
        finally:
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upstream
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._discard(data)
            await self._finish(error)

    async def _from_target(self, stream: _Stream, reader: asyncio.StreamReader) -> None:
        while not stream.reset:
            try:
                chunk = await reader.read(MAX_DATA)
            except ConnectionError:
                chunk = b""
            if not chunk or stream.reset:
                return
            try:
                await self._send(self._framer.data(stream.id, chunk))
            except ConnectionError:
                return

    async def _to_target(self, stream: _Stream, writer: asyncio.StreamWriter) -> None:
        while True:
            chunk = await stream.inbox.get()
            if stream.inbox.qsize() <= QUEUED // 2:
                stream.drained.set()
            if chunk is None or stream.reset:
                if not stream.reset and writer.can_write_eof():
                    # The client's half-close, passed on.
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                self._discard(stream)
                return
            stream.unacked += len(chunk)
            if stream.unacked >= INITIAL_WINDOW // 2 and not stream.remote_done:
                delta, stream.unacked = stream.unacked, 0
                with contextlib.suppress(ConnectionError):
                    await self._send(self._framer.window_update(stream.id, delta))


# --------------------------------------------------------------------------- HTTP


def upgrade_kind(request: web.Request) -> str | None:
    """Which of kubectl's upgrades `request` is: "websocket", "spdy" or None."""
    upgrade = request.headers.get("Upgrade", "").strip().lower()
    if upgrade == "websocket" and request.method == "GET":
        offered = request.headers.getall("Sec-WebSocket-Protocol", [])
        names = {p.strip() for value in offered for p in value.split(",")}
        return "websocket" if WEBSOCKET_PROTOCOL in names else None
    if upgrade == SPDY_UPGRADE.lower() and request.method in ("GET", "POST"):
        versions = request.headers.getall("X-Stream-Protocol-Version", [])
        names = {p.strip() for value in versions for p in value.split(",")}
        return "spdy" if PORT_FORWARD_PROTOCOL in names else None
    return None


async def serve(
    request: web.Request, dial: Dial, explain: Explain
) -> tuple[web.StreamResponse, Session]:
    """Upgrade `request` (after `upgrade_kind` said which) and run the
    session until the connection ends."""
    pipe: Pipe
    if upgrade_kind(request) == "websocket":
        # No compression, no message-size limit: SPDY frames pass as they are.
        ws = web.WebSocketResponse(
            protocols=(WEBSOCKET_PROTOCOL,), compress=False, max_msg_size=0, autoping=True
        )
        await ws.prepare(request)
        response: web.StreamResponse = ws
        pipe = WebSocketPipe(ws)
    else:
        response = web.StreamResponse(
            status=101,
            headers={
                "Connection": "Upgrade",
                "Upgrade": SPDY_UPGRADE,
                "X-Stream-Protocol-Version": PORT_FORWARD_PROTOCOL,
            },
        )
        response.force_close()
        writer = await response.prepare(request)
        assert writer is not None
        await writer.drain()
        pipe = UpgradedPipe(request, response)
    session = Session(pipe, dial, explain)
    await session.serve()
    return response, session


async def dial(target: Target) -> Connection:
    """Connect to a `Target`."""
    if callable(target):
        return await target()
    host, _, port = target.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port))
