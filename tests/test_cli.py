"""`shoal bootstrap` and `--help`: what a user types first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shoal import cli, envoy
from shoal.model import problems


def test_bootstrap_writes_a_config_envoy_accepts(tmp_path: Path) -> None:
    code = cli.main(
        [
            "bootstrap",
            "--xds",
            "127.0.0.1:15010",
            "--namespace",
            "shop",
            "--service",
            "web",
            "--app-port",
            "8080",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--admin-port",
            "15000",
            "--out",
            str(tmp_path / "web"),
        ]
    )
    assert code == 0
    path = tmp_path / "web" / "envoy.yaml"
    config = yaml.safe_load(path.read_text())
    meta = config["node"]["metadata"]
    assert meta["SERVICE"] == "web" and meta["APP_PORT"] == 8080
    assert config["node"]["id"] == "sidecar~shop~web-15006"
    result = subprocess.run(
        [envoy.binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_help_names_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    for command in ("serve", "bootstrap", "demo"):
        assert command in out


def test_serve_refuses_a_missing_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "serve", "--registry", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_serve_refuses_a_worker_count_out_of_range(tmp_path: Path) -> None:
    for count in ("0", "65"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "shoal.cli",
                "serve",
                "--registry",
                str(tmp_path),
                "--workers",
                count,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert "--workers must be 1 to 64" in result.stderr


def test_a_worker_started_by_hand_says_what_it_is_for() -> None:
    # `serve --worker` reads its options from worker 0: from nothing else.
    result = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "serve", "--worker"],
        input=b"\0\0\0\0\0\0\0\x05" + b"nope.",
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"it is not for starting by hand" in result.stderr


def test_analyze_lists_every_problem_with_code_object_field_and_fix(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\nspec: {ports: [{port: 80}]}\n"
    )

    def analyze(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shoal.cli", "analyze", "-f", str(tmp_path), *flags],
            capture_output=True,
            text=True,
            timeout=30,
        )

    clean = analyze()
    assert clean.returncode == 0 and "no problems" in clean.stdout
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n"
        '    shoal.io/split: "web=50,ok=60"\n    shoal.io/outlier: often\n'
        "spec: {ports: [{port: 80}]}\n"
    )
    result = analyze()
    assert result.returncode == 1
    assert (
        "Error [SHL0003] Service default/web (metadata.annotations[shoal.io/split]) "
        f"in {tmp_path / 'bad.yaml'}#0\n"
        "  annotation shoal.io/split: weights add up to 110, not 100; ignored\n"
        "  fix: Correct the annotation" in result.stdout
    )
    as_json = analyze("--output", "json")
    assert as_json.returncode == 1
    found = {p["field"]: p for p in json.loads(as_json.stdout)}
    assert found["metadata.annotations[shoal.io/outlier]"] == {
        "code": "SHL0003",
        "name": "InvalidAnnotation",
        "severity": "Error",
        "source": f"{tmp_path / 'bad.yaml'}#0",
        "object": "Service default/web",
        "field": "metadata.annotations[shoal.io/outlier]",
        "reason": "annotation shoal.io/outlier: 'often': expected consecutive-5xx=N, "
        "ejection=DURATION, max-ejection=P%; ignored",
        "fix": problems.BY_ID["SHL0003"].fix,
    }
    missing = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "analyze", "-f", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "nope does not exist" in missing.stderr


def test_dashboard_refuses_a_prometheus_that_is_not_a_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (
        ["dashboard", "--admin", str(tmp_path / "admin.sock"), "--prometheus"],
        ["serve", "--registry", str(tmp_path), "--dashboard-prometheus"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main([*command, "prometheus:9090"])
        assert exited.value.code == 2
        assert "'prometheus:9090': give Prometheus' URL" in capsys.readouterr().err
