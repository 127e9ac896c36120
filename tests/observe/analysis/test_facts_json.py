"""A proxy's facts cross from a worker to worker 0 as JSON, and come back
the same (`shoal serve --workers N`)."""

from __future__ import annotations

import json

from shoal.model import proxy
from shoal.observe.analysis import facts
from shoal.xds import resources, status


def _facts(placed: proxy.Proxy | None, certificate: bool) -> facts.ProxyFacts:
    return facts.ProxyFacts(
        name="sidecar~shop~web-1",
        identity="spiffe://cluster.local/ns/shop/sa/web",
        proxy=placed,
        types=(
            status.TypeStatus(resources.CLUSTER, "NACKED", "v2", "v1", "3", 1.5, 1.0, "bad", 4),
            status.TypeStatus(resources.SECRET, "SYNCED", "s1", "s1", "1", 1.0, 1.1, "", 2),
        ),
        connected_at=1700000000.25,
        admin_port=15000,
        peer="ipv4:127.0.0.1:40000",
        certificate=facts.HeldCertificate("abc123", 1.0, 2.0) if certificate else None,
    )


def test_every_kind_of_proxy_comes_back_the_same() -> None:
    for placed, certificate in (
        (proxy.Sidecar("shop", "web", "web-sa", 8080), True),
        (proxy.CapturedSidecar("shop", "web-1", "uid-1", "web-sa", "10.0.0.7"), True),
        (proxy.Proxyless("shop", "web"), False),
        (None, False),
    ):
        sent = _facts(placed, certificate)
        wire = json.loads(json.dumps(facts.proxy_facts_json(sent)))
        assert facts.proxy_facts_of_json(wire) == sent
