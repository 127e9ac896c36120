"""Sidecars whose Pod's traffic iptables captures (Kubernetes mode), as Istio's.

The app dials Service addresses as if there were no mesh; iptables sends
its outbound TCP to `virtualOutbound` (15001) and the TCP it receives to
`virtualInbound` (15006). The `original_dst` listener filter recovers the
address the app dialled, and filter chains keyed by that address choose
what happens:

- outbound, an HTTP port P of any ClusterIP Service: route table `P`, by
  Host, with the same per-Service routes as local mode;
- outbound, ClusterIP:P of a TCP port: that Service's outbound cluster;
- outbound, PodIP:P of a headless Service's endpoint: the Pod dialled, with
  mutual TLS (an ORIGINAL_DST cluster);
- inbound, a port the Pod serves: mutual TLS, then the app on 127.0.0.1;
- anything else, either way: on to where it was going (passthrough).

Envoy matches the destination port before the address, and falls back to
port-only chains when no address matches, so a ClusterIP:P chain wins over
the HTTP chain of port P without either hiding the other.

What depends only on the visible Services and the caller's namespace
(`virtual_outbound`, `route_configs`, `headless_clusters`) is the same for
every Pod of a scope; `virtual_inbound` and `own_clusters` are per Pod.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.type.v3 import range_pb2
from google.protobuf import wrappers_pb2

from shoal import spiffe
from shoal.model import mesh, proxy
from shoal.xds.translate import clusters, common, listeners, names, routes, sidecar, telemetry, tls

ORIGINAL_DST = "envoy.filters.listener.original_dst"
ANY_ADDRESS = "0.0.0.0"
PASSTHROUGH_CHAIN = "PassthroughFilterChain"
INBOUND_PASSTHROUGH_CHAIN = "InboundPassthroughFilterChain"
# A plain-text caller of a permissive port that waits for the server to
# speak first gets served after this, instead of being cut off.
_SNIFF_TIMEOUT_S = 5.0

PortSecurity = listeners.InboundSecurity | Mapping[int, listeners.InboundSecurity] | None


# -- who the proxy is -----------------------------------------------------------


def pod_problem(s: proxy.CapturedSidecar, state: mesh.MeshState) -> str | None:
    """Why this proxy must not get its Pod's configuration, or None.

    Its namespace and service account are already the certificate's; this
    checks that they are the Pod's too, so a workload cannot be given the
    ports (and callers) of a Pod it is not."""
    pod = state.pods.get(s.pod_key)
    where = f"Pod {s.namespace}/{s.pod}"
    if pod is None:
        return f"{where} is not known to the mesh"
    if pod.uid != s.pod_uid:
        return f"{where} has uid {pod.uid}, but the proxy is of uid {s.pod_uid}"
    if pod.service_account != s.service_account:
        return (
            f"{where} runs as service account {pod.service_account!r}, but its proxy's "
            f"certificate is for {s.service_account!r}"
        )
    if pod.ip and s.ip and pod.ip != s.ip:
        return f"{where} has IP {pod.ip}, but the proxy says {s.ip}"
    return None


# The ports a Pod serves, each with the Service ports it serves them for.
PodPorts = dict[int, list[tuple[mesh.Service, mesh.Port]]]
PodIndex = dict[tuple[str, str], PodPorts]


def pod_index(state: mesh.MeshState, only: Collection[tuple[str, str]] | None = None) -> PodIndex:
    """Pods' ports by (namespace, Pod), all of them or `only` those, from one
    pass over the endpoints: a caller with many Pods asks once, not once per
    Pod (each pass is every endpoint of the mesh)."""
    found: PodIndex = {}
    for key, eps in state.endpoints.items():
        service = state.services.get(key)
        if service is None:
            continue
        for e in eps:
            if e.pod is None or (only is not None and (key.namespace, e.pod) not in only):
                continue
            port = service.port_named(e.port_name)
            if port is not None:
                pod = found.setdefault((key.namespace, e.pod), {})
                pod.setdefault(e.port, []).append((service, port))
    for ports in found.values():
        for users in ports.values():
            users.sort(key=lambda user: user[0].key)
    return {pod: dict(sorted(ports.items())) for pod, ports in found.items()}


def _served(s: proxy.CapturedSidecar, state: mesh.MeshState, index: PodIndex | None) -> PodPorts:
    pod = (s.namespace, s.pod)
    return (index if index is not None else pod_index(state, {pod})).get(pod, {})


def served_services(
    s: proxy.CapturedSidecar, state: mesh.MeshState, index: PodIndex | None = None
) -> tuple[mesh.Service, ...]:
    """The Services the Pod is an endpoint of, by name. (`index`, here and
    below: `pod_index(state)`, when the caller has it.)"""
    found = {svc.key: svc for users in _served(s, state, index).values() for svc, _ in users}
    return tuple(found[k] for k in sorted(found))


def inbound_ports(
    s: proxy.CapturedSidecar, state: mesh.MeshState, index: PodIndex | None = None
) -> tuple[tuple[int, mesh.Protocol], ...]:
    """The ports the Pod serves (its endpoints' ports) and their protocol.

    Not-ready endpoints count: the chains are in place when the Pod turns
    ready. When Services disagree on a port's protocol, TCP wins, since it
    passes any bytes; otherwise the first Service's, by name."""
    out = []
    for number, users in _served(s, state, index).items():
        protocols = [p.protocol for _, p in users]
        out.append((number, mesh.Protocol.TCP if mesh.Protocol.TCP in protocols else protocols[0]))
    return tuple(out)


def security(
    s: proxy.CapturedSidecar,
    state: mesh.MeshState,
    trust_domain: str,
    index: PodIndex | None = None,
) -> dict[int, listeners.InboundSecurity]:
    """mTLS mode and callers of each port the Pod serves.

    A port serving several Services is permissive only if all of them are,
    and admits the callers of every one of them: the bytes do not say which
    Service a caller meant. One whose policy is broken admits nobody."""
    out = {}
    for number, users in _served(s, state, index).items():
        each = [
            sidecar.security(proxy.Sidecar(svc.namespace, svc.name), state, trust_domain)
            for svc in {svc.key: svc for svc, _ in users}.values()
        ]
        allowed: tuple[str, ...] | None = None
        if any(e.allow == () for e in each):
            allowed = ()  # a broken policy shuts the port: it fails closed
        elif all(e.allow is not None for e in each):
            allowed = tuple(sorted({a for e in each for a in e.allow or ()}))
        out[number] = listeners.InboundSecurity(
            permissive=all(e.permissive for e in each), allow=allowed
        )
    return out


def observe(
    s: proxy.CapturedSidecar,
    state: mesh.MeshState,
    trust_domain: str | None,
    index: PodIndex | None = None,
) -> tuple[dict[int, telemetry.Hcm], telemetry.Hcm]:
    """What the Pod's connection managers trace and log: per port served,
    the switches of the Services of that port; outbound, those of all its
    Services (see telemetry.access_log_of)."""
    spiffe_id = (
        spiffe.workload_id(trust_domain, s.namespace, s.service_account)
        if trust_domain is not None
        else ""
    )
    settings = state.telemetry
    inbound = {}
    for number, users in _served(s, state, index).items():
        services = tuple({svc.key: svc for svc, _ in users}.values())
        inbound[number] = telemetry.Hcm(
            "inbound",
            settings,
            telemetry.sampling_of(services, state),
            telemetry.access_log_of(services, s.namespace, state),
            telemetry.service_name(services[0].key),
            spiffe_id,
        )
    served = served_services(s, state, index)
    outbound = telemetry.Hcm(
        "outbound",
        settings,
        settings.trace_sampling,
        telemetry.access_log_of(served, s.namespace, state),
        telemetry.service_name(served[0].key) if served else "",
        spiffe_id,
    )
    return inbound, outbound


# -- outbound -----------------------------------------------------------------


def _prefix(address: str) -> address_pb2.CidrRange | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        # The registry should have refused it; one bad address must not
        # make Envoy reject the whole listener.
        return None
    return address_pb2.CidrRange(
        address_prefix=str(ip), prefix_len=wrappers_pb2.UInt32Value(value=ip.max_prefixlen)
    )


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _tcp_proxy(cluster: str) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(
        name=listeners.TCP_PROXY,
        typed_config=common.typed(tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)),
    )


def _outbound_http(port: int, observe: telemetry.Hcm | None) -> listener_components_pb2.Filter:
    """Local mode's outbound HTTP manager (fault filter, tracing and all),
    reading the route table of one port: taken from it, so the two cannot
    drift apart."""
    template = listeners.outbound(proxy.Sidecar("", "", outbound_port=port), observe)
    found = template.filter_chains[0].filters[0]
    manager = hcm_pb2.HttpConnectionManager()
    found.typed_config.Unpack(manager)
    manager.stat_prefix = f"outbound_{ANY_ADDRESS}_{port}"
    manager.rds.route_config_name = names.port_route(port)
    found.typed_config.Pack(manager)
    return found


def _original_dst_filter() -> listener_components_pb2.ListenerFilter:
    return listener_components_pb2.ListenerFilter(
        name=ORIGINAL_DST, typed_config=common.typed(original_dst_pb2.OriginalDst())
    )


def http_ports(visible_services: Iterable[mesh.Service]) -> tuple[int, ...]:
    """Outbound ports routed by Host, each with a route table of its number."""
    return tuple(
        sorted(
            {
                p.port
                for svc in visible_services
                if not svc.headless
                for p in svc.ports
                if p.protocol.is_http
            }
        )
    )


class _Chains:
    """Filter chains, the first of each match kept: Envoy rejects a listener
    with two identical matches (two headless Services selecting one Pod)."""

    def __init__(self) -> None:
        self.chains: list[listener_components_pb2.FilterChain] = []
        self._seen: set[tuple[int, str]] = set()

    def add(
        self,
        name: str,
        port: int,
        address: str | None,
        chain_filter: listener_components_pb2.Filter,
    ) -> None:
        match = listener_components_pb2.FilterChainMatch(
            destination_port=wrappers_pb2.UInt32Value(value=port)
        )
        if address is not None:
            prefix = _prefix(address)
            if prefix is None:
                return
            match.prefix_ranges.append(prefix)
        key = (port, match.prefix_ranges[0].address_prefix if address is not None else "")
        if key in self._seen:
            return
        self._seen.add(key)
        self.chains.append(
            listener_components_pb2.FilterChain(
                name=name, filter_chain_match=match, filters=[chain_filter]
            )
        )


def virtual_outbound(
    visible_services: Iterable[mesh.Service],
    state: mesh.MeshState,
    port: int = proxy.CAPTURE_OUTBOUND_PORT,
    observe: telemetry.Hcm | None = None,
) -> listener_pb2.Listener:
    """Where iptables sends the Pod's outbound TCP. `observe`: what its HTTP
    managers trace and log (the same for every Pod of one identity and
    access-log switch, so those Pods share it)."""
    services = sorted(visible_services, key=lambda svc: svc.key)
    chains = _Chains()
    for number in http_ports(services):
        chains.add(f"{ANY_ADDRESS}_{number}", number, None, _outbound_http(number, observe))
    for svc in services:
        for p in svc.ports:
            if svc.headless:
                # Callers found the Pods by DNS and dial them directly, on the
                # port the Pod serves: no address translation happened.
                cluster = names.original_dst_cluster(svc.key, p)
                for e in state.endpoints_of(svc.key, p):
                    if e.ready:
                        chains.add(f"{e.address}_{e.port}", e.port, e.address, _tcp_proxy(cluster))
            elif not p.protocol.is_http and svc.cluster_ip is not None:
                chains.add(
                    f"{svc.cluster_ip}_{p.port}",
                    p.port,
                    svc.cluster_ip,
                    _tcp_proxy(names.outbound_cluster(svc.key, p)),
                )
    return listener_pb2.Listener(
        name=names.VIRTUAL_OUTBOUND,
        address=common.socket_address(ANY_ADDRESS, port),
        listener_filters=[_original_dst_filter()],
        filter_chains=chains.chains,
        default_filter_chain=listener_components_pb2.FilterChain(
            name=PASSTHROUGH_CHAIN, filters=[_tcp_proxy(names.PASSTHROUGH_CLUSTER)]
        ),
        traffic_direction=base_pb2.OUTBOUND,
    )


def allow_any_host() -> route_components_pb2.VirtualHost:
    """An unknown Host on a known port goes where the app sent it (Istio's
    ALLOW_ANY), so outside HTTP services on port 80 keep working."""
    return route_components_pb2.VirtualHost(
        name=names.ALLOW_ANY,
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(
                    cluster=names.PASSTHROUGH_CLUSTER, timeout=common.duration(0)
                ),
            )
        ],
    )


def port_routes(
    port: int,
    visible_services: Iterable[mesh.Service],
    namespace: str,
    state: mesh.MeshState,
) -> route_pb2.RouteConfiguration:
    """The route table of outbound port `port`, as seen from `namespace`.

    Each Service answers to its host names with and without the port, and to
    its ClusterIP (a caller that dialled the IP may say so in Host). Routes
    are local mode's, so splits, header routes, retries and faults behave
    the same."""
    used: set[str] = set()
    vhosts = []
    for svc in sorted(visible_services, key=lambda s: s.key):
        svc_port = next((p for p in svc.ports if p.port == port and p.protocol.is_http), None)
        if svc_port is None or svc.headless or svc.cluster_ip is None:
            continue
        hosts = names.host_names(svc.key)
        if namespace != svc.namespace:
            # As in local mode: a short name means the caller's own namespace.
            hosts = hosts[1:]
        hosts = (*hosts, _host(svc.cluster_ip))
        domains = []
        for h in hosts:
            for domain in (h, f"{h}:{port}"):
                # First come first served: Envoy rejects a domain twice in one table.
                if domain not in used:
                    used.add(domain)
                    domains.append(domain)
        if not domains:
            continue
        vhosts.append(
            route_components_pb2.VirtualHost(
                name=f"{svc.key.fqdn}:{port}",
                domains=domains,
                routes=routes.service_routes(
                    svc,
                    svc_port,
                    state.routes.get(svc.key),
                    state.services,
                    state.telemetry.trace_sampling,
                    namespace,
                ),
            )
        )
    return route_pb2.RouteConfiguration(
        name=names.port_route(port), virtual_hosts=[*vhosts, allow_any_host()]
    )


def route_configs(
    visible_services: Iterable[mesh.Service], namespace: str, state: mesh.MeshState
) -> list[route_pb2.RouteConfiguration]:
    """Every route table `virtual_outbound` of the same Services refers to."""
    services = list(visible_services)
    return [port_routes(p, services, namespace, state) for p in http_ports(services)]


def headless_clusters(
    service: mesh.Service, peers: frozenset[str] | None = None
) -> list[cluster_pb2.Cluster]:
    """The ORIGINAL_DST clusters `virtual_outbound` sends a headless Service's
    traffic to; none for a Service with a ClusterIP."""
    if not service.headless:
        return []
    return [clusters.original_dst(service, p, peers) for p in service.ports]


# -- inbound ------------------------------------------------------------------


def _security_of(port: int, given: PortSecurity) -> listeners.InboundSecurity | None:
    if given is None or isinstance(given, listeners.InboundSecurity):
        return given
    # A port no Service claims a mode for is as strict as the default.
    return given.get(port, listeners.InboundSecurity())


def _port_match(
    chain: listener_components_pb2.FilterChain, port: int, name: str
) -> listener_components_pb2.FilterChain:
    out = listener_components_pb2.FilterChain()
    out.CopyFrom(chain)
    out.name = name
    out.filter_chain_match.destination_port.value = port
    return out


def _port_in(ports: list[int]) -> listener_components_pb2.ListenerFilterChainMatchPredicate:
    predicate = listener_components_pb2.ListenerFilterChainMatchPredicate
    rules = [
        predicate(destination_port_range=range_pb2.Int32Range(start=p, end=p + 1)) for p in ports
    ]
    if len(rules) == 1:
        return rules[0]
    return predicate(or_match=predicate.MatchSet(rules=rules))


def passthrough_permissive(s: proxy.CapturedSidecar, state: mesh.MeshState) -> bool:
    """Whether ports no Service declares also take plain text: the Pod's
    namespace's mode (`shoal.io/mtls`), STRICT unless it says otherwise."""
    namespace = state.namespaces.get(s.namespace)
    return namespace is not None and namespace.mtls == "permissive"


def virtual_inbound(
    s: proxy.CapturedSidecar,
    state: mesh.MeshState,
    security: PortSecurity = None,
    index: PodIndex | None = None,
    observe: Mapping[int, telemetry.Hcm] | None = None,
) -> listener_pb2.Listener:
    """Where iptables sends the TCP the Pod receives.

    `security`: None for plain text (no CA), one InboundSecurity for every
    port, or one per port (see `security()`). Each port's chains are local
    mode's inbound listener for that port, keyed by the port: the same mTLS,
    callers (RBAC) and x-forwarded-client-cert rules. Ports no Service
    declares are passed through to the app, under mTLS as well unless the
    namespace is permissive (as Istio applies STRICT to passthrough)."""
    listener = listener_pb2.Listener(
        name=names.VIRTUAL_INBOUND,
        address=common.socket_address(ANY_ADDRESS, s.inbound_port),
        listener_filters=[_original_dst_filter()],
        traffic_direction=base_pb2.INBOUND,
    )
    sniffed: list[int] = []
    declared: list[int] = []
    for number, protocol in inbound_ports(s, state, index):
        declared.append(number)
        cluster = names.inbound_cluster(number)
        port_security = _security_of(number, security)
        template = listeners.inbound(
            proxy.Sidecar(s.namespace, "", app_port=number, inbound_port=number),
            protocol,
            routes.inbound(cluster),
            port_security,
            observe.get(number) if observe is not None else None,
        )
        name = names.inbound_listener(number)
        mode = "plaintext" if port_security is None else "mtls"
        for chain in template.filter_chains:
            listener.filter_chains.append(_port_match(chain, number, f"{name}|{mode}"))
        if template.HasField("default_filter_chain"):
            # Permissive: what is not a TLS handshake is served in plain text.
            listener.filter_chains.append(
                _port_match(template.default_filter_chain, number, f"{name}|plaintext")
            )
            sniffed.append(number)
    passthrough = _tcp_proxy(names.INBOUND_PASSTHROUGH_CLUSTER)
    allowed = _pod_allow(security)
    # Callers a Pod's Services name are all it admits on ports none of them
    # declares (a debug or admin port is no way around `shoal.io/allow`).
    secured = (
        [listeners.network_rbac(allowed, "inbound_passthrough"), passthrough]
        if allowed is not None
        else [passthrough]
    )
    if security is None:
        inspect = None if not sniffed else _port_in(sniffed)
        listener.default_filter_chain.CopyFrom(
            listener_components_pb2.FilterChain(
                name=INBOUND_PASSTHROUGH_CHAIN, filters=[passthrough]
            )
        )
    elif passthrough_permissive(s, state):
        # TLS or not decides, on any port not declared: the inspector runs
        # there too (a server-first protocol waits out the timeout, then is
        # served in plain text), and is off only on declared strict ports.
        strict = [n for n in declared if n not in sniffed]
        inspect = _ALL_PORTS if not strict else _not(_port_in(strict))
        listener.filter_chains.append(
            listener_components_pb2.FilterChain(
                name=f"{INBOUND_PASSTHROUGH_CHAIN}|mtls",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    transport_protocol="tls"
                ),
                filters=secured,
                transport_socket=tls.downstream(),
            )
        )
        listener.default_filter_chain.CopyFrom(
            listener_components_pb2.FilterChain(
                name=f"{INBOUND_PASSTHROUGH_CHAIN}|plaintext", filters=secured
            )
        )
    else:
        inspect = None if not sniffed else _port_in(sniffed)
        listener.default_filter_chain.CopyFrom(
            listener_components_pb2.FilterChain(
                name=f"{INBOUND_PASSTHROUGH_CHAIN}|mtls",
                filters=secured,
                transport_socket=tls.downstream(),
            )
        )
    if inspect is not None:
        # Only where a chain depends on it: on other ports a server-first
        # protocol (the client waits) would stall until the timeout.
        inspector = listener_components_pb2.ListenerFilter(
            name=listeners.TLS_INSPECTOR,
            typed_config=common.typed(tls_inspector_pb2.TlsInspector()),
        )
        if inspect is not _ALL_PORTS:
            inspector.filter_disabled.CopyFrom(_not(inspect))
        listener.listener_filters.append(inspector)
        listener.listener_filters_timeout.CopyFrom(common.duration(_SNIFF_TIMEOUT_S))
        listener.continue_on_listener_filters_timeout = True
    return listener


def _pod_allow(security: PortSecurity) -> tuple[str, ...] | None:
    """Who may reach the Pod's undeclared ports: nobody if a policy of its
    Services is broken; else the callers its Services name (every one of
    them, if none names any)."""
    if security is None:
        return None
    each = [security] if isinstance(security, listeners.InboundSecurity) else security.values()
    named = [e.allow for e in each if e.allow is not None]
    if not named:
        return None
    if any(a == () for a in named):
        return ()
    return tuple(sorted({caller for a in named for caller in a}))


_ALL_PORTS = listener_components_pb2.ListenerFilterChainMatchPredicate(any_match=True)


def _not(
    predicate: listener_components_pb2.ListenerFilterChainMatchPredicate,
) -> listener_components_pb2.ListenerFilterChainMatchPredicate:
    if predicate.HasField("not_match"):
        return predicate.not_match
    return listener_components_pb2.ListenerFilterChainMatchPredicate(not_match=predicate)


def own_clusters(
    s: proxy.CapturedSidecar, state: mesh.MeshState, index: PodIndex | None = None
) -> list[cluster_pb2.Cluster]:
    """The app's ports on 127.0.0.1, and the two ways through for traffic
    the mesh does not know. Headless Services' clusters are per scope
    (`headless_clusters`)."""
    return [
        *(
            clusters.inbound_port(number, protocol)
            for number, protocol in inbound_ports(s, state, index)
        ),
        clusters.passthrough(names.PASSTHROUGH_CLUSTER),
        clusters.inbound_passthrough(names.INBOUND_PASSTHROUGH_CLUSTER),
        *telemetry.external_clusters(state.telemetry),
    ]
