"""The test networks of tests/netns.py and the DNS server of tests/dns.py:
a node namespace with a bridge, Pods joined to it, nothing reaching the
host or beyond, a Pod's resolver answered on the node, servers running in
a namespace from the test process, and what the proxy's user may run."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests import dns, netns
from tests.e2e.helpers import eventually

CLUSTER_IP = "10.96.0.20"
OUTBOUND = "15001"
VENV_PYTHON = str(Path(sys.executable).parent / "python")
REPO = Path(__file__).resolve().parent.parent


def _require() -> None:
    why = netns.available("curl", "getent")
    if why is not None:
        raise RuntimeError(f"test networks cannot be made here: {why}")


@pytest.fixture
def node() -> Iterator[netns.Node]:
    _require()
    with netns.Node() as made:
        yield made


def _links(prefix: list[str]) -> set[str]:
    out = subprocess.run(
        [*prefix, "ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def _host_addresses() -> list[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    found = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return [a for a in found if not a.startswith("127.")]


def _nameservers() -> list[str]:
    lines = Path("/etc/resolv.conf").read_text().splitlines()
    return [line.split()[1] for line in lines if line.startswith("nameserver")]


def _app(text: str) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/", hello)
    return app


def _curl(
    ns: netns.Namespace, url: str, uid: int | None = None, gid: int | None = None
) -> subprocess.CompletedProcess[str]:
    return ns.run("curl", "-sS", "--connect-timeout", "2", "--max-time", "5", url, uid=uid, gid=gid)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Uid:")[1].split()[0])


def test_pod_network_keeps_its_ip_on_loopback() -> None:
    _require()
    with netns.PodNetwork("10.200.0.2") as pod:
        assert "10.200.0.2/32" in pod.exec("ip", "-4", "addr", "show", "lo")
        inside = pod.inside(lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        assert inside == os.stat(f"/var/run/netns/{pod.name}").st_ino
        assert inside != os.stat("/proc/thread-self/ns/net").st_ino
    assert pod.name not in netns._run("ip", "netns", "list")


def test_node_and_pods_are_made_and_go_without_touching_the_host() -> None:
    _require()
    host_links = _links([])
    with pytest.raises(RuntimeError, match="the test failed"), netns.Node() as node:
        a = node.pod("web-1", "10.200.0.10", namespace="web")
        b = node.pod("reviews-1", "10.200.0.11", namespace="shop")
        names = [node.name, a.name, b.name]
        assert all(len(name) <= netns.IFNAME_MAX for name in names)
        assert len(set(names)) == 3
        assert _links(node.prefix) == {"lo", "br0", "veth1", "veth2"}
        assert (
            node.exec("ip", "route").strip()
            == "10.200.0.0/24 dev br0 proto kernel scope link src 10.200.0.1"
        )
        assert _links(a.prefix) == {"lo", "eth0"}
        assert "default via 10.200.0.1 dev eth0" in a.exec("ip", "route")
        assert _links([]) == host_links
        assert a.exec("cat", "/etc/resolv.conf") == a.resolv_conf
        assert "search shop.svc.cluster.local svc.cluster.local cluster.local" in b.resolv_conf
        tracked = [a.spawn("sleep", "1000"), node.spawn("sleep", "1000", uid=netns.PROXY_UID)]
        # Not tracked: a daemon a process left behind in the Pod.
        b.exec("sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!")
        stray = b.pids()
        assert stray
        loop = b.loop().__enter__()  # released by the node's teardown
        raise RuntimeError("the test failed")
    assert all(proc.returncode is not None for proc in tracked)
    assert not any(_alive(pid) for pid in stray)
    listed = netns._run("ip", "netns", "list")
    assert not any(name in listed for name in names)
    assert not a.etc.exists() and not b.etc.exists()
    assert loop.loop.is_closed()
    assert _links([]) == host_links


def test_a_pod_must_be_on_the_bridge(node: netns.Node) -> None:
    with pytest.raises(ValueError, match="not a Pod address"):
        node.pod("x", "10.201.0.5")
    with pytest.raises(ValueError, match="not a Pod address"):
        node.pod("x", node.bridge_ip)


async def test_pods_reach_each_other_and_nothing_else(node: netns.Node) -> None:
    a = node.pod("web-1", "10.200.0.10")
    b = node.pod("reviews-1", "10.200.0.11")
    with b.loop() as loop:
        port = loop.serve_app(_app("reviews"))
        assert _curl(a, f"http://{b.ip}:{port}/").stdout == "reviews"
        assert _curl(b, f"http://127.0.0.1:{port}/").stdout == "reviews"
        # The node (where the control plane runs) reaches Pods too.
        assert _curl(node, f"http://{b.ip}:{port}/").stdout == "reviews"
    # A service on the host's own 127.0.0.1, the host's own addresses, the
    # world; the host's nameservers, and the world's through the Pod's
    # resolver (the node, with no DNS server yet): all at once, as each
    # waits for its connect timeout.
    listener = socket.create_server(("127.0.0.1", 0))
    host_port = listener.getsockname()[1]
    listener.settimeout(0)

    def ask(server: str) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.sendto(_query("example.com"), (server, 53))
            return sock.recv(512)

    async def asked(server: str) -> BaseException | bytes:
        try:
            return await a.call(lambda: ask(server))
        except OSError as err:
            return err

    try:
        targets = [f"127.0.0.1:{host_port}", f"{node.bridge_ip}:{host_port}", "1.1.1.1:80"]
        targets += [f"{address}:{host_port}" for address in _host_addresses()]
        curls = [asyncio.to_thread(_curl, a, f"http://{target}/") for target in targets]
        servers = _nameservers()
        results = await asyncio.gather(
            *curls,
            *(asked(server) for server in servers),
            asyncio.to_thread(a.run, "getent", "hosts", "example.com"),
        )
        for target, result in zip(targets, results, strict=False):
            assert isinstance(result, subprocess.CompletedProcess)
            assert result.returncode != 0, (target, result.stdout)
        for server, answer in zip(servers, results[len(targets) :], strict=False):
            assert isinstance(answer, OSError), (server, answer)
        getent = results[-1]
        assert isinstance(getent, subprocess.CompletedProcess) and getent.returncode != 0
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody came through
    finally:
        listener.close()
    # No route out of the node at all.
    with pytest.raises(OSError) as unreachable:
        await node.call(lambda: socket.create_connection(("1.1.1.1", 80), timeout=5))
    assert unreachable.value.errno == errno.ENETUNREACH


async def test_capture_sees_a_cluster_ip_connect_and_not_the_proxys_own(node: netns.Node) -> None:
    """What the init container's rules rely on: a connect() to a ClusterIP
    is routed (via the node), so nat OUTPUT sees it; sockets of GID 1337
    (the agent, root with GID 1337) and UID 1337 (Envoy) are told apart."""
    pod = node.pod("web-1", "10.200.0.10")
    pod.iptables(
        [
            ["-t", "nat", "-N", "CAPTURE"],
            ["-t", "nat", "-A", "CAPTURE", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"],
            ["-t", "nat", "-A", "CAPTURE", "-m", "owner", "--gid-owner", "1337", "-j", "RETURN"],
            ["-t", "nat", "-A", "CAPTURE", "-p", "tcp", "-j", "REDIRECT", "--to-ports", OUTBOUND],
            ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", CLUSTER_IP, "-j", "CAPTURE"],
        ]
    )  # fmt: skip
    with pod.loop() as loop:
        assert loop.serve_app(_app("captured"), port=int(OUTBOUND)) == int(OUTBOUND)
        url = f"http://{CLUSTER_IP}:80/"
        assert _curl(pod, url).stdout == "captured"
        agent, envoy = await asyncio.gather(
            asyncio.to_thread(_curl, pod, url, uid=0, gid=netns.PROXY_UID),
            asyncio.to_thread(_curl, pod, url, uid=netns.PROXY_UID),
        )
    assert agent.returncode != 0 and envoy.returncode != 0, (agent.stdout, envoy.stdout)
    counters = pod.exec("iptables", "-t", "nat", "-L", "CAPTURE", "-v", "-x", "-n")
    packets = [int(line.split()[0]) for line in counters.splitlines()[2:]]
    assert all(count > 0 for count in packets), counters


async def test_service_names_resolve_through_the_nodes_dns(node: netns.Node) -> None:
    web_pod = node.pod("web-1", "10.200.0.10", namespace="web")
    reviews = node.pod("reviews-1", "10.200.0.11", namespace="shop")
    name = dns.service_name("reviews", "shop")
    with node.dns({name: reviews.ip}) as server, reviews.loop() as loop:
        port = loop.serve_app(_app("reviews"))
        assert web_pod.exec("getent", "hosts", name).split() == [reviews.ip, name]
        # By the search path, as an app calls a Service of another namespace.
        assert _curl(web_pod, f"http://reviews.shop:{port}/").stdout == "reviews"
        assert "reviews.shop.web.svc.cluster.local" in server.asked
        # And of its own, from the Pod's namespace.
        assert _curl(reviews, f"http://reviews:{port}/").stdout == "reviews"
        # The table changes while the server runs.
        ratings = dns.service_name("ratings", "shop")
        assert web_pod.run("getent", "hosts", ratings).returncode == 2
        server.set(ratings, "10.96.0.21")
        assert web_pod.exec("getent", "hosts", "ratings.shop").split()[0] == "10.96.0.21"
        server.remove(name)
        assert web_pod.run("getent", "hosts", name).returncode == 2
        assert web_pod.run("getent", "hosts", "example.com").returncode == 2


def _query(name: str, qtype: int = dns.TYPE_A, flags: int = 0x0100) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!6H", 42, flags, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)
    )


def _rcode_and_answers(reply: bytes | None) -> tuple[int, int]:
    assert reply is not None
    ident, flags, _qd, answers, _ns, _ar = struct.unpack_from("!6H", reply)
    assert ident == 42 and flags & 0x8000
    return flags & 0xF, answers


def test_dns_answers() -> None:
    records = {"Reviews.shop.svc.cluster.local.": "10.96.0.20"}
    reply = dns.answer(_query("reviews.SHOP.svc.cluster.local"), records, ttl=7)
    assert _rcode_and_answers(reply) == (dns.NOERROR, 1)
    assert reply is not None and reply.endswith(struct.pack("!IH", 7, 4) + bytes([10, 96, 0, 20]))
    assert reply[2] & 0x04  # authoritative
    aaaa = dns.answer(_query("reviews.shop.svc.cluster.local", qtype=28), records)
    assert _rcode_and_answers(aaaa) == (dns.NOERROR, 0)
    missing = dns.answer(_query("ratings.shop.svc.cluster.local"), records)
    assert _rcode_and_answers(missing) == (dns.NXDOMAIN, 0)
    assert _rcode_and_answers(dns.answer(_query("x", flags=0x0900), records))[0] == dns.NOTIMP
    assert _rcode_and_answers(dns.answer(_query("x")[:-3], records)) == (dns.FORMERR, 0)
    assert dns.answer(b"\x00\x2a\x01", records) is None
    assert dns.answer(_query("x", flags=0x8000), records) is None  # a response


async def test_servers_run_in_the_node_namespace(node: netns.Node) -> None:
    """The Kubernetes emulator and a grpc.aio server, run by the test
    process in the node's namespace: Pods reach them, the host does not."""
    import grpc

    pod = node.pod("web-1", "10.200.0.10")
    with node.running_emulator(host="0.0.0.0") as emulator:
        url = f"http://{node.bridge_ip}:{emulator.port}/api/v1/namespaces"
        assert '"kube-system"' in _curl(pod, url).stdout
        assert (
            '"kube-system"'
            in _curl(node, f"http://127.0.0.1:{emulator.port}/api/v1/namespaces").stdout
        )
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", emulator.port), timeout=5).close()

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(echo)}
    )

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("0.0.0.0:0")
        await server.start()
        return server, port

    client = textwrap.dedent(
        """
        import sys, grpc
        with grpc.insecure_channel(sys.argv[1]) as channel:
            say = channel.unary_unary("/test.Echo/Say")
            sys.stdout.write(say(b"hi", timeout=10).decode())
        """
    )
    with node.loop() as loop:
        server, port = loop.run(start())
        loop.on_stop(lambda: server.stop(None))
        reply = pod.run(VENV_PYTHON, "-c", client, f"{node.bridge_ip}:{port}", timeout=30)
        assert reply.stdout == "echo:hi", reply.stderr
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


async def test_the_proxys_user_runs_envoy_and_reads_what_it_is_given(node: netns.Node) -> None:
    pod = node.pod("web-1", "10.200.0.10")
    # mkdtemp makes 0700 folders: the proxy's user may not enter one (a
    # clone of the repository made that way hides its .venv likewise).
    folder = Path(tempfile.mkdtemp(prefix="shoal-pod-"))
    try:
        envoy = netns.proxy_executable(folder)
        assert not netns.accessible(envoy, netns.PROXY_UID, mode="x")
        os.chmod(folder, 0o755)
        assert netns.accessible(envoy, netns.PROXY_UID, mode="x")
        given = folder / "bootstrap.yaml"
        given.write_text(
            "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 15000}}}\n"
        )
        os.chmod(given, 0o600)
        assert not netns.accessible(given, netns.PROXY_UID)
        os.chown(given, netns.PROXY_UID, netns.PROXY_UID)
        assert netns.accessible(given, netns.PROXY_UID)
        # Through sh, so that the exec itself is checked as the proxy's user.
        proc = pod.spawn(
            "sh",
            "-c",
            'exec "$0" -c "$1" --disable-hot-restart -l warning',
            envoy,
            str(given),
            uid=netns.PROXY_UID,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        async def ready() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return _curl(pod, "http://127.0.0.1:15000/ready").stdout.strip() == "LIVE"

        await eventually(ready, 30)
        assert _uid(proc.pid) == netns.PROXY_UID
        assert _curl(node, f"http://{pod.ip}:15000/ready").returncode != 0  # 127.0.0.1 only
        # The agent: root with the proxy's group runs the venv's Python.
        who = pod.exec(
            VENV_PYTHON,
            "-c",
            "import os, shoal; print(os.getuid(), os.getgid(), os.getgroups())",
            uid=0,
            gid=netns.PROXY_UID,
        )
        assert who.split("\n")[0] == "0 1337 []"
        assert shutil.which("shoal", path=str(REPO / ".venv" / "bin")) is not None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
