"""The README's Reliability table, produced by the tests that prove each line.

A hardening test calls `record(...)` after its assertions have passed, so a row exists only
for what was actually tried and held. At the end of the session conftest writes the rows to
tests/output/reliability.{json,md}; `make reliability` runs the suite and copies the table
into README.md between its markers."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "tests" / "output"
README = ROOT / "README.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"
AREAS = ("fuzzing", "hostile images", "overload", "faults", "access control", "deployment")


@dataclass(frozen=True)
class Row:
    area: str  # one of AREAS
    tried: str  # what was thrown at the service
    count: int  # how many cases, requests or faults
    result: str  # what the test saw, in words
    test: str  # the test that measured it


_rows: list[Row] = []


def record(area: str, tried: str, count: int, result: str, test: str) -> None:
    if area not in AREAS:
        raise ValueError(f"unknown reliability area {area!r}; use one of {AREAS}")
    _rows.append(Row(area, tried, int(count), result, test))


def _in_table_order(items: list[Row]) -> list[Row]:
    return sorted(items, key=lambda r: (AREAS.index(r.area), r.test, r.tried))


def table(items: list[Row]) -> str:
    lines = ["| area | what was tried | count | result | test |", "|---|---|---:|---|---|"]
    for r in items:
        lines.append(f"| {r.area} | {r.tried} | {r.count:,} | {r.result} | `{r.test}` |")
    return "\n".join(lines) + "\n"


LONG_RUN = "(make fuzz)"  # the suffix of rows from the long fuzzing run, a session of its own


def long_run(variable: str) -> str:
    """The suffix that keeps the long run's rows beside CI's: `make fuzz` sets `variable`."""
    return f" {LONG_RUN}" if os.environ.get(variable) else ""


def write_outputs() -> None:
    """Called once at the end of a pytest session (conftest) when any row was recorded.

    A session's rows replace the previous ones, except the rows of `make fuzz`, kept until a
    newer long run replaces them (it runs too long for every session, and the README shows
    its figures beside the CI run's); and a `make fuzz` session replaces only its own."""
    if not _rows:
        return
    items = list(_rows)
    previous = OUTPUT / "reliability.json"
    if previous.is_file():
        recorded = {r.test for r in items}
        long_session = any(r.test.endswith(LONG_RUN) for r in items)
        kept = [Row(**r) for r in json.loads(previous.read_text())]
        items += [r for r in kept if r.test not in recorded and (long_session or r.test.endswith(LONG_RUN))]
    items = _in_table_order(items)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "reliability.json").write_text(json.dumps([asdict(r) for r in items], indent=1) + "\n")
    (OUTPUT / "reliability.md").write_text(table(items))


def update_readme() -> None:
    """Replaces the README's table with tests/output/reliability.md (make reliability)."""
    produced = (OUTPUT / "reliability.md").read_text()
    text = README.read_text()
    head, found_start, rest = text.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found_start and found_end):
        raise SystemExit(f"README.md has no {START} ... {END} markers to replace")
    README.write_text(f"{head}{START}\n{produced}{END}{tail}")
    print(f"README.md: reliability table updated ({len(produced.splitlines()) - 2} rows)")


if __name__ == "__main__":
    update_readme()
