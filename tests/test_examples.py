"""The examples run as they stand and print what the tutorial shows."""

from __future__ import annotations

import re

from .conftest import run_script


def test_example_01_pointer_chains() -> None:
    result = run_script("examples/01_pointer_chains.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    ptr = r"\(Wrapper\)>\[PointerTensor \| {owner}:\d+ -> {loc}:\d+\]"
    assert re.search(r"In \[4\].*\n" + ptr.format(owner="me", loc="bob"), out)
    assert re.search(r"In \[5\].*\n" + ptr.format(owner="me", loc="alice"), out)
    assert re.search(r"In \[6\].*\n\{\d+: tensor\(\[1, 2, 3, 4\]\)\}", out)
    assert re.search(r"In \[7\].*\n\{\d+: " + ptr.format(owner="alice", loc="bob") + r"\}", out)
    assert re.search(r"In \[10\].*\n\{\}\n", out) and re.search(r"In \[11\].*\n\{\}\n", out)
    assert re.search(r"In \[13\].*\n\{\d+: tensor\(\[1, 2, 3, 4, 5\]\), \d+: tensor\(\[ 2,  4,  6,  8, 10\]\)\}", out)
    assert re.search(r"In \[15\].*\ntensor\(\[ 2,  4,  6,  8, 10\]\)", out)
    assert re.search(r"In \[18\].*\ntensor\(\[1, 2, 3, 4, 5\]\)", out)
    assert re.search(r"In \[24\].*\n  bob: \{\}\nalice: \{\d+: tensor\(\[1, 2, 3, 4, 5\]\)\}", out)
    assert re.search(r"In \[25\].*\n" + ptr.format(owner="me", loc="alice"), out)
