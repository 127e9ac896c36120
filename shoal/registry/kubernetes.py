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

The `kubernetes` package is used for what it is good at here: reading
kubeconfig and in-cluster configuration (contexts, exec plugins, rotating
service-account tokens). Requests go through aiohttp, since the package's
client is synchronous (a thread per watch) and its typed models cost
seconds per ten thousand objects; the JSON is read as it is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from shoal.model import mesh, problems
from shoal.registry import manifests, store

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
        group_version = self.api_version
        base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        path = (
            f"{base}/namespaces/{namespace}/{self.plural}"
            if namespace
            else (f"{base}/{self.plural}")
        )
        return f"{path}/{name}" if name else path


KINDS = (
    Kind(manifests.NAMESPACE, "namespaces", namespaced=False),
    Kind(manifests.SERVICE, "services"),
    Kind(manifests.ENDPOINT_SLICE, "endpointslices"),
    Kind(manifests.POD, "pods"),
    Kind(manifests.SERVICE_ACCOUNT, "serviceaccounts"),
    Kind(manifests.TRAFFIC_ROUTE, "trafficroutes", optional=True),
)


class ApiError(Exception):
    """A Kubernetes API answer other than success, with its Status."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class Expired(ApiError):
    """410 Gone: the resourceVersion asked for is older than the server keeps."""


@dataclass(frozen=True)
class Endpoint:
    """How to reach the API server and prove who we are."""

    url: str
    ssl: ssl.SSLContext | bool
    # Called per request: projected service-account tokens rotate.
    authorization: Callable[[], str | None] = lambda: None
    namespace: str = "default"


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def connect(
    kubeconfig: str | None = None,
    context: str | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> Endpoint:
    """In-cluster configuration when running in a Pod (and no kubeconfig is
    named), else kubeconfig (KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client
    from kubernetes.config import incluster_config, kube_config

    # The package's loaders carry no type hints.
    in_cluster: Any = incluster_config
    from_file: Any = kube_config
    cfg = client.Configuration()
    namespace = "default"
    if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in environ:
        # The token file is re-read as it rotates (projected tokens last an
        # hour): the loader installs a refresh hook that authorization() runs.
        in_cluster.InClusterConfigLoader(
            token_filename=os.path.join(service_account_dir, "token"),
            cert_filename=os.path.join(service_account_dir, "ca.crt"),
            environ=environ,
        ).load_and_set(client_configuration=cfg)
        with (
            contextlib.suppress(OSError),
            open(os.path.join(service_account_dir, "namespace")) as f,
        ):
            namespace = f.read().strip() or namespace
    else:
        from_file.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=cfg
        )
        with contextlib.suppress(Exception):
            contexts, active = from_file.list_kube_config_contexts(config_file=kubeconfig)
            if context is not None:
                active = next(c for c in contexts if c["name"] == context)
            namespace = active["context"].get("namespace") or namespace
    namespace = environ.get("POD_NAMESPACE", namespace)
    tls: ssl.SSLContext | bool = False
    if cfg.host.startswith("https"):
        if cfg.verify_ssl:
            tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        else:
            tls = ssl.create_default_context()
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            tls.load_cert_chain(cfg.cert_file, cfg.key_file)

    def authorization() -> str | None:
        # auth_settings() runs the loader's refresh hook (rotated tokens,
        # exec plugins) and says what goes in the Authorization header.
        settings: Any = cfg.auth_settings()
        value = (settings.get("BearerToken") or {}).get("value")
        return str(value) if value else None

    return Endpoint(cfg.host.rstrip("/"), tls, authorization, namespace)


class Backoff:
    """Exponential backoff with jitter, shared by every caller of one API
    server: while it is down, one caller at a time probes it, and the others
    go on as soon as a probe gets through."""

    def __init__(
        self,
        *,
        initial: float = 0.5,
        # Low for a backoff: an API server that is back must be noticed within
        # seconds (objects deleted meanwhile must leave the mesh). One probe
        # at a time for all watches keeps that to ~15 requests a minute.
        maximum: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._failures = 0
        self._next_try = 0.0
        self._recovered = asyncio.Event()
        self.down_since: float | None = None
        self.last_error = ""

    @property
    def up(self) -> bool:
        return self.down_since is None

    def delay(self) -> float:
        """The wait after the current run of failures: doubling, capped,
        jittered down by up to a fifth so replicas spread out."""
        return self._base(self._failures) * self._rng.uniform(1.0 - self.JITTER, 1.0)

    JITTER = 0.2

    def _base(self, failures: int) -> float:
        return float(min(self.maximum, self.initial * 2.0 ** max(0, failures - 1)))

    def most_probes(self, seconds: float) -> int:
        """The most probes this backoff lets through in `seconds` of an
        outage, its shortest jittered waits between them: what one API
        server sees from a replica, however many watches it has."""
        probes, elapsed = 1, 0.0
        while True:
            elapsed += self._base(probes) * (1.0 - self.JITTER)
            if elapsed > seconds:
                return probes
            probes += 1

    def failed(self, error: str) -> None:
        self._failures += 1
        now = self._clock()
        if self.down_since is None:
            self.down_since = now
        self.last_error = error
        self._recovered.clear()
        self._next_try = now + self.delay()

    def succeeded(self) -> None:
        if self._failures or self.down_since is not None:
            self._failures = 0
            self.down_since = None
            self.last_error = ""
            self._recovered.set()

    async def wait_turn(self) -> None:
        """Return when a request may be made: at once while all is well;
        while failing, when the backoff has passed (the caller then probes,
        and the next slot is taken, so the others wait for its outcome)."""
        while self._failures:
            now = self._clock()
            if now >= self._next_try:
                self._next_try = now + self.delay()
                return
            sleeper = asyncio.ensure_future(self._sleep(self._next_try - now))
            recovered = asyncio.ensure_future(self._recovered.wait())
            try:
                await asyncio.wait({sleeper, recovered}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                recovered.cancel()


class Api:
    """The few calls shoal makes, over one aiohttp session."""

    def __init__(self, endpoint: Endpoint, backoff: Backoff | None = None) -> None:
        self.endpoint = endpoint
        self.backoff = backoff or Backoff()
        self._session: aiohttp.ClientSession | None = None
        self.requests_total = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.endpoint.ssl, limit=0),
                headers={"Accept": "application/json"},
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {}
        token = self.endpoint.authorization()
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: aiohttp.ClientTimeout,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        self.requests_total += 1
        async with self._http().request(
            method,
            self.endpoint.url + path,
            params=params,
            data=json.dumps(body) if body is not None else None,
            headers=self._headers(content_type if body is not None else None),
            timeout=timeout,
        ) as response:
            if response.status >= 400:
                raise await _error(response)
            # An answer, not just a connection: only that ends a backoff.
            self.backoff.succeeded()
            yield response

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        async with self._request(
            method,
            path,
            params=params,
            body=body,
            content_type=content_type,
            timeout=aiohttp.ClientTimeout(total=30, sock_connect=10),
        ) as response:
            data: dict[str, Any] = await response.json(content_type=None)
            return data

    async def watch(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events, one JSON object per line, until the server ends the
        stream. A silent stream (no event, no bookmark) for `read_timeout`
        is taken for a dead one."""
        async with self._request(
            "GET",
            path,
            params={**params, "watch": "true"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout),
        ) as response:
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)


async def _error(response: aiohttp.ClientResponse) -> ApiError:
    try:
        status = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        status = {}
    status = status if isinstance(status, dict) else {}
    reason = str(status.get("reason") or response.reason or "")
    message = str(status.get("message") or "")
    cls = Expired if response.status == 410 else ApiError
    return cls(response.status, reason, message)


async def shared_secret(
    api: Api, namespace: str, name: str, make: Callable[[], dict[str, bytes]]
) -> tuple[dict[str, bytes], bool]:
    """A Secret every replica agrees on: read it, or create it from `make()`
    if absent. Two replicas starting together both try to create it; the
    API server lets one win (409 AlreadyExists for the other), which then
    reads the winner's. True if this call created it."""
    kind = Kind(("v1", "Secret"), "secrets")
    for _ in range(5):
        try:
            found = await api.call("GET", kind.path(namespace, name))
            return _secret_data(found), False
        except ApiError as err:
            if err.code != 404:
                raise
        data = make()
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "shoal"}},
            "type": "kubernetes.io/tls",
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        try:
            await api.call("POST", kind.path(namespace), body=body)
            return data, True
        except ApiError as err:
            if err.code != 409:
                raise
    raise ApiError(409, "Conflict", f"Secret {namespace}/{name} could not be read or created")


SECRETS = Kind(("v1", "Secret"), "secrets")
LEASES = Kind(("coordination.k8s.io/v1", "Lease"), "leases")


async def read_secret(api: Api, namespace: str, name: str) -> tuple[dict[str, bytes], str]:
    """A Secret's data and the resourceVersion to update it from."""
    found = await api.call("GET", SECRETS.path(namespace, name))
    return _secret_data(found), _resource_version(found)


async def replace_secret(
    api: Api, namespace: str, name: str, data: Mapping[str, bytes], resource_version: str
) -> str:
    """Replace a Secret's data if it is still at `resource_version` (409
    otherwise: someone else wrote it since it was read)."""
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": resource_version,
            "labels": {"app": "shoal"},
        },
        "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }
    written = await api.call("PUT", SECRETS.path(namespace, name), body=body)
    return _resource_version(written)


class Lease:
    """A coordination.k8s.io Lease: work that must run on one replica at a
    time runs while holding it. Taken only if free, expired or ours, and
    written with the resourceVersion read, so two replicas cannot both win."""

    def __init__(
        self,
        api: Api,
        namespace: str,
        name: str,
        holder: str,
        *,
        duration_s: int = 30,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.holder = holder
        self.duration_s = duration_s
        self._now = now

    def _stamp(self) -> str:
        return self._now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _spec(self, acquired: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": acquired,
            "renewTime": self._stamp(),
            "leaseTransitions": transitions,
        }

    async def acquire(self) -> str | None:
        """None once held; else who holds it."""
        path = LEASES.path(self.namespace, self.name)
        try:
            current = await self.api.call("GET", path)
        except ApiError as err:
            if err.code != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(self._stamp(), 0),
            }
            try:
                await self.api.call("POST", LEASES.path(self.namespace), body=body)
                return None
            except ApiError as conflict:
                if conflict.code != 409:
                    raise
                current = await self.api.call("GET", path)
        spec = current.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.holder and not self._expired(spec):
            return str(holder)
        transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.holder)
        acquired = spec.get("acquireTime") if holder == self.holder else self._stamp()
        current["spec"] = self._spec(str(acquired or self._stamp()), transitions)
        try:
            await self.api.call("PUT", path, body=current)
        except ApiError as err:
            if err.code == 409:
                return "another replica (it took the lease first)"
            raise
        return None

    async def release(self) -> None:
        path = LEASES.path(self.namespace, self.name)
        current = await self.api.call("GET", path)
        spec = current.get("spec") or {}
        if spec.get("holderIdentity") != self.holder:
            return
        spec["holderIdentity"] = None
        current["spec"] = spec
        with contextlib.suppress(ApiError):
            await self.api.call("PUT", path, body=current)

    def _expired(self, spec: Mapping[str, Any]) -> bool:
        renewed = spec.get("renewTime")
        if not isinstance(renewed, str):
            return True
        try:
            at = datetime.datetime.strptime(renewed, "%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            at = datetime.datetime.strptime(renewed, "%Y-%m-%dT%H:%M:%SZ")
        duration = int(spec.get("leaseDurationSeconds") or self.duration_s)
        expires = at.replace(tzinfo=datetime.UTC) + datetime.timedelta(seconds=duration)
        return self._now() > expires


def _secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    data = secret.get("data") or {}
    return {k: base64.b64decode(v) for k, v in data.items() if isinstance(v, str)}


# -- objects ----------------------------------------------------------------------------

_POD_SPEC_KEEP = ("serviceAccountName", "serviceAccount")
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


def trimmed(kind: Kind, obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the mesh reads of an object, and its type, which list items lack.

    Pods carry their whole spec and status; ten thousand of them would be
    most of the control plane's memory for a service account and an IP."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    out = dict(obj)
    out["apiVersion"], out["kind"] = kind.type
    out["metadata"] = {k: meta[k] for k in _METADATA_KEEP if k in meta}
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    assert isinstance(spec, Mapping)
    if kind.type == manifests.POD:
        status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
        assert isinstance(status, Mapping)
        out["spec"] = {k: spec[k] for k in _POD_SPEC_KEEP if k in spec}
        out["status"] = {"podIP": status["podIP"]} if "podIP" in status else {}
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


def _resource_version(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) else ""


@dataclass
class Stats:
    """Counted for metrics and for tests: what the reflectors did."""

    lists: int = 0
    relists_after_expiry: int = 0
    watches: int = 0
    events: int = 0
    errors: int = 0


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
            except Expired:
                self.registry.stats.relists_after_expiry += 1
                log.info(
                    "%s: resourceVersion %s expired; listing again",
                    self.name,
                    self.resource_version,
                )
                self.resource_version = ""
            except ApiError as err:
                if err.code == 404 and self.kind.optional:
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
        items: list[dict[str, Any]] = []
        params = {"limit": str(self.page_size)}
        while True:
            try:
                page = await api.call("GET", self.kind.path(self.namespace), params=params)
            except Expired as err:
                # A continue token outlived the server's history: an error
                # (backed off), not a reason to list again at once.
                raise ApiError(err.code, err.reason, err.message) from err
            self.registry.stats.lists += 1
            items.extend(trimmed(self.kind, i) for i in page.get("items") or ())
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
            params = {"limit": str(self.page_size), "continue": token}
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
            assert isinstance(obj, dict)
            if kind == "ERROR":
                code = obj.get("code")
                raise (Expired if code == 410 else ApiError)(
                    int(code) if isinstance(code, int) else 500,
                    str(obj.get("reason") or ""),
                    str(obj.get("message") or ""),
                )
            rv = _resource_version(obj)
            if kind == "BOOKMARK":
                self.resource_version = rv or self.resource_version
                continue
            if kind not in ("ADDED", "MODIFIED", "DELETED"):
                continue
            self.registry.stats.events += 1
            self.registry.apply(self, kind, trimmed(self.kind, obj))
            self.resource_version = rv or self.resource_version
        return progressed


class KubernetesRegistry:
    """Everything the reflectors see, as a MeshState, rebuilt per burst."""

    def __init__(
        self,
        api: Api,
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

    def replace(self, reflector: Reflector, items: list[dict[str, Any]]) -> None:
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
            if previous is not None and _resource_version(previous.obj.body) == _resource_version(
                obj
            ):
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
        for problem in self._build_problems:
            log.warning("kubernetes: %s", problem)
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
