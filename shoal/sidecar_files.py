"""Writing what one local sidecar needs on disk: its Envoy bootstrap and,
with mTLS, its xDS client certificate, key (0600) and the trust bundle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shoal.model import proxy
from shoal.sds import ca
from shoal.xds.translate import bootstrap

CERT, KEY, ROOTS = "xds-cert.pem", "xds-key.pem", "root-cert.pem"


@dataclass(frozen=True)
class XdsCredentials:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    trust_pem: bytes = b""


def issue(authority: ca.Authority, s: proxy.Sidecar | proxy.CapturedSidecar) -> XdsCredentials:
    """On the control plane's machine: issue directly from the CA."""
    key = ca.new_key()
    cert = authority.issue(
        key.public_key(),
        uri=authority.spiffe_id(s.namespace, s.service_account),
        # It proves the sidecar to the control plane; workload certificates
        # (short-lived) then come over SDS.
        ttl=ca.BOOTSTRAP_TTL,
        server=False,
    )
    return XdsCredentials(cert, ca.key_pem(key), authority.xds_trust)


def write(
    out: Path,
    s: proxy.Sidecar | proxy.CapturedSidecar,
    *,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    node_id: str | None = None,
    delta: bool = False,
    authority: ca.Authority | None = None,
    credentials: XdsCredentials | None = None,
    stats_port: int = bootstrap.STATS_PORT,
    health_port: int = bootstrap.HEALTH_PORT,
    collector: tuple[str, int] | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tls = None
    if credentials is None and authority is not None:
        credentials = issue(authority, s)
    if credentials is not None:
        ca.write_private(out / KEY, credentials.key_pem)
        (out / CERT).write_bytes(credentials.cert_pem)
        (out / ROOTS).write_bytes(credentials.trust_pem)
        tls = bootstrap.XdsTls(
            str((out / CERT).resolve()), str((out / KEY).resolve()), str((out / ROOTS).resolve())
        )
    if isinstance(s, proxy.CapturedSidecar):
        config = bootstrap.captured_sidecar(
            s,
            node_id=node_id or f"sidecar~{s.ip or '0.0.0.0'}~{s.pod}.{s.namespace}",
            xds_host=xds_host,
            xds_port=xds_port,
            admin_port=admin_port,
            delta=delta,
            tls=tls,
            stats_port=stats_port,
            health_port=health_port,
            collector=collector,
        )
    else:
        config = bootstrap.sidecar(
            s,
            node_id=node_id or f"sidecar~{s.namespace}~{s.service}-{s.inbound_port}",
            xds_host=xds_host,
            xds_port=xds_port,
            admin_port=admin_port,
            delta=delta,
            tls=tls,
            collector=collector,
        )
    path = out / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
