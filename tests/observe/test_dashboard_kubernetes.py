"""`shoal dashboard --kubernetes`: from a user's machine, the dashboard a
control plane Pod serves, through the real kubectl (exec for the login
link, port-forward for the pages) against the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from shoal import cli
from tests.kube import exec as pod_exec
from tests.kube import serving
from tests.kube.emulator import KubeEmulator

pytestmark = pytest.mark.timeout(180)
BIN = Path(sys.executable).parent
POD = "shoal-7d9c-x2x4k"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    with contextlib.suppress(OSError):
        return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    return False


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


async def test_the_dashboard_of_a_control_plane_pod_opens_here(tmp_path: Path) -> None:
    emu = KubeEmulator()
    await emu.start()
    shown: asyncio.subprocess.Process | None = None
    try:
        await emu.acreate(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": serving.HOME}}
        )
        options = serving.options(emu, tmp_path, dashboard_address="127.0.0.1:0")
        async with cli.control_plane(options) as cp:
            await emu.acreate(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": POD,
                        "namespace": serving.HOME,
                        "labels": {
                            "app.kubernetes.io/name": "shoal",
                            "app.kubernetes.io/component": "control-plane",
                        },
                    },
                    "spec": {"containers": [{"name": "shoal", "image": "shoal"}]},
                }
            )
            # What kubelet reports of a running, ready control plane.
            emu.patch(
                "pods",
                POD,
                {
                    "status": {
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                },
                namespace=serving.HOME,
            )

            # The Pod's container is this process's control plane: `shoal`
            # in it reaches the admin socket as SHOAL_ADMIN says.
            def in_container(command: Sequence[str]) -> Sequence[str]:
                assert command[0] == "shoal", command
                return [str(BIN / "shoal"), *command[1:]]

            emu.map_pod_exec(
                serving.HOME,
                POD,
                pod_exec.subprocess_runner(
                    in_container, env={**os.environ, "SHOAL_ADMIN": cp.admin_socket}
                ),
            )
            served = urlsplit(cp.dashboard_url)
            assert served.port is not None
            emu.map_pod_port(serving.HOME, POD, served.port, f"127.0.0.1:{served.port}")

            kubeconfig = emu.write_kubeconfig(tmp_path / "user-kubeconfig")
            shown = await asyncio.create_subprocess_exec(
                str(BIN / "shoal"),
                "dashboard",
                "--kubernetes",
                "--kubeconfig",
                str(kubeconfig),
                "--no-browser",
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"},
                # As a background job of a script starts it: Ctrl-C must
                # still stop it, and its kubectl.
                preexec_fn=_ignore_sigint,
            )
            assert shown.stdout is not None
            line = (await asyncio.wait_for(shown.stdout.readline(), 60)).decode()
            found = re.search(r"shoal dashboard: (http://127\.0\.0\.1:(\d+)/\?token=\S+)", line)
            assert found is not None, line
            url = found.group(1)
            assert url.split("?token=")[1] == cp.dashboard_url.split("?token=")[1]
            note = (await asyncio.wait_for(shown.stdout.readline(), 60)).decode()
            assert f"served by {serving.HOME}/{POD}, forwarded by kubectl" in note

            base = url.split("?")[0].rstrip("/")
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as session:
                async with session.get(url) as r:
                    assert r.status == 200
                    assert "<title>" in await r.text()
                async with session.get(f"{base}/api/graph") as r:
                    assert r.status == 200
                    assert (await r.json())["source"]["kind"] == "envoy-stats"
                async with session.get(f"{base}/api/syncz") as r:
                    assert r.status == 200
            # The link came over exec, the pages over port-forward.
            upgraded = {r.path.rsplit("/", 1)[-1] for r in emu.requests() if r.status == 101}
            assert upgraded == {"exec", "portforward"}, upgraded
            (forwarder,) = _children(shown.pid)
            shown.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(shown.wait(), 30) == 0
            assert not _running(forwarder), "kubectl outlived shoal dashboard"
    finally:
        if shown is not None and shown.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                shown.kill()
            await shown.wait()
        await emu.stop()
