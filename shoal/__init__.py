"""shoal: a service mesh control plane for Envoy."""
