"""Envoy's Client Status Discovery Service: the same sync state, for standard tools."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import any_pb2, timestamp_pb2

from shoal import spiffe
from shoal.xds import resources, server, status

_CONFIG_STATUS = {
    status.SYNCED: csds_pb2.SYNCED,
    status.STALE: csds_pb2.STALE,
    status.NACKED: csds_pb2.ERROR,
    status.NOT_SENT: csds_pb2.NOT_SENT,
}
REDACTED_TYPES = frozenset({resources.SECRET})


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def _matches(conn: server.Connection, request: csds_pb2.ClientStatusRequest) -> bool:
    if not request.node_matchers:
        return True
    for matcher in request.node_matchers:
        want = matcher.node_id
        which = want.WhichOneof("match_pattern")
        if which is None:
            return True
        if which == "exact" and conn.node_id == want.exact:
            return True
        if which == "prefix" and conn.node_id.startswith(want.prefix):
            return True
        if which == "suffix" and conn.node_id.endswith(want.suffix):
            return True
        if which == "contains" and want.contains in conn.node_id:
            return True
    return False


def client_config(conn: server.Connection, *, with_contents: bool = True) -> csds_pb2.ClientConfig:
    configs = []
    for type_url in resources.PUSH_ORDER:
        state = conn.types.get(type_url)
        if state is None:
            continue
        shown = status.type_status(conn, type_url)
        view = state.pending or state.held
        for r in view.resources:
            item = csds_pb2.ClientConfig.GenericXdsConfig(
                type_url=type_url,
                name=r.name,
                version_info=r.version,
                config_status=_CONFIG_STATUS[shown.status],
                last_updated=_timestamp(state.acked_at or state.sent_at),
            )
            # A route table's body is joined from its pieces on each read.
            body = r.body if with_contents and type_url not in REDACTED_TYPES else b""
            if body:
                item.xds_config.CopyFrom(any_pb2.Any(type_url=type_url, value=body))
            configs.append(item)
    return csds_pb2.ClientConfig(
        node=base_pb2.Node(id=conn.node_id, cluster=conn.cluster), generic_xds_configs=configs
    )


class ClientStatus(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):  # type: ignore[misc]
    """Every proxy's status for an admin identity; for any other caller, only
    the proxies of its own identity (a sidecar's own node): a mesh identity
    must not read the configuration of workloads it cannot see."""

    def __init__(self, ads: server.AdsServer, admins: frozenset[str] = frozenset()) -> None:
        self._ads = ads
        self._admins = admins

    async def _caller(self, context: Any) -> str | None:
        """None: may see every proxy (an admin, or a plain-text control plane)."""
        if self._ads.trust_domain is None:
            return None
        refusal = ""
        try:
            identity = self._ads.authenticate(context)
        except spiffe.IdentityError as err:
            refusal = str(err)
        if refusal:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        return None if identity in self._admins else identity

    def _response(
        self, request: csds_pb2.ClientStatusRequest, caller: str | None
    ) -> csds_pb2.ClientStatusResponse:
        conns: Iterable[server.Connection] = sorted(
            self._ads.connections.values(), key=lambda c: c.stream_id
        )
        return csds_pb2.ClientStatusResponse(
            config=[
                client_config(c, with_contents=not request.exclude_resource_contents)
                for c in conns
                if (caller is None or c.identity == caller) and _matches(c, request)
            ]
        )

    async def FetchClientStatus(
        self, request: csds_pb2.ClientStatusRequest, context: Any
    ) -> csds_pb2.ClientStatusResponse:
        return self._response(request, await self._caller(context))

    async def StreamClientStatus(
        self, requests: AsyncIterator[csds_pb2.ClientStatusRequest], context: Any
    ) -> AsyncIterator[csds_pb2.ClientStatusResponse]:
        async for request in requests:
            # Checked at every request: a stream may outlive its caller's
            # trust (a root replaced after a compromise, an expired
            # certificate).
            yield self._response(request, await self._caller(context))


def register(
    grpc_server: grpc.aio.Server, ads: server.AdsServer, admins: frozenset[str] = frozenset()
) -> None:
    csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(
        ClientStatus(ads, admins), grpc_server
    )
