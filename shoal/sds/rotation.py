"""Rotating the root: old and new trusted side by side while workloads move.

1. A new root is created and added to the trust bundle; every proxy is sent
   the bundle with both roots.
2. Once every proxy holds it, workload certificates are re-issued by the new
   root; peers with either certificate trust each other meanwhile.
3. Once every proxy holds a new certificate, the old root leaves the trust
   bundle. It stays trusted on the xDS channel only (sidecars bootstrapped
   under it still connect) and keeps signing the control plane's own serving
   certificate, which those sidecars verify.

Each wait is bounded: a proxy that never catches up does not stall the
rotation forever; it is logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from shoal.sds import ca, workloads

log = logging.getLogger(__name__)

RETIRED = "retired"


@dataclass
class Progress:
    phase: str = "idle"  # idle, trusting-both, re-issuing, dropping-old, done
    new_root_serial: str = ""
    laggards: tuple[str, ...] = ()


# Per proxy: (the PEM bytes of the trust bundle it holds, its certificate's
# issuer-side chain PEM) or None for a value it does not hold yet.
HeldFn = Callable[[], dict[str, tuple[bytes | None, bytes | None]]]


# The phases of a rotation, in order, and what each one waits for.
TRUSTING_BOTH, RE_ISSUING, DROPPING_OLD = "trusting-both", "re-issuing", "dropping-old"
PHASES = (TRUSTING_BOTH, RE_ISSUING, DROPPING_OLD)


def phase_authority(
    phase: str,
    old: ca.KeyPair,
    new: ca.KeyPair,
    retired: tuple[ca.KeyPair, ...],
    trust_domain: str,
) -> ca.Authority:
    """What signs and what is trusted in a phase. One function, so that the
    replica running a rotation and the replicas following it (Kubernetes
    mode) install the very same authorities."""
    if phase == TRUSTING_BOTH:
        authority = ca.Authority(old, trust_domain=trust_domain, extra_roots=[new.cert_pem])
    elif phase == RE_ISSUING:
        old_root = ca.Authority(old, trust_domain=trust_domain).root_pem
        authority = ca.Authority(new, trust_domain=trust_domain, extra_roots=[old_root])
    elif phase == DROPPING_OLD:
        authority = ca.Authority(new, trust_domain=trust_domain)
        retired = (*retired, old)
    else:
        raise ValueError(f"unknown root rotation phase {phase!r}")
    authority.retired = retired
    return authority


# Told of each phase before this replica installs it: (phase, old, new).
Announce = Callable[[str, ca.KeyPair, ca.KeyPair], Awaitable[None]]


class RootRotation:
    def __init__(
        self,
        state_dir: Path | None,
        certificates: workloads.WorkloadCertificates,
        held: HeldFn,
        *,
        on_authority: Callable[[ca.Authority], None] = lambda _: None,
        announce: Announce | None = None,
        settle: float = 0.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        step_timeout: float = 60.0,
        poll: float = 0.2,
    ) -> None:
        """With `state_dir`, the new root is written there once it is the
        root. With `announce`, each phase is published first (to the other
        replicas), and each wait ends with `settle` seconds for them to
        catch up, since their proxies cannot be seen from here."""
        self._dir = state_dir / "ca" if state_dir is not None else None
        self._certificates = certificates
        self._held = held
        self._on_authority = on_authority
        self._announce = announce
        self._settle = settle
        self._sleep = sleep
        self._timeout = step_timeout
        self._poll = poll
        self.progress = Progress()
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._lock.locked()

    async def run(self) -> Progress:
        async with self._lock:
            current = self._certificates.authority
            domain = current.trust_domain
            old, retired = current.signer, current.retired
            new_root = ca.new_root(domain)
            self.progress = Progress(TRUSTING_BOTH, f"{new_root.cert.serial_number:x}")
            log.info(
                "root rotation: new root %s trusted beside the old one",
                self.progress.new_root_serial,
            )
            old_root = current.root_pem
            waits: dict[str, Callable[[bytes | None, bytes | None], bool]] = {
                TRUSTING_BOTH: lambda bundle, _: bundle is not None and new_root.cert_pem in bundle,
                RE_ISSUING: lambda _, cert: cert is not None and cert_signed_by(cert, new_root),
                DROPPING_OLD: lambda bundle, _: bundle is not None and old_root not in bundle,
            }
            for phase in PHASES:
                self.progress.phase = phase
                if self._announce is not None:
                    await self._announce(phase, old, new_root)
                elif phase == DROPPING_OLD and self._dir is not None:
                    self._persist(new_root, old)
                self._install(
                    phase_authority(phase, old, new_root, retired, domain),
                    reissue=phase == RE_ISSUING,
                )
                await self._wait(waits[phase])
                if self._settle:
                    await self._sleep(self._settle)
            self.progress.phase = "done"
            log.info("root rotation: done; the old root is trusted on the xDS channel only")
            return self.progress

    def _install(self, authority: ca.Authority, *, reissue: bool) -> None:
        self._certificates.set_authority(authority, reissue=reissue)
        self._on_authority(authority)

    async def _wait(self, holds: Callable[[bytes | None, bytes | None], bool]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            behind = tuple(sorted(p for p, (b, c) in self._held().items() if not holds(b, c)))
            self.progress.laggards = behind
            if not behind:
                return
            if loop.time() > deadline:
                log.warning(
                    "root rotation: %d proxies did not catch up in %.0fs (%s); going on",
                    len(behind),
                    self._timeout,
                    ", ".join(behind[:5]),
                )
                return
            await self._sleep(self._poll)

    def _persist(self, new_root: ca.KeyPair, old: ca.KeyPair) -> None:
        """The new root becomes the root on disk; the old one is retired."""
        assert self._dir is not None
        retired = self._dir / RETIRED
        retired.mkdir(parents=True, exist_ok=True)
        os.chmod(retired, 0o700)
        serial = f"{old.cert.serial_number:x}"
        shutil.copyfile(self._dir / ca.ROOT_CERT, retired / f"{serial}-cert.pem")
        ca.write_private(retired / f"{serial}-key.pem", old.key_pem)
        ca.write_private(self._dir / ca.ROOT_KEY, new_root.key_pem)
        (self._dir / ca.ROOT_CERT).write_bytes(new_root.cert_pem)


def cert_signed_by(chain_pem: bytes, root: ca.KeyPair) -> bool:
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    try:
        leaf.verify_directly_issued_by(root.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# -- a root shared by replicas ---------------------------------------------------------

# Keys of the shared record (a kubernetes.io/tls Secret's data).
SIGNER_CERT, SIGNER_KEY = "tls.crt", "tls.key"
NEXT_CERT, NEXT_KEY, PHASE = "next.crt", "next.key", "phase"
_RETIRED_PREFIX = "retired-"

Read = Callable[[], Awaitable[tuple[dict[str, bytes], str]]]
Write = Callable[[dict[str, bytes], str], Awaitable[str]]


@dataclass(frozen=True)
class RootRecord:
    """What the shared record says: the signing root, and during a rotation
    its phase and the new root; roots retired by earlier rotations."""

    signer: ca.KeyPair
    phase: str = ""
    next: ca.KeyPair | None = None
    retired: tuple[ca.KeyPair, ...] = ()

    @property
    def signature(self) -> tuple[str, ...]:
        return (
            self.phase,
            self.signer.cert_pem.decode(),
            self.next.cert_pem.decode() if self.next else "",
            *(r.cert_pem.decode() for r in self.retired),
        )

    def encode(self) -> dict[str, bytes]:
        data = {SIGNER_CERT: self.signer.cert_pem, SIGNER_KEY: self.signer.key_pem}
        if self.phase and self.next is not None:
            data |= {PHASE: self.phase.encode(), NEXT_CERT: self.next.cert_pem}
            data[NEXT_KEY] = self.next.key_pem
        for r in self.retired:
            serial = f"{r.cert.serial_number:x}"
            data[f"{_RETIRED_PREFIX}{serial}.crt"] = r.cert_pem
            data[f"{_RETIRED_PREFIX}{serial}.key"] = r.key_pem
        return data

    @classmethod
    def decode(cls, data: dict[str, bytes], where: str) -> RootRecord:
        if SIGNER_CERT not in data or SIGNER_KEY not in data:
            raise ca.CAError(f"{where} lacks {SIGNER_CERT} or {SIGNER_KEY}")
        phase = data.get(PHASE, b"").decode()
        following = None
        if phase:
            if phase not in PHASES or NEXT_CERT not in data or NEXT_KEY not in data:
                raise ca.CAError(f"{where}: rotation phase {phase!r} without a new root")
            following = ca.KeyPair(data[NEXT_CERT], data[NEXT_KEY])
        retired = []
        for key in sorted(data):
            if key.startswith(_RETIRED_PREFIX) and key.endswith(".crt"):
                pair = ca.KeyPair(data[key], data.get(key[:-4] + ".key", b""))
                if pair.not_after > ca.utcnow():
                    retired.append(pair)
        return cls(
            ca.KeyPair(data[SIGNER_CERT], data[SIGNER_KEY]),
            phase,
            following,
            tuple(sorted(retired, key=lambda p: p.not_before)),
        )

    def authority(self, trust_domain: str) -> ca.Authority:
        if self.phase and self.next is not None:
            return phase_authority(self.phase, self.signer, self.next, self.retired, trust_domain)
        authority = ca.Authority(self.signer, trust_domain=trust_domain)
        authority.retired = self.retired
        return authority


class SharedRoot:
    """Every replica signs with the root in one shared record and follows the
    phases a rotation writes there; the replica that runs the rotation
    announces each phase through it."""

    def __init__(
        self,
        certificates: workloads.WorkloadCertificates,
        read: Read,
        write: Write,
        *,
        where: str,
        poll: float = 2.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._certificates = certificates
        self._read = read
        self._write = write
        self.where = where
        self.poll = poll
        self._sleep = sleep
        self._applied: tuple[str, ...] = ()

    def applied(self, record: RootRecord) -> None:
        """The record this replica's authority was built from."""
        self._applied = record.signature

    async def announce(self, phase: str, old: ca.KeyPair, new: ca.KeyPair) -> None:
        data, version = await self._read()
        before = RootRecord.decode(data, self.where)
        if phase == DROPPING_OLD:
            record = RootRecord(new, retired=(*before.retired, old))
        else:
            record = RootRecord(old, phase, new, before.retired)
        await self._write(record.encode(), version)
        self._applied = record.signature
        log.info("root rotation: %s announced in %s", phase, self.where)

    async def follow(self) -> None:
        """Install what the record says whenever it changes, until cancelled."""
        failing = False
        while True:
            try:
                data, _ = await self._read()
                record = RootRecord.decode(data, self.where)
                if record.signature != self._applied:
                    self._install(record)
                failing = False
            except Exception as err:  # the API server may be away; keep the last root
                if not failing:
                    log.warning("reading the shared root from %s: %s", self.where, err)
                failing = True
            await self._sleep(self.poll)

    def _install(self, record: RootRecord) -> None:
        current = self._certificates.authority
        authority = record.authority(current.trust_domain)
        # New certificates whenever the signer changed under us: in the
        # re-issuing phase, or if that phase was missed while away.
        reissue = authority.signer.cert_pem != current.signer.cert_pem
        log.info(
            "root from %s: %s (signer %x)",
            self.where,
            record.phase or "in use",
            authority.signer.cert.serial_number,
        )
        self._certificates.set_authority(authority, reissue=reissue)
        self._applied = record.signature
