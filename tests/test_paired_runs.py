"""scripts/paired_runs.py on the recorded DP runs (results/dp-arc): the table docs/results.md quotes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_paired_table_of_the_dp_runs_is_the_one_docs_results_quotes() -> None:
    runs = [str(ROOT / "results" / "dp-arc" / f"dp-arc-{name}") for name in ("inf", "eps8", "eps1")]
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "paired_runs.py"), *runs],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert table[2].startswith("| dp-arc-inf | ∞ (off) | 54.3 % | — | — | +3.3 | 0.021 |")
    assert table[3].startswith("| dp-arc-eps8 | 8.00 | 31.0 % | -23.3 [-30.3, -16.3] |")
    assert table[4].startswith("| dp-arc-eps1 | 1.00 | 27.0 % | -27.3 [-34.3, -20.3] |")
