"""Step 5: the profile, the small artefact everything downstream reads.

A profile holds, for one (model fingerprint, calibration config, decomposition):
the layer table, every layer's full singular-value spectrum of the (whitened)
matrix, the LEMS scale measurements (KL with only that layer compressed to the
reference ratio), optional extra measured points, and dense reference numbers.

On disk it is two files in one folder: ``profile.json`` (metadata, layer table,
measurements) and ``spectra.safetensors`` (one float64 tensor per layer). No pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import sha256_file
from .model import LayerInfo

PROFILE_SCHEMA = "lems-profile/1"
PROFILE_JSON = "profile.json"
SPECTRA_FILE = "spectra.safetensors"


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
        tensors = {name: np.ascontiguousarray(s, dtype=np.float64) for name, s in self.spectra.items()}
        tmp_spectra = folder / (SPECTRA_FILE + ".tmp")
        save_file(tensors, str(tmp_spectra))
        spectra_sha = sha256_file(tmp_spectra)
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
            "spectra_sha256": spectra_sha,
        }
        tmp_json = folder / (PROFILE_JSON + ".tmp")
        tmp_json.write_text(json.dumps(doc, indent=1))
        os.replace(tmp_spectra, folder / SPECTRA_FILE)
        os.replace(tmp_json, folder / PROFILE_JSON)
        return folder

    @staticmethod
    def load(folder: str | Path) -> "Profile":
        """Read a profile folder; raise ProfileError on anything missing or inconsistent."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        json_path, spectra_path = folder / PROFILE_JSON, folder / SPECTRA_FILE
        if not json_path.is_file() or not spectra_path.is_file():
            raise ProfileError(f"{folder} is not a profile folder (needs {PROFILE_JSON} and {SPECTRA_FILE})")
        try:
            doc = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{json_path} is not valid JSON: {exc}") from exc
        if doc.get("schema") != PROFILE_SCHEMA:
            raise ProfileError(f"{json_path}: schema {doc.get('schema')!r}, expected {PROFILE_SCHEMA!r}")
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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{folder}: malformed profile ({exc!r})") from exc
        profile.validate()
        return profile

    def validate(self) -> None:
        """Check internal consistency: one spectrum per layer of the right length."""
        for l in self.layers:
            s = self.spectra.get(l.name)
            if s is None or s.ndim != 1 or len(s) != min(l.out_features, l.in_features):
                raise ProfileError(f"spectrum of {l.name} missing or of wrong length")
            if not np.all(np.isfinite(s)):
                raise ProfileError(f"spectrum of {l.name} has non-finite values")
        for arr in ([self.kl_ref] if self.kl_ref is not None else []) + list(self.measured.values()):
            if len(arr) != len(self.layers):
                raise ProfileError("a per-layer measurement does not have one value per layer")


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
