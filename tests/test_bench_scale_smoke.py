"""The scale benchmark runs (``benchmarks/bench_scale.py --quick --systems zmqsyft,rpc-passive``:
N = 2, two rounds; plain rpc is the same suite in another environment, left out to keep this
short). Not a timed test: it checks the shape of the output and that nothing is left running.
The table with all three systems (ratios against each rpc and the faster one) is checked on
made-up results, without running anything.

Every process the run starts (the suites, the zmqsyft workers, the rpc ranks) inherits a marker
in its environment; afterwards no process may carry it, and any that does is killed (by pid) and
the test fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

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
         "--systems", "zmqsyft,rpc-passive", "--json", str(out_json)],
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

    for text in ("one FedAvg round", "zmqsyft ms/round", "rpc-passive ms/round", "zs/rpc-p",
                 "CPU ms/round zs/rpc-p", "CPU per round by process", "least-squares line",
                 "per-owner transfer", "check: first round's average",
                 "rpc-passive: driver PASSIVE, aggregator PASSIVE, owners PASSIVE"):
        assert text in stdout, (text, stdout)
    assert "rpc ms/round" not in stdout and "zs/best" not in stdout, stdout  # (left out)
    assert "(<= 1e-05: OK)" in stdout, stdout
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == ["2"]]
    assert len(rows) == 3, rows  # time, CPU, CPU by process
    assert "failed" not in rows[0] and {"PASS", "MISS"} & set(rows[0]), rows[0]
    cpu = [float(v) for v in rows[1][1].split("/")]  # CPU ms/round zs/rpc-p
    assert len(cpu) == 2 and all(v > 0 for v in cpu), rows[1]

    report = json.loads(out_json.read_text())
    assert report["args"]["n"] == [2]
    assert report["args"]["systems"] == ["zmqsyft", "rpc-passive"]
    per_n = report["summary"]["per_n"]["2"]
    assert per_n["zmqsyft_s"] > 0 and per_n["rpc_passive_s"] > 0 and per_n["ratio"] > 0
    assert per_n["rpc_s"] is None and per_n["best_rpc"] == "rpc-passive"
    assert per_n["ratio"] == per_n["ratio_vs"]["rpc-passive"]
    assert per_n["cpu_round_s"]["zmqsyft"] > 0 and per_n["cpu_round_s"]["rpc-passive"] > 0
    assert "rpc" not in report["results"]["2"]
    for system in ("zmqsyft", "rpc-passive"):
        res = report["results"]["2"][system]
        assert res["ok"], res
        assert len(res["round_s"]) == 2, res
        assert res["startup_s"] > 0
        assert len(res["uss_owner_mib"]) == 2 and all(u > 0 for u in res["uss_owner_mib"])
        assert res["uss_aggregator_mib"] > 0
        assert res["send_model_s"] and res["move_update_s"] and res["local_step_s"]
        assert res["check_max_diff"] <= 1e-5
        assert res["cpu_round_s"] > 0
        assert res["cpu_round_s"] == pytest.approx(sum(res["cpu_split_s"].values()))
        assert res["cpu_processes"]["owners"] == 2 and res["cpu_processes"]["aggregator"] == 1
    assert report["results"]["2"]["rpc-passive"]["omp_wait_policy"] == {
        "driver": ["PASSIVE"], "aggregator": ["PASSIVE"], "owners": ["PASSIVE"]}


def _bench_scale() -> Any:
    """The benchmark module, imported as its own file (it imports ``bench`` beside it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_scale_under_test",
                                                      ROOT / "benchmarks" / "bench_scale.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_scale_table_three_systems_goal_against_the_faster_rpc() -> None:
    bs = _bench_scale()

    def res(system: str, rounds: list[float], cpu: float) -> dict[str, Any]:
        return {"system": system, "ok": True, "round_s": rounds, "cpu_round_s": cpu,
                "cpu_split_s": {"driver": cpu / 4, "aggregator": cpu / 4, "owners": cpu / 2,
                                "other": 0.0},
                "startup_s": 1.0, "uss_owner_mib": [20.0, 22.0], "uss_aggregator_mib": 15.0,
                "omp_wait_policy": {"driver": ["unset"], "owners": ["PASSIVE"]}, "notes": []}

    results = {2: {"zmqsyft": res("zmqsyft", [0.10, 0.12, 0.11], 0.2),
                   "rpc": res("rpc", [0.40, 0.40], 0.8),
                   "rpc-passive": res("rpc-passive", [0.25, 0.25], 0.5)},
               8: {"zmqsyft": res("zmqsyft", [0.30], 0.6),
                   "rpc": res("rpc", [0.50], 1.0),
                   "rpc-passive": {"system": "rpc-passive", "ok": False, "skipped": True,
                                   "notes": ["skipped: no memory"]}}}
    text, summary = bs.render(results, [2, 8], list(bs.SYSTEMS))
    for head in ("zmqsyft ms/round", "rpc ms/round", "rpc-passive ms/round", "zs/rpc",
                 "zs/rpc-p", "zs/best", "CPU ms/round zs/rpc/rpc-p", "CPU zs/rpc"):
        assert head in text, (head, text)
    n2 = summary["per_n"][2]
    assert n2["best_rpc"] == "rpc-passive"  # the faster variant, not the first
    assert n2["ratio"] == pytest.approx(0.11 / 0.25) and n2["goal"] == "PASS"
    assert n2["ratio_vs"]["rpc"] == pytest.approx(0.11 / 0.40)
    assert n2["cpu_round_s"] == {"zmqsyft": 0.2, "rpc": 0.8, "rpc-passive": 0.5}
    assert n2["cpu_ratio"] == pytest.approx(0.2 / 0.5)
    n8 = summary["per_n"][8]  # one variant skipped: the goal against the other
    assert n8["best_rpc"] == "rpc" and n8["ratio"] == pytest.approx(0.6) and n8["goal"] == "MISS"
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == ["2"]]
    assert rows[0][-4:] == ["0.27", "0.44", "0.44", "PASS"], rows[0]
    assert rows[1][1] == "200.0/800.0/500.0" and rows[1][2] == "0.40", rows[1]
    row8 = next(line for line in text.splitlines() if line.split()[:1] == ["8"])
    assert "skipped (memory)" in row8 and row8.split()[-4:] == ["0.60", "—", "0.60", "MISS"]
