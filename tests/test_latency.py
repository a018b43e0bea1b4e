"""Latency as a cost: device profiles (interpolation, cache, validation) and allocation under a latency budget."""
import itertools
import json

import numpy as np
import pytest

from lems_core import allocators as A
from lems_core.allocators.latency_budget import UnsupportedCostError
from lems_core.constraints import ConstraintError, LayerConstraints
from lems_core.error_model import ErrorModelParams
from lems_core.latency import (DeviceProfile, DeviceProfileError, LatencyCost, ProfileKey, ShapeTimes, Workload,
                               current_key, device_profile_for, isotonic, latency_cost, measure_device_profile,
                               rank_grid)
from lems_core.plan import PlanError, RankPlan
from lems_core.plan_cost import plan_cost
from lems_core.profile import synthetic_profile
from lems_core.solver import objective, solve_mckp, total_cost

DECODE = Workload.named("decode")
OVERHEAD = 4e-6  # seconds per Linear call in the hand-made profiles


def hand_times(m: int, n: int, ranks: list[int], wobble: float = 0.0, seed: int = 0) -> ShapeTimes:
    """Latency-like times: a fixed overhead per call plus bytes moved, low rank = two calls."""
    rng = np.random.default_rng(seed)
    raw = [2 * OVERHEAD + 1e-8 * r * (m + n) * (1 + wobble * rng.uniform()) for r in ranks]
    fitted = tuple(float(t) for t in isotonic(raw))
    return ShapeTimes(m, n, OVERHEAD + 1e-8 * m * n, tuple(ranks), fitted, tuple(raw))


def hand_profile(shapes, workload=DECODE, wobble=0.0) -> DeviceProfile:
    key = ProfileKey("test cpu", "cpu", "float32", "test", 1, workload)
    return DeviceProfile(key, {(m, n): hand_times(m, n, rank_grid(m, n, 8, 4), wobble, seed=m + n)
                               for m, n in shapes})


def shapes_of(profile):
    return {(l.out_features, l.in_features) for l in profile.layers}


class CountingTimer:
    """An injected timer: runs each thunk once, returns made-up rising times, counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, thunks):
        self.calls += 1
        for thunk in thunks:
            thunk()
        return [1e-4] + [1e-5 * (i + 1) for i in range(len(thunks) - 1)]


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile(num_blocks=2)


@pytest.fixture(scope="module")
def cost(profile):
    return LatencyCost(hand_profile(shapes_of(profile), wobble=0.5))


# ----------------------------------------------------------------- the cost model
def test_interpolation_is_exact_at_grid_points_and_monotone_between():
    times = hand_times(160, 64, [8, 16, 32, 48], wobble=0.8)
    assert np.allclose(times.lowrank_time(times.ranks), times.lowrank_seconds)
    between = np.arange(8, 49)
    curve = times.lowrank_time(between)
    assert np.all(np.diff(curve) >= 0)
    assert curve[between == 24][0] == pytest.approx((times.lowrank_seconds[1] + times.lowrank_seconds[2]) / 2)
    assert times.lowrank_time([2])[0] == times.lowrank_seconds[0]  # below the grid: the first time (an upper bound)
    assert times.lowrank_time([60])[0] > times.lowrank_seconds[-1]  # above: the last slope goes on


def test_isotonic_fit_removes_measurement_noise_but_keeps_rising_data():
    assert np.array_equal(isotonic([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0])
    fitted = isotonic([1.0, 3.0, 2.0, 4.0])
    assert np.all(np.diff(fitted) >= 0) and fitted.tolist() == [1.0, 2.5, 2.5, 4.0]


def test_rank_grid_uses_multiples_of_the_step_up_to_break_even():
    grid = rank_grid(1536, 576, rank_step=8, points=12)
    assert grid[0] == 8 and all(r % 8 == 0 for r in grid) and grid[-1] >= 418 and len(grid) <= 14
    assert rank_grid(4, 4, rank_step=8) == [4]  # a layer narrower than the step: one point, at min(m, n)


def test_shared_shapes_are_measured_once_and_the_cache_is_reused(profile, tmp_path):
    timer = CountingTimer()
    shapes = [(l.out_features, l.in_features) for l in profile.layers]
    first = device_profile_for(shapes, DECODE, cache_dir=tmp_path, timer=timer, cold_bytes=1 << 14)
    assert timer.calls == len(set(shapes)) == 4 < len(shapes)
    again = device_profile_for(shapes, DECODE, cache_dir=tmp_path, timer=timer, cold_bytes=1 << 14)
    assert timer.calls == 4, "the second call measured again instead of reading the cache"
    assert again.profile_id == first.profile_id and again.key == current_key(DECODE)
    device_profile_for(shapes, Workload.named("prefill", tokens=4), cache_dir=tmp_path, timer=timer,
                       cold_bytes=1 << 14)
    assert timer.calls == 8, "another workload must be measured, not read from the decode entry"


def test_a_corrupt_cache_entry_is_measured_again(profile, tmp_path):
    timer = CountingTimer()
    shapes = shapes_of(profile)
    device_profile_for(shapes, DECODE, cache_dir=tmp_path, timer=timer, cold_bytes=1 << 14)
    [entry] = (tmp_path / "latency").glob("*.json")
    entry.write_text("{not json")
    device_profile_for(shapes, DECODE, cache_dir=tmp_path, timer=timer, cold_bytes=1 << 14)
    assert timer.calls == 8
    DeviceProfile.load(entry)  # rewritten, valid


def test_the_default_timer_measures_real_linears(one_thread):
    measured = measure_device_profile([(32, 24)], DECODE, repeats=2, warmup=1, cold_bytes=1 << 14)
    times = measured.times((32, 24))
    assert times.ranks == tuple(rank_grid(32, 24)) and all(t > 0 for t in times.lowrank_seconds)
    assert np.all(np.diff(times.lowrank_seconds) >= 0) and measured.settings["clock"] == "wall"


def test_a_low_rank_pair_is_timed_as_an_export_runs_it(one_thread):
    """The thunks the timer gets call the deployed module: second factor column-major, factors called
    directly (what ``fused.prepare_modules`` does), computing b(a(x))."""
    import torch

    from lems_core.compression import LowRankLinear
    from lems_core.latency.measure import _deployed_pair, _linear_pool
    from lems_core.remote.fused_lowrank import low_rank_forward

    seen = []

    def timer(thunks):
        seen.extend(thunk() for thunk in thunks)  # each run once
        return [1.0] * len(thunks)

    with torch.no_grad():
        measured = measure_device_profile([(48, 16)], DECODE, timer=timer, cold_bytes=1 << 10)
    assert measured.settings["pair"] == "export" and len(seen) == 1 + len(rank_grid(48, 16))
    pair = _deployed_pair(_linear_pool(16, 8, 1, "cpu", torch.float32)[0], _linear_pool(8, 48, 1, "cpu", torch.float32)[0])
    assert isinstance(pair, LowRankLinear) and pair.forward.__func__ is low_rank_forward
    assert pair.b.weight.stride(0) == 1  # out 48 > rank 8: column-major
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(pair(x), x @ pair.a.weight.T @ pair.b.weight.T)


# ----------------------------------------------------------------- validation
def test_a_device_profile_round_trips_through_json(cost, tmp_path):
    path = cost.device_profile.save(tmp_path / "p.json")
    loaded = DeviceProfile.load(path)
    assert loaded.profile_id == cost.device_profile.profile_id and loaded.key == cost.device_profile.key


def _broken(doc, edit):
    doc = json.loads(json.dumps(doc))
    edit(doc)
    return json.dumps(doc)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema="lems-device-profile/0"), "schema"),
    (lambda d: d["shapes"][0].update(dense_seconds=float("nan")), "finite"),
    (lambda d: d["shapes"][0].update(dense_seconds=-1.0), "above 0"),
    (lambda d: d["shapes"][0]["lowrank_seconds"].reverse(), "must not fall"),
    (lambda d: d["shapes"][0]["lowrank_seconds"].pop(), "list of"),
    (lambda d: d["shapes"][0].update(ranks=[5, 5, 6, 7]), "rise strictly"),
    (lambda d: d["shapes"].append(d["shapes"][0]), "twice"),
    (lambda d: d["key"].update(threads=0), "threads"),
    (lambda d: d["key"]["workload"].update(kind="training"), "workload kind"),
    (lambda d: d.update(shapes=[]), "non-empty"),
])
def test_a_bad_device_profile_gets_the_specific_error(cost, edit, message):
    text = _broken(cost.device_profile.to_dict(), edit)
    with pytest.raises(DeviceProfileError, match=message):
        DeviceProfile.from_json(text)


def test_not_json_and_not_a_file_are_device_profile_errors(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2")
    with pytest.raises(DeviceProfileError, match="not valid JSON"):
        DeviceProfile.load(tmp_path / "x.json")
    with pytest.raises(DeviceProfileError):
        DeviceProfile.load(tmp_path)


def test_a_mismatched_device_profile_gets_the_specific_error(profile, cost):
    partial = DeviceProfile(cost.device_profile.key, dict(list(cost.device_profile.shapes.items())[:2]))
    with pytest.raises(DeviceProfileError, match="does not cover"):
        latency_cost(profile.layers, device_profile=partial)
    with pytest.raises(DeviceProfileError, match="decode 1x1 workload, not the prefill"):
        latency_cost(profile.layers, Workload.named("prefill"), device_profile=cost.device_profile)
    with pytest.raises(DeviceProfileError, match="threads"):
        cost.device_profile.check_key(ProfileKey("test cpu", "cpu", "float32", "test", 2, DECODE))
    with pytest.raises(DeviceProfileError, match="one token per sequence"):
        Workload("decode", 1, 8)


# ----------------------------------------------------------------- the solver under latency cost
def brute_force(costs, errors, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if total_cost(costs, choice) <= budget * (1 + 1e-9):
            value = objective(errors, choice)
            best = value if best is None or value < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_solver_is_exact_under_latency_costs(seed):
    """Random latency-shaped instances: a call overhead makes costs affine, not linear, in rank."""
    rng = np.random.default_rng(seed)
    costs, errors = [], []
    for _ in range(5):
        ranks = np.sort(rng.choice(np.arange(1, 40), size=rng.integers(2, 5), replace=False))
        width = rng.integers(50, 200)
        costs.append(np.concatenate([[OVERHEAD + 1e-7 * width * 30], 2 * OVERHEAD + 1e-7 * ranks * width / 20
                                     * rng.uniform(0.8, 1.2, ranks.size)]))
        errors.append(np.concatenate([[0.0], np.sort(rng.uniform(0, 1, ranks.size))[::-1]]))
    dense = sum(float(c[0]) for c in costs)
    for fraction in (0.5, 0.7, 0.9):
        choice = solve_mckp(costs, errors, fraction * dense)
        assert total_cost(costs, choice) <= fraction * dense * (1 + 1e-9)
        assert objective(errors, choice) == pytest.approx(brute_force(costs, errors, fraction * dense), abs=1e-12)


def test_lems_under_latency_is_exact_against_brute_force():
    profile = synthetic_profile(num_blocks=1)
    cost = LatencyCost(hand_profile(shapes_of(profile), wobble=0.5))
    for target in (0.6, 0.8):
        alloc = A.allocate(profile, "lems_fixed", target, cost=cost)
        costs, errors, _ = A.lems_error_table(profile, ErrorModelParams(), target, 8, cost)
        assert alloc.objective == pytest.approx(brute_force(costs, errors, target * cost.dense_total(profile.layers)))
        assert cost.fraction(profile.layers, alloc.ranks) <= target * (1 + 1e-9)


def test_dense_stays_an_option_at_its_measured_time(profile, cost):
    costs, _, options = A.lems_error_table(profile, ErrorModelParams(), 0.8, 8, cost)
    for layer, c, o in zip(profile.layers, costs, options):
        assert o[0] is None and c[0] == cost.dense_cost(layer)
        assert np.allclose(c[1:], cost.candidate_cost(layer, o[1:]))


# ----------------------------------------------------------------- methods under a latency budget
def test_lems_latency_plan_records_its_cost_and_round_trips(profile, cost):
    alloc = A.allocate(profile, "lems", 0.7, cost=cost)
    plan = RankPlan.from_json(alloc.to_plan(profile).to_json(), layers=profile.layers)
    record = plan_cost(plan)
    assert record.kind == "latency" and record.budget == 0.7 and record.workload == DECODE.to_dict()
    assert record.predicted_fraction == pytest.approx(cost.fraction(profile.layers, plan.ranks()))
    assert record.predicted_fraction <= 0.7 * (1 + 1e-9)
    assert record.device_profile["id"] == cost.device_profile.profile_id
    assert plan.budget == pytest.approx(plan.summary["realised_ratio"])  # the plan's budget stays a parameter ratio


def test_plans_without_a_cost_record_load_as_parameter_plans(profile):
    plan = A.allocate(profile, "lems", 0.7).to_plan(profile)
    assert "cost" not in plan.meta and plan_cost(RankPlan.from_json(plan.to_json())).kind == "params"


@pytest.mark.parametrize("cost_record", [{"kind": "time"}, {"kind": "latency", "budget": 0.7}, "latency",
                                         {"kind": "latency", "budget": 1.5, "predicted_latency_fraction": 0.7,
                                          "workload": {}, "device_profile": {"id": "x"}}])
def test_a_malformed_cost_record_is_a_plan_error(profile, cost_record):
    doc = A.allocate(profile, "lems", 0.7).to_plan(profile).to_dict()
    doc["meta"]["cost"] = cost_record
    with pytest.raises(PlanError, match="meta.cost"):
        RankPlan.from_json(json.dumps(doc))


@pytest.mark.parametrize("method", ["uniform", "svdllm_v2", "mrcs"])
def test_parameter_rules_search_the_ratio_that_meets_the_latency_budget(profile, cost, method):
    alloc = A.allocate(profile, method, 0.7, cost=cost)
    predicted = cost.fraction(profile.layers, alloc.ranks)
    assert predicted <= 0.7 * (1 + 1e-9) and alloc.info["cost"]["predicted_latency_fraction"] == predicted
    above = A.allocate(profile, method, alloc.info["param_ratio_searched"] + 0.01)
    assert cost.fraction(profile.layers, above.ranks) > 0.7 or above.ranks == alloc.ranks


def test_lems_spends_a_latency_budget_better_than_uniform(profile, cost):
    lems = A.allocate(profile, "lems_fixed", 0.7, cost=cost)
    uniform = A.allocate(profile, "uniform", 0.7, cost=cost)
    params = ErrorModelParams()
    assert lems.objective <= sum(A.predicted_errors(profile, uniform.ranks, params).values()) + 1e-12


@pytest.mark.parametrize("method", ["atp", "asvd", "ars", "erc_plc", "lcsvd_search"])
def test_methods_without_a_latency_rule_refuse_by_name(profile, cost, method):
    with pytest.raises(UnsupportedCostError, match=f"^{method} allocates under a parameter budget only"):
        A.allocate(profile, method, 0.7, cost=cost, score_fn=lambda ranks: 0.0)


def test_cost_must_be_params_or_a_latency_cost(profile):
    with pytest.raises(ValueError, match="latency_cost"):
        A.allocate(profile, "lems", 0.7, cost="latency")


def test_excluded_layers_are_refused_under_a_latency_budget(profile, cost):
    with pytest.raises(ConstraintError, match="lock them dense"):
        A.allocate(profile, "lems", 0.7, cost=cost, constraints=LayerConstraints(exclude=("block:0",)))
    locked = A.allocate(profile, "lems", 0.8, cost=cost, constraints=LayerConstraints(lock_dense=("kind:q",)))
    assert all(r is None for name, r in locked.ranks.items() if "q_proj" in name)
    assert cost.fraction(profile.layers, locked.ranks) <= 0.8 * (1 + 1e-9)


def test_a_latency_budget_below_the_smallest_plan_names_the_method(profile, cost):
    with pytest.raises(A.BudgetBelowMinimumError, match="lems: .*latency budget"):
        A.allocate(profile, "lems", 0.05, cost=cost)


# ----------------------------------------------------------------- the CLI
@pytest.fixture()
def cli_inputs(tmp_path, cost):
    profile = synthetic_profile(num_blocks=2)
    return profile.save(tmp_path / "profile"), cost.device_profile.save(tmp_path / "device.json"), tmp_path


def _allocate(*extra):
    from lems_core.cli import main

    return main(["allocate", *extra])


def test_cli_allocates_under_a_latency_budget(cli_inputs, capsys):
    folder, device_profile, tmp = cli_inputs
    code = _allocate("--profile", str(folder), "--ratio", "0.7", "--cost", "latency", "--device-profile",
                     str(device_profile), "-o", str(tmp / "plan.json"))
    assert code == 0, capsys.readouterr().err
    record = plan_cost(RankPlan.load(tmp / "plan.json"))
    assert record.kind == "latency" and record.budget == 0.7 and record.predicted_fraction <= 0.7 * (1 + 1e-9)
    assert "predicted decode 1x1 latency" in capsys.readouterr().out


@pytest.mark.parametrize("edit, extra, message", [
    (lambda path: path.write_text("{broken"), (), "device profile is not valid JSON"),
    (lambda path: path.write_text(path.read_text().replace('"dense_seconds": ', '"dense_seconds": -')), (),
     "above 0"),
    (None, ("--workload", "prefill"), "decode 1x1 workload, not the prefill"),
    (None, ("--method", "atp"), "atp allocates under a parameter budget only"),
])
def test_cli_bad_device_profile_exits_2(cli_inputs, capsys, edit, extra, message):
    folder, device_profile, tmp = cli_inputs
    if edit is not None:
        edit(device_profile)
    code = _allocate("--profile", str(folder), "--ratio", "0.7", "--cost", "latency", "--device-profile",
                     str(device_profile), "-o", str(tmp / "plan.json"), *extra)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp / "plan.json").exists()


def test_cli_latency_options_have_help():
    from lems_core.cli import build_parser

    text = build_parser(full={"allocate"})._subparsers._group_actions[0].choices["allocate"].format_help()
    assert "--cost {params,latency}" in text and "--workload {prefill,decode}" in text and "--device-profile" in text


def test_lems_mp_solves_under_latency_and_refuses_projected_constraints(profile, cost):
    alloc = A.allocate(profile, "lems_mp", 0.7, cost=cost)
    costs, errors, _ = A.lems_mp.lems_mp_error_table(profile, A.lems_mp.fit_multipoint(profile, ErrorModelParams()),
                                                     0.7, 8, cost)
    assert alloc.info["cost"]["predicted_latency_fraction"] <= 0.7 * (1 + 1e-9)
    best = solve_mckp(costs, errors, 0.7 * cost.dense_total(profile.layers))  # the same knapsack, latency costs
    assert alloc.objective == pytest.approx(objective(errors, best))
    assert alloc.objective != pytest.approx(A.allocate(profile, "lems_mp", 0.7).objective)  # not the parameter plan
    with pytest.raises(ConstraintError, match="lems_mp projects layer constraints"):
        A.allocate(profile, "lems_mp", 0.7, cost=cost, constraints=LayerConstraints(lock_dense=("kind:q",)))
