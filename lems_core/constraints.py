"""Layer constraints: what a user pins before any allocator runs (AIMET / ModelOpt style).

A ``LayerConstraints`` says, by block, kind or layer name:

- ``lock_dense``: these layers stay dense, and their m*n still counts in the budget
  (budget = ratio x every compressible parameter), so the other layers are
  compressed harder to pay for them. "Keep block 0 dense at 80% overall."
- ``exclude``: these layers leave the compressible set altogether: they stay dense
  and are outside the budget on both sides, as embeddings and lm_head are. The
  ratio then applies to the remaining layers; over all layers the kept fraction is
  ``effective_ratio`` = (ratio (T - X) + X) / T (X = excluded parameters, T = all).
  "Compress everything but block 0 to 80%."
- ``min_kept`` / ``max_kept``: per kind, bounds on the kept fraction c = r / eq_rank
  of a layer (dense counts as 1.0, so ``max_kept`` below 1 forbids dense).
- ``rank_multiple``: every factorised rank is a multiple of 1, 8, 16, 32, 64 or 128
  (hardware alignment); in LEMS it replaces the candidate grid's multiple of 8.

LEMS honours them exactly: they only remove options from its knapsack table, and the
exact solver stays exact on any table. The heuristic allocators (uniform, SVD-LLM V2,
MRCS) are run as usual and their ranks are then projected onto the constraints
(``ResolvedConstraints.enforce``) with a deterministic budget repair.

Not supported: the reference's optional *block monotonicity* constraint (average
kept fraction non-increasing with depth). It couples the choices of different
layers, so the problem is no longer a multiple-choice knapsack; the exact solver's
LP bound over per-group convex hulls, its reduced-cost fixing and its DP over
independent groups would all be invalid under it. It is off in every released
reference config.
"""
from __future__ import annotations

import fnmatch
import heapq
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from .budget import BUDGET_TOL, layer_param_cost, normalise_rank
from .model import KIND_BY_SUFFIX, KINDS, LayerInfo

RANK_MULTIPLES = (1, 8, 16, 32, 64, 128)
SELECTOR_FIELDS = ("block", "kind", "name")
_FIELDS = ("lock_dense", "exclude", "min_kept", "max_kept", "rank_multiple")
_BLOCK_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
_NAME_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(" + "|".join(re.escape(s) for s in KIND_BY_SUFFIX) + r")$")


class ConstraintError(ValueError):
    """Layer constraints are malformed, match nothing, or leave a layer without any rank."""


def _check_selector(selector: str) -> str:
    """``block:N``, ``block:A-B``, ``kind:K`` or ``name:PATTERN`` (fnmatch); returned stripped."""
    if not isinstance(selector, str) or ":" not in selector:
        raise ConstraintError(f"layer selector {selector!r} must be block:N, block:A-B, kind:K or name:PATTERN")
    field_name, value = (s.strip() for s in selector.split(":", 1))
    if field_name not in SELECTOR_FIELDS:
        raise ConstraintError(f"layer selector {selector!r}: {field_name!r} is not one of {', '.join(SELECTOR_FIELDS)}")
    if not value:
        raise ConstraintError(f"layer selector {selector!r} has an empty value")
    if field_name == "block":
        m = _BLOCK_RE.match(value)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConstraintError(f"layer selector {selector!r}: a block is an integer N or a range A-B with A <= B")
    if field_name == "kind" and value not in KINDS:
        raise ConstraintError(f"layer selector {selector!r}: kind must be one of {', '.join(KINDS)}")
    return f"{field_name}:{value}"


def selector_matches(selector: str, layer: LayerInfo) -> bool:
    """Whether one (checked) selector picks ``layer``."""
    field_name, value = selector.split(":", 1)
    if field_name == "kind":
        return layer.kind == value
    if field_name == "name":
        return fnmatch.fnmatchcase(layer.name, value)
    lo, _, hi = value.partition("-")
    return int(lo) <= layer.block <= int(hi or lo)


def _check_fractions(name: str, fractions) -> dict[str, float]:
    if not isinstance(fractions, dict):
        raise ConstraintError(f"{name} must map a kind to a kept fraction, got {type(fractions).__name__}")
    out = {}
    for kind, value in fractions.items():
        if kind not in KINDS:
            raise ConstraintError(f"{name}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConstraintError(f"{name}[{kind}] must be a kept fraction in [0, 1], got {value!r}")
        out[kind] = float(value)
    return out


@dataclass(frozen=True)
class LayerConstraints:
    """User constraints on the allocation (see the module docstring for their meaning)."""

    lock_dense: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_kept: dict[str, float] = field(default_factory=dict)
    max_kept: dict[str, float] = field(default_factory=dict)
    rank_multiple: int | None = None

    def __post_init__(self):
        for name in ("lock_dense", "exclude"):
            raw = getattr(self, name)
            if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
                raise ConstraintError(f"{name} must be a list of layer selectors, got {raw!r}")
            object.__setattr__(self, name, tuple(_check_selector(s) for s in raw))
        object.__setattr__(self, "min_kept", _check_fractions("min_kept", self.min_kept))
        object.__setattr__(self, "max_kept", _check_fractions("max_kept", self.max_kept))
        for kind, lo in self.min_kept.items():
            if lo > self.max_kept.get(kind, 1.0):
                raise ConstraintError(f"min_kept[{kind}]={lo:g} is above max_kept[{kind}]={self.max_kept[kind]:g}")
        m = self.rank_multiple
        if m is not None and (isinstance(m, bool) or m not in RANK_MULTIPLES):
            raise ConstraintError(f"rank_multiple must be one of {', '.join(map(str, RANK_MULTIPLES))}, got {m!r}")

    @property
    def is_empty(self) -> bool:
        return not (self.lock_dense or self.exclude or self.min_kept or self.max_kept or self.rank_multiple)

    def to_dict(self) -> dict:
        return {"lock_dense": list(self.lock_dense), "exclude": list(self.exclude), "min_kept": dict(self.min_kept),
                "max_kept": dict(self.max_kept), "rank_multiple": self.rank_multiple}

    def key(self) -> str:
        """A canonical string of these constraints (for caches)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d) -> "LayerConstraints":
        """Strict: unknown fields and wrong types are ConstraintErrors naming the field."""
        if not isinstance(d, dict):
            raise ConstraintError(f"constraints must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise ConstraintError(f"constraints have unknown field(s): {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
        return LayerConstraints(lock_dense=tuple(d.get("lock_dense") or ()), exclude=tuple(d.get("exclude") or ()),
                                min_kept=d.get("min_kept") or {}, max_kept=d.get("max_kept") or {},
                                rank_multiple=d.get("rank_multiple"))

    def resolve(self, layers: list[LayerInfo]) -> "ResolvedConstraints":
        """Per-layer bounds for this model; every selector must match some layer, every layer keep an option."""
        for name in ("lock_dense", "exclude"):
            for s in getattr(self, name):
                if not any(selector_matches(s, l) for l in layers):
                    raise ConstraintError(f"{name} selector {s!r} matches no compressible layer of this model")
        excluded = np.array([any(selector_matches(s, l) for s in self.exclude) for l in layers], dtype=bool)
        locked = np.array([any(selector_matches(s, l) for s in self.lock_dense) for l in layers], dtype=bool)
        resolved = ResolvedConstraints(
            layers, dense_only=locked | excluded, excluded=excluded,
            lo=np.array([self.min_kept.get(l.kind, 0.0) for l in layers]),
            hi=np.array([self.max_kept.get(l.kind, 1.0) for l in layers]),
            multiple=self.rank_multiple or 1, requested_multiple=self.rank_multiple)
        resolved.check_options()
        return resolved


def layer_from_name(name: str, out_features: int, in_features: int) -> LayerInfo | None:
    """The LayerInfo a standard layer name implies (``...layers.3.mlp.down_proj``), or None."""
    m = _NAME_RE.match(name)
    return None if m is None else LayerInfo(name, int(m.group(1)), KIND_BY_SUFFIX[m.group(2)], out_features, in_features)


def parse_selectors(text: str) -> tuple[str, ...]:
    """"block:0, kind:down" -> ("block:0", "kind:down") (checked)."""
    return tuple(_check_selector(s.strip()) for s in str(text).split(",") if s.strip())


def parse_fractions(text: str) -> dict[str, float]:
    """"q=0.3, down=0.5" -> {"q": 0.3, "down": 0.5} (checked)."""
    out = {}
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        kind, sep, value = token.partition("=")
        try:
            out[kind.strip()] = float(value)
        except ValueError:
            raise ConstraintError(f"{token!r} must be KIND=FRACTION, e.g. down=0.3") from None
        if not sep:
            raise ConstraintError(f"{token!r} must be KIND=FRACTION, e.g. down=0.3")
    return _check_fractions("kept fraction", out)


@dataclass
class ResolvedConstraints:
    """Constraints applied to one model's layer list: arrays in layer order."""

    layers: list[LayerInfo]
    dense_only: np.ndarray  # locked or excluded
    excluded: np.ndarray
    lo: np.ndarray  # min kept fraction r/eq
    hi: np.ndarray  # max kept fraction (1.0 = dense allowed)
    multiple: int  # every factorised rank is a multiple of this (1: any)
    requested_multiple: int | None = None  # the user's rank_multiple (None: the allocator's own grid)

    def rank_range(self, i: int) -> tuple[int, int]:
        """Smallest and largest allowed factorised rank of layer i (lo > hi: none)."""
        layer, m = self.layers[i], self.multiple
        lo = max(1, math.ceil(self.lo[i] * layer.eq_rank - 1e-9))
        hi = min(math.floor(self.hi[i] * layer.eq_rank + 1e-9), layer.eq_rank - 1, min(layer.out_features, layer.in_features))
        return math.ceil(lo / m) * m, (hi // m) * m

    def dense_allowed(self, i: int) -> bool:
        return bool(self.dense_only[i] or self.hi[i] >= 1.0)

    def allows(self, i: int, rank: int | None) -> bool:
        """Whether layer i may take ``rank`` (None = dense; break-even ranks count as dense)."""
        layer = self.layers[i]
        rank = normalise_rank(layer.out_features, layer.in_features, rank)
        if rank is None:
            return self.dense_allowed(i)
        lo, hi = self.rank_range(i)
        return not self.dense_only[i] and lo <= rank <= hi and rank % self.multiple == 0

    def rank_mask(self, i: int, ranks: np.ndarray) -> np.ndarray:
        """Which of the factorised ``ranks`` layer i may take (all False when it is dense-only)."""
        if self.dense_only[i]:
            return np.zeros(len(ranks), dtype=bool)
        lo, hi = self.rank_range(i)
        return (ranks >= lo) & (ranks <= hi) & (ranks % self.multiple == 0)

    def check_options(self) -> None:
        for i, layer in enumerate(self.layers):
            lo, hi = self.rank_range(i)
            if not self.dense_allowed(i) and lo > hi:
                raise ConstraintError(
                    f"layer {layer.name}: no rank satisfies kept fraction in [{self.lo[i]:g}, {self.hi[i]:g}] "
                    f"with rank multiple {self.multiple} (eq_rank {layer.eq_rank}), and dense is not allowed")

    def effective_ratio(self, ratio: float) -> float:
        """The kept fraction over all layers when ``ratio`` applies to the non-excluded ones."""
        total = sum(l.params for l in self.layers)
        excluded = sum(l.params for l, e in zip(self.layers, self.excluded) if e)
        if excluded >= total:
            raise ConstraintError("every compressible layer is excluded: nothing is left to allocate")
        return min(1.0, (ratio * (total - excluded) + excluded) / total)

    def requested_ratio(self, full_ratio: float) -> float:
        """Inverse of ``effective_ratio``: a kept fraction over all layers, over the non-excluded ones."""
        total = sum(l.params for l in self.layers)
        excluded = sum(l.params for l, e in zip(self.layers, self.excluded) if e)
        return (full_ratio * total - excluded) / (total - excluded)

    def violations(self, ranks: dict) -> list[str]:
        """One message per layer whose rank breaks the constraints."""
        out = []
        for i, layer in enumerate(self.layers):
            if not self.allows(i, ranks.get(layer.name)):
                r = ranks.get(layer.name)
                lo, hi = self.rank_range(i)
                why = ("locked dense" if self.dense_only[i] else
                       f"allowed: ranks {lo}..{hi} in steps of {self.multiple}" + (" or dense" if self.dense_allowed(i) else ""))
                out.append(f"{layer.name} rank {'dense' if r is None else r} ({why})")
        return out

    def _cheapest(self, i: int) -> int | None:
        lo, hi = self.rank_range(i)
        return None if self.dense_only[i] or lo > hi else lo

    def minimum_params(self) -> int:
        """Parameters of the cheapest allowed choice of every layer."""
        return sum(layer_param_cost(l.out_features, l.in_features, self._cheapest(i)) for i, l in enumerate(self.layers))

    def _step_down(self, i: int, rank: int | None) -> int | None:
        """The next allowed rank below ``rank`` for layer i, or -1 when there is none."""
        lo, hi = self.rank_range(i)
        if self.dense_only[i] or lo > hi:
            return -1
        if rank is None:
            return hi
        below = ((rank - 1) // self.multiple) * self.multiple
        return min(below, hi) if below >= lo else -1

    def _project(self, i: int, rank: int | None) -> int | None:
        """The allowed rank nearest ``rank`` (rounding down to the multiple; up to the lower bound)."""
        layer = self.layers[i]
        rank = normalise_rank(layer.out_features, layer.in_features, rank)
        lo, hi = self.rank_range(i)
        if self.dense_only[i] or (rank is None and self.dense_allowed(i)) or lo > hi:
            return None
        rank = hi if rank is None else rank
        return int(min(max((rank // self.multiple) * self.multiple, lo), hi))

    def enforce(self, ranks: dict, budget: float) -> tuple[dict, int]:
        """Project ``ranks`` onto the constraints, then trim until ``budget`` parameters hold.

        The trim takes one allowed step down at a time from the free layer with the
        highest kept fraction r/eq (dense = 1; ties: earliest layer), like
        ``budget.repair_budget``. Returns (ranks, steps); raises ConstraintError when
        even the cheapest allowed choice exceeds the budget.
        """
        out = {l.name: self._project(i, ranks[l.name]) for i, l in enumerate(self.layers)}
        cost = sum(layer_param_cost(l.out_features, l.in_features, out[l.name]) for l in self.layers)
        limit = budget * (1 + BUDGET_TOL)
        heap = []
        for i, l in enumerate(self.layers):
            if self._step_down(i, out[l.name]) != -1:
                r = out[l.name]
                heapq.heappush(heap, (-(1.0 if r is None else r / l.eq_rank), i))
        steps = 0
        while cost > limit and heap:
            _, i = heapq.heappop(heap)
            l = self.layers[i]
            old, new = out[l.name], self._step_down(i, out[l.name])
            out[l.name] = new
            cost += layer_param_cost(l.out_features, l.in_features, new) - layer_param_cost(l.out_features, l.in_features, old)
            steps += 1
            if self._step_down(i, new) != -1:
                heapq.heappush(heap, (-(new / l.eq_rank), i))
        if cost > limit:
            raise ConstraintError(f"the constraints need at least {self.minimum_params():,} parameters, "
                                  f"above the budget {budget:,.0f}")
        return out, steps
