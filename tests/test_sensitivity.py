import numpy as np
import pytest
import torch

from lems_core.decompositions import Decomposer
from lems_core.model import compressible_layers, tiny_model
from lems_core.sensitivity import SweepOptions, dense_reference, layer_kl_sweep, naive_layer_kl
from lems_core.blocks import capture_block_inputs
from lems_core.evaluation import KL_SKIP_FRACTION, KL_TEMPERATURE


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_block_suffix_sweep_equals_full_forward(arch):
    model = tiny_model(arch, seed=6)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(6))
    layers = compressible_layers(model)
    decomposer = Decomposer("svd")
    factors = {l.name: decomposer(l, model.get_submodule(l.name).weight) for l in layers}
    swept = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.1, 0.5], SweepOptions(batch_size=2))
    sweep, ref = swept.kl, swept.reference
    assert set(sweep) == {0.1, 0.5}
    for i, layer in enumerate(layers):
        naive = naive_layer_kl(model, layer, factors[layer.name], ids, 0.1, ref, batch_size=2)
        assert sweep[0.1][i] == pytest.approx(naive, rel=2e-3, abs=1e-6)
    assert np.all(sweep[0.1] > 0) and np.all(np.isfinite(sweep[0.5]))
    # the model is left dense afterwards
    assert all(isinstance(model.get_submodule(l.name), torch.nn.Linear) for l in layers)


def kl_roundoff(logits: torch.Tensor) -> float:
    """What float32 round-off alone can put into a mean KL of these logits (temperature 0.6).

    Each float32 log-probability z/T - logsumexp(z/T) carries an absolute error of about
    eps32 (|z/T| + |logsumexp|); a p-weighted sum of two such differences per term is
    off by at most twice that, and so is a mean over positions.
    """
    scaled = logits.double() / KL_TEMPERATURE
    magnitude = float(scaled.abs().max() + torch.logsumexp(scaled, -1).abs().max())
    return 2 * torch.finfo(torch.float32).eps * magnitude


def float64_bf16_floor(logits: torch.Tensor) -> float:
    """KL(softmax(bf16(z) / T) || softmax(z / T)) on the scored positions, in float64: the floor's exact value."""
    z = logits[:, int(KL_SKIP_FRACTION * logits.shape[1]):].double()
    p_log = torch.log_softmax(z.to(torch.bfloat16).double() / KL_TEMPERATURE, -1)
    q_log = torch.log_softmax(z / KL_TEMPERATURE, -1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def test_kl_floor_is_zero_with_fp32_reference_and_positive_with_bf16():
    """The dense model against its own cached reference: the bf16 cache (the reference's) sets a floor.

    The head is scaled by 10 so the logits reach ~7, a trained LM's range: the bf16
    floor grows with the square of the logits, float32 round-off only linearly, and at
    the random model's ~0.7 the floor (~1e-7) is inside the round-off (one CPU measured
    9.5e-8 against an exact 1.08e-7). Bounds come from ``kl_roundoff``, not one machine.
    """
    from lems_core.sensitivity import kl_floor

    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
        logits = model(ids, use_cache=False).logits
    roundoff, exact = kl_roundoff(logits), float64_bf16_floor(logits)
    assert exact > 4 * roundoff  # the setting resolves the floor at all
    items = capture_block_inputs(model, ids, 1)
    fp32 = dense_reference(model, items, ids, 1, precision="fp32")
    bf16 = dense_reference(model, items, ids, 1, precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert 0.0 <= kl_floor(model, items, fp32) <= roundoff
    assert kl_floor(model, items, bf16) == pytest.approx(exact, abs=roundoff)
    layers = compressible_layers(model)
    decomposer = Decomposer("svd")
    factors = {l.name: decomposer(l, model.get_submodule(l.name).weight) for l in layers}
    ref = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.5]).reference
    assert ref.precision == "fp32" and 0.0 <= ref.floor <= roundoff
    ref = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.5], SweepOptions(precision="bf16")).reference
    assert ref.precision == "bf16" and ref.floor == pytest.approx(exact, abs=roundoff)


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
    swept = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.2, 0.6],
                           SweepOptions(batch_size=2, with_nll=True))
    with_nll, nll = swept.kl, swept.nll
    without = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.2, 0.6], SweepOptions(batch_size=2)).kl
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


# ------------------------------------------------------------ KL is >= 0: clamped where measured, round-off accepted when stored
def test_a_kl_that_is_zero_up_to_round_off_is_never_negative():
    """Two float32 roundings of one distribution (float64 and float32 log-softmax): the exact KL is 0,
    and about 40 % of the raw float32 sums fall below it; the measured KL is clamped at 0 and stays
    within the round-off bound. 50 draws: all raw sums >= 0 by chance is under 1e-10."""
    from lems_core.evaluation import kl_from_log_probs

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(1, 40, 256, generator=g)
        p_log = torch.log_softmax(logits.double() / KL_TEMPERATURE, -1).float().flatten(0, 1)
        total, count = kl_from_log_probs(p_log, logits)
        assert 0.0 <= total / count <= kl_roundoff(logits)


def test_stored_kl_accepts_round_off_below_zero_and_refuses_real_negatives():
    """A profile or result written with a KL a few eps below 0 loads (the profile's as 0); a real negative is refused."""
    from lems_core.numerics import KL_ROUNDOFF
    from lems_core.pipeline import EvalResult
    from lems_core.profile import ProfileError, synthetic_profile
    from lems_core.results import ResultsFileError, check_record

    profile = synthetic_profile(num_blocks=2)
    profile.kl_ref[1] = -KL_ROUNDOFF / 2
    profile.measured = {0.5: np.full(len(profile.layers), -KL_ROUNDOFF / 4)}
    profile.validate()
    assert profile.kl_ref[1] == 0.0 and np.all(profile.measured[0.5] == 0.0) and np.all(profile.kl_ref >= 0)
    profile.kl_ref[1] = -2 * KL_ROUNDOFF
    with pytest.raises(ProfileError, match="negative or not finite"):
        profile.validate()

    def record(kl):
        return EvalResult("lems", "svd", 0.8, 0.79, {"w": 30.0}, {"w": 20.0}, kl, 79, 100, 1.0, "cpu", "demo",
                          "abc", {"seq_len": 512}).to_dict()
    check_record(record(-KL_ROUNDOFF / 2), "round-off")
    with pytest.raises(ResultsFileError, match="'kl'"):
        check_record(record(-2 * KL_ROUNDOFF), "negative")
