"""ARS (methods.md §4.6) on a tiny random llama: training, masks, budget repair, caching, allocator."""
import json

import numpy as np
import pytest
import torch

from lems_core import pipeline
from lems_core.allocators import ars
from lems_core.allocators import allocate, realised_ratio
from lems_core.calibration import CalibrationConfig
from lems_core.decompositions import Decomposer
from lems_core.model import compressible_layers, tiny_model
from lems_core.plan import RankPlan
from lems_core.profile import Profile, synthetic_profile
from lems_core.run import Run

from helpers import tiny_loaded


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is ~10x faster than two on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAST = ars.ARSConfig(steps=25, batch_windows=2, seq_len=32, lr=0.05, seed=3)


@pytest.fixture(scope="module")
def setup():
    """(loaded, profile, full factors, windows) for a tiny llama under plain SVD."""
    loaded = tiny_loaded(5)
    model = loaded.model
    layers = compressible_layers(model)
    decomposer = Decomposer("svd")
    factors = {l.name: decomposer(l, model.get_submodule(l.name).weight, keep=min(l.out_features, l.in_features))
               for l in layers}
    profile = Profile("tiny-llama", loaded.fingerprint, "svd", {"dataset": "random", "seq_len": 48}, layers,
                      {n: f.sigma for n, f in factors.items()})
    windows = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    return loaded, profile, factors, windows


def _train(setup, ratio=0.5, config=FAST, cache_dir=None, **kw):
    loaded, profile, factors, windows = setup
    return pipeline.train_ars(loaded, profile, ratio, config, factors=factors, windows=windows,
                              run=Run(cache_dir=cache_dir), **kw)


def test_all_ones_mask_reproduces_the_dense_model_and_is_undone(setup):
    loaded, profile, factors, windows = setup
    ids = windows[:1, :16]
    with torch.no_grad():
        dense = loaded.model(ids).logits
        with ars.masked_model(loaded.model, profile.layers, factors) as modules:
            for m in modules:
                m.mask = torch.ones(m.left.shape[1])
            masked = loaded.model(ids).logits
        after = loaded.model(ids).logits
    assert torch.allclose(masked, dense, atol=1e-4)
    assert torch.equal(after, dense)
    assert all(isinstance(loaded.model.get_submodule(l.name), torch.nn.Linear) for l in profile.layers)
    assert all(p.requires_grad for p in loaded.model.parameters())


def test_straight_through_mask_is_hard_forward_and_passes_gradient():
    hyper = ars.Hypernetwork([5, 7], z_size=4, hidden_size=8, logit_bias=0.0, seed=0)
    gen = torch.Generator().manual_seed(0)
    masks = [ars.gumbel_sigmoid_mask(lg, 0.4, 0.5, gen) for lg in hyper()]
    assert all(set(m.detach().unique().tolist()) <= {0.0, 1.0} for m in masks)
    (masks[0] * torch.arange(5.0)).sum().add(masks[1].sum()).backward()
    grads = [p.grad for p in hyper.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert hyper.heads[0].weight.grad.abs().sum() > 0 and hyper.gru.weight_ih_l0.grad.abs().sum() > 0


def test_budget_terms():
    layers = synthetic_profile(num_blocks=1).layers[:2]  # q 64x64 (eq 32), k 32x64 (eq 21)
    masks = [torch.ones(64), torch.zeros(32)]
    masks[1][:10] = 1
    kept = ars.kept_params(masks, layers)
    assert kept.item() == 64 * 64 + 10 * 96  # q counted dense (capped), k at rank 10
    assert ars.budget_penalty(kept, 2 * kept.item()).item() == 0.0
    assert ars.budget_penalty(kept, kept.item() / 2).item() == pytest.approx(np.log(2))
    masks = [m.clone().requires_grad_(True) for m in masks]
    ars.kept_params(masks, layers).backward()
    assert torch.all(masks[0].grad == 128)  # straight-through: the capped layer still feels the budget
    spectra = [torch.tensor([0.8, 0.6]), torch.tensor([1.0, 0.0])]
    assert ars.alignment_loss([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])], spectra).item() == pytest.approx(0.5)


def test_training_loss_decreases_and_ranks_meet_the_budget(setup, tmp_path):
    loaded, profile, _, _ = setup
    alloc = _train(setup, 0.5, cache_dir=tmp_path)
    losses = [r["loss"] for r in alloc.info["loss_curve"]]
    assert len(losses) == FAST.steps
    assert alloc.info["loss_curve"][0]["kept_ratio"] == 1.0  # +3 bias and Gumbel noise: training starts dense
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert alloc.info["learned_ratio"] < 1.0  # the budget pressure pruned components
    assert realised_ratio(profile, alloc.ranks) <= 0.5 + 1e-12
    for l in profile.layers:
        r = alloc.ranks[l.name]
        assert r is None or (r % 8 == 0 and 8 <= r < l.eq_rank)
    plan = ars.allocation_to_plan(profile, alloc)
    again = RankPlan.from_json(plan.to_json(), layers=profile.layers, fingerprint=profile.fingerprint)
    assert again.method == "ars" and again.ranks() == alloc.ranks and again.budget == 0.5
    assert again.meta["calibration"] == profile.calibration


def test_training_is_reproducible_for_a_seed(setup, tmp_path):
    config = ars.ARSConfig(steps=4, batch_windows=1, seq_len=24, lr=0.05, seed=11)
    a = _train(setup, 0.6, config, cache_dir=tmp_path / "a")
    b = _train(setup, 0.6, config, cache_dir=tmp_path / "b")
    c = _train(setup, 0.6, ars.ARSConfig(**{**config.to_dict(), "seed": 12}), cache_dir=tmp_path / "c")
    assert a.info["loss_curve"] == b.info["loss_curve"] and a.ranks == b.ranks
    assert a.info["loss_curve"] != c.info["loss_curve"]


def test_repair_is_deterministic_and_cuts_cheap_energy_first():
    profile = synthetic_profile(num_blocks=2)
    dense = {l.name: None for l in profile.layers}
    ranks, cuts = ars.repair_to_budget(profile, dense, 0.6, 8)
    assert realised_ratio(profile, ranks) <= 0.6 and cuts > 0
    assert ars.repair_to_budget(profile, dense, 0.6, 8) == (ranks, cuts)
    assert all(r is None or r % 8 == 0 for r in ranks.values())
    untouched, none = ars.repair_to_budget(profile, ranks, 0.9, 8)
    assert untouched == ranks and none == 0
    with pytest.raises(ValueError, match="below the method's minimum"):
        ars.repair_to_budget(profile, dense, 0.01, 8)


def test_fill_spends_the_slack_without_exceeding_the_budget():
    profile = synthetic_profile(num_blocks=2)
    low = {l.name: 8 for l in profile.layers}
    assert realised_ratio(profile, low) < 0.3
    filled, adds = ars.fill_to_budget(profile, low, 0.6, 8)
    assert adds > 0 and 0.55 < realised_ratio(profile, filled) <= 0.6
    assert all(filled[n] is None or filled[n] >= low[n] for n in low)
    assert ars.fill_to_budget(profile, low, 0.6, 8) == (filled, adds)
    assert ars.round_rank(profile.layers[0], 0, 8) == 8 and ars.round_rank(profile.layers[0], 30, 8) is None


def test_cached_result_returns_without_training(setup, tmp_path, monkeypatch):
    loaded, profile, _, _ = setup
    config = ars.ARSConfig(steps=3, batch_windows=1, seq_len=24, seed=1)
    first = _train(setup, 0.7, config, cache_dir=tmp_path)

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(ars.allocator, "train_masks", no_training)
    monkeypatch.setattr(pipeline.ars_training, "full_factorizations", no_training)
    again = pipeline.train_ars(loaded, profile, 0.7, config, run=Run(cache_dir=tmp_path))  # no factors/windows needed
    assert again.ranks == first.ranks
    plan = ars.cached_ars_plan(profile, 0.7, cache_dir=tmp_path)
    assert plan is not None and plan.ranks() == first.ranks
    assert ars.cached_ars_plan(profile, 0.7, config, cache_dir=tmp_path).ranks() == first.ranks
    assert ars.cached_ars_plan(profile, 0.7, ars.ARSConfig(seed=2), cache_dir=tmp_path) is None
    assert allocate(profile, "ars", 0.7, cache_dir=tmp_path).ranks == first.ranks


def test_allocator_raises_clearly_without_a_plan(setup, tmp_path):
    _, profile, _, _ = setup
    with pytest.raises(ValueError, match=r"no ARS plan trained for ratio 0.45: run `python -m lems_core ars"):
        allocate(profile, "ars", 0.45, cache_dir=tmp_path)


def test_committed_plan_is_found_and_checked(setup, tmp_path, monkeypatch):
    _, profile, _, _ = setup
    monkeypatch.setattr(ars.plans, "COMMITTED_DIR", tmp_path / "committed")
    alloc = _train(setup, 0.6, ars.ARSConfig(steps=2, batch_windows=1, seq_len=24), cache_dir=tmp_path / "train")
    plan = ars.allocation_to_plan(profile, alloc)
    path = plan.save(ars.committed_plan_path(profile, 0.6))
    assert path.name == f"{profile.fingerprint}-svd-0.6.json"
    found = ars.cached_ars_plan(profile, 0.6, cache_dir=tmp_path / "empty")
    assert found is not None and found.ranks() == alloc.ranks
    other = Profile(profile.model_source, profile.fingerprint, "svd", {"dataset": "other"}, profile.layers,
                    profile.spectra)  # same model, other calibration: not this profile's plan
    assert ars.cached_ars_plan(other, 0.6, cache_dir=tmp_path / "empty") is None


def test_pipeline_path_computes_full_factors_from_cached_statistics(setup, tmp_path):
    """No injected factors/windows: calibration windows and statistics come from the pipeline."""
    loaded, _, _, _ = setup
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(["alpha", "beta", "rank", "layer", "the"], 12)) for _ in range(300)))
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)
    layers = compressible_layers(loaded.model)
    profile = Profile("tiny-llama", loaded.fingerprint, "svd_llm", cfg.to_dict(), layers, {})
    calib = pipeline.calibration_ids(loaded, profile)
    factors = pipeline.full_factorizations(loaded, profile, calib, run=Run(cache_dir=tmp_path))
    profile.spectra = {n: f.sigma for n, f in factors.items()}
    alloc = pipeline.train_ars(loaded, profile, 0.6, ars.ARSConfig(steps=2, batch_windows=1), run=Run(cache_dir=tmp_path))
    assert alloc.info["spectrum_mismatch"] < 1e-6
    assert realised_ratio(profile, alloc.ranks) <= 0.6
    assert json.loads(ars.allocation_to_plan(profile, alloc).to_json())["method"] == "ars"


def test_reference_config_and_legacy_configs_round_trip():
    ref = ars.ARSConfig()
    assert (ref.bidirectional, ref.p_param, ref.budget_scope) == (True, 0.4, "model")
    assert (ref.lambda_off_within, ref.early_stop_window, ref.early_stop_tol) == (0.002, 100, 0.003)
    assert ref.rule_name == "reference" and ars.preset("cpu-small").rule_name == "reference"
    assert ars.ARSConfig.from_dict(ref.to_dict()) == ref
    legacy = ars.preset("cpu-small-legacy")
    old_dict = legacy.to_dict()
    assert not any(k in old_dict for k in ars.LEGACY_FIELDS)  # configs stored before: same dict, same cache key
    assert ars.ARSConfig.from_dict(old_dict) == legacy and legacy.rule_name == "legacy"
    assert (legacy.steps, legacy.lr, legacy.seq_len) == (80, 1e-2, 128)  # the committed demo plans' settings
    assert ars.preset("reference-legacy") == ars.ARSConfig(**ars.LEGACY_FIELDS)  # the old "reference"
    with pytest.raises(ValueError, match=">= 0"):
        ars.ARSConfig(early_stop_window=-1)
    with pytest.raises(ValueError, match="budget_scope"):
        ars.ARSConfig(budget_scope="all")


def test_configs_of_the_intermediate_rule_read_as_custom_not_reference():
    """Stored after the first reference switches (issue #11) but before p_param / whole-model budget."""
    stored = {**ars.preset("cpu-small").to_dict()}
    for k in ("p_param", "budget_scope"):
        del stored[k]
    stored["early_stop_tol"] = 0.0015
    config = ars.ARSConfig.from_dict(stored)
    assert (config.p_param, config.budget_scope) == (None, "compressible")  # what that run did
    assert config.rule_name == "custom"


def test_cache_keys_differ_between_the_rules(setup):
    _, profile, _, _ = setup
    new, old = ars.preset("cpu-small"), ars.preset("cpu-small-legacy")
    assert ars.cache_key(profile, 0.8, new) != ars.cache_key(profile, 0.8, old)
    assert ars.latest_key(profile, 0.8) != ars.latest_key(profile, 0.8, "legacy")
    # the legacy latest key is the one used before rules existed
    assert ars.latest_key(profile, 0.8, "legacy") == "ars-latest:" + ars.key_of(profile.key, "svd", 0.8)


def test_reference_penalty_is_two_sided_with_a_lambda_zero_band():
    """Reference rule: penalty against p_param (also under the budget), lam 0 within 0.002 of the
    whole-model target; legacy: penalty against the budget (zero under it), lam always on."""
    budget = ars.BudgetTarget(ratio=0.8, compressible=1000, other=250)  # model target (250 + 800) / 1250 = 0.84
    assert budget.model_target == pytest.approx(0.84)
    ref, legacy = ars.ARSConfig(), ars.preset("cpu-small-legacy")

    def term(kept, config):
        penalty, lam = ars.budget_term(torch.tensor(float(kept)), budget, config)
        return penalty.item(), lam

    above, below = term(900, ref), term(700, ref)
    assert above == (pytest.approx(np.log(0.9 / 0.4)), 16.0)
    assert below == (pytest.approx(np.log(0.7 / 0.4)), 16.0)  # under the budget: still pushed down
    assert term(801, ref)[1] == 0.0 and term(798, ref)[1] == 0.0  # within 0.002 (model) on either side
    assert term(803, ref)[1] == 16.0 and term(797, ref)[1] == 16.0  # 0.0024 off in the model's terms
    assert term(700, legacy) == (0.0, 16.0)  # one-sided at the budget
    assert term(900, legacy) == (pytest.approx(np.log(0.9 / 0.8)), 16.0)
    assert term(800, legacy)[1] == 16.0  # no band
    assert ars.penalty_ratio(ref, 0.3) == 0.3  # p_param capped at the budget (the penalty must reach it)
    # 0.0023 off in the compressible Linears' terms, 0.00184 in the whole model's: the band is the model's
    assert term(802.3, ref)[1] == 0.0
    assert term(802.3, ars.ARSConfig(budget_scope="compressible"))[1] == 16.0


def test_bidirectional_hypernetwork_reads_the_layer_sequence_both_ways():
    components = [4, 3, 5]
    one = ars.Hypernetwork(components, 8, 6, 3.0, seed=0)
    both = ars.Hypernetwork(components, 8, 6, 3.0, seed=0, bidirectional=True)
    assert [t.shape[0] for t in both()] == components and both.heads[0].in_features == 12
    assert one.heads[0].in_features == 6
    # with both directions the first layer's logits depend on the last layer's input
    z = both.z.clone()
    first = both()[0].detach().clone()
    both.z[0, -1] += 1.0
    assert not torch.allclose(both()[0], first)
    both.z.copy_(z)
    first = one()[0].detach().clone()
    one.z[0, -1] += 1.0
    assert torch.allclose(one()[0], first)


def test_lambda_is_off_on_target_and_training_stops_early(setup, tmp_path):
    config = ars.ARSConfig(steps=6, batch_windows=1, seq_len=24, lr=0.05, seed=3, lambda_off_within=1.0,
                           early_stop_window=2, early_stop_tol=1.0)
    alloc = _train(setup, 0.6, config, cache_dir=tmp_path)
    curve = alloc.info["loss_curve"]
    assert len(curve) == 3  # stopped after the first window mean within tolerance
    assert all(r["lam"] == 0.0 for r in curve)  # every step within 1.0 of the target


def _flat(model_ratio: float, steps: int) -> list[dict]:
    return [{"model_ratio": model_ratio, "kept_ratio": 0.0}] * steps


def test_early_stop_needs_more_than_100_steps_of_a_running_mean_on_target():
    """Reference (train_adaptive.py:273-282): len > 100 and mean(last 100) - target < 0.003."""
    ref = ars.ARSConfig()
    assert not ars.budget_reached(_flat(0.84, 100), 0.84, ref)  # flat on target, but only 100 steps
    assert ars.budget_reached(_flat(0.84, 101), 0.84, ref)
    assert ars.budget_reached(_flat(0.70, 101), 0.84, ref)  # under the target counts as reached
    assert not ars.budget_reached(_flat(0.8431, 500), 0.84, ref)  # 0.0031 above: never
    descent = _flat(1.0, 10) + _flat(0.84, 91)  # 101 steps, but the window still holds the descent
    assert not ars.budget_reached(descent, 0.84, ref)
    assert ars.budget_reached(descent + _flat(0.84, 9), 0.84, ref)  # the window now starts on target
    assert ars.budget_reached([{"kept_ratio": 0.5, "model_ratio": 0.9}] * 101, 0.5,
                              ars.ARSConfig(budget_scope="compressible"))  # the scope picks the field
    assert not ars.budget_reached(_flat(0.84, 1000), 0.84, ars.preset("cpu-small-legacy"))  # fixed steps


def test_gru_is_bidirectional_by_default_and_one_way_under_the_legacy_rule():
    components = [4, 3]
    for name in ("reference", "cpu-small"):
        hyper = ars.build_hypernetwork(ars.preset(name), components)
        assert hyper.gru.bidirectional and hyper.heads[0].in_features == 2 * ars.ARSConfig().hidden_size
    for name in ("reference-legacy", "cpu-small-legacy"):
        hyper = ars.build_hypernetwork(ars.preset(name), components)
        assert not hyper.gru.bidirectional and hyper.heads[0].in_features == ars.ARSConfig().hidden_size


@pytest.mark.parametrize("tied", [False, True])
def test_whole_model_target_translates_back_to_the_compressible_budget(tied):
    """The tiny llama: embed + lm_head (256 x 64 each, once when tied) and 7 norms of 64 are 'other'."""
    model = tiny_model("llama", seed=1, tie_word_embeddings=tied)
    layers = compressible_layers(model)
    budget = ars.budget_target(model, layers, 0.6)
    compressible = 3 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 160 * 64)
    assert budget.compressible == compressible == sum(l.params for l in layers)
    assert budget.other == (1 if tied else 2) * 256 * 64 + 7 * 64
    assert budget.model_target == pytest.approx((budget.other + 0.6 * compressible) / (budget.other + compressible))
    assert budget.model_target > 0.6  # the uncompressed parameters count as kept
    # a kept count on the model target is exactly the compressible budget
    assert budget.scoped(0.6 * compressible, "model") == (pytest.approx(budget.model_target), budget.model_target)
    assert budget.scoped(0.6 * compressible, "compressible") == (pytest.approx(0.6), 0.6)
    info = budget.to_info()
    assert info["budget_compressible"] == 0.6 and info["budget_model"] == pytest.approx(budget.model_target)
    assert info["params_model"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["reference", "legacy"])
def test_tiny_training_meets_the_budget_under_both_rules(setup, tmp_path, name):
    loaded, profile, _, _ = setup
    rule = {"steps": 130} if name == "reference" else {"steps": 40, **ars.LEGACY_FIELDS}
    config = ars.ARSConfig(batch_windows=1, seq_len=24, lr=0.01, seed=3, **rule)
    alloc = _train(setup, 0.6, config, cache_dir=tmp_path)
    info, curve = alloc.info, alloc.info["loss_curve"]
    assert info["rule"] == name and info["config"] == config.to_dict()
    assert realised_ratio(profile, alloc.ranks) <= 0.6 + 1e-12 and info["realised_ratio"] > 0.55
    budget = ars.budget_target(loaded.model, profile.layers, 0.6)
    assert info["budget_compressible"] == 0.6 and info["budget_model"] == pytest.approx(budget.model_target)
    assert info["realised_model_ratio"] <= budget.model_target + 1e-12
    assert all(r["model_ratio"] == pytest.approx(budget.model_ratio(r["kept_ratio"] * budget.compressible))
               for r in curve)
    if name == "reference":  # the penalty pulls far under the budget on this random model: stops at 101
        assert info["steps_run"] == len(curve) == 101 and info["stopped_early"]
        assert info["penalty_p"] == 0.4
    else:
        assert info["steps_run"] == len(curve) == 40 and not info["stopped_early"]
        assert info["penalty_p"] == 0.6 and all(r["lam"] == 16.0 for r in curve)
    plan = ars.allocation_to_plan(profile, alloc)
    assert plan.meta["ars"]["budget_model"] == info["budget_model"]


def test_default_allocator_never_serves_a_legacy_plan(setup, tmp_path, monkeypatch):
    """Plans trained under the legacy rule (index or committed) are served only on request."""
    loaded, profile, _, _ = setup
    monkeypatch.setattr(ars.plans, "COMMITTED_DIR", tmp_path / "committed")
    legacy = ars.ARSConfig(steps=2, batch_windows=1, seq_len=24, **ars.LEGACY_FIELDS)
    old = _train(setup, 0.6, legacy, cache_dir=tmp_path / "index")
    ars.allocation_to_plan(profile, old).save(ars.committed_plan_path(profile, 0.6))
    for cache in (tmp_path / "index", tmp_path / "empty"):  # the index's latest, then the committed file
        assert ars.cached_ars_plan(profile, 0.6, cache_dir=cache) is None
        with pytest.raises(ValueError, match="trained under the legacy rule exists: rule='legacy'"):
            allocate(profile, "ars", 0.6, cache_dir=cache)
        assert allocate(profile, "ars", 0.6, cache_dir=cache, rule="legacy").ranks == old.ranks
        assert ars.cached_ars_plan(profile, 0.6, legacy, cache_dir=cache).ranks() == old.ranks
    new = _train(setup, 0.6, ars.ARSConfig(steps=2, batch_windows=1, seq_len=24, seed=5), cache_dir=tmp_path / "index")
    assert allocate(profile, "ars", 0.6, cache_dir=tmp_path / "index").info["rule"] == "reference"
    assert allocate(profile, "ars", 0.6, cache_dir=tmp_path / "index").ranks == new.ranks
    assert allocate(profile, "ars", 0.6, cache_dir=tmp_path / "index", rule="legacy").ranks == old.ranks


def test_plans_stored_between_the_rules_are_served_under_neither(setup, tmp_path):
    """Runs made after the first reference switches stored their plan under the key that is
    now the legacy rule's latest key; their rule is neither, so neither default serves them."""
    _, profile, _, _ = setup
    between = ars.ARSConfig(steps=2, batch_windows=1, seq_len=24, p_param=None, budget_scope="compressible",
                            early_stop_tol=0.0015)
    assert between.rule_name == "custom"
    alloc = _train(setup, 0.6, between, cache_dir=tmp_path)
    ars.index(tmp_path)[ars.latest_key(profile, 0.6, "legacy")] = ars.allocation_to_plan(profile, alloc).to_dict()
    assert ars.cached_ars_plan(profile, 0.6, cache_dir=tmp_path, rule="legacy") is None
    assert ars.cached_ars_plan(profile, 0.6, cache_dir=tmp_path) is None
    assert ars.cached_ars_plan(profile, 0.6, between, cache_dir=tmp_path).ranks() == alloc.ranks
