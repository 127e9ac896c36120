"""An identity's key outlives its last proxy for a while, then goes."""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.model import mesh
from shoal.xds import identities
from tests.timers import Later


@dataclass
class Pair:
    cert_pem: bytes
    key_pem: bytes


@dataclass
class Issuer:
    """Issues a new pair for an identity it holds none for; counts them."""

    trust_domain: str = "cluster.local"
    held: dict[tuple[str, str], Pair] = field(default_factory=dict)
    issued: int = 0

    def get(self, namespace: str, service_account: str) -> Pair:
        found = self.held.get((namespace, service_account))
        if found is None:
            self.issued += 1
            found = self.held[(namespace, service_account)] = Pair(
                f"cert {self.issued}".encode(), f"key {self.issued}".encode()
            )
        return found

    def trust_bundle(self) -> bytes:
        return b"bundle"

    def forget(self, namespace: str, service_account: str) -> None:
        self.held.pop((namespace, service_account), None)


WEB = mesh.Identity("shop", "web")


def test_a_proxy_back_within_the_linger_keeps_its_certificate() -> None:
    issuer, later = Issuer(), Later()
    groups = identities.SecretGroups(issuer, linger=60.0, later=later)
    first = groups.group(WEB)
    groups.forget(WEB)
    assert [d for d, _ in later.timers] == [60.0]
    assert groups.group(WEB) is first
    later.fire()
    assert issuer.issued == 1
    assert issuer.held, "the key went while a proxy of it was connected"
    assert groups.lingering() == []


def test_the_key_goes_after_the_linger() -> None:
    issuer, later = Issuer(), Later()
    groups = identities.SecretGroups(issuer, linger=60.0, later=later)
    first = groups.group(WEB)
    groups.forget(WEB)
    groups.forget(WEB)  # once is enough
    assert len(later.timers) == 1
    assert groups.lingering() == [WEB]
    later.fire()
    assert issuer.held == {}
    assert groups.lingering() == []
    assert groups.group(WEB) is not first
    assert issuer.issued == 2


def test_without_an_event_loop_or_linger_the_key_goes_at_once() -> None:
    issuer = Issuer()
    groups = identities.SecretGroups(issuer)  # the loop's call_later: none here
    groups.group(WEB)
    groups.forget(WEB)
    assert issuer.held == {}
    groups = identities.SecretGroups(issuer, linger=0.0, later=Later())
    groups.group(WEB)
    groups.forget(WEB)
    assert issuer.held == {}
