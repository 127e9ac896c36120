"""What operators ask of the mesh CA through the admin API: a root rotation
(run once, on the replica holding the leader Lease on Kubernetes) and join
tokens for machines outside the cluster; and the join port those use."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

import aiohttp
import grpc

from shoal import kube, spiffe, tasks
from shoal.sds import ca, join, rotation, tls, workloads

log = logging.getLogger("shoal")

# Join tokens live at most this long: a token is a credential.
MAX_JOIN_TOKEN_TTL = datetime.timedelta(hours=24)
LEADER_LEASE = "shoal-leader"
_ROTATION_TASK = "root-rotation"


class RootRotations:
    """`POST /ca/rotate-root[?compromised=1]` and its progress."""

    def __init__(
        self, rotation: rotation.RootRotation, lease: kube.Lease | None, background: tasks.Tasks
    ) -> None:
        self._rotation = rotation
        self._lease = lease
        self._background = background

    def progress(self) -> dict[str, Any]:
        return dataclasses.asdict(self._rotation.progress)

    async def start(self, query: Mapping[str, str]) -> dict[str, Any]:
        compromised = query.get("compromised", "") in ("1", "true", "yes")
        current = self._rotation
        if current.running and not compromised:
            raise RuntimeError(f"a root rotation is already running ({current.progress.phase})")
        if self._lease is not None:
            holder = await self._lease.acquire()
            if holder is not None:
                raise RuntimeError(
                    f"lease {LEADER_LEASE} is held by {holder}: a rotation runs once, "
                    "on the replica holding it"
                )
        if compromised:
            # At once, and only said done once it is: a rotation under way is
            # given up (its new root was never the only one).
            for running in self._background.named(_ROTATION_TASK):
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
            try:
                done = await self._leased(current.run(compromised=True))
            except (kube.ApiError, aiohttp.ClientError, OSError) as err:
                raise RuntimeError(f"the root was not replaced: {err}") from None
            return {"started": True, "phase": done.phase, "root": done.new_root_serial}
        self._background.start(self._leased(current.run()), _ROTATION_TASK)
        await asyncio.sleep(0)
        return {"started": True, "phase": current.progress.phase}

    async def _leased(self, run: Any) -> rotation.Progress:
        return await (self._lease.held_during(run) if self._lease is not None else run)


class JoinTokenIssuer:
    """`POST /ca/join-token?namespace=NS&service_account=SA[&ttl=S]`."""

    def __init__(self, tokens: join.JoinTokens, trust_domain: str, join_port: int) -> None:
        self._tokens = tokens
        self._trust_domain = trust_domain
        self._join_port = join_port

    async def mint(self, query: Mapping[str, str]) -> dict[str, Any]:
        namespace, account = query.get("namespace", ""), query.get("service_account", "")
        if not namespace or not account:
            raise ValueError("name the identity: ?namespace=NS&service_account=SA")
        if not spiffe.is_dns_label(namespace) or not spiffe.is_dns_subdomain(account):
            raise ValueError(f"{namespace!r}/{account!r} is not a namespace/service account")
        ttl = token_ttl(query.get("ttl", "600"))
        try:
            token = self._tokens.mint(namespace, account, ttl)
        except join.TokenError as err:
            raise RuntimeError(str(err)) from None
        log.info(
            "join token minted for %s", spiffe.workload_id(self._trust_domain, namespace, account)
        )
        return {"token": token, "expires_in_s": ttl.total_seconds(), "join_port": self._join_port}


def token_ttl(text: str) -> datetime.timedelta:
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"ttl {text[:40]!r} is not a number of seconds") from None
    limit = MAX_JOIN_TOKEN_TTL.total_seconds()
    if not 0 < seconds <= limit:  # also refuses nan and inf
        raise ValueError(f"ttl must be more than 0 and at most {limit:.0f} seconds")
    return datetime.timedelta(seconds=seconds)


@contextlib.asynccontextmanager
async def join_port(
    certificates: workloads.WorkloadCertificates,
    tokens: join.JoinTokens,
    host: str,
    port: int,
    names: Collection[str],
    *,
    reviewer: join.TokenReviewer | None = None,
    agent_ttl: datetime.timedelta = ca.AGENT_TTL,
) -> AsyncIterator[int]:
    """The join service on host:port (server TLS only: a joining machine, or
    a Pod's agent, has no certificate yet); yields the port bound. Without a
    `reviewer` (no Kubernetes API), agents cannot certify there."""
    server = grpc.aio.server(options=join.server_options())
    join.register(
        server,
        join.CertificateService(
            lambda: certificates.authority, tokens, reviewer=reviewer, agent_ttl=agent_ttl
        ),
    )
    bound = server.add_secure_port(
        f"{host}:{port}",
        tls.serving_credentials(certificates, tls.serving_hosts(host, names), client_auth=False),
    )
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(grace=None)
