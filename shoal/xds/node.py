"""Who a proxy is, from the node it sends on its first xDS request.

`shoal bootstrap` writes these metadata keys into the Envoy bootstrap. The
identity issue makes the client certificate, not this metadata, the source
of truth for the service account.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from shoal import spiffe, terminal
from shoal.model import proxy

# Metadata keys, as `shoal bootstrap` writes them.
NAMESPACE = "NAMESPACE"
SERVICE = "SERVICE"
SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
APP_PORT = "APP_PORT"
INBOUND_PORT = "INBOUND_PORT"
OUTBOUND_PORT = "OUTBOUND_PORT"
INBOUND_ADDRESS = "INBOUND_ADDRESS"
# The sidecar's Envoy admin port on its own 127.0.0.1: what `shoal dashboard`
# scrapes for request numbers and opens for `shoal dashboard envoy`. Only
# shown, never used to configure anything.
ADMIN_PORT = "ADMIN_PORT"
# Set by `shoal bootstrap --grpc`: a gRPC application with no sidecar.
PROXYLESS = "PROXYLESS"
# Set in the bootstrap of a Kubernetes sidecar whose Pod's traffic iptables
# captures; the Pod keys come from the downward API. INBOUND_PORT and
# OUTBOUND_PORT, if present, say where iptables redirects to.
POD_NAME = "POD_NAME"
POD_UID = "POD_UID"
POD_IP = "POD_IP"
INTERCEPTION_MODE = "INTERCEPTION_MODE"
# iptables REDIRECT, Istio's default; TPROXY (keeping the source address)
# needs listener options and capabilities shoal does not set up.
REDIRECT = "REDIRECT"


def _port(fields: Any, key: str) -> int:
    if key not in fields:
        raise ValueError(f"node metadata lacks {key}")
    value = fields[key]
    number = value.number_value if value.HasField("number_value") else None
    text = value.string_value if value.HasField("string_value") else ""
    if number is None and 0 < len(text) <= 5 and text.isascii() and text.isdigit():
        number = int(text)
    if number is None or not math.isfinite(number) or number != int(number):
        raise ValueError(f"node metadata {key} is not a port number")
    if not 1 <= number <= 65535:
        raise ValueError(f"node metadata {key} is not a port number")
    return int(number)


# What each name in the metadata must be, as Kubernetes requires of it: the
# names go into resource names, keys and logs.
_NAMES = {
    NAMESPACE: spiffe.is_dns_label,
    SERVICE: spiffe.is_dns_label,
    SERVICE_ACCOUNT: spiffe.is_dns_subdomain,
    POD_NAME: spiffe.is_dns_subdomain,
}
_MAX_TEXT = 253


def _text(fields: Any, key: str, default: str | None = None) -> str:
    if key not in fields or not fields[key].string_value:
        if default is None:
            raise ValueError(f"node metadata lacks {key}")
        return default
    value = str(fields[key].string_value)
    check = _NAMES.get(key)
    if (check is not None and not check(value)) or len(value) > _MAX_TEXT:
        raise ValueError(f"node metadata {key} {terminal.printable(value, 80)!r} is not a name")
    return value


def _optional_port(fields: Any, key: str, default: int) -> int:
    return _port(fields, key) if key in fields else default


def captured(node: Any) -> proxy.CapturedSidecar:
    """Parse a captured sidecar's metadata; ValueError names the bad key."""
    fields = node.metadata.fields
    mode = _text(fields, INTERCEPTION_MODE)
    if mode != REDIRECT:
        raise ValueError(f"node metadata {INTERCEPTION_MODE} {mode!r} is not supported")
    ip = _ip(fields, POD_IP)
    return proxy.CapturedSidecar(
        namespace=_text(fields, NAMESPACE),
        pod=_text(fields, POD_NAME),
        pod_uid=_text(fields, POD_UID),
        service_account=_text(fields, SERVICE_ACCOUNT, "default"),
        ip=ip,
        outbound_port=_optional_port(fields, OUTBOUND_PORT, proxy.CAPTURE_OUTBOUND_PORT),
        inbound_port=_optional_port(fields, INBOUND_PORT, proxy.CAPTURE_INBOUND_PORT),
    )


def sidecar(node: Any) -> proxy.Sidecar:
    """Parse node metadata; ValueError names the missing or bad key."""
    fields = node.metadata.fields
    return proxy.Sidecar(
        namespace=_text(fields, NAMESPACE),
        service=_text(fields, SERVICE),
        service_account=_text(fields, SERVICE_ACCOUNT, "default"),
        app_port=_port(fields, APP_PORT),
        inbound_port=_port(fields, INBOUND_PORT),
        outbound_port=_port(fields, OUTBOUND_PORT),
        inbound_address=_ip(fields, INBOUND_ADDRESS, "127.0.0.1"),
    )


def _ip(fields: Any, key: str, default: str | None = None) -> str:
    value = _text(fields, key, default)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(
            f"node metadata {key} {terminal.printable(value, 80)!r} is not an IP address"
        ) from None
    return value


def parse(node: Any, identity: str | None = None) -> proxy.Proxy:
    """A sidecar or a proxyless gRPC client; ValueError names what is wrong.

    With a certificate identity, the namespace and service account are the
    certificate's: a proxy cannot claim another workload's identity in its
    metadata. A claim that differs is refused outright."""
    found = _parse(node)
    if identity is None:
        return found
    _, namespace, account = spiffe.parse(identity)
    claimed = getattr(found, "service_account", account)
    if found.namespace != namespace or claimed != account:
        raise PermissionError(
            f"node metadata claims namespace {found.namespace!r} and service account "
            f"{claimed!r}, but its certificate is {identity}"
        )
    return found


def _parse(node: Any) -> proxy.Proxy:
    fields = node.metadata.fields
    if PROXYLESS in fields and (
        fields[PROXYLESS].bool_value or fields[PROXYLESS].string_value == "true"
    ):
        return proxy.Proxyless(
            namespace=_text(fields, NAMESPACE), service=_text(fields, SERVICE, "")
        )
    if INTERCEPTION_MODE in fields:
        return captured(node)
    return sidecar(node)


def key(s: proxy.Proxy) -> str:
    """Proxies with equal keys get identical configuration."""
    if isinstance(s, proxy.Proxyless):
        return f"proxyless/{s.namespace}/{s.service}"
    if isinstance(s, proxy.CapturedSidecar):
        # The uid, not the name: a Pod recreated under the same name is
        # another workload, possibly with other ports.
        return (
            f"pod/{s.namespace}/{s.pod}/{s.pod_uid}/{s.service_account}"
            f"/{s.ip}/in:{s.inbound_port}/out:{s.outbound_port}"
        )
    return (
        f"{s.namespace}/{s.service}/{s.service_account}"
        f"/{s.inbound_address}:{s.inbound_port}>{s.app_port}/out:{s.outbound_port}"
    )
