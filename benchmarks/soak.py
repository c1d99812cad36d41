"""Soak test: random ops, chains, moves and kills for N seconds, checked against a local shadow.

Run: ``python benchmarks/soak.py --seconds 300 --kill-every 60 --seed 1``

The driver (this process) makes keys, starts ``--workers`` shell workers (``python -m zmqsyft
worker``, fixed ipc address and key, ``--lease 2``) and ``--clients`` client processes (each its
own session and key). Each client runs a seeded random mix of sends, pipelined arithmetic,
in-place ops, ``.get()``, ``.move()``, pointer chains, ``remote_get``, deletes, ``sy.sync()`` and
``worker._objects``, repeats every op on a local shadow tensor and checks every ``.get()`` against
it. A killer thread SIGKILLs a random worker every ``--kill-every`` seconds and starts it again
at the same address. A ``CommunicationError`` is expected after a kill: the client then forgets
its shadow of everything on the workers involved and goes on; any other exception, a wrong value
or a call over 10 s is a failure. At the end: no object left on any worker (admin ``_objects``,
after the leases ran out), no shared-memory segment of these processes, nothing left in the
run's private ``TMPDIR``, no child process. Exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

# findings of this soak not fixed yet (see tests/test_soak_findings.py), name -> what: none now
# (chain-not-found and restarted-holder, soak findings 2 and 1, are fixed)
KNOWN: dict[str, str] = {}
MAX_CALL = 10.0  # seconds: a single call longer than this is a failure
LEASE = 2.0
ENV = {"ZMQSYFT_LEASE": str(LEASE), "ZMQSYFT_SHM_THRESHOLD": "4096"}  # small tensors use shm too


# ===================================================================== client process
@dataclass(eq=False)
class Entry:
    """One remote value the client owns, and its local shadow."""

    ptr: Any
    shadow: Any
    workers: set[str]
    chain: bool = False  # a pointer (at workers[-1]) to a pointer (at the data's worker)
    square: bool = False


@dataclass
class Client:
    index: int
    rng: random.Random
    workers: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    max_call: float = 0.0
    max_what: str = ""
    slow: list[str] = field(default_factory=list)
    checked: int = 0
    known: frozenset[str] = frozenset()
    touched: set[str] = field(default_factory=set)  # the workers the current op involves

    # ------------------------------------------------------------ bookkeeping
    def timed(self, what: str, fn: Any, *args: Any) -> Any:
        start = time.monotonic()
        try:
            return fn(*args)
        finally:
            took = time.monotonic() - start
            if took > self.max_call:
                self.max_call, self.max_what = took, f"{what} at {time.strftime('%H:%M:%S')}"
            if took > MAX_CALL:
                self.slow.append(f"{what} took {took:.1f}s (until {time.strftime('%H:%M:%S')})")

    def forget(self, names: set[str], also: tuple[Entry, ...] = ()) -> None:
        """Drop the shadow of everything touching ``names`` (a worker was lost)."""
        keep: list[Entry] = []
        for e in self.entries:
            if e.workers & names or any(e is a for a in also):
                continue
            keep.append(e)
        dropped = len(self.entries) - len(keep)
        self.entries = keep
        self.ops["forgotten"] += dropped
        gc.collect()

    def check(self, what: str, got: Any, want: Any) -> None:
        import torch

        self.checked += 1
        if (not isinstance(got, torch.Tensor) or got.shape != want.shape
                or not torch.allclose(got, want, rtol=1e-9, atol=1e-9, equal_nan=True)):
            self.failures.append(f"WRONG VALUE from {what}: got {got!r}, expected {want!r}")

    # ------------------------------------------------------------ the ops
    def pick(self, chain: bool | None = None) -> Entry | None:
        cands = [e for e in self.entries if chain is None or e.chain == chain]
        if not cands:
            return None
        e = self.rng.choice(cands)
        self.touched |= e.workers
        return e

    def other(self, name: str) -> Any:
        other = self.rng.choice([n for n in self.workers if n != name])
        self.touched.add(other)
        return self.workers[other]

    def tensor(self) -> tuple[Any, bool]:
        import torch

        n = self.rng.choice([3, 4, 8])
        if self.rng.random() < 0.4:
            shape: tuple[int, ...] = (n, n)
        elif self.rng.random() < 0.15:
            shape = (self.rng.choice([2048, 20000]),)  # 16 KiB+: shared memory
        else:
            shape = (n,)
        gen = torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        return torch.randint(-5, 6, shape, generator=gen).double(), len(shape) == 2

    def op_send(self) -> None:
        name = self.rng.choice(list(self.workers))
        self.touched.add(name)
        t, square = self.tensor()
        ptr = self.timed("send", t.clone().send, self.workers[name])
        self.entries.append(Entry(ptr, t, {name}, square=square))

    def op_arith(self) -> None:
        e = self.pick()
        if e is None:
            return self.op_send()
        kind = self.rng.choice(["add", "mul", "sum", "matmul", "add_other"])
        s = float(self.rng.choice([-1, 2, 3, 0.5]))
        if kind == "add":
            ptr, val = self.timed("add", lambda: e.ptr + s), e.shadow + s
        elif kind == "mul":
            ptr, val = self.timed("mul", lambda: e.ptr * s), e.shadow * s
        elif kind == "sum":
            ptr, val = self.timed("sum", lambda: e.ptr.sum()), e.shadow.sum()
        elif kind == "matmul" and e.square:
            ptr, val = self.timed("matmul", lambda: e.ptr @ e.ptr), e.shadow @ e.shadow
        else:
            mates = [f for f in self.entries if f is not e and f.workers == e.workers
                     and f.ptr.location is e.ptr.location and f.chain == e.chain and f.shadow.shape == e.shadow.shape]
            if not mates:
                kind = "add"
                ptr, val = self.timed("add", lambda: e.ptr + s), e.shadow + s
            else:
                f = self.rng.choice(mates)
                self.touched |= f.workers
                kind = "add_other"
                ptr, val = self.timed("add_other", lambda: e.ptr + f.ptr), e.shadow + f.shadow
        self.ops[("chain_" if e.chain else "") + kind] += 1
        self.entries.append(Entry(ptr, val, set(e.workers), e.chain,
                                  e.square and kind != "sum"))

    def op_inplace(self) -> None:
        e = self.pick()
        if e is None:
            return
        s = float(self.rng.choice([-2, 1, 3]))
        if self.rng.random() < 0.5:
            self.timed("add_", e.ptr.add_, s)
            e.shadow = e.shadow + s
        else:
            self.timed("mul_", e.ptr.mul_, s)
            e.shadow = e.shadow * s
        self.ops["chain_inplace" if e.chain else "inplace"] += 1

    def op_get(self) -> None:
        e = self.pick()
        if e is None:
            return
        self.entries.remove(e)
        if e.chain:
            inner = self.timed("chain .get()", e.ptr.get)
            got = self.timed("inner .get()", inner.get)
            self.ops["chain_get"] += 1
        else:
            got = self.timed(".get()", e.ptr.get)
            self.ops["get"] += 1
        self.check(f"{'chain ' if e.chain else ''}.get() via {sorted(e.workers)}", got, e.shadow)

    def op_move(self) -> None:
        e = self.pick(chain=False)
        if e is None:
            return
        (name,) = e.workers
        target = self.other(name)
        e.workers = {name, target.id}  # in doubt until it returns
        self.timed(".move()", e.ptr.move, target)
        e.workers = {target.id}
        self.ops["move"] += 1

    def op_chain(self) -> None:
        e = self.pick(chain=False)
        if e is None:
            return
        (name,) = e.workers
        middle = self.other(name)
        self.entries.remove(e)
        ptr = self.timed("chain .send()", e.ptr.send, middle)
        self.entries.append(Entry(ptr, e.shadow, {name, middle.id}, True, e.square))
        self.ops["chain_send"] += 1

    def op_remote_get(self) -> None:
        e = self.pick(chain=True)
        if e is None:
            return
        e.ptr = self.timed(".remote_get()", e.ptr.remote_get)
        e.chain = False
        e.workers = {e.ptr.location.id}
        self.ops["remote_get"] += 1

    def op_delete(self) -> None:
        e = self.pick()
        if e is None:
            return
        self.entries.remove(e)
        del e
        if self.rng.random() < 0.3:
            gc.collect()
        self.ops["delete"] += 1

    def op_sync(self) -> None:
        import zmqsyft as sy

        self.timed("sy.sync()", sy.sync)
        self.ops["sync"] += 1

    def op_objects(self) -> None:
        name = self.rng.choice(list(self.workers))
        self.touched.add(name)
        objects = self.timed("_objects", lambda: self.workers[name]._objects)
        for e in self.entries:
            if e.workers == {name} and not e.chain and e.ptr.id_at_location not in objects:
                self.failures.append(
                    f"MISSING OBJECT: {e.ptr.id_at_location} of a live pointer is not in "
                    f"{name}._objects ({len(objects)} objects)")
        self.ops["objects"] += 1

    OPS = (("op_send", 3), ("op_arith", 6), ("op_inplace", 2), ("op_get", 3), ("op_move", 1),
           ("op_chain", 1), ("op_remote_get", 1), ("op_delete", 2), ("op_sync", 0.5),
           ("op_objects", 0.3))

    def step(self) -> None:
        import zmqsyft as sy

        names, weights = zip(*self.OPS, strict=True)
        op = self.rng.choices(names, weights)[0]
        if len(self.entries) > 40 and op in ("op_send", "op_arith"):
            op = "op_delete"
        self.touched = set()
        try:
            getattr(self, op)()
        except sy.CommunicationError as exc:
            self.errors[type(exc).__name__] += 1
            # objects on the workers named, and on every worker this op touched (sync(): all)
            named = set(re.findall(r"'([^']+)'", str(exc)))  # 'w1' (relayed by 'w2')
            self.forget((named & set(self.workers) | self.touched) or set(self.workers))
        except Exception as exc:  # noqa: BLE001 - every other error (ObjectNotFound) is a failure
            self.errors[type(exc).__name__] += 1
            self.failures.append(f"UNEXPECTED {type(exc).__name__} in {op} at "
                                 f"{time.strftime('%H:%M:%S')}: {exc}\n"
                                 + traceback.format_exc())


def client_main(args: argparse.Namespace) -> int:
    import torch

    import zmqsyft as sy
    from zmqsyft.keys import KeyPair

    with open(os.path.join(args.run_dir, "run.json")) as f:
        run = json.load(f)
    sy.TorchHook(torch)
    # a fresh process's first pointer op waits for torch to import torch._dynamo (the hook's
    # warm-up, 7-15 s on two loaded cores): done here, timed apart, not counted as a call
    start = time.monotonic()
    meta = torch.empty(3, 3, device="meta", dtype=torch.float64)
    ((meta + 2.0) * 0.5 + meta @ meta).sum()
    meta.add_(1.0).mul_(2.0)
    for t in threading.enumerate():
        if t.name == "zmqsyft-warm-up":
            t.join(60)
    warm_up = time.monotonic() - start
    keys = KeyPair.load(os.path.join(run["keys"], f"client{args.client_index}.key_secret"))
    workers: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    for name, address in run["workers"].items():
        while True:
            try:
                workers[name] = sy.connect(address, worker_key=os.path.join(run["keys"], f"{name}.key"),
                                           keys=keys)
                break
            except sy.CommunicationError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the killer restarts it: poll, with a deadline
    c = Client(args.client_index, random.Random(args.seed * 1000 + args.client_index), workers,
               known=frozenset(args.known))
    end = time.monotonic() + args.seconds
    while time.monotonic() < end and len(c.failures) < 5:
        c.step()
    # the end: drop every pointer; the leases free what a dead worker's peers still hold
    c.entries.clear()
    gc.collect()
    try:
        c.timed("final sy.sync()", sy.sync)
    except sy.CommunicationError as exc:
        c.errors[type(exc).__name__] += 1
    c.failures.extend(c.slow)
    with open(os.path.join(args.run_dir, f"client{args.client_index}.json"), "w") as f:
        json.dump({"ops": c.ops, "errors": c.errors, "failures": c.failures,
                   "max_call": c.max_call, "max_what": c.max_what, "warm_up": warm_up, "checked": c.checked}, f)
    for failure in c.failures:
        print(f"client{c.index}: {failure}", file=sys.stderr)
    return 1 if c.failures else 0


# ===================================================================== driver
class Workers:
    """The shell workers, each restartable at its fixed address with its fixed key."""

    def __init__(self, run_dir: str, keys: str, count: int, env: dict[str, str]) -> None:
        self.run_dir, self.keys, self.env = run_dir, keys, env
        self.names = [f"w{i}" for i in range(count)]
        self.address = {n: f"ipc://{run_dir}/{n}.sock" for n in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: set[int] = set()
        self.lock = threading.Lock()

    def start(self, name: str) -> None:
        cmd = [sys.executable, "-m", "zmqsyft", "worker", "--id", name, "--bind",
               self.address[name], "--keys", self.keys, "--allow", self.keys,
               "--admin", os.path.join(self.keys, "driver.key"), "--lease", str(LEASE)]
        log = open(os.path.join(self.run_dir, f"{name}.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log, env=self.env)
        log.close()
        self.pids.add(proc.pid)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else b""
        if b"listening on" not in line:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"worker {name} did not start: {line!r}")
        with self.lock:
            self.procs[name] = proc

    def kill(self, name: str) -> None:
        with self.lock:
            proc = self.procs.pop(name)
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def stop_all(self) -> list[str]:
        problems = []
        for name, proc in list(self.procs.items()):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                problems.append(f"worker {name} did not exit within 15 s of SIGTERM")
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        self.procs.clear()
        return problems


def leftovers_objects(workers: Workers, keys: str) -> list[str]:
    """Objects still on each worker, polled as admin until the leases ran out (deadline)."""
    import zmqsyft as sy
    from zmqsyft.keys import KeyPair

    me = KeyPair.load(os.path.join(keys, "driver.key_secret"))
    left = []
    deadline = time.monotonic() + LEASE + 30
    for name in workers.names:
        w = sy.connect(workers.address[name], worker_key=os.path.join(keys, f"{name}.key"), keys=me)
        objects = w._objects
        while objects and time.monotonic() < deadline:
            time.sleep(0.25)  # the worker frees them when the lease runs out: poll with a deadline
            objects = w._objects
        if objects:
            holders = {k: v for k, v in w.stats()["principals"].items() if v["objects"]}
            line = (f"{name}: {len(objects)} objects held by {holders}: "
                    f"{[(k, tuple(getattr(v, 'shape', ()))) for k, v in objects.items()][:5]}")
            left.append(line)
        w.close()
    return left


def driver_main(args: argparse.Namespace) -> int:
    run_dir = tempfile.mkdtemp(prefix="zsoak-", dir="/tmp")
    tmp = os.path.join(run_dir, "tmp")
    keys = os.path.join(run_dir, "keys")
    os.mkdir(tmp)
    os.environ.update(ENV, TMPDIR=tmp)
    tempfile.tempdir = None
    import torch

    import zmqsyft as sy
    from zmqsyft.keys import new_keypair

    sy.TorchHook(torch)
    for name in [f"w{i}" for i in range(args.workers)] + [
            f"client{i}" for i in range(args.clients)] + ["driver"]:
        new_keypair(name, keys)
    env = dict(os.environ)
    workers = Workers(run_dir, keys, args.workers, env)
    started = time.monotonic()
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"keys": keys, "workers": workers.address}, f)
    # clients start (import torch) while the workers do; they connect when the workers are up
    clients = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client-index", str(i),
                                 "--run-dir", run_dir, "--seed", str(args.seed),
                                 "--seconds", str(args.seconds),
                                 *(f"--known={k}" for k in args.known)], env=env)
               for i in range(args.clients)]
    all_pids = {os.getpid(), *(c.pid for c in clients)}
    threads = [threading.Thread(target=workers.start, args=(n,)) for n in workers.names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"soak: workers up at {time.monotonic() - started:.0f}s", flush=True)
    stop = threading.Event()
    kills: list[str] = []
    rng = random.Random(args.seed)

    def killer() -> None:
        while args.kill_every > 0 and not stop.wait(args.kill_every):
            name = rng.choice(workers.names)
            workers.kill(name)
            kills.append(f"{name}@{time.strftime('%H:%M:%S')}")
            workers.start(name)

    kt = threading.Thread(target=killer, daemon=True)
    kt.start()
    failures: list[str] = []
    for i, c in enumerate(clients):
        try:
            rc = c.wait(args.seconds + 120)
        except subprocess.TimeoutExpired:
            c.kill()
            rc = c.wait()
            failures.append(f"client{i} did not finish within {args.seconds + 120}s: killed")
        if rc != 0:
            failures.append(f"client{i} exited with {rc}")
    stop.set()
    kt.join(120)
    ops: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    max_call, max_what, checked, warm_up = 0.0, "", 0, 0.0
    for i in range(args.clients):
        try:
            with open(os.path.join(run_dir, f"client{i}.json")) as f:
                got = json.load(f)
        except OSError:
            failures.append(f"client{i} wrote no summary")
            continue
        ops.update(got["ops"])
        errors.update(got["errors"])
        if got["max_call"] > max_call:
            max_call, max_what = got["max_call"], f"client{i}: {got['max_what']}"
        checked += got["checked"]
        warm_up = max(warm_up, got["warm_up"])
        failures.extend(f"client{i}: {x.splitlines()[0]}" for x in got["failures"])
    print(f"soak: clients done at {time.monotonic() - started:.0f}s", flush=True)
    objects_left = leftovers_objects(workers, keys)
    failures.extend(workers.stop_all())
    all_pids |= workers.pids
    from zmqsyft.wire import shm

    shm_dir = os.path.join(shm.DIRECTORY, f"zmqsyft-{os.getuid()}")
    segments = [n for n in (os.listdir(shm_dir) if os.path.isdir(shm_dir) else [])
                if (m := re.match(r"zmqsyft-(\d+)-", n)) and int(m.group(1)) in all_pids]
    tmp_left = [n for n in os.listdir(tmp) if n.startswith(("zmqsyft-", "zs-"))]
    children = [p for p in _children(os.getpid()) if p != os.getpid()]
    print(f"soak: {args.seconds}s, seed {args.seed}, {args.workers} workers, {args.clients} "
          f"clients, kill every {args.kill_every}s; took {time.monotonic() - started:.0f}s")
    print(f"ops: {dict(sorted(ops.items()))}")
    print(f"values checked: {checked}")
    print(f"errors: {dict(sorted(errors.items()))}")
    print(f"max call: {max_call:.2f}s ({max_what}); clients' torch warm-up before the first "
          f"op (not a call): up to {warm_up:.1f}s")
    print(f"kills: {len(kills)} ({', '.join(kills)})")
    print(f"objects left: {objects_left or 'none'}")
    print(f"segments left: {segments or 'none'}")
    print(f"temp files left: {tmp_left or 'none'}")
    print(f"child processes left: {children or 'none'}")
    failures += [f"objects left: {x}" for x in objects_left]
    failures += [f"segment left: {x}" for x in segments]
    failures += [f"temp file left: {x}" for x in tmp_left]
    failures += [f"child process left: {x}" for x in children]
    for x in failures:
        print(f"FAILURE: {x}")
    print("soak: PASS" if not failures else f"soak: FAIL ({len(failures)} failures)")
    if not failures and not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        print(f"run directory (logs): {run_dir}")
    return 0 if not failures else 1


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kill-every", type=float, default=60, help="seconds; 0: never")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    p.add_argument("--known", action="append", default=[], choices=KNOWN,
                   help="count a known finding (tests/test_soak_findings.py) without failing: "
                        + ("; ".join(f"{k}: {v}" for k, v in KNOWN.items()) or "none now"))
    p.add_argument("--client-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client_index is not None:
        return client_main(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
