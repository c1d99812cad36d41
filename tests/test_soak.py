"""The soak test, short: ``benchmarks/soak.py`` for a few seconds with a kill every few.

Random ops, pointer chains, moves and SIGKILLed workers (restarted at the same address) from two
client processes at once, every ``.get()`` checked against a local shadow; at the end no wrong
value, no call over 10 s, and nothing left: no object, shared-memory segment, temporary
directory or child process. The long version is the same script:
``python benchmarks/soak.py --seconds 300 --kill-every 60``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_a_short_soak_with_kills_leaves_no_wrong_value_and_nothing_behind() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--seconds", "15", "--seed", "7",
         "--workers", "3", "--clients", "2", "--kill-every", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    out = proc.stdout
    assert proc.returncode == 0, f"soak failed:\n{out}\n{proc.stderr[-4000:]}"
    for line in ("objects left: none", "segments left: none", "temp files left: none",
                 "child processes left: none", "soak: PASS"):
        assert line in out, f"{line!r} missing from the soak's summary:\n{out}"
    checked = int(out.split("values checked: ")[1].split()[0])
    assert checked > 0, out
    kills = int(out.split("kills: ")[1].split()[0])
    assert kills >= 1, out
