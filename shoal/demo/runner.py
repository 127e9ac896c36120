"""`shoal demo`: the control plane, a small mesh, traffic, and what it shows."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from shoal import envoy
from shoal.demo import mesh, observed
from shoal.observe.dashboard import server as dashboard

CALLS_ANNOTATION = "demo.shoal.io/calls"

StartControlPlane = Callable[[Path], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True)
class Instance:
    """One workload of the demo: an EndpointSlice endpoint and its Pod."""

    name: str
    namespace: str
    service: str
    service_account: str
    version: str
    inbound_port: int
    slice_file: Path
    calls: tuple[str, ...]
    annotations: tuple[tuple[str, str], ...] = ()


def prepare(source: Path, target: Path) -> list[Instance]:
    """Copy the manifests, giving every sidecar inbound port a free port."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    docs_by_file: dict[Path, list[Any]] = {}
    for path in sorted(source.glob("*.y*ml")):
        docs_by_file[target / path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    pods: dict[tuple[str, str], dict[str, Any]] = {}
    calls: dict[tuple[str, str], tuple[str, ...]] = {}
    notes: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
    for docs in docs_by_file.values():
        for d in docs:
            meta = d.get("metadata", {})
            ns = meta.get("namespace", "default")
            if d.get("kind") == "Pod":
                pods[(ns, meta["name"])] = d
            if d.get("kind") == "Service":
                notes[(ns, meta["name"])] = tuple(sorted((meta.get("annotations") or {}).items()))
                wanted = (meta.get("annotations") or {}).get(CALLS_ANNOTATION, "")
                calls[(ns, meta["name"])] = tuple(h.strip() for h in wanted.split(",") if h.strip())
    instances: list[Instance] = []
    for path, docs in docs_by_file.items():
        for d in docs:
            if d.get("kind") != "EndpointSlice":
                continue
            meta = d["metadata"]
            ns = meta.get("namespace", "default")
            service = meta["labels"]["kubernetes.io/service-name"]
            port = envoy.free_port()
            for p in d.get("ports", []):
                p["port"] = port
            for e in d.get("endpoints", []):
                pod_name = e.get("targetRef", {}).get("name", meta["name"])
                pod = pods.get((ns, pod_name), {})
                instances.append(
                    Instance(
                        name=pod_name,
                        namespace=ns,
                        service=service,
                        service_account=pod.get("spec", {}).get("serviceAccountName", "default"),
                        version=pod.get("metadata", {}).get("labels", {}).get("version", "v1"),
                        inbound_port=port,
                        slice_file=path,
                        calls=calls.get((ns, service), ()),
                        annotations=notes.get((ns, service), ()),
                    )
                )
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return instances


def entry(instances: list[Instance]) -> Instance:
    """Where traffic enters the mesh: a workload that calls others and that
    no Service calls, the permissive one (it takes plain HTTP) first."""
    called = {c for i in instances for c in i.calls}
    candidates = [i for i in instances if i.calls and i.service not in called] or [
        i for i in instances if i.calls
    ]
    return min(
        candidates,
        key=lambda i: (dict(i.annotations).get("shoal.io/mtls") != "permissive", i.name),
    )


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        # Every check ran: a Ctrl-C after that is how the demo ends, not a failure.
        self.finished = False

    def check(self, ok: bool, what: str) -> bool:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
        if not ok:
            self.failures.append(what)
        return ok


async def _burst(
    session: aiohttp.ClientSession,
    url: str,
    count: int,
    headers: dict[str, str] | None = None,
) -> tuple[int, collections.Counter[str]]:
    ok = 0
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        try:
            async with session.get(url, headers=headers) as r:
                body = await r.json() if r.content_type == "application/json" else {}
                if r.status == 200:
                    ok += 1
                for up in body.get("upstream", []):
                    seen[f"{up.get('instance', up.get('error'))}"] += 1
        except aiohttp.ClientError:
            pass
    return ok, seen


def _drop_slice(path: Path, slice_name: str) -> str:
    original = path.read_text()
    docs = [
        d
        for d in yaml.safe_load_all(original)
        if d and not (d.get("kind") == "EndpointSlice" and d["metadata"]["name"] == slice_name)
    ]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return original


# How long a check waits for the mesh before it fails. A machine under load
# can be slow; the time it took is printed (bench/ measures it properly).
_PATIENCE_S = 30.0


async def _until(predicate: Callable[[], Any], timeout: float) -> float | None:
    """Seconds until the async predicate holds, or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


def _service_of(instances: list[Instance], name: str) -> str:
    return next((i.service for i in instances if i.name == name), name)


async def canary(
    session: aiohttp.ClientSession,
    url: str,
    instances: list[Instance],
    callee: str,
    report: Report,
) -> None:
    """The callee's split and header route, measured."""
    notes = dict(next((i.annotations for i in instances if i.service == callee), ()))
    split = notes.get("shoal.io/split")
    if split:
        weights = {
            name.strip(): int(weight)
            for name, _, weight in (p.partition("=") for p in split.split(","))
        }
        count = 400
        _, seen = await _burst(session, url, count)
        by_service: collections.Counter[str] = collections.Counter()
        for name, n in seen.items():
            by_service[_service_of(instances, name)] += n
        print(f"\n4. The canary ({split!r} on {callee}), {count} requests:")
        for service, weight in weights.items():
            share = 100 * by_service[service] / count
            print(f"  {service:<12} wanted {weight:>3}%  got {share:5.1f}%")
            report.check(
                abs(share - weight) <= 6,
                f"{service} got {share:.1f}% of traffic (wanted {weight}%)",
            )
    header_route = notes.get("shoal.io/route-headers")
    if header_route:
        match, _, target = header_route.partition("->")
        name, _, value = match.partition("=")
        headers = {name.strip(): value.strip()}
        _, seen = await _burst(session, url, 50, headers)
        services = {_service_of(instances, n) for n in seen}
        print(
            f"  the header route ({header_route!r}): 50 requests with {headers} "
            f"went to {sorted(services)}"
        )
        report.check(
            services == {target.strip()} and sum(seen.values()) == 50,
            f"every request with {name.strip()}: {value.strip()} reached {target.strip()}",
        )


def _chain(body: Any) -> str:
    """`frontend-1 -> catalog-2 -> pricing-1` from a response's nested calls."""
    if not isinstance(body, dict):
        return "?"
    name = str(body.get("instance", body.get("error", "?")))
    ups = [_chain(u) for u in body.get("upstream", [])]
    return f"{name} -> {', '.join(ups)}" if ups else name


def _services_in(body: Any) -> set[str]:
    """Every Service a response says took part in it."""
    if not isinstance(body, dict) or not body.get("service"):
        return set()
    found = {str(body["service"])}
    for up in body.get("upstream", []):
        found |= _services_in(up)
    return found


def _backends(instances: list[Instance], service: str) -> set[str]:
    """The Services a call to `service` may reach: itself, and those its
    canary split and header route send calls on to."""
    notes = dict(next((i.annotations for i in instances if i.service == service), ()))
    found = {service}
    for part in notes.get("shoal.io/split", "").split(","):
        if part.strip():
            found.add(part.partition("=")[0].strip())
    if "->" in notes.get("shoal.io/route-headers", ""):
        found.add(notes["shoal.io/route-headers"].partition("->")[2].strip())
    return found


def _caller_of(app_headers: list[dict[str, str]]) -> str:
    """The SPIFFE ID a sidecar put in X-Forwarded-Client-Cert: the caller
    its mTLS handshake verified."""
    xfcc = next(
        (v for h in app_headers for k, v in h.items() if k.lower() == "x-forwarded-client-cert"),
        "",
    )
    return xfcc.rpartition("URI=")[2].split(";")[0] if "URI=" in xfcc else ""


def _mtls(local: mesh.LocalMesh, instances: list[Instance], report: Report) -> None:
    """Every called workload's sidecar named a caller it may have: mTLS on every hop."""
    print("\n3. Mutual TLS on every hop (each callee's sidecar names its caller's certificate):")
    for callee in instances:
        callers = {
            f"/ns/{i.namespace}/sa/{i.service_account}"
            for i in instances
            if any(callee.service in _backends(instances, c) for c in i.calls)
        }
        if not callers:
            continue
        w = local.workloads.get(callee.name)
        if w is None or not w.app.served:
            continue
        seen = _caller_of(w.app.seen_headers)
        print(f"  {callee.name:<14} was called by {seen or '(no client certificate)'}")
        report.check(
            any(seen.endswith(c) for c in callers),
            f"{callee.name}'s sidecar verified its caller's certificate (mTLS, SPIFFE ID)",
        )


async def scenario(
    local: mesh.LocalMesh,
    instances: list[Instance],
    report: Report,
    *,
    traffic: observed.Traffic,
    admin: dashboard.Upstream,
    board: observed.Dashboard,
) -> None:
    front_instance = entry(instances)
    front = local.workloads[front_instance.name]
    url = f"http://127.0.0.1:{front.sidecar.inbound_port}/"
    callee = front_instance.calls[0]
    callees = sorted(i.name for i in instances if i.service == callee)
    print(f"\n1. A request through the chain ({front_instance.service} calls {callee}):")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(url) as r:
            body = await r.json() if r.content_type == "application/json" else {}
            print(f"  GET {url} -> {r.status}: {_chain(body)}")
            report.check(
                r.status == 200 and "x-envoy-upstream-service-time" in r.headers,
                f"request entered {front_instance.name}'s sidecar and reached its app",
            )
            upstream = (body.get("upstream") or [{}])[0]
            reached = report.check(
                upstream.get("status") == 200 and str(upstream.get("service")).startswith(callee),
                f"{front_instance.service}'s app reached {callee} through both sidecars",
            )
        if not reached:
            # Nothing below can work without the first hop; say so and stop.
            print("  the mesh does not carry the entry's calls: skipping the rest")
            return
        ok, seen = await _burst(session, url, 40)
        print(f"\n2. Round robin: 40 requests, {ok} ok; {callee} instances answering: {dict(seen)}")
        report.check(ok == 40, "40 of 40 requests succeeded")
        report.check(
            set(callees) <= set(seen),
            f"round-robin reached every {callee} instance: {sorted(set(callees) & set(seen))}",
        )
        _mtls(local, instances, report)
        await canary(session, url, instances, callee, report)
        async with traffic.paused():
            await _observed(session, url, local, instances, report, admin, board)

        gone = next(i for i in instances if i.service == callee and i.name == callees[-1])
        print(f"\n7. Removing {gone.name}'s EndpointSlice from {gone.slice_file.name} ...")
        original = _drop_slice(gone.slice_file, gone.name)

        async def only_rest() -> bool:
            ok, seen = await _burst(session, url, 10)
            return ok == 10 and gone.name not in seen

        took = await _until(only_rest, _PATIENCE_S)
        report.check(
            took is not None,
            f"traffic left {gone.name} {took:.2f}s after the edit"
            if took is not None
            else f"traffic still reaches {gone.name} {_PATIENCE_S:.0f}s after the edit",
        )
        gone.slice_file.write_text(original)

        async def back() -> bool:
            _, seen = await _burst(session, url, 10)
            return gone.name in seen

        took = await _until(back, _PATIENCE_S)
        report.check(took is not None, f"{gone.name} back in rotation after restoring the file")


# The requests whose edges the graph must count, with the background
# traffic paused; every GRAPH_EVERY-th as an internal user.
GRAPH_REQUESTS = 20
GRAPH_EVERY = 4


async def _observed(
    session: aiohttp.ClientSession,
    url: str,
    local: mesh.LocalMesh,
    instances: list[Instance],
    report: Report,
    admin: dashboard.Upstream,
    board: observed.Dashboard,
) -> None:
    """One trace across the chain, its access log lines, and the graph's counts."""
    front = entry(instances)
    header = _route_header(instances, front)
    trace_id, headers = observed.new_trace()
    async with session.get(url, headers=headers) as r:
        body = await r.json() if r.content_type == "application/json" else {}
    chain = _chain(body)
    wanted = sorted(_services_in(body))
    print(f"\n5. One request traced (trace id {trace_id}): {chain}")
    found: dict[str, Any] = {}

    async def stitched() -> bool:
        trace = await observed.fetch_trace(admin, trace_id)
        if observed.trace_complete(trace, wanted) and trace is not None:
            found.update(trace)
            return True
        return False

    took = await _until(stitched, _PATIENCE_S)
    for line in observed.trace_lines(found):
        print(f"    {line}")
    spans = len(found.get("spans", []))
    have = sorted({str(s.get("service", "")).split(".")[0] for s in found.get("spans", [])})
    report.check(
        took is not None and spans >= 3 and len(have) >= 3,
        f"the collector stitched {spans} spans across {len(have)} services {have} into one trace"
        if took is not None
        else f"no trace across {wanted} stitched within {_PATIENCE_S:.0f}s "
        f"(/debug/traces/{trace_id}: {spans} spans from {have})",
    )
    logs = {name: w.envoy.log_path for name, w in local.workloads.items()}
    lines: dict[str, list[dict[str, Any]]] = {}

    async def logged() -> bool:
        lines.clear()
        lines.update(observed.access_log_lines(logs, trace_id))
        return {_service_of(instances, n) for n in lines} >= set(wanted)

    took = await _until(logged, _PATIENCE_S)
    for name, entries in sorted(lines.items()):
        directions = ", ".join(str(e.get("direction")) for e in entries)
        print(f"    {name:<14} {len(entries)} access log line(s) ({directions})  {logs[name]}")
    report.check(
        took is not None,
        f"{sum(map(len, lines.values()))} access log lines in {len(lines)} sidecars carry "
        "the trace id"
        if took is not None
        else f"access log lines with trace id {trace_id} only from {sorted(lines)}",
    )

    print(
        f"\n6. The dashboard's graph, counting {GRAPH_REQUESTS} requests "
        "(background traffic paused):"
    )
    before = await board.traffic_edges()
    want: collections.Counter[tuple[str, str]] = collections.Counter()
    for n in range(1, GRAPH_REQUESTS + 1):
        internal = header if n % GRAPH_EVERY == 0 else None
        async with session.get(url, headers=internal) as r:
            want += observed.expected_edges(
                front.namespace, await r.json() if r.content_type == "application/json" else {}
            )
    got: collections.Counter[tuple[str, str]] = collections.Counter()

    async def counted() -> bool:
        got.clear()
        got.update(observed.difference(await board.traffic_edges(), before))
        return got == want

    took = await _until(counted, _PATIENCE_S)
    for source, target in sorted(want.keys() | got.keys()):
        print(
            f"    {source:<20} -> {target:<20} sent {want[(source, target)]:>3}  "
            f"graph {got[(source, target)]:>3}"
        )
    report.check(
        took is not None,
        f"the graph's {len(want)} edges count exactly the requests sent"
        if took is not None
        else "the graph's edge counts differ from the requests sent",
    )


async def run(
    registry: Path,
    *,
    start_control_plane: StartControlPlane,
    check: bool,
    workdir: Path,
) -> int:
    folder = workdir / "registry"
    instances = prepare(registry, folder)
    # Envoy appends to its log file: start each run's access logs afresh.
    shutil.rmtree(workdir / "sidecars", ignore_errors=True)
    log_file = workdir / "shoal.log"
    report = Report()
    with _logs_to(log_file):
        try:
            return await _run(
                folder, instances, report, start_control_plane, check, workdir, log_file
            )
        except asyncio.CancelledError:
            # Ctrl-C: every `finally` below has stopped what it started.
            print("\nshoal demo: stopped")
            return 1 if report.failures else 0 if report.finished else 130


@contextlib.contextmanager
def _logs_to(path: Path) -> Any:
    """INFO and up to a file, only warnings on the terminal: the narration
    is what a user reads there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    levels = [(h, h.level) for h in root.handlers]
    for h, level in levels:
        h.setLevel(max(level, logging.WARNING))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for h, level in levels:
            h.setLevel(level)


async def _run(
    folder: Path,
    instances: list[Instance],
    report: Report,
    start_control_plane: StartControlPlane,
    check: bool,
    workdir: Path,
    log_file: Path,
) -> int:
    # Ctrl-C or SIGTERM cancels the demo wherever it is, and cleanup runs.
    this = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if this is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, this.cancel)
    async with contextlib.AsyncExitStack() as stack:
        cp = await stack.enter_async_context(start_control_plane(folder))
        print(
            f"shoal demo: control plane xDS on 127.0.0.1:{cp.xds_port}, "
            f"admin on http://127.0.0.1:{cp.admin_port}/"
        )
        print(f"shoal demo: manifests in {folder} (edit them: changes are live)")
        print(f"shoal demo: the control plane's log is in {log_file}")
        local = mesh.LocalMesh(
            workdir / "sidecars",
            cp.xds_port,
            authority=cp.authority,
            collector_port=cp.collector_port,
        )
        stack.push_async_callback(local.close)
        for i in instances:
            w = await local.add(
                i.name,
                namespace=i.namespace,
                service=i.service,
                inbound_port=i.inbound_port,
                service_account=i.service_account,
                version=i.version,
                calls=i.calls,
            )
            print(
                f"  {i.name:<14} app :{w.sidecar.app_port}  sidecar in :{i.inbound_port}"
                f"  out :{w.sidecar.outbound_port}  envoy admin :{w.envoy.admin_port}"
            )
        url = await stack.enter_async_context(dashboard.serve(cp.admin_socket))
        print(f"\nshoal demo: the dashboard is at {url}")
        board = observed.Dashboard(url)
        stack.push_async_callback(board.close)
        admin = dashboard.Upstream(cp.admin_socket)
        stack.push_async_callback(admin.close)
        front = entry(instances)
        header = _route_header(instances, front)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        )
        front_url = f"http://127.0.0.1:{front.inbound_port}/"
        traffic = observed.Traffic(session, front_url, header or {})
        background = asyncio.create_task(traffic.run())
        stack.push_async_callback(_cancel, background)
        print(
            f"shoal demo: background traffic: {traffic.per_second:.0f} requests/s into "
            f"{front.name}, 1 in {traffic.every} with {header}"
        )
        await scenario(local, instances, report, traffic=traffic, admin=admin, board=board)
        if report.failures:
            print(f"\nshoal demo: {len(report.failures)} check(s) failed:")
            for what in report.failures:
                print(f"  - {what}")
        else:
            print("\nshoal demo: every check passed")
        report.finished = True
        if not check:
            flags = " ".join(f"-H '{k}: {v}'" for k, v in (header or {}).items())
            print(
                "\nThe mesh is up, with background traffic. Try:\n"
                f"  curl {front_url}\n"
                f"  curl {flags} {front_url}\n"
                f"  open {url}\n"
                f"Access logs: {workdir / 'sidecars'}/*/envoy.log; "
                f"the control plane's log: {log_file}\n"
                "Press Ctrl-C to stop."
            )
            await asyncio.Event().wait()
    return 1 if report.failures else 0


def _route_header(instances: list[Instance], front: Instance) -> dict[str, str] | None:
    """The header the entry's callee routes on (`shoal.io/route-headers`)."""
    for callee in front.calls:
        notes = dict(next((i.annotations for i in instances if i.service == callee), ()))
        route = notes.get("shoal.io/route-headers")
        if route:
            name, _, value = route.partition("->")[0].partition("=")
            return {name.strip(): value.strip()}
    return None


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
