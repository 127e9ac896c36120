"""`shoal demo`: a small mesh of real apps behind real Envoy sidecars."""
