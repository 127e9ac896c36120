"""The caBundle of shoal's MutatingWebhookConfiguration, kept current.

The API server verifies the webhook's certificate with that bundle, so it
must hold the mesh's roots: after a root rotation, the new ones. One
replica writes it, the one holding the Lease; it writes only when the
bundle differs, with the resourceVersion it read, so an edit made in
between is never overwritten (it is read again next round).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from shoal import kube

log = logging.getLogger(__name__)

CONFIGURATION = "shoal-sidecar-injector"
LEASE = "shoal-injector"
API_VERSION = "admissionregistration.k8s.io/v1"
PLURAL = "mutatingwebhookconfigurations"


class CaBundle:
    def __init__(
        self,
        api: kube.Api,
        roots: Callable[[], bytes],
        lease: kube.Lease | None,
        *,
        name: str = CONFIGURATION,
        poll_s: float = 5.0,
    ) -> None:
        self._api = api
        self._roots = roots
        self._lease = lease
        self.name = name
        self._poll_s = poll_s
        # What happened last, for /debug and the log (said once, not every poll).
        self.last = "not synced yet"
        # Whether the configuration exists, as last read (None: not read
        # yet). Every replica reads it, the keeper or not: the analyzers of
        # each say whether a namespace's label has a webhook to act on it.
        self.installed: bool | None = None

    def _path(self) -> str:
        return kube.resource_path(API_VERSION, PLURAL, None, self.name)

    async def sync(self) -> bool:
        """Write the current roots into every webhook of the configuration;
        True if anything was written."""
        try:
            current: dict[str, Any] = await self._api.call("GET", self._path())
        except kube.NotFound:
            self.installed = False
            self._say(f"MutatingWebhookConfiguration {self.name} not found: nothing to keep")
            return False
        self.installed = True
        wanted = base64.b64encode(self._roots()).decode()
        changed = False
        for hook in current.get("webhooks") or ():
            if not isinstance(hook, dict):
                continue
            client_config = hook.setdefault("clientConfig", {})
            if client_config.get("caBundle") != wanted:
                client_config["caBundle"] = wanted
                changed = True
        if not changed:
            self._say(f"caBundle of {self.name} is current")
            return False
        try:
            await self._api.call("PUT", self._path(), body=current)
        except kube.Conflict:
            self._say(f"{self.name} changed while being updated; reading it again")
            return False
        self._say(f"caBundle of {self.name} updated to the mesh's roots")
        return True

    async def check(self) -> bool:
        """Whether the configuration exists; reads only, as a replica that
        does not keep the bundle may."""
        try:
            await self._api.call("GET", self._path())
        except kube.NotFound:
            self.installed = False
        else:
            self.installed = True
        return self.installed

    def _say(self, what: str) -> None:
        if what != self.last:
            log.info("%s", what)
        self.last = what

    async def run(self) -> None:
        while True:
            try:
                # During an API server outage, one probe among the watches'.
                await self._api.backoff.wait_turn()
                holder = await self._lease.acquire() if self._lease is not None else None
                if holder is None:
                    await self.sync()
                else:
                    await self.check()
                    self._say(f"{holder} keeps the caBundle of {self.name}")
            except (kube.ApiError, aiohttp.ClientError, OSError) as err:
                # The API server may be away for a while; the bundle waits.
                self._say(f"cannot keep the caBundle of {self.name}: {err}")
            await asyncio.sleep(self._poll_s)
