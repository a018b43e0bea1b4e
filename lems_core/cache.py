"""The on-disk cache: safetensors files for tensors, diskcache (JSON values) for small records.

Layout under the cache folder (default ./cache, or $LEMS_CACHE_DIR):

    profiles/<key>/            profile.json + spectra.safetensors
    tensors/<kind>/<key>.safetensors   statistics and factorisations, with a sha256 sidecar
    index/                     diskcache: results, ARS plans, job records (JSON, never pickle)
    plans/                     rank plans saved by the app (plan JSON files)
    demo/                      committed demo profiles and plans (never evicted)

diskcache is used with `eviction_policy="none"` (its 1 GB default would silently
drop entries) and JSONDisk, so the cache never unpickles anything
(docs/reference/ecosystem.md §3). A tensor file whose checksum does not match is treated as
missing and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .safe_io import advisory_lock, open_regular, read_json_capped  # noqa: F401  (re-exported)

MAX_PROFILE_JSON_BYTES = 64 * 1024 * 1024  # a profile.json of 70B spectra is a few MB

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "cache" / "demo"


def default_cache_dir() -> Path:
    env = os.environ.get("LEMS_CACHE_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "cache"


def key_of(*parts) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checksums of tensors and profiles)."""
    h = hashlib.sha256()
    with open_regular(path, OSError, "a file to checksum") as fd:  # a FIFO or device is refused, never read
        for chunk in iter(lambda: os.read(fd, 1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_path(kind: str, key: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "tensors" / kind / f"{key}.safetensors"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write tensors atomically with a checksum sidecar (`<file>.json`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_sidecar = _unique_temp(path), _unique_temp(path.with_suffix(".json"))
    try:  # unique temporary names: two processes computing the same entry never share one
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp_sidecar.write_text(json.dumps({"sha256": sha256_file(tmp), "meta": meta or {}}))
        with advisory_lock(path, exclusive=True):  # the file and its checksum change together
            os.replace(tmp, path)
            os.replace(tmp_sidecar, path.with_suffix(".json"))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)


def _unique_temp(path: Path) -> Path:
    """A new empty temporary file beside ``path`` (``.<name>.<random>.tmp``)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # not mkstemp's 0600: the cache may be shared
    return Path(tmp)


def load_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """Tensors from `save_tensors`, or None when missing or corrupt (the files are removed)."""
    from safetensors.torch import load_file

    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        return None
    with advisory_lock(path, exclusive=False):
        try:
            expected = read_json_capped(sidecar, 1 << 16, ValueError, "a checksum sidecar")["sha256"]
            if sha256_file(path) != expected:
                raise ValueError("checksum mismatch")
            return load_file(str(path))
        except Exception as exc:  # corrupt entry: drop it and let the caller recompute
            log.warning("cache entry %s is corrupt (%s); recomputing", path, exc)
            path.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
            return None


class CacheIndexError(ValueError):
    """The cache's index database cannot be opened (not a database, unreadable)."""


CORRUPT_KEY = "\x00corrupt-key:"  # what a row whose key cannot be decoded is listed as


def _safe_disk():
    """diskcache's JSONDisk, hardened: a row it cannot decode reads as missing, never as pickle.

    JSONDisk only ever writes raw zlib-compressed JSON; a row in pickle/text mode, with a
    non-raw key or with a file name outside the index folder has been tampered with.
    A bad value raises an OSError subclass, which diskcache treats as a missing entry
    (``get`` returns the default); a bad key is listed as ``CORRUPT_KEY + <digest>``,
    which matches no real key. ``health.cache_problems`` lists such rows.
    """
    import sqlite3
    import zlib

    import diskcache
    from diskcache.core import MODE_BINARY, MODE_RAW

    class SafeJSONDisk(diskcache.JSONDisk):
        def get(self, key, raw):
            try:
                if not raw:
                    raise ValueError("non-raw key")
                return super().get(key, raw)
            except (ValueError, zlib.error, TypeError, UnicodeDecodeError, RecursionError):
                data = bytes(key) if isinstance(key, (bytes, sqlite3.Binary)) else str(key).encode()
                return CORRUPT_KEY + hashlib.sha256(data).hexdigest()[:16]

        def fetch(self, mode, filename, value, read):
            if mode not in (MODE_RAW, MODE_BINARY) or (filename and (os.path.isabs(filename) or ".." in filename)):
                raise CorruptEntryError(f"index row in mode {mode} / file {filename!r} was not written by JSONDisk")
            try:
                return super().fetch(mode, filename, value, read)
            except (ValueError, zlib.error, TypeError, UnicodeDecodeError, RecursionError) as exc:
                raise CorruptEntryError(f"index row cannot be decoded: {exc}") from exc

    return SafeJSONDisk


class CorruptEntryError(OSError):
    """An index row that cannot be decoded (diskcache reads it as a missing entry)."""


def index_folder(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "index"


_OPEN_INDEXES: dict[str, tuple[tuple, object]] = {}  # folder -> (database file stamp, handle)
_OPEN_LOCK = threading.Lock()


def _database_stamp(folder: Path) -> tuple | None:
    """Identity of the index database file (device, inode, size, mtime), None when absent."""
    try:
        st = (folder / "cache.db").stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, os.getpid()


def index(cache_dir: Path | None = None):
    """The diskcache index: JSON values, no eviction; CacheIndexError when its database is unreadable.

    Opening one costs ~10 ms (the Allocate page looks up ARS plans on every budget
    move), so the handle of each folder is kept and handed out again while its database
    file is the same (same inode, size and mtime); ``close()`` on it (``with index() as
    store``) is harmless, diskcache reconnects on the next use in well under 1 ms. A
    replaced or rewritten database gets a new handle, opened and checked like the first.
    """
    import sqlite3

    import diskcache

    folder = index_folder(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key, stamp = str(folder.resolve()), _database_stamp(folder)
    with _OPEN_LOCK:
        kept = _OPEN_INDEXES.get(key)
    if kept is not None and stamp is not None and kept[0] == stamp:
        return kept[1]
    try:
        store = diskcache.Cache(str(folder), disk=_safe_disk(), eviction_policy="none", size_limit=2**40)
    except (sqlite3.DatabaseError, OSError) as exc:
        raise CacheIndexError(f"the cache index {folder / 'cache.db'} cannot be opened ({exc}); "
                              "remove it from the sidebar's cache problems list to start a new one") from exc
    with _OPEN_LOCK:
        _OPEN_INDEXES[key] = (_database_stamp(folder), store)
    return store


@dataclass(frozen=True)
class ProfileEntry:
    """What the profile picker lists."""

    path: Path
    model_source: str
    decomposition: str
    fingerprint: str
    calibration: dict
    created: str
    is_demo: bool

    @property
    def label(self) -> str:
        cal = self.calibration
        size = f"{cal.get('n_samples', '?')}x{cal.get('seq_len', '?')}"
        return f"{'[demo] ' if self.is_demo else ''}{self.model_source} · {self.decomposition} · {size}"


def profiles_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "profiles"


def demo_profile_dirs() -> list[Path]:
    return sorted(p.parent for p in DEMO_DIR.glob("*/profile.json"))


def list_profiles(cache_dir: Path | None = None, include_demo: bool = True) -> list[ProfileEntry]:
    """Profiles in the cache (and the committed demo ones), newest first; unreadable ones skipped."""
    folders = [(p.parent, False) for p in profiles_dir(cache_dir).glob("*/profile.json")]
    if include_demo:
        folders += [(p, True) for p in demo_profile_dirs()]
    entries = []
    for folder, is_demo in folders:
        try:
            doc = read_json_capped(folder / "profile.json", MAX_PROFILE_JSON_BYTES, ValueError, "a profile")
            meta = doc.get("meta") or {}
            entries.append(ProfileEntry(folder, str(doc["model_source"]), str(doc["decomposition"]),
                                        str(doc["fingerprint"]), dict(doc["calibration"]),
                                        str(meta.get("created", "")), is_demo))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # a profile.json that is a list, garbage, unreadable: listed by health.cache_problems
            log.warning("skipping unreadable profile %s: %s", folder, exc)
    return sorted(entries, key=lambda e: (not e.is_demo, e.created), reverse=False)


def plans_dir(cache_dir: Path) -> Path:
    """Where the app saves rank plans: ``<cache>/plans``."""
    return Path(cache_dir) / "plans"


def saved_plans(cache_dir: Path) -> list[Path]:
    """Saved plan files (regular files only: a dangling link or a folder named *.json is skipped), newest first."""
    folder = plans_dir(cache_dir)
    found = []
    for path in (folder.glob("*.json") if folder.is_dir() else []):
        try:
            if path.is_file():
                found.append((path.stat().st_mtime, path))
        except OSError:
            continue
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def folder_size(folder: Path) -> int:
    """Total bytes of the files under a folder (0 when missing)."""
    folder = Path(folder)
    total = 0
    for p in (folder.rglob("*") if folder.is_dir() else []):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:  # vanished or dangling: not counted
            continue
    return total
