"""What a run prints: a table row per proxy count as it finishes, or JSON
rows at the end (the keys are Result's fields, and other scripts and
BENCHMARKS.md rely on them)."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shoal.xds import node

from . import figures


def _f(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


COLUMNS = (
    ("proxies", 7),
    ("connect s", 9),
    ("push p50 ms", 11),
    ("push p99 ms", 11),
    ("p99-debounce", 12),
    ("first ms", 8),
    ("spread p99", 10),
    ("floor p99", 9),
    ("push cpu s", 10),
    ("rss MiB", 7),
    ("KiB/stream", 10),
    ("reconnect s", 11),
    ("floor reconn", 12),
)


def print_row(r: figures.Result, header: bool) -> None:
    if header:
        print(
            f"mode {r.mode}, xDS {r.xds_security}, {r.services} services, "
            f"{r.workers} client worker(s), shoal serve --workers {r.serve_workers}"
        )
        print(" ".join(f"{name:>{width}}" for name, width in COLUMNS))
    cells = (
        str(r.proxies),
        _f(r.connect_all_s, 2),
        _f(r.push_p50_ms),
        _f(r.push_p99_ms),
        _f(r.push_p99_ms_excl_debounce),
        _f(r.push_first_ms),
        _f(r.push_spread_p99_ms),
        _f(r.floor_push_p99_ms),
        _f(r.push_cpu_s, 2),
        _f(r.rss_mb),
        _f(r.rss_per_stream_kb),
        _f(r.reconnect_all_s, 2),
        _f(r.floor_reconnect_all_s, 2),
    )
    print(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)), flush=True)
    for e in r.errors:
        print(f"  problem: {e}")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def json_rows(results: Sequence[figures.Result]) -> Any:
    """One object for one proxy count, a list for several."""
    rows = [
        {
            **_rounded(asdict(r)),
            "python": platform.python_version(),
            "shoal": str(Path(node.__file__).resolve().parent.parent),
            "debounce_quiet_ms": figures.DEBOUNCE_QUIET_MS,
        }
        for r in results
    ]
    return rows[0] if len(rows) == 1 else rows
