"""A certificate authority for SPIFFE identities (ECDSA P-256, `cryptography`).

The root is created on first start and kept in the state directory (keys
0600), or supplied by the operator (a root, or an intermediate with its
chain). Private keys never leave this module in logs or reprs.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal import spiffe

ROOT_TTL = datetime.timedelta(days=3650)
WORKLOAD_TTL = datetime.timedelta(hours=24)
# A proxy's xDS client certificate (from `shoal bootstrap` or a join): what
# proves it to the control plane, for this long. A root retired by a
# rotation stays trusted for these certificates exactly as long as one
# issued under it may still be valid.
BOOTSTRAP_TTL = datetime.timedelta(days=90)
# A Pod's sidecar agent's xDS client certificate: it proves itself again
# with its service-account token (which lives an hour) and renews at about
# half of this, so a Pod deleted or a token revoked stops being trusted
# within a day, not a quarter.
AGENT_TTL = datetime.timedelta(hours=24)
# Certificates start slightly in the past: clocks of peers differ.
BACKDATE = datetime.timedelta(minutes=5)

Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CAError(ValueError):
    """A request the CA refuses, and why."""


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    chain_pem: bytes = b""  # intermediates up to (not including) the root

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    @property
    def not_before(self) -> datetime.datetime:
        return self.cert.not_valid_before_utc


@dataclass(frozen=True)
class RetiredRoot:
    """A root a rotation replaced. Its key is gone; what is left is its
    certificate, trusted for the xDS client certificates issued under it
    until `until`, and the root that replaced it certified by it (its key's
    last signature), so sidecars that trust only the old root can still
    verify the control plane."""

    cert_pem: bytes
    cross_pem: bytes

    @functools.cached_property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @functools.cached_property
    def until(self) -> datetime.datetime:
        return x509.load_pem_x509_certificate(self.cross_pem).not_valid_after_utc


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(spiffe.SCHEME)
    ]


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


class Authority:
    """Signs certificates with one signing key; trusts a bundle of roots."""

    def __init__(
        self,
        signer: KeyPair,
        *,
        trust_domain: str = "cluster.local",
        extra_roots: Sequence[bytes] = (),
        clock: Clock = utcnow,
    ) -> None:
        self.signer = signer
        self.trust_domain = trust_domain
        key = serialization.load_pem_private_key(signer.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError("the CA key must be an EC key")
        self._key: ec.EllipticCurvePrivateKey = key
        self._cert = signer.cert
        self._extra_roots = tuple(extra_roots)
        self._clock = clock
        # Roots no longer used in the mesh but still trusted on the xDS
        # channel, where sidecars bootstrapped under them still connect.
        self.retired: tuple[RetiredRoot, ...] = ()

    def __repr__(self) -> str:
        return f"Authority({self._cert.subject.rfc4514_string()}, trust domain {self.trust_domain})"

    @property
    def root_pem(self) -> bytes:
        """The root this authority chains to (its own cert if self-signed)."""
        if self.signer.chain_pem:
            return x509.load_pem_x509_certificates(self.signer.chain_pem)[-1].public_bytes(
                serialization.Encoding.PEM
            )
        return self.signer.cert_pem

    @property
    def trust_bundle(self) -> bytes:
        """Every root a peer may chain to: during a root rotation, old and new."""
        roots = [self.root_pem, *self._extra_roots]
        return b"".join(dict.fromkeys(roots))

    def trusted_retired(self) -> tuple[RetiredRoot, ...]:
        """Retired roots still within their window, oldest first."""
        now = self._clock()
        return tuple(r for r in self.retired if r.until > now)

    def signed_client(self, cert_pem: bytes) -> bool:
        """Whether a client certificate is valid now and was issued by a key
        this authority trusts for the xDS channel now (its signer, a root of
        the bundle, a retired root in its window). TLS checked that when the
        connection was made; a stream on a connection made before a
        compromise, or before the certificate expired, must not ride on it."""
        not_before, not_after = _validity(cert_pem)
        now = self._clock()
        if not not_before <= now <= not_after:
            return False
        return _issued_by(cert_pem, self._xds_issuers())

    def _xds_issuers(self) -> tuple[bytes, ...]:
        return (self.signer.cert_pem, self.xds_trust)

    @property
    def xds_trust(self) -> bytes:
        """Roots the xDS channel accepts and that a sidecar's bootstrap trusts."""
        retired = [r.cert_pem for r in self.trusted_retired()]
        return b"".join(dict.fromkeys([*retired, self.trust_bundle]))

    def _chain(self) -> bytes:
        """Issued certificates carry the signer and its intermediates."""
        if self.signer.chain_pem:
            intermediates = x509.load_pem_x509_certificates(self.signer.chain_pem)[:-1]
            return self.signer.cert_pem + b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in intermediates
            )
        return b""

    def spiffe_id(self, namespace: str, service_account: str) -> str:
        return spiffe.workload_id(self.trust_domain, namespace, service_account)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        uri: str | None = None,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        ttl: datetime.timedelta = WORKLOAD_TTL,
        server: bool = True,
        client: bool = True,
    ) -> bytes:
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise CAError("only ECDSA P-256 keys are signed")
        now = self._clock()
        not_after = min(now + ttl, self._cert.not_valid_after_utc)
        names: list[x509.GeneralName] = []
        if uri is not None:
            names.append(x509.UniformResourceIdentifier(uri))
        names += [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if not names:
            raise CAError("a certificate needs a SPIFFE ID or a host name")
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            # SPIFFE X.509-SVIDs identify by URI SAN; the subject stays empty
            # of meaning but is kept for tools that print it.
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal")]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=uri is not None)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(ca=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        cert = builder.sign(self._key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM) + self._chain()

    def workload(
        self, namespace: str, service_account: str, ttl: datetime.timedelta = WORKLOAD_TTL
    ) -> KeyPair:
        """A fresh key and its certificate for one SPIFFE identity."""
        key = new_key()
        cert = self.issue(key.public_key(), uri=self.spiffe_id(namespace, service_account), ttl=ttl)
        return KeyPair(cert, key_pem(key))

    def serving(self, hosts: Sequence[str], ttl: datetime.timedelta = ROOT_TTL / 10) -> KeyPair:
        """The control plane's own TLS certificate. Its chain climbs through
        the cross-certificates of the retired roots still trusted (newest
        first), so a sidecar bootstrapped under any of them verifies it."""
        dns = [h for h in hosts if not _is_ip(h)]
        ips = [h for h in hosts if _is_ip(h)]
        key = new_key()
        cert = self.issue(key.public_key(), dns=dns, ips=ips, ttl=ttl, client=False)
        crosses = b"".join(r.cross_pem for r in reversed(self.trusted_retired()))
        return KeyPair(cert + crosses, key_pem(key))

    def retire(self, new_root: KeyPair, *, keep: datetime.timedelta = BOOTSTRAP_TTL) -> RetiredRoot:
        """This authority's root, retired in favour of `new_root`: the new
        root certified by this one, for as long as certificates issued
        under this one may live (`keep`) and never past its own expiry."""
        if self.signer.chain_pem:
            raise CAError("a plug-in intermediate is not rotated by shoal")
        new = new_root.cert
        now = self._clock()
        until = min(now + keep, self._cert.not_valid_after_utc)
        cross = (
            x509.CertificateBuilder()
            .subject_name(new.subject)
            .issuer_name(self._cert.subject)
            .public_key(new.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(new.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return RetiredRoot(self.signer.cert_pem, cross.public_bytes(serialization.Encoding.PEM))

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        expect_uri: str,
        ttl: datetime.timedelta = WORKLOAD_TTL,
        server: bool = True,
    ) -> bytes:
        """Sign a CSR whose key stays with its maker, for exactly one identity."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as err:
            raise CAError("not a PEM certificate signing request") from err
        if not csr.is_signature_valid:
            raise CAError("the CSR's signature does not verify")
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [expect_uri]:
            raise CAError(f"the CSR asks for {uris or 'no identity'}, not {expect_uri}")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CAError("only ECDSA P-256 keys are signed")
        return self.issue(public_key, uri=expect_uri, ttl=ttl, server=server)


@functools.lru_cache(maxsize=4096)
def _validity(cert_pem: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_before_utc, cert.not_valid_after_utc


@functools.lru_cache(maxsize=4096)
def _issued_by(cert_pem: bytes, issuers: tuple[bytes, ...]) -> bool:
    leaf = x509.load_pem_x509_certificate(cert_pem)
    for pem in issuers:
        for issuer in x509.load_pem_x509_certificates(pem):
            try:
                leaf.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
    return False


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing for all; ECDH for workloads; certificate signing for CAs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def new_root(
    trust_domain: str, *, clock: Clock = utcnow, ttl: datetime.timedelta = ROOT_TTL
) -> KeyPair:
    """A self-signed root for the trust domain."""
    key = new_key()
    now = clock()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"shoal root {trust_domain} {now:%Y%m%d%H%M%S}"
            ),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))


ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"


def load_or_create(
    state_dir: Path, trust_domain: str, *, clock: Clock = utcnow
) -> tuple[KeyPair, bool]:
    """The root in `state_dir/ca/`, created on first start. True if created."""
    folder = state_dir / "ca"
    cert_path, key_path = folder / ROOT_CERT, folder / ROOT_KEY
    if cert_path.exists() and key_path.exists():
        return KeyPair(cert_path.read_bytes(), key_path.read_bytes()), False
    root = new_root(trust_domain, clock=clock)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    write_private(key_path, root.key_pem)
    cert_path.write_bytes(root.cert_pem)
    return root, True


RETIRED = "retired"


def load_retired(
    state_dir: Path, current: KeyPair | None = None, *, clock: Clock = utcnow
) -> tuple[RetiredRoot, ...]:
    """Roots retired by rotations, oldest first, while still trusted.

    A retired root's key is not kept. One left on disk by an older shoal is
    used once, to certify `current` with it (that root's replacement may be
    several rotations on: the chain through it still verifies), and deleted.
    """
    folder = state_dir / "ca" / RETIRED
    out = []
    for cert_path in sorted(folder.glob("*-cert.pem")) if folder.is_dir() else []:
        serial = cert_path.name.removesuffix("-cert.pem")
        cross_path, key_path = folder / f"{serial}-cross.pem", folder / f"{serial}-key.pem"
        if key_path.exists():
            if current is not None and not cross_path.exists():
                old = KeyPair(cert_path.read_bytes(), key_path.read_bytes())
                since = datetime.datetime.fromtimestamp(cert_path.stat().st_mtime, datetime.UTC)
                window = max(BOOTSTRAP_TTL - (clock() - since), datetime.timedelta(0))
                retired = Authority(old, clock=clock).retire(current, keep=window)
                cross_path.write_bytes(retired.cross_pem)
            key_path.unlink()
        if not cross_path.exists():
            continue
        root = RetiredRoot(cert_path.read_bytes(), cross_path.read_bytes())
        if root.until > clock():
            out.append(root)
    return tuple(sorted(out, key=lambda r: r.until))


def save_retired(state_dir: Path, retired: RetiredRoot) -> None:
    folder = state_dir / "ca" / RETIRED
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    serial = f"{retired.cert.serial_number:x}"
    (folder / f"{serial}-cert.pem").write_bytes(retired.cert_pem)
    (folder / f"{serial}-cross.pem").write_bytes(retired.cross_pem)


def forget_retired(state_dir: Path) -> None:
    """After a compromise: no root of before is trusted any more."""
    folder = state_dir / "ca" / RETIRED
    for path in folder.glob("*.pem") if folder.is_dir() else []:
        path.unlink()


def load_plugin(cert: Path, key: Path, chain: Path | None = None) -> KeyPair:
    """An operator's CA: a root, or an intermediate with its chain to the root."""
    pair = KeyPair(cert.read_bytes(), key.read_bytes(), chain.read_bytes() if chain else b"")
    if not pair.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
        raise CAError(f"{cert} is not a CA certificate")
    return pair


def csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> bytes:
    """A certificate signing request for one SPIFFE ID."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)
