"""Measured results (perplexity, KL, params per plan): the cache's own, plus the shipped ones.

*Stored* results live in the cache's diskcache index. Values are plain JSON (the index
uses JSONDisk), so reading them never unpickles. Each result is one key
`result:<insertion time in ns>:<hash>`; `all()` returns them oldest first (the record's
own `created` stamp has one-second resolution, too coarse to order by).

*Shipped* results are the measured demo study committed as ``cache/demo/results.json``
(``$LEMS_SHIPPED_RESULTS`` points elsewhere): ``{"schema": "lems-results/1", "note": str,
"results": [EvalResult.to_dict(), ...]}``, so a fresh machine shows measured LEMS vs
uniform vs ARS at once. They are read-only: validated on read (``ResultsFileError``
with the record and field at fault), never written to or removed from, and marked
``source: "shipped"`` where ``ResultStore.merged`` joins them to the stored ones.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

from . import cache as _cache
from .cache import CacheIndexError, index, key_of
from .numerics import KL_ROUNDOFF
from .safe_io import read_json_capped

PREFIX = "result:"
RESULTS_SCHEMA = "lems-results/1"
RESULTS_FILE = "results.json"  # in the demo folder
SHIPPED, STORED = "shipped", "cache"  # a merged record's "source"
MAX_RESULTS_BYTES = 32 * 1024 * 1024


class ResultsFileError(ValueError):
    """The shipped results file is unreadable or does not hold valid result records."""


class MergedResults(NamedTuple):
    """Stored + shipped records, and what had to be left out (specific messages; empty when all was read)."""

    records: list[dict]
    problems: tuple[str, ...] = ()


class ResultStore:
    """Append-only store of `EvalResult.to_dict()` records; ``merged`` adds the shipped ones, read-only."""

    def __init__(self, cache_dir: str | Path | None = None, shipped_path: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.shipped_path = Path(shipped_path) if shipped_path else None  # None: shipped_results_path()

    def add(self, result) -> str:
        record = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        if record.get("source") == SHIPPED:
            raise ValueError(f"shipped results are read-only: they live in {shipped_results_path()}, not the cache")
        json.dumps(record)  # fail here, not inside the cache, if something is not JSON
        key = f"{PREFIX}{time.time_ns():020d}:{key_of(record)}"
        with index(self.cache_dir) as store:
            store[key] = record
        return key

    def all(self) -> list[dict]:
        """Every readable stored record, oldest first; a corrupt row is skipped (``health.cache_problems`` lists it).

        Raises CacheIndexError when the index database itself is unreadable. Shipped
        results are not included (``merged`` adds them).
        """
        import sqlite3

        try:
            with index(self.cache_dir) as store:
                keys = sorted(k for k in store.iterkeys() if isinstance(k, str) and k.startswith(PREFIX))
                records = [store.get(k) for k in keys]
        except sqlite3.DatabaseError as exc:
            raise CacheIndexError(f"the cache index cannot be read ({exc})") from exc
        return [r for r in records if isinstance(r, dict)]

    def merged(self) -> MergedResults:
        """Stored records (``source: "cache"``) then the shipped ones (``source: "shipped"``).

        A stored copy of a shipped record (the same measurement, e.g. on the machine that
        measured the study) is shown once, as shipped. Nothing readable is lost: a
        malformed shipped file leaves the stored records, an unreadable index leaves the
        shipped ones, and each says why in ``problems`` (``health.cache_problems`` lists both).
        """
        problems = []
        try:
            shipped = shipped_results(self.shipped_path)
        except ResultsFileError as exc:
            shipped = []
            problems.append(f"Shipped results left out: {exc}")
        try:
            stored = self.all()
        except CacheIndexError as exc:
            stored = []
            problems.append(f"Stored results cannot be shown: {exc}")
        seen = {_identity(r) for r in shipped}
        stored = [{**r, "source": STORED} for r in stored if _identity(r) not in seen]
        return MergedResults(stored + shipped, tuple(problems))

    def remove(self, key: str) -> None:
        """Delete one stored record by its key; shipped records cannot be removed."""
        if not str(key).startswith(PREFIX):
            raise ValueError(f"{key!r} is not a stored result key (shipped results are read-only)")
        with index(self.cache_dir) as store:
            store.pop(key, None)


def _identity(record: dict) -> tuple:
    """What makes two records the same measurement (method names may differ: a shipped ``lems_fit`` is stored as lems)."""
    return tuple(json.dumps(record.get(k), sort_keys=True) for k in ("fingerprint", "created", "budget",
                                                                     "realised_ratio", "kl", "ppl"))


# ----------------------------------------------------------------- shipped results
def shipped_results_path() -> Path:
    """``$LEMS_SHIPPED_RESULTS``, else ``cache/demo/results.json`` (read at call time, so tests can move it)."""
    env = os.environ.get("LEMS_SHIPPED_RESULTS")
    return Path(env).expanduser() if env else _cache.DEMO_DIR / RESULTS_FILE


_MEMO: dict[Path, tuple[tuple, dict]] = {}


def shipped_results(path: str | Path | None = None) -> list[dict]:
    """The shipped records, each marked ``source: "shipped"``; [] when there is no file.

    Raises ResultsFileError (naming the record and field) when the file is malformed.
    """
    document = shipped_document(path)
    return copy.deepcopy(document["results"]) if document else []  # callers may edit their copy


def shipped_note(path: str | Path | None = None) -> str | None:
    """The shipped file's ``note`` (how the study was measured), None without a (valid) file."""
    try:
        document = shipped_document(path)
    except ResultsFileError:
        return None
    return (document or {}).get("note") or None


def shipped_document(path: str | Path | None = None) -> dict | None:
    """The validated shipped document, None when there is no file; ResultsFileError when malformed.

    Parsed once per file version (path, size, modification time): the Allocate page
    reads the results on every budget move.
    """
    path = Path(path) if path else shipped_results_path()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ResultsFileError(f"cannot read {path}: {exc}") from exc
    stamp = (stat.st_size, stat.st_mtime_ns)
    memo = _MEMO.get(path)
    if memo is None or memo[0] != stamp:
        memo = (stamp, read_results_file(path))
        _MEMO[path] = memo
    return memo[1]


def read_results_file(path: str | Path) -> dict:
    """A ``lems-results/1`` document, every record validated and marked shipped; ResultsFileError otherwise."""
    path = Path(path)
    doc = read_json_capped(path, MAX_RESULTS_BYTES, ResultsFileError, "a results file")
    return validate_results_document(doc, path.name)


def validate_results_document(doc, where: str = RESULTS_FILE) -> dict:
    """Check a parsed results document; returns it with each record copied and marked ``source: "shipped"``."""
    if not isinstance(doc, dict):
        raise ResultsFileError(f"{where} must hold a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != RESULTS_SCHEMA:
        raise ResultsFileError(f"{where}: schema {doc.get('schema')!r}, expected {RESULTS_SCHEMA!r}")
    if not isinstance(doc.get("note", ""), str):
        raise ResultsFileError(f"{where}: 'note' must be a string")
    records = doc.get("results")
    if not isinstance(records, list):
        raise ResultsFileError(f"{where}: 'results' must be a list of result records")
    checked = []
    for i, record in enumerate(records):
        check_record(record, f"{where} record {i}")
        checked.append({**record, "source": SHIPPED})
    return {**doc, "results": checked}


_STRINGS = ("method", "decomposition", "fingerprint")
_OPTIONAL_STRINGS = ("model_source", "device", "created")


def check_record(record, where: str) -> None:
    """One ``EvalResult.to_dict()`` record: the fields the app reads are present and of the right type."""
    if not isinstance(record, dict):
        raise ResultsFileError(f"{where} must be an object, got {type(record).__name__}")
    label = f"{where} ({record.get('method')!r} @ {record.get('budget')!r})"
    for name in _STRINGS:
        if not isinstance(record.get(name), str) or not record[name]:
            raise ResultsFileError(f"{label}: {name!r} must be a non-empty string, got {record.get(name)!r}")
    for name in _OPTIONAL_STRINGS:
        if record.get(name) is not None and not isinstance(record[name], str):
            raise ResultsFileError(f"{label}: {name!r} must be a string, got {record[name]!r}")
    for name in ("budget", "realised_ratio"):
        value = record.get(name)
        if not is_number(value) or not 0.0 < value <= 1.0 + 1e-9:
            raise ResultsFileError(f"{label}: {name!r} must be a kept fraction in (0, 1], got {value!r}")
    _check_counts(record, label)
    check_measurements(record, label)
    _check_ranks(record.get("ranks"), label)
    if not isinstance(record.get("settings"), dict):
        raise ResultsFileError(f"{label}: 'settings' must be an object, got {record.get('settings')!r}")
    for name in ("zero_shot", "dense_zero_shot", "recovery"):  # recovery: a healed model's RecoveryResult.record()
        if record.get(name) is not None and not isinstance(record[name], dict):
            raise ResultsFileError(f"{label}: {name!r} must be an object or null")
    _check_latency(record.get("latency"), label)


def _check_counts(record: dict, label: str) -> None:
    kept, total = record.get("params_kept"), record.get("params_total")
    if not _integer(total) or total < 1 or not _integer(kept) or not 0 <= kept <= total:
        raise ResultsFileError(f"{label}: 'params_kept' and 'params_total' must be integers with "
                               f"0 <= kept <= total and total >= 1, got {kept!r} and {total!r}")
    if record.get("seconds") is not None and (not is_number(record["seconds"]) or record["seconds"] < 0):
        raise ResultsFileError(f"{label}: 'seconds' must be a number >= 0, got {record['seconds']!r}")


def check_measurements(record: dict, label: str) -> None:
    """ppl / dense_ppl: {dataset: perplexity > 0} (inf = diverged); kl: a finite number >= 0 or null
    (down to -KL_ROUNDOFF: the float32 round-off of a KL that is 0)."""
    for name in ("ppl", "dense_ppl"):
        values = record.get(name)
        if not isinstance(values, dict):
            raise ResultsFileError(f"{label}: {name!r} must be an object {{dataset: perplexity}}, got {values!r}")
        for dataset, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ResultsFileError(f"{label}: {name}[{dataset!r}] must be a perplexity > 0, got {value!r}")
    kl = record.get("kl")
    if kl is not None and (not is_number(kl) or kl < -KL_ROUNDOFF):
        raise ResultsFileError(f"{label}: 'kl' must be a finite number >= 0 or null, got {kl!r}")


ZERO_SHOT_METRICS = ("acc", "acc_norm")


def check_zero_shot(scores, label: str) -> None:
    """A ``zero_shot`` / ``dense_zero_shot`` field (``ZeroShotResult.to_dict()``): null, or an object whose
    ``mean`` maps metrics to numbers or null and whose ``tasks`` map names to objects of such metrics."""
    if scores is None:
        return
    if not isinstance(scores, dict):
        raise ResultsFileError(f"{label}: zero-shot scores must be an object or null, got {type(scores).__name__}")
    means, tasks = scores.get("mean") or {}, scores.get("tasks") or {}
    if not isinstance(means, dict) or not all(map(_score, means.values())):
        raise ResultsFileError(f"{label}: zero-shot 'mean' must be an object {{metric: number or null}}, got {means!r}")
    if not isinstance(tasks, dict):
        raise ResultsFileError(f"{label}: zero-shot 'tasks' must be an object {{task: scores}}, got {tasks!r}")
    for task, metrics in tasks.items():
        if not isinstance(metrics, dict) or not all(_score(metrics.get(m)) for m in ZERO_SHOT_METRICS):
            raise ResultsFileError(f"{label}: zero-shot tasks[{task!r}] must be an object of "
                                   f"{' / '.join(ZERO_SHOT_METRICS)} numbers or null, got {metrics!r}")


def _score(value) -> bool:
    """A metric value: a number, or null where the task does not define the metric."""
    return value is None or (not isinstance(value, bool) and isinstance(value, (int, float)))


def _check_ranks(ranks, label: str) -> None:
    """ranks: null (not recorded) or {layer name: rank >= 1, or null = dense}."""
    if ranks is None:
        return
    if not isinstance(ranks, dict) or not ranks:
        raise ResultsFileError(f"{label}: 'ranks' must be a non-empty object {{layer: rank or null}} or null")
    for name, rank in ranks.items():
        if rank is not None and (not _integer(rank) or rank < 1):
            raise ResultsFileError(f"{label}: ranks[{name!r}] must be an integer >= 1 or null (dense), got {rank!r}")


def _check_latency(latency, label: str) -> None:
    """latency: null or absent (not timed), else a valid ``latency.ModelTiming.to_dict()``."""
    if latency is None:
        return
    from .latency.model_timing import ModelTiming, ModelTimingError

    try:
        ModelTiming.from_dict(latency)
    except ModelTimingError as exc:
        raise ResultsFileError(f"{label}: {exc}") from None


def is_number(value) -> bool:
    """Whether a JSON field holds a finite number (a bool, string, null or object does not)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _integer(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)
