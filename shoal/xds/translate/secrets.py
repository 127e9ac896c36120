"""SDS secrets: a workload's certificate and key, and the trust bundle."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

# Istio's names, which Envoy operators already recognise in config dumps.
WORKLOAD = "default"
TRUST_BUNDLE = "ROOTCA"


def workload(cert_chain_pem: bytes, key_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=WORKLOAD,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=cert_chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=key_pem),
        ),
    )


def trust_bundle(roots_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=TRUST_BUNDLE,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=roots_pem)
        ),
    )
