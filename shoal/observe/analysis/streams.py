"""Analyzers: proxies the xDS server will not serve.

A refused stream leaves its Envoy without configuration (or on its last
one), retrying; the server logs each refusal, but a log line scrolls away.
Here they stay until a stream of that identity is accepted or the proxy
stops retrying."""

from __future__ import annotations

from collections.abc import Iterator

from shoal.model import problems
from shoal.observe.analysis import facts

CODE = "SHL0405"
# A refusal older than this, not repeated, is a proxy that gave up or went.
RECENT_S = 300.0


def analyze(found: facts.Facts) -> Iterator[problems.Problem]:
    accepted: dict[str, float] = {}
    for p in found.proxies:
        accepted[p.identity] = max(accepted.get(p.identity, 0.0), p.connected_at)
    for r in found.refusals:
        if found.now - r.at > RECENT_S:
            continue
        if r.identity and accepted.get(r.identity, 0.0) > r.at:
            continue
        who = f" ({r.identity})" if r.identity and r.identity not in r.who else ""
        yield problems.Problem(
            source="",
            subject=r.who + who,
            reason=(
                f"the xDS server refused its stream ({r.code}, {found.now - r.at:.0f}s ago): "
                f"{r.message}; the proxy gets no configuration until it connects as it should"
            ),
            code=CODE,
            fix="Bootstrap the proxy again (`shoal bootstrap`, or restart the Pod) so its "
            "certificate and node metadata agree with what the reason names.",
        )
