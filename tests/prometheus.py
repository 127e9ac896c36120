"""A real Prometheus (Debian's package, installed by `make system`) for
tests: it scrapes the given Envoy admin ports' `/stats/prometheus` every
second, as a cluster's Prometheus scrapes the sidecars' 15090."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from shoal import envoy

BINARY = "prometheus"
SCRAPE_INTERVAL = "1s"


def config(targets: Sequence[int]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "sidecars",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in targets]}],
            }
        ],
    }


def _prepare(folder: Path, targets: Sequence[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config(targets)))
    return path


@contextlib.asynccontextmanager
async def running(folder: Path, targets: Sequence[int]) -> AsyncIterator[str]:
    """Prometheus on a free port until the block ends; yields its URL once
    it says it is ready."""
    binary = shutil.which(BINARY)
    assert binary, "Debian's prometheus is missing: `make system` installs it"
    configured = _prepare(folder, targets)
    port = envoy.free_port()
    url = f"http://127.0.0.1:{port}"
    log = (folder / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={configured}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=log,
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for _ in range(600):
                assert process.returncode is None, (folder / "prometheus.log").read_text()[-2000:]
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(f"{url}/-/ready") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("prometheus did not get ready in 60 s")
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def query(session: aiohttp.ClientSession, url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    async with session.get(f"{url}/api/v1/query", params={"query": promql}) as r:
        body = await r.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result
