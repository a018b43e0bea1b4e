"""`compress --format hf`: a folder that transformers loads with remote code, and load_compressed without it."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lems_core.cli import main
from lems_core.compression import count_parameters
from lems_core.hf_export import CARD_FILE, MODELING_FILE, PLAN_FILE, RANKS_CONFIG_KEY, remote_class_name

from helpers import word_loaded

LOAD_BOTH = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ids_file, out_file = sys.argv[1:]
    ids = torch.load(ids_file)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = hf(ids).logits
        step = hf(ids, use_cache=True)
        cached = hf.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = hf.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    from lems_core.compression import load_compressed
    native, _, ranks, meta = load_compressed(folder)
    with torch.no_grad():
        native_logits = native(ids).logits
    low_rank = sorted(n for n, m in hf.named_modules() if type(m).__name__ == "LowRankLinear")
    torch.save({"logits": logits, "native_logits": native_logits, "cached": cached, "uncached": uncached,
                "has_cache": step.past_key_values is not None, "class": type(hf).__name__,
                "params": sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values()),
                "low_rank": low_rank, "tokens": tok("w5 w6 w7").input_ids}, out_file)
""")


@pytest.fixture()
def hf_plan(tmp_path, monkeypatch):
    """A tied-embedding tiny llama with a word tokenizer behind pipeline.get_model, and a uniform keep-0.4 svd plan."""
    import lems_core.pipeline as pipeline
    from lems_core.model import compressible_layers
    from lems_core.plan import from_loadconfig

    loaded = word_loaded(5, tie_word_embeddings=True)
    monkeypatch.setattr(pipeline, "get_model", lambda source, device=None, offload=None: loaded)
    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    layers = compressible_layers(loaded.model)
    ratios = {l.name: (1.0 if l.kind == "v" else 0.4) for l in layers}  # v stays dense: a mixed structure
    plan = from_loadconfig(ratios, layers, "tiny-llama", loaded.fingerprint, method="uniform", decomposition="svd")
    return loaded, plan, plan.save(tmp_path / "plan.json")


def test_hf_export_loads_in_transformers_and_in_lems_with_the_same_logits(hf_plan, tmp_path):
    import lems_core.pipeline as pipeline
    from lems_core.calibration import CalibrationConfig

    loaded, plan, plan_path = hf_plan
    out = tmp_path / "hf"
    assert main(["compress", "--plan", str(plan_path), "--format", "hf", "-o", str(out), "--device", "cpu"]) == 0
    ids = torch.randint(2, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    dense_params = count_parameters(loaded.model)
    factors = pipeline.plan_factorizations(loaded, CalibrationConfig(), "svd", plan.ranks())
    with pipeline.compressed(loaded, plan.ranks(), factors) as applied, torch.no_grad():
        expected, params = loaded.model(ids).logits, count_parameters(loaded.model)
    torch.save(ids, tmp_path / "ids.pt")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": str(Path(pipeline.__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", LOAD_BOTH, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "o.pt")

    assert got["class"] == "LowRankLlamaForCausalLM"
    factorised = sorted(n for n, r in applied.items() if r is not None)
    assert got["low_rank"] == factorised and len(factorised) == 2 * 3 * 3  # q,k,o,gate,up,down x 3 blocks
    assert got["params"] == params < dense_params  # the low-rank layers stay low-rank in memory
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["native_logits"], expected, rtol=1e-5, atol=1e-5)
    assert got["has_cache"] and got["cached"].shape == (2, 34)
    assert torch.equal(got["cached"], got["uncached"])  # the KV cache changes nothing greedy decoding picks
    assert got["tokens"] == [5, 6, 7]  # the tokenizer travelled with the model


def test_hf_export_folder_has_card_plan_tokenizer_and_remote_code(hf_plan, tmp_path, capsys):
    loaded, plan, plan_path = hf_plan
    out = tmp_path / "hf"
    assert main(["compress", "--plan", str(plan_path), "--format", "hf", "-o", str(out), "--device", "cpu"]) == 0
    assert "trust_remote_code" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_lowrank.LowRankLlamaForCausalLM",
                                  "AutoModel": "modeling_lowrank.LowRankLlamaModel"}
    assert config[RANKS_CONFIG_KEY] == {n: r for n, r in plan.ranks().items() if r is not None}
    assert config["use_cache"] is True and config["base_model_tp_plan"]["layers.*.mlp.down_proj.a"] == "rowwise"
    assert "import lems_core" not in (out / MODELING_FILE).read_text()
    assert json.loads((out / PLAN_FILE).read_text())["layers"] == json.loads(plan_path.read_text())["layers"]
    assert (out / "tokenizer.json").exists()
    card = (out / CARD_FILE).read_text()
    for text in ("tiny-llama", "`uniform` at budget", "`svd`", "trust_remote_code", "load_compressed",
                 "No evaluation of this plan", "`AutoModel` builds the low-rank base model", "vllm serve"):
        assert text in card, text


def test_hf_export_card_lists_the_results_stored_for_the_plan(hf_plan, tmp_path):
    from lems_core.hf_export import card_for
    from lems_core.results import ResultStore

    loaded, plan, _ = hf_plan
    base = {"fingerprint": plan.fingerprint, "method": "uniform", "decomposition": "svd", "budget": plan.budget,
            "realised_ratio": plan.summary["realised_ratio"], "ppl": {"wikitext2": 12.5}, "dense_ppl": {"wikitext2": 9.0},
            "kl": 0.25, "device": "cpu", "created": "2026-01-01T00:00:00+00:00"}
    store = ResultStore(tmp_path / "results")
    store.add(base)
    store.add({**base, "decomposition": "kfac", "ppl": {"wikitext2": 99.0}})  # another decomposition: not this folder
    card = card_for(loaded.model, plan, "svd", plan.ranks(), 1000, store.all()).to_markdown()
    assert "wikitext2 perplexity 12.500 (dense 9.000)" in card and "KL to dense 0.2500" in card
    assert "99.000" not in card


GOOD_ZERO_SHOT = {"tasks": {"piqa": {"acc": 0.7, "acc_norm": 0.6}, "boolq": {"acc": None, "acc_norm": None}},
                  "mean": {"acc": 0.7, "acc_norm": 0.6}}
MALFORMED_ZERO_SHOT = [{"tasks": "piqa", "mean": {"acc": 0.5}}, {"mean": [0.5]}, "oops", 3,
                       {"tasks": {"piqa": {"acc": "high"}}, "mean": {"acc": 0.5}},
                       {"tasks": {"piqa": [0.5]}, "mean": {"acc": 0.5}}, {"mean": {"acc": {"x": 1}}}]


def _card_record(plan, **fields) -> dict:
    return {"fingerprint": plan.fingerprint, "method": "uniform", "decomposition": "svd", "budget": plan.budget,
            "realised_ratio": plan.summary["realised_ratio"], "ppl": {"wikitext2": 12.5},
            "dense_ppl": {"wikitext2": 9.0}, "kl": 0.25, "device": "cpu", "created": "2026-01-01"} | fields


@pytest.mark.parametrize("bad", MALFORMED_ZERO_SHOT)
def test_a_malformed_zero_shot_field_is_left_out_of_the_card_with_a_note(bad, hf_plan):
    from lems_core.hf_export import card_for

    loaded, plan, _ = hf_plan
    records = [_card_record(plan, zero_shot=GOOD_ZERO_SHOT, created="good"),
               _card_record(plan, zero_shot=bad, created="bad", ppl={"wikitext2": 13.5})]
    card = card_for(loaded.model, plan, "svd", plan.ranks(), 1000, records).to_markdown()
    assert "zero-shot mean acc 0.7000 (piqa 0.7000, boolq n/a)" in card
    assert "wikitext2 perplexity 13.500" in card  # the bad record's other numbers stay
    assert card.count("zero-shot mean acc") == 1 and "- left out: stored result 2 (bad): zero-shot" in card


@pytest.mark.parametrize("change", [{"ppl": "12.5"}, {"ppl": {"wikitext2": "x"}}, {"dense_ppl": [9.0]},
                                    {"dense_ppl": None}, {"kl": "low"}, {"budget": "0.4"}, {"budget": None}])
def test_a_record_with_malformed_numbers_is_left_out_of_the_card(change, hf_plan):
    from lems_core.hf_export import card_for

    loaded, plan, _ = hf_plan
    records = [_card_record(plan), _card_record(plan, created="bad", **change), "not a record", None]
    card = card_for(loaded.model, plan, "svd", plan.ranks(), 1000, records).to_markdown()
    assert card.count("wikitext2 perplexity 12.500 (dense 9.000)") == 1
    if "budget" not in change:  # an unreadable budget never matches the plan: not this plan's result
        assert "- left out: stored result 2 (bad)" in card


def test_hf_export_rejects_an_architecture_it_has_no_class_for():
    from torch import nn

    with pytest.raises(ValueError, match="supports LlamaForCausalLM"):
        remote_class_name(nn.Linear(2, 2))


LOAD_STRUCTURE = textwrap.dedent("""
    import json, sys
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    ranks = {n: m.rank for n, m in hf.named_modules() if type(m).__name__ == "LowRankLinear"}
    print(json.dumps({"class": type(hf).__name__, "ranks": ranks}))
""")


def _remote_structure(folder, tmp_path) -> dict:
    """The class and low-rank ranks of ``folder`` loaded by transformers with its remote code, in a fresh process."""
    import lems_core

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": str(Path(lems_core.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", LOAD_STRUCTURE, str(folder)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _second_plan(loaded, tmp_path):
    """A plan other than hf_plan's: every Linear at keep 0.25 (v included), saved as plan2.json."""
    from lems_core.model import compressible_layers
    from lems_core.plan import from_loadconfig

    layers = compressible_layers(loaded.model)
    plan = from_loadconfig({l.name: 0.25 for l in layers}, layers, "tiny-llama", loaded.fingerprint,
                           method="uniform", decomposition="svd")
    return plan, plan.save(tmp_path / "plan2.json")


def test_force_replaces_an_hf_export_with_one_describing_only_the_second_plan(hf_plan, tmp_path):
    loaded, first, first_path = hf_plan
    second, second_path = _second_plan(loaded, tmp_path)
    out = tmp_path / "hf"
    compress = ["compress", "--format", "hf", "-o", str(out), "--device", "cpu"]
    assert main([*compress, "--plan", str(first_path)]) == 0
    assert main([*compress, "--plan", str(second_path), "--force"]) == 0
    expected = {n: r for n, r in second.ranks().items() if r is not None}
    assert expected != {n: r for n, r in first.ranks().items() if r is not None}
    config = json.loads((out / "config.json").read_text())
    assert config[RANKS_CONFIG_KEY] == expected
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lowrank.LowRankLlamaForCausalLM"
    assert json.loads((out / PLAN_FILE).read_text())["layers"] == json.loads(second_path.read_text())["layers"]
    assert f"budget {second.budget:g}" in (out / CARD_FILE).read_text()
    got = _remote_structure(out, tmp_path)
    assert got["class"] == "LowRankLlamaForCausalLM" and got["ranks"] == expected


def test_force_with_the_native_format_leaves_nothing_of_an_earlier_hf_export(hf_plan, tmp_path):
    loaded, _, plan_path = hf_plan
    out = tmp_path / "hf"
    assert main(["compress", "--plan", str(plan_path), "--format", "hf", "-o", str(out), "--device", "cpu"]) == 0
    assert main(["compress", "--plan", str(plan_path), "-o", str(out), "--device", "cpu", "--force"]) == 0
    assert not {MODELING_FILE, PLAN_FILE, CARD_FILE} & {p.name for p in out.iterdir()}
    assert "auto_map" not in json.loads((out / "config.json").read_text())


def test_a_crash_mid_export_leaves_the_earlier_export_intact(hf_plan, tmp_path, monkeypatch, capsys):
    import lems_core.compression as compression
    from lems_core.compression import load_compressed

    loaded, first, first_path = hf_plan
    _, second_path = _second_plan(loaded, tmp_path)
    out = tmp_path / "hf"
    assert main(["compress", "--plan", str(first_path), "--format", "hf", "-o", str(out), "--device", "cpu"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(model, path):
        path.write_bytes(b"half a tensor")
        raise OSError("No space left on device")

    monkeypatch.setattr(compression, "write_weights", crash)
    code = main(["compress", "--plan", str(second_path), "--format", "hf", "-o", str(out), "--device", "cpu", "--force"])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")) == []
    monkeypatch.undo()
    assert load_compressed(out)[2] == first.ranks()


ABSURD = [(1e12, "rank must be an integer, got 1000000000000.0"), (2.5, "rank must be an integer, got 2.5"),
          (True, "rank must be an integer, got True"), (-3, "rank -3 out of range [1, 64]"),
          (2**23, f"rank {2**23} out of range [1, 64] for a 64x64 matrix")]


@pytest.mark.parametrize("rank, message", ABSURD, ids=[str(r) for r, _ in ABSURD])
def test_remote_code_refuses_absurd_ranks_before_building_a_low_rank_layer(rank, message, monkeypatch):
    import re

    from lems_core.remote import modeling_lowrank
    from lems_core.model import tiny_model

    config = tiny_model("llama").config
    name = "model.layers.0.self_attn.q_proj"
    setattr(config, RANKS_CONFIG_KEY, {name: rank})
    built = []
    monkeypatch.setattr(modeling_lowrank, "LowRankLinear", lambda *a, **k: built.append(a))
    with torch.device("meta"), pytest.raises(ValueError, match=re.escape(f"{name}: {message}")):
        modeling_lowrank.LowRankLlamaForCausalLM(config)
    assert built == []


@pytest.mark.parametrize("listed, message", [
    ({"lm_head": 4}, "'lm_head' is not a projection Linear"),
    ({"model.layers.9.mlp.up_proj": 4}, "'model.layers.9.mlp.up_proj' is not a projection Linear"),
    ([4], "must be an object {module name: rank}, got list"),
])
def test_remote_code_refuses_unknown_layer_names(listed, message):
    import re

    from lems_core.remote import modeling_lowrank
    from lems_core.model import tiny_model

    config = tiny_model("llama").config
    setattr(config, RANKS_CONFIG_KEY, listed)
    with torch.device("meta"), pytest.raises(ValueError, match=re.escape(message)):
        modeling_lowrank.LowRankLlamaForCausalLM(config)


SERVE_CHECK = textwrap.dedent("""
    import re, sys
    import torch
    from transformers import AttentionInterface, AutoModel, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    calls = []

    def counting(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("lems_counting", counting)
    AttentionMaskInterface.register("lems_counting", sdpa_mask)
    folder, ids_file, out_file = sys.argv[1:]
    ids = torch.load(ids_file)
    load = dict(trust_remote_code=True, attn_implementation="lems_counting")
    base = AutoModel.from_pretrained(folder, **load).eval()
    lm = AutoModelForCausalLM.from_pretrained(folder, **load).eval()
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        base_calls = list(calls)
        logits = lm(ids).logits
    plan = base.config.base_model_tp_plan
    modules = dict(base.named_modules())
    resolved = {key: sorted(type(modules[n]).__name__ for n in modules
                            if re.fullmatch(re.escape(key).replace(re.escape("*"), r"\\d+"), n)) for key in plan}
    first_rule = {n: next((style for key, style in plan.items() if re.match(key, n)), "replicate")
                  for n, m in modules.items() if isinstance(m, torch.nn.Linear) and ".layers." in "." + n}
    expanded = base._expand_parallel_plan(plan) if hasattr(base, "_expand_parallel_plan") else None
    hooked = None if expanded is None else {n: type(modules[n]).__name__ for n in expanded if n in modules}
    torch.save({"class": type(base).__name__, "lm_class": type(lm).__name__, "hidden": hidden, "logits": logits,
                "base_calls": base_calls, "calls": calls, "backend": type(base)._supports_attention_backend,
                "low_rank": sorted(n for n, m in modules.items() if type(m).__name__ == "LowRankLinear"),
                "plan": plan, "resolved": resolved, "first_rule": first_rule, "hooked": hooked}, out_file)
""")


def test_serving_export_builds_the_low_rank_base_model_with_attention_through_the_interface(hf_plan, tmp_path):
    """What vLLM's / SGLang's Transformers backends load: AutoModel, ALL_ATTENTION_FUNCTIONS, base_model_tp_plan."""
    from safetensors import safe_open

    import lems_core.pipeline as pipeline
    from lems_core.calibration import CalibrationConfig

    loaded, plan, plan_path = hf_plan
    out = tmp_path / "hf"
    assert main(["compress", "--plan", str(plan_path), "--format", "hf", "-o", str(out), "--device", "cpu"]) == 0
    ids = torch.randint(2, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    factors = pipeline.plan_factorizations(loaded, CalibrationConfig(), "svd", plan.ranks())
    with pipeline.compressed(loaded, plan.ranks(), factors) as applied, torch.no_grad():
        expected_hidden, expected_logits = loaded.model.model(ids).last_hidden_state, loaded.model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)  # transformers alone: the folder's remote code, no lems_core
    done = subprocess.run([sys.executable, "-c", SERVE_CHECK, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "o.pt")

    assert (got["class"], got["lm_class"]) == ("LowRankLlamaModel", "LowRankLlamaForCausalLM") and got["backend"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as stored:  # the tied tensor under the base's name
        assert "model.embed_tokens.weight" in stored.keys() and "lm_head.weight" not in stored.keys()
    assert got["low_rank"] == sorted(n.removeprefix("model.") for n, r in applied.items() if r is not None)
    blocks = loaded.model.config.num_hidden_layers
    assert got["base_calls"] == ["LlamaAttention"] * blocks and len(got["calls"]) == 2 * blocks
    torch.testing.assert_close(got["hidden"], expected_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logits"], expected_logits, rtol=1e-5, atol=1e-5)

    plan_rules = got["plan"]
    assert all(got["resolved"][key] and set(got["resolved"][key]) == {"Linear"} for key in plan_rules), got["resolved"]
    assert "layers.*.self_attn.q_proj" not in plan_rules and plan_rules["layers.*.self_attn.v_proj"] == "colwise"
    want = {"q_proj.a": "replicate", "q_proj.b": "colwise", "k_proj.b": "colwise", "v_proj": "colwise",
            "o_proj.a": "rowwise", "o_proj.b": "replicate", "gate_proj.a": "replicate", "up_proj.b": "colwise",
            "down_proj.a": "rowwise", "down_proj.b": "replicate"}
    for suffix, style in want.items():
        named = {n: s for n, s in got["first_rule"].items() if n.endswith(suffix)}
        assert len(named) == blocks and set(named.values()) == {style}, (suffix, named)
    if got["hooked"] is not None:  # transformers' own expansion hooks only Linears (never a LowRankLinear)
        assert got["hooked"] and set(got["hooked"].values()) == {"Linear"}


def test_tp_plan_of_a_mixed_structure_gives_each_linear_its_own_style():
    """A kind dense in one block and factorised in another: the factor rules win where a factor is named first."""
    import re

    from lems_core.compression import compress_model
    from lems_core.hf_export import low_rank_tp_plan
    from lems_core.model import tiny_model

    model = tiny_model("llama", seed=0)
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 8}
    compress_model(model, ranks, lambda layer: _TruncatedSvd(model.get_submodule(layer.name).weight))
    plan = low_rank_tp_plan(model)
    assert re.match("layers.*.self_attn.q_proj", "layers.0.self_attn.q_proj.a")  # why the factor rules come first
    first_rule = {n: next((style for key, style in plan.items() if re.match(key, n)), None)  # vLLM's matching
                  for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    assert first_rule["layers.0.self_attn.q_proj.a"] == "replicate" and first_rule["layers.0.self_attn.q_proj.b"] == "colwise"
    assert first_rule["layers.1.self_attn.q_proj"] == "colwise" and first_rule["layers.0.mlp.down_proj"] == "rowwise"
    assert first_rule["layers.1.mlp.down_proj.a"] == "rowwise" and first_rule["layers.1.mlp.down_proj.b"] == "replicate"
    assert None not in first_rule.values()


class _TruncatedSvd:
    def __init__(self, weight):
        self.u, self.s, self.vh = torch.linalg.svd(weight.detach(), full_matrices=False)

    def factors(self, rank):
        return self.u[:, :rank] * self.s[:rank], self.vh[:rank]
