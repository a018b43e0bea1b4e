import pytest
import torch

from lems_core.model import compressible_layers, tiny_model
from lems_core.statistics import (add_gram_, clip_token_norms, collect_grad_grams, collect_input_stats,
                                  collect_kfac_statistics, crop_tokens, gram_blocks, iter_block_input_stats,
                                  mirror_gram_)


def _inputs_of(model, name, ids):
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    return torch.cat(seen).double()


def test_input_gram_matches_explicit_xtx_and_is_shared(tiny_llama, tiny_ids):
    stats = collect_input_stats(tiny_llama, tiny_ids, batch_size=2)
    layers = compressible_layers(tiny_llama)
    for layer in layers[:7] + layers[-7:]:
        x = _inputs_of(tiny_llama, layer.name, tiny_ids)
        s = stats[layer.name]
        assert torch.allclose(s.gram.double(), x.T @ x, rtol=1e-4, atol=1e-3)
        assert torch.allclose(s.abs_max.double(), x.abs().amax(0), atol=1e-5)
        assert s.tokens == tiny_ids.numel()
    q, k, v, o, gate, up, down = (stats[l.name] for l in layers[:7])
    assert q is k is v and gate is up and o is not q and down is not gate


def test_blockwise_iteration_yields_each_block_once(tiny_llama, tiny_ids):
    blocks = [b for b, _ in iter_block_input_stats(tiny_llama, tiny_ids)]
    assert blocks == [0, 1, 2]


def test_clip_token_norms_bounds_each_token():
    g = torch.ones(1, 300, 3)
    g[0, 0] *= 1000.0  # one huge token
    g[0, 1] *= 1e-4  # one tiny token
    g[0, 2] = 0.0  # a dead token stays dead
    out = clip_token_norms(g)
    norms = out.norm(dim=-1)[0]
    live = g.norm(dim=-1)[0] > 1e-10
    mean = g.norm(dim=-1)[0][live].mean()
    assert norms[0] == pytest.approx(10 * mean.item(), rel=1e-5)  # clipped down
    assert norms[1] == pytest.approx(0.1 * mean.item(), rel=1e-5)  # raised up
    assert norms[2] == 0
    assert torch.allclose(norms[3], g[0, 3].norm())


def test_crop_drops_an_eighth_at_each_end():
    t = torch.arange(16).view(1, 16, 1)
    assert crop_tokens(t).flatten().tolist() == list(range(2, 14))


def test_grad_gram_is_psd_and_matches_manual_backward(tiny_ids):
    model = tiny_model("llama", seed=3)
    layer = compressible_layers(model)[3]
    grams = collect_grad_grams(model, tiny_ids[:1], [layer], crop=0.0, clip=False)
    captured = []
    h = model.get_submodule(layer.name).register_full_backward_hook(lambda _m, _gi, go: captured.append(go[0]))
    emb = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    logits = model(tiny_ids[:1]).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tiny_ids[:1, 1:].flatten(), reduction="sum").backward()
    h.remove()
    emb.remove()
    g = captured[0].reshape(-1, captured[0].shape[-1]).double()
    assert torch.allclose(grams[layer.name].double(), g.T @ g, rtol=1e-4, atol=1e-8)
    # PSD up to the float32 round-off of its token sums, eps32 x size x lambda_max (a fixed -1e-6 is below
    # that round-off at this Gram's lambda_max ~ 300 when it is rank-deficient, as with fewer tokens than rows)
    eigs = torch.linalg.eigvalsh(grams[layer.name].double())
    assert eigs.min() > -torch.finfo(torch.float32).eps * len(eigs) * eigs.max()


def test_one_pass_kfac_statistics_equal_the_two_passes(tiny_llama, tiny_ids):
    """collect_grad_grams(inputs=...) gathers the input statistics during its own forward passes: the same bits as
    collect_input_stats' block-wise pass, and the same G as without them; no weight .grad is left behind."""
    layers = compressible_layers(tiny_llama)
    separate_inputs = collect_input_stats(tiny_llama, tiny_ids)
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    both = collect_kfac_statistics(tiny_llama, tiny_ids, layers)
    grams, inputs = both.grad_gram, both.inputs
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags  # restored
    assert all(p.grad is None for p in tiny_llama.parameters())
    for layer in layers:
        a, b = inputs[layer.name], separate_inputs[layer.name]
        assert a.tokens == b.tokens
        for field in ("gram", "abs_sum", "abs_max", "abs_max_sum"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (layer.name, field)
    alone = collect_grad_grams(tiny_llama, tiny_ids, layers)  # without the input hooks
    assert all(torch.equal(grams[k], alone[k]) for k in grams)


@pytest.mark.parametrize("n", [64, 192, 577, 1536])
def test_a_gram_summed_over_its_upper_blocks_is_the_whole_product(n):
    """add_gram_ + mirror_gram_ over several batches: alpha x^T x summed, exactly symmetric, the same sums as addmm_
    (equal bits with this machine's BLAS at 1 and 2 threads; a tolerance here for other BLAS builds)."""
    blocks = gram_blocks(n)
    assert blocks[0][0] == 0 and blocks[-1][1] == n and len(blocks) == max(1, min(4, n // 192))
    torch.manual_seed(0)
    whole, upper = torch.zeros(n, n), torch.zeros(n, n)
    for scale in (1.0, 3.0, 0.25):
        x = torch.randn(100, n) * scale
        whole.addmm_(x.T, x, alpha=0.5)
        add_gram_(upper, x, alpha=0.5)
    mirror_gram_(upper)
    assert torch.equal(upper, upper.T)
    torch.testing.assert_close(upper, whole, rtol=1e-6, atol=1e-5)
