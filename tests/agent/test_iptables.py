"""`shoal agent iptables`: the rules text (golden files), every flag
checked, and the rules applied for real with iptables-restore inside a
network namespace the test makes (never the host's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.agent import iptables
from tests import netns

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from {path}; UPDATE_GOLDEN=1 rewrites it"


SHAPES = {
    "agent_iptables_default": {},
    "agent_iptables_some_ports": {
        "include_inbound_ports": "8080,9090,15021",
        "exclude_outbound_ports": "5432, 6379",
        "exclude_outbound_cidrs": "169.254.169.254/32,10.0.0.1/8",
    },
    "agent_iptables_include_cidrs": {
        "include_outbound_cidrs": "10.96.0.0/12,10.244.0.0/16",
        "exclude_inbound_ports": "22",
        "outbound_port": "16001",
        "inbound_port": "16006",
        "proxy_uid": "2000",
        "proxy_gid": "2001",
    },
    "agent_iptables_no_capture": {"include_inbound_ports": "", "include_outbound_cidrs": ""},
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_golden_rules(name: str) -> None:
    check_golden(name, iptables.rules(iptables.settings(**SHAPES[name])))


def test_a_rerun_deletes_the_jumps_it_left_and_nothing_else() -> None:
    existing = "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            "-A PREROUTING -p tcp -j SHOAL_INBOUND",
            "-A PREROUTING -p udp -j SOMEONE_ELSE",
            "-A OUTPUT -p tcp -j SHOAL_OUTPUT",
            "COMMIT",
        ]
    )
    text = iptables.rules(iptables.settings(), existing)
    assert "-D PREROUTING -p tcp -j SHOAL_INBOUND" in text
    assert "-D OUTPUT -p tcp -j SHOAL_OUTPUT" in text
    assert "SOMEONE_ELSE" not in text


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"outbound_port": "0"}, "--outbound-port"),
        ({"inbound_port": "65536"}, "--inbound-port"),
        ({"inbound_port": "http"}, "--inbound-port"),
        ({"proxy_uid": "-1"}, "--proxy-uid"),
        ({"proxy_gid": "99999999999"}, "--proxy-gid"),
        ({"include_inbound_ports": "80,x"}, "--include-inbound-ports"),
        ({"exclude_inbound_ports": "1-2"}, "--exclude-inbound-ports"),
        ({"exclude_outbound_ports": "70000"}, "--exclude-outbound-ports"),
        ({"include_outbound_cidrs": "10.0.0.0/33"}, "--include-outbound-cidrs"),
        ({"exclude_outbound_cidrs": "example.com"}, "--exclude-outbound-cidrs"),
        ({"exclude_outbound_cidrs": "fd00::/8"}, "--exclude-outbound-cidrs"),
        ({"exclude_outbound_ports": "²"}, "--exclude-outbound-ports"),
    ],
)  # fmt: skip
def test_every_flag_is_checked_and_named(flags: dict[str, str], named: str) -> None:
    with pytest.raises(iptables.FlagError) as info:
        iptables.settings(**flags)
    assert str(info.value).startswith(named)


def _shoal(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "shoal.cli", "agent", "iptables", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dry_run_prints_the_input_and_a_bad_flag_exits_2() -> None:
    done = _shoal("--dry-run", "--include-inbound-ports", "8080")
    assert done.returncode == 0, done.stderr
    assert done.stdout == iptables.rules(iptables.settings(include_inbound_ports="8080"))
    bad = _shoal("--dry-run", "--exclude-outbound-cidrs", "10.0.0.0/40")
    assert bad.returncode == 2
    assert "--exclude-outbound-cidrs" in bad.stderr


def test_without_iptables_restore_it_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "agent", "iptables"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert "is not installed" in done.stderr


@pytest.fixture
def pod_net() -> netns.PodNetwork:
    # make test installs iptables and runs as root here and in CI: a machine
    # that cannot is a failure to see, not a test to skip.
    why = netns.available("iptables-restore", "iptables-save")
    if why is not None:
        raise RuntimeError(f"capture cannot be tested here: {why}")
    return netns.PodNetwork()


def _nat(net: netns.PodNetwork) -> list[str]:
    return [
        line
        for line in net.exec("iptables-save", "-t", "nat").splitlines()
        if line.startswith(("-A", ":SHOAL"))
    ]


def test_the_rules_are_installed_in_the_pods_namespace_and_a_rerun_changes_nothing(
    pod_net: netns.PodNetwork,
) -> None:
    host_before = subprocess.run(
        ["iptables-save", "-t", "nat"], capture_output=True, text=True
    ).stdout
    flags = ("--exclude-outbound-cidrs", "169.254.169.254/32", "--exclude-inbound-ports", "22")
    with pod_net as net:
        done = _shoal(*flags, prefix=tuple(net.prefix))
        assert done.returncode == 0, done.stderr
        installed = _nat(net)
        for line in installed:
            assert "SHOAL" in line
        # iptables-save prints rules its own way; each of ours is there.
        assert "-A PREROUTING -p tcp -j SHOAL_INBOUND" in installed
        assert "-A OUTPUT -p tcp -j SHOAL_OUTPUT" in installed
        assert "-A SHOAL_OUTPUT -m owner --uid-owner 1337 -j RETURN" in installed
        assert "-A SHOAL_OUTPUT -m owner --gid-owner 1337 -j RETURN" in installed
        assert "-A SHOAL_INBOUND -p tcp -m tcp --dport 15021 -j RETURN" in installed
        assert "-A SHOAL_INBOUND -p tcp -m tcp --dport 22 -j RETURN" in installed
        assert "-A SHOAL_OUTPUT -d 169.254.169.254/32 -j RETURN" in installed
        assert "-A SHOAL_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in installed
        assert "-A SHOAL_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in installed
        # A restarted init container: same rules, no duplicate jumps.
        again = _shoal(*flags, prefix=tuple(net.prefix))
        assert again.returncode == 0, again.stderr
        assert _nat(net) == installed
    host_after = subprocess.run(
        ["iptables-save", "-t", "nat"], capture_output=True, text=True
    ).stdout
    assert "SHOAL_" not in host_after or host_after == host_before, "the host was touched"
