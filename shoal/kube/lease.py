"""A coordination.k8s.io Lease: which replica does the work that must run
on one replica at a time."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from shoal.kube import bodies, client, errors

log = logging.getLogger(__name__)
T = TypeVar("T")

_MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


class Lease:
    """Work that must run on one replica at a time runs while holding it.
    Taken only if free, expired or ours, and written with the
    resourceVersion read, so two replicas cannot both win."""

    def __init__(
        self,
        api: client.Api,
        namespace: str,
        name: str,
        holder: str,
        *,
        duration_s: int = 30,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.holder = holder
        self.duration_s = duration_s
        self._now = now

    def _path(self, name: str | None = None) -> str:
        return client.resource_path("coordination.k8s.io/v1", "leases", self.namespace, name)

    def _stamp(self) -> str:
        return self._now().strftime(_MICRO_TIME)

    def _spec(self, acquired: str, transitions: int) -> bodies.LeaseSpec:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": acquired,
            "renewTime": self._stamp(),
            "leaseTransitions": transitions,
        }

    async def acquire(self) -> str | None:
        """None once held; else who holds it."""
        path = self._path(self.name)
        current: bodies.Lease
        try:
            current = await self.api.call("GET", path)
        except errors.NotFound:
            body: bodies.Lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(self._stamp(), 0),
            }
            try:
                await self.api.call("POST", self._path(), body=body)
                return None
            except errors.Conflict:
                current = await self.api.call("GET", path)
        spec: bodies.LeaseSpec = current.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.holder and not self._expired(spec):
            return str(holder)
        transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.holder)
        acquired = spec.get("acquireTime") if holder == self.holder else self._stamp()
        current["spec"] = self._spec(str(acquired or self._stamp()), transitions)
        try:
            await self.api.call("PUT", path, body=current)
        except errors.Conflict:
            return "another replica (it took the lease first)"
        return None

    async def release(self) -> None:
        path = self._path(self.name)
        current: bodies.Lease = await self.api.call("GET", path)
        spec: bodies.LeaseSpec = current.get("spec") or {}
        if spec.get("holderIdentity") != self.holder:
            return
        spec["holderIdentity"] = None
        current["spec"] = spec
        with contextlib.suppress(errors.ApiError):
            await self.api.call("PUT", path, body=current)

    async def held_during(self, work: Awaitable[T]) -> T:
        """Run `work` while renewing the lease (taken already); let it go after."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.duration_s / 3)
                try:
                    holder = await self.acquire()
                except (errors.ApiError, aiohttp.ClientError, OSError) as err:
                    # The API server may be away for a while; try again next time.
                    log.warning("renewing lease %s: %s", self.name, err)
                    continue
                if holder is not None:
                    log.error("lost lease %s to %s", self.name, holder)

        renewing = asyncio.create_task(renew(), name=f"lease-{self.name}")
        try:
            return await work
        finally:
            renewing.cancel()
            with contextlib.suppress(Exception):
                await self.release()

    def _expired(self, spec: bodies.LeaseSpec) -> bool:
        renewed = spec.get("renewTime")
        if not isinstance(renewed, str):
            return True
        try:
            at = datetime.datetime.strptime(renewed, _MICRO_TIME)
        except ValueError:
            at = datetime.datetime.strptime(renewed, "%Y-%m-%dT%H:%M:%SZ")
        duration = int(spec.get("leaseDurationSeconds") or self.duration_s)
        expires = at.replace(tzinfo=datetime.UTC) + datetime.timedelta(seconds=duration)
        return self._now() > expires
