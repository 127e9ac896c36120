"""`shoal agent iptables`: the init container's capture rules.

`rules` is a pure function from the settings to iptables-restore input for
the nat table (the shape of Istio's istio-iptables, with shoal's names):

- inbound: PREROUTING -> SHOAL_INBOUND, which leaves the excluded ports
  alone (the sidecar's own 15020, 15021, 15090 always) and sends the
  included ones (all, or a list) to SHOAL_IN_REDIRECT -> the inbound port;
- outbound: OUTPUT -> SHOAL_OUTPUT, which leaves alone the proxy's own
  traffic (its UID and GID: else Envoy's calls would loop back into it),
  loopback and 127.0.0.1, the excluded CIDRs and ports, and sends the rest
  (to the included CIDRs, or everywhere) to SHOAL_REDIRECT -> the outbound
  port. Envoy calling its own Pod's IP over lo goes to inbound, so a Pod
  calling its own Service still passes the inbound policy.

Applied with `iptables-restore --noflush`: the Pod's other rules stay;
chains declared in the input are flushed, and jumps from PREROUTING/OUTPUT
left by an earlier run (a restarted init container) are deleted first, so
applying twice gives what applying once gives.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from typing import TypeVar

from shoal.model import capture

T = TypeVar("T")

INBOUND = "SHOAL_INBOUND"
IN_REDIRECT = "SHOAL_IN_REDIRECT"
OUTPUT = "SHOAL_OUTPUT"
REDIRECT = "SHOAL_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
Capture = capture.Capture


class FlagError(ValueError):
    """A flag's value is not valid; the message names the flag."""


def _flag(flag: str, parse: Callable[[str], T], text: str) -> T:
    try:
        return parse(text)
    except ValueError as err:
        raise FlagError(f"{flag}: {err}") from None


def identity(flag: str, value: int) -> int:
    if not 0 <= value <= 2**32 - 2:
        raise FlagError(f"{flag}: {value} is not a user or group id")
    return value


def settings(
    *,
    outbound_port: str = "15001",
    inbound_port: str = "15006",
    proxy_uid: str = "1337",
    proxy_gid: str = "1337",
    include_inbound_ports: str = capture.ALL,
    exclude_inbound_ports: str = "",
    include_outbound_cidrs: str = capture.ALL,
    exclude_outbound_cidrs: str = "",
    exclude_outbound_ports: str = "",
) -> Capture:
    """Capture from the flags' text; FlagError names a bad flag."""

    def number(flag: str, text: str) -> int:
        if not (text.isascii() and text.isdigit()) or len(text) > 10:
            raise FlagError(f"{flag}: {text[:40]!r} is not a number")
        return identity(flag, int(text))

    return Capture(
        outbound_port=_flag("--outbound-port", capture.port, outbound_port),
        inbound_port=_flag("--inbound-port", capture.port, inbound_port),
        proxy_uid=number("--proxy-uid", proxy_uid),
        proxy_gid=number("--proxy-gid", proxy_gid),
        include_inbound_ports=_flag(
            "--include-inbound-ports", capture.included_ports, include_inbound_ports
        ),
        exclude_inbound_ports=_flag(
            "--exclude-inbound-ports", capture.inbound_excluded, exclude_inbound_ports
        ),
        include_outbound_cidrs=_flag(
            "--include-outbound-cidrs", capture.included_cidrs, include_outbound_cidrs
        ),
        exclude_outbound_cidrs=_flag(
            "--exclude-outbound-cidrs", capture.cidrs, exclude_outbound_cidrs
        ),
        exclude_outbound_ports=_flag(
            "--exclude-outbound-ports", capture.ports, exclude_outbound_ports
        ),
    )


def _stale_jumps(existing_nat: str) -> list[str]:
    """`-D` lines for jumps into shoal's chains an earlier run left in the
    built-in chains (iptables-save -t nat output)."""
    out = []
    for line in existing_nat.splitlines():
        parts = line.split()
        if (
            len(parts) > 2
            and parts[0] == "-A"
            and parts[1] in ("PREROUTING", "OUTPUT")
            and parts[-1] in CHAINS
            and parts[-2] == "-j"
        ):
            out.append("-D" + line[2:])
    return out


def rules(c: Capture, existing_nat: str = "") -> str:
    """The iptables-restore input (nat table) for `c`. `existing_nat` is the
    table as it is now (iptables-save), for re-runs."""
    uid, gid = str(c.proxy_uid), str(c.proxy_gid)
    out = ["*nat", *(f":{chain} - [0:0]" for chain in CHAINS), *_stale_jumps(existing_nat)]
    out.append(f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {c.inbound_port}")
    out.append(f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {c.outbound_port}")

    if c.include_inbound_ports is None or c.include_inbound_ports:
        out.append(f"-A PREROUTING -p tcp -j {INBOUND}")
    if c.include_inbound_ports is None:
        out += [f"-A {INBOUND} -p tcp --dport {p} -j RETURN" for p in c.exclude_inbound_ports]
        out.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
    else:
        out += [
            f"-A {INBOUND} -p tcp --dport {p} -j {IN_REDIRECT}"
            for p in c.include_inbound_ports
            if p not in c.exclude_inbound_ports
        ]

    out.append(f"-A OUTPUT -p tcp -j {OUTPUT}")
    # The proxy's inbound passthrough to its own app: never back into it.
    out.append(f"-A {OUTPUT} -s {capture.INBOUND_PASSTHROUGH_SOURCE}/32 -o lo -j RETURN")
    for flag, value in (("--uid-owner", uid), ("--gid-owner", gid)):
        out += [
            # The proxy calling its own Pod's IP (a Pod calling its own
            # Service): through inbound, as a call from outside would be.
            f"-A {OUTPUT} ! -d 127.0.0.1/32 -o lo -m owner {flag} {value} -j {IN_REDIRECT}",
            # The app calling itself over loopback: left alone.
            f"-A {OUTPUT} -o lo -m owner ! {flag} {value} -j RETURN",
            # The proxy's own traffic: never captured (it would loop).
            f"-A {OUTPUT} -m owner {flag} {value} -j RETURN",
        ]
    out.append(f"-A {OUTPUT} -d 127.0.0.1/32 -j RETURN")
    out += [f"-A {OUTPUT} -p tcp --dport {p} -j RETURN" for p in c.exclude_outbound_ports]
    out += [f"-A {OUTPUT} -d {cidr} -j RETURN" for cidr in c.exclude_outbound_cidrs]
    if c.include_outbound_cidrs is None:
        out.append(f"-A {OUTPUT} -j {REDIRECT}")
    else:
        out += [f"-A {OUTPUT} -d {cidr} -j {REDIRECT}" for cidr in c.include_outbound_cidrs]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


class ApplyError(RuntimeError):
    pass


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ApplyError(
            f"{name} is not installed: the init container's image needs iptables "
            "(Debian's iptables package)"
        )
    return found


def current_nat() -> str:
    """The nat table now, as iptables-save prints it."""
    result = subprocess.run(
        [_tool("iptables-save"), "-t", "nat"], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise ApplyError(f"iptables-save -t nat failed: {result.stderr.strip()[:2000]}")
    return result.stdout


def apply(c: Capture) -> str:
    """Install the rules in this network namespace; the input applied."""
    restore = _tool("iptables-restore")
    text = rules(c, current_nat())
    result = subprocess.run(
        [restore, "--noflush"], input=text, capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise ApplyError(
            f"iptables-restore --noflush failed ({result.returncode}): "
            f"{result.stderr.strip()[:2000]}\ninput was:\n{text}"
        )
    return text
