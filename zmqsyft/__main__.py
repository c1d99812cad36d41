"""Command line: ``zmqsyft worker --id bob --bind tcp://127.0.0.1:5555 --keys DIR --allow DIR``.

The worker prints the endpoint it bound (``port 0`` picks a free one) and its public key, and
serves until it gets a ``SHUTDOWN`` (from an admin), SIGTERM or Ctrl-C. Every connection is
CURVE (authenticated, encrypted) and accepted only from the keys it was given (``--allow``,
``--admin``, ``--trust``). ``--insecure`` turns that off, loudly, and only on loopback or ipc
unless ``--insecure-network`` is given too. ``zmqsyft keys new NAME`` makes key pairs.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import stat
import sys
import threading
from dataclasses import replace

__all__ = ["main"]

LOG_LEVELS = ("debug", "info", "warning", "error")
LIMITS = {  # Config fields a worker's command line sets (see sy.Config for each one's meaning)
    "max_store_bytes": "most tensor bytes the worker holds (default: 3/4 of memory)",
    "max_connection_bytes": "most tensor bytes one session's objects may hold (a client, "
                            "however many connections; default: half of --max-store-bytes)",
    "max_op_flops": "most estimated floating-point operations one op may cost (default 1e12)",
    "max_connections": "most connections served at once (default 1024)",
    "max_peer_links": "most links kept to other workers (default 256)",
    "max_message_size": "largest message accepted, bytes (default 4GiB; -1: no limit)",
    "max_frames": "most frames in one message (default 65536; 0: no limit)",
}


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        sys.exit(0)


# what the fork server imports once for all its workers: the worker, and what estimating an op's
# cost loads (meta kernels, sympy; imported, never run: no torch op before a fork; no _dynamo)
PRELOAD = ("torch", "zmqsyft.worker", "zmqsyft.worker.costs", "torch._meta_registrations",
           "torch._decomp", "torch._refs", "torch._prims", "torch.fx.experimental.symbolic_shapes",
           "sympy")


def _forkserver(args: argparse.Namespace) -> int:
    """``zmqsyft forkserver``: started by a client (``zmqsyft.client.forks``), never by hand."""
    from . import forkserver, metakernels

    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in PRELOAD:
        importlib.import_module(name)
    metakernels.spare_dynamo()  # (before the freeze: a worker must not rescan what it shares)
    # a collection in a worker then never writes to the pages it shares with us (none here
    # first: it took 0.15 s of the cold start and found nothing to free)
    gc.freeze()
    return forkserver.serve(args.fd, _forked)


def _forked(argv: list[str]) -> int:
    """A forked worker's start: what the fork server cached from its own environment is read
    again from the worker's (given by then), then the command line is run."""
    import tempfile

    from . import config

    tempfile.tempdir = None
    config._current = None
    return main(argv)


def _trust_token(args: argparse.Namespace, spawned: dict[str, object]) -> str:
    """The token whose presenters may send pickled code: from a file only this user can read,
    from the pipe a spawning parent wrote it to, or from ``ZMQSYFT_TRUST_TOKEN`` (then taken out
    of the environment, so that nothing this worker starts inherits it). Never from argv, which
    every local user reads in ``/proc/<pid>/cmdline``. Raises ``ValueError`` saying what is
    wrong."""
    if args.trust_token is not None:
        raise ValueError(
            "--trust-token puts the token in this process's command line, which every local user "
            "can read (/proc/<pid>/cmdline), and the token lets its holder run code as you. Write "
            "it to a file only you can read (chmod 600 FILE) and pass --trust-token-file FILE")
    token = os.environ.pop("ZMQSYFT_TRUST_TOKEN", "")
    if args.token_fd is not None:
        given = spawned.get("token")
        token = given if isinstance(given, str) else ""
    if args.trust_token_file is not None:
        token = _read_private(args.trust_token_file)
    return token


def _read_private(path: str) -> str:
    """A secret's text from a regular file of this user's that nobody else may read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ValueError(f"cannot read the trust token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, encoding="utf-8") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise ValueError(f"the trust token file {path} must be a regular file of your own")
        if info.st_mode & 0o077:
            raise ValueError(
                f"the trust token file {path} is readable by others (mode "
                f"{stat.S_IMODE(info.st_mode):o}): anyone who reads it can run code as you. "
                f"chmod 600 {path}")
        token = f.read().strip()
    if not token:
        raise ValueError(f"the trust token file {path} is empty")
    return token


def _spawned(args: argparse.Namespace) -> dict[str, object]:
    """What a spawning parent wrote to the pipe ``--token-fd``: its trust token, its public key
    (the worker's admin, trusted) and the keys of its other workers (JSON)."""
    import json

    with os.fdopen(args.token_fd, encoding="utf-8") as pipe:
        text = pipe.read()
    try:
        got = json.loads(text)
    except ValueError:
        raise ValueError("the spawning parent's pipe did not hold what a worker expects") from None
    if not isinstance(got, dict):
        raise ValueError("the spawning parent's pipe did not hold what a worker expects")
    return got


def _policy(args: argparse.Namespace, spawned: dict[str, object]) -> object:
    """The loaded data's policy: ``--policy``, or the spawning client's, with ``--owner``."""
    from .keys import public_key
    from .privacy import Policy

    policy = Policy.from_file(args.policy) if args.policy else None
    given = spawned.get("policy")
    if policy is None and isinstance(given, dict):
        policy = Policy(**given)
    if args.owner:
        policy = replace(policy or Policy(), owner=public_key(args.owner).decode("ascii"))
    return policy


def _access(args: argparse.Namespace, spawned: dict[str, object], insecure: bool) -> object:
    """The keys the worker accepts, and their rights, from its flags and its parent."""
    from .keys import load_dir, public_key
    from .worker.access import Access, Principal

    access = Access(insecure=insecure)
    if insecure:
        return access
    for directory in args.allow:
        for name, key in load_dir(directory).items():
            access.allow(Principal(key.decode(), name))
    for flag, admin, trusted in (("admin", True, False), ("trust", False, True)):
        for path in getattr(args, flag):
            name = os.path.basename(path).split(".key")[0]
            access.allow(Principal(public_key(path).decode(), name, admin=admin, trusted=trusted))
    parent = spawned.get("key")
    if isinstance(parent, str) and parent:
        name = spawned.get("name")
        access.allow(Principal(public_key(parent).decode(),
                               name if isinstance(name, str) and name else "parent",
                               admin=True, trusted=True))
    peers = spawned.get("peers")
    for entry in peers if isinstance(peers, list) else ():
        if isinstance(entry, list) and len(entry) == 2:
            access.allow(Principal(public_key(str(entry[1])).decode(), str(entry[0])[:64]))
    return access


def _worker(args: argparse.Namespace) -> int:
    from . import heap, metakernels
    from .config import check_endpoint, from_environ
    from .keys import KeyPair
    from .wire import shm, transport
    from .worker import Worker, costs

    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # every connection to the worker takes a descriptor, as does every tensor it maps: a soft
    # limit of a few hundred would let a few hundred idle connections lock everyone else out
    shm.make_fd_room()
    try:
        cfg = from_environ()
        if args.insecure:
            cfg = replace(cfg, insecure=True)
        if args.any_peer:
            cfg = replace(cfg, any_peer=True)
        cfg = replace(cfg, **{name: value for name in ("timeout", "lease", *LIMITS)
                              if (value := getattr(args, name)) is not None})
        check_endpoint(args.bind, "--bind", bind=True)
        if args.bulk_bind is not None:
            check_endpoint(args.bulk_bind, "--bulk-bind", bind=True)
    except ValueError as exc:
        print(f"zmqsyft worker '{args.id}': {exc}", file=sys.stderr)
        return 2
    heap.keep_freed(cfg.malloc_keep)  # (freed tensors' pages are used again, up to a bound)
    if cfg.insecure and not transport.is_loopback(args.bind) and not args.insecure_network:
        print(f"zmqsyft worker '{args.id}': refusing to bind {args.bind} without authentication "
              "(--insecure): anyone who can reach it could read, change and take every object "
              "and stop it. Drop --insecure (connections are then CURVE: give clients' keys with "
              "--allow DIR), or add --insecure-network on a network whose every host you trust.",
              file=sys.stderr)
        return 2
    if args.log_level.lower() not in LOG_LEVELS:
        print(f"zmqsyft worker '{args.id}': log level {args.log_level!r} (--log-level, or "
              f"ZMQSYFT_LOG_LEVEL) is not one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker[{args.id}] %(name)s: %(message)s")
    log = logging.getLogger("zmqsyft.worker")
    try:
        spawned = _spawned(args) if args.token_fd is not None else {}
        token = _trust_token(args, spawned)
        access = _access(args, spawned, cfg.insecure)
        keys = None
        pair = spawned.get("worker_key")
        if isinstance(pair, list) and len(pair) == 2 and not cfg.insecure:
            keys = KeyPair(str(pair[0]).encode("ascii"), str(pair[1]).encode("ascii"))
        elif args.keys is not None and not cfg.insecure:
            keys = KeyPair.load(os.path.join(args.keys, f"{args.id}.key_secret"))
        policy = _policy(args, spawned)
    except (ValueError, OSError) as exc:
        text = getattr(exc, "strerror", None) or str(exc)
        if isinstance(exc, OSError) and exc.filename:
            text = f"{exc.filename}: {text} (make it with: zmqsyft keys new {args.id} --dir {args.keys})"
        print(f"zmqsyft worker '{args.id}': {text}", file=sys.stderr)
        return 2
    if cfg.insecure:
        log.warning(
            "worker %s runs INSECURE (--insecure / ZMQSYFT_INSECURE): no authentication, no "
            "encryption; every connection may read, change and take every object and stop it",
            args.id)
    try:
        worker = Worker(args.id, args.bind, cfg, parent_pid=args.parent_pid,
                        trust_tokens=frozenset([token]) if token else frozenset(), keys=keys,
                        access=access, bulk_bind=args.bulk_bind, policy=policy)
    except Exception as exc:  # noqa: BLE001 - report, do not trace
        print(f"zmqsyft worker '{args.id}': cannot bind {args.bind}: {exc}", file=sys.stderr)
        return 1

    try:
        for path in args.load:
            worker.load(path, args.tag)
    except Exception as exc:  # noqa: BLE001 - report, do not trace
        print(f"zmqsyft worker '{args.id}': cannot load {path}: {exc}", file=sys.stderr)
        worker.close()
        return 1

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    log.info("worker %s: started, pid %d, listening on %s, key %s", args.id, os.getpid(),
             worker.address, f"{worker.key[:8]}..." if worker.key else "none (INSECURE)")
    # torch and the loaded data are here for good: keep them out of the garbage collector's
    # full passes, which would otherwise rescan them every few thousand requests (after the scan)
    metakernels.spare_dynamo()
    gc.freeze()
    shm.sweep_orphans()  # segments of killed processes that no message will ever name again
    if args.ready_fd is not None:
        with os.fdopen(args.ready_fd, "w") as ready:
            ready.write(f"READY {worker.address} {os.getpid()} {worker.key or '-'}\n")
    else:
        print(f"zmqsyft worker '{args.id}' listening on {worker.address}"
              + (f" with key {worker.key}" if worker.key else " INSECURE (no key)")
              + (f"; {len(access)} client keys allowed" if worker.key else "")
              + ("" if len(access) or not worker.key else
                 " (nobody can connect: give clients' public keys with --allow DIR or --admin "
                 "KEYFILE)")
              + (f"; large messages sealed on {worker.sealed.endpoint}" if worker.sealed else ""),
              flush=True)
    # every op's cost is estimated before it runs; load what that needs while nothing is asked yet
    warm = threading.Thread(target=costs.warm_up, name="zmqsyft-warm-up", daemon=True)
    warm.start()
    try:
        worker.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        log.info("worker %s: shut down", args.id)
        # the interpreter must not finalise under a thread still inside torch's imports (it
        # aborts): a worker stopped in its first second waits for the warm-up to end
        while warm.is_alive():
            try:
                warm.join()
            except (KeyboardInterrupt, SystemExit):  # a second SIGTERM or Ctrl-C: still wait
                pass
    return 0


def _whole(raw: str) -> int:
    from .config import parse_int

    try:
        return parse_int(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _keys(args: argparse.Namespace) -> int:
    from .keys import load_public, new_keypair

    try:
        public_file, secret_file = new_keypair(args.name, args.dir)
    except (ValueError, OSError) as exc:
        print(f"zmqsyft keys: {exc}", file=sys.stderr)
        return 2
    print(f"public key {load_public(public_file).decode()}\n  {public_file}  (give this one to "
          f"whoever must recognise '{args.name}')\n  {secret_file}  (mode 600: keep it private)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zmqsyft`` command."""
    parser = argparse.ArgumentParser(prog="zmqsyft", description="zmqsyft worker processes")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run a worker process")
    w.add_argument("--id", required=True, help="the worker's name, e.g. bob")
    w.add_argument("--bind", default="tcp://127.0.0.1:0",
                   help="endpoint to bind (default tcp://127.0.0.1:0: loopback, a free port)")
    w.add_argument("--bulk-bind", default=None, metavar="ENDPOINT",
                   help="where to bind the bulk socket, on which large messages travel sealed "
                        "(AES-256-GCM) beside the CURVE connections; default: the --bind host on "
                        "a free port (a firewall must let it through too)")
    w.add_argument("--insecure", action="store_true",
                   help="no authentication, no encryption: anyone who can connect may do "
                        "anything (loopback and ipc only, unless --insecure-network)")
    w.add_argument("--insecure-network", action="store_true",
                   help="with --insecure: allow binding a non-loopback address")
    w.add_argument("--keys", default=None, metavar="DIR",
                   help="the worker's key pair is DIR/ID.key_secret (zmqsyft keys new ID --dir "
                        "DIR); default: a fresh key each start, printed")
    w.add_argument("--allow", action="append", default=[], metavar="DIR",
                   help="accept connections from every public key NAME.key in DIR (clients, peer "
                        "workers); repeatable")
    w.add_argument("--admin", action="append", default=[], metavar="KEYFILE",
                   help="a public key that may also stop the worker, see every object and all "
                        "statistics (repeatable)")
    w.add_argument("--trust", action="append", default=[], metavar="KEYFILE",
                   help="a public key that may also send pickled code (run(), modules), which "
                        "runs as this worker's user (repeatable)")
    w.add_argument("--any-peer", action="store_true",
                   help="link to any peer worker whose public key comes with a pointer or a "
                        "move (still CURVE with that key); default: only keys given with --allow, "
                        "--admin, --trust or by the spawner. Who may connect here is unchanged")
    w.add_argument("--lease", type=float, default=None, metavar="SECONDS",
                   help="how long a disconnected client's objects are kept for it (default 60)")
    w.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for a peer worker's reply (default from ZMQSYFT_TIMEOUT, or 60)")
    w.add_argument("--log-level", metavar="{" + ",".join(LOG_LEVELS) + "}",
                   default=os.environ.get("ZMQSYFT_LOG_LEVEL") or os.environ.get("ZMQSYFT_LOG")
                   or "warning",
                   help="what the worker logs on stderr: info says what it does (start, "
                        "connections, peer links, shutdown), debug every request too (default "
                        "from ZMQSYFT_LOG_LEVEL, which spawned workers inherit, or warning)")
    w.add_argument("--load", action="append", default=[], metavar="FILE",
                   help="a torch.save'd tensor or dict of tensors to hold as this worker's own "
                        "data (repeatable); loaded with weights_only=True")
    w.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="a search tag for the loaded data, e.g. '#diabetes' (repeatable)")
    w.add_argument("--policy", default=None, metavar="FILE",
                   help="the data owner's release rules for the loaded data (TOML: name, owner, "
                        "k, trust, allow; see the README). Default: private to this worker")
    w.add_argument("--owner", default=None, metavar="KEYFILE",
                   help="the public key of the loaded data's owner, who may take it raw "
                        "(overrides the policy's owner)")
    w.add_argument("--trust-token-file", default=None, metavar="FILE",
                   help="let connections that present the token in FILE (mode 600; "
                        "sy.connect(address, trust_token=...)) send pickled code and modules; "
                        "without it this worker accepts no pickle. Also read from "
                        "ZMQSYFT_TRUST_TOKEN (then removed from the environment)")
    w.add_argument("--trust-token", default=None, help=argparse.SUPPRESS)  # refused: argv is public
    w.add_argument("--token-fd", type=int, default=None, help=argparse.SUPPRESS)
    limits = w.add_argument_group(
        "limits", "what one request, connection or the worker may use; a refusal says which "
        "limit it met. Whole numbers may be written 8GiB, 512MiB, 2G, 1e12. Also read from "
        "ZMQSYFT_<NAME> environment variables; a flag wins")
    for name, meaning in LIMITS.items():
        limits.add_argument("--" + name.replace("_", "-"), type=_whole, default=None,
                            metavar="N", help=meaning)
    w.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    w.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    f = sub.add_parser("forkserver", help="(started by spawn_worker: forks workers)")
    f.add_argument("--parent-pid", type=int, required=True)
    f.add_argument("--fd", type=int, required=True)
    k = sub.add_parser("keys", help="make and show CURVE key pairs")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    new = ksub.add_parser("new", help="make a key pair NAME.key (public) / NAME.key_secret (mode 600)")
    new.add_argument("name", help="the key's name, e.g. alice")
    new.add_argument("--dir", default=None, help="where to put it (default ~/.zmqsyft/keys)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    if args.command == "keys":
        return _keys(args)
    if args.command == "forkserver":
        return _forkserver(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
