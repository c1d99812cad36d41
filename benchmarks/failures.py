"""How failures are reported, and what they leave behind (issue 14).

For each kind of failure, the time from the fault to the caller's error, what that error is, and
what is left behind afterwards: shared-memory segments in this user's segment directory,
``/tmp/zmqsyft-*`` directories, and objects still held on the surviving worker.

    python benchmarks/failures.py            # every kind, 3 rounds
    python benchmarks/failures.py --quick    # every kind once, smaller tensors (< 2 min)
    python benchmarks/failures.py --only kill,freeze --json out.json

Each kind runs in a child process of its own (``--_kind NAME``), killed with everything it
started if it overruns; a kind that crashes or overruns is reported as such, never ending the
script. Only loopback is used (``ipc://`` in private directories, ``tcp://127.0.0.1``); the lost
link is a TCP forwarder on 127.0.0.1 that stops forwarding without closing anything.

kill      SIGKILL of a worker during a loop of pipelined ops (100/s); time to the first error
freeze    SIGSTOP of a worker, then a large send to it (4 MiB; 100 MiB without --quick)
refused   a blocking op on a worker whose process is gone (nothing listens on its port)
lostlink  a large transfer (100 MiB; 16 MiB with --quick) on a link that goes silent at 4 MiB
restart   a worker killed and started again on the same address; what old pointers and new
          large sends do afterwards (whatever it is: reported, not judged)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

KINDS = ("kill", "freeze", "refused", "lostlink", "restart")
SETTLE = 3.0  # seconds given to cleanup (sweepers, leases) before leftovers are counted


_PIDS: set[int] = set()  # this kind's processes (itself, the workers it started)


def _private_shm() -> bool:
    """Whether this zmqsyft honours ZMQSYFT_SHM_DIR (a private segment directory per kind)."""
    from zmqsyft import config
    return "ZMQSYFT_SHM_DIR" in getattr(config, "_ENV_NOT_CONFIG", ())


def _segments() -> int:
    """Segments left in the segment directory: all of them in a private one, else those named
    after this kind's processes."""
    from zmqsyft.wire import shm
    try:
        names = [n for n in os.listdir(shm.segment_dir()) if n.startswith("zmqsyft-")]
    except OSError:
        return -1
    if os.environ.get("ZMQSYFT_SHM_DIR"):
        return len(names)
    pids = {str(pid) for pid in _PIDS | {os.getpid()}}
    return sum(1 for n in names if n.split("-")[1] in pids)


def _spawn(sy: Any, name: str, **kwargs: Any) -> Any:
    worker = sy.spawn_worker(name, **kwargs)
    if worker._proc is not None:
        _PIDS.add(worker._proc.pid)
    return worker


def _tmp_dirs(tmp: str) -> set[str]:
    return set(glob.glob(os.path.join(tmp, "zmqsyft-*")))


def _held(worker: Any) -> int:
    """Objects the worker holds, over all its principals."""
    try:
        return sum(row.get("objects", 0) for row in worker.stats()["principals"].values())
    except Exception:  # noqa: BLE001 - reported as unknown
        return -1


def _error(exc: BaseException | None) -> str:
    if exc is None:
        return "(no error)"
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:150]}"


class _Forwarder:
    """127.0.0.1 TCP forwarder to ``target``; ``cut_after`` bytes upstream, it goes silent."""

    def __init__(self, target: tuple[str, int], cut_after: int | None = None) -> None:
        self.target, self.cut_after, self.forwarded = target, cut_after, 0
        self.cut_at: float | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.cut_at is None:
                server = socket.create_connection(self.target)
                self.sockets.append(server)
                for a, b, up in ((client, server, True), (server, client, False)):
                    threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        while self.cut_at is None:
            try:
                data = src.recv(1 << 16)
                if not data or self.cut_at is not None:
                    return
                dst.sendall(data)
            except OSError:
                return
            if up:
                self.forwarded += len(data)
                if self.cut_after is not None and self.forwarded >= self.cut_after:
                    self.cut_at = time.monotonic()

    def close(self) -> None:
        self.cut_at = self.cut_at or time.monotonic()
        self.listener.close()
        for s in self.sockets:
            s.close()


def _kind_kill(sy: Any, torch: Any, quick: bool) -> dict[str, Any]:
    bob, alice = _spawn(sy, "bob"), _spawn(sy, "alice")
    try:
        p, a = torch.ones(1000).send(bob), torch.ones(1000).send(alice)
        keep: list[Any] = []
        killed_at, error, ops = 0.0, None, 0
        stop = time.monotonic() + (6 if quick else 12)
        kill_after = time.monotonic() + 1.0
        tick = threading.Event()
        try:
            while time.monotonic() < stop:
                keep.append(p + 1)
                keep.append(a + 1)
                keep = keep[-20:]
                ops += 1
                if not killed_at and time.monotonic() >= kill_after:
                    bob._proc.kill()
                    killed_at = time.monotonic()
                tick.wait(0.01)  # ~100 ops/s, as a training loop would
            keep[-2].get()
        except Exception as exc:  # noqa: BLE001 - what we measure
            error = exc
        took = time.monotonic() - killed_at
        keep.clear()
        del p
        try:
            sy.sync()
        except Exception:  # noqa: BLE001 - bob is dead; what matters is alice
            pass
        a.get()
        del a
        try:
            sy.sync()
        except Exception:  # noqa: BLE001
            pass
        return {"detect_s": took, "error": _error(error), "_survivor": alice, "ops": ops}
    finally:
        bob.close()


def _kind_freeze(sy: Any, torch: Any, quick: bool) -> dict[str, Any]:
    bob = _spawn(sy, "bob")
    try:
        bob.ping()
        os.kill(bob._proc.pid, signal.SIGSTOP)
        start, error = time.monotonic(), None
        try:  # a large send (through shared memory): the segment it writes must not stay
            torch.ones((1 if quick else 25) << 20).send(bob)
        except Exception as exc:  # noqa: BLE001
            error = exc
        return {"detect_s": time.monotonic() - start, "error": _error(error)}
    finally:
        bob._proc.kill()  # (still frozen: it never maps what was sent to it)
        bob.close()


def _kind_refused(sy: Any, torch: Any, quick: bool) -> dict[str, Any]:
    bob = _spawn(sy, "bob", transport_kind="tcp")
    try:
        p = torch.ones(1000).send(bob)
        bob._proc.kill()
        bob._proc.wait(10)
        start, error = time.monotonic(), None
        try:
            (p + 1).get()
        except Exception as exc:  # noqa: BLE001
            error = exc
        first = time.monotonic() - start
        start, again = time.monotonic(), None
        try:
            torch.ones(4).send(bob)
        except Exception as exc:  # noqa: BLE001
            again = exc
        return {"detect_s": first, "error": _error(error),
                "note": f"a later call: {time.monotonic() - start:.2f}s, {_error(again)[:60]}"}
    finally:
        bob.close()


def _kind_lostlink(sy: Any, torch: Any, quick: bool) -> dict[str, Any]:
    bob = _spawn(sy, "bob", transport_kind="tcp")
    host, port = bob.address.removeprefix("tcp://").rsplit(":", 1)
    fwd = _Forwarder((host, int(port)))
    # large messages inside the link (as between two hosts without a sealed channel); set
    # before connecting: a connection keeps the sealed channel it was made with
    sy.configure(shm_threshold=0, sealed_threshold=0)
    far = sy.connect(f"tcp://127.0.0.1:{fwd.port}", worker_key=bob.key)
    try:
        far.ping()
        fwd.cut_after = fwd.forwarded + (4 << 20)
        error = None
        try:
            torch.ones((4 if quick else 25) << 20).send(far)
        except Exception as exc:  # noqa: BLE001
            error = exc
        took = time.monotonic() - (fwd.cut_at or time.monotonic())
        return {"detect_s": took, "error": _error(error), "_survivor": bob}
    finally:
        fwd.close()
        far.close()


def _kind_restart(sy: Any, torch: Any, quick: bool) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    sy.configure(insecure=True)

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "zmqsyft", "worker", "--id", "bob",
                                 "--insecure", "--bind", address], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        proc.stdout.readline()  # its "listening on" line
        _PIDS.add(proc.pid)
        return proc

    proc = start()
    bob = sy.connect(address)
    try:
        p = torch.ones(1000).send(bob)
        proc.kill()
        proc.wait(10)
        proc = start()
        notes, first, start_t = [], None, time.monotonic()
        for what, fn in (("old pointer .get()", lambda: p.get()),
                         ("new 2 MiB send", lambda: torch.ones(1 << 19).send(bob).get()),
                         ("new small send", lambda: torch.ones(4).send(bob).get())):
            t0 = time.monotonic()
            try:
                fn()
                notes.append(f"{what}: ok")
            except Exception as exc:  # noqa: BLE001
                first = first or exc
                notes.append(f"{what}: {type(exc).__name__} in {time.monotonic() - t0:.1f}s")
        return {"detect_s": time.monotonic() - start_t if first else float("nan"),
                "error": _error(first), "note": "; ".join(notes)}
    finally:
        proc.kill()
        proc.wait(10)
        bob.close()


def _child(kind: str, quick: bool) -> None:
    import torch

    import zmqsyft as sy
    sy.TorchHook(torch)
    result: dict[str, Any] = {"kind": kind}
    try:
        result.update(globals()[f"_kind_{kind}"](sy, torch, quick))
    except Exception as exc:  # noqa: BLE001 - reported, the script goes on
        result["crash"] = _error(exc)
    survivor = result.pop("_survivor", None)
    deadline = time.monotonic() + SETTLE
    tick = threading.Event()
    while _segments() > 0 and time.monotonic() < deadline:  # (sweepers run every second)
        tick.wait(0.1)
    result["segments"] = _segments()
    result["survivor_objects"] = _held(survivor) if survivor is not None else None
    if survivor is not None:
        survivor.close()
    print("RESULT " + json.dumps(result), flush=True)


def _run(kind: str, quick: bool, timeout: float) -> dict[str, Any]:
    # a private TMPDIR and segment directory per kind (inherited by the workers it starts):
    # what is counted is this kind's, not what other programs on the machine leave
    with tempfile.TemporaryDirectory(prefix="failures-tmp-") as tmp, \
            tempfile.TemporaryDirectory(prefix="failures-shm-",
                                        dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as shm:
        env = {**os.environ, "TMPDIR": tmp}
        if _private_shm():
            env["ZMQSYFT_SHM_DIR"] = shm
        result = _run_in(kind, quick, timeout, env)
        if "crash" not in result:
            result["tmp_dirs"] = len(_tmp_dirs(tmp))
        return result


def _run_in(kind: str, quick: bool, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, "--_kind", kind]
                            + (["--quick"] if quick else []), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"kind": kind, "crash": f"overran {timeout:g}s"}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it started and left running
        except ProcessLookupError:
            pass
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"kind": kind, "crash": f"exit {proc.returncode}: {err.strip()[-200:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every kind once, small tensors")
    parser.add_argument("--only", default=",".join(KINDS), help="comma-separated kinds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=180.0, help="per kind and round (s)")
    parser.add_argument("--json", default=None, help="also write every result here")
    parser.add_argument("--_kind", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._kind:
        _child(args._kind, args.quick)
        return
    rounds = args.rounds or (1 if args.quick else 3)
    kinds = [k for k in args.only.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose among {', '.join(KINDS)}")
    results = [_run(kind, args.quick, args.timeout) for _ in range(rounds) for kind in kinds]
    print(f"{'kind':9} {'fault->error':>12} {'segments':>8} {'tmp dirs':>8} {'survivor':>8}  error")
    for r in results:
        if "crash" in r:
            print(f"{r['kind']:9} {'-':>12} {'-':>8} {'-':>8} {'-':>8}  CRASHED: {r['crash']}")
            continue
        objects = "-" if r.get("survivor_objects") is None else str(r["survivor_objects"])
        print(f"{r['kind']:9} {r['detect_s']:>11.2f}s {r['segments']:>8} {r['tmp_dirs']:>8} "
              f"{objects:>8}  {r['error'][:110]}")
        if r.get("note"):
            print(f"{'':9} {'':>12} {'':>8} {'':>8} {'':>8}  ({r['note'][:110]})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
