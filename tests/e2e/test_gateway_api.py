"""The Gateway API's mesh profile (GAMMA) through real sidecars, in the shape
of the upstream conformance suite (conformance/tests/mesh): Services `echo`,
`echo-v1` and `echo-v2` with ports 80 and 8080, an echo app behind each
version that reports its pod, namespace, path, method and request headers,
and a client behind its own sidecar. Each case names the upstream test it
follows."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from shoal import cli, envoy
from shoal.demo import mesh
from tests.conftest import write
from tests.e2e.helpers import caught_up, eventually

NS = "mesh"
CONSUMER = "consumer"


@pytest.fixture
def xds_mode() -> str:
    """Routing, not the xDS variants, is under test: one kind of Envoy."""
    return "delta"


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def pod(self) -> str:
        return str(self.body.get("instance", ""))

    @property
    def request(self) -> dict[str, Any]:
        found: dict[str, Any] = self.body.get("request", {})
        return found


async def call(
    session: aiohttp.ClientSession,
    via: mesh.Workload,
    host: str,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request from `via`'s app through its sidecar, redirects not followed."""
    async with session.request(
        method,
        f"{via.outbound}{path}",
        headers={"Host": host, **(headers or {})},
        allow_redirects=False,
    ) as r:
        body = await r.json() if r.content_type == "application/json" else {"text": await r.text()}
        return Reply(r.status, body, {k.lower(): v for k, v in r.headers.items()})


def _service(name: str, namespace: str, endpoints: list[int]) -> str:
    """A Service with ports http 80 and http-alt 8080, both served by each
    endpoint's one sidecar inbound port."""
    docs = [
        f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  ports:
    - {{name: http, port: 80, appProtocol: http}}
    - {{name: http-alt, port: 8080, appProtocol: http}}
"""
    ]
    for i, port in enumerate(endpoints):
        docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{i}
  namespace: {namespace}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
  - {{name: http, port: {port}}}
  - {{name: http-alt, port: {port}}}
endpoints:
  - addresses: ["127.0.0.1"]
    conditions: {{ready: true}}
""")
    return "---\n".join(docs)


@dataclass
class EchoMesh:
    folder: Path
    client: mesh.Workload
    v1: mesh.Workload
    v2: mesh.Workload
    consumer: mesh.Workload | None = None
    shadow: mesh.Workload | None = None


async def _echo_mesh(
    cp: cli.ControlPlane,
    folder: Path,
    local: mesh.LocalMesh,
    *,
    consumer: bool = False,
    shadow: bool = False,
) -> EchoMesh:
    ports = {n: envoy.free_port() for n in ("v1", "v2", "client", "consumer", "shadow")}
    write(folder, "echo.yaml", _service("echo", NS, [ports["v1"], ports["v2"]]))
    write(folder, "echo-v1.yaml", _service("echo-v1", NS, [ports["v1"]]))
    write(folder, "echo-v2.yaml", _service("echo-v2", NS, [ports["v2"]]))
    write(folder, "client.yaml", _service("client", NS, [ports["client"]]))
    if shadow:
        write(folder, "shadow.yaml", _service("echo-shadow", NS, [ports["shadow"]]))
    if consumer:
        write(folder, "consumer.yaml", _service("client", CONSUMER, [ports["consumer"]]))
    await caught_up(cp, folder)
    v1 = await local.add(
        "echo-v1-1", namespace=NS, service="echo-v1", inbound_port=ports["v1"], version="v1"
    )
    v2 = await local.add(
        "echo-v2-1", namespace=NS, service="echo-v2", inbound_port=ports["v2"], version="v2"
    )
    client = await local.add(
        "client-1", namespace=NS, service="client", inbound_port=ports["client"]
    )
    found = EchoMesh(folder, client, v1, v2)
    if consumer:
        found.consumer = await local.add(
            "client-c", namespace=CONSUMER, service="client", inbound_port=ports["consumer"]
        )
    if shadow:
        found.shadow = await local.add(
            "echo-shadow-1", namespace=NS, service="echo-shadow", inbound_port=ports["shadow"]
        )
    return found


async def _routes(cp: cli.ControlPlane, folder: Path, text: str) -> None:
    """The test's routes in force in the control plane (the sidecars get
    them at their next push: callers wait on what they should see)."""
    write(folder, "routes.yaml", text)
    await caught_up(cp, folder)


def _http_route(
    name: str,
    parent: str,
    rules: str,
    *,
    port: int | None = None,
    namespace: str = NS,
    parent_ns: str | None = None,
) -> str:
    ref = f'group: "", kind: Service, name: {parent}'
    if port is not None:
        ref += f", port: {port}"
    if parent_ns is not None:
        ref += f", namespace: {parent_ns}"
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  parentRefs:
    - {{{ref}}}
  rules:
{rules}"""


async def _until(check: Any, timeout: float = 30.0) -> None:
    await eventually(check, timeout=timeout)


async def test_ports_split_named_rules_and_a_route_for_one_port(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    m = await _echo_mesh(control_plane, registry_dir, local_mesh)
    async with aiohttp.ClientSession() as s:
        # MeshBasic: without routes, a Service is its endpoints.
        seen = {(await call(s, m.client, "echo")).pod for _ in range(20)}
        assert seen == {"echo-v1-1", "echo-v2-1"}

        # MeshPorts: a route with a port routes that port only; without, every port.
        await _routes(
            control_plane,
            registry_dir,
            _http_route(
                "mesh-split-v1",
                "echo-v1",
                """    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: X-Header-Set, value: v1}]}
      backendRefs: [{name: echo-v1, port: 80}]
""",
                port=80,
            )
            + "---\n"
            + _http_route(
                "mesh-split-v2",
                "echo-v2",
                """    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: X-Header-Set, value: v2}]}
      backendRefs: [{name: echo-v2, port: 80}]
""",
            ),
        )

        async def ports_routed() -> bool:
            return (await call(s, m.client, "echo-v2:8080")).headers.get("x-header-set") == "v2"

        await _until(ports_routed)
        r = await call(s, m.client, "echo-v1")
        assert (r.status, r.headers.get("x-header-set"), r.pod) == (200, "v1", "echo-v1-1")
        r = await call(s, m.client, "echo-v1:8080")
        assert (r.status, r.headers.get("x-header-set"), r.pod) == (200, None, "echo-v1-1")
        r = await call(s, m.client, "echo-v2")
        assert (r.status, r.headers.get("x-header-set"), r.pod) == (200, "v2", "echo-v2-1")

        # MeshHTTPRouteSimpleSameNamespace: one rule, every call to one version.
        await _routes(
            control_plane,
            registry_dir,
            _http_route(
                "gateway-conformance-mesh-test",
                "echo",
                "    - backendRefs: [{name: echo-v1, port: 8080}]\n",
                port=80,
            ),
        )

        async def simple() -> bool:
            pods = {(await call(s, m.client, "echo")).pod for _ in range(10)}
            return pods == {"echo-v1-1"}

        await _until(simple)

        # MeshTrafficSplit: exact paths to each version; anything else 404.
        # MeshHTTPRouteNamedRule: a named and an unnamed rule side by side.
        await _routes(
            control_plane,
            registry_dir,
            _http_route(
                "mesh-split",
                "echo",
                """    - matches: [{path: {type: Exact, value: /v1}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: Exact, value: /v2}}]
      backendRefs: [{name: echo-v2, port: 80}]
    - name: named-rule
      matches: [{path: {type: PathPrefix, value: /named}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /unnamed}}]
      backendRefs: [{name: echo-v2, port: 8080}]
""",
            ),
        )

        async def split() -> bool:
            return (await call(s, m.client, "echo", "/other")).status == 404

        await _until(split)
        for path, pod in (
            ("/v1", "echo-v1-1"),
            ("/v2", "echo-v2-1"),
            ("/named", "echo-v1-1"),
            ("/unnamed", "echo-v2-1"),
        ):
            for _ in range(5):
                r = await call(s, m.client, "echo", path)
                assert (r.status, r.pod) == (200, pod), (path, r)
        r = await call(s, m.client, "echo", "/v1/more")
        assert r.status == 404 and "no rule" in r.body["text"]
        # The old routes are gone with their file.
        assert (await call(s, m.client, "echo-v1")).headers.get("x-header-set") is None


async def test_matching_follows_the_gateway_api_precedence(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    m = await _echo_mesh(control_plane, registry_dir, local_mesh)
    # MeshHTTPRouteMatching and MeshHTTPRouteQueryParamMatching, and a method.
    await _routes(
        control_plane,
        registry_dir,
        _http_route(
            "mesh-matching",
            "echo",
            """    - matches:
        - {path: {type: PathPrefix, value: /}}
        - headers: [{name: version, value: one}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches:
        - {path: {type: PathPrefix, value: /v2}}
        - headers: [{name: version, value: two}]
      backendRefs: [{name: echo-v2, port: 8080}]
""",
            port=80,
        )
        + "---\n"
        + _http_route(
            "mesh-query-param-matching",
            "echo",
            """    - matches: [{queryParams: [{name: animal, value: whale}]}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{queryParams: [{name: animal, value: dolphin}]}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /path5}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{queryParams: [{name: animal, value: hydra}]}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{method: POST, path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
      backendRefs: [{name: echo-v2, port: 8080}]
""",
            port=8080,
        ),
    )
    async with aiohttp.ClientSession() as s:

        async def routed() -> bool:
            return (await call(s, m.client, "echo:8080", "/?animal=cat")).status == 404

        await _until(routed)
        cases: list[tuple[str, str, dict[str, str], str, str]] = [
            # host, path, headers, method, expected pod
            ("echo", "/", {}, "GET", "echo-v1-1"),
            ("echo", "/example", {}, "GET", "echo-v1-1"),
            ("echo", "/", {"Version": "one"}, "GET", "echo-v1-1"),
            ("echo", "/v2", {}, "GET", "echo-v2-1"),
            ("echo", "/v2/example", {}, "GET", "echo-v2-1"),
            ("echo", "/v2example", {}, "GET", "echo-v1-1"),  # whole segments only
            ("echo", "/", {"Version": "two"}, "GET", "echo-v2-1"),
            ("echo:8080", "/?animal=whale", {}, "GET", "echo-v1-1"),
            ("echo:8080", "/?animal=dolphin", {}, "GET", "echo-v2-1"),
            # More query parameters win.
            ("echo:8080", "/?animal=dolphin&color=blue", {}, "GET", "echo-v1-1"),
            # A longer path prefix wins over query parameters.
            ("echo:8080", "/path5?animal=hydra", {}, "GET", "echo-v1-1"),
            ("echo:8080", "/?animal=hydra", {}, "GET", "echo-v2-1"),
            # A method wins over none, at equal paths.
            ("echo:8080", "/v2", {}, "POST", "echo-v1-1"),
            ("echo:8080", "/re/42", {}, "GET", "echo-v2-1"),
        ]
        for host, path, headers, method, pod in cases:
            r = await call(s, m.client, host, path, method=method, headers=headers)
            assert (r.status, r.pod) == (200, pod), (host, path, headers, method, r.status, r.pod)
        for host, path in (("echo:8080", "/?animal=cat"), ("echo:8080", "/re/x")):
            assert (await call(s, m.client, host, path)).status == 404, path


async def _shares(
    s: aiohttp.ClientSession, via: mesh.Workload, host: str, count: int
) -> collections.Counter[str]:
    gate = asyncio.Semaphore(10)
    seen: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        async with gate:
            r = await call(s, via, host)
            seen[r.pod if r.status == 200 else f"!{r.status}"] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return seen


async def _within(
    sample: Callable[[], Awaitable[collections.Counter[str]]],
    name: str,
    share: float,
    what: str,
) -> collections.Counter[str]:
    """`name`'s share of 500 requests within 5 points of `share`, as the
    upstream suite checks it: Envoy picks a weighted backend at random, so
    one sample of 500 misses by more about once in 70 runs (the binomial's
    spread at n=500, p=0.7, worked out, not measured); the suite takes
    up to 10 samples, this takes up to 3 (a miss then means a wrong split)."""
    for _ in range(3):
        seen = await sample()
        print(f"{what} over 500 requests: {dict(seen)}")
        if abs(seen[name] / 500 - share) <= 0.05:
            return seen
    raise AssertionError(f"{what}: {name} got {seen[name] / 500:.3f}, not {share} +- 0.05")


async def test_weights_zero_weights_and_a_missing_backend(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    m = await _echo_mesh(control_plane, registry_dir, local_mesh)
    # MeshHTTPRouteWeight: 70/30 over 500 requests, within 5 points; a
    # backend of weight 0 gets nothing; a backend that does not exist is
    # answered 500 for its share.
    await _routes(
        control_plane,
        registry_dir,
        _http_route(
            "mesh-weighted-backends",
            "echo",
            """    - backendRefs:
        - {name: echo-v1, port: 8080, weight: 70}
        - {name: echo-v2, port: 8080, weight: 30}
        - {name: echo-v2, port: 80, weight: 0}
""",
            port=80,
        )
        + "---\n"
        + _http_route(
            "mesh-missing-backend",
            "echo",
            """    - backendRefs:
        - {name: echo-v1, port: 80}
        - {name: echo-gone, port: 80}
""",
            port=8080,
        ),
    )
    async with aiohttp.ClientSession() as s:

        async def weighted() -> bool:
            return (await call(s, m.client, "echo:8080")).status == 500

        await _until(weighted)
        seen = await _within(
            lambda: _shares(s, m.client, "echo", 500), "echo-v1-1", 0.7, "HTTPRoute 70/30"
        )
        assert set(seen) == {"echo-v1-1", "echo-v2-1"}, seen
        seen = await _within(
            lambda: _shares(s, m.client, "echo:8080", 500),
            "!500",
            0.5,
            "HTTPRoute 1:1 with a missing backend",
        )
        assert set(seen) == {"echo-v1-1", "!500"}, seen
    problems = [str(p) for p in control_plane.registry.problems]
    assert any(
        "HTTPRoute mesh/mesh-missing-backend" in p
        and "ResolvedRefs=BackendNotFound" in p
        and "spec.rules[0].backendRefs[1]: Service mesh/echo-gone does not exist" in p
        for p in problems
    ), problems


async def test_header_modifiers_rewrites_redirects_mirrors_and_timeouts(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    m = await _echo_mesh(control_plane, registry_dir, local_mesh, shadow=True)
    assert m.shadow is not None
    await _routes(
        control_plane,
        registry_dir,
        _http_route(
            "mesh-filters",
            "echo",
            """    - matches: [{path: {type: PathPrefix, value: /headers}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: set-overwrites-values}]
            add: [{name: X-Header-Add, value: add-appends-values}]
            remove: [X-Header-Remove]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: X-Response-Add, value: added}]}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
      filters:
        - type: URLRewrite
          urlRewrite:
            hostname: rewritten.example
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /full}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /hostname-redirect}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {hostname: example.org, statusCode: 301}
    - matches: [{path: {type: PathPrefix, value: /status-code-308}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {statusCode: 308}
    - matches: [{path: {type: PathPrefix, value: /original-prefix}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}
    - matches: [{path: {type: PathPrefix, value: /port-and-scheme}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, port: 8443}
    - matches: [{path: {type: PathPrefix, value: /scheme-only}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https}
    - matches: [{path: {type: PathPrefix, value: /scheme}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, hostname: example.org}
    - matches: [{path: {type: PathPrefix, value: /mirror}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: echo-shadow, port: 80}}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /slow}}]
      timeouts: {request: 200ms}
      backendRefs: [{name: echo-v1, port: 80}]
""",
        ),
    )
    async with aiohttp.ClientSession() as s:

        async def routed() -> bool:
            return (await call(s, m.client, "echo", "/nothing")).status == 404

        await _until(routed)
        # MeshHTTPRouteRequestHeaderModifier, and the response's.
        r = await call(
            s,
            m.client,
            "echo",
            "/headers",
            headers={
                "X-Header-Set": "some-other-value",
                "X-Header-Add": "one",
                "X-Header-Remove": "gone",
            },
        )
        seen = r.request["headers"]
        assert r.status == 200, r
        assert seen["x-header-set"] == "set-overwrites-values"
        assert seen["x-header-add"] in ("one,add-appends-values", "one, add-appends-values")
        assert "x-header-remove" not in seen
        assert r.headers.get("x-response-add") == "added"
        # MeshHTTPRouteRewritePath, and the host.
        for path, rewritten in (
            ("/strip-prefix/three", "/three"),
            ("/strip-prefix", "/"),
            ("/prefix/one/two", "/one/two"),
            ("/full/anything?q=1", "/one"),
        ):
            r = await call(s, m.client, "echo", path)
            assert (r.status, r.request["path"]) == (200, rewritten), (path, r)
        assert (await call(s, m.client, "echo", "/full/x?q=1")).request["query"] == "q=1"
        assert (await call(s, m.client, "echo", "/prefix/one")).request[
            "host"
        ] == "rewritten.example"
        # MeshHTTPRouteRedirectHostAndStatus, ...RedirectPath, ...RedirectPort, ...SchemeRedirect.
        for host, path, status, location in (
            ("echo", "/hostname-redirect", 301, "http://example.org/hostname-redirect"),
            ("echo", "/status-code-308", 308, "http://echo/status-code-308"),
            ("echo", "/original-prefix/lemon", 302, "http://echo/replacement-prefix/lemon"),
            ("echo", "/port-and-scheme", 302, "https://echo:8443/port-and-scheme"),
            ("echo", "/scheme", 302, "https://example.org/scheme"),
            # The scheme's own port, which Location leaves out.
            ("echo:8080", "/scheme", 302, "https://example.org/scheme"),
            ("echo", "/scheme-only", 302, "https://echo/scheme-only"),
            ("echo:8080", "/status-code-308", 308, "http://echo:8080/status-code-308"),
        ):
            r = await call(s, m.client, host, path)
            assert (r.status, r.headers.get("location")) == (status, location), (host, path, r)
        # A mirror gets a copy; the caller sees the backend's answer.
        before = m.shadow.app.served
        r = await call(s, m.client, "echo", "/mirror")
        assert r.pod == "echo-v1-1"

        async def mirrored() -> bool:
            return m.shadow is not None and m.shadow.app.served > before

        await _until(mirrored)
        # timeouts.request: a backend slower than it is a 504.
        m.v1.app.delay_s = 2.0
        try:
            r = await call(s, m.client, "echo", "/slow")
            assert r.status == 504, r
        finally:
            m.v1.app.delay_s = 0.0


async def test_shoal_policies_keep_working_next_to_an_httproute(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    """What an HTTPRoute cannot say (here a fault; retries, outlier
    detection) a Service's annotations still do, on the HTTPRoute's rules."""
    m = await _echo_mesh(control_plane, registry_dir, local_mesh)
    text = (registry_dir / "echo-v1.yaml").read_text()
    write(
        registry_dir,
        "echo-v1.yaml",
        text.replace(
            "metadata: {name: echo-v1, namespace: mesh}",
            "metadata: {name: echo-v1, namespace: mesh, "
            'annotations: {shoal.io/fault: "abort=418@100%"}}',
            1,
        ),
    )
    await _routes(
        control_plane,
        registry_dir,
        _http_route(
            "tagged",
            "echo-v1",
            """    - matches: [{path: {type: PathPrefix, value: /tagged}}]
      backendRefs: [{name: echo-v1, port: 80}]
""",
        ),
    )
    async with aiohttp.ClientSession() as s:

        async def routed() -> bool:
            return (await call(s, m.client, "echo-v1", "/other")).status == 404

        await _until(routed)
        assert (await call(s, m.client, "echo-v1", "/tagged")).status == 418
    problems = "\n".join(str(p) for p in control_plane.registry.problems)
    assert (
        "HTTPRoute mesh/tagged: routes Service mesh/echo-v1 where it applies, "
        "instead of the rules of its annotations" in problems
    ), problems


async def test_a_consumer_route_routes_only_its_own_namespace(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    m = await _echo_mesh(control_plane, registry_dir, local_mesh, consumer=True)
    assert m.consumer is not None
    # MeshConsumerRoute: a route in the caller's namespace whose parent is
    # in another; and a producer route, which it replaces for that caller.
    await _routes(
        control_plane,
        registry_dir,
        _http_route(
            "mesh-echo-add-header",
            "echo-v1",
            f"""    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{set: [{{name: X-Header-Set, value: set}}]}}
      backendRefs: [{{name: echo-v1, namespace: {NS}, port: 80}}]
""",
            namespace=CONSUMER,
            parent_ns=NS,
        )
        + "---\n"
        + _http_route(
            "producer",
            "echo-v1",
            """    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: X-Producer, value: "yes"}]}
      backendRefs: [{name: echo-v2, port: 80}]
""",
        ),
    )
    host = f"echo-v1.{NS}"
    async with aiohttp.ClientSession() as s:

        async def routed() -> bool:
            return (
                m.consumer is not None
                and (await call(s, m.consumer, host)).headers.get("x-header-set") == "set"
            )

        await _until(routed)
        r = await call(s, m.consumer, host)
        assert (r.pod, r.headers.get("x-producer")) == ("echo-v1-1", None)

        async def producer() -> bool:
            return (await call(s, m.client, host)).headers.get("x-producer") == "yes"

        await _until(producer)
        r = await call(s, m.client, host)
        assert (r.pod, r.headers.get("x-header-set")) == ("echo-v2-1", None)


async def test_invalid_routes_are_reported_and_harm_no_other_route(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    m = await _echo_mesh(control_plane, registry_dir, local_mesh)
    good = _http_route(
        "good",
        "echo-v2",
        """    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: X-Good, value: "yes"}]}
      backendRefs: [{name: echo-v2, port: 80}]
""",
    )
    bad = [
        _http_route(
            "bad-kind",
            "echo-v1",
            "    - backendRefs: [{group: example.com, kind: Bucket, name: b, port: 80}]\n",
        ),
        _http_route(
            "bad-regex",
            "echo",
            '    - matches: [{path: {type: RegularExpression, value: "/(unclosed"}}]\n'
            "      backendRefs: [{name: echo-v1, port: 80}]\n",
        ),
        """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad-parent, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Pod, name: echo-v1-1}]
  rules: [{backendRefs: [{name: echo-v1, port: 80}]}]
""",
        _http_route(
            "bad-filters",
            "echo",
            """    - filters:
        - {type: RequestRedirect, requestRedirect: {hostname: a.example}}
        - {type: URLRewrite, urlRewrite: {hostname: b.example}}
""",
        ),
        _http_route(
            "no-such-parent", "echo-nope", "    - backendRefs: [{name: echo-v1, port: 80}]\n"
        ),
    ]
    await _routes(control_plane, registry_dir, "---\n".join([good, *bad]))
    async with aiohttp.ClientSession() as s:

        async def good_applies() -> bool:
            return (await call(s, m.client, "echo-v2")).headers.get("x-good") == "yes"

        await _until(good_applies)
        # The invalid routes changed nothing: echo still reaches both versions.
        seen = {(await call(s, m.client, "echo")).pod for _ in range(20)}
        assert seen == {"echo-v1-1", "echo-v2-1"}
        # bad-kind is applied: its one backend is answered 500.
        assert (await call(s, m.client, "echo-v1")).status == 500
    problems = "\n".join(str(p) for p in control_plane.registry.problems)
    for expected in (
        "HTTPRoute mesh/bad-kind: on Service echo-v1: ResolvedRefs=InvalidKind: "
        "spec.rules[0].backendRefs[0]: Bucket (example.com) is not a Service",
        "HTTPRoute mesh/bad-regex: spec.rules[0].matches[0].path.value: "
        "'/(unclosed' is not a valid RE2",
        "HTTPRoute mesh/bad-parent: spec.parentRefs[0]: Pod (core) is not a Service or a Gateway",
        "HTTPRoute mesh/bad-filters: spec.rules[0].filters: "
        "RequestRedirect and URLRewrite cannot be in one rule",
        "HTTPRoute mesh/no-such-parent: on Service echo-nope: Accepted=NoMatchingParent: "
        "Service mesh/echo-nope does not exist",
    ):
        assert expected in problems, (expected, problems)


def _grpc_service(name: str, endpoints: list[int]) -> str:
    docs = [
        f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  ports: [{{name: grpc, port: 7070, appProtocol: grpc}}]
"""
    ]
    for i, port in enumerate(endpoints):
        docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{i}
  namespace: {NS}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: grpc, port: {port}}}]
endpoints: [{{addresses: ["127.0.0.1"], conditions: {{ready: true}}}}]
""")
    return "---\n".join(docs)


async def test_grpcroute_methods_weights_header_modifiers_and_a_mirror(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    ports = {n: envoy.free_port() for n in ("v1", "v2", "shadow", "client")}
    write(registry_dir, "grpc-echo.yaml", _grpc_service("grpc-echo", [ports["v1"], ports["v2"]]))
    write(registry_dir, "grpc-echo-v1.yaml", _grpc_service("grpc-echo-v1", [ports["v1"]]))
    write(registry_dir, "grpc-echo-v2.yaml", _grpc_service("grpc-echo-v2", [ports["v2"]]))
    write(registry_dir, "grpc-shadow.yaml", _grpc_service("grpc-shadow", [ports["shadow"]]))
    write(registry_dir, "client.yaml", _service("client", NS, [ports["client"]]))
    write(
        registry_dir,
        "routes.yaml",
        f"""apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: grpc-echo, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: grpc-echo, port: 7070}}]
  rules:
    - matches: [{{method: {{service: echo.Echo, method: Weighted}}}}]
      backendRefs:
        - {{name: grpc-echo-v1, port: 7070, weight: 70}}
        - {{name: grpc-echo-v2, port: 7070, weight: 30}}
    - matches: [{{method: {{service: echo.Echo, method: Headers}}}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{{name: x-header-set, value: set}}]
            remove: [x-header-remove]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{add: [{{name: x-response-add, value: added}}]}}
      backendRefs: [{{name: grpc-echo-v1, port: 7070}}]
    - matches: [{{method: {{service: echo.Echo, method: Mirror}}}}]
      filters:
        - type: RequestMirror
          requestMirror: {{backendRef: {{name: grpc-shadow, port: 7070}}}}
      backendRefs: [{{name: grpc-echo-v2, port: 7070}}]
    - matches: [{{method: {{service: echo.Echo}}, headers: [{{name: version, value: two}}]}}]
      backendRefs: [{{name: grpc-echo-v2, port: 7070}}]
    - matches: [{{method: {{service: echo.Echo}}}}]
      backendRefs: [{{name: grpc-echo-v1, port: 7070}}]
""",
    )
    await caught_up(control_plane, registry_dir)
    for name, service in (
        ("v1", "grpc-echo-v1"),
        ("v2", "grpc-echo-v2"),
        ("shadow", "grpc-shadow"),
    ):
        await local_mesh.add(
            f"{service}-1", namespace=NS, service=service, inbound_port=ports[name], grpc_app=True
        )
    client = await local_mesh.add(
        "client-1", namespace=NS, service="client", inbound_port=ports["client"]
    )
    shadow = local_mesh.workloads["grpc-shadow-1"]
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{client.sidecar.outbound_port}",
        options=[("grpc.default_authority", "grpc-echo:7070")],
    ) as channel:

        async def rpc(
            method: str, metadata: tuple[tuple[str, str], ...] = ()
        ) -> tuple[dict[str, Any], dict[str, str]]:
            call = channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
            reply = await call
            initial = {k: v for k, v in (await call.initial_metadata()) or ()}
            return json.loads(reply), initial

        async def routed() -> bool:
            try:
                await rpc("/echo.Other/Thing")
            except grpc.aio.AioRpcError as err:
                return err.code() is grpc.StatusCode.UNIMPLEMENTED
            return False

        await _until(routed)
        # MeshGRPCRouteWeight: 70/30 within 5 points over 500 calls.
        gate = asyncio.Semaphore(10)

        async def one() -> str:
            async with gate:
                return str((await rpc("/echo.Echo/Weighted"))[0]["instance"])

        async def calls() -> collections.Counter[str]:
            return collections.Counter(await asyncio.gather(*(one() for _ in range(500))))

        seen = await _within(calls, "grpc-echo-v1-1", 0.7, "GRPCRoute 70/30")
        assert set(seen) == {"grpc-echo-v1-1", "grpc-echo-v2-1"}, seen
        # Header modifiers: on the request's metadata and the response's.
        body, initial = await rpc(
            "/echo.Echo/Headers", (("x-header-set", "other"), ("x-header-remove", "gone"))
        )
        assert body["instance"] == "grpc-echo-v1-1"
        assert body["request"]["headers"]["x-header-set"] == "set"
        assert "x-header-remove" not in body["request"]["headers"]
        assert initial.get("x-response-add") == "added"
        # Methods and headers: a header match wins over the service's catch-all.
        assert (await rpc("/echo.Echo/Any"))[0]["instance"] == "grpc-echo-v1-1"
        assert (await rpc("/echo.Echo/Any", (("version", "two"),)))[0][
            "instance"
        ] == "grpc-echo-v2-1"
        # A mirror gets a copy; the caller sees the backend's answer.
        before = shadow.app.served
        assert (await rpc("/echo.Echo/Mirror"))[0]["instance"] == "grpc-echo-v2-1"

        async def mirrored() -> bool:
            return shadow.app.served > before

        await _until(mirrored)
