"""The TrafficRoute resource: the full form of routing, with exact errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal.model import mesh, routing
from shoal.registry import files, manifests, store, trafficroute
from tests import manifests as m
from tests.conftest import write
from tests.registry import parses

FULL = """apiVersion: shoal.io/v1alpha1
kind: TrafficRoute
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  rules:
    - match:
        headers: [{name: X-User-Group, exact: internal}]
        path: {prefix: /api}
        method: get
        queryParams: [{name: debug, present: true}]
      backends:
        - {service: reviews, subset: {version: v2}, weight: 100}
      timeout: 2s
      retries: {attempts: 3, retryOn: "5xx,reset", perTryTimeout: 500ms}
      fault: {abort: {status: 503, percent: 10}, delay: {duration: 200ms, percent: 5}}
      mirror: {service: shadow, percent: 25}
    - backends:
        - {service: reviews, subset: {version: v1}, weight: 90}
        - {service: reviews, subset: {version: v2}, weight: 10}
  policy:
    outlier: {consecutive5xx: 3, ejection: 10s, maxEjectionPercent: 30}
    connections: {maxConnections: 100, maxRequests: 1000}
"""

KNOWN = {
    mesh.ServiceKey("shop", n): mesh.Service("shop", n, (mesh.Port(80, "http"),))
    for n in ("reviews", "shadow")
}


def _obj(text: str) -> manifests.KubeObject:
    obj = manifests.parse_object(yaml.safe_load(text))
    assert obj is not None
    return obj


def test_the_full_form_parses() -> None:
    parsed = trafficroute.parse(_obj(FULL), KNOWN)
    first, second = parsed.route.rules
    assert first.headers == (
        routing.HeaderMatch("x-user-group", routing.MatchKind.EXACT, "internal"),
    )
    assert first.path == routing.PathMatch(routing.MatchKind.PREFIX, "/api")
    assert first.method == "GET"
    assert first.query == (routing.HeaderMatch("debug", routing.MatchKind.PRESENT),)
    assert first.timeout_s == 2.0 and first.retry == routing.Retry(3, "5xx,reset", 0.5)
    assert first.fault == routing.Fault(503, 10.0, 0.2, 5.0)
    assert first.mirror == routing.Mirror(mesh.ServiceKey("shop", "shadow"), 25.0)
    assert [(b.subset, b.weight) for b in second.backends] == [
        (mesh.frozen_map({"version": "v1"}), 90),
        (mesh.frozen_map({"version": "v2"}), 10),
    ]
    assert parsed.outlier == mesh.OutlierPolicy(3, 10.0, 30)
    assert parsed.limits == mesh.ConnectionLimits(100, None, 1000)
    assert parsed.route.source == "TrafficRoute shop/reviews"


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("weight: 90}", "weight: 80}", "spec.rules[1].backends: weights add up to 90, not 100"),
        ("weight: 90}", "weight: -5}", "spec.rules[1].backends[0].weight must be a whole number"),
        (
            "service: reviews\n  rules",
            "service: ghost\n  rules",
            "Service shop/ghost does not exist",
        ),
        (
            "{service: shadow, percent: 25}",
            "{service: shadow, percent: 125}",
            "spec.rules[0].mirror.percent must be a percentage",
        ),
        (
            "status: 503",
            "status: 99",
            "spec.rules[0].fault.abort.status must be a whole number from 200 to 599",
        ),
        ("timeout: 2s", "timeout: soon", "'soon' is not a duration"),
        ("exact: internal", "regex: '(?=x)'", "spec.rules[0].match.headers[0].regex"),
        ("{prefix: /api}", "{prefix: api}", "spec.rules[0].match.path.prefix must start with /"),
        (
            "attempts: 3",
            "attempts: 30",
            "spec.rules[0].retries.attempts must be a whole number from 0 to 10",
        ),
        ('retryOn: "5xx,reset"', 'retryOn: "sometimes"', "sometimes is not a retry condition"),
        ("consecutive5xx: 3", "consecutive5xx: 0", "spec.policy.outlier.consecutive5xx"),
        (
            "exact: internal}",
            "exact: internal, prefix: x}",
            "needs exactly one of exact, prefix, regex, present",
        ),
    ],
)
def test_errors_name_the_field(old: str, new: str, error: str) -> None:
    assert old in FULL
    with pytest.raises(manifests.ManifestError) as info:
        trafficroute.parse(_obj(FULL.replace(old, new, 1)), KNOWN)
    assert error in str(info.value)


def test_a_traffic_route_wins_over_annotations_and_says_so(registry_dir: Path) -> None:
    notes = '\n  annotations:\n    shoal.io/split: "reviews=50,shadow=50"'
    write(
        registry_dir,
        "svc.yaml",
        m.service("reviews", "shop", extra=notes) + "---\n" + m.service("shadow", "shop"),
    )
    write(registry_dir, "tr.yaml", FULL)
    registry = files.FolderRegistry(registry_dir)
    state = registry.load()
    route = state.routes[mesh.ServiceKey("shop", "reviews")]
    assert route.source == "TrafficRoute shop/reviews"
    (conflict,) = registry.problems
    assert str(conflict) == (
        "tr.yaml#0: TrafficRoute shop/reviews: takes precedence over the routing annotations "
        "of Service shop/reviews (metadata.annotations[shoal.io/split]), which are ignored"
    )
    assert (conflict.code, conflict.field) == ("SHL0105", "spec.service")
    assert state.services[mesh.ServiceKey("shop", "reviews")].outlier == mesh.OutlierPolicy(
        3, 10.0, 30
    )
    # A broken edit keeps the last good TrafficRoute.
    path = write(registry_dir, "tr.yaml", FULL.replace("weight: 90}", "weight: 91}"))
    again = registry.reload({path})
    assert again.routes[mesh.ServiceKey("shop", "reviews")] == route
    assert any("weights add up to 101" in str(p) for p in registry.problems)


def test_a_build_parses_a_traffic_route_again_only_when_it_or_a_service_it_names_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = store.ObjectStore()
    parsed = parses.recorded(monkeypatch, trafficroute)

    def build(*texts: str) -> list[str]:
        parsed.clear()
        return _put(objects, *texts)[1]

    build(*(_service(n) for n in ("reviews", "shadow", "other")), FULL)
    assert parsed == ["TrafficRoute shop/reviews"]
    assert build(_service("other", 81)) == [] and parsed == []
    assert build(FULL) == [] and parsed == []
    # The mirror's Service goes: the route is refused, its last good form kept.
    objects.remove("f", ("Service", "shop", "shadow"))
    assert any("shop/shadow" in p for p in build()) and parsed == ["TrafficRoute shop/reviews"]


def test_a_traffic_route_whose_parse_read_every_service_is_parsed_at_every_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Which Services a parse read is what says a change cannot touch it;
    a parse that read them all says nothing, and is redone."""
    objects = store.ObjectStore()
    real_parse = trafficroute.parse
    parsed: list[int] = []

    def counting_every_service(obj: manifests.KubeObject, known: Any) -> trafficroute.Parsed:
        parsed.append(len(known))
        return real_parse(obj, known)

    monkeypatch.setattr(trafficroute, "parse", counting_every_service)
    _put(objects, *(_service(n) for n in ("reviews", "shadow")), FULL)
    _put(objects, _service("other"))
    assert parsed == [2, 3]


def _service(name: str, port: int = 80) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n"
        f"spec: {{ports: [{{port: {port}}}]}}\n"
    )


def _put(objects: store.ObjectStore, *texts: str) -> tuple[mesh.MeshState, list[str]]:
    """Objects put into the store (as a watch does), then a build."""
    for text in texts:
        objects.put("f", store.Sourced(_obj(text), "f"))
    state, found = objects.build()
    return state, [str(p) for p in found]


def test_a_policy_follows_its_traffic_route_and_its_service_build_after_build() -> None:
    objects = store.ObjectStore()

    def build(*texts: str) -> mesh.Service:
        state, found = _put(objects, *texts)
        assert found == []
        return state.services[mesh.ServiceKey("shop", "reviews")]

    first = build(_service("reviews"), _service("shadow"), FULL)
    assert first.outlier == mesh.OutlierPolicy(3, 10.0, 30)
    # Nothing changed: the very Service of the last build.
    assert build() is first
    # The policy changes, the Service does not.
    changed = build(FULL.replace("consecutive5xx: 3", "consecutive5xx: 4"))
    assert changed.outlier == mesh.OutlierPolicy(4, 10.0, 30)
    # The Service changes, the route does not: both show.
    moved = build(_service("reviews", 81))
    assert [p.port for p in moved.ports] == [81]
    assert moved.outlier == changed.outlier and moved.limits == changed.limits
