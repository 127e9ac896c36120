"""What changed between two mesh states, as a push reports it."""

from __future__ import annotations

import dataclasses

from shoal.model import changes, mesh
from tests.xds import fixtures


def test_the_same_state_changed_nothing() -> None:
    state = fixtures.state()
    assert not changes.between(state, state)
    assert changes.between(state, dataclasses.replace(state, version=9)) == changes.ChangeSet()
    assert changes.ChangeSet().summary() == "nothing in the mesh"


def test_added_removed_and_changed_objects_are_named_by_kind() -> None:
    state = fixtures.state()
    web = mesh.ServiceKey("shop", "web")
    new = mesh.ServiceKey("shop", "new")
    services = dict(state.services)
    gone = next(k for k in services if k != web)
    del services[gone]
    services[new] = mesh.Service("shop", "new", ports=(mesh.Port(80, "http"),))
    # An equal object read again is not a change.
    services[web] = dataclasses.replace(state.services[web])
    eps = (*state.endpoints[web], mesh.Endpoint("10.9.9.9", 9000, "grpc-api"))
    after = dataclasses.replace(state, services=services, endpoints={**state.endpoints, web: eps})
    found = changes.between(state, after)
    assert found.services == {gone, new}
    assert found.endpoints == {web}
    assert not found.routes and not found.namespaces and not found.pods
    assert (
        found.summary()
        == f"Service {min(str(gone), str(new))}, {max(str(gone), str(new))}; endpoints of shop/web"
    )


def test_a_long_list_is_cut_short() -> None:
    keys = frozenset(mesh.ServiceKey("ns", f"s{i}") for i in range(10))
    assert changes.ChangeSet(endpoints=keys).summary(most=2) == (
        "endpoints of ns/s0, ns/s1 and 8 more"
    )


def test_endpoints_moved_alone_are_told_with_or_without_a_registry_delta() -> None:
    state = fixtures.state()
    web = mesh.ServiceKey("shop", "web")
    assert state.endpoints_moved_since(state) == frozenset()
    moved = {**state.endpoints, web: (mesh.Endpoint("10.9.9.9", 9000, "grpc-api"),)}
    after = dataclasses.replace(state, endpoints=moved)
    assert after.endpoints_moved_since(state) == {web}
    # Anything else that may differ (a new mapping of Services, even equal)
    # is not endpoints alone.
    services = dataclasses.replace(after, services=dict(state.services))
    assert services.endpoints_moved_since(state) is None
    sampling = dataclasses.replace(
        after, telemetry=dataclasses.replace(state.telemetry, trace_sampling=50.0)
    )
    assert sampling.endpoints_moved_since(state) is None
