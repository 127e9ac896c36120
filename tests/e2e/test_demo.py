"""`shoal demo --check`: the demo a new user runs, run unattended."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_check_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "--log-level",
            "warning",
            "demo",
            "--check",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "every check passed" in out
    assert "[FAIL]" not in out
    assert out.count("[ok]") >= 6


def test_demo_check_fails_when_the_mesh_is_broken(tmp_path: Path) -> None:
    # A demo folder whose frontend calls a Service that does not exist: the
    # checks must say so and the exit code must be non-zero.
    folder = tmp_path / "registry"
    folder.mkdir()
    demo = Path(__file__).resolve().parents[2] / "examples" / "demo"
    for f in demo.glob("*.yaml"):
        (folder / f.name).write_text(
            f.read_text().replace("demo.shoal.io/calls: catalog", "demo.shoal.io/calls: missing")
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "--log-level",
            "warning",
            "demo",
            "--check",
            "--registry",
            str(folder),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "[FAIL]" in result.stdout
