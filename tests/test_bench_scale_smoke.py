"""The scale benchmark runs (``benchmarks/bench_scale.py --quick``: N = 2, two rounds). Not a
timed test: it checks the shape of the output and that nothing is left running.

Every process the run starts (the suites, the zmqsyft workers, the rpc ranks) inherits a marker
in its environment; afterwards no process may carry it, and any that does is killed (by pid) and
the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "BENCH_SCALE_SMOKE_RUN"  # (not ZMQSYFT_*: zmqsyft refuses unknown ones)


def _marked(token: str) -> list[int]:
    """Pids of the processes whose environment carries ``MARKER=token``."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
    return found


def _left_over(token: str, grace: float = 10.0) -> list[int]:
    """What still carries the marker after ``grace`` seconds (workers exit with their parent,
    asynchronously); each is killed before returning."""
    procs = []
    for pid in _marked(token):
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=grace)  # (not our children: psutil watches them)
    left = [p.pid for p in alive]
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.timeout(420)  # (a loaded machine starts workers and rpc ranks slowly)
def test_scale_benchmark_quick_mode_runs(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    out_json = tmp_path / "scale.json"
    env = dict(os.environ, **{MARKER: token})
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick",
         "--json", str(out_json)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=380)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            proc.communicate()
    left = _left_over(token)
    assert not left, f"processes left running after the benchmark (killed now): {left}"
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    for text in ("one FedAvg round", "zmqsyft ms/round", "rpc ms/round", "ratio",
                 "least-squares line", "per-owner transfer", "check: first round's average"):
        assert text in stdout, (text, stdout)
    assert "(<= 1e-05: OK)" in stdout, stdout
    row = next(line for line in stdout.splitlines() if line.split()[:1] == ["2"])
    assert "failed" not in row and {"PASS", "MISS"} & set(row.split()), row

    report = json.loads(out_json.read_text())
    assert report["args"]["n"] == [2]
    per_n = report["summary"]["per_n"]["2"]
    assert per_n["zmqsyft_s"] > 0 and per_n["rpc_s"] > 0 and per_n["ratio"] > 0
    for system in ("zmqsyft", "rpc"):
        res = report["results"]["2"][system]
        assert res["ok"], res
        assert len(res["round_s"]) == 2, res
        assert res["startup_s"] > 0
        assert len(res["uss_owner_mib"]) == 2 and all(u > 0 for u in res["uss_owner_mib"])
        assert res["uss_aggregator_mib"] > 0
        assert res["send_model_s"] and res["move_update_s"] and res["local_step_s"]
        assert res["check_max_diff"] <= 1e-5
