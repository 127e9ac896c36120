"""`shoal serve --kubernetes` against the emulator, in the test's process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal import cli
from tests.kube.emulator import KubeEmulator

# shoal's own namespace in these tests, as in examples/kubernetes.
HOME = "shoal-system"


def options(emu: KubeEmulator, folder: Path, **extra: Any) -> cli.ServeOptions:
    """Every port free on 127.0.0.1 (the webhook only if `extra` asks for
    it), the kubeconfig and the CA in `folder`, a short debounce."""
    settings: dict[str, Any] = {
        "kubernetes": True,
        "kubeconfig": str(emu.write_kubeconfig(folder / "kubeconfig", namespace=HOME)),
        "xds_address": "127.0.0.1:0",
        "admin_address": "127.0.0.1:0",
        "join_address": "127.0.0.1:0",
        "state_dir": folder / "state",
        "debounce_quiet": 0.05,
        "debounce_max": 0.5,
    }
    return cli.ServeOptions(**{**settings, **extra})
