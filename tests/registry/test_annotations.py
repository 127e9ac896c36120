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
        ({annotations.ROUTE_HEADERS: "x-a~=(?=look) -> reviews"}, "invalid perl operator"),
        ({annotations.ROUTE_HEADERS: "x-a~=(a)\\1 -> reviews"}, "not a valid RE2"),
        ({annotations.ROUTE_HEADERS: "x-a~=(a|b|c)+x[0-9]{1,60} -> reviews"}, "too complex"),
        ({annotations.TIMEOUT: "2 seconds"}, "is not a duration like 200ms or 2s"),
        ({annotations.TIMEOUT: "0s"}, "is out of range"),
        ({annotations.TIMEOUT: "2h"}, "is out of range"),
        ({annotations.RETRIES: "11"}, "is not a whole number from 0 to 10"),
        ({annotations.RETRIES: "-1"}, "is not a whole number from 0 to 10"),
        (
            {annotations.RETRIES: "2", annotations.RETRY_ON: "5xx,sometimes"},
            "sometimes is not one of",
        ),
        ({annotations.RETRY_ON: "5xx"}, "needs shoal.io/retries"),
        ({annotations.FAULT: "abort=700@10%"}, "is not an HTTP status"),
        ({annotations.FAULT: "abort=503@150%"}, "is not between 0% and 100%"),
        ({annotations.FAULT: "delay=fast@10%"}, "is not a duration"),
        ({annotations.FAULT: "explode=1@10%"}, "is neither abort nor delay"),
        ({annotations.FAULT: "abort=503"}, "is not abort=STATUS@PERCENT"),
        ({annotations.MIRROR: "reviews@10%"}, "cannot mirror to itself"),
        ({annotations.MIRROR: "ghost@10%"}, "Service shop/ghost does not exist"),
        ({annotations.MIRROR: "other@ten"}, "is not a percentage"),
        # Found by fuzzing: str.isdigit() takes "²", which int() refuses (a
        # ValueError instead of the annotation's error), and other scripts'
        # digits, which int() and float() take.
        ({annotations.RETRIES: "²"}, "is not a whole number from 0 to 10"),
        ({annotations.RETRIES: "\u0663"}, "is not a whole number from 0 to 10"),
        ({annotations.SPLIT: "reviews=5\u0660,reviews-v2=50"}, "is not SERVICE=WEIGHT"),
        ({annotations.SPLIT: "reviews=" + "1" * 5000}, "is not SERVICE=WEIGHT"),
        ({annotations.FAULT: "abort=5\u00b2\u00b2@10%"}, "is not an HTTP status"),
        ({annotations.FAULT: "abort=503@1_0%"}, "is not a percentage"),
        ({annotations.TIMEOUT: "\u0663s"}, "is not a duration"),
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


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("consecutive-5xx=0,ejection=30s", "is not from 1 to 1000"),
        ("consecutive-5xx=5,ejection=forever", "is not a duration"),
        ("errors=5", "expected consecutive-5xx=N"),
        ("consecutive-5xx=5,max-ejection=120%", "is not between 0% and 100%"),
        ("consecutive-5xx=\u00b9,ejection=30s", "is not from 1 to 1000"),
    ],
)
def test_invalid_outlier_annotations_say_why(value: str, error: str) -> None:
    with pytest.raises(annotations.AnnotationError, match=r"annotation shoal\.io/outlier") as info:
        annotations.outlier({annotations.OUTLIER: value})
    assert error in str(info.value)


def test_policy_annotations_parse() -> None:
    svc = _svc(
        "reviews",
        **{
            annotations.TIMEOUT: "1.5s",
            annotations.RETRIES: "3",
            annotations.FAULT: "abort=503@12.5%, delay=200ms@50%",
            annotations.MIRROR: "other@25%",
        },
    )
    route = annotations.service_route(svc, KNOWN)
    assert route is not None
    assert route.timeout_s == 1.5
    assert route.retry == routing.Retry(3, "5xx,reset,connect-failure")
    assert route.fault == routing.Fault(503, 12.5, 0.2, 50.0)
    assert route.mirror == routing.Mirror(mesh.ServiceKey(SHOP, "other"), 25.0)
    outlier = annotations.outlier({annotations.OUTLIER: "consecutive-5xx=3,ejection=10s"})
    assert outlier == mesh.OutlierPolicy(3, 10.0, 50)


def test_an_invalid_annotation_changes_nothing_else(registry_dir: Path) -> None:
    note = '\n  annotations:\n    {}: "{}"'
    write(registry_dir, "v2.yaml", manifests.service("reviews-v2"))
    write(
        registry_dir,
        "r.yaml",
        manifests.service("reviews", extra=note.format("shoal.io/timeout", "2s")),
    )
    path = write(
        registry_dir,
        "o.yaml",
        manifests.service("orders", extra=note.format("shoal.io/timeout", "1s")),
    )
    registry = files.FolderRegistry(registry_dir)
    before = registry.load()
    write(
        registry_dir,
        "r.yaml",
        manifests.service("reviews", extra=note.format("shoal.io/timeout", "soon")),
    )
    write(
        registry_dir,
        "o.yaml",
        manifests.service("orders", extra=note.format("shoal.io/timeout", "3s")),
    )
    after = registry.reload({registry_dir / "r.yaml", path})
    reviews, orders = mesh.ServiceKey("default", "reviews"), mesh.ServiceKey("default", "orders")
    assert after.routes[reviews] == before.routes[reviews]  # last good: 2s
    assert after.routes[orders].timeout_s == 3.0  # the neighbour's edit applies
    (problem,) = registry.problems
    assert "Service default/reviews: annotation shoal.io/timeout: 'soon'" in str(problem)


def test_a_namespace_sets_the_default_mtls_mode(registry_dir: Path) -> None:
    write(
        registry_dir,
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n"
        "  annotations: {shoal.io/mtls: permissive}\n---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: typo\n"
        "  annotations: {shoal.io/mtls: lenient}\n",
    )
    registry = files.FolderRegistry(registry_dir)
    state = registry.load()
    assert state.namespaces["legacy"].mtls == "permissive"
    assert state.namespaces["typo"].mtls is None
    (problem,) = registry.problems
    assert "Namespace typo: annotation shoal.io/mtls: 'lenient' is not one of" in str(problem)


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("shoal.io/retries", "\u00b2"),
        ("shoal.io/split", "reviews=\u00b9\u2070\u2070"),
        ("shoal.io/fault", "abort=5\u2070\u00b3@10%"),
        ("shoal.io/outlier", "consecutive-5xx=\u00b2"),
    ],
)
def test_a_number_int_refuses_is_a_problem_not_a_failed_load(
    registry_dir: Path, annotation: str, value: str
) -> None:
    """Found by fuzzing: a Service annotated with a digit str.isdigit() takes
    and int() refuses made the whole folder fail to load (ValueError), so
    one annotation could stop every change to the mesh."""
    note = f'\n  annotations:\n    {annotation}: "{value}"'
    write(registry_dir, "v2.yaml", manifests.service("reviews-v2"))
    write(registry_dir, "r.yaml", manifests.service("reviews", extra=note))
    registry = files.FolderRegistry(registry_dir)
    state = registry.load()
    assert {k.name for k in state.services} == {"reviews", "reviews-v2"}
    (problem,) = registry.problems
    assert annotation in str(problem) and "reviews" in str(problem)
