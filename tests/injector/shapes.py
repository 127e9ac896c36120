"""The Pod shapes the injector is checked on, and the settings they are
injected with (a fixed root, so golden files do not change run to run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shoal.injector import settings

PODS = Path(__file__).resolve().parent / "pods"
ROOT_PEM = "-----BEGIN CERTIFICATE-----\nTEST-ROOT\n-----END CERTIFICATE-----\n"
SETTINGS = settings.Settings(image="registry.example/shoal:0.1.0", trust_pem=ROOT_PEM)


def names() -> list[str]:
    return sorted(p.stem for p in PODS.glob("*.yaml"))


def load(name: str) -> Any:
    return yaml.safe_load((PODS / f"{name}.yaml").read_text())
