"""One typed, frozen configuration object with documented defaults.

Values come from the defaults below, then from ``ZMQSYFT_<NAME>`` environment variables (an
unknown ``ZMQSYFT_`` variable is an error, so that typos do not pass silently), then from
:func:`configure`. The config is handed down explicitly: a worker gets one when it is made, the
caller's session holds one (and is told by :func:`configure` when it is replaced), and
everything below reads it from them; :func:`get_config` returns the process-wide current one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import AddressError

__all__ = ["Config", "get_config", "configure", "from_environ", "on_change", "parse_int",
           "check_endpoint", "IPC_PATH_MAX"]

_ENV_PREFIX = "ZMQSYFT_"
# environment variables with this prefix that are not config fields but are still legitimate
_ENV_NOT_CONFIG = {"ZMQSYFT_LOG", "ZMQSYFT_LOG_LEVEL", "ZMQSYFT_TRUST_TOKEN", "ZMQSYFT_SHM_DIR"}  # (SHM_DIR: wire.shm)


@dataclass(frozen=True)
class Config:
    """zmqsyft settings.

    Attributes
    ----------
    timeout : float
        Seconds a caller waits for any one reply before raising ``RequestTimeout`` (a
        ``WorkerUnavailable``). A worker that dies or freezes is detected sooner, within about
        three heartbeat intervals; raise this only for operations that legitimately run longer.
    spawn_timeout : float
        Seconds to wait for a spawned worker process to report ready.
    pipeline : bool
        When true (the default), operations on pointers whose result shape can be inferred
        locally return at once and their errors surface at the next synchronisation point;
        when false every operation waits for the worker's acknowledgement.
    max_inflight : int
        How many unacknowledged requests one connection may have before the caller waits.
    pipeline_batch : int
        Pipelined operations issued while earlier ones to the same worker are still
        unacknowledged are queued and sent together, as one message, once this many have
        queued, before anything else this thread sends or waits for, and otherwise within about
        a millisecond (a background thread sends a batch that has waited that long). ``1`` sends
        every operation at once.
    gc_interval : float
        Seconds after which queued deletes of dropped pointers are flushed if no other
        message to that worker carried them first.
    max_message_size : int
        Largest message, in bytes, a worker accepts (``ZMQ_MAXMSGSIZE``; a larger one closes the
        sender's connection and nothing of it is kept); -1 for no limit. Tensors that travel
        through shared memory do not count: only their names are in the message.
    max_frames : int
        Most frames one message may have (a header and one per tensor sent through the socket);
        a worker drops a message with more, and counts it. ``0`` for no limit.
    max_store_bytes : int
        Most tensor bytes a worker holds; a request that would store more is refused with
        ``LimitExceeded`` and nothing of it is kept. ``0`` (the default): three quarters of the
        worker machine's memory.
    max_connection_bytes : int
        Most tensor bytes the objects of one session may hold on a worker (a client process,
        however many connections it opens: what it sent, what its ops made, what it was given);
        past it, that session's requests are refused with ``LimitExceeded``. ``0`` (the
        default): half of ``max_store_bytes``, so that one runaway client leaves the other half
        to everyone else.
    max_op_flops : int
        The most work one op may cost, in estimated floating-point operations (matrix products,
        convolutions, attention, decompositions; estimated on the arguments' shapes before the op
        runs), so that one request cannot stall the worker for long; past it the op is refused
        with ``LimitExceeded``. ``0`` for no limit. The default (10**12) is about three seconds
        of a 4000x4000 matrix product's speed on a 2-core machine.
    max_connections : int
        Most connections (clients and peer workers) a worker serves at once; one more is
        refused during its handshake and its requests fail with ``LimitExceeded``.
    max_peer_links : int
        Most links (DEALER sockets) a worker keeps to other workers; past it, the oldest idle
        one is closed, and a request needing one more while all are busy is refused.
    heartbeat_ivl : float
        Seconds between ZMTP heartbeats on every connection; a peer silent for three intervals
        is taken for dead or frozen.
    snapshot_max_elements : int
        Tensors larger than this are summarised in ``worker._objects`` snapshots.
    close_timeout : float
        Seconds ``close()`` waits for a worker process to exit before killing it.
    shm_threshold : int
        Tensors of at least this many bytes bound for a process on the same machine (same
        ``/dev/shm``, same user) travel through shared memory: written once, mapped by the
        receiver, no socket copies. ``0`` turns this off (every tensor goes through the socket).
    malloc_keep : int
        Bytes of freed memory a worker's C heap keeps for its next tensors instead of giving
        them back to the system at once (``zmqsyft.heap``; glibc only): tensors of the same
        sizes come and go every round, and new pages cost a page fault each. ``0`` leaves the
        C library's defaults.
    sealed_threshold : int
        Messages of at least this many bytes on a CURVE connection (tensors that do not go
        through shared memory) travel sealed with AES-256-GCM on the receiver's bulk socket
        instead of inside the connection (``zmqsyft.wire.bulk``): as private and as authentic,
        and several times faster than CURVE's own encryption. ``0`` turns this off (everything
        goes inside the CURVE connection).
        An insecure worker takes large messages on its bulk socket too, unencrypted, so that a
        slow link carrying one never holds up the connection's heartbeats.
    lease : float
        Seconds a worker keeps a session's objects after its last connection closed (a client
        killed, a notebook restarted, a host gone silent for three heartbeats). A client that
        reconnects within the lease, with the same key and session, keeps them; after it they
        are freed, except what the session handed to others.
    insecure : bool
        No authentication and no encryption: workers accept any connection (ZeroMQ's NULL
        mechanism), and every caller is every object's owner and an admin. Only for a machine
        or network whose every user and host you trust; off by default, when every connection
        is CURVE (authenticated, encrypted) and every object has an owner.
    any_peer : bool
        Let a worker connect to any peer worker whose public key comes with a pointer or a
        ``MOVE`` (the link is still CURVE with that key, so only the holder of its secret can
        answer). Off by default: a worker links only to keys it knows (``--allow``, ``--admin``,
        ``--trust``, its spawner's), so a forged pointer cannot make it reach out to a stranger.
        Who may connect *to* the worker is not changed by this.
    forkserver : bool
        Spawned workers are forks of a fork server, a process that imported torch and the worker
        once (started by the first spawn; it dies with this process): a worker is ready in tens
        of milliseconds instead of seconds, and shares most of its memory with the others. Off
        (``ZMQSYFT_FORKSERVER=0``), each worker is a new interpreter (``python -m zmqsyft
        worker``), as it also is when ``spawn_worker(env=...)`` changes a variable read only at
        interpreter start (``PYTHON*``, ``LD_*``, ``OMP_*``, ...: see
        :data:`zmqsyft.client.forks.START_VARIABLES`) or the fork server cannot start.
    """

    timeout: float = 60.0
    spawn_timeout: float = 60.0
    pipeline: bool = True
    max_inflight: int = 10_000
    pipeline_batch: int = 32
    gc_interval: float = 0.05
    max_message_size: int = 4 << 30
    max_frames: int = 65536
    max_store_bytes: int = 0
    max_connection_bytes: int = 0
    max_op_flops: int = 10**12
    max_connections: int = 1024
    max_peer_links: int = 256
    heartbeat_ivl: float = 1.0
    snapshot_max_elements: int = 1000
    close_timeout: float = 5.0
    shm_threshold: int = 1 << 20
    malloc_keep: int = 64 << 20
    sealed_threshold: int = 1 << 20
    lease: float = 60.0
    insecure: bool = False
    any_peer: bool = False
    forkserver: bool = True

    def __post_init__(self) -> None:
        for name in ("timeout", "spawn_timeout", "gc_interval", "heartbeat_ivl", "close_timeout",
                     "lease"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"zmqsyft config: {name} must be a finite number > 0, got {value!r}")
        for name, (least, note) in _LEAST.items():
            if getattr(self, name) < least:
                raise ValueError(f"zmqsyft config: {name} must be >= {least}{note}")


# the smallest value of each whole-number field, and what its smallest value means
_LEAST: dict[str, tuple[int, str]] = {
    "max_inflight": (1, ""),
    "pipeline_batch": (1, " (1 sends every op at once)"),
    "max_store_bytes": (0, " (0: 3/4 of memory)"),
    "max_connection_bytes": (0, " (0: half of max_store_bytes)"),
    "max_op_flops": (0, " (0: no limit)"),
    "max_connections": (1, ""),
    "max_peer_links": (1, ""),
    "max_frames": (0, " (0: no limit)"),
    "shm_threshold": (0, " (0 turns shared memory off)"),
    "malloc_keep": (0, " (0 leaves the C library's defaults)"),
    "sealed_threshold": (0, " (0 sends everything inside the CURVE connection)"),
}


_TYPES: dict[str, type] = {"float": float, "int": int, "bool": bool, "str": str}


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNITS.update({u + "b": v for u, v in list(_UNITS.items()) if u and not u.endswith("b")})


def parse_int(raw: str) -> int:
    """An integer setting as people write it: ``65536``, ``4GiB``, ``512 MiB``, ``2G``, ``1e12``,
    ``10**12``. Decimal units (k, M, G, T) are powers of ten, binary ones (KiB, MiB, ...) of two.

    Raises ``ValueError`` for anything else (and for a fractional result).
    """
    text = raw.strip().replace("_", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = text[len(number):].strip().lower()
    if unit not in _UNITS or not number:
        raise ValueError(f"{raw!r} is not a whole number (e.g. 65536, 4GiB, 512MiB, 1e12)")
    if "**" in number:
        base, _, exp = number.partition("**")
        value: float | int = int(base) ** int(exp)
    elif any(c in number for c in ".eE"):
        value = float(number)
    else:
        value = int(number)
    value = value * _UNITS[unit]
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{raw!r} is not a whole number")
    return int(value)


def _parse(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = _TYPES[str(field.type)]
    if kind is int:
        try:
            return parse_int(raw)
        except ValueError:
            raise ValueError(
                f"{_ENV_PREFIX}{field.name.upper()}={raw!r} is not a whole number "
                "(e.g. 65536, 4GiB, 512MiB, 1e12)") from None
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{_ENV_PREFIX}{field.name.upper()}={raw!r} is not a boolean (use 1 or 0)")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(
            f"{_ENV_PREFIX}{field.name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from None


def from_environ(environ: dict[str, str] | None = None) -> Config:
    """Build a config from the defaults and ``ZMQSYFT_*`` environment variables.

    Raises
    ------
    ValueError
        For an unknown ``ZMQSYFT_*`` variable or a value that does not parse.
    """
    env = os.environ if environ is None else environ
    known = {f.name.upper(): f for f in fields(Config)}
    values: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith(_ENV_PREFIX) or key in _ENV_NOT_CONFIG:
            continue
        name = key[len(_ENV_PREFIX):]
        if name not in known:
            raise ValueError(
                f"unknown environment variable {key}; zmqsyft knows "
                + ", ".join(_ENV_PREFIX + k for k in sorted(known))
            )
        values[known[name].name] = _parse(known[name], raw)
    return Config(**values)


_current: Config | None = None
_listeners: list[Callable[[Config], None]] = []


def get_config() -> Config:
    """Return the process-wide current config (built from the environment on first use)."""
    global _current
    if _current is None:
        _current = from_environ()
    return _current


def configure(**changes: Any) -> Config:
    """Replace fields of the process-wide config, e.g. ``configure(timeout=30)``.

    Returns the new config. Unknown names raise ``TypeError``.
    """
    global _current
    _current = replace(get_config(), **changes)
    for listener in list(_listeners):
        listener(_current)
    return _current


def on_change(listener: Callable[[Config], None]) -> None:
    """Call ``listener(config)`` whenever :func:`configure` replaces the process-wide config."""
    _listeners.append(listener)


IPC_PATH_MAX = 107
"""Bytes an ``ipc://`` path may have: a Unix socket's ``sun_path`` is 108 bytes on Linux,
its terminating NUL included (104 on macOS)."""
_EXPECTED = "expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555) or ipc://PATH"


def check_endpoint(address: Any, what: str, *, bind: bool = False) -> str:
    """Check that ``address`` is an endpoint a worker can bind (``bind=True``) or be reached at.

    Parameters
    ----------
    address : str
        ``tcp://HOST:PORT`` (port 1-65535; to bind, also port 0, a free one, and HOST ``*``,
        every interface) or ``ipc://PATH`` (at most :data:`IPC_PATH_MAX` bytes).
    what : str
        What the address is for, to start the message with (``"connect()"``, ``"--bind"``).

    Returns
    -------
    str
        ``address``, unchanged.

    Raises
    ------
    AddressError
        (a ``ValueError``) saying what was expected, with the likely intended spelling.
    """
    def fail(why: str, meant: str = "") -> AddressError:
        hint = f"; did you mean {meant}?" if meant else ""
        return AddressError(f"{what}: {address!r} is not a usable endpoint: {why}{hint}")

    if not isinstance(address, str):
        raise fail(f"an endpoint is a string, not {type(address).__name__}; {_EXPECTED}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        host, colon, port = address.rpartition(":")
        if colon and port.isdigit() and host and "/" not in host:
            raise fail("it has no scheme", f"tcp://{address}")
        if address.startswith(("/", "./", "~")):
            raise fail("it has no scheme", f"ipc://{address}")
        raise fail(f"it has no scheme; {_EXPECTED}")
    if scheme == "ipc":
        if not rest:
            raise fail("an ipc:// endpoint needs a path, e.g. ipc:///tmp/bob.sock")
        size = len(rest.encode("utf-8", "surrogateescape"))
        if size > IPC_PATH_MAX:
            raise fail(f"its path is {size} bytes, and Unix socket paths are limited to "
                       f"{IPC_PATH_MAX} bytes by the operating system: use a shorter directory "
                       "(e.g. under /tmp)")
        return address
    if scheme != "tcp":
        near = f"tcp://{rest}" if ":" in rest and "/" not in rest else ""
        raise fail(f"zmqsyft workers listen on tcp:// or ipc://, not {scheme}://; {_EXPECTED}",
                   near)
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise fail("a tcp:// endpoint needs a host and a port", f"tcp://{rest or '127.0.0.1'}:5555"
                   if rest and ":" not in rest else "")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise fail(f"the port must be a number from {0 if bind else 1} to 65535")
    if int(port) == 0 and not bind:
        raise fail("port 0 (any free port) is for binding; connect to the port the worker "
                   "bound (its handle's .address)")
    if host == "*" and not bind:
        raise fail("'*' (every interface) is for binding; connect to a host name or address",
                   f"tcp://127.0.0.1:{port}")
    if any(c.isspace() or c in "/@" for c in host):
        raise fail("the host must be a name or an address (IPv6 in brackets: tcp://[::1]:5555)")
    return address
