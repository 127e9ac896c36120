"""Code generated from protos/ by grpcio-tools at build time (make)."""
