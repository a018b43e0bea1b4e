import numpy as np
import pytest
import torch

from lems_core.decompositions import Decomposer
from lems_core.model import compressible_layers, tiny_model
from lems_core.sensitivity import dense_reference, layer_kl_sweep, naive_layer_kl
from lems_core.blocks import capture_block_inputs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_block_suffix_sweep_equals_full_forward(arch):
    model = tiny_model(arch, seed=6)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(6))
    layers = compressible_layers(model)
    decomposer = Decomposer("svd")
    factors = {l.name: decomposer(l, model.get_submodule(l.name).weight) for l in layers}
    sweep, ref = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.1, 0.5], batch_size=2)
    assert set(sweep) == {0.1, 0.5}
    for i, layer in enumerate(layers):
        naive = naive_layer_kl(model, layer, factors[layer.name], ids, 0.1, ref, batch_size=2)
        assert sweep[0.1][i] == pytest.approx(naive, rel=2e-3, abs=1e-6)
    assert np.all(sweep[0.1] > 0) and np.all(np.isfinite(sweep[0.5]))
    # the model is left dense afterwards
    assert all(isinstance(model.get_submodule(l.name), torch.nn.Linear) for l in layers)


def test_kl_floor_is_zero_with_fp32_reference_and_positive_with_bf16():
    """The dense model against its own cached reference: the bf16 cache (the reference's) sets a floor."""
    from lems_core.sensitivity import kl_floor

    model = tiny_model("llama", seed=3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    items = capture_block_inputs(model, ids, 1)
    fp32 = dense_reference(model, items, ids, 1, precision="fp32")
    bf16 = dense_reference(model, items, ids, 1, precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert kl_floor(model, items, fp32) == pytest.approx(0.0, abs=1e-9)
    assert kl_floor(model, items, bf16) > 1e-7
    layers = compressible_layers(model)
    decomposer = Decomposer("svd")
    factors = {l.name: decomposer(l, model.get_submodule(l.name).weight) for l in layers}
    _, ref = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.5])
    assert ref.precision == "fp32" and ref.floor == pytest.approx(0.0, abs=1e-9)
    _, ref = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.5], precision="bf16")
    assert ref.precision == "bf16" and ref.floor > 1e-7


def test_sweep_records_single_layer_nll_equal_to_a_full_forward():
    """The NLL the sweep records (ASVD's single-layer perplexity) is the compressed model's own
    cross-entropy on every position of the search windows, and it leaves KL unchanged."""
    from lems_core.compression import LowRankLinear, set_module
    from lems_core.sensitivity import rank_at

    model = tiny_model("llama", seed=8)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(8))
    layers = compressible_layers(model)
    decomposer = Decomposer("svd")
    factors = {l.name: decomposer(l, model.get_submodule(l.name).weight) for l in layers}
    nll: dict = {}
    with_nll, _ = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.2, 0.6], batch_size=2, nll=nll)
    without, _ = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.2, 0.6], batch_size=2)
    np.testing.assert_allclose(with_nll[0.2], without[0.2], rtol=1e-5)
    for i in (0, len(layers) // 2, len(layers) - 1):
        layer = layers[i]
        original = model.get_submodule(layer.name)
        left, right = factors[layer.name].factors(rank_at(layer, 0.2))
        set_module(model, layer.name, LowRankLinear.from_factors(left, right, original.bias, original))
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        set_module(model, layer.name, original)
        full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
        assert nll[0.2][i] == pytest.approx(full, rel=1e-4)
