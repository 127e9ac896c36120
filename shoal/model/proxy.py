"""Who a connected Envoy is, in mesh terms."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.model import mesh


@dataclass(frozen=True, slots=True)
class Sidecar:
    """A local-mode sidecar: one workload's inbound and outbound ports.

    Everything translation needs to know about a proxy; two proxies with equal
    Sidecars get byte-identical configuration.
    """

    namespace: str
    service: str
    service_account: str = "default"
    app_port: int = 8080
    inbound_port: int = 15006
    outbound_port: int = 15001
    inbound_address: str = "127.0.0.1"

    @property
    def service_key(self) -> mesh.ServiceKey:
        return mesh.ServiceKey(self.namespace, self.service)

    @property
    def identity(self) -> mesh.Identity:
        return mesh.Identity(self.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class Proxyless:
    """A gRPC application speaking xDS itself: no ports of its own, only
    what it may call."""

    namespace: str
    service: str = ""

    @property
    def service_key(self) -> mesh.ServiceKey:
        return mesh.ServiceKey(self.namespace, self.service)


Proxy = Sidecar | Proxyless
