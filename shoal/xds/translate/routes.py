"""Route configurations: which Host goes to which cluster."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, wrappers_pb2

from shoal.model import mesh, routing
from shoal.xds.translate import common, names, telemetry

# Retries that are always safe: the request never reached the app. They hide
# the moment between an endpoint going away and every sidecar hearing of it.
SAFE_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
SAFE_RETRIES = 2
FAULT_FILTER = "envoy.filters.http.fault"
_REDIRECT_CODES = {
    301: route_components_pb2.RedirectAction.MOVED_PERMANENTLY,
    302: route_components_pb2.RedirectAction.FOUND,
    303: route_components_pb2.RedirectAction.SEE_OTHER,
    307: route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
    308: route_components_pb2.RedirectAction.PERMANENT_REDIRECT,
}


def default_port(service: mesh.Service) -> mesh.Port | None:
    """The port a bare `Host: web` means: `http`, else 80, else the first HTTP port."""
    http = [p for p in service.ports if p.protocol.is_http]
    for p in http:
        if p.name == "http":
            return p
    for p in http:
        if p.port == 80:
            return p
    return http[0] if http else None


def backend_port(backend: mesh.Service, port: mesh.Port) -> mesh.Port | None:
    """The port of a backend that stands in for `port` of the routed Service:
    the same number, else the same name, else its default port."""
    for p in backend.ports:
        if p.port == port.port:
            return p
    named = backend.port_named(port.name) if port.name else None
    return named or default_port(backend)


def _fraction(percent: float) -> percent_pb2.FractionalPercent:
    # Millionths: "12.5%" is exact, and 100 % is everything.
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _retry_policy(retry: routing.Retry | None) -> route_components_pb2.RetryPolicy:
    if retry is None:
        return route_components_pb2.RetryPolicy(
            retry_on=SAFE_RETRY_ON, num_retries=wrappers_pb2.UInt32Value(value=SAFE_RETRIES)
        )
    policy = route_components_pb2.RetryPolicy(
        retry_on=retry.retry_on,
        num_retries=wrappers_pb2.UInt32Value(value=retry.attempts),
        # A retry goes to another endpoint when there is one.
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=common.typed(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=3,
    )
    if retry.per_try_timeout_s is not None:
        policy.per_try_timeout.CopyFrom(common.duration(retry.per_try_timeout_s))
    return policy


def _backend_cluster(
    b: routing.Backend, port: mesh.Port, services: Mapping[mesh.ServiceKey, mesh.Service]
) -> str:
    """The cluster a backend's share goes to: its own port's, the port
    standing in for the one called, or, for a backend that cannot be
    reached, one that does not exist (answered `cluster_not_found_response_code`)."""
    backend = services.get(b.service)
    if b.missing or backend is None:
        return names.INVALID_BACKEND_CLUSTER
    if b.port is not None:
        bport = next((p for p in backend.ports if p.port == b.port), None)
        if bport is None:
            return names.INVALID_BACKEND_CLUSTER
    else:
        bport = backend_port(backend, port) or port
    return names.outbound_cluster(b.service, bport, b.subset or None)


def _action(
    rule: routing.RouteRule,
    port: mesh.Port,
    services: Mapping[mesh.ServiceKey, mesh.Service],
    route: routing.ServiceRoute | None,
) -> route_components_pb2.RouteAction:
    targets = [(_backend_cluster(b, port, services), b.weight) for b in rule.backends]
    timeout = _pick(rule.timeout_s, route.timeout_s if route else None) or 0
    action = route_components_pb2.RouteAction(
        # No blanket timeout: streams and long polls are the app's business
        # until the user sets one.
        timeout=common.duration(timeout),
        retry_policy=_retry_policy(_pick(rule.retry, route.retry if route else None)),
    )
    if any(name == names.INVALID_BACKEND_CLUSTER for name, _ in targets):
        # A backend the route names but the mesh cannot reach: its share is
        # answered as the Gateway API says (500; gRPC: 503, UNAVAILABLE),
        # not with Envoy's 503 "no cluster" for every kind of route.
        action.cluster_not_found_response_code = (
            route_components_pb2.RouteAction.SERVICE_UNAVAILABLE
            if rule.unreachable_status == 503
            else route_components_pb2.RouteAction.INTERNAL_SERVER_ERROR
        )
    if rule.backend_timeout_s is not None:
        action.retry_policy.per_try_timeout.CopyFrom(common.duration(rule.backend_timeout_s))
    if len(targets) == 1:
        action.cluster = targets[0][0]
    else:
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=name, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for name, weight in targets
                    if weight > 0
                ]
            )
        )
    mirrors = [*rule.mirrors]
    mirror = _pick(rule.mirror, route.mirror if route else None)
    if mirror is not None:
        mirrors.insert(0, mirror)
    for m in mirrors:
        action.request_mirror_policies.append(
            route_components_pb2.RouteAction.RequestMirrorPolicy(
                cluster=_backend_cluster(routing.Backend(m.service, port=m.port), port, services),
                runtime_fraction=base_pb2.RuntimeFractionalPercent(
                    default_value=_fraction(m.percent)
                ),
            )
        )
    if rule.rewrite is not None:
        if rule.rewrite.hostname is not None:
            action.host_rewrite_literal = rule.rewrite.hostname
        if rule.rewrite.path is not None:
            action.regex_rewrite.CopyFrom(_path_rewrite(rule.rewrite.path, rule.path))
    return action


def _path_rewrite(
    change: routing.PathChange, matched: routing.PathMatch | None
) -> regex_pb2.RegexMatchAndSubstitute:
    """A new path as a regular expression on the old (the query string is
    kept): the whole path, or the matched prefix of whole segments replaced,
    with the Gateway API's slashes: `/foo/bar` with `/foo` -> `/xyz` is
    `/xyz/bar`, with `/foo` -> `` or `/` is `/bar`; never an empty path."""
    if change.full:
        return regex_pb2.RegexMatchAndSubstitute(
            pattern=regex_pb2.RegexMatcher(regex="^/.*$"), substitution=change.value
        )
    prefix = "" if matched is None or matched.value == "/" else matched.value.rstrip("/")
    replacement = change.value.rstrip("/")
    if not replacement:
        pattern, substitution = f"^{re.escape(prefix)}/*(.*)$", r"/\1"
    else:
        pattern, substitution = f"^{re.escape(prefix)}(/.*)?$", replacement + r"\1"
    return regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=pattern), substitution=substitution
    )


def _redirect(
    redirect: routing.Redirect, matched: routing.PathMatch | None
) -> route_components_pb2.RedirectAction:
    out = route_components_pb2.RedirectAction(response_code=_REDIRECT_CODES[redirect.status])
    if redirect.scheme is not None:
        out.scheme_redirect = redirect.scheme
    if redirect.hostname is not None:
        out.host_redirect = redirect.hostname
    if redirect.port is not None:
        out.port_redirect = redirect.port
    if redirect.path is not None:
        out.regex_rewrite.CopyFrom(_path_rewrite(redirect.path, matched))
    return out


def _header_values(
    change: routing.HeaderChange,
) -> list[base_pb2.HeaderValueOption]:
    options = base_pb2.HeaderValueOption
    return [
        *(
            options(
                header=base_pb2.HeaderValue(key=k, value=v),
                append_action=options.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in change.set
        ),
        *(
            options(
                header=base_pb2.HeaderValue(key=k, value=v),
                append_action=options.APPEND_IF_EXISTS_OR_ADD,
            )
            for k, v in change.add
        ),
    ]


T = TypeVar("T")


def _pick(rule_value: T | None, route_value: T | None) -> T | None:
    """A rule's own policy, else the route's."""
    return rule_value if rule_value is not None else route_value


def _fault(fault: routing.Fault) -> any_pb2.Any:
    config = fault_pb2.HTTPFault()
    if fault.abort_status is not None:
        config.abort.http_status = fault.abort_status
        config.abort.percentage.CopyFrom(_fraction(fault.abort_percent))
    if fault.delay_s is not None:
        config.delay.fixed_delay.CopyFrom(common.duration(fault.delay_s))
        config.delay.percentage.CopyFrom(_fraction(fault.delay_percent))
    return common.typed(config)


def _header(match: routing.HeaderMatch) -> route_components_pb2.HeaderMatcher:
    out = route_components_pb2.HeaderMatcher(name=match.name)
    if match.kind is routing.MatchKind.EXACT:
        out.string_match.exact = match.value
    elif match.kind is routing.MatchKind.PREFIX:
        out.string_match.prefix = match.value
    elif match.kind is routing.MatchKind.REGEX:
        out.string_match.safe_regex.regex = match.value
    else:
        out.present_match = True
    return out


def service_routes(
    service: mesh.Service,
    port: mesh.Port,
    route: routing.ServiceRoute | None,
    services: Mapping[mesh.ServiceKey, mesh.Service],
    mesh_sampling: float,
    caller_namespace: str | None = None,
) -> list[route_components_pb2.Route]:
    """Routes for calls from `caller_namespace` to one port of a Service,
    first match wins; `mesh_sampling` is the mesh's trace sampling, for
    Services that do not set their own.

    Where Gateway API routes apply, their merged rules route, and a request
    none of them matches is answered 404, as the Gateway API says;
    elsewhere the TrafficRoute's or annotations' rules, the last of which
    matches everything."""
    attached = (
        routing.attached_rules(route.attached, port.port, caller_namespace)
        if route is not None and route.attached
        else None
    )
    if attached is not None:
        # The Service's own policies (annotations, TrafficRoute: retries,
        # faults, a timeout the HTTPRoute does not set) still apply.
        rules, policy = attached, route
    elif route is not None and route.rules:
        rules, policy = route.rules, route
    else:
        rules, policy = (routing.RouteRule((routing.Backend(service.key),)),), None
    out = []
    for number, rule in enumerate(rules):
        # Named, so access logs and spans say which rule a request took.
        label = f"{number}:{rule.name}" if rule.name else str(number)
        name = f"{telemetry.service_name(service.key)}:{port.port}#{label}"
        r = route_components_pb2.Route(name=name, match=_match(rule))
        if rule.redirect is not None:
            r.redirect.CopyFrom(_redirect(rule.redirect, rule.path))
        elif rule.status is not None:
            r.direct_response.status = rule.status
        else:
            r.route.CopyFrom(_action(rule, port, services, policy))
        if rule.request_headers is not None:
            r.request_headers_to_add.extend(_header_values(rule.request_headers))
            r.request_headers_to_remove.extend(rule.request_headers.remove)
        if rule.response_headers is not None:
            r.response_headers_to_add.extend(_header_values(rule.response_headers))
            r.response_headers_to_remove.extend(rule.response_headers.remove)
        r.tracing.CopyFrom(telemetry.route_tracing(service, name, mesh_sampling))
        fault = _pick(rule.fault, policy.fault if policy else None)
        if fault is not None:
            r.typed_per_filter_config[FAULT_FILTER].CopyFrom(_fault(fault))
        out.append(r)
    if attached is not None:
        out.append(
            route_components_pb2.Route(
                name=f"{telemetry.service_name(service.key)}:{port.port}#unmatched",
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=route_components_pb2.DirectResponseAction(
                    status=404,
                    body=base_pb2.DataSource(
                        inline_string="shoal: no rule of the Service's routes matches\n"
                    ),
                ),
            )
        )
    return out


def _match(rule: routing.RouteRule) -> route_components_pb2.RouteMatch:
    match = route_components_pb2.RouteMatch(headers=[_header(h) for h in rule.headers])
    path = rule.path
    if path is None or path.kind is routing.MatchKind.PREFIX:
        match.prefix = path.value if path is not None else "/"
    elif path.kind is routing.MatchKind.SEGMENTS:
        if path.value == "/":
            match.prefix = "/"
        else:
            match.path_separated_prefix = path.value
    elif path.kind is routing.MatchKind.EXACT:
        match.path = path.value
    else:
        match.safe_regex.regex = path.value
    if rule.method is not None:
        match.headers.append(
            route_components_pb2.HeaderMatcher(
                name=":method", string_match=string_pb2.StringMatcher(exact=rule.method)
            )
        )
    for q in rule.query:
        param = route_components_pb2.QueryParameterMatcher(name=q.name)
        if q.kind is routing.MatchKind.PRESENT:
            param.present_match = True
        elif q.kind is routing.MatchKind.REGEX:
            param.string_match.safe_regex.regex = q.value
        elif q.kind is routing.MatchKind.PREFIX:
            param.string_match.prefix = q.value
        else:
            param.string_match.exact = q.value
        match.query_parameters.append(param)
    return match


def virtual_hosts(
    service: mesh.Service, caller_namespace: str, state: mesh.MeshState
) -> list[route_components_pb2.VirtualHost]:
    """One virtual host per HTTP port of a Service.

    The short name `web` is only offered to callers in the Service's own
    namespace, as Kubernetes DNS search paths do; across namespaces it would
    be ambiguous.
    """
    hosts = names.host_names(service.key)
    if caller_namespace != service.namespace:
        hosts = hosts[1:]
    bare = default_port(service)
    route = state.routes.get(service.key)
    out = []
    for port in service.ports:
        if not port.protocol.is_http:
            continue
        domains = [f"{h}:{port.port}" for h in hosts]
        if port == bare:
            domains = [*hosts, *domains]
        out.append(
            route_components_pb2.VirtualHost(
                name=f"{service.key.fqdn}:{port.port}",
                domains=domains,
                routes=service_routes(
                    service,
                    port,
                    route,
                    state.services,
                    state.telemetry.trace_sampling,
                    caller_namespace,
                ),
            )
        )
    return out


def not_found_host() -> route_components_pb2.VirtualHost:
    """Say plainly that the mesh has no such Service, instead of a bare 404."""
    return route_components_pb2.VirtualHost(
        name="not-in-mesh",
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=route_components_pb2.DirectResponseAction(
                    status=404,
                    body=base_pb2.DataSource(
                        inline_string="shoal: no service in the mesh matches this Host\n"
                    ),
                ),
            )
        ],
    )


def outbound(
    vhosts: Iterable[route_components_pb2.VirtualHost],
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=names.OUTBOUND_ROUTE,
        virtual_hosts=[*vhosts, not_found_host()],
    )


def inbound(cluster: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=names.INBOUND_ROUTE,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="inbound",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(
                            cluster=cluster, timeout=common.duration(0)
                        ),
                    )
                ],
            )
        ],
    )
