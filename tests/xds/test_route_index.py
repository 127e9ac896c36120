"""The index of the mesh's routes, carried from one state to the next by the
keys that changed, is the index a walk of every route finds."""

from __future__ import annotations

import dataclasses
import random

from shoal.model import keys, mesh, routing
from shoal.xds import shared
from shoal.xds.translate import names

SERVICES = [keys.ServiceKey("ns", f"s{i}") for i in range(12)]
LABELS = [keys.FrozenMap({"version": v}) for v in ("v1", "v2", "v3")]


def _route(rng: random.Random, key: keys.ServiceKey) -> routing.ServiceRoute:
    backends = tuple(
        routing.Backend(
            rng.choice(SERVICES),
            subset=rng.choice([keys.FrozenMap(), *LABELS]),
            missing=rng.random() < 0.1,
        )
        for _ in range(rng.randint(1, 3))
    )
    mirror = routing.Mirror(rng.choice(SERVICES)) if rng.random() < 0.2 else None
    return routing.ServiceRoute(key, (routing.RouteRule(backends),), mirror=mirror)


def _walked(routes: dict[keys.ServiceKey, routing.ServiceRoute]) -> shared.RouteIndex:
    naming: dict[keys.ServiceKey, set[keys.ServiceKey]] = {}
    subsets: dict[keys.ServiceKey, set[keys.FrozenMap]] = {}
    for key, route in routes.items():
        for backend in route.backends():
            naming.setdefault(backend, set()).add(key)
        for target, labels in route.subsets():
            subsets.setdefault(target, set()).add(labels)
    return shared.RouteIndex(
        routes,
        {k: frozenset(v) for k, v in naming.items()},
        {},
        {k: tuple(sorted(v, key=names.subset_name)) for k, v in subsets.items()},
        None,
        frozenset(),
    )


def test_an_index_carried_by_changes_is_the_one_a_walk_finds() -> None:
    rng = random.Random(16)
    routes: dict[keys.ServiceKey, routing.ServiceRoute] = {}
    state = mesh.MeshState(routes=routes)
    index = shared.route_index(None, state)
    for step in range(300):
        now = dict(routes)
        changed = set()
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(SERVICES)
            changed.add(key)
            if key in now and rng.random() < 0.3:
                del now[key]
            else:
                now[key] = _route(rng, key)
        # Every other state says what changed, as a registry does; the
        # rest are compared key by key.
        before = state.mappings()
        # The other mappings stay the very objects, as a registry keeps them.
        state = dataclasses.replace(state, routes=now, delta=None)
        if step % 2:
            delta = mesh.Delta(before, tuple(map(id, state.mappings())), routes=frozenset(changed))
            state = dataclasses.replace(state, delta=delta)
            assert state.routes_changed_since(routes) == frozenset(changed)
        carried = shared.route_index(index, state)
        walked = _walked(now)
        assert carried.routes is now
        assert carried.naming == walked.naming
        assert carried.subsets == walked.subsets
        assert carried.changed_since(routes) >= {k for k in changed if routes.get(k) != now.get(k)}
        assert carried.naming_any(changed) == {
            k for k, r in now.items() if not r.backends().isdisjoint(changed)
        }
        index, routes = carried, now
