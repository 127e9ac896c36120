"""Workload certificates as SDS resources, one group per identity, shared by
every proxy of that identity and rebuilt when the certificate rotates."""

from __future__ import annotations

from typing import Protocol

from shoal import tasks
from shoal.model import mesh
from shoal.xds import cache, resources
from shoal.xds import shared as sharing
from shoal.xds.translate import secrets


class KeyPairLike(Protocol):
    @property
    def cert_pem(self) -> bytes: ...
    @property
    def key_pem(self) -> bytes: ...


class Identities(Protocol):
    """Workload certificates, as the controller needs them. Present when
    the mesh speaks mutual TLS (that is, when xDS itself is authenticated)."""

    @property
    def trust_domain(self) -> str: ...

    def get(self, namespace: str, service_account: str) -> KeyPairLike: ...
    def trust_bundle(self) -> bytes: ...
    def forget(self, namespace: str, service_account: str) -> None: ...


# How long an identity's key and certificate outlive its last proxy: a
# restarting Pod, or a sidecar whose stream broke, reconnects within it and
# is handed the same certificate rather than a new key and signature (the
# costliest part of a connect after TLS). A gone workload's key is dropped
# then, and is never written anywhere.
LINGER_S = 60.0


class SecretGroups:
    """The certificate and trust bundle of each identity in use, and for
    `linger` seconds after its last proxy went (`later` schedules that)."""

    def __init__(
        self,
        identities: Identities,
        *,
        linger: float = LINGER_S,
        later: tasks.Later = tasks.call_later,
    ) -> None:
        self.identities = identities
        # Per identity: the certificate and bundle its group was built from.
        self._groups: dict[mesh.Identity, tuple[bytes, bytes, cache.ResourceGroup]] = {}
        self._bundle: tuple[bytes, cache.Resource] | None = None
        self._leaving = tasks.Linger(linger, self._drop, later=later)

    def group(self, identity: mesh.Identity) -> cache.ResourceGroup:
        self._leaving.back(identity)
        pair = self.identities.get(identity.namespace, identity.service_account)
        bundle = self.identities.trust_bundle()
        found = self._groups.get(identity)
        if found is None or found[0] is not pair.cert_pem or found[1] != bundle:
            group = cache.ResourceGroup(
                [
                    sharing.resource(
                        resources.SECRET, secrets.workload(pair.cert_pem, pair.key_pem)
                    ),
                    self._bundle_resource(bundle),
                ]
            )
            found = self._groups[identity] = (pair.cert_pem, bundle, group)
        return found[2]

    def forget(self, identity: mesh.Identity) -> None:
        """The identity's last proxy went: its key goes after the linger,
        unless a proxy of it connects before (see LINGER_S)."""
        self._leaving.leave(identity)

    def lingering(self) -> list[mesh.Identity]:
        return list(self._leaving)

    def _drop(self, identity: mesh.Identity) -> None:
        self._groups.pop(identity, None)
        self.identities.forget(identity.namespace, identity.service_account)

    def _bundle_resource(self, bundle: bytes) -> cache.Resource:
        """The trust bundle is the same for everyone: serialized once."""
        if self._bundle is None or self._bundle[0] != bundle:
            self._bundle = (
                bundle,
                sharing.resource(resources.SECRET, secrets.trust_bundle(bundle)),
            )
        return self._bundle[1]
