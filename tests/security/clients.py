"""Attackers' tools: client certificates of the mesh root with whatever
names an attacker would like, and channels that present them."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal import cli
from shoal.sds import ca


def certificate(
    signer: ca.KeyPair,
    *,
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    ttl: datetime.timedelta = datetime.timedelta(hours=1),
) -> ca.KeyPair:
    """A client certificate signed by `signer` (the real mesh root, as if
    its key had signed something odd), with exactly these SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    signing_key = serialization.load_pem_private_key(signer.key_pem, password=None)
    assert isinstance(signing_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "attacker")]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    return ca.KeyPair(cert.public_bytes(serialization.Encoding.PEM), ca.key_pem(key))


def channel(cp: cli.ControlPlane, pair: ca.KeyPair, port: int | None = None) -> grpc.aio.Channel:
    """A TLS channel to the control plane presenting `pair`."""
    assert cp.authority is not None
    creds = grpc.ssl_channel_credentials(
        root_certificates=cp.authority.xds_trust,
        private_key=pair.key_pem,
        certificate_chain=pair.cert_pem,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port or cp.xds_port}", creds)


def workload(cp: cli.ControlPlane, namespace: str, account: str) -> ca.KeyPair:
    """A certificate the CA itself issues for an identity."""
    assert cp.authority is not None
    return cp.authority.workload(namespace, account)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
