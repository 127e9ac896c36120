"""Transport sockets for mutual TLS between sidecars, fed by SDS."""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from shoal.xds.translate import common, secrets

TLS = "envoy.transport_sockets.tls"
# Both ends are Envoys of this mesh: no reason to speak anything older.
_PARAMS = common_pb2.TlsParameters(
    tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
    tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
)


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=common.ads())


def _common(
    validation: tls_pb2.CommonTlsContext.CombinedCertificateValidationContext | None = None,
) -> tls_pb2.CommonTlsContext:
    ctx = tls_pb2.CommonTlsContext(
        tls_params=_PARAMS,
        tls_certificate_sds_secret_configs=[_sds(secrets.WORKLOAD)],
    )
    if validation is None:
        ctx.validation_context_sds_secret_config.CopyFrom(_sds(secrets.TRUST_BUNDLE))
    else:
        ctx.combined_validation_context.CopyFrom(validation)
    return ctx


def downstream() -> base_pb2.TransportSocket:
    """Inbound: present the workload certificate, require one from the mesh CA."""
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=_common(),
        require_client_certificate=common.bool_value(True),
    )
    return base_pb2.TransportSocket(name=TLS, typed_config=common.typed(context))


def upstream(sni: str, spiffe_ids: Iterable[str]) -> base_pb2.TransportSocket:
    """Outbound: the server must be one of the identities behind the Service."""
    validation = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
        default_validation_context=common_pb2.CertificateValidationContext(
            match_typed_subject_alt_names=[
                common_pb2.SubjectAltNameMatcher(
                    san_type=common_pb2.SubjectAltNameMatcher.URI,
                    matcher=string_pb2.StringMatcher(exact=spiffe_id),
                )
                for spiffe_id in sorted(spiffe_ids)
            ]
        ),
        validation_context_sds_secret_config=_sds(secrets.TRUST_BUNDLE),
    )
    context = tls_pb2.UpstreamTlsContext(common_tls_context=_common(validation), sni=sni)
    return base_pb2.TransportSocket(name=TLS, typed_config=common.typed(context))
