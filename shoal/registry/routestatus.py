"""The status of HTTPRoutes and GRPCRoutes, written back to the API server.

The Gateway API asks the controller of a route's parent to say, in
`status.parents`, whether it took the route (`Accepted`) and whether its
references resolved (`ResolvedRefs`). shoal is the controller of Service
parents: one replica writes, the one holding the Lease, and only its own
entries (`controllerName: shoal.io/mesh-controller`): a gateway
controller's entries for Gateway parents stay as they are. It writes only
what changed since it last wrote, through the status subresource with the
resourceVersion it read, so an edit made in between is read again next
round rather than overwritten.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from shoal import kube
from shoal.registry import gatewayapi

log = logging.getLogger(__name__)

LEASE = "shoal-route-status"
PLURALS = {"HTTPRoute": "httproutes", "GRPCRoute": "grpcroutes"}
API_VERSION = "gateway.networking.k8s.io/v1"

Key = tuple[str, str, str]  # (kind, namespace, name)


def _stamp(now: datetime.datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def parents(
    current: Mapping[str, Any],
    ours: tuple[gatewayapi.ParentStatus, ...],
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """`status.parents` with shoal's entries replaced by `ours`: other
    controllers' entries kept, a condition's lastTransitionTime kept while
    its status stays."""
    meta = current.get("metadata") or {}
    generation = meta.get("generation") if isinstance(meta, Mapping) else None
    status = current.get("status") or {}
    listed = status.get("parents") if isinstance(status, Mapping) else None
    before = [p for p in listed if isinstance(p, Mapping)] if isinstance(listed, list) else []
    others = [dict(p) for p in before if p.get("controllerName") != gatewayapi.CONTROLLER]
    previous = {
        repr(sorted((p.get("parentRef") or {}).items())): p
        for p in before
        if p.get("controllerName") == gatewayapi.CONTROLLER
    }
    out = others
    for parent in ours:
        ref = dict(parent.parent_ref)
        old = previous.get(repr(sorted(ref.items()))) or {}
        old_conditions = {
            c.get("type"): c for c in old.get("conditions") or () if isinstance(c, Mapping)
        }
        conditions = []
        for c in parent.conditions:
            shown = "True" if c.status else "False"
            kept = old_conditions.get(c.type)
            since = (
                kept.get("lastTransitionTime")
                if kept is not None and kept.get("status") == shown
                else None
            )
            conditions.append(
                {
                    "type": c.type,
                    "status": shown,
                    "reason": c.reason,
                    "message": c.message[:32768],
                    **({"observedGeneration": generation} if isinstance(generation, int) else {}),
                    "lastTransitionTime": since or _stamp(now),
                }
            )
        out.append(
            {"parentRef": ref, "controllerName": gatewayapi.CONTROLLER, "conditions": conditions}
        )
    return out


class RouteStatus:
    def __init__(
        self,
        api: kube.Api,
        statuses: Callable[[], Mapping[Key, tuple[gatewayapi.ParentStatus, ...]]],
        lease: kube.Lease | None,
        *,
        poll_s: float = 2.0,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self._api = api
        self._statuses = statuses
        self._lease = lease
        self._poll_s = poll_s
        self._now = now
        # What was last written (or found current), per route.
        self._written: dict[Key, tuple[gatewayapi.ParentStatus, ...]] = {}
        self.last = "not synced yet"

    def _path(self, key: Key, status: bool = False) -> str:
        kind, namespace, name = key
        path = kube.resource_path(API_VERSION, PLURALS[kind], namespace, name)
        return f"{path}/status" if status else path

    async def sync(self) -> int:
        """Write every route's status that changed; how many were written."""
        wanted = dict(self._statuses())
        written = 0
        for key, ours in sorted(wanted.items()):
            if self._written.get(key) == ours:
                continue
            try:
                current: dict[str, Any] = await self._api.call("GET", self._path(key))
            except kube.NotFound:
                continue  # deleted since the build: nothing to say
            new = parents(current, ours, self._now())
            old = (current.get("status") or {}).get("parents")
            if _same(old, new):
                self._written[key] = ours
                continue
            current["status"] = {**(current.get("status") or {}), "parents": new}
            try:
                await self._api.call("PUT", self._path(key, status=True), body=current)
            except kube.Conflict:
                continue  # changed meanwhile: read again next round
            self._written[key] = ours
            written += 1
            kind, namespace, name = key
            log.info("status of %s %s/%s written", kind, namespace, name)
        for gone in self._written.keys() - wanted.keys():
            del self._written[gone]
        return written

    def _pending(self) -> bool:
        return dict(self._statuses()) != self._written

    async def run(self) -> None:
        while True:
            wait = self._poll_s
            try:
                if self._pending():
                    # During an API server outage this takes its turn with
                    # every watch, as one shared backoff allows.
                    await self._api.backoff.wait_turn()
                    holder = await self._lease.acquire() if self._lease is not None else None
                    if holder is None:
                        await self.sync()
                        self._say("route status is current")
                    else:
                        # Another replica writes; when it is ours again, write all.
                        self._written.clear()
                        self._say(f"{holder} writes the routes' status")
                        wait = max(wait, self._lease.duration_s / 3) if self._lease else wait
            except (kube.ApiError, aiohttp.ClientError, OSError) as err:
                self._say(f"cannot write the routes' status: {err}")
            await asyncio.sleep(wait)

    def _say(self, what: str) -> None:
        if what != self.last:
            log.info("%s", what)
        self.last = what


def _same(old: Any, new: list[dict[str, Any]]) -> bool:
    """Equal but for when conditions last changed."""

    def bare(items: Any) -> Any:
        if not isinstance(items, list):
            return items
        return [
            {
                **p,
                "conditions": [
                    {k: v for k, v in c.items() if k != "lastTransitionTime"}
                    for c in p.get("conditions") or ()
                    if isinstance(c, Mapping)
                ],
            }
            for p in items
            if isinstance(p, Mapping)
        ]

    return bool(bare(old) == bare(new))
