"""What the benchmarks share for their PNG plots: matplotlib without a display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, name: str) -> Path:
    """Write ``fig`` to bench/results/<name> and say where."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to bench/results/{name}")
    return path
