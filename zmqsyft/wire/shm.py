"""Same-host transfers of large tensors through shared memory (``/dev/shm``). No sockets here.

Between two processes on one machine a socket moves every byte twice (into the kernel and out
again, in chunks, through ZeroMQ's I/O threads). Instead, a sender writes a large tensor's bytes
into a fresh file in ``/dev/shm`` with one ``write`` and sends only the file's name; the receiver
maps the file, unlinks it at once and builds its tensor over the mapping. The data is written once
and never copied again; the memory goes back to the system when the receiver's tensor is freed.

Moves cost no copy at all: a worker that gives up a tensor it received this way (``move``) sends
its process id, the descriptor its mapping keeps open and the segment's name; the receiver opens
the same file through ``/proc/<pid>/fd/<fd>`` and maps it (:func:`take_over`). A receiver that
cannot (another user, a process that is not dumpable) raises ``HandoverRefused`` and the sender
sends the bytes instead.

Who may use it: both ends must see the same ``/dev/shm`` (same machine, same mount) and run as the
same user; :func:`host_key` captures that (boot id, the tmpfs mount's device and inode, the uid)
and the two ends compare keys in their ``HELLO``. Segments live in a directory of their own user
(``/dev/shm/zmqsyft-<uid>``, mode 0700), so other users can neither list nor open them, and a
segment's name (128 random bits) is a secret only its sender and receiver know; a take-over must
present it. A receiver only accepts names this module makes, only regular files of its own user
of exactly the announced size, and never follows a symlink.

Leaks: the receiver unlinks a segment as soon as it has mapped it. A sender unlinks the segments of
a request as soon as it is answered, failed, timed out or its peer lost (:func:`discard`, called by
the request core), what is left after ``max_age`` seconds, and all at exit. A sender killed leaves
segments nobody will take; every process that uses shared memory holds an ``flock`` on a file
``live-<pid>-<token>`` in the segment directory for as long as it lives, its segments' names carry
that token, and a sweeper thread (every ``SWEEP_EVERY`` seconds, in every zmqsyft process that
uses shared memory) removes the segments whose creator's lock can be taken: it is dead. A segment
whose creator lives is never removed by another process; a handed-over segment has no name in the
directory any more (its first receiver unlinked it), so no sweeper can touch it.
``ZMQSYFT_SHM_DIR`` names another directory than ``/dev/shm`` (tests use a private one).

File descriptors: Python's ``mmap`` keeps a descriptor of the file open for as long as the mapping
lives (before Python 3.13), so every tensor received this way holds one (which is what a take-over
opens). The first receive raises the process's soft ``RLIMIT_NOFILE`` to its hard limit; should
descriptors still run out, a segment is read into ordinary memory instead (one copy, no
descriptor kept).
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import mmap
import os
import resource
import secrets
import stat
import threading
import time
import weakref
from typing import Any

from ..errors import HandoverRefused, ProtocolError
from . import shm_live

__all__ = ["DIRECTORY", "host_key", "segment_dir", "write", "fresh", "open_segment", "held_segment",
           "may_take_over", "take_over", "sweep", "sweep_orphans", "outstanding", "make_fd_room",
           "discard", "SWEEP_EVERY"]

DIRECTORY = os.environ.get("ZMQSYFT_SHM_DIR") or "/dev/shm"
SWEEP_EVERY = 1.0  # seconds between two sweeps of a process's sweeper thread
# zmqsyft-<creator pid>-<creator's token: 16 hex><random: 16 hex>
_NAME = shm_live.NAME
_live: tuple[int, str, int] | None = None  # (pid, token, fd of the locked live file)
_sweeper: tuple[int, threading.Thread] | None = None  # (pid, thread)
_CHUNK = 1 << 30  # one write() moves at most this much
_lock = threading.Lock()
_created: dict[str, float] = {}  # segment name -> monotonic time it was written
_key: str | None = None
_dir: str | None = None
_fd_room = False  # the soft limit on open files has been raised (once per process)
# start address of each mapped segment this process received -> (name, size, weak ref to the map,
# the descriptor the map keeps if known)
_held: dict[int, tuple[str, int, weakref.ref[mmap.mmap], int | None]] = {}


def host_key() -> str:
    """What two processes must share to exchange segments; ``""`` if shared memory is unusable."""
    global _key
    if _key is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            st = os.stat(DIRECTORY)
            segment_dir()
            _key = f"{boot}:{st.st_dev}:{st.st_ino}:{os.getuid()}"
        except OSError:
            _key = ""
    return _key


def segment_dir() -> str:
    """This user's directory of segments, created on first use (mode 0700).

    Raises ``OSError`` if ``/dev/shm`` is missing or read-only, or if the directory exists but is
    not a private directory of this user (then shared memory is not used: sockets carry tensors).
    """
    global _dir
    if _dir is None:
        path = os.path.join(DIRECTORY, f"zmqsyft-{os.getuid()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise OSError(errno.EPERM, f"{path} is not a directory of this user only")
        _dir = path
    _start_sweeper()
    return _dir


def _token() -> str:
    """This process's liveness token: its ``live-<pid>-<token>`` file is locked while it lives."""
    global _live
    pid = os.getpid()
    if _live is None or _live[0] != pid:  # (a forked child makes its own)
        directory = segment_dir()
        with _lock:
            if _live is None or _live[0] != pid:
                token, fd = shm_live.make_token(directory)
                _live = (pid, token, fd)
    return _live[1]


def _start_sweeper() -> None:
    """Start this process's sweeper thread (once per process)."""
    global _sweeper
    if _sweeper is not None and _sweeper[0] == os.getpid():
        return
    with _lock:
        if _sweeper is None or _sweeper[0] != os.getpid():
            thread = threading.Thread(target=_sweep_forever, name="zmqsyft-shm-sweeper",
                                      daemon=True)
            _sweeper = (os.getpid(), thread)
            thread.start()


def _sweep_forever() -> None:
    me = os.getpid()
    while _sweeper is not None and _sweeper[0] == me:
        time.sleep(SWEEP_EVERY)  # (a timer: nothing to wait for)
        try:
            sweep(_max_age)
            sweep_orphans()
        except Exception:  # noqa: BLE001 - a sweeper never dies of one bad entry
            pass


def write(buf: Any, max_age: float) -> str:
    """Write ``buf`` (a contiguous byte buffer) into a new segment; return the segment's name."""
    global _max_age
    _max_age = max_age
    sweep(max_age)
    name = f"zmqsyft-{os.getpid()}-{_token()}{secrets.token_hex(8)}"
    path = os.path.join(segment_dir(), name)
    view = memoryview(buf).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with _lock:
            _created[name] = time.monotonic()
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done:done + _CHUNK])
    except BaseException:
        _unlink(name)
        raise
    finally:
        os.close(fd)
    return name


def fresh(nbytes: int) -> mmap.mmap | None:
    """A new segment of ``nbytes`` bytes, mapped here and already unlinked: memory for a result
    computed straight into it, which a same-host peer can then take over (:func:`take_over`)
    instead of receiving a copy. ``None`` when that cannot be had: no ``/dev/shm``, no room in
    it (its pages are reserved here, so a full ``/dev/shm`` says so now, never with a ``SIGBUS``
    while the result is being written), or no file descriptor left."""
    if not _fd_room:
        make_fd_room()
    try:
        name = f"zmqsyft-{os.getpid()}-{_token()}{secrets.token_hex(8)}"
        path = os.path.join(segment_dir(), name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    try:
        os.unlink(path)  # (only this process has it from now on, and nothing can be left of it)
        os.posix_fallocate(fd, 0, nbytes)
        mapped = _map(fd, name, nbytes)
    except OSError:
        return None
    finally:
        os.close(fd)
    return mapped if isinstance(mapped, mmap.mmap) else None


def make_fd_room() -> None:
    """Raise the soft limit on open files to the hard one (each received tensor keeps one; a
    worker calls this at start, as every connection to it takes one too)."""
    global _fd_room
    _fd_room = True
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass  # as it is: _read_segment is the fallback


def _read_segment(fd: int, nbytes: int) -> bytearray:
    """The segment's bytes copied into ordinary memory (no file descriptor kept)."""
    data = bytearray(nbytes)
    view = memoryview(data)
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:done + _CHUNK]], done)
        if got <= 0:
            raise ProtocolError(f"shared-memory segment ended after {done} of {nbytes} bytes")
        done += got
    return data


def open_segment(name: Any, nbytes: int) -> mmap.mmap | bytearray:
    """Map a segment a peer wrote (read-write, private to this process from now on) and unlink it.

    Raises ``ProtocolError`` if the name is not one of ours, the file is gone, belongs to another
    user, is not a regular file or has another size than announced.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ProtocolError(f"invalid shared-memory segment name {name!r}")
    path = os.path.join(segment_dir(), name)
    if not _fd_room:
        make_fd_room()
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise ProtocolError(
                f"shared-memory segment {name} cannot be opened: this process has too many "
                "open files (each tensor received through shared memory keeps one while it "
                "lives); raise the limit (ulimit -n), or send such tensors through the socket "
                "(zmqsyft.configure(shm_threshold=0) on the sending side)") from None
        raise ProtocolError(
            f"shared-memory segment {name} cannot be opened ({exc.strerror}); its sender may "
            "have given up on it (it waited longer than its timeout) or exited") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ProtocolError(f"shared-memory segment {name} is not a regular file of this user")
        try:
            os.unlink(path)  # ours now: nobody else can open it, the memory lives as long as the map
        except FileNotFoundError:
            pass  # (its sender gave up on it meanwhile: we have it open all the same)
        if st.st_size != nbytes:
            raise ProtocolError(
                f"shared-memory segment {name} holds {st.st_size} bytes, the message announced {nbytes}")
        return _map(fd, name, nbytes)
    finally:
        os.close(fd)


def _map(fd: int, name: str, nbytes: int) -> mmap.mmap | bytearray:
    """Map an open segment and remember it (it can be handed over); copy it if no fd is left."""
    # pages are mapped on first touch (cheaper in all than MAP_POPULATE: ~3 ms vs ~10 ms/100 MiB)
    try:
        probe = os.dup(fd)  # the lowest free descriptor: where mmap's duplicate will land
        os.close(probe)
        m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    except OSError as exc:  # mmap keeps a duplicate descriptor: none left for it
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        return _read_segment(fd, nbytes)
    anchor = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(anchor)
    del anchor  # (releases its export of the map)

    def forget(ref: weakref.ref[mmap.mmap]) -> None:
        if _held.get(address, (None, None, None, None))[2] is ref:
            del _held[address]
    known = probe if _names(probe, name) else None  # (another thread may have taken it first)
    _held[address] = (name, nbytes, weakref.ref(m, forget), known)
    return m


def _names(fd: int, name: str) -> bool:
    """Whether this process's descriptor ``fd`` is open on the (unlinked) segment ``name``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _unlinked_path(name)
    except OSError:
        return False


def _unlinked_path(name: str) -> str:
    """What ``/proc/<pid>/fd/<fd>`` reads for a descriptor of segment ``name`` once unlinked."""
    return f"{segment_dir()}/{name} (deleted)"


def held_segment(address: int, nbytes: int) -> tuple[int, str] | None:
    """The descriptor and name of the segment received and mapped at ``address`` with exactly
    ``nbytes``, or None if that memory is not such a segment (any more)."""
    entry = _held.get(address)
    if entry is None or entry[1] != nbytes or entry[2]() is None:
        return None
    name, known = entry[0], entry[3]
    if known is not None and _names(known, name):
        return known, name
    for fd in os.listdir("/proc/self/fd"):  # the descriptor Python's mmap keeps (not exposed)
        if _names(int(fd), name):
            return int(fd), name
    return None


def may_take_over(pid: Any) -> bool:
    """Whether this process may open the descriptors of process ``pid`` (same user, and that
    process is dumpable): then the segments it holds can be taken over."""
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    return True


def take_over(pid: Any, fd: Any, name: Any, nbytes: int) -> mmap.mmap | bytearray:
    """Map the segment ``name`` that process ``pid`` holds open as descriptor ``fd`` (a tensor it
    gives up): the same memory, no copy.

    Raises ``ProtocolError`` for malformed references and ``HandoverRefused`` if the descriptor
    cannot be opened or is not that segment.
    """
    if (type(pid) is not int or type(fd) is not int or pid <= 0 or fd < 0
            or not isinstance(name, str) or not _NAME.fullmatch(name)):
        raise ProtocolError(f"invalid shared-memory hand-over {pid!r}, {fd!r}, {name!r}")
    link = f"/proc/{pid}/fd/{fd}"
    if not _fd_room:
        make_fd_room()
    try:
        if os.readlink(link) != _unlinked_path(name):  # checked first: never open anything else
            raise HandoverRefused(f"{link} is not shared-memory segment {name}")
        own = os.open(link, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise HandoverRefused(
            f"cannot take over shared-memory segment {name} from process {pid} ({exc.strerror})"
        ) from None
    try:
        st = os.fstat(own)
        if (not _names(own, name) or not stat.S_ISREG(st.st_mode)
                or st.st_uid != os.getuid() or st.st_size != nbytes):
            raise HandoverRefused(f"{link} changed, or is not {nbytes} bytes of this user")
        return _map(own, name, nbytes)
    finally:
        os.close(own)


def _unlink(name: str) -> None:
    with _lock:
        _created.pop(name, None)
    try:
        os.unlink(os.path.join(segment_dir(), name))
    except OSError:
        pass  # the receiver took it


def discard(names: Any) -> None:
    """Unlink segments this process wrote for a request that is over (answered, failed, timed
    out, its peer lost): a receiver that mapped one has unlinked it already; nobody will now."""
    for name in names:
        _unlink(name)


_max_age = 120.0  # the longest max_age a write asked for: what the sweeper thread keeps


def sweep(max_age: float = 0.0) -> None:
    """Unlink the segments this process wrote more than ``max_age`` seconds ago (0: all)."""
    if not _created:
        return
    limit = time.monotonic() - max_age
    with _lock:
        old = [name for name, t in _created.items() if max_age <= 0 or t <= limit]
    for name in old:
        _unlink(name)


def sweep_orphans(min_age: float = 0.0) -> list[str]:
    """Unlink this user's segments whose creator process is dead and that are older than
    ``min_age`` seconds (and the live files of the dead); return the segments' names."""
    try:
        directory = segment_dir()
    except OSError:
        return []
    mine = _live[1] if _live is not None and _live[0] == os.getpid() else ""
    return shm_live.sweep_orphans(directory, mine, min_age)


def outstanding() -> list[str]:
    """Segments this process wrote whose receiver has not taken them yet (for tests and stats)."""
    with _lock:
        names = list(_created)
    return [n for n in names if os.path.exists(os.path.join(segment_dir(), n))]


def _at_exit() -> None:
    """Unlink what this process wrote and its live file (a clean exit leaves nothing)."""
    sweep()
    if _live is not None and _live[0] == os.getpid() and _dir is not None:
        try:
            os.unlink(os.path.join(_dir, f"live-{_live[0]}-{_live[1]}"))
        except OSError:
            pass


atexit.register(_at_exit)
