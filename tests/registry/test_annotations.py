"""Routing and scope annotations: parsing, and a clear error for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.model import mesh, routing
from shoal.registry import annotations, files
from tests import manifests
from tests.conftest import write

SHOP = "shop"


def _svc(name: str, **notes: str) -> mesh.Service:
    return mesh.Service(SHOP, name, (mesh.Port(80, "http"),), annotations=mesh.frozen_map(notes))


KNOWN = {s.key: s for s in (_svc("reviews"), _svc("reviews-v2"), _svc("other"))}


def test_split_and_header_rules() -> None:
    svc = _svc(
        "reviews",
        **{
            annotations.SPLIT: "reviews=90, reviews-v2=10",
            annotations.ROUTE_HEADERS: (
                "x-user-group=internal -> reviews-v2; x-beta~=^y.s$ -> other.shop"
            ),
        },
    )
    route = annotations.service_route(svc, KNOWN)
    assert route is not None
    internal, beta, default = route.rules
    assert internal.headers == (
        routing.HeaderMatch("x-user-group", routing.MatchKind.EXACT, "internal"),
    )
    assert internal.backends == (routing.Backend(mesh.ServiceKey(SHOP, "reviews-v2")),)
    assert beta.headers[0].kind is routing.MatchKind.REGEX
    assert [(b.service.name, b.weight) for b in default.backends] == [
        ("reviews", 90),
        ("reviews-v2", 10),
    ]


def test_no_routing_annotations_means_no_route() -> None:
    assert annotations.service_route(_svc("reviews"), KNOWN) is None


@pytest.mark.parametrize(
    ("notes", "error"),
    [
        ({annotations.SPLIT: "reviews=90,reviews-v2=20"}, "weights add up to 110, not 100"),
        ({annotations.SPLIT: "reviews=x"}, "'reviews=x' is not SERVICE=WEIGHT"),
        ({annotations.SPLIT: "reviews=-10,reviews-v2=110"}, "is not SERVICE=WEIGHT"),
        ({annotations.SPLIT: "reviews=50,reviews=50"}, "names a backend twice"),
        ({annotations.SPLIT: "nope=100"}, "backend Service shop/nope does not exist"),
        ({annotations.SPLIT: ""}, "names no backend"),
        ({annotations.ROUTE_HEADERS: "x-a=1"}, "is not HEADER=VALUE -> SERVICE"),
        ({annotations.ROUTE_HEADERS: "x-a~=([ -> reviews"}, "not a valid RE2 regular expression"),
        ({annotations.ROUTE_HEADERS: "bad header=1 -> reviews"}, "is not a header name"),
        ({annotations.ROUTE_HEADERS: "x-a=1 -> Not_A_Service"}, "is not a Service"),
    ],
)
def test_invalid_routing_annotations_say_why(notes: dict[str, str], error: str) -> None:
    with pytest.raises(annotations.AnnotationError, match=r"annotation shoal\.io/") as info:
        annotations.service_route(_svc("reviews", **notes), KNOWN)
    assert error in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, {"*"}), (".", set()), ("team-a, .", {"team-a"}), ("*", {"*"})],
)
def test_export_to(value: str | None, expected: set[str]) -> None:
    notes = {} if value is None else {annotations.EXPORT_TO: value}
    assert annotations.export_to(notes) == expected


def test_dependencies() -> None:
    deps = annotations.dependencies(
        {annotations.DEPENDENCIES: "cart, invoices.billing, search/*, x.y.svc.cluster.local"}, SHOP
    )
    assert deps == {("shop", "cart"), ("billing", "invoices"), ("search", "*"), ("y", "x")}
    assert annotations.dependencies({}, SHOP) is None
    with pytest.raises(annotations.AnnotationError, match="is not a Service"):
        annotations.dependencies({annotations.DEPENDENCIES: "UPPER"}, SHOP)


def test_a_bad_edit_keeps_the_services_last_good_route(registry_dir: Path) -> None:
    note = '\n  annotations:\n    shoal.io/split: "{}"'
    write(registry_dir, "v2.yaml", manifests.service("reviews-v2"))
    path = write(
        registry_dir,
        "r.yaml",
        manifests.service("reviews", extra=note.format("reviews=90,reviews-v2=10")),
    )
    registry = files.FolderRegistry(registry_dir)
    good = registry.load().routes[mesh.ServiceKey("default", "reviews")]
    write(
        registry_dir,
        "r.yaml",
        manifests.service("reviews", extra=note.format("reviews=90,reviews-v2=20")),
    )
    state = registry.reload({path})
    assert state.routes[mesh.ServiceKey("default", "reviews")] == good
    assert [str(p) for p in registry.problems] == [
        "r.yaml#0: Service default/reviews: annotation shoal.io/split: weights add up to 110, "
        "not 100; its last good configuration stays in force"
    ]
