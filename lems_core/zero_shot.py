"""Step 9 (evaluate): zero-shot accuracy through lm-eval, the paper's headline metric (docs/reference/methods.md §5).

The reference calls ``lm_eval.simple_evaluate(HFLM(model), tasks=[...], num_fewshot=0,
batch_size="auto")`` and reports ``acc`` averaged over 8 tasks. Here the model handed
to lm-eval's ``HFLM`` is the project's own in-memory model (compressed in place, no
copy); every task is run on its own so progress and cancel work between tasks.

A task is an lm-eval name (its data comes from the Hugging Face hub) or the path of a
task YAML in lm-eval's format (``dataset_path: json`` + ``dataset_kwargs.data_files``
pointing at a local jsonl works offline; relative data files are resolved against the
YAML's folder). Hub tasks whose data cannot be fetched raise ``HubTasksUnavailable``,
which names them.

A local task YAML is data, never code: ``task_yaml.check_task_yaml`` reads and validates
it and every file it includes before lm-eval sees it and before any model work, and
refuses what would run code the user did not choose (``UnsafeTaskYAML``: ``!function``,
Jinja beyond field access, includes outside its folder, aliases; see ``task_yaml.py``).
The app offers only the paper's tasks and the YAMLs in the folder ``LEMS_TASKS_DIR``
names (``offered_task_files``), never a typed path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from torch import nn

from .run import Progress, check_cancel
from .safe_io import open_regular
from .task_yaml import TaskYAMLError, UnsafeTaskYAML, check_task_yaml  # noqa: F401  (re-exported)

# piqa .. boolq as in the reference; the reference's 8th task is a local MathQA copy,
# lm-eval's `mathqa` (regisss/math_qa on the hub) stands in for it.
PAPER_TASKS = ("piqa", "openbookqa", "hellaswag", "arc_challenge", "arc_easy", "winogrande", "boolq", "mathqa")
PAPER_ALIAS = "paper"
METRICS = ("acc", "acc_norm")
CPU_BATCH = 8  # batch_size="auto" probes ever larger batches: fine on a GPU, pointless on a CPU
TASKS_DIR_ENV = "LEMS_TASKS_DIR"  # the folder of local task YAMLs the app offers


class HubTasksUnavailable(ValueError):
    """Some lm-eval tasks need data from the Hugging Face hub, which could not be reached."""

    def __init__(self, tasks: dict[str, str]):
        self.tasks = tasks
        detail = "; ".join(f"{t}: {reason}" for t, reason in tasks.items())
        super().__init__(
            f"these tasks need the Hugging Face hub, which is unreachable or disabled (HF_DATASETS_OFFLINE / "
            f"HF_HUB_OFFLINE): {', '.join(tasks)}. Run them with network access, or pass local task YAMLs "
            f"(--tasks path/to/task.yaml). Details: {detail}")


@dataclass
class TaskScore:
    """One task's metrics (None where the task does not define one) and how many documents were scored."""

    acc: float | None
    acc_norm: float | None
    acc_stderr: float | None = None
    acc_norm_stderr: float | None = None
    samples: int = 0


@dataclass
class ZeroShotResult:
    """Per-task scores, their means, and the protocol they were measured with."""

    tasks: dict[str, TaskScore]
    settings: dict = field(default_factory=dict)

    @property
    def mean(self) -> dict[str, float]:
        """Unweighted mean over tasks of each metric (as the paper's "Acc"), over the tasks that define it.

        boolq, for one, has no acc_norm: its mean acc_norm is over the other tasks.
        """
        out = {}
        for metric in METRICS:
            values = [v for v in (getattr(s, metric) for s in self.tasks.values()) if v is not None]
            if values:
                out[metric] = sum(values) / len(values)
        return out

    def to_dict(self) -> dict:
        return {"tasks": {t: asdict(s) for t, s in self.tasks.items()}, "mean": self.mean, "settings": self.settings}

    @staticmethod
    def from_dict(d: dict) -> "ZeroShotResult":
        return ZeroShotResult({t: TaskScore(**s) for t, s in d["tasks"].items()}, dict(d.get("settings") or {}))


def parse_tasks(text: str | Sequence[str] | None) -> list[str]:
    """Comma-separated task specs; "paper" expands to the paper's eight tasks; duplicates dropped."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    out: list[str] = []
    for item in (i.strip() for i in items):
        for spec in (PAPER_TASKS if item == PAPER_ALIAS else (item,) if item else ()):
            if spec not in out:
                out.append(spec)
    if not out:
        raise ValueError("no zero-shot task given (e.g. --tasks paper, --tasks piqa,arc_easy or a task YAML path)")
    return out


def is_local_task(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def configured_tasks_dir() -> Path | None:
    """The folder ``LEMS_TASKS_DIR`` names (the server's choice of local task YAMLs), None when unset."""
    value = os.environ.get(TASKS_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def offered_task_files(folder: Path | None = None) -> dict[str, Path]:
    """File name -> path of the task YAMLs directly in ``folder`` (default: ``LEMS_TASKS_DIR``), sorted.

    Only regular files (or links to them) ending in .yaml / .yml; a missing folder offers none.
    """
    folder = folder if folder is not None else configured_tasks_dir()
    if folder is None or not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if is_local_task(p.name) and p.is_file())
    return {p.name: p for p in files}


def _local_config(spec: str) -> dict:
    """A local task YAML as a validated lm-eval config dict (includes merged), relative data files made absolute."""
    path = Path(spec).expanduser()
    cfg = check_task_yaml(path)
    if not isinstance(cfg.get("task"), str) or not cfg["task"]:
        raise TaskYAMLError(f"{spec}: a task YAML needs a 'task:' name")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": _absolute(files, path.parent.resolve())}
    return cfg


def _absolute(files, base: Path):
    """data_files (str, list or split dict) with relative paths that exist under ``base`` made absolute."""
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base) for v in files]
    candidate = base / str(files)
    return str(candidate) if not Path(str(files)).is_absolute() and candidate.exists() else files


def task_manager(specs: Sequence[str]):
    """An lm-eval TaskManager; the built-in task index (a few seconds to build) only when a named task needs it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=any(not is_local_task(s) for s in specs))


def load_tasks(specs: Sequence[str], manager=None) -> dict[str, object]:
    """spec -> lm-eval Task (its dataset loaded); unknown names are a ValueError, unreachable hub data HubTasksUnavailable."""
    manager = manager or task_manager(specs)
    unknown = [s for s in specs if not is_local_task(s) and s not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm-eval knows {len(manager.all_tasks)} "
                         f"names; local tasks are .yaml paths)")
    loaded, unreachable = {}, {}
    for spec in specs:
        try:
            tasks = manager.load([_local_config(spec) if is_local_task(spec) else spec])["tasks"]
        except Exception as exc:  # hub / network / offline-mode errors come in many types
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            if isinstance(exc, TaskYAMLError):
                raise
            if is_local_task(spec):
                raise ValueError(f"task {spec}: {reason}") from exc
            unreachable[spec] = reason
            continue
        if len(tasks) != 1:
            raise ValueError(f"{spec} is a group of {len(tasks)} tasks; pass its tasks by name")
        loaded[spec] = next(iter(tasks.values()))
    if unreachable:
        raise HubTasksUnavailable(unreachable)
    return loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def zero_shot(
    model: nn.Module,
    tokenizer,
    specs: Sequence[str],
    limit: int | None = None,
    batch_size: int | str | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    tasks: dict[str, object] | None = None,
) -> ZeroShotResult:
    """Zero-shot acc / acc_norm of ``model`` (as it is, e.g. compressed in place) on each task.

    ``tokenizer`` must be a Hugging Face tokenizer. ``limit`` caps the documents per
    task (lm-eval's --limit; None = all, the reference protocol). ``tasks`` are
    already loaded Tasks (``load_tasks``) to reuse.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    batch_size = batch_size or ("auto" if device.type == "cuda" else CPU_BATCH)
    tasks = tasks or load_tasks(specs)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    from lm_eval.tasks import TaskManager

    empty = TaskManager(include_defaults=False)  # the Tasks are built; without one lm-eval re-indexes every call
    scores = {}
    with _quiet_lm_eval():
        for i, spec in enumerate(specs):
            check_cancel(cancel)
            if progress:
                progress(i / len(specs), f"zero-shot {Path(spec).stem if is_local_task(spec) else spec}")
            out = lm_eval.simple_evaluate(model=lm, tasks=[tasks[spec]], num_fewshot=0, limit=limit,
                                          log_samples=False, bootstrap_iters=1000, task_manager=empty)
            name, metrics = next(iter(out["results"].items()))
            scores[name] = TaskScore(*(_metric(metrics, m) for m in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")),
                                     samples=int((out.get("n-samples") or {}).get(name, {}).get("effective", 0)))
    if progress:
        progress(1.0, "zero-shot done")
    return ZeroShotResult(scores, {"tasks": list(specs), "num_fewshot": 0, "limit": limit, "batch_size": str(batch_size),
                                   "lm_eval": getattr(lm_eval, "__version__", "?")})


def _metric(metrics: dict, name: str) -> float | None:
    value = metrics.get(f"{name},none")
    return None if value is None or isinstance(value, str) or not math.isfinite(float(value)) else float(value)


class _quiet_lm_eval:
    """lm-eval logs every request batch at INFO/WARNING; keep errors only for the duration."""

    def __enter__(self):
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def tasks_key(specs: Sequence[str]) -> list:
    """What a zero-shot result depends on beyond the model: task names, and local YAML + data file contents."""
    out = []
    for spec in specs:
        if not is_local_task(spec):
            out.append(spec)
            continue
        cfg = _local_config(spec)
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
        for f in _files_of((cfg.get("dataset_kwargs") or {}).get("data_files")):
            if Path(f).is_file():
                _hash_file(h, Path(f))
        out.append(f"{spec}#{h.hexdigest()[:16]}")
    return out


def _hash_file(h, path: Path) -> None:
    """Feed a data file's bytes to ``h`` in 1 MiB chunks (never the whole file in memory, never a FIFO)."""
    with open_regular(path, TaskYAMLError, "a task data file") as fd:
        for chunk in iter(lambda: os.read(fd, 1 << 20), b""):
            h.update(chunk)


def _files_of(files) -> list[str]:
    if isinstance(files, dict):
        return [f for v in files.values() for f in _files_of(v)]
    if isinstance(files, list):
        return [f for v in files for f in _files_of(v)]
    return [] if files is None else [str(files)]
