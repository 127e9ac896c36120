"""`shoal inject -f`: the webhook's patch, offline, on the objects a user
keeps in files (like `istioctl kube-inject`)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from shoal import cli
from shoal.injector import settings
from tests.injector import shapes

SERVICE = """apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 9080}]
"""


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[object], str]:
    code = cli.main(["inject", *args])
    out, err = capsys.readouterr()
    return code, list(yaml.safe_load_all(out)), err


def test_a_multi_document_file_is_injected_object_by_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root.pem"
    root.write_text(shapes.ROOT_PEM)
    source = tmp_path / "app.yaml"
    source.write_text(
        "\n---\n".join(
            [
                SERVICE,
                (shapes.PODS / "deployment.yaml").read_text(),
                (shapes.PODS / "opt_out.yaml").read_text(),
                (shapes.PODS / "cronjob.yaml").read_text(),
            ]
        )
    )
    code, docs, err = _run(
        capsys, "-f", str(source), "--ca-root", str(root), "--sidecar-image", "shoal:test"
    )
    assert code == 0
    service, deployment, pod, cronjob = docs
    assert service == yaml.safe_load(SERVICE)
    template = deployment["spec"]["template"]  # type: ignore[index]
    names = [c["name"] for c in template["spec"]["initContainers"]]
    assert names == [settings.INIT_CONTAINER, settings.PROXY_CONTAINER]
    assert template["spec"]["initContainers"][1]["image"] == "shoal:test"
    assert pod == shapes.load("opt_out")
    job_pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[index]
    assert job_pod["spec"]["initContainers"][0]["name"] == settings.INIT_CONTAINER
    assert (
        err == 'shoal inject: Pod shop/batch-1 not injected: annotation shoal.io/inject: "false"\n'
    )


def test_stdin_and_idempotence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO((shapes.PODS / "plain.yaml").read_text()))
    code, (once,), _ = _run(capsys, "-f", "-")
    assert code == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(once)))
    code, (twice,), err = _run(capsys, "-f", "-")
    assert (code, twice) == (0, once)
    assert "it is injected already" in err


def test_a_bad_annotation_fails_naming_the_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = shapes.load("deployment")
    deployment["spec"]["template"]["metadata"]["annotations"] = {
        settings.EXCLUDE_INBOUND_PORTS: "9080,x"
    }
    source = tmp_path / "bad.yaml"
    source.write_text(yaml.safe_dump(deployment))
    code, docs, err = _run(capsys, "-f", str(source))
    assert code == 2 and docs == []
    assert err == (
        "shoal inject: Deployment shop/reviews-v1: Pod shop/(template): annotation "
        "traffic.shoal.io/excludeInboundPorts: 'x' is not a port (1-65535)\n"
    )


def test_what_is_not_yaml_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "bad.yaml"
    source.write_text("kind: [Pod\n")
    code, _, err = _run(capsys, "-f", str(source))
    assert code == 2
    assert err.startswith(f"shoal inject: {source} is not YAML")
