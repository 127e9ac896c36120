"""Kubernetes objects from any source, joined into one MeshState.

Sources put and remove whole objects; `build` joins them (EndpointSlices to
Services by label, endpoints to their Pods) and reports what does not join.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shoal.model import mesh, problems
from shoal.registry import manifests


@dataclass(frozen=True, slots=True)
class Sourced:
    """An object and where it came from (file and document, or API server)."""

    obj: manifests.KubeObject
    source: str


class ObjectStore:
    def __init__(self) -> None:
        self._by_source: dict[str, tuple[Sourced, ...]] = {}
        self._version = 0

    def replace_source(self, source: str, objects: Iterable[Sourced]) -> None:
        """Set everything one source (a file, a watch) contributes, atomically."""
        objs = tuple(objects)
        if objs:
            self._by_source[source] = objs
        else:
            self._by_source.pop(source, None)

    def sources(self) -> list[str]:
        return sorted(self._by_source)

    def build(self) -> tuple[mesh.MeshState, list[problems.Problem]]:
        found: list[problems.Problem] = []
        chosen: dict[tuple[str, str, str], Sourced] = {}
        for source in sorted(self._by_source):
            for item in self._by_source[source]:
                earlier = chosen.get(item.obj.key)
                if earlier is not None:
                    found.append(
                        problems.Problem(
                            item.source,
                            str(item.obj),
                            f"also defined in {earlier.source}; that one is used",
                        )
                    )
                    continue
                chosen[item.obj.key] = item

        services: dict[mesh.ServiceKey, mesh.Service] = {}
        namespaces: dict[str, mesh.Namespace] = {}
        accounts: set[tuple[str, str]] = set()
        pods: dict[tuple[str, str], manifests.PodInfo] = {}
        slices: list[Sourced] = []
        for item in chosen.values():
            obj = item.obj
            try:
                if obj.type == manifests.SERVICE:
                    svc = manifests.to_service(obj)
                    services[svc.key] = svc
                elif obj.type == manifests.NAMESPACE:
                    namespaces[obj.name] = manifests.to_namespace(obj)
                elif obj.type == manifests.SERVICE_ACCOUNT:
                    accounts.add((obj.namespace, obj.name))
                elif obj.type == manifests.POD:
                    pods[(obj.namespace, obj.name)] = manifests.to_pod(obj)
                elif obj.type == manifests.ENDPOINT_SLICE:
                    slices.append(item)
            except manifests.ManifestError as err:
                found.append(problems.Problem(item.source, str(obj), str(err)))

        endpoints: dict[mesh.ServiceKey, list[mesh.Endpoint]] = {}
        for item in sorted(slices, key=lambda s: s.obj.key):
            obj = item.obj
            try:
                key = mesh.ServiceKey(obj.namespace, manifests.slice_service(obj))
                if key not in services:
                    raise manifests.ManifestError(f"its Service {key} does not exist")
                endpoints.setdefault(key, []).extend(manifests.to_endpoints(obj, pods))
            except manifests.ManifestError as err:
                found.append(problems.Problem(item.source, str(obj), str(err)))

        self._version += 1
        state = mesh.MeshState(
            version=self._version,
            services=services,
            endpoints={k: tuple(v) for k, v in endpoints.items()},
            namespaces=namespaces,
            service_accounts=frozenset(accounts),
        )
        return state, sorted(found)
