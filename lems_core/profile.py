"""Step 5: the profile, the small artefact everything downstream reads.

A profile holds, for one (model fingerprint, calibration config, decomposition):
the layer table, every layer's full singular-value spectrum of the (whitened)
matrix, the LEMS scale measurements (KL with only that layer compressed to the
reference ratio), optional extra measured points, and dense reference numbers.

On disk it is two files in one folder: ``profile.json`` (metadata, layer table,
measurements) and ``spectra.safetensors`` (one float64 tensor per layer). No pickle.

Integrity: ``profile.json`` carries ``spectra_sha256`` (the spectra file) and
``profile_sha256``, the sha256 of the canonical JSON (sorted keys, no spaces) of
every other field of the document, so a hand edit of any field (including fields
added later) is detected. Loading also validates the schema: layer names unique,
shapes positive, KL measurements finite and >= 0 with one value per layer. A
profile written before ``profile_sha256`` existed has none: it is schema-validated,
accepted, and gets the checksum when it is next saved. A checksum that is present
but wrong is an error.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import MAX_PROFILE_JSON_BYTES, read_json_capped, sha256_file
from .model import KINDS, LayerInfo
from .numerics import KL_ROUNDOFF

PROFILE_SCHEMA = "lems-profile/1"
PROFILE_JSON = "profile.json"
SPECTRA_FILE = "spectra.safetensors"
CHECKSUM_FIELD = "profile_sha256"


class ProfileError(ValueError):
    """A profile file is missing, corrupt, or of another schema."""


@dataclass
class Profile:
    """Spectra and sensitivities of one model under one decomposition."""

    model_source: str
    fingerprint: str
    decomposition: str
    calibration: dict
    layers: list[LayerInfo]
    spectra: dict[str, np.ndarray]  # layer name -> all min(m, n) singular values, descending
    ref_ratio: float = 0.1
    kl_ref: np.ndarray | None = None  # per layer, KL with only that layer at ref_ratio
    measured: dict[float, np.ndarray] = field(default_factory=dict)  # ratio -> per-layer KL
    dense: dict = field(default_factory=dict)  # e.g. {"search_ppl": ..., "search_nll": ...}
    meta: dict = field(default_factory=dict)  # timings, versions, settings
    schema: str = PROFILE_SCHEMA
    # The dense model's KL against its own cached reference, under every measurement:
    # {"kl": float, "reference_precision": "fp32" | "bf16", ...} (sensitivity.kl_floor).
    kl_floor: dict | None = None
    # The reference LEMS's (alpha, gamma) search (allocators/lems.py, docs/reference/methods.md §1.3, docs/reference/methods.md §9):
    # {"ratios": {"0.8": {"alpha", "gamma", "score", "trials": [...]}, ...}, "n_trials", "seed", ...}.
    bias_fit: dict | None = None
    # ratio -> per-layer mean NLL on the search windows with only that layer compressed
    # (single-layer search perplexity = exp): what ASVD's reference search ranks by (docs/reference/methods.md §4.2).
    measured_nll: dict[float, np.ndarray] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return max(l.block for l in self.layers) + 1

    @property
    def total_params(self) -> int:
        return sum(l.params for l in self.layers)

    def layer(self, name: str) -> LayerInfo:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    @property
    def key(self) -> str:
        """Identity of the inputs this profile was computed from."""
        return profile_key(self.fingerprint, self.calibration, self.decomposition, self.meta.get("settings", {}))

    # ----------------------------------------------------------------- disk
    def save(self, folder: str | Path) -> Path:
        """Write atomically: files land under a temporary name, then are renamed."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.validate()
        tensors = {name: np.ascontiguousarray(s, dtype=np.float64) for name, s in self.spectra.items()}
        tmp_spectra = _temp_path(folder, SPECTRA_FILE)
        tmp_json = _temp_path(folder, PROFILE_JSON)
        try:
            save_file(tensors, str(tmp_spectra))
            doc = self._document(sha256_file(tmp_spectra))
            tmp_json.write_text(json.dumps(doc, indent=1))
            os.replace(tmp_spectra, folder / SPECTRA_FILE)
            os.replace(tmp_json, folder / PROFILE_JSON)
        finally:  # a failed or interrupted save leaves no temporary files behind
            tmp_spectra.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
        return folder

    def _document(self, spectra_sha: str) -> dict:
        """profile.json's content, its checksum over every other field included."""
        doc = {
            "schema": self.schema,
            "model_source": self.model_source,
            "fingerprint": self.fingerprint,
            "decomposition": self.decomposition,
            "calibration": self.calibration,
            "layers": [l.to_dict() for l in self.layers],
            "ref_ratio": self.ref_ratio,
            "kl_ref": None if self.kl_ref is None else [float(x) for x in self.kl_ref],
            "measured": {f"{r:g}": [float(x) for x in v] for r, v in sorted(self.measured.items())},
            "dense": self.dense,
            "meta": self.meta,
            "kl_floor": self.kl_floor,
            "bias_fit": self.bias_fit,
            "spectra_sha256": spectra_sha,
        }
        if self.measured_nll:  # written only when measured, so older profiles keep their checksum
            doc["measured_nll"] = {f"{r:g}": [float(x) for x in v] for r, v in sorted(self.measured_nll.items())}
        doc[CHECKSUM_FIELD] = document_checksum(doc)
        return doc

    @staticmethod
    def load(folder: str | Path) -> "Profile":
        """Read a profile folder; raise ProfileError on anything missing or inconsistent."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        json_path, spectra_path = folder / PROFILE_JSON, folder / SPECTRA_FILE
        if not json_path.is_file() or not spectra_path.is_file():
            raise ProfileError(f"{folder} is not a profile folder (needs {PROFILE_JSON} and {SPECTRA_FILE})")
        doc = read_profile_document(json_path)
        if doc.get("spectra_sha256") != sha256_file(spectra_path):
            raise ProfileError(f"{spectra_path} does not match its checksum in {PROFILE_JSON} (corrupt or replaced)")
        try:
            spectra = load_file(str(spectra_path))
            layers = [LayerInfo.from_dict(d) for d in doc["layers"]]
            profile = Profile(
                model_source=doc["model_source"],
                fingerprint=doc["fingerprint"],
                decomposition=doc["decomposition"],
                calibration=doc["calibration"],
                layers=layers,
                spectra={l.name: spectra[l.name] for l in layers},
                ref_ratio=float(doc["ref_ratio"]),
                kl_ref=None if doc["kl_ref"] is None else np.asarray(doc["kl_ref"], dtype=np.float64),
                measured={float(r): np.asarray(v, dtype=np.float64) for r, v in doc["measured"].items()},
                dense=doc.get("dense", {}),
                meta=doc.get("meta", {}),
                kl_floor=doc.get("kl_floor"),
                bias_fit=doc.get("bias_fit"),
                measured_nll={float(r): np.asarray(v, dtype=np.float64) for r, v in (doc.get("measured_nll") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"{folder}: malformed profile ({exc!r})") from exc
        profile.validate()
        return profile

    def validate(self) -> None:
        """Check internal consistency: unique layers, one spectrum per layer of the right length,
        finite non-negative KL measurements with one value per layer. A measurement a few
        float32 eps below 0 is round-off of a KL that is 0: it is accepted and set to 0."""
        names = [l.name for l in self.layers]
        if not names:
            raise ProfileError("profile has no layers")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ProfileError(f"profile lists layer(s) more than once: {', '.join(duplicates[:5])}")
        for l in self.layers:
            if l.out_features < 1 or l.in_features < 1 or l.block < 0:
                raise ProfileError(f"layer {l.name}: shape {l.out_features}x{l.in_features} / block {l.block} is invalid")
        for l in self.layers:
            if l.kind not in KINDS:
                raise ProfileError(f"layer {l.name}: unknown kind {l.kind!r} (one of {', '.join(KINDS)})")
        if not isinstance(self.ref_ratio, (int, float)) or not 0.0 < self.ref_ratio < 1.0:
            raise ProfileError(f"ref_ratio must lie in (0, 1), got {self.ref_ratio!r}")
        for name in ("calibration", "dense", "meta"):
            if not isinstance(getattr(self, name), dict):
                raise ProfileError(f"profile field {name!r} must be an object")
        for name in ("model_source", "fingerprint", "decomposition"):
            if not isinstance(getattr(self, name), str):
                raise ProfileError(f"profile field {name!r} must be a string")
        for ratio in self.measured:
            if not 0.0 < ratio <= 1.0:
                raise ProfileError(f"measured ratio {ratio!r} is not a kept fraction in (0, 1]")
        for l in self.layers:
            s = self.spectra.get(l.name)
            if s is None or s.ndim != 1 or len(s) != min(l.out_features, l.in_features):
                raise ProfileError(f"spectrum of {l.name} missing or of wrong length")
            if not np.all(np.isfinite(s)):
                raise ProfileError(f"spectrum of {l.name} has non-finite values")
        if self.kl_ref is not None:
            self.kl_ref = _measurements(self.kl_ref, len(self.layers), "a per-layer KL measurement (KL is >= 0)")
        for r, arr in self.measured.items():
            self.measured[r] = _measurements(arr, len(self.layers), "a per-layer KL measurement (KL is >= 0)")
        for ratio, arr in self.measured_nll.items():
            if not 0.0 < ratio <= 1.0 or np.ndim(arr) != 1 or len(arr) != len(self.layers):
                raise ProfileError(f"measured_nll at {ratio!r}: needs a kept fraction in (0, 1] and one value per layer")
        for r, arr in self.measured_nll.items():
            self.measured_nll[r] = _measurements(arr, len(self.layers), f"measured_nll at {r!r}")
        _check_kl_floor(self.kl_floor)
        _check_bias_fit(self.bias_fit)


def _measurements(values, layers: int, what: str) -> np.ndarray:
    """Per-layer values that are >= 0 in exact arithmetic, one per layer, finite; round-off negatives
    (down to -KL_ROUNDOFF, the float32 error of a KL near 0) come back as 0, real negatives are refused.
    An array with nothing to clamp is returned as it is (memoised tables key on its identity)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) != layers:
        raise ProfileError("a per-layer measurement does not have one value per layer")
    if not np.all(np.isfinite(arr)) or np.any(arr < -KL_ROUNDOFF):
        raise ProfileError(f"{what}: a value is negative or not finite")
    return np.maximum(arr, 0.0) if np.any(arr < 0) else arr


def _check_kl_floor(floor) -> None:
    if floor is None:
        return
    kl = floor.get("kl") if isinstance(floor, dict) else None
    if isinstance(kl, bool) or not isinstance(kl, (int, float)) or not math.isfinite(kl):
        raise ProfileError(f"kl_floor must be an object with a finite 'kl', got {floor!r}")


def _check_bias_fit(fit) -> None:
    """{"ratios": {"<ratio>": {"alpha": a >= 0, "gamma": g >= 0, ...}}} with ratios in (0, 1]."""
    if fit is None:
        return
    ratios = fit.get("ratios") if isinstance(fit, dict) else None
    if not isinstance(ratios, dict) or not ratios:
        raise ProfileError("bias_fit must be an object with a non-empty 'ratios' object")
    for key, entry in ratios.items():
        try:
            ratio = float(key)
        except ValueError:
            raise ProfileError(f"bias_fit ratio {key!r} is not a number") from None
        if not 0.0 < ratio <= 1.0 or not isinstance(entry, dict):
            raise ProfileError(f"bias_fit entry {key!r} must be a kept fraction in (0, 1] with an object")
        for name in ("alpha", "gamma"):
            value = entry.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ProfileError(f"bias_fit at {key}: {name} must be a finite number >= 0, got {value!r}")


def document_checksum(doc: dict) -> str:
    """sha256 of the canonical JSON of ``doc`` without its own checksum field."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_profile_document(json_path: Path) -> dict:
    """profile.json as a dict, its schema and checksum verified; ProfileError otherwise.

    A missing ``profile_sha256`` (profiles written before it existed) is accepted;
    the schema validation in ``Profile.load`` still applies.
    """
    doc = read_json_capped(json_path, MAX_PROFILE_JSON_BYTES, ProfileError, "a profile")
    if not isinstance(doc, dict):
        raise ProfileError(f"{json_path} must hold a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != PROFILE_SCHEMA:
        raise ProfileError(f"{json_path}: schema {doc.get('schema')!r}, expected {PROFILE_SCHEMA!r}")
    stored = doc.get(CHECKSUM_FIELD)
    if stored is not None and stored != document_checksum(doc):
        raise ProfileError(f"{json_path} does not match its {CHECKSUM_FIELD} (edited by hand or corrupt)")
    return doc


def _temp_path(folder: Path, name: str) -> Path:
    """A fresh temporary file beside ``name`` (unique, so concurrent savers never share one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make committed / shared profiles unreadable to others
    return Path(tmp)


def profile_key(fingerprint: str, calibration: dict, decomposition: str, settings: dict | None = None) -> str:
    payload = json.dumps([fingerprint, calibration, decomposition, settings or {}], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def synthetic_profile(num_blocks: int = 4, hidden: int = 64, inter: int = 160, kv: int = 32, seed: int = 0) -> Profile:
    """A profile with made-up but realistic spectra and KL scales, for tests of
    everything downstream of profiling (allocation, plans, the app)."""
    rng = np.random.default_rng(seed)
    shapes = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
              "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    layers, spectra, kl = [], {}, []
    for b in range(num_blocks):
        for kind, (m, n) in shapes.items():
            name = f"model.layers.{b}.{'self_attn' if kind in 'qkvo' else 'mlp'}.{kind}_proj"
            layers.append(LayerInfo(name, b, kind, m, n))
            decay = rng.uniform(0.5, 3.0)
            k = min(m, n)
            spectra[name] = np.sort(np.exp(-decay * np.linspace(0, 1, k)) * rng.uniform(0.5, 2.0, k).clip(0.9, 1.1))[::-1].copy()
            kl.append(rng.lognormal(mean=-3 + 2.0 * (b == 0), sigma=0.7))
    return Profile("synthetic", f"synthetic{seed}", "svd_llm", {"dataset": "synthetic"}, layers, spectra,
                   kl_ref=np.asarray(kl), dense={"search_ppl": 10.0}, meta={"synthetic": True})
