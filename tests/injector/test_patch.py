"""The patch builder on the Pod shapes in pods/: golden files of what is
injected, the JSONPatch that gets there, validity against the Kubernetes
schemas, idempotence, and refusals that name the Pod and the reason."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shoal import cli
from shoal.injector import patch, probes, settings, workloads
from tests.injector import shapes

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "inject"
# The oldest Kubernetes with native sidecars on by default that shoal
# supports, and the newest schema bundled.
VERSIONS = ("1.31", ".".join(kubernetes_validate.latest_version().split(".")[:2]))


def _outcome(name: str) -> dict[str, Any]:
    original = shapes.load(name)
    reports: list[workloads.Outcome] = []
    result = workloads.inject_object(copy.deepcopy(original), shapes.SETTINGS, reports.append)
    return {
        "outcomes": [
            {"object": r.what, "injected": r.injected, "reason": r.reason} for r in reports
        ],
        "patch": patch.json_patch(original, result) if original.get("kind") == "Pod" else None,
        "result": result,
    }


def _check_golden(name: str, value: Any) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from {path}; UPDATE_GOLDEN=1 rewrites it"


def test_there_are_at_least_twelve_shapes() -> None:
    assert len(shapes.names()) >= 12


@pytest.mark.parametrize("name", shapes.names())
def test_golden(name: str) -> None:
    _check_golden(name, _outcome(name))


@pytest.mark.parametrize("name", shapes.names())
@pytest.mark.parametrize("version", VERSIONS)
def test_injected_objects_are_valid_kubernetes(name: str, version: str) -> None:
    result = _outcome(name)["result"]
    kubernetes_validate.validate(result, version, strict=True)


@pytest.mark.parametrize("name", [n for n in shapes.names() if shapes.load(n)["kind"] == "Pod"])
def test_the_patch_turns_the_pod_into_the_injected_pod(name: str) -> None:
    original = shapes.load(name)
    outcome = _outcome(name)
    assert jsonpatch.apply_patch(original, outcome["patch"]) == outcome["result"]


@pytest.mark.parametrize("name", shapes.names())
def test_injecting_twice_changes_nothing(name: str) -> None:
    once = _outcome(name)["result"]
    reports: list[workloads.Outcome] = []
    twice = workloads.inject_object(copy.deepcopy(once), shapes.SETTINGS, reports.append)
    assert twice == once
    assert not any(r.injected for r in reports)


def test_what_is_injected() -> None:
    pod = _outcome("named_probe_ports")["result"]
    init = pod["spec"]["initContainers"]
    assert [c["name"] for c in init] == [settings.INIT_CONTAINER, settings.PROXY_CONTAINER]
    capture, proxy = init
    # Only the init container may change the network, and it runs as root.
    assert capture["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert "add" not in proxy["securityContext"]["capabilities"]
    assert proxy["securityContext"]["runAsUser"] == settings.PROXY_UID
    assert proxy["securityContext"]["runAsNonRoot"] is True
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"]["port"] == settings.HEALTH_PORT
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in proxy["env"]}
    assert env["SHOAL_CA_ROOT_PEM"] == shapes.ROOT_PEM
    assert env["POD_UID"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}}
    checks = json.loads(env["SHOAL_APP_PROBES"])
    assert checks == {
        "/app-health/api/livez": {
            "httpGet": {
                "path": "/livez",
                "port": 9901,
                "scheme": "HTTP",
                "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}],
            }
        },
        "/app-health/api/readyz": {
            "httpGet": {"path": "/readyz", "port": 8080, "scheme": "HTTP"},
            "timeoutSeconds": 2,
        },
        "/app-health/api/startupz": {
            "httpGet": {"path": "/started", "port": 8080, "scheme": "HTTPS"}
        },
    }
    app = pod["spec"]["containers"][0]
    assert app["livenessProbe"] == {
        "httpGet": {"path": "/app-health/api/livez", "port": 15021, "scheme": "HTTP"},
        "periodSeconds": 10,
    }
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == settings.TOKEN_VOLUME)
    source = token["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == "shoal"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "15090"
    assert annotations["kubectl.kubernetes.io/default-container"] == "api"


def test_capture_annotations_become_the_init_containers_flags() -> None:
    pod = _outcome("excluded_ports_and_cidrs")["result"]
    command = pod["spec"]["initContainers"][0]["command"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags["--exclude-inbound-ports"] == "8081,9100,15020,15021,15090"
    assert flags["--exclude-outbound-ports"] == "5432"
    assert flags["--exclude-outbound-cidrs"] == "10.20.0.0/16,169.254.169.254/32"
    assert flags["--include-inbound-ports"] == "*"
    assert flags["--include-outbound-cidrs"] == "*"


def test_a_pod_the_user_scrapes_their_own_way_keeps_it() -> None:
    pod = _outcome("generate_name_and_scrape")["result"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "false"


@pytest.mark.parametrize(
    ("annotation", "value", "reason"),
    [
        (settings.EXCLUDE_INBOUND_PORTS, "80,http", "'http' is not a port"),
        (settings.EXCLUDE_OUTBOUND_PORTS, "70000", "'70000' is not a port"),
        (settings.EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33", "'10.0.0.0/33' is not an IP range"),
        (settings.INCLUDE_OUTBOUND_CIDRS, "fd00::/8", "is IPv6: only IPv4 traffic is captured"),
        (settings.INCLUDE_INBOUND_PORTS, "²", "is not a port"),
        (settings.PROXY_MEMORY, "lots", "'lots' is not a quantity"),
        (settings.EXCLUDE_INBOUND_PORTS, ",".join(["1"] * 65), "at most 64"),
    ],
)
def test_a_bad_annotation_is_refused_with_the_pod_and_the_reason(
    annotation: str, value: str, reason: str
) -> None:
    pod = shapes.load("plain")
    pod["metadata"]["annotations"] = {annotation: value}
    with pytest.raises(patch.InjectionError) as caught:
        patch.inject(pod, shapes.SETTINGS)
    message = str(caught.value)
    assert message.startswith("Pod shop/web-1: annotation " + annotation)
    assert reason in message


def test_a_deployments_template_is_refused_by_the_deployments_name() -> None:
    deployment = shapes.load("deployment")
    deployment["spec"]["template"]["metadata"]["annotations"] = {
        settings.EXCLUDE_OUTBOUND_PORTS: "x"
    }
    with pytest.raises(patch.InjectionError, match=r"^Deployment shop/reviews-v1: "):
        workloads.inject_object(deployment, shapes.SETTINGS, lambda _: None)


@pytest.mark.parametrize(
    ("namespace", "reason"),
    [("kube-system", "namespace kube-system is never injected"), ("shoal-system", "never")],
)
def test_system_namespaces_are_never_injected(namespace: str, reason: str) -> None:
    outcome = patch.inject(
        shapes.load("plain"), shapes.SETTINGS, namespace, frozenset({"shoal-system"})
    )
    assert isinstance(outcome, patch.Skipped)
    assert reason in outcome.reason


def test_probes_with_ports_that_name_nothing_are_left_alone() -> None:
    containers = [
        {"name": "a", "readinessProbe": {"httpGet": {"path": "/", "port": "nope"}}},
        {"name": "b", "livenessProbe": {"tcpSocket": {"port": 0}}},
    ]
    rewritten, checks = probes.rewrite(containers)
    assert rewritten == containers
    assert checks == {}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=20,
)
_container = st.fixed_dictionaries(
    {"name": st.text(max_size=6)},
    optional={
        "ports": st.lists(
            st.fixed_dictionaries({"name": _json, "containerPort": _json}), max_size=2
        ),
        "livenessProbe": st.dictionaries(
            st.sampled_from(["httpGet", "tcpSocket", "grpc", "exec", "timeoutSeconds"]),
            _json | st.fixed_dictionaries({"port": _json, "path": _json}),
            max_size=3,
        ),
        "readinessProbe": _json,
    },
)
_pod = st.fixed_dictionaries(
    {
        "apiVersion": st.just("v1"),
        "kind": st.just("Pod"),
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "name": _json,
                "annotations": st.dictionaries(
                    st.sampled_from(
                        [
                            settings.EXCLUDE_INBOUND_PORTS,
                            settings.INCLUDE_OUTBOUND_CIDRS,
                            settings.PROXY_CPU,
                            settings.INJECT_ANNOTATION,
                            "x",
                        ]
                    ),
                    st.text(max_size=12),
                    max_size=3,
                ),
                "labels": _json,
            },
        ),
        "spec": st.fixed_dictionaries(
            {"containers": st.lists(_container, max_size=2)},
            optional={"initContainers": _json, "volumes": _json, "hostNetwork": _json},
        ),
    }
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_pod)
def test_any_pod_is_injected_or_refused_with_a_reason(pod: dict[str, Any]) -> None:
    before = copy.deepcopy(pod)
    try:
        outcome = patch.inject(pod, shapes.SETTINGS, "shop")
    except patch.InjectionError as err:
        assert str(err).startswith("Pod shop/")
        return
    assert pod == before, "the builder changed its input"
    if isinstance(outcome, patch.Injected):
        assert jsonpatch.apply_patch(pod, outcome.patch) == outcome.pod
        assert isinstance(patch.inject(outcome.pod, shapes.SETTINGS, "shop"), patch.Skipped)


@pytest.mark.parametrize(
    "name", ["named_probe_ports", "excluded_ports_and_cidrs", "included_ports_and_cidrs"]
)
def test_the_injected_command_lines_are_shoals_own(name: str) -> None:
    pod = _outcome(name)["result"]
    init, proxy = pod["spec"]["initContainers"][:2]
    assert init["command"][0] == proxy["command"][0] == "shoal"
    parsed = cli.parser().parse_args(init["command"][1:])
    assert parsed.func is cli.cmd_agent_iptables
    # What the init container applies, without applying it.
    assert cli.main([*init["command"][1:], "--dry-run"]) == 0
    parsed = cli.parser().parse_args([*proxy["command"][1:], *proxy["args"]])
    assert parsed.func is cli.cmd_agent
    assert (parsed.xds_address, parsed.ca_address) == (
        shapes.SETTINGS.xds_address,
        shapes.SETTINGS.ca_address,
    )
    assert parsed.delta is True
