"""Worker handles: spawning local worker processes, connecting to running ones, teardown.

A spawned worker is ``python -m zmqsyft worker ...`` in a child process. It reports its bound
endpoint on a private pipe (the ready handshake), exits when its parent dies, and is shut down
(then killed, if need be) by ``close()``, by ``with``, and at interpreter exit. Spawning returns
at once; the first use of the handle waits for the ready signal, so several workers start in
parallel.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import secrets
import select
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from . import transport
from .client import Client, get_client
from .config import Config
from .errors import SpawnError, WorkerUnavailable, ZmqSyftError
from .messages import Op, PointerDesc
from .pointer import PointerTensor, pointer_from_desc

__all__ = ["WorkerClient", "spawn_worker", "VirtualWorker", "connect"]


class WorkerClient:
    """A handle to one worker process, local (spawned) or remote (connected).

    Attributes
    ----------
    id : str
        The worker's name (``"bob"``).
    address : str
        The endpoint its ROUTER is bound to; waits for a spawned worker to be ready.
    pid : int
        The worker's process id (as the worker reports it).
    """

    def __init__(self, client: Client, name: str, address_hint: str,
                 proc: subprocess.Popen[bytes] | None = None, ready_fd: int | None = None) -> None:
        self._client = client
        self.id = name
        self.address_hint = address_hint
        self._proc = proc
        self._ready_fd = ready_fd
        self._ready_lock = threading.Lock()
        self._ready_address: str | None = None if ready_fd is not None else address_hint
        self._pid: int | None = proc.pid if proc is not None else None
        self._spawn_deadline = time.monotonic() + client.cfg.spawn_timeout
        self.closed = False
        self._dirty = False
        self._trust_token: str | None = None  # presented in HELLO: lets us send pickled code
        self._private_dir: str | None = None  # the ipc socket's directory, made by spawn_worker

    @classmethod
    def _connected(cls, client: Client, address: str, name: str) -> WorkerClient:
        return cls(client, name, address)

    # ----------------------------------------------------------- readiness
    @property
    def address(self) -> str:
        if self._ready_address is None:
            with self._ready_lock:  # several threads may make the first use at once
                if self._ready_address is None:
                    self._wait_ready()
        assert self._ready_address is not None
        return self._ready_address

    @property
    def pid(self) -> int | None:
        if self._pid is None:
            self._hello()
        return self._pid

    def _wait_ready(self) -> None:
        fd = self._ready_fd
        if fd is None:
            self._check_open()
            raise SpawnError(f"worker '{self.id}' never reported ready")
        buf = b""
        try:
            while b"\n" not in buf:
                remaining = self._spawn_deadline - time.monotonic()
                if remaining <= 0:
                    self._kill()
                    self.closed = True
                    raise SpawnError(
                        f"worker '{self.id}' did not report ready within "
                        f"{self._client.cfg.spawn_timeout:g}s; it was killed")
                readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
                if readable:
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        break
                    buf += chunk
        finally:
            os.close(fd)
            self._ready_fd = None
        line = buf.decode(errors="replace").strip()
        if not line.startswith("READY "):
            code = self._proc.wait(timeout=5) if self._proc is not None else None
            self.closed = True
            raise SpawnError(
                f"worker '{self.id}' exited (code {code}) before it was ready; its error output "
                "is above")
        self._ready_address = line.split()[1]

    def _hello(self) -> None:
        reply = self._request(Op.HELLO, {"peer": "client"})
        self.id = str(reply.body.get("id", self.id))
        self._pid = reply.body.get("pid")

    def _exit_status(self) -> str | None:
        """``None`` while the worker may be alive; otherwise why it is not."""
        if self.closed:
            return "closed"
        if self._proc is not None:
            code = self._proc.poll()
            if code is not None:
                return f"its process exited with code {code}"
        return None

    def _check_open(self) -> None:
        if self.closed:
            raise WorkerUnavailable(f"worker '{self.id}' was closed")

    # ------------------------------------------------------------ requests
    def _request(self, op: Op, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        self._check_open()
        return self._client.conn(self).request(op, body or {}, **kw)

    @property
    def _objects(self) -> dict[int, Any]:
        """A snapshot of the worker's store: id → tensor, or → pointer for pointers it holds.

        This is a synchronisation point: it reflects every operation and delete issued before it,
        including deletes cascading through pointer chains. Large tensors are summarised.
        """
        return self.objects()

    def objects(self) -> dict[int, Any]:
        """Same as :attr:`_objects`."""
        gc.collect()  # a pointer dropped into a reference cycle is dropped too, for the user
        return self._snapshot()

    def _snapshot(self) -> dict[int, Any]:
        self._client.sync()
        reply = self._request(Op.OBJECTS, what="_objects")
        out: dict[int, Any] = {}
        for key, value in reply.body.get("objects", {}).items():
            if isinstance(value, PointerDesc):
                value = pointer_from_desc(value, owner=self.id)
            out[key] = value
        return out

    def ping(self) -> float:
        """Round-trip time of an empty request, in seconds."""
        start = time.perf_counter()
        self._request(Op.PING)
        return time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        """The worker's counters.

        Returns a dict with ``objects`` (how many it holds), ``counters`` (dropped and late
        messages) and ``peers``: for each peer, by the name it gave (``"alice"``, or
        ``"client:<host>:<pid>"`` for a program like this one), ``messages_in/out``,
        ``bytes_in/out`` and ``largest_in/out`` (the largest single message), counted from the
        worker's side over both the requests it served and the ones it sent.
        """
        return dict(self._request(Op.STATS).body)

    def search(self, *tags: str) -> list[PointerTensor]:
        """Pointers to the worker's own data carrying every one of ``tags`` (``"#diabetes"``).

        The pointers do not own the data: dropping them frees nothing, and they cannot take it
        with ``.get()`` or ``.move()``; operations on them give results you own.
        """
        reply = self._request(Op.SEARCH, {"tags": list(tags)}, what="search")
        return [pointer_from_desc(desc) for desc in reply.body.get("results", [])]

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the worker; pointers to its objects are passed as the
        objects themselves.

        ``fn`` (and whatever it refers to: a module, an optimizer) travels with cloudpickle, so
        the worker must trust this program: a spawned worker trusts its parent; a worker started
        from the shell needs ``--trust-token`` and ``sy.connect(address, trust_token=...)``.
        Tensor results stay on the worker and come back as pointers; other values as values.

        Raises
        ------
        UntrustedPayload
            If the worker does not trust this program; nothing was run.
        """
        from .dispatch import run_remote

        return run_remote(self, fn, args, kwargs)

    def sync(self) -> None:
        """Wait until everything issued so far has taken effect; raise pipelined errors."""
        self._client.sync()

    # ------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Ask the worker process to exit (also one this process did not spawn)."""
        if self.closed:
            return
        try:
            self._client.conn(self).request(Op.SHUTDOWN, {}, what="shutdown")
        except ZmqSyftError:
            pass
        self._teardown()

    def close(self) -> None:
        """Close the handle. A worker this process spawned is shut down (killed if it hangs)."""
        if self.closed:
            return
        if self._proc is not None:
            if self._proc.poll() is None and self._ready_fd is None:
                try:
                    conn = self._client.conn(self)
                    conn.wait(conn.send(Op.SHUTDOWN, {}, what="shutdown"), timeout=1.0)
                except ZmqSyftError:
                    pass
            self._reap(self._client.cfg.close_timeout)
        self._teardown()

    def _teardown(self) -> None:
        self._client.drop_connections(self)
        self.closed = True
        self._client.forget(self)
        self._remove_private_dir()

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None and (self._proc is None or self._proc.poll() is not None):
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def _reap(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _close_at_exit(self) -> None:
        if self._proc is None or self.closed:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
        self._reap(2.0)
        self.closed = True
        self._remove_private_dir()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._ready_address or self.address_hint
        state = " closed" if self.closed else ""
        pid = f" pid={self._pid}" if self._pid else ""
        return f"<WorkerClient {self.id} {where}{pid}{state}>"

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


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
    client = get_client()
    cfg = config or client.cfg
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
    token = secrets.token_hex(32)  # the worker trusts its parent (and nobody else) with pickle
    child_env["ZMQSYFT_TRUST_TOKEN"] = token
    child_env.update(env or {})
    try:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,), env=child_env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        os.close(read_fd)
        raise SpawnError(f"could not start worker '{worker_id}': {exc}") from exc
    finally:
        os.close(write_fd)
    handle = WorkerClient(client, worker_id, bind, proc=proc, ready_fd=read_fd)
    handle._trust_token = child_env["ZMQSYFT_TRUST_TOKEN"] or None
    handle._private_dir = private_dir
    return client.register(handle)


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
    """
    client = get_client()
    handle = client.worker_at(address, address)
    if trust_token is not None and handle._trust_token != trust_token:
        handle._trust_token = trust_token
        client.drop_connections(handle)  # the next connection presents the token
    conn = client.conn(handle)
    try:
        reply = conn.wait(conn.send(Op.HELLO, {"peer": "client"}, what="hello"), timeout)
    except WorkerUnavailable as exc:
        client.forget(handle)
        client.drop_connections(handle)
        raise WorkerUnavailable(f"no zmqsyft worker answered at {address}: {exc}") from exc
    handle.id = str(reply.body.get("id", address))
    handle._pid = reply.body.get("pid")
    return handle
