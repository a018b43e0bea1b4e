import numpy as np
import pytest
import torch

from lems_core.decompositions import METHODS, DecompositionOptions, Decomposer, cholesky_lower
from lems_core.model import compressible_layers, tiny_model
from lems_core.statistics import collect_fisher_rows, collect_grad_grams, collect_input_stats


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(1))
    layers = compressible_layers(model)
    return model, ids, layers, collect_input_stats(model, ids), collect_grad_grams(model, ids), collect_fisher_rows(model, ids)


def _run(setup, method, layer, **opts):
    model, _, _, inputs, grads, fisher = setup
    w = model.get_submodule(layer.name).weight
    return Decomposer(method, DecompositionOptions(**opts))(layer, w, inputs[layer.name], grads[layer.name], fisher[layer.name])


def test_svd_llm_output_error_equals_truncated_energy(setup):
    """||(W - W_r) X||_F^2 = sum of truncated sigma^2 (SVD-LLM theorem, methods.md §3.5)."""
    model, ids, layers, inputs, *_ = setup
    for layer in layers[:7]:
        f = _run(setup, "svd_llm", layer)
        w = model.get_submodule(layer.name).weight.double()
        gram = inputs[layer.name].gram.double()
        for r in (1, f.max_rank // 2, f.max_rank):
            err = w - f.weight(r).double()
            lhs = torch.trace(err @ gram @ err.T).item()
            rhs = float(np.sum(f.sigma[r:] ** 2))
            assert lhs == pytest.approx(rhs, rel=1e-6)


def test_svd_llm_v2_matches_svd_llm_spectrum_on_a_well_conditioned_gram(setup):
    layer = setup[2][4]
    a, b = _run(setup, "svd_llm", layer), _run(setup, "svd_llm_v2", layer)
    assert np.allclose(a.sigma, b.sigma, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_its_whitened_truncation_error(setup, method):
    """Each factorisation is the Eckart-Young truncation of its whitened matrix:
    error of the best rank r in that metric = sum of the tail sigma^2."""
    layer = setup[2][6]  # down_proj 64 x 160
    f = _run(setup, method, layer)
    assert f.sigma.shape == (min(layer.out_features, layer.in_features),)
    assert np.all(np.diff(f.sigma) <= 1e-9)
    assert f.left.shape == (64, layer.eq_rank) and f.right.shape == (layer.eq_rank, 160)
    w = setup[0].get_submodule(layer.name).weight.double()
    # a higher rank never fits worse in plain Frobenius norm for plain SVD; for all: residual shrinks with r
    errs = [torch.linalg.norm(w - f.weight(r).double()).item() for r in (2, 8, layer.eq_rank)]
    if method == "svd":
        assert errs[0] > errs[1] > errs[2]
        assert errs[2] ** 2 == pytest.approx(float(np.sum(f.sigma[layer.eq_rank:] ** 2)), rel=1e-6)


def test_kfac_exact_orientation_gives_the_kfac_loss(setup):
    """With the exact orientation, tr(E^T G E A) over the shrunk factors = tail sigma^2 (methods.md §2.1)."""
    from lems_core.decompositions import shrink

    model, _, layers, inputs, grads, _ = setup
    layer = layers[0]
    ref, exact = _run(setup, "kfac", layer), _run(setup, "kfac", layer, kfac_orientation="exact")
    assert not np.allclose(ref.sigma, exact.sigma)  # the reference orientation is another metric
    a = shrink(inputs[layer.name].gram.double(), 0.1)
    g = shrink(grads[layer.name].double(), 0.3)
    w = model.get_submodule(layer.name).weight.double()
    r = 7
    err = w - exact.weight(r).double()
    assert torch.trace(err.T @ g @ err @ a).item() == pytest.approx(float(np.sum(exact.sigma[r:] ** 2)), rel=1e-6)


def test_cholesky_shift_rescues_a_singular_matrix():
    x = torch.randn(3, 6, dtype=torch.float64)
    gram = x.T @ x  # rank 3 of 6
    lower = cholesky_lower(gram)
    assert torch.allclose(lower @ lower.T, gram, atol=1e-4 * gram.abs().max())


def test_missing_statistics_are_specific_errors(setup):
    layer = setup[2][0]
    w = setup[0].get_submodule(layer.name).weight
    with pytest.raises(ValueError, match="input statistics"):
        Decomposer("svd_llm")(layer, w)
    with pytest.raises(ValueError, match="Unknown decomposition"):
        Decomposer("magic")


@pytest.mark.parametrize("method", ["kfac", "svd_llm"])
def test_layers_factorised_in_parallel_are_the_sequential_bits(setup, method):
    """decomposed_layers on two threads (each on one LAPACK thread) gives exactly the one-thread factors, in order."""
    from helpers import ByteTokenizer
    from lems_core.model import LoadedModel
    from lems_core.pipeline.artefacts import decomposed_layers
    from lems_core.statistics import Statistics

    model, _, layers, inputs, grads, fisher = setup
    loaded = LoadedModel(model, ByteTokenizer(), "tiny-llama", "f")
    stats = Statistics(inputs=inputs, grad_gram=grads, fisher=fisher)
    before = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[threads] = list(decomposed_layers(loaded, layers, stats, Decomposer(method)))
            assert torch.get_num_threads() == threads  # restored after the parallel section
    finally:
        torch.set_num_threads(before)
    assert [l.name for l, _ in runs[2]] == [l.name for l in layers]
    for (_, one), (_, two) in zip(runs[1], runs[2]):
        assert np.array_equal(one.sigma, two.sigma)
        assert torch.equal(one.left, two.left) and torch.equal(one.right, two.right)


def test_a_shared_input_whitener_is_built_once_and_dropped_when_unused():
    """SharedWhiteners: one build per input; the newest input's whitener kept, an older unused one dropped."""
    import weakref

    from lems_core.decompositions.registry import SharedWhiteners

    class Gram:  # stands for an input Gram tensor (weak-referenceable)
        def __init__(self, name):
            self.name = name

    built = []
    shared = SharedWhiteners()
    one, two = Gram(1), Gram(2)

    def build(gram):
        return lambda: built.append(gram.name) or gram.name

    for _ in range(3):  # q, k, v: one build
        with shared.use(one, build(one)) as whitener:
            assert whitener == 1
    with shared.use(one, build(one)), shared.use(two, build(two)):  # a thread still factorises a layer of input 1
        assert len(shared._entries) == 2
    assert [e[0] for e in shared._entries.values()] == [2] and built == [1, 2]
    # a new input whose object reuses a dead one's id is built, not served the old whitener
    shared._entries = {id(one): ["stale", 0, weakref.ref(two)]}
    shared._newest = id(one)
    with shared.use(one, build(one)) as whitener:
        assert whitener == 1


def test_parallel_factorisation_is_bounded_by_threads_and_free_memory(setup, monkeypatch):
    """One thread per torch thread, never more than twice the workspace fits in the free memory, one on a GPU."""
    from lems_core.pipeline import artefacts
    from lems_core.streaming import decomposition_workspace

    layers = setup[2]
    workspace = decomposition_workspace(layers, torch.float64)
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(artefacts, "available_memory", lambda device: 100 * workspace)
        assert artefacts.decomposition_threads(cpu, layers, torch.float64) == 4
        assert artefacts.decomposition_threads(cpu, layers[:3], torch.float64) == 3
        monkeypatch.setattr(artefacts, "available_memory", lambda device: 5 * workspace)
        assert artefacts.decomposition_threads(cpu, layers, torch.float64) == 2
        monkeypatch.setattr(artefacts, "available_memory", lambda device: workspace)
        assert artefacts.decomposition_threads(cpu, layers, torch.float64) == 1
        assert artefacts.decomposition_threads(torch.device("cuda"), layers, torch.float64) == 1
    finally:
        torch.set_num_threads(before)
