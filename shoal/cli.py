"""The composition root: parses flags, builds and wires everything."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import http.client
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from prometheus_client import CollectorRegistry

from shoal import heap, kube, sidecar_files, spiffe, tasks, terminal, workers
from shoal.agent import health as agent_health
from shoal.agent import iptables
from shoal.agent import run as agent_run
from shoal.agent import settings as agent_settings
from shoal.injector import bundle as injector_bundle
from shoal.injector import patch as injector_patch
from shoal.injector import settings as injector_settings
from shoal.injector import webhook
from shoal.injector import workloads as injector_workloads
from shoal.model import mesh, problems, proxy
from shoal.observe import admin, metrics, traces
from shoal.observe import describe as observe_describe
from shoal.observe import reports as observe_reports
from shoal.observe.analysis import facts as analysis_facts
from shoal.observe.analysis import gather as analysis_gather
from shoal.observe.analysis import run as analysis_run
from shoal.observe.analysis import show as analysis_show
from shoal.observe.dashboard import launch as dashboard_launch
from shoal.observe.dashboard import prometheus as dashboard_prometheus
from shoal.observe.dashboard import server as dashboard_server
from shoal.registry import events as registry_events
from shoal.registry import files, kubernetes, routestatus
from shoal.sds import ca, join, operations, report, roots, rotation, tls, workloads
from shoal.xds import cache, controller, csds, debounce, proxydiff, server, status
from shoal.xds.translate import bootstrap as bootstrap_config

log = logging.getLogger("shoal")
T = TypeVar("T")

DEFAULT_XDS = "127.0.0.1:15010"
DEFAULT_ADMIN = "127.0.0.1:15014"
DEFAULT_COLLECTOR = "127.0.0.1:15018"
# The dashboard `shoal serve --kubernetes` serves on its Pod's loopback.
DASHBOARD_PORT = 15019
# The admin action that hands out the served dashboard's login link.
DASHBOARD_LOGIN = "dashboard/login"
ADMIN_SOCKET = "admin.sock"
MAX_WORKERS = 64
# Where the CLI finds a control plane: its admin socket in the state
# directory, unless --admin or SHOAL_ADMIN says otherwise.
ADMIN_ENV = "SHOAL_ADMIN"
# `shoal demo` runs examples/demo unless given a mesh; a wheel has no
# examples/, so its build copies that folder into the package (setup.py).
PACKAGED_DEMO_MESH = Path(__file__).resolve().parent / "demo" / "manifests"
CHECKOUT_DEMO_MESH = Path(__file__).resolve().parent.parent / "examples" / "demo"


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


@dataclass
class ServeOptions:
    # A manifests folder, or None with `kubernetes`.
    registry: Path | None = None
    xds_address: str = DEFAULT_XDS
    admin_address: str = DEFAULT_ADMIN
    state_dir: Path = Path(".shoal")
    debounce_quiet: float = 0.1
    debounce_max: float = 1.0
    trust_domain: str = "cluster.local"
    workload_ttl: datetime.timedelta = ca.WORKLOAD_TTL
    insecure_xds: bool = False
    # Names clients may use to reach xDS, for the serving certificate.
    xds_hosts: tuple[str, ...] = ()
    ca_cert: Path | None = None
    ca_key: Path | None = None
    ca_chain: Path | None = None
    # How long each step of a root rotation waits for proxies to catch up.
    root_rotation_step_timeout: float = 60.0
    # Where machines outside join with a token and a CSR ("" for nowhere),
    # and Pods' sidecar agents certify with their service-account token.
    join_address: str = "127.0.0.1:15012"
    # Lifetime of the xDS client certificates agents get (tests shorten it).
    agent_ttl: datetime.timedelta = ca.AGENT_TTL
    # Watch a Kubernetes API server instead of a folder.
    kubernetes: bool = False
    kubeconfig: str | None = None
    kube_context: str | None = None
    namespaces: tuple[str, ...] = ()
    # The Secret (in shoal's own namespace) that holds the mesh root, so
    # that every replica signs with the same one.
    ca_secret: str = "shoal-ca"
    # Identities (namespace/service-account) that may read every proxy's
    # status over CSDS; any other sees only proxies of its own identity.
    admin_identities: tuple[str, ...] = ()
    limits: server.Limits = dataclasses.field(default_factory=server.Limits)
    # The admin API for authenticated callers (default STATE_DIR/admin.sock).
    admin_socket: Path | None = None
    # Names (besides IP addresses and localhost) callers of the TCP admin
    # port may use in Host, e.g. a Service name Prometheus scrapes by.
    admin_hosts: tuple[str, ...] = ()
    # The sidecar injection webhook (HTTPS), "" for off (`shoal serve
    # --kubernetes` turns it on at 0.0.0.0:15017 unless told otherwise).
    webhook_address: str = ""
    # What the webhook injects.
    injection: injector_settings.Settings = dataclasses.field(
        default_factory=injector_settings.Settings
    )
    # Where injected sidecars reach xDS and the join port (default: shoal's
    # Service in its own namespace, ports 15010 and 15012).
    sidecar_xds_address: str | None = None
    sidecar_ca_address: str | None = None
    # The MutatingWebhookConfiguration whose caBundle shoal keeps current.
    webhook_configuration: str = injector_bundle.CONFIGURATION
    # Tracing and access logs of every sidecar (README "Introspection").
    telemetry: mesh.Telemetry = dataclasses.field(default_factory=mesh.Telemetry)
    # The embedded trace collector (HTTPS, mesh client certificates), "" for
    # off (`shoal serve` listens on DEFAULT_COLLECTOR unless told otherwise).
    collector_address: str = ""
    max_spans: int = traces.DEFAULT_MAX_SPANS
    max_span_bytes: int = traces.DEFAULT_MAX_BYTES
    # The dashboard, served by the control plane itself, "" for off
    # (`shoal serve --kubernetes`: 127.0.0.1:15019 in its Pod, which
    # `shoal dashboard --kubernetes` reaches with kubectl port-forward).
    dashboard_address: str = ""
    # Where that dashboard's graph takes its traffic from ("": the sidecars
    # whose Envoy admin is on this host).
    dashboard_prometheus: str = ""
    # Processes serving xDS on the one xDS address (shoal/workers.py), and
    # which of them this is: 0 is the one started, the one with the admin
    # port, dashboard, webhook, join port and collector.
    workers: int = 1
    worker: int = 0


@dataclass
class ControlPlane:
    """A running control plane: what it listens on and what it holds."""

    xds_port: int
    admin_port: int
    registry: files.FolderRegistry | kubernetes.KubernetesRegistry
    controller: controller.Controller
    ads: server.AdsServer
    authority: ca.Authority | None
    certificates: workloads.WorkloadCertificates | None
    join_port: int = 0
    admin_socket: str = ""
    webhook_port: int = 0
    collector_port: int = 0
    traces: traces.SpanStore | None = None
    # The dashboard's URL with its login token ("" when not served).
    dashboard_url: str = ""


@contextlib.asynccontextmanager
async def control_plane(options: ServeOptions) -> AsyncIterator[ControlPlane]:
    """Start everything `shoal serve` runs; stop all of it, in reverse, on exit."""
    given = options
    async with contextlib.AsyncExitStack() as stack:
        keeper = heap.HeapKeeper(hold=heap.HOLD_AFTER_BURST_S)
        kube_api: kube.Api | None = None
        registry: files.FolderRegistry | kubernetes.KubernetesRegistry
        if options.kubernetes:
            kube_api = kube.Api(kube.connect(options.kubeconfig, options.kube_context))
            stack.push_async_callback(kube_api.close)
            # Sidecars reach xDS through shoal's Service: its names go in the
            # serving certificate.
            namespace = kube_api.server.namespace
            options = dataclasses.replace(
                options,
                xds_hosts=(
                    *options.xds_hosts,
                    "shoal",
                    f"shoal.{namespace}",
                    f"shoal.{namespace}.svc",
                    f"shoal.{namespace}.svc.cluster.local",
                ),
            )
            registry = kubernetes.KubernetesRegistry(
                kube_api, namespaces=options.namespaces or None, quiet_gc=keeper.paused
            )
        else:
            assert options.registry is not None
            registry = files.FolderRegistry(options.registry)

        authority: ca.Authority | None = None
        record: rotation.RootRecord | None = None
        if not options.insecure_xds:
            if kube_api is not None and options.ca_cert is None:
                authority, record = await roots.load_shared(
                    kube_api, options.ca_secret, options.trust_domain
                )
            elif options.worker > 0 and options.ca_cert is None:
                authority, record = roots.load_local_shared(options.state_dir, options.trust_domain)
            else:
                authority = roots.load_local(
                    options.state_dir, options.trust_domain, _plugged(options)
                )
                if options.workers > 1 and options.ca_cert is None:
                    record = roots.share_local(options.state_dir, authority)
                    # Keys in it, for the workers only: gone with them.
                    stack.callback(roots.unshare_local, options.state_dir)
                else:
                    # One left by a run that did not stop cleanly.
                    roots.unshare_local(options.state_dir)
        certificates = (
            workloads.WorkloadCertificates(authority, ttl=options.workload_ttl)
            if authority is not None
            else None
        )

        snapshots = cache.SnapshotCache(controller.Controller.key_of)
        ctl = controller.Controller(
            snapshots,
            debounce.Debouncer(options.debounce_quiet, options.debounce_max),
            certificates,
            quiet_gc=keeper.paused,
        )
        if certificates is not None:
            certificates.on_change = lambda due: ctl.refresh(
                f"certificates of {len(due)} identities renewed"
            )
        mesh_telemetry = options.telemetry

        def update(state: mesh.MeshState) -> None:
            # The mesh-wide telemetry settings travel with the state, so
            # translation reads them as it reads everything else.
            ctl.update(dataclasses.replace(state, telemetry=mesh_telemetry))

        if isinstance(registry, files.FolderRegistry):
            update(registry.load())
            ctl.rebuild()
        # From Kubernetes, the first state comes once every kind is listed;
        # until then proxies wait rather than get an empty mesh.

        metric_registry = CollectorRegistry()
        ads = server.AdsServer(
            snapshots,
            observer=metrics.XdsMetrics(metric_registry),
            trust_domain=options.trust_domain if certificates is not None else None,
            limits=options.limits,
            still_trusted=(
                (lambda pem: certificates.authority.signed_client(pem))
                if certificates is not None
                else None
            ),
        )
        metric_registry.register(_gauges(ads, ctl, registry))
        _more_metrics(metric_registry, ads, ctl, registry, certificates)

        xds_port, xds_server = await _xds_server(stack, options, ads, certificates)
        span_store = traces.SpanStore(options.max_spans, options.max_span_bytes)
        collector_port = 0
        if options.collector_address:
            collector_host, port = _host_port(options.collector_address)
            collector_port = await stack.enter_async_context(
                traces.serve(
                    span_store,
                    collector_host,
                    port,
                    tls.mutual_ssl_context(
                        certificates, tls.serving_hosts(collector_host, options.xds_hosts)
                    )
                    if certificates is not None
                    else None,
                )
            )

        reports: dict[str, admin.Report] = {
            "problems": lambda: analysis_report(),
            "syncz": lambda: status.proxies(ads),
            "services": lambda: observe_reports.services(ctl.state),
            "pushes": lambda: [p.as_dict() for p in reversed(ctl.recent_pushes)],
        }
        if isinstance(registry, kubernetes.KubernetesRegistry):
            reports["kubernetes"] = registry.health
        webhook_keeper: list[injector_bundle.CaBundle] = []

        socket_path = options.admin_socket or options.state_dir / ADMIN_SOCKET
        # Worker 0's view of the others (shoal/workers.py).
        worker_sockets = {
            i: workers.socket_of(socket_path, i)
            for i in range(1, options.workers if options.worker == 0 else 1)
        }

        async def every_proxy() -> tuple[analysis_facts.ProxyFacts, ...]:
            """The proxies of this worker, and of every other one."""
            own = analysis_gather.proxies(ads, ctl)
            return (
                await analysis_gather.with_workers(own, worker_sockets) if worker_sockets else own
            )

        reports[analysis_gather.PROXY_FACTS.removeprefix("/debug/")] = lambda: [
            analysis_facts.proxy_facts_json(p) for p in analysis_gather.proxies(ads, ctl)
        ]

        async def analysis_problems() -> list[problems.Problem]:
            """Every analyzer over what the control plane knows now: what
            /debug/problems shows, and the Events on Kubernetes objects."""
            found = await analysis_gather.live(
                ctl.state,
                tuple(registry.problems + ctl.problems),
                ads,
                ctl,
                debounce_max_s=options.debounce_max,
                injection_webhook=lambda: webhook_keeper[0].installed if webhook_keeper else None,
                clock_offsets=span_store.clock_offsets,
                connected=await every_proxy(),
            )
            return analysis_run.analyze(found)

        async def analysis_report() -> list[dict[str, str]]:
            return [p.as_dict() for p in await analysis_problems()]

        actions: dict[str, admin.Action] = {}
        background = await stack.enter_async_context(tasks.Tasks())
        shared_root: rotation.SharedRoot | None = None
        join_port = webhook_port = 0
        if authority is not None and certificates is not None:
            reports["ca"] = lambda: report.status(
                # The authority now: a root rotation replaces it.
                certificates.authority,
                certificates,
                status.held_by_proxy(ads, "default"),
            )
            if worker_sockets:
                own_ca = reports["ca"]

                async def every_ca() -> dict[str, Any]:
                    found = await workers.gather(worker_sockets, "/debug/ca")
                    return report.with_workers(
                        own_ca(),
                        {i: json.loads(body) for i, (code, body) in found.items() if code == 200},
                    )

                reports["ca"] = every_ca

            def revoke() -> None:
                # The root these streams were authenticated under is no longer
                # trusted: each must reconnect with a certificate of the new one.
                ads.disconnect_all(
                    "the root that signed this proxy's certificate is no longer trusted"
                )

            if kube_api is not None and record is not None:
                shared_root = roots.shared_root(kube_api, options.ca_secret, certificates, revoke)
            elif record is not None:
                shared_root = roots.local_shared_root(options.state_dir, certificates, revoke)
            if shared_root is not None and record is not None:
                shared_root.applied(record)
            reports[HELD_FOR_ROTATION] = lambda: {
                name: [_b64(bundle), _b64(chain)]
                for name, (bundle, chain) in _held_for_rotation(ads).items()
            }

            async def held_everywhere() -> rotation.Held:
                """What every worker's proxies hold, for a rotation to wait on."""
                held = _held_for_rotation(ads)
                found = await workers.gather(worker_sockets, f"/debug/{HELD_FOR_ROTATION}")
                for index, (code, body) in found.items():
                    if code != 200:
                        continue
                    for name, (bundle, chain) in json.loads(body).items():
                        held[f"{name} (worker {index})"] = (_unb64(bundle), _unb64(chain))
                return held

            if options.ca_cert is None and options.worker == 0:
                rotations = operations.RootRotations(
                    rotation.RootRotation(
                        None if shared_root is not None else options.state_dir,
                        certificates,
                        held_everywhere,
                        step_timeout=options.root_rotation_step_timeout,
                        announce=shared_root.announce if shared_root is not None else None,
                        on_revoke=revoke,
                        # Other replicas read the record every poll, then push.
                        settle=2 * shared_root.poll + 1 if shared_root is not None else 0.0,
                    ),
                    kube.Lease(
                        kube_api,
                        kube_api.server.namespace,
                        operations.LEADER_LEASE,
                        _replica_name(),
                    )
                    if kube_api is not None
                    else None,
                    background,
                )
                actions["ca/rotate-root"] = rotations.start
                reports["ca/rotation"] = rotations.progress
            if options.join_address:
                tokens = join.JoinTokens()
                join_host, port = _host_port(options.join_address)
                join_port = await stack.enter_async_context(
                    operations.join_port(
                        certificates,
                        tokens,
                        join_host,
                        port,
                        options.xds_hosts,
                        # Agents' tokens are checked with the API server's TokenReview.
                        reviewer=kube.TokenReviews(kube_api) if kube_api is not None else None,
                        agent_ttl=options.agent_ttl,
                    )
                )
                actions["ca/join-token"] = operations.JoinTokenIssuer(
                    tokens, options.trust_domain, join_port
                ).mint
            webhook_port = await _webhook(stack, options, certificates, kube_api, metric_registry)

        dashboard_url = ""
        if options.dashboard_address:
            dashboard_url = await _dashboard(stack, options, str(socket_path))
            # The login link, for whoever may open the admin socket (on
            # Kubernetes: who may `kubectl exec` into this Pod).
            login = {"url": dashboard_url}

            async def dashboard_login(_: Mapping[str, str]) -> dict[str, str]:
                return login

            actions[DASHBOARD_LOGIN] = dashboard_login
        if worker_sockets:
            own_proxies = reports["syncz"]
            reports["syncz"] = lambda: workers.every_proxy(own_proxies(), worker_sockets)

        async def describe(q: Mapping[str, str]) -> dict[str, Any] | None:
            return observe_describe.service_of(
                ctl.state,
                q,
                await every_proxy(),
                certificates.trust_domain if certificates is not None else None,
            )

        admin_host, admin_port = (
            _host_port(options.admin_address) if options.admin_address else (None, 0)
        )
        admin_port = await stack.enter_async_context(
            admin.serve(
                admin.app(
                    ready=(
                        (lambda: workers.every_ready(registry.ready(), worker_sockets))
                        if worker_sockets
                        else registry.ready
                    ),
                    reports=reports,
                    queries={
                        "config_dump": workers.found_anywhere(
                            lambda q: status.config_dump_of(ads, q),
                            "/debug/config_dump",
                            worker_sockets,
                        ),
                        "proxy_diff": workers.found_anywhere(
                            lambda q: proxydiff.diff_of(ads, q), "/debug/proxy_diff", worker_sockets
                        ),
                        "describe": describe,
                        "identities": lambda q: observe_reports.identities(ctl.state, q),
                        "traces": span_store.query_list,
                        "traces/{trace_id}": span_store.query_one,
                    },
                    metrics=(
                        (lambda: workers.every_metric(metric_registry, worker_sockets))
                        if worker_sockets
                        else (lambda: metrics.render(metric_registry))
                    ),
                    actions=actions,
                    hosts=options.admin_hosts,
                    socket_path=str(socket_path),
                ),
                admin_host,
                admin_port,
                socket_path,
            )
        )

        running = await stack.enter_async_context(tasks.Tasks())
        stop_watch = asyncio.Event()
        stack.callback(stop_watch.set)
        running.start(ctl.run(), "controller")
        if certificates is not None:
            running.start(certificates.run(), "certificates")
            # Streams whose certificate expired, or whose root's window
            # ended, while they were open.
            running.start(ads.keep_checking(), "stream-certificates")
        running.start(registry.watch(update, stop_watch), "registry-watch")
        # Full garbage collections out of the push path (see shoal/heap.py).
        running.start(keeper.run(), "heap-keeper")
        if shared_root is not None:
            running.start(shared_root.follow(), "shared-root")
        if options.workers > 1 and options.worker == 0:
            # The other workers bind the port this one bound (":0" included).
            xds_address = f"{_host_port(options.xds_address)[0]}:{xds_port}"
            pool = workers.Pool(
                options.workers,
                workers.worker_command(logging.getLevelName(logging.getLogger().level).lower()),
                lambda i: dataclasses.replace(
                    given,
                    worker=i,
                    xds_address=xds_address,
                    admin_address="",
                    admin_socket=worker_sockets[i],
                    join_address="",
                    webhook_address="",
                    collector_address="",
                    dashboard_address="",
                ),
            )

            async def stop_serving(pool: workers.Pool = pool) -> None:
                # This worker's port closes with the others': their proxies
                # do not move here only to be dropped again.
                await asyncio.gather(xds_server.stop(1), pool.stop())

            stack.push_async_callback(stop_serving)
            await pool.start()
            running.start(pool.supervise(), "xds-workers")
        # What follows is done once for the whole control plane: by worker 0.
        leader_duties = options.worker == 0
        if kube_api is not None and webhook_port and certificates is not None:
            trusted = certificates
            keeper_of_bundle = injector_bundle.CaBundle(
                kube_api,
                lambda: trusted.authority.xds_trust,
                kube.Lease(
                    kube_api, kube_api.server.namespace, injector_bundle.LEASE, _replica_name()
                ),
                name=options.webhook_configuration,
            )
            reports["injection"] = lambda: {"caBundle": keeper_of_bundle.last}
            webhook_keeper.append(keeper_of_bundle)
            running.start(keeper_of_bundle.run(), "webhook-ca-bundle")
        if (
            leader_duties
            and kube_api is not None
            and isinstance(registry, kubernetes.KubernetesRegistry)
        ):
            watched = registry
            writer = routestatus.RouteStatus(
                kube_api,
                lambda: watched.route_status,
                kube.Lease(kube_api, kube_api.server.namespace, routestatus.LEASE, _replica_name()),
            )
            reports["route_status"] = lambda: {"last": writer.last}
            running.start(writer.run(), "route-status")
            # The problems that name Kubernetes objects, as Events on them.
            problem_events = registry_events.ProblemEvents(
                kube_api,
                analysis_problems,
                kube.Lease(
                    kube_api, kube_api.server.namespace, registry_events.LEASE, _replica_name()
                ),
                instance=_replica_name(),
            )
            reports["problem_events"] = lambda: {"last": problem_events.last}
            running.start(problem_events.run(), "problem-events")
        yield ControlPlane(
            xds_port,
            admin_port,
            registry,
            ctl,
            ads,
            authority,
            certificates,
            join_port,
            str(socket_path),
            webhook_port,
            collector_port,
            span_store,
            dashboard_url,
        )


async def _dashboard(
    stack: contextlib.AsyncExitStack, options: ServeOptions, socket_path: str
) -> str:
    """The dashboard, served next to the admin socket it reads (its pages
    ask the admin API over that socket, as `shoal dashboard` does); its URL."""
    host, port = _host_port(options.dashboard_address)
    metrics = (
        dashboard_prometheus.Prometheus(options.dashboard_prometheus)
        if options.dashboard_prometheus
        else None
    )
    url: str = await stack.enter_async_context(
        dashboard_server.serve(socket_path, host, port, metrics=metrics)
    )
    log.info("dashboard at %s", url.split("?", 1)[0])
    return url


async def _webhook(
    stack: contextlib.AsyncExitStack,
    options: ServeOptions,
    certificates: workloads.WorkloadCertificates,
    kube_api: kube.Api | None,
    metric_registry: CollectorRegistry,
) -> int:
    """The injection webhook, if it is on; the port bound (0 if off)."""
    address = options.webhook_address
    if not address:
        return 0
    own = kube_api.server.namespace if kube_api is not None else "shoal-system"
    injection = dataclasses.replace(
        options.injection,
        trust_domain=options.trust_domain,
        xds_address=options.sidecar_xds_address or f"shoal.{own}.svc:15010",
        ca_address=options.sidecar_ca_address or f"shoal.{own}.svc:15012",
    )

    def current() -> injector_settings.Settings:
        # Pods injected after a root rotation trust the roots of then.
        return dataclasses.replace(injection, trust_pem=certificates.authority.xds_trust.decode())

    host, port = _host_port(address)
    hosts = tls.serving_hosts(host, options.xds_hosts)
    observed = metrics.InjectionMetrics(metric_registry)
    bound: int = await stack.enter_async_context(
        webhook.serve(
            webhook.app(current, skip_namespaces=frozenset({own}), observe=observed.observe),
            host,
            port,
            tls.serving_ssl_context(certificates, hosts),
        )
    )
    return bound


def _plugged(options: ServeOptions) -> roots.PluggedCa | None:
    if options.ca_cert is None or options.ca_key is None:
        return None
    return roots.PluggedCa(options.ca_cert, options.ca_key, options.ca_chain)


def _more_metrics(
    metric_registry: CollectorRegistry,
    ads: server.AdsServer,
    ctl: controller.Controller,
    registry: files.FolderRegistry | kubernetes.KubernetesRegistry,
    certificates: workloads.WorkloadCertificates | None,
) -> None:
    """Proxies by mode and kind, pushes, certificates and the registry (see
    the README's Metrics table); read at scrape time, or once per push."""
    metric_registry.register(metrics.ProxyMetrics(ads, ctl.kind_of))
    ctl.on_push = metrics.PushMetrics(metric_registry).observe
    if certificates is not None:
        metric_registry.register(metrics.CertificateMetrics(certificates))
    if isinstance(registry, kubernetes.KubernetesRegistry):
        stats = registry.stats
        watched = metrics.KubernetesMetrics(registry.health, lambda: stats.events_by)
        metric_registry.register(watched)
    else:
        folder = registry
        metric_registry.register(
            metrics.FolderMetrics(lambda: folder.reloads, lambda: folder.reload_failures)
        )


def _gauges(
    ads: server.AdsServer,
    ctl: controller.Controller,
    registry: files.FolderRegistry | kubernetes.KubernetesRegistry,
) -> metrics.Gauges:
    return metrics.Gauges(
        {
            "shoal_xds_connected_streams": ("ADS streams open now", lambda: len(ads.connections)),
            "shoal_mesh_services": ("Services in the mesh", lambda: len(ctl.state.services)),
            "shoal_mesh_endpoints": (
                "Endpoints in the mesh",
                lambda: sum(len(e) for e in ctl.state.endpoints.values()),
            ),
            "shoal_mesh_version": ("Version of the mesh state", lambda: ctl.state.version),
            "shoal_config_problems": (
                "Problems in the input, each reported with its object and reason",
                lambda: len(registry.problems) + len(ctl.problems),
            ),
        }
    )


async def _xds_server(
    stack: contextlib.AsyncExitStack,
    options: ServeOptions,
    ads: server.AdsServer,
    certificates: workloads.WorkloadCertificates | None,
) -> tuple[int, grpc.aio.Server]:
    """ADS and CSDS on the xDS address, mutual TLS unless --insecure-xds;
    the port bound."""
    grpc_server = grpc.aio.server(options=server.GRPC_OPTIONS)
    grpc_server.add_generic_rpc_handlers((ads.handler(),))
    csds.register(
        grpc_server,
        ads,
        frozenset(
            spiffe.workload_id(options.trust_domain, *a.split("/", 1))
            for a in options.admin_identities
        ),
    )
    host, port = _host_port(options.xds_address)
    if certificates is None:
        port = grpc_server.add_insecure_port(f"{host}:{port}")
    else:
        credentials = tls.serving_credentials(
            certificates, tls.serving_hosts(host, options.xds_hosts), client_auth=True
        )
        port = grpc_server.add_secure_port(f"{host}:{port}", credentials)
    if port == 0:
        raise OSError(f"cannot listen on {options.xds_address}")
    await grpc_server.start()
    stack.push_async_callback(grpc_server.stop, 1)
    return port, grpc_server


INSECURE_WARNING = (
    "shoal: WARNING: plain-text xDS for {what}: anyone who can reach the control "
    "plane can read the mesh's configuration and claim any workload; no workload "
    "certificates are served and traffic between sidecars is not encrypted."
)


def _replica_name() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


# Each worker's proxies' trust bundles and certificates, for worker 0's rotation.
HELD_FOR_ROTATION = "ca/held"


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data is not None else None


def _unb64(text: str | None) -> bytes | None:
    return base64.b64decode(text) if text is not None else None


def _held_for_rotation(
    ads: server.AdsServer,
) -> dict[str, tuple[bytes | None, bytes | None]]:
    bundles = status.held_by_proxy(ads, "ROOTCA")
    certs = status.held_by_proxy(ads, "default")
    return {
        name: (bundles[name], report.chain_of_secret(cert) if cert else None)
        for name, cert in certs.items()
    }


async def _serve(options: ServeOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with control_plane(options) as cp:
        state = cp.controller.state
        security = (
            "plain text" if cp.authority is None else f"mTLS, trust domain {options.trust_domain}"
        )
        if options.workers > 1:
            security += f", {options.workers} workers"
        print(
            f"shoal: xDS on {_host_port(options.xds_address)[0]}:{cp.xds_port} ({security}), "
            f"admin on http://{_host_port(options.admin_address)[0]}:{cp.admin_port}/ "
            f"({len(state.services)} services from "
            f"{'kubernetes' if options.kubernetes else options.registry}); "
            f"admin socket {cp.admin_socket}",
            flush=True,
        )
        for problem in cp.registry.problems:
            print(f"shoal: problem: {terminal.printable(str(problem), 2000)}", file=sys.stderr)
        await stop.wait()
        print("shoal: stopping", flush=True)
    return 0


async def _serve_worker() -> int:
    """One of workers 1 to N-1 (shoal/workers.py): its options come from
    worker 0 on stdin; it serves until stdin closes or SIGTERM."""
    stdin = await workers.stdin_reader()
    try:
        options = await workers.read_options(stdin)
    except Exception:  # whatever it is, it is not worker 0's pipe
        options = None
    if not isinstance(options, ServeOptions):
        print(
            "shoal serve --worker: this is what shoal serve --workers N starts; "
            "it is not for starting by hand",
            file=sys.stderr,
        )
        return 2
    # Its lines go where worker 0's go: each says which worker wrote it.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(terminal.Formatter(f"[worker {options.worker}] {LOG_FORMAT}"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group; worker 0 stops the others.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    async with control_plane(options), tasks.Tasks() as running:
        running.start(workers.until_parent_gone(stdin), "parent").add_done_callback(
            lambda _: stop.set()
        )
        print(workers.READY, flush=True)
        await stop.wait()
    return 0


def _address_for(given: str | None, kubernetes: bool, in_cluster: str, local: str = "") -> str:
    """A listener's address: as given (`''` for off), else its default for
    the mode."""
    if given is not None:
        return given
    return in_cluster if kubernetes else local


def cmd_serve(args: argparse.Namespace) -> int:
    if args.worker:
        heap.tune_malloc()
        return asyncio.run(_serve_worker())
    if not 1 <= args.workers <= MAX_WORKERS:
        print(f"shoal serve: --workers must be 1 to {MAX_WORKERS}", file=sys.stderr)
        return 2
    if (args.registry is None) == (not args.kubernetes):
        print("shoal serve: give either --registry DIR or --kubernetes", file=sys.stderr)
        return 2
    options = ServeOptions(
        registry=Path(args.registry) if args.registry else None,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        kube_context=args.context,
        namespaces=tuple(n for n in (args.namespaces or "").split(",") if n),
        ca_secret=args.ca_secret,
        xds_address=args.xds_address,
        admin_address=args.admin_address,
        state_dir=Path(args.state_dir),
        debounce_quiet=args.debounce_quiet,
        debounce_max=args.debounce_max,
        trust_domain=args.trust_domain,
        workload_ttl=datetime.timedelta(seconds=args.workload_cert_ttl),
        insecure_xds=args.insecure_xds,
        xds_hosts=tuple(args.xds_host),
        join_address=args.join_address,
        agent_ttl=datetime.timedelta(seconds=args.agent_cert_ttl),
        ca_cert=Path(args.ca_cert) if args.ca_cert else None,
        ca_key=Path(args.ca_key) if args.ca_key else None,
        ca_chain=Path(args.ca_chain) if args.ca_chain else None,
        admin_socket=Path(args.admin_socket) if args.admin_socket else None,
        admin_hosts=tuple(args.admin_host),
        admin_identities=tuple(args.admin_identity),
        webhook_address=_address_for(
            args.webhook_address, args.kubernetes, f"0.0.0.0:{injector_settings.WEBHOOK_PORT}"
        ),
        webhook_configuration=args.webhook_configuration,
        dashboard_address=_address_for(
            args.dashboard_address, args.kubernetes, f"127.0.0.1:{DASHBOARD_PORT}"
        ),
        dashboard_prometheus=args.dashboard_prometheus,
        # In a cluster, Pods' sidecars reach the collector through shoal's Service.
        collector_address=_address_for(
            args.collector_address,
            args.kubernetes,
            f"0.0.0.0:{bootstrap_config.COLLECTOR_PORT}",
            DEFAULT_COLLECTOR,
        ),
        telemetry=mesh.Telemetry(
            trace_sampling=args.trace_sampling,
            access_log=args.access_log == "on",
            external=args.tracing,
        ),
        injection=injector_settings.Settings(
            image=args.sidecar_image, image_pull_policy=args.sidecar_image_pull_policy
        ),
        sidecar_xds_address=args.sidecar_xds_address,
        sidecar_ca_address=args.sidecar_ca_address,
        limits=dataclasses.replace(
            server.Limits(), streams_per_identity=args.max_streams_per_identity
        ),
        workers=args.workers,
    )
    for identity in options.admin_identities:
        namespace, _, account = identity.partition("/")
        if not spiffe.is_dns_label(namespace) or not spiffe.is_dns_subdomain(account):
            print(f"shoal serve: --admin-identity {identity!r} is not NS/SA", file=sys.stderr)
            return 2
    if not 1 <= args.agent_cert_ttl <= ca.BOOTSTRAP_TTL.total_seconds():  # also nan
        print(
            "shoal serve: --agent-cert-ttl must be 1 to "
            f"{ca.BOOTSTRAP_TTL.total_seconds():.0f} seconds",
            file=sys.stderr,
        )
        return 2
    if options.insecure_xds:
        print(INSECURE_WARNING.format(what="every proxy"), file=sys.stderr, flush=True)
    heap.tune_malloc()  # before gRPC starts its threads
    if options.registry is not None and not options.registry.is_dir():
        print(f"shoal serve: registry folder {options.registry} does not exist", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(options))
    except workers.WorkerFailed as err:
        print(f"shoal serve: {err}", file=sys.stderr)
        return 1


async def _join(
    args: argparse.Namespace, s: proxy.Sidecar | proxy.CapturedSidecar, ca_root: bytes
) -> sidecar_files.XdsCredentials:
    """Make a key here, send only a CSR, get the xDS certificate back."""
    key = ca.new_key()
    spiffe_id = spiffe.workload_id(args.trust_domain, s.namespace, s.service_account)
    csr = ca.csr(key, spiffe_id)
    try:
        answer = await join.join(args.join, args.token, csr, ca_root)
    except grpc.aio.AioRpcError as err:
        raise SystemExit(f"shoal bootstrap: join refused: {err.details()}") from err
    return sidecar_files.XdsCredentials(
        answer.certificate_chain_pem, ca.key_pem(key), answer.xds_trust_pem
    )


SIDECAR_PORTS = ("app_port", "inbound_port", "outbound_port", "admin_port")


def cmd_bootstrap(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.grpc:
        host, port = _host_port(args.xds)
        config = bootstrap_config.grpc_client(
            args.namespace,
            args.service or "",
            node_id=args.node_id or f"grpc~{args.namespace}~{args.service or 'client'}",
            xds_host=host,
            xds_port=port,
        )
        out.mkdir(parents=True, exist_ok=True)
        path = out / "grpc-bootstrap.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {path}; run the app with GRPC_XDS_BOOTSTRAP={path} and dial xds:///SERVICE")
        return 0
    s: proxy.Sidecar | proxy.CapturedSidecar
    if args.pod:
        if not args.pod_uid or not args.pod_ip:
            # The control plane refuses a Pod's proxy that does not say its
            # address: it configures the Pod's ports on it.
            print("shoal bootstrap: --pod needs --pod-uid and --pod-ip", file=sys.stderr)
            return 2
        s = proxy.CapturedSidecar(
            namespace=args.namespace,
            pod=args.pod,
            pod_uid=args.pod_uid,
            service_account=args.service_account,
            ip=args.pod_ip or "",
            outbound_port=args.outbound_port or proxy.CAPTURE_OUTBOUND_PORT,
            inbound_port=args.inbound_port or proxy.CAPTURE_INBOUND_PORT,
        )
        args.admin_port = args.admin_port or bootstrap_config.ADMIN_PORT
    else:
        missing = [f"--{n.replace('_', '-')}" for n in SIDECAR_PORTS if getattr(args, n) is None]
        if missing or not args.service:
            missing = missing if args.service else ["--service", *missing]
            print(f"shoal bootstrap: a sidecar needs {', '.join(missing)}", file=sys.stderr)
            return 2
        s = proxy.Sidecar(
            namespace=args.namespace,
            service=args.service,
            service_account=args.service_account,
            app_port=args.app_port,
            inbound_port=args.inbound_port,
            outbound_port=args.outbound_port,
            inbound_address=args.inbound_address,
        )
        if not declared_identity_agrees(s, Path(args.state_dir) / ADMIN_SOCKET):
            return 1
    authority = None
    credentials = None
    if args.join:
        if not args.token or not args.ca_root:
            print("shoal bootstrap: --join needs --token and --ca-root", file=sys.stderr)
            return 2
        credentials = asyncio.run(_join(args, s, Path(args.ca_root).read_bytes()))
    elif args.insecure_xds:
        print(INSECURE_WARNING.format(what="this sidecar"), file=sys.stderr)
    else:
        plugged = (
            roots.PluggedCa(
                Path(args.ca_cert),
                Path(args.ca_key),
                Path(args.ca_chain) if args.ca_chain else None,
            )
            if args.ca_cert and args.ca_key
            else None
        )
        authority = roots.load_local(Path(args.state_dir), args.trust_domain, plugged)
    host, port = _host_port(args.xds)
    path = sidecar_files.write(
        out,
        s,
        xds_host=host,
        xds_port=port,
        collector=args.collector or (host, bootstrap_config.COLLECTOR_PORT),
        admin_port=args.admin_port,
        node_id=args.node_id,
        delta=args.delta,
        authority=authority,
        credentials=credentials,
    )
    if credentials is not None:
        joined = spiffe.workload_id(args.trust_domain, s.namespace, s.service_account)
        print(f"joined as {joined}: the private key was made here and stays here")
    extra = (
        ""
        if authority is None
        else f" (xDS client certificate: {authority.spiffe_id(s.namespace, s.service_account)})"
    )
    print(f"wrote {path}{extra}; run: envoy -c {path}")
    return 0


def declared_identity_agrees(s: proxy.Sidecar, admin_socket: Path) -> bool:
    """Whether the manifests declare the service account this sidecar will
    prove for the endpoint it serves; False, after saying so, when they
    declare another (every call to it would fail its callers' check). A
    control plane that cannot be asked is not an error: then a note, when
    the account is not the one undeclared endpoints get."""
    declare = (
        f"declare it on the Service's EndpointSlice (annotation "
        f"shoal.io/service-account: {s.service_account}) or on a Pod the endpoint's "
        f"targetRef names"
    )
    found = None
    if admin_socket.exists():
        try:
            found = _fetch(
                str(admin_socket),
                f"/debug/identities?service={s.namespace}/{s.service}",
                missing_ok=True,
            )
        except SystemExit:
            found = None
    if found is None:
        if s.service_account != "default":
            print(
                f"shoal bootstrap: note: callers of {s.namespace}/{s.service} verify the "
                f"service account its endpoints declare, 'default' when none is declared; "
                f"for them to accept this sidecar ({s.service_account!r}), {declare}",
                file=sys.stderr,
            )
        return True
    served = [
        e
        for e in found["endpoints"]
        if e["address"] == s.inbound_address and e["port"] == s.inbound_port
    ]
    if not served or all(e["service_account"] == s.service_account for e in served):
        return True
    print(
        terminal.printable(
            f"shoal bootstrap: error: the endpoint {s.inbound_address}:{s.inbound_port} of "
            f"Service {s.namespace}/{s.service} is declared as service account "
            f"{served[0]['service_account']!r}, so its callers will refuse this sidecar's "
            f"certificate ({s.service_account!r}): bootstrap with --service-account "
            f"{served[0]['service_account']}, or {declare}",
            2000,
        ),
        file=sys.stderr,
    )
    return False


def cmd_demo(args: argparse.Namespace) -> int:
    from shoal.demo import runner

    if args.registry:
        registry = Path(args.registry)
    elif PACKAGED_DEMO_MESH.is_dir():
        registry = PACKAGED_DEMO_MESH
    else:
        registry = CHECKOUT_DEMO_MESH
    return asyncio.run(
        runner.run(
            registry,
            start_control_plane=lambda folder: control_plane(
                ServeOptions(
                    registry=folder,
                    xds_address="127.0.0.1:0",
                    admin_address="127.0.0.1:0",
                    state_dir=Path(args.state_dir),
                    join_address="127.0.0.1:0",
                    collector_address="127.0.0.1:0",
                    # Every request traced and logged: the demo shows them.
                    telemetry=mesh.Telemetry(trace_sampling=100.0, access_log=True),
                )
            ),
            check=args.check,
            workdir=Path(args.state_dir) / "demo",
        )
    )


def cmd_demo_app(args: argparse.Namespace) -> int:
    """One of the demo's apps on 127.0.0.1, as `shoal demo` runs it (docker-compose.yml)."""
    from shoal.demo import apps

    calls = tuple(h.strip() for h in args.calls.split(",") if h.strip())
    if calls and not args.outbound_port:
        print("shoal demo app: --calls needs --outbound-port", file=sys.stderr)
        return 2

    async def main() -> int:
        app = apps.App(args.service, args.name, args.version, calls, args.outbound_port or 0)
        runner = await apps.start(app, args.port)
        print(
            f"shoal demo app: {args.name} ({args.service} {args.version}) on 127.0.0.1:{args.port}"
        )
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        return 0

    return asyncio.run(main())


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the control plane's admin socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _is_socket_address(admin_address: str) -> bool:
    return (
        admin_address.startswith("unix:") or "/" in admin_address or admin_address.endswith(".sock")
    )


def _fetch(admin_address: str, path: str, method: str = "GET", missing_ok: bool = False) -> Any:
    """A JSON answer from the control plane's admin API (its Unix socket, or
    HOST:PORT for what anonymous callers may read), or a clear exit; None
    for "not found" when `missing_ok`."""
    connection: http.client.HTTPConnection
    if _is_socket_address(admin_address):
        connection = _UnixConnection(admin_address.removeprefix("unix:"), timeout=10)
    else:
        host, port = _host_port(admin_address)
        connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None)
        response = connection.getresponse()
        body = response.read()
    except OSError as err:
        raise SystemExit(
            f"shoal: cannot reach the control plane admin at {admin_address}: {err}"
            + (
                f" (run this where `shoal serve` runs, or give --admin or {ADMIN_ENV})"
                if _is_socket_address(admin_address)
                else ""
            )
        ) from err
    finally:
        connection.close()
    if response.status == 404 and missing_ok:
        return None
    if response.status >= 400:
        try:
            detail = json.loads(body or b"{}").get("error", response.reason)
        except ValueError:
            detail = response.reason
        raise SystemExit(terminal.printable(f"shoal: {path.split('?')[0]}: {detail}", 1000))
    return json.loads(body)


def default_admin() -> str:
    return os.environ.get(ADMIN_ENV) or str(Path(".shoal") / ADMIN_SOCKET)


STATUS_TYPES = ("CDS", "LDS", "EDS", "RDS", "SDS")


def format_proxy_status(proxies: list[dict[str, Any]]) -> str:
    """A table like `istioctl proxy-status`, then the error of every NACK."""
    shown_types = [
        t
        for t in STATUS_TYPES
        if t != "SDS"
        or any(
            x["type"] == "SDS" and x["status"] != "NOT SENT" for p in proxies for x in p["types"]
        )
    ]
    # With `serve --workers N`: which worker serves each stream.
    by_worker = any("worker" in p for p in proxies)
    header = ["NAME", "CLUSTER", "MODE", *shown_types, "MESH", "CONNECTED", "IDENTITY"]
    header += ["WORKER"] if by_worker else []
    rows = [header]
    errors = []
    for p in proxies:
        by_type = {x["type"]: x for x in p["types"]}
        cells = [p["id"], p["cluster"], p["mode"]]
        for t in shown_types:
            x = by_type.get(t)
            cells.append(x["status"] if x else "NOT SENT")
            if x and x["error"]:
                errors.append(
                    terminal.printable(
                        f"{p['id']}: {t} version {x['sent']} rejected: {x['error']}", 2000
                    )
                )
        cells += [p["mesh"], f"{p['connected_s']:.0f}s", p.get("identity") or "-"]
        cells += [p.get("worker", "-")] if by_worker else []
        rows.append(_safe_cells([str(c) for c in cells]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no proxies connected)")
    return "\n".join(lines + (["", *errors] if errors else []))


def _safe_cells(cells: list[str]) -> list[str]:
    return [terminal.printable(c, 200) for c in cells]


def cmd_proxy_status(args: argparse.Namespace) -> int:
    """The table; with a proxy named, its row and then what it holds against
    what the control plane wants it to have, type by type."""
    proxies: list[dict[str, Any]] = _fetch(args.admin, "/debug/syncz")
    if args.proxy:
        proxies = [
            p
            for p in proxies
            if args.proxy in p["id"] and (not args.identity or p.get("identity") == args.identity)
        ]
        if not proxies:
            print(f"shoal: no connected proxy {args.proxy!r}", file=sys.stderr)
            return 1
    print(format_proxy_status(proxies))
    if args.proxy:
        exact = [p for p in proxies if p["id"] == args.proxy]
        named = sorted({(p["id"], p.get("identity") or "") for p in exact or proxies})
        if len(named) > 1:
            # A part of an id that several proxies share filters the table;
            # what one holds is shown for one only.
            print(
                terminal.printable(
                    f"\n{len(named)} proxies match {args.proxy!r}: name one (or give "
                    "--identity) to see what it holds against what it should",
                    1000,
                )
            )
        else:
            ((proxy_id, identity),) = named
            query = urllib.parse.urlencode(
                {"proxy": proxy_id, **({"identity": identity} if identity else {})}
            )
            found: dict[str, Any] = _fetch(args.admin, f"/debug/proxy_diff?{query}")
            print()
            print(terminal.lines(proxydiff.text(found)))
    stale = any(x["status"] in ("NACKED",) for p in proxies for x in p["types"])
    return 1 if stale else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Every problem, in files offline or in a running control plane; exits 1
    if one is an error."""
    paths = [Path(p) for p in [*(args.files or ()), *([args.registry] if args.registry else [])]]
    if paths:
        # The report says it all; the registry's log lines would say it twice.
        logging.getLogger("shoal.registry").setLevel(logging.ERROR)
        registry = files.FolderRegistry(Path.cwd())
        try:
            state = registry.read(paths)
        except FileNotFoundError as err:
            print(f"shoal: {err}", file=sys.stderr)
            return 2
        found = [
            p.as_dict()
            for p in analysis_run.analyze(
                analysis_facts.Facts(state, tuple(registry.problems), now=time.time())
            )
        ]
        where = ", ".join(str(p) for p in paths)
    else:
        found = _fetch(args.admin, "/debug/problems")
        where = f"control plane at {args.admin}"
    if args.output == "json":
        print(json.dumps(found, indent=2))
    else:
        print(analysis_show.text(found, where))
    return 1 if analysis_show.has_errors(found) else 0


def cmd_ca_status(args: argparse.Namespace) -> int:
    found: dict[str, Any] = _fetch(args.admin, "/debug/ca")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    out = [
        f"trust domain {found['trust_domain']}",
        f"signing with {found['signer']['subject']} (serial {found['signer']['serial']})",
    ]
    for root in found["roots"]:
        out.append(f"trusted root {root['subject']}, valid until {root['not_after']}")
    for root in found.get("retired", []):
        out.append(
            f"retired root {root['subject']}: trusted for xDS client certificates "
            f"until {root['trusted_until']}"
        )
    out.append(
        f"workload certificates: {found['workload_ttl_s']:.0f}s lifetime, "
        f"{found['renewals']} renewals so far"
    )
    for w in found["workloads"]:
        out.append(
            f"  {w['identity']}  serial {w['serial'][:16]}  until {w['not_after']}  "
            f"renews {w['renew_at']}" + (f"  (worker {w['worker']})" if "worker" in w else "")
        )
        out += [f"    held by {proxy_id}" for proxy_id in w["proxies"]]
    for serial, proxies in found["proxies_on_older_certificates"].items():
        what = "no certificate yet" if serial == "none" else f"older certificate {serial[:16]}"
        out.append(f"  {what}: {', '.join(proxies)}")
    print(terminal.lines("\n".join(out)))
    return 0


def _post(admin_address: str, path: str) -> Any:
    return _fetch(admin_address, path, method="POST")


def cmd_ca_join_token(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode(
        {"namespace": args.namespace, "service_account": args.service_account, "ttl": args.ttl}
    )
    minted: dict[str, Any] = _post(args.admin, f"/ca/join-token?{query}")
    print(minted["token"])
    print(
        f"single use, for spiffe identity ns/{args.namespace}/sa/{args.service_account}, "
        f"expires in {minted['expires_in_s']:.0f}s; join port {minted['join_port']}",
        file=sys.stderr,
    )
    return 0


def cmd_ca_rotate_root(args: argparse.Namespace) -> int:
    if args.compromised:
        done: dict[str, Any] = _post(args.admin, "/ca/rotate-root?compromised=true")
        print(
            f"root replaced after a compromise (new root {done['root']}): the control plane "
            "trusts nothing the old root signed, and every proxy was disconnected.\n"
            "Sidecars still trust the old root for traffic between them until they are "
            "bootstrapped again: bootstrap every sidecar again now (`shoal bootstrap ...`, "
            "or a new join token) and restart its Envoy."
        )
        return 0
    _post(args.admin, "/ca/rotate-root")
    print("root rotation started: the new root is trusted beside the old one")
    if not args.wait:
        print(f"follow it with: shoal ca status --admin {args.admin}")
        return 0
    seen = ""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        progress: dict[str, Any] = _fetch(args.admin, "/debug/ca/rotation")
        if progress["phase"] != seen:
            seen = progress["phase"]
            print(f"  {seen}")
        if seen == "done":
            return 0
        time.sleep(0.2)
    print(f"shoal: still {seen} after {args.timeout:.0f}s; waiting on {progress['laggards']}")
    return 1


def cmd_config_dump(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode(
        {"proxy": args.proxy, **({"identity": args.identity} if args.identity else {})}
    )
    dump: dict[str, Any] = _fetch(args.admin, f"/debug/config_dump?{query}")
    if args.type:
        dump["types"] = {k: v for k, v in dump["types"].items() if k == args.type.upper()}
    print(json.dumps(dump, indent=2, sort_keys=True))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """The dashboard for this user, or one proxy's Envoy admin page."""
    browser = not args.no_browser
    if args.what == "envoy":
        if not args.proxy:
            raise SystemExit("shoal: name a proxy: shoal dashboard envoy PROXY")
        try:
            found = dashboard_launch.find_proxy(_fetch(args.admin, "/debug/syncz"), args.proxy)
        except LookupError as err:
            raise SystemExit(terminal.printable(f"shoal: {err}", 1000)) from err
        return dashboard_launch.envoy_admin(found, browser=browser, kubectl=_kubectl(args))
    if args.what == "url":
        # The login link of the dashboard `shoal serve` itself serves.
        print(_post(args.admin, f"/{DASHBOARD_LOGIN}")["url"])
        return 0
    if args.what is not None or args.proxy:
        raise SystemExit(
            "shoal: `shoal dashboard`, `shoal dashboard url` or `shoal dashboard envoy PROXY`"
        )
    host, port = _host_port(args.address)
    if args.kubernetes:
        if host not in ("127.0.0.1", "localhost"):
            raise SystemExit("shoal: with --kubernetes the dashboard is forwarded to 127.0.0.1")
        return dashboard_launch.kubernetes(
            _kubectl(args), args.namespace, browser=browser, local=port
        )
    metrics = dashboard_prometheus.Prometheus(args.prometheus) if args.prometheus else None
    if not _is_socket_address(args.admin):
        raise SystemExit(
            "shoal: the dashboard reads /debug/*, which only the admin socket serves: "
            "give --admin the socket's path"
        )
    # Fail now, with the reason, rather than on the first page load.
    _fetch(args.admin, "/debug/problems")
    return dashboard_launch.run(
        args.admin.removeprefix("unix:"), host, port, browser=browser, metrics=metrics
    )


def _kubectl(args: argparse.Namespace) -> dashboard_launch.Kubectl:
    return dashboard_launch.Kubectl(
        os.environ.get("SHOAL_KUBECTL", "kubectl"), args.kubeconfig, args.context
    )


def _admin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin",
        default=default_admin(),
        metavar="SOCKET|HOST:PORT",
        help=f"the control plane's admin socket (default ${ADMIN_ENV}, else "
        f".shoal/{ADMIN_SOCKET}, in the state directory of `shoal serve`); HOST:PORT "
        "reaches only what anonymous callers may read (health, metrics)",
    )


def _identity_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-domain",
        default="cluster.local",
        help="SPIFFE trust domain (default cluster.local)",
    )
    p.add_argument(
        "--insecure-xds",
        action="store_true",
        help="plain-text xDS, no mTLS in the mesh: for debugging only (prints a warning)",
    )
    p.add_argument(
        "--ca-cert", metavar="PEM", help="plug-in CA: a root or intermediate certificate"
    )
    p.add_argument("--ca-key", metavar="PEM", help="plug-in CA: its private key")
    p.add_argument("--ca-chain", metavar="PEM", help="plug-in CA: intermediates up to the root")


def _percent(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 100:
        raise argparse.ArgumentTypeError(f"{value!r} is not a percentage from 0 to 100")
    return number


def _zipkin_url(value: str) -> mesh.ZipkinEndpoint:
    url = urllib.parse.urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an http(s) URL, e.g. http://zipkin:9411/api/v2/spans"
        )
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r}: {err}") from None
    return mesh.ZipkinEndpoint(
        url.hostname, port, url.path or traces.SPANS_PATH, tls=url.scheme == "https"
    )


def _prometheus_url(value: str) -> str:
    """Prometheus' URL, whose HTTP API is under /api/v1 ("": none)."""
    url = urllib.parse.urlsplit(value)
    if value and (url.scheme not in ("http", "https") or not url.netloc):
        raise argparse.ArgumentTypeError(
            f"{value!r}: give Prometheus' URL, http://HOST:PORT (its HTTP API is under /api/v1)"
        )
    return value


def _telemetry_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--dashboard-address",
        metavar="HOST:PORT",
        help="serve the dashboard from the control plane too (default off; with "
        f"--kubernetes 127.0.0.1:{DASHBOARD_PORT} in its Pod, for `shoal dashboard "
        "--kubernetes`; '' for off); `shoal dashboard url` prints its login link",
    )
    serve.add_argument(
        "--dashboard-prometheus",
        type=_prometheus_url,
        default="",
        metavar="URL",
        help="that dashboard's service graph takes its traffic from this Prometheus",
    )
    serve.add_argument(
        "--collector-address",
        help=f"the embedded trace collector, HTTPS with mesh client certificates "
        f"(default {DEFAULT_COLLECTOR}, with --kubernetes 0.0.0.0:"
        f"{bootstrap_config.COLLECTOR_PORT}; '' for none)",
    )
    serve.add_argument(
        "--tracing",
        type=_zipkin_url,
        metavar="URL",
        help="send spans to this Zipkin v2 endpoint (Zipkin, Jaeger, an OpenTelemetry "
        "Collector's zipkin receiver) instead of the embedded collector",
    )
    serve.add_argument(
        "--trace-sampling",
        type=_percent,
        default=1.0,
        metavar="PERCENT",
        help="percent of requests that start a trace (default 1; a Service's "
        "shoal.io/trace-sampling overrides it)",
    )
    serve.add_argument(
        "--access-log",
        choices=["on", "off"],
        default="off",
        help="every sidecar logs one JSON line per request to its stdout (default off; "
        "shoal.io/access-log on a Namespace or Service overrides it)",
    )


def _serve_command(sub: Any) -> None:
    """`shoal serve`: run the control plane."""

    serve = sub.add_parser("serve", help="run the control plane")
    serve.add_argument("--registry", metavar="DIR", help="folder of Kubernetes manifests")
    serve.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch a Kubernetes API server (in-cluster config in a Pod, else kubeconfig)",
    )
    serve.add_argument("--kubeconfig", metavar="FILE", help="with --kubernetes: this kubeconfig")
    serve.add_argument("--context", help="with --kubernetes: this kubeconfig context")
    serve.add_argument(
        "--namespaces",
        metavar="NS,NS",
        help="with --kubernetes: watch only these namespaces (default: all)",
    )
    serve.add_argument(
        "--ca-secret",
        default="shoal-ca",
        metavar="NAME",
        help="with --kubernetes: the Secret in shoal's namespace holding the mesh root "
        "(default shoal-ca; created by the first replica)",
    )
    serve.add_argument("--xds-address", default=DEFAULT_XDS, help=f"default {DEFAULT_XDS}")
    serve.add_argument("--admin-address", default=DEFAULT_ADMIN, help=f"default {DEFAULT_ADMIN}")
    _telemetry_flags(serve)
    serve.add_argument(
        "--state-dir", default=".shoal", help="where the CA lives (default ./.shoal)"
    )
    serve.add_argument(
        "--debounce-quiet",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="push after this long without changes (default 0.1)",
    )
    serve.add_argument(
        "--debounce-max",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="but never later than this after the first change (default 1.0)",
    )
    _identity_flags(serve)
    serve.add_argument(
        "--workload-cert-ttl",
        type=float,
        default=ca.WORKLOAD_TTL.total_seconds(),
        metavar="SECONDS",
        help="lifetime of workload certificates, renewed at half of it (default 86400)",
    )
    serve.add_argument(
        "--join-address",
        default="127.0.0.1:15012",
        metavar="HOST:PORT",
        help="where machines join with a token and a CSR (default 127.0.0.1:15012; '' for off)",
    )
    serve.add_argument(
        "--agent-cert-ttl",
        type=float,
        default=ca.AGENT_TTL.total_seconds(),
        metavar="SECONDS",
        help="with --kubernetes: lifetime of the xDS client certificates Pods' sidecar "
        "agents get on the join port, renewed at about half of it (default "
        f"{ca.AGENT_TTL.total_seconds():.0f})",
    )
    serve.add_argument(
        "--admin-socket",
        metavar="PATH",
        help="the admin API for authenticated callers, mode 0600 "
        f"(default STATE_DIR/{ADMIN_SOCKET})",
    )
    serve.add_argument(
        "--admin-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name callers of --admin-address may use in Host (IP addresses and "
        "localhost always work; other names are refused, against DNS rebinding)",
    )
    serve.add_argument(
        "--max-streams-per-identity",
        type=int,
        default=server.Limits().streams_per_identity,
        metavar="N",
        help="concurrent xDS streams one workload identity may hold (default "
        f"{server.Limits().streams_per_identity}; raise it for a larger fleet of one "
        "service account)",
    )
    serve.add_argument(
        "--admin-identity",
        action="append",
        default=[],
        metavar="NS/SA",
        help="a workload identity that may read every proxy's status over CSDS "
        "(others see only proxies of their own identity)",
    )
    serve.add_argument(
        "--xds-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name or address sidecars use to reach xDS (for its certificate)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes serving xDS on the one xDS address, each on a core of its own "
        "(default 1; see the README's Scale out)",
    )
    # What worker 0 starts workers 1 to N-1 with (their options on stdin).
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    _injection_flags(serve)
    serve.set_defaults(func=cmd_serve)


def _injection_flags(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("sidecar injection")
    group.add_argument(
        "--webhook-address",
        metavar="HOST:PORT",
        help="the injection webhook, HTTPS with a mesh CA certificate (default "
        f"0.0.0.0:{injector_settings.WEBHOOK_PORT} with --kubernetes, else off; '' for off)",
    )
    group.add_argument(
        "--webhook-configuration",
        default=injector_bundle.CONFIGURATION,
        metavar="NAME",
        help="the MutatingWebhookConfiguration whose caBundle shoal keeps current "
        f"(default {injector_bundle.CONFIGURATION})",
    )
    group.add_argument(
        "--sidecar-image",
        default=os.environ.get("SHOAL_IMAGE", injector_settings.Settings().image),
        metavar="IMAGE",
        help="the image of the injected containers: shoal's own, which holds the agent, "
        "Envoy and iptables (default $SHOAL_IMAGE, else shoal:latest)",
    )
    group.add_argument(
        "--sidecar-image-pull-policy",
        default="IfNotPresent",
        choices=["Always", "IfNotPresent", "Never"],
    )
    group.add_argument(
        "--sidecar-xds-address",
        metavar="HOST:PORT",
        help="where injected sidecars reach xDS (default shoal.NAMESPACE.svc:15010)",
    )
    group.add_argument(
        "--sidecar-ca-address",
        metavar="HOST:PORT",
        help="where injected sidecars certify (default shoal.NAMESPACE.svc:15012)",
    )


def cmd_inject(args: argparse.Namespace) -> int:
    """`shoal inject -f FILE`: what the webhook would make of each object."""
    source = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    trust = Path(args.ca_root).read_text() if args.ca_root else ""
    if not trust:
        found = Path(args.state_dir) / "ca" / ca.ROOT_CERT
        trust = found.read_text() if found.exists() else ""
    s = injector_settings.Settings(
        image=args.sidecar_image,
        xds_address=args.xds_address,
        ca_address=args.ca_address,
        trust_domain=args.trust_domain,
        trust_pem=trust,
    )

    def report(outcome: injector_workloads.Outcome) -> None:
        if not outcome.injected:
            print(f"shoal inject: {outcome.what} not injected: {outcome.reason}", file=sys.stderr)

    try:
        documents = list(yaml.safe_load_all(source))
        injected = [injector_workloads.inject_object(d, s, report) for d in documents if d]
    except yaml.YAMLError as err:
        print(f"shoal inject: {args.filename} is not YAML: {err}", file=sys.stderr)
        return 2
    except injector_patch.InjectionError as err:
        print(f"shoal inject: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(injected, sort_keys=False))
    return 0


def _inject_command(sub: Any) -> None:
    inject = sub.add_parser(
        "inject",
        help="print objects with the sidecar injected, as the webhook would (offline)",
        description="Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs "
        "and Lists in; the same objects with their Pods injected out. Other objects pass "
        "through; an object the webhook would skip is printed unchanged, with the reason "
        "on stderr.",
    )
    inject.add_argument("-f", "--filename", required=True, metavar="FILE", help="'-' for stdin")
    inject.add_argument(
        "--sidecar-image", default=os.environ.get("SHOAL_IMAGE", injector_settings.Settings().image)
    )
    inject.add_argument("--xds-address", default=injector_settings.Settings().xds_address)
    inject.add_argument("--ca-address", default=injector_settings.Settings().ca_address)
    inject.add_argument("--trust-domain", default="cluster.local")
    inject.add_argument(
        "--ca-root",
        metavar="PEM",
        help="roots the sidecars trust the control plane by (default STATE_DIR's root)",
    )
    inject.add_argument("--state-dir", default=".shoal")
    inject.set_defaults(func=cmd_inject)


def _bootstrap_command(sub: Any) -> None:
    """`shoal bootstrap`: one sidecar's Envoy bootstrap, or a gRPC app's."""
    boot = sub.add_parser(
        "bootstrap",
        help="write the Envoy bootstrap of one local sidecar (or, with --grpc, of a gRPC app)",
    )
    boot.add_argument("--xds", default=DEFAULT_XDS, metavar="HOST:PORT")
    boot.add_argument(
        "--collector",
        type=_host_port,
        metavar="HOST:PORT",
        help="the control plane's trace collector (default: the --xds host, port "
        f"{bootstrap_config.COLLECTOR_PORT})",
    )
    boot.add_argument("--namespace", default="default")
    boot.add_argument("--service", help="the Service this workload serves (required for a sidecar)")
    boot.add_argument("--service-account", default="default")
    boot.add_argument("--app-port", type=int, help="where the app listens")
    boot.add_argument(
        "--inbound-port",
        type=int,
        help="where the sidecar accepts calls from the mesh",
    )
    boot.add_argument("--inbound-address", default="127.0.0.1")
    boot.add_argument(
        "--outbound-port",
        type=int,
        help="127.0.0.1 port the app sends mesh calls to (routed by Host)",
    )
    boot.add_argument("--admin-port", type=int, help="Envoy admin, on 127.0.0.1")
    boot.add_argument(
        "--pod",
        metavar="NAME",
        help="a Kubernetes Pod's sidecar whose traffic iptables captures (outbound 15001, "
        "inbound 15006): needs --pod-uid; --service and --app-port are not used",
    )
    boot.add_argument("--pod-uid", metavar="UID", help="with --pod: the Pod's metadata.uid")
    boot.add_argument("--pod-ip", metavar="IP", help="with --pod: the Pod's IP (required)")
    boot.add_argument("--node-id", help="default sidecar~NS~SERVICE-INBOUNDPORT")
    boot.add_argument("--state-dir", default=".shoal")
    boot.add_argument(
        "--delta", action="store_true", help="incremental (delta) xDS instead of state of the world"
    )
    _identity_flags(boot)
    boot.add_argument("--join", metavar="HOST:PORT", help="join from another machine (CA port)")
    boot.add_argument("--token", help="with --join: a token from `shoal ca join-token`")
    boot.add_argument("--ca-root", metavar="PEM", help="with --join: the mesh root to verify by")
    boot.add_argument(
        "--grpc",
        action="store_true",
        help="write DIR/grpc-bootstrap.json for a proxyless gRPC app instead of a sidecar",
    )
    boot.add_argument("--out", required=True, metavar="DIR", help="writes DIR/envoy.yaml")
    boot.set_defaults(func=cmd_bootstrap)


def _proxy_status_command(sub: Any) -> None:
    """`shoal proxy-status`."""
    ps = sub.add_parser("proxy-status", help="every connected proxy's sync state per xDS type")
    ps.add_argument(
        "proxy",
        nargs="?",
        help="only this proxy (its id, or part of it naming one proxy), and what it holds "
        "against what the control plane wants it to have: per type Match or Don't Match, "
        "the resources added, removed and changed, and a diff of a changed one",
    )
    ps.add_argument(
        "--identity",
        metavar="NS/SA",
        help="the proxy of this identity, where proxies of several identities use one node id",
    )
    _admin_flag(ps)
    ps.set_defaults(func=cmd_proxy_status)


def _config_dump_command(sub: Any) -> None:
    """`shoal config-dump`."""
    dump = sub.add_parser("config-dump", help="what the control plane last sent a proxy, as JSON")
    dump.add_argument(
        "proxy", help="proxy id as proxy-status shows it, or a part of it naming one proxy"
    )
    dump.add_argument("--type", choices=["cds", "eds", "lds", "rds", "sds"], help="only one type")
    dump.add_argument(
        "--identity",
        metavar="NS/SA",
        help="the proxy of this identity, where proxies of several identities use one node id",
    )
    _admin_flag(dump)
    dump.set_defaults(func=cmd_config_dump)


def _analyze_command(sub: Any) -> None:
    """`shoal analyze`."""
    analyze = sub.add_parser(
        "analyze",
        help="explain every misconfiguration, with its code and fix (exits 1 on an error)",
        description="Run every analyzer against the running control plane (its state, its "
        "proxies and what they report), or offline against manifests with -f. Codes are "
        "listed in the README.",
    )
    analyze.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        metavar="PATH",
        help="check these files or folders offline (repeatable)",
    )
    analyze.add_argument("--registry", metavar="DIR", help=argparse.SUPPRESS)
    analyze.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="output format"
    )
    _admin_flag(analyze)
    analyze.set_defaults(func=cmd_analyze)


def cmd_describe(args: argparse.Namespace) -> int:
    """One screen about one Service, from the control plane's reports."""
    key = urllib.parse.urlencode({"service": f"{args.namespace}/{args.name}"})
    found: dict[str, Any] = _fetch(args.admin, f"/debug/describe?{key}")
    every_problem: list[dict[str, str]] = _fetch(args.admin, "/debug/problems")
    service = mesh.ServiceKey(args.namespace, args.name)
    concerning = [p for p in every_problem if observe_describe.concerns(p, service)]
    print(observe_describe.text(found, concerning))
    return 0


def _describe_command(sub: Any) -> None:
    """`shoal describe service`."""
    describe = sub.add_parser(
        "describe",
        help="one screen about one Service: endpoints, identities, proxies, routes, policies, "
        "problems",
    )
    kinds = describe.add_subparsers(dest="kind", required=True)
    service = kinds.add_parser(
        "service",
        help="its ports, endpoints and the identities callers verify, the proxies that serve "
        "it and their sync state, its routing, who may call it, and the problems that name it",
    )
    service.add_argument("name", help="the Service's name")
    service.add_argument(
        "-n", "--namespace", default="default", help="its namespace (default: default)"
    )
    _admin_flag(service)
    service.set_defaults(func=cmd_describe)


def _ca_commands(sub: Any) -> None:
    """`shoal ca status | rotate-root | join-token`."""
    ca_cmd = sub.add_parser("ca", help="the mesh certificate authority")
    ca_sub = ca_cmd.add_subparsers(dest="ca_command", required=True)
    ca_status = ca_sub.add_parser(
        "status", help="roots, expiries, and which proxies hold which certificate"
    )
    _admin_flag(ca_status)
    ca_status.add_argument("--json", action="store_true")
    ca_status.set_defaults(func=cmd_ca_status)
    rotate = ca_sub.add_parser(
        "rotate-root",
        help="new root trusted beside the old, workloads moved to it, then the old one dropped",
    )
    _admin_flag(rotate)
    rotate.add_argument(
        "--compromised",
        action="store_true",
        help="the root's key may be in other hands: replace it at once, trust nothing it "
        "signed (also on the xDS channel), disconnect every proxy; sidecars must be "
        "bootstrapped again",
    )
    rotate.add_argument("--wait", action="store_true", help="until every step is done")
    rotate.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    rotate.set_defaults(func=cmd_ca_rotate_root)
    token = ca_sub.add_parser(
        "join-token", help="a single-use token for one identity to join from another machine"
    )
    token.add_argument("--namespace", required=True)
    token.add_argument("--service-account", required=True)
    token.add_argument("--ttl", type=float, default=600.0, metavar="SECONDS")
    _admin_flag(token)
    token.set_defaults(func=cmd_ca_join_token)


def cmd_agent(args: argparse.Namespace) -> int:
    """`shoal agent`: the sidecar container's entry point in a Pod."""
    try:
        xds_host, xds_port = agent_settings.host_port("--xds-address", args.xds_address)
        agent_settings.host_port("--ca-address", args.ca_address)
        for flag in ("health_port", "admin_port", "stats_port", "inbound_port", "outbound_port"):
            agent_settings.check_port(f"--{flag.replace('_', '-')}", getattr(args, flag))
        if not 0 <= args.drain_seconds <= 3600:
            raise agent_settings.SettingsError("--drain-seconds must be 0 to 3600")
        if not 1 <= args.concurrency <= 1024:
            raise agent_settings.SettingsError("--concurrency must be 1 to 1024")
        root_pem = (
            Path(args.ca_root).read_bytes()
            if args.ca_root
            else os.environ.get("SHOAL_CA_ROOT_PEM", "").encode()
        )
        settings = agent_settings.AgentSettings(
            pod=agent_settings.pod_from_env(os.environ),
            xds_host=xds_host,
            xds_port=xds_port,
            ca_address=args.ca_address,
            trust_domain=args.trust_domain,
            work_dir=Path(args.work_dir),
            token_path=Path(args.token_path),
            ca_root_pem=root_pem,
            health_address=args.health_address,
            health_port=args.health_port,
            admin_port=args.admin_port,
            stats_port=args.stats_port,
            inbound_port=args.inbound_port,
            outbound_port=args.outbound_port,
            drain_seconds=args.drain_seconds,
            delta=args.delta,
            concurrency=args.concurrency,
            envoy_log_level=args.envoy_log_level,
            app_probes=os.environ.get("SHOAL_APP_PROBES", "{}"),
        )
        agent_health.parse_probes(settings.app_probes)
    except (agent_settings.SettingsError, agent_health.ProbeError, OSError) as err:
        print(f"shoal agent: {err}", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await agent_run.Agent(settings).run(stop)

    return asyncio.run(main())


def cmd_agent_iptables(args: argparse.Namespace) -> int:
    """`shoal agent iptables`: the init container's capture rules."""
    try:
        capture = iptables.settings(
            outbound_port=args.outbound_port,
            inbound_port=args.inbound_port,
            proxy_uid=args.proxy_uid,
            proxy_gid=args.proxy_gid,
            include_inbound_ports=args.include_inbound_ports,
            exclude_inbound_ports=args.exclude_inbound_ports,
            include_outbound_cidrs=args.include_outbound_cidrs,
            exclude_outbound_cidrs=args.exclude_outbound_cidrs,
            exclude_outbound_ports=args.exclude_outbound_ports,
        )
    except iptables.FlagError as err:
        print(f"shoal agent iptables: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(iptables.rules(capture), end="")
        return 0
    try:
        applied = iptables.apply(capture)
    except iptables.ApplyError as err:
        print(f"shoal agent iptables: {err}", file=sys.stderr)
        return 1
    print(applied, end="")
    return 0


def _agent_command(sub: Any) -> None:
    """`shoal agent` and `shoal agent iptables`."""
    agent = sub.add_parser(
        "agent",
        help="the sidecar's entry point in a Pod: certify with the Pod's service-account "
        "token, run Envoy, serve probes (`shoal agent iptables`: the init container)",
        description="Reads the Pod from POD_NAME, POD_NAMESPACE, POD_UID, POD_IP, "
        "SERVICE_ACCOUNT (downward API), SHOAL_CA_ROOT_PEM, SHOAL_APP_PROBES, "
        "SHOAL_WORKLOAD and SHOAL_TOKEN_PATH.",
    )
    agent.add_argument(
        "--xds-address",
        required=False,
        default="shoal.shoal-system.svc:15010",
        metavar="HOST:PORT",
        help="the control plane's xDS (mTLS)",
    )
    agent.add_argument(
        "--ca-address",
        default="shoal.shoal-system.svc:15012",
        metavar="HOST:PORT",
        help="the control plane's join/certify port (TLS)",
    )
    agent.add_argument("--trust-domain", default="cluster.local")
    agent.add_argument(
        "--ca-root",
        metavar="PEM",
        help="the mesh root(s) to verify the control plane by "
        "(default: $SHOAL_CA_ROOT_PEM, the PEM itself)",
    )
    agent.add_argument(
        "--work-dir",
        default=agent_settings.WORK_DIR,
        metavar="DIR",
        help=f"key, certificates, bootstrap (default {agent_settings.WORK_DIR})",
    )
    agent.add_argument(
        "--token-path",
        default=os.environ.get("SHOAL_TOKEN_PATH") or agent_settings.TOKEN_PATH,
        metavar="FILE",
        help="the projected service-account token "
        f"(default $SHOAL_TOKEN_PATH, else {agent_settings.TOKEN_PATH})",
    )
    agent.add_argument("--health-address", default="0.0.0.0", metavar="IP")
    agent.add_argument(
        "--health-port",
        type=int,
        default=15021,
        help="/healthz/ready and /app-health/... (default 15021)",
    )
    agent.add_argument(
        "--admin-port", type=int, default=15000, help="Envoy admin, on 127.0.0.1 (default 15000)"
    )
    agent.add_argument(
        "--stats-port", type=int, default=15090, help="Envoy's Prometheus stats (default 15090)"
    )
    agent.add_argument("--inbound-port", type=int, default=15006, help="default 15006")
    agent.add_argument("--outbound-port", type=int, default=15001, help="default 15001")
    agent.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, how long Envoy drains before it stops (default 5)",
    )
    agent.add_argument("--delta", action="store_true", help="incremental (delta) xDS")
    agent.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads")
    agent.add_argument(
        "--envoy-log-level",
        default="warning",
        choices=["trace", "debug", "info", "warning", "error", "critical", "off"],
    )
    agent.set_defaults(func=cmd_agent)
    agent_sub = agent.add_subparsers(dest="agent_command", required=False)
    tables = agent_sub.add_parser(
        "iptables",
        help="install the Pod's capture rules (nat table, iptables-restore --noflush)",
    )
    tables.add_argument("--outbound-port", default="15001", help="default 15001")
    tables.add_argument("--inbound-port", default="15006", help="default 15006")
    tables.add_argument("--proxy-uid", default="1337", help="left uncaptured (default 1337)")
    tables.add_argument("--proxy-gid", default="1337", help="left uncaptured (default 1337)")
    tables.add_argument(
        "--include-inbound-ports",
        default="*",
        metavar="PORTS",
        help="comma list, '*' for all (default), '' for none",
    )
    tables.add_argument(
        "--exclude-inbound-ports",
        default="",
        metavar="PORTS",
        help="comma list; 15020,15021,15090 are always excluded",
    )
    tables.add_argument(
        "--include-outbound-cidrs",
        default="*",
        metavar="CIDRS",
        help="comma list of IPv4 CIDRs, '*' for all (default), '' for none",
    )
    tables.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDRS")
    tables.add_argument("--exclude-outbound-ports", default="", metavar="PORTS")
    tables.add_argument(
        "--dry-run",
        action="store_true",
        help="print the iptables-restore input instead of applying it",
    )
    tables.set_defaults(func=cmd_agent_iptables)


def _dashboard_command(sub: Any) -> None:
    """`shoal dashboard [envoy PROXY]`."""
    dash = sub.add_parser(
        "dashboard",
        help="the mesh's web dashboard for this user (read-only); "
        "`dashboard envoy PROXY`: that proxy's Envoy admin page",
    )
    dash.add_argument(
        "what",
        nargs="?",
        choices=["envoy", "url"],
        help="envoy: a proxy's admin page; url: the login link of the dashboard "
        "`shoal serve --dashboard-address` serves",
    )
    dash.add_argument("proxy", nargs="?", help="with envoy: the proxy id, or a part of it")
    dash.add_argument(
        "--address",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where to serve the pages (default 127.0.0.1, a free port); the URL printed "
        "carries a one-time token",
    )
    dash.add_argument("--no-browser", action="store_true", help="only print the URL")
    dash.add_argument(
        "--kubernetes",
        action="store_true",
        help="the dashboard a control plane Pod serves (`shoal serve --kubernetes`), "
        "forwarded here by kubectl port-forward; needs pods/exec and pods/portforward "
        "in its namespace",
    )
    dash.add_argument(
        "-n", "--namespace", default="shoal-system", help="with --kubernetes: shoal's namespace"
    )
    dash.add_argument("--kubeconfig", metavar="FILE", help="kubectl's --kubeconfig")
    dash.add_argument("--context", help="kubectl's --context")
    dash.add_argument(
        "--prometheus",
        type=_prometheus_url,
        default=os.environ.get("SHOAL_PROMETHEUS", ""),
        metavar="URL",
        help="take the service graph's traffic from this Prometheus, which scrapes the "
        "sidecars' envoy_shoal_* request metrics (default $SHOAL_PROMETHEUS; without it, "
        "the dashboard scrapes the Envoy admin of the sidecars on this host)",
    )
    _admin_flag(dash)
    dash.set_defaults(func=cmd_dashboard)


def _demo_command(sub: Any) -> None:
    """`shoal demo`."""
    demo = sub.add_parser("demo", help="a running mesh with real Envoy sidecars")
    demo.add_argument(
        "--check", action="store_true", help="verify unattended and exit non-zero on any failure"
    )
    demo.add_argument("--registry", metavar="DIR", help="default examples/demo")
    demo.add_argument("--state-dir", default=".shoal")
    demo.set_defaults(func=cmd_demo)
    _demo_app_command(demo)


def _demo_app_command(demo: argparse.ArgumentParser) -> None:
    """`shoal demo app NAME`: one demo app alone (hidden; docker-compose.yml runs it)."""
    hidden = demo.add_subparsers(dest="demo_command", help=argparse.SUPPRESS)
    app = hidden.add_parser(
        "app",
        help=argparse.SUPPRESS,
        description="Run one of the demo's apps on 127.0.0.1 until SIGTERM, as `shoal demo` "
        "does for each instance; its sidecar is started on its own (docker-compose.yml).",
    )
    app.add_argument("name", help="the instance, e.g. reviews-1 (the Pod's name)")
    app.add_argument("--service", required=True)
    app.add_argument("--version", default="v1", help="the Pod's version label (default v1)")
    app.add_argument(
        "--calls", default="", metavar="HOST,HOST", help="services it calls on each request"
    )
    app.add_argument("--port", type=int, required=True, help="where the app listens")
    app.add_argument("--outbound-port", type=int, help="its sidecar's outbound port, for --calls")
    app.set_defaults(func=cmd_demo_app)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description="A service mesh control plane for Envoy.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    _serve_command(sub)
    _bootstrap_command(sub)
    _proxy_status_command(sub)
    _config_dump_command(sub)
    _analyze_command(sub)
    _describe_command(sub)
    _ca_commands(sub)
    _demo_command(sub)
    _dashboard_command(sub)
    _agent_command(sub)
    _inject_command(sub)
    return p


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(terminal.Formatter(LOG_FORMAT))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    # Run as `python -m shoal.cli`, this file is `__main__`; its classes
    # should be `shoal.cli`'s, as the ones `serve --workers` hands its
    # workers are named.
    from shoal import cli

    sys.exit(cli.main())
