"""The install manifests in examples/kubernetes: valid Kubernetes objects, least
privilege, and consistent with shoal's own command line and container image.

No API server is needed: every object is checked against the OpenAPI schema of
Kubernetes that `kubernetes-validate` bundles (offline), and TrafficRoute
objects against the CRD's own openAPIV3Schema.
"""

from __future__ import annotations

import copy
import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shoal import cli
from shoal.injector import bundle
from shoal.registry import events, routestatus
from shoal.sds import operations

FOLDER = Path(__file__).resolve().parent.parent / "examples" / "kubernetes"
KUSTOMIZATION = FOLDER / "kustomization.yaml"
DOCKERFILE = FOLDER / "Dockerfile"
NAMESPACE = "shoal-system"
SERVICE_ACCOUNT = "shoal"
RUN_AS = 10001

# The oldest Kubernetes the manifests are meant for, and the newest schema bundled.
OLDEST = "1.31"
NEWEST = ".".join(kubernetes_validate.latest_version().split(".")[:2])
VERSIONS = sorted({OLDEST, NEWEST}, key=lambda v: tuple(int(p) for p in v.split(".")))

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
}
READ_ONLY = {"get", "list", "watch"}
WATCHED = {
    ("", "services"),
    ("", "pods"),
    ("", "namespaces"),
    ("", "serviceaccounts"),
    ("discovery.k8s.io", "endpointslices"),
    ("shoal.io", "trafficroutes"),
    ("gateway.networking.k8s.io", "httproutes"),
    ("gateway.networking.k8s.io", "grpcroutes"),
}


def _manifest_files() -> list[Path]:
    files = {*FOLDER.glob("*.yaml"), *FOLDER.glob("*.yml")}
    return sorted(p for p in files if p != KUSTOMIZATION)


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_objects() -> list[tuple[Path, int, dict[str, Any]]]:
    return [(p, i, d) for p in _manifest_files() for i, d in enumerate(_documents(p))]


def _one(kind: str, name: str = "shoal") -> dict[str, Any]:
    found = [d for _, _, d in _all_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in _container()["ports"]}


def _resolve_port(port: int | str) -> int:
    return port if isinstance(port, int) else _container_ports()[port]


def _flags(args: list[str]) -> dict[str, str]:
    """`--flag value` pairs of an argument list, by hand (see also the parser test)."""
    return {a: b for a, b in itertools.pairwise(args) if a.startswith("--")}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema validation must work offline: any attempt to reach the network fails."""

    def refuse(*_: object, **__: object) -> None:
        raise OSError("the install manifest tests must not use the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- 1. Valid for Kubernetes -----------------------------------------------------------


def test_the_folder_holds_the_install() -> None:
    names = {p.name for p in _manifest_files()}
    assert names >= {
        "namespace.yaml",
        "serviceaccount.yaml",
        "rbac.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "trafficroute-crd.yaml",
    }
    # Docker reads .dockerignore only at the root of the build context: the
    # repository's keeps the virtualenv and local CA keys out of it.
    assert not (FOLDER / ".dockerignore").exists()
    ignored = (FOLDER.parent.parent / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".shoal"} <= set(ignored)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("path", "index", "doc"),
    [pytest.param(p, i, d, id=f"{p.name}#{i}-{d['kind']}") for p, i, d in _all_objects()],
)
def test_every_object_validates_against_the_kubernetes_schema(
    path: Path, index: int, doc: dict[str, Any], version: str
) -> None:
    try:
        validated = kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        pytest.fail(f"{path.name} document {index} ({doc['kind']}): {where}: {err.message}")
    assert validated == version


def test_validation_is_strict_about_unknown_fields() -> None:
    """A typo must fail, not be dropped: the tests above would be worthless otherwise."""
    deployment = copy.deepcopy(_one("Deployment"))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, NEWEST, strict=True)
    deployment = copy.deepcopy(_one("Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, NEWEST, strict=True)


# --- the TrafficRoute CRD and an object of it ---------------------------------------------


def _crd() -> dict[str, Any]:
    return _one("CustomResourceDefinition", "trafficroutes.shoal.io")


def _crd_schema() -> dict[str, Any]:
    (version,) = [v for v in _crd()["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


# Every field the CRD describes, as a user would write it.
TRAFFIC_ROUTE = """
apiVersion: shoal.io/v1alpha1
kind: TrafficRoute
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  rules:
    - match:
        headers: [{name: x-user-group, exact: internal}, {name: x-debug, present: true}]
        queryParams: [{name: tier, prefix: gold}]
        path: {prefix: /api}
        method: GET
      backends:
        - {service: reviews, subset: {version: v2}, weight: 100}
      timeout: 2s
      retries: {attempts: 3, retryOn: "5xx,reset", perTryTimeout: 500ms}
      fault: {abort: {status: 503, percent: 10}, delay: {duration: 200ms, percent: 5}}
      mirror: {service: shadow, percent: 25}
    - backends:
        - {service: reviews, subset: {version: v1}, weight: 90}
        - {service: reviews.shop, subset: {version: v2}, weight: 10}
  policy:
    outlier: {consecutive5xx: 3, ejection: 10s, maxEjectionPercent: 30}
    connections: {maxConnections: 100, maxPendingRequests: 10, maxRequests: 1000}
"""


def _crd_validator() -> jsonschema.protocols.Validator:
    # OpenAPI v3.0 schemas (what a CRD holds) follow JSON Schema draft 4 for
    # the keywords used here (e.g. boolean exclusiveMinimum).
    schema = _crd_schema()
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _schema_nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or "<root>", schema
    for name, sub in schema.get("properties", {}).items():
        yield from _schema_nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _schema_nodes(schema["additionalProperties"], f"{path}{{}}")


def _pruned(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Fields the API server would silently drop (prune) on the way in."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = []
        for key, sub in value.items():
            if key in props:
                out += _pruned(sub, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += _pruned(sub, extra, f"{path}.{key}")
            elif extra is not True:
                out.append(f"{path}.{key}")
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [p for i, v in enumerate(value) for p in _pruned(v, schema["items"], f"{path}[{i}]")]
    return []


def test_the_crd_schema_is_structural() -> None:
    """Kubernetes refuses a v1 CRD whose schema leaves a node without a type."""
    crd = _crd()
    assert crd["spec"]["group"] == "shoal.io" and crd["spec"]["scope"] == "Namespaced"
    untyped = [
        path
        for path, node in _schema_nodes(_crd_schema())
        if "type" not in node
        and not node.get("x-kubernetes-int-or-string")
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert untyped == []


def test_an_example_traffic_route_validates_against_the_crd() -> None:
    route = yaml.safe_load(TRAFFIC_ROUTE)
    crd = _crd()
    assert route["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
    assert route["kind"] == crd["spec"]["names"]["kind"]
    errors = [f"{e.json_path}: {e.message}" for e in _crd_validator().iter_errors(route)]
    assert errors == []
    assert _pruned(route["spec"], _crd_schema()["properties"]["spec"], "spec") == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("weight: 90}", "weight: 150}", id="weight-over-100"),
        pytest.param("attempts: 3", "attempts: 11", id="too-many-retries"),
        pytest.param("timeout: 2s", "timeout: soon", id="timeout-not-a-duration"),
        pytest.param("status: 503", "status: 99", id="abort-status-not-http"),
        pytest.param("  service: reviews\n  rules:", "  rules:", id="no-service"),
        pytest.param(
            "    - backends:\n        - {service: reviews, subset: {version: v1}, weight: 90}\n"
            "        - {service: reviews.shop, subset: {version: v2}, weight: 10}\n",
            "    - match: {method: GET}\n",
            id="rule-without-backends",
        ),
        pytest.param("method: GET", "method: [GET]", id="method-not-a-string"),
    ],
)
def test_the_crd_schema_refuses_a_bad_traffic_route(old: str, new: str) -> None:
    assert old in TRAFFIC_ROUTE
    route = yaml.safe_load(TRAFFIC_ROUTE.replace(old, new))
    assert list(_crd_validator().iter_errors(route)) != []


# --- 2. Policy ----------------------------------------------------------------------------


def _grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _no_wildcards(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(key, []), rule
        assert "nonResourceURLs" not in rule, rule


# Beyond reading what it watches: TokenReview (create reveals nothing of
# other objects), and its own webhook configuration's caBundle, by name.
TOKEN_REVIEWS = ("authentication.k8s.io", "tokenreviews")
WEBHOOK_CONFIGURATIONS = ("admissionregistration.k8s.io", "mutatingwebhookconfigurations")
# The status of the mesh routes (only the status subresource: the routes
# themselves are the user's).
ROUTE_STATUS = {
    ("gateway.networking.k8s.io", "httproutes/status"),
    ("gateway.networking.k8s.io", "grpcroutes/status"),
}
# Problems as Events (shoal/registry/events.py): its own Event read before a
# bump, never a list or watch of everyone's.
EVENTS = ("", "events")


def test_the_cluster_role_only_reads_what_the_control_plane_watches() -> None:
    rules = _one("ClusterRole")["rules"]
    _no_wildcards(rules)
    grants = _grants(rules)
    assert set(grants) == WATCHED | {TOKEN_REVIEWS, WEBHOOK_CONFIGURATIONS, EVENTS} | ROUTE_STATUS
    assert grants.pop(TOKEN_REVIEWS) == {"create"}
    assert grants.pop(EVENTS) == {"get", "create", "patch"}
    for status in ROUTE_STATUS:
        assert grants.pop(status) == {"update"}
    assert grants.pop(WEBHOOK_CONFIGURATIONS) == {"get", "update"}
    (webhook_rule,) = [r for r in rules if "mutatingwebhookconfigurations" in r["resources"]]
    assert webhook_rule["resourceNames"] == [
        _one("MutatingWebhookConfiguration", "shoal-sidecar-injector")["metadata"]["name"]
    ]
    for (group, resource), verbs in grants.items():
        assert verbs <= READ_ONLY, (group, resource, verbs)
        assert resource != "secrets" and not resource.startswith("secrets/")
    for rule in rules:
        assert "secrets" not in rule.get("resources", [])
    crd = _crd()["spec"]
    assert (crd["group"], crd["names"]["plural"]) in grants


def test_the_cluster_role_is_bound_to_the_service_account_only() -> None:
    binding = _one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "shoal",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    ]


def test_the_role_is_namespaced_and_narrow() -> None:
    role = _one("Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    rules = role["rules"]
    _no_wildcards(rules)
    assert _grants(rules) == {
        ("", "secrets"): {"get", "create", "update"},
        ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    }
    for rule in rules:
        names = rule.get("resourceNames")
        if names:
            # A create (or deletecollection) rule with resourceNames never matches.
            assert not {"create", "deletecollection"} & set(rule["verbs"]), rule
        if "secrets" in rule["resources"] and set(rule["verbs"]) != {"create"}:
            assert names == ["shoal-ca"], rule
        if "leases" in rule["resources"] and set(rule["verbs"]) != {"create"}:
            # Every Lease the control plane takes, by the names it uses.
            assert names == [
                operations.LEADER_LEASE,
                bundle.LEASE,
                routestatus.LEASE,
                events.LEASE,
            ], rule

    binding = _one("RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "shoal",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    ]


def test_every_namespaced_object_is_in_shoal_system() -> None:
    for path, index, doc in _all_objects():
        namespace = doc["metadata"].get("namespace")
        where = f"{path.name} document {index} ({doc['kind']})"
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, where
        else:
            assert namespace == NAMESPACE, where
    namespace = _one("Namespace", NAMESPACE)
    # The control plane needs no privileges; the namespace refuses Pods that ask for some.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert _one("ServiceAccount")["metadata"]["namespace"] == NAMESPACE


def test_the_deployment_runs_two_hardened_replicas() -> None:
    deployment = _one("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = _container()
    assert spec["replicas"] == 2
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    assert pod["automountServiceAccountToken"] is True
    assert pod["terminationGracePeriodSeconds"] > 0
    assert container["image"] == "ghcr.io/shoal-mesh/shoal:0.1.0"
    # The image's ENTRYPOINT is `shoal`: the manifest gives only its arguments.
    assert "command" not in container

    pod_sc, sc = pod.get("securityContext", {}), container["securityContext"]

    def effective(key: str) -> Any:
        return sc.get(key, pod_sc.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") == RUN_AS
    assert effective("seccompProfile") == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert "privileged" not in sc or sc["privileged"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]

    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (preferred,) = pod["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    term = preferred["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()


def test_the_probes_ask_the_admin_port() -> None:
    container = _container()
    admin = _container_ports()["http-admin"]
    assert admin == 15014
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"]["path"] == "/ready"
    assert live["httpGet"]["path"] == "/healthz"
    for probe in (ready, live, container.get("startupProbe")):
        if probe is not None:
            assert _resolve_port(probe["httpGet"]["port"]) == admin
            assert probe["httpGet"].get("scheme", "HTTP") == "HTTP"
    # Liveness is lenient: a slow API server must not get the control plane restarted.
    assert live["periodSeconds"] * live["failureThreshold"] >= 60
    assert live["timeoutSeconds"] >= ready.get("timeoutSeconds", 1)


def test_the_state_dir_and_tmp_are_writable_volumes() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    state_dir = _flags(_container()["args"])["--state-dir"]
    for path in (state_dir, "/tmp"):
        assert mounts[path]["name"] in empty_dirs, path
        assert not mounts[path].get("readOnly", False), path


def test_the_service_exposes_xds_and_the_webhook_only() -> None:
    """Not the admin port: every Pod in the cluster could reach it through
    the Service. Kubelet and Prometheus reach each replica directly."""
    service = _one("Service")
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert {p: _resolve_port(s["targetPort"]) for p, s in ports.items()} == {
        15010: 15010,
        15012: 15012,
        15018: 15018,
        443: 15017,
    }
    assert ports[15010]["name"] == "grpc-xds" and ports[15010]["appProtocol"] == "grpc"
    assert ports[443]["name"] == "https-webhook"
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_container_ports_are_what_the_service_targets_and_the_probes() -> None:
    service = _one("Service")
    targets = {_resolve_port(p["targetPort"]) for p in service["spec"]["ports"]}
    assert set(_container_ports().values()) == targets | {15014}
    assert _container_ports() == {
        "grpc-xds": 15010,
        "grpc-ca": 15012,
        "http-admin": 15014,
        "https-webhook": 15017,
        "https-traces": 15018,
    }
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "15014"


def test_the_admin_commands_find_the_socket_in_the_pod() -> None:
    env = {e["name"]: e.get("value") for e in _container()["env"]}
    state_dir = _flags(_container()["args"])["--state-dir"]
    assert env[cli.ADMIN_ENV] == f"{state_dir}/{cli.ADMIN_SOCKET}"


def test_the_disruption_budget_keeps_one_replica() -> None:
    pdb = _one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in pdb["spec"]
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kustomization_lists_every_manifest_in_apply_order() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == [p.name for p in _manifest_files()]
    kinds_per_file = [{d["kind"] for d in _documents(FOLDER / name)} for name in resources]
    # The namespace and the CRD before anything that lives in or refers to them.
    assert kinds_per_file[0] == {"Namespace"}
    crd_at = kinds_per_file.index({"CustomResourceDefinition"})
    assert all(kinds <= CLUSTER_SCOPED for kinds in kinds_per_file[: crd_at + 1])
    order = [kind for kinds in kinds_per_file for kind in sorted(kinds)]
    assert order.index("ServiceAccount") < order.index("ClusterRoleBinding")
    assert order.index("ServiceAccount") < order.index("Deployment")


# --- 3. The Deployment's command line is shoal's ------------------------------------------


def test_the_deployment_listens_on_its_container_ports() -> None:
    flags = _flags(_container()["args"])
    ports = _container_ports()
    assert flags["--xds-address"] == f"0.0.0.0:{ports['grpc-xds']}"
    assert flags["--admin-address"] == f"0.0.0.0:{ports['http-admin']}"


def test_the_deployment_args_parse_with_shoal_cli(capsys: pytest.CaptureFixture[str]) -> None:
    args = _container()["args"]
    assert args == [
        "serve",
        "--kubernetes",
        "--xds-address",
        "0.0.0.0:15010",
        "--admin-address",
        "0.0.0.0:15014",
        "--join-address",
        "0.0.0.0:15012",
        "--state-dir",
        "/var/lib/shoal",
        "--sidecar-image",
        "ghcr.io/shoal-mesh/shoal:0.1.0",
    ]
    try:
        parsed = cli.parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`shoal {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()}")
    assert parsed.command == "serve"
    assert parsed.func is cli.cmd_serve
    assert parsed.kubernetes is True
    assert parsed.xds_address == "0.0.0.0:15010"
    assert parsed.admin_address == "0.0.0.0:15014"
    assert str(parsed.state_dir) == "/var/lib/shoal"
    # The sidecars it injects run the image it runs from.
    assert parsed.sidecar_image == _container()["image"]


# --- 4. The image ---------------------------------------------------------------------------


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments), split into stages."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append((instruction, rest.strip()))
    return stages


def _last(stage: list[tuple[str, str]], instruction: str) -> str:
    values = [rest for ins, rest in stage if ins == instruction]
    assert values, f"no {instruction} in the final stage"
    return values[-1]


def test_the_dockerfile_builds_on_python_311_slim_in_two_stages() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim"
    builder = " ".join(rest for _, rest in stages[0])
    # shoal/_gen is generated, so it must exist before a non-editable install.
    assert "grpc_tools.protoc" in builder and "protos/shoal/_gen/*.proto" in builder
    assert builder.index("grpc_tools.protoc") < builder.index("pip install .")
    final = stages[-1]
    assert any(ins == "COPY" and rest.startswith("--from=") for ins, rest in final)


def test_the_image_runs_shoal_as_an_unprivileged_user() -> None:
    final = _dockerfile_stages()[-1]
    assert json.loads(_last(final, "ENTRYPOINT")) == ["shoal"]
    user = _last(final, "USER")
    assert user.isdigit() and int(user) != 0
    # The same user the Deployment asks for, so runAsNonRoot can be checked.
    assert int(user) == RUN_AS


def test_the_image_exposes_the_deployment_container_ports() -> None:
    final = _dockerfile_stages()[-1]
    exposed = {
        int(port.split("/")[0]) for ins, rest in final if ins == "EXPOSE" for port in rest.split()
    }
    assert exposed == set(_container_ports().values())


def test_the_webhook_configuration_sends_labelled_namespaces_pods_to_shoal() -> None:
    configuration = _one("MutatingWebhookConfiguration", "shoal-sidecar-injector")
    assert configuration["metadata"]["name"] == cli.injector_bundle.CONFIGURATION
    (hook,) = configuration["webhooks"]
    service = _one("Service")
    https = next(p for p in service["spec"]["ports"] if p["name"] == "https-webhook")
    assert hook["clientConfig"] == {
        "service": {
            "name": service["metadata"]["name"],
            "namespace": NAMESPACE,
            "path": "/inject",
            "port": https["port"],
        }
    }
    # shoal writes the caBundle: one written here would go stale at a root rotation.
    assert "caBundle" not in hook["clientConfig"]
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert (hook["failurePolicy"], hook["sideEffects"], hook["reinvocationPolicy"]) == (
        "Fail",
        "None",
        "IfNeeded",
    )
    assert 1 <= hook["timeoutSeconds"] <= 30
    expressions = {e["key"]: e for e in hook["namespaceSelector"]["matchExpressions"]}
    assert expressions["shoal.io/inject"] == {
        "key": "shoal.io/inject",
        "operator": "In",
        "values": ["enabled"],
    }
    never = expressions["kubernetes.io/metadata.name"]
    assert never["operator"] == "NotIn"
    assert {"kube-system", NAMESPACE} <= set(never["values"])


def test_the_image_holds_iptables_and_the_proxy_user() -> None:
    final = " ".join(rest for _, rest in _dockerfile_stages()[-1])
    assert "apt-get install -y --no-install-recommends iptables" in final
    assert "--uid 1337" in final
