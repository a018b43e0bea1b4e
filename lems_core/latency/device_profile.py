"""The device profile: measured times of dense and low-rank Linears, per layer shape.

A device profile answers "how long does an m x n Linear take, dense or factorised at
rank r, on this device, in this workload". It holds, for every distinct layer shape,
the dense time and the low-rank time (x @ B^T then @ A^T, two bias-free Linears, as
``compression.LowRankLinear`` runs them) on a grid of ranks; between grid points the
time is interpolated piecewise-linearly, which is monotone in rank because the stored
grid times are (the measurement fits them isotonically).

It is a small JSON document (schema ``lems-device-profile/1``) keyed by what the times
depend on (``ProfileKey``: device name, dtype, torch version, thread count, workload);
a profile read back is validated strictly and any fault is a ``DeviceProfileError``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from ..safe_io import read_bytes_capped

DEVICE_PROFILE_SCHEMA = "lems-device-profile/1"
MAX_DEVICE_PROFILE_BYTES = 1 << 20
WORKLOAD_KINDS = ("prefill", "decode")

Shape = tuple[int, int]  # (out_features m, in_features n)


class DeviceProfileError(ValueError):
    """A device profile is malformed, does not cover the model's shapes, or was measured for other conditions."""


@dataclass(frozen=True)
class Workload:
    """What one timed call computes: ``batch`` sequences of ``tokens`` tokens through a Linear.

    "prefill" is a prompt pass (tokens > 1, compute bound on most devices); "decode" is
    one new token per sequence (tokens = 1, memory bound: the weights are read once per token).
    """

    kind: str
    batch: int = 1
    tokens: int = 1

    def __post_init__(self):
        if self.kind not in WORKLOAD_KINDS:
            raise DeviceProfileError(f"workload kind must be one of {WORKLOAD_KINDS}, got {self.kind!r}")
        if not all(_positive_int(v) for v in (self.batch, self.tokens)):
            raise DeviceProfileError(f"workload batch and tokens must be positive integers, got "
                                     f"{self.batch!r} and {self.tokens!r}")
        if self.kind == "decode" and self.tokens != 1:
            raise DeviceProfileError(f"a decode workload runs one token per sequence, got tokens={self.tokens}")

    @staticmethod
    def named(kind: str, batch: int = 1, tokens: int = 256) -> "Workload":
        """The workload called ``kind``: decode (batch x 1 token) or prefill (batch x ``tokens``)."""
        return Workload(kind, batch, 1 if kind == "decode" else tokens)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.kind} {self.batch}x{self.tokens}"


@dataclass(frozen=True)
class ProfileKey:
    """What measured times depend on; two profiles with different keys are not interchangeable."""

    device: str  # CPU model name or CUDA device name
    device_type: str  # "cpu" / "cuda"
    dtype: str  # "float32", "bfloat16", ...
    torch: str
    threads: int
    workload: Workload

    def to_dict(self) -> dict:
        return {**asdict(self), "workload": self.workload.to_dict()}

    @staticmethod
    def from_dict(raw) -> "ProfileKey":
        if not isinstance(raw, dict):
            raise DeviceProfileError("device profile field 'key' must be an object")
        names = ("device", "device_type", "dtype", "torch")
        if any(not isinstance(raw.get(n), str) for n in names) or not _positive_int(raw.get("threads")):
            raise DeviceProfileError(f"device profile key needs strings {', '.join(names)} and a positive "
                                     f"integer 'threads', got {raw!r}")
        workload = raw.get("workload")
        if not isinstance(workload, dict) or set(workload) != {"kind", "batch", "tokens"}:
            raise DeviceProfileError(f"device profile key 'workload' must be {{kind, batch, tokens}}, got {workload!r}")
        return ProfileKey(*(raw[n] for n in names), raw["threads"], Workload(**workload))

    def differences(self, other: "ProfileKey") -> list[str]:
        """'field: mine vs other' for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


@dataclass(frozen=True)
class ShapeTimes:
    """Times of one layer shape: dense, and low-rank on a rising grid of ranks (seconds per call).

    ``lowrank_seconds`` is the monotone (isotonic) fit of ``measured_seconds``, the raw medians.
    """

    out_features: int
    in_features: int
    dense_seconds: float
    ranks: tuple[int, ...]
    lowrank_seconds: tuple[float, ...]
    measured_seconds: tuple[float, ...] = ()

    @property
    def shape(self) -> Shape:
        return (self.out_features, self.in_features)

    def lowrank_time(self, ranks) -> np.ndarray:
        """Interpolated low-rank time at ``ranks``: exact at grid points, linear between, monotone.

        Below the first grid rank the first grid time is used (an upper bound, as time
        rises with rank); above the last, the last segment's slope continues.
        """
        ranks = np.asarray(ranks, dtype=np.float64)
        grid, times = np.asarray(self.ranks, np.float64), np.asarray(self.lowrank_seconds, np.float64)
        inside = np.interp(ranks, grid, times)
        if grid.size < 2:
            return inside
        slope = max(0.0, (times[-1] - times[-2]) / (grid[-1] - grid[-2]))
        return np.where(ranks > grid[-1], times[-1] + slope * (ranks - grid[-1]), inside)

    def to_dict(self) -> dict:
        return {"out": self.out_features, "in": self.in_features, "dense_seconds": self.dense_seconds,
                "ranks": list(self.ranks), "lowrank_seconds": list(self.lowrank_seconds),
                "measured_seconds": list(self.measured_seconds)}

    @staticmethod
    def from_dict(raw, where: str) -> "ShapeTimes":
        if not isinstance(raw, dict):
            raise DeviceProfileError(f"{where} must be an object")
        out_f, in_f = raw.get("out"), raw.get("in")
        if not (_positive_int(out_f) and _positive_int(in_f)):
            raise DeviceProfileError(f"{where}: 'out' and 'in' must be positive integers")
        where = f"{where} ({out_f}x{in_f})"
        dense = _positive_times([raw.get("dense_seconds")], f"{where} dense_seconds")[0]
        ranks = raw.get("ranks")
        if not isinstance(ranks, list) or not ranks or not all(_positive_int(r) for r in ranks):
            raise DeviceProfileError(f"{where}: 'ranks' must be a non-empty list of positive integers")
        if any(b <= a for a, b in zip(ranks, ranks[1:])) or ranks[-1] > min(out_f, in_f):
            raise DeviceProfileError(f"{where}: ranks must rise strictly and stay within [1, {min(out_f, in_f)}]")
        times = _positive_times(raw.get("lowrank_seconds"), f"{where} lowrank_seconds", len(ranks))
        if any(b < a for a, b in zip(times, times[1:])):
            raise DeviceProfileError(f"{where}: lowrank_seconds must not fall as the rank rises")
        measured = raw.get("measured_seconds") or []
        measured = _positive_times(measured, f"{where} measured_seconds", len(ranks)) if measured else []
        return ShapeTimes(out_f, in_f, dense, tuple(ranks), tuple(times), tuple(measured))


@dataclass
class DeviceProfile:
    """Measured Linear times of one device, dtype, torch build, thread count and workload."""

    key: ProfileKey
    shapes: dict[Shape, ShapeTimes]
    settings: dict = field(default_factory=dict)  # how it was measured (repeats, warm-up, grid)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def profile_id(self) -> str:
        """12 hex digits identifying the measured times (key and shapes), for caches and plans."""
        body = json.dumps([self.key.to_dict(), [self.shapes[s].to_dict() for s in sorted(self.shapes)]],
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    def times(self, shape: Shape) -> ShapeTimes:
        found = self.shapes.get(tuple(shape))
        if found is None:
            raise DeviceProfileError(f"the device profile has no times for shape {shape[0]}x{shape[1]} (out x in); "
                                     f"it covers {_shape_list(self.shapes)}")
        return found

    def dense_time(self, shape: Shape) -> float:
        return self.times(shape).dense_seconds

    def lowrank_time(self, shape: Shape, ranks) -> np.ndarray:
        return self.times(shape).lowrank_time(ranks)

    def check_covers(self, shapes: Iterable[Shape]) -> None:
        """DeviceProfileError naming the shapes it lacks."""
        missing = sorted({tuple(s) for s in shapes} - set(self.shapes))
        if missing:
            raise DeviceProfileError(f"the device profile does not cover layer shape(s) {_shape_list(missing)} "
                                     f"(out x in); it covers {_shape_list(self.shapes)}: measure one for this model")

    def check_key(self, expected: ProfileKey, fields: Iterable[str] | None = None) -> None:
        """DeviceProfileError unless the key matches ``expected`` (on ``fields`` only, when given)."""
        diffs = [d for d in self.key.differences(expected) if fields is None or d.split(":")[0] in set(fields)]
        if diffs:
            raise DeviceProfileError("the device profile was measured under other conditions: "
                                     + "; ".join(diffs) + " (profile vs wanted)")

    def to_dict(self) -> dict:
        return {"schema": DEVICE_PROFILE_SCHEMA, "key": self.key.to_dict(), "created": self.created,
                "settings": self.settings, "shapes": [self.shapes[s].to_dict() for s in sorted(self.shapes)]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file beside it, then replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @staticmethod
    def from_dict(doc) -> "DeviceProfile":
        """Parse and validate; DeviceProfileError names the first fault."""
        if not isinstance(doc, dict):
            raise DeviceProfileError("a device profile must be a JSON object")
        if doc.get("schema") != DEVICE_PROFILE_SCHEMA:
            raise DeviceProfileError(f"device profile schema {doc.get('schema')!r} is not supported "
                                     f"(expected {DEVICE_PROFILE_SCHEMA!r})")
        key = ProfileKey.from_dict(doc.get("key"))
        raw_shapes = doc.get("shapes")
        if not isinstance(raw_shapes, list) or not raw_shapes:
            raise DeviceProfileError("device profile field 'shapes' must be a non-empty list")
        shapes: dict[Shape, ShapeTimes] = {}
        for i, raw in enumerate(raw_shapes):
            times = ShapeTimes.from_dict(raw, f"device profile shape #{i}")
            if times.shape in shapes:
                raise DeviceProfileError(f"device profile lists shape {times.shape[0]}x{times.shape[1]} twice")
            shapes[times.shape] = times
        settings = doc.get("settings", {})
        if not isinstance(settings, dict):
            raise DeviceProfileError("device profile field 'settings' must be an object")
        return DeviceProfile(key, shapes, settings, str(doc.get("created", "")))

    @staticmethod
    def from_json(text: str | bytes) -> "DeviceProfile":
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise DeviceProfileError(f"device profile is not valid JSON: {exc}") from None
        return DeviceProfile.from_dict(doc)

    @staticmethod
    def load(path: str | Path) -> "DeviceProfile":
        """Read and validate a device profile file (a regular file of at most 1 MiB)."""
        return DeviceProfile.from_json(read_bytes_capped(path, MAX_DEVICE_PROFILE_BYTES, DeviceProfileError,
                                                         "a device profile"))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_times(values, where: str, length: int | None = None) -> list[float]:
    """``values`` as floats, each finite and > 0 (and ``length`` of them when given)."""
    if not isinstance(values, list) or (length is not None and len(values) != length):
        raise DeviceProfileError(f"{where} must be a list of {length if length is not None else 'some'} times")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values)
    if not ok:
        raise DeviceProfileError(f"{where}: every time must be a finite number of seconds above 0, got {values!r}")
    return [float(v) for v in values]


def _shape_list(shapes: Iterable[Shape]) -> str:
    return ", ".join(f"{m}x{n}" for m, n in sorted(shapes)) or "(none)"
