"""The dashboard's Prometheus source: what it asks, and how it reads the
answers (the browser test in test_dashboard.py runs it against a real
Prometheus scraping real sidecars)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from shoal import envoy
from shoal.observe.dashboard import prometheus


def _answer(*series: tuple[dict[str, str], str]) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": m, "value": [1700000000.0, v]} for m, v in series],
        },
    }


def _pair(caller: str, callee: str) -> dict[str, str]:
    return {"source_workload": caller, "destination_service": callee}


def test_every_query_counts_what_the_callers_sidecars_saw_per_pair() -> None:
    asked = prometheus.queries("5m")
    assert set(asked) == {"requests", "errors", "rps", "errors_per_second", "p50_ms", "p99_ms"}
    for promql in asked.values():
        assert 'reporter="source"' in promql
        assert "source_workload, destination_service" in promql
    assert "[5m]" in asked["rps"] and "[5m]" in asked["errors_per_second"]
    assert 'response_code=~"5.."' in asked["errors"]
    assert asked["p99_ms"].startswith("histogram_quantile(0.99, sum by (le, ")


def test_an_answer_becomes_edges_between_services() -> None:
    figures = {
        "requests": prometheus.vector(
            _answer(
                (_pair("web.shop", "reviews.shop"), "120"),
                (_pair("web.shop", "reviews-v2.shop"), "30"),
                (_pair("web.shop", "PassthroughCluster"), "9"),
                (_pair("web.shop", "-"), "4"),
                (_pair("batch.jobs", "reviews.shop"), "0"),
            )
        ),
        "errors": prometheus.vector(_answer((_pair("web.shop", "reviews.shop"), "6"))),
        "rps": prometheus.vector(
            _answer(
                (_pair("web.shop", "reviews.shop"), "2"),
                (_pair("web.shop", "reviews-v2.shop"), "0"),
            )
        ),
        "errors_per_second": prometheus.vector(_answer((_pair("web.shop", "reviews.shop"), "0.5"))),
        "p50_ms": prometheus.vector(
            _answer(
                (_pair("web.shop", "reviews.shop"), "1.25"),
                (_pair("web.shop", "reviews-v2.shop"), "NaN"),
            )
        ),
        "p99_ms": prometheus.vector(_answer((_pair("web.shop", "reviews.shop"), "40.0004"))),
    }
    assert prometheus.edges(figures) == [
        {
            "source": "shop/web",
            "target": "shop/reviews",
            "kind": "traffic",
            "requests": 120,
            "errors": 6,
            "rps": 2.0,
            "error_rate": 0.25,
            "p50_ms": 1.25,
            "p99_ms": 40.0,
        },
        {
            "source": "shop/web",
            "target": "shop/reviews-v2",
            "kind": "traffic",
            "requests": 30,
            "errors": 0,
            "rps": 0.0,
            "error_rate": None,
            "p50_ms": None,
            "p99_ms": None,
        },
    ]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}, "parse"),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "instant"),
        ({}, "no status"),
    ],
)
def test_a_failed_query_says_why(answer: dict[str, Any], reason: str) -> None:
    with pytest.raises(prometheus.PrometheusError, match=reason):
        prometheus.vector(answer)


async def test_an_unreachable_prometheus_is_an_error_with_its_address() -> None:
    url = f"http://127.0.0.1:{envoy.free_port()}"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(prometheus.PrometheusError, match=f"cannot query {url}/api/v1/query"):
            await prometheus.Prometheus(url).traffic(session)
