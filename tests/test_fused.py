"""prepare_for_inference: grouped shared-input GEMMs, column-major second factors, direct factor calls.

The prepared model must compute what the unprepared one computes (up to float round-off)
on every supported layout, with groups whose members are partly kept dense, through the
KV cache, after its weights are edited or replaced, under autograd, through the saved
format and through the Hugging Face export's remote code.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lems_core.compression import LowRankLinear, compress_model, load_compressed, save_compressed
from lems_core.decompositions import Decomposer
from lems_core.fused import (GROUP_MIN_ROWS, SharedInputLinear, fuse_shared_inputs, prepare_for_inference,
                              prepare_modules)
from lems_core.model import tiny_model

from helpers import uniform_ranks, word_loaded

ARCHS = ("llama", "qwen2", "mistral", "qwen3")
# Kept dense in one block each, so each kind of group has a dense member somewhere.
DENSE_MEMBERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj")


def compressed_tiny(arch: str, seed: int = 3):
    """A tiny model at uniform keep 0.5 (SVD factors), with DENSE_MEMBERS kept dense; ``.applied`` its ranks."""
    model = tiny_model(arch, seed=seed)
    ranks = {**uniform_ranks(model, 0.5), **dict.fromkeys(DENSE_MEMBERS)}
    svd = Decomposer("svd")
    model.applied = compress_model(model, ranks, lambda layer: svd(layer, model.get_submodule(layer.name).weight))
    return model


def tolerance(model, reference: torch.Tensor) -> float:
    """Round-off of reordered float32 sums: eps x hidden size x the logits' scale, per layer."""
    config = model.config
    eps = torch.finfo(torch.float32).eps
    return eps * config.hidden_size * config.num_hidden_layers * reference.abs().max().item()


def ids(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, rows), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prepared_model_gives_the_unprepared_logits(arch):
    model = compressed_tiny(arch)
    prepared = copy.deepcopy(model)
    counts = prepare_for_inference(prepared)
    blocks = model.config.num_hidden_layers
    assert counts["groups"] == 2 * blocks  # every group, those with a dense member included
    assert counts["direct"] == counts["column_major"] == sum(isinstance(m, LowRankLinear) for m in model.modules())
    for rows in (GROUP_MIN_ROWS + 8, 5):  # grouped product, and each member on its own
        reference = logits(model, ids(rows))
        torch.testing.assert_close(logits(prepared, ids(rows)), reference, rtol=0,
                                   atol=tolerance(model, reference))


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_modules_prepares_only_the_chosen_modules(arch):
    """What a latency timing needs: the low-rank modules run the export's path, and every other module
    (a group's dense member above all, which the timing's dense turn shares) keeps its class and storage."""
    model = compressed_tiny(arch)
    reference = {rows: logits(model, ids(rows)) for rows in (GROUP_MIN_ROWS + 8, 5)}
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    others = {name: (type(m), m.weight.data_ptr()) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not any(m is x.a or m is x.b for x in low_rank)}
    counts = prepare_modules(model, low_rank)
    blocks = model.config.num_hidden_layers
    assert counts["groups"] == 2 * blocks - len(DENSE_MEMBERS)  # each dense member is in a group of its own
    assert counts["direct"] == len(low_rank) and counts["column_major"] == sum(
        m.out_features > m.rank for m in low_rank)
    assert {name: (type(m), m.weight.data_ptr()) for name, m in model.named_modules() if name in others} == others
    grouped = model.model.layers[2].self_attn.q_proj.a  # a group whose members are all low-rank
    assert isinstance(grouped, SharedInputLinear)
    assert not isinstance(model.model.layers[1].self_attn.q_proj.a, SharedInputLinear)
    assert all(m.b.weight.stride(0) == 1 for m in low_rank if m.out_features > m.rank)
    for rows, expected in reference.items():
        torch.testing.assert_close(logits(model, ids(rows)), expected, rtol=0, atol=tolerance(model, expected))


@pytest.mark.parametrize("arch", ARCHS)
def test_prepared_model_keeps_module_names_classes_and_state_dict(arch):
    model = compressed_tiny(arch)
    prepared = copy.deepcopy(model)
    prepare_for_inference(prepared)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in prepared.named_modules()]
    for (name, before), after in zip(model.named_modules(), prepared.modules()):
        assert isinstance(after, type(before)), name
    state, prepared_state = model.state_dict(), prepared.state_dict()
    assert list(state) == list(prepared_state)
    assert all(torch.equal(state[k], prepared_state[k]) for k in state)


def test_a_group_with_dense_members_stacks_their_whole_weights():
    model = compressed_tiny("qwen2")  # q/k/v carry biases
    prepared = copy.deepcopy(model)
    prepare_for_inference(prepared)
    attention = prepared.model.layers[0].self_attn
    assert type(attention.q_proj) is SharedInputLinear and attention.q_proj.bias is not None
    assert type(attention.k_proj.a) is SharedInputLinear
    logits(prepared, ids(GROUP_MIN_ROWS))
    group = attention.q_proj.group
    assert group.members == [attention.q_proj, attention.k_proj.a, attention.v_proj.a]
    start = group.weight.data_ptr()
    itemsize = group.weight.element_size()
    assert [(m.weight.data_ptr() - start) // itemsize // group.weight.shape[1] for m in group.members] == group.offsets


def test_all_dense_groups_are_left_alone():
    model = tiny_model("llama", seed=1)
    assert fuse_shared_inputs(model) == 0
    assert not any(isinstance(m, SharedInputLinear) for m in model.modules())


def test_one_gemm_serves_a_group(monkeypatch):
    prepared = compressed_tiny("llama")
    prepare_for_inference(prepared)
    groups = {id(m.group): m.group for m in prepared.modules() if isinstance(m, SharedInputLinear)}
    calls = []
    for group in groups.values():
        monkeypatch.setattr(group, "part", lambda x, i, g=group, f=group.part: (calls.append((id(g), i)), f(x, i))[1])
    stacked = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: (
        stacked.append(w.data_ptr()) if any(w is g.weight for g in groups.values()) else None, real_linear(x, w, b))[1])
    logits(prepared, ids(GROUP_MIN_ROWS))
    assert len(calls) == sum(len(g.members) for g in groups.values())
    assert len(stacked) == len(groups)


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_generation_with_the_kv_cache_gives_the_same_tokens(arch):
    model = compressed_tiny(arch)
    prepared = copy.deepcopy(model)
    prepare_for_inference(prepared)
    prompt = ids(GROUP_MIN_ROWS + 4)[:1]  # a grouped prefill, then one-token steps
    run = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(prepared.generate(prompt, **run), model.generate(prompt, **run))


def test_edited_and_replaced_weights_are_seen():
    model = compressed_tiny("llama")
    prepared = copy.deepcopy(model)
    prepare_for_inference(prepared)
    logits(prepared, ids(GROUP_MIN_ROWS))  # the stacks exist now
    with torch.no_grad():
        for m in (model, prepared):
            m.model.layers[2].self_attn.k_proj.a.weight.mul_(3.0)  # in place: a view into the stack
            m.model.layers[2].mlp.gate_proj.a.weight = torch.nn.Parameter(torch.ones_like(
                m.model.layers[2].mlp.gate_proj.a.weight))  # replaced: the stack is rebuilt
    reference = logits(model, ids(GROUP_MIN_ROWS))
    torch.testing.assert_close(logits(prepared, ids(GROUP_MIN_ROWS)), reference, rtol=0,
                               atol=tolerance(model, reference))
    model.double(), prepared.double()  # every weight replaced by a converted copy
    reference = logits(model, ids(GROUP_MIN_ROWS))
    assert logits(prepared, ids(GROUP_MIN_ROWS)).dtype == torch.float64
    torch.testing.assert_close(logits(prepared, ids(GROUP_MIN_ROWS)), reference, rtol=0,
                               atol=tolerance(model, reference))


def test_gradients_reach_every_factor():
    model = compressed_tiny("llama")
    prepared = copy.deepcopy(model)
    prepare_for_inference(prepared)
    grads = []
    for m in (model, prepared):
        m.zero_grad()
        m(ids(GROUP_MIN_ROWS), use_cache=False).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_a_prepared_model_saves_in_the_same_format(tmp_path):
    model = compressed_tiny("mistral")
    prepared = copy.deepcopy(model)
    prepare_for_inference(prepared)
    logits(prepared, ids(GROUP_MIN_ROWS))
    save_compressed(prepared, None, model.applied, tmp_path / "out")
    reloaded, _, saved_ranks, _ = load_compressed(tmp_path / "out")
    assert saved_ranks == model.applied
    reference = logits(model, ids(9))
    torch.testing.assert_close(logits(reloaded, ids(9)), reference, rtol=0, atol=tolerance(model, reference))


# What makes a model prepared, per module name: its class, each low-rank module's direct forward
# and column-major second factor, each grouped Linear's fellow members (after a grouped forward,
# when the stacks exist), and whether every weight lives in memory PyTorch allocated. Run on the
# in-memory prepared model and, in a process without lems_core, on the loaded export.
FUSED_STRUCTURE = textwrap.dedent("""
    def fused_structure(model):
        names = {id(m): n for n, m in model.named_modules()}
        modules = {}
        for name, m in model.named_modules():
            entry = [type(m).__name__]
            if type(m).__name__ == "LowRankLinear":
                entry += ["direct" if "forward" in m.__dict__ else "module",
                          "column-major b" if m.b.weight.stride(0) == 1 else "row-major b"]
            group = getattr(m, "group", None)
            if group is not None:
                entry += [names[id(g)] for g in group.members] + [m.weight.data_ptr() - group.weight.data_ptr()]
            modules[name] = entry
        owned = all(p.untyped_storage().resizable() for p in model.parameters())
        return {"modules": modules, "owned": owned}
""")
LOAD_EXPORT = FUSED_STRUCTURE + textwrap.dedent("""
    import sys
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_file, out_file = sys.argv[1:]
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = hf(torch.load(ids_file), use_cache=False).logits
    torch.save({"logits": logits, "structure": fused_structure(hf)}, out_file)
""")


def fused_structure(model) -> dict:
    """FUSED_STRUCTURE's description of ``model``, computed here."""
    namespace = {}
    exec(FUSED_STRUCTURE, namespace)
    return namespace["fused_structure"](model)


def test_the_hf_export_loads_prepared_with_the_same_logits(tmp_path):
    from lems_core.hf_export import ModelCard, export_hf

    loaded = word_loaded(4, "llama")
    model = loaded.model
    ranks = {**uniform_ranks(model, 0.5), DENSE_MEMBERS[0]: None}
    svd = Decomposer("svd")
    applied = compress_model(model, ranks, lambda layer: svd(layer, model.get_submodule(layer.name).weight))
    card = ModelCard(base_model="tiny", fingerprint="-", method="uniform", decomposition="svd", budget=0.5,
                     realised_ratio=0.5, params=0, dense_params=0, factorised_layers=0, compressible_layers=0)
    export_hf(model, loaded.tokenizer, applied, tmp_path / "hf", {"ranks": applied}, card)
    tokens = ids(GROUP_MIN_ROWS + 3)
    torch.save(tokens, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)  # transformers alone: the folder's remote code, no lems_core
    done = subprocess.run([sys.executable, "-c", LOAD_EXPORT, str(tmp_path / "hf"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    prepared = copy.deepcopy(model)
    prepare_for_inference(prepared)
    logits(prepared, tokens)  # a grouped forward: the stacks exist, as in the export after its forward
    expected = fused_structure(prepared)
    assert got["structure"]["modules"].pop("") == ["LowRankLlamaForCausalLM"]  # the remote class, else the same
    expected["modules"].pop("")
    assert got["structure"] == expected
    assert got["structure"]["owned"]  # its weights left the memory-mapped safetensors file
    kinds = {entry[0] for entry in got["structure"]["modules"].values()}
    assert {"LowRankLinear", "SharedInputLinear"} <= kinds
    reference = logits(model, tokens)
    torch.testing.assert_close(got["logits"], reference, rtol=0, atol=tolerance(model, reference))


def test_hooks_on_a_factor_still_fire():
    model = compressed_tiny("llama")
    prepared = copy.deepcopy(model)
    prepare_for_inference(prepared)
    seen = []
    prepared.model.layers[2].self_attn.o_proj.b.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    reference = logits(model, ids(7))
    torch.testing.assert_close(logits(prepared, ids(7)), reference, rtol=0, atol=tolerance(model, reference))
    assert seen == [torch.Size([2, 7, model.config.hidden_size])]


def memory_mapped_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values in memory PyTorch did not allocate, 8 bytes off alignment (as safetensors hands out)."""
    raw = bytearray(tensor.numel() * tensor.element_size() + 8)
    mapped = torch.frombuffer(raw, dtype=tensor.dtype, offset=8).view(tensor.shape)
    mapped.copy_(tensor)
    return mapped


def test_weights_outside_the_allocator_are_copied_once_and_stay_tied():
    model = word_loaded(6, "llama", tie_word_embeddings=True).model
    ranks = uniform_ranks(model, 0.5)
    svd = Decomposer("svd")
    compress_model(model, ranks, lambda layer: svd(layer, model.get_submodule(layer.name).weight))
    reference = logits(model, ids(9))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = memory_mapped_copy(parameter.data)
    assert not any(p.untyped_storage().resizable() for p in model.parameters())
    counts = prepare_for_inference(model)
    # every weight but the second factors, which the column-major layout had copied already
    assert counts["owned"] == len(list(model.parameters())) - counts["column_major"] > 0
    assert all(p.untyped_storage().resizable() and p.data_ptr() % 64 == 0 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model, ids(9)), reference)  # a copy: the same values, so the same logits
    assert prepare_for_inference(model)["owned"] == 0
