"""The server under test: `shoal serve` on a manifests folder, as a process
of its own (in instrumented_serve.py when a look inside is asked for), and
the mesh CA's certificates its proxies and the floor present."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from shoal.sds import ca

from . import processes

# Runs `shoal serve` with a look inside, in place of `python -m shoal.cli`.
INSTRUMENTED_SERVE = Path(__file__).resolve().parent / "instrumented_serve.py"
TRUST_DOMAIN = "cluster.local"  # shoal serve's default


@dataclass(frozen=True)
class ServeOptions:
    """How the server under test runs: explicit fields, so a benchmark that
    does not set one gets its default instead of failing at start."""

    insecure_xds: bool = False
    workers: int = 1
    tracemalloc: str = ""
    instrument: bool = False
    server_profile: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        """bench/fanout.py's flags of the same names."""
        return cls(
            insecure_xds=args.xds_security == "insecure",
            workers=args.serve_workers,
            tracemalloc=args.tracemalloc or "",
            instrument=args.instrument,
            server_profile=args.server_profile or "",
        )


@dataclass
class Tls:
    """Certificates from the mesh CA in shoal's state directory: one xDS client
    certificate (every proxy is default/default, so one identity), as
    `shoal bootstrap` writes for a sidecar, and a serving one for the floor."""

    enabled: bool
    client_cert: bytes = b""
    client_key: bytes = b""
    roots: bytes = b""
    server_cert: bytes = b""
    server_key: bytes = b""

    @classmethod
    def from_state(cls, state_dir: Path) -> Tls:
        # The root shoal serve would create on its first start, made first.
        signer, _ = ca.load_or_create(state_dir, TRUST_DOMAIN)
        authority = ca.Authority(signer, trust_domain=TRUST_DOMAIN)
        key = ca.new_key()
        cert = authority.issue(
            key.public_key(),
            uri=authority.spiffe_id("default", "default"),
            ttl=datetime.timedelta(days=1),
            server=False,
        )
        serving = authority.serving(["127.0.0.1", "localhost"])
        return cls(
            True, cert, ca.key_pem(key), authority.trust_bundle, serving.cert_pem, serving.key_pem
        )

    def client(self) -> dict[str, str] | None:
        """For a worker's connect command."""
        if not self.enabled:
            return None
        return {
            "cert": self.client_cert.decode(),
            "key": self.client_key.decode(),
            "roots": self.roots.decode(),
        }

    def write_server(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cert.pem").write_bytes(self.server_cert)
        (folder / "key.pem").write_bytes(self.server_key)
        (folder / "roots.pem").write_bytes(self.roots)
        return folder


@dataclass
class Shoal:
    proc: asyncio.subprocess.Process
    xds_port: int
    events: Path | None
    stderr: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """It and the workers it started (`--serve-workers`)."""
        return [self.pid, *processes.children(self.pid)]

    def cpu_each_s(self) -> list[float]:
        return [processes.cpu_s(p) for p in self.pids()]

    def cpu_s(self) -> float:
        return sum(self.cpu_each_s())

    def rss_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) summed over its processes: the peak is the sum of
        each one's peak, an upper bound of their peak together."""
        each = [processes.rss_kib(p) for p in self.pids()]
        return sum(r for r, _ in each), sum(h for _, h in each)


async def start_shoal(
    registry: Path,
    logs: Path,
    options: ServeOptions,
    *,
    log_level: str = "warning",
    extra_env: dict[str, str] | None = None,
) -> Shoal:
    """`extra_env`: more environment for the server (MALLOC_* settings, or
    FANOUT_* ones for instrumented_serve.py, which then runs it)."""
    xds, admin = processes.free_port(), processes.free_port()
    argv = [
        "--log-level",
        log_level,
        "serve",
        "--registry",
        str(registry),
        "--xds-address",
        f"127.0.0.1:{xds}",
        "--admin-address",
        f"127.0.0.1:{admin}",
        "--state-dir",
        str(logs / "state"),
        # Every simulated proxy is default/default: one identity for the
        # whole fleet, past the default cap on one identity's streams.
        "--max-streams-per-identity",
        "1000000",
    ]
    if options.insecure_xds:
        argv.append("--insecure-xds")
    if options.workers > 1:
        argv += ["--workers", str(options.workers)]
    env: dict[str, str] = dict(extra_env or {})
    events = None
    if options.tracemalloc:
        env["FANOUT_TRACEMALLOC"] = options.tracemalloc
    if options.instrument:
        events = logs / f"events-{registry.name}.json"
        env["FANOUT_EVENTS"] = str(events)
    if options.server_profile:
        env["FANOUT_PROFILE"] = options.server_profile
    python = processes.PYTHON
    instrumented = any(k.startswith("FANOUT_") for k in env)
    cmd = (
        [python, str(INSTRUMENTED_SERVE), *argv]
        if instrumented
        else [python, "-m", "shoal.cli", *argv]
    )
    name = f"shoal-{registry.name}"
    proc, _ = await processes.start_process(cmd, logs, name, "shoal: xDS on", env)
    return Shoal(proc, xds, events, logs / f"{name}.err")


Event = tuple[str, float, float]


def server_events(log: Path) -> list[Event]:
    """(what, started, seconds) as instrumented_serve.py wrote them: gc0,
    gc1, gc2, reload, rebuild, write."""
    if not log.exists():
        return []
    return [(str(w), float(t), float(d)) for w, t, d in json.loads(log.read_text())]
