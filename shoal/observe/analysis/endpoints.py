"""Analyzers: endpoints."""

from __future__ import annotations

from collections.abc import Iterator

from shoal.model import problems
from shoal.observe.analysis import facts


def analyze(found: facts.Facts) -> Iterator[problems.Problem]:
    return iter(())
