"""CURVE key pairs: making them, and reading them back safely.

A key pair is two files in ZeroMQ's certificate format (what ``zmq.auth.load_certificate``
reads): ``NAME.key`` holds the public key, to be copied to whoever must recognise its holder, and
``NAME.key_secret`` holds both keys and stays with its owner: it is created with mode 600, never
through a symbolic link and never over an existing file, and a secret file that others can read
is refused when loaded. ``zmqsyft keys new NAME`` makes one.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

__all__ = ["DEFAULT_DIR", "KeyPair", "new_keypair", "load_public", "load_secret", "public_key",
           "load_dir"]

DEFAULT_DIR = Path.home() / ".zmqsyft" / "keys"
"""Where ``zmqsyft keys new`` puts key pairs unless told otherwise (made with mode 700)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BANNER = ("#   zmqsyft {kind} key of '{name}', made {when}\n"
           "#   {advice}\n")


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` (it must not exist; a symbolic link there is not followed) with ``mode``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask took away or left
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def new_keypair(name: str, directory: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Make a fresh key pair ``NAME.key`` / ``NAME.key_secret`` in ``directory`` (default
    :data:`DEFAULT_DIR`, made with mode 700 if missing); return (public file, secret file).

    Raises
    ------
    ValueError
        For a name that is not 1-64 letters, digits, ``_ . -``.
    FileExistsError
        If either file exists (keys are never overwritten).
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a key name: use 1-64 letters, digits, '_', '.', '-'")
    folder = Path(directory) if directory is not None else DEFAULT_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_file, secret_file = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public_file, secret_file):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; keys are never overwritten: remove it first, "
                                  "or choose another name")
    public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    body = f'metadata\ncurve\n    public-key = "{public}"\n'
    _write_new(public_file, _BANNER.format(
        kind="public", name=name, when=when,
        advice="copy it to the workers and clients that must recognise this key") + body, 0o644)
    _write_new(secret_file, _BANNER.format(
        kind="secret", name=name, when=when, advice="keep it: whoever reads it is you")
        + body + f'    secret-key = "{secret}"\n', 0o600)
    return public_file, secret_file


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The public key (Z85, 40 bytes) in a ``.key`` or ``.key_secret`` file."""
    public, _ = zmq.auth.load_certificate(os.fspath(path))
    return public


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file of this user's that nobody else may read.

    Raises ``ValueError`` if the file is someone else's, readable by others, or holds no
    secret key."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise ValueError(f"the secret key file {path} must be a regular file of your own")
    public, secret = zmq.auth.load_certificate(os.fspath(path))
    if not secret:
        raise ValueError(f"{path} holds no secret key (is it the public .key file?)")
    if info.st_mode & 0o077:
        raise ValueError(f"the secret key file {path} is readable by others (mode "
                         f"{stat.S_IMODE(info.st_mode):o}): whoever reads it can act as you. "
                         f"chmod 600 {path}")
    return public, secret


_Z85 = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair in Z85 text (40 bytes each): who a worker or a client is.

    ``repr`` never shows the secret half.
    """

    public: bytes
    secret: bytes

    @classmethod
    def fresh(cls) -> KeyPair:
        """A new key pair, in memory only (a spawned worker's, a session's)."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """The pair in a ``NAME.key_secret`` file (``NAME`` or ``NAME.key`` name it too); see
        :func:`load_secret` for what is refused."""
        path = os.path.expanduser(os.fspath(path))
        if path.endswith(".key"):
            path += "_secret"
        elif not path.endswith(".key_secret") and not os.path.exists(path):
            path += ".key_secret"
        public, secret = load_secret(path)
        return cls(public, secret)

    @property
    def text(self) -> str:
        """The public key as text (what a worker's principals are named by)."""
        return self.public.decode("ascii")

    def __repr__(self) -> str:
        return f"KeyPair(public={self.text!r})"


def public_key(value: str | bytes | os.PathLike[str]) -> bytes:
    """A public key (Z85, 40 bytes) from its text, or from a ``.key`` / ``.key_secret`` file.

    Raises ``ValueError`` if ``value`` is neither."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = os.fspath(value)
    if not _Z85.fullmatch(text):
        text = os.path.expanduser(text)
    if _Z85.fullmatch(text) and not os.path.exists(text):
        try:
            zmq.utils.z85.decode(text)
        except Exception:  # noqa: BLE001 - not Z85 after all
            pass
        else:
            return text.encode("ascii")
    try:
        public = load_public(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{text!r} is neither a public key (40 characters of Z85) nor a key file "
                         f"that can be read: {exc}") from None
    if not public:
        raise ValueError(f"{text} holds no public key")
    return public


def load_dir(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every public key in ``directory``: ``NAME.key`` -> ``{NAME: key}`` (sorted by name).

    Raises ``ValueError`` if the directory cannot be read or a file in it is not a key file."""
    folder = Path(directory)
    try:
        names = sorted(p for p in folder.iterdir() if p.name.endswith(".key"))
    except OSError as exc:
        raise ValueError(f"cannot read the key directory {folder}: {exc.strerror}") from None
    found: dict[str, bytes] = {}
    for path in names:
        try:
            key = load_public(path)
        except Exception as exc:  # noqa: BLE001 - say which file
            raise ValueError(f"{path} is not a key file: {exc}") from None
        if key:
            found[path.name[: -len(".key")]] = key
    return found
