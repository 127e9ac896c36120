"""What the agent is told: flags, and its Pod's downward-API environment."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shoal import spiffe

TOKEN_PATH = "/var/run/secrets/shoal/tokens/token"
WORK_DIR = "/var/run/shoal"
PROXY_UID = 1337
PROXY_GID = 1337


class SettingsError(ValueError):
    """A setting the agent cannot run with; the message names it."""


@dataclass(frozen=True)
class Pod:
    """The Pod the agent runs in (downward API)."""

    name: str
    namespace: str
    uid: str
    ip: str
    service_account: str
    workload: str = ""

    def __str__(self) -> str:
        return f"Pod {self.namespace}/{self.name}"


@dataclass(frozen=True)
class AgentSettings:
    pod: Pod
    xds_host: str
    xds_port: int
    ca_address: str
    trust_domain: str = "cluster.local"
    work_dir: Path = Path(WORK_DIR)
    token_path: Path = Path(TOKEN_PATH)
    # The mesh roots given at injection (SHOAL_CA_ROOT_PEM); a newer bundle
    # from the control plane, kept in the work dir, is preferred.
    ca_root_pem: bytes = field(default=b"", repr=False)
    health_address: str = "0.0.0.0"
    health_port: int = 15021
    admin_port: int = 15000
    stats_port: int = 15090
    inbound_port: int = 15006
    outbound_port: int = 15001
    drain_seconds: float = 5.0
    delta: bool = False
    concurrency: int = 2
    envoy_log_level: str = "warning"
    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_GID
    # The app's original probes, by rewritten path (SHOAL_APP_PROBES).
    app_probes: str = "{}"
    # Renew at this fraction of the certificate's lifetime, give or take
    # `renew_jitter` of it, so a fleet started together does not renew at once.
    renew_at: float = 0.5
    renew_jitter: float = 0.1
    # Retry a failed Certify after this long, doubling up to `retry_max`.
    retry_initial: datetime.timedelta = datetime.timedelta(seconds=0.5)
    retry_max: datetime.timedelta = datetime.timedelta(seconds=30)

    @property
    def spiffe_id(self) -> str:
        return spiffe.workload_id(self.trust_domain, self.pod.namespace, self.pod.service_account)

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.pod.ip}~{self.pod.name}.{self.pod.namespace}"


def host_port(flag: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or len(port) > 5:
        raise SettingsError(f"{flag} {value!r} is not HOST:PORT")
    return host.strip("[]"), check_port(flag, int(port))


def check_port(flag: str, port: int) -> int:
    if not 1 <= port <= 65535:
        raise SettingsError(f"{flag} {port} is not a port (1-65535)")
    return port


def pod_from_env(environ: Mapping[str, str]) -> Pod:
    """The Pod from the downward-API variables the injector sets."""
    missing = [
        k
        for k in ("POD_NAME", "POD_NAMESPACE", "POD_UID", "POD_IP", "SERVICE_ACCOUNT")
        if not environ.get(k)
    ]
    if missing:
        raise SettingsError(
            f"environment variables {', '.join(missing)} are not set (the injector sets them "
            "from the downward API)"
        )
    pod = Pod(
        name=environ["POD_NAME"],
        namespace=environ["POD_NAMESPACE"],
        uid=environ["POD_UID"],
        ip=environ["POD_IP"],
        service_account=environ["SERVICE_ACCOUNT"],
        workload=environ.get("SHOAL_WORKLOAD", ""),
    )
    if not spiffe.is_dns_subdomain(pod.name):
        raise SettingsError(f"POD_NAME {pod.name[:100]!r} is not a Pod name")
    if not spiffe.is_dns_label(pod.namespace):
        raise SettingsError(f"POD_NAMESPACE {pod.namespace[:100]!r} is not a namespace")
    if not spiffe.is_dns_subdomain(pod.service_account):
        raise SettingsError(
            f"SERVICE_ACCOUNT {pod.service_account[:100]!r} is not a service account name"
        )
    try:
        ipaddress.ip_address(pod.ip)
    except ValueError:
        raise SettingsError(f"POD_IP {pod.ip[:100]!r} is not an IP address") from None
    return pod
