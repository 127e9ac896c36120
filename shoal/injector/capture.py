"""The capture annotations of a Pod, checked, as a model.capture.Capture.

Every error names the annotation and what is wrong: the Pod is refused with
it rather than started with capture the user did not ask for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from shoal.injector import settings
from shoal.model import capture

T = TypeVar("T")


class AnnotationError(ValueError):
    def __init__(self, annotation: str, reason: str) -> None:
        super().__init__(f"annotation {annotation}: {reason}")
        self.annotation = annotation


def _read(annotations: Mapping[str, str], name: str, default: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(annotations.get(name, default))
    except ValueError as err:
        raise AnnotationError(name, str(err)) from None


def of(annotations: Mapping[str, str], proxy_uid: int) -> capture.Capture:
    """The Pod's capture; AnnotationError for the first bad annotation."""
    return capture.Capture(
        outbound_port=settings.OUTBOUND_PORT,
        inbound_port=settings.INBOUND_PORT,
        proxy_uid=proxy_uid,
        proxy_gid=proxy_uid,
        include_inbound_ports=_read(
            annotations, settings.INCLUDE_INBOUND_PORTS, capture.ALL, capture.included_ports
        ),
        exclude_inbound_ports=_read(
            annotations, settings.EXCLUDE_INBOUND_PORTS, "", capture.inbound_excluded
        ),
        include_outbound_cidrs=_read(
            annotations, settings.INCLUDE_OUTBOUND_CIDRS, capture.ALL, capture.included_cidrs
        ),
        exclude_outbound_cidrs=_read(
            annotations, settings.EXCLUDE_OUTBOUND_CIDRS, "", capture.cidrs
        ),
        exclude_outbound_ports=_read(
            annotations, settings.EXCLUDE_OUTBOUND_PORTS, "", capture.ports
        ),
    )
