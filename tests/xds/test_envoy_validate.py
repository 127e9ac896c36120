"""Generated configuration, checked by Envoy itself (`envoy --mode validate`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from shoal import envoy
from shoal.xds.translate import bootstrap, clusters, listeners, sidecar
from tests.xds import fixtures


def validate(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [envoy.binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _bootstrap() -> dict[str, Any]:
    return bootstrap.sidecar(
        fixtures.sidecar(),
        node_id="sidecar~shop~web",
        xds_host="127.0.0.1",
        xds_port=15010,
        admin_port=15000,
    )


def test_sidecar_bootstrap_is_valid(tmp_path: Path) -> None:
    result = validate(_bootstrap(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_translated_resources_are_valid_envoy_config(tmp_path: Path) -> None:
    state = fixtures.state()
    s = fixtures.sidecar()
    routes = sidecar.outbound_routes(s.namespace, state.sorted_services(), state)
    listeners = []
    for listener in sidecar.own_listeners(s, state):
        # RDS is served over ADS at run time; inline it so Envoy checks the routes too.
        for chain in listener.filter_chains:
            for f in chain.filters:
                manager = hcm_pb2.HttpConnectionManager()
                if f.typed_config.Unpack(manager) and manager.HasField("rds"):
                    manager.route_config.CopyFrom(routes)
                    f.typed_config.Pack(manager)
        listeners.append(json_format.MessageToDict(listener))
    all_clusters = [
        c for svc in state.sorted_services() for c in clusters.outbound_for_service(svc)
    ]
    all_clusters += sidecar.own_clusters(s, state)
    config = _bootstrap()
    config["static_resources"]["clusters"] += [json_format.MessageToDict(c) for c in all_clusters]
    config["static_resources"]["listeners"] = listeners
    result = validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_validate_rejects_a_broken_config(tmp_path: Path) -> None:
    # The check above means something only if Envoy does reject bad input.
    config = _bootstrap()
    config["static_resources"]["clusters"].append({"name": "x", "type": "NOT_A_TYPE"})
    assert validate(config, tmp_path).returncode != 0


def test_mtls_listeners_and_clusters_are_valid(tmp_path: Path) -> None:
    state = fixtures.state()
    s = fixtures.sidecar()
    config = _bootstrap()
    for permissive in (False, True):
        security = listeners.InboundSecurity(
            permissive=permissive, allow=("spiffe://cluster.local/ns/shop/sa/*",)
        )
        (inbound, _) = sidecar.own_listeners(s, state, security)
        inbound.name += f"-{permissive}"
        inbound.address.socket_address.port_value += int(permissive)
        config["static_resources"].setdefault("listeners", []).append(
            json_format.MessageToDict(inbound)
        )
    peers = frozenset({"spiffe://cluster.local/ns/shop/sa/web"})
    config["static_resources"]["clusters"] += [
        json_format.MessageToDict(c)
        for svc in state.sorted_services()
        for c in clusters.outbound_for_service(svc, peers)
    ] + [json_format.MessageToDict(c) for c in sidecar.own_clusters(s, state)]
    result = validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
