"""The benchmark runs (quick smoke mode: every workload once, tiny sizes). Not a timed test."""

from __future__ import annotations

import re

import pytest

from tests.helpers import run_script


@pytest.mark.timeout(320)  # (a loaded machine starts workers slowly; nothing here is timed)
def test_benchmark_quick_mode_runs() -> None:
    result = run_script("benchmarks/bench.py", "--quick", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for row in ("W2 add", "W4 send", "W5 move", "W6 add via chain", "W7", "start-up"):
        assert row in out, row
    assert "ratio" in out
    # zmqsyft's rows of its own: secure vs plaintext aggregation, a plan's training step vs
    # the same step op by op; each with a figure, their ratios, and their checks passed
    for row in ("secure aggregation round, 2 x 10k f32", "plaintext round, trusted aggregator",
                "train step on bob, plan", "the same ops one by one on pointers, pipelined",
                "the same ops one by one, blocking", "model.send, forward, backward, SGD step"):
        assert re.search(re.escape(row) + r".*\s\d+(\.\d+)? ms", out), row
    for ratio in ("secure / plaintext aggregation round",
                  "train step: plan / the same ops one by one, pipelined",
                  "train step: plan / the same ops one by one, blocking",
                  "train step: plan / autograd step"):
        assert re.search(re.escape(ratio) + r".*\s\d+\.\d\d$", out, re.M), ratio
    checks = re.findall(r"^  \[zmqsyft\] (train step|secure aggregation): .*\((.*)\)$", out, re.M)
    assert len(checks) == 5 and all(c[1].endswith(": OK") for c in checks), checks
