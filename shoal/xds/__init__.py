"""xDS: translation to Envoy protos, the resource cache and the ADS server."""
