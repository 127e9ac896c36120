"""The pool of xDS workers: started, kept running, stopped; with small
Python programs in place of `shoal serve --worker`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from shoal import workers

# Reads its options as a worker does, says it serves, then does `then`.
WORKER = """
import struct, sys, pickle
(n,) = struct.unpack("!Q", sys.stdin.buffer.read(8))
options = pickle.loads(sys.stdin.buffer.read(n))
print("shoal: worker ready", options, flush=True)
{then}
"""


def program(then: str) -> list[str]:
    return [sys.executable, "-c", WORKER.format(then=then)]


async def test_a_worker_that_exits_is_started_again_with_backoff() -> None:
    delays: list[float] = []
    enough = asyncio.Event()

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 4:
            enough.set()
            await asyncio.Event().wait()

    sent: list[int] = []

    def options_for(index: int) -> object:
        sent.append(index)
        return {"worker": index}

    pool = workers.Pool(2, program("sys.exit(3)"), options_for, sleep=sleep, clock=lambda: 0.0)
    await pool.start()
    keeping = asyncio.create_task(pool.supervise())
    try:
        await asyncio.wait_for(enough.wait(), 60)
    finally:
        keeping.cancel()
        await asyncio.gather(keeping, return_exceptions=True)
        await pool.stop()
    assert delays == [0.5, 1.0, 2.0, 4.0]
    (worker,) = pool.workers
    assert worker.exits[:3] == [3, 3, 3]
    assert sent == [1] * worker.starts and pool.restarts() == worker.starts - 1 >= 3


async def test_a_worker_that_does_not_start_is_an_error_naming_it() -> None:
    pool = workers.Pool(2, [sys.executable, "-c", "import sys; sys.exit(5)"], lambda i: i)
    with pytest.raises(workers.WorkerFailed, match=r"xDS worker 1 did not start \(exit 5\)"):
        await pool.start()
    await pool.stop()


async def test_workers_stop_when_their_stdin_closes() -> None:
    # As `shoal serve --worker` does: it serves until worker 0's pipe closes.
    pool = workers.Pool(3, program("sys.stdin.buffer.read(); sys.exit(0)"), lambda i: i)
    await pool.start()
    keeping = asyncio.create_task(pool.supervise())
    await pool.stop()
    await asyncio.wait_for(keeping, 10)
    assert [w.proc.returncode for w in pool.workers if w.proc] == [0, 0]
    assert all(w.exits == [] for w in pool.workers)


def test_each_worker_has_a_socket_beside_worker_0s() -> None:
    assert workers.socket_of(Path("/run/shoal/admin.sock"), 2) == Path("/run/shoal/admin.sock.2")


async def test_worker_0_is_ready_only_when_every_worker_is(tmp_path: Path) -> None:
    # A worker that does not answer (starting again, say) is not ready.
    gone = {1: tmp_path / "admin.sock.1"}
    assert await workers.every_ready((True, "ok"), gone) == (
        False,
        "xDS worker 1: it does not answer",
    )
    assert await workers.every_ready((False, "listing"), gone) == (False, "listing")
    assert await workers.every_ready((True, "ok"), {}) == (True, "ok")
