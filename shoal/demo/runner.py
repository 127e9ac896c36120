"""`shoal demo`: the control plane, a small mesh, traffic, and what it shows."""

from __future__ import annotations

import asyncio
import collections
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
from shoal.demo import mesh

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


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []

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
        print(f"\nCanary ({split!r} on {callee}), {count} requests:")
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
            f"\nHeader route ({header_route!r}): 50 requests with {headers} "
            f"went to {sorted(services)}"
        )
        report.check(
            services == {target.strip()} and sum(seen.values()) == 50,
            f"every request with {name.strip()}: {value.strip()} reached {target.strip()}",
        )


async def scenario(local: mesh.LocalMesh, instances: list[Instance], report: Report) -> None:
    entry = next(i for i in instances if i.calls)
    front = local.workloads[entry.name]
    url = f"http://127.0.0.1:{front.sidecar.inbound_port}/"
    callee = entry.calls[0]
    callees = sorted(i.name for i in instances if i.service == callee)
    print(f"\n{entry.service} calls {callee} ({', '.join(callees)}) through the mesh:")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(url) as r:
            body = await r.json()
            print(f"  GET {url} -> {r.status}")
            print(f"    {body}")
            report.check(
                r.status == 200 and "x-envoy-upstream-service-time" in r.headers,
                f"request entered {entry.name}'s sidecar and reached its app",
            )
            upstream = body.get("upstream", [{}])[0]
            report.check(
                upstream.get("status") == 200 and str(upstream.get("service")).startswith(callee),
                f"{entry.service}'s app reached {callee} through both sidecars",
            )
        callee_apps = [w.app for w in local.workloads.values() if w.app.served]
        xfcc = next(
            (
                v
                for app in callee_apps
                for h in app.seen_headers
                for k, v in h.items()
                if k.lower() == "x-forwarded-client-cert"
            ),
            "",
        )
        caller = xfcc.rpartition("URI=")[2].split(";")[0] if "URI=" in xfcc else ""
        if caller:
            print(f"  {callee} saw its caller over mutual TLS as {caller}")
        report.check(
            caller.endswith(f"/ns/{entry.namespace}/sa/{entry.service_account}"),
            f"{callee}'s sidecar verified {entry.service}'s certificate (mTLS, SPIFFE ID)",
        )
        ok, seen = await _burst(session, url, 40)
        print(f"  40 requests: {ok} ok; {callee} instances answering: {dict(seen)}")
        report.check(ok == 40, "40 of 40 requests succeeded")
        report.check(
            set(callees) <= set(seen),
            f"round-robin reached every {callee} instance: {sorted(set(callees) & set(seen))}",
        )
        await canary(session, url, instances, callee, report)

        gone = next(i for i in instances if i.service == callee and i.name == callees[-1])
        print(f"\nRemoving {gone.name}'s EndpointSlice from {gone.slice_file.name} ...")
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


async def run(
    registry: Path,
    *,
    start_control_plane: StartControlPlane,
    check: bool,
    workdir: Path,
) -> int:
    folder = workdir / "registry"
    instances = prepare(registry, folder)
    report = Report()
    async with start_control_plane(folder) as cp:
        print(
            f"shoal demo: control plane xDS on 127.0.0.1:{cp.xds_port}, "
            f"admin on http://127.0.0.1:{cp.admin_port}/"
        )
        print(f"shoal demo: manifests in {folder} (edit them: changes are live)")
        local = mesh.LocalMesh(
            workdir / "sidecars",
            cp.xds_port,
            authority=cp.authority,
            collector_port=cp.collector_port,
        )
        try:
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
                    f"  {i.name:<12} app :{w.sidecar.app_port}  sidecar in :{i.inbound_port}"
                    f"  out :{w.sidecar.outbound_port}  envoy admin :{w.envoy.admin_port}"
                )
            await scenario(local, instances, report)
            if report.failures:
                print(f"\nshoal demo: {len(report.failures)} check(s) failed")
            else:
                print("\nshoal demo: every check passed")
            if not check:
                entry = next(i for i in instances if i.calls)
                print(
                    f"\nThe mesh is up. Try:\n  curl http://127.0.0.1:{entry.inbound_port}/\n"
                    "Press Ctrl-C to stop."
                )
                await _wait_for_signal()
        finally:
            await local.close()
    return 1 if report.failures else 0


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
