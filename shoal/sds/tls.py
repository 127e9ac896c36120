"""The control plane's own TLS, on xDS and on the join port."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

import grpc

from shoal.sds import ca, workloads


def serving_hosts(host: str, extra: Iterable[str] = ()) -> list[str]:
    """The names a client may reach a port on `host` by, for its certificate."""
    hosts = {host, "localhost", "127.0.0.1", socket.gethostname(), *extra}
    hosts.discard("0.0.0.0")
    return sorted(hosts)


def serving_credentials(
    certificates: workloads.WorkloadCertificates, hosts: Sequence[str], *, client_auth: bool
) -> grpc.ServerCredentials:
    """The control plane's TLS, following the authority in force without a
    restart: a new serving certificate (and trusted roots for client
    certificates) after each step of a root rotation, checked at every new
    connection's handshake. With `client_auth`, a client certificate from the
    mesh CA is required (xDS)."""

    def configuration(authority: ca.Authority) -> grpc.ServerCertificateConfiguration:
        serving = authority.serving(hosts)
        return grpc.ssl_server_certificate_configuration(
            [(serving.key_pem, serving.cert_pem)],
            root_certificates=authority.xds_trust if client_auth else None,
        )

    # (authority, the xDS trust as configured): the trust also changes alone,
    # when a retired root's window ends.
    current = [(certificates.authority, certificates.authority.xds_trust)]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        authority = certificates.authority
        trust = authority.xds_trust
        if (authority, trust) == current[0]:
            return None
        current[0] = (authority, trust)
        return configuration(authority)

    return grpc.dynamic_ssl_server_credentials(
        configuration(current[0][0]),
        fetch,  # type: ignore[arg-type]  # gRPC documents None as "no change"
        require_client_authentication=client_auth,
    )
