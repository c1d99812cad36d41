"""Configuration: defaults, ``ZMQSYFT_*`` environment overrides, ``configure()``.

Environments are passed as dicts to ``from_environ`` so the real one is never touched; tests that
call ``configure()`` restore the process-wide config afterwards.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import zmqsyft as sy
from tests.helpers import run_script
from zmqsyft import WorkerClient
from zmqsyft.config import Config, configure, from_environ, get_config, parse_int
from zmqsyft.wire.messages import Summary

DEFAULTS = {
    "timeout": 60.0,
    "spawn_timeout": 60.0,
    "pipeline": True,
    "max_inflight": 10_000,
    "pipeline_batch": 32,
    "gc_interval": 0.05,
    "max_message_size": 4 << 30,
    "max_frames": 65536,
    "max_store_bytes": 0,
    "max_connection_bytes": 0,
    "max_op_flops": 10**12,
    "max_connections": 1024,
    "max_peer_links": 256,
    "heartbeat_ivl": 1.0,
    "snapshot_max_elements": 1000,
    "close_timeout": 5.0,
    "shm_threshold": 1 << 20,
    "malloc_keep": 64 << 20,
    "sealed_threshold": 1 << 20,
    "lease": 60.0,
    "insecure": False,
    "any_peer": False,
    "forkserver": True,
}


def test_defaults() -> None:
    cfg = Config()
    assert dataclasses.asdict(cfg) == DEFAULTS
    assert {f.name for f in dataclasses.fields(Config)} == set(DEFAULTS)


def test_defaults_match_the_readme_table() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented: dict[str, object] = {}
    for field_name, raw in re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", readme, flags=re.M):
        if field_name not in DEFAULTS:
            continue
        raw = raw.strip()
        kind = type(DEFAULTS[field_name])
        documented[field_name] = (raw == "true") if kind is bool else kind(raw)
    assert documented == dataclasses.asdict(Config())


def test_empty_environment_gives_defaults() -> None:
    assert from_environ({}) == Config()


def test_unrelated_variables_are_ignored() -> None:
    env = {"PATH": "/bin", "HOME": "/root", "ZMQSYFTX": "1", "XZMQSYFT_TIMEOUT": "abc",
           "zmqsyft_timeout": "abc", "ZMQSYFT_LOG": "debug"}
    assert from_environ(env) == Config()


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().timeout = 3.0  # type: ignore[misc]


@pytest.mark.parametrize("var, raw, field, value", [
    ("ZMQSYFT_TIMEOUT", "2.5", "timeout", 2.5),
    ("ZMQSYFT_TIMEOUT", "30", "timeout", 30.0),
    ("ZMQSYFT_TIMEOUT", " 1e-3 ", "timeout", 0.001),
    ("ZMQSYFT_SPAWN_TIMEOUT", "120", "spawn_timeout", 120.0),
    ("ZMQSYFT_GC_INTERVAL", "0.5", "gc_interval", 0.5),
    ("ZMQSYFT_HEARTBEAT_IVL", "3", "heartbeat_ivl", 3.0),
    ("ZMQSYFT_CLOSE_TIMEOUT", "0.25", "close_timeout", 0.25),
    ("ZMQSYFT_SHM_THRESHOLD", "0", "shm_threshold", 0),
    ("ZMQSYFT_MALLOC_KEEP", "128MiB", "malloc_keep", 128 << 20),
    ("ZMQSYFT_SEALED_THRESHOLD", "4MiB", "sealed_threshold", 4 << 20),
    ("ZMQSYFT_MAX_INFLIGHT", "7", "max_inflight", 7),
    ("ZMQSYFT_MAX_INFLIGHT", " 12 ", "max_inflight", 12),
    ("ZMQSYFT_PIPELINE_BATCH", "1", "pipeline_batch", 1),
    ("ZMQSYFT_MAX_MESSAGE_SIZE", "1048576", "max_message_size", 1_048_576),
    ("ZMQSYFT_MAX_MESSAGE_SIZE", "-1", "max_message_size", -1),
    ("ZMQSYFT_SNAPSHOT_MAX_ELEMENTS", "0", "snapshot_max_elements", 0),
    ("ZMQSYFT_PIPELINE", "0", "pipeline", False),
    ("ZMQSYFT_PIPELINE", "1", "pipeline", True),
    ("ZMQSYFT_PIPELINE", "false", "pipeline", False),
    ("ZMQSYFT_PIPELINE", "TRUE", "pipeline", True),
    ("ZMQSYFT_PIPELINE", "no", "pipeline", False),
    ("ZMQSYFT_PIPELINE", "Yes", "pipeline", True),
    ("ZMQSYFT_PIPELINE", "off", "pipeline", False),
    ("ZMQSYFT_PIPELINE", " on ", "pipeline", True),
])
def test_environment_overrides(var: str, raw: str, field: str, value: object) -> None:
    cfg = from_environ({var: raw})
    got = getattr(cfg, field)
    assert got == value and type(got) is type(value)
    others = {k: v for k, v in DEFAULTS.items() if k != field}
    assert {k: getattr(cfg, k) for k in others} == others


def test_several_overrides_at_once() -> None:
    cfg = from_environ({"ZMQSYFT_TIMEOUT": "3", "ZMQSYFT_PIPELINE": "0", "ZMQSYFT_MAX_INFLIGHT": "5",
                        "PATH": "/usr/bin"})
    assert (cfg.timeout, cfg.pipeline, cfg.max_inflight) == (3.0, False, 5)


@pytest.mark.parametrize("var", ["ZMQSYFT_FOO", "ZMQSYFT_TIMEOUTS", "ZMQSYFT_", "ZMQSYFT_timeout",
                                 "ZMQSYFT_PIPE_LINE"])
def test_unknown_variable_rejected(var: str) -> None:
    with pytest.raises(ValueError) as info:
        from_environ({var: "1"})
    message = str(info.value)
    assert var in message
    assert "ZMQSYFT_TIMEOUT" in message  # it lists the known ones


@pytest.mark.parametrize("var, raw", [
    ("ZMQSYFT_TIMEOUT", "abc"),
    ("ZMQSYFT_TIMEOUT", ""),
    ("ZMQSYFT_TIMEOUT", "1,5"),
    ("ZMQSYFT_TIMEOUT", "0"),
    ("ZMQSYFT_TIMEOUT", "-1"),
    ("ZMQSYFT_SPAWN_TIMEOUT", "0"),
    ("ZMQSYFT_GC_INTERVAL", "-0.5"),
    ("ZMQSYFT_HEARTBEAT_IVL", "0"),
    ("ZMQSYFT_CLOSE_TIMEOUT", "-3"),
    ("ZMQSYFT_MAX_INFLIGHT", "1.5"),
    ("ZMQSYFT_MAX_INFLIGHT", "ten"),
    ("ZMQSYFT_MAX_INFLIGHT", "0"),
    ("ZMQSYFT_MAX_INFLIGHT", "-4"),
    ("ZMQSYFT_MAX_MESSAGE_SIZE", "1e6x"),
    ("ZMQSYFT_MAX_CONNECTIONS", "0"),
    ("ZMQSYFT_MAX_OP_FLOPS", "-1"),
    ("ZMQSYFT_MAX_CONNECTION_BYTES", "-1"),
    ("ZMQSYFT_SNAPSHOT_MAX_ELEMENTS", "many"),
    ("ZMQSYFT_PIPELINE", "maybe"),
    ("ZMQSYFT_PIPELINE", "2"),
    ("ZMQSYFT_PIPELINE", ""),
])
def test_invalid_values_rejected(var: str, raw: str) -> None:
    with pytest.raises(ValueError) as info:
        from_environ({var: raw})
    message = str(info.value)
    field = var.removeprefix("ZMQSYFT_").lower()
    assert var in message or field in message


@pytest.mark.parametrize("raw", ["nan", "NaN", "-nan", "inf"])
def test_nan_durations_rejected(raw: str) -> None:
    # every wait has a deadline: an infinite timeout is refused too
    with pytest.raises(ValueError):
        from_environ({"ZMQSYFT_TIMEOUT": raw})


def test_bad_value_message_names_variable_and_value() -> None:
    with pytest.raises(ValueError, match=r"ZMQSYFT_PIPELINE='maybe'"):
        from_environ({"ZMQSYFT_PIPELINE": "maybe"})
    with pytest.raises(ValueError, match=r"ZMQSYFT_MAX_INFLIGHT='1\.5'.*whole number"):
        from_environ({"ZMQSYFT_MAX_INFLIGHT": "1.5"})


def test_from_environ_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZMQSYFT_TIMEOUT", "4.5")
    assert from_environ().timeout == 4.5
    monkeypatch.setenv("ZMQSYFT_BOGUS", "1")
    with pytest.raises(ValueError, match="ZMQSYFT_BOGUS"):
        from_environ()


def test_get_config_is_cached() -> None:
    """Built from the environment on first use, then the same object until configure() replaces
    it. In a fresh interpreter, so that the first use really is the first (nothing private is
    reset here)."""
    script = textwrap.dedent("""
        import zmqsyft as sy
        from zmqsyft.config import Config, get_config
        first = get_config()
        print(type(first) is Config, first.timeout, first.pipeline,
              get_config() is first, sy.get_config() is first)
        again = sy.configure(max_inflight=3)
        print(get_config() is again, sy.get_config() is again, again.timeout)
    """)
    result = run_script("-c", script, env={"ZMQSYFT_TIMEOUT": "4.5", "ZMQSYFT_PIPELINE": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True 4.5 False True True", "True True 4.5"]


def test_configure_replaces_fields(restore_config: None) -> None:
    before = get_config()
    new = configure(timeout=2.0, pipeline=False)
    assert new.timeout == 2.0 and new.pipeline is False
    assert get_config() is new and sy.get_config() is new
    # the other fields are kept
    assert dataclasses.replace(new, timeout=before.timeout, pipeline=before.pipeline) == before
    again = sy.configure(max_inflight=3)
    assert (again.timeout, again.pipeline, again.max_inflight) == (2.0, False, 3)


def test_configure_rejects_unknown_names(restore_config: None) -> None:
    before = get_config()
    with pytest.raises(TypeError, match="bogus"):
        configure(bogus=1)
    with pytest.raises(TypeError):
        configure(timeout=1.0, timout=2.0)
    assert get_config() is before  # nothing changed


@pytest.mark.parametrize("changes", [{"timeout": 0}, {"timeout": -1.0}, {"max_inflight": 0},
                                     {"pipeline_batch": 0}, {"gc_interval": 0.0}, {"spawn_timeout": -5}])
def test_configure_rejects_invalid_values(changes: dict[str, object], restore_config: None) -> None:
    before = get_config()
    with pytest.raises(ValueError):
        configure(**changes)
    assert get_config() is before


def test_config_validation_in_constructor() -> None:
    with pytest.raises(ValueError, match="timeout"):
        Config(timeout=0)
    with pytest.raises(ValueError, match="max_inflight"):
        Config(max_inflight=0)
    assert Config(timeout=0.001).timeout == 0.001


def test_spawn_worker_runs_the_worker_with_the_given_config(
        spawn: Callable[..., WorkerClient], hook: sy.TorchHook) -> None:
    """Every field reaches the worker process, not just the timeout."""
    worker = spawn("cfg", config=dataclasses.replace(get_config(), snapshot_max_elements=3))
    ptr = torch.arange(4.0).send(worker)
    (value,) = worker._objects.values()
    assert type(value) is Summary, "4 elements > snapshot_max_elements=3: summarised"
    assert repr(value) == "tensor(<4 elements>, shape=(4,), dtype=torch.float32)"
    del ptr
    sy.sync()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("raw", "value"), [
    ("65536", 65536), ("4GiB", 4 << 30), ("512 MiB", 512 << 20), ("2G", 2 * 10**9),
    ("1e12", 10**12), ("10**12", 10**12), ("1_000", 1000), ("-1", -1), ("1.5k", 1500)])
def test_integer_settings_take_units(raw: str, value: int) -> None:
    assert parse_int(raw) == value
    assert from_environ({"ZMQSYFT_MAX_MESSAGE_SIZE": raw}).max_message_size == value


@pytest.mark.timeout(10)
@pytest.mark.parametrize("raw", ["1.5", "abc", "4XB", "", "1e400"])
def test_integer_settings_refuse_what_is_not_a_whole_number(raw: str) -> None:
    with pytest.raises(ValueError, match="whole number"):
        parse_int(raw)
    with pytest.raises(ValueError, match="ZMQSYFT_MAX_FRAMES"):
        from_environ({"ZMQSYFT_MAX_FRAMES": raw})
