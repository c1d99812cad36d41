"""The benchmark runs (quick smoke mode: every workload once, tiny sizes). Not a timed test."""

from __future__ import annotations

import pytest

from tests.helpers import run_script


@pytest.mark.timeout(320)  # (a loaded machine starts workers slowly; nothing here is timed)
def test_benchmark_quick_mode_runs() -> None:
    result = run_script("benchmarks/bench.py", "--quick", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in ("W2 add", "W4 send", "W5 move", "W6 add via chain", "W7", "start-up"):
        assert row in result.stdout, row
    assert "ratio" in result.stdout
