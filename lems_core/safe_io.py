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
"""
from __future__ import annotations

import contextlib
import json
import os
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
