"""The capture annotations of a Pod, checked, as flags of `shoal agent iptables`.

Every error names the annotation and what is wrong: the Pod is refused with
it rather than started with capture the user did not ask for.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from shoal.injector import settings

ALL = "*"
MAX_ENTRIES = 64
_PORT = re.compile(r"^[0-9]{1,5}\Z")


class AnnotationError(ValueError):
    def __init__(self, annotation: str, reason: str) -> None:
        super().__init__(f"annotation {annotation}: {reason}")
        self.annotation = annotation


def _entries(annotation: str, value: str) -> list[str]:
    entries = [part.strip() for part in value.split(",") if part.strip()]
    if len(entries) > MAX_ENTRIES:
        raise AnnotationError(annotation, f"{len(entries)} entries; at most {MAX_ENTRIES}")
    return entries


def ports(annotation: str, value: str) -> tuple[int, ...]:
    found: list[int] = []
    for entry in _entries(annotation, value):
        number = int(entry) if _PORT.match(entry) else 0
        if not 0 < number < 65536:
            raise AnnotationError(annotation, f"{entry[:40]!r} is not a port (1-65535)")
        found.append(number)
    return tuple(sorted(set(found)))


def cidrs(annotation: str, value: str) -> tuple[ipaddress.IPv4Network, ...]:
    found: list[ipaddress.IPv4Network] = []
    for entry in _entries(annotation, value):
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise AnnotationError(annotation, f"{entry[:60]!r} is not an IP range") from None
        if not isinstance(network, ipaddress.IPv4Network):
            raise AnnotationError(
                annotation, f"{entry[:60]!r}: only IPv4 traffic is captured, so only IPv4 ranges"
            )
        found.append(network)
    return tuple(sorted(set(found)))


def _joined(values: tuple[object, ...]) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True, slots=True)
class Capture:
    """What iptables in the Pod redirects; None for "everything"."""

    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()
    include_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] | None = None
    exclude_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()

    def flags(self, proxy_uid: int) -> list[str]:
        """The init container's arguments after `shoal agent iptables`."""
        excluded_inbound = tuple(
            sorted({*settings.SIDECAR_INBOUND_PORTS, *self.exclude_inbound_ports})
        )
        return [
            "--outbound-port",
            str(settings.OUTBOUND_PORT),
            "--inbound-port",
            str(settings.INBOUND_PORT),
            "--proxy-uid",
            str(proxy_uid),
            "--proxy-gid",
            str(proxy_uid),
            "--include-inbound-ports",
            ALL if self.include_inbound_ports is None else _joined(self.include_inbound_ports),
            "--exclude-inbound-ports",
            _joined(excluded_inbound),
            "--include-outbound-cidrs",
            ALL if self.include_outbound_cidrs is None else _joined(self.include_outbound_cidrs),
            "--exclude-outbound-cidrs",
            _joined(self.exclude_outbound_cidrs),
            "--exclude-outbound-ports",
            _joined(self.exclude_outbound_ports),
        ]


def of(annotations: Mapping[str, str]) -> Capture:
    """The Pod's capture; AnnotationError for the first bad annotation."""
    include_in = annotations.get(settings.INCLUDE_INBOUND_PORTS)
    include_out = annotations.get(settings.INCLUDE_OUTBOUND_CIDRS)
    return Capture(
        include_inbound_ports=(
            None
            if include_in is None or include_in.strip() == ALL
            else ports(settings.INCLUDE_INBOUND_PORTS, include_in)
        ),
        exclude_inbound_ports=ports(
            settings.EXCLUDE_INBOUND_PORTS, annotations.get(settings.EXCLUDE_INBOUND_PORTS, "")
        ),
        include_outbound_cidrs=(
            None
            if include_out is None or include_out.strip() == ALL
            else cidrs(settings.INCLUDE_OUTBOUND_CIDRS, include_out)
        ),
        exclude_outbound_cidrs=cidrs(
            settings.EXCLUDE_OUTBOUND_CIDRS, annotations.get(settings.EXCLUDE_OUTBOUND_CIDRS, "")
        ),
        exclude_outbound_ports=ports(
            settings.EXCLUDE_OUTBOUND_PORTS, annotations.get(settings.EXCLUDE_OUTBOUND_PORTS, "")
        ),
    )
