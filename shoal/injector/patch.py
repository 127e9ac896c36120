"""A Pod in, the injected Pod and the JSONPatch between them out; pure.

The webhook and `shoal inject` both use it, so what a cluster injects is
what `shoal inject -f` prints. Injecting an injected Pod changes nothing,
which makes the webhook safe under reinvocation.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.injector import capture, probes, settings

JSON = dict[str, Any]
# Namespaces whose Pods are never injected, whatever their labels say: the
# cluster's own, and the control plane's (added by the caller).
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})


class InjectionError(ValueError):
    """The Pod asks for something that cannot be injected; the message
    names the Pod and the reason."""


@dataclass(frozen=True, slots=True)
class Skipped:
    reason: str


@dataclass(frozen=True, slots=True)
class Injected:
    pod: JSON
    patch: list[JSON]


def describe(pod: Mapping[str, Any], namespace: str = "") -> str:
    meta = pod.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name")
    generated = meta.get("generateName")
    if not isinstance(name, str) or not name:
        name = f"{generated}*" if isinstance(generated, str) and generated else "(template)"
    where = namespace or meta.get("namespace")
    return f"Pod {where if isinstance(where, str) and where else 'default'}/{name[:253]}"


def _annotations(pod: Mapping[str, Any]) -> dict[str, str]:
    found = (pod.get("metadata") or {}).get("annotations") or {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, Mapping) else {}


def _named(items: Any) -> list[Mapping[str, Any]]:
    return [c for c in items if isinstance(c, Mapping)] if isinstance(items, list) else []


def _shape_problem(pod: Mapping[str, Any]) -> str | None:
    """What the API server would have refused in decoding: the builder
    works on Pods, not on any JSON."""
    meta = pod.get("metadata", {})
    if not isinstance(meta, Mapping):
        return "metadata is not an object"
    for field in ("annotations", "labels"):
        values = meta.get(field) or {}
        if not isinstance(values, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            return f"metadata.{field} is not a map of strings"
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return "it has no spec"
    for field in ("containers", "initContainers", "volumes"):
        items = spec.get(field) or []
        if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
            return f"spec.{field} is not a list of objects"
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        if not isinstance(c.get("name"), str):
            return "a container has no name"
    return None


def skip_reason(
    pod: Mapping[str, Any], namespace: str, skip_namespaces: frozenset[str] = frozenset()
) -> str | None:
    """Why this Pod is left as it is, or None to inject it; InjectionError
    if it is not a Pod."""
    problem = _shape_problem(pod)
    if problem is not None:
        raise InjectionError(f"{describe(pod, namespace)}: {problem}")
    spec = pod["spec"]
    if namespace in SYSTEM_NAMESPACES or namespace in skip_namespaces:
        return f"namespace {namespace} is never injected"
    annotations = _annotations(pod)
    if annotations.get(settings.INJECT_ANNOTATION, "").strip().lower() == "false":
        return f'annotation {settings.INJECT_ANNOTATION}: "false"'
    if spec.get("hostNetwork") is True:
        return "it uses the host's network (hostNetwork), which capture would change for the node"
    if settings.STATUS_ANNOTATION in annotations:
        return "it is injected already"
    names = {c.get("name") for c in _named(spec.get("containers"))} | {
        c.get("name") for c in _named(spec.get("initContainers"))
    }
    if settings.PROXY_CONTAINER in names:
        return f"it has a container named {settings.PROXY_CONTAINER} already"
    return None


def _resources(s: settings.Settings, annotations: Mapping[str, str]) -> JSON:
    def pick(annotation: str, default: str) -> str:
        value = annotations.get(annotation)
        if value is None:
            return default
        if not settings.is_quantity(value.strip()):
            raise capture.AnnotationError(annotation, f"{value[:40]!r} is not a quantity")
        return value.strip()

    r = s.resources
    return {
        "requests": {
            "cpu": pick(settings.PROXY_CPU, r.cpu),
            "memory": pick(settings.PROXY_MEMORY, r.memory),
        },
        "limits": {
            "cpu": pick(settings.PROXY_CPU_LIMIT, r.cpu_limit),
            "memory": pick(settings.PROXY_MEMORY_LIMIT, r.memory_limit),
        },
    }


def _field_env(name: str, field: str) -> JSON:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field}}}


def _health_probe(period: int, failures: int) -> JSON:
    return {
        "httpGet": {"path": "/healthz/ready", "port": settings.HEALTH_PORT, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def init_container(s: settings.Settings, flags: list[str]) -> JSON:
    """Installs the capture rules, then exits; the only container with
    NET_ADMIN and NET_RAW, and the only one running as root."""
    return {
        "name": settings.INIT_CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["shoal", "agent", "iptables", *flags],
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def proxy_container(s: settings.Settings, resources: JSON, app_probes: str, workload: str) -> JSON:
    """The agent and Envoy, as a native sidecar (an init container that
    keeps running): the app starts once its startup probe passes, and a
    Job's Pod completes when its app containers do."""
    env = [
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("POD_UID", "metadata.uid"),
        _field_env("POD_IP", "status.podIP"),
        _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        {"name": "SHOAL_TOKEN_PATH", "value": f"{settings.TOKEN_DIR}/{settings.TOKEN_FILE}"},
        {"name": "SHOAL_WORKLOAD", "value": workload},
        {"name": "SHOAL_APP_PROBES", "value": app_probes},
    ]
    if s.trust_pem:
        env.append({"name": "SHOAL_CA_ROOT_PEM", "value": s.trust_pem})
    args = [
        "--xds-address",
        s.xds_address,
        "--ca-address",
        s.ca_address,
        "--trust-domain",
        s.trust_domain,
        "--drain-seconds",
        str(s.drain_s),
        # Incremental xDS: a change sends what changed (BENCHMARKS.md).
        *(["--delta"] if s.delta else []),
    ]
    return {
        "name": settings.PROXY_CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["shoal", "agent"],
        "args": args,
        "env": env,
        "ports": [
            {"name": "http-envoy-prom", "containerPort": settings.STATS_PORT, "protocol": "TCP"},
            {"name": "http-health", "containerPort": settings.HEALTH_PORT, "protocol": "TCP"},
        ],
        # The app starts only after this passes: Envoy has its configuration.
        "startupProbe": _health_probe(period=1, failures=600),
        "readinessProbe": _health_probe(period=5, failures=3),
        "resources": resources,
        "securityContext": {
            "runAsUser": s.proxy_uid,
            "runAsGroup": s.proxy_uid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": settings.TOKEN_VOLUME, "mountPath": settings.TOKEN_DIR, "readOnly": True},
            {"name": settings.WORK_VOLUME, "mountPath": settings.WORK_DIR},
        ],
    }


def volumes(s: settings.Settings) -> list[JSON]:
    """The Pod's service-account token for the mesh only (its audience), and
    a memory-backed folder for the agent's key, certificates and bootstrap:
    nothing the Pod's identity rests on is written to the node's disk."""
    return [
        {
            "name": settings.TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": s.audience,
                            "expirationSeconds": s.token_ttl_s,
                            "path": settings.TOKEN_FILE,
                        }
                    }
                ]
            },
        },
        {"name": settings.WORK_VOLUME, "emptyDir": {"medium": "Memory"}},
    ]


def _status(rewritten: Sequence[str]) -> str:
    return json.dumps(
        {
            "version": 1,
            "initContainers": [settings.INIT_CONTAINER, settings.PROXY_CONTAINER],
            "volumes": [settings.TOKEN_VOLUME, settings.WORK_VOLUME],
            "rewrittenProbes": sorted(rewritten),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def injected(pod: Mapping[str, Any], s: settings.Settings, namespace: str = "") -> JSON:
    """The Pod with its sidecar; InjectionError if an annotation is bad.
    The caller has checked `skip_reason`."""
    annotations = _annotations(pod)
    try:
        flags = capture.of(annotations, s.proxy_uid).flags()
        resources = _resources(s, annotations)
    except capture.AnnotationError as err:
        raise InjectionError(f"{describe(pod, namespace)}: {err}") from None
    result: JSON = copy.deepcopy(dict(pod))
    meta: JSON = result.setdefault("metadata", {})
    spec: JSON = result["spec"]
    containers = _named(spec.get("containers"))
    if not containers:
        raise InjectionError(f"{describe(pod, namespace)}: it has no containers")
    app_probes: dict[str, dict[str, Any]] = {}
    rewrite = annotations.get(settings.REWRITE_PROBES_ANNOTATION, "").strip().lower() != "false"
    if rewrite:
        spec["containers"], app_probes = probes.rewrite(containers)
    labels = meta.get("labels") or {}
    workload = str(labels.get("app") or labels.get("app.kubernetes.io/name") or "")
    spec["initContainers"] = [
        init_container(s, flags),
        proxy_container(s, resources, probes.encode(app_probes), workload),
        *[copy.deepcopy(dict(c)) for c in _named(spec.get("initContainers"))],
    ]
    spec["volumes"] = [*[copy.deepcopy(dict(v)) for v in _named(spec.get("volumes"))], *volumes(s)]
    added = {
        settings.STATUS_ANNOTATION: _status(list(app_probes)),
        # `kubectl logs` and `kubectl exec` pick the app, not the proxy.
        "kubectl.kubernetes.io/default-container": str(containers[0].get("name", "")),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.STATS_PORT),
        "prometheus.io/path": "/stats/prometheus",
    }
    # What the Pod says already stays: a Pod scraped its own way keeps it.
    meta["annotations"] = {
        **added,
        **annotations,
        settings.STATUS_ANNOTATION: added[settings.STATUS_ANNOTATION],
    }
    return result


_PATCHED = (("metadata", "annotations"), ("spec", "initContainers"), ("spec", "containers"),
            ("spec", "volumes"))  # fmt: skip


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[JSON]:
    """RFC 6902 operations from `before` to `after`, one per field the
    injector writes, each whole: simpler to read in an audit log than a
    list of insertions, and as exact."""
    ops: list[JSON] = []
    for parent, key in _PATCHED:
        if parent not in before and parent in after:
            ops.append({"op": "add", "path": f"/{parent}", "value": {}})
        old = (before.get(parent) or {}).get(key)
        new = (after.get(parent) or {}).get(key)
        if new is None or old == new:
            continue
        ops.append({"op": "add" if old is None else "replace", "path": f"/{parent}/{key}",
                    "value": new})  # fmt: skip
    return ops


def inject(
    pod: Mapping[str, Any],
    s: settings.Settings,
    namespace: str = "",
    skip_namespaces: frozenset[str] = frozenset(),
) -> Skipped | Injected:
    reason = skip_reason(pod, namespace or str((pod.get("metadata") or {}).get("namespace", "")),
                         skip_namespaces)  # fmt: skip
    if reason is not None:
        return Skipped(reason)
    after = injected(pod, s, namespace)
    return Injected(after, json_patch(pod, after))
