"""Problems found in user input, reported with the object and the reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """`source` says where (file and document, or API object); `subject` names
    the object (`Service default/web`); `reason` says what is wrong."""

    source: str
    subject: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.subject}: {self.reason}"
