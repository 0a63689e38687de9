"""Where the benchmarks' tables and plots go, and matplotlib without a display.

They are written into the documentation (``docs/bench/``), committed: the pages of the site show the figures of
the last recorded run, and a benchmark run again rewrites them for the next commit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: the tables (Markdown) and plots (PNG) of the benchmarks, part of the documentation site
RESULTS = REPO / "docs" / "bench"


def shown(path: Path) -> str:
    """``path`` as the benchmarks print it: relative to the checkout."""
    return str(path.relative_to(REPO))


def conditions() -> str:
    """When and on what a table was measured: figures from a busy machine must say so."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"- measured {day} on {os.cpu_count()} CPUs; load average (1, 5, 15 min) {load} when written"


def write_table(name: str, text: str) -> Path:
    """Write a benchmark's Markdown table to docs/bench/<name>, with the date and the machine's load, and say
    where."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text.rstrip("\n") + "\n\n" + conditions() + "\n")
    print(f"table written to {shown(path)}")
    return path


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, name: str) -> Path:
    """Write ``fig`` to docs/bench/<name> and say where."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {shown(path)}")
    return path
