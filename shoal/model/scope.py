"""Which Services a proxy may call, and so which configuration it gets.

By default a proxy sees the Services of its own namespace and every Service
another namespace exports to it (`shoal.io/export-to`, default everyone, as
Istio's exportTo). A workload's dependency list (`shoal.io/dependencies` on
its Service) narrows that further. Backends that visible routes send to are
always included, or the route could not work.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from shoal.model import mesh, routing

EVERYONE = "*"
OWN_NAMESPACE = "."


def exported_to(service: mesh.Service, namespace: str) -> bool:
    if service.namespace == namespace:
        return True
    targets = service.export_to
    return EVERYONE in targets or namespace in targets


def _depends_on(dependencies: frozenset[tuple[str, str]], key: mesh.ServiceKey) -> bool:
    return (key.namespace, key.name) in dependencies or (key.namespace, EVERYONE) in dependencies


def visible(
    services: Iterable[mesh.Service],
    routes: Mapping[mesh.ServiceKey, routing.ServiceRoute],
    namespace: str,
    dependencies: frozenset[tuple[str, str]] | None,
) -> frozenset[mesh.ServiceKey]:
    seen = {
        s.key
        for s in services
        if exported_to(s, namespace) and (dependencies is None or _depends_on(dependencies, s.key))
    }
    # Close over route backends: a visible route to an invisible backend
    # would send traffic to a cluster the proxy does not have.
    pending = list(seen)
    while pending:
        route = routes.get(pending.pop())
        if route is None:
            continue
        for backend in route.backends():
            if backend not in seen:
                seen.add(backend)
                pending.append(backend)
    return frozenset(seen)
