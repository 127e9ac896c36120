"""The Kubernetes API server as the mesh registry, watched as client-go's
informers watch it.

Per kind (and namespace, with `--namespaces`), a reflector lists, then
watches from the list's resourceVersion with bookmarks, resumes from the
last resourceVersion it saw when a stream drops, and lists again (replacing
what it had, so objects deleted meanwhile leave the mesh) when the server
answers 410 Gone. Every failure backs off exponentially with jitter, shared
by all reflectors, so an unreachable API server gets a handful of requests
a minute, not a loop. Objects go into the same ObjectStore the manifests
folder uses: one code path for annotations and TrafficRoutes.

Talking to the API server (configuration, requests, paging, watch streams,
errors, backoff) is shoal.kube's; this module is what the mesh makes of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from shoal import kube
from shoal.model import mesh, problems
from shoal.registry import gatewayapi, manifests, problemlog, store

log = logging.getLogger(__name__)

SOURCE = "kubernetes"


@dataclass(frozen=True)
class Kind:
    """One kind the mesh watches, and where the API serves it."""

    type: tuple[str, str]  # (apiVersion, kind)
    plural: str
    namespaced: bool = True
    # Absent without harm: a cluster without shoal's CRD has no TrafficRoutes.
    optional: bool = False

    @property
    def api_version(self) -> str:
        return self.type[0]

    @property
    def kind(self) -> str:
        return self.type[1]

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        return kube.resource_path(self.api_version, self.plural, namespace, name)


KINDS = (
    Kind(manifests.NAMESPACE, "namespaces", namespaced=False),
    Kind(manifests.SERVICE, "services"),
    Kind(manifests.ENDPOINT_SLICE, "endpointslices"),
    Kind(manifests.POD, "pods"),
    Kind(manifests.SERVICE_ACCOUNT, "serviceaccounts"),
    Kind(manifests.TRAFFIC_ROUTE, "trafficroutes", optional=True),
    # Absent unless the user installed the Gateway API's CRDs.
    Kind(manifests.HTTP_ROUTE, "httproutes", optional=True),
    Kind(manifests.GRPC_ROUTE, "grpcroutes", optional=True),
)


# -- objects ----------------------------------------------------------------------------

_POD_SPEC_KEEP = ("serviceAccountName", "serviceAccount", "hostNetwork")
_POD_STATUS_KEEP = ("podIP", "phase")
_SERVICE_SPEC_KEEP = ("ports", "clusterIP")
_METADATA_KEEP = (
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "resourceVersion",
    "deletionTimestamp",
)


def trimmed(kind: Kind, obj: Mapping[str, Any]) -> kube.bodies.RawObject:
    """What the mesh reads of an object, and its type, which list items lack.

    Pods carry their whole spec and status; ten thousand of them would be
    most of the control plane's memory for a service account and an IP."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    out = dict(obj)
    out["apiVersion"], out["kind"] = kind.type
    out["metadata"] = {k: meta[k] for k in _METADATA_KEEP if k in meta}
    if kind.type in manifests.GATEWAY_ROUTES:
        # Ties between routes go to the oldest (the Gateway API's rule).
        for k in ("creationTimestamp", "generation"):
            if k in meta:
                out["metadata"][k] = meta[k]
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    assert isinstance(spec, Mapping)
    if kind.type == manifests.POD:
        status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
        assert isinstance(status, Mapping)
        out["spec"] = {k: spec[k] for k in _POD_SPEC_KEEP if k in spec}
        # Of its containers, only their names: whether shoal's proxy is one.
        for k in ("containers", "initContainers"):
            if isinstance(spec.get(k), list):
                out["spec"][k] = [
                    {"name": c.get("name")} for c in spec[k] if isinstance(c, Mapping)
                ]
        out["status"] = {k: status[k] for k in _POD_STATUS_KEEP if k in status}
    elif kind.type == manifests.SERVICE:
        out["spec"] = {k: spec[k] for k in _SERVICE_SPEC_KEEP if k in spec}
    elif kind.type == manifests.ENDPOINT_SLICE:
        # Most of a slice is per-endpoint detail the mesh does not read
        # (nodeName, hints, conditions other than ready, all but the first
        # address): at a hundred thousand endpoints, most of the memory.
        endpoints = obj.get("endpoints")
        if isinstance(endpoints, list):
            out["endpoints"] = [_endpoint_kept(e) for e in endpoints]
    return out


def _endpoint_kept(endpoint: Any) -> Any:
    if not isinstance(endpoint, Mapping):
        return endpoint  # left for the mesh to report
    kept: dict[str, Any] = {}
    addresses = endpoint.get("addresses")
    kept["addresses"] = addresses[:1] if isinstance(addresses, list) else addresses
    conditions = endpoint.get("conditions")
    if isinstance(conditions, Mapping) and "ready" in conditions:
        kept["conditions"] = {"ready": conditions["ready"]}
    target = endpoint.get("targetRef")
    if isinstance(target, Mapping):
        kept["targetRef"] = {k: target[k] for k in ("kind", "name") if k in target}
    if "zone" in endpoint:
        kept["zone"] = endpoint["zone"]
    return kept


@dataclass
class Stats:
    """Counted for metrics and for tests: what the reflectors did."""

    lists: int = 0
    relists_after_expiry: int = 0
    watches: int = 0
    events: int = 0
    errors: int = 0
    # Watch events by (kind, ADDED/MODIFIED/DELETED): a handful of keys.
    events_by: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)


class Reflector:
    """Keeps one kind (in one namespace, or all) in step with the server."""

    def __init__(
        self,
        registry: KubernetesRegistry,
        kind: Kind,
        namespace: str | None,
        *,
        watch_timeout: tuple[float, float],
        page_size: int,
        rng: random.Random,
    ) -> None:
        self.registry = registry
        self.kind = kind
        self.namespace = namespace
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self._rng = rng
        self.resource_version = ""
        self.synced = False
        self.absent = False  # an optional kind the server does not serve

    @property
    def name(self) -> str:
        return f"{self.kind.plural}" + (f" in {self.namespace}" if self.namespace else "")

    async def run(self) -> None:
        api = self.registry.api
        while True:
            try:
                await api.backoff.wait_turn()
                if not self.resource_version:
                    await self._list()
                progressed = await self._watch()
                if not progressed:
                    # A server that ends watches at once must not be asked
                    # again at once: that would be a loop.
                    await self.registry.sleep(1.0)
            except kube.Gone:
                self.registry.stats.relists_after_expiry += 1
                log.info(
                    "%s: resourceVersion %s expired; listing again",
                    self.name,
                    self.resource_version,
                )
                self.resource_version = ""
            except kube.ApiError as err:
                if isinstance(err, kube.NotFound) and self.kind.optional:
                    api.backoff.succeeded()  # the server answered
                    if not self.absent:
                        log.warning(
                            "%s: not served by this cluster (%s); install its CRD to use it",
                            self.name,
                            err,
                        )
                        self.absent = self.synced = True
                        self.registry.changed()
                    await self.registry.sleep(api.backoff.maximum)
                    continue
                self._failed(f"{err}")
            except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as err:
                self._failed(f"{type(err).__name__}: {err}")

    def _failed(self, error: str) -> None:
        self.registry.stats.errors += 1
        api = self.registry.api
        first = api.backoff.up
        api.backoff.failed(f"{self.name}: {error}")
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "kubernetes API: %s: %s; retrying with backoff", self.name, error)
        self.registry.changed(health_only=True)

    async def _list(self) -> None:
        """A full list, page by page; then what it says replaces what we had."""
        with self.registry.quiet_gc():
            await self._list_pages()

    async def _list_pages(self) -> None:
        api = self.registry.api
        items: list[kube.bodies.RawObject] = []
        meta: kube.bodies.ListMeta = {}
        try:
            async for page in api.pages(self.kind.path(self.namespace), self.page_size):
                self.registry.stats.lists += 1
                items.extend(trimmed(self.kind, i) for i in page.get("items") or ())
                meta = page.get("metadata") or {}
        except kube.Gone as err:
            # A continue token outlived the server's history: an error
            # (backed off), not a reason to list again at once.
            raise kube.ApiError(err.code, err.reason, err.message) from err
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.registry.replace(self, items)
        self.synced = True
        self.absent = False
        log.info(
            "%s: listed %d at resourceVersion %s", self.name, len(items), self.resource_version
        )

    async def _watch(self) -> bool:
        """Events from our resourceVersion on; True if the stream carried any."""
        api = self.registry.api
        low, high = self.watch_timeout
        timeout = int(self._rng.uniform(low, high))
        params = {
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout),
        }
        self.registry.stats.watches += 1
        progressed = False
        async for event in api.watch(self.kind.path(self.namespace), params, timeout + 30):
            progressed = True
            kind = event.get("type")
            obj = event.get("object") if isinstance(event.get("object"), dict) else {}
            rv = kube.bodies.resource_version(obj)
            if kind == "BOOKMARK":
                self.resource_version = rv or self.resource_version
                continue
            if kind not in ("ADDED", "MODIFIED", "DELETED"):
                continue
            self.registry.stats.events += 1
            self.registry.stats.events_by[(self.kind.kind, kind)] += 1
            self.registry.apply(self, kind, trimmed(self.kind, obj))
            self.resource_version = rv or self.resource_version
        return progressed


class KubernetesRegistry:
    """Everything the reflectors see, as a MeshState, rebuilt per burst."""

    def __init__(
        self,
        api: kube.Api,
        *,
        namespaces: Iterable[str] | None = None,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        page_size: int = 500,
        coalesce: float = 0.02,
        ready_grace: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        kinds: Iterable[Kind] = KINDS,
        quiet_gc: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        """`quiet_gc` keeps the garbage collector out of a list and the build
        after it (see shoal/heap.py)."""
        self.api = api
        self.quiet_gc = quiet_gc
        self.namespaces = frozenset(namespaces) if namespaces else None
        self.sleep = sleep
        self._clock = clock
        self._coalesce = coalesce
        self._ready_grace = ready_grace
        self._store = store.ObjectStore()
        self._state = mesh.MeshState()
        self._object_problems: dict[tuple[str, str, str], problems.Problem] = {}
        self._build_problems: list[problems.Problem] = []
        self._problem_log = problemlog.ProblemLog(log, "problem")
        self._dirty = asyncio.Event()
        self._content_changed = False
        self.stats = Stats()
        rng = rng or random.Random()
        self.reflectors = [
            Reflector(self, kind, ns, watch_timeout=watch_timeout, page_size=page_size, rng=rng)
            for kind in kinds
            for ns in (sorted(self.namespaces) if self.namespaces and kind.namespaced else [None])
        ]

    # -- what the rest of shoal reads ---------------------------------------------------

    @property
    def state(self) -> mesh.MeshState:
        return self._state

    @property
    def route_status(self) -> dict[tuple[str, str, str], tuple[gatewayapi.ParentStatus, ...]]:
        """The Gateway API status of each route as of the last build."""
        return self._store.route_status

    @property
    def problems(self) -> list[problems.Problem]:
        return sorted(self._object_problems.values()) + self._build_problems

    @property
    def synced(self) -> bool:
        return all(r.synced for r in self.reflectors)

    def ready(self) -> tuple[bool, str]:
        """Ready once every kind is listed, while the API server answers (a
        replica that lost it keeps serving its last state, and says so)."""
        if not self.synced:
            waiting = ", ".join(r.name for r in self.reflectors if not r.synced)
            return False, f"waiting for the first list of {waiting}"
        backoff = self.api.backoff
        if backoff.down_since is not None:
            down_for = self._clock() - backoff.down_since
            if down_for >= self._ready_grace:
                return False, (
                    f"kubernetes API unreachable for {down_for:.0f}s "
                    f"({backoff.last_error}); serving the last state"
                )
        return True, "ready"

    def health(self) -> dict[str, Any]:
        backoff = self.api.backoff
        return {
            "api_up": backoff.up,
            "down_for_s": (
                round(self._clock() - backoff.down_since, 1)
                if backoff.down_since is not None
                else 0.0
            ),
            "last_error": backoff.last_error,
            "synced": self.synced,
            "lists": self.stats.lists,
            "relists_after_expiry": self.stats.relists_after_expiry,
            "watches": self.stats.watches,
            "events": self.stats.events,
            "errors": self.stats.errors,
            "requests": self.api.requests_total,
            "resource_versions": {r.name: r.resource_version for r in self.reflectors},
        }

    # -- what the reflectors do --------------------------------------------------------

    def _wanted(self, kind: Kind, obj: Mapping[str, Any]) -> bool:
        if self.namespaces is None:
            return True
        if kind.namespaced:
            meta = obj.get("metadata") or {}
            return meta.get("namespace") in self.namespaces
        return kind.type != manifests.NAMESPACE or (
            (obj.get("metadata") or {}).get("name") in self.namespaces
        )

    def _parse(self, obj: Mapping[str, Any]) -> manifests.KubeObject | None:
        """The object, or None (and the reason reported) if the mesh cannot
        use it; its last good version then stays in force."""
        try:
            parsed = manifests.parse_object(obj)
            if parsed is None:
                return None
            self._store.check(parsed)
        except manifests.ManifestError as err:
            key = manifests.key_of(obj)
            kept = self._store.objects(SOURCE).get(key) is not None
            self._object_problems[key] = problems.Problem(
                SOURCE,
                manifests.describe(obj),
                f"{err}; " + ("its last good version stays in force" if kept else "ignored"),
                store.code_of((obj.get("apiVersion"), obj.get("kind")), err),
            )
            log.warning("kubernetes object %s: %s", manifests.describe(obj), err)
            return None
        self._object_problems.pop(parsed.key, None)
        return parsed

    def apply(self, reflector: Reflector, event: str, obj: Mapping[str, Any]) -> None:
        if not self._wanted(reflector.kind, obj):
            return
        if event == "DELETED":
            key = manifests.key_of(obj)
            self._store.remove(SOURCE, key)
            self._object_problems.pop(key, None)
        else:
            parsed = self._parse(obj)
            if parsed is not None:
                self._store.put(SOURCE, store.Sourced(parsed, SOURCE))
        self.changed()

    def replace(self, reflector: Reflector, items: list[kube.bodies.RawObject]) -> None:
        """A fresh list: it replaces every object of its kind and namespace,
        so what was deleted while we were not watching goes too."""
        kind, namespace = reflector.kind.kind, reflector.namespace
        held = self._store.objects(SOURCE)
        listed = set()
        for obj in items:
            if not self._wanted(reflector.kind, obj):
                continue
            key = manifests.key_of(obj)
            listed.add(key)
            previous = held.get(key)
            if previous is not None and kube.bodies.resource_version(
                previous.obj.body
            ) == kube.bodies.resource_version(obj):
                continue  # unchanged: keep the very object, so nothing is redone
            parsed = self._parse(obj)
            if parsed is not None:
                self._store.put(SOURCE, store.Sourced(parsed, SOURCE))
        for key in held:
            if key[0] == kind and (namespace is None or key[1] == namespace) and key not in listed:
                self._store.remove(SOURCE, key)
                self._object_problems.pop(key, None)
        self.changed()

    def changed(self, *, health_only: bool = False) -> None:
        if not health_only:
            self._content_changed = True
        self._dirty.set()

    # -- running ----------------------------------------------------------------------

    def build(self) -> mesh.MeshState:
        self._state, self._build_problems = self._store.build()
        self._problem_log.update(self._build_problems)
        return self._state

    async def watch(self, on_change: Callable[[mesh.MeshState], None], stop: asyncio.Event) -> None:
        """Run the reflectors; hand each new state on, starting once every
        kind has been listed (never a half-listed mesh)."""
        tasks = [asyncio.create_task(r.run(), name=f"reflector {r.name}") for r in self.reflectors]
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                dirty = asyncio.create_task(self._dirty.wait())
                await asyncio.wait({dirty, stopping}, return_when=asyncio.FIRST_COMPLETED)
                dirty.cancel()
                if stop.is_set():
                    break
                # Events come in bursts (a Deployment rolling, a relist):
                # one build per burst, not per event.
                await self.sleep(self._coalesce)
                self._dirty.clear()
                if not self._content_changed or not self.synced:
                    continue
                self._content_changed = False
                try:
                    with self.quiet_gc():
                        state = self.build()
                    on_change(state)
                except Exception:
                    log.exception(
                        "building the mesh from kubernetes failed; keeping the last state"
                    )
        finally:
            stopping.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
