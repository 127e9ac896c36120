"""The figures of a run: each push as the proxies saw it, and the row of
results per proxy count (whose fields are the JSON output's keys)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import harness, wire

# shoal serve's default --debounce-quiet; part of every push it measures.
DEBOUNCE_QUIET_MS = 100.0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Push:
    """One push, as seen by every proxy; times from the trigger."""

    p50_ms: float
    p99_ms: float
    first_ms: float
    last_ms: float
    acked: int
    missing: int
    server_cpu_s: float
    client_cpu_s: float
    bytes: int
    resources: int
    # Each server process's part of server_cpu_s (--serve-workers: worker 0 first).
    server_cpu_each_s: tuple[float, ...] = ()
    # With --instrument: where the time went in the server, from the trigger
    # (file written) to the registry reload, the reload itself, the wait for
    # the debounce, the rebuild, and from the end of the rebuild (when the
    # server starts pushing) to the p99 ACK; garbage collection between the
    # trigger and the last ACK.
    watch_ms: float = math.nan
    reload_ms: float = math.nan
    debounce_ms: float = math.nan
    rebuild_ms: float = math.nan
    fanout_p99_ms: float = math.nan
    # From the end of the rebuild to the server's first and last write.
    first_write_ms: float = math.nan
    last_write_ms: float = math.nan
    gc_ms: float = math.nan
    gc_max_ms: float = math.nan
    gc_full: int | None = None
    # The monotonic clock at the trigger and at the last ACK.
    window: tuple[float, float] = (0.0, 0.0)


def resource_count(body: bytes) -> int:
    """Resources in a pushed response (the field number is 2 in both variants)."""
    return len(wire.RawResponse.FromString(body).resources) if body else 0


@dataclass
class Result:
    proxies: int
    mode: str
    xds_security: str
    services: int
    workers: int
    instrumented: bool
    # shoal serve --workers.
    serve_workers: int = 1
    connect_all_s: float = math.nan
    connect_server_cpu_s: float = math.nan
    connect_client_cpu_s: float = math.nan
    push_p50_ms: float = math.nan
    push_p99_ms: float = math.nan
    push_p99_ms_excl_debounce: float = math.nan
    push_first_ms: float = math.nan
    push_spread_p99_ms: float = math.nan
    push_cpu_s: float = math.nan
    push_cpu_each_s: list[float] = field(default_factory=list)
    push_client_cpu_s: float = math.nan
    push_bytes: int = 0
    push_resources: int = 0
    push_watch_ms: float = math.nan
    push_reload_ms: float = math.nan
    push_debounce_ms: float = math.nan
    push_rebuild_ms: float = math.nan
    push_fanout_p99_ms: float = math.nan
    push_first_write_ms: float = math.nan
    push_last_write_ms: float = math.nan
    push_gc_ms: float = math.nan
    push_gc_max_ms: float = math.nan
    floor_push_p50_ms: float = math.nan
    floor_push_p99_ms: float = math.nan
    floor_push_cpu_s: float = math.nan
    floor_push_client_cpu_s: float = math.nan
    floor_rss_per_stream_kb: float = math.nan
    rss_base_mb: float = math.nan
    rss_mb: float = math.nan
    rss_peak_mb: float = math.nan
    rss_per_stream_kb: float = math.nan
    reconnect_all_s: float = math.nan
    reconnect_server_cpu_s: float = math.nan
    reconnect_client_cpu_s: float = math.nan
    # The same storm against a server handing each proxy shoal's recorded
    # configuration as ready bytes (floor.ReplayFloor).
    floor_reconnect_all_s: float = math.nan
    floor_reconnect_server_cpu_s: float = math.nan
    # CPU seconds the machine spent, while this proxy count ran, in processes
    # other than this benchmark and its children: more than a few seconds
    # means something else competed for the CPUs and the figures are off.
    other_cpu_s: float = math.nan
    complete: bool = True
    errors: list[str] = field(default_factory=list)
    pushes: list[Push] = field(default_factory=list)
    floor_pushes: list[Push] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def summarize(r: Result) -> None:
    r.push_p50_ms = _median([p.p50_ms for p in r.pushes])
    r.push_p99_ms = _median([p.p99_ms for p in r.pushes])
    r.push_p99_ms_excl_debounce = r.push_p99_ms - DEBOUNCE_QUIET_MS
    r.push_first_ms = _median([p.first_ms for p in r.pushes])
    r.push_spread_p99_ms = _median([p.p99_ms - p.first_ms for p in r.pushes])
    r.push_cpu_s = _median([p.server_cpu_s for p in r.pushes])
    r.push_cpu_each_s = [
        _median([p.server_cpu_each_s[i] for p in r.pushes if len(p.server_cpu_each_s) > i])
        for i in range(max((len(p.server_cpu_each_s) for p in r.pushes), default=0))
    ]
    r.push_client_cpu_s = _median([p.client_cpu_s for p in r.pushes])
    r.push_bytes = max((p.bytes for p in r.pushes), default=0)
    r.push_resources = max((p.resources for p in r.pushes), default=0)
    r.floor_push_p50_ms = _median([p.p50_ms for p in r.floor_pushes])
    r.floor_push_p99_ms = _median([p.p99_ms for p in r.floor_pushes])
    r.floor_push_cpu_s = _median([p.server_cpu_s for p in r.floor_pushes])
    r.floor_push_client_cpu_s = _median([p.client_cpu_s for p in r.floor_pushes])


def attach_events(r: Result, events: Sequence[harness.Event]) -> None:
    ms = 1000.0
    for p in r.pushes:
        begin, end = p.window
        inside = [e for e in events if begin <= e[1] <= end]
        collections = [(w, d) for w, _, d in inside if w.startswith("gc")]
        p.gc_ms = sum(d for _, d in collections) * ms
        p.gc_max_ms = max((d for _, d in collections), default=0.0) * ms
        p.gc_full = sum(1 for w, _ in collections if w == "gc2")
        reload = next((e for e in inside if e[0] == "reload"), None)
        if reload is None:
            continue
        rebuild = next((e for e in inside if e[0] == "rebuild" and e[1] >= reload[1]), None)
        p.watch_ms = (reload[1] - begin) * ms
        p.reload_ms = reload[2] * ms
        if rebuild is not None:
            p.debounce_ms = (rebuild[1] - reload[1] - reload[2]) * ms
            p.rebuild_ms = rebuild[2] * ms
            built = rebuild[1] + rebuild[2]
            p.fanout_p99_ms = p.p99_ms - (built - begin) * ms
            writes = [t for w, t, _ in inside if w == "write" and t >= built]
            p.first_write_ms = (min(writes, default=math.nan) - built) * ms
            p.last_write_ms = (max(writes, default=math.nan) - built) * ms
    r.push_watch_ms = _median([p.watch_ms for p in r.pushes])
    r.push_reload_ms = _median([p.reload_ms for p in r.pushes])
    r.push_debounce_ms = _median([p.debounce_ms for p in r.pushes])
    r.push_rebuild_ms = _median([p.rebuild_ms for p in r.pushes])
    r.push_fanout_p99_ms = _median([p.fanout_p99_ms for p in r.pushes])
    r.push_first_write_ms = _median([p.first_write_ms for p in r.pushes])
    r.push_last_write_ms = _median([p.last_write_ms for p in r.pushes])
    r.push_gc_ms = _median([p.gc_ms for p in r.pushes])
    r.push_gc_max_ms = max((p.gc_max_ms for p in r.pushes), default=math.nan)
