#!/usr/bin/env python
"""How long N workers take to start, and how much memory each one has of its own.

    python benchmarks/bench_spawn.py              # 32 workers, with and without the fork server
    python benchmarks/bench_spawn.py --n 8

Each mode runs in a fresh client process of its own (``bench_spawn.py --_mode MODE``), one after
the other, so that the fork server starts cold and the modes never share the CPU:

forked      ``sy.spawn_workers(n)`` with the fork server (the default): the first spawn starts it
            (it imports torch once), every worker is a fork of it. A second batch of ``n``
            follows with the fork server already running ("forked, warm").
new interp  ``ZMQSYFT_FORKSERVER=0``: every worker is ``python -m zmqsyft worker``.

"ready" is the time from the first spawn until every worker has answered a ping. "USS" is the
memory a worker has of its own (``Private_Clean + Private_Dirty`` in
``/proc/<pid>/smaps_rollup``: what its exit would give back), read after each worker ran one op
(so that what estimating an op's cost needs is loaded, as in any worker that has served). The
fork server's own USS is paid once, whatever the number of workers.

Every worker is closed and reaped before the mode's process exits; a mode that overruns
``--timeout`` is killed with its process group. Nothing waits with sleeps.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

MIB = 1 << 20


def uss(pid: int) -> int:
    """Bytes of memory only process ``pid`` has (private clean + private dirty)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def _batch(sy: object, torch: object, n: int, prefix: str) -> dict[str, object]:
    start = time.monotonic()
    workers = sy.spawn_workers(n, prefix=prefix)  # type: ignore[attr-defined]
    spawned = time.monotonic() - start
    try:
        for w in workers:
            w.ping()
        ready = time.monotonic() - start
        for w in workers:  # one op each: what an op's cost estimate needs is loaded by then
            torch.ones(4).send(w).sum().get()  # type: ignore[attr-defined]
        sizes = [uss(w.pid) for w in workers]
        kind = type(workers[0]._proc).__name__ if workers else "-"
    finally:
        for w in workers:
            w.close()
    return {"spawned": spawned, "ready": ready, "uss": sizes, "kind": kind}


def run_mode(mode: str, n: int) -> None:
    """One mode, in this (fresh) process; prints one JSON line per batch."""
    import torch

    import zmqsyft as sy
    from zmqsyft.client import forks

    sy.TorchHook(torch)
    # (32 new interpreters importing torch at once on 2 vCPUs can take longer than the default
    # spawn timeout of 60 s: this run's own deadline applies instead)
    sy.configure(spawn_timeout=float(os.environ.get("BENCH_SPAWN_TIMEOUT", "600")))
    result = _batch(sy, torch, n, "cold")
    server = forks._server
    if mode == "forked" and server is not None:
        result["server_uss"] = uss(server.pid)
    print(json.dumps({"mode": mode, **result}), flush=True)
    if mode == "forked":
        print(json.dumps({"mode": "forked, warm", **_batch(sy, torch, n, "warm")}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32, help="workers per batch (default 32)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mode")
    parser.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._mode:
        run_mode(args._mode, args.n)
        return 0
    rows = []
    for mode, forkserver in (("forked", "1"), ("new interp", "0")):
        env = dict(os.environ, ZMQSYFT_FORKSERVER=forkserver, BENCH_SPAWN_TIMEOUT=str(args.timeout))
        proc = subprocess.Popen([sys.executable, __file__, "--_mode", mode, "--n", str(args.n)],
                                stdout=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            print(f"{mode}: killed after {args.timeout:g}s", file=sys.stderr)
            return 2
        if proc.returncode != 0:
            print(f"{mode}: exit status {proc.returncode}", file=sys.stderr)
            return 2
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(f"{args.n} workers, {os.cpu_count()} CPUs, torch threads default")
    print(f"{'mode':<14} {'process':<15} {'spawned s':>9} {'ready s':>8} "
          f"{'USS MiB median':>14} {'max':>6} {'server USS MiB':>14}")
    for row in rows:
        sizes = row["uss"]
        server = f"{row['server_uss'] / MIB:.0f}" if "server_uss" in row else "-"
        print(f"{row['mode']:<14} {row['kind']:<15} {row['spawned']:>9.2f} {row['ready']:>8.2f} "
              f"{statistics.median(sizes) / MIB:>14.1f} {max(sizes) / MIB:>6.1f} {server:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
