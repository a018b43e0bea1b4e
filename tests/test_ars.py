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
from lems_core.model import LoadedModel, compressible_layers, model_fingerprint, tiny_model
from lems_core.plan import RankPlan
from lems_core.profile import Profile, synthetic_profile

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
    return pipeline.train_ars(loaded, profile, ratio, config, cache_dir=cache_dir, factors=factors, windows=windows, **kw)


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

    monkeypatch.setattr(ars, "train_masks", no_training)
    monkeypatch.setattr(pipeline, "full_factorizations", no_training)
    again = pipeline.train_ars(loaded, profile, 0.7, config, cache_dir=tmp_path)  # no factors/windows needed
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
    monkeypatch.setattr(ars, "COMMITTED_DIR", tmp_path / "committed")
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
    factors = pipeline.full_factorizations(loaded, profile, calib, cache_dir=tmp_path)
    profile.spectra = {n: f.sigma for n, f in factors.items()}
    alloc = pipeline.train_ars(loaded, profile, 0.6, ars.ARSConfig(steps=2, batch_windows=1), cache_dir=tmp_path)
    assert alloc.info["spectrum_mismatch"] < 1e-6
    assert realised_ratio(profile, alloc.ranks) <= 0.6
    assert json.loads(ars.allocation_to_plan(profile, alloc).to_json())["method"] == "ars"


def test_reference_config_and_legacy_configs_round_trip():
    ref = ars.ARSConfig()
    assert (ref.bidirectional, ref.lambda_off_within, ref.early_stop_window) == (True, 0.002, 100)
    assert ars.ARSConfig.from_dict(ref.to_dict()) == ref
    legacy = ars.preset("cpu-small-legacy")
    old_dict = legacy.to_dict()
    assert not any(k in old_dict for k in ars.LEGACY_FIELDS)  # configs stored before: same dict, same cache key
    assert ars.ARSConfig.from_dict(old_dict) == legacy and not legacy.bidirectional
    with pytest.raises(ValueError, match=">= 0"):
        ars.ARSConfig(early_stop_window=-1)


def test_early_stop_on_the_window_mean_and_never_with_window_0():
    config = ars.ARSConfig(early_stop_window=3, early_stop_tol=0.0015)
    above = [{"kept_ratio": 0.9}] * 4
    on_target = [{"kept_ratio": 0.9}] + [{"kept_ratio": 0.5}] * 3
    assert not ars.budget_reached(above, 0.5, config)
    assert ars.budget_reached(on_target, 0.5, config)
    assert not ars.budget_reached(on_target[:3], 0.5, config)  # needs more than the window
    assert not ars.budget_reached(on_target, 0.5, ars.ARSConfig(early_stop_window=0))


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
