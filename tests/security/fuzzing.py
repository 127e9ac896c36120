"""Fuzz targets for everything an outsider controls, and the harness they
run against: a real control plane (mTLS xDS, the join port, the admin API)
on an event loop of its own thread, so hypothesis drives it example by
example while it stays up, as it would under attack.

Each target is a function of (harness, example). The properties checked
for every example: nothing raises but the documented refusals, no gRPC
status is INTERNAL or UNKNOWN, no HTTP answer is a 500, every stream ends
once the client is done, nothing is logged as an unhandled exception, and
the control plane still serves a healthy proxy after the example.
`tests/security/test_fuzz.py` runs them in CI on a short budget;
`bench/fuzz.py` runs each for minutes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import math
import ssl
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import jsonpatch
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from hypothesis import strategies as st

from shoal import cli
from shoal._gen import ca_pb2, ca_pb2_grpc
from shoal.injector import settings as injector_settings
from shoal.injector import webhook
from shoal.registry import annotations, files
from shoal.sds import ca, join
from shoal.xds import cache, controller, debounce, node, resources
from tests import manifests
from tests.security import clients

T = TypeVar("T")

GRPC_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
TYPES = [*resources.PUSH_ORDER, "type.googleapis.com/not.a.Type", ""]


class Crashes(logging.Handler):
    """Log records that carry an exception, or say a task failed: what an
    unhandled exception looks like in `shoal serve`'s log."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "exception" in record.getMessage().lower():
            self.records.append(record)


class Harness:
    """A running control plane (mTLS) on its own event loop and thread."""

    def __init__(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="shoal-fuzz-"))
        (self._folder / "registry").mkdir()
        (self._folder / "registry" / "web.yaml").write_text(
            manifests.service_with_endpoints("web", [20001], namespace="demo")
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.crashes = Crashes()
        self._stack = contextlib.AsyncExitStack()
        self.cp: cli.ControlPlane | None = None
        self.examples = 0

    def __enter__(self) -> Harness:
        logging.getLogger().addHandler(self.crashes)
        self.loop.set_exception_handler(self._loop_exception)
        self._thread.start()
        self.cp = self.run(self._start(), timeout=60)
        return self

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # "Task exception was never retrieved" and the like.
        record = logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 0, str(context.get("message")), (), None
        )
        record.exc_info = (None, context.get("exception"), None)  # type: ignore[assignment]
        self.crashes.records.append(record)

    async def _start(self) -> cli.ControlPlane:
        options = cli.ServeOptions(
            registry=self._folder / "registry",
            xds_address="127.0.0.1:0",
            admin_address="127.0.0.1:0",
            state_dir=self._folder / "state",
            join_address="127.0.0.1:0",
            webhook_address="127.0.0.1:0",
            debounce_quiet=0.01,
            debounce_max=0.1,
            admin_identities=("shoal-system/shoal-admin",),
        )
        return await self._stack.enter_async_context(cli.control_plane(options))

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.run(self._stack.aclose(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        logging.getLogger().removeHandler(self.crashes)

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    @property
    def control_plane(self) -> cli.ControlPlane:
        assert self.cp is not None
        return self.cp

    def check(self) -> None:
        """After an example: no crash logged, and a healthy proxy is served."""
        self.examples += 1
        assert not self.crashes.records, [r.getMessage() for r in self.crashes.records]
        if self.examples % 25 == 0:
            self.run(self._healthy(), timeout=60)

    async def _healthy(self) -> None:
        cp = self.control_plane
        pair = clients.workload(cp, "demo", "healthy")
        async with clients.channel(cp, pair) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    node=sidecar("healthy", "demo", "healthy"), type_url=resources.CLUSTER
                )
            )
            response = await asyncio.wait_for(call.read(), 30)
            assert response.type_url == resources.CLUSTER
            call.cancel()


def sidecar(node_id: str, namespace: str, account: str, **extra: Any) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            node.NAMESPACE: namespace,
            node.SERVICE: "web",
            node.SERVICE_ACCOUNT: account,
            node.APP_PORT: 8080,
            node.INBOUND_PORT: 15006,
            node.OUTBOUND_PORT: 15001,
            **extra,
        }
    )
    return base_pb2.Node(id=node_id, cluster="web.demo", metadata=meta)


@contextlib.contextmanager
def harness() -> Iterator[Harness]:
    with Harness() as h:
        yield h


# -- strategies -------------------------------------------------------------------

# Text an attacker would try: control characters, unicode, separators of the
# grammars, very long runs.
hostile_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(max_codepoint=0x9F), max_size=60),
    st.sampled_from(
        ["", "*", ".", "/", "=", "->", ";", ",", "@", "%", "\x00", "\x1b[2J", "∞", "nan", "-0"]
    ),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "=", ",", "\x1b"]), st.integers(0, 5000)),
)
names = st.one_of(
    st.sampled_from(["web", "demo", "reviews", "api.v2", "default", "Web", "a" * 70, "*"]),
    st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True),
    hostile_text,
)


@st.composite
def annotation_values(draw: st.DrawFn) -> dict[str, str]:
    """Annotations close to the grammar (weights, rules, durations) or not."""
    name = draw(names)
    weight = draw(st.integers(-5, 150))
    pct = draw(st.floats(allow_nan=True, allow_infinity=True))
    structured = {
        annotations.SPLIT: f"{name}={weight},web={100 - weight}",
        annotations.ROUTE_HEADERS: f"{draw(names)}~={draw(hostile_text)} -> {name}",
        annotations.TIMEOUT: draw(st.sampled_from(["2s", "0ms", "1e9h", "-1s", "s", "99999999h"])),
        annotations.RETRIES: str(draw(st.integers(-3, 20))),
        annotations.RETRY_ON: draw(hostile_text),
        annotations.FAULT: f"abort={draw(st.integers(0, 700))}@{pct}%,delay={draw(hostile_text)}",
        annotations.MIRROR: f"{name}@{pct}%",
        annotations.OUTLIER: f"consecutive-5xx={weight},ejection={draw(hostile_text)}",
        annotations.MTLS: draw(hostile_text),
        annotations.ALLOW: f"{draw(names)}/{draw(names)}, {draw(hostile_text)}",
        annotations.EXPORT_TO: draw(hostile_text),
        annotations.DEPENDENCIES: f"{name}, {draw(names)}/*",
    }
    chosen = draw(st.lists(st.sampled_from(sorted(structured)), unique=True, max_size=5))
    out = {k: structured[k] for k in chosen}
    for key in draw(st.lists(st.sampled_from(sorted(structured)), max_size=3)):
        out[key] = draw(hostile_text)
    return out


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), hostile_text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def admission_reviews(draw: st.DrawFn) -> tuple[bytes, str]:
    """What reaches the injection webhook: AdmissionReviews whose Pods are
    close to real ones (containers, probes, capture and resource
    annotations) with hostile values anywhere, or any JSON, or any bytes;
    and the Content-Type they come with."""
    probe = st.fixed_dictionaries(
        {},
        optional={
            "httpGet": st.fixed_dictionaries(
                {},
                optional={
                    "port": st.one_of(st.integers(-1, 70000), names, json_values),
                    "path": hostile_text,
                    "scheme": st.sampled_from(["HTTP", "HTTPS", "ftp"]),
                    "httpHeaders": json_values,
                },
            ),
            "tcpSocket": st.fixed_dictionaries({"port": st.one_of(st.integers(), names)}),
            "grpc": st.fixed_dictionaries({"port": json_values}),
            "timeoutSeconds": json_values,
        },
    )
    container = st.fixed_dictionaries(
        {"name": st.one_of(names, json_values)},
        optional={
            "ports": st.one_of(
                st.lists(
                    st.fixed_dictionaries(
                        {"containerPort": st.one_of(st.integers(-1, 70000), json_values)},
                        optional={"name": names},
                    ),
                    max_size=3,
                ),
                json_values,
            ),
            "livenessProbe": probe,
            "readinessProbe": st.one_of(probe, json_values),
            "startupProbe": probe,
        },
    )
    annotation_keys = st.sampled_from(
        [
            injector_settings.INJECT_ANNOTATION,
            injector_settings.STATUS_ANNOTATION,
            injector_settings.INCLUDE_INBOUND_PORTS,
            injector_settings.EXCLUDE_INBOUND_PORTS,
            injector_settings.INCLUDE_OUTBOUND_CIDRS,
            injector_settings.EXCLUDE_OUTBOUND_CIDRS,
            injector_settings.EXCLUDE_OUTBOUND_PORTS,
            injector_settings.PROXY_CPU,
            injector_settings.PROXY_MEMORY_LIMIT,
            injector_settings.REWRITE_PROBES_ANNOTATION,
        ]
    )
    pod = st.fixed_dictionaries(
        {
            "metadata": st.fixed_dictionaries(
                {},
                optional={
                    "name": names,
                    "generateName": names,
                    "annotations": st.one_of(
                        st.dictionaries(
                            annotation_keys,
                            st.one_of(
                                hostile_text,
                                st.sampled_from(["*", "", "80,443", "10.0.0.0/8", "fd00::/8"]),
                            ),
                            max_size=4,
                        ),
                        json_values,
                    ),
                    "labels": st.one_of(st.dictionaries(names, names, max_size=3), json_values),
                },
            ),
            "spec": st.one_of(
                st.fixed_dictionaries(
                    {"containers": st.one_of(st.lists(container, max_size=3), json_values)},
                    optional={
                        "initContainers": st.one_of(st.lists(container, max_size=2), json_values),
                        "volumes": json_values,
                        "hostNetwork": json_values,
                    },
                ),
                json_values,
            ),
        }
    )
    request = st.fixed_dictionaries(
        {
            "uid": st.one_of(st.uuids().map(str), hostile_text, json_values),
            "kind": st.one_of(st.just({"group": "", "version": "v1", "kind": "Pod"}), json_values),
            "operation": st.one_of(st.just("CREATE"), hostile_text),
            "object": st.one_of(pod, json_values),
        },
        optional={"namespace": names, "dryRun": json_values},
    )
    review = st.fixed_dictionaries(
        {
            "apiVersion": st.one_of(st.just("admission.k8s.io/v1"), hostile_text),
            "kind": st.one_of(st.just("AdmissionReview"), hostile_text),
            "request": st.one_of(request, json_values),
        }
    )
    body = draw(
        st.one_of(
            review.map(lambda r: json.dumps(r).encode()),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=300),
            st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n),
        )
    )
    # What an HTTP client can send as a header (it refuses control characters).
    content_type = draw(
        st.one_of(st.just("application/json"), st.from_regex(r"[ -~]{0,40}", fullmatch=True))
    )
    return body, content_type


@st.composite
def traffic_route_specs(draw: st.DrawFn) -> dict[str, Any]:
    backend = st.fixed_dictionaries(
        {"service": names},
        optional={
            "weight": st.one_of(st.integers(-5, 200), json_values),
            "subset": st.one_of(st.dictionaries(names, names, max_size=2), json_values),
        },
    )
    match = st.fixed_dictionaries(
        {},
        optional={
            "headers": st.lists(
                st.fixed_dictionaries(
                    {"name": names},
                    optional={
                        "exact": hostile_text,
                        "prefix": hostile_text,
                        "regex": hostile_text,
                        "present": json_values,
                    },
                ),
                max_size=3,
            ),
            "path": st.dictionaries(
                st.sampled_from(["exact", "prefix", "regex", "other"]), hostile_text, max_size=2
            ),
            "method": hostile_text,
            "queryParams": json_values,
        },
    )
    rule = st.fixed_dictionaries(
        {"backends": st.one_of(st.lists(backend, max_size=3), json_values)},
        optional={
            "match": st.one_of(match, json_values),
            "timeout": hostile_text,
            "retries": st.one_of(
                st.fixed_dictionaries(
                    {"attempts": st.integers(-2, 50)},
                    optional={"retryOn": hostile_text, "perTryTimeout": hostile_text},
                ),
                json_values,
            ),
            "fault": json_values,
            "mirror": st.one_of(
                st.fixed_dictionaries({"service": names}, optional={"percent": json_values}),
                json_values,
            ),
        },
    )
    spec = draw(
        st.fixed_dictionaries(
            {"service": names, "rules": st.one_of(st.lists(rule, max_size=4), json_values)},
            optional={"policy": json_values},
        )
    )
    return spec


@st.composite
def manifest_texts(draw: st.DrawFn) -> str:
    """YAML a user (or an attacker with write access to the folder) might
    save: mostly near-valid objects, mutated; sometimes anything."""
    kind = draw(st.sampled_from(["service", "slice", "route", "raw", "bomb"]))
    if kind == "raw":
        return draw(st.text(max_size=400))
    if kind == "bomb":
        # Aliases, a billion laughs deep: parsed as shared references.
        depth = draw(st.integers(1, 12))
        lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
        return "\n".join(lines) + "\n"
    if kind == "service":
        doc: Any = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": draw(names),
                "namespace": draw(st.one_of(st.just("demo"), names)),
                "annotations": draw(annotation_values()),
            },
            "spec": {
                "ports": draw(
                    st.one_of(
                        st.lists(
                            st.fixed_dictionaries(
                                {"port": st.one_of(st.integers(-1, 70000), json_values)},
                                optional={"name": names, "appProtocol": names},
                            ),
                            max_size=3,
                        ),
                        json_values,
                    )
                ),
                "clusterIP": draw(st.one_of(st.just("None"), hostile_text)),
            },
        }
    elif kind == "slice":
        doc = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": draw(names),
                "namespace": "demo",
                "labels": {"kubernetes.io/service-name": draw(names)},
            },
            "addressType": draw(st.sampled_from(["IPv4", "IPv6", "FQDN", "x"])),
            "ports": draw(json_values),
            "endpoints": draw(
                st.lists(
                    st.fixed_dictionaries(
                        {"addresses": st.lists(st.one_of(st.ip_addresses().map(str), names))},
                        optional={"conditions": json_values, "targetRef": json_values},
                    ),
                    max_size=3,
                )
            ),
        }
    else:
        doc = {
            "apiVersion": "shoal.io/v1alpha1",
            "kind": "TrafficRoute",
            "metadata": {"name": draw(names), "namespace": "demo"},
            "spec": draw(traffic_route_specs()),
        }
    text = yaml.safe_dump(doc, allow_unicode=True)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(st.sampled_from(["", ":", "-", "\n", "  ", "{", "&x", "*x"]))
            + text[at:]
        )
    return text


@st.composite
def discovery_requests(draw: st.DrawFn, *, delta: bool) -> list[Any]:
    """A stream's requests: a first one with a node (sometimes not), then
    whatever an attacker sends."""
    namespace = draw(st.sampled_from(["demo", "other", "Demo", ""]))
    node_ = sidecar(
        draw(st.one_of(st.just("sidecar~demo~web-1"), hostile_text)),
        namespace,
        draw(st.sampled_from(["web", "db", "web.v2", "UPPER"])),
    )
    for _ in range(draw(st.integers(0, 2))):
        field = node_.metadata.fields[draw(st.sampled_from(list(node_.metadata.fields)))]
        if draw(st.booleans()):
            field.string_value = draw(hostile_text)
        else:
            # Ports as numbers: infinities, NaN, fractions, huge and negative.
            field.number_value = draw(
                st.one_of(
                    st.sampled_from(
                        [math.inf, -math.inf, math.nan, 1e300, -1.0, 0.5, 0.0, 65536.0, 2.0**63]
                    ),
                    st.floats(allow_nan=True, allow_infinity=True),
                )
            )
    out = []
    for i in range(draw(st.integers(1, 6))):
        type_url = draw(st.one_of(st.sampled_from(TYPES), hostile_text))
        names_ = draw(st.lists(st.one_of(names, st.just("*")), max_size=8))
        if delta:
            request: Any = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=names_,
                resource_names_unsubscribe=draw(st.lists(names, max_size=3)),
                response_nonce=draw(st.one_of(st.just(""), st.integers(0, 5).map(str))),
            )
            if i == 0 and draw(st.booleans()):
                for name in draw(st.lists(names, max_size=5)):
                    request.initial_resource_versions[name] = draw(hostile_text)
        else:
            request = discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                resource_names=names_,
                version_info=draw(st.one_of(st.just(""), hostile_text)),
                response_nonce=draw(st.one_of(st.just(""), st.integers(0, 5).map(str))),
            )
        if draw(st.integers(0, 4)) == 0:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=draw(hostile_text)))
        if i == 0 and draw(st.integers(0, 9)) > 0:
            request.node.CopyFrom(node_)
        out.append(request)
    return out


csr_inputs = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda uri, dns: _csr(uri, dns),
        st.one_of(
            st.just("spiffe://cluster.local/ns/default/sa/vm-sa"),
            st.builds(lambda a, b: f"spiffe://cluster.local/ns/{a}/sa/{b}", names, names),
            hostile_text,
        ),
        st.lists(st.from_regex(r"[a-z]{1,10}\.example", fullmatch=True), max_size=2),
    ),
)


def _csr(uri: str, dns: list[str]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    with contextlib.suppress(ValueError):
        sans.append(x509.UniformResourceIdentifier(uri))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    request = builder.sign(ca.new_key(), hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


@st.composite
def admin_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
    path = draw(
        st.one_of(
            st.sampled_from(
                [
                    "/",
                    "/healthz",
                    "/ready",
                    "/metrics",
                    "/debug/syncz",
                    "/debug/ca",
                    "/debug/config_dump",
                    "/debug/problems",
                    "/ca/join-token",
                    "/ca/rotate-root",
                    "/nope",
                ]
            ),
            st.from_regex(r"/[a-z/_%.]{0,30}", fullmatch=True),
        )
    )
    query = draw(
        st.dictionaries(
            st.sampled_from(["proxy", "namespace", "service_account", "ttl", "compromised", "x"]),
            st.one_of(names, st.sampled_from(["1e9", "inf", "nan", "-1", "600", "true"])),
            max_size=4,
        )
    )
    headers = draw(
        st.dictionaries(
            st.sampled_from(["Host", "Origin", "Content-Type", "X-Forwarded-For"]),
            st.one_of(
                st.sampled_from(
                    ["evil.example", "http://evil.example", "127.0.0.1", "localhost:1", "[::1]"]
                ),
                st.from_regex(r"[ -~]{0,40}", fullmatch=True),
            ),
            max_size=3,
        )
    )
    body = draw(st.binary(max_size=64))
    from urllib.parse import urlencode

    return method, path + ("?" + urlencode(query) if query else ""), headers, body


# -- targets ----------------------------------------------------------------------


def discovery_stream(h: Harness, requests: list[Any], delta: bool) -> None:
    """A stream of arbitrary requests; the client then half-closes and the
    server must end the stream, with a refusal at most."""
    h.run(_discovery_stream(h.control_plane, requests, delta), timeout=120)
    h.check()


async def _discovery_stream(cp: cli.ControlPlane, requests: list[Any], delta: bool) -> None:
    pair = clients.workload(cp, "demo", "web")
    async with clients.channel(cp, pair) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.DeltaAggregatedResources() if delta else stub.StreamAggregatedResources()
        # The server may end the stream before every request is written.
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for request in requests:
                await call.write(request)
            await call.done_writing()
        # The stream must end once the client is done (a hang times out).
        # A handler that raised would end it UNKNOWN, and gRPC would log the
        # exception (the harness's crash check). INTERNAL can be this
        # client's own: gRPC's answer to a write racing the server's end.
        with contextlib.suppress(grpc.aio.AioRpcError):
            async with asyncio.timeout(60):
                while (await call.read()) is not grpc.aio.EOF:
                    pass
        code = await call.code()
        expected = {grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, *GRPC_REFUSALS}
        assert code in expected, (code, await call.details())


def join_request(h: Harness, token: str, csr: bytes, valid_token: bool) -> None:
    h.run(_join(h.control_plane, token, csr, valid_token), timeout=60)
    h.check()


async def _join(cp: cli.ControlPlane, token: str, csr: bytes, valid_token: bool) -> None:
    assert cp.authority is not None
    if valid_token:
        token = await _mint(cp)
    creds = grpc.ssl_channel_credentials(cp.authority.root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{cp.join_port}", creds) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        try:
            answer = await stub.Join(ca_pb2.JoinRequest(token=token, csr_pem=csr), timeout=30)
        except grpc.aio.AioRpcError as err:
            assert err.code() in GRPC_REFUSALS, (err.code(), err.details())
        else:
            assert valid_token and answer.spiffe_id.endswith("/sa/vm-sa"), answer.spiffe_id


async def _mint(cp: cli.ControlPlane) -> str:
    # A token a fuzzed CSR could not use stays outstanding until it expires,
    # and at most join.MAX_TOKENS are: short-lived, so that minutes of
    # examples stay under the cap (an expired one is only refused).
    connector = aiohttp.UnixConnector(path=cp.admin_socket)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            "http://localhost/ca/join-token?namespace=default&service_account=vm-sa&ttl=5"
        ) as r,
    ):
        answer = await r.json()
        assert r.status == 202, answer
        return str(answer["token"])


def manifest(h: Harness, text: str) -> None:
    """A file of the registry folder, read, built and translated for a
    proxy, as a saved file is: problems reported, nothing raised."""
    folder = Path(tempfile.mkdtemp(prefix="shoal-fuzz-registry-"))
    path = folder / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    registry = files.FolderRegistry(folder)
    state = registry.load()
    for problem in registry.problems:
        assert "\n" not in str(problem) or "Traceback" not in str(problem)
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0, 0))
    ctl.update(state)
    ctl.rebuild()
    for namespace in {k.namespace for k in state.services} or {"demo"}:
        event = asyncio.Event()
        snapshots.watch(cache.Client(sidecar(f"p-{namespace}", namespace, "web")), event)
    ctl.rebuild()
    path.unlink()
    folder.rmdir()
    h.check()


def admin_request(
    h: Harness, method: str, path: str, headers: dict[str, str], body: bytes, on_socket: bool
) -> None:
    h.run(_admin(h.control_plane, method, path, headers, body, on_socket), timeout=60)
    h.check()


async def _admin(
    cp: cli.ControlPlane,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    on_socket: bool,
) -> None:
    if "compromised" in path or "rotate-root" in path:
        # Rotating the root in the middle of a fuzz run is allowed (an admin
        # may); it is exercised on its own. Here it would only slow the run.
        path = "/ca/rotate-root-not"
    connector: aiohttp.BaseConnector = (
        aiohttp.UnixConnector(path=cp.admin_socket) if on_socket else aiohttp.TCPConnector()
    )
    base = "http://localhost" if on_socket else f"http://127.0.0.1:{cp.admin_port}"
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            async with session.request(method, base + path, headers=headers, data=body) as r:
                await r.read()
                status = r.status
        except aiohttp.ClientResponseError as err:
            # The client's own complaint about an answer (a 400 with a body
            # to a HEAD): what the server said is still its status.
            status = err.status
        assert status < 500, (status, method, path[:200], headers)
        privileged = path.startswith(("/debug", "/ca"))
        if not on_socket and privileged:
            assert status >= 400, (status, path[:200])


def annotations_only(value: dict[str, str]) -> None:
    """Each annotation parser on its own: AnnotationError or a value."""
    from shoal.model import mesh

    svc = mesh.Service("demo", "web", (mesh.Port(80, "http"),), annotations=mesh.frozen_map(value))
    known = {svc.key: svc}
    for parse in (
        lambda: annotations.export_to(svc.annotations),
        lambda: annotations.dependencies(svc.annotations, "demo"),
        lambda: annotations.mtls(svc.annotations),
        lambda: annotations.allow(svc.annotations),
        lambda: annotations.outlier(svc.annotations),
        lambda: annotations.service_route(svc, known),
    ):
        with contextlib.suppress(annotations.AnnotationError):
            parse()


def admission_review(h: Harness, body: bytes, content_type: str) -> None:
    """The webhook, over HTTPS as the API server calls it, on any request: a
    400 with a reason, or an AdmissionReview answering the request's uid; a
    patch it sends applies to the Pod, and the injected Pod is not injected
    again."""
    h.run(_admission(h.control_plane, body, content_type), timeout=60)
    h.check()


async def _admission(cp: cli.ControlPlane, body: bytes, content_type: str) -> None:
    assert cp.authority is not None
    context = ssl.create_default_context(cadata=cp.authority.xds_trust.decode())
    url = f"https://127.0.0.1:{cp.webhook_port}{webhook.PATH}"
    async with aiohttp.ClientSession() as session:

        async def post(data: bytes) -> tuple[int, bytes]:
            async with session.post(
                url, data=data, headers={"Content-Type": content_type}, ssl=context
            ) as r:
                return r.status, await r.read()

        status, answer = await post(body)
        assert status in (200, 400), (status, answer[:300])
        if status == 400:
            assert answer.strip() and b"injection failed" not in answer, answer[:300]
            return
        response = json.loads(answer)["response"]
        request = json.loads(body)["request"]
        assert response["uid"] == request["uid"]
        if "patch" not in response:
            return
        pod = request["object"]
        injected = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
        again = json.dumps({**json.loads(body), "request": {**request, "object": injected}})
        status, answer = await post(again.encode())
        assert status == 200 and "patch" not in json.loads(answer)["response"], answer[:300]


def sign_csr(csr: bytes) -> None:
    authority = _AUTHORITY()
    with contextlib.suppress(ca.CAError):
        authority.sign_csr(
            csr,
            expect_uri="spiffe://cluster.local/ns/default/sa/vm-sa",
            ttl=ca.BOOTSTRAP_TTL,
            server=False,
        )


def _authority() -> Callable[[], ca.Authority]:
    made: list[ca.Authority] = []

    def get() -> ca.Authority:
        if not made:
            made.append(ca.Authority(ca.new_root("cluster.local")))
        return made[0]

    return get


_AUTHORITY = _authority()


def token_table(operations: list[tuple[str, int]]) -> None:
    """Mint, check and spend in any order, with the clock moving: the table
    never grows past its bound and never raises but TokenError."""
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)]
    tokens = join.JoinTokens(clock=lambda: now[0])
    minted: list[str] = []
    for op, n in operations:
        with contextlib.suppress(join.TokenError):
            if op == "mint":
                minted.append(tokens.mint("demo", "web", datetime.timedelta(seconds=n + 1)))
            elif op == "check" and minted:
                tokens.check(minted[n % len(minted)])
            elif op == "spend" and minted:
                token = minted[n % len(minted)]
                tokens.check(token)
                tokens.spend(token)
            elif op == "wait":
                now[0] += datetime.timedelta(seconds=n)
        assert len(tokens) <= join.MAX_TOKENS
