"""`pods/exec` as kube-apiserver and kubelet answer kubectl 1.37: a WebSocket
upgrade negotiating the `v5.channel.k8s.io` subprotocol (KEP-4006; kubectl
falls back to SPDY only when the upgrade fails, which it never does here).

Every binary message starts with its channel: 0 stdin, 1 stdout, 2 stderr,
3 the exit status (a metav1.Status, written once, last), 4 terminal resize;
v5 adds 255, the client's "I closed this channel" signal (`[255, 0]`: no
more stdin). The server closes the WebSocket after the status.

What runs is the test's: the emulator has no containers, so a test says
what a Pod's exec does with `emu.map_pod_exec(namespace, pod, runner)`; the
runner gets the command (and stdin, when the client sends it) and returns
the exit code, stdout and stderr.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

PROTOCOL = "v5.channel.k8s.io"
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255

# (command, stdin) -> (exit code, stdout, stderr)
Runner = Callable[[Sequence[str], bytes], Awaitable[tuple[int, bytes, bytes]]]


def is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def status(code: int) -> dict[str, Any]:
    """The exit status kubelet writes on channel 3: kubectl exits with
    the code it names."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


async def serve(request: web.Request, runner: Runner) -> web.WebSocketResponse:
    """Run one exec session over the upgraded connection."""
    command = request.query.getall("command", [])
    wants_stdin = request.query.get("stdin", "").lower() in ("1", "true")
    ws = web.WebSocketResponse(protocols=(PROTOCOL,), autoping=True)
    await ws.prepare(request)
    stdin = bytearray()
    if wants_stdin:
        # Until the client signals the end of stdin (or hangs up).
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY or not message.data:
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                    break
                continue
            channel, data = message.data[0], message.data[1:]
            if channel == STDIN:
                stdin += data
            elif channel == CLOSE and data[:1] == bytes([STDIN]):
                break
    try:
        code, out, err = await runner(command, bytes(stdin))
    except (OSError, ValueError) as failure:
        code, out, err = 126, b"", f"exec failed: {failure}\n".encode()
    for channel, data in ((STDOUT, out), (STDERR, err)):
        if data:
            await ws.send_bytes(bytes([channel]) + data)
    await ws.send_bytes(bytes([STATUS]) + json.dumps(status(code)).encode())
    await ws.close()
    return ws


def subprocess_runner(
    rewrite: Callable[[Sequence[str]], Sequence[str]], env: dict[str, str] | None = None
) -> Runner:
    """A runner that runs the command on this host, as `rewrite` turns it
    into a local one (say, `shoal` -> this virtualenv's, with the
    container's environment)."""

    async def run(command: Sequence[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        process = await asyncio.create_subprocess_exec(
            *rewrite(command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await process.communicate(stdin)
        assert process.returncode is not None
        return process.returncode, out, err

    return run
