"""xDS responses as bytes, without building messages.

A resource is serialized once (cache.Resource) and every response is a
concatenation of fields around those bytes, as protobuf's wire format allows:
a message is its fields in any order, a repeated field is its elements one
after another. The field numbers are those of envoy.service.discovery.v3's
DiscoveryResponse and DeltaDiscoveryResponse and of its Resource.
"""

from __future__ import annotations

from collections.abc import Iterable


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]  # every tag, and a name's or nonce's length
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


_SMALL = tuple(bytes((n,)) for n in range(0x80))


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field: tag, length, bytes."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _header(field_number: int, length: int) -> bytes:
    """A length-delimited field's tag and length, its payload to follow."""
    return _varint(field_number << 3 | 2) + _varint(length)


def _any(type_url: str, body: tuple[bytes, ...]) -> tuple[list[bytes], int]:
    """An Any of the message `body` (in pieces) as protobuf encodes it:
    type_url (1), then value (2) unless empty. The pieces, and their length."""
    size = sum(map(len, body))
    out = [length_delimited(1, type_url.encode())]
    if size:
        out.append(_header(2, size))
        out.extend(body)
    return out, sum(map(len, out[:2])) + size


def sotw_resource(type_url: str, body: tuple[bytes, ...]) -> bytes:
    """DiscoveryResponse.resources (2): the resource as an Any. Joined once
    from its pieces: a route table is megabytes, and each concatenation
    would copy all of it again."""
    pieces, size = _any(type_url, body)
    return b"".join((_header(2, size), *pieces))


def delta_resource(version: str, type_url: str, body: tuple[bytes, ...], name: str) -> bytes:
    """DeltaDiscoveryResponse.resources (2): a Resource with version (1),
    resource (2) and name (3), joined once from its pieces."""
    pieces, size = _any(type_url, body)
    head = length_delimited(1, version.encode()) + _header(2, size)
    tail = length_delimited(3, name.encode())
    return b"".join((_header(2, len(head) + size + len(tail)), head, *pieces, tail))


def sotw_response(version: str, resources: Iterable[bytes], type_url: str, nonce: str) -> bytes:
    """A DiscoveryResponse: version_info (1), the `resources` fields as
    encoded (in pieces: the shared parts' own bytes), type_url (4), nonce
    (5). One join: with ten thousand clusters a response is megabytes, and
    each concatenation would copy all of it again."""
    return b"".join(
        (
            length_delimited(1, version.encode()),
            *resources,
            length_delimited(4, type_url.encode()),
            length_delimited(5, nonce.encode()),
        )
    )


def delta_response(
    version: str, resources: Iterable[bytes], type_url: str, removed: Iterable[str], nonce: str
) -> bytes:
    """A DeltaDiscoveryResponse: system_version_info (1), the `resources`
    fields as encoded (in pieces, joined once), type_url (4),
    removed_resources (6), nonce (5)."""
    return b"".join(
        (
            length_delimited(1, version.encode()),
            *resources,
            length_delimited(4, type_url.encode()),
            *(length_delimited(6, name.encode()) for name in removed),
            length_delimited(5, nonce.encode()),
        )
    )
