"""The ObjectStore as it was before builds became incremental: a pass over
every object per build. The oracle of test_incremental.py (one fix since:
a kept TrafficRoute whose Service is gone is dropped, not a KeyError).

Kubernetes objects from any source, joined into one MeshState.

Sources put and remove whole objects; `build` joins them (EndpointSlices to
Services by label, endpoints to their Pods) and reports what does not join.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from shoal.model import mesh, problems, routing
from shoal.registry import annotations as notes
from shoal.registry import gatewayapi, manifests, trafficroute

T = TypeVar("T")


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
        # The Gateway API status of each HTTPRoute and GRPCRoute, by
        # (kind, namespace, name), as of the last build.
        self.route_status: dict[tuple[str, str, str], tuple[gatewayapi.ParentStatus, ...]] = {}
        # Conversions of unchanged objects, by object identity: a change to
        # one object of ten thousand converts one. The object is kept in the
        # entry so that its id cannot be reused while the entry lives.
        self._converted: dict[int, tuple[manifests.KubeObject, object]] = {}
        self._joined: dict[int, tuple[manifests.KubeObject, _Joined]] = {}
        self._scoped_memo: dict[int, tuple[mesh.Service, mesh.Service]] = {}

    def replace_source(self, source: str, objects: Iterable[Sourced]) -> None:
        """Set everything one source (a file, a watch) contributes, atomically."""
        objs = list(objects)
        if objs:
            # A file may define one object twice; the first one is used and
            # the second reported by `build`, so keep both here.
            by_key: dict[tuple[str, str, str], Sourced] = {}
            for item in objs:
                by_key.setdefault(item.obj.key, item)
            self._by_source[source] = by_key
            self._twice[source] = [i for i in objs if by_key[i.obj.key] is not i]
        else:
            self._by_source.pop(source, None)
            self._twice.pop(source, None)

    def put(self, source: str, item: Sourced) -> None:
        """Add or replace one object of a source (a watch event)."""
        self._by_source.setdefault(source, {})[item.obj.key] = item

    def remove(self, source: str, key: tuple[str, str, str]) -> None:
        objects = self._by_source.get(source)
        if objects is not None:
            objects.pop(key, None)

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
        found: list[problems.Problem] = []
        chosen: dict[tuple[str, str, str], Sourced] = {}
        for source in sorted(self._by_source):
            for item in [*self._by_source[source].values(), *self._twice.get(source, ())]:
                earlier = chosen.get(item.obj.key)
                if earlier is not None:
                    found.append(
                        problems.Problem(
                            item.source,
                            str(item.obj),
                            f"also defined in {earlier.source}; that one is used",
                            "SHL0002",
                        )
                    )
                    continue
                chosen[item.obj.key] = item

        services: dict[mesh.ServiceKey, mesh.Service] = {}
        sources: dict[mesh.ServiceKey, str] = {}
        namespaces: dict[str, mesh.Namespace] = {}
        accounts: set[tuple[str, str]] = set()
        pods: dict[tuple[str, str], mesh.Pod] = {}
        slices: list[Sourced] = []
        traffic_routes: list[Sourced] = []
        gateway_routes: list[Sourced] = []
        converted: dict[int, tuple[manifests.KubeObject, object]] = {}
        for item in chosen.values():
            obj = item.obj
            try:
                if obj.type == manifests.SERVICE:
                    svc = self._convert(obj, manifests.to_service, converted)
                    services[svc.key] = svc
                    sources[svc.key] = item.source
                elif obj.type == manifests.NAMESPACE:
                    namespaces[obj.name] = self._namespace(item, found)
                elif obj.type == manifests.SERVICE_ACCOUNT:
                    accounts.add((obj.namespace, obj.name))
                elif obj.type == manifests.POD:
                    pods[(obj.namespace, obj.name)] = self._convert(
                        obj, manifests.to_pod, converted
                    )
                elif obj.type == manifests.ENDPOINT_SLICE:
                    slices.append(item)
                elif obj.type == manifests.TRAFFIC_ROUTE:
                    traffic_routes.append(item)
                elif obj.type in manifests.GATEWAY_ROUTES:
                    gateway_routes.append(item)
            except manifests.ManifestError as err:
                found.append(problems.Problem(item.source, str(obj), str(err), err.code))

        endpoints: dict[mesh.ServiceKey, list[mesh.Endpoint]] = {}
        joined: dict[int, tuple[manifests.KubeObject, _Joined]] = {}
        for item in sorted(slices, key=lambda s: s.obj.key):
            obj = item.obj
            try:
                key = mesh.ServiceKey(obj.namespace, manifests.slice_service(obj))
                if key not in services:
                    raise manifests.ManifestError(f"its Service {key} does not exist", "SHL0005")
                endpoints.setdefault(key, []).extend(self._endpoints(obj, pods, joined))
            except manifests.ManifestError as err:
                found.append(problems.Problem(item.source, str(obj), str(err), err.code))
        self._converted = converted
        self._joined = joined

        scoped_memo: dict[int, tuple[mesh.Service, mesh.Service]] = {}
        for key, svc in list(services.items()):
            memo = self._scoped_memo.get(id(svc))
            if memo is not None and memo[0] is svc:
                services[key] = memo[1]
            else:
                before = len(found)
                services[key] = self._scoped(svc, sources[key], found)
                if len(found) > before:
                    continue  # a fallback to the last good value is not remembered
            scoped_memo[id(svc)] = (svc, services[key])
        self._scoped_memo = scoped_memo
        routes = self._routes(services, sources, found)
        self._traffic_routes(traffic_routes, services, routes, found)
        self._gateway_routes(gateway_routes, services, routes, found)

        self._version += 1
        state = mesh.MeshState(
            version=self._version,
            services=services,
            endpoints={k: tuple(v) for k, v in endpoints.items()},
            namespaces=namespaces,
            service_accounts=frozenset(accounts),
            routes=routes,
            pods=pods,
        )
        return state, sorted(found)

    def _convert(
        self,
        obj: manifests.KubeObject,
        convert: Callable[[manifests.KubeObject], T],
        converted: dict[int, tuple[manifests.KubeObject, object]],
    ) -> T:
        memo = self._converted.get(id(obj))
        value = memo[1] if memo is not None and memo[0] is obj else convert(obj)
        converted[id(obj)] = (obj, value)
        return value  # type: ignore[return-value]

    def _endpoints(
        self,
        obj: manifests.KubeObject,
        pods: Mapping[tuple[str, str], mesh.Pod],
        joined: dict[int, tuple[manifests.KubeObject, _Joined]],
    ) -> tuple[mesh.Endpoint, ...]:
        """A slice's endpoints, joined to their Pods; redone only when the
        slice or one of the Pods it names changed."""
        memo = self._joined.get(id(obj))
        if (
            memo is not None
            and memo[0] is obj
            and all(pods.get(ref) is info for ref, info in memo[1].pods)
        ):
            found = memo[1]
        else:
            eps = manifests.to_endpoints(obj, pods)
            refs = {(obj.namespace, e.pod) for e in eps if e.pod}
            found = _Joined(eps, tuple((ref, pods.get(ref)) for ref in sorted(refs)))
        joined[id(obj)] = (obj, found)
        return found.endpoints

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
        values: dict[str, object] = {}
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
        return dataclasses.replace(svc, **values)  # type: ignore[arg-type]

    def _routes(
        self,
        services: dict[mesh.ServiceKey, mesh.Service],
        sources: dict[mesh.ServiceKey, str],
        found: list[problems.Problem],
    ) -> dict[mesh.ServiceKey, routing.ServiceRoute]:
        routes: dict[mesh.ServiceKey, routing.ServiceRoute] = {}
        for key, svc in services.items():
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
                found.append(
                    problems.Problem(sources[key], f"Service {key}", reason, err.code, _field(err))
                )
                if kept is not None:
                    routes[key] = kept
                continue
            if route is None:
                self._good_routes.pop(key, None)
            else:
                routes[key] = self._good_routes[key] = route
        for gone in self._good_routes.keys() - services.keys():
            del self._good_routes[gone]
        for gone in self._good_notes.keys() - services.keys():
            del self._good_notes[gone]
        return routes

    def _traffic_routes(
        self,
        items: list[Sourced],
        services: dict[mesh.ServiceKey, mesh.Service],
        routes: dict[mesh.ServiceKey, routing.ServiceRoute],
        found: list[problems.Problem],
    ) -> None:
        """TrafficRoutes win over a Service's routing annotations (and say so)."""
        taken: dict[mesh.ServiceKey, str] = {}
        seen: set[tuple[str, str]] = set()
        for item in sorted(items, key=lambda i: i.obj.key):
            obj = item.obj
            ident = (obj.namespace, obj.name)
            seen.add(ident)
            try:
                parsed = trafficroute.parse(obj, services)
            except manifests.ManifestError as err:
                kept = self._good_traffic_routes.get(ident)
                if kept is not None and not (
                    kept.route.service in services and kept.route.backends() <= services.keys()
                ):
                    # Its Service or a backend is gone: it cannot stay.
                    kept = None
                found.append(
                    problems.Problem(
                        item.source,
                        str(obj),
                        _kept(err, kept),
                        _route_code(err),
                        err.field if isinstance(err, trafficroute.UnknownService) else "",
                    )
                )
                if kept is None:
                    continue
                parsed = kept
            self._good_traffic_routes[ident] = parsed
            target = parsed.route.service
            if target in taken:
                found.append(
                    problems.Problem(
                        item.source,
                        str(obj),
                        f"{taken[target]} already routes Service {target} (the first by "
                        "namespace and name wins); this one is ignored",
                        "SHL0105",
                        "spec.service",
                    )
                )
                continue
            taken[target] = str(obj)
            if target in routes and routes[target].source == "annotations":
                found.append(
                    problems.Problem(
                        item.source,
                        str(obj),
                        f"takes precedence over the routing annotations of Service {target} "
                        f"({_routing_field(services[target])}), which are ignored",
                        "SHL0105",
                        "spec.service",
                    )
                )
            routes[target] = parsed.route
            svc = services[target]
            services[target] = dataclasses.replace(
                svc,
                outlier=parsed.outlier or svc.outlier,
                limits=parsed.limits or svc.limits,
            )
        for gone in self._good_traffic_routes.keys() - seen:
            del self._good_traffic_routes[gone]

    def _gateway_routes(
        self,
        items: list[Sourced],
        services: dict[mesh.ServiceKey, mesh.Service],
        routes: dict[mesh.ServiceKey, routing.ServiceRoute],
        found: list[problems.Problem],
    ) -> None:
        """HTTPRoutes and GRPCRoutes, attached to the routes of their
        Services. Where one applies it routes instead of a TrafficRoute or
        the annotations (the README's rule), which is reported."""
        attached: dict[mesh.ServiceKey, list[routing.AttachedRoute]] = {}
        status: dict[tuple[str, str, str], tuple[gatewayapi.ParentStatus, ...]] = {}
        origins: dict[mesh.ServiceKey, tuple[Sourced, gatewayapi.Parsed]] = {}
        for item in sorted(items, key=lambda i: i.obj.key):
            obj = item.obj
            try:
                parsed = gatewayapi.parse(obj, services)
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
        for key, on_service in attached.items():
            for origin, where, why in gatewayapi.shadowed(on_service):
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
            routes[key] = dataclasses.replace(base, attached=tuple(on_service))
        for gone in self._good_gateway_routes.keys() - {i.obj.key for i in items}:
            del self._good_gateway_routes[gone]
        self.route_status = status


@dataclass(frozen=True, slots=True)
class _Joined:
    endpoints: tuple[mesh.Endpoint, ...]
    # The Pods it was joined with, by identity (None: the Pod was absent).
    pods: tuple[tuple[tuple[str, str], mesh.Pod | None], ...]


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
