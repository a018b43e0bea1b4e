import pytest
import torch

from lems_core.budget import force_factorised
from lems_core.compression import LowRankLinear, compress_model, count_parameters, load_compressed, save_compressed
from lems_core.decompositions import Decomposer
from lems_core.model import compressible_layers, tiny_model


def _factor_fn(model):
    decomposer = Decomposer("svd")
    return lambda layer: decomposer(layer, model.get_submodule(layer.name).weight)


def test_low_rank_pair_reproduces_the_truncated_weight():
    model = tiny_model("llama", seed=2)
    layer = compressible_layers(model)[0]
    factors = _factor_fn(model)(layer)
    compress_model(model, {layer.name: 5}, lambda l: factors)
    module = model.get_submodule(layer.name)
    assert isinstance(module, LowRankLinear) and module.rank == 5
    x = torch.randn(3, layer.in_features)
    assert torch.allclose(module(x), x @ factors.weight(5).T, atol=1e-5)


def test_break_even_rank_keeps_layer_dense_and_params_shrink():
    model = tiny_model("llama", seed=2)
    layers = compressible_layers(model)
    dense = count_parameters(model)
    ranks = {l.name: (l.eq_rank if l.kind == "q" else 4) for l in layers}
    applied = compress_model(model, ranks, _factor_fn(model))
    assert all(applied[l.name] is None for l in layers if l.kind == "q")
    assert isinstance(model.get_submodule(layers[0].name), torch.nn.Linear)
    expected = dense - sum(l.params - l.rank_params(4) for l in layers if l.kind != "q")
    assert count_parameters(model) == expected


def test_unknown_layers_are_rejected_before_any_change():
    model = tiny_model("llama", seed=2)
    with pytest.raises(KeyError, match="not in this model"):
        compress_model(model, {"model.layers.9.mlp.up_proj": 4}, _factor_fn(model))
    assert all(isinstance(model.get_submodule(l.name), torch.nn.Linear) for l in compressible_layers(model))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_and_reload_runs_identically(tmp_path, arch):
    model = tiny_model(arch, seed=4, tie_word_embeddings=True)
    ids = torch.randint(0, 256, (2, 16))
    ranks = {l.name: 6 for l in compressible_layers(model)}
    compress_model(model, ranks, _factor_fn(model))
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, None, ranks, tmp_path / "m", meta={"note": "test"})
    reloaded, _, saved_ranks, meta = load_compressed(tmp_path / "m")
    assert saved_ranks == ranks and meta == {"note": "test"}
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    assert count_parameters(reloaded) == count_parameters(model)


def test_forced_factorised_rank_replaces_the_layer_even_at_break_even(tmp_path):
    """A plan's ``force_factorised`` layer (the reference's rank-eq MRCS layers) is really low-rank."""
    from lems_core.plan import RankPlan, plan_from_ranks
    from lems_core.profile import synthetic_profile

    model = tiny_model("llama", seed=2)
    layers = compressible_layers(model)
    q = next(l for l in layers if l.kind == "q")
    ranks = {l.name: None for l in layers}
    ranks[q.name] = force_factorised(q.eq_rank)
    profile = synthetic_profile()
    profile.layers, profile.fingerprint = layers, "tiny"
    plan = RankPlan.from_json(plan_from_ranks(profile, ranks, "mrcs").to_json(), layers=layers)  # through the JSON
    dense = count_parameters(model)
    factors = _factor_fn(model)(q)
    applied = compress_model(model, plan.ranks(), lambda l: factors)
    module = model.get_submodule(q.name)
    assert isinstance(module, LowRankLinear) and module.rank == q.eq_rank and applied[q.name] == q.eq_rank
    assert count_parameters(model) == dense - q.params + q.eq_rank * (q.out_features + q.in_features)
    x = torch.randn(3, q.in_features)
    assert torch.allclose(module(x), x @ factors.weight(q.eq_rank).T, atol=1e-5)
    save_compressed(model, None, applied, tmp_path / "m")
    reloaded, _, saved, _ = load_compressed(tmp_path / "m")
    assert isinstance(reloaded.get_submodule(q.name), LowRankLinear) and saved[q.name] == q.eq_rank


def test_rank_beyond_the_factors_names_the_layer():
    model = tiny_model("llama", seed=2)
    q = next(l for l in compressible_layers(model) if l.kind == "q")
    with pytest.raises(ValueError, match=f"layer {q.name}: cannot factorise at rank {q.eq_rank + 1}"):
        compress_model(model, {q.name: force_factorised(q.eq_rank + 1)}, _factor_fn(model))  # static factors stop at eq
