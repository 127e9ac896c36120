"""Every analyzer, run over one set of facts."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from shoal.model import problems
from shoal.observe.analysis import (
    endpoints,
    facts,
    identity,
    injection,
    policy,
    proxies,
    routes,
    streams,
)

Analyzer = Callable[[facts.Facts], Iterable[problems.Problem]]

ANALYZERS: tuple[Analyzer, ...] = (
    routes.analyze,
    endpoints.analyze,
    identity.analyze,
    policy.analyze,
    injection.analyze,
    proxies.analyze,
    streams.analyze,
)


def analyze(found: facts.Facts) -> list[problems.Problem]:
    """The problems the sources found and every analyzer's, most severe
    first, each once."""
    seen: set[problems.Problem] = set()
    out: list[problems.Problem] = []
    for p in [*found.found, *(p for a in ANALYZERS for p in a(found))]:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return sorted(out, key=problems.sort_key)
