"""Analyzers: injection.

A namespace labelled `shoal.io/inject=enabled` asks for a sidecar in every
Pod created in it. A Pod there without one (created before the label, or
while the webhook was absent or failed open) is outside the mesh; a label
with no webhook configuration to act on it injects nothing at all.

Only a control plane on Kubernetes knows whether shoal's webhook
configuration exists (Facts.injection_webhook). Elsewhere (a manifests
folder, `shoal analyze -f`) a Pod is what its file says before any webhook
ran, so a missing sidecar there means nothing and neither analyzer speaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from shoal.injector import patch, settings
from shoal.model import mesh, problems
from shoal.observe.analysis import facts

LABEL = f"{settings.INJECT_LABEL}={settings.INJECT_ENABLED}"


def injected_namespaces(state: mesh.MeshState) -> list[str]:
    """Namespaces whose new Pods get a sidecar: labelled, and not one the
    injector always leaves alone."""
    return sorted(
        ns.name
        for ns in state.namespaces.values()
        if ns.labels.get(settings.INJECT_LABEL) == settings.INJECT_ENABLED
        and ns.name not in patch.SYSTEM_NAMESPACES
    )


def without_sidecar(state: mesh.MeshState, namespaces: Iterable[str]) -> dict[str, list[mesh.Pod]]:
    """Pods of `namespaces` that run, were not left out on purpose, and
    have no sidecar, by namespace (in one pass over the Pods)."""
    out: dict[str, list[mesh.Pod]] = {ns: [] for ns in namespaces}
    for (ns, _), pod in state.pods.items():
        if ns in out and not (pod.sidecar or pod.opted_out or pod.finished):
            out[ns].append(pod)
    for pods in out.values():
        pods.sort(key=lambda pod: pod.name)
    return out


def analyze(found: facts.Facts) -> Iterator[problems.Problem]:
    installed = found.injection_webhook
    if installed is None:
        return
    for namespace, missing in without_sidecar(
        found.state, injected_namespaces(found.state)
    ).items():
        if not installed:
            yield problems.Problem(
                source="",
                subject=f"Namespace {namespace}",
                reason=(
                    f"it is labelled {LABEL}, but shoal's MutatingWebhookConfiguration is not "
                    "installed: Pods created in it start without a sidecar"
                    + (f" ({len(missing)} run without one now)" if missing else "")
                ),
                code="SHL0306",
                field=f"metadata.labels[{settings.INJECT_LABEL}]",
            )
        for pod in missing:
            yield _sidecar_missing(pod, webhook_installed=installed)


def _sidecar_missing(pod: mesh.Pod, *, webhook_installed: bool) -> problems.Problem:
    recreate = (
        f"`kubectl delete pod -n {pod.namespace} {pod.name}` (or `kubectl rollout restart` "
        "its workload)"
    )
    if webhook_installed:
        why = "it was created before the label, or while the webhook could not be reached"
        fix = (
            f"Recreate the Pod: {recreate}; the webhook injects the new one. To keep it out "
            f'of the mesh on purpose, annotate it `{settings.INJECT_ANNOTATION}: "false"`.'
        )
    else:
        why = "no injection webhook is installed (SHL0306)"
        fix = (
            "Install the webhook (`kubectl apply -f examples/kubernetes/webhook.yaml`), then "
            f"recreate the Pod: {recreate}."
        )
    return problems.Problem(
        source="",
        subject=f"Pod {pod.namespace}/{pod.name}",
        reason=(
            f"its namespace is labelled {LABEL}, but it runs without the "
            f"{settings.PROXY_CONTAINER} container: {why}; its traffic is neither captured "
            "nor encrypted by the mesh"
        ),
        code="SHL0305",
        field="spec.initContainers",
        fix=fix,
    )
