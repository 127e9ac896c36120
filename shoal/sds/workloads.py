"""Workload certificates: issued on first use, renewed at half their life.

Renewal happens at 50 % of the lifetime minus a random jitter of up to 10 %
of it, so a fleet issued together does not renew together. Time, sleeping
and randomness are injected so tests can drive rotation.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shoal.sds import ca

log = logging.getLogger(__name__)

Identity = tuple[str, str]  # (namespace, service account)
JITTER = 0.1


@dataclass(frozen=True)
class Issued:
    identity: Identity
    pair: ca.KeyPair
    renew_at: datetime.datetime

    @property
    def serial(self) -> int:
        return int(self.pair.cert.serial_number)


class WorkloadCertificates:
    def __init__(
        self,
        authority: ca.Authority,
        *,
        ttl: datetime.timedelta = ca.WORKLOAD_TTL,
        clock: ca.Clock = ca.utcnow,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        on_change: Callable[[set[Identity]], None] = lambda _: None,
    ) -> None:
        self.authority = authority
        self.ttl = ttl
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.on_change = on_change
        self._issued: dict[Identity, Issued] = {}
        self._wake = asyncio.Event()
        # Counted for metrics: renewals, and every certificate signed
        # (first issues, renewals, reissues under a new root).
        self.renewals = 0
        self.issues = 0

    @property
    def trust_domain(self) -> str:
        return self.authority.trust_domain

    def get(self, namespace: str, service_account: str) -> ca.KeyPair:
        identity = (namespace, service_account)
        found = self._issued.get(identity)
        if found is None:
            found = self._issue(identity)
            self._wake.set()
        return found.pair

    def trust_bundle(self) -> bytes:
        return self.authority.trust_bundle

    def forget(self, namespace: str, service_account: str) -> None:
        self._issued.pop((namespace, service_account), None)

    def issued(self) -> list[Issued]:
        return sorted(self._issued.values(), key=lambda i: i.identity)

    def _issue(self, identity: Identity) -> Issued:
        pair = self.authority.workload(*identity, ttl=self.ttl)
        lifetime = pair.not_after - self._clock()
        early = lifetime * (JITTER * self._rng.random())
        issued = Issued(identity, pair, self._clock() + lifetime / 2 - early)
        self._issued[identity] = issued
        self.issues += 1
        log.info(
            "issued certificate %x for %s, valid until %s, renewal at %s",
            issued.serial,
            self.authority.spiffe_id(*identity),
            pair.not_after.isoformat(timespec="seconds"),
            issued.renew_at.isoformat(timespec="seconds"),
        )
        return issued

    def renew_due(self) -> set[Identity]:
        """Renew every certificate past its renewal time; return whose."""
        now = self._clock()
        due = {i for i, issued in self._issued.items() if issued.renew_at <= now}
        for identity in due:
            self._issue(identity)
        if due:
            self.renewals += len(due)
            self.on_change(due)
        return due

    def set_authority(self, authority: ca.Authority, *, reissue: bool) -> None:
        """A new trust bundle (pushed to every proxy) and, with `reissue`,
        new certificates for every workload from the new signer."""
        self.authority = authority
        everyone = set(self._issued)
        if reissue:
            for identity in everyone:
                self._issue(identity)
        self.on_change(everyone)

    def next_renewal(self) -> datetime.datetime | None:
        return min((i.renew_at for i in self._issued.values()), default=None)

    async def run(self) -> None:
        """Renew certificates as they come due, until cancelled."""
        while True:
            self._wake.clear()
            self.renew_due()
            due = self.next_renewal()
            delay = 3600.0 if due is None else max(0.0, (due - self._clock()).total_seconds())
            sleeper = asyncio.ensure_future(self._sleep(min(delay, 3600.0)))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
