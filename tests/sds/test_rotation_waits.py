"""A rotation waits until the proxies it is told of hold each step, also
when that takes asking other processes (`serve --workers`: worker 0 asks
the other workers, which answer over their admin sockets)."""

from __future__ import annotations

from shoal.sds import ca, rotation, workloads


async def test_a_rotation_waits_on_proxies_it_must_ask_for() -> None:
    certificates = workloads.WorkloadCertificates(
        ca.Authority(ca.new_root("cluster.local"), trust_domain="cluster.local")
    )
    asked = 0
    lagging: list[tuple[str, ...]] = []

    async def held() -> rotation.Held:
        """One proxy, of another worker, a poll behind the authority."""
        nonlocal asked
        asked += 1
        if asked % 2:
            return {"web-1 (worker 1)": (None, None)}
        authority = certificates.authority
        chain = certificates.get("shop", "web").cert_pem + authority.root_pem
        return {"web-1 (worker 1)": (authority.trust_bundle, chain)}

    async def sleep(_: float) -> None:
        lagging.append(turn.progress.laggards)

    turn = rotation.RootRotation(None, certificates, held, sleep=sleep)
    done = await turn.run()
    assert done.phase == "done"
    # Each of the three steps found it behind once, and went on when it held.
    assert lagging == [("web-1 (worker 1)",)] * 3
    assert certificates.authority.signer.cert.serial_number == int(done.new_root_serial, 16)
