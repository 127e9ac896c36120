"""Every benchmark under bench/ runs to its end on a small mesh and prints
figures that hold together. Not a measurement (BENCHMARKS.md holds those):
a benchmark that no longer starts, or whose own checks no longer fit the
code, is found here rather than by the next person who needs its figures."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each run is seconds here; the bound is for a loaded 2-core machine.
RUN_TIMEOUT_S = 200.0


@dataclass(frozen=True)
class Bench:
    script: str
    args: tuple[str, ...]
    check: Callable[[Any], None]


def _json_of(stdout: str) -> Any:
    """The JSON document a script prints; some print progress lines first."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("{", "[")):
            return json.loads("\n".join(lines[i:]))
    raise AssertionError(f"no JSON in the output:\n{stdout[-2000:]}")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _connect(rows: Any) -> None:
    seen = {(r["server"], r["mode"]) for r in rows}
    assert seen == {(s, m) for s in ("shoal", "floor") for m in ("sotw", "delta")}
    for r in rows:
        assert _positive(r["raw_cpu_ms_median"]) and _positive(r["config_bytes"]), r


def _fanout(d: Any) -> None:
    assert d["complete"] and not d["errors"], d
    for key in ("push_p99_ms", "floor_push_p99_ms", "reconnect_all_s", "floor_reconnect_all_s"):
        assert _positive(d[key]), (key, d[key])
    assert _positive(d["rss_per_stream_kb"]), d


def _ok(d: Any) -> None:
    assert d["ok"] is True, d


def _ingest(d: Any) -> None:
    assert d["checked"] is True
    assert d["routes"] == 10 and len(d["route"]) == 1, d
    changes = d["annotation"] + d["endpoint"] + d["route"]
    assert all(_positive(c["store_cpu"]) for c in changes), d


def _certs(d: Any) -> None:
    assert d["rotation_renewed"] == d["count"] == 10, d


def _kube_list(d: Any) -> None:
    assert d["state_services"] == 100 and d["state_endpoints"] == 1000, d


def _analyze(rows: Any) -> None:
    assert [r["problems"] for r in rows] == [0], rows


def _collector(d: Any) -> None:
    assert _positive(d["in_process"]["sent_spans"]), d
    assert d["https"]["accepted_spans"] == d["https"]["sent_spans"] > 0, d["https"]


def _webhook(d: Any) -> None:
    assert d["failures"] == 0 and d["requests"] > 0, d
    assert _positive(d["agent_ready_median_s"]), d


def _dashboard(d: Any) -> None:
    shown = {v["view"]: v["elements"] for v in d["views"]}
    # 20 Services, 2 of them with a sidecar.
    assert shown == {"graph": 20, "services": 20, "proxies": 2}, shown


def _telemetry(d: Any) -> None:
    assert [r["errors"] for r in d["rows"]] == [0] * 4, d["rows"]
    assert all(_positive(r["p50_ms"]) for r in d["rows"]), d["rows"]


def _converge(d: Any) -> None:
    assert {m["mode"] for m in d["modes"]} == {"delta", "sotw"}
    for m in d["modes"]:
        assert m["non_200"] == 0 and _positive(m["converged_ms"]["median"]), m


def _eds_order(rows: Any) -> None:
    assert [r["mode"] for r in rows] == ["sotw", "delta"]
    for r in rows:
        assert r["proxies"] == 2 and r["requests"] >= 2 and r["same_set"], r


def _abuse(d: Any) -> None:
    for scenario in ("one identity", "one identity, new names", "an identity per stream"):
        assert _positive(d[scenario]["healthy_push_ms"]), d[scenario]


def _fuzz(d: Any) -> None:
    assert d["targets"]["sotw"]["examples"] > 0, d
    assert not d["targets"]["sotw"]["failures"], d


BENCHES = [
    Bench(
        "connect.py",
        (
            *("--services", "100", "--connects", "1", "--warmup", "1"),
            *("--settle", "0.05", "--idle-window", "0.2", "--json"),
        ),
        _connect,
    ),
    Bench(
        "fanout.py",
        ("--proxies", "20", "--services", "20", "--mode", "delta", "--pushes", "1", "--json"),
        _fanout,
    ),
    Bench(
        "ingest.py",
        (
            *("--services", "100", "--proxies", "5", "--changes", "1"),
            *("--routes", "10", "--check", "--json"),
        ),
        _ingest,
    ),
    Bench("translate.py", ("--sizes", "100", "--proxies", "3", "--json"), _ok),
    Bench("gateway.py", ("--sizes", "100", "--proxies", "3", "--json"), _ok),
    Bench("certs.py", ("--count", "10", "--json"), _certs),
    Bench("kube_list.py", ("--services", "100", "--changes", "1", "--json"), _kube_list),
    Bench("analyze.py", ("--sizes", "100", "--proxies", "5", "--json"), _analyze),
    Bench("collector.py", ("--traces", "100", "--json"), _collector),
    Bench(
        "webhook.py", ("--rate", "20", "--seconds", "1", "--agent-starts", "1", "--json"), _webhook
    ),
    Bench("dashboard.py", ("--services", "20", "--loads", "1", "--json"), _dashboard),
    Bench(
        "telemetry.py",
        ("--requests", "50", "--warmup", "10", "--rounds", "1", "--json"),
        _telemetry,
    ),
    Bench("converge.py", ("--callers", "2", "--reps", "1", "--json"), _converge),
    Bench("eds_order.py", ("--services", "70", "--proxies", "2", "--json"), _eds_order),
    Bench("abuse.py", ("--streams", "2", "--megabytes", "0.2", "--after-close", "0.1"), _abuse),
    Bench("fuzz.py", ("--minutes", "0.005", "--targets", "sotw", "--json"), _fuzz),
]


def test_every_benchmark_is_here() -> None:
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")} - {"localmesh.py"}
    # bench/fanout.py is the command of the bench/fanout package.
    assert scripts == {b.script for b in BENCHES}


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
@pytest.mark.parametrize("bench", BENCHES, ids=[b.script for b in BENCHES])
def test_benchmark_runs(bench: Bench) -> None:
    # Its own session, so that whatever it started (servers, Envoys, a
    # browser) goes with it if it hangs or the test fails.
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / bench.script), *bench.args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        # Also after a clean exit: nothing it started may outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.communicate()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stderr[-3000:]}"
    bench.check(_json_of(stdout))
