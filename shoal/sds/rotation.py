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


class RootRotation:
    def __init__(
        self,
        state_dir: Path,
        certificates: workloads.WorkloadCertificates,
        held: HeldFn,
        *,
        on_authority: Callable[[ca.Authority], None] = lambda _: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        step_timeout: float = 60.0,
        poll: float = 0.2,
    ) -> None:
        self._dir = state_dir / "ca"
        self._certificates = certificates
        self._held = held
        self._on_authority = on_authority
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
            old = self._certificates.authority
            domain = old.trust_domain
            new_root = ca.new_root(domain)
            self.progress = Progress("trusting-both", f"{new_root.cert.serial_number:x}")
            log.info(
                "root rotation: new root %s trusted beside the old one",
                self.progress.new_root_serial,
            )
            both = ca.Authority(old.signer, trust_domain=domain, extra_roots=[new_root.cert_pem])
            both.retired = old.retired
            self._install(both, reissue=False)
            await self._wait(lambda bundle, _: bundle is not None and new_root.cert_pem in bundle)

            self.progress.phase = "re-issuing"
            moved = ca.Authority(new_root, trust_domain=domain, extra_roots=[old.root_pem])
            moved.retired = old.retired
            self._install(moved, reissue=True)
            await self._wait(lambda _, cert: cert is not None and cert_signed_by(cert, new_root))

            self.progress.phase = "dropping-old"
            final = ca.Authority(new_root, trust_domain=domain)
            final.retired = (*old.retired, old.signer)
            self._persist(new_root, old.signer)
            self._install(final, reissue=False)
            await self._wait(lambda bundle, _: bundle is not None and old.root_pem not in bundle)
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
