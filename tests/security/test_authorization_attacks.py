"""Findings 2, 3 and 8: who may call a Service, on HTTP and TCP, in local
and capture mode, and what happens when the policy is malformed. Real
Envoys, real TLS, certificates of the mesh CA for the callers."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.config.listener.v3 import listener_pb2

from shoal import cli, envoy, sidecar_files
from shoal.demo import mesh
from shoal.model import mesh as model
from shoal.model import proxy
from shoal.registry import files
from shoal.sds import ca
from shoal.xds.translate import capture, listeners, names
from tests import netns
from tests.conftest import write
from tests.e2e.helpers import ServeProcess, caught_up, eventually


def service(name: str, port_name: str, endpoint: int, allow: str | None) -> str:
    notes = f"\n  annotations: {{shoal.io/allow: {allow!r}}}" if allow is not None else ""
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: demo{notes}
spec:
  ports: [{{name: {port_name}, port: 5432}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: demo
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: {port_name}, port: {endpoint}}}]
endpoints:
  - addresses: ["127.0.0.1"]
"""


def call(port: int, pair: ca.KeyPair, roots: bytes, folder: Path) -> bytes:
    """An HTTP request over mutual TLS straight to a sidecar's inbound port,
    as any caller with a certificate of the mesh may send; what came back
    (b"" when the sidecar closed the connection)."""
    folder.mkdir(exist_ok=True)
    (folder / "c.pem").write_bytes(pair.cert_pem)
    (folder / "k.pem").write_bytes(pair.key_pem)
    (folder / "r.pem").write_bytes(roots)
    context = ssl.create_default_context(cafile=str(folder / "r.pem"))
    context.check_hostname = False
    context.load_cert_chain(str(folder / "c.pem"), str(folder / "k.pem"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
        try:
            return tls.recv(1024)
        except (ssl.SSLError, ConnectionError):
            return b""


async def _sidecar(
    cp: cli.ControlPlane, folder: Path, local_mesh: mesh.LocalMesh, name: str, allow: str | None
) -> mesh.Workload:
    port = envoy.free_port()
    write(folder, f"{name}.yaml", service(name, "tcp-db", port, allow))
    await caught_up(cp, folder)
    return await local_mesh.add(name, namespace="demo", service=name, inbound_port=port)


async def _answers(cp: cli.ControlPlane, w: mesh.Workload, ns: str, sa: str, tmp: Path) -> bytes:
    assert cp.authority is not None
    pair = cp.authority.workload(ns, sa)
    return await asyncio.to_thread(
        call, w.sidecar.inbound_port, pair, cp.authority.trust_bundle, tmp / f"{ns}-{sa}"
    )


async def test_allow_is_enforced_on_a_tcp_port(
    registry_dir: Path,
    control_plane: cli.ControlPlane,
    local_mesh: mesh.LocalMesh,
    tmp_path: Path,
) -> None:
    """Found: a `tcp-db` Service with `allow: demo/web` got an inbound
    tcp_proxy chain with no RBAC; a kube-system/cluster-admin certificate
    connected and was served."""
    db = await _sidecar(control_plane, registry_dir, local_mesh, "db", "demo/web")

    async def web_served() -> bool:
        return (await _answers(control_plane, db, "demo", "web", tmp_path)).startswith(b"HTTP/1.1")

    await eventually(web_served)
    assert await _answers(control_plane, db, "kube-system", "cluster-admin", tmp_path) == b""
    assert await _answers(control_plane, db, "demo", "other", tmp_path) == b""
    stats = await asyncio.to_thread(_admin, db, "/stats?filter=rbac")
    assert "inbound.rbac.denied: 2" in stats, stats


@pytest.mark.parametrize(
    ("value", "admitted", "refused", "problem"),
    [
        # A valid Kubernetes service account name with a dot: it was refused
        # by the parser, which left no RBAC filter at all.
        ("demo/frontend, demo/api.v2", ["api.v2"], ["intruder"], None),
        # Malformed: nobody gets in, not even those it names correctly.
        ("demo/frontend, demo/API!", [], ["frontend", "intruder"], "every caller is denied"),
    ],
    ids=["dotted-account", "malformed"],
)
async def test_a_malformed_allow_denies_everyone_and_says_why(
    registry_dir: Path,
    control_plane: cli.ControlPlane,
    local_mesh: mesh.LocalMesh,
    tmp_path: Path,
    value: str,
    admitted: list[str],
    refused: list[str],
    problem: str | None,
) -> None:
    """Found: a malformed `shoal.io/allow` kept "the last good value or its
    default", and the default is everyone: any identity got 200."""
    port = envoy.free_port()
    write(registry_dir, "db.yaml", service("db", "http", port, value))
    await caught_up(control_plane, registry_dir)
    db = await local_mesh.add("db", namespace="demo", service="db", inbound_port=port)
    for account in admitted:
        reply = await _answers(control_plane, db, "demo", account, tmp_path)
        assert reply.startswith(b"HTTP/1.1 200"), (account, reply)
    for account in refused:
        reply = await _answers(control_plane, db, "demo", account, tmp_path)
        assert reply.startswith(b"HTTP/1.1 403"), (account, reply)
    found = [str(p) for p in control_plane.registry.problems]
    if problem is None:
        assert found == []
    else:
        (text,) = found
        assert "Service demo/db" in text and "shoal.io/allow" in text and "'demo/API!'" in text
        assert problem in text


def _admin(w: mesh.Workload, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{w.envoy.admin}{path}", timeout=10) as r:
        return str(r.read().decode())


# -- capture mode ---------------------------------------------------------------

POD = """apiVersion: v1
kind: Pod
metadata: {{name: db-1, namespace: demo, uid: u-1}}
spec: {{serviceAccountName: db}}
status: {{podIP: 10.200.0.2}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: demo{notes}}}
"""


def _captured_db(
    folder: Path, *, namespace_mode: str | None = None, allow: str | None = "demo/web"
) -> model.MeshState:
    notes = f", annotations: {{shoal.io/mtls: {namespace_mode}}}" if namespace_mode else ""
    write(folder, "pod.yaml", POD.format(notes=notes))
    write(
        folder,
        "db.yaml",
        service("db", "tcp-db", 5432, allow).replace(
            '  - addresses: ["127.0.0.1"]',
            f'  - addresses: ["{POD_IP}"]\n    targetRef: {{kind: Pod, name: db-1}}',
        ),
    )
    return files.FolderRegistry(folder).load()


def _pod() -> proxy.CapturedSidecar:
    return proxy.CapturedSidecar(
        namespace="demo", pod="db-1", pod_uid="u-1", service_account="db", ip=POD_IP
    )


def _chains(listener: listener_pb2.Listener) -> dict[str, list[str]]:
    return {c.name: [f.name for f in c.filters] for c in listener.filter_chains}


def test_allow_is_enforced_on_a_captured_tcp_port(registry_dir: Path) -> None:
    """The same finding in capture mode: the Pod's TCP port in
    virtualInbound had a tcp_proxy chain and no RBAC."""
    state = _captured_db(registry_dir)
    pod = _pod()
    security = capture.security(pod, state, "cluster.local")
    listener = capture.virtual_inbound(pod, state, security)
    chain = _chains(listener)[f"{names.inbound_listener(5432)}|mtls"]
    assert chain == [listeners.NETWORK_RBAC, listeners.TCP_PROXY]


@pytest.fixture
def pod_network() -> Iterator[netns.PodNetwork]:
    why = netns.available()
    if why is not None:
        raise RuntimeError(f"capture cannot be tested here: {why}")
    with netns.PodNetwork(POD_IP) as network:
        yield network


@pytest.mark.parametrize(
    ("namespace_mode", "allow", "others_served"),
    [(None, "demo/web", False), ("permissive", None, True)],
    ids=["strict-with-allow", "permissive-without-allow"],
)
async def test_strict_covers_ports_no_service_declares_in_capture_mode(
    registry_dir: Path,
    pod_network: netns.PodNetwork,
    namespace_mode: str | None,
    allow: str | None,
    others_served: bool,
) -> None:
    """Found: STRICT did not cover undeclared ports in capture mode; they went
    to a plain-text passthrough chain. Here with real capture: the control
    plane, the app and Envoy (as the proxy's user) in a network namespace of
    the test's, iptables sending every connection to the Pod's IP to
    virtualInbound. The app listens on a port no Service declares."""
    _captured_db(registry_dir, namespace_mode=namespace_mode, allow=allow)
    shared = Path(tempfile.mkdtemp(prefix="shoal-pod-"))
    os.chmod(shared, 0o755)
    serve = ServeProcess(
        registry_dir, envoy.free_port(), shared / "state", prefix=tuple(pod_network.prefix)
    )
    app: asyncio.subprocess.Process | None = None
    proc: envoy.EnvoyProcess | None = None
    try:
        await serve.start()
        pod = proxy.CapturedSidecar(
            namespace="demo", pod="db-1", pod_uid="u-1", service_account="db", ip=POD_IP
        )
        admin_port = envoy.free_port()
        config = sidecar_files.write(
            shared / "pod",
            pod,
            xds_host="127.0.0.1",
            xds_port=serve.xds_port,
            admin_port=admin_port,
            authority=serve.authority(),
        )
        for path in (shared / "pod").iterdir():
            os.chown(path, netns.PROXY_UID, netns.PROXY_UID)
        pod_network.capture_inbound(pod.inbound_port)
        app = await asyncio.create_subprocess_exec(
            *pod_network.prefix,
            sys.executable,
            "-m",
            "http.server",
            str(UNDECLARED),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        proc = envoy.EnvoyProcess(
            config,
            admin_port,
            shared / "envoy.log",
            prefix=pod_network.as_proxy(),
            executable=netns.proxy_executable(shared),
        )
        await proc.start()

        async def inbound_active() -> bool:
            dump = await pod_network.call(lambda: _fetch(admin_port, "/listeners"))
            return names.VIRTUAL_INBOUND in dump

        authority = serve.authority()
        web = authority.workload("demo", "web")

        async def served_over_mtls() -> bool:
            # Once the listener and the secrets of its chains are in place.
            try:
                reply = await pod_network.call(
                    lambda: _mtls_reply(
                        POD_IP, UNDECLARED, web, authority.trust_bundle, shared / "c"
                    )
                )
            except (OSError, ssl.SSLError):
                return False
            return reply.startswith(b"HTTP/1.0 200")

        try:
            await eventually(inbound_active, 60)
            await eventually(served_over_mtls, 60)
        except AssertionError as err:
            log = (shared / "envoy.log").read_text()[-3000:]
            raise AssertionError(f"{err}; Envoy's log:\n{log}\n{''.join(serve.output)}") from None
        # With `allow` on db, an identity it does not name gets nothing from
        # the ports it does not declare either; nor does plain text, which
        # has no identity. Without, PERMISSIVE lets both through.
        intruder = authority.workload("demo", "intruder")

        def intruder_reply() -> bytes:
            try:
                return _mtls_reply(
                    POD_IP, UNDECLARED, intruder, authority.trust_bundle, shared / "i"
                )
            except (OSError, ssl.SSLError):
                return b""

        replies = [
            await pod_network.call(intruder_reply),
            await pod_network.call(lambda: _plain_reply(POD_IP, UNDECLARED)),
        ]
        for reply in replies:
            if others_served:
                assert reply is not None and reply.startswith(b"HTTP/1.0 200"), reply
            else:
                assert reply == b"", reply
    finally:
        if proc is not None:
            await proc.stop()
        if app is not None and app.returncode is None:
            app.kill()
            await app.wait()
        await serve.stop()
        shutil.rmtree(shared, ignore_errors=True)


POD_IP = "10.200.0.2"
UNDECLARED = 7777


def _fetch(admin_port: int, path: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def test_a_permissive_namespace_sniffs_every_port_but_a_declared_strict_one(
    registry_dir: Path,
) -> None:
    state = _captured_db(registry_dir, namespace_mode="permissive")
    pod = _pod()
    listener = capture.virtual_inbound(pod, state, capture.security(pod, state, "cluster.local"))
    assert not listener.default_filter_chain.HasField("transport_socket")
    tls_chain = next(c for c in listener.filter_chains if c.name.endswith("Chain|mtls"))
    assert tls_chain.filter_chain_match.transport_protocol == "tls"
    inspector = next(f for f in listener.listener_filters if f.name == listeners.TLS_INSPECTOR)
    assert not inspector.HasField("filter_disabled"), "the declared port is permissive too"
    # A Service that insists on STRICT in a permissive namespace: its port is
    # the one place the inspector is off.
    db = state.services[model.ServiceKey("demo", "db")]
    strict = dataclasses.replace(db, mtls="strict")
    state = dataclasses.replace(state, services={**state.services, db.key: strict})
    listener = capture.virtual_inbound(pod, state, capture.security(pod, state, "cluster.local"))
    inspector = next(f for f in listener.listener_filters if f.name == listeners.TLS_INSPECTOR)
    assert inspector.filter_disabled.destination_port_range.start == 5432


def _plain_reply(host: str, port: int) -> bytes | None:
    """What a plain-text HTTP request gets back (b"": closed); None when
    nothing listens."""
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            try:
                return s.recv(1024)
            except ConnectionError:
                return b""
    except ConnectionRefusedError:
        return None


def _mtls_reply(host: str, port: int, pair: ca.KeyPair, roots: bytes, folder: Path) -> bytes:
    folder.mkdir(exist_ok=True)
    (folder / "c.pem").write_bytes(pair.cert_pem)
    (folder / "k.pem").write_bytes(pair.key_pem)
    (folder / "r.pem").write_bytes(roots)
    context = ssl.create_default_context(cafile=str(folder / "r.pem"))
    context.check_hostname = False
    context.load_cert_chain(str(folder / "c.pem"), str(folder / "k.pem"))
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        return tls.recv(1024)
