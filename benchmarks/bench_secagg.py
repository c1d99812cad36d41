#!/usr/bin/env python
"""One secure-aggregation round (PySyft Part 10) against plaintext aggregation, in one run.

    python benchmarks/bench_secagg.py                       # 1k, 100k and 1M float32, 10 rounds
    python benchmarks/bench_secagg.py --quick               # smoke mode (well under a minute)
    python benchmarks/bench_secagg.py --sizes 1000,250000 --rounds 20 --breakdown

Two data owners, bob and alice, each hold a model update of ``n`` float32 values (the same values
for every system: drawn from a generator seeded by the owner and ``n``). One round aggregates
them, four ways, measured in the same run with the systems taking turns in every repetition (the
order rotates from one repetition to the next):

secure     zmqsyft secure aggregation, PySyft Part 10 (examples/04_secure_aggregation.py): bob and
           alice are workers with ``sy.KeyPair.fresh()`` keys and ``sy.Policy`` objects trusting
           each other (and secure_worker, for the next row), which load their data themselves
           (``load=``); this program finds it with ``search()`` and makes each update on its
           owner's worker (``data * 1.0``, untimed); james is the crypto provider. The round:
           ``u.fix_precision().share(bob, alice, crypto_provider=james).get()`` for both
           updates, the two sharings added, ``.get().float_precision() / 2``.
plaintext  zmqsyft with a trusted aggregator, PySyft Part 4 (examples/03_trusted_aggregator.py):
           ``u.copy().move(secure_worker)`` for both updates (the owners push them there),
           ``((a + b) / 2).get()``.
rpc        torch.distributed.rpc (TensorPipe), plaintext: the aggregator (rank 0, this process)
           fetches both updates from the owner ranks with ``rpc_sync`` and averages them.
pyzmq      bare pyzmq, plaintext: each owner process (numpy and pyzmq only, its update loaded
           from a ``.npy`` file) has a DEALER that sends its update (one frame, ``copy=False``) to
           the aggregator's ROUTER (this process, ipc) when told to ("go"); the aggregator
           averages and replies with the average to each owner, which acknowledges it. The round
           is timed from the "go" to the second acknowledgement.

Bytes moved per round, for ``n`` values of 4 bytes: secure: per owner one share (8n bytes, int64)
to the other owner, then one share of the sum from each holder to this program (2 x 8n); plaintext
zmqsyft: 2 x 4n to secure_worker, 4n back; rpc: 2 x 4n; pyzmq: 2 x 4n in, 2 x 4n out. zmqsyft
uses its defaults (ipc, same-host shared memory from 1 MiB, CURVE); TensorPipe its own choice for
local peers. The zmqsyft rounds are followed (untimed) by ``sy.sync()``, so that the deletes
of their temporaries are done before the next system's round.

Torch's intra-op threads: every process (this one, 4 zmqsyft workers, 2 rpc ranks) runs with
torch's default (one thread per CPU) unless ``--torch-threads N`` sets ``OMP_NUM_THREADS``. With
more busy processes than CPUs, a parallel torch op can wait for a scheduler time slice (ms), so
the figures for 100k values and more depend on the setting and on the machine's load.

Every process this script starts is its child, dies with it (``PR_SET_PDEATHSIG``; zmqsyft
workers watch their parent) and is reaped in a ``finally``. Processes wait for each other through
handshakes (zmqsyft's ready signal, the rpc rendezvous, a hello frame), never through sleeps.
Only loopback: ipc sockets in private temporary directories and ``127.0.0.1``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

HERE = os.path.abspath(__file__)
SYSTEMS = ("secure", "plaintext", "rpc", "pyzmq")
LABELS = {
    "secure": "zmqsyft secure aggregation (fix_precision + share + sum + get)",
    "plaintext": "zmqsyft trusted aggregator (copy().move(secure_worker) x2, avg, get)",
    "rpc": "torch.rpc TensorPipe (rpc_sync fetch x2, avg)",
    "pyzmq": "bare pyzmq (DEALER x2 -> ROUTER, avg, reply)",
}
OWNERS = ("bob", "alice")
TOLERANCE = 1e-3  # secure result against the plaintext average (fixed point, 10**-3)

# frames received from ZeroMQ are read-only buffers that are ours alone: torch warns about it
warnings.filterwarnings("ignore", message="The given buffer is not writable")
warnings.filterwarnings("ignore", message=".*as a ProcessGroup.*")


def log(msg: str) -> None:
    print(f"[secagg {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def update_of(owner: int, n: int) -> Any:
    """Owner ``owner``'s model update of ``n`` float32 values: the same in every process."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * (owner + 1) + n)
    return torch.randn(n, generator=g, dtype=torch.float32) * 0.1


# ================================================================================ helpers
# (the child-process helpers are bench.py's: one copy for both benchmarks)
from bench import _pdeathsig, close_workers, free_port, reap, stop_rpc, write_report  # noqa: E402


def cpu_times() -> tuple[float, float]:
    """(machine busy CPU-s from /proc/stat, CPU-s of this process and its reaped children)."""
    import resource

    busy = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        own += ru.ru_utime + ru.ru_stime
    return busy, own


def machine_info() -> dict[str, Any]:
    import torch
    import zmq

    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f}"
    commit = "?"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", os.path.dirname(os.path.dirname(HERE)), "describe",
                                 "--always", "--dirty"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "kernel": platform.release(),
        "python": platform.python_version(), "torch": torch.__version__,
        "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "commit": commit,
    }


# ================================================================================ zmqsyft
class ZmqsyftSystems:
    """bob and alice (data owners with policies, their updates loaded from files), james (the
    crypto provider) and secure_worker (the Part 4 aggregator)."""

    def __init__(self, sizes: list[int], tmp: str, timeout: float) -> None:
        import torch

        import zmqsyft as sy

        self.sy = sy
        sy.TorchHook(torch)
        sy.configure(timeout=timeout, spawn_timeout=timeout)
        self.handles: list[Any] = []
        self.updates: dict[int, list[Any]] = {}
        try:
            self._start(sizes, tmp)
        except BaseException:  # the workers already started are closed and reaped
            self.close()
            raise

    def _start(self, sizes: list[int], tmp: str) -> None:
        import torch

        sy = self.sy
        files = []
        for i, name in enumerate(OWNERS):  # what each data owner has on its own disk
            path = os.path.join(tmp, f"{name}.pt")
            torch.save({f"u{n}": update_of(i, n) for n in sizes}, path)
            files.append(path)
        self.secure_worker = self._spawn("secure_worker")
        bob_keys, alice_keys = sy.KeyPair.fresh(), sy.KeyPair.fresh()
        # as in example 04 (each owner trusts the other to hold shares of its data), plus the
        # trusted aggregator of example 03, so that the same owners serve both rounds
        self.bob = self._spawn("bob", keys=bob_keys, load=files[0], tags=["#secagg"],
                               policy=sy.Policy(name="bob", trust=[alice_keys, self.secure_worker]))
        self.alice = self._spawn("alice", keys=alice_keys, load=files[1], tags=["#secagg"],
                                 policy=sy.Policy(name="alice",
                                                  trust=[bob_keys, self.secure_worker]))
        self.james = self._spawn("james")  # the crypto provider (a sum needs no triple)
        self.sizes = sizes

    def _spawn(self, name: str, **kw: Any) -> Any:
        w = self.sy.spawn_worker(name, **kw)
        self.handles.append(w)
        return w

    def ready(self) -> None:
        """Wait for the workers; make each owner's update on its own worker from its loaded data."""
        for w in self.handles:
            w.ping()
        for n in self.sizes:
            pointers = []
            for owner in (self.bob, self.alice):
                data, = owner.search("#secagg", f"#u{n}")
                pointers.append(data * 1.0)  # the update: private to its owner, on its worker
            self.updates[n] = pointers
        self.sy.sync()

    def secure_round(self, n: int) -> Any:
        bob, alice, james = self.bob, self.alice, self.james
        shared = [u.fix_precision().share(bob, alice, crypto_provider=james).get()
                  for u in self.updates[n]]
        return (shared[0] + shared[1]).get().float_precision() / 2

    def plaintext_round(self, n: int) -> Any:
        moved = [u.copy().move(self.secure_worker) for u in self.updates[n]]
        return ((moved[0] + moved[1]) / 2).get()

    def secure_phases(self, n: int) -> dict[str, float]:
        """The secure round with a synchronisation point after each phase (the --breakdown)."""
        sy, bob, alice, james = self.sy, self.bob, self.alice, self.james
        times: dict[str, float] = {}
        t0 = time.perf_counter_ns()
        fixed = [u.fix_precision() for u in self.updates[n]]
        sy.sync()
        t1 = time.perf_counter_ns()
        shared = [f.share(bob, alice, crypto_provider=james).get() for f in fixed]
        sy.sync()
        t2 = time.perf_counter_ns()
        total = shared[0] + shared[1]
        sy.sync()
        t3 = time.perf_counter_ns()
        total.get().float_precision() / 2
        t4 = time.perf_counter_ns()
        times["encode: fix_precision on each owner's worker (x2)"] = (t1 - t0) / 1e9
        times["share: split on the owner's worker, one share moved to the other owner (x2)"] = (t2 - t1) / 1e9
        times["add the two sharings on each holder"] = (t3 - t2) / 1e9
        times["reconstruct: get one share of the sum from each holder, add, decode"] = (t4 - t3) / 1e9
        return times

    def plaintext_phases(self, n: int) -> dict[str, float]:
        sy = self.sy
        times: dict[str, float] = {}
        t0 = time.perf_counter_ns()
        moved = [u.copy().move(self.secure_worker) for u in self.updates[n]]
        sy.sync()
        t1 = time.perf_counter_ns()
        avg = (moved[0] + moved[1]) / 2
        sy.sync()
        t2 = time.perf_counter_ns()
        avg.get()
        t3 = time.perf_counter_ns()
        times["copy on each owner's worker, move to secure_worker (x2)"] = (t1 - t0) / 1e9
        times["average on secure_worker"] = (t2 - t1) / 1e9
        times["get the average"] = (t3 - t2) / 1e9
        return times

    def settle(self) -> None:
        """Untimed, after each round: the deletes of its temporaries are acknowledged, so that
        they do not land in another system's round."""
        self.sy.sync()

    def close(self) -> None:
        self.updates.clear()
        close_workers(self.handles)  # (closed, reaped, their ipc directories removed)


# ================================================================================ torch rpc
# Run by the rpc ranks; module-level, so that rpc pickles them by name (every rank runs this
# file as __main__).
_UPDATES: dict[int, Any] = {}
RPC_NAMES = ("aggregator", "bob", "alice")


def rpc_update(n: int) -> Any:
    return _UPDATES[n]


def _rpc_init(rank: int, timeout: float) -> None:
    import torch.distributed.rpc as rpc

    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=timeout,
                                           init_method="env://")
    rpc.init_rpc(RPC_NAMES[rank], rank=rank, world_size=3, rpc_backend_options=opts)


def rpc_rank_main(rank: int, sizes: list[int], timeout: float) -> int:
    """An owner rank: make its updates, join, serve until the aggregator shuts the group down."""
    import torch.distributed.rpc as rpc

    for n in sizes:
        _UPDATES[n] = update_of(rank - 1, n)
    _rpc_init(rank, timeout)
    rpc.shutdown(graceful=True)
    return 0


class RpcSystem:
    def __init__(self, sizes: list[int], timeout: float) -> None:
        self.timeout = timeout
        self.procs: list[subprocess.Popen] = []
        self.initialised = False
        for rank in (1, 2):
            self.procs.append(subprocess.Popen(
                [sys.executable, HERE, "--_rpc-rank", str(rank), "--_timeout", str(timeout),
                 "--sizes", ",".join(map(str, sizes))],
                stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig))

    def ready(self) -> None:
        import torch.distributed.rpc as rpc

        _rpc_init(0, self.timeout)  # the rendezvous is the handshake
        self.initialised = True
        self.rpc = rpc

    def round(self, n: int) -> Any:
        a = self.rpc.rpc_sync("bob", rpc_update, args=(n,))
        b = self.rpc.rpc_sync("alice", rpc_update, args=(n,))
        return (a + b) / 2

    def phases(self, n: int) -> dict[str, float]:
        t0 = time.perf_counter_ns()
        a = self.rpc.rpc_sync("bob", rpc_update, args=(n,))
        b = self.rpc.rpc_sync("alice", rpc_update, args=(n,))
        t1 = time.perf_counter_ns()
        (a + b) / 2
        t2 = time.perf_counter_ns()
        return {"rpc_sync fetch of both updates": (t1 - t0) / 1e9,
                "average on the aggregator": (t2 - t1) / 1e9}

    def close(self) -> None:
        clean = False
        try:
            if self.initialised:
                self.rpc.shutdown(graceful=True, timeout=self.timeout)
                clean = True
        except Exception as exc:  # noqa: BLE001 - reap the ranks anyway
            log(f"rpc shutdown failed: {exc!r}")
        finally:
            stop_rpc(self.rpc, self.initialised, clean, self.procs, self.timeout)


# ================================================================================ bare pyzmq
def pyzmq_owner_main(owner: int, endpoint: str, parent: int, files: list[str]) -> int:
    """An owner: a DEALER that sends its update (loaded from its own files, ``.npy``) when told
    to ("go"), and acknowledges the average it gets back ("avg"), until "stop" or until its parent
    is gone. No torch here: the owner only sends bytes and receives bytes."""
    import numpy as np
    import zmq

    updates = {}
    for path in files:
        u = np.load(path)
        updates[u.size] = u
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(opt, val)
    sock.setsockopt(zmq.ROUTING_ID, OWNERS[owner].encode())
    sock.connect(endpoint)
    try:
        sock.send(b"hello")
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:
                    return 0
                continue
            frames = sock.recv_multipart(copy=False)
            kind = frames[0].bytes
            if kind == b"go":
                sock.send_multipart([b"update", updates[int(frames[1].bytes)]], copy=False)
            elif kind == b"avg":
                avg = np.frombuffer(frames[1].buffer, dtype=np.float32)
                sock.send_multipart([b"ack", str(avg.size).encode()])
            elif kind == b"stop":
                return 0
    finally:
        sock.close(linger=0)
        ctx.term()


class PyzmqSystem:
    def __init__(self, sizes: list[int], tmp: str, timeout: float) -> None:
        import numpy as np
        import zmq

        self.zmq = zmq
        self.timeout_ms = int(timeout * 1000)
        self.tmp = tempfile.mkdtemp(prefix="secagg-zmq-")
        self.endpoint = f"ipc://{os.path.join(self.tmp, 'aggregator.sock')}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            self.sock.setsockopt(opt, val)
        self.sock.bind(self.endpoint)
        self.idents = [name.encode() for name in OWNERS]
        self.procs = []
        for i, name in enumerate(OWNERS):  # each owner's updates, on its own disk
            files = []
            for n in sizes:
                files.append(os.path.join(tmp, f"{name}-{n}.npy"))
                np.save(files[-1], update_of(i, n).numpy())
            self.procs.append(subprocess.Popen(
                [sys.executable, HERE, "--_pyzmq-owner", str(i), "--_endpoint", self.endpoint,
                 "--_parent", str(os.getpid()), "--_files", ",".join(files)],
                stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig))

    def _recv(self) -> list[Any]:
        if not self.sock.poll(self.timeout_ms):
            dead = [p.pid for p in self.procs if p.poll() is not None]
            raise TimeoutError(f"pyzmq owners did not answer (exited: {dead or 'none'})")
        return self.sock.recv_multipart(copy=False)

    def ready(self) -> None:
        """Each owner's first frame (hello) says it is connected and has made its updates."""
        seen = set()
        while len(seen) < len(self.idents):
            frames = self._recv()
            if frames[1].bytes == b"hello":
                seen.add(frames[0].bytes)

    def round(self, n: int) -> Any:
        import torch

        for ident in self.idents:
            self.sock.send_multipart([ident, b"go", str(n).encode()])
        got: dict[bytes, Any] = {}
        while len(got) < len(self.idents):
            frames = self._recv()
            got[frames[0].bytes] = torch.frombuffer(frames[2].buffer, dtype=torch.float32)
        avg = (got[self.idents[0]] + got[self.idents[1]]) / 2
        payload = avg.numpy()
        for ident in self.idents:
            self.sock.send_multipart([ident, b"avg", payload], copy=False)
        acks = 0
        while acks < len(self.idents):
            frames = self._recv()
            if frames[1].bytes == b"ack" and int(frames[2].bytes) == n:
                acks += 1
        return avg

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for ident in self.idents:
                self.sock.send_multipart([ident, b"stop"])
        for p in self.procs:
            reap(p, timeout=5.0)
        self.sock.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ================================================================================ the run
def one_repetition(rounds: dict[str, Callable[[int], Any]], n: int, rep: int,
                   settle: Callable[[str], None]) -> tuple[dict[str, float], dict[str, Any]]:
    """One round of every system (name -> round function) for ``n`` values, in an order rotated
    by ``rep`` so that no system always goes first: the seconds each round took and what it
    gave. ``settle(system)`` runs after each round, untimed. (bench.py's secure-aggregation rows
    take their turns through this too.)"""
    names = list(rounds)
    k = rep % len(names)
    times: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    for s in names[k:] + names[:k]:
        t0 = time.perf_counter_ns()
        outputs[s] = rounds[s](n)
        times[s] = (time.perf_counter_ns() - t0) / 1e9
        settle(s)
    return times, outputs


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        mult = 1
        for suffix, m in (("k", 1_000), ("m", 1_000_000)):
            if part.endswith(suffix):
                part, mult = part[:-1], m
        value = int(float(part) * mult)
        if value < 1:
            raise argparse.ArgumentTypeError(f"a size is a positive number of values, not {part!r}")
        sizes.append(value)
    return sizes


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def fmt_size(n: int) -> str:
    nbytes = 4 * n
    human = f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} KiB"
    return f"{n:,} float32 values ({human} per update)"


def render(n: int, samples: dict[str, list[float]], checks: dict[str, float]) -> str:
    out = [f"size {fmt_size(n)}, {len(samples['secure'])} rounds"]
    width = max(len(v) for v in LABELS.values())
    out.append(f"  {'system'.ljust(width)}  {'median ms':>10}  {'[min-max] ms':>18}")
    for s in SYSTEMS:
        vals = samples[s]
        spread = f"[{fmt_ms(min(vals))}-{fmt_ms(max(vals))}]"
        out.append(f"  {LABELS[s].ljust(width)}  {fmt_ms(statistics.median(vals)):>10}  "
                   f"{spread:>18}")
    out.append("  ratio (of medians; [min-max] of the per-repetition ratios)")
    for num, den, name in (("secure", "plaintext", "secure / plaintext-zmqsyft"),
                           ("secure", "rpc", "secure / rpc"),
                           ("plaintext", "rpc", "plaintext-zmqsyft / rpc"),
                           ("plaintext", "pyzmq", "plaintext-zmqsyft / pyzmq")):
        ratio = statistics.median(samples[num]) / statistics.median(samples[den])
        per = [a / b for a, b in zip(samples[num], samples[den], strict=True)]
        out.append(f"    {name.ljust(28)} {ratio:8.2f}x  [{min(per):.2f}-{max(per):.2f}]")
    diff = checks["secure_vs_plaintext"]
    verdict = "OK" if diff <= TOLERANCE else "FAIL"
    out.append(f"  check: max |secure - plaintext average| = {diff:.2e} (<= {TOLERANCE:g}: {verdict});"
               f" plaintext zmqsyft, rpc, pyzmq against the local average: "
               f"{checks['plaintext_vs_ref']:.1e}, {checks['rpc_vs_ref']:.1e}, "
               f"{checks['pyzmq_vs_ref']:.1e}")
    return "\n".join(out)


def render_phases(n: int, phases: dict[str, dict[str, list[float]]]) -> str:
    out = [f"breakdown, size {fmt_size(n)} (a synchronisation point after each phase; "
           f"medians of {len(next(iter(phases['secure'].values())))} rounds)"]
    for system, rows in phases.items():
        total = sum(statistics.median(v) for v in rows.values())
        out.append(f"  {system} (sum of phases {fmt_ms(total)} ms)")
        for name, vals in rows.items():
            out.append(f"    {fmt_ms(statistics.median(vals)):>8} ms  {name}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    import torch

    sizes = args.sizes
    # a SIGTERM unwinds like Ctrl-C, through the finally below that closes and reaps everything
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    info = machine_info()
    load0 = os.getloadavg()
    cpu0 = cpu_times()
    t_start = time.monotonic()
    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TP_SOCKET_IFNAME="lo",
                      GLOO_SOCKET_IFNAME="lo")
    tmp = tempfile.mkdtemp(prefix="secagg-")
    zs = rpcs = zq = None
    results: dict[int, dict[str, Any]] = {}
    failed = False
    try:
        # everything starts in parallel; each ready() is a handshake with a deadline
        zs = ZmqsyftSystems(sizes, tmp, args.timeout)
        rpcs = RpcSystem(sizes, args.timeout)
        zq = PyzmqSystem(sizes, tmp, args.timeout)
        zs.ready()
        rpcs.ready()
        zq.ready()
        log(f"set up in {time.monotonic() - t_start:.1f}s")
        rounds: dict[str, Callable[[int], Any]] = {
            "secure": zs.secure_round, "plaintext": zs.plaintext_round,
            "rpc": rpcs.round, "pyzmq": zq.round,
        }

        def settle(system: str) -> None:
            if system in ("secure", "plaintext"):
                zs.settle()
        for n in sizes:
            reference = (update_of(0, n) + update_of(1, n)) / 2
            samples: dict[str, list[float]] = {s: [] for s in SYSTEMS}
            worst = {s: 0.0 for s in SYSTEMS}
            secure_vs_plain = 0.0
            for rep in range(args.warmup + args.rounds):
                times, outputs = one_repetition(rounds, n, rep, settle)
                if rep >= args.warmup:
                    for s, dt in times.items():
                        samples[s].append(dt)
                for s, out in outputs.items():
                    assert out.shape == reference.shape and out.dtype == torch.float32, (s, out)
                    worst[s] = max(worst[s], (out - reference).abs().max().item())
                secure_vs_plain = max(secure_vs_plain, (outputs["secure"] - outputs["plaintext"])
                                      .abs().max().item())
                del outputs
            checks = {"secure_vs_plaintext": secure_vs_plain, "secure_vs_ref": worst["secure"],
                      "plaintext_vs_ref": worst["plaintext"], "rpc_vs_ref": worst["rpc"],
                      "pyzmq_vs_ref": worst["pyzmq"]}
            results[n] = {"samples": samples, "checks": checks}
            log(f"n={n}: " + ", ".join(f"{s} {fmt_ms(statistics.median(v))} ms"
                                       for s, v in samples.items()))
            if secure_vs_plain > TOLERANCE:
                failed = True
            if args.breakdown:
                phases: dict[str, dict[str, list[float]]] = {"secure": {}, "plaintext": {},
                                                             "rpc": {}}
                fns = {"secure": zs.secure_phases, "plaintext": zs.plaintext_phases,
                       "rpc": rpcs.phases}
                for rep in range(args.warmup + args.rounds):
                    for s, fn in fns.items():
                        times = fn(n)
                        if s != "rpc":
                            zs.settle()
                        if rep >= args.warmup:
                            for name, v in times.items():
                                phases[s].setdefault(name, []).append(v)
                results[n]["phases"] = phases
    finally:
        for system in (zq, rpcs, zs):
            if system is not None:
                try:
                    system.close()
                except Exception as exc:  # noqa: BLE001 - close the others anyway
                    log(f"closing {type(system).__name__} failed: {exc!r}")
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - t_start
    cpu1 = cpu_times()  # (every child is reaped now: its CPU time is in RUSAGE_CHILDREN)
    load1 = os.getloadavg()
    ncpu = os.cpu_count() or 1
    foreign = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]))

    out = [f"zmqsyft secure aggregation benchmark{' (QUICK smoke mode)' if args.quick else ''}",
           f"date     {info['date']}",
           f"machine  {info['cpu']}, {info['cores']} CPUs, {info['memory_gib']} GiB, "
           f"Linux {info['kernel']}",
           f"software python {info['python']}, torch {info['torch']}, pyzmq {info['pyzmq']} "
           f"(libzmq {info['libzmq']}), zmqsyft at {info['commit']}",
           "command  " + " ".join([os.path.basename(sys.executable), os.path.relpath(HERE)]
                                  + sys.argv[1:]),
           f"threads  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')} "
           f"(torch intra-op threads: {torch.get_num_threads()} in this process)",
           f"reps     {args.rounds} timed rounds per system and size (+{args.warmup} warm-up), "
           "systems taking turns, order rotated each repetition",
           f"load     loadavg {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start, "
           f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at end; other processes used "
           f"{foreign:.1f} CPU-s ({100 * foreign / (total * ncpu):.0f}% of the machine) "
           f"during the {total:.0f} s run",
           ""]
    for n in sizes:
        out.append(render(n, results[n]["samples"], results[n]["checks"]))
        out.append("")
    for n in sizes:
        if "phases" in results[n]:
            out.append(render_phases(n, results[n]["phases"]))
            out.append("")
    print("\n".join(out).rstrip(), flush=True)
    if args.json:
        write_report(args.json, info, args, load0, load1, foreign, total,
                     results={str(n): r for n, r in results.items()})
    if failed:
        print(f"\nFAILED: the secure result differs from the plaintext average by more than "
              f"{TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=parse_sizes, default=None,
                    help="comma-separated update sizes in float32 values, 1k/1m suffixes allowed "
                         "(default 1k,100k,1m; quick: 1k,100k)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds per system and size (default 10; quick: 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed rounds first (default 2; quick: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: 1k and 100k, 2 rounds")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each phase of the zmqsyft rounds (with a sync after each)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="deadline of every request and handshake, seconds (default 60)")
    ap.add_argument("--torch-threads", type=int, default=None, metavar="N",
                    help="OMP_NUM_THREADS/MKL_NUM_THREADS=N in this process and every process it "
                         "starts (default: torch's own choice)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw samples as JSON")
    # internal entry points of the child processes
    ap.add_argument("--_rpc-rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--_pyzmq-owner", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--_files", help=argparse.SUPPRESS)
    ap.add_argument("--_parent", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = [1_000, 100_000] if args.quick else [1_000, 100_000, 1_000_000]
    if args._rpc_rank is not None:
        return rpc_rank_main(args._rpc_rank, args.sizes, args._timeout)
    if args._pyzmq_owner is not None:
        return pyzmq_owner_main(args._pyzmq_owner, args._endpoint, args._parent,
                                args._files.split(","))
    if args.torch_threads is not None:  # before torch is imported here; inherited by children
        if args.torch_threads < 1:
            ap.error("--torch-threads must be at least 1")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.torch_threads)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be at least 1 and --warmup at least 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
