"""One generator per kind of proxy: which groups of resources it is sent.

A local sidecar (its workload's ports), a sidecar of a captured Pod
(whatever the Pod serves and calls) and a proxyless gRPC client (only what it
may call). A generator picks the groups of its scope from what the rebuild
shares (`shared.Shared`), builds what is the proxy's own through
translation, and memoizes it: the controller neither knows nor asks which
kind a proxy is.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from shoal import tasks
from shoal.model import mesh, proxy
from shoal.xds import cache, identities, resources
from shoal.xds import shared as sharing
from shoal.xds.translate import capture, proxyless, sidecar

P = TypeVar("P", contravariant=True)
OwnGroups = tuple[cache.ResourceGroup, cache.ResourceGroup]


class Unconfigurable(Exception):
    """The proxy cannot be configured now, and why (it keeps its last
    configuration)."""


# How long a proxy's own resources outlive its stream: a proxy whose
# stream broke (a control-plane restart elsewhere, a network blip) comes
# back as the same node and finds them built.
OWN_LINGER_S = 60.0


class Own:
    """A proxy's own clusters and listeners, with what they were built from:
    one entry per connected proxy (and, for a while, per one just gone),
    found by the proxy (a thousand disconnecting must not each scan the
    others')."""

    def __init__(
        self, *, linger: float = OWN_LINGER_S, later: tasks.Later = tasks.call_later
    ) -> None:
        # (inputs, groups, the epoch in which the inputs were last compared)
        self._by_proxy: dict[proxy.Proxy, tuple[Any, OwnGroups, int]] = {}
        self._leaving = tasks.Linger(linger, self._drop, later=later)
        self._epoch = 0

    def advance(self, sidecars_hold: bool) -> None:
        """A new mesh state is being built; `sidecars_hold`: nothing a local
        sidecar's own resources are built from changed since the last one
        (`sidecar_own_holds`), so theirs are `kept` without working their
        inputs out again."""
        if not sidecars_hold:
            self._epoch += 1

    def kept(self, p: proxy.Proxy) -> OwnGroups | None:
        """A local sidecar's groups, if compared with their inputs since the
        last change that may reach them; None: `get` them."""
        found = self._by_proxy.get(p)
        if found is None or found[2] != self._epoch:
            return None
        self._leaving.back(p)
        return found[1]

    def get(self, p: proxy.Proxy, inputs: Any, build: Callable[[], OwnGroups]) -> OwnGroups:
        self._leaving.back(p)
        found = self._by_proxy.get(p)
        if found is None or found[0] != inputs:
            found = (inputs, build(), self._epoch)
        elif found[2] != self._epoch:
            found = (found[0], found[1], self._epoch)
        self._by_proxy[p] = found
        return found[1]

    def forget(self, p: proxy.Proxy) -> None:
        """Its last stream went: dropped after the linger unless it is back."""
        self._leaving.leave(p)

    def _drop(self, p: proxy.Proxy) -> None:
        self._by_proxy.pop(p, None)


@dataclass
class Context:
    """What generating one proxy's configuration reads."""

    shared: sharing.Shared
    own: Own
    # None without mutual TLS.
    secrets: identities.SecretGroups | None
    # (namespace, Pod) of the captured sidecars connected, for the Pod index.
    captured_pods: Collection[tuple[str, str]] = field(default_factory=tuple)

    @property
    def trust_domain(self) -> str | None:
        return self.shared.trust_domain

    def pod_index(self) -> capture.PodIndex:
        return self.shared.pod_index(self.captured_pods)

    def secret_groups(self, identity: mesh.Identity) -> dict[str, tuple[cache.ResourceGroup, ...]]:
        if self.secrets is None:
            return {}
        return {resources.SECRET: (self.secrets.group(identity),)}


class Generator(Protocol[P]):
    def dependencies(self, p: P, ctx: Context) -> frozenset[tuple[str, str]] | None:
        """What the proxy declared it calls (None: everything visible)."""
        ...

    def generate(self, p: P, ctx: Context, in_scope: sharing.Scope | None) -> sharing.Groups:
        """Its groups by type URL; the first cluster group and the route
        group are the scope's, checked once per scope. Raises Unconfigurable."""
        ...


def _declared(
    p: proxy.Sidecar | proxy.Proxyless, ctx: Context
) -> frozenset[tuple[str, str]] | None:
    own = ctx.shared.state.services.get(p.service_key)
    return own.dependencies if own is not None else None


def _route_inputs(ctx: Context, visible: tuple[mesh.Service, ...]) -> Any:
    # Route tables depend on the visible Services (annotations included),
    # on the routes between them and on the mesh's trace sampling.
    return (visible, ctx.shared.state.routes, ctx.shared.state.telemetry.trace_sampling)


class SidecarGenerator:
    """A local-mode sidecar: its own inbound cluster and listeners, and the
    scope's outbound clusters, endpoints and routes."""

    def dependencies(self, p: proxy.Sidecar, ctx: Context) -> frozenset[tuple[str, str]] | None:
        return _declared(p, ctx)

    def generate(
        self, p: proxy.Sidecar, ctx: Context, in_scope: sharing.Scope | None
    ) -> sharing.Groups:
        shared = ctx.shared
        scoped_clusters, scoped_endpoints = shared.scoped_groups(in_scope)
        own_clusters, own_listeners = self._own(p, ctx)
        route_group = shared.outbound_routes(p.namespace, in_scope)
        return {
            resources.CLUSTER: (scoped_clusters, own_clusters),
            resources.ENDPOINT: (scoped_endpoints,),
            resources.LISTENER: (own_listeners,),
            resources.ROUTE: (route_group,),
            **ctx.secret_groups(p.identity),
        }

    def _own(self, s: proxy.Sidecar, ctx: Context) -> OwnGroups:
        """Its inbound cluster and listeners: they change only with the
        sidecar itself, its Service's protocol or its security."""
        # Most pushes move endpoints alone: working out a thousand sidecars'
        # inputs again for them was half of such a rebuild.
        kept = ctx.own.kept(s)
        if kept is not None:
            return kept
        state = ctx.shared.state
        domain = ctx.trust_domain
        security = sidecar.security(s, state, domain) if domain is not None else None
        observed = sidecar.observe(s, state, domain)
        return ctx.own.get(
            s,
            (sidecar.inbound_protocol(s, state), security, observed),
            lambda: (
                cache.ResourceGroup(
                    sharing.resource_list(resources.CLUSTER, sidecar.own_clusters(s, state))
                ),
                cache.ResourceGroup(
                    sharing.resource_list(
                        resources.LISTENER, sidecar.own_listeners(s, state, security, observed)
                    )
                ),
            ),
        )


def sidecar_own_holds(before: mesh.MeshState, now: mesh.MeshState) -> bool:
    """Whether a local sidecar's own resources are built from the same
    things in both states. They read its Service, its namespace and the
    mesh's telemetry switches; never endpoints, routes or Pods. Told by the
    registry's delta; without one, they may have changed."""
    if before is now:
        return True
    delta = now.changed_since(before)
    return (
        delta is not None
        and not delta.services
        and not delta.namespaces
        and now.telemetry == before.telemetry
    )


def endpoints_reach_only_scoped_groups(
    before: mesh.MeshState,
    now: mesh.MeshState,
    moved: Collection[mesh.ServiceKey],
    captured_pods: Collection[tuple[str, str]],
) -> bool:
    """Whether the endpoints of `moved`, the one thing that differs between
    the two states, reach every proxy's configuration only through the
    scopes' endpoint groups, so that its new snapshot is its last with those
    groups swapped. Only captured sidecars (their `captured_pods`) read
    endpoints otherwise: the outbound listener matches a headless Service's
    by address, and the Pod index (which Service ports a Pod serves, by its
    endpoints) makes their scope and own listeners."""
    if not captured_pods:
        return True
    services = now.services
    for key in moved:
        svc = services.get(key)
        if svc is not None and svc.headless:
            return False
        if _pod_ports(key, before, captured_pods) != _pod_ports(key, now, captured_pods):
            return False
    return True


def _pod_ports(
    key: mesh.ServiceKey, state: mesh.MeshState, pods: Collection[tuple[str, str]]
) -> list[tuple[str, int, str]]:
    """What `capture.pod_index` reads of a Service's endpoints for `pods`."""
    return sorted(
        (e.pod, e.port, e.port_name)
        for e in state.endpoints.get(key, ())
        if e.pod is not None and (key.namespace, e.pod) in pods
    )


class CapturedGenerator:
    """A captured Pod's sidecar: inbound for every port the Pod serves, one
    outbound listener for whatever it calls (headless Services included)."""

    def dependencies(
        self, p: proxy.CapturedSidecar, ctx: Context
    ) -> frozenset[tuple[str, str]] | None:
        # A Pod behind one Service takes its dependencies; behind several,
        # any of them may be what it is asked to do, so none narrow it.
        served = capture.served_services(p, ctx.shared.state, ctx.pod_index())
        return served[0].dependencies if len(served) == 1 else None

    def generate(
        self, p: proxy.CapturedSidecar, ctx: Context, in_scope: sharing.Scope | None
    ) -> sharing.Groups:
        shared = ctx.shared
        state = shared.state
        _, scoped_endpoints = shared.scoped_groups(in_scope)
        visible = shared.visible(in_scope)
        problem = capture.pod_problem(p, state)
        if problem is not None:
            raise Unconfigurable(problem)
        own_clusters, own_listeners = self._own(p, ctx)
        _, observed = capture.observe(p, state, ctx.trust_domain, ctx.pod_index())
        # Shared by the Pods of one scope that trace and log alike (the
        # same identity and Service, the same access-log switch).
        variant = f"{observed.identity}|{observed.service}|{observed.access_log}"
        outbound = shared.route_table(
            sharing.RouteTable(f"capture-lds|{variant}", None, in_scope),
            (visible, _headless_endpoints(visible, state), observed),
            lambda: [
                sharing.resource(
                    resources.LISTENER,
                    capture.virtual_outbound(visible, state, observe=observed),
                )
            ],
        )
        route_group = shared.route_table(
            sharing.RouteTable("capture-rds", p.namespace, in_scope),
            _route_inputs(ctx, visible),
            lambda: sharing.resource_list(
                resources.ROUTE, capture.route_configs(visible, p.namespace, state)
            ),
        )
        return {
            resources.CLUSTER: (shared.clusters_with_headless(in_scope), own_clusters),
            resources.ENDPOINT: (scoped_endpoints,),
            resources.LISTENER: (outbound, own_listeners),
            resources.ROUTE: (route_group,),
            **ctx.secret_groups(p.identity),
        }

    def _own(self, s: proxy.CapturedSidecar, ctx: Context) -> OwnGroups:
        """Its inbound clusters and listener: they change only with the ports
        it serves and their security."""
        state, index, domain = ctx.shared.state, ctx.pod_index(), ctx.trust_domain
        security = capture.security(s, state, domain, index) if domain is not None else None
        observed, _ = capture.observe(s, state, domain, index)
        return ctx.own.get(
            s,
            (
                tuple(sorted(observed.items())),
                capture.inbound_ports(s, state, index),
                tuple(sorted(security.items())) if security is not None else None,
                capture.passthrough_permissive(s, state),
            ),
            lambda: (
                cache.ResourceGroup(
                    sharing.resource_list(resources.CLUSTER, capture.own_clusters(s, state, index))
                ),
                cache.ResourceGroup(
                    [
                        sharing.resource(
                            resources.LISTENER,
                            capture.virtual_inbound(s, state, security, index, observed),
                        )
                    ]
                ),
            ),
        )


class ProxylessGenerator:
    """A gRPC application's xDS client: an API listener and route table per
    Service port it may dial, and the scope's clusters and endpoints."""

    def dependencies(self, p: proxy.Proxyless, ctx: Context) -> frozenset[tuple[str, str]] | None:
        return _declared(p, ctx)

    def generate(
        self, p: proxy.Proxyless, ctx: Context, in_scope: sharing.Scope | None
    ) -> sharing.Groups:
        shared = ctx.shared
        state = shared.state
        scoped_clusters, scoped_endpoints = shared.scoped_groups(in_scope)
        visible = shared.visible(in_scope)
        inputs = _route_inputs(ctx, visible)
        listeners = shared.route_table(
            sharing.RouteTable("proxyless-lds", p.namespace, in_scope),
            inputs,
            lambda: sharing.resource_list(
                resources.LISTENER, proxyless.listeners(visible, p.namespace)
            ),
        )
        route_group = shared.route_table(
            sharing.RouteTable("proxyless-rds", None, in_scope),
            inputs,
            lambda: sharing.resource_list(resources.ROUTE, proxyless.route_configs(visible, state)),
        )
        if ctx.trust_domain is not None:
            # gRPC's xDS client takes TLS only from certificate providers,
            # not SDS: proxyless clients call in plain text for now.
            scoped_clusters = shared.plain_clusters(in_scope)
        return {
            resources.CLUSTER: (scoped_clusters,),
            resources.ENDPOINT: (scoped_endpoints,),
            resources.LISTENER: (listeners,),
            resources.ROUTE: (route_group,),
        }


_BY_KIND: dict[type, Generator[Any]] = {
    proxy.Sidecar: SidecarGenerator(),
    proxy.CapturedSidecar: CapturedGenerator(),
    proxy.Proxyless: ProxylessGenerator(),
}


def of(p: proxy.Proxy) -> Generator[Any]:
    """The generator of a proxy's kind."""
    return _BY_KIND[type(p)]


def _headless_endpoints(
    visible: tuple[mesh.Service, ...], state: mesh.MeshState
) -> tuple[tuple[mesh.Endpoint, ...], ...]:
    """What the outbound capture listener reads besides the Services: the
    endpoints of headless ones, which it matches by address."""
    return tuple(state.endpoints.get(s.key, ()) for s in visible if s.headless)
