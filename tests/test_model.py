import pytest
import torch

from lems_core.model import KINDS, compressible_layers, model_fingerprint, tiny_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_compressible_layers_cover_seven_projections_per_block(arch):
    model = tiny_model(arch, num_hidden_layers=2)
    layers = compressible_layers(model)
    assert len(layers) == 14
    assert [l.kind for l in layers[:7]] == list(KINDS)
    assert [l.block for l in layers] == [0] * 7 + [1] * 7
    k = layers[1]
    assert (k.out_features, k.in_features) == (32, 64)  # GQA: 2 kv heads x 16
    assert all(not (".embed" in l.name or "lm_head" in l.name) for l in layers)


def test_layerinfo_break_even_rank():
    layer = compressible_layers(tiny_model("llama"))[4]  # gate 160 x 64
    assert layer.eq_rank == (160 * 64) // (160 + 64)
    assert layer.rank_params(layer.eq_rank) <= layer.params < layer.rank_params(layer.eq_rank + 1)


def test_fingerprint_tells_models_apart_and_is_stable():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert model_fingerprint(a) == model_fingerprint(tiny_model("llama", seed=0))
    assert model_fingerprint(a) != model_fingerprint(b)
    with torch.no_grad():
        a.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    assert model_fingerprint(a) != model_fingerprint(tiny_model("llama", seed=0))


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="No compressible Linear"):
        compressible_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
