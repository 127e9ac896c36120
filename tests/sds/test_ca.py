"""The CA: what it issues, what it refuses, and how it keeps its keys."""

from __future__ import annotations

import datetime
import random
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.sds import ca, workloads

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


def test_root_is_created_once_with_private_files(tmp_path: Path) -> None:
    root, created = ca.load_or_create(tmp_path, "cluster.local")
    assert created
    again, created_again = ca.load_or_create(tmp_path, "cluster.local")
    assert not created_again and again.cert_pem == root.cert_pem
    key_file = tmp_path / "ca" / ca.ROOT_KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    cert = root.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3649)


def test_workload_certificate_is_a_spiffe_svid_chaining_to_the_root() -> None:
    authority = ca.Authority(ca.new_root("example.org"), trust_domain="example.org")
    pair = authority.workload("shop", "cart", ttl=datetime.timedelta(hours=1))
    cert = pair.cert
    assert ca.spiffe_ids(cert) == ["spiffe://example.org/ns/shop/sa/cart"]
    cert.verify_directly_issued_by(authority.signer.cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(
        hours=1, minutes=6
    )
    # The private key is not in any repr that could reach a log.
    assert b"PRIVATE" in pair.key_pem
    assert "PRIVATE" not in repr(pair) and "PRIVATE" not in repr(authority)


def _intermediate(root: ca.KeyPair) -> ca.KeyPair:
    root_key = serialization.load_pem_private_key(root.key_pem, None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ca.new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return ca.KeyPair(
        cert.public_bytes(serialization.Encoding.PEM), ca.key_pem(key), chain_pem=root.cert_pem
    )


def test_a_plugged_in_intermediate_signs_and_its_chain_travels(tmp_path: Path) -> None:
    root = ca.new_root("cluster.local")
    inter = _intermediate(root)
    (tmp_path / "c.pem").write_bytes(inter.cert_pem)
    (tmp_path / "k.pem").write_bytes(inter.key_pem)
    (tmp_path / "chain.pem").write_bytes(root.cert_pem)
    signer = ca.load_plugin(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "chain.pem")
    authority = ca.Authority(signer)
    pair = authority.workload("default", "web")
    leaf, *chain = x509.load_pem_x509_certificates(pair.cert_pem)
    assert [c.subject for c in chain] == [inter.cert.subject]
    leaf.verify_directly_issued_by(inter.cert)
    assert authority.trust_bundle == root.cert_pem

    (tmp_path / "leaf.pem").write_bytes(
        pair.cert_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    )
    with pytest.raises(ca.CAError, match="not a CA certificate"):
        ca.load_plugin(tmp_path / "leaf.pem", tmp_path / "k.pem")


def _csr(uri: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_csr_signing_refuses_garbage_other_identities_and_other_keys() -> None:
    authority = ca.Authority(ca.new_root("cluster.local"))
    me = "spiffe://cluster.local/ns/vm/sa/billing"
    key = ca.new_key()
    cert = x509.load_pem_x509_certificate(authority.sign_csr(_csr(me, key), expect_uri=me))
    assert ca.spiffe_ids(cert) == [me]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    with pytest.raises(ca.CAError, match="not a PEM certificate signing request"):
        authority.sign_csr(b"hello", expect_uri=me)
    with pytest.raises(ca.CAError, match="asks for"):
        authority.sign_csr(
            _csr("spiffe://cluster.local/ns/kube-system/sa/admin", key), expect_uri=me
        )
    with pytest.raises(ca.CAError, match="P-256"):
        authority.sign_csr(_csr(me, rsa.generate_private_key(65537, 2048)), expect_uri=me)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime.datetime:
        return self.now


def test_workload_certificates_renew_between_40_and_50_percent_of_their_life() -> None:
    clock = Clock()
    authority = ca.Authority(ca.new_root("cluster.local", clock=clock), clock=clock)
    changed: list[set[tuple[str, str]]] = []
    certs = workloads.WorkloadCertificates(
        authority,
        ttl=datetime.timedelta(hours=10),
        clock=clock,
        rng=random.Random(7),
        on_change=changed.append,
    )
    first = certs.get("shop", "cart")
    (issued,) = certs.issued()
    fraction = (issued.renew_at - NOW) / datetime.timedelta(hours=10)
    assert 0.4 <= fraction <= 0.5
    clock.now = issued.renew_at - datetime.timedelta(seconds=1)
    assert certs.renew_due() == set() and certs.get("shop", "cart") is first
    clock.now = issued.renew_at
    assert certs.renew_due() == {("shop", "cart")}
    assert certs.get("shop", "cart").cert.serial_number != first.cert.serial_number
    assert changed == [{("shop", "cart")}]
    # A fleet issued together spreads its renewals.
    for i in range(50):
        certs.get("shop", f"sa-{i}")
    spread = {i.renew_at for i in certs.issued()}
    assert len(spread) > 40
