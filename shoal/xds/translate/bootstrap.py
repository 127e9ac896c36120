"""The Envoy bootstrap of a sidecar (local mode, or a captured Kubernetes Pod):
who it is and where xDS is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.model import proxy
from shoal.xds import node

XDS_CLUSTER = "shoal-xds"
# The embedded trace collector's port (`shoal serve --collector-address`).
COLLECTOR_PORT = 15018
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


@dataclass(frozen=True)
class XdsTls:
    """Files the sidecar proves itself with, and trusts the control plane by."""

    cert_file: str
    key_file: str
    ca_file: str


@dataclass(frozen=True)
class XdsSds:
    """The same, read through file-based SDS: each file holds one Secret
    (see `client_secret` and `trust_secret`), and Envoy reads it again
    whenever a file is moved into `watched_dir`. A renewal writes the new
    file beside it and renames it into place: the running Envoy picks it
    up for its next connection to the control plane, without a restart."""

    cert_path: str
    trust_path: str
    watched_dir: str


XDS_CLIENT_SECRET = "shoal-xds-client"
XDS_TRUST_SECRET = "shoal-xds-trust"
_SECRET = "envoy.extensions.transport_sockets.tls.v3.Secret"


def _file_sds(name: str, path: str, watched_dir: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {"path": path, "watched_directory": {"path": watched_dir}},
            "resource_api_version": "V3",
        },
    }


def client_secret(cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    """The file `XdsSds.cert_path` holds: certificate and key in one Secret,
    so that Envoy never pairs a new certificate with an old key."""
    return {
        "resources": [
            {
                "@type": f"type.googleapis.com/{_SECRET}",
                "name": XDS_CLIENT_SECRET,
                "tls_certificate": {
                    "certificate_chain": {"inline_string": cert_pem.decode()},
                    "private_key": {"inline_string": key_pem.decode()},
                },
            }
        ]
    }


def trust_secret(trust_pem: bytes) -> dict[str, Any]:
    """The file `XdsSds.trust_path` holds: the roots the control plane is
    verified by (they change with a root rotation)."""
    return {
        "resources": [
            {
                "@type": f"type.googleapis.com/{_SECRET}",
                "name": XDS_TRUST_SECRET,
                "validation_context": {"trusted_ca": {"inline_string": trust_pem.decode()}},
            }
        ]
    }


def _xds_transport_socket(tls: XdsTls | XdsSds, host: str, is_ip: bool) -> dict[str, Any]:
    # The control plane must be the one it was told to reach.
    sans = [{"san_type": "IP_ADDRESS" if is_ip else "DNS", "matcher": {"exact": host}}]
    common: dict[str, Any]
    if isinstance(tls, XdsSds):
        common = {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [
                _file_sds(XDS_CLIENT_SECRET, tls.cert_path, tls.watched_dir)
            ],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": sans},
                "validation_context_sds_secret_config": _file_sds(
                    XDS_TRUST_SECRET, tls.trust_path, tls.watched_dir
                ),
            },
        }
    else:
        common = {
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": tls.cert_file},
                    "private_key": {"filename": tls.key_file},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": tls.ca_file},
                "match_typed_subject_alt_names": sans,
            },
        }
    context: dict[str, Any] = {
        "@type": f"type.googleapis.com/{_UPSTREAM_TLS}",
        "common_tls_context": common,
    }
    if not is_ip:
        context["sni"] = host
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _is_ip(host: str) -> bool:
    return all(part.isdigit() for part in host.split(".")) or ":" in host


def _xds_cluster(xds_host: str, xds_port: int, tls: XdsTls | XdsSds | None) -> dict[str, Any]:
    is_ip = _is_ip(xds_host)
    xds_cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(xds_host, xds_port)}}]}
            ],
        },
    }
    if tls is not None:
        xds_cluster["transport_socket"] = _xds_transport_socket(tls, xds_host, is_ip)
    if isinstance(tls, XdsSds):
        # A renewed certificate is presented only by a new connection, and
        # gRPC would open the next ADS stream on the connection it has (the
        # control plane ends a stream whose certificate expired, not the
        # connection): one stream per connection makes every reconnect a
        # new handshake, with the certificate in force.
        options = xds_cluster["typed_extension_protocol_options"][_HTTP_OPTIONS]
        options["common_http_protocol_options"] = {"max_requests_per_connection": 1}
    return xds_cluster


COLLECTOR_CLUSTER = "shoal-collector"


def _collector_cluster(collector: tuple[str, int], tls: XdsTls | XdsSds | None) -> dict[str, Any]:
    """The control plane's embedded trace collector (Zipkin v2 over HTTPS),
    which spans reach through the xDS-served tracing configuration. It
    takes the same client certificate as xDS, which only the bootstrap
    holds: so the cluster is here, not in CDS."""
    host, port = collector
    is_ip = _is_ip(host)
    cluster: dict[str, Any] = {
        "name": COLLECTOR_CLUSTER,
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": COLLECTOR_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
        },
    }
    if tls is not None:
        socket = _xds_transport_socket(tls, host, is_ip)
        # The collector speaks HTTP/1.1 (a plain aiohttp server).
        socket["typed_config"]["common_tls_context"]["alpn_protocols"] = ["http/1.1"]
        cluster["transport_socket"] = socket
    return cluster


def _dynamic_resources(delta: bool) -> dict[str, Any]:
    return {
        "ads_config": {
            "api_type": "DELTA_GRPC" if delta else "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
        },
        "cds_config": {"ads": {}, "resource_api_version": "V3"},
        "lds_config": {"ads": {}, "resource_api_version": "V3"},
    }


def sidecar(
    s: proxy.Sidecar,
    *,
    node_id: str,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    delta: bool = False,
    tls: XdsTls | None = None,
    collector: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """A bootstrap as plain data, ready for YAML or JSON. `collector`: where
    the embedded trace collector listens (default: the xDS host, port
    COLLECTOR_PORT)."""
    return {
        "node": {
            "id": node_id,
            "cluster": f"{s.service}.{s.namespace}",
            "metadata": {
                node.NAMESPACE: s.namespace,
                node.SERVICE: s.service,
                node.SERVICE_ACCOUNT: s.service_account,
                node.APP_PORT: s.app_port,
                node.INBOUND_PORT: s.inbound_port,
                node.OUTBOUND_PORT: s.outbound_port,
                node.INBOUND_ADDRESS: s.inbound_address,
                node.ADMIN_PORT: admin_port,
            },
        },
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "dynamic_resources": _dynamic_resources(delta),
        "static_resources": {
            "clusters": [
                _xds_cluster(xds_host, xds_port, tls),
                _collector_cluster(collector or (xds_host, COLLECTOR_PORT), tls),
            ]
        },
    }


# A captured Pod's own ports (DESIGN.md); iptables must not redirect the
# inbound ones, or the kubelet's probes and Prometheus would need mTLS.
ADMIN_PORT = 15000
STATS_PORT = 15090
HEALTH_PORT = 15021
ADMIN_CLUSTER = "shoal-admin"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"


def _admin_door(name: str, port: int, prefix: str, rewrite: str | None) -> dict[str, Any]:
    """A listener on the Pod IP that exposes one admin path and nothing else:
    the admin itself stays on 127.0.0.1, since it can change the proxy."""
    route: dict[str, Any] = {"cluster": ADMIN_CLUSTER}
    if rewrite is not None:
        route["prefix_rewrite"] = rewrite
    manager = {
        "@type": f"type.googleapis.com/{_HCM}",
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": prefix}, "route": route}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"type.googleapis.com/{_ROUTER}"},
            }
        ],
    }
    return {
        "name": name,
        "address": _address("0.0.0.0", port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def captured_sidecar(
    s: proxy.CapturedSidecar,
    *,
    node_id: str,
    xds_host: str,
    xds_port: int,
    workload: str = "",
    delta: bool = False,
    tls: XdsTls | XdsSds | None = None,
    admin_port: int = ADMIN_PORT,
    stats_port: int = STATS_PORT,
    health_port: int | None = HEALTH_PORT,
    collector: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The bootstrap of a Kubernetes sidecar whose Pod's traffic is captured.

    `workload` (the Pod's `app` label, say) names it in traces and stats;
    without one, its namespace does. Readiness on `health_port`
    (`/healthz/ready`) is Envoy's own: ready once its first configuration
    from the control plane is in place. With `health_port` None, Envoy
    serves no health port: the sidecar agent (shoal/agent) serves it, with
    the Pod's rewritten probes beside readiness."""
    admin = _address("127.0.0.1", admin_port)
    admin_cluster = {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": admin}}]}],
        },
    }
    return {
        "node": {
            "id": node_id,
            "cluster": f"{workload}.{s.namespace}" if workload else s.namespace,
            "metadata": {
                node.INTERCEPTION_MODE: node.REDIRECT,
                node.NAMESPACE: s.namespace,
                node.POD_NAME: s.pod,
                node.POD_UID: s.pod_uid,
                node.POD_IP: s.ip,
                node.SERVICE_ACCOUNT: s.service_account,
                node.INBOUND_PORT: s.inbound_port,
                node.OUTBOUND_PORT: s.outbound_port,
            },
        },
        "admin": {"address": admin},
        "dynamic_resources": _dynamic_resources(delta),
        "static_resources": {
            "clusters": [
                _xds_cluster(xds_host, xds_port, tls),
                admin_cluster,
                _collector_cluster(collector or (xds_host, COLLECTOR_PORT), tls),
            ],
            "listeners": [
                _admin_door("shoal-stats", stats_port, "/stats/prometheus", None),
                *(
                    [_admin_door("shoal-health", health_port, "/healthz/ready", "/ready")]
                    if health_port is not None
                    else []
                ),
            ],
        },
    }


def grpc_client(
    namespace: str, service: str, *, node_id: str, xds_host: str, xds_port: int
) -> dict[str, Any]:
    """A GRPC_XDS_BOOTSTRAP file for a proxyless gRPC application."""
    return {
        "xds_servers": [
            {
                "server_uri": f"{xds_host}:{xds_port}",
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {
            "id": node_id,
            "cluster": f"{service}.{namespace}" if service else namespace,
            "metadata": {
                node.PROXYLESS: True,
                node.NAMESPACE: namespace,
                node.SERVICE: service,
            },
            "locality": {},
        },
    }


def pod_overlay(*, node_id: str, pod: str, pod_uid: str, ip: str) -> dict[str, Any]:
    """What only the running Pod knows, for Envoy's `--config-yaml`.

    An admission webhook sees a Pod before it has a uid or an IP (often
    before its name): the injector can write `captured_sidecar` with
    placeholders and pass this with `$(POD_NAME)`-style values, which
    Kubernetes expands from downward-API environment variables. Envoy
    merges it over the bootstrap file, metadata key by key."""
    return {
        "node": {
            "id": node_id,
            "metadata": {node.POD_NAME: pod, node.POD_UID: pod_uid, node.POD_IP: ip},
        }
    }
