"""The control plane's own TLS, on xDS, on the join port and on the injection
webhook."""

from __future__ import annotations

import socket
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

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


def _ssl_context(serving: ca.KeyPair) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads only files: the key is on disk, in a folder only
    # this user may open, for as long as the call takes.
    with tempfile.TemporaryDirectory(prefix="shoal-tls-") as folder:
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_bytes(serving.cert_pem)
        ca.write_private(key, serving.key_pem)
        context.load_cert_chain(cert, key)
    return context


def serving_ssl_context(
    certificates: workloads.WorkloadCertificates, hosts: Sequence[str]
) -> ssl.SSLContext:
    """An HTTPS server's TLS (no client certificate) that follows the
    authority in force as serving_credentials does: every handshake checks
    whether the authority changed and, if it did, is served the new
    certificate."""
    current = [certificates.authority]
    contexts = [_ssl_context(current[0].serving(hosts))]

    def choose(connection: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        authority = certificates.authority
        if authority is not current[0]:
            current[0] = authority
            contexts[0] = _ssl_context(authority.serving(hosts))
            contexts[0].sni_callback = choose
        connection.context = contexts[0]

    contexts[0].sni_callback = choose
    return contexts[0]


def _mutual_ssl_context(serving: ca.KeyPair, trust_pem: bytes) -> ssl.SSLContext:
    context = _ssl_context(serving)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=trust_pem.decode())
    return context


def mutual_ssl_context(
    certificates: workloads.WorkloadCertificates, hosts: Sequence[str]
) -> ssl.SSLContext:
    """An HTTPS server's TLS that, like xDS, takes only callers with a
    client certificate of the mesh CA (the roots trusted now, rotation
    included); it follows the authority in force as serving_ssl_context
    does."""
    current = [(certificates.authority, certificates.authority.xds_trust)]

    def build() -> ssl.SSLContext:
        authority, trust = current[0]
        made = _mutual_ssl_context(authority.serving(hosts), trust)
        made.sni_callback = choose
        return made

    def choose(connection: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        now = (certificates.authority, certificates.authority.xds_trust)
        if now != current[0]:
            current[0] = now
            contexts[0] = build()
        connection.context = contexts[0]

    contexts = [build()]
    return contexts[0]
