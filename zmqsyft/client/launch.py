"""Getting a worker handle: spawning a local worker process, or connecting to a running one.

A spawned worker is a fork of the fork server (:mod:`~zmqsyft.client.forks`: a process that
imported torch once), or ``python -m zmqsyft worker ...`` in a child process
(``Config.forkserver`` off), in a process group of its own (a Ctrl-C aimed at ours does not
reach it). It reports its bound
endpoint on a private pipe (the ready handshake), exits when its parent dies, and is shut down
(then killed, if need be) by ``close()``, by ``with``, and at interpreter exit. Spawning returns
at once; the first use of the handle waits for the ready signal, so several workers start in
parallel. Every handle belongs to the process-wide session, :func:`get_session`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ..config import Config, check_endpoint
from ..errors import LimitExceeded, SpawnError, WorkerUnavailable
from ..keys import KeyPair, public_key
from ..privacy import Policy
from ..wire import transport
from . import forks, interrupts
from .api import WorkerClient
from .session import Session

__all__ = ["spawn_worker", "spawn_workers", "VirtualWorker", "connect", "get_session"]

log = logging.getLogger(__name__)


_session: Session | None = None
_session_lock = threading.Lock()


def get_session() -> Session:
    """The process-wide :class:`~zmqsyft.client.session.Session` (created on first use).

    Every handle from :func:`spawn_worker`, :func:`VirtualWorker` and :func:`connect` belongs to
    it, and so does every pointer to their objects. Its ``name`` (``"client:<host>:<pid>"``) is
    how workers list this program in ``worker.stats()``; ``sync()`` is :func:`zmqsyft.sync`.
    """
    global _session
    if _session is None:
        with _session_lock:
            if _session is None:
                interrupts.sweep_dirs()  # what killed zmqsyft processes left in the temp dir
                _session = Session(WorkerClient)
    return _session


def _after_fork() -> None:
    """A forked child gets a session of its own on first use: the parent's is left behind."""
    global _session, _session_lock
    _session = None
    _session_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def spawn_worker(worker_id: str, *, transport_kind: str = "ipc", bind: str | None = None,
                 config: Config | None = None, env: dict[str, str] | None = None,
                 load: str | list[str] | None = None, tags: list[str] | None = None,
                 policy: Policy | None = None, keys: KeyPair | None = None) -> WorkerClient:
    """Start a worker process on this machine and return its handle.

    Parameters
    ----------
    worker_id : str
        The worker's name, e.g. ``"bob"``.
    transport_kind : {"ipc", "tcp"}
        ``ipc`` (default) binds a Unix socket in a private temporary directory; ``tcp`` binds
        ``tcp://127.0.0.1`` on a free port.
    bind : str, optional
        An explicit endpoint to bind instead.
    config : Config, optional
        Settings for the worker and the handle; the process-wide config by default.
    env : dict, optional
        Extra environment variables for the worker process.
    load : str or list of str, optional
        Files (``torch.save`` of a tensor or a dict of tensors) the worker loads itself at start:
        its own data, found with ``worker.search(tag)``; this process never holds it.
    tags : list of str, optional
        Tags for the loaded data (``["#diabetes"]``); a dict's entries also get ``#<key>``.
    policy : Policy, optional
        The data owner's release rules for the loaded data (:class:`zmqsyft.Policy`: who owns
        it, which workers may hold it, ``k``, which results may leave). Default: private to the
        worker: only aggregates of 2 owners' data computed on it, and nothing else, may leave.

    keys : KeyPair, optional
        The worker's key pair (``KeyPair.fresh()``), for a policy that must name a worker
        before it starts (two data owners trusting each other). Default: a fresh pair.

    Returns
    -------
    WorkerClient
        Usable at once; its first use waits for the worker's ready signal. The worker exits when
        the handle is closed, when this process exits, or when this process dies.
    """
    return _spawn(worker_id, (), transport_kind, bind, config, env, load, tags, policy, keys)


def _spawn(worker_id: str, siblings: Sequence[tuple[str, str]], transport_kind: str,
           bind: str | None, config: Config | None, env: dict[str, str] | None,
           load: str | list[str] | None, tags: list[str] | None, policy: Policy | None,
           keys: KeyPair | None) -> WorkerClient:
    """:func:`spawn_worker`, telling the worker at its start the names and public keys of
    ``siblings`` (workers spawned with it, by :func:`spawn_workers`) besides those of the
    workers spawned before it: none of them then needs introducing to another."""
    session = get_session()
    cfg = config or session.cfg
    private_dir = None
    if bind is None:
        if transport_kind == "ipc":
            private_dir = interrupts.private_dir()  # (removed at exit; if we are killed, by
            bind = transport.ipc_endpoint(worker_id, private_dir)  # the next session's sweep)
            if os.path.dirname(bind[len("ipc://"):]) != private_dir:  # a very long TMPDIR
                interrupts.remove_dir(private_dir)
                private_dir = os.path.dirname(bind[len("ipc://"):])
        elif transport_kind == "tcp":
            bind = "tcp://127.0.0.1:0"
        else:
            raise ValueError(f"transport_kind must be 'ipc' or 'tcp', not {transport_kind!r}")
    else:
        check_endpoint(bind, f"spawn_worker({worker_id!r}, bind=...)", bind=True)
    argv = ["worker", "--id", worker_id, "--bind", bind, "--timeout", str(cfg.timeout)]
    for path in [load] if isinstance(load, str) else (load or []):
        argv += ["--load", os.fspath(path)]
    for tag in tags or []:
        argv += ["--tag", tag]
    child_env = forks.worker_environ()
    for field in dataclasses.fields(cfg):  # the worker runs with this config (it reads ZMQSYFT_*)
        value = getattr(cfg, field.name)
        child_env[f"ZMQSYFT_{field.name.upper()}"] = str(int(value) if isinstance(value, bool) else value)
    child_env.update(env or {})
    # the worker's keys, and whom it knows: this process (its admin, trusted with pickle) and the
    # other workers it spawned, handed over in a pipe, never in argv or the environment; also
    # a trust token for pickle (a caller's env= may still set one, or "" for none)
    token = child_env.pop("ZMQSYFT_TRUST_TOKEN", None)
    token = secrets.token_hex(32) if token is None else token
    worker_keys = None if cfg.insecure else (keys or KeyPair.fresh())
    handover: dict[str, Any] = {"token": token, "name": session.name}
    if policy is not None:
        handover["policy"] = policy.to_wire()
    peers: dict[str, str] = {}  # public key -> name
    if worker_keys is not None:
        for name, key in [*session.spawned_keys(), *siblings]:
            if key != worker_keys.text:
                peers.setdefault(key, name)
        handover.update(key=session.keys.text, peers=[(n, k) for k, n in peers.items()],
                        worker_key=[worker_keys.text, worker_keys.secret.decode("ascii")])
    read_fd, write_fd = os.pipe()
    token_r, token_w = os.pipe()
    os.write(token_w, json.dumps(handover).encode())  # < 1 KiB: the pipe holds it for the child
    os.close(token_w)
    try:
        proc = _start(worker_id, argv, child_env, cfg, write_fd, token_r)
    except SpawnError:
        os.close(read_fd)
        if private_dir is not None:
            interrupts.remove_dir(private_dir)
        raise
    finally:
        os.close(write_fd)
        os.close(token_r)
    handle = WorkerClient(session, worker_id, bind, proc=proc, ready_fd=read_fd)
    handle.key = worker_keys.text if worker_keys is not None else ""
    handle.told.update(peers)
    handle.trust_token = token or None
    handle.private_dir = private_dir
    session.register(handle)
    return handle


def _start(worker_id: str, argv: list[str], env: dict[str, str], cfg: Config, ready_fd: int,
           token_fd: int) -> subprocess.Popen[bytes] | forks.ForkedProcess:
    """The worker's process: forked by the fork server if it may be, else ``python -m zmqsyft
    ARGV``; either way in a session (process group) of its own, so that an interrupt aimed at
    ours (a notebook's Ctrl-C, sent to the kernel's process group) does not reach it, and dying
    with us (pdeathsig, which follows the thread that started it: the fork server's, or our
    spawner thread, which lives as long as we do)."""
    fds = {"--ready-fd": ready_fd, "--token-fd": token_fd}
    why = forks.refusal(cfg, env)
    if why is None:
        try:
            return forks.spawn(argv, env, fds, cfg.spawn_timeout)
        except SpawnError as exc:
            log.warning("worker '%s' is started as a new interpreter: %s", worker_id, exc)
    else:
        log.debug("worker '%s' is started as a new interpreter: %s", worker_id, why)
    cmd = [sys.executable, "-m", "zmqsyft", *argv, "--parent-pid", str(os.getpid())]
    for flag, fd in fds.items():
        cmd += [flag, str(fd)]
    try:
        proc = interrupts.popen(cmd, pass_fds=tuple(fds.values()), env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise SpawnError(f"could not start worker '{worker_id}': {exc}") from exc
    interrupts.watch_child(proc)  # reaped as soon as it exits, used or not
    return proc


def spawn_workers(n: int, prefix: str = "owner", **kwargs: Any) -> list[WorkerClient]:
    """Start ``n`` workers, named ``f"{prefix}{i}"`` for ``i`` in ``range(n)`` (``owner0``,
    ``owner1``, ...), with :func:`spawn_worker`'s keyword arguments; their handles, in order.

    Like :func:`spawn_worker` it returns at once; each handle's first use waits for its worker.
    Forked from the fork server (``Config.forkserver``), 32 workers are ready within a few
    seconds of the first spawn. Each is told the others' public keys at its start, so that
    they can connect to each other with no introduction from this process. If one cannot be
    started, those started already are closed and the ``SpawnError`` is raised; a fork that
    fails after this returned (the fork server died meanwhile) fails that worker's first use.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"spawn_workers(n): n must be a whole number >= 0, not {n!r}")
    names = [f"{prefix}{i}" for i in range(n)]
    calls, signature = [], inspect.signature(spawn_worker)
    for name in names:  # (a wrong keyword fails here, before any worker is started)
        bound = signature.bind(name, **kwargs)
        bound.apply_defaults()
        calls.append(bound.arguments)
    cfg = kwargs.get("config") or get_session().cfg
    pairs = [KeyPair.fresh() for _ in names] if not cfg.insecure and "keys" not in kwargs else []
    siblings = [(name, pair.text) for name, pair in zip(names, pairs, strict=False)]
    workers: list[WorkerClient] = []
    try:
        for i, call in enumerate(calls):
            if pairs:
                call["keys"] = pairs[i]
            workers.append(_spawn(call.pop("worker_id"), siblings, **call))
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return workers


def VirtualWorker(hook: Any = None, id: str = "worker",  # noqa: N802, A002
                  data: Any = (), **kwargs: Any) -> WorkerClient:
    """PySyft-compatible name for :func:`spawn_worker`: ``sy.VirtualWorker(hook, id="bob")``.

    Unlike PySyft's in-process virtual workers, this starts a real worker process. ``data``:
    tensors to place on it at once, with their tags and descriptions (``x.tag("#input")``), so
    that ``worker.search("#input")`` finds them (PySyft Part 8). They are this program's, sent
    like any tensor, and kept for as long as the handle lives (``worker.clear_objects()`` drops
    them sooner).
    """
    worker = spawn_worker(id, **kwargs)
    held = [t.send(worker) for t in data]
    if held:
        worker._held = held  # type: ignore[attr-defined]  # (the handle keeps them alive)
    return worker


def connect(address: str, *, worker_key: str | bytes | os.PathLike[str] | None = None,
            keys: str | os.PathLike[str] | KeyPair | None = None, timeout: float | None = None,
            trust_token: str | None = None) -> WorkerClient:
    """Connect to a worker that is already running (e.g. started with ``zmqsyft worker``).

    Parameters
    ----------
    address : str
        Its endpoint (``tcp://192.168.1.20:5555``).
    worker_key : str or path
        Its public key: the text it printed at start, or its ``NAME.key`` file. The connection
        completes only with the holder of the matching secret, and is encrypted. Not needed
        with ``Config.insecure``.
    keys : path or KeyPair, optional
        Who you are to it: your ``NAME.key_secret`` file (``zmqsyft keys new NAME``), whose
        ``NAME.key`` the worker was given with ``--allow``/``--admin``/``--trust``. Default:
        this process's own fresh key, which only workers it spawned know.
    timeout : float, optional
        Seconds to wait for its answer.
    trust_token : str, optional
        The token in the worker's ``--trust-token-file``, to be allowed to send it pickled code
        (:meth:`WorkerClient.run`); a key given with ``--trust`` needs none.

    Raises
    ------
    WorkerUnavailable
        If no worker answers at ``address`` within the deadline, or the handshake fails (a
        wrong ``worker_key``).
    LimitExceeded
        If the worker refuses the connection during the handshake: your key is not one it
        allows, or it serves its ``max_connections`` already.
    ValueError
        If ``worker_key`` is missing (and the config is not insecure) or not a key;
        ``AddressError`` (a ``ValueError``) if ``address`` is not ``tcp://HOST:PORT`` or
        ``ipc://PATH``.
    """
    check_endpoint(address, "connect()")
    session = get_session()
    key, existing = "", session.find(address)
    if worker_key is not None:
        key = public_key(worker_key).decode("ascii")
    elif existing is not None and existing.key:  # a worker this process knows already
        key = existing.key
    elif not session.cfg.insecure:
        raise ValueError(
            f"connect({address!r}) needs the worker's public key: worker_key='<40 characters>' "
            "(the worker prints it when it starts) or worker_key='path/to/NAME.key'. Without "
            "keys at all, both ends must run insecure (--insecure, sy.configure(insecure=True))")
    client_keys = keys if isinstance(keys, KeyPair) or keys is None else KeyPair.load(keys)
    known = existing is not None
    if known and existing.spawned and key != existing.key:
        raise ValueError(f"this process spawned the worker at {address}, whose key is "
                         f"{existing.key}, not {key}")
    if known and client_keys is not None and client_keys != (existing.client_keys or session.keys):
        raise ValueError(
            f"this process is connected to the worker at {address} already, with another key; "
            "its handle and pointers act as that key. Close it first (worker.close()) to "
            "connect as another")
    handle = session.worker_at(address, address, key)
    before = (handle.key, handle.client_keys, handle.trust_token)
    if key:  # (a connected worker restarted there may have a new key)
        handle.key = key
    if client_keys is not None:
        handle.client_keys = client_keys
    if trust_token is not None:
        handle.trust_token = trust_token
    if (handle.key, handle.client_keys, handle.trust_token) != before:
        session.drop_connections(handle)  # the next connection presents the new credentials
    try:
        info = session.conn(handle).peer_info(timeout)
    except (LimitExceeded, WorkerUnavailable) as exc:
        session.drop_connections(handle)
        if known:  # a handle in use keeps what it had: its next request reconnects with it
            handle.key, handle.client_keys, handle.trust_token = before
        else:
            session.forget(handle)
        if isinstance(exc, LimitExceeded):  # refused: at its max_connections, or not authorised
            raise
        raise WorkerUnavailable(f"no zmqsyft worker answered at {address}: {exc}") from exc
    handle.id = info.id
    handle._pid = info.pid
    assert isinstance(handle, WorkerClient)
    return handle
