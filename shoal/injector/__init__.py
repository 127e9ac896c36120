"""Sidecar injection: what a Pod needs to join the mesh, as a JSONPatch.

`settings` says what to inject (image, control plane addresses, resources),
`patch` is the pure builder from a Pod to the injected Pod and the JSONPatch
between them, `workloads` finds the Pod template in Deployments and other
controllers (for `shoal inject`), `webhook` serves AdmissionReview v1 over
HTTPS and `bundle` keeps the webhook configuration's caBundle current.
"""
