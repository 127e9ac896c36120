"""Fuzzing in CI, on a short budget: every input an outsider controls, against
a real control plane (see fuzzing.py for the targets and what each example
must hold). `bench/fuzz.py` runs the same targets for minutes each."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security import fuzzing

# Examples per target in CI: enough to catch a regression in what the
# targets cover, short enough for a 2-core machine.
CI = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FAST = settings(CI, max_examples=500)


@pytest.fixture(scope="module")
def harness() -> Iterator[fuzzing.Harness]:
    with fuzzing.harness() as h:
        yield h


@CI
@given(requests=fuzzing.discovery_requests(delta=False))
def test_state_of_the_world_streams(harness: fuzzing.Harness, requests: list[Any]) -> None:
    fuzzing.discovery_stream(harness, requests, delta=False)


@CI
@given(requests=fuzzing.discovery_requests(delta=True))
def test_delta_streams(harness: fuzzing.Harness, requests: list[Any]) -> None:
    fuzzing.discovery_stream(harness, requests, delta=True)


@CI
@given(
    token=fuzzing.hostile_text,
    csr=fuzzing.csr_inputs,
    valid_token=st.booleans(),
)
def test_joins(harness: fuzzing.Harness, token: str, csr: bytes, valid_token: bool) -> None:
    fuzzing.join_request(harness, token, csr, valid_token)


@FAST
@given(csr=fuzzing.csr_inputs)
def test_csrs(csr: bytes) -> None:
    fuzzing.sign_csr(csr)


@CI
@given(request=fuzzing.admission_reviews())
def test_admission_reviews(harness: fuzzing.Harness, request: tuple[bytes, str]) -> None:
    fuzzing.admission_review(harness, *request)


@FAST
@given(value=fuzzing.annotation_values())
def test_annotation_values(value: dict[str, str]) -> None:
    fuzzing.annotations_only(value)


@CI
@given(text=fuzzing.manifest_texts())
def test_manifest_yaml_and_traffic_routes(harness: fuzzing.Harness, text: str) -> None:
    fuzzing.manifest(harness, text)


@CI
@given(request=fuzzing.admin_requests(), on_socket=st.booleans())
def test_admin_http_requests(
    harness: fuzzing.Harness, request: tuple[str, str, dict[str, str], bytes], on_socket: bool
) -> None:
    method, path, headers, body = request
    fuzzing.admin_request(harness, method, path, headers, body, on_socket)


@FAST
@given(
    operations=st.lists(
        st.tuples(st.sampled_from(["mint", "check", "spend", "wait"]), st.integers(0, 100_000)),
        max_size=60,
    )
)
def test_join_token_table(operations: list[tuple[str, int]]) -> None:
    fuzzing.token_table(operations)


def test_the_harness_notices_a_crash(harness: fuzzing.Harness) -> None:
    """A fuzz run that could not see an unhandled exception would prove
    nothing: one logged the way a failing task logs is caught."""
    import logging

    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("shoal.test").exception("a task failed")
    try:
        with pytest.raises(AssertionError, match="a task failed"):
            harness.check()
    finally:
        harness.crashes.records.clear()
