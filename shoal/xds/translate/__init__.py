"""Pure functions from the mesh model to Envoy protos, one module per type."""
