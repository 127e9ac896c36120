"""Where the API server is and how to prove who we are: in-cluster
configuration in a Pod, else kubeconfig.

The `kubernetes` package is used for what it is good at here, and only
here: reading kubeconfig and in-cluster configuration (contexts, exec
plugins, rotating service-account tokens). It is imported when a
configuration is read, not with this module: it takes a while to import.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ApiServer:
    """How to reach the API server and prove who we are."""

    url: str
    ssl: ssl.SSLContext | bool
    # Called per request: projected service-account tokens rotate.
    authorization: Callable[[], str | None] = lambda: None
    # shoal's own (its Pod's, or the kubeconfig context's): where its Secret
    # and Lease live.
    namespace: str = "default"


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def connect(
    kubeconfig: str | None = None,
    context: str | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> ApiServer:
    """In-cluster configuration when running in a Pod (and no kubeconfig is
    named), else kubeconfig (KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client
    from kubernetes.config import incluster_config, kube_config

    # The package's loaders carry no type hints.
    in_cluster: Any = incluster_config
    from_file: Any = kube_config
    cfg = client.Configuration()
    namespace = "default"
    if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in environ:
        # The token file is re-read as it rotates (projected tokens last an
        # hour): the loader installs a refresh hook that authorization() runs.
        in_cluster.InClusterConfigLoader(
            token_filename=os.path.join(service_account_dir, "token"),
            cert_filename=os.path.join(service_account_dir, "ca.crt"),
            environ=environ,
        ).load_and_set(client_configuration=cfg)
        with (
            contextlib.suppress(OSError),
            open(os.path.join(service_account_dir, "namespace")) as f,
        ):
            namespace = f.read().strip() or namespace
    else:
        from_file.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=cfg
        )
        with contextlib.suppress(Exception):
            contexts, active = from_file.list_kube_config_contexts(config_file=kubeconfig)
            if context is not None:
                active = next(c for c in contexts if c["name"] == context)
            namespace = active["context"].get("namespace") or namespace
    namespace = environ.get("POD_NAMESPACE", namespace)
    tls: ssl.SSLContext | bool = False
    if cfg.host.startswith("https"):
        if cfg.verify_ssl:
            tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        else:
            tls = ssl.create_default_context()
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            tls.load_cert_chain(cfg.cert_file, cfg.key_file)

    def authorization() -> str | None:
        # auth_settings() runs the loader's refresh hook (rotated tokens,
        # exec plugins) and says what goes in the Authorization header.
        settings: Any = cfg.auth_settings()
        value = (settings.get("BearerToken") or {}).get("value")
        return str(value) if value else None

    return ApiServer(cfg.host.rstrip("/"), tls, authorization, namespace)
