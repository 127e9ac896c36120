"""A proxyless gRPC client (grpcio's own xDS support), run as its own process:
grpcio keeps one xDS client per process, configured from GRPC_XDS_BOOTSTRAP."""

from __future__ import annotations

import argparse
import collections
import json

import grpc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--header", action="append", default=[], help="NAME=VALUE")
    args = p.parse_args()
    metadata = [tuple(h.split("=", 1)) for h in args.header]
    counts: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(args.target) as channel:
        hello = channel.unary_unary(
            "/demo.Greeter/Hello",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for _ in range(args.count):
            try:
                reply = hello(b"", metadata=metadata, timeout=10, wait_for_ready=True)
                counts[reply.decode()] += 1
            except grpc.RpcError as err:
                counts[f"!{err.code().name}: {err.details()}"] += 1
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
