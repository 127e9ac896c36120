"""Analyzers: who serves a Service, against whom its callers expect.

Callers verify the certificate behind a Service against the service
accounts its endpoints declare (`MeshState.service_accounts_of`). A local
sidecar proves its own service account with its xDS client certificate.
When the two differ, every call fails the SAN check, and nothing else in
the mesh looks wrong: every proxy is SYNCED. Only the control plane sees
both sides, so it says so.
"""

from __future__ import annotations

from collections.abc import Iterator

from shoal import spiffe
from shoal.model import mesh, problems, proxy
from shoal.observe.analysis import evidence, facts

CODE = "SHL0301"
FIELD = "metadata.annotations[shoal.io/service-account] of its EndpointSlice"


def analyze(found: facts.Facts) -> Iterator[problems.Problem]:
    state = found.state
    for p in found.proxies:
        sidecar = p.proxy
        if not isinstance(sidecar, proxy.Sidecar) or not p.identity:
            continue
        key = sidecar.service_key
        if key not in state.services:
            continue
        served = [
            e
            for e in state.endpoints.get(key, ())
            if e.address == sidecar.inbound_address and e.port == sidecar.inbound_port
        ]
        if not served:
            continue  # not one of the Service's endpoints: no caller reaches it
        expected = sorted({e.service_account for e in served})
        if sidecar.service_account in expected:
            continue
        yield _mismatch(found, p, sidecar, key, served[0], expected)


def _mismatch(
    found: facts.Facts,
    p: facts.ProxyFacts,
    sidecar: proxy.Sidecar,
    key: mesh.ServiceKey,
    endpoint: mesh.Endpoint,
    expected: list[str],
) -> problems.Problem:
    trust_domain, _, _ = spiffe.parse(p.identity)
    wanted = ", ".join(spiffe.workload_id(trust_domain, key.namespace, sa) for sa in expected)
    failed = _failed_checks(found, key)
    seen = (
        f"; {failed:.0f} connections already failed that check"
        if failed
        else "; every call to it fails that check (503, ssl.fail_verify_san)"
    )
    if endpoint.pod:
        declared_by = f"Pod {endpoint.pod} runs as {endpoint.service_account!r}"
    elif endpoint.service_account == "default":
        declared_by = "its EndpointSlice declares no service account, so 'default'"
    else:
        declared_by = f"its EndpointSlice declares {endpoint.service_account!r}"
    return problems.Problem(
        source="",
        subject=f"Service {key}",
        reason=(
            f"proxy {p.name} serves it at {endpoint.address}:{endpoint.port} as {p.identity}, "
            f"but callers expect {wanted} ({declared_by}){seen}"
        ),
        code=CODE,
        field="" if endpoint.pod else FIELD,
        fix=(
            f"Annotate the EndpointSlice of {key} with shoal.io/service-account: "
            f"{sidecar.service_account}, or bootstrap the sidecar with --service-account "
            f"{expected[0]}."
            if not endpoint.pod
            else f"Run the sidecar as the Pod's service account {expected[0]!r}."
        ),
    )


def _failed_checks(found: facts.Facts, key: mesh.ServiceKey) -> float:
    """SAN check failures the callers' sidecars counted on `key`'s clusters."""
    suffix = f"|{key.fqdn}.ssl.fail_verify_san"
    return sum(
        evidence.matching(stats, "cluster.outbound|", suffix) for stats in found.stats.values()
    )
