"""`shoal agent`: certify, write the bootstrap, run Envoy, keep the
certificate fresh, answer probes, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from shoal.agent import health, identity, proxy
from shoal.agent import settings as agent_settings
from shoal.sds import ca

log = logging.getLogger("shoal.agent")


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(seconds, 0.0))


@dataclass(frozen=True)
class Timing:
    """The agent's clock and randomness, injected so tests can drive them."""

    clock: ca.Clock = ca.utcnow
    sleep: Callable[[float, asyncio.Event], Awaitable[None]] = _sleep_or_stop
    rand: Callable[[], float] = field(default=random.random)


class Agent:
    def __init__(self, s: agent_settings.AgentSettings, timing: Timing | None = None) -> None:
        self.s = s
        self.timing = timing or Timing()
        self.credentials: identity.Credentials | None = None
        self.renewals = 0
        self.envoy: proxy.Envoy | None = None
        self.health: health.Health | None = None

    async def obtain(self, stop: asyncio.Event) -> identity.Credentials | None:
        """Certify until it works (or `stop`), waiting longer after each
        failure: a Pod whose token is not yet valid, or a control plane not
        yet up, gets there in time."""
        delay = self.s.retry_initial.total_seconds()
        while not stop.is_set():
            try:
                creds = await identity.certify(self.s, self.timing.clock)
            except identity.CertifyError as err:
                log.warning("%s: %s; trying again in %.1fs", self.s.pod, err, delay)
                await self.timing.sleep(delay, stop)
                delay = min(delay * 2, self.s.retry_max.total_seconds())
                continue
            log.info(
                "%s: certified as %s (serial %s, valid until %s)",
                self.s.pod,
                self.s.spiffe_id,
                creds.serial,
                creds.not_after.isoformat(timespec="seconds"),
            )
            return creds
        return None

    def renew_at(self, creds: identity.Credentials) -> datetime.datetime:
        return identity.renewal_time(
            creds.received,
            creds.not_after,
            fraction=self.s.renew_at,
            jitter=self.s.renew_jitter,
            rand=self.timing.rand(),
        )

    async def keep_renewed(self, stop: asyncio.Event) -> None:
        """Renew at about half the lifetime; Envoy reads the new files
        through its directory watch, without a restart."""
        while not stop.is_set():
            assert self.credentials is not None
            at = self.renew_at(self.credentials)
            await self.timing.sleep((at - self.timing.clock()).total_seconds(), stop)
            if stop.is_set():
                return
            creds = await self.obtain(stop)
            if creds is None:
                return
            identity.install(self.s, creds)
            self.credentials = creds
            self.renewals += 1

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> int:
        s = self.s
        identity.prepare(s)
        self.health = health.Health(health.parse_probes(s.app_probes), self._not_ready)
        runner = web.AppRunner(self.health.app(), access_log=None, handle_signals=False)
        await runner.setup()
        # The health port first: kubelet's probes get "not ready" rather than
        # a refused connection while the agent certifies.
        site = web.TCPSite(runner, s.health_address, s.health_port, reuse_address=True)
        await site.start()
        log.info("%s: health on %s:%d", s.pod, s.health_address, s.health_port)
        try:
            return await self._run(stop, ready)
        finally:
            await self.health.close()
            await runner.cleanup()

    async def _run(self, stop: asyncio.Event, ready: Callable[[], None] | None) -> int:
        s = self.s
        creds = await self.obtain(stop)
        if creds is None:
            return 0
        identity.install(s, creds)
        self.credentials = creds
        config = identity.write_bootstrap(s)
        self.envoy = proxy.Envoy(s, config)
        await self.envoy.start()
        if ready is not None:
            ready()
        async with asyncio.TaskGroup() as group:
            supervisor = group.create_task(self.envoy.supervise())
            renewer = group.create_task(self.keep_renewed(stop))
            await stop.wait()
            log.info("%s: stopping: draining envoy for %.1fs", s.pod, s.drain_seconds)
            assert self.health is not None
            self.health.draining = True
            await self.envoy.drain()
            renewer.cancel()
            # Envoy keeps running (and is restarted) while it drains.
            await asyncio.sleep(s.drain_seconds)
            supervisor.cancel()
        code = await self.envoy.stop()
        log.info("%s: envoy stopped (exit %s)", s.pod, code)
        return 0

    async def _not_ready(self) -> str:
        if self.envoy is None:
            return "no certificate yet" if self.credentials is None else "envoy not started"
        return await self.envoy.not_ready()
