"""Getting a worker handle: spawning a local worker process, or connecting to a running one.

A spawned worker is ``python -m zmqsyft worker ...`` in a child process. It reports its bound
endpoint on a private pipe (the ready handshake), exits when its parent dies, and is shut down
(then killed, if need be) by ``close()``, by ``with``, and at interpreter exit. Spawning returns
at once; the first use of the handle waits for the ready signal, so several workers start in
parallel. Every handle belongs to the process-wide session, :func:`get_session`.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import threading
from typing import Any

from ..config import Config
from ..errors import LimitExceeded, SpawnError, WorkerUnavailable
from ..wire import transport
from .api import WorkerClient
from .session import Session

__all__ = ["spawn_worker", "VirtualWorker", "connect", "get_session"]


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
                _session = Session(WorkerClient)
    return _session


def spawn_worker(worker_id: str, *, transport_kind: str = "ipc", bind: str | None = None,
                 config: Config | None = None, env: dict[str, str] | None = None,
                 load: str | list[str] | None = None, tags: list[str] | None = None) -> WorkerClient:
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

    Returns
    -------
    WorkerClient
        Usable at once; its first use waits for the worker's ready signal. The worker exits when
        the handle is closed, when this process exits, or when this process dies.
    """
    session = get_session()
    cfg = config or session.cfg
    private_dir = None
    if bind is None:
        if transport_kind == "ipc":
            bind = transport.ipc_endpoint(worker_id)
            private_dir = os.path.dirname(bind[len("ipc://"):])
        elif transport_kind == "tcp":
            bind = "tcp://127.0.0.1:0"
        else:
            raise ValueError(f"transport_kind must be 'ipc' or 'tcp', not {transport_kind!r}")
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "zmqsyft", "worker", "--id", worker_id, "--bind", bind,
           "--parent-pid", str(os.getpid()), "--ready-fd", str(write_fd),
           "--timeout", str(cfg.timeout)]
    for path in [load] if isinstance(load, str) else (load or []):
        cmd += ["--load", os.fspath(path)]
    for tag in tags or []:
        cmd += ["--tag", tag]
    child_env = dict(os.environ)
    for field in dataclasses.fields(cfg):  # the worker runs with this config (it reads ZMQSYFT_*)
        value = getattr(cfg, field.name)
        child_env[f"ZMQSYFT_{field.name.upper()}"] = str(int(value) if isinstance(value, bool) else value)
    child_env.update(env or {})
    # the worker trusts its parent (and nobody else) with pickle: a fresh token, handed over in a
    # pipe, never in argv or the environment (a caller's env= may still set one, or "" for none)
    token = child_env.pop("ZMQSYFT_TRUST_TOKEN", None)
    token = secrets.token_hex(32) if token is None else token
    token_r, token_w = os.pipe()
    os.write(token_w, token.encode())  # a few bytes: the pipe holds them until the child reads
    os.close(token_w)
    cmd += ["--token-fd", str(token_r)]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd, token_r), env=child_env,
                                stdin=subprocess.DEVNULL)
    except OSError as exc:
        os.close(read_fd)
        raise SpawnError(f"could not start worker '{worker_id}': {exc}") from exc
    finally:
        os.close(write_fd)
        os.close(token_r)
    handle = WorkerClient(session, worker_id, bind, proc=proc, ready_fd=read_fd)
    handle.trust_token = token or None
    handle.private_dir = private_dir
    session.register(handle)
    return handle


def VirtualWorker(hook: Any = None, id: str = "worker", **kwargs: Any) -> WorkerClient:  # noqa: N802, A002
    """PySyft-compatible name for :func:`spawn_worker`: ``sy.VirtualWorker(hook, id="bob")``.

    Unlike PySyft's in-process virtual workers, this starts a real worker process.
    """
    return spawn_worker(id, **kwargs)


def connect(address: str, *, timeout: float | None = None, trust_token: str | None = None) -> WorkerClient:
    """Connect to a worker that is already running (e.g. started with ``zmqsyft worker``).

    ``trust_token``: the worker's ``--trust-token``, to be allowed to send it pickled code
    (:meth:`WorkerClient.run`); not needed for tensors and pointers.

    Raises
    ------
    WorkerUnavailable
        If no worker answers at ``address`` within the deadline.
    LimitExceeded
        If the worker refuses the connection during the handshake: it serves its
        ``max_connections`` already (or does not authorise this client).
    """
    session = get_session()
    known = session.find(address) is not None
    handle = session.worker_at(address, address)
    if trust_token is not None and handle.trust_token != trust_token:
        handle.trust_token = trust_token
        session.drop_connections(handle)  # the next connection presents the token
    try:
        info = session.conn(handle).peer_info(timeout)
    except LimitExceeded:  # it refused this connection: at its max_connections, or not authorised
        if not known:
            session.forget(handle)
        session.drop_connections(handle)
        raise
    except WorkerUnavailable as exc:
        session.forget(handle)
        session.drop_connections(handle)
        raise WorkerUnavailable(f"no zmqsyft worker answered at {address}: {exc}") from exc
    handle.id = info.id
    handle._pid = info.pid
    assert isinstance(handle, WorkerClient)
    return handle
