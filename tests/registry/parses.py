"""Which route objects a build parses: a spy over a route module's `parse`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from shoal.registry import manifests


def recorded(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[str]:
    """The objects `module.parse` is called with from now on, by name; the
    real parse still does the work."""
    parsed: list[str] = []
    real_parse = module.parse

    def recording_parse(obj: manifests.KubeObject, known: Any) -> Any:
        parsed.append(str(obj))
        return real_parse(obj, known)

    monkeypatch.setattr(module, "parse", recording_parse)
    return parsed
