"""Which shared-memory segments' creators are dead (:mod:`zmqsyft.wire.shm`). No sockets here.

Every process that writes segments holds an ``flock`` on a file ``live-<pid>-<token>`` in the
segment directory for as long as it lives (the kernel drops the lock when it dies, however it
dies), and its segments are named ``zmqsyft-<pid>-<token><random>``. A segment whose creator's
lock can be taken, or whose creator has no live file any more and whose pid does not run, is an
orphan: no live process will ever name it again.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import time

__all__ = ["NAME", "LIVE", "make_token", "sweep_orphans"]

# zmqsyft-<creator pid>-<creator's token: 16 hex><random: 16 hex>
NAME = re.compile(r"zmqsyft-([0-9]{1,10})-([0-9a-f]{16})[0-9a-f]{16}")
LIVE = re.compile(r"live-([0-9]{1,10})-([0-9a-f]{16})")


def make_token(directory: str) -> tuple[str, int]:
    """A fresh token for this process and the descriptor holding its live file's lock (keep it
    open for as long as the process lives)."""
    token = secrets.token_hex(8)
    path = os.path.join(directory, f"live-{os.getpid()}-{token}")
    # locked under a name no sweeper looks at, then renamed: never seen unlocked
    fd = os.open(path + ".new", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(path + ".new", path)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path + ".new")
        raise
    return token, fd


def sweep_orphans(directory: str, mine: str = "", min_age: float = 0.0) -> list[str]:
    """Unlink the segments in ``directory`` whose creator process is dead and that are older
    than ``min_age`` seconds, and the live files of dead processes; return the segments' names.
    ``mine``: this process's token (its segments are its own business)."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    dead: dict[str, int | None] = {}  # token -> fd holding its lock (None: no live file)
    try:
        for name in names:
            match = NAME.fullmatch(name)
            if match is None or match[2] == mine:
                continue
            if not _creator_dead(directory, match, dead):
                continue
            path = os.path.join(directory, name)
            try:
                if now - os.lstat(path).st_mtime < min_age:
                    continue
                os.unlink(path)
            except OSError:
                continue
            removed.append(name)
        for name in names:  # the live files of the dead: gone once their segments are
            match = LIVE.fullmatch(name)
            if match is not None and match[2] != mine and _creator_dead(directory, match, dead):
                _unlink_quietly(os.path.join(directory, name))
    finally:
        for fd in dead.values():
            if fd is not None:
                os.close(fd)
    return removed


def _creator_dead(directory: str, match: re.Match[str], dead: dict[str, int | None]) -> bool:
    """Whether the process that made token ``match[2]`` is dead: its live file's lock can be
    taken (then held in ``dead`` until the sweep ends), or it has no live file and that pid is
    not running."""
    token = match[2]
    if token in dead:
        return True
    try:
        fd = os.open(os.path.join(directory, f"live-{match[1]}-{token}"),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if _alive(int(match[1])):
            return False  # (one from before live files, or a sweeper raced us: its pid runs)
        dead[token] = None
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # held: its creator lives
    dead[token] = fd
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True
