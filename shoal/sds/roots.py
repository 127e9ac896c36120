"""Where the mesh root comes from: the operator's CA, a root in the state
directory, or (on Kubernetes) one Secret every replica shares."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
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


# With `shoal serve --workers N` on a state directory, the root and the
# phase of a rotation, in one file every worker reads (the Secret's role on
# Kubernetes): written whole and renamed into place, so a reader never sees
# half of a phase.
FOLDER_RECORD = "shared-root.json"


class RecordChanged(RuntimeError):
    """The record was written by someone else since it was read."""


def _record_path(state_dir: Path) -> Path:
    return state_dir / "ca" / FOLDER_RECORD


def _read_folder_record(state_dir: Path) -> tuple[dict[str, bytes], str]:
    raw = _record_path(state_dir).read_bytes()
    try:
        data = {k: base64.b64decode(v) for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError) as err:
        raise ca.CAError(f"{_record_path(state_dir)} is not a root record: {err}") from err
    return data, hashlib.sha256(raw).hexdigest()


def _write_folder_record(state_dir: Path, data: dict[str, bytes]) -> str:
    raw = json.dumps({k: base64.b64encode(v).decode() for k, v in sorted(data.items())}).encode()
    path = _record_path(state_dir)
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    ca.write_private(staged, raw)
    os.replace(staged, path)
    return hashlib.sha256(raw).hexdigest()


def share_local(state_dir: Path, authority: ca.Authority) -> rotation.RootRecord:
    """Worker 0, as it starts: the root it loaded, as the record the other
    workers start from (written afresh: the root files are the truth
    between runs, and a rotation a crash cut short is not resumed)."""
    record = rotation.RootRecord(authority.signer, retired=authority.retired)
    _write_folder_record(state_dir, record.encode())
    return record


def unshare_local(state_dir: Path) -> None:
    """The record gone, and any half-written one: it holds root keys, which
    outlive their use nowhere."""
    path = _record_path(state_dir)
    for leftover in [path, *path.parent.glob(f".{path.name}.*")]:
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def load_local_shared(
    state_dir: Path, trust_domain: str
) -> tuple[ca.Authority, rotation.RootRecord]:
    """A worker other than 0, as it starts: what the record says now."""
    data, _ = _read_folder_record(state_dir)
    record = rotation.RootRecord.decode(data, str(_record_path(state_dir)))
    return record.authority(trust_domain), record


def local_shared_root(
    state_dir: Path,
    certificates: workloads.WorkloadCertificates,
    on_revoke: Callable[[], None],
    *,
    poll: float = 1.0,
) -> rotation.SharedRoot:
    """Follows (and, on worker 0, announces) the record in the state
    directory. When a rotation ends, the new root is also written where a
    single process loads it from, so the next start uses it."""

    async def read() -> tuple[dict[str, bytes], str]:
        return _read_folder_record(state_dir)

    async def write(data: dict[str, bytes], version: str) -> str:
        _, now = _read_folder_record(state_dir)
        if now != version:
            raise RecordChanged(f"{_record_path(state_dir)} changed since it was read")
        record = rotation.RootRecord.decode(data, str(_record_path(state_dir)))
        if not record.phase:
            ca.forget_retired(state_dir)
            for retired in record.retired:
                ca.save_retired(state_dir, retired)
            ca.write_private(state_dir / "ca" / ca.ROOT_KEY, record.signer.key_pem)
            (state_dir / "ca" / ca.ROOT_CERT).write_bytes(record.signer.cert_pem)
        return _write_folder_record(state_dir, data)

    return rotation.SharedRoot(
        certificates,
        read,
        write,
        where=str(_record_path(state_dir)),
        poll=poll,
        on_revoke=on_revoke,
    )
