"""Finding 1: anyone who could reach the admin port could mint an identity
and rotate the root, from a web page in a developer's browser too."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shoal import cli

EVIL = "http://evil.example"


async def tcp(
    cp: cli.ControlPlane, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://127.0.0.1:{cp.admin_port}{path}", headers=headers or {}
        ) as r,
    ):
        return r.status, await r.text()


async def unix(cp: cli.ControlPlane, method: str, path: str) -> tuple[int, Any]:
    connector = aiohttp.UnixConnector(path=cp.admin_socket)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://localhost{path}") as r,
    ):
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/ca/join-token?namespace=kube-system&service_account=cluster-admin&ttl=1e9"),
        ("POST", "/ca/rotate-root"),
        ("GET", "/debug/config_dump?proxy=sidecar"),
        ("GET", "/debug/syncz"),
        ("GET", "/debug/ca"),
        ("GET", "/debug/problems"),
    ],
)
@pytest.mark.parametrize("origin", [None, EVIL], ids=["same-origin", "cross-origin"])
async def test_nothing_privileged_is_served_on_the_admin_port(
    control_plane: cli.ControlPlane, method: str, path: str, origin: str | None
) -> None:
    """Found: a cross-origin POST got a token for kube-system/cluster-admin
    with ttl=1e9, and `POST /ca/rotate-root` with `Origin: evil.example`
    rotated the root."""
    assert control_plane.certificates is not None
    signer = control_plane.certificates.authority.signer.cert_pem
    status, text = await tcp(control_plane, method, path, {"Origin": origin} if origin else None)
    assert status == 403, text
    assert "token" not in json.loads(text)
    await asyncio.sleep(0)  # a rotation would have started by now
    assert control_plane.certificates.authority.signer.cert_pem == signer


@pytest.mark.parametrize("host", ["evil.example", "evil.example:15014", "127.0.0.1.nip.io"])
async def test_a_name_that_rebinds_to_127_0_0_1_is_refused(
    control_plane: cli.ControlPlane, host: str
) -> None:
    status, _ = await tcp(control_plane, "GET", "/metrics", {"Host": host})
    assert status == 421


async def test_probes_and_prometheus_need_no_credentials(control_plane: cli.ControlPlane) -> None:
    for path in ("/healthz", "/ready", "/metrics"):
        for host in ("127.0.0.1", f"127.0.0.1:{control_plane.admin_port}", "localhost", "[::1]"):
            status, _ = await tcp(control_plane, "GET", path, {"Host": host})
            assert status == 200, (path, host)
    status, index = await tcp(control_plane, "GET", "/")
    assert status == 200 and "/debug" not in index


@pytest.mark.parametrize(
    ("ttl", "reason"),
    [
        ("1e9", "at most 86400 seconds"),
        ("inf", "at most 86400 seconds"),
        ("nan", "at most 86400 seconds"),
        ("-5", "more than 0"),
        ("soon", "not a number"),
    ],
)
async def test_join_token_lifetimes_are_capped(
    control_plane: cli.ControlPlane, ttl: str, reason: str
) -> None:
    """Found: `ttl=1e9` was accepted (a 30-year credential) and `ttl=inf`
    answered 500."""
    status, body = await unix(
        control_plane, "POST", f"/ca/join-token?namespace=demo&service_account=web&ttl={ttl}"
    )
    assert status == 400 and reason in body["error"], body


async def test_the_admin_socket_is_the_way_in_for_the_operator(
    control_plane: cli.ControlPlane,
) -> None:
    mode = stat.S_IMODE(os.stat(control_plane.admin_socket).st_mode)
    assert mode == 0o600, oct(mode)
    status, body = await unix(
        control_plane, "POST", "/ca/join-token?namespace=demo&service_account=web&ttl=600"
    )
    assert status == 202 and body["token"]
    status, body = await unix(control_plane, "GET", "/debug/syncz")
    assert status == 200 and body == []


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
async def test_another_user_is_refused_on_the_admin_socket(control_plane: cli.ControlPlane) -> None:
    """The socket's mode keeps other users out; and if the mode were lost (a
    permissive copy, a hard link), the peer's uid is checked."""
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        os.chmod(shared, 0o755)
        exposed = Path(shared) / "admin.sock"
        os.link(control_plane.admin_socket, exposed)
        os.chmod(exposed, 0o666)
        request = (
            "GET /debug/syncz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n"
        )
        script = (
            "import os, socket\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({str(exposed)!r})\n"
            f"s.sendall(b'{request}')\n"
            "print(s.recv(200).split(b'\\r\\n')[0].decode())\n"
        )
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.stdout.strip() == "HTTP/1.1 403 Forbidden", result.stdout + result.stderr


async def test_only_a_same_origin_page_may_call_the_admin_port(
    control_plane: cli.ControlPlane,
) -> None:
    own = f"127.0.0.1:{control_plane.admin_port}"
    assert (await tcp(control_plane, "GET", "/metrics", {"Origin": f"http://{own}"}))[0] == 200
    for origin in ("http://203.0.113.5", "http://localhost", "null", "http://127.0.0.1:1"):
        status, _ = await tcp(control_plane, "GET", "/metrics", {"Origin": origin})
        assert status == 403, origin
