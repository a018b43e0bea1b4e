"""Layer constraints: LEMS stays exact under them (brute force, HiGHS), heuristics honour them,
plans record them and are checked against them on load, the CLI takes them."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from lems_core.allocators import BudgetBelowMinimumError, allocate
from lems_core.budget import layer_param_cost
from lems_core.cli import main
from lems_core.constraints import ConstraintError, LayerConstraints, parse_fractions, parse_selectors
from lems_core.error_model import ErrorModelParams, predicted_errors
from lems_core.plan import PlanError, RankPlan
from lems_core.profile import Profile, synthetic_profile

PARAMS = ErrorModelParams()


def allowed_options(layer, ratio, c: LayerConstraints, locked: bool):
    """The options brute force tries, written out from the definitions (not via the module)."""
    if locked:
        return [None]
    lb = 0.3 if ratio >= 0.5 else 0.1
    lo, hi = c.min_kept.get(layer.kind, 0.0), c.max_kept.get(layer.kind, 1.0)
    step = c.rank_multiple or 8
    ranks = [r for r in range(int(0.1 * layer.eq_rank), int(0.95 * layer.eq_rank))
             if r >= 1 and r / layer.eq_rank >= lb and r % step == 0 and lo - 1e-12 <= r / layer.eq_rank <= hi + 1e-12]
    return ([None] if hi >= 1.0 else []) + ranks


def brute_force(profile, ratio, c: LayerConstraints, locked_names: set[str]):
    """Minimum summed LEMS error over every allowed combination within the budget."""
    per_layer = []
    for l in profile.layers:
        opts = allowed_options(l, ratio, c, l.name in locked_names)
        errs = [0.0 if r is None else predicted_errors(profile, {**{m.name: None for m in profile.layers}, l.name: r},
                                                        PARAMS)[l.name] for r in opts]
        costs = [layer_param_cost(l.out_features, l.in_features, r) for r in opts]
        per_layer.append(list(zip(costs, errs)))
    budget = ratio * profile.total_params
    best = np.inf
    for combo in itertools.product(*per_layer):
        if sum(c for c, _ in combo) <= budget * (1 + 1e-9):
            best = min(best, sum(e for _, e in combo))
    return best


TINY = dict(num_blocks=2, hidden=12, inter=20, kv=8)  # 2-4 options per layer


@pytest.mark.parametrize("seed,ratio,constraints", [
    (0, 0.7, LayerConstraints(lock_dense=("kind:gate", "kind:up"), rank_multiple=1)),
    (1, 0.75, LayerConstraints(lock_dense=("block:0",), min_kept={"q": 0.5}, max_kept={"down": 0.8}, rank_multiple=1)),
    (2, 0.8, LayerConstraints(lock_dense=("name:*.mlp.*",), max_kept={"o": 0.6}, rank_multiple=1)),
    (3, 0.78, LayerConstraints(lock_dense=("block:1",), min_kept={"gate": 0.6}, rank_multiple=1)),
])
def test_constrained_lems_matches_brute_force(seed, ratio, constraints):
    profile = synthetic_profile(seed=seed, **TINY)
    resolved = constraints.resolve(profile.layers)
    locked_names = {l.name for l, d in zip(profile.layers, resolved.dense_only) if d}
    alloc = allocate(profile, "lems", ratio, params=PARAMS, constraints=constraints)
    assert alloc.objective == pytest.approx(brute_force(profile, ratio, constraints, locked_names), rel=1e-9, abs=1e-12)
    assert resolved.violations(alloc.ranks) == []
    assert all(alloc.ranks[n] is None for n in locked_names)


def test_constrained_lems_matches_highs():
    pytest.importorskip("pulp")
    profile = synthetic_profile(num_blocks=6, seed=3)
    c = LayerConstraints(lock_dense=("block:0", "kind:v"), min_kept={"down": 0.4}, max_kept={"q": 0.7},
                         rank_multiple=16)
    exact = allocate(profile, "lems", 0.6, params=PARAMS, constraints=c)
    highs = allocate(profile, "lems", 0.6, params=PARAMS, constraints=c, solver="highs")
    assert exact.objective == pytest.approx(highs.objective, rel=1e-7)
    assert c.resolve(profile.layers).violations(exact.ranks) == []
    unconstrained = allocate(profile, "lems", 0.6, params=PARAMS)
    assert exact.objective > unconstrained.objective  # the constraints bind here


def test_lock_dense_counts_in_the_budget_and_exclude_does_not():
    profile = synthetic_profile(num_blocks=6)
    block0 = [l for l in profile.layers if l.block == 0]
    x = sum(l.params for l in block0)
    rest = profile.total_params - x
    locked = allocate(profile, "lems", 0.6, params=PARAMS, constraints=LayerConstraints(lock_dense=("block:0",)))
    excluded = allocate(profile, "lems", 0.6, params=PARAMS, constraints=LayerConstraints(exclude=("block:0",)))
    for alloc in (locked, excluded):
        assert all(alloc.ranks[l.name] is None for l in block0)
    locked_rest, excluded_rest = (a.info["params_kept"] - x for a in (locked, excluded))
    assert locked.info["params_kept"] <= 0.6 * profile.total_params * (1 + 1e-9)
    assert excluded_rest <= 0.6 * rest * (1 + 1e-9)
    assert excluded.ratio == pytest.approx((0.6 * rest + x) / profile.total_params)
    assert excluded.info["requested_ratio"] == 0.6
    assert locked_rest < excluded_rest  # locking makes the others pay


@pytest.mark.parametrize("method", ["uniform", "svdllm_v2", "mrcs"])
def test_heuristics_honour_constraints_by_projection(method):
    profile = synthetic_profile(num_blocks=6)
    c = LayerConstraints(lock_dense=("block:0",), exclude=("kind:k",), min_kept={"q": 0.5}, rank_multiple=16)
    alloc = allocate(profile, method, 0.6, params=PARAMS, constraints=c)
    resolved = c.resolve(profile.layers)
    assert resolved.violations(alloc.ranks) == []
    assert alloc.info["params_kept"] <= resolved.effective_ratio(0.6) * profile.total_params * (1 + 1e-9)
    assert alloc.info["constraints"] == c.to_dict()


def test_methods_without_support_refuse_constraints():
    with pytest.raises(ConstraintError, match="does not honour layer constraints"):
        allocate(synthetic_profile(), "atp", 0.6, constraints=LayerConstraints(lock_dense=("block:0",)),
                 score_fn=lambda ranks: 0.0)


def test_empty_constraints_change_nothing():
    profile = synthetic_profile(num_blocks=6)
    plain = allocate(profile, "lems", 0.6, params=PARAMS)
    assert allocate(profile, "lems", 0.6, params=PARAMS, constraints=LayerConstraints()).ranks == plain.ranks


def test_infeasible_constraints_say_so():
    profile = synthetic_profile(num_blocks=4)
    with pytest.raises(BudgetBelowMinimumError, match="layer constraints"):
        allocate(profile, "lems", 0.5, params=PARAMS, constraints=LayerConstraints(lock_dense=("block:0-2",)))
    with pytest.raises(BudgetBelowMinimumError, match="layer constraints"):
        allocate(profile, "uniform", 0.5, constraints=LayerConstraints(lock_dense=("block:0-2",)))


@pytest.mark.parametrize("kwargs,message", [
    ({"lock_dense": ("block0",)}, "must be block:N"),
    ({"lock_dense": ("blok:0",)}, "is not one of block, kind, name"),
    ({"lock_dense": ("block:3-1",)}, "A <= B"),
    ({"exclude": ("kind:mlp",)}, "kind must be one of"),
    ({"lock_dense": "block:0"}, "list of layer selectors"),
    ({"min_kept": {"q": 1.5}}, "kept fraction in"),
    ({"min_kept": {"ffn": 0.3}}, "is not one of"),
    ({"min_kept": {"q": 0.6}, "max_kept": {"q": 0.5}}, "is above max_kept"),
    ({"rank_multiple": 12}, "rank_multiple must be one of"),
])
def test_malformed_constraints_raise_specific_errors(kwargs, message):
    with pytest.raises(ConstraintError, match=message):
        LayerConstraints(**kwargs)


def test_constraints_checked_against_the_model():
    layers = synthetic_profile(num_blocks=4).layers
    with pytest.raises(ConstraintError, match="matches no compressible layer"):
        LayerConstraints(lock_dense=("block:9",)).resolve(layers)
    with pytest.raises(ConstraintError, match="no rank satisfies"):  # q is 64x64: eq 32, no multiple of 64 below it
        LayerConstraints(max_kept={"q": 0.9}, rank_multiple=64).resolve(layers)
    with pytest.raises(ConstraintError, match="unknown field"):
        LayerConstraints.from_dict({"lock": []})


def test_parsers():
    assert parse_selectors(" block:0, kind:down ,") == ("block:0", "kind:down")
    assert parse_fractions("q=0.3, down=0.5") == {"q": 0.3, "down": 0.5}
    for bad in ("q", "q=x"):
        with pytest.raises(ConstraintError, match="KIND=FRACTION"):
            parse_fractions(bad)


def test_plans_record_constraints_and_are_checked_on_load():
    profile = synthetic_profile(num_blocks=4)
    c = LayerConstraints(lock_dense=("block:0",), rank_multiple=16)
    plan = allocate(profile, "lems", 0.7, params=PARAMS, constraints=c).to_plan(profile)
    doc = json.loads(plan.to_json())
    assert doc["constraints"] == c.to_dict()
    assert RankPlan.from_json(plan.to_json(), layers=profile.layers).constraints == c.to_dict()
    assert RankPlan.from_json(plan.to_json()).constraints == c.to_dict()  # block/kind from the names

    first = next(l for l in doc["layers"] if ".layers.0." in l["name"])
    first["rank"] = 16
    with pytest.raises(PlanError, match="break its own constraints"):
        RankPlan.from_json(json.dumps(doc))
    for bad, message in [({"rank_multiple": 3}, "rank_multiple"), ({"lock_dense": ["block:99"]}, "matches no"),
                         ("dense", "must be an object"), ({"nope": 1}, "unknown field")]:
        doc["constraints"], doc["layers"][0]["rank"] = bad, "dense"
        with pytest.raises(PlanError, match="plan constraints: .*" + message):
            RankPlan.from_json(json.dumps(doc))


def test_plans_without_constraints_load_and_write_none():
    profile = synthetic_profile(num_blocks=4)
    plan = allocate(profile, "lems", 0.7, params=PARAMS).to_plan(profile)
    doc = json.loads(plan.to_json())
    assert "constraints" not in doc
    assert RankPlan.from_json(json.dumps(doc)).constraints is None


def test_cli_allocate_takes_constraints(tmp_path, capsys):
    folder = synthetic_profile(num_blocks=6).save(tmp_path / "profile")
    out = tmp_path / "plan.json"
    assert main(["allocate", "--profile", str(folder), "--ratio", "0.7", "-o", str(out), "--lock-dense", "block:0,kind:down",
                 "--min-kept", "q=0.5", "--rank-multiple", "16"]) == 0
    profile = Profile.load(folder)
    plan = RankPlan.load(out, layers=profile.layers)
    assert plan.constraints["lock_dense"] == ["block:0", "kind:down"] and plan.constraints["rank_multiple"] == 16
    ranks = plan.ranks()
    assert all(ranks[l.name] is None for l in profile.layers if l.block == 0 or l.kind == "down")
    assert all(r is None or r % 16 == 0 for r in ranks.values())
    assert main(["allocate", "--profile", str(folder), "--ratio", "0.6", "-o", str(tmp_path / "bad.json"),
                 "--lock-dense", "block:99"]) == 2
    assert "matches no compressible layer" in capsys.readouterr().err
    assert main(["allocate", "--profile", str(folder), "--ratio", "0.6", "-o", str(tmp_path / "bad.json"),
                 "--min-kept", "ffn=0.3"]) == 2
    assert not (tmp_path / "bad.json").exists()
