"""The on-disk cache: safetensors files for tensors, diskcache (JSON values) for small records.

Layout under the cache folder (default ./cache, or $LEMS_CACHE_DIR):

    profiles/<key>/            profile.json + spectra.safetensors
    tensors/<kind>/<key>.safetensors   statistics and factorisations, with a sha256 sidecar
    index/                     diskcache: results, ARS plans, job records (JSON, never pickle)
    plans/                     rank plans saved by the app (plan JSON files)
    demo/                      committed demo profiles and plans (never evicted)

diskcache is used with `eviction_policy="none"` (its 1 GB default would silently
drop entries) and JSONDisk, so the cache never unpickles anything
(ecosystem.md §3). A tensor file whose checksum does not match is treated as
missing and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

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
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_path(kind: str, key: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "tensors" / kind / f"{key}.safetensors"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write tensors atomically with a checksum sidecar (`<file>.json`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    sidecar = {"sha256": sha256_file(tmp), "meta": meta or {}}
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(sidecar))


def load_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """Tensors from `save_tensors`, or None when missing or corrupt (the files are removed)."""
    from safetensors.torch import load_file

    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        expected = json.loads(sidecar.read_text())["sha256"]
        if sha256_file(path) != expected:
            raise ValueError("checksum mismatch")
        return load_file(str(path))
    except Exception as exc:  # corrupt entry: drop it and let the caller recompute
        log.warning("cache entry %s is corrupt (%s); recomputing", path, exc)
        path.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        return None


def index(cache_dir: Path | None = None):
    """The diskcache index: JSON values, no eviction."""
    import diskcache

    folder = (cache_dir or default_cache_dir()) / "index"
    folder.mkdir(parents=True, exist_ok=True)
    return diskcache.Cache(str(folder), disk=diskcache.JSONDisk, eviction_policy="none", size_limit=2**40)


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
            doc = json.loads((folder / "profile.json").read_text())
            entries.append(ProfileEntry(folder, doc["model_source"], doc["decomposition"], doc["fingerprint"],
                                        doc["calibration"], doc.get("meta", {}).get("created", ""), is_demo))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping unreadable profile %s: %s", folder, exc)
    return sorted(entries, key=lambda e: (not e.is_demo, e.created), reverse=False)


def plans_dir(cache_dir: Path) -> Path:
    """Where the app saves rank plans: ``<cache>/plans``."""
    return Path(cache_dir) / "plans"


def saved_plans(cache_dir: Path) -> list[Path]:
    """Saved plan files, newest first."""
    folder = plans_dir(cache_dir)
    files = folder.glob("*.json") if folder.is_dir() else []
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def folder_size(folder: Path) -> int:
    """Total bytes of the files under a folder (0 when missing)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
