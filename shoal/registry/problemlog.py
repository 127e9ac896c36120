"""The registry's problems in the log as they come and go.

A build reports every problem the mesh has, and a large mesh builds on
every endpoint change: logging them all on each build would repeat one
stale annotation thousands of times an hour and bury what is new. Each is
logged when it first appears and once more when it clears; the whole list
stays on the admin API, `shoal analyze` and the Kubernetes Events."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from shoal.model import problems


class ProblemLog:
    def __init__(self, log: logging.Logger, label: str) -> None:
        self._log = log
        self._label = label
        self._shown: frozenset[problems.Problem] = frozenset()

    def update(self, found: Iterable[problems.Problem]) -> None:
        """Log what `found` has that the last build's problems had not, and
        what they had that it has not."""
        now = frozenset(found)
        for problem in sorted(now - self._shown):
            self._log.warning("%s: %s", self._label, problem)
        for problem in sorted(self._shown - now):
            self._log.info("%s, cleared: %s", self._label, problem)
        self._shown = now
