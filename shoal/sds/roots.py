"""Where the mesh root comes from: the operator's CA, a root in the state
directory, or (on Kubernetes) one Secret every replica shares."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shoal import kube
from shoal.sds import ca, rotation, workloads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PluggedCa:
    """An operator's intermediate CA (cert-manager, Vault, a corporate PKI)."""

    cert: Path
    key: Path
    chain: Path | None = None


def load_local(state_dir: Path, trust_domain: str, plugged: PluggedCa | None) -> ca.Authority:
    """The operator's CA if given, else the root in the state directory
    (made on first use), with the roots it retired still trusted."""
    if plugged is not None:
        signer = ca.load_plugin(plugged.cert, plugged.key, plugged.chain)
    else:
        signer, created = ca.load_or_create(state_dir, trust_domain)
        if created:
            log.info("created the mesh root CA in %s", state_dir / "ca")
    authority = ca.Authority(signer, trust_domain=trust_domain)
    if plugged is None:
        authority.retired = ca.load_retired(state_dir, signer)
    return authority


async def load_shared(
    api: kube.Api, secret: str, trust_domain: str
) -> tuple[ca.Authority, rotation.RootRecord]:
    """The root in a Secret of shoal's namespace, made by whichever replica
    gets there first; mid-rotation, the phase it records."""

    def new_root() -> dict[str, bytes]:
        return rotation.RootRecord(ca.new_root(trust_domain)).encode()

    namespace = api.server.namespace
    data, created = await kube.shared_secret(api, namespace, secret, new_root)
    where = f"Secret {namespace}/{secret}"
    record = rotation.RootRecord.decode(data, where)
    log.info("%s the mesh root CA in %s", "created" if created else "using", where)
    return record.authority(trust_domain), record


def shared_root(
    api: kube.Api,
    secret: str,
    certificates: workloads.WorkloadCertificates,
    on_revoke: Callable[[], None],
) -> rotation.SharedRoot:
    """Follows (and, on the replica rotating, announces) the root in the
    shared Secret."""
    namespace = api.server.namespace

    async def read() -> tuple[dict[str, bytes], str]:
        if not api.backoff.up:
            # The watches are probing it with backoff; no polling meanwhile.
            raise ConnectionError("the kubernetes API server is unreachable")
        return await kube.read_secret(api, namespace, secret)

    async def write(data: dict[str, bytes], version: str) -> str:
        return await kube.replace_secret(api, namespace, secret, data, version)

    return rotation.SharedRoot(
        certificates, read, write, where=f"Secret {namespace}/{secret}", on_revoke=on_revoke
    )
