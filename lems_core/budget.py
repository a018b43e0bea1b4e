"""The parameter accounting every allocator and every plan shares (docs/reference/methods.md §0).

Over the compressible Linears of a model,

    sum_l cost_l <= ratio * sum_l m_l n_l,   cost_l = r_l (m_l + n_l), or m_l n_l when dense,

with the break-even rule: a rank r >= eq = floor(mn/(m+n)) would save nothing, so it
is stored dense. Ranks are ``int`` or ``None`` (dense). The one exception is a
``ForcedFactorisedRank``: a rank r in [eq, min(m, n)] that is factorised anyway and
costs r(m+n), as the reference factorises the layers its MRCS search never touches at
rank eq and every integer rank of a loadconfig file (docs/reference/methods.md §9). The functions take anything
with ``layers`` (a list of ``LayerInfo``) and ``total_params`` (a ``Profile``), so this
module sits below both ``allocators/`` and ``plan.py`` and neither imports the other
for its arithmetic.
"""
from __future__ import annotations

import heapq

import numpy as np

from .model import LayerInfo

Ranks = dict[str, "int | None"]

BUDGET_TOL = 1e-9  # relative slack allowed on the budget (float round-off only)
MAX_RATIO_CHARS = 40  # a double holds 17 significant digits: a longer ratio was not meant


def eq_rank_of(out_features: int, in_features: int) -> int:
    """floor(mn/(m+n)): the rank whose factorisation costs as much as the dense matrix."""
    return (out_features * in_features) // (out_features + in_features)


class ForcedFactorisedRank(int):
    """A rank kept factorised although it is at or above break-even (r >= eq).

    The plan format's one exception to the break-even rule (``force_factorised`` in the
    plan JSON, ``plan.py``). Inside ``Ranks`` dicts it travels as this ``int`` subclass,
    so costs (r(m+n)), plans and compression honour it with no second argument.
    Arithmetic on it gives a plain ``int``: a rank moved down is an ordinary rank again.
    """

    __slots__ = ()


def force_factorised(rank: int) -> ForcedFactorisedRank:
    """``rank`` marked to be factorised even at or above break-even (see ``ForcedFactorisedRank``)."""
    return ForcedFactorisedRank(int(rank))


def is_force_factorised(rank) -> bool:
    """Whether ``rank`` carries the break-even exception."""
    return isinstance(rank, ForcedFactorisedRank)


def normalise_rank(out_features: int, in_features: int, rank: int | None) -> int | None:
    """Apply the break-even rule: a rank >= eq_rank is stored as dense (None).

    A ``ForcedFactorisedRank`` at or above eq is kept as it is (the exception); below eq
    the mark is redundant and dropped, so every factorised rank has one spelling.
    """
    if rank is None:
        return None
    if rank >= eq_rank_of(out_features, in_features):
        return rank if is_force_factorised(rank) else None
    return int(rank)


def layer_param_cost(out_features: int, in_features: int, rank: int | None) -> int:
    """Parameters a layer stores at ``rank``: r(m+n) when factorised (a forced rank >= eq
    included), m*n when dense."""
    rank = normalise_rank(out_features, in_features, rank)
    if rank is None:
        return out_features * in_features
    return rank * (out_features + in_features)


def check_covers(profile, ranks: Ranks) -> None:
    """Every layer of ``profile`` has a rank, and every rank lies in [1, min(m, n)] or is None."""
    missing = [l.name for l in profile.layers if l.name not in ranks]
    if missing:
        raise ValueError(f"ranks lack {len(missing)} layer(s), e.g. {missing[:3]}")
    for l in profile.layers:
        r = ranks[l.name]
        if r is not None and not 1 <= r <= min(l.out_features, l.in_features):
            raise ValueError(f"rank {r} of {l.name} is outside [1, {min(l.out_features, l.in_features)}]")


def params_of(profile, ranks: Ranks) -> int:
    """Parameters stored by the compressible Linears at these ranks (dense when None or >= eq
    unless forced factorised)."""
    check_covers(profile, ranks)
    return sum(layer_param_cost(l.out_features, l.in_features, ranks[l.name]) for l in profile.layers)


def realised_ratio(profile, ranks: Ranks) -> float:
    """params_of / dense parameters of the compressible Linears (the budget denominator, docs/reference/methods.md §0)."""
    return params_of(profile, ranks) / profile.total_params


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float in (0, 1]: the kept fraction of the compressible parameters.

    Anything else is a ValueError naming the ratio: also an integer too large for a float
    (which ``float`` reports as OverflowError) and text too long to be a number that was
    meant (``0.`` and 400 nines, which a float would silently round to 1).
    """
    if isinstance(ratio, str) and len(ratio.strip()) > MAX_RATIO_CHARS:
        raise ValueError(f"ratio {ratio.strip()[:20]!r}… ({len(ratio.strip())} characters) is too long to be a number")
    try:
        ratio = float(ratio)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"ratio is the kept fraction and must be a number in (0, 1], got {str(ratio)[:40]!r}") from None
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio is the kept fraction and must lie in (0, 1], got {ratio}")
    return ratio


def budget_of(profile, ratio: float) -> float:
    """The parameter budget: ratio x the dense parameters of the compressible Linears."""
    return ratio * profile.total_params


def within_budget(profile, ranks: Ranks, ratio: float) -> bool:
    """Whether ``ranks`` meet the budget (up to float round-off)."""
    return params_of(profile, ranks) <= budget_of(profile, ratio) * (1 + BUDGET_TOL)


def dense_if_break_even(layer: LayerInfo, rank: int | None) -> int | None:
    """``normalise_rank`` for one layer."""
    return normalise_rank(layer.out_features, layer.in_features, rank)


def rank_at_ratio(layer: LayerInfo, keep: float) -> int | None:
    """Reference ratio -> rank: int(keep * eq), clipped to [1, min(m, n)], dense at break-even."""
    if keep >= 1.0:
        return None
    rank = min(max(int(keep * layer.eq_rank), 1), min(layer.out_features, layer.in_features))  # no np.clip: per layer per move
    return dense_if_break_even(layer, rank)


def candidate_lower_bound(ratio: float) -> float:
    """lb of docs/reference/methods.md §1.4: candidates need c = r/eq >= 0.3 when ratio >= 0.5, else >= 0.1."""
    return 0.3 if ratio >= 0.5 else 0.1


def candidate_ranks(layer: LayerInfo, ratio: float, multiple: int | None = 8) -> np.ndarray:
    """Factorised rank candidates of one layer (docs/reference/methods.md §1.4); dense is added by the caller.

    r in [floor(0.1 eq), floor(0.95 eq)), r % multiple == 0, r/eq >= lb(ratio), r >= 1.
    The reference tests ``int((r/eq)*eq) % multiple``, which can drop a valid r when
    the float product rounds below r; here r itself is tested.
    """
    eq = layer.eq_rank
    ranks = np.arange(int(0.1 * eq), int(0.95 * eq), dtype=np.int64)
    keep = (ranks >= 1) & (ranks / max(eq, 1) >= candidate_lower_bound(ratio))
    if multiple and multiple > 1:
        keep &= ranks % multiple == 0
    return ranks[keep]


def candidate_cost(layer: LayerInfo, ranks: np.ndarray, cost_model) -> np.ndarray:
    """Cost of factorised candidates.

    "params" (default): the real r(m+n). "reference": c*m*n with c = r/eq as in the
    reference ILP (docs/reference/methods.md §1.4); since eq = floor(mn/(m+n)) this is >= r(m+n), i.e. slightly
    pessimistic, so the real budget still holds. A cost object instead of a name (such
    as ``latency.LatencyCost``: measured seconds) prices them itself.
    """
    if not isinstance(cost_model, str):
        return np.asarray(cost_model.candidate_cost(layer, ranks), dtype=np.float64)
    if cost_model == "params":
        return ranks.astype(np.float64) * (layer.out_features + layer.in_features)
    if cost_model == "reference":
        return ranks / layer.eq_rank * float(layer.params)
    raise ValueError(f"cost_model must be 'params' or 'reference', got {cost_model!r}")


def dense_cost(layer: LayerInfo, cost_model) -> float:
    """Cost of keeping ``layer`` dense: m*n parameters, or a cost object's own price (``candidate_cost``)."""
    return float(layer.params) if isinstance(cost_model, str) else float(cost_model.dense_cost(layer))


def repair_budget(profile, ranks: Ranks, ratio: float) -> tuple[Ranks, int]:
    """Lower ranks until the budget holds: always the layer with the highest kept fraction
    r/eq (dense counts as 1; ties: earliest layer) by one rank. Deterministic; returns
    (ranks, number of one-rank steps)."""
    ranks = dict(ranks)
    excess = params_of(profile, ranks) - budget_of(profile, ratio)
    if excess <= 0:
        return ranks, 0
    heap = []
    for i, l in enumerate(profile.layers):
        r = ranks[l.name]
        if (r is None and l.eq_rank >= 2) or (r is not None and r > 1):
            heapq.heappush(heap, (-(1.0 if r is None else r / l.eq_rank), i))
    steps = 0
    while excess > budget_of(profile, ratio) * BUDGET_TOL and heap:
        _, i = heapq.heappop(heap)
        layer = profile.layers[i]
        old = ranks[layer.name]
        new = layer.eq_rank - 1 if old is None else old - 1
        ranks[layer.name] = new
        excess -= layer_param_cost(layer.out_features, layer.in_features, old) - layer.rank_params(new)
        steps += 1
        if new > 1:
            heapq.heappush(heap, (-(new / layer.eq_rank), i))
    return ranks, steps


def block_params(profile) -> np.ndarray:
    """Dense parameters of each block's compressible Linears."""
    out = np.zeros(profile.num_blocks)
    for l in profile.layers:
        out[l.block] += l.params
    return out
