"""The embedded trace collector: Zipkin v2 spans from the sidecars, kept in a
bounded store and stitched into traces by trace id.

Sidecars report over HTTPS with their xDS client certificate (the only
callers the port accepts): `POST /api/v2/spans` with a JSON list of spans,
as Zipkin takes them. Readers see them on the admin API, `/debug/traces`
and `/debug/traces/<traceId>`; nothing here changes the mesh.

The store holds at most `max_spans` spans and `max_bytes` bytes of them
(each span counted as its JSON), whichever is reached first; to make room,
whole traces go, oldest first (by when their first span arrived), so a
trace is never shown with half its spans.

Spans also tell each proxy's clock: a span's end is stamped by the proxy's
clock and its arrival by the control plane's, so their difference is the
proxy's offset minus the time the span waited to be sent (Envoy flushes
every few seconds). `clock_offsets` gives, per proxy (the `node_id` tag
Envoy puts on every span), the difference of its latest report's freshest
span: at most that wait off, and never off by more.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

SPANS_PATH = "/api/v2/spans"
DEFAULT_MAX_SPANS = 20_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# One report: Envoy flushes every 5 s or 5 spans (its defaults), far below.
MAX_REPORT = 4 * 1024 * 1024
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000

_HEX = re.compile(r"^[0-9a-f]{16}([0-9a-f]{16})?\Z")

# The tag Envoy's tracer puts on every span: the reporting proxy's node id.
NODE_ID_TAG = "node_id"
# Proxies whose clock is remembered; beyond, the least recently heard goes.
MAX_CLOCKS = 10_000
# A clock reading older than this says nothing about the proxy's clock now.
CLOCK_MEMORY_S = 600.0


@dataclass(frozen=True, slots=True)
class _Clock:
    offset_s: float  # the proxy's clock minus the control plane's, less the span's wait
    read_at: float  # the control plane's time.time() when the report arrived


@dataclass
class _Trace:
    # Spans by (span id, kind): a client and a server half may share an id.
    spans: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    size: int = 0


def _clean(span: Any) -> dict[str, Any] | None:
    """A span as stored, or None if it is not a Zipkin v2 span. Only the
    fields a reader needs are kept, with the types Zipkin gives them."""
    if not isinstance(span, dict):
        return None
    trace_id, span_id = span.get("traceId"), span.get("id")
    if not (isinstance(trace_id, str) and isinstance(span_id, str)):
        return None
    trace_id, span_id = trace_id.lower(), span_id.lower()
    # Zipkin pads 64-bit trace ids to 128 bits when it reads them back.
    trace_id = trace_id.rjust(32, "0") if len(trace_id) == 16 else trace_id
    if not (_HEX.match(trace_id) and _HEX.match(span_id) and len(span_id) == 16):
        return None
    parent = span.get("parentId")
    if parent is not None and not (isinstance(parent, str) and _HEX.match(parent.lower())):
        return None
    out: dict[str, Any] = {"traceId": trace_id, "id": span_id}
    if parent is not None:
        out["parentId"] = parent.lower()
    for key in ("name", "kind"):
        value = span.get(key)
        if isinstance(value, str):
            out[key] = value[:256]
    for key in ("timestamp", "duration"):
        value = span.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out[key] = value
    for key in ("localEndpoint", "remoteEndpoint"):
        value = span.get(key)
        if isinstance(value, dict):
            out[key] = {
                k: v
                for k, v in value.items()
                if k in ("serviceName", "ipv4", "ipv6", "port") and isinstance(v, str | int)
            }
    tags = span.get("tags")
    if isinstance(tags, dict):
        out["tags"] = {
            str(k)[:256]: str(v)[:1024] for k, v in tags.items() if isinstance(v, str | int)
        }
    return out


def _read_clock(span: Mapping[str, Any], arrived: float, freshest: dict[str, float]) -> None:
    """Keep, per reporting proxy, the span of this report that ended last by
    its clock: the one that waited least, so its difference says most."""
    node = (span.get("tags") or {}).get(NODE_ID_TAG)
    if not node or "timestamp" not in span:
        return
    ended = (span["timestamp"] + span.get("duration", 0)) / 1e6
    offset = ended - arrived
    if offset > freshest.get(node, float("-inf")):
        freshest[node] = offset


def service_of(span: Mapping[str, Any]) -> str:
    endpoint = span.get("localEndpoint") or {}
    name = endpoint.get("serviceName", "")
    return name if isinstance(name, str) else ""


class SpanStore:
    """Spans by trace, bounded by span count and bytes (oldest traces go)."""

    def __init__(
        self, max_spans: int = DEFAULT_MAX_SPANS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.max_spans = max_spans
        self.max_bytes = max_bytes
        self._traces: collections.OrderedDict[str, _Trace] = collections.OrderedDict()
        self.spans = 0
        self.bytes = 0
        self.evicted_traces = 0
        self.rejected_spans = 0
        self._clocks: collections.OrderedDict[str, _Clock] = collections.OrderedDict()

    def add(self, spans: Any, *, arrived_at: float | None = None) -> int:
        """Store a report (a list of spans) that arrived at `arrived_at`
        (time.time(), now by default); returns how many were kept.
        Malformed spans are counted and skipped, not fatal to the rest."""
        if not isinstance(spans, list):
            raise ValueError("a report is a JSON list of spans")
        arrived = time.time() if arrived_at is None else arrived_at
        freshest: dict[str, float] = {}
        kept = 0
        for raw in spans:
            span = _clean(raw)
            if span is None:
                self.rejected_spans += 1
                continue
            _read_clock(span, arrived, freshest)
            size = len(json.dumps(span, separators=(",", ":")))
            if size > self.max_bytes:
                self.rejected_spans += 1
                continue
            trace = self._traces.get(span["traceId"])
            if trace is None:
                trace = self._traces[span["traceId"]] = _Trace()
            key = (span["id"], span.get("kind", ""))
            old = trace.spans.get(key)
            if old is not None:
                # A span reported again replaces its first report.
                old_size = len(json.dumps(old, separators=(",", ":")))
                trace.size -= old_size
                self.bytes -= old_size
                self.spans -= 1
            trace.spans[key] = span
            trace.size += size
            self.bytes += size
            self.spans += 1
            kept += 1
            self._evict(keep=span["traceId"])
        for node, offset in freshest.items():
            self._clocks[node] = _Clock(offset, arrived)
            self._clocks.move_to_end(node)
        while len(self._clocks) > MAX_CLOCKS:
            self._clocks.popitem(last=False)
        return kept

    def clock_offsets(self, now: float | None = None) -> dict[str, float]:
        """Seconds each proxy's clock is ahead of this one's (negative:
        behind), by node id, from the spans it reported in the last
        CLOCK_MEMORY_S; a reading is low by the time its span waited to be
        sent, a few seconds at most."""
        now = time.time() if now is None else now
        return {
            node: clock.offset_s
            for node, clock in self._clocks.items()
            if now - clock.read_at <= CLOCK_MEMORY_S
        }

    def _evict(self, keep: str) -> None:
        while (self.spans > self.max_spans or self.bytes > self.max_bytes) and self._traces:
            trace_id = next(iter(self._traces))
            if trace_id == keep and len(self._traces) == 1:
                # The trace being added is all there is: drop its oldest span.
                trace = self._traces[trace_id]
                key = next(iter(trace.spans))
                span = trace.spans.pop(key)
                size = len(json.dumps(span, separators=(",", ":")))
                trace.size -= size
                self.bytes -= size
                self.spans -= 1
                continue
            if trace_id == keep:
                self._traces.move_to_end(trace_id)
                continue
            gone = self._traces.pop(trace_id)
            self.spans -= len(gone.spans)
            self.bytes -= gone.size
            self.evicted_traces += 1

    def __len__(self) -> int:
        return len(self._traces)

    # -- reading ------------------------------------------------------------

    def summaries(
        self, *, service: str = "", min_duration_us: int = 0, limit: int = DEFAULT_LIMIT
    ) -> list[dict[str, Any]]:
        """Traces, newest first: id, services, span count, start, duration,
        and the root span's name."""
        out = []
        for trace_id in reversed(self._traces):
            summary = _summary(trace_id, self._traces[trace_id])
            if service and not any(
                s == service or s.split(".")[0] == service for s in summary["services"]
            ):
                continue
            if summary["duration"] < min_duration_us:
                continue
            out.append(summary)
            if len(out) >= limit:
                break
        return out

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """One trace stitched: its spans in start order, each with its
        parent's id, its depth and its children's ids."""
        trace_id = trace_id.lower()
        trace_id = trace_id.rjust(32, "0") if len(trace_id) == 16 else trace_id
        trace = self._traces.get(trace_id)
        if trace is None:
            return None
        spans = sorted(
            (dict(s) for s in trace.spans.values()),
            key=lambda s: (s.get("timestamp", 0), s["id"]),
        )
        ids = {s["id"] for s in spans}
        children: dict[str, list[str]] = collections.defaultdict(list)
        for s in spans:
            if s.get("parentId") in ids:
                children[s["parentId"]].append(s["id"])
        by_id = {s["id"]: s for s in spans}

        depths: dict[str, int] = {}

        def depth(span: dict[str, Any]) -> int:
            # Iterative and memoised: a report may chain thousands of spans
            # (or loop them), which recursion would not survive.
            chain: list[str] = []
            current: dict[str, Any] | None = span
            while current is not None and current["id"] not in depths:
                if current["id"] in chain:
                    break  # a loop: its spans count from where it closes
                chain.append(current["id"])
                parent = current.get("parentId")
                current = by_id.get(parent) if isinstance(parent, str) else None
            below = depths.get(current["id"], -1) if current is not None else -1
            for span_id in reversed(chain):
                below += 1
                depths[span_id] = below
            return depths[span["id"]]

        for s in spans:
            s["depth"] = depth(s)
            s["children"] = children.get(s["id"], [])
            s["service"] = service_of(s)
        summary = _summary(trace_id, trace)
        return {**summary, "spans": spans}

    def stats(self) -> dict[str, int]:
        return {
            "traces": len(self._traces),
            "spans": self.spans,
            "bytes": self.bytes,
            "max_spans": self.max_spans,
            "max_bytes": self.max_bytes,
            "evicted_traces": self.evicted_traces,
            "rejected_spans": self.rejected_spans,
        }

    # -- the admin API's queries ---------------------------------------------

    def query_list(self, params: Mapping[str, str]) -> dict[str, Any]:
        """`/debug/traces?service=S&min_duration_ms=N&limit=N`."""
        limit = _number(params, "limit", DEFAULT_LIMIT)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        min_ms = _number(params, "min_duration_ms", 0)
        return {
            "traces": self.summaries(
                service=params.get("service", ""), min_duration_us=min_ms * 1000, limit=limit
            ),
            "store": self.stats(),
        }

    def query_one(self, params: Mapping[str, str]) -> dict[str, Any] | None:
        """`/debug/traces/<traceId>`."""
        trace_id = params.get("trace_id", "").lower()
        if not _HEX.match(trace_id):
            raise ValueError(f"{trace_id[:64]!r} is not a trace id (16 or 32 hex digits)")
        return self.trace(trace_id)


def _number(params: Mapping[str, str], name: str, default: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise ValueError(f"{name} must be a whole number, not {value[:32]!r}")
    return int(value)


def _summary(trace_id: str, trace: _Trace) -> dict[str, Any]:
    spans = list(trace.spans.values())
    starts = [s["timestamp"] for s in spans if "timestamp" in s]
    ends = [s["timestamp"] + s.get("duration", 0) for s in spans if "timestamp" in s]
    ids = {s["id"] for s in spans}
    roots = [s for s in spans if s.get("parentId") not in ids]
    root = min(roots, key=lambda s: s.get("timestamp", 0)) if roots else None
    return {
        "traceId": trace_id,
        "spans": len(spans),
        "services": sorted({service_of(s) for s in spans} - {""}),
        "start": min(starts) if starts else 0,
        "duration": (max(ends) - min(starts)) if starts else 0,
        "root": (root.get("name", "") if root is not None else ""),
        "rootService": service_of(root) if root is not None else "",
    }


# -- the collector's port -------------------------------------------------------


def app(store: SpanStore) -> web.Application:
    """`POST /api/v2/spans` (JSON) and nothing else."""

    async def spans(request: web.Request) -> web.Response:
        try:
            report = json.loads(await request.read())
            kept = store.add(report)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            reason = str(err)[:200] or type(err).__name__
            return web.json_response(
                {"error": f"not a Zipkin v2 JSON report: {reason}"}, status=400
            )
        return web.json_response({"accepted": kept}, status=202)

    application = web.Application(client_max_size=MAX_REPORT)
    application.router.add_post(SPANS_PATH, spans)
    return application


@contextlib.asynccontextmanager
async def serve(
    store: SpanStore, host: str, port: int, context: ssl.SSLContext | None
) -> AsyncIterator[int]:
    """The collector on host:port; yields the port bound. `context`: TLS that
    requires a client certificate of the mesh (None only without mTLS,
    `--insecure-xds`)."""
    runner = web.AppRunner(app(store), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=context).start()
        bound: int = runner.addresses[0][1]
        yield bound
    finally:
        await runner.cleanup()
