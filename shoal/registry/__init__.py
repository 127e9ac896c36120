"""Sources of the mesh model: a manifests folder, or (later) the Kubernetes API."""
