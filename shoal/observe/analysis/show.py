"""Problems as `shoal analyze` prints them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shoal import terminal
from shoal.model import problems


def text(found: Sequence[Mapping[str, str]], where: str) -> str:
    """One problem per paragraph, like `istioctl analyze`:

    Error [SHL0101] Service shop/web (metadata.annotations[shoal.io/split]) in web.yaml#0
      backend Service shop/web-v3 does not exist
      fix: Create the Service, or name an existing one in the route.
    """
    lines: list[str] = []
    for p in found:
        field = f" ({p['field']})" if p.get("field") else ""
        source = f" in {p['source']}" if p.get("source") else ""
        head = f"{p['severity']} [{p['code']}] {p['object']}{field}{source}"
        lines.append(terminal.printable(head, 2000))
        lines.append("  " + terminal.printable(p["reason"], 2000))
        lines.append("  fix: " + terminal.printable(p["fix"], 2000))
    errors = sum(1 for p in found if p["severity"] == "Error")
    if found:
        lines.append(
            f"{len(found)} problem(s) in {where}: {errors} error(s), "
            f"{len(found) - errors} warning(s)"
        )
    else:
        lines.append(f"no problems in {where}")
    return "\n".join(lines)


def has_errors(found: Sequence[Mapping[str, str]]) -> bool:
    return any(p["severity"] == "Error" for p in found)


def catalogue_markdown() -> str:
    """The README's table of codes, from the catalogue itself."""
    rows = ["| Code | Name | Severity | What it means | Fix |", "|---|---|---|---|---|"]
    for c in problems.CODES:
        cells = [f"`{c.id}`", c.name, c.severity.label, c.meaning, c.fix]
        rows.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(rows)
