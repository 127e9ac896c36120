"""The agent's pure parts: renewal schedule, probes, the Pod from its
environment, and the bootstrap it writes (checked by real Envoy)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shoal import envoy
from shoal.agent import health, identity, proxy, settings
from shoal.sds import ca
from shoal.xds.translate import bootstrap

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(hours=24)


@pytest.mark.parametrize(
    ("rand", "hours"), [(0.0, 9.6), (0.5, 12.0), (0.999999, 14.4)]
)  # fmt: skip
def test_renewal_is_at_about_half_the_lifetime_with_jitter(rand: float, hours: float) -> None:
    at = identity.renewal_time(T0, T0 + DAY, fraction=0.5, jitter=0.1, rand=rand)
    assert abs((at - T0).total_seconds() - hours * 3600) < 1


def test_renewal_is_counted_from_receipt_not_from_the_backdated_start() -> None:
    got = T0 + datetime.timedelta(minutes=5)
    at = identity.renewal_time(
        got, got + datetime.timedelta(seconds=4), fraction=0.5, jitter=0, rand=0.3
    )
    assert at == got + datetime.timedelta(seconds=2)


def test_an_expired_certificate_is_renewed_at_once() -> None:
    at = identity.renewal_time(T0, T0 - DAY, fraction=0.5, jitter=0.1, rand=0.7)
    assert at == T0


def _entry(**get: object) -> dict[str, object]:
    return {"httpGet": {"path": "/ok", "port": 8080, **get}, "timeoutSeconds": 3}


def test_probes_are_read_as_the_injector_writes_them() -> None:
    probes = health.parse_probes(
        json.dumps(
            {
                "/app-health/web/readyz": _entry(
                    scheme="HTTPS", httpHeaders=[{"name": "X", "value": "1"}]
                ),
                "/app-health/web/livez": {"httpGet": {"port": 9000}},
            }
        )
    )
    ready = probes["/app-health/web/readyz"]
    assert ready.url() == "https://127.0.0.1:8080/ok"
    assert ready.headers == (("X", "1"),) and ready.timeout == 3.0
    assert probes["/app-health/web/livez"].url() == "http://127.0.0.1:9000/"
    assert health.parse_probes("") == {}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"/other/web/readyz": {}}', "not /app-health"),
        ('{"/app-health/web/healthz": {}}', "not /app-health"),
        ('{"/app-health/web/readyz": {"exec": {}}}', "no httpGet, tcpSocket or grpc"),
        ('{"/app-health/web/readyz": {"tcpSocket": {}}}', "tcpSocket.port None"),
        ('{"/app-health/web/readyz": {"grpc": {"port": 80, "service": 1}}}', "grpc.service"),
        ('{"/app-health/web/readyz": {"httpGet": {"port": "http"}}}', "not a port number"),
        ('{"/app-health/web/readyz": {"httpGet": {"port": 0}}}', "not a port number"),
        ('{"/app-health/web/readyz": {"httpGet": {"port": 80, "path": "x"}}}', "not a path"),
        ('{"/app-health/web/readyz": {"httpGet": {"port": 80, "scheme": "FTP"}}}', "scheme"),
        ('{"/app-health/web/readyz": {"httpGet": {"port": 80}, "timeoutSeconds": 0}}', "timeout"),
    ],
)
def test_malformed_probes_are_refused_saying_where(text: str, reason: str) -> None:
    with pytest.raises(health.ProbeError) as info:
        health.parse_probes(text)
    assert reason in str(info.value)


POD_ENV = {
    "POD_NAME": "web-1",
    "POD_NAMESPACE": "shop",
    "POD_UID": "u-1",
    "POD_IP": "10.1.0.7",
    "SERVICE_ACCOUNT": "web",
}


def test_the_pod_comes_from_the_downward_api() -> None:
    pod = settings.pod_from_env({**POD_ENV, "SHOAL_WORKLOAD": "web"})
    assert pod == settings.Pod("web-1", "shop", "u-1", "10.1.0.7", "web", "web")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"POD_UID": ""}, "POD_UID"),
        ({"POD_IP": "nowhere"}, "POD_IP"),
        ({"POD_NAMESPACE": "Shop"}, "POD_NAMESPACE"),
        ({"SERVICE_ACCOUNT": "a b"}, "SERVICE_ACCOUNT"),
        ({"POD_NAME": "-x"}, "POD_NAME"),
    ],
)
def test_a_bad_environment_is_named(change: dict[str, str], named: str) -> None:
    with pytest.raises(settings.SettingsError) as info:
        settings.pod_from_env({**POD_ENV, **change})
    assert named in str(info.value)


@pytest.mark.parametrize("value", ["shoal:99999", "shoal", ":15010", "shoal:x"])
def test_addresses_are_checked(value: str) -> None:
    with pytest.raises(settings.SettingsError) as info:
        settings.host_port("--xds-address", value)
    assert "--xds-address" in str(info.value)


def _certified(work: Path, host: str) -> settings.AgentSettings:
    """An agent's settings with credentials installed in `work`, as after
    a Certify."""
    s = settings.AgentSettings(
        pod=settings.pod_from_env(POD_ENV),
        xds_host=host,
        xds_port=15010,
        ca_address=f"{host}:15012",
        work_dir=work,
    )
    authority = ca.Authority(ca.new_root("cluster.local"))
    pair = authority.workload("shop", "web")
    identity.prepare(s)
    identity.install(
        s, identity.Credentials(pair.cert_pem, pair.key_pem, authority.xds_trust, ca.utcnow())
    )
    return s


def test_the_agents_bootstrap_is_valid_for_envoy(tmp_path: Path) -> None:
    s = _certified(tmp_path, "shoal.shoal-system.svc")
    path = identity.write_bootstrap(s)
    config = yaml.safe_load(path.read_text())
    names = [x["name"] for x in config["static_resources"]["listeners"]]
    assert names == ["shoal-stats"], "the agent, not Envoy, serves the health port"
    socket = config["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    sds = socket["common_tls_context"]["tls_certificate_sds_secret_configs"][0]
    assert sds["name"] == bootstrap.XDS_CLIENT_SECRET
    assert sds["sds_config"]["path_config_source"]["watched_directory"]["path"] == str(
        (tmp_path / identity.SDS_DIR).resolve()
    )
    assert "PRIVATE KEY" not in path.read_text(), "the key is only in the SDS file"
    done = subprocess.run(
        [envoy.binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _agent(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), **env},
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ((), {}, "POD_NAME"),
        (("--xds-address", "shoal"), POD_ENV, "--xds-address"),
        (("--health-port", "0"), POD_ENV, "--health-port"),
        ((), {**POD_ENV, "SHOAL_APP_PROBES": "{"}, "SHOAL_APP_PROBES"),
    ],
)
def test_the_agent_refuses_to_start_misconfigured(
    args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    done = _agent(*args, env=env)
    assert done.returncode == 2
    assert named in done.stderr


def test_envoys_command_line_flushes_access_logs_within_a_second(tmp_path: Path) -> None:
    """Envoy's default keeps access-log lines for 10 s before `kubectl logs`
    shows them; the agent asks for 1 s, on a command line Envoy accepts."""
    s = _certified(tmp_path, "127.0.0.1")
    argv = proxy.Envoy(s, identity.write_bootstrap(s)).argv()
    flag = argv.index("--file-flush-interval-msec")
    assert argv[flag + 1] == "1000"
    done = subprocess.run(
        [envoy.binary(), *argv[1:], "--mode", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
