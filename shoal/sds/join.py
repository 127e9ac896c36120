"""Joining the mesh from outside: single-use tokens and a CSR-signing API.

A token is minted for one identity and expires; only its hash is kept. A
machine presents it with a CSR it made itself and gets back its xDS client
certificate: its private key never leaves it. A token is spent only by a
successful join, so a malformed request changes nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import grpc

from shoal._gen import ca_pb2, ca_pb2_grpc
from shoal.sds import ca

log = logging.getLogger(__name__)

JOIN_CERT_TTL = datetime.timedelta(days=90)
MAX_REQUEST_BYTES = 16 * 1024


class TokenError(Exception):
    pass


@dataclass
class _Token:
    namespace: str
    service_account: str
    expires: datetime.datetime
    used: bool = False


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JoinTokens:
    def __init__(self, clock: ca.Clock = ca.utcnow) -> None:
        self._clock = clock
        self._tokens: dict[str, _Token] = {}

    def mint(self, namespace: str, service_account: str, ttl: datetime.timedelta) -> str:
        token = secrets.token_urlsafe(32)
        self._tokens[_digest(token)] = _Token(namespace, service_account, self._clock() + ttl)
        self._forget_expired()
        return token

    def check(self, token: str) -> tuple[str, str]:
        """The identity a token is for; TokenError if it cannot be used."""
        found = self._tokens.get(_digest(token))
        if found is None:
            raise TokenError("unknown join token")
        if found.used:
            raise TokenError("join token already used")
        if found.expires <= self._clock():
            raise TokenError("join token expired")
        return found.namespace, found.service_account

    def spend(self, token: str) -> None:
        self._tokens[_digest(token)].used = True

    def _forget_expired(self) -> None:
        now = self._clock()
        for key in [
            k for k, t in self._tokens.items() if t.expires <= now - datetime.timedelta(days=1)
        ]:
            del self._tokens[key]


class CertificateService(ca_pb2_grpc.CertificateServiceServicer):
    def __init__(self, authority: Any, tokens: JoinTokens) -> None:
        # `authority` is a callable returning the current ca.Authority, so a
        # root rotation applies to joins too.
        self._authority = authority
        self._tokens = tokens

    async def Join(
        self,
        request: ca_pb2.JoinRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> ca_pb2.JoinResponse:
        try:
            namespace, account = self._tokens.check(request.token)
        except TokenError as err:
            log.warning("join refused: %s (from %s)", err, context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        authority: ca.Authority = self._authority()
        spiffe_id = authority.spiffe_id(namespace, account)
        try:
            chain = authority.sign_csr(request.csr_pem, expect_uri=spiffe_id, ttl=JOIN_CERT_TTL)
        except ca.CAError as err:
            log.warning("join refused for %s: %s", spiffe_id, err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"CSR refused: {err}")
        self._tokens.spend(request.token)
        log.info("joined: %s (from %s)", spiffe_id, context.peer())
        return ca_pb2.JoinResponse(
            spiffe_id=spiffe_id, certificate_chain_pem=chain, xds_trust_pem=authority.xds_trust
        )


def server_options() -> list[tuple[str, int]]:
    # A CSR is a kilobyte; anything much larger is refused before parsing.
    return [("grpc.max_receive_message_length", MAX_REQUEST_BYTES)]


def register(server: grpc.aio.Server, service: CertificateService) -> None:
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]


async def join(
    address: str, token: str, csr_pem: bytes, ca_root_pem: bytes, *, timeout: float = 10.0
) -> ca_pb2.JoinResponse:
    """The client side: TLS to the join port, verified by the mesh root."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_root_pem)
    async with grpc.aio.secure_channel(address, creds) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        response: ca_pb2.JoinResponse = await stub.Join(
            ca_pb2.JoinRequest(token=token, csr_pem=csr_pem), timeout=timeout
        )
        return response
