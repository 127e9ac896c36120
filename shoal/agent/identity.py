"""The Pod's xDS client certificate: a key made here, a CSR for the Pod's
SPIFFE ID, the service-account token as proof, and the files Envoy reads it
from (file-based SDS, so a renewal reaches the running Envoy).

The key is written only into the work dir (0600, owned by the proxy's user)
and sent nowhere; the token is read afresh for each request (projected
tokens rotate) and never logged.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from cryptography import x509

from shoal.agent import settings as agent_settings
from shoal.model import proxy
from shoal.sds import ca, join
from shoal.xds.translate import bootstrap

log = logging.getLogger("shoal.agent")

SDS_DIR = "sds"
CLIENT_SDS = "xds-client.yaml"
TRUST_SDS = "xds-trust.yaml"
# The newest trust bundle the control plane returned: preferred over the
# roots given at injection, which a root rotation may have moved past.
TRUST = "trust.pem"
CERT = "xds-cert.pem"
BOOTSTRAP = "envoy.yaml"


@dataclass(frozen=True)
class Credentials:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    trust_pem: bytes
    # When this agent got it: certificates are backdated (ca.BACKDATE), so
    # their lifetime is counted from here, not from notBefore.
    received: datetime.datetime

    @property
    def not_after(self) -> datetime.datetime:
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_after_utc

    @property
    def serial(self) -> str:
        return f"{x509.load_pem_x509_certificate(self.cert_pem).serial_number:x}"


def renewal_time(
    received: datetime.datetime,
    not_after: datetime.datetime,
    *,
    fraction: float,
    jitter: float,
    rand: float,
) -> datetime.datetime:
    """When to renew: at `fraction` of the lifetime left when it came,
    moved by up to ±`jitter` of it (`rand` in [0, 1))."""
    lifetime = max(not_after - received, datetime.timedelta(0))
    share = min(max(fraction + jitter * (2 * rand - 1), 0.05), 0.95)
    return received + lifetime * share


class CertifyError(Exception):
    """Certify failed; the message says why (the control plane's reason)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def roots(s: agent_settings.AgentSettings) -> list[bytes]:
    """The root bundles to verify the CA port by, in order of preference."""
    kept = s.work_dir / TRUST
    out = []
    if kept.exists():
        out.append(kept.read_bytes())
    if s.ca_root_pem and s.ca_root_pem not in out:
        out.append(s.ca_root_pem)
    return out


async def certify(s: agent_settings.AgentSettings, clock: ca.Clock = ca.utcnow) -> Credentials:
    """One Certify: a new key, its CSR and the token for a certificate."""
    try:
        token = s.token_path.read_text().strip()
    except OSError as err:
        raise CertifyError(f"cannot read the service-account token {s.token_path}: {err}") from None
    if not token:
        raise CertifyError(f"the service-account token {s.token_path} is empty")
    bundles = roots(s)
    if not bundles:
        raise CertifyError("no mesh root to verify the control plane by (SHOAL_CA_ROOT_PEM)")
    key = ca.new_key()
    csr = ca.csr(key, s.spiffe_id)
    last: grpc.aio.AioRpcError | None = None
    for bundle in bundles:
        try:
            answer = await join.certify(s.ca_address, token, csr, bundle)
        except grpc.aio.AioRpcError as err:
            last = err
            # Only a connection that failed (a root the server no longer
            # chains to, say) is worth another bundle; a refusal is final.
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                break
            continue
        return Credentials(
            answer.certificate_chain_pem, ca.key_pem(key), answer.xds_trust_pem, clock()
        )
    assert last is not None
    raise CertifyError(
        f"Certify at {s.ca_address} failed: {last.code().name}: {last.details()}", last.code()
    )


def _owner(s: agent_settings.AgentSettings) -> tuple[int, int] | None:
    """Who must read the work dir's files: the proxy's user, when the agent
    runs as root and Envoy does not."""
    return (s.proxy_uid, s.proxy_gid) if os.geteuid() == 0 else None


def _replace(path: Path, data: bytes, owner: tuple[int, int] | None, mode: int = 0o600) -> None:
    """Write beside `path` and rename it into place: Envoy's watch on the
    directory sees one move, of a complete file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare(s: agent_settings.AgentSettings) -> None:
    """The work dir and its SDS folder, readable by the proxy's user only."""
    owner = _owner(s)
    for folder in (s.work_dir, s.work_dir / SDS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        if owner is not None:
            os.chown(folder, *owner)


def sds_files(s: agent_settings.AgentSettings) -> bootstrap.XdsSds:
    folder = s.work_dir / SDS_DIR
    return bootstrap.XdsSds(
        str((folder / CLIENT_SDS).resolve()),
        str((folder / TRUST_SDS).resolve()),
        str(folder.resolve()),
    )


def install(s: agent_settings.AgentSettings, creds: Credentials) -> None:
    """Put credentials where Envoy reads them: trust first, so a new
    certificate under a new root is never presented before that root is
    trusted; then the certificate and key together."""
    owner = _owner(s)
    folder = s.work_dir / SDS_DIR
    if creds.trust_pem:
        _replace(s.work_dir / TRUST, creds.trust_pem, owner, 0o644)
        _replace(folder / TRUST_SDS, _yaml(bootstrap.trust_secret(creds.trust_pem)), owner)
    _replace(s.work_dir / CERT, creds.cert_pem, owner, 0o644)
    _replace(
        folder / CLIENT_SDS, _yaml(bootstrap.client_secret(creds.cert_pem, creds.key_pem)), owner
    )


def write_bootstrap(s: agent_settings.AgentSettings) -> Path:
    sidecar = proxy.CapturedSidecar(
        namespace=s.pod.namespace,
        pod=s.pod.name,
        pod_uid=s.pod.uid,
        service_account=s.pod.service_account,
        ip=s.pod.ip,
        outbound_port=s.outbound_port,
        inbound_port=s.inbound_port,
    )
    config = bootstrap.captured_sidecar(
        sidecar,
        node_id=s.node_id,
        xds_host=s.xds_host,
        xds_port=s.xds_port,
        workload=s.pod.workload,
        delta=s.delta,
        tls=sds_files(s),
        admin_port=s.admin_port,
        stats_port=s.stats_port,
        # The agent serves the health port itself (probes beside readiness).
        health_port=None,
    )
    path = s.work_dir / BOOTSTRAP
    _replace(path, _yaml(config), _owner(s), 0o644)
    return path


def _yaml(data: object) -> bytes:
    return yaml.safe_dump(data, sort_keys=False).encode()
