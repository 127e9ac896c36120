"""Findings 7 and 9: the CA after a key compromise, retired roots, and what
joining from outside may get."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from shoal import cli, sidecar_files
from shoal._gen import ca_pb2, ca_pb2_grpc
from shoal.demo import mesh
from shoal.sds import ca, join, rotation, workloads
from shoal.xds import resources
from tests.e2e.helpers import caught_up, eventually
from tests.e2e.test_mtls import _pair
from tests.security import clients
from tests.security.test_xds_attacks import sidecar_node


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, timeout=120
    )


async def _token(cp: cli.ControlPlane, account: str = "vm-sa") -> str:
    result = await asyncio.to_thread(
        shoal,
        "ca",
        "join-token",
        "--namespace",
        "default",
        "--service-account",
        account,
        "--admin",
        cp.admin_socket,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def _join(cp: cli.ControlPlane, token: str, account: str = "vm-sa") -> ca_pb2.JoinResponse:
    assert cp.authority is not None
    csr = ca.csr(ca.new_key(), f"spiffe://cluster.local/ns/default/sa/{account}")
    creds = grpc.ssl_channel_credentials(cp.authority.root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{cp.join_port}", creds) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        answer: ca_pb2.JoinResponse = await stub.Join(
            ca_pb2.JoinRequest(token=token, csr_pem=csr), timeout=30
        )
        return answer


# -- finding 9: join certificates, the token table, failed joins ------------------


async def test_a_joined_machine_gets_what_a_bootstrapped_sidecar_gets(
    control_plane: cli.ControlPlane,
) -> None:
    """Found: join certificates lived 90 days with serverAuth, usable on the
    data plane as servers; bootstrap ones are client certificates."""
    answer = await _join(control_plane, await _token(control_plane))
    cert = x509.load_pem_x509_certificates(answer.certificate_chain_pem)[0]
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == ca.BOOTSTRAP_TTL + ca.BACKDATE


def test_the_join_token_table_is_bounded() -> None:
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)]
    tokens = join.JoinTokens(clock=lambda: now[0])
    for _ in range(join.MAX_TOKENS):
        tokens.mint("default", "vm", datetime.timedelta(hours=1))
    with pytest.raises(join.TokenError, match="outstanding"):
        tokens.mint("default", "vm", datetime.timedelta(hours=1))
    # Expired a day ago: forgotten, and there is room again.
    now[0] += datetime.timedelta(days=2)
    tokens.mint("default", "vm", datetime.timedelta(hours=1))
    assert len(tokens) == 1


def test_used_and_expired_join_tokens_make_room_for_new_ones() -> None:
    """Found by bench/fuzz.py: a fleet joining used up the table for a day,
    every token spent, and minting was refused as "outstanding"."""
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)]
    tokens = join.JoinTokens(clock=lambda: now[0])
    minted = [tokens.mint("default", "vm", datetime.timedelta(hours=1)) for _ in range(1000)]
    for token in minted:
        tokens.check(token)
        tokens.spend(token)
    short = [
        tokens.mint("default", "vm", datetime.timedelta(seconds=5))
        for _ in range(join.MAX_TOKENS - len(minted))
    ]
    now[0] += datetime.timedelta(seconds=10)
    with pytest.raises(join.TokenError, match="already used"):
        tokens.check(minted[0])  # still known while there is room
    fresh = tokens.mint("default", "vm", datetime.timedelta(hours=1))
    assert tokens.check(fresh) == ("default", "vm")
    assert len(tokens) == 1, "the spent and the expired made room"
    with pytest.raises(join.TokenError, match="unknown"):
        tokens.check(short[0])


async def test_failed_joins_from_one_address_are_refused_for_a_while(
    control_plane: cli.ControlPlane,
) -> None:
    """Found: failed joins had no rate limit per peer."""
    good = await _token(control_plane)
    for _ in range(join.MAX_FAILURES):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _join(control_plane, "guess-" + "x" * 40)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _join(control_plane, good)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "failed joins from this address" in (err.value.details() or "")


def test_an_address_may_try_again_after_the_window() -> None:
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)]
    failures = join.FailedJoins(clock=lambda: now[0])
    for _ in range(join.MAX_FAILURES):
        failures.failed("ipv4:10.0.0.1")
    assert failures.blocked_for("ipv4:10.0.0.1") > 0
    assert failures.blocked_for("ipv4:10.0.0.2") == 0
    now[0] += join.FAILURE_WINDOW
    assert failures.blocked_for("ipv4:10.0.0.1") == 0


# -- finding 7: a root compromise, and retired roots ------------------------------


def test_a_retired_root_is_trusted_for_the_bootstrap_window_only() -> None:
    """Found: retired roots stayed trusted for xDS client certificates until
    they expired (up to 10 years), and their keys were kept."""
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)]
    old = ca.Authority(ca.new_root("cluster.local"), clock=lambda: now[0])
    new_root = ca.new_root("cluster.local")
    retired = old.retire(new_root)
    assert not hasattr(retired, "key_pem"), "a retired root keeps no key"
    current = ca.Authority(new_root, clock=lambda: now[0])
    current.retired = (retired,)
    assert old.root_pem in current.xds_trust
    now[0] += ca.BOOTSTRAP_TTL - datetime.timedelta(minutes=1)
    assert old.root_pem in current.xds_trust
    now[0] += datetime.timedelta(minutes=2)
    assert old.root_pem not in current.xds_trust
    assert current.trusted_retired() == ()


def test_a_retired_key_left_by_an_older_shoal_is_used_once_and_deleted(tmp_path: Path) -> None:
    old, _ = ca.load_or_create(tmp_path, "cluster.local")
    new_root = ca.new_root("cluster.local")
    folder = tmp_path / "ca" / "retired"
    folder.mkdir()
    serial = f"{old.cert.serial_number:x}"
    (folder / f"{serial}-cert.pem").write_bytes(old.cert_pem)
    ca.write_private(folder / f"{serial}-key.pem", old.key_pem)
    (retired,) = ca.load_retired(tmp_path, new_root)
    assert not (folder / f"{serial}-key.pem").exists()
    cross = x509.load_pem_x509_certificate(retired.cross_pem)
    cross.verify_directly_issued_by(old.cert)
    assert cross.public_key() == new_root.cert.public_key()
    assert ca.load_retired(tmp_path, new_root) == (retired,)


async def _rotate(cp: cli.ControlPlane, *flags: str) -> str:
    result = await asyncio.to_thread(
        shoal, "ca", "rotate-root", *flags, "--admin", cp.admin_socket, "--timeout", "90"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def _answers(a: mesh.Workload, host: str) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            status, _ = await mesh.get(session, a, host)
        except aiohttp.ClientError:
            return False
    return status == 200


async def test_a_sidecar_bootstrapped_before_a_rotation_reconnects_after_it(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    """With the old root's key gone, sidecars that trust only the old root
    verify the control plane through the cross-certificate it signed."""
    a, _ = await _pair(control_plane, registry_dir, local_mesh)
    await _rotate(control_plane, "--wait")
    state = Path(control_plane.admin_socket).parent
    assert list((state / "ca" / "retired").glob("*-key.pem")) == []
    await a.envoy.stop()
    await a.envoy.start()  # the same bootstrap: the old root, a certificate of it
    await a.envoy.wait_ready(60)

    async def served() -> bool:
        return await _answers(a, "b")

    await eventually(served)


async def test_after_a_compromise_nothing_the_old_root_signed_is_trusted(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    """Found: root rotation did not help after a key compromise: after
    rotate-root, a certificate signed by the retired key still got demo/web's
    current workload key. `--compromised` stops trusting it at once."""
    a, b = await _pair(control_plane, registry_dir, local_mesh)
    assert control_plane.certificates is not None
    stolen = control_plane.certificates.authority.signer  # what the attacker holds
    forged = clients.certificate(stolen, uris=("spiffe://cluster.local/ns/default/sa/b-sa",))
    out = await _rotate(control_plane, "--compromised")
    assert "bootstrap every sidecar again now" in out

    # Every stream authenticated under the old root is gone, and stays gone.
    async def all_dropped() -> bool:
        return not control_plane.ads.connections

    await eventually(all_dropped)
    # The forged certificate gets nothing: not a handshake, not a key.
    async with clients.channel(control_plane, forged) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    node=sidecar_node("thief", "default", "b-sa"),
                    type_url=resources.SECRET,
                    resource_names=["default"],
                )
            )
            await asyncio.wait_for(call.read(), 30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    # Nothing of the old root is on disk or trusted.
    authority = control_plane.certificates.authority
    assert stolen.cert_pem not in authority.xds_trust + authority.trust_bundle
    state = Path(control_plane.admin_socket).parent
    assert stolen.key_pem not in (state / "ca" / ca.ROOT_KEY).read_bytes()
    assert list((state / "ca" / "retired").glob("*")) == []

    # Bootstrapped again, the sidecars are back in the mesh.
    for w in (a, b):
        await w.envoy.stop()
        sidecar_files.write(
            w.envoy.config.parent,
            w.sidecar,
            xds_host="127.0.0.1",
            xds_port=control_plane.xds_port,
            admin_port=w.envoy.admin_port,
            node_id=f"sidecar~default~{w.app.instance}",
            delta=local_mesh.delta,
            authority=authority,
        )
        await w.envoy.start()
        await w.envoy.wait_ready(60)
    await caught_up(control_plane, registry_dir)

    async def served() -> bool:
        return await _answers(a, "b")

    await eventually(served)
    held = control_plane.certificates.get("default", "b-sa")
    held.cert.verify_directly_issued_by(authority.signer.cert)


async def test_every_replica_follows_a_compromise_rotation_and_drops_its_streams() -> None:
    """Kubernetes mode: the replica that replaces the root writes it to the
    shared record; another one, following it, trusts the old root no more
    and drops the streams authenticated under it."""
    first = rotation.RootRecord(ca.new_root("cluster.local"))
    record = {"data": first.encode(), "version": "1"}

    async def read() -> tuple[dict[str, bytes], str]:
        return dict(record["data"]), str(record["version"])  # type: ignore[call-overload]

    async def write(data: dict[str, bytes], version: str) -> str:
        assert version == record["version"], "optimistic concurrency"
        record["data"], record["version"] = data, str(int(version) + 1)
        return str(record["version"])

    replicas = []
    for _ in range(2):
        certificates = workloads.WorkloadCertificates(first.authority("cluster.local"))
        revoked: list[bool] = []
        shared = rotation.SharedRoot(
            certificates, read, write, where="record", on_revoke=lambda r=revoked: r.append(True)
        )
        shared.applied(first)
        replicas.append((certificates, shared, revoked))
    (rotating, shared_a, revoked_a), (following, shared_b, revoked_b) = replicas
    rotation_a = rotation.RootRotation(
        None,
        rotating,
        dict,
        announce=shared_a.announce,
        on_revoke=lambda: revoked_a.append(True),
    )
    await rotation_a.run(compromised=True)
    assert revoked_a == [True]
    follow = asyncio.create_task(shared_b.follow())
    try:

        async def followed() -> bool:
            return following.authority.signer.cert_pem == rotating.authority.signer.cert_pem

        await eventually(followed)
    finally:
        follow.cancel()
    assert revoked_b == [True]
    assert first.signer.cert_pem not in following.authority.xds_trust
    assert not [k for k in record["data"] if k.startswith("retired-")]  # type: ignore[attr-defined]


def test_a_retired_key_in_an_older_shared_record_does_not_extend_its_trust() -> None:
    """Kubernetes mode: a record an older shoal wrote still has a retired
    root's key. Each replica reads the record every two seconds; the old
    root's window must not move with them, nor the record look changed."""
    old = ca.new_root("cluster.local")
    signer = ca.new_root("cluster.local")
    serial = f"{old.cert.serial_number:x}"
    data = {
        rotation.SIGNER_CERT: signer.cert_pem,
        rotation.SIGNER_KEY: signer.key_pem,
        f"retired-{serial}.crt": old.cert_pem,
        f"retired-{serial}.key": old.key_pem,
    }
    first = rotation.RootRecord.decode(data, "record")
    again = rotation.RootRecord.decode(data, "record")
    assert first.legacy and first.signature == again.signature
    (retired,) = first.retired
    assert retired.until == min(signer.not_before + ca.BOOTSTRAP_TTL, old.not_after).replace(
        microsecond=0
    )
    # Written again, the key is gone and the window stays.
    written = first.encode()
    assert f"retired-{serial}.key" not in written and f"retired-{serial}.cross" in written
    assert rotation.RootRecord.decode(written, "record").retired == (retired,)
