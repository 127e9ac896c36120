"""The calls shoal makes to the API server, over one aiohttp session.

Requests go through aiohttp, not the `kubernetes` package's client: that
one is synchronous (a thread per watch) and its typed models cost seconds
per ten thousand objects; the JSON is read as it is (see bodies.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp

from shoal.kube import backoff, bodies, config, errors


def resource_path(
    api_version: str, plural: str, namespace: str | None = None, name: str | None = None
) -> str:
    """Where a resource is served (API Concepts, "Resource URIs"): the core
    group under /api, the others under /apis/GROUP."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    return f"{path}/{name}" if name else path


class Api:
    """One API server's session, and the backoff every caller of it shares."""

    def __init__(self, server: config.ApiServer, policy: backoff.Backoff | None = None) -> None:
        self.server = server
        self.backoff = policy or backoff.Backoff()
        self._session: aiohttp.ClientSession | None = None
        self.requests_total = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.server.ssl, limit=0),
                headers={"Accept": "application/json"},
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {}
        token = self.server.authorization()
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: aiohttp.ClientTimeout,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        self.requests_total += 1
        async with self._http().request(
            method,
            self.server.url + path,
            params=params,
            data=json.dumps(body) if body is not None else None,
            headers=self._headers(content_type if body is not None else None),
            timeout=timeout,
        ) as response:
            if response.status >= 400:
                raise await _error(response)
            # An answer, not just a connection: only that ends a backoff.
            self.backoff.succeeded()
            yield response

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """The answer's JSON, unchecked: the caller says which body it is
        (`found: bodies.Secret = await api.call(...)`). A refusal raises
        its errors.ApiError."""
        async with self._request(
            method,
            path,
            params=params,
            body=body,
            content_type=content_type,
            timeout=aiohttp.ClientTimeout(total=30, sock_connect=10),
        ) as response:
            return await response.json(content_type=None)

    async def pages(self, path: str, limit: int) -> AsyncGenerator[bodies.ObjectList, None]:
        """A list in pages of `limit` (API Concepts, "Retrieving large
        results sets in chunks"); the last page's metadata has the list's
        resourceVersion. A continue token older than the server's history
        is errors.Gone."""
        params = {"limit": str(limit)}
        while True:
            page: bodies.ObjectList = await self.call("GET", path, params=params)
            yield page
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return
            params = {"limit": str(limit), "continue": token}

    async def watch(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> AsyncGenerator[bodies.WatchEvent, None]:
        """Watch events, one JSON object per line, until the server ends the
        stream. A silent stream (no event, no bookmark) for `read_timeout`
        is taken for a dead one. An ERROR event is raised as the
        errors.ApiError its Status stands for (errors.Gone: the
        resourceVersion watched from has expired)."""
        async with self._request(
            "GET",
            path,
            params={**params, "watch": "true"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout),
        ) as response:
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        event: bodies.WatchEvent = json.loads(line)
                        if event.get("type") == "ERROR":
                            raise errors.from_status(event.get("object"))
                        yield event


async def _error(response: aiohttp.ClientResponse) -> errors.ApiError:
    try:
        status = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        status = None
    return errors.from_status(status, code=response.status, reason=response.reason or "")
