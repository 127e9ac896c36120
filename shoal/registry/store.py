"""Kubernetes objects from any source, joined into one MeshState.

Sources put and remove whole objects; `build` joins them (EndpointSlices to
Services by label, endpoints to their Pods) and reports what does not join.

A build redoes only what the objects put or removed since the last one
touch: the store keeps each object's conversion and problems, each
Service's scoped form, endpoints and route, and indexes from a Pod or a
Service to the slices that name it, so that one annotation or one
EndpointSlice of ten thousand costs a few lookups, not a pass over the mesh.
The first build is the same code with every object changed.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shoal.model import changes, mesh, problems, routing
from shoal.registry import annotations as notes
from shoal.registry import gatewayapi, manifests, trafficroute

T = TypeVar("T")
K = TypeVar("K")
P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Sourced:
    """An object and where it came from (file and document, or API server)."""

    obj: manifests.KubeObject
    source: str


class ObjectStore:
    def __init__(self) -> None:
        self._by_source: dict[str, dict[tuple[str, str, str], Sourced]] = {}
        self._twice: dict[str, list[Sourced]] = {}
        self._version = 0
        # What a Service's annotations last said when they were valid: a
        # typo in one annotation must not undo that Service's routing.
        self._good_notes: dict[mesh.ServiceKey, dict[str, object]] = {}
        self._good_routes: dict[mesh.ServiceKey, routing.ServiceRoute] = {}
        self._good_traffic_routes: dict[tuple[str, str], trafficroute.Parsed] = {}
        self._good_gateway_routes: dict[tuple[str, str, str], gatewayapi.Parsed] = {}
        # What the TrafficRoutes make of the mesh, kept from build to build
        # and redone only for those whose object or looked-up Services
        # changed (see _traffic_routes).
        self._traffic = _TrafficRoutes()
        # What the Gateway API routes did at the last build: each Service's
        # route with them, and the problems found; done again as it was
        # when nothing they read changed.
        self._gateway_replay: (
            tuple[list[tuple[mesh.ServiceKey, routing.ServiceRoute]], list[problems.Problem]] | None
        ) = None
        # The Services Gateway API routes routed at the last build.
        self._gateway_routed: set[mesh.ServiceKey] = set()
        # The last parse of each route object (see _Reparsed).
        self._traffic_parses: _Reparsed[trafficroute.Parsed] = _Reparsed()
        self._gateway_parses: _Reparsed[gatewayapi.Parsed] = _Reparsed()
        # Each Service's Gateway API routes at the last build, and which of
        # their rules never match (gatewayapi.shadowed).
        self._shadowed: dict[
            mesh.ServiceKey,
            tuple[tuple[routing.AttachedRoute, ...], list[tuple[str, str, str]]],
        ] = {}
        # The Gateway API status of each HTTPRoute and GRPCRoute, by
        # (kind, namespace, name), as of the last build.
        self.route_status: dict[tuple[str, str, str], tuple[gatewayapi.ParentStatus, ...]] = {}
        # Conversions made by `check`, by object identity, for the next
        # build (the object is kept so that its id cannot be reused).
        self._converted: dict[int, tuple[manifests.KubeObject, object]] = {}
        self._joined: dict[int, tuple[manifests.KubeObject, _Joined]] = {}

        # -- what the last build left, for the next one to change --------------
        # Keys put, removed or replaced since the last build.
        self._dirty: set[tuple[str, str, str]] = set()
        # The sources holding each key (several: the first by source wins).
        self._holders: dict[tuple[str, str, str], set[str]] = {}
        self._chosen: dict[tuple[str, str, str], Sourced] = {}
        self._duplicates: dict[tuple[str, str, str], list[problems.Problem]] = {}
        # Objects that could not be used, and the problems of Namespaces.
        self._refused: dict[tuple[str, str, str], list[problems.Problem]] = {}
        self._namespaces: dict[str, mesh.Namespace] = {}
        self._accounts: set[tuple[str, str]] = set()
        self._pods: dict[tuple[str, str], mesh.Pod] = {}
        # Services as converted, then with their annotations applied (and
        # the problems of that), with the source of each.
        self._base: dict[mesh.ServiceKey, mesh.Service] = {}
        self._sources: dict[mesh.ServiceKey, str] = {}
        self._services: dict[mesh.ServiceKey, mesh.Service] = {}
        self._scope_problems: dict[mesh.ServiceKey, list[problems.Problem]] = {}
        # EndpointSlices: the object, the Service it names, what it joined
        # to (its endpoints and the Pods it names) or its problem.
        self._slices: dict[tuple[str, str, str], Sourced] = {}
        self._slice_target: dict[tuple[str, str, str], mesh.ServiceKey] = {}
        self._slice_joined: dict[tuple[str, str, str], tuple[manifests.KubeObject, _Joined]] = {}
        self._slice_problems: dict[tuple[str, str, str], problems.Problem] = {}
        # Which slices name a Service (existing or not) and a Pod.
        self._slices_of: dict[mesh.ServiceKey, set[tuple[str, str, str]]] = {}
        self._pod_slices: dict[tuple[str, str], set[tuple[str, str, str]]] = {}
        self._endpoints: dict[mesh.ServiceKey, tuple[mesh.Endpoint, ...]] = {}
        # Routes of the annotations, their problems, and the Services that
        # have routing annotations (whose routes depend on other Services).
        self._note_routes: dict[mesh.ServiceKey, routing.ServiceRoute] = {}
        self._route_problems: dict[mesh.ServiceKey, problems.Problem] = {}
        self._routed: _Ordered[mesh.ServiceKey] = _Ordered()
        self._traffic_items: dict[tuple[str, str, str], Sourced] = {}
        self._gateway_items: dict[tuple[str, str, str], Sourced] = {}
        self._touched: set[mesh.ServiceKey] = set()
        # What the scope annotations are when a Service has none of them.
        self._defaults: dict[str, object] | None = None
        self._state = mesh.MeshState()

    def replace_source(self, source: str, objects: Iterable[Sourced]) -> None:
        """Set everything one source (a file, a watch) contributes, atomically."""
        objs = list(objects)
        for key in self._by_source.get(source, {}):
            self._unhold(source, key)
        self._dirty.update(i.obj.key for i in self._twice.get(source, ()))
        if objs:
            # A file may define one object twice; the first one is used and
            # the second reported by `build`, so keep both here.
            by_key: dict[tuple[str, str, str], Sourced] = {}
            for item in objs:
                by_key.setdefault(item.obj.key, item)
            self._by_source[source] = by_key
            self._twice[source] = [i for i in objs if by_key[i.obj.key] is not i]
            for key in by_key:
                self._holders.setdefault(key, set()).add(source)
            self._dirty.update(by_key)
        else:
            self._by_source.pop(source, None)
            self._twice.pop(source, None)

    def put(self, source: str, item: Sourced) -> None:
        """Add or replace one object of a source (a watch event)."""
        key = item.obj.key
        self._by_source.setdefault(source, {})[key] = item
        self._holders.setdefault(key, set()).add(source)
        self._dirty.add(key)

    def remove(self, source: str, key: tuple[str, str, str]) -> None:
        objects = self._by_source.get(source)
        if objects is not None and objects.pop(key, None) is not None:
            self._unhold(source, key)

    def _unhold(self, source: str, key: tuple[str, str, str]) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(source)
            if not holders:
                del self._holders[key]
        self._dirty.add(key)

    def check(self, obj: manifests.KubeObject) -> None:
        """What `manifests.check` says of one object (ManifestError if it
        cannot be used), keeping the conversions for the next build: a watch
        checks each object as it arrives, and ten thousand Services must not
        be converted twice."""
        if obj.type in (manifests.SERVICE, manifests.POD):
            convert = manifests.to_service if obj.type == manifests.SERVICE else manifests.to_pod
            self._converted[id(obj)] = (obj, convert(obj))
        elif obj.type == manifests.ENDPOINT_SLICE:
            manifests.slice_service(obj)
            eps = manifests.to_endpoints(obj, {})
            # Joined with no Pods: kept by the build if the slice names none.
            refs = sorted({(obj.namespace, e.pod) for e in eps if e.pod})
            self._joined[id(obj)] = (obj, _Joined(eps, tuple((ref, None) for ref in refs)))
        else:
            manifests.check(obj)
        if obj.type == manifests.TRAFFIC_ROUTE:
            trafficroute.parse(obj, None)
        elif obj.type in manifests.GATEWAY_ROUTES:
            gatewayapi.parse(obj, None)

    def objects(self, source: str) -> dict[tuple[str, str, str], Sourced]:
        return dict(self._by_source.get(source, {}))

    def sources(self) -> list[str]:
        return sorted(self._by_source)

    def build(self) -> tuple[mesh.MeshState, list[problems.Problem]]:
        dirty, self._dirty = self._dirty, set()
        changed = _Changed()
        # Objects defined twice are few; index them once per build.
        twice: dict[tuple[str, str, str], dict[str, list[Sourced]]] = {}
        for source, items in self._twice.items():
            for item in items:
                twice.setdefault(item.obj.key, {}).setdefault(source, []).append(item)
        for key in self._in_order(dirty):
            before = self._chosen.get(key)
            after = self._choose(key, twice.get(key, {}))
            if after is before:
                continue
            if before is not None:
                self._drop(key, before, changed)
            if after is not None:
                self._add(key, after, changed)
        for svc_key in changed.services:
            self._service(svc_key, changed)
        self._converted.clear()
        for svc_key in changed.services_gone:
            changed.slices.extend(sorted(self._slices_of.get(svc_key, ())))
        for pod in changed.pods:
            changed.slices.extend(sorted(self._pod_slices.get(pod, ())))
        for slice_key in changed.slices:
            self._slice(slice_key, changed)
        self._joined.clear()
        endpoints_order: Iterable[mesh.ServiceKey] = changed.endpoints
        if len(changed.endpoints) > _FEW:
            # In the order of their slices, as a build of everything has them.
            by_slices = _Ordered[mesh.ServiceKey]()
            by_slices.extend(
                t
                for k in sorted(self._slice_joined)
                if (t := self._slice_target[k]) in changed.endpoints
            )
            by_slices.extend(changed.endpoints)
            endpoints_order = by_slices
        for svc_key in endpoints_order:
            self._service_endpoints(svc_key)
        rerouted: set[mesh.ServiceKey] = set()
        if changed.services:
            # A route checks that its backends exist: every routed Service's
            # route is worked out again when any Service changed.
            rerouted = set(changed.services) | set(self._routed)
            for svc_key in [
                *changed.services,
                *(k for k in self._routed if k not in changed.services),
            ]:
                self._route(svc_key)

        found: list[problems.Problem] = []
        services = dict(self._services)
        routes = dict(self._note_routes)
        # The Services and routes that TrafficRoutes and Gateway API routes
        # change, now and at the last build: they may differ from the last.
        touched: set[mesh.ServiceKey] = set()
        self._traffic_routes(changed, services, routes, found, touched)
        # Where neither the routes nor the Services and annotations they
        # read changed (an endpoint moved: most builds), what they did at
        # the last build holds, and is done again as it was.
        if (
            changed.services
            or changed.traffic_keys
            or changed.gateway_routes
            or self._gateway_replay is None
        ):
            self._gateway_routes(
                list(self._gateway_items.values()), services, routes, found, touched
            )
        else:
            attached_routes, said = self._gateway_replay
            routes.update(attached_routes)
            found.extend(said)
        touched, self._touched = touched | self._touched, touched
        for listed in self._duplicates.values():
            found.extend(listed)
        for listed in self._refused.values():
            found.extend(listed)
        for listed in self._scope_problems.values():
            found.extend(listed)
        found.extend(self._slice_problems.values())
        found.extend(self._route_problems.values())

        self._version += 1
        last = self._state
        self._state = state = mesh.MeshState(
            version=self._version,
            services=services,
            # What did not change is the last state's very mapping.
            endpoints=dict(self._endpoints) if changed.endpoints else last.endpoints,
            namespaces=dict(self._namespaces) if changed.namespaces else last.namespaces,
            service_accounts=(
                frozenset(self._accounts) if changed.accounts else last.service_accounts
            ),
            routes=routes,
            pods=dict(self._pods) if changed.pods else last.pods,
        )
        if self._version > 1:
            state = self._state = self._with_delta(
                state,
                last,
                set(changed.services) | touched,
                set(changed.endpoints),
                rerouted | touched,
                changed.namespace_names,
                set(changed.pods),
            )
        return state, sorted(found)

    def _with_delta(
        self,
        state: mesh.MeshState,
        last: mesh.MeshState,
        services: set[mesh.ServiceKey],
        endpoints: set[mesh.ServiceKey],
        routes: set[mesh.ServiceKey],
        namespaces: set[str],
        pods: set[tuple[str, str]],
    ) -> mesh.MeshState:
        """The state, with the keys that differ from the last one: those of
        the objects changed since that may differ, compared."""
        prior = last.delta if last.delta is not None and last.delta.depth < _DELTAS else None
        delta = mesh.Delta(
            last.mappings(),
            tuple(map(id, state.mappings())),
            changes.differing_among(services, last.services, state.services),
            changes.differing_among(endpoints, last.endpoints, state.endpoints),
            changes.differing_among(routes, last.routes, state.routes),
            changes.differing_among(namespaces, last.namespaces, state.namespaces),
            changes.differing_among(pods, last.pods, state.pods),
            prior,
            prior.depth + 1 if prior is not None else 1,
        )
        return dataclasses.replace(state, delta=delta)

    def _in_order(self, dirty: set[tuple[str, str, str]]) -> Iterable[tuple[str, str, str]]:
        """The keys to redo, in their sources' order when there are many (a
        first build, a file read again: the maps of the state then follow
        the files), else by key; either way the same in every process."""
        if len(dirty) <= _FEW:
            return sorted(dirty)
        order = dict.fromkeys(
            k for source in sorted(self._by_source) for k in self._by_source[source] if k in dirty
        )
        order.update(dict.fromkeys(sorted(dirty - order.keys())))
        return order

    # -- one object ------------------------------------------------------------

    def _choose(
        self, key: tuple[str, str, str], twice: Mapping[str, list[Sourced]]
    ) -> Sourced | None:
        """The object of `key` the first source (by name) defines; every other
        definition is a problem."""
        holders = self._holders.get(key, set())
        if len(holders) == 1 and not twice:
            # Defined once (nearly every object): no duplicates to report.
            (source,) = holders
            self._duplicates.pop(key, None)
            only = self._chosen[key] = self._by_source[source][key]
            return only
        chosen: Sourced | None = None
        dropped: list[Sourced] = []
        for source in sorted(holders | twice.keys()):
            first = self._by_source[source].get(key) if source in holders else None
            for item in [*((first,) if first is not None else ()), *twice.get(source, ())]:
                if chosen is None:
                    chosen = item
                else:
                    dropped.append(item)
        if dropped and chosen is not None:
            self._duplicates[key] = [
                problems.Problem(
                    item.source,
                    str(item.obj),
                    f"also defined in {chosen.source}; that one is used",
                    "SHL0002",
                )
                for item in dropped
            ]
        else:
            self._duplicates.pop(key, None)
        if chosen is None:
            self._chosen.pop(key, None)
        else:
            self._chosen[key] = chosen
        return chosen

    def _drop(self, key: tuple[str, str, str], item: Sourced, changed: _Changed) -> None:
        """Take back what an object contributed."""
        obj = item.obj
        self._refused.pop(key, None)
        if obj.type == manifests.SERVICE:
            changed.services.add(mesh.ServiceKey(obj.namespace, obj.name))
        elif obj.type == manifests.NAMESPACE:
            self._namespaces.pop(obj.name, None)
            changed.namespaces = True
            changed.namespace_names.add(obj.name)
        elif obj.type == manifests.SERVICE_ACCOUNT:
            self._accounts.discard((obj.namespace, obj.name))
            changed.accounts = True
        elif obj.type == manifests.POD:
            ref = (obj.namespace, obj.name)
            pod = self._pods.pop(ref, None)
            if pod is not None:
                changed.pods.add(ref)
                changed.pods_before.setdefault(ref, pod)
        elif obj.type == manifests.ENDPOINT_SLICE:
            self._slices.pop(key, None)
            changed.slices.add(key)
        elif obj.type == manifests.TRAFFIC_ROUTE:
            self._traffic_items.pop(key, None)
            changed.traffic_keys.add(key)
        elif obj.type in manifests.GATEWAY_ROUTES:
            self._gateway_items.pop(key, None)
            changed.gateway_routes = True

    def _add(self, key: tuple[str, str, str], item: Sourced, changed: _Changed) -> None:
        obj = item.obj
        try:
            if obj.type == manifests.SERVICE:
                changed.services.add(mesh.ServiceKey(obj.namespace, obj.name))
                changed.items[key] = item
            elif obj.type == manifests.NAMESPACE:
                changed.namespaces = True
                changed.namespace_names.add(obj.name)
                self._namespaces[obj.name] = self._namespace(
                    item, self._refused.setdefault(key, [])
                )
                if not self._refused[key]:
                    del self._refused[key]
            elif obj.type == manifests.SERVICE_ACCOUNT:
                self._accounts.add((obj.namespace, obj.name))
                changed.accounts = True
            elif obj.type == manifests.POD:
                ref = (obj.namespace, obj.name)
                pod = self._convert(obj, manifests.to_pod)
                before = self._pods.get(ref) or changed.pods_before.get(ref)
                if before is None or before != pod:
                    self._pods[ref] = pod
                    changed.pods.add(ref)
                else:
                    # The same Pod (a status field shoal does not read): the
                    # very object stays, and nothing joined to it changes.
                    changed.pods.discard(ref)
                    self._pods[ref] = before
            elif obj.type == manifests.ENDPOINT_SLICE:
                self._slices[key] = item
                changed.slices.add(key)
            elif obj.type == manifests.TRAFFIC_ROUTE:
                self._traffic_items[key] = item
                changed.traffic_keys.add(key)
            elif obj.type in manifests.GATEWAY_ROUTES:
                self._gateway_items[key] = item
                changed.gateway_routes = True
        except manifests.ManifestError as err:
            self._refused[key] = [problems.Problem(item.source, str(obj), str(err), err.code)]

    def _service(self, key: mesh.ServiceKey, changed: _Changed) -> None:
        """Convert and scope a Service put, or forget one gone (or refused)."""
        item = changed.items.get(("Service", key.namespace, key.name))
        base: mesh.Service | None = None
        if item is not None:
            try:
                base = self._convert(item.obj, manifests.to_service)
            except manifests.ManifestError as err:
                self._refused[item.obj.key] = [
                    problems.Problem(item.source, str(item.obj), str(err), err.code)
                ]
        existed = key in self._services
        if base is None or item is None:
            self._base.pop(key, None)
            self._sources.pop(key, None)
            self._services.pop(key, None)
            self._scope_problems.pop(key, None)
            self._good_notes.pop(key, None)
            self._good_routes.pop(key, None)
            if existed:
                changed.services_gone.add(key)
            changed.endpoints.add(key)
            return
        old = self._base.get(key)
        if old is not None and old == base and self._sources.get(key) == item.source:
            return  # the same Service again: its scoped form and problems hold
        scope_found: list[problems.Problem] = []
        scoped = self._scoped(base, item.source, scope_found)
        before = self._services.get(key)
        if before is None:
            # Keyed by the Service's own key object: translation looks it up
            # by that, ten thousand times a push, found by identity.
            key = scoped.key
        elif before == scoped:
            scoped = before
        self._base[key], self._sources[key] = base, item.source
        self._services[key] = scoped
        if scope_found:
            self._scope_problems[key] = scope_found
        else:
            self._scope_problems.pop(key, None)
        if not existed:
            # Its slices may join now.
            changed.slices.extend(sorted(self._slices_of.get(key, ())))
            changed.endpoints.add(key)

    def _slice(self, key: tuple[str, str, str], changed: _Changed) -> None:
        """Join one EndpointSlice to its Service and Pods again."""
        target = self._slice_target.pop(key, None)
        if target is not None:
            changed.endpoints.add(target)
            naming = self._slices_of.get(target)
            if naming is not None:
                naming.discard(key)
                if not naming:
                    del self._slices_of[target]
        joined = self._slice_joined.pop(key, None)
        if joined is not None:
            self._unindex_pods(key, joined[1])
        self._slice_problems.pop(key, None)
        item = self._slices.get(key)
        if item is None:
            return
        obj = item.obj
        try:
            target = mesh.ServiceKey(obj.namespace, manifests.slice_service(obj))
            self._slice_target[key] = target
            self._slices_of.setdefault(target, set()).add(key)
            changed.endpoints.add(target)
            if target not in self._services:
                raise manifests.ManifestError(f"its Service {target} does not exist", "SHL0005")
            found = self._join(obj, joined)
            self._slice_joined[key] = (obj, found)
            for ref, _ in found.pods:
                self._pod_slices.setdefault(ref, set()).add(key)
        except manifests.ManifestError as err:
            self._slice_problems[key] = problems.Problem(item.source, str(obj), str(err), err.code)

    def _join(
        self,
        obj: manifests.KubeObject,
        last: tuple[manifests.KubeObject, _Joined] | None,
    ) -> _Joined:
        """A slice's endpoints, joined to their Pods; redone only when the
        slice or one of the Pods it names changed."""
        pods = self._pods
        for memo in (last, self._joined.get(id(obj))):
            if (
                memo is not None
                and memo[0] is obj
                and all(pods.get(ref) is info for ref, info in memo[1].pods)
            ):
                return memo[1]
        eps = manifests.to_endpoints(obj, pods)
        refs = {(obj.namespace, e.pod) for e in eps if e.pod}
        return _Joined(eps, tuple((ref, pods.get(ref)) for ref in sorted(refs)))

    def _unindex_pods(self, key: tuple[str, str, str], joined: _Joined) -> None:
        for ref, _ in joined.pods:
            naming = self._pod_slices.get(ref)
            if naming is not None:
                naming.discard(key)
                if not naming:
                    del self._pod_slices[ref]

    def _service_endpoints(self, key: mesh.ServiceKey) -> None:
        """A Service's endpoints: those of its slices that joined, by slice."""
        parts = [
            self._slice_joined[k][1].endpoints
            for k in sorted(self._slices_of.get(key, ()))
            if k in self._slice_joined
        ]
        if key not in self._services or not parts:
            self._endpoints.pop(key, None)
            return
        eps = parts[0] if len(parts) == 1 else tuple(e for p in parts for e in p)
        before = self._endpoints.get(key)
        if before is None:
            self._endpoints[self._services[key].key] = eps
        elif before != eps:
            self._endpoints[key] = eps

    def _convert(
        self, obj: manifests.KubeObject, convert: Callable[[manifests.KubeObject], T]
    ) -> T:
        memo = self._converted.get(id(obj))
        value = memo[1] if memo is not None and memo[0] is obj else convert(obj)
        return value  # type: ignore[return-value]

    def _namespace(self, item: Sourced, found: list[problems.Problem]) -> mesh.Namespace:
        namespace = manifests.to_namespace(item.obj)
        try:
            namespace = dataclasses.replace(namespace, mtls=notes.mtls(namespace.annotations))
        except notes.AnnotationError as err:
            found.append(problems.Problem(item.source, str(item.obj), f"{err}; ignored", err.code))
        try:
            return dataclasses.replace(
                namespace, access_log=notes.access_log(namespace.annotations)
            )
        except notes.AnnotationError as err:
            found.append(problems.Problem(item.source, str(item.obj), f"{err}; ignored", err.code))
            return namespace

    def _scoped(
        self, svc: mesh.Service, source: str, found: list[problems.Problem]
    ) -> mesh.Service:
        """Scope and security annotations, each falling back to its last good
        value (or its default) when malformed."""
        parsers: dict[str, Callable[[], object]] = {
            "export_to": lambda: notes.export_to(svc.annotations),
            "dependencies": lambda: notes.dependencies(svc.annotations, svc.namespace),
            "mtls": lambda: notes.mtls(svc.annotations),
            "allow": lambda: notes.allow(svc.annotations),
            "outlier": lambda: notes.outlier(svc.annotations),
            "trace_sampling": lambda: notes.trace_sampling(svc.annotations),
            "access_log": lambda: notes.access_log(svc.annotations),
        }
        good = self._good_notes.setdefault(svc.key, {})
        if not any(name.startswith(notes.PREFIX) for name in svc.annotations):
            # None of shoal's annotations (most Services): every value is
            # its default, worked out once.
            if self._defaults is None:
                self._defaults = {name: parse() for name, parse in parsers.items()}
            good.update(self._defaults)
            values = self._defaults
            if all(getattr(svc, name) == value for name, value in values.items()):
                return svc
            return dataclasses.replace(svc, **values)  # type: ignore[arg-type]
        values = {}
        for field_name, parse in parsers.items():
            try:
                values[field_name] = good[field_name] = parse()
            except notes.AnnotationError as err:
                if field_name == "allow":
                    # Authorization fails closed: not the last good value (the
                    # edit may have been meant to take someone out), nor the
                    # default (everyone).
                    values[field_name] = notes.DENY_EVERYONE
                    reason = f"{err}; every caller is denied until it is fixed"
                    found.append(
                        problems.Problem(
                            source, f"Service {svc.key}", reason, err.code, _field(err)
                        )
                    )
                    continue
                kept = good.get(field_name)
                found.append(
                    problems.Problem(
                        source, f"Service {svc.key}", _kept(err, kept), err.code, _field(err)
                    )
                )
                if kept is not None:
                    values[field_name] = kept
        if all(getattr(svc, name) == value for name, value in values.items()):
            return svc  # most Services set none of them: no copy of each
        return dataclasses.replace(svc, **values)  # type: ignore[arg-type]

    def _route(self, key: mesh.ServiceKey) -> None:
        """The route a Service's annotations ask for, or its last good one
        (and the problem) when they are wrong."""
        self._route_problems.pop(key, None)
        svc = self._services.get(key)
        if svc is None or svc.annotations.keys().isdisjoint(notes.ROUTING):
            self._routed.discard(key)
            self._note_routes.pop(key, None)
            self._good_routes.pop(key, None)
            return
        self._routed.add(key)
        services = self._services
        try:
            route = notes.service_route(svc, services)
        except notes.AnnotationError as err:
            kept = self._good_routes.get(key)
            if kept is not None and not kept.backends() <= services.keys():
                kept = None  # its backends are gone: it cannot stay
            reason = _kept(err, kept)
            if err.code == "SHL0101" and kept is None:
                # What that does to traffic: all of the Service's routing goes.
                reason = (
                    f"{err}; none of the Service's routing annotations (split, header "
                    "routes, timeout, retries, fault, mirror) apply until it is fixed"
                )
            self._route_problems[key] = problems.Problem(
                self._sources[key], f"Service {key}", reason, err.code, _field(err)
            )
            if kept is None:
                self._note_routes.pop(key, None)
            else:
                self._note_routes[key] = kept
            return
        if route is None:
            self._good_routes.pop(key, None)
            self._note_routes.pop(key, None)
        else:
            before = self._note_routes.get(key)
            if before is not None and before == route:
                route = before  # the very object, so that translation finds it
            self._note_routes[svc.key if before is None else key] = route
            self._good_routes[key] = route

    def _traffic_routes(
        self,
        changed: _Changed,
        services: dict[mesh.ServiceKey, mesh.Service],
        routes: dict[mesh.ServiceKey, routing.ServiceRoute],
        found: list[problems.Problem],
        touched: set[mesh.ServiceKey],
    ) -> None:
        """TrafficRoutes win over a Service's routing annotations (and say so).

        Redone for the routes put or removed, those that looked up a Service
        that changed, and those that failed or read every Service (few); then for each Service one
        of those names, or whose annotations' route changed under it. The
        rest stands as the last build left it: a mesh with a route on every
        Service pays for what changed, not for every route."""
        t = self._traffic
        redo = set(changed.traffic_keys) | t.every_build
        for service_key in changed.services:
            redo |= t.by_service.get(service_key, set())
        targets: set[mesh.ServiceKey] = set()
        for key in redo:
            old = t.items.pop(key, None)
            if old is not None:
                t.unindex(key, old)
                if old.target is not None:
                    targets.add(old.target)
            item = self._traffic_items.get(key)
            if item is None:
                self._good_traffic_routes.pop((key[1], key[2]), None)
                self._traffic_parses.forget(key)
                continue
            made = self._traffic_item(item, services)
            t.items[key] = made
            t.index(key, made)
            if made.target is not None:
                targets.add(made.target)
        if changed.services:
            # An annotations' route changes with its backends, and whether a
            # TrafficRoute overrides one is reported.
            targets.update(k for k, v in t.notes.items() if routes.get(k) is not v)
        for target in targets:
            self._traffic_target(target, services, routes)
        before = self._state
        for target in targets:
            route = t.route_of.get(target) or routes.get(target)
            service = t.service_of.get(target) or services.get(target)
            # Compared with the last state only where the route or the
            # Service is not the very object it holds.
            if before.routes.get(target) is not route or before.services.get(target) is not service:
                touched.add(target)
        routes.update(t.route_of)
        services.update(t.service_of)
        found.extend(p for k in t.every_build if (p := t.items[k].problem) is not None)
        for said in t.said.values():
            found.extend(said)

    def _traffic_item(
        self, item: Sourced, services: Mapping[mesh.ServiceKey, mesh.Service]
    ) -> _TrafficItem:
        """One TrafficRoute parsed (or its last good form, where it broke and
        what that names still exists), and the Service it routes."""
        obj = item.obj
        ident = (obj.namespace, obj.name)
        try:
            parsed = self._traffic_parses.parse(trafficroute.parse, obj, services)
        except manifests.ManifestError as err:
            kept = self._good_traffic_routes.get(ident)
            if kept is not None and not (
                kept.route.service in services and kept.route.backends() <= services.keys()
            ):
                # Its Service or a backend is gone: it cannot stay.
                kept = None
            problem = problems.Problem(
                item.source,
                str(obj),
                _kept(err, kept),
                _route_code(err),
                err.field if isinstance(err, trafficroute.UnknownService) else "",
            )
            if kept is None:
                return _TrafficItem(item, None, None, problem, ())
            return _TrafficItem(item, kept, services[kept.route.service].key, problem, ())
        self._good_traffic_routes[ident] = parsed
        # The Service's own key: the maps are keyed by that very object, so
        # each lookup is by identity, not a comparison.
        target = services[parsed.route.service].key
        return _TrafficItem(item, parsed, target, None, self._traffic_parses.looked(obj.key))

    def _traffic_target(
        self,
        target: mesh.ServiceKey,
        services: Mapping[mesh.ServiceKey, mesh.Service],
        routes: Mapping[mesh.ServiceKey, routing.ServiceRoute],
    ) -> None:
        """Which TrafficRoute routes `target` (the first by namespace and
        name), with its route and policy, and what is said of the others."""
        t = self._traffic
        keys = sorted(t.by_target.get(target, ()))
        if not keys:
            t.forget(target)
            return
        winner = t.items[keys[0]]
        parsed = winner.parsed
        assert parsed is not None
        said = [
            problems.Problem(
                t.items[k].item.source,
                str(t.items[k].item.obj),
                f"{winner.item.obj} already routes Service {target} (the first by "
                "namespace and name wins); this one is ignored",
                "SHL0105",
                "spec.service",
            )
            for k in keys[1:]
        ]
        note = t.notes[target] = routes.get(target)
        if note is not None and note.source == "annotations":
            said.append(
                problems.Problem(
                    winner.item.source,
                    str(winner.item.obj),
                    f"takes precedence over the routing annotations of Service {target} "
                    f"({_routing_field(services[target])}), which are ignored",
                    "SHL0105",
                    "spec.service",
                )
            )
        if said:
            t.said[target] = said
        else:
            t.said.pop(target, None)
        t.route_of[target] = parsed.route
        svc = services[target]
        outlier = parsed.outlier or svc.outlier
        limits = parsed.limits or svc.limits
        if outlier is svc.outlier and limits is svc.limits:
            t.service_of.pop(target, None)
            t.policied.pop(target, None)
            return
        # The very Service of the last build when neither it nor the policy
        # changed: translation finds what did not change by identity.
        last = t.policied.get(target)
        if last is None or last[0] is not svc or last[1] is not parsed:
            last = (svc, parsed, dataclasses.replace(svc, outlier=outlier, limits=limits))
            t.policied[target] = last
        t.service_of[target] = last[2]

    def _gateway_routes(
        self,
        items: list[Sourced],
        services: dict[mesh.ServiceKey, mesh.Service],
        routes: dict[mesh.ServiceKey, routing.ServiceRoute],
        found: list[problems.Problem],
        touched: set[mesh.ServiceKey],
    ) -> None:
        """HTTPRoutes and GRPCRoutes, attached to the routes of their
        Services. Where one applies it routes instead of a TrafficRoute or
        the annotations (the README's rule), which is reported."""
        attached: dict[mesh.ServiceKey, list[routing.AttachedRoute]] = {}
        status: dict[tuple[str, str, str], tuple[gatewayapi.ParentStatus, ...]] = {}
        origins: dict[mesh.ServiceKey, tuple[Sourced, gatewayapi.Parsed]] = {}
        applied: dict[mesh.ServiceKey, routing.ServiceRoute] = {}
        said = len(found)
        for item in sorted(items, key=lambda i: i.obj.key):
            obj = item.obj
            try:
                parsed = self._gateway_parses.parse(gatewayapi.parse, obj, services)
            except manifests.ManifestError as err:
                kept = self._good_gateway_routes.get(obj.key)
                if kept is not None and not all(
                    a.service in services and a.backends() <= services.keys() for a in kept.attached
                ):
                    kept = None
                found.append(
                    problems.Problem(item.source, str(obj), _kept(err, kept), _route_code(err))
                )
                status[obj.key] = gatewayapi.refused(obj, err)
                if kept is None:
                    self._good_gateway_routes.pop(obj.key, None)
                    continue
                parsed = kept
            else:
                self._good_gateway_routes[obj.key] = parsed
                status[obj.key] = parsed.parents
                found.extend(
                    problems.Problem(item.source, str(obj), f.reason, f.code, f.field)
                    for f in parsed.findings
                )
            for a in parsed.attached:
                attached.setdefault(a.service, []).append(a)
                origins.setdefault(a.service, (item, parsed))
        sources = {str(i.obj): i.source for i in items}
        shadowed = self._shadowed
        self._shadowed = {}
        for key, on_service in attached.items():
            routes_on = tuple(on_service)
            last_shadowed = shadowed.get(key)
            # The same parses, so the very objects, when nothing changed.
            if last_shadowed is not None and (
                len(last_shadowed[0]) == len(routes_on)
                and all(map(operator.is_, last_shadowed[0], routes_on))
            ):
                self._shadowed[key] = last_shadowed
            else:
                self._shadowed[key] = (routes_on, gatewayapi.shadowed(routes_on))
            for origin, where, why in self._shadowed[key][1]:
                found.append(
                    problems.Problem(sources.get(origin, ""), origin, why, "SHL0104", where)
                )
            before = routes.get(key)
            if before is not None and before.rules:
                item, parsed = origins[key]
                # Of the annotations, the rules lose their say; the policies keep it.
                rules = _routing_field(services[key], (notes.SPLIT, notes.ROUTE_HEADERS))
                which = f" ({rules})" if before.source == "annotations" and rules else ""
                found.append(
                    problems.Problem(
                        item.source,
                        str(item.obj),
                        f"routes Service {key} where it applies, instead of the rules of "
                        f"its {before.source}{which} (their retries, faults and timeout still "
                        "apply)",
                        "SHL0105",
                        dict(parsed.parent_fields).get(key, "spec.parentRefs"),
                    )
                )
            base = before or routing.ServiceRoute(key, (), source="Gateway API")
            routes[key] = applied[key] = dataclasses.replace(base, attached=routes_on)
            touched.add(key)
        # A Service no longer routed by a Gateway API route goes back to
        # what routed it before.
        touched.update(self._gateway_routed - applied.keys())
        self._gateway_routed = set(applied)
        self._gateway_replay = (list(applied.items()), found[said:])
        held = {i.obj.key for i in items}
        for gone in self._good_gateway_routes.keys() - held:
            del self._good_gateway_routes[gone]
        self._gateway_parses.keep(held)
        self.route_status = status


@dataclass(frozen=True, slots=True)
class _TrafficItem:
    """What one TrafficRoute came to at its last redo."""

    item: Sourced
    parsed: trafficroute.Parsed | None  # None: refused, and nothing kept
    target: mesh.ServiceKey | None
    problem: problems.Problem | None
    # The Services its parse looked up: a change to one redoes it. None: it
    # is redone at every build (as it is when it has a problem).
    looked: tuple[mesh.ServiceKey, ...] | None


class _TrafficRoutes:
    """The TrafficRoutes' part of the mesh, with the indexes that say what a
    change touches."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str, str], _TrafficItem] = {}
        self.every_build: set[tuple[str, str, str]] = set()
        self.by_target: dict[mesh.ServiceKey, set[tuple[str, str, str]]] = {}
        self.by_service: dict[mesh.ServiceKey, set[tuple[str, str, str]]] = {}
        # Per routed Service: its route; the Service with the route's policy
        # where one changes it, and what it was made from; what is said of
        # its routes; and the annotations' route it was checked against.
        self.route_of: dict[mesh.ServiceKey, routing.ServiceRoute] = {}
        self.service_of: dict[mesh.ServiceKey, mesh.Service] = {}
        self.policied: dict[
            mesh.ServiceKey, tuple[mesh.Service, trafficroute.Parsed, mesh.Service]
        ] = {}
        self.said: dict[mesh.ServiceKey, list[problems.Problem]] = {}
        self.notes: dict[mesh.ServiceKey, routing.ServiceRoute | None] = {}

    def forget(self, target: mesh.ServiceKey) -> None:
        """`target` is routed by no TrafficRoute any more."""
        for kept in (self.route_of, self.service_of, self.policied, self.said, self.notes):
            kept.pop(target, None)

    def index(self, key: tuple[str, str, str], made: _TrafficItem) -> None:
        if made.problem is not None or made.looked is None:
            self.every_build.add(key)
        if made.target is not None:
            self.by_target.setdefault(made.target, set()).add(key)
        for looked in made.looked or ():
            self.by_service.setdefault(looked, set()).add(key)

    def unindex(self, key: tuple[str, str, str], made: _TrafficItem) -> None:
        self.every_build.discard(key)
        at = [(self.by_service, s) for s in made.looked or ()]
        if made.target is not None:
            at.append((self.by_target, made.target))
        for index, service in at:
            held = index.get(service)
            if held is not None:
                held.discard(key)
                if not held:
                    del index[service]


class _Reparsed(Generic[P]):
    """The last parse of each route object that reads the mesh's Services,
    with each Service the parse looked up as it found it (None: not in the
    mesh), reused while the object is equal and those Services are the
    same: parsing every route on every build was most of a build at 1,000
    routes."""

    def __init__(self) -> None:
        self._last: dict[
            tuple[str, str, str],
            tuple[manifests.KubeObject, tuple[tuple[mesh.ServiceKey, mesh.Service | None], ...], P],
        ] = {}

    def parse(
        self,
        parse: Callable[[manifests.KubeObject, Mapping[mesh.ServiceKey, mesh.Service]], P],
        obj: manifests.KubeObject,
        services: Mapping[mesh.ServiceKey, mesh.Service],
    ) -> P:
        last = self._last.get(obj.key)
        if last is not None and (last[0] is obj or last[0] == obj):
            for key, then in last[1]:
                now = services.get(key)
                if now is not then and now != then:
                    break
            else:
                return last[2]
        self._last.pop(obj.key, None)
        looking = _LookedUp(services)
        parsed = parse(obj, looking)
        if not looking.whole:
            self._last[obj.key] = (obj, tuple(looking.looked.items()), parsed)
        return parsed

    def looked(self, key: tuple[str, str, str]) -> tuple[mesh.ServiceKey, ...] | None:
        """The Services the last parse of `key` looked up; None when none
        is kept (it read the whole mesh: any change may change it)."""
        last = self._last.get(key)
        return None if last is None else tuple(k for k, _ in last[1])

    def forget(self, key: tuple[str, str, str]) -> None:
        self._last.pop(key, None)

    def keep(self, keys: Collection[tuple[str, str, str]]) -> None:
        """Forget the objects not among `keys` (gone from the store)."""
        for gone in self._last.keys() - keys:
            del self._last[gone]


class _LookedUp(Mapping[mesh.ServiceKey, mesh.Service]):
    """The mesh's Services, noting which keys a reader asked for; `whole`
    once it read them all, when nothing short of the whole mesh says its
    result still holds."""

    def __init__(self, services: Mapping[mesh.ServiceKey, mesh.Service]) -> None:
        self._services = services
        self.looked: dict[mesh.ServiceKey, mesh.Service | None] = {}
        self.whole = False

    def __getitem__(self, key: mesh.ServiceKey) -> mesh.Service:
        found = self._services.get(key)
        if found is None:
            self.looked[key] = None
            raise KeyError(key)
        # Noted by the Service's own key: the map is keyed by that very
        # object (while the Service is the first of its name), and finding
        # it again is then a lookup by identity, not a comparison.
        self.looked[found.key] = found
        return found

    def __iter__(self) -> Iterator[mesh.ServiceKey]:
        self.whole = True
        return iter(self._services)

    def __len__(self) -> int:
        self.whole = True
        return len(self._services)


class _Ordered(dict[T, None]):
    """A set that keeps the order of what was added: a build then adds to
    the mesh's maps in the order of the objects' sources, as a build of
    everything does, whatever the keys' hashes (a set's order changes with
    every process)."""

    def add(self, item: T) -> None:
        self[item] = None

    def discard(self, item: T) -> None:
        self.pop(item, None)

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self[item] = None


@dataclass(slots=True)
class _Changed:
    """What one build found changed, for the steps after it to redo."""

    services: _Ordered[mesh.ServiceKey] = field(default_factory=lambda: _Ordered())
    # The Services' objects now chosen, by object key.
    items: dict[tuple[str, str, str], Sourced] = field(default_factory=dict)
    services_gone: _Ordered[mesh.ServiceKey] = field(default_factory=lambda: _Ordered())
    slices: _Ordered[tuple[str, str, str]] = field(default_factory=lambda: _Ordered())
    pods: _Ordered[tuple[str, str]] = field(default_factory=lambda: _Ordered())
    pods_before: dict[tuple[str, str], mesh.Pod] = field(default_factory=dict)
    endpoints: _Ordered[mesh.ServiceKey] = field(default_factory=lambda: _Ordered())
    namespaces: bool = False
    namespace_names: set[str] = field(default_factory=set)
    accounts: bool = False
    traffic_keys: set[tuple[str, str, str]] = field(default_factory=set)
    gateway_routes: bool = False


@dataclass(frozen=True, slots=True)
class _Joined:
    endpoints: tuple[mesh.Endpoint, ...]
    # The Pods it was joined with, by identity (None: the Pod was absent).
    pods: tuple[tuple[tuple[str, str], mesh.Pod | None], ...]


# Up to how many changed keys a build redoes in key order, not sources'.
_FEW = 64

# How many builds back a state's deltas reach (each holds the mappings of
# the state before it).
_DELTAS = 4


def _kept(err: Exception, kept: object) -> str:
    return f"{err}; " + (
        "its last good configuration stays in force" if kept is not None else "ignored"
    )


def _route_code(err: manifests.ManifestError) -> str:
    """A refused route: its specific code, else "not accepted"."""
    return "SHL0004" if err.code == "SHL0001" else err.code


def code_of(obj_type: tuple[object, object], err: manifests.ManifestError) -> str:
    """The problem code of an object refused on its own: a route's is "not
    accepted" unless it has a more specific one."""
    if obj_type == manifests.TRAFFIC_ROUTE or obj_type in manifests.GATEWAY_ROUTES:
        return _route_code(err)
    return err.code


def _field(err: notes.AnnotationError) -> str:
    return f"metadata.annotations[{err.annotation}]"


def _routing_field(service: mesh.Service, names: tuple[str, ...] = notes.ROUTING) -> str:
    """Those of the annotations `names` a Service has, as fields."""
    return ", ".join(
        f"metadata.annotations[{name}]" for name in names if name in service.annotations
    )
