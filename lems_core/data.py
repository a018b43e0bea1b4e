"""Text corpora for calibration and evaluation: hub names through `datasets`, or local files.

The reference protocol (docs/reference/methods.md §5.1) joins the rows of a split with "\\n\\n".
Local files are turned back into the same row layout before joining, so a local
WikiText-2 raw file gives the text the hub dataset would give.

Hub names are used only when no local copy is found and `allow_download` is true;
tests never download.

Every local file is read through ``safe_io``'s capped reader: a named pipe, a device
or a folder given as a corpus is refused at once (never opened for a blocking read),
and a file over ``MAX_CORPUS_BYTES`` is refused instead of filling memory.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .safe_io import read_text_capped

# name -> (hub dataset, config, text field)
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    # the same text through the standard wikitext detokeniser (lm-eval's wikitext task)
    "wikitext2-detok": ("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence"),
    "c4": ("allenai/c4", "en", "text"),
}
ALIASES = {"wikitext-2": "wikitext2", "wikitext": "wikitext2", "wiki": "wikitext2", "penn_treebank": "ptb"}
# WikiText-2's train split is 11 MB, the local C4 validation shard about 40 MB: the cap holds every
# corpus the project knows several times over, while a runaway file (or /dev/zero behind a link) is
# refused before its bytes, their decoded text and the rows built from it (about 3x) fill memory.
MAX_CORPUS_BYTES = 256 << 20
C4_DOCS = 2000  # first 2000 validation documents, as SparseGPT/SVD-LLM (docs/reference/methods.md §5.1)

# Files looked for in the local data folder, per (name, split).
LOCAL_FILES = {
    ("wikitext2", "test"): ["wikitext-2-raw/wiki.test.raw"],
    ("wikitext2", "validation"): ["wikitext-2-raw/wiki.valid.raw", "wikitext-2/valid.tokens.txt"],
    ("wikitext2", "train"): ["wikitext-2-raw/wiki.train.raw", "wikitext-2/train.tokens.txt"],
    ("wikitext2-detok", "test"): ["wikitext-2-raw/wiki.test.raw", "wikitext-2/test.tokens.txt"],
    ("wikitext2-detok", "validation"): ["wikitext-2-raw/wiki.valid.raw", "wikitext-2/valid.tokens.txt"],
    ("wikitext2-detok", "train"): ["wikitext-2-raw/wiki.train.raw", "wikitext-2/train.tokens.txt"],
    ("ptb", "validation"): ["ptb/ptb.valid.txt"],
    ("ptb", "test"): ["ptb/ptb.test.txt"],
    ("c4", "validation"): ["c4/c4-validation.json", "c4/c4-validation.jsonl"],
}


# Splits perplexity is measured on, in order of preference: the reference evaluates
# WikiText-2 and PTB on *test* (docs/reference/methods.md §5.1, docs/reference/methods.md §9 "Evaluation"); C4 ships only a
# validation shard locally and on the hub. PTB falls back to validation (with a
# warning, and the split recorded in every result) when no test copy is found.
EVAL_SPLITS = {"ptb": ("test", "validation"), "c4": ("validation",)}
DETOKENISED = {"wikitext2-detok"}


def canonical_dataset(name: str) -> str | None:
    """The known corpus name for ``name`` or one of its aliases, else None (e.g. a path)."""
    if not isinstance(name, str):
        return None
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    return key if key in HUB_DATASETS else None


def evaluation_split(name: str, allow_download: bool = False) -> str:
    """The split perplexity is measured on for ``name`` (a known name or a file path).

    The first preferred split with a local copy (or the first one when downloads
    are allowed: the hub has every split); a fallback is announced with a warning.
    """
    key = canonical_dataset(name)
    preferred = EVAL_SPLITS.get(key or "", ("test",))
    if key is None or allow_download:
        return preferred[0]
    for split in preferred:
        if has_local(key, split):
            if split != preferred[0]:
                warnings.warn(f"{key}: no local {preferred[0]} split under {data_dir()} "
                              f"(e.g. {LOCAL_FILES[(key, preferred[0])][0]}); perplexity uses the {split} split",
                              EvalSplitWarning, stacklevel=2)
            return split
    return preferred[0]  # nothing local: load_text says what is missing


class EvalSplitWarning(UserWarning):
    """Perplexity is measured on another split than the reference's (e.g. PTB validation)."""


def has_local(name: str, split: str) -> bool:
    """Whether a local copy of a known corpus's split exists under ``data_dir()``."""
    return any((data_dir() / rel).is_file() for rel in LOCAL_FILES.get((name, split), []))


class DataNotFoundError(FileNotFoundError):
    """No local copy and downloading is not allowed."""


class CorpusFileError(ValueError):
    """A local corpus file that cannot be used: not a regular file, too large, not UTF-8, bad JSON rows."""


@dataclass(frozen=True)
class TextSource:
    """Where a corpus came from, for provenance in profiles and results."""

    name: str
    split: str
    origin: str  # a local path or "hub:<dataset>/<config>"


def data_dir() -> Path:
    """Local data folder: $LEMS_DATA_DIR, else ../shared/data beside the repository."""
    env = os.environ.get("LEMS_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_text(name_or_path: str, split: str = "test", allow_download: bool = False) -> tuple[str, TextSource]:
    """Return the whole split as one string joined with "\\n\\n", and where it came from.

    `name_or_path` is a known name (wikitext2, ptb, c4), or a path to a .txt/.raw/
    .json/.jsonl file. Known names look in `data_dir()` first, then on the hub.
    """
    path = Path(name_or_path).expanduser()
    if _names_a_local_file(name_or_path, path):
        return join_rows(read_rows(path)), TextSource(path.stem, split, str(path))
    name = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if name not in HUB_DATASETS:
        raise ValueError(f"Unknown dataset {name_or_path!r}: use one of {sorted(HUB_DATASETS)} or a file path")
    for rel in LOCAL_FILES.get((name, split), []):
        local = data_dir() / rel
        if local.is_file():
            rows = read_rows(local)
            if name == "c4":
                rows = rows[:C4_DOCS]
            if name in DETOKENISED:
                rows = [wikitext_detokenize(r) for r in rows]
            return join_rows(rows), TextSource(name, split, str(local))
    if not allow_download:
        raise DataNotFoundError(
            f"No local copy of {name}/{split} under {data_dir()} (set LEMS_DATA_DIR or pass a file path); "
            "pass allow_download=True / --download to fetch it with `datasets`."
        )
    return _load_from_hub(name, split)


def _names_a_local_file(name_or_path: str, path: Path) -> bool:
    """Whether ``name_or_path`` is read as a local file: a regular file, or anything else that exists
    under a name that is not a known corpus (a pipe or a device is then refused by the reader, by name)."""
    return path.is_file() or (canonical_dataset(name_or_path) is None and os.path.lexists(path))


def _load_from_hub(name: str, split: str) -> tuple[str, TextSource]:
    import datasets

    dataset, config, field = HUB_DATASETS[name]
    if name == "c4":
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = datasets.load_dataset(dataset, data_files=files, split="validation")
        rows = ds[field][:C4_DOCS]
    else:
        rows = datasets.load_dataset(dataset, config, split=split)[field]
    if name in DETOKENISED:
        rows = [wikitext_detokenize(r) for r in rows]
    return join_rows(rows), TextSource(name, split, f"hub:{dataset}/{config}")


def read_rows(path: Path) -> list[str]:
    """Rows of a local corpus file in the layout of the hub dataset's text field."""
    text = read_corpus_text(path)
    if path.suffix in {".json", ".jsonl"}:
        return _json_rows(path, text)
    lines = text.splitlines(keepends=True)
    if path.name.startswith("ptb"):
        # ptb_text_only rows are stripped sentences.
        return [line.strip() for line in lines if line.strip()]
    # wikitext rows keep the line with its newline; blank lines are empty rows.
    return [line if line.strip() else "" for line in lines]


def read_corpus_text(path: Path) -> str:
    """The UTF-8 text of a local corpus file, with universal newlines (as ``Path.read_text``), through the
    capped reader: ``CorpusFileError`` for a pipe, device, folder or a file over ``MAX_CORPUS_BYTES``."""
    text = read_text_capped(path, MAX_CORPUS_BYTES, CorpusFileError, "a text corpus (.txt, .raw, .json or .jsonl)")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_rows(path: Path, text: str) -> list[str]:
    """The rows of a JSON list / object or JSON-lines file: each record's "text" field (or the record itself)."""
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        records = _json_lines(path, text)
    except RecursionError:
        raise CorpusFileError(f"{path} is not a text corpus: its JSON is nested too deeply") from None
    missing = next((i for i, r in enumerate(records) if isinstance(r, dict) and not isinstance(r.get("text"), str)), None)
    if missing is not None:
        raise CorpusFileError(f"{path}: record {missing} has no \"text\" string")
    return [r["text"] if isinstance(r, dict) else str(r) for r in records]


def _json_lines(path: Path, text: str) -> list:
    """The records of a JSON-lines file, one per non-blank line."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as exc:
                raise CorpusFileError(f"{path} line {number} is not JSON: {exc}") from None
    return records


def join_rows(rows: list[str]) -> str:
    return "\n\n".join(rows)


# --------------------------------------------------------------------------- wikitext detokeniser
# The standard rules (lm-eval's ``wikitext`` task, Megatron's ``wikitext_detokenizer``),
# applied per row. Both the tokenised files and the *raw* WikiText files (and so the
# hub's wikitext-2-raw-v1, which the reference calibrates on) carry these markers;
# the tokens files differ from the raw ones only by ``<unk>``, which no rule can undo.
_DETOK_REPLACEMENTS = (
    ("s '", "s'"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
)
_DETOK_BRACKETS = (
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
)
_DETOK_TAIL = (
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
)


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenisation markers (`` @-@ `` -> ``-``, `` , `` -> ``, ``, quotes, headings)."""
    for old, new in _DETOK_REPLACEMENTS:
        text = text.replace(old, new)
    for pattern, repl in _DETOK_BRACKETS:
        text = pattern.sub(repl, text)
    for old, new in _DETOK_TAIL:
        text = text.replace(old, new)
    return text
