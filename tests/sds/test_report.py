"""`shoal ca status` of several workers, each issuing its own proxies'
certificates from the one CA."""

from __future__ import annotations

from typing import Any

from shoal.sds import report


def _status(renewals: int, serial: str, proxies: list[str], older: dict[str, list[str]]) -> Any:
    return {
        "trust_domain": "cluster.local",
        "renewals": renewals,
        "workloads": [{"identity": "spiffe://x/ns/a/sa/b", "serial": serial, "proxies": proxies}],
        "proxies_on_older_certificates": older,
    }


def test_every_workers_certificates_and_holders_are_shown() -> None:
    own = _status(1, "aa", ["p0"], {"none": ["q0"]})
    merged = report.with_workers(
        own, {2: _status(3, "cc", ["p2"], {}), 1: _status(0, "bb", ["p1"], {"none": ["q1"]})}
    )
    assert merged["renewals"] == 4
    assert [(w["serial"], w["worker"], w["proxies"]) for w in merged["workloads"]] == [
        ("aa", 0, ["p0"]),
        ("bb", 1, ["p1"]),
        ("cc", 2, ["p2"]),
    ]
    assert merged["proxies_on_older_certificates"] == {"none": ["q0", "q1"]}
    # Worker 0's own report is left as it was.
    assert own["proxies_on_older_certificates"] == {"none": ["q0"]}
    assert "worker" not in own["workloads"][0]
