"""Step 8 of the data flow: the rank plan, the artefact an allocation hands to compression.

A plan says, for every compressible Linear of one model, which rank to keep
("dense" = leave the matrix alone). It is a small JSON document (schema
``lems-rank-plan/1``) that is validated strictly when read back, because a plan
applied to the wrong model, or with a typo in a layer name, would silently
compress the wrong thing.

Parameter accounting (docs/reference/methods.md §0) lives in ``budget.py``: a rank-r
factorisation of an m x n matrix stores r(m+n) parameters, a dense one m*n, and a
rank r >= eq_rank = floor(mn/(m+n)) is stored as dense (break-even rule). The one
exception is a layer marked ``"force_factorised": true``: its integer rank, in
[eq_rank, min(m, n)], is factorised anyway and costs r(m+n). The reference does that
for the layers its MRCS search never touches (rank eq) and for every integer rank of
a loadconfig file (docs/reference/methods.md §9); the mark is validated on load.

The reference implementation stores allocations as ``{layer: ratio}`` with
rank = int(ratio * eq_rank), or ``{layer: rank}`` where the value is an integer
("loadconfig" files); ``to_loadconfig`` / ``from_loadconfig`` convert to and from
that format.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from .budget import (  # noqa: F401  (re-exported)
    ForcedFactorisedRank, eq_rank_of, force_factorised, is_force_factorised, layer_param_cost, normalise_rank,
)
from .error_model import predicted_errors
from .constraints import ConstraintError, LayerConstraints, layer_from_name
from .model import LayerInfo
from .plan_files import parse_budgets, plan_file_name, unique_plans  # noqa: F401  (re-exported)
from .plan_cost import PlanCost, PlanCostError
from .safe_io import read_bytes_capped

PLAN_SCHEMA = "lems-rank-plan/1"
MAX_PLAN_BYTES = 5 * 1024 * 1024
DENSE = "dense"
_TOP_LEVEL_FIELDS = ("schema", "model", "method", "decomposition", "budget", "layers")
_LAYER_FIELDS = ("name", "out", "in", "rank")
_LISTED_NAMES = 5  # how many offending layer names an error message quotes
_LARGEST_FLOAT = 1.7976931348623157e308  # sys.float_info.max


class PlanError(ValueError):
    """A rank plan is malformed or does not fit the model it is applied to."""


def check_rank(name: str, out_features: int, in_features: int, rank) -> int | None:
    """Validate one rank value (int in [1, min(m, n)] or None/"dense"); return it normalised
    (a ``ForcedFactorisedRank`` at or above eq stays factorised)."""
    if rank is None or rank == DENSE:
        return None
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise PlanError(f"layer {name}: rank must be an integer or {DENSE!r}, got {rank!r}")
    marked, rank = is_force_factorised(rank), int(rank)
    upper = min(out_features, in_features)
    if not 1 <= rank <= upper:
        raise PlanError(f"layer {name}: rank {rank} out of range [1, {upper}] for a {out_features}x{in_features} matrix")
    return normalise_rank(out_features, in_features, force_factorised(rank) if marked else rank)


def check_forced_rank(name: str, out_features: int, in_features: int, rank) -> ForcedFactorisedRank:
    """Validate a layer marked ``force_factorised``: an integer rank in [eq_rank, min(m, n)].

    A dense layer cannot carry the mark, and a rank below eq is factorised anyway, so
    the mark there would be a second spelling of an ordinary plan: both are PlanErrors.
    """
    if rank is None or rank == DENSE:
        raise PlanError(f"layer {name}: force_factorised needs an integer rank, but the layer is {DENSE!r}")
    check_rank(name, out_features, in_features, rank)  # type and range
    eq = eq_rank_of(out_features, in_features)
    if rank < eq:
        raise PlanError(f"layer {name}: force_factorised is only for ranks at or above the break-even rank "
                        f"{eq}; rank {rank} is factorised without it")
    return force_factorised(rank)


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_NAMES])
    return shown + (f" ... ({len(names)} in all)" if len(names) > _LISTED_NAMES else "")


# --------------------------------------------------------------------------- dataclasses
@dataclass
class LayerPlan:
    """The decision for one Linear. ``rank`` None means dense.

    ``force_factorised`` (the plan format's break-even exception): the rank is at or
    above eq_rank and the layer is factorised anyway, costing r(m+n). It is set when
    ``rank`` is a ``ForcedFactorisedRank``; passed explicitly (as read from JSON) it is
    validated strictly (``check_forced_rank``).

    ``param_ratio`` is the fraction of this layer's parameters that is kept,
    r(m+n)/(mn) (1.0 dense). It differs from the reference's per-layer "ratio"
    r/eq_rank, which is what ``RankPlan.to_loadconfig`` writes. It is always derived
    from the rank (a value passed in or read from JSON is recomputed).
    """

    name: str
    out_features: int
    in_features: int
    rank: int | None
    param_ratio: float = float("nan")
    predicted_error: float | None = None
    force_factorised: bool = False

    def __post_init__(self):
        if self.force_factorised:
            self.rank = check_forced_rank(self.name, self.out_features, self.in_features, self.rank)
        else:
            self.rank = check_rank(self.name, self.out_features, self.in_features, self.rank)
        self.force_factorised = is_force_factorised(self.rank)
        self.param_ratio = self.params / (self.out_features * self.in_features)

    @property
    def eq_rank(self) -> int:
        return eq_rank_of(self.out_features, self.in_features)

    @property
    def params(self) -> int:
        return layer_param_cost(self.out_features, self.in_features, self.rank)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "out": self.out_features,
            "in": self.in_features,
            "rank": DENSE if self.rank is None else self.rank,
            "param_ratio": self.param_ratio,
            "predicted_error": self.predicted_error,
            **({"force_factorised": True} if self.force_factorised else {}),
        }


@dataclass
class RankPlan:
    """Ranks for every compressible Linear of one model, plus how they were chosen."""

    model_source: str
    fingerprint: str
    method: str
    decomposition: str
    budget: float  # kept fraction the allocation targeted (docs/reference/methods.md §0)
    error_model: dict | None
    layers: list[LayerPlan]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta: dict = field(default_factory=dict)
    constraints: dict | None = None  # LayerConstraints.to_dict() the allocation honoured, or None

    @property
    def summary(self) -> dict:
        """Params kept / total over the compressible Linears, realised ratio, dense count, and how
        many layers are factorised at or above break-even (``force_factorised``)."""
        kept = sum(l.params for l in self.layers)
        total = sum(l.dense_params for l in self.layers)
        return {
            "params_kept": kept,
            "params_total": total,
            "realised_ratio": kept / total if total else 1.0,
            "dense_layers": sum(l.rank is None for l in self.layers),
            "force_factorised_layers": sum(l.force_factorised for l in self.layers),
            "num_layers": len(self.layers),
        }

    def ranks(self) -> dict[str, int | None]:
        """{layer: rank or None}; a ``force_factorised`` layer's rank is a ``ForcedFactorisedRank``."""
        return {l.name: l.rank for l in self.layers}

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "model": {"source": self.model_source, "fingerprint": self.fingerprint},
            "method": self.method,
            "decomposition": self.decomposition,
            "budget": self.budget,
            "error_model": self.error_model,
            "layers": [l.to_dict() for l in self.layers],
            "summary": self.summary,
            "created": self.created,
            "meta": self.meta,
            **({} if self.constraints is None else {"constraints": self.constraints}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @staticmethod
    def from_json(
        text: str | bytes, layers: list[LayerInfo] | None = None, fingerprint: str | None = None
    ) -> "RankPlan":
        """Parse and validate a plan. With ``layers`` / ``fingerprint`` of the target model,
        also check it covers exactly that model's layers with matching shapes."""
        if len(text) > MAX_PLAN_BYTES:
            raise PlanError(f"plan is too large ({len(text)} bytes > {MAX_PLAN_BYTES}); not a rank plan")
        doc = _parse_json_object(text)
        _check_schema(doc)
        missing = [k for k in _TOP_LEVEL_FIELDS if k not in doc]
        if missing:
            raise PlanError(f"plan is missing field(s): {', '.join(missing)}")
        model = doc["model"]
        if not isinstance(model, dict) or "source" not in model or "fingerprint" not in model:
            raise PlanError("plan field 'model' must be an object with 'source' and 'fingerprint'")
        if fingerprint is not None and model["fingerprint"] != fingerprint:
            raise PlanError(
                f"plan was made for another model: plan fingerprint {model['fingerprint']!r} "
                f"(model source {model['source']!r}), loaded model fingerprint {fingerprint!r}"
            )
        layer_plans = _parse_layers(doc["layers"])
        if layers is not None:
            layer_plans = _match_model_layers(layer_plans, layers)
        return RankPlan(
            model_source=str(model["source"]),
            fingerprint=str(model["fingerprint"]),
            method=str(doc["method"]),
            decomposition=str(doc["decomposition"]),
            budget=_parse_budget(doc["budget"]),
            error_model=_optional_dict(doc, "error_model"),
            layers=layer_plans,
            created=str(doc.get("created", "")),
            meta=_parse_meta(doc),
            constraints=_parse_constraints(doc.get("constraints"), layer_plans, layers),
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file in the same folder, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @staticmethod
    def load(path: str | Path, layers: list[LayerInfo] | None = None, fingerprint: str | None = None) -> "RankPlan":
        """Read and validate a plan file; PlanError for anything that is not a regular, readable plan file.

        Devices, FIFOs and folders are refused before opening (``/dev/zero`` would never end),
        and at most MAX_PLAN_BYTES + 1 bytes are read.
        """
        return RankPlan.from_json(read_plan_bytes(path), layers=layers, fingerprint=fingerprint)

    @property
    def content_hash(self) -> str:
        """8 hex digits identifying what the plan does (model, method, decomposition, budget, ranks, constraints)."""
        identity = [self.fingerprint, self.method, self.decomposition, round(self.budget, 6),
                    sorted((l.name, l.rank) for l in self.layers), getattr(self, "constraints", None)]
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]

    # ------------------------------------------------------------ reference format
    def to_loadconfig(self, as_ranks: bool = False) -> dict[str, float | int]:
        """The reference's ``{layer: ratio}`` file, ratio = rank/eq_rank (1.0 dense).

        The ratio is nudged up by ulps where needed so that the reference's
        ``int(ratio * eq_rank)`` gives back exactly this rank (r/eq*eq can round below r).
        ``as_ranks`` writes factorised layers as integer ranks instead, which the
        reference's reader also accepts (docs/reference/methods.md §9); dense stays 1.0. A
        ``force_factorised`` layer is always an integer rank (its ratio would be >= 1,
        which reads as dense): the reference writes MRCS's untouched layers the same way.
        """
        def value(l: LayerPlan) -> float | int:
            if l.rank is None:
                return 1.0
            return int(l.rank) if as_ranks or l.force_factorised else _ratio_for_rank(l.rank, l.eq_rank)
        return {l.name: value(l) for l in self.layers}


# --------------------------------------------------------------------------- parsing helpers
def read_plan_bytes(path: str | Path) -> bytes:
    """The bytes of a plan file, refusing what is not a regular file of at most MAX_PLAN_BYTES."""
    return read_bytes_capped(path, MAX_PLAN_BYTES, PlanError, "a rank plan")


def _parse_json_object(text: str | bytes) -> dict:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"plan is not valid JSON: {exc}") from exc
    except RecursionError:
        raise PlanError("plan is not a rank plan: its JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise PlanError(f"plan must be a JSON object, got {type(doc).__name__}")
    return doc


def _check_schema(doc: dict) -> None:
    if "schema" not in doc:
        raise PlanError(f"plan has no 'schema' field (expected {PLAN_SCHEMA!r})")
    if doc["schema"] != PLAN_SCHEMA:
        raise PlanError(f"plan schema {doc['schema']!r} is not supported (expected {PLAN_SCHEMA!r})")


def _parse_budget(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise PlanError(f"plan budget must be a kept fraction in (0, 1], got {value!r}")
    return float(value)


def _optional_dict(doc: dict, key: str) -> dict | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, dict):
        raise PlanError(f"plan field {key!r} must be an object or null")
    return value


def _parse_meta(doc: dict) -> dict:
    """The plan's ``meta``, with its optional cost record (``plan_cost.PlanCost``) validated."""
    meta = _optional_dict(doc, "meta") or {}
    if meta.get("cost") is not None:
        try:
            PlanCost.from_dict(meta["cost"])
        except PlanCostError as exc:
            raise PlanError(f"plan {exc}") from None
    return meta


def _parse_layers(raw) -> list[LayerPlan]:
    if not isinstance(raw, list):
        raise PlanError("plan field 'layers' must be a list")
    plans, seen, duplicates = [], set(), []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise PlanError(f"plan layer #{i} must be an object")
        missing = [k for k in _LAYER_FIELDS if k not in entry]
        if missing:
            raise PlanError(f"plan layer #{i} ({entry.get('name', '?')}) is missing field(s): {', '.join(missing)}")
        name, out_f, in_f = entry["name"], entry["out"], entry["in"]
        if not isinstance(name, str) or not all(_positive_int(v) for v in (out_f, in_f)):
            raise PlanError(f"plan layer #{i}: 'name' must be a string and 'out'/'in' positive integers")
        if entry["rank"] is None:  # in JSON dense is spelled out; null is more likely a bug
            raise PlanError(f"layer {name}: rank must be an integer or {DENSE!r}, got null")
        if name in seen:
            duplicates.append(name)
        seen.add(name)
        plans.append(LayerPlan(name, out_f, in_f, entry["rank"], predicted_error=_optional_float(entry, name),
                               force_factorised=_force_flag(entry, name)))
    if duplicates:
        raise PlanError(f"plan lists layer(s) more than once: {_few(duplicates)}")
    return plans


def _parse_constraints(raw, plans: list[LayerPlan], layers: list[LayerInfo] | None) -> dict | None:
    """The plan's optional ``constraints``: well-formed, matching its layers, and kept by its ranks.

    Block and kind come from the model's layers when given, else from the standard
    layer names; a plan without the field has no constraints.
    """
    if raw is None:
        return None
    try:
        constraints = LayerConstraints.from_dict(raw)
        infos = layers if layers is not None else [layer_from_name(p.name, p.out_features, p.in_features) for p in plans]
        unnamed = [p.name for p, info in zip(plans, infos) if info is None]
        if unnamed:
            raise ConstraintError(f"block and kind of layer(s) {_few(unnamed)} cannot be read from their names")
        resolved = constraints.resolve(infos)
    except ConstraintError as exc:
        raise PlanError(f"plan constraints: {exc}") from None
    broken = resolved.violations({p.name: p.rank for p in plans})
    if broken:
        raise PlanError(f"plan ranks break its own constraints: {_few(broken)}")
    return constraints.to_dict()


def _force_flag(entry: dict, name: str) -> bool:
    """The layer's optional ``force_factorised`` mark: true or false (absent: false)."""
    value = entry.get("force_factorised", False)
    if not isinstance(value, bool):
        raise PlanError(f"layer {name}: force_factorised must be true or false, got {value!r}")
    return value


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _optional_float(entry: dict, name: str) -> float | None:
    value = entry.get("predicted_error")
    if value is None:
        return None
    # a comparison, not math.isfinite: an integer too large for a float would raise OverflowError there
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= _LARGEST_FLOAT:
        raise PlanError(f"layer {name}: predicted_error must be a finite number or null")
    return float(value)


def check_plan_layers(plan: "RankPlan", layers: list[LayerInfo]) -> None:
    """PlanError unless ``plan`` covers exactly ``layers`` (names and shapes), as an upload is checked.

    Every entry point that applies a plan (CLI evaluate / compress, the app's jobs,
    ``pipeline.evaluate_plan``) calls it: a plan with no, missing, extra or reshaped
    layers would otherwise compress the wrong thing and report wrong accounting.
    """
    if not plan.layers:
        raise PlanError("plan has no layers")
    _match_model_layers(plan.layers, layers)


def _match_model_layers(plans: list[LayerPlan], layers: list[LayerInfo]) -> list[LayerPlan]:
    """Check the plan covers exactly the model's layers with the same shapes; return in model order."""
    by_name = {p.name: p for p in plans}
    model_names = {l.name for l in layers}
    unknown = [p.name for p in plans if p.name not in model_names]
    if unknown:
        raise PlanError(f"plan names layer(s) the model does not have: {_few(unknown)}")
    missing = [l.name for l in layers if l.name not in by_name]
    if missing:
        raise PlanError(f"plan has no entry for model layer(s): {_few(missing)}")
    for l in layers:
        p = by_name[l.name]
        if (p.out_features, p.in_features) != (l.out_features, l.in_features):
            raise PlanError(
                f"layer {l.name}: plan shape {p.out_features}x{p.in_features} (out x in) "
                f"does not match the model's {l.out_features}x{l.in_features}"
            )
    return [by_name[l.name] for l in layers]


def _ratio_for_rank(rank: int, eq_rank: int) -> float:
    ratio = rank / eq_rank
    while int(ratio * eq_rank) < rank:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


# --------------------------------------------------------------------------- constructors
def from_loadconfig(
    config: dict[str, float | int],
    layers: list[LayerInfo],
    model_source: str = "",
    fingerprint: str = "",
    method: str = "loadconfig",
    decomposition: str = "unknown",
    budget: float | None = None,
    meta: dict | None = None,
) -> RankPlan:
    """Build a plan from the reference's loadconfig file, read as the reference reads it.

    docs/reference/methods.md §9 (loadconfig reader): every compressible Linear defaults to 1.0
    (dense); a float c < 1 means rank int(c * eq_rank), 1.0 means dense; an
    **integer is an absolute rank**, factorised even at or above eq_rank (the
    reference writes eq as an integer for layers MRCS leaves alone, and factorises
    them at rank eq): such a layer is kept ``force_factorised``; keys that are
    not compressible layers of this model (``lm_head``, typos) are ignored, listed
    in a ``LoadconfigWarning`` and in ``meta["loadconfig_ignored"]``. Floats above
    1 (where the reference crashes) and ranks out of range are PlanErrors.
    ``budget`` defaults to the realised ratio.
    """
    if not isinstance(config, Mapping):
        raise PlanError(f"loadconfig must be a JSON object {{layer: ratio or rank}}, got {type(config).__name__}")
    known = {l.name for l in layers}
    ignored = sorted(name for name in config if name not in known)
    meta = dict(meta or {})
    if ignored:
        meta["loadconfig_ignored"] = ignored
        warnings.warn(f"loadconfig: ignored {len(ignored)} key(s) that are not compressible layers "
                      f"of this model: {_few(ignored)}", LoadconfigWarning, stacklevel=2)
    plans = [LayerPlan(l.name, l.out_features, l.in_features, _rank_from_loadconfig(l, config.get(l.name, 1.0)))
             for l in layers]
    plan = RankPlan(model_source, fingerprint, method, decomposition, 1.0, None, plans, meta=meta)
    plan.budget = plan.summary["realised_ratio"] if budget is None else _parse_budget(budget)
    return plan


class LoadconfigWarning(UserWarning):
    """A loadconfig file named keys that were ignored (as the reference ignores them)."""


def is_loadconfig(doc) -> bool:
    """Whether a parsed JSON document looks like a loadconfig: a non-empty object of numbers, no ``schema``."""
    return (isinstance(doc, dict) and bool(doc) and "schema" not in doc
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in doc.values()))


def plan_from_upload(text: str | bytes, layers: list[LayerInfo], fingerprint: str, model_source: str = "",
                     decomposition: str = "unknown") -> RankPlan:
    """A rank plan or a reference loadconfig file, as a user hands either one over, checked against this model.

    A lems-rank-plan/1 document is read by ``RankPlan.from_json`` (fingerprint and
    layers checked). A loadconfig carries no model identity, so it is read for this
    model (``from_loadconfig``) and must name at least one of its layers; what the
    file does not name stays dense, as the reference reads it.
    """
    if len(text) > MAX_PLAN_BYTES:
        raise PlanError(f"plan is too large ({len(text)} bytes > {MAX_PLAN_BYTES}); not a rank plan")
    doc = _parse_json_object(text)
    if not is_loadconfig(doc):
        return RankPlan.from_json(text, layers=layers, fingerprint=fingerprint)
    if not {l.name for l in layers} & set(doc):
        raise PlanError(f"loadconfig names none of this model's {len(layers)} compressible layers "
                        f"(first keys: {_few(sorted(doc))}): it is for another model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadconfigWarning)  # the ignored keys are kept in meta
        return from_loadconfig(doc, layers, model_source=model_source, fingerprint=fingerprint,
                               decomposition=decomposition)


def _rank_from_loadconfig(layer: LayerInfo, value) -> int | None:
    """One loadconfig value -> rank (None = dense): integer = rank, float in (0, 1] = ratio of eq_rank.

    An integer rank >= eq_rank is factorised, as the reference does: a ``ForcedFactorisedRank``.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise PlanError(f"layer {layer.name}: loadconfig value must be a ratio in (0, 1] or an integer rank, got {value!r}")
    if isinstance(value, numbers.Integral):
        rank = check_rank(layer.name, layer.out_features, layer.in_features, int(value))
        return force_factorised(int(value)) if rank is None else rank
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"layer {layer.name}: ratio must be a positive number, got {value!r}")
    if value > 1.0:
        raise PlanError(f"layer {layer.name}: float {value!r} is above 1; a ratio must be in (0, 1] "
                        f"(rank/eq_rank) and an absolute rank must be written as an integer")
    if value == 1.0:
        return None
    rank = int(value * layer.eq_rank)
    if rank < 1:
        raise PlanError(f"layer {layer.name}: ratio {value} gives rank 0 (eq_rank {layer.eq_rank})")
    return rank


def plan_from_ranks(
    profile,
    ranks: dict[str, int | None],
    method: str,
    predicted_error: dict[str, float] | None = None,
    error_model: dict | None = None,
    meta: dict | None = None,
    budget: float | None = None,
    constraints: dict | None = None,
) -> RankPlan:
    """Build a plan for ``profile``'s model from ``{layer: rank or None}`` covering every layer.

    ``budget`` is the kept fraction the allocation targeted; it defaults to the realised ratio.
    ``constraints`` (``LayerConstraints.to_dict()``) are recorded and must hold for ``ranks``.
    A ``ForcedFactorisedRank`` at or above eq becomes a ``force_factorised`` layer.
    """
    names = {l.name for l in profile.layers}
    unknown = [n for n in ranks if n not in names]
    if unknown:
        raise PlanError(f"ranks name layer(s) the profile does not have: {_few(unknown)}")
    missing = [l.name for l in profile.layers if l.name not in ranks]
    if missing:
        raise PlanError(f"ranks have no entry for layer(s): {_few(missing)}")
    errors = predicted_error or {}
    plans = [
        LayerPlan(l.name, l.out_features, l.in_features, ranks[l.name],
                  predicted_error=None if l.name not in errors else float(errors[l.name]))
        for l in profile.layers
    ]
    # The calibration config travels with the plan: compressing it later needs the
    # same statistics the profile's factorisations were computed from.
    meta = {"calibration": dict(profile.calibration), **(meta or {})}
    if constraints is not None:
        constraints = _parse_constraints(constraints, plans, profile.layers)
    plan = RankPlan(profile.model_source, profile.fingerprint, method, profile.decomposition, 1.0,
                    error_model, plans, meta=meta, constraints=constraints)
    plan.budget = plan.summary["realised_ratio"] if budget is None else _parse_budget(budget)
    return plan


def plan_from_allocation(profile, allocation, params=None, meta: dict | None = None) -> RankPlan:
    """The plan of an ``allocators.Allocation`` (duck-typed: method, ratio, ranks, ...).

    The plan's error model is the one the allocation was solved under (LEMS); for
    methods without one, ``params`` (an ErrorModelParams) is used to annotate each
    layer with its predicted error under that model, so plans of different methods
    can be compared. If the profile cannot support ``params`` (e.g. no KL scale),
    the errors stay empty and meta["predicted_error_note"] says why. An allocation under
    a latency budget records it in meta["cost"] (``plan_cost.PlanCost``).
    """
    meta = {"objective": allocation.objective, "solve_seconds": allocation.solve_seconds, **(meta or {})}
    if "cost" in allocation.info:
        meta.setdefault("cost", allocation.info["cost"])
    error_model, errors = allocation.info.get("error_model"), allocation.predicted_error
    if errors is None and params is not None:
        try:
            errors, error_model = predicted_errors(profile, allocation.ranks, params), params.to_dict()
        except ValueError as exc:
            meta["predicted_error_note"] = str(exc)
    return plan_from_ranks(profile, allocation.ranks, allocation.method, predicted_error=errors,
                           error_model=error_model, meta=meta, budget=allocation.ratio,
                           constraints=allocation.info.get("constraints"))
