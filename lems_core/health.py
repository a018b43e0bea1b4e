"""Cache health: find the entries that cannot be read, and set one aside without touching the rest.

One bad file must never take the app down. The readers skip what they cannot
read (``cache.list_profiles``, ``cache.saved_plans``, ``ResultStore.all``, the
hardened index disk); this module says *which* entries those are, so the app can
show them and offer to remove each one.

Checked: every ``profiles/<key>/`` folder (``Profile.load``: JSON object, schema,
checksums, validation), every ``plans/*.json`` entry (a regular file holding a
valid rank plan; a dangling link or a folder is an entry too), the index database
(opens) and each of its rows (key and value decode as JSONDisk wrote them), and the
shipped results file (``results.shipped_results_path()``: schema and every record).

Removing moves a file or folder into ``<cache>/quarantine/`` (nothing is deleted,
the user can inspect it); an undecodable index row is deleted from the database
(it has no readable content to keep). The shipped results file is committed with the
demo and read-only: it is listed but never moved (restore it from git instead).
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import CORRUPT_KEY, CacheIndexError, CorruptEntryError, default_cache_dir, index, index_folder, plans_dir, \
    profiles_dir
from .plan import PlanError, RankPlan, read_plan_bytes
from .profile import PROFILE_JSON, Profile, ProfileError
from .results import ResultsFileError, read_results_file, shipped_results_path

QUARANTINE = "quarantine"
PROFILE, PLAN, INDEX, INDEX_ROW, SHIPPED_RESULTS = "profile", "plan", "index", "index row", "shipped results"


@dataclass(frozen=True)
class CacheProblem:
    """One unreadable cache entry: what it is, where, and why."""

    kind: str  # PROFILE, PLAN, INDEX, INDEX_ROW or SHIPPED_RESULTS
    path: Path  # the entry (for an index row: the index database)
    reason: str
    rowid: int | None = None  # INDEX_ROW only

    @property
    def label(self) -> str:
        where = f"{self.path.name} row {self.rowid}" if self.kind == INDEX_ROW else self.path.name
        return f"{self.kind} {where}: {self.reason}"

    @property
    def removable(self) -> bool:
        """Whether ``remove_problem`` may set it aside (the shipped results file is read-only)."""
        return self.kind != SHIPPED_RESULTS


def cache_problems(cache_dir: Path | None = None) -> list[CacheProblem]:
    """Every unreadable entry of the cache (profiles, saved plans, index), then the shipped results file."""
    cache_dir = Path(cache_dir or default_cache_dir())
    return _profile_problems(cache_dir) + _plan_problems(cache_dir) + _index_problems(cache_dir) + _shipped_problems()


def _shipped_problems() -> list[CacheProblem]:
    """The shipped results file when it exists and does not validate (``results.read_results_file``)."""
    path = shipped_results_path()
    if not (path.exists() or path.is_symlink()):
        return []
    try:
        read_results_file(path)
    except ResultsFileError as exc:
        return [CacheProblem(SHIPPED_RESULTS, path, str(exc))]
    return []


def _profile_problems(cache_dir: Path) -> list[CacheProblem]:
    problems = []
    folder = profiles_dir(cache_dir)
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not (entry / PROFILE_JSON).exists() and not entry.is_symlink():
            continue  # a build in progress, or an empty folder: not an entry yet
        try:
            Profile.load(entry)
        except (ProfileError, OSError) as exc:
            problems.append(CacheProblem(PROFILE, entry, str(exc)))
    return problems


def _plan_problems(cache_dir: Path) -> list[CacheProblem]:
    problems = []
    folder = plans_dir(cache_dir)
    for entry in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            if entry.is_symlink() and not entry.exists():
                raise PlanError(f"dangling link to {os.readlink(entry)}")
            RankPlan.from_json(read_plan_bytes(entry))
        except PlanError as exc:
            problems.append(CacheProblem(PLAN, entry, str(exc)))
    return problems


def _index_problems(cache_dir: Path) -> list[CacheProblem]:
    database = index_folder(cache_dir) / "cache.db"
    if not database.exists():
        return []
    try:
        with index(cache_dir) as store:
            disk = store.disk
            rows = store._sql("SELECT rowid, key, raw, mode, filename, value FROM Cache").fetchall()
    except (CacheIndexError, sqlite3.DatabaseError) as exc:
        return [CacheProblem(INDEX, database, f"not a readable database ({exc.__cause__ or exc})")]
    problems = []
    for rowid, key, raw, mode, filename, value in rows:
        name = disk.get(key, raw)
        try:
            if isinstance(name, str) and name.startswith(CORRUPT_KEY):
                raise CorruptEntryError("its key cannot be decoded")
            disk.fetch(mode, filename, value, False)
        except OSError as exc:
            problems.append(CacheProblem(INDEX_ROW, database, str(exc), rowid))
    return problems


def remove_problem(problem: CacheProblem, cache_dir: Path | None = None) -> Path | None:
    """Set one bad entry aside: move it to ``<cache>/quarantine/`` (None for a deleted index row).

    Only that entry changes: other profiles, plans and index rows are left as they are.
    The shipped results file is refused (ValueError): it is part of the demo, restore it from git.
    """
    if not problem.removable:
        raise ValueError(f"{problem.path} is the shipped results file (read-only); restore it with "
                         f"`git checkout -- {problem.path.name}` in its folder, or fix it by hand")
    cache_dir = Path(cache_dir or default_cache_dir())
    if problem.kind == INDEX_ROW:
        with sqlite3.connect(problem.path) as con:
            con.execute("DELETE FROM Cache WHERE rowid = ?", (problem.rowid,))
        return None
    target = problem.path.parent if problem.kind == INDEX else problem.path
    return _quarantine(target, cache_dir)


def _quarantine(path: Path, cache_dir: Path) -> Path:
    """Move ``path`` (file, folder or link) under ``<cache>/quarantine/`` with a time stamp."""
    folder = cache_dir / QUARANTINE
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{path.parent.name}-{path.name}"
    n = 1
    while target.exists() or target.is_symlink():
        target = target.with_name(f"{target.name}.{n}")
        n += 1
    shutil.move(str(path), str(target))
    return target
