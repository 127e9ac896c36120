"""Where a proxy's xDS stream came from, as gRPC names the peer."""

from __future__ import annotations

import ipaddress


def on_this_host(peer: str) -> bool:
    """Whether a gRPC peer string (`ipv4:127.0.0.1:5555`, `ipv6:[::1]:5`)
    is this host: only then is a sidecar's admin at 127.0.0.1 here too."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return kind == "unix"
