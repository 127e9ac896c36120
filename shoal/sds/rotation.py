"""Rotating the root: old and new trusted side by side while workloads move.

1. A new root is created and added to the trust bundle; every proxy is sent
   the bundle with both roots.
2. Once every proxy holds it, workload certificates are re-issued by the new
   root; peers with either certificate trust each other meanwhile.
3. Once every proxy holds a new certificate, the old root leaves the trust
   bundle. Its key then signs one last thing, the new root's certificate
   (a cross-certificate, so sidecars that trust only the old root can still
   verify the control plane), and is dropped. The old root stays trusted on
   the xDS channel only, for as long as a bootstrap certificate issued under
   it may still be valid (ca.BOOTSTRAP_TTL), and no longer.

Each wait is bounded: a proxy that never catches up does not stall the
rotation forever; it is logged.

After a key compromise, `run(compromised=True)` replaces the root at once:
nothing signed by the old root is trusted from then on, on the data plane
or on the xDS channel; streams authenticated under it are closed; sidecars
must be bootstrapped again.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from shoal.sds import ca, workloads

log = logging.getLogger(__name__)


@dataclass
class Progress:
    phase: str = "idle"  # idle, trusting-both, re-issuing, dropping-old, done
    new_root_serial: str = ""
    laggards: tuple[str, ...] = ()


# Per proxy: (the PEM bytes of the trust bundle it holds, its certificate's
# issuer-side chain PEM) or None for a value it does not hold yet.
# (Awaitable: with `serve --workers`, worker 0 asks the other workers.)
Held = dict[str, tuple[bytes | None, bytes | None]]
HeldFn = Callable[[], Held | Awaitable[Held]]


# The phases of a rotation, in order, and what each one waits for.
TRUSTING_BOTH, RE_ISSUING, DROPPING_OLD = "trusting-both", "re-issuing", "dropping-old"
PHASES = (TRUSTING_BOTH, RE_ISSUING, DROPPING_OLD)
# A rotation after a compromise has one step.
REPLACING = "replacing-compromised"


def phase_authority(
    phase: str,
    old: ca.KeyPair,
    new: ca.KeyPair,
    retired: tuple[ca.RetiredRoot, ...],
    trust_domain: str,
    retiring: ca.RetiredRoot | None = None,
) -> ca.Authority:
    """What signs and what is trusted in a phase. One function, so that the
    replica running a rotation and the replicas following it (Kubernetes
    mode) install the very same authorities. `retiring`: the old root as
    DROPPING_OLD retires it (made once, by the replica rotating)."""
    if phase == TRUSTING_BOTH:
        authority = ca.Authority(old, trust_domain=trust_domain, extra_roots=[new.cert_pem])
    elif phase == RE_ISSUING:
        old_root = ca.Authority(old, trust_domain=trust_domain).root_pem
        authority = ca.Authority(new, trust_domain=trust_domain, extra_roots=[old_root])
    elif phase == DROPPING_OLD:
        if retiring is None:
            raise ValueError("dropping the old root needs it retired")
        authority = ca.Authority(new, trust_domain=trust_domain)
        retired = (*retired, retiring)
    else:
        raise ValueError(f"unknown root rotation phase {phase!r}")
    authority.retired = retired
    return authority


# Told of each phase before this replica installs it: (phase, old, new, the
# old root retired at DROPPING_OLD); REPLACING with old None after a compromise.
Announce = Callable[[str, ca.KeyPair | None, ca.KeyPair, ca.RetiredRoot | None], Awaitable[None]]


class RootRotation:
    def __init__(
        self,
        state_dir: Path | None,
        certificates: workloads.WorkloadCertificates,
        held: HeldFn,
        *,
        on_authority: Callable[[ca.Authority], None] = lambda _: None,
        on_revoke: Callable[[], None] = lambda: None,
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
        self._on_revoke = on_revoke
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

    async def run(self, *, compromised: bool = False) -> Progress:
        async with self._lock:
            if compromised:
                return await self._replace()
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
            retiring: ca.RetiredRoot | None = None
            for phase in PHASES:
                self.progress.phase = phase
                if phase == DROPPING_OLD:
                    retiring = ca.Authority(old, trust_domain=domain).retire(new_root)
                if self._announce is not None:
                    await self._announce(phase, old, new_root, retiring)
                elif phase == DROPPING_OLD and self._dir is not None:
                    assert retiring is not None
                    self._persist(new_root, retiring)
                self._install(
                    phase_authority(phase, old, new_root, retired, domain, retiring),
                    reissue=phase == RE_ISSUING,
                )
                await self._wait(waits[phase])
                if self._settle:
                    await self._sleep(self._settle)
            self.progress.phase = "done"
            log.info(
                "root rotation: done; the old root's key is gone, and the root is trusted "
                "for xDS client certificates until %s",
                retiring.until.isoformat(timespec="seconds") if retiring else "-",
            )
            return self.progress

    async def _replace(self) -> Progress:
        """After a compromise: a new root in force at once, nothing of the
        old one trusted, every workload certificate re-issued, every stream
        authenticated under the old root closed."""
        current = self._certificates.authority
        new_root = ca.new_root(current.trust_domain)
        self.progress = Progress(REPLACING, f"{new_root.cert.serial_number:x}")
        log.warning(
            "root rotation after a compromise: root %x replaced by %s; nothing it signed "
            "is trusted any more, sidecars must be bootstrapped again",
            current.signer.cert.serial_number,
            self.progress.new_root_serial,
        )
        if self._announce is not None:
            await self._announce(REPLACING, None, new_root, None)
        elif self._dir is not None:
            self._persist(new_root, None)
        self._install(ca.Authority(new_root, trust_domain=current.trust_domain), reissue=True)
        self._on_revoke()
        self.progress.phase = "done"
        return self.progress

    def _install(self, authority: ca.Authority, *, reissue: bool) -> None:
        self._certificates.set_authority(authority, reissue=reissue)
        self._on_authority(authority)

    async def _wait(self, holds: Callable[[bytes | None, bytes | None], bool]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            held = self._held()
            if inspect.isawaitable(held):
                held = await held
            behind = tuple(sorted(p for p, (b, c) in held.items() if not holds(b, c)))
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

    def _persist(self, new_root: ca.KeyPair, retiring: ca.RetiredRoot | None) -> None:
        """The new root becomes the root on disk; the old one's key is gone,
        and with a compromise, every root of before."""
        assert self._dir is not None
        state_dir = self._dir.parent
        if retiring is None:
            ca.forget_retired(state_dir)
        else:
            ca.save_retired(state_dir, retiring)
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
    its phase and the new root; roots retired by earlier rotations (their
    certificates and cross-certificates: no retired key is kept)."""

    signer: ca.KeyPair
    phase: str = ""
    next: ca.KeyPair | None = None
    retired: tuple[ca.RetiredRoot, ...] = ()
    # The record still had a retired root's key (written by an older shoal):
    # it should be written again, without it.
    legacy: bool = False

    @property
    def signature(self) -> tuple[str, ...]:
        return (
            self.phase,
            self.signer.cert_pem.decode(),
            self.next.cert_pem.decode() if self.next else "",
            *(r.cert_pem.decode() + r.cross_pem.decode() for r in self.retired),
        )

    def encode(self) -> dict[str, bytes]:
        data = {SIGNER_CERT: self.signer.cert_pem, SIGNER_KEY: self.signer.key_pem}
        if self.phase and self.next is not None:
            data |= {PHASE: self.phase.encode(), NEXT_CERT: self.next.cert_pem}
            data[NEXT_KEY] = self.next.key_pem
        for r in self.retired:
            serial = f"{r.cert.serial_number:x}"
            data[f"{_RETIRED_PREFIX}{serial}.crt"] = r.cert_pem
            data[f"{_RETIRED_PREFIX}{serial}.cross"] = r.cross_pem
        return data

    @classmethod
    def decode(cls, data: dict[str, bytes], where: str) -> RootRecord:
        if SIGNER_CERT not in data or SIGNER_KEY not in data:
            raise ca.CAError(f"{where} lacks {SIGNER_CERT} or {SIGNER_KEY}")
        signer = ca.KeyPair(data[SIGNER_CERT], data[SIGNER_KEY])
        phase = data.get(PHASE, b"").decode()
        following = None
        if phase:
            if phase not in PHASES or NEXT_CERT not in data or NEXT_KEY not in data:
                raise ca.CAError(f"{where}: rotation phase {phase!r} without a new root")
            following = ca.KeyPair(data[NEXT_CERT], data[NEXT_KEY])
        retired = []
        legacy = False
        for key in sorted(data):
            if not (key.startswith(_RETIRED_PREFIX) and key.endswith(".crt")):
                continue
            stem = key[:-4]
            if stem + ".cross" in data:
                root = ca.RetiredRoot(data[key], data[stem + ".cross"])
            elif stem + ".key" in data:
                legacy = True
                root = _migrated(ca.KeyPair(data[key], data[stem + ".key"]), signer)
            else:
                continue
            if root.until > ca.utcnow():
                retired.append(root)
        retired.sort(key=lambda r: r.until)
        return cls(signer, phase, following, tuple(retired), legacy)

    def authority(self, trust_domain: str) -> ca.Authority:
        if self.phase and self.next is not None:
            return phase_authority(self.phase, self.signer, self.next, self.retired, trust_domain)
        authority = ca.Authority(self.signer, trust_domain=trust_domain)
        authority.retired = self.retired
        return authority


_MIGRATED: dict[tuple[bytes, bytes], ca.RetiredRoot] = {}


def _migrated(old: ca.KeyPair, signer: ca.KeyPair) -> ca.RetiredRoot:
    """A root an older shoal retired with its key: certified once (per
    process) for the signer, for the window that began when the signer was
    made; so every read of the record gives the same, and no read extends
    how long the old root is trusted."""
    key = (old.cert_pem, signer.cert_pem)
    found = _MIGRATED.get(key)
    if found is None:
        until = signer.not_before + ca.BOOTSTRAP_TTL
        keep = max(until - ca.utcnow(), datetime.timedelta(0))
        found = _MIGRATED[key] = ca.Authority(old).retire(signer, keep=keep)
    return found


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
        on_revoke: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_revoke` is called when a root this replica trusted is no
        longer trusted at all (a rotation after a compromise elsewhere)."""
        self._certificates = certificates
        self._read = read
        self._write = write
        self.where = where
        self.poll = poll
        self._sleep = sleep
        self._on_revoke = on_revoke
        self._applied: tuple[str, ...] = ()

    def applied(self, record: RootRecord) -> None:
        """The record this replica's authority was built from."""
        self._applied = record.signature

    async def announce(
        self,
        phase: str,
        old: ca.KeyPair | None,
        new: ca.KeyPair,
        retiring: ca.RetiredRoot | None = None,
    ) -> None:
        data, version = await self._read()
        before = RootRecord.decode(data, self.where)
        if phase == REPLACING or old is None:
            record = RootRecord(new)
        elif phase == DROPPING_OLD:
            assert retiring is not None
            record = RootRecord(new, retired=(*before.retired, retiring))
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
                data, version = await self._read()
                record = RootRecord.decode(data, self.where)
                if record.signature != self._applied:
                    self._install(record)
                if record.legacy:
                    # Written again without the retired key (if nobody wrote
                    # meanwhile: the write is conditional on the version).
                    await self._write(record.encode(), version)
                    log.info("%s: the retired root's key is no longer kept", self.where)
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
        revoked = current.root_pem not in authority.xds_trust
        self._certificates.set_authority(authority, reissue=reissue)
        self._applied = record.signature
        if revoked:
            log.warning("root %x is no longer trusted at all", current.signer.cert.serial_number)
            self._on_revoke()
