"""Joining the mesh from outside: single-use tokens and a CSR-signing API.

A token is minted for one identity and expires; only its hash is kept. A
machine presents it with a CSR it made itself and gets back its xDS client
certificate: its private key never leaves it. A token is spent only by a
successful join, so a malformed request changes nothing.

The certificate is what `shoal bootstrap` writes for a local sidecar: client
authentication only, for ca.BOOTSTRAP_TTL. Tokens outstanding are bounded,
and an address whose joins keep failing is refused for a while (guessing a
token is hopeless, 256 bits, but a flood of attempts is not free).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import ipaddress
import logging
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from shoal._gen import ca_pb2, ca_pb2_grpc
from shoal.sds import ca

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024
# Tokens kept at once (outstanding, and spent or expired ones remembered
# for a clear error until a day after they expire).
MAX_TOKENS = 1024
# Failed joins allowed per peer address within the window, and the most
# addresses remembered.
MAX_FAILURES = 5
FAILURE_WINDOW = datetime.timedelta(minutes=1)
MAX_PEERS = 10_000


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
        self._forget_expired()
        if len(self._tokens) >= MAX_TOKENS:
            self._forget_spent()
        if len(self._tokens) >= MAX_TOKENS:
            raise TokenError(
                f"{len(self._tokens)} join tokens are outstanding, unused and unexpired "
                "(the most kept at once); let some be used or expire"
            )
        token = secrets.token_urlsafe(32)
        self._tokens[_digest(token)] = _Token(namespace, service_account, self._clock() + ttl)
        return token

    def __len__(self) -> int:
        return len(self._tokens)

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

    def _forget_spent(self) -> None:
        """Used and expired tokens are kept only to say why they no longer
        work: when the table is full, they make room."""
        now = self._clock()
        for key in [k for k, t in self._tokens.items() if t.used or t.expires <= now]:
            del self._tokens[key]

    def _forget_expired(self) -> None:
        now = self._clock()
        for key in [
            k for k, t in self._tokens.items() if t.expires <= now - datetime.timedelta(days=1)
        ]:
            del self._tokens[key]


class FailedJoins:
    """Failed joins per peer address in a sliding window."""

    def __init__(self, clock: ca.Clock = ca.utcnow) -> None:
        self._clock = clock
        self._by_peer: collections.OrderedDict[str, collections.deque[datetime.datetime]] = (
            collections.OrderedDict()
        )

    def _recent(self, peer: str) -> collections.deque[datetime.datetime]:
        found = self._by_peer.get(peer)
        if found is None:
            return collections.deque()
        horizon = self._clock() - FAILURE_WINDOW
        while found and found[0] <= horizon:
            found.popleft()
        return found

    def blocked_for(self, peer: str) -> float:
        """Seconds until `peer` may try again (0: now)."""
        recent = self._recent(peer)
        if len(recent) < MAX_FAILURES:
            return 0.0
        return max(0.0, (recent[0] + FAILURE_WINDOW - self._clock()).total_seconds())

    def failed(self, peer: str) -> None:
        recent = self._recent(peer)
        recent.append(self._clock())
        self._by_peer[peer] = recent
        self._by_peer.move_to_end(peer)
        while len(self._by_peer) > MAX_PEERS:
            self._by_peer.popitem(last=False)


def _address(peer: str) -> str:
    """Whose failures count together: `ipv4:1.2.3.4:5678` -> `ipv4:1.2.3.4`;
    an IPv6 peer by its /64 (one host may have a whole /64 to rotate its
    source addresses through)."""
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv6":
        rest = urllib.parse.unquote(rest)
        host = rest.rsplit(":", 1)[0].strip("[]").split("%")[0]
        try:
            network = ipaddress.IPv6Network(f"{host}/64", strict=False)
        except ValueError:
            return peer
        return f"ipv6:{network}"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class CertificateService(ca_pb2_grpc.CertificateServiceServicer):
    def __init__(
        self, authority: Any, tokens: JoinTokens, failures: FailedJoins | None = None
    ) -> None:
        # `authority` is a callable returning the current ca.Authority, so a
        # root rotation applies to joins too.
        self._authority = authority
        self._tokens = tokens
        self._failures = failures or FailedJoins()

    async def Join(
        self,
        request: ca_pb2.JoinRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> ca_pb2.JoinResponse:
        peer = _address(context.peer())
        wait = self._failures.blocked_for(peer)
        if wait:
            await _refuse(
                context,
                peer,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_FAILURES} failed joins from this address; try again in {wait:.0f}s",
            )
        refusal: tuple[grpc.StatusCode, str] | None = None
        try:
            namespace, account = self._tokens.check(request.token)
        except TokenError as err:
            refusal = (grpc.StatusCode.PERMISSION_DENIED, str(err))
        if refusal is not None:
            self._failures.failed(peer)
            await _refuse(context, peer, *refusal)
        authority: ca.Authority = self._authority()
        spiffe_id = authority.spiffe_id(namespace, account)
        try:
            # What `shoal bootstrap` gives a local sidecar: a client
            # certificate for the xDS channel, nothing a server could present.
            chain = authority.sign_csr(
                request.csr_pem, expect_uri=spiffe_id, ttl=ca.BOOTSTRAP_TTL, server=False
            )
        except ca.CAError as err:
            refusal = (grpc.StatusCode.INVALID_ARGUMENT, f"CSR refused: {err}")
        if refusal is not None:
            self._failures.failed(peer)
            await _refuse(context, f"{peer} for {spiffe_id}", *refusal)
        self._tokens.spend(request.token)
        log.info("joined: %s (from %s)", spiffe_id, context.peer())
        return ca_pb2.JoinResponse(
            spiffe_id=spiffe_id, certificate_chain_pem=chain, xds_trust_pem=authority.xds_trust
        )


async def _refuse(context: Any, who: str, code: grpc.StatusCode, message: str) -> NoReturn:
    log.warning("join refused: %s (from %s)", message, who)
    await context.abort(code, message)
    raise AssertionError("abort returns only by raising")


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
