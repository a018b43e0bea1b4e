"""Reading files the project did not write itself, without blocking or exhausting memory.

Every file the project reads (plans, profiles, results, exported folders, task
configs) may be a named pipe, a device, a folder or a huge file put where a
regular file was expected. ``read_bytes_capped`` opens with ``O_NONBLOCK`` (so a
FIFO never blocks the open), requires a regular file by ``fstat`` of the opened
descriptor, and reads at most ``max_bytes + 1`` bytes: the cap is on what is
read, since ``st_size`` is 0 for pipes and devices. ``check_regular_file`` does
the open-and-fstat part for files handed to another reader (safetensors).

Every refusal raises the caller's own exception class, with a message naming
the path and what the file should have been.

Folders the project writes as a whole (exported models) go through
``replaced_folder``: written into a hidden temporary sibling and renamed into
place, so a kill mid-write never leaves a half-written or mixed folder.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import stat
from pathlib import Path
from typing import Iterator

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_CHUNK = 1 << 20


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def _refuse_irregular(path: Path, mode: int, error: type[Exception], what: str) -> None:
    if not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file ({_kind(mode)}): not {what}")


@contextlib.contextmanager
def open_regular(path: str | Path, error: type[Exception], what: str) -> Iterator[int]:
    """A read-only descriptor of ``path``, which must be a regular file; ``error`` otherwise.

    The path is checked by ``stat`` before opening (a device is never opened), and the
    opened descriptor again by ``fstat`` (the file may have been swapped in between).
    """
    path = Path(path)
    try:
        _refuse_irregular(path, os.stat(path).st_mode, error, what)
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise error(f"{path} not found (expected {what})") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        _refuse_irregular(path, os.fstat(fd).st_mode, error, what)
        yield fd
    finally:
        os.close(fd)


def check_regular_file(path: str | Path, error: type[Exception], what: str) -> Path:
    """``path`` if it is an existing, readable regular file; ``error`` otherwise (never blocks on a FIFO)."""
    with open_regular(path, error, what):
        return Path(path)


def read_bytes_capped(path: str | Path, max_bytes: int, error: type[Exception], what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them; ``error`` otherwise."""
    path = Path(path)
    with open_regular(path, error, what) as fd:
        chunks, total = [], 0
        try:
            while total <= max_bytes:
                chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as exc:
            raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if total > max_bytes:
        raise error(f"{path} is too large (more than {max_bytes:,} bytes): not {what}")
    return b"".join(chunks)


def read_json_capped(path: str | Path, max_bytes: int, error: type[Exception], what: str):
    """The JSON value of a regular file of at most ``max_bytes``: valid UTF-8 JSON, not nested too deeply."""
    data = read_bytes_capped(path, max_bytes, error, what)
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise error(f"{path} is not {what}: its JSON is nested too deeply") from None


def read_text_capped(path: str | Path, max_bytes: int, error: type[Exception], what: str) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``."""
    try:
        return read_bytes_capped(path, max_bytes, error, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text: {exc}") from None


# ---------------------------------------------------------------------------------- folder writes
def host_tag() -> str:
    """This host's name as a file-name part: temporaries of another host are never taken for abandoned."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def sibling_path(target: Path, role: str) -> Path:
    """A new hidden sibling name of ``target``: ``.<name>.<role>-<host>-<pid>-<random>``."""
    return target.parent / f".{target.name}.{role}-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def remove_abandoned_temporaries(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` left by a killed writer on this host; returns them.

    Only ``.<name>.tmp-<this host>-<pid>-*`` folders whose process no longer exists are
    touched: a writer still running (here or on another host) keeps its folder.
    """
    prefix = f".{target.name}.tmp-{host_tag()}-"
    removed = []
    for sibling in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = sibling.name[len(prefix):].partition("-")[0]
        if pid.isdigit() and _pid_is_dead(int(pid)) and sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


@contextlib.contextmanager
def replaced_folder(target: str | Path) -> Iterator[Path]:
    """A new empty temporary sibling of ``target`` to write into; it becomes ``target`` when the block ends.

    On success an existing ``target`` is renamed aside, the new folder renamed in, and the
    old one removed: nothing of the old folder is left in the new one. On an error (or a
    kill) ``target`` is untouched: a reader sees the old complete folder or the new one,
    never a half-written mix. The caller decides whether ``target`` may be replaced.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(target)
    temporary = sibling_path(target, "tmp")
    temporary.mkdir()
    try:
        yield temporary
        _swap_in(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, moving an existing ``target`` aside first and removing it after."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    old = sibling_path(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextlib.contextmanager
def advisory_lock(path: Path, exclusive: bool = True) -> Iterator[None]:
    """An advisory lock on ``path`` (``.<name>.lock`` beside it; fcntl, so POSIX only).

    For a file replaced by renames, which a lock on the file itself would not follow: a
    cache entry and its checksum sidecar change together under it, and a results file is
    re-read and rewritten under it, so two writers keep each other's changes.
    """
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): unlocked
        yield
        return
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield

