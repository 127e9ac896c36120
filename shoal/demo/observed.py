"""What the demo shows of its own traffic: background load, one trace
stitched across the chain, the access log lines that carry it, and the
dashboard's graph counting exactly the requests sent."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from shoal.observe.dashboard import server as dashboard

Edge = tuple[str, str]


class Traffic:
    """Steady requests into the mesh's entry, a share of them as an
    internal user, until cancelled; `paused()` stops them for a count."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        header: dict[str, str],
        *,
        per_second: float = 4.0,
        every: int = 4,
    ) -> None:
        self.session = session
        self.url = url
        self.header = header
        self.per_second = per_second
        self.every = every
        self.sent = 0
        self.ok = 0
        self._on = asyncio.Event()
        self._on.set()
        # Held while a request is in flight, so a pause waits for it to end.
        self._busy = asyncio.Lock()

    async def run(self) -> None:
        n = 0
        while True:
            await self._on.wait()
            async with self._busy:
                # Paused between the wait and the lock: send nothing.
                if not self._on.is_set():
                    continue
                n += 1
                headers = self.header if n % self.every == 0 else None
                self.sent += 1
                try:
                    async with self.session.get(self.url, headers=headers) as r:
                        await r.read()
                        self.ok += r.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    pass
            await asyncio.sleep(1 / self.per_second)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        self._on.clear()
        async with self._busy:
            pass
        try:
            yield
        finally:
            self._on.set()


def new_trace() -> tuple[str, dict[str, str]]:
    """A trace id and the W3C header that starts a sampled trace with it,
    as a traced client in front of the mesh would send."""
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


async def fetch_trace(admin: dashboard.Upstream, trace_id: str) -> dict[str, Any] | None:
    """The collector's stitched trace, from `/debug/traces/<id>` (None: not yet)."""
    status, body = await admin.get(f"/debug/traces/{trace_id}")
    if status != 200:
        return None
    found: dict[str, Any] = json.loads(body)
    return found


def trace_complete(trace: dict[str, Any] | None, services: Iterable[str]) -> bool:
    """Every wanted service has a span, and the spans form one tree (one
    root, every other span's parent in the trace)."""
    if trace is None:
        return False
    spans = trace.get("spans", [])
    have = {str(s.get("service", "")).split(".")[0] for s in spans}
    ids = {s["id"] for s in spans}
    roots = [s for s in spans if s.get("parentId") not in ids]
    return set(services) <= have and len(spans) >= 3 and len(roots) == 1


def trace_lines(trace: dict[str, Any]) -> list[str]:
    """The trace as an indented tree, one span a line."""
    out = []
    for s in trace.get("spans", []):
        kind = str(s.get("kind", "")).lower() or "span"
        tags = s.get("tags", {})
        what = tags.get("upstream_cluster", "") if kind == "client" else ""
        out.append(
            f"{'  ' * int(s.get('depth', 0))}{s.get('service', '?'):<16} {kind:<6} "
            f"{int(s.get('duration', 0)) / 1000:6.1f} ms  {what}".rstrip()
        )
    return out


def access_log_lines(log_files: dict[str, Path], trace_id: str) -> dict[str, list[dict[str, Any]]]:
    """Each sidecar's JSON access log lines for one trace (Envoy's stdout,
    which the demo writes to a file beside each sidecar's bootstrap)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for name, path in log_files.items():
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            # Envoy's own messages share the file; access log lines are JSON.
            if not line.startswith("{") or trace_id not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if str(entry.get("trace_id", "")).lower().rjust(32, "0") == trace_id:
                found.setdefault(name, []).append(entry)
    return found


class Dashboard:
    """The dashboard's own API, read the way its page reads it: the URL's
    token swapped for its cookie, then `GET /api/graph`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session = aiohttp.ClientSession(
            # The dashboard is on an IP address: aiohttp keeps its cookie only if told to.
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=aiohttp.ClientTimeout(total=10),
        )
        self._base = url.partition("/?")[0]
        self._signed_in = False

    async def traffic_edges(self) -> collections.Counter[Edge]:
        """Requests per (caller, callee) on the dashboard's graph."""
        if not self._signed_in:
            async with self._session.get(self.url) as r:
                await r.read()
            self._signed_in = True
        async with self._session.get(f"{self._base}/api/graph") as r:
            found = await r.json()
            if r.status != 200:
                raise LookupError(f"/api/graph: {r.status} {found}")
        return collections.Counter(
            {
                (e["source"], e["target"]): int(e["requests"])
                for e in found.get("edges", [])
                if e.get("kind") == "traffic"
            }
        )

    async def close(self) -> None:
        await self._session.close()


def expected_edges(namespace: str, body: Any) -> collections.Counter[Edge]:
    """The calls one response says were made: who called whom, down the chain."""
    out: collections.Counter[Edge] = collections.Counter()
    if not isinstance(body, dict):
        return out
    caller = f"{namespace}/{body.get('service')}"
    for up in body.get("upstream", []):
        if isinstance(up, dict) and up.get("service"):
            out[(caller, f"{namespace}/{up['service']}")] += 1
            out += expected_edges(namespace, up)
    return out


def difference(
    after: collections.Counter[Edge], before: collections.Counter[Edge]
) -> collections.Counter[Edge]:
    return collections.Counter(
        {k: after[k] - before[k] for k in after.keys() | before.keys() if after[k] != before[k]}
    )
