"""The catalogue of problem codes: documented as it is, produced, and shown
end to end.

The README's table is the catalogue rendered; `UPDATE_GOLDEN=1` rewrites it
(between its markers) as it rewrites the golden files."""

from __future__ import annotations

import os
import re
from pathlib import Path

from shoal.model import problems
from shoal.observe.analysis import show

ROOT = Path(__file__).resolve().parents[3]
BEGIN, END = "<!-- problem codes: begin -->", "<!-- problem codes: end -->"


def test_codes_are_unique_well_formed_and_complete() -> None:
    ids = [c.id for c in problems.CODES]
    assert len(ids) == len(set(ids)) and len({c.name for c in problems.CODES}) == len(ids)
    assert all(re.fullmatch(r"SHL\d{4}", i) for i in ids)
    assert all(c.meaning.endswith(".") and c.fix.endswith(".") for c in problems.CODES)
    assert len(ids) >= 20


def test_the_readme_table_is_the_catalogue() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    table = f"{BEGIN}\n{show.catalogue_markdown()}\n{END}"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S)
        readme.write_text(text)
    assert table in text


def test_every_code_is_produced_by_shoal_and_diagnosed_end_to_end() -> None:
    """A code nothing emits is a promise the catalogue does not keep; one no
    end-to-end test diagnoses is one nobody saw work."""
    sources = "\n".join(
        p.read_text() for p in (ROOT / "shoal").rglob("*.py") if p.name != "problems.py"
    )
    e2e = "\n".join(p.read_text() for p in (ROOT / "tests" / "e2e").glob("*.py"))
    for code in problems.CODES:
        assert f'"{code.id}"' in sources, f"{code.id} is produced nowhere in shoal/"
        assert f'"{code.id}"' in e2e, f"{code.id} has no end-to-end test in tests/e2e/"
