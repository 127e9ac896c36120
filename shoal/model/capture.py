"""What iptables in a captured Pod sends to its sidecar.

The injector reads it from a Pod's annotations and writes it as the init
container's flags; `shoal agent iptables` reads the flags back and turns
them into rules. Both parse with the functions here, so a value one
accepts the other accepts too, with the same reason when it does not.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

ALL = "*"
# The source address of the sidecar's inbound passthrough (a connection to
# a port of the Pod no Service declares, handed on to the app at the Pod's
# IP): iptables lets it through, where the proxy's other connections to its
# own Pod's IP are sent to inbound capture. Without it, each such
# connection would be captured back into the proxy, which would connect
# again, without end. Istio uses the same address for the same reason.
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"
# The sidecar's own inbound ports, never captured: 15020 (Istio's merged
# metrics port, kept free), 15021 health (kubelet's probes), 15090 Prometheus.
ALWAYS_EXCLUDED_INBOUND = (15020, 15021, 15090)
MAX_ENTRIES = 64
_PORT = re.compile(r"^[0-9]{1,5}\Z")


def _entries(text: str) -> list[str]:
    entries = [part.strip() for part in text.split(",") if part.strip()]
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"{len(entries)} entries; at most {MAX_ENTRIES}")
    return entries


def port(text: str) -> int:
    text = text.strip()
    number = int(text) if _PORT.match(text) else 0
    if not 0 < number < 65536:
        raise ValueError(f"{text[:40]!r} is not a port (1-65535)")
    return number


def ports(text: str) -> tuple[int, ...]:
    """A comma list of ports ('' for none), sorted, without repeats;
    ValueError says which entry is wrong."""
    return tuple(sorted({port(entry) for entry in _entries(text)}))


def cidrs(text: str) -> tuple[str, ...]:
    """A comma list of IPv4 ranges ('' for none), normalised, sorted."""
    found: set[ipaddress.IPv4Network] = set()
    for entry in _entries(text):
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry[:60]!r} is not an IP range (like 10.0.0.0/8)") from None
        if not isinstance(network, ipaddress.IPv4Network):
            raise ValueError(f"{entry[:60]!r} is IPv6: only IPv4 traffic is captured")
        found.add(network)
    return tuple(str(n) for n in sorted(found))


@dataclass(frozen=True, slots=True)
class Capture:
    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    # None: every port ("*"); () captures no inbound traffic.
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ALWAYS_EXCLUDED_INBOUND
    # None: every destination ("*"); () captures no outbound traffic.
    include_outbound_cidrs: tuple[str, ...] | None = None
    exclude_outbound_cidrs: tuple[str, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()

    def flags(self) -> list[str]:
        """The arguments of `shoal agent iptables` that stand for it."""

        def joined(values: tuple[object, ...] | None) -> str:
            return ALL if values is None else ",".join(str(v) for v in values)

        return [
            "--outbound-port",
            str(self.outbound_port),
            "--inbound-port",
            str(self.inbound_port),
            "--proxy-uid",
            str(self.proxy_uid),
            "--proxy-gid",
            str(self.proxy_gid),
            "--include-inbound-ports",
            joined(self.include_inbound_ports),
            "--exclude-inbound-ports",
            joined(self.exclude_inbound_ports),
            "--include-outbound-cidrs",
            joined(self.include_outbound_cidrs),
            "--exclude-outbound-cidrs",
            joined(self.exclude_outbound_cidrs),
            "--exclude-outbound-ports",
            joined(self.exclude_outbound_ports),
        ]


def inbound_excluded(text: str) -> tuple[int, ...]:
    """Ports left alone inbound: these and the sidecar's own."""
    return tuple(sorted({*ALWAYS_EXCLUDED_INBOUND, *ports(text)}))


def included_ports(text: str) -> tuple[int, ...] | None:
    return None if text.strip() == ALL else ports(text)


def included_cidrs(text: str) -> tuple[str, ...] | None:
    return None if text.strip() == ALL else cidrs(text)
