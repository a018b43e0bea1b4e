import json

import numpy as np
import pytest
import torch

from lems_core.cache import load_tensors, save_tensors
from lems_core.calibration import CalibrationConfig
from lems_core.evaluation import EvalProtocol
from lems_core.numerics import KL_ROUNDOFF
from lems_core.pipeline import ProfileSettings, build_profile, factorizations_for
from lems_core.profile import Profile, ProfileError
from lems_core.run import Run

from helpers import tiny_loaded, word_corpus


@pytest.fixture()
def loaded():
    return tiny_loaded(8)


@pytest.fixture()
def corpus(tmp_path):
    return word_corpus(tmp_path / "corpus.txt")


def _cfg(corpus):
    return CalibrationConfig(dataset=str(corpus), split="train", n_samples=3, seq_len=48, seed=1, n_search=2)


def test_profile_is_built_cached_and_reloaded(loaded, corpus, tmp_path):
    cache = tmp_path / "cache"
    stages = []
    folder = build_profile(loaded, "kfac", _cfg(corpus), ProfileSettings(extra_ratios=(0.5,)),
                           run=Run(cache_dir=cache, progress=lambda f, m: stages.append(f)))
    profile = Profile.load(folder)
    assert len(profile.layers) == 21 and profile.decomposition == "kfac"
    assert profile.kl_ref.shape == (21,) and np.all(profile.kl_ref > 0)
    assert set(profile.measured) == {0.5} and set(profile.measured_nll) == {0.5}
    assert np.all(profile.measured_nll[0.5] > 0)  # single-layer search NLL, kept for ASVD's reference search
    # less compression hurts less, for most layers
    assert np.mean(profile.measured[0.5] < profile.kl_ref) > 0.8
    assert stages[-1] == 1.0 and all(a <= b + 1e-9 for a, b in zip(stages, stages[1:]))
    factors = factorizations_for(loaded, _cfg(corpus), "kfac", run=Run(cache_dir=cache))
    name = profile.layers[3].name
    assert np.allclose(profile.spectra[name], factors[name].sigma)
    before = (folder / "profile.json").stat().st_mtime_ns
    assert build_profile(loaded, "kfac", _cfg(corpus), ProfileSettings(extra_ratios=(0.5,)),
                         run=Run(cache_dir=cache)) == folder
    assert (folder / "profile.json").stat().st_mtime_ns == before  # reused, not recomputed


def test_corrupt_profile_is_detected_and_rebuilt(loaded, corpus, tmp_path):
    cache = tmp_path / "cache"
    folder = build_profile(loaded, "svd_llm", _cfg(corpus), ProfileSettings(measure_scale=False),
                           run=Run(cache_dir=cache))
    spectra = folder / "spectra.safetensors"
    spectra.write_bytes(spectra.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(ProfileError, match="checksum"):
        Profile.load(folder)
    assert build_profile(loaded, "svd_llm", _cfg(corpus), ProfileSettings(measure_scale=False),
                         run=Run(cache_dir=cache)) == folder
    assert Profile.load(folder).kl_ref is None


def test_profile_schema_and_json_errors(tmp_path):
    from lems_core.profile import synthetic_profile

    folder = synthetic_profile().save(tmp_path / "p")
    doc = json.loads((folder / "profile.json").read_text())
    doc["schema"] = "lems-profile/0"
    (folder / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="schema"):
        Profile.load(folder)
    (folder / "profile.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(folder)


def test_corrupt_tensor_cache_entry_reads_as_missing(tmp_path):
    path = tmp_path / "t" / "x.safetensors"
    save_tensors(path, {"a": torch.ones(3)})
    assert torch.equal(load_tensors(path)["a"], torch.ones(3))
    path.write_bytes(b"\x00" * 20)
    assert load_tensors(path) is None and not path.exists()


# ---------------------------------------------------------------- decompositions by name
def test_seed_decompositions_resolve_in_a_fresh_interpreter():
    """Importing pipeline alone is enough to know saes/erc/lcsvd (the registry names all nine)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "from lems_core import pipeline\n"
            "assert pipeline.check_decomposition('lcsvd') == 'lcsvd'\n"
            "print(','.join(pipeline.decomposition_names()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(",") == ["svd", "asvd", "fwsvd", "svd_llm", "svd_llm_v2", "kfac",
                                             "saes", "erc", "lcsvd"]


def test_plan_factorizations_runs_saes_from_the_registry(loaded, corpus, tmp_path):
    from lems_core import pipeline
    from lems_core.model import compressible_layers
    from lems_core.decompositions.saes import saes_factorizations

    layers = compressible_layers(loaded.model)
    ranks = {l.name: (l.eq_rank // 2 if l.block == 1 else None) for l in layers}
    factors = pipeline.plan_factorizations(loaded, _cfg(corpus), "saes", ranks, run=Run(cache_dir=tmp_path / "cache"))
    assert "saes" in pipeline.RANK_DEPENDENT and pipeline.BASE_DECOMPOSITION["saes"] == "svd_llm"
    planned = {n for n, r in ranks.items() if r is not None}
    assert set(factors) == planned
    calib_ids, _ = pipeline.calibration_windows(loaded, _cfg(corpus))
    expected = saes_factorizations(loaded.model, ranks, calib_ids)[0]
    for name in planned:
        assert factors[name].left.shape[1] == ranks[name]
        got, want = factors[name].left @ factors[name].right, expected[name].left @ expected[name].right
        assert torch.allclose(got, want, atol=1e-5)


def test_unknown_decomposition_is_a_clear_error(loaded, corpus):
    from lems_core.pipeline import evaluate_plan, plan_factorizations
    from lems_core.plan import plan_from_ranks
    from lems_core.profile import synthetic_profile

    with pytest.raises(ValueError, match=r"unknown decomposition 'nope'; known: svd, .*kfac, saes, erc, lcsvd"):
        plan_factorizations(loaded, _cfg(corpus), "nope", {})
    profile = synthetic_profile(num_blocks=2)
    plan = plan_from_ranks(profile, {l.name: None for l in profile.layers}, "uniform")
    with pytest.raises(ValueError, match="unknown decomposition 'svd-llm'"):  # before any model is loaded
        evaluate_plan(plan, ["wikitext2"], decomposition="svd-llm")


def test_evaluate_plan_uses_the_decomposition_argument(loaded, corpus, tmp_path, monkeypatch):
    import lems_core.pipeline as pipeline
    from lems_core.model import compressible_layers
    from lems_core.plan import from_loadconfig

    monkeypatch.setattr(pipeline.models, "get_model", lambda source, device=None, offload=None: loaded)
    used = []
    real = pipeline.plan_factorizations
    monkeypatch.setattr(pipeline.evaluation, "plan_factorizations",
                        lambda l, cfg, decomposition, *a, **k: used.append(decomposition) or real(l, cfg, decomposition, *a, **k))
    layers = compressible_layers(loaded.model)
    plan = from_loadconfig({l.name: 0.5 for l in layers}, layers, "tiny-llama", loaded.fingerprint,
                           decomposition="kfac", meta={"calibration": _cfg(corpus).to_dict()})
    result = pipeline.evaluate_plan(plan, [str(corpus)], EvalProtocol(32, 2), run=Run(cache_dir=tmp_path / "c"),
                                    decomposition="svd_llm_v2", with_kl=False)
    assert used == ["svd_llm_v2"] and result.decomposition == "svd_llm_v2"
    assert result.settings["plan_decomposition"] == "kfac"
    result = pipeline.evaluate_plan(plan, [str(corpus)], EvalProtocol(32, 2), run=Run(cache_dir=tmp_path / "c"),
                                    with_kl=False)
    assert used[-1] == "kfac" and result.decomposition == "kfac"


def test_add_measured_points_grows_a_profile_without_changing_its_key(loaded, corpus, tmp_path, monkeypatch):
    """Extra ratios are measured into the same folder; the profile key (and so plans tied to it) stays."""
    from lems_core import pipeline
    from lems_core.pipeline import add_measured_points

    monkeypatch.setattr(pipeline.models, "get_model", lambda source, device=None, **kw: loaded)
    cache = tmp_path / "cache"
    folder = build_profile(loaded, "svd_llm", _cfg(corpus), run=Run(cache_dir=cache))
    before = Profile.load(folder)
    grown = add_measured_points(folder, (0.5, 0.9), run=Run(cache_dir=cache))
    assert set(grown.measured) == {0.5, 0.9} and grown.key == before.key
    # a layer kept at 0.9 can change the logits by round-off only: its KL is measured as >= 0, never -eps
    assert np.all(grown.measured[0.9] >= 0) and np.all(grown.measured[0.5] >= 0)
    reloaded = Profile.load(folder)
    assert np.array_equal(reloaded.measured[0.9], grown.measured[0.9])
    assert np.mean(reloaded.measured[0.9] <= reloaded.measured[0.5]) > 0.8  # keeping more hurts less


def test_profile_records_the_kl_floor_and_the_reference_bias_fit(loaded, corpus, tmp_path):
    """Building a profile runs the reference LEMS's (alpha, gamma) search and measures the KL floor."""
    from lems_core.allocators import allocate, allocate_lems, fitted_params

    folder = build_profile(loaded, "svd_llm", _cfg(corpus), ProfileSettings(bias_fit_ratios=(0.7,)),
                           run=Run(cache_dir=tmp_path / "cache"))
    profile = Profile.load(folder)
    assert profile.kl_floor["reference_precision"] == "fp32"
    # no bf16 floor: 0 up to the float32 round-off of a KL between equal distributions (clamped at 0 where measured)
    assert 0.0 <= profile.kl_floor["kl"] <= KL_ROUNDOFF
    entry = profile.bias_fit["ratios"]["0.7"]
    assert len(entry["trials"]) == 10 and profile.bias_fit["seed"] == 42
    scores = [t["score"] for t in entry["trials"]]
    assert entry["score"] == min(scores) and entry["trials"][entry["trial"]]["alpha"] == entry["alpha"]
    assert all(0 <= t["alpha"] <= 3 and 0 <= t["gamma"] <= 7 for t in entry["trials"])
    assert len(set(scores)) > 1  # the trials are really scored on the model
    ref = allocate(profile, "lems", 0.7)
    assert ref.info["bias_source"] == "profile fit at 0.7"
    params, at = fitted_params(profile, 0.65)
    assert at == 0.7 and (params.alpha, params.gamma) == (entry["alpha"], entry["gamma"])
    assert ref.ranks == allocate_lems(profile, 0.7, params).ranks
    fixed = allocate(profile, "lems_fixed", 0.7)
    assert fixed.method == "lems_fixed" and fixed.info["error_model"]["gamma"] == 5.0


@pytest.mark.parametrize("decomposition", ["kfac", "svd_llm"])
def test_plan_only_factors_equal_the_whole_model_ones(loaded, corpus, tmp_path, decomposition):
    """A first plan on an empty cache decomposes only the layers it factorises (KFAC: with
    Grams of those layers alone); each factor equals the whole model's, and dense layers get none."""
    from lems_core.model import compressible_layers
    from lems_core.pipeline import plan_factorizations

    layers = compressible_layers(loaded.model)
    ranks = {l.name: (2 if i % 3 == 0 else None) for i, l in enumerate(layers)}  # a third factorised
    planned = plan_factorizations(loaded, _cfg(corpus), decomposition, ranks, run=Run(cache_dir=tmp_path / "plan"))
    assert set(planned) == {n for n, r in ranks.items() if r is not None}
    whole = factorizations_for(loaded, _cfg(corpus), decomposition, run=Run(cache_dir=tmp_path / "whole"))
    for name, factors in planned.items():
        np.testing.assert_allclose(factors.sigma, whole[name].sigma, rtol=1e-6, atol=1e-9)
        left, right = factors.factors(2)
        wl, wr = whole[name].factors(2)
        torch.testing.assert_close(left @ right, wl @ wr, rtol=1e-5, atol=1e-6)
    again = plan_factorizations(loaded, _cfg(corpus), decomposition, ranks, run=Run(cache_dir=tmp_path / "plan"))
    assert all(torch.equal(again[n].factors(2)[0], planned[n].factors(2)[0]) for n in planned)  # from the per-layer files


def test_evaluate_plan_heals_before_measuring_and_records_the_recovery(loaded, corpus, tmp_path, monkeypatch):
    import math

    import lems_core.pipeline as pipeline
    from lems_core.model import compressible_layers
    from lems_core.plan import from_loadconfig
    from lems_core.recovery import RecoveryConfig

    monkeypatch.setattr(pipeline.models, "get_model", lambda source, device=None, offload=None: loaded)
    layers = compressible_layers(loaded.model)
    plan = from_loadconfig({l.name: 0.5 for l in layers}, layers, "tiny-llama", loaded.fingerprint,
                           decomposition="svd", meta={"calibration": _cfg(corpus).to_dict()})
    training = word_corpus(tmp_path / "training.txt")  # another file: the evaluation file is refused
    healing = RecoveryConfig(steps=2, seq_len=32, warmup_steps=1, lora_rank=2, lr=1e-2, dataset=str(training),
                             split="train")
    dense_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    args = (plan, [str(corpus)], EvalProtocol(32, 2))
    plain = pipeline.evaluate_plan(*args, run=Run(cache_dir=tmp_path / "c"))
    healed = pipeline.evaluate_plan(*args, run=Run(cache_dir=tmp_path / "c"), recovery=healing)
    assert plain.recovery is None
    record = healed.recovery
    assert record["steps_done"] == 2 and record["lr"] == 1e-2 and record["dataset"] == str(training)
    assert math.isfinite(healed.ppl[str(corpus)]) and math.isfinite(healed.kl)
    assert healed.ppl != plain.ppl  # the healed model is what was measured
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in dense_state.items())  # restored dense
    again = pipeline.evaluate_plan(*args, run=Run(cache_dir=tmp_path / "c"))
    assert again.ppl == plain.ppl  # the cached factors were not changed by the healing
    with pytest.raises(Exception, match="evaluation text"):
        pipeline.evaluate_plan(*args, run=Run(cache_dir=tmp_path / "c"),
                               recovery=RecoveryConfig(steps=2, seq_len=32, dataset=str(corpus), split="train"))
