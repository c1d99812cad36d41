"""The pytest plugin (``zmqsyft_pytest``), as another project's suite uses it: each test
here writes a small suite with ``pytester`` and runs it in a pytest subprocess of its own, where
the plugin is loaded through its ``pytest11`` entry point (nothing names it), and the fixtures
spawn real worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(300)

# what the suites below record, for this test to check after their run
_RECORD = '''
import json, os
from pathlib import Path

def record(**what):
    path = Path(os.environ["PLUGIN_SUITE_RECORD"])
    seen = json.loads(path.read_text()) if path.exists() else {}
    seen.update(what)
    path.write_text(json.dumps(seen))
'''


def _gone(pid: int) -> bool:
    """Whether process ``pid`` is gone (or a zombie nobody will run again)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def suite(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pytester directory whose suites can ``record()`` what they saw (a JSON file)."""
    record = tmp_path / "record.json"
    monkeypatch.setenv("PLUGIN_SUITE_RECORD", str(record))
    pytester.makepyfile(recorder=_RECORD)
    return record


def _read(record: Path) -> dict:
    import json

    return json.loads(record.read_text())


def test_a_suite_of_fixtures_runs_with_the_installed_plugin(pytester: pytest.Pytester,
                                                             suite: Path) -> None:
    pytester.makepyfile(test_example='''
        import torch
        from recorder import record

        def test_one_worker(zmqsyft_worker):
            x = torch.tensor([1.0, 2.0, 3.0]).send(zmqsyft_worker)
            assert (x * 2).sum().get().item() == 12.0
            record(worker=zmqsyft_worker.id, worker_pid=zmqsyft_worker._proc.pid)

        def test_named_workers_chain_and_move(zmqsyft_workers):
            bob, alice = zmqsyft_workers("bob", "alice")
            chain = torch.arange(4.0).send(bob).send(alice)
            assert torch.equal((chain + 1).get().get(), torch.arange(4.0) + 1)
            moved = torch.ones(2).send(bob).move(alice)
            assert moved.location is alice and moved.get().sum().item() == 2.0
            record(named=[bob._proc.pid, alice._proc.pid])

        def test_pool_first(zmqsyft_pool):
            bob = zmqsyft_pool("bob")
            assert torch.ones(3).send(bob).sum().get().item() == 3.0
            record(pool_first=bob._proc.pid)

        def test_pool_second(zmqsyft_pool):
            bob, carol = zmqsyft_pool("bob", "carol")
            assert bob._objects == {} and carol._objects == {}
            record(pool_second=bob._proc.pid, carol=carol._proc.pid)
    ''')
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=4)
    seen = _read(suite)
    assert seen["worker"] == "worker"
    assert seen["pool_first"] == seen["pool_second"], "the pool started bob twice"
    assert len({seen["worker_pid"], *seen["named"], seen["pool_first"], seen["carol"]}) == 5
    for pid in (seen["worker_pid"], *seen["named"], seen["pool_first"], seen["carol"]):
        assert _gone(pid), f"worker process {pid} outlived the run"


def test_a_test_that_leaves_objects_on_a_pooled_worker_fails_and_the_next_gets_a_clean_one(
        pytester: pytest.Pytester, suite: Path) -> None:
    pytester.makepyfile(test_leaks='''
        import torch
        from recorder import record

        kept = []

        def test_leaves_an_object(zmqsyft_pool):
            bob = zmqsyft_pool("bob")
            kept.append(torch.ones(5).send(bob))  # still referenced: stays on bob
            record(leaky=bob._proc.pid)

        def test_after_it(zmqsyft_pool):
            bob = zmqsyft_pool("bob")
            assert bob._objects == {}
            record(after=bob._proc.pid)
    ''')
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_leaves_an_object*ERROR*",
                                 "*the test left objects on pooled workers (bob:*"])
    seen = _read(suite)
    assert seen["leaky"] != seen["after"], "the dirty worker was handed to the next test"
    assert _gone(seen["leaky"]) and _gone(seen["after"])


def test_the_leak_check_can_be_turned_off(pytester: pytest.Pytester, suite: Path) -> None:
    pytester.makeini("[pytest]\nzmqsyft_leak_check = false\n")
    pytester.makepyfile(test_leaks='''
        import torch

        kept = []

        def test_leaves_an_object(zmqsyft_pool):
            kept.append(torch.ones(5).send(zmqsyft_pool("bob")))
    ''')
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


@pytest.mark.parametrize("how", ["command line", "ini"])
def test_transport_and_timeout_are_configurable(pytester: pytest.Pytester, suite: Path,
                                                how: str) -> None:
    pytester.makepyfile(test_settings='''
        import zmqsyft as sy
        from recorder import record

        def test_settings(zmqsyft_worker):
            record(address=zmqsyft_worker.address, timeout=sy.get_config().timeout,
                   worker_timeout=zmqsyft_worker.session.cfg.timeout)
    ''')
    if how == "ini":
        pytester.makeini("[pytest]\nzmqsyft_transport = tcp\nzmqsyft_timeout = 7.5\n")
        result = pytester.runpytest_subprocess()
    else:
        result = pytester.runpytest_subprocess("--zmqsyft-transport", "tcp",
                                               "--zmqsyft-timeout", "7.5")
    result.assert_outcomes(passed=1)
    seen = _read(suite)
    assert seen["address"].startswith("tcp://127.0.0.1:"), seen
    assert seen["timeout"] == 7.5, seen


def test_a_bad_setting_is_a_usage_error(pytester: pytest.Pytester, suite: Path) -> None:
    pytester.makeini("[pytest]\nzmqsyft_transport = udp\n")
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*zmqsyft_transport = 'udp'*ipc, tcp*"])


def test_an_interrupted_run_reaps_every_worker_before_pytest_exits(
        pytester: pytest.Pytester, suite: Path) -> None:
    """Ctrl-C in the middle of a test (KeyboardInterrupt): the session ends and the plugin
    reaps the pool's and the test's workers; a conftest hook that runs after the plugin's
    checks that they are gone while pytest still runs (so it was not their parent's death)."""
    pytester.makeconftest('''
        import os
        import pytest
        from recorder import record

        @pytest.hookimpl(trylast=True)
        def pytest_unconfigure(config):
            import json
            seen = json.loads(open(os.environ["PLUGIN_SUITE_RECORD"]).read())
            alive = []
            for pid in seen.get("pids", []):
                try:
                    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
                except FileNotFoundError:
                    continue
                if state != "Z":
                    alive.append(pid)
            record(alive_at_unconfigure=alive)
    ''')
    pytester.makepyfile(test_interrupted='''
        import torch
        from recorder import record

        def test_interrupted(zmqsyft_pool, zmqsyft_workers):
            bob = zmqsyft_pool("bob")
            alice = zmqsyft_workers("alice")
            torch.ones(3).send(bob), torch.ones(3).send(alice)
            record(pids=[bob._proc.pid, alice._proc.pid])
            raise KeyboardInterrupt

        def test_never_runs():
            pass
    ''')
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    seen = _read(suite)
    assert len(seen["pids"]) == 2
    assert seen["alive_at_unconfigure"] == [], "workers still ran when pytest was ending"


def test_the_plugin_does_not_import_torch_unless_a_fixture_is_used(
        pytester: pytest.Pytester, suite: Path) -> None:
    pytester.makepyfile(test_plain='''
        import sys

        def test_plain():
            assert "torch" not in sys.modules and "zmqsyft" not in sys.modules
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert os.environ.get("PLUGIN_SUITE_RECORD")


def test_the_readme_example_suite_passes(pytester: pytest.Pytester, suite: Path) -> None:
    """The complete example in README.md's "Testing your own code with pytest", verbatim."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("A complete example, `test_federated.py`")
    code_at = readme.index("```python\n", start) + len("```python\n")
    pytester.makepyfile(test_federated=readme[code_at:readme.index("```", code_at)])
    pytester.runpytest_subprocess("--zmqsyft-transport", "tcp").assert_outcomes(passed=3)
