"""The fault suite's table: one row per fault, printed at the end and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.rig import FAULT_COLUMNS, fault_cells

ROWS: list[dict[str, Any]] = []
OUT = Path(__file__).resolve().parents[2] / ".local" / "faults.json"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    header = FAULT_COLUMNS
    lines = [header] + [fault_cells(r) for r in ROWS]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    terminalreporter.write_sep("=", "fault suite")
    for n, line in enumerate(lines):
        terminalreporter.write_line(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
        )
        if n == 0:
            terminalreporter.write_line("  ".join("-" * w for w in widths))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(ROWS, indent=2))


@pytest.fixture
def table() -> list[dict[str, Any]]:
    return ROWS
