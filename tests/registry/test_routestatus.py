"""What shoal writes into a route's `status.parents` (the Kubernetes round
trip is in tests/kube/test_route_status.py)."""

from __future__ import annotations

import datetime

from shoal.registry import gatewayapi, routestatus

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)
REF = {"group": "", "kind": "Service", "name": "echo", "port": 80}


def _ours(accepted: bool = True) -> tuple[gatewayapi.ParentStatus, ...]:
    return (
        gatewayapi.ParentStatus(
            REF,
            (
                gatewayapi.Condition(
                    "Accepted",
                    accepted,
                    "Accepted" if accepted else "NoMatchingParent",
                    "routes the Service's callers"
                    if accepted
                    else "Service shop/echo does not exist",
                ),
                gatewayapi.Condition(
                    "ResolvedRefs", True, "ResolvedRefs", "every backend resolved"
                ),
            ),
        ),
    )


def test_our_entry_replaces_ours_and_keeps_other_controllers() -> None:
    gateway = {
        "parentRef": {"name": "public", "kind": "Gateway"},
        "controllerName": "example.net/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}],
    }
    stale = {
        "parentRef": {"name": "old"},
        "controllerName": gatewayapi.CONTROLLER,
        "conditions": [],
    }
    route = {"metadata": {"generation": 3}, "status": {"parents": [gateway, stale]}}
    parents = routestatus.parents(route, _ours(), NOW)
    assert parents[0] == gateway
    assert parents[1] == {
        "parentRef": REF,
        "controllerName": "shoal.io/mesh-controller",
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "routes the Service's callers",
                "observedGeneration": 3,
                "lastTransitionTime": "2026-11-27T12:00:00Z",
            },
            {
                "type": "ResolvedRefs",
                "status": "True",
                "reason": "ResolvedRefs",
                "message": "every backend resolved",
                "observedGeneration": 3,
                "lastTransitionTime": "2026-11-27T12:00:00Z",
            },
        ],
    }
    assert len(parents) == 2


def test_a_transition_time_moves_only_when_the_status_does() -> None:
    meta = {"generation": 1}
    first = {
        "metadata": meta,
        "status": {"parents": routestatus.parents({"metadata": meta}, _ours(), NOW)},
    }
    later = NOW + datetime.timedelta(hours=1)
    again = routestatus.parents(first, _ours(), later)
    assert routestatus._same(first["status"]["parents"], again)
    assert {c["lastTransitionTime"] for c in again[0]["conditions"]} == {"2026-11-27T12:00:00Z"}
    refused = routestatus.parents(first, _ours(accepted=False), later)
    times = {c["type"]: c["lastTransitionTime"] for c in refused[0]["conditions"]}
    assert times == {"Accepted": "2026-11-27T13:00:00Z", "ResolvedRefs": "2026-11-27T12:00:00Z"}
    assert not routestatus._same(first["status"]["parents"], refused)
