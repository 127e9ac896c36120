"""`shoal ca status`: roots, issued certificates, and who holds which."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from shoal.sds import ca, workloads


def _describe(cert: x509.Certificate) -> dict[str, object]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(timespec="seconds"),
        "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds"),
    }


def chain_of_secret(body: bytes) -> bytes | None:
    """The certificate chain PEM in a serialized SDS Secret."""
    chain = secret_pb2.Secret.FromString(body).tls_certificate.certificate_chain.inline_bytes
    return bytes(chain) if chain else None


def serial_of_secret(body: bytes) -> str | None:
    """The serial of the leaf certificate in a serialized SDS Secret."""
    secret = secret_pb2.Secret.FromString(body)
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    if not chain:
        return None
    return f"{x509.load_pem_x509_certificate(chain).serial_number:x}"


def with_workers(own: dict[str, Any], others: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """`status` of worker 0 with every other worker's (`serve --workers`):
    each issues its own proxies' certificates, from the same CA."""
    merged = {
        **own,
        "renewals": own["renewals"] + sum(o["renewals"] for o in others.values()),
        "workloads": [{**w, "worker": 0} for w in own["workloads"]],
        "proxies_on_older_certificates": {
            k: list(v) for k, v in own["proxies_on_older_certificates"].items()
        },
    }
    for index, other in sorted(others.items()):
        merged["workloads"] += [{**w, "worker": index} for w in other["workloads"]]
        for serial, proxies in other["proxies_on_older_certificates"].items():
            merged["proxies_on_older_certificates"].setdefault(serial, []).extend(proxies)
    return merged


def status(
    authority: ca.Authority,
    certificates: workloads.WorkloadCertificates,
    held: Mapping[str, bytes | None],
) -> dict[str, object]:
    """`held` maps proxy ids to the workload Secret each last ACKed."""
    roots: Iterable[x509.Certificate] = x509.load_pem_x509_certificates(authority.trust_bundle)
    holders: dict[str, list[str]] = {}
    for proxy_id, body in held.items():
        serial = serial_of_secret(body) if body else None
        holders.setdefault(serial or "none", []).append(proxy_id)
    return {
        "trust_domain": authority.trust_domain,
        "signer": _describe(authority.signer.cert),
        "roots": [_describe(r) for r in roots],
        # Trusted for xDS client certificates only, until the window ends.
        "retired": [
            {**_describe(r.cert), "trusted_until": r.until.isoformat(timespec="seconds")}
            for r in authority.trusted_retired()
        ],
        "workload_ttl_s": certificates.ttl.total_seconds(),
        "renewals": certificates.renewals,
        "workloads": [
            {
                "identity": authority.spiffe_id(*i.identity),
                "serial": f"{i.serial:x}",
                "not_after": i.pair.not_after.isoformat(timespec="seconds"),
                "renew_at": i.renew_at.isoformat(timespec="seconds"),
                "proxies": sorted(holders.pop(f"{i.serial:x}", [])),
            }
            for i in certificates.issued()
        ],
        # Proxies holding a certificate the CA has since replaced (or none).
        "proxies_on_older_certificates": {k: sorted(v) for k, v in holders.items()},
    }
