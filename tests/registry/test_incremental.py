"""An incremental build is the build of everything, change after change.

A random sequence of puts, removes and file replacements (Services and
their annotations, EndpointSlices, Pods, Namespaces, service accounts,
TrafficRoutes, HTTPRoutes and GRPCRoutes, the same object in two sources)
is applied to one store,
built after each step, and its state, problems and route status compared
with those of the store as it was before builds became incremental
(tests/registry/reference_store.py: a pass over every object), fed the same
steps. The snapshots a long-lived controller publishes from the
incremental states are compared with those a fresh controller builds from
the reference state: the same resources, byte for byte (by version), and
the same problems.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from shoal.model import changes, mesh, proxy
from shoal.registry import manifests, store
from shoal.sds import ca, workloads
from shoal.xds import cache, controller, debounce, node, resources
from shoal.xds.translate import names, refs, sidecar
from tests.kube import objects
from tests.registry import reference_store

NAMESPACES = ("ns0", "ns1", "ns2")
SERVICES = tuple(f"svc{i}" for i in range(8))
PODS = tuple(f"pod{i}" for i in range(10))
SOURCES = ("api", "b-file", "a-file")
NOTES: tuple[dict[str, str], ...] = (
    {},
    {"shoal.io/timeout": "3s"},
    {"shoal.io/timeout": "soon"},
    {"shoal.io/split": "svc1=50,svc2=50"},
    {"shoal.io/split": "svc1=90,svc7=10"},
    {"shoal.io/split": "svc1=90"},
    {"shoal.io/route-headers": "x-a=1 -> svc3"},
    {"shoal.io/retries": "3"},
    {"shoal.io/export-to": "ns1"},
    {"shoal.io/export-to": "???"},
    {"shoal.io/dependencies": "ns1/*"},
    {"shoal.io/mtls": "strict"},
    {"shoal.io/mtls": "sometimes"},
    {"shoal.io/allow": "ns0/default"},
    {"shoal.io/allow": "nobody"},
    {"shoal.io/outlier": "consecutive-5xx=3"},
    {"shoal.io/trace-sampling": "10%"},
    {"shoal.io/access-log": "on", "shoal.io/timeout": "1s"},
)


def _address(rng: random.Random) -> str:
    return f"10.0.{rng.randrange(4)}.{rng.randrange(1, 250)}"


def _service(rng: random.Random) -> dict[str, Any]:
    ns = rng.choice(NAMESPACES[:2])
    ports: list[Any] = rng.choice([[80], [80, 8080], [("grpc", 9090)], [("tcp-db", 5432)]])
    return objects.service(
        ns,
        rng.choice(SERVICES),
        ports=ports,
        annotations=rng.choice(NOTES),
        cluster_ip=rng.choice([None, "None", "10.96.0.1"]),
    )


def _slice(rng: random.Random) -> dict[str, Any]:
    ns = rng.choice(NAMESPACES[:2])
    n = rng.randrange(0, 4)
    doc = objects.endpoint_slice(
        ns,
        rng.choice(SERVICES),
        addresses=[_address(rng) for _ in range(n)],
        ports=rng.choice([(8080,), (("grpc", 9090),), (8080, ("http-8080", 8081))]),
        pods=[rng.choice([None, *PODS]) for _ in range(n)],
        name=f"slice{rng.randrange(5)}",
        ready=rng.random() < 0.8,
    )
    if rng.random() < 0.05:
        del doc["metadata"]["labels"][objects.SERVICE_NAME_LABEL]
    return doc


def _pod_ip(name: str) -> str:
    return f"10.0.9.{PODS.index(name) + 1}"


def _pod(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(PODS)
    doc = objects.pod(
        rng.choice(NAMESPACES[:2]),
        name,
        labels={"version": rng.choice(["v1", "v2"])},
        service_account=rng.choice(["default", "default", "web", "db"]),
        ip=_pod_ip(name),
    )
    # What a captured sidecar of it says of itself (Published).
    doc["metadata"]["uid"] = f"uid-{name}"
    return doc


def _namespace(rng: random.Random) -> dict[str, Any]:
    notes = rng.choice([{}, {"shoal.io/mtls": "permissive"}, {"shoal.io/mtls": "bad"}])
    return objects.namespace(rng.choice(NAMESPACES), annotations=notes)


def _traffic_route(rng: random.Random) -> dict[str, Any]:
    ns = rng.choice(NAMESPACES[:2])
    spec: dict[str, Any] = {
        "service": rng.choice(SERVICES),
        "rules": [
            {
                "backends": [
                    {"service": rng.choice(SERVICES), "weight": 50},
                    {"service": rng.choice(SERVICES), "weight": rng.choice([50, 40])},
                ],
                "timeout": "2s",
            }
        ],
    }
    if rng.random() < 0.3:
        spec["policy"] = {"outlier": {"consecutive5xx": 3}}
    return objects.traffic_route(ns, f"route{rng.randrange(3)}", spec)


def _gateway_route(rng: random.Random) -> dict[str, Any]:
    """An HTTPRoute or GRPCRoute on a Service of its namespace or, as a
    consumer route, of the other one; its backends may lack the port it
    names or not exist, and now and then it is refused whole."""
    ns = rng.choice(NAMESPACES[:2])
    grpc = rng.random() < 0.2
    port = 9090 if grpc else rng.choice([80, 8080])
    parent: dict[str, Any] = {"group": "", "kind": "Service", "name": rng.choice(SERVICES)}
    if rng.random() < 0.3:
        parent["namespace"] = rng.choice(NAMESPACES[:2])
    if rng.random() < 0.5:
        parent["port"] = port
    rule: dict[str, Any] = {
        "backendRefs": [
            {"name": rng.choice(SERVICES), "port": port, "weight": rng.choice([1, 9])}
            for _ in range(rng.choice([1, 2]))
        ]
    }
    if not grpc:
        rule["matches"] = [{"path": {"type": "PathPrefix", "value": rng.choice(["/", "/a"])}}]
        if rng.random() < 0.1:
            rule["timeouts"] = {"request": "soon"}
    kind = "GRPCRoute" if grpc else "HTTPRoute"
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {
            "name": f"{kind.lower()}{rng.randrange(3)}",
            "namespace": ns,
            "creationTimestamp": f"2026-01-0{rng.randrange(1, 4)}T00:00:00Z",
        },
        "spec": {"parentRefs": [parent], "rules": [rule]},
    }


MAKERS = (
    (_service, 6),
    (_slice, 6),
    (_pod, 3),
    (_namespace, 1),
    (lambda rng: objects.service_account(rng.choice(NAMESPACES), "web"), 1),
    (_traffic_route, 1),
    (_gateway_route, 2),
)


def _random_object(rng: random.Random) -> dict[str, Any]:
    makers, weights = zip(*MAKERS, strict=True)
    made: dict[str, Any] = rng.choices(makers, weights)[0](rng)
    return made


class Stores:
    """The incremental store and the reference, fed alike (as the
    registries feed a store: each object checked, then put)."""

    def __init__(self) -> None:
        self.new = store.ObjectStore()
        self.old = reference_store.ObjectStore()
        self.held: dict[str, dict[tuple[str, str, str], dict[str, Any]]] = {s: {} for s in SOURCES}

    def _parsed(self, doc: dict[str, Any]) -> manifests.KubeObject | None:
        try:
            obj = manifests.parse_object(doc)
            assert obj is not None
            self.new.check(obj)
        except manifests.ManifestError:
            return None
        return obj

    def put(self, source: str, doc: dict[str, Any]) -> None:
        obj = self._parsed(doc)
        if obj is None:
            return
        self.held[source][obj.key] = doc
        self.new.put(source, store.Sourced(obj, source))
        self.old.put(source, reference_store.Sourced(obj, source))

    def remove(self, source: str, key: tuple[str, str, str]) -> None:
        self.held[source].pop(key, None)
        self.new.remove(source, key)
        self.old.remove(source, key)

    def replace(self, source: str, docs: list[dict[str, Any]]) -> None:
        parsed = [o for o in map(self._parsed, docs) if o is not None]
        self.held[source] = {o.key: d for o, d in zip(parsed, docs, strict=False)}
        self.new.replace_source(source, [store.Sourced(o, source) for o in parsed])
        self.old.replace_source(source, [reference_store.Sourced(o, source) for o in parsed])


def _step(rng: random.Random, stores: Stores) -> None:
    roll = rng.random()
    source = "api" if rng.random() < 0.85 else rng.choice(SOURCES[1:])
    held = stores.held[source]
    if roll < 0.6:
        stores.put(source, _random_object(rng))
    elif roll < 0.8 and held:
        stores.remove(source, rng.choice(sorted(held)))
    elif roll < 0.9:
        # A file read again: some of its objects kept (the same objects or
        # equal ones parsed anew), some new, twice the same key at times.
        kept = [d for d in held.values() if rng.random() < 0.7]
        docs = kept + [_random_object(rng) for _ in range(rng.randrange(3))]
        if docs and rng.random() < 0.2:
            docs.append(docs[0])
        stores.replace(rng.choice(SOURCES[1:]), docs)
    elif held:
        # The same object again, unchanged: nothing may change.
        doc = held[rng.choice(sorted(held))]
        stores.put(source, doc)


def _same_state(a: mesh.MeshState, b: mesh.MeshState) -> None:
    assert dict(a.services) == dict(b.services)
    assert dict(a.endpoints) == dict(b.endpoints)
    assert dict(a.namespaces) == dict(b.namespaces)
    assert a.service_accounts == b.service_accounts
    assert dict(a.routes) == dict(b.routes)
    assert dict(a.pods) == dict(b.pods)


def _node(i: int, namespace: str, service: str) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            node.NAMESPACE: namespace,
            node.SERVICE: service,
            node.SERVICE_ACCOUNT: "default",
            node.APP_PORT: 8080,
            node.INBOUND_PORT: 15006,
            node.OUTBOUND_PORT: 15001 + i,
            node.INBOUND_ADDRESS: "127.0.0.1",
        }
    )
    return base_pb2.Node(id=f"p{i}", cluster=f"{service}.{namespace}", metadata=metadata)


def _captured_node(namespace: str, pod: str) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            node.INTERCEPTION_MODE: node.REDIRECT,
            node.NAMESPACE: namespace,
            node.POD_NAME: pod,
            node.POD_UID: f"uid-{pod}",
            node.POD_IP: _pod_ip(pod),
        }
    )
    return base_pb2.Node(id=f"sidecar~{_pod_ip(pod)}~{pod}.{namespace}", metadata=metadata)


def _proxyless_node(namespace: str, service: str) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({node.PROXYLESS: True, node.NAMESPACE: namespace, node.SERVICE: service})
    return base_pb2.Node(id=f"grpc-{service}", metadata=metadata)


class Published:
    """A controller, and the proxies whose snapshots it sets: sidecars of
    Services, sidecars of captured Pods and a proxyless client."""

    def __init__(self, certificates: workloads.WorkloadCertificates | None = None) -> None:
        self.certificates = certificates
        self.cache = cache.SnapshotCache(controller.Controller.key_of)
        self.ctl = controller.Controller(
            self.cache, debounce.Debouncer(0.1, 1.0), certificates=certificates
        )
        proxies = [("ns0", "svc0"), ("ns0", "svc3"), ("ns1", "svc1"), ("ns2", "svc2")]
        nodes = [_node(i, ns, svc) for i, (ns, svc) in enumerate(proxies)]
        captured = [("ns0", "pod1"), ("ns1", "pod2"), ("ns0", "pod3"), ("ns1", "pod4")]
        nodes += [_captured_node(ns, pod) for ns, pod in captured]
        nodes.append(_proxyless_node("ns1", "svc4"))
        for n in nodes:
            self.cache.watch(cache.Client(n), asyncio.Event())

    def publish(
        self, state: mesh.MeshState, reasons: collections.Counter[str] | None = None
    ) -> dict[str, set[tuple[str, str, str]] | None]:
        self.ctl.update(state)
        self.ctl.rebuild(reasons)
        out: dict[str, set[tuple[str, str, str]] | None] = {}
        for key in self.cache.watched_keys():
            snapshot = self.cache.get(key)
            if (
                snapshot is not None
                and snapshot.label == f"mesh version {state.version}"
                and isinstance(self.ctl.proxy_of(key), proxy.Sidecar)
            ):
                _same_outbound_routes(self.ctl, key, snapshot, state)
            out[key] = (
                None
                if snapshot is None
                else {
                    (t, r.name, r.version)
                    for t, groups in snapshot.groups.items()
                    for g in groups
                    for r in g
                }
            )
        return out


def _same_outbound_routes(
    ctl: controller.Controller, key: str, snapshot: cache.Snapshot, state: mesh.MeshState
) -> None:
    """The outbound route table, assembled from parts, is what translating
    it whole encodes, and names the same clusters."""
    p = ctl.proxy_of(key)
    assert isinstance(p, proxy.Sidecar)
    shared = ctl._shared
    assert shared is not None
    own = state.services.get(p.service_key)
    visible = shared.visible(shared.scope(p.namespace, own.dependencies if own else None))
    whole = sidecar.outbound_routes(p.namespace, visible, state)
    found = snapshot.get(resources.ROUTE, names.OUTBOUND_ROUTE)
    assert found is not None
    assert found.body == whole.SerializeToString(deterministic=True)
    assert found.refs == refs.of(whole)


def _mutual_tls() -> workloads.WorkloadCertificates:
    return workloads.WorkloadCertificates(ca.Authority(ca.new_root("cluster.local")))


@pytest.mark.parametrize("seed", range(6))
def test_incremental_builds_equal_full_builds(seed: int) -> None:
    rng = random.Random(seed)
    stores = Stores()
    # Half with mutual TLS: who is behind a Service is then in its clusters.
    certificates = _mutual_tls() if seed % 2 else None
    published = Published(certificates)
    last = mesh.MeshState()
    for _ in range(120):
        for _ in range(rng.choice([1, 1, 1, 2, 5])):
            _step(rng, stores)
        new_state, new_found = stores.new.build()
        old_state, old_found = stores.old.build()
        _same_state(new_state, old_state)
        assert new_found == old_found
        assert stores.new.route_status == stores.old.route_status
        # What the registry says changed is what a comparison of every key finds.
        assert changes.between(last, new_state) == changes.between(
            last, dataclasses.replace(new_state, delta=None)
        )
        if rng.random() < 0.3:
            continue  # the controller skips a state (a debounced burst)
        last = new_state
        fresh = Published(certificates)
        want = fresh.publish(old_state)
        got = published.publish(new_state)
        # A snapshot that refers to something missing is not published: the
        # long-lived controller keeps the last one, a fresh one has none.
        assert {k: v for k, v in got.items() if want[k] is not None} == {
            k: v for k, v in want.items() if v is not None
        }
        assert published.ctl.problems == fresh.ctl.problems


def test_an_unchanged_service_keeps_its_objects() -> None:
    """What did not change is the very object of the last state, so that
    translation finds it by identity."""
    stores = Stores()
    stores.put("api", objects.service("ns0", "web"))
    stores.put("api", objects.service("ns0", "db", annotations={"shoal.io/timeout": "2s"}))
    stores.put("api", objects.endpoint_slice("ns0", "web", name="web-1"))
    first, _ = stores.new.build()
    stores.put("api", objects.service("ns0", "db", annotations={"shoal.io/timeout": "3s"}))
    second, _ = stores.new.build()
    web = mesh.ServiceKey("ns0", "web")
    assert second.services[web] is first.services[web]
    assert second.endpoints is first.endpoints
    assert second.routes[mesh.ServiceKey("ns0", "db")].timeout_s == 3.0


def test_a_first_build_keeps_the_order_of_the_sources() -> None:
    """The maps of a state list what a build of everything lists, in the
    same order, whatever the process's hashes."""
    stores = Stores()
    rng = random.Random(7)
    names = [f"s{i}" for i in range(200)]
    rng.shuffle(names)
    for name in names:
        source, ns = rng.choice(SOURCES), rng.choice(NAMESPACES)
        stores.put(source, objects.service(ns, name))
        stores.put(source, objects.endpoint_slice(ns, name, name=f"{name}-x"))
        stores.put(source, objects.pod(ns, f"{name}-0"))
    new, _ = stores.new.build()
    old, _ = stores.old.build()
    for mapping in ("services", "endpoints", "namespaces", "pods"):
        assert list(getattr(new, mapping)) == list(getattr(old, mapping)), mapping


def test_endpoints_alone_keep_each_sidecars_own_resources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A push of endpoints alone (most pushes) hands every sidecar its own
    listeners as they were, without working out what they are built from;
    a change of its Service builds them again."""
    stores = Stores()
    stores.put("api", objects.service("ns0", "svc0"))
    stores.put("api", objects.endpoint_slice("ns0", "svc0", name="svc0-1"))
    published = Published()
    published.publish(stores.new.build()[0])
    key = published.cache.watched_keys()[0]

    def listeners() -> cache.ResourceGroup:
        snapshot = published.cache.get(key)
        assert snapshot is not None
        return snapshot.groups[resources.LISTENER][0]

    before = listeners()
    observed: list[object] = []
    real_observe = sidecar.observe

    def counting_observe(*args: Any) -> Any:
        observed.append(args)
        return real_observe(*args)

    monkeypatch.setattr(sidecar, "observe", counting_observe)
    stores.put("api", objects.endpoint_slice("ns0", "svc0", name="svc0-1", addresses=["10.1.2.3"]))
    state = stores.new.build()[0]
    published.publish(state)
    snapshot = published.cache.get(key)
    assert snapshot is not None and snapshot.label == f"mesh version {state.version}"
    assert listeners() is before
    assert observed == []

    stores.put("api", objects.service("ns0", "svc0", annotations={"shoal.io/access-log": "on"}))
    published.publish(stores.new.build()[0])
    assert observed, "a change of its Service works its inputs out again"
    assert listeners() is not before


# -- pushes of endpoints alone: the last snapshots with the groups swapped ----


def _captured_mesh(stores: Stores) -> None:
    """Sidecars' Services, and Pod pod1 of ns0 (a captured sidecar of
    Published) behind svc0, with a headless Service beside them."""
    stores.put("api", _pod_doc("ns0", "pod1"))
    for name in ("svc0", "svc1", "svc2", "svc3"):
        stores.put("api", objects.service("ns0", name, cluster_ip="10.96.0.1"))
    stores.put("api", objects.service("ns2", "svc2", cluster_ip="10.96.0.2"))
    stores.put("api", objects.service("ns1", "svc1", cluster_ip="10.96.0.3"))
    stores.put("api", objects.service("ns0", "db", ports=[("tcp-db", 5432)], cluster_ip="None"))
    stores.put("api", _slice_doc("svc0", "10.0.1.1", "pod1"))
    stores.put("api", _slice_doc("db", "10.0.2.1", None, port=("tcp-db", 5432)))


def _pod_doc(namespace: str, name: str) -> dict[str, Any]:
    doc = objects.pod(namespace, name, ip=_pod_ip(name))
    doc["metadata"]["uid"] = f"uid-{name}"
    return doc


def _slice_doc(
    service: str,
    address: str,
    pod: str | None,
    *,
    ready: bool = True,
    port: int | tuple[str, int] = 8080,
) -> dict[str, Any]:
    return objects.endpoint_slice(
        "ns0",
        service,
        addresses=[address],
        pods=[pod],
        ports=[port],
        ready=ready,
        name=f"{service}-1",
    )


def _push(published: Published, stores: Stores) -> tuple[dict[str, Any], dict[str, Any], int]:
    """What the long-lived controller publishes for the store's state, what
    a fresh one does, and how many proxies the push swapped groups for."""
    state = stores.new.build()[0]
    got = published.publish(state)
    want = Published(published.certificates).publish(state)
    return got, want, published.ctl.recent_pushes[-1].repointed


@pytest.mark.parametrize("mtls", [False, True], ids=["plain", "mtls"])
def test_endpoints_alone_are_swapped_into_every_proxys_last_snapshot(mtls: bool) -> None:
    stores = Stores()
    _captured_mesh(stores)
    published = Published(_mutual_tls() if mtls else None)
    got, want, _ = _push(published, stores)
    configured = [k for k, v in got.items() if v is not None]
    assert any(k.startswith("pod/ns0/pod1/") for k in configured)
    assert any(k.startswith("proxyless/") for k in configured)

    # The same Pod at another address, then not ready: what a fresh
    # controller builds, without generating any proxy's configuration again.
    for address, ready in (("10.0.1.2", True), ("10.0.1.2", False)):
        stores.put("api", _slice_doc("svc0", address, "pod1", ready=ready))
        got, want, repointed = _push(published, stores)
        assert got == want
        assert repointed == len(configured)


def test_a_moved_headless_endpoint_is_generated_again_for_captured_sidecars() -> None:
    """A captured sidecar's outbound listener matches a headless Service's
    endpoints by address: not a group that can be swapped."""
    stores = Stores()
    _captured_mesh(stores)
    published = Published()
    _push(published, stores)
    stores.put("api", _slice_doc("db", "10.0.2.2", None, port=("tcp-db", 5432)))
    got, want, repointed = _push(published, stores)
    assert got == want
    assert repointed == 0


def test_a_pod_behind_another_service_is_generated_again_for_captured_sidecars() -> None:
    """Which Service ports a Pod serves is read from the endpoints: its
    captured sidecar's inbound listener and scope follow."""
    stores = Stores()
    _captured_mesh(stores)
    stores.put("api", _slice_doc("svc1", "10.0.3.1", None))
    published = Published()
    _push(published, stores)
    stores.put("api", _slice_doc("svc1", "10.0.3.1", "pod1"))
    got, want, repointed = _push(published, stores)
    assert got == want
    assert repointed == 0


def test_another_service_account_behind_a_service_is_generated_again() -> None:
    """With mutual TLS a Service's clusters name the identities behind it,
    read from its endpoints' Pods: its clusters change, not only endpoints."""
    stores = Stores()
    _captured_mesh(stores)
    for name, account in (("pod5", "default"), ("pod6", "web")):
        doc = _pod_doc("ns0", name)
        doc["spec"]["serviceAccountName"] = account
        stores.put("api", doc)
    stores.put("api", _slice_doc("svc2", "10.0.4.1", "pod5"))
    published = Published(_mutual_tls())
    _push(published, stores)
    stores.put("api", _slice_doc("svc2", "10.0.4.2", "pod6"))
    got, want, repointed = _push(published, stores)
    assert got == want
    assert repointed == 0


def test_certificates_renewed_in_the_same_burst_are_generated_again() -> None:
    """A burst that renewed certificates as endpoints moved: the new
    certificates are read by generating, not found in the last snapshots."""
    stores = Stores()
    _captured_mesh(stores)
    certificates = _mutual_tls()
    published = Published(certificates)
    _push(published, stores)
    certificates.set_authority(certificates.authority, reissue=True)
    stores.put("api", _slice_doc("svc0", "10.0.1.2", "pod1"))
    state = stores.new.build()[0]
    burst = collections.Counter({controller.MESH_CHANGED: 1, "certificates renewed": 1})
    got = published.publish(state, burst)
    assert got == Published(certificates).publish(state)
    assert published.ctl.recent_pushes[-1].repointed == 0


def test_what_a_traffic_route_overrides_follows_the_annotations_route() -> None:
    """Service svc1's annotations route through svc2 and a TrafficRoute
    overrides them, which is reported; svc2 goes, and with it what the
    annotations said: nothing of svc1's TrafficRoute changed, yet what is
    reported of it does."""
    stores = Stores()
    split = {"shoal.io/split": "svc1=90,svc2=10"}
    stores.put("api", objects.service("ns0", "svc1", annotations=split))
    stores.put("api", objects.service("ns0", "svc2"))
    rules = [{"backends": [{"service": "svc1", "weight": 100}]}]
    stores.put("api", objects.traffic_route("ns0", "r", {"service": "svc1", "rules": rules}))
    for step in range(2):
        if step:
            stores.remove("api", ("Service", "ns0", "svc2"))
        new_state, new_found = stores.new.build()
        old_state, old_found = stores.old.build()
        _same_state(new_state, old_state)
        assert new_found == old_found
        overrides = [p for p in new_found if "takes precedence" in p.reason]
        assert len(overrides) == (0 if step else 1), new_found
