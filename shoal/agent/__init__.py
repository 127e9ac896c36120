"""The sidecar's entry point in a Pod (`shoal agent`, like Istio's pilot-agent).

It earns the Pod its xDS client certificate with the Pod's projected
service-account token (identity.py), writes Envoy's bootstrap and runs Envoy
(proxy.py), renews the certificate before it expires, serves readiness and
the Pod's rewritten probes (health.py), and drains Envoy on SIGTERM
(run.py). `shoal agent iptables`, the init container, installs the capture
rules (iptables.py). What it reads from its Pod is in settings.py.
"""
