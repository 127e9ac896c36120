"""The agent's health port running the app's probes as kubelet would have:
HTTP, TCP and gRPC, against real servers on 127.0.0.1; and every probe the
injector rewrites is one the agent can run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from shoal import envoy
from shoal.agent import health
from shoal.injector import patch
from tests.injector import shapes


async def _ready() -> str:
    return ""


@pytest.fixture
async def health_port() -> AsyncIterator[tuple[int, dict[str, health.Probe]]]:
    probes: dict[str, health.Probe] = {}
    runner = web.AppRunner(health.Health(probes, _ready).app(), access_log=None)
    await runner.setup()
    port = envoy.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port, probes
    finally:
        await runner.cleanup()


async def _get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        return r.status, await r.text()


async def test_a_tcp_probe_passes_while_the_app_accepts_connections(
    health_port: tuple[int, dict[str, health.Probe]],
) -> None:
    port, probes = health_port
    app_port = envoy.free_port()
    probes["/app-health/db/livez"] = health.Probe(app_port, action="tcpSocket", timeout=2)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", app_port)
    async with server:
        assert (await _get(port, "/app-health/db/livez"))[0] == 200
    await server.wait_closed()
    status, text = await _get(port, "/app-health/db/livez")
    assert status == 503 and "ConnectionRefusedError" in text


async def test_a_grpc_probe_asks_the_health_service(
    health_port: tuple[int, dict[str, health.Probe]],
) -> None:
    port, probes = health_port
    asked: list[bytes] = []
    state = {"status": health.SERVING}

    async def check(request: bytes, _: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        asked.append(request)
        return b"\x08" + bytes([state["status"]])

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    app_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        probes["/app-health/catalog/readyz"] = health.Probe(
            app_port, action="grpc", service="catalog.v1.Catalog", timeout=2
        )
        assert await _get(port, "/app-health/catalog/readyz") == (200, "SERVING\n")
        assert asked == [health.health_check_request("catalog.v1.Catalog")]
        state["status"] = 2  # NOT_SERVING
        status, text = await _get(port, "/app-health/catalog/readyz")
        assert status == 503 and "not SERVING" in text
    finally:
        await server.stop(None)
    status, text = await _get(port, "/app-health/catalog/readyz")
    assert status == 503 and "UNAVAILABLE" in text


def test_the_health_messages_are_protobuf() -> None:
    """The hand encoding against protobuf's own, on messages of the same
    wire shape: a string field 1, and a varint field 1 (the enum)."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="health_probe_test.proto", package="t")
    request = file.message_type.add(name="Req")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = file.message_type.add(name="Res")
    response.field.add(name="status", number=1, type=field.TYPE_UINT32, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    req = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Req"))
    res = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Res"))
    assert health.health_check_request("a.B") == req(service="a.B").SerializeToString()
    assert health.health_check_request("") == req().SerializeToString()
    for status in (0, 1, 2, 3, 300):
        assert health.serving_status(res(status=status).SerializeToString()) == status


@pytest.mark.parametrize("name", shapes.names())
def test_every_probe_the_injector_rewrites_is_one_the_agent_runs(name: str) -> None:
    original = shapes.load(name)
    pods = [original] if original["kind"] == "Pod" else []
    if original["kind"] != "Pod":
        template = (
            original["spec"].get("template") or original["spec"]["jobTemplate"]["spec"]["template"]
        )
        pods.append(template)
    for pod in pods:
        outcome = patch.inject(pod, shapes.SETTINGS, "shop")
        if isinstance(outcome, patch.Skipped):
            continue
        proxy = outcome.pod["spec"]["initContainers"][1]
        env = {e["name"]: e.get("value") for e in proxy["env"]}
        probes = health.parse_probes(env["SHOAL_APP_PROBES"])
        rewritten = json.loads(outcome.pod["metadata"]["annotations"]["shoal.io/status"])
        assert sorted(probes) == rewritten["rewrittenProbes"]


def test_the_shapes_have_every_kind_of_rewritten_probe() -> None:
    actions = set()
    for name in shapes.names():
        text = yaml.safe_dump(shapes.load(name))
        actions |= {a for a in ("httpGet", "tcpSocket", "grpc") if a in text}
    assert actions == {"httpGet", "tcpSocket", "grpc"}
    assert Path(shapes.PODS).is_dir()
