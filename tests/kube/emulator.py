"""A faithful in-memory Kubernetes API server, over real HTTP, for tests.

Behaviour follows the Kubernetes "API Concepts" page
(https://kubernetes.io/docs/reference/using-api/api-concepts/), whose sections
the comments cite. Where the page leaves a choice to the server, the emulator
does what kube-apiserver does and says so, because code that passes here must
meet the same edge cases in a cluster: list items without kind/apiVersion, 410
as a watch event inside an HTTP 200, writes that change nothing bumping
nothing, PUT without resourceVersion refused for Leases.

From a synchronous test, or one that points subprocesses at it:

    with running_emulator(bookmark_interval=0.2) as emu:
        emu.create(objects.namespace("demo"))
        kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")

From an async test, in the test's own event loop:

    emu = KubeEmulator()
    await emu.start()
    try:
        ...
    finally:
        await emu.stop()

Not emulated: authentication and authorization (everything is allowed),
admission webhooks, server-side apply, subresources (status, scale, ...),
finalizers and graceful deletion, dry-run, Table and Protobuf representations,
schema validation, managedFields, strategic-merge list semantics.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import copy
import datetime
import ipaddress
import json
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import jsonpatch
from aiohttp import web

JSON = dict[str, Any]
_T = TypeVar("_T")


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True, slots=True)
class Kind:
    """One resource type served (API Concepts, "Kubernetes API terminology")."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    # kube-apiserver strategy flags: a PUT to a missing object creates it
    # (Leases), a PUT must carry the resourceVersion (Leases, custom resources).
    create_on_update: bool = False
    unconditional_update: bool = True
    # A custom resource: no strategic merge patch, and list items keep their
    # kind/apiVersion (unstructured lists).
    custom: bool = False
    name_rule: Literal["subdomain", "label", "dns1035"] = "subdomain"
    # Field selectors beyond metadata.name and metadata.namespace.
    field_labels: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """How kube-apiserver names the resource in error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def prefix(self) -> str:
        # API Concepts, "Resource URIs": core resources live under /api and
        # omit the group segment.
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


KINDS: tuple[Kind, ...] = (
    Kind(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        name_rule="label",
        field_labels=("status.phase",),
    ),
    Kind(
        "",
        "v1",
        "services",
        "Service",
        True,
        name_rule="dns1035",
        field_labels=("spec.clusterIP", "spec.type"),
    ),
    Kind(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        field_labels=(
            "spec.nodeName",
            "spec.serviceAccountName",
            "spec.restartPolicy",
            "status.phase",
            "status.podIP",
        ),
    ),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", True),
    Kind("", "v1", "secrets", "Secret", True, field_labels=("type",)),
    Kind(
        "",
        "v1",
        "events",
        "Event",
        True,
        field_labels=(
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "reason",
            "type",
        ),
    ),
    Kind("", "v1", "configmaps", "ConfigMap", True),
    Kind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Kind(
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        True,
        create_on_update=True,
        unconditional_update=False,
    ),
    Kind(
        "shoal.io",
        "v1alpha1",
        "trafficroutes",
        "TrafficRoute",
        True,
        unconditional_update=False,
        custom=True,
    ),
    Kind(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        False,
    ),
)

# Present in every cluster: code that lists namespaces meets them.
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

SERVER_VERSION: JSON = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-shoal-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


# --------------------------------------------------------------------------- errors

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

# kube-apiserver's wording, which clients and people grep for.
OPTIMISTIC_LOCK_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def status_object(
    code: int, message: str, reason: str | None = None, details: Mapping[str, Any] | None = None
) -> JSON:
    """A failure `Status`, the body of every error the API returns."""
    body: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason if reason is not None else _REASONS.get(code, ""),
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


class KubeError(Exception):
    """An API error: what the server answers, as a `Status` object."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status_object(code, message, reason, details)
        self.headers = dict(headers or {})
        super().__init__(f"{code} {self.status['reason']}: {message}")

    @property
    def code(self) -> int:
        code: int = self.status["code"]
        return code

    @property
    def reason(self) -> str:
        reason: str = self.status["reason"]
        return reason


def _details(kind: Kind, name: str) -> JSON:
    out: JSON = {"name": name, "kind": kind.plural}
    if kind.group:
        out["group"] = kind.group
    return out


def _not_found(kind: Kind, name: str) -> KubeError:
    return KubeError(404, f'{kind.group_resource} "{name}" not found', details=_details(kind, name))


def _conflict(kind: Kind, name: str, why: str) -> KubeError:
    return KubeError(
        409,
        f'Operation cannot be fulfilled on {kind.group_resource} "{name}": {why}',
        details=_details(kind, name),
    )


def _invalid(kind_name: str, name: str, path: str, why: str) -> KubeError:
    message = f"{path}: {why}"
    return KubeError(
        422,
        f'{kind_name} "{name}" is invalid: {message}',
        details={
            "name": name,
            "kind": kind_name,
            "causes": [{"reason": "FieldValueInvalid", "message": why, "field": path}],
        },
    )


def _bad_request(message: str) -> KubeError:
    return KubeError(400, message)


def _expired(message: str) -> KubeError:
    # API Concepts, '"410 Gone" responses': the code is 410, the reason Expired.
    return KubeError(410, message, reason="Expired")


# --------------------------------------------------------------------------- selectors

_NAME_PART = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?{_NAME_PART}$")
_LABEL_VALUE = re.compile(rf"^(?:{_NAME_PART})?$")
_REQ_NOT_EXISTS = re.compile(r"^!\s*(\S+)$")
_REQ_SET = re.compile(r"^(\S+?)\s+(in|notin)\s*\((.*)\)$")
_REQ_COMPARE = re.compile(r"^([^\s=!<>]+)\s*(==|!=|=|>|<)\s*(\S*)$")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a label selector."""

    key: str
    op: Literal["exists", "!", "=", "!=", "in", "notin", ">", "<"]
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            # kube-apiserver: `!=` and `notin` also match objects without the key.
            return not present or value not in self.values
        try:
            number = int(value or "")
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if self.op == ">" else number < bound


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value sets."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """`a=b,c!=d,e in (f,g),h notin (i),j,!k,l>3` as kube-apiserver parses it."""
    requirements: list[Requirement] = []
    if not text.strip():
        return ()
    for raw in _split_top_level(text):
        term = raw.strip()
        req = _parse_requirement(term)
        if req is None or not _LABEL_KEY.match(req.key):
            raise _bad_request(f"unable to parse requirement: {term!r} in selector {text!r}")
        if req.op in (">", "<"):
            if not re.fullmatch(r"-?\d+", req.values[0]):
                raise _bad_request(f"unable to parse requirement: {term!r}: expected an integer")
        elif not all(_LABEL_VALUE.match(v) for v in req.values):
            raise _bad_request(f"unable to parse requirement: {term!r}: invalid label value")
        requirements.append(req)
    return tuple(requirements)


def _parse_requirement(term: str) -> Requirement | None:
    if m := _REQ_NOT_EXISTS.match(term):
        return Requirement(m.group(1), "!")
    if m := _REQ_SET.match(term):
        values = tuple(v.strip() for v in m.group(3).split(","))
        op: Literal["in", "notin"] = "in" if m.group(2) == "in" else "notin"
        return Requirement(m.group(1), op, values)
    if m := _REQ_COMPARE.match(term):
        symbol = m.group(2)
        compare: Literal["=", "!=", ">", "<"] = "=" if symbol == "==" else symbol  # type: ignore[assignment]
        return Requirement(m.group(1), compare, (m.group(3),))
    if term and not re.search(r"[\s=!<>(),]", term):
        return Requirement(term, "exists")
    return None


def labels_match(selector: Sequence[Requirement], obj: Mapping[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(req.matches(labels) for req in selector)


def parse_field_selector(text: str, kind: Kind) -> tuple[tuple[str, str, str], ...]:
    """`metadata.name=x,metadata.namespace!=y`: the fields kube-apiserver indexes."""
    terms: list[tuple[str, str, str]] = []
    allowed = ("metadata.name", "metadata.namespace", *kind.field_labels)
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            continue
        m = re.match(r"^([^=!]+?)\s*(==|!=|=)\s*(.*)$", term)
        if m is None:
            raise _bad_request(f"invalid field selector: {term!r}")
        name, op, value = m.group(1), m.group(2), m.group(3).strip()
        if name not in allowed:
            raise _bad_request(f"field label not supported: {name}")
        terms.append((name, "!=" if op == "!=" else "=", value))
    return tuple(terms)


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return str(node).lower()
    return str(node)


def fields_match(selector: Sequence[tuple[str, str, str]], obj: Mapping[str, Any]) -> bool:
    return all((_field_value(obj, name) == value) == (op == "=") for name, op, value in selector)


# --------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_bool(value: str | None) -> bool:
    # Go's strconv.ParseBool, which the API server uses for query parameters.
    return (value or "").strip() in ("1", "t", "T", "true", "TRUE", "True")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NAME_RULES = {
    "subdomain": (
        _DNS_SUBDOMAIN,
        253,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
        "'-' or '.', and must start and end with an alphanumeric character",
    ),
    "label": (
        _DNS_LABEL,
        63,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
        "'-', and must start and end with an alphanumeric character",
    ),
    "dns1035": (
        _DNS_1035,
        63,
        "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start "
        "with an alphabetic character, and end with an alphanumeric character",
    ),
}
# kube-apiserver's generateName suffix alphabet: no vowels, no look-alikes.
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _without_type_meta(obj: Mapping[str, Any]) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _spec_of(obj: Mapping[str, Any]) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request the emulator saw; `time` is `time.monotonic()` at arrival."""

    time: float
    method: str
    path: str
    query: dict[str, str]
    verb: str = "unknown"  # get list watch create update patch delete deletecollection discovery
    resource: str | None = None  # plural
    namespace: str | None = None
    name: str | None = None
    status: int | None = None  # 0: the connection was reset by a fault
    duration: float | None = None
    fault: bool = False  # answered by fail_next()/reset_next()


@dataclass(slots=True)
class _Fault:
    remaining: int
    status: int
    resource: str | None
    verb: str | None
    message: str
    retry_after: int | None
    reset: bool


@dataclass(slots=True)
class _Change:
    """One write, kept for watches that resume and for consistent paged lists."""

    rv: int
    type: str  # ADDED MODIFIED DELETED
    kind: Kind
    key: tuple[str, str]
    obj: JSON
    prev: JSON | None


class _Watcher:
    """One open watch: the store fills its queue, the HTTP handler drains it."""

    def __init__(self, kind: Kind, loop: asyncio.AbstractEventLoop) -> None:
        self.kind = kind
        self.loop = loop
        self.queue: deque[_Change] = deque()
        self.wake = asyncio.Event()
        self.dead = False
        self.transport: asyncio.Transport | None = None

    def poke(self) -> None:
        """Wake the handler; safe from any thread, and after the loop closed."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.wake.set)

    def kill(self) -> None:
        self.dead = True
        if self.transport is not None:
            self.transport.abort()
        self.poke()


@dataclass(slots=True)
class _Route:
    verb: str
    kind: Kind
    namespace: str | None  # None: all namespaces, or a cluster-scoped kind
    name: str | None


class _Dropper(asyncio.Protocol):
    """While paused in "reset" mode: accept, count, and reset every connection."""

    def __init__(self, emulator: KubeEmulator) -> None:
        self._emulator = emulator

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._emulator.dropped_connections += 1
        self._emulator.dropped_at.append(time.monotonic())
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: the close sends RST, as a crashed server's host would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert isinstance(transport, asyncio.Transport)
        transport.abort()


# --------------------------------------------------------------------------- emulator


class KubeEmulator:
    """An in-memory kube-apiserver on 127.0.0.1 at a port picked at start.

    State (objects, the resourceVersion counter, the event history) survives
    `pause()`/`resume()`. Every method that reads or writes state is
    thread-safe and may be called from any thread, also while paused.
    """

    def __init__(
        self,
        *,
        kinds: Iterable[Kind] = KINDS,
        history_limit: int = 1000,
        bookmark_interval: float = 0.5,
        watch_timeout: float | None = None,
        first_resource_version: int = 100,
        system_namespaces: Sequence[str] = SYSTEM_NAMESPACES,
        require_namespace: bool = True,
        defaulting: bool = True,
        too_large_wait: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
    ) -> None:
        """
        token: if set, every API request must carry `Authorization: Bearer
            <token>` (the scheme in any case, as RFC 7235 allows); others get
            401 Unauthorized, as kube-apiserver answers an unauthenticated
            client ("Authenticating", Kubernetes docs).
        history_limit: writes kept for watch resumption and paged lists; an older
            resourceVersion gets 410 Expired (etcd compaction).
        bookmark_interval: seconds between BOOKMARK events on watches that allow them.
        watch_timeout: how long a watch without timeoutSeconds lasts (kube-apiserver:
            a random 30-60 min); None: until the client, a fault or stop() ends it.
        require_namespace: creating in a missing namespace is 404, as the
            NamespaceLifecycle admission plugin answers.
        defaulting: fill what kube-apiserver fills (Service clusterIP, ports'
            protocol and targetPort; Namespace phase and name label).
        too_large_wait: how long a get/list for a future resourceVersion waits
            before 504 "Too large resource version".
        """
        self.token = token
        self._lock = threading.RLock()
        self._kinds = tuple(kinds)
        self._by_name: dict[str, Kind] = {}
        self._by_type: dict[tuple[str, str], Kind] = {}
        self._by_gv: dict[tuple[str, str], dict[str, Kind]] = {}
        for kind in self._kinds:
            for alias in (kind.plural, kind.kind, kind.kind.lower(), kind.group_resource):
                self._by_name[alias] = kind
            self._by_type[(kind.api_version, kind.kind)] = kind
            self._by_gv.setdefault((kind.group, kind.version), {})[kind.plural] = kind
        self._namespaces = self._by_type.get(("v1", "Namespace"))
        self._objects: dict[Kind, dict[tuple[str, str], JSON]] = {k: {} for k in self._kinds}
        self._history: deque[_Change] = deque()
        self._history_limit = history_limit
        self._rv = first_resource_version
        self._compacted = first_resource_version
        self._watchers: set[_Watcher] = set()
        self._next_ip = 100
        self._require_namespace = require_namespace
        self._defaulting = defaulting
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.too_large_wait = too_large_wait

        self._records: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self.dropped_connections = 0
        # When each was dropped (time.monotonic()), to check a retry schedule.
        self.dropped_at: list[float] = []

        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._reserved: socket.socket | None = None
        self._drop_server: asyncio.Server | None = None
        self._paused = False

        for name in system_namespaces:
            if self._namespaces is not None:
                self._insert(self._namespaces, ("", name), {"metadata": {"name": name}})

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def paused(self) -> bool:
        return self._paused

    async def start(self) -> None:
        """Listen on a free port (or the one given) in the running event loop."""
        self._loop = asyncio.get_running_loop()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        sock = self._bind()
        self._port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()

    async def stop(self) -> None:
        """Close every connection and the port; state is kept but unreachable."""
        self._kill_connections()
        if self._drop_server is not None:
            self._drop_server.close()
            self._drop_server = None
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._site = None

    async def apause(self, *, reset: bool = False) -> None:
        """The API server goes down: open connections (watches too) are cut, and
        new ones are refused (ECONNREFUSED) until `aresume()`. With reset=True
        connections are accepted and reset instead, and counted in
        `dropped_connections`, so a test can measure a client's retry rate."""
        if self._paused or self._runner is None:
            return
        self._paused = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._kill_connections()
        # Keep the port bound (not listening) so nothing else takes it meanwhile.
        sock = self._bind()
        if reset:
            loop = asyncio.get_running_loop()
            self._drop_server = await loop.create_server(lambda: _Dropper(self), sock=sock)
        else:
            self._reserved = sock

    async def aresume(self) -> None:
        """Listen again, on the same port, with all state as it was."""
        if not self._paused or self._runner is None:
            return
        if self._drop_server is not None:
            self._drop_server.close()
            await self._drop_server.wait_closed()
            self._drop_server = None
            sock = self._bind()
        else:
            assert self._reserved is not None
            sock, self._reserved = self._reserved, None
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()
        self._paused = False

    def pause(self, *, reset: bool = False) -> None:
        """`apause()` from a thread other than the emulator's event loop."""
        self._run(self.apause(reset=reset))

    def resume(self) -> None:
        """`aresume()` from a thread other than the emulator's event loop."""
        self._run(self.aresume())

    def close_watches(self) -> int:
        """Cut every open watch connection abruptly (no final chunk), as a load
        balancer or a crashing API server would; the server stays up. Returns
        how many were cut. Callable from any thread."""
        with self._lock:
            watchers = list(self._watchers)

        def kill_all() -> None:
            for watcher in watchers:
                watcher.kill()

        if self._on_loop_thread():
            kill_all()
        elif self._loop is not None:
            self._run(_call(kill_all))
        return len(watchers)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.setblocking(False)
        return sock

    def _kill_connections(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.kill()
        server = self._runner.server if self._runner is not None else None
        for handler in server.connections if server is not None else ():
            if handler.transport is not None:
                handler.transport.abort()

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the emulator is not started")
        if self._on_loop_thread():
            coro.close()
            raise RuntimeError("on the emulator's own event loop: await the a-prefixed method")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # ------------------------------------------------------------------ test API

    def kind(self, resource: str) -> Kind:
        """A Kind by plural ("services"), kind ("Service") or "plural.group"."""
        try:
            return self._by_name[resource]
        except KeyError:
            raise ValueError(f"unknown resource {resource!r}") from None

    def kind_of(self, obj: Mapping[str, Any]) -> Kind:
        try:
            return self._by_type[(obj.get("apiVersion", ""), obj.get("kind", ""))]
        except KeyError:
            raise ValueError(
                f"unknown kind {obj.get('apiVersion')!r} {obj.get('kind')!r}"
            ) from None

    @property
    def resource_version(self) -> str:
        """The latest resourceVersion, as a list made now would carry."""
        with self._lock:
            return str(self._rv)

    def create(self, obj: Mapping[str, Any]) -> JSON:
        """POST, as a client would (same checks, same watch event)."""
        kind = self.kind_of(obj)
        return copy.deepcopy(self._create(kind, self._namespace_of(kind, obj), obj))

    def update(self, obj: Mapping[str, Any]) -> JSON:
        """PUT. With metadata.resourceVersion it is checked (409 on a stale one);
        without it the update is unconditional, whatever the kind."""
        kind = self.kind_of(obj)
        name = obj.get("metadata", {}).get("name", "")
        result, _ = self._update(kind, self._namespace_of(kind, obj), name, obj, force=True)
        return copy.deepcopy(result)

    def apply(self, obj: Mapping[str, Any]) -> JSON:
        """Create, or replace unconditionally: a seeding shortcut, not server-side apply."""
        kind = self.kind_of(obj)
        body = copy.deepcopy(dict(obj))
        body.setdefault("metadata", {}).pop("resourceVersion", None)
        namespace = self._namespace_of(kind, body)
        with self._lock:
            if (namespace or "", body["metadata"].get("name", "")) in self._objects[kind]:
                return self.update(body)
            return copy.deepcopy(self._create(kind, namespace, body))

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        *,
        namespace: str = "",
        patch_type: Literal["merge", "strategic", "json"] = "merge",
    ) -> JSON:
        kind = self.kind(resource)
        content_type = {
            "merge": "application/merge-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "json": "application/json-patch+json",
        }[patch_type]
        ns = self._default_namespace(kind, namespace)
        return copy.deepcopy(self._patch(kind, ns, name, content_type, patch))

    def delete(self, resource: str, name: str, *, namespace: str = "") -> JSON:
        kind = self.kind(resource)
        return copy.deepcopy(self._delete(kind, self._default_namespace(kind, namespace), name, {}))

    def get(self, resource: str, name: str, *, namespace: str = "") -> JSON | None:
        kind = self.kind(resource)
        key = (self._default_namespace(kind, namespace) or "", name)
        with self._lock:
            obj = self._objects[kind].get(key)
            return copy.deepcopy(obj) if obj is not None else None

    def list(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[JSON]:
        """Current objects, with kind/apiVersion (unlike an HTTP list's items)."""
        kind = self.kind(resource)
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector, kind)
        with self._lock:
            return [
                copy.deepcopy(obj)
                for key, obj in sorted(self._objects[kind].items())
                if (namespace is None or key[0] == namespace)
                and labels_match(labels, obj)
                and fields_match(fields, obj)
            ]

    def compact(self) -> str:
        """Forget the event history up to now, as etcd compaction does: watches
        from an older resourceVersion, and continue tokens issued before, get
        410 Expired. Open watches are unaffected. Returns the compaction point."""
        with self._lock:
            self._history.clear()
            self._compacted = self._rv
            return str(self._rv)

    # Faults and observation.

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        resource: str | None = None,
        verb: str | None = None,
        message: str = "injected fault",
        retry_after: int | None = None,
    ) -> None:
        """Answer the next n matching API requests (not discovery) with a
        Status error. A watch failed with 410 gets it as an ERROR event inside
        an HTTP 200, as kube-apiserver sends it."""
        plural = self.kind(resource).plural if resource else None
        with self._lock:
            self._faults.append(_Fault(n, status, plural, verb, message, retry_after, False))

    def reset_next(
        self, n: int = 1, *, resource: str | None = None, verb: str | None = None
    ) -> None:
        """Reset the connection of the next n matching requests without an answer."""
        plural = self.kind(resource).plural if resource else None
        with self._lock:
            self._faults.append(_Fault(n, 0, plural, verb, "", None, True))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests(
        self,
        *,
        verb: str | None = None,
        resource: str | None = None,
        method: str | None = None,
        namespace: str | None = None,
        since: float | None = None,
    ) -> builtins.list[RequestRecord]:
        """Requests seen, oldest first; `since` is a `time.monotonic()` value."""
        plural = self.kind(resource).plural if resource else None
        with self._lock:
            return [
                r
                for r in self._records
                if (verb is None or r.verb == verb)
                and (plural is None or r.resource == plural)
                and (method is None or r.method == method)
                and (namespace is None or r.namespace == namespace)
                and (since is None or r.time >= since)
            ]

    def count(
        self,
        *,
        verb: str | None = None,
        resource: str | None = None,
        method: str | None = None,
        namespace: str | None = None,
        since: float | None = None,
    ) -> int:
        return len(
            self.requests(
                verb=verb, resource=resource, method=method, namespace=namespace, since=since
            )
        )

    def clear_requests(self) -> None:
        with self._lock:
            self._records.clear()

    def open_watches(self, resource: str | None = None) -> int:
        kind = self.kind(resource) if resource else None
        with self._lock:
            return sum(1 for w in self._watchers if kind is None or w.kind is kind)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll a condition from a thread other than the emulator's loop."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(0.01)

    async def until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """`wait_until` for async tests, also in the emulator's own loop."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.01)

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig for this emulator (JSON, which is YAML), for subprocesses."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": self.token or "emulator-token"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    # ------------------------------------------------------------------ store

    def _namespace_of(self, kind: Kind, obj: Mapping[str, Any]) -> str | None:
        if not kind.namespaced:
            return None
        meta = obj.get("metadata")
        namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
        return namespace or "default"

    def _default_namespace(self, kind: Kind, namespace: str) -> str | None:
        if not kind.namespaced:
            return None
        return namespace or "default"

    def _decode(self, kind: Kind, body: Any) -> JSON:
        """A private copy of a request body, its type checked against the URL."""
        if not isinstance(body, Mapping):
            raise _bad_request(f"the body of the request is not a {kind.kind} object")
        obj = copy.deepcopy(dict(body))
        api_version, kind_name = obj.get("apiVersion"), obj.get("kind")
        if api_version not in (None, "", kind.api_version) or kind_name not in (
            None,
            "",
            kind.kind,
        ):
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({kind.api_version}), or the kind ({kind_name}) is not {kind.kind}"
            )
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        return obj

    def _check_namespace_field(self, kind: Kind, namespace: str | None, meta: JSON) -> None:
        if not kind.namespaced:
            meta.pop("namespace", None)
            return
        given = meta.get("namespace")
        if given and given != namespace:
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        meta["namespace"] = namespace

    def _validate_name(self, kind: Kind, name: str) -> None:
        pattern, longest, why = _NAME_RULES[kind.name_rule]
        if len(name) > longest or not pattern.match(name):
            raise _invalid(kind.kind, name, "metadata.name", f'Invalid value: "{name}": {why}')

    def _create(self, kind: Kind, namespace: str | None, body: Any) -> JSON:
        obj = self._decode(kind, body)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            # kube-apiserver's storage refuses it rather than ignoring it.
            raise KubeError(500, "resourceVersion should not be set on objects to be created")
        self._check_namespace_field(kind, namespace, meta)
        with self._lock:
            if kind.namespaced and self._require_namespace and self._namespaces is not None:
                assert namespace is not None
                if ("", namespace) not in self._objects[self._namespaces]:
                    raise _not_found(self._namespaces, namespace)
            name = meta.get("name") or ""
            if not name:
                prefix = meta.get("generateName")
                if not prefix:
                    raise _invalid(
                        kind.kind,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    )
                # API Concepts, "Generated values": generateName gets a unique random suffix.
                while True:
                    name = prefix + "".join(random.choices(_SUFFIX_ALPHABET, k=5))
                    if (namespace or "", name) not in self._objects[kind]:
                        break
            self._validate_name(kind, name)
            key = (namespace or "", name)
            # API Concepts, "Object names": one object of a kind per name in a
            # namespace (in the cluster, for cluster-scoped kinds).
            if key in self._objects[kind]:
                raise KubeError(
                    409,
                    f'{kind.group_resource} "{name}" already exists',
                    reason="AlreadyExists",
                    details=_details(kind, name),
                )
            meta["name"] = name
            return self._insert(kind, key, obj)

    def _insert(self, kind: Kind, key: tuple[str, str], obj: JSON) -> JSON:
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        meta = obj.setdefault("metadata", {})
        meta["name"] = key[1]
        if kind.namespaced:
            meta["namespace"] = key[0]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        for system in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(system, None)
        self._default(kind, obj, None)
        return self._commit(kind, "ADDED", key, obj, None)

    def _update(
        self, kind: Kind, namespace: str | None, name: str, body: Any, *, force: bool = False
    ) -> tuple[JSON, bool]:
        obj = self._decode(kind, body)
        meta = obj["metadata"]
        if meta.get("name") != name:
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                f"({name})"
            )
        self._check_namespace_field(kind, namespace, meta)
        key = (namespace or "", name)
        with self._lock:
            current = self._objects[kind].get(key)
            if current is None:
                if not kind.create_on_update:
                    raise _not_found(kind, name)
                meta.pop("resourceVersion", None)
                return self._create(kind, namespace, obj), True
            # API Concepts, "Updates to existing resources": the resourceVersion
            # in a PUT detects lost updates, a stale one is 409 Conflict.
            given = meta.get("resourceVersion") or ""
            if not given:
                if not (kind.unconditional_update or force):
                    raise _invalid(
                        kind.group_resource,
                        name,
                        "metadata.resourceVersion",
                        "Invalid value: 0x0: must be specified for an update",
                    )
            elif given != current["metadata"]["resourceVersion"]:
                raise _conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE)
            return self._replace(kind, key, current, obj), False

    def _replace(self, kind: Kind, key: tuple[str, str], current: JSON, obj: JSON) -> JSON:
        meta, old = obj["metadata"], current["metadata"]
        for system in ("uid", "creationTimestamp", "name", "namespace"):
            if system in old:
                meta[system] = old[system]
        meta["resourceVersion"] = old["resourceVersion"]
        meta["generation"] = old.get("generation", 1)
        self._default(kind, obj, current)
        if obj == current:
            # kube-apiserver skips writes that change nothing: no new
            # resourceVersion, no watch event.
            return current
        if _spec_of(obj) != _spec_of(current):
            meta["generation"] += 1
        return self._commit(kind, "MODIFIED", key, obj, current)

    def _patch(
        self, kind: Kind, namespace: str | None, name: str, content_type: str, patch: Any
    ) -> JSON:
        key = (namespace or "", name)
        with self._lock:
            current = self._objects[kind].get(key)
            if current is None:
                raise _not_found(kind, name)
            doc = copy.deepcopy(current)
            # API Concepts, "Updates to existing resources": the patch type is
            # the Content-Type.
            if content_type == "application/json-patch+json":
                if not isinstance(patch, list):
                    raise _bad_request("a JSON patch must be a list of operations")
                try:
                    patched = jsonpatch.JsonPatch(patch).apply(doc)
                except jsonpatch.InvalidJsonPatch as err:
                    raise _bad_request(str(err)) from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                    raise KubeError(422, str(err)) from None
                except (KeyError, TypeError) as err:
                    raise _bad_request(f"invalid JSON patch: {err}") from None
            elif content_type in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                if content_type.startswith("application/strategic") and kind.custom:
                    # API Concepts, "Updates to existing resources": no
                    # strategic merge patch for custom resources.
                    raise KubeError(
                        415,
                        "the body of the request was in an unknown format - accepted media types "
                        "include: application/json-patch+json, application/merge-patch+json, "
                        "application/apply-patch+yaml",
                    )
                if not isinstance(patch, dict):
                    raise _bad_request("a merge patch must be a JSON object")
                patched = merge_patch(doc, patch)
            else:
                raise KubeError(
                    415,
                    f"the body of the request was in an unknown format ({content_type}) - accepted "
                    "media types include: application/json-patch+json, "
                    "application/merge-patch+json, application/strategic-merge-patch+json",
                )
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise KubeError(422, "the patched object is not a Kubernetes object")
            patched_meta = patched["metadata"]
            if patched.get("kind") != kind.kind or patched.get("apiVersion") != kind.api_version:
                raise _bad_request("a patch cannot change kind or apiVersion")
            if patched_meta.get("name") != name or (
                kind.namespaced and patched_meta.get("namespace") != namespace
            ):
                raise _bad_request("a patch cannot change the name or namespace")
            # A resourceVersion in the patch makes it conditional (API Concepts,
            # "Updates to existing resources").
            given = patched_meta.get("resourceVersion")
            if given and given != current["metadata"]["resourceVersion"]:
                raise _conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE)
            return self._replace(kind, key, current, patched)

    def _delete(
        self, kind: Kind, namespace: str | None, name: str, options: Mapping[str, Any]
    ) -> JSON:
        key = (namespace or "", name)
        with self._lock:
            current = self._objects[kind].get(key)
            if current is None:
                raise _not_found(kind, name)
            pre = options.get("preconditions") or {}
            meta = current["metadata"]
            if pre.get("uid") and pre["uid"] != meta["uid"]:
                raise _conflict(
                    kind,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                    f"meta: {meta['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise _conflict(
                    kind,
                    name,
                    f"Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{meta['resourceVersion']}",
                )
            if kind is self._namespaces:
                # API Concepts, "Resource URIs": namespaced objects go with their
                # namespace. (kube-apiserver first shows it Terminating while
                # the namespace controller empties it; here it is immediate.)
                for other in self._kinds:
                    if other.namespaced:
                        for k in [k for k in self._objects[other] if k[0] == name]:
                            self._remove(other, k)
            return self._remove(kind, key)

    def _remove(self, kind: Kind, key: tuple[str, str]) -> JSON:
        current = self._objects[kind][key]
        gone = dict(current)
        gone["metadata"] = dict(current["metadata"])
        return self._commit(kind, "DELETED", key, gone, current)

    def _commit(
        self, kind: Kind, type_: str, key: tuple[str, str], obj: JSON, prev: JSON | None
    ) -> JSON:
        """The one place state changes. Called with the lock held."""
        # API Concepts, "Resource versions": one counter for every kind, as
        # etcd's revision is; a deleted object carries the deletion's version.
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if type_ == "DELETED":
            del self._objects[kind][key]
        else:
            self._objects[kind][key] = obj
        change = _Change(self._rv, type_, kind, key, obj, prev)
        # API Concepts, "Efficient detection of changes": history is kept for a
        # limited window only.
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self._compacted = self._history.popleft().rv
        for watcher in self._watchers:
            if watcher.kind is kind:
                watcher.queue.append(change)
                watcher.poke()
        return obj

    def _default(self, kind: Kind, obj: JSON, current: JSON | None) -> None:
        """What kube-apiserver fills in on every write."""
        meta = obj["metadata"]
        if kind.group == "" and kind.plural == "secrets":
            # Conversion, not defaulting: stringData is write-only.
            string_data = obj.pop("stringData", None)
            if isinstance(string_data, dict) and string_data:
                data = obj["data"] = dict(obj.get("data") or {})
                for k, v in string_data.items():
                    data[k] = base64.b64encode(str(v).encode()).decode()
            obj.setdefault("type", "Opaque")
        if not self._defaulting:
            return
        if kind is self._namespaces:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {}).setdefault("phase", "Active")
        elif kind.group == "" and kind.plural == "services":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
                old = (current or {}).get("spec", {}).get("clusterIP")
                spec["clusterIP"] = old or self._allocate_ip()
            if spec.get("clusterIP") and spec["type"] != "ExternalName":
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            for port in spec.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
                    port.setdefault("targetPort", port.get("port"))

    def _allocate_ip(self) -> str:
        self._next_ip += 1
        return str(ipaddress.ip_address("10.96.0.0") + self._next_ip)

    def _state_at(self, kind: Kind, rv: int) -> dict[tuple[str, str], JSON]:
        """The objects of a kind as they were at resourceVersion rv, rebuilt by
        undoing later writes (what etcd's MVCC gives kube-apiserver)."""
        if rv < self._compacted:
            raise _expired(f"too old resource version: {rv} ({self._compacted})")
        state = dict(self._objects[kind])
        for change in reversed(self._history):
            if change.rv <= rv:
                break
            if change.kind is kind:
                if change.prev is None:
                    state.pop(change.key, None)
                else:
                    state[change.key] = change.prev
        return state

    def _list(self, kind: Kind, namespace: str | None, query: Mapping[str, str]) -> JSON:
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""), kind)
        limit = _int_param(query, "limit")
        token = query.get("continue", "")
        rv_param = query.get("resourceVersion", "")
        rv_match = query.get("resourceVersionMatch", "")
        if rv_match and rv_match not in ("Exact", "NotOlderThan"):
            raise _invalid(
                "ListOptions.meta.k8s.io", "", "resourceVersionMatch", "Unsupported value"
            )
        if rv_match and not rv_param:
            raise _invalid(
                "ListOptions.meta.k8s.io",
                "",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            )
        start: tuple[str, str] | None = None
        with self._lock:
            # API Concepts, "Semantics for get and list".
            if token:
                if rv_param not in ("", "0"):
                    raise _bad_request(
                        "specifying resource version is not allowed when using continue"
                    )
                list_rv, start = _decode_continue(token)
                if list_rv < self._compacted:
                    # API Concepts, "Retrieving large results sets in chunks":
                    # an old continue token is 410 Gone.
                    raise _expired(
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter."
                    )
                state = self._state_at(kind, list_rv)
            elif rv_param not in ("", "0") and (rv_match == "Exact" or (not rv_match and limit)):
                list_rv = _rv_value(rv_param)
                state = self._state_at(kind, list_rv)
            else:
                list_rv, state = self._rv, self._objects[kind]
            matched = [
                (key, obj)
                for key, obj in sorted(state.items())
                if (namespace is None or key[0] == namespace)
                and (start is None or key > start)
                and labels_match(labels, obj)
                and fields_match(fields, obj)
            ]
        page = matched[:limit] if limit else matched
        meta: JSON = {"resourceVersion": str(list_rv)}
        if limit and len(matched) > limit:
            meta["continue"] = _encode_continue(list_rv, page[-1][0])
            if not labels and not fields:
                # API Concepts, "Retrieving large results sets in chunks": no
                # count when selectors make it unknown.
                meta["remainingItemCount"] = len(matched) - limit
        # API Concepts, "Collections": the kind is the item kind + "List".
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": meta,
            # Built-in kinds' list items carry no kind/apiVersion (typed lists);
            # custom resources' do (unstructured lists).
            "items": [obj if kind.custom else _without_type_meta(obj) for _, obj in page],
        }

    # ------------------------------------------------------------------ HTTP

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(time.monotonic(), request.method, request.path, dict(request.query))
        self._record(record)
        try:
            response = await self._serve(request, record)
        except KubeError as err:
            response = _json_response(err.status, err.code, err.headers)
        except Exception as err:  # a bug here must still answer as an API server would
            response = _json_response(
                status_object(500, f"Internal error occurred: {err!r}"), 500, {}
            )
        if record.status is None:
            record.status = response.status
        record.duration = time.monotonic() - record.time
        return response

    async def _serve(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        if self.token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or given != self.token:
                raise KubeError(401, "Unauthorized", reason="Unauthorized")
        parts = [p for p in request.path.split("/") if p]
        discovery = self._discovery(request.method, parts)
        if discovery is not None:
            record.verb = "discovery"
            return discovery
        route = self._route(request.method, parts, request.query)
        record.verb, record.resource = route.verb, route.kind.plural
        record.namespace, record.name = route.namespace, route.name
        fault = self._take_fault(route)
        if fault is not None:
            record.fault = True
            if fault.reset:
                record.status = 0
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)
            if route.verb == "watch" and fault.status == 410:
                return await self._watch_error(request, record, _expired(fault.message).status)
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            details = {"retryAfterSeconds": fault.retry_after} if fault.retry_after else None
            raise KubeError(fault.status, fault.message, details=details, headers=headers)

        kind, namespace, name, query = route.kind, route.namespace, route.name, request.query
        if route.verb == "watch":
            return await self._watch(request, record, route)
        if route.verb in ("get", "list"):
            await self._wait_for_rv(query.get("resourceVersion", ""))
            if route.verb == "get":
                assert name is not None
                with self._lock:
                    obj = self._objects[kind].get((namespace or "", name))
                if obj is None:
                    raise _not_found(kind, name)
                return _json_response(obj, 200)
            return _json_response(self._list(kind, namespace, query), 200)
        if route.verb == "create":
            return _json_response(self._create(kind, namespace, await _body(request)), 201)
        assert name is not None or route.verb == "deletecollection"
        if route.verb == "update":
            assert name is not None
            obj, created = self._update(kind, namespace, name, await _body(request))
            return _json_response(obj, 201 if created else 200)
        if route.verb == "patch":
            assert name is not None
            content_type = request.content_type
            return _json_response(
                self._patch(kind, namespace, name, content_type, await _body(request)), 200
            )
        options = await _body(request) if request.can_read_body else {}
        options = options if isinstance(options, dict) else {}
        if route.verb == "delete":
            assert name is not None
            return _json_response(self._delete(kind, namespace, name, options), 200)
        # deletecollection
        listed = self._list(kind, namespace, {k: v for k, v in query.items() if "Selector" in k})
        deleted = []
        for item in listed["items"]:
            meta = item["metadata"]
            with contextlib.suppress(KubeError):
                deleted.append(self._delete(kind, meta.get("namespace"), meta["name"], options))
        listed["items"] = [o if kind.custom else _without_type_meta(o) for o in deleted]
        listed["metadata"] = {"resourceVersion": self.resource_version}
        return _json_response(listed, 200)

    def _take_fault(self, route: _Route) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if (fault.resource is None or fault.resource == route.kind.plural) and (
                    fault.verb is None or fault.verb == route.verb
                ):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    async def _wait_for_rv(self, rv_param: str) -> None:
        """API Concepts, "Unavailable resource versions": a get or list for a
        resourceVersion the server has not reached waits briefly, then 504."""
        if rv_param in ("", "0"):
            return
        wanted = _rv_value(rv_param)
        deadline = time.monotonic() + self.too_large_wait
        while True:
            with self._lock:
                current = self._rv
            if wanted <= current:
                return
            if time.monotonic() >= deadline:
                raise KubeError(
                    504,
                    f"Too large resource version: {wanted}, current: {current}",
                    details={
                        "causes": [
                            {
                                "reason": "ResourceVersionTooLarge",
                                "message": "Too large resource version",
                            }
                        ],
                        "retryAfterSeconds": 1,
                    },
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(0.02)

    def _discovery(self, method: str, parts: builtins.list[str]) -> web.Response | None:
        """Enough discovery for clients (and kubectl) to find the resources."""
        if method != "GET":
            return None
        if parts == ["version"]:
            return _json_response(SERVER_VERSION, 200)
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        if parts == ["api"]:
            return _json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self._host}:{self._port}"}
                    ],
                },
                200,
            )
        groups = sorted({(k.group, k.version) for k in self._kinds if k.group})
        if parts == ["apis"]:
            return _json_response(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [_api_group(g, v) for g, v in groups],
                },
                200,
            )
        if len(parts) == 2 and parts[0] == "apis":
            for group, version in groups:
                if group == parts[1]:
                    return _json_response(
                        {"kind": "APIGroup", "apiVersion": "v1", **_api_group(group, version)}, 200
                    )
            return None
        gv: tuple[str, str] | None = None
        if parts == ["api", "v1"]:
            gv = ("", "v1")
        elif len(parts) == 3 and parts[0] == "apis":
            gv = (parts[1], parts[2])
        if gv is None or gv not in self._by_gv:
            return None
        resources = [
            {
                "name": k.plural,
                "singularName": k.kind.lower(),
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": [
                    "create",
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "update",
                    "watch",
                ],
            }
            for k in self._by_gv[gv].values()
        ]
        return _json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{gv[0]}/{gv[1]}" if gv[0] else gv[1],
                "resources": resources,
            },
            200,
        )

    def _route(self, method: str, parts: builtins.list[str], query: Mapping[str, str]) -> _Route:
        """API Concepts, "Resource URIs"."""
        not_found = KubeError(404, "the server could not find the requested resource")
        if parts[:2] == ["api", "v1"]:
            gv, rest = ("", "v1"), parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            gv, rest = (parts[1], parts[2]), parts[3:]
        else:
            raise not_found
        kinds = self._by_gv.get(gv)
        if not kinds or not rest:
            raise not_found
        # The old /watch/ path prefix still works on kube-apiserver.
        legacy_watch = rest[0] == "watch"
        if legacy_watch:
            rest = rest[1:]
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in kinds:
            kind = kinds[rest[2]]
            if not kind.namespaced or len(rest) > 4:
                raise not_found  # subresources are not emulated
            namespace, name = rest[1], (rest[3] if len(rest) == 4 else None)
        else:
            found = kinds.get(rest[0])
            if found is None or len(rest) > 2 or (found.namespaced and len(rest) > 1):
                raise not_found
            kind, name = found, (rest[1] if len(rest) == 2 else None)
        # API Concepts, "API verbs": a GET with ?watch is a watch; a PUT is an
        # update (or a create, for kinds that allow it: see _update).
        watch = legacy_watch or _parse_bool(query.get("watch"))
        verb = {
            ("GET", False): "watch" if watch else "list",
            ("GET", True): "watch" if watch else "get",
            ("POST", False): "create",
            ("PUT", True): "update",
            ("PATCH", True): "patch",
            ("DELETE", True): "delete",
            ("DELETE", False): "deletecollection",
        }.get((method, name is not None))
        # A namespaced kind is created and bulk-deleted in a namespace only.
        across_namespaces = kind.namespaced and namespace is None
        if verb is None or (verb in ("create", "deletecollection") and across_namespaces):
            raise KubeError(405, "the server does not allow this method on the requested resource")
        return _Route(verb, kind, namespace, name)

    async def _watch_error(
        self, request: web.Request, record: RequestRecord, status: JSON
    ) -> web.StreamResponse:
        response = await self._open_stream(request, record)
        with contextlib.suppress(ConnectionError):
            await _send(response, "ERROR", status)
            await response.write_eof()
        return response

    async def _open_stream(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        record.status = 200
        # API Concepts, "Efficient detection of changes": a chunked response of
        # JSON documents, one per change.
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        return response

    async def _watch(
        self, request: web.Request, record: RequestRecord, route: _Route
    ) -> web.StreamResponse:
        kind, namespace, query = route.kind, route.namespace, request.query
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""), kind)
        if route.name is not None:
            fields = (*fields, ("metadata.name", "=", route.name))
        bookmarks = _parse_bool(query.get("allowWatchBookmarks"))
        timeout = _int_param(query, "timeoutSeconds") or self.watch_timeout
        rv_param = query.get("resourceVersion", "")
        # API Concepts, "Streaming lists": sendInitialEvents asks for the state
        # first, ended by a bookmark; it needs resourceVersionMatch=NotOlderThan.
        initial_param = query.get("sendInitialEvents")
        if initial_param is not None and query.get("resourceVersionMatch") != "NotOlderThan":
            raise _invalid(
                "ListOptions.meta.k8s.io",
                "",
                "resourceVersionMatch",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch to "
                "NotOlderThan",
            )
        # API Concepts, "Semantics for watch": unset or "0" gets the state as
        # synthetic ADDED events, any other value starts exactly after it.
        if initial_param is not None:
            send_state = _parse_bool(initial_param)
        else:
            send_state = rv_param in ("", "0")
        start = self._rv if send_state or rv_param in ("", "0") else _rv_value(rv_param)
        if not send_state:
            try:
                # kube-apiserver's watch cache waits a little for a version
                # it has not seen yet, then fails the watch with 504.
                await self._wait_for_rv(rv_param)
            except KubeError as err:
                return await self._watch_error(request, record, err.status)

        def passes(obj: Mapping[str, Any]) -> bool:
            ns_ok = namespace is None or obj["metadata"].get("namespace") == namespace
            return ns_ok and labels_match(labels, obj) and fields_match(fields, obj)

        assert self._loop is not None
        watcher = _Watcher(kind, self._loop)
        watcher.transport = request.transport
        with self._lock:
            seen = self._rv
            if send_state or rv_param in ("", "0"):
                start = self._rv
                state = [o for _, o in sorted(self._objects[kind].items()) if passes(o)]
                state = state if send_state else []
                backlog: list[_Change] = []
            elif start < self._compacted:
                state, backlog = [], []
                watcher.dead = True  # expired: answered below, never registered
            else:
                state = []
                backlog = [c for c in self._history if c.rv > start and c.kind is kind]
            if not watcher.dead:
                self._watchers.add(watcher)
            compacted = self._compacted
        if watcher.dead:
            # API Concepts, "Efficient detection of changes": history too short
            # is 410 Gone, which kube-apiserver sends as an ERROR event in a 200.
            message = f"too old resource version: {start} ({compacted})"
            return await self._watch_error(request, record, _expired(message).status)

        response = await self._open_stream(request, record)
        deadline = time.monotonic() + timeout if timeout else None
        next_bookmark = time.monotonic() + self.bookmark_interval
        try:
            for obj in state:
                await _send(response, "ADDED", obj)
            if initial_param is not None and send_state and bookmarks:
                await _send(response, "BOOKMARK", _bookmark(kind, start, initial_end=True))
            pending = backlog
            while True:
                for change in pending:
                    if change.rv <= start:
                        continue
                    event = _filter(change, passes)
                    if event is not None:
                        await _send(response, *event)
                if watcher.dead:
                    return response  # cut by a fault, pause() or stop()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    # timeoutSeconds: the server ends the watch cleanly.
                    await response.write_eof()
                    return response
                if bookmarks and now >= next_bookmark:
                    # API Concepts, "Watch bookmarks": every change up to this
                    # resourceVersion has been sent.
                    await _send(response, "BOOKMARK", _bookmark(kind, seen))
                    next_bookmark = now + self.bookmark_interval
                wait = next_bookmark - now if bookmarks else None
                if deadline is not None:
                    wait = min(wait, deadline - now) if wait is not None else deadline - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wake.wait(), wait)
                watcher.wake.clear()
                with self._lock:
                    pending = list(watcher.queue)
                    watcher.queue.clear()
                    seen = self._rv
        except ConnectionError:
            return response
        finally:
            with self._lock:
                self._watchers.discard(watcher)


# --------------------------------------------------------------------------- HTTP helpers


async def _call(fn: Callable[[], None]) -> None:
    """Run plain code on the emulator's loop (transports are not thread-safe)."""
    fn()


def _json_response(
    body: Mapping[str, Any], status: int, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=headers,
    )


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw or b"null")
    except ValueError as err:
        raise _bad_request(f"the request body is not JSON: {err}") from None


async def _send(response: web.StreamResponse, type_: str, obj: Mapping[str, Any]) -> None:
    line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n"
    await response.write(line.encode())


def _filter(
    change: _Change, passes: Callable[[Mapping[str, Any]], bool]
) -> tuple[str, JSON] | None:
    """A change as one watcher with selectors sees it (kube-apiserver's
    cacheWatcher): an object that starts matching is ADDED, one that stops
    matching is DELETED (its last matching state at the new resourceVersion)."""
    now = change.type != "DELETED" and passes(change.obj)
    before = change.prev is not None and passes(change.prev)
    if now and before:
        return ("MODIFIED", change.obj)
    if now:
        return ("ADDED", change.obj)
    if before:
        if change.type == "DELETED":
            return ("DELETED", change.obj)
        assert change.prev is not None
        last = dict(change.prev)
        last["metadata"] = {**change.prev["metadata"], "resourceVersion": str(change.rv)}
        return ("DELETED", last)
    return None


def _bookmark(kind: Kind, rv: int, *, initial_end: bool = False) -> JSON:
    meta: JSON = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}


def _api_group(group: str, version: str) -> JSON:
    gv = {"groupVersion": f"{group}/{version}", "version": version}
    return {"name": group, "versions": [gv], "preferredVersion": gv}


def _rv_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad_request(f"invalid resource version {text!r}") from None
    if value < 0:
        raise _bad_request(f"invalid resource version {text!r}")
    return value


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    text = query.get(name)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise _bad_request(f"{name} must be an integer, got {text!r}") from None
    return value if value > 0 else None


def _encode_continue(rv: int, last: tuple[str, str]) -> str:
    # kube-apiserver's token is base64url JSON with the list's resourceVersion
    # and where to start; clients must treat it as opaque.
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(last)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        rv, start = int(raw["rv"]), raw["start"]
        if raw.get("v") != "meta.k8s.io/v1" or len(start) != 2:
            raise ValueError("unknown version")
        return rv, (str(start[0]), str(start[1]))
    except (ValueError, KeyError, TypeError) as err:
        raise _bad_request(f"continue key is not valid: {err}") from None


# --------------------------------------------------------------------------- threads


@contextlib.contextmanager
def running_emulator(**options: Any) -> Iterator[KubeEmulator]:
    """A started emulator in a background thread with its own event loop, for
    synchronous tests, threaded clients and subprocesses. Stopped on exit."""
    emulator = KubeEmulator(**options)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="kube-emulator", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(emulator.start(), loop).result(timeout=10)
        try:
            yield emulator
        finally:
            asyncio.run_coroutine_threadsafe(emulator.stop(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
