"""What `/debug/` shows of the mesh model."""

from __future__ import annotations

from typing import Any

from shoal.model import mesh


def services(state: mesh.MeshState) -> dict[str, Any]:
    """`/debug/services`: every Service's ports and endpoints."""
    return {
        "version": state.version,
        "services": {
            str(k): {
                "ports": [f"{p.port}/{p.protocol.value}" for p in s.ports],
                "endpoints": [
                    f"{e.address}:{e.port}{'' if e.ready else ' (not ready)'}"
                    for e in state.endpoints.get(k, ())
                ],
            }
            for k, s in sorted(state.services.items())
        },
    }
