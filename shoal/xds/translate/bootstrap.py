"""The Envoy bootstrap of a local-mode sidecar: who it is and where xDS is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.model import proxy
from shoal.xds import node

XDS_CLUSTER = "shoal-xds"
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


def _xds_transport_socket(tls: XdsTls, host: str, is_ip: bool) -> dict[str, Any]:
    context: dict[str, Any] = {
        "@type": f"type.googleapis.com/{_UPSTREAM_TLS}",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": tls.cert_file},
                    "private_key": {"filename": tls.key_file},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": tls.ca_file},
                # The control plane must be the one it was told to reach.
                "match_typed_subject_alt_names": [
                    {"san_type": "IP_ADDRESS" if is_ip else "DNS", "matcher": {"exact": host}}
                ],
            },
        },
    }
    if not is_ip:
        context["sni"] = host
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def sidecar(
    s: proxy.Sidecar,
    *,
    node_id: str,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    delta: bool = False,
    tls: XdsTls | None = None,
) -> dict[str, Any]:
    """A bootstrap as plain data, ready for YAML or JSON."""
    is_ip = all(part.isdigit() for part in xds_host.split(".")) or ":" in xds_host
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
            },
        },
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [xds_cluster]},
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
