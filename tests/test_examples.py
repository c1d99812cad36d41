"""The examples run as they stand and print what the tutorial shows."""

from __future__ import annotations

import re

from tests.helpers import run_script


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


def _ratio(out: str) -> float:
    match = re.search(r"test MSE federated ([\d.]+)\s+central ([\d.]+)\s+ratio ([\d.]+)", out)
    assert match, out
    return float(match.group(3))


def test_example_02_federated_learning(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_script("examples/02_federated_learning.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rounds = re.findall(r"round +\d+ +loss bob ([\d.]+) +alice ([\d.]+)", result.stdout)
    assert len(rounds) == 40
    assert float(rounds[-1][0]) < float(rounds[0][0])  # it learns
    assert _ratio(result.stdout) <= 1.10
    assert (tmp_path / "02_federated_learning.png").read_bytes()[:4] == b"\x89PNG"


def test_example_03_trusted_aggregator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_script("examples/03_trusted_aggregator.py", "--rounds", "8", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"round +\d+ +bob loss [\d.]+ +alice loss [\d.]+", result.stdout)) == 8
    assert _ratio(result.stdout) <= 1.10
    for owner in ("bob", "alice"):
        largest = int(re.search(rf"{owner} sent this program \d+ bytes in all, its largest message "
                                r"(\d+) bytes", result.stdout).group(1))
        # never data: acknowledgements, losses and the HELLO reply (~300 bytes: keys, names,
        # the bulk endpoint)
        assert largest < 400
    # the data owners' workers refuse the model owner their model and their data
    assert "NOT REFUSED" not in result.stdout
    for attempt in ("bobs_model.get()", "bobs_data.get()", "(bobs_data + 0).get()"):
        assert f"{attempt} refused" in result.stdout
    assert (tmp_path / "03_trusted_aggregator.png").read_bytes()[:4] == b"\x89PNG"


def test_example_04_secure_aggregation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_script("examples/04_secure_aggregation.py", "--rounds", "3", "--out", str(tmp_path),
                        timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert len(re.findall(r"round +\d+ +bob loss [\d.]+ +alice loss [\d.]+", out)) == 3
    # the same model as plaintext federated averaging, within fixed-point tolerance
    diff = float(re.search(r"difference ([\d.]+)", out).group(1))
    assert diff < 1e-3, out
    assert "NOT REFUSED" not in out
    for what in ("bob's update alone, reconstructed", "bob's trained model",
                 "alice's share of a new sharing of bob's update"):
        assert f"{what}: refused by worker" in out
    # each owner's worker sent others only fresh shares of its data, never anything whole
    for owner in ("bob", "alice"):
        sent = re.search(rf"{owner} sent other workers (\d+) fresh shares of its data and (\d+) "
                         "objects derived from it whole", out)
        assert sent and int(sent.group(1)) >= 6 and int(sent.group(2)) == 0, out
    assert (tmp_path / "04_secure_aggregation.png").read_bytes()[:4] == b"\x89PNG"


def test_example_05_federated_dataset() -> None:
    result = run_script("examples/05_federated_dataset.py", "--epochs", "3", timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "bob: 719 samples" in out and "alice: 718 samples" in out
    losses = [float(x) for x in re.findall(r"epoch \d+  mean loss ([\d.]+)", out)]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], out
    # batches come worker by worker: bob's, then alice's
    assert re.search(r"Train Epoch: 1 \[0/\d+ .*\] on bob", out)
    assert re.search(r"Train Epoch: 1 \[16/\d+ .*\] on alice", out)
    accuracy = float(re.search(r"Test set: accuracy \d+/\d+ \(([\d.]+)%\)", out).group(1))
    assert accuracy > 70.0, out


def test_example_07_plans() -> None:
    result = run_script("examples/07_plans.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"In \[1\].*\nTrue\n", out)
    assert re.search(r"In \[3\].*\n.*\ntensor\(\[2\., 4\.\]\)", out)
    assert re.search(r"ops reached device_1 in 1 message", out)
    assert re.search(r"In \[6\].*\ntensor\(\[-?\d", out)
    assert re.search(r"In \[7\].*\ntensor\(\[2\.\]\)", out)
