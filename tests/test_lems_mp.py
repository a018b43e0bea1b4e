"""LEMS-MP (multi-point error model) and its adaptive measurement loop, on synthetic profiles."""
import itertools
import math

import numpy as np
import pytest

from lems_core.allocators import allocate, allocate_lems, lems_error_table
from lems_core.allocators.lems_adaptive import adaptive_lems_mp, uncertainty_scores
from lems_core.allocators.lems_mp import (allocate_lems_mp, curve_excess, fit_curve, fit_multipoint, kl_floor,
                                          lems_mp_error_table, measured_rank, profile_points)
from lems_core.budget import budget_of
from lems_core.cache import DEMO_DIR
from lems_core.error_model import ErrorModelParams, residual_energy
from lems_core.profile import Profile, synthetic_profile

FLOOR = 1e-3


def measured_profile(seed: int = 0, floor: float = 0.0, ratios=(0.4, 0.6, 0.8), num_blocks: int = 3) -> Profile:
    """A synthetic profile whose 'true' single-layer KL is floor + kl_ref-scaled R(r)^p_l,
    with a per-layer exponent p_l, so the one-point shape model is off away from 0.1."""
    profile = synthetic_profile(num_blocks=num_blocks, seed=seed)
    rng = np.random.default_rng(seed + 1)
    powers = rng.uniform(0.5, 2.0, len(profile.layers))
    profile.meta["true_powers"] = powers.tolist()

    def truth(i, rank):
        layer = profile.layers[i]
        sigma = profile.spectra[layer.name]
        r = residual_energy(sigma, np.array([rank]))[0]
        r_ref = residual_energy(sigma, np.array([measured_rank(layer, profile.ref_ratio)]))[0]
        return floor + profile.kl_ref[i] * (r / r_ref) ** powers[i]

    profile.kl_ref = profile.kl_ref + floor
    profile.measured = {c: np.array([truth(i, measured_rank(l, c)) for i, l in enumerate(profile.layers)])
                        for c in ratios}
    profile.meta["truth"] = truth
    return profile


def test_curve_passes_through_every_measured_point_and_is_monotone():
    profile = measured_profile()
    model = fit_multipoint(profile)
    points = profile_points(profile)
    for i, layer in enumerate(profile.layers):
        ranks = np.array([r for r, _ in points[layer.name]])
        kl = np.array([k for _, k in points[layer.name]])
        assert np.allclose(model.predicted_kl(profile, i, ranks), kl, rtol=1e-9), layer.name
        grid = np.arange(1, min(layer.out_features, layer.in_features))
        values = model.excess(profile, i, grid)
        assert np.all(np.diff(values) <= 1e-15 * values[:-1]), layer.name


def test_non_monotone_measurements_are_made_monotone_before_interpolation():
    sigma = np.linspace(2.0, 0.1, 40)
    curve = fit_curve(sigma, [(4, 1.0), (10, 0.2), (20, 0.3), (30, 0.05)])
    values = curve_excess(curve, sigma, np.arange(1, 40))
    assert np.all(np.diff(values) <= 1e-15)
    pooled = curve_excess(curve, sigma, [10, 20])
    assert np.allclose(pooled, math.sqrt(0.2 * 0.3))  # pooled in log space: the geometric mean


def test_reference_point_only_and_no_floor_is_one_point_lems():
    profile = synthetic_profile(num_blocks=3, seed=4)
    for ratio in (0.8, 0.6, 0.4):
        ours = lems_mp_error_table(profile, fit_multipoint(profile), ratio)[1]
        theirs = lems_error_table(profile, ErrorModelParams(), ratio)[1]
        for a, b in zip(ours, theirs):
            assert np.allclose(a, b, rtol=1e-9)
        assert allocate_lems_mp(profile, ratio).ranks == allocate_lems(profile, ratio).ranks


def test_beyond_the_points_the_curve_follows_the_spectral_shape():
    sigma = np.exp(-np.linspace(0, 3, 60))
    curve = fit_curve(sigma, [(6, 0.5), (30, 0.05)])
    r = residual_energy(sigma, np.array([30, 40, 50]))
    assert np.allclose(curve_excess(curve, sigma, [40, 50]), 0.05 * r[1:] / r[0])


def test_the_floor_is_fitted_as_a_floor_not_as_signal():
    profile = measured_profile(floor=FLOOR, ratios=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    # pin one layer's tail to the floor, as block 0's q/k are in the demo profile
    for c in (0.7, 0.8, 0.9):
        profile.measured[c][0] = FLOOR * (1 + 1e-4)
    assert kl_floor(profile) == pytest.approx(FLOOR * (1 + 1e-4))
    model = fit_multipoint(profile, floor=FLOOR)
    layer = profile.layers[0]
    ranks = [measured_rank(layer, c) for c in (0.7, 0.8, 0.9)]
    assert np.all(model.excess(profile, 0, ranks) <= 0.02 * FLOOR)  # at most the resolution, not 1e-3
    # a model that took the floor for signal would charge ~1e-3 per compressed layer:
    naive = fit_multipoint(profile, floor=0.0)
    assert np.all(naive.excess(profile, 0, ranks) >= FLOOR)
    # with the floor stripped, every other layer's fitted excess is the true excess
    for i in range(1, len(profile.layers)):
        l = profile.layers[i]
        rank = measured_rank(l, 0.5)
        assert model.excess(profile, i, [rank])[0] == pytest.approx(profile.meta["truth"](i, rank) - FLOOR, rel=1e-9)


def test_profile_floor_field_wins_and_no_flat_tail_means_no_floor():
    profile = measured_profile(floor=0.0)
    assert kl_floor(profile) == 0.0  # no layer is flat at the lowest value
    profile.meta["kl_floor"] = 2e-4
    assert kl_floor(profile) == 2e-4
    profile.kl_floor = {"kl": 3e-4, "reference_precision": "bf16"}  # the Profile field (sensitivity.kl_floor)
    assert kl_floor(profile) == 3e-4


def test_demo_profile_floor_is_the_flat_tail_of_block0_q():
    profile = Profile.load(DEMO_DIR / "smollm2-135m-kfac")
    floor = kl_floor(profile)
    assert 4.5e-4 < floor < 4.7e-4
    model = fit_multipoint(profile)
    q0 = [l.name for l in profile.layers].index("model.layers.0.self_attn.q_proj")
    assert model.excess(profile, q0, [measured_rank(profile.layers[q0], 0.9)])[0] < 0.05 * floor


def brute_force(costs, errors, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[j] for c, j in zip(costs, choice))
        if cost <= budget * (1 + 1e-9):
            err = sum(e[j] for e, j in zip(errors, choice))
            if best is None or err < best - 1e-15:
                best = err
    return best


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.85])
def test_allocation_is_optimal_against_brute_force_on_a_tiny_instance(ratio):
    profile = measured_profile(seed=2, num_blocks=1)
    model = fit_multipoint(profile)
    costs, errors, _ = lems_mp_error_table(profile, model, ratio, multiple=16)
    assert np.prod([len(c) for c in costs]) < 50_000
    alloc = allocate_lems_mp(profile, ratio, multiple=16)
    assert alloc.objective == pytest.approx(brute_force(costs, errors, budget_of(profile, ratio)), rel=1e-9)


def test_registered_and_fit_ratios_select_the_points():
    profile = measured_profile()
    alloc = allocate(profile, "lems_mp", 0.7)
    assert alloc.method == "lems_mp" and alloc.info["realised_ratio"] <= 0.7 + 1e-9
    assert alloc.info["fit_ratios"] == [0.1, 0.4, 0.6, 0.8]
    assert len(profile_points(profile, [0.6])[profile.layers[0].name]) == 2
    with pytest.raises(ValueError, match="no measured KL"):
        allocate_lems_mp(profile, 0.7, fit_ratios=[0.5])


def test_more_points_give_plans_closer_to_the_truth():
    """Under the true curves, the multi-point plan's true error is no worse than one-point LEMS's."""
    profile = measured_profile(seed=3, ratios=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    truth = profile.meta["truth"]
    params = ErrorModelParams(gamma=0.0)

    def true_error(ranks):
        return sum(truth(i, ranks[l.name]) for i, l in enumerate(profile.layers) if ranks[l.name] is not None)

    for ratio in (0.8, 0.6):
        one = allocate_lems(profile, ratio, params).ranks
        many = allocate_lems_mp(profile, ratio, params).ranks
        assert true_error(many) < true_error(one)


def fake_measure(profile, calls):
    truth = profile.meta["truth"]
    index = {l.name: i for i, l in enumerate(profile.layers)}

    def measure(requests):
        calls.append(list(requests))
        return [truth(index[name], rank) for name, rank in requests]

    return measure


def test_adaptive_measures_the_plan_ranks_and_counts_the_runs():
    profile = measured_profile(seed=5)
    calls = []
    result = adaptive_lems_mp(profile, 0.7, fake_measure(profile, calls), rounds=3, per_round=4)
    assert len(calls) == len(result.rounds) == 3
    assert result.adaptive_runs == 12 and result.start_runs == len(profile.layers)
    assert result.allocation.info["suffix_runs"] == len(profile.layers) + 12
    measured = [(n, r) for call in calls for n, r in call]
    assert len(set(measured)) == len(measured)  # a measured rank is never measured again
    first_plan = allocate_lems_mp(profile, 0.7, fit_ratios=()).ranks
    for name, rank in calls[0]:  # round 1 measures where the round-0 plan sits (or its top candidate)
        assert first_plan[name] in (rank, None)


def test_uncertainty_is_zero_at_measured_ranks():
    profile = measured_profile(seed=6)
    model = fit_multipoint(profile)
    points = profile_points(profile)
    ranks = {l.name: measured_rank(l, 0.4) for l in profile.layers}
    scores, _ = uncertainty_scores(profile, model, ranks, points, 0.7)
    assert np.all(scores == 0)


def test_adaptive_improves_the_true_error_of_the_plan():
    profile = measured_profile(seed=7, num_blocks=4)
    truth = profile.meta["truth"]
    params = ErrorModelParams(gamma=0.0)

    def true_error(ranks):
        return sum(truth(i, ranks[l.name]) for i, l in enumerate(profile.layers) if ranks[l.name] is not None)

    start = allocate_lems_mp(profile, 0.6, params, fit_ratios=()).ranks
    result = adaptive_lems_mp(profile, 0.6, fake_measure(profile, []), params, rounds=4, per_round=6)
    assert true_error(result.allocation.ranks) < true_error(start)


def test_layer_kl_at_ranks_equals_the_sweep_and_measures_the_floor():
    import torch

    from lems_core.adaptive_measure import layer_kl_at_ranks
    from lems_core.decompositions import Decomposer
    from lems_core.model import compressible_layers, tiny_model
    from lems_core.sensitivity import SweepOptions, layer_kl_sweep, rank_at

    model = tiny_model("llama", seed=3)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(3))
    layers = compressible_layers(model)
    decomposer = Decomposer("svd")
    factors = {l.name: decomposer(l, model.get_submodule(l.name).weight) for l in layers}
    sweep = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.3], SweepOptions(batch_size=2)).kl
    picked = [layers[-1], layers[0], layers[len(layers) // 2]]  # out of block order on purpose
    requests = [(l.name, rank_at(l, 0.3)) for l in picked]
    values, floor = layer_kl_at_ranks(model, layers, lambda l: factors[l.name], ids, requests, 2, with_floor=True)
    index = {l.name: i for i, l in enumerate(layers)}
    assert values == pytest.approx([sweep[0.3][index[l.name]] for l in picked], rel=1e-5, abs=1e-9)
    assert 0 <= floor < min(values)  # the dense model vs its own bf16 reference logits
    assert all(isinstance(model.get_submodule(l.name), torch.nn.Linear) for l in layers)


def test_cli_allocates_with_lems_mp(tmp_path, capsys):
    from lems_core.cli import main
    from lems_core.plan import RankPlan

    profile = measured_profile(seed=8)
    del profile.meta["truth"]
    folder = profile.save(tmp_path / "profile")
    out = tmp_path / "plan.json"
    assert main(["allocate", "--profile", str(folder), "--method", "lems-mp", "--ratio", "0.7", "-o", str(out)]) == 0
    plan = RankPlan.load(out, layers=profile.layers, fingerprint=profile.fingerprint)
    assert plan.method == "lems_mp" and plan.summary["realised_ratio"] <= 0.7 + 1e-9
    assert plan.ranks() == allocate_lems_mp(Profile.load(folder), 0.7).ranks


def test_bias_fit_over_lems_mp_keeps_the_best_scored_trial():
    from lems_core.allocators.lems_mp import fit_bias_mp

    profile = measured_profile(seed=9)
    truth = profile.meta["truth"]
    scored = []

    def score(ranks):  # the true summed single-layer excess: a stand-in for the model's KL
        value = sum(truth(i, ranks[l.name]) for i, l in enumerate(profile.layers) if ranks[l.name] is not None)
        scored.append(value)
        return value

    params, alloc = fit_bias_mp(profile, 0.7, score, n_trials=5)
    assert len(scored) == 5 and score(alloc.ranks) == min(scored)
    assert [t["alpha"] for t in alloc.info["bias_fit"]] == pytest.approx(
        [a for a in np.random.RandomState(42).uniform(size=10)[0::2] * 3.0])
    assert alloc.ranks == allocate_lems_mp(profile, 0.7, params).ranks
