"""ADS on the wire, as the simulated proxies and the floor speak it: requests
encoded by hand, and cut-down views of the responses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from shoal.xds import resources

CDS = resources.CLUSTER
EDS = resources.ENDPOINT
LDS = resources.LISTENER
RDS = resources.ROUTE
SDS = resources.SECRET
HELLO = "bench.fanout/hello"  # the floor server's first response
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
ADS_METHODS = {"delta": "DeltaAggregatedResources", "sotw": "StreamAggregatedResources"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if not value:
            out.append(bits)
            return bytes(out)
        out.append(bits | 0x80)


def _field(number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _text(number: int, value: str) -> bytes:
    return _field(number, value.encode()) if value else b""


def identity(body: bytes) -> bytes:
    """The (de)serializer of bytes already encoded, or read no further."""
    return body


def delta_request(
    type_url: str, *, node: bytes = b"", nonce: str = "", encoded_names: bytes = b""
) -> bytes:
    """A DeltaDiscoveryRequest; `encoded_names` from encode_names() (the
    field number of resource_names_subscribe is 3, as in DiscoveryRequest)."""
    return b"".join(
        (
            _field(1, node) if node else b"",
            _text(2, type_url),
            encoded_names,
            _text(6, nonce),
        )
    )


def sotw_request(
    type_url: str,
    *,
    node: bytes = b"",
    version: str = "",
    nonce: str = "",
    encoded_names: bytes = b"",
) -> bytes:
    return b"".join(
        (
            _text(1, version),
            _field(2, node) if node else b"",
            encoded_names,
            _text(4, type_url),
            _text(5, nonce),
        )
    )


def encode_names(items: Sequence[str]) -> bytes:
    """`resource_names` (field 3) of a DiscoveryRequest, or
    `resource_names_subscribe` (field 3) of a DeltaDiscoveryRequest."""
    return b"".join(_text(3, n) for n in items)


def _raw_types() -> tuple[Any, Any]:
    """Cut-down views of discovery.proto's messages, so a client reads no more
    of a large response than it needs: a response's version (field 1 in both
    variants), resources (2) left as bytes, type URL (4) and nonce (5); and
    the name (3) of a delta Resource."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="bench_fanout.proto", package="bench_fanout")
    response = proto.message_type.add(name="RawResponse")
    response.field.add(name="version_info", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    response.field.add(name="resources", number=2, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    response.field.add(name="type_url", number=4, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    response.field.add(name="nonce", number=5, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    item = proto.message_type.add(name="RawResource")
    item.field.add(name="name", number=3, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("bench_fanout.RawResponse")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("bench_fanout.RawResource")),
    )


RawResponse, RawResource = _raw_types()
