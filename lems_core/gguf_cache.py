"""Convert a GGUF checkpoint once into a Hugging Face folder in the cache, then load that folder.

transformers parses a GGUF file three times (config, tokenizer, weights) in pure
Python and dequantises every tensor on each load: tens of seconds for the 100 MB
demo. The first load of a GGUF file therefore dequantises it once (fp32, on CPU)
and saves a standard folder (``config.json``, tokenizer files, safetensors);
every later load is a plain ``from_pretrained(folder)``.

Layout under the cache root (``$LEMS_GGUF_CACHE_DIR``, else ``<cache dir>/models``):

    gguf-<sha256[:16]>/      the conversion, keyed by the GGUF file's content hash
        conversion.json      written last: source hash, transformers version, and
                             each safetensors file's size, sha256, tensor names/shapes
    sha256-memo.json         file hashes memoised by (path, size, mtime_ns, inode)

A conversion is written into a hidden temporary sibling, checked (the saved folder
must reload to the same tokens, weights and fingerprint as the GGUF load) and
renamed into place, so a reader never sees a partial folder. A folder whose marker
is missing, names another source hash or transformers version, or whose weights
files are missing, truncated or changed, is converted again. Two processes that
convert the same file at once each write their own temporary folder; the second
to finish uses the folder the first renamed in.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .cache import default_cache_dir, sha256_file
from .safe_io import host_tag, remove_abandoned_temporaries, sibling_path  # noqa: F401  (host_tag: tests)

log = logging.getLogger(__name__)

CACHE_ENV = "LEMS_GGUF_CACHE_DIR"
MARKER = "conversion.json"
HASH_MEMO = "sha256-memo.json"
MARKER_FORMAT = 1
_MAX_JSON_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100 << 20
# Text whose tokens the converted tokenizer must reproduce: words, digits, accents, chat markup.
_TOKENIZER_PROBE = "Hello, world! The year 2024: naïve café, ünïcödé. <|im_start|>user\nhi<|im_end|>\n\t  x"

_PARSE_ONCE = threading.Lock()  # one conversion at a time swaps gguf's reader and name map
Converter = Callable[[Path, Path], None]  # (GGUF file, empty folder to write the HF checkpoint into)


class ConversionError(RuntimeError):
    """A GGUF file could not be converted into a folder that loads the same model."""


@dataclass(frozen=True)
class Conversion:
    """Where a GGUF file's converted folder is, the file's sha256, and whether this call converted it."""

    folder: Path
    source_sha256: str
    converted: bool


def gguf_cache_root(cache_root: str | Path | None = None) -> Path:
    """The folder holding conversions: ``cache_root``, else ``$LEMS_GGUF_CACHE_DIR``, else ``<cache>/models``."""
    if cache_root is not None:
        return Path(cache_root).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else default_cache_dir() / "models"


def converted_folder(gguf_path: str | Path, cache_root: str | Path | None = None,
                     converter: Converter | None = None) -> Conversion:
    """The cached Hugging Face folder of ``gguf_path``, converting it first when it is absent or damaged."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    root = gguf_cache_root(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    memo = root / HASH_MEMO
    sha = memoised_sha256(gguf_path, memo)
    target = root / f"gguf-{sha[:16]}"
    problem = conversion_problem(target, sha, memo)
    if problem is None:
        return Conversion(target, sha, converted=False)
    log.info("converting %s into %s (%s); later loads read the folder", gguf_path, target, problem)
    _convert_into(target, gguf_path, sha, converter or convert_gguf, memo)
    return Conversion(target, sha, converted=True)


# ------------------------------------------------------------------------------ hashing
def memoised_sha256(path: Path, memo: Path) -> str:
    """sha256 of ``path``, rehashed only when its size, mtime or inode changed since it was memoised."""
    key, stamp = str(Path(path).resolve()), _stamp(path)
    entry = _read_memo(memo).get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    sha = sha256_file(path)
    remember_sha256(memo, {path: sha})
    return sha


def remember_sha256(memo: Path, hashes: dict[Path, str]) -> None:
    """Record known file hashes in the memo; entries of files that no longer exist are dropped."""
    entries = {k: v for k, v in _read_memo(memo).items() if os.path.exists(k)}
    for path, sha in hashes.items():
        entries[str(Path(path).resolve())] = {"stamp": _stamp(path), "sha256": sha}
    tmp = sibling_path(memo, "tmp")
    try:  # a concurrent writer may win and drop this entry: it is then just hashed again
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, memo)
    finally:
        tmp.unlink(missing_ok=True)


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_memo(memo: Path) -> dict:
    """The memo's entries; an absent, oversized or unreadable memo is empty (hashes are recomputed)."""
    value = _read_json(memo)
    return value if isinstance(value, dict) else {}


def _read_json(path: Path):
    """The JSON value of a small regular file, or None when it is absent, too large or not JSON."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_JSON_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


# ------------------------------------------------------------------------------ validity
def conversion_problem(folder: Path, sha: str, memo: Path | None = None) -> str | None:
    """Why ``folder`` is not a complete conversion of the GGUF file with hash ``sha``; None when it is."""
    marker = _read_json(folder / MARKER)
    if not isinstance(marker, dict):
        return "no conversion marker" if not (folder / MARKER).exists() else "unreadable conversion marker"
    if marker.get("format") != MARKER_FORMAT or marker.get("source_sha256") != sha:
        return "marker names another source file"
    if marker.get("transformers_version") != _transformers_version():
        return f"converted by transformers {marker.get('transformers_version')}"
    if not (folder / "config.json").is_file():
        return "config.json missing"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "marker lists no weights file"
    for name, expected in files.items():
        problem = _weights_file_problem(folder / name, expected, memo)
        if problem:
            return f"{name}: {problem}"
    return None


def _weights_file_problem(path: Path, expected: dict, memo: Path | None) -> str | None:
    """What differs between a safetensors file and its marker entry (size, tensors, sha256); None if nothing."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != expected.get("size"):
        return "size differs from the marker (truncated or rewritten)"
    try:
        tensors = safetensors_tensors(path)
    except ValueError as exc:
        return str(exc)
    if tensors != expected.get("tensors"):
        return "tensor names or shapes differ from the marker"
    sha = memoised_sha256(path, memo) if memo else sha256_file(path)
    return None if sha == expected.get("sha256") else "sha256 differs from the marker"


def safetensors_tensors(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape"}} from a safetensors header; ValueError if the file is cut short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError("safetensors header runs past the end of the file")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise ValueError("safetensors header is not JSON") from None
    header.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + length + end > size:
        raise ValueError("tensor data runs past the end of the file (truncated)")
    return {name: {"dtype": t["dtype"], "shape": list(t["shape"])} for name, t in sorted(header.items())}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ------------------------------------------------------------------------------ writing
def _convert_into(target: Path, gguf_path: Path, sha: str, converter: Converter, memo: Path) -> None:
    """Run ``converter`` into a temporary sibling of ``target``, mark it, and rename it into place."""
    remove_abandoned_temporaries(target)
    temporary = sibling_path(target, "tmp")
    temporary.mkdir()
    try:
        converter(gguf_path, temporary)
        hashes = write_marker(temporary, sha, gguf_path.name)
        if install_conversion(temporary, target, sha):
            remember_sha256(memo, {target / name: h for name, h in hashes.items()})
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # gone already when it was renamed in


def write_marker(folder: Path, sha: str, source_name: str) -> dict[str, str]:
    """Describe the folder's safetensors files in ``conversion.json`` (written last); returns their hashes."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights or not (folder / "config.json").is_file():
        raise ConversionError(f"the conversion of {source_name} wrote no config.json or no safetensors file")
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p), "tensors": safetensors_tensors(p)}
             for p in weights}
    marker = {"format": MARKER_FORMAT, "source_sha256": sha, "source_name": source_name,
              "transformers_version": _transformers_version(), "torch_version": torch.__version__, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=1))
    return {name: entry["sha256"] for name, entry in files.items()}


def install_conversion(temporary: Path, target: Path, sha: str) -> bool:
    """Rename ``temporary`` to ``target``; False when a valid ``target`` appeared meanwhile (it is kept)."""
    if os.path.lexists(target):
        if conversion_problem(target, sha) is None:
            return False
        _discard(target)
    try:
        os.rename(temporary, target)
    except OSError:  # another process renamed its conversion in between: use it if it is whole
        if conversion_problem(target, sha) is not None:
            raise
        return False
    return True


def _discard(folder: Path) -> None:
    """Move a damaged conversion aside and delete it (a concurrent discarder may have moved it already)."""
    aside = sibling_path(folder, "old")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------ the converter
def convert_gguf(gguf_path: Path, out: Path, fingerprint: Callable[[torch.nn.Module], str] | None = None) -> None:
    """Dequantise ``gguf_path`` with transformers (fp32, CPU) and save it into ``out`` as a safetensors folder.

    The saved folder is reloaded and must give the same tokens, weights and
    fingerprint as the GGUF load, so a cached model is the model the file holds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _drop_gguf_quantizer(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    check_reload_identical(model, tokenizer, out, fingerprint)


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and gguf's tensor-name map built once per architecture.

    transformers reads the file three times (config, tokenizer, weights), each time with
    a new ``gguf.GGUFReader`` whose pure-Python parse of the demo's 49k-token vocabulary
    takes seconds, and it builds the tensor-name map again for every submodule (about
    400 times for the demo). Readers (read-only memory maps) and maps are only read, so
    sharing them yields the same config, tokenizer and weights: the tensors are
    dequantised by the same code from the same bytes.
    """
    import gguf

    with _PARSE_ONCE:
        new_reader, new_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple[str, str], object] = {}

        def shared_reader(path, mode="r"):
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = new_reader(path, mode)
            return readers[key]
        gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(new_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = new_reader, new_map


def _drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """Detach the GGUF loader's quantizer: the weights are already dense, and save_pretrained refuses it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def check_reload_identical(model: torch.nn.Module, tokenizer, folder: Path,
                           fingerprint: Callable[[torch.nn.Module], str] | None = None) -> None:
    """ConversionError unless ``folder`` reloads to the same tokenizer behaviour, weights and fingerprint.

    ``fingerprint`` is the project's model fingerprint, handed in by the model loader (which
    this module sits below); the weights comparison alone already implies an equal one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tok = AutoTokenizer.from_pretrained(folder)
    if reloaded_tok(_TOKENIZER_PROBE)["input_ids"] != tokenizer(_TOKENIZER_PROBE)["input_ids"] \
            or reloaded_tok.chat_template != tokenizer.chat_template \
            or reloaded_tok.special_tokens_map != tokenizer.special_tokens_map:
        raise ConversionError(f"the tokenizer saved in {folder} does not behave as the GGUF one")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise ConversionError(f"the weights saved in {folder} differ from the GGUF load")
    if fingerprint is not None and fingerprint(reloaded) != fingerprint(model):
        raise ConversionError(f"the model saved in {folder} has another fingerprint than the GGUF load")
