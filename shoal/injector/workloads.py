"""Where the Pod is in the objects `shoal inject -f` reads: a Pod itself,
the template of a Deployment and the other controllers, a CronJob's job
template, each item of a List."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from shoal.injector import patch, settings

TEMPLATE = ("spec", "template")
CRONJOB_TEMPLATE = ("spec", "jobTemplate", "spec", "template")
KINDS: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": TEMPLATE,
    "StatefulSet": TEMPLATE,
    "DaemonSet": TEMPLATE,
    "ReplicaSet": TEMPLATE,
    "ReplicationController": TEMPLATE,
    "Job": TEMPLATE,
    "CronJob": CRONJOB_TEMPLATE,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one object: injected, skipped (and why), or left
    alone because it has no Pod."""

    what: str
    injected: bool
    reason: str = ""


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    return f"{obj.get('kind', '?')} {namespace}/{meta.get('name', '?')}"


def _walk(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def inject_object(obj: Any, s: settings.Settings, report: Callable[[Outcome], None]) -> Any:
    """The object with its Pod (or Pods) injected; others as they were.
    patch.InjectionError names the object."""
    if not isinstance(obj, dict):
        return obj
    kind = obj.get("kind")
    if kind == "List" and isinstance(obj.get("items"), list):
        return {**obj, "items": [inject_object(i, s, report) for i in obj["items"]]}
    path = KINDS.get(str(kind)) if isinstance(kind, str) else None
    if path is None:
        return obj
    pod = obj if not path else _walk(obj, path)
    what = _name(obj)
    if not isinstance(pod, dict):
        report(Outcome(what, False, "it has no Pod template"))
        return obj
    namespace = str((obj.get("metadata") or {}).get("namespace") or "")
    # The controller's own annotations do not reach its Pods: only the
    # template's decide, as they do in the cluster.
    try:
        outcome = patch.inject(pod, s, namespace)
    except patch.InjectionError as err:
        raise patch.InjectionError(f"{what}: {err}") from None
    if isinstance(outcome, patch.Skipped):
        report(Outcome(what, False, outcome.reason))
        return obj
    report(Outcome(what, True))
    if not path:
        return outcome.pod
    result = dict(obj)
    holder = result
    for key in path[:-1]:
        holder[key] = dict(holder[key])
        holder = holder[key]
    holder[path[-1]] = outcome.pod
    return result


def objects(
    docs: Iterator[Any], s: settings.Settings, report: Callable[[Outcome], None]
) -> Iterator[Any]:
    for doc in docs:
        yield inject_object(doc, s, report)
