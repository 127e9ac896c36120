"""Joining the mesh from outside: single-use tokens and a CSR-signing API.

A token is minted for one identity and expires; only its hash is kept. A
machine presents it with a CSR it made itself and gets back its xDS client
certificate: its private key never leaves it. A token is spent only by a
successful join, so a malformed request changes nothing.

The certificate is what `shoal bootstrap` writes for a local sidecar: client
authentication only, for ca.BOOTSTRAP_TTL. Tokens outstanding are bounded,
and an address whose joins keep failing is refused for a while (guessing a
token is hopeless, 256 bits, but a flood of attempts is not free).

In a Pod, the sidecar agent certifies instead (`Certify`): its token is the
Pod's projected service-account token, bound to the audience "shoal" and to
the Pod, which the API server vouches for (TokenReview, through an injected
TokenReviewer); the Pod must still exist with the uid the token names. The
certificate is a client certificate for ca.AGENT_TTL. The token is never
logged: refusals name the Pod.
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
from typing import Any, NoReturn, Protocol

import grpc

from shoal import spiffe
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


# The audience an agent's projected token is bound to, and the user.extra
# keys the API server adds for a token bound to a Pod ("Service account
# tokens", Kubernetes docs: authentication.kubernetes.io/pod-name, -uid).
AUDIENCE = "shoal"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
_SA_PREFIX = "system:serviceaccount:"


class ReviewedToken(Protocol):
    """What the API server said of a token (TokenReview status)."""

    @property
    def authenticated(self) -> bool: ...
    @property
    def error(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def audiences(self) -> tuple[str, ...]: ...
    @property
    def extra(self) -> dict[str, tuple[str, ...]]: ...


class TokenReviewer(Protocol):
    """The API server's word on a token and on a Pod. Raises anything when
    it cannot be asked (the agent is told to try again, UNAVAILABLE)."""

    async def review(self, token: str, audience: str) -> ReviewedToken: ...

    async def pod_uid(self, namespace: str, name: str) -> str | None:
        """The Pod's uid, None if there is no such Pod."""
        ...


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    service_account: str
    pod: str
    pod_uid: str

    def __str__(self) -> str:
        return f"Pod {self.namespace}/{self.pod} (uid {self.pod_uid}, sa {self.service_account})"


class Refused(Exception):
    """A certification refused; its message says why (never the token)."""

    def __init__(self, code: grpc.StatusCode, message: str, pod: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.pod = pod


def _one(extra: dict[str, tuple[str, ...]], key: str) -> str:
    values = extra.get(key) or ()
    return values[0] if len(values) == 1 else ""


def pod_identity(reviewed: ReviewedToken, audience: str = AUDIENCE) -> PodIdentity:
    """Whose token it is, if the review vouches for a Pod-bound service
    account token for `audience`; Refused (PERMISSION_DENIED) says why not."""
    denied = grpc.StatusCode.PERMISSION_DENIED
    if not reviewed.authenticated:
        why = reviewed.error or "the API server did not authenticate it"
        raise Refused(denied, f"token not authenticated: {why}")
    if audience not in reviewed.audiences:
        raise Refused(
            denied, f"token is not for audience {audience!r} (it is for {list(reviewed.audiences)})"
        )
    name = reviewed.username
    parts = name.removeprefix(_SA_PREFIX).split(":")
    if not name.startswith(_SA_PREFIX) or len(parts) != 2:
        raise Refused(denied, f"token is not a service account's (user {name[:200]!r})")
    namespace, account = parts
    if not spiffe.is_dns_label(namespace) or not spiffe.is_dns_subdomain(account):
        raise Refused(denied, f"token names no valid service account (user {name[:200]!r})")
    pod, uid = _one(reviewed.extra, POD_NAME_EXTRA), _one(reviewed.extra, POD_UID_EXTRA)
    if not pod or not uid:
        raise Refused(
            denied,
            f"token of {namespace}/{account} is not bound to a Pod (a projected "
            "serviceAccountToken volume binds it)",
        )
    return PodIdentity(namespace, account, pod, uid)


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
        # Hex, not URL-safe base64: one token in 64 of those begins with "-",
        # which `shoal bootstrap --token T` reads as an option.
        token = secrets.token_hex(32)
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
        self,
        authority: Any,
        tokens: JoinTokens,
        failures: FailedJoins | None = None,
        *,
        reviewer: TokenReviewer | None = None,
        no_reviewer_reason: str = "this control plane does not watch Kubernetes "
        "(`shoal serve --kubernetes`), so it cannot check service-account tokens",
        agent_ttl: datetime.timedelta = ca.AGENT_TTL,
    ) -> None:
        # `authority` is a callable returning the current ca.Authority, so a
        # root rotation applies to joins too.
        self._authority = authority
        self._tokens = tokens
        self._failures = failures or FailedJoins()
        self._reviewer = reviewer
        self._no_reviewer_reason = no_reviewer_reason
        self._agent_ttl = agent_ttl

    async def _unless_blocked(self, context: Any, what: str) -> str:
        """The caller's address, unless its recent failures (joins and
        certifies count together) refuse it for now."""
        peer = _address(context.peer())
        wait = self._failures.blocked_for(peer)
        if wait:
            await _refuse(
                context,
                peer,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_FAILURES} failed {what}s from this address; try again in {wait:.0f}s",
                what=what,
            )
        return peer

    async def Certify(
        self,
        request: ca_pb2.CertifyRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> ca_pb2.JoinResponse:
        peer = await self._unless_blocked(context, "certify")
        if self._reviewer is None:
            await _refuse(
                context,
                peer,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot certify: {self._no_reviewer_reason}",
                what="certify",
            )
        try:
            chain, spiffe_id, pod = await self._certify(request, self._reviewer)
        except Refused as err:
            if err.code != grpc.StatusCode.UNAVAILABLE:
                # The API server being away is not the caller's failure.
                self._failures.failed(peer)
            await _refuse(context, f"{peer} {err.pod}".strip(), err.code, str(err), what="certify")
        authority: ca.Authority = self._authority()
        log.info("certified: %s for %s (from %s)", spiffe_id, pod, context.peer())
        return ca_pb2.JoinResponse(
            spiffe_id=spiffe_id, certificate_chain_pem=chain, xds_trust_pem=authority.xds_trust
        )

    async def _certify(
        self, request: ca_pb2.CertifyRequest, reviewer: TokenReviewer
    ) -> tuple[bytes, str, PodIdentity]:
        if not request.kubernetes_token:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "no kubernetes_token")
        if not request.csr_pem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "no csr_pem")
        try:
            reviewed = await reviewer.review(request.kubernetes_token, AUDIENCE)
        except Exception as err:  # whatever the API client raises: ask again later
            raise Refused(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot check the token with the Kubernetes API now: {type(err).__name__}: "
                f"{str(err)[:300]}",
            ) from None
        who = pod_identity(reviewed)
        try:
            uid = await reviewer.pod_uid(who.namespace, who.pod)
        except Exception as err:  # as above
            raise Refused(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot read {who} from the Kubernetes API now: {type(err).__name__}: "
                f"{str(err)[:300]}",
                str(who),
            ) from None
        if uid is None:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Pod {who.namespace}/{who.pod} the token is bound to no longer exists",
                str(who),
            )
        if uid != who.pod_uid:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Pod {who.namespace}/{who.pod} is now uid {uid}, not the token's {who.pod_uid} "
                "(it was deleted and created again)",
                str(who),
            )
        authority: ca.Authority = self._authority()
        spiffe_id = authority.spiffe_id(who.namespace, who.service_account)
        try:
            chain = authority.sign_csr(
                request.csr_pem, expect_uri=spiffe_id, ttl=self._agent_ttl, server=False
            )
        except ca.CAError as err:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"CSR refused: {err}", str(who)
            ) from None
        return chain, spiffe_id, who

    async def Join(
        self,
        request: ca_pb2.JoinRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> ca_pb2.JoinResponse:
        peer = await self._unless_blocked(context, "join")
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


async def _refuse(
    context: Any, who: str, code: grpc.StatusCode, message: str, *, what: str = "join"
) -> NoReturn:
    log.warning("%s refused: %s (from %s)", what, message, who)
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


async def certify(
    address: str,
    kubernetes_token: str,
    csr_pem: bytes,
    ca_root_pem: bytes,
    *,
    timeout: float = 10.0,
) -> ca_pb2.JoinResponse:
    """The agent's side: TLS to the join port, verified by the mesh root(s)."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_root_pem)
    async with grpc.aio.secure_channel(address, creds) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        response: ca_pb2.JoinResponse = await stub.Certify(
            ca_pb2.CertifyRequest(kubernetes_token=kubernetes_token, csr_pem=csr_pem),
            timeout=timeout,
        )
        return response
