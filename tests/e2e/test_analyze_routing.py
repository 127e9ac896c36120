"""The routing codes through real sidecars: each misconfiguration is written
into the manifests folder, its symptom shown with requests through the
caller's sidecar, the control plane made to name the cause (object, field,
reason), then the manifest fixed, the traffic shown right and the problem
gone.

Every test has the same cast: `caller`, and `web-v1` and `web-v2` each with
an app behind its sidecar; `web` is the Service under test, with no
endpoints of its own, so what answers for it is only what its routing
chooses.
"""

from __future__ import annotations

import asyncio
import collections
import json
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from shoal import cli, envoy
from shoal.demo import mesh
from tests.conftest import write
from tests.e2e import diagnosis
from tests.e2e.helpers import caught_up, eventually
from tests.manifests import workload

SIZE = 20  # requests per look at who answers


@pytest.fixture
def xds_mode() -> str:
    """Diagnosis, not the xDS variants, is under test: one kind of Envoy."""
    return "delta"


@dataclass
class Cast:
    caller: mesh.Workload
    session: aiohttp.ClientSession

    async def answers(
        self, path: str = "/", headers: dict[str, str] | None = None
    ) -> collections.Counter[str]:
        """Who answered SIZE requests for `web` ("!503" and the like for failures)."""
        seen: collections.Counter[str] = collections.Counter()
        for _ in range(SIZE):
            try:
                status, body = await mesh.get(self.session, self.caller, "web", path, headers)
            except aiohttp.ClientError as err:
                seen[f"!{type(err).__name__}"] += 1
                continue
            if status == 200 and isinstance(body, dict):
                seen[str(body["instance"])] += 1
            else:
                seen[f"!{status}"] += 1
        return seen

    async def until(
        self, wanted: set[str], path: str = "/", headers: dict[str, str] | None = None
    ) -> None:
        """Until exactly `wanted` answer (each of SIZE requests, one of them)."""

        async def seen() -> bool:
            return set(await self.answers(path, headers)) == wanted

        await eventually(seen, 30.0)


async def _cast(
    cp: cli.ControlPlane, folder: Path, local: mesh.LocalMesh, session: aiohttp.ClientSession
) -> Cast:
    ports = {name: envoy.free_port() for name in ("caller", "web-v1", "web-v2")}
    for name, port in ports.items():
        write(folder, f"{name}.yaml", workload(name, name, port))
    await caught_up(cp, folder)
    started = await asyncio.gather(
        *(
            local.add(
                f"{name}-1",
                namespace="default",
                service=name,
                inbound_port=port,
                service_account=name,
            )
            for name, port in ports.items()
        )
    )
    return Cast(started[0], session)


def _web(notes: dict[str, str], ports: str = "[{name: http, port: 80}]") -> str:
    """Service `web` with `notes` as annotations, and no endpoints."""
    shown = ", ".join(f"{k}: {json.dumps(v)}" for k, v in notes.items())
    annotations = f", annotations: {{{shown}}}" if notes else ""
    return f"""apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default{annotations}}}
spec: {{ports: {ports}}}
"""


def _misconfigure(folder: Path, name: str, text: str) -> float:
    """Write a manifest; returns the loop time, from which a diagnosis is timed."""
    started = asyncio.get_running_loop().time()
    write(folder, name, text)
    return started


async def test_a_split_to_a_missing_service_and_a_shadowed_header_route(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    cp = control_plane
    async with aiohttp.ClientSession() as session:
        web = await _cast(cp, registry_dir, local_mesh, session)

        # SHL0101: a typo in the split. The annotations are refused whole,
        # so nothing routes `web` and its own (absent) endpoints answer: 503.
        since = _misconfigure(
            registry_dir, "web.yaml", _web({"shoal.io/split": "web-v1=50,web-v3=50"})
        )
        await web.until({"!503"})
        p = await diagnosis.diagnosed(cp, "SHL0101", "web-v3", since=since)
        assert (p["object"], p["field"]) == (
            "Service default/web",
            "metadata.annotations[shoal.io/split]",
        )
        assert "backend Service default/web-v3 does not exist" in p["reason"], p
        # As a user sees it: an error, so the exit status says so. (In a
        # thread: the control plane answering it runs on this loop.)
        result = await asyncio.to_thread(diagnosis.analyze_cli, cp)
        assert result.returncode == 1, result.stdout + result.stderr
        assert (
            "Error [SHL0101] Service default/web (metadata.annotations[shoal.io/split])"
            in result.stdout
        ), result.stdout
        as_json = await asyncio.to_thread(diagnosis.analyze_cli, cp, "--output", "json")
        assert as_json.returncode == 1
        assert diagnosis.of_code(json.loads(as_json.stdout), "SHL0101", "web-v3")

        write(registry_dir, "web.yaml", _web({"shoal.io/split": "web-v1=50,web-v2=50"}))
        await web.until({"web-v1-1", "web-v2-1"})
        await diagnosis.cleared(cp, "SHL0101", "web-v3")

        # SHL0104: `gamma` is meant for web-v1, but the regular expression
        # before it takes every request it would: web-v2 answers them.
        shadowing = "x-group~=beta|gamma -> web-v2; x-group=gamma -> web-v1"
        notes = {"shoal.io/split": "web-v1=50,web-v2=50", "shoal.io/route-headers": shadowing}
        since = _misconfigure(registry_dir, "web.yaml", _web(notes))
        gamma = {"x-group": "gamma"}
        await web.until({"web-v2-1"}, headers=gamma)
        p = await diagnosis.diagnosed(cp, "SHL0104", "x-group=gamma", since=since)
        assert (p["object"], p["field"]) == (
            "Service default/web",
            "metadata.annotations[shoal.io/route-headers]",
        )
        assert "'x-group~=beta|gamma -> web-v2' comes first" in p["reason"], p
        assert p["severity"] == "Warning"

        notes["shoal.io/route-headers"] = "x-group=gamma -> web-v1; x-group~=beta|gamma -> web-v2"
        write(registry_dir, "web.yaml", _web(notes))
        await web.until({"web-v1-1"}, headers=gamma)
        assert set(await web.answers(headers={"x-group": "beta"})) == {"web-v2-1"}
        await diagnosis.cleared(cp, "SHL0104", "x-group=gamma")


def _traffic_route(rules: list[tuple[str | None, str]]) -> str:
    """TrafficRoute `web-rules` for `web`: (path prefix or None, backend) rules."""
    lines = []
    for prefix, backend in rules:
        match = f"match: {{path: {{prefix: {prefix}}}}}, " if prefix else ""
        lines.append(f"    - {{{match}backends: [{{service: {backend}}}]}}")
    body = "\n".join(lines)
    return f"""apiVersion: shoal.io/v1alpha1
kind: TrafficRoute
metadata: {{name: web-rules, namespace: default}}
spec:
  service: web
  rules:
{body}
"""


async def test_a_traffic_route_with_a_shadowed_rule_over_routing_annotations(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    cp = control_plane
    async with aiohttp.ClientSession() as session:
        web = await _cast(cp, registry_dir, local_mesh, session)
        # The Service's annotations send everything to web-v2, but a
        # TrafficRoute routes it too (SHL0105), and there `/api` comes before
        # `/api/v2`, which can never match (SHL0104).
        write(registry_dir, "web.yaml", _web({"shoal.io/split": "web-v2=100"}))
        await web.until({"web-v2-1"})
        since = _misconfigure(
            registry_dir,
            "web-rules.yaml",
            _traffic_route([("/api", "web-v1"), ("/api/v2", "web-v2"), (None, "web-v1")]),
        )
        await web.until({"web-v1-1"})
        assert set(await web.answers("/api/v2/items")) == {"web-v1-1"}

        p = await diagnosis.diagnosed(cp, "SHL0105", "web-rules", since=since)
        assert (p["object"], p["field"]) == ("TrafficRoute default/web-rules", "spec.service")
        assert p["reason"] == (
            "takes precedence over the routing annotations of Service default/web "
            "(metadata.annotations[shoal.io/split]), which are ignored"
        )
        p = await diagnosis.diagnosed(cp, "SHL0104", "web-rules", since=since)
        assert (p["object"], p["field"]) == (
            "TrafficRoute default/web-rules",
            "spec.rules[1].match",
        )
        assert p["reason"] == (
            "spec.rules[1] never matches on Service default/web: spec.rules[0] comes first and "
            "matches all of them, so the requests meant for web-v2 go to web-v1"
        )

        # The fix: one routing source, the more specific rule first.
        write(registry_dir, "web.yaml", _web({}))
        write(
            registry_dir,
            "web-rules.yaml",
            _traffic_route([("/api/v2", "web-v2"), ("/api", "web-v1"), (None, "web-v1")]),
        )
        await web.until({"web-v2-1"}, "/api/v2/items")
        assert set(await web.answers("/api/items")) == {"web-v1-1"}
        await diagnosis.cleared(cp, "SHL0104", "web-rules")
        await diagnosis.cleared(cp, "SHL0105", "web-rules")


def _http_route(rules: str) -> str:
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-split, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
{rules}"""


async def test_an_httproute_rule_of_no_weight_and_a_backend_port_that_is_not_there(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    cp = control_plane
    async with aiohttp.ClientSession() as session:
        web = await _cast(cp, registry_dir, local_mesh, session)
        write(registry_dir, "web.yaml", _web({}))
        await web.until({"!503"})
        # `/old` weighs nothing anywhere (SHL0103); the rest goes to a port
        # web-v1 does not have (SHL0102). Both answer 500, as the Gateway
        # API says.
        since = _misconfigure(
            registry_dir,
            "web-split.yaml",
            _http_route(
                """    - matches: [{path: {value: /old}}]
      backendRefs: [{name: web-v1, port: 80, weight: 0}, {name: web-v2, port: 80, weight: 0}]
    - backendRefs: [{name: web-v1, port: 8080}]
"""
            ),
        )
        await web.until({"!500"}, "/old")
        await web.until({"!500"}, "/")

        p = await diagnosis.diagnosed(cp, "SHL0103", "web-split", since=since)
        assert (p["object"], p["field"]) == (
            "HTTPRoute default/web-split",
            "spec.rules[0].backendRefs",
        )
        assert p["reason"] == (
            "on Service web: every backendRef of spec.rules[0] has weight 0: it answers 500 to "
            "every request it matches"
        )
        p = await diagnosis.diagnosed(cp, "SHL0102", "web-split", since=since)
        assert (p["object"], p["field"]) == (
            "HTTPRoute default/web-split",
            "spec.rules[1].backendRefs[0].port",
        )
        assert "Service default/web-v1 has no port 8080" in p["reason"], p

        write(
            registry_dir,
            "web-split.yaml",
            _http_route(
                """    - matches: [{path: {value: /old}}]
      backendRefs: [{name: web-v1, port: 80, weight: 0}, {name: web-v2, port: 80, weight: 1}]
    - backendRefs: [{name: web-v1, port: 80}]
"""
            ),
        )
        await web.until({"web-v2-1"}, "/old")
        await web.until({"web-v1-1"}, "/")
        await diagnosis.cleared(cp, "SHL0103", "web-split")
        await diagnosis.cleared(cp, "SHL0102", "web-split")


async def test_routing_on_a_service_whose_only_port_is_tcp(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    cp = control_plane
    async with aiohttp.ClientSession() as session:
        web = await _cast(cp, registry_dir, local_mesh, session)
        split = {"shoal.io/split": "web-v1=50,web-v2=50"}
        write(registry_dir, "web.yaml", _web(split))
        await web.until({"web-v1-1", "web-v2-1"})
        # Now the port says TCP: the split applies nowhere, and no sidecar
        # routes `web` by Host, so the caller's sidecar answers 404.
        since = _misconfigure(
            registry_dir, "web.yaml", _web(split, "[{name: web, port: 80, appProtocol: tcp}]")
        )
        await web.until({"!404"})
        p = await diagnosis.diagnosed(cp, "SHL0203", "default/web", since=since)
        assert (p["object"], p["field"]) == (
            "Service default/web",
            "metadata.annotations[shoal.io/split]",
        )
        assert p["reason"].startswith(
            "routes Service default/web, but its only port 80 (web) is TCP: HTTP routing"
        ), p

        write(registry_dir, "web.yaml", _web(split, "[{name: web, port: 80, appProtocol: http}]"))
        await web.until({"web-v1-1", "web-v2-1"})
        await diagnosis.cleared(cp, "SHL0203", "default/web")
