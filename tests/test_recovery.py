"""Recovery (healing) of a compressed tiny model: it learns, touches only the factors, reads only calibration text."""
import threading
from dataclasses import replace

import pytest
import torch

from lems_core import recovery
from lems_core.compression import LowRankLinear, compress_model
from lems_core.model import tiny_model
from lems_core.recovery import (RecoveryConfig, RecoveryError, lr_factor, recover, trainable, train,
                                training_windows)
from lems_core.run import Cancelled, Run

from helpers import ByteTokenizer, uniform_ranks, word_corpus

FAST = dict(steps=30, batch_size=2, seq_len=32, warmup_steps=3, lora_rank=4, seed=3)
LR = {"lora": 1e-2, "factors": 3e-3}


class SvdFactors:
    """Truncated SVD factors of one weight (``compression.Factors``)."""

    def __init__(self, weight: torch.Tensor):
        self.u, self.s, self.vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)

    def factors(self, rank: int):
        return (self.u[:, :rank] * self.s[:rank]).float(), self.vh[:rank].float()


def compressed_tiny(seed: int = 0):
    """A tiny llama with every projection but v truncated to 40% of its break-even rank by SVD."""
    model = tiny_model("llama", seed=seed)
    ranks = {n: r for n, r in uniform_ranks(model, 0.4).items() if not n.endswith("v_proj")}
    compress_model(model, ranks, lambda layer: SvdFactors(model.get_submodule(layer.name).weight))
    return model


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    """Local WikiText-2 files (validation and test, different text) under LEMS_DATA_DIR."""
    folder = tmp_path / "data" / "wikitext-2-raw"
    folder.mkdir(parents=True)
    word_corpus(folder / "wiki.valid.raw")
    (folder / "wiki.test.raw").write_text("held out evaluation text " * 400)
    monkeypatch.setenv("LEMS_DATA_DIR", str(tmp_path / "data"))
    return folder


@pytest.fixture()
def read_splits(monkeypatch):
    """Every (dataset, split) recovery asks the loader for."""
    asked = []
    real = recovery.load_text

    def recording(name, split="test", allow_download=False):
        asked.append((name, split))
        return real(name, split, allow_download)

    monkeypatch.setattr(recovery, "load_text", recording)
    return asked


def mean_loss(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows) / len(windows)


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every tensor that is not a factor weight of a low-rank module (dense Linears, norms, embeddings, lm_head)."""
    factors = {f"{n}.{f}.weight" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for f in "ab"}
    return {k: v.clone() for k, v in model.state_dict().items() if k not in factors}


@pytest.mark.parametrize("mode", ["lora", "factors"])
def test_recovery_lowers_the_training_loss_and_changes_only_the_factors(mode, corpus, read_splits, one_thread):
    model, tok = compressed_tiny(), ByteTokenizer()
    config = RecoveryConfig(mode=mode, lr=LR[mode], **FAST)
    windows = training_windows(tok, config)
    before, frozen = mean_loss(model, windows), frozen_state(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    factor = model.get_submodule("model.layers.0.mlp.up_proj").b.weight.clone()

    result = recover(model, tok, config)

    assert mean_loss(model, windows) < 0.9 * before
    assert result.steps == 30 and len(result.losses) == 30 and result.tokens == 30 * 2 * 32
    assert result.settings["mode"] == mode and result.settings["lr"] == LR[mode]
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # same ranks, no adapter left
    assert not torch.equal(model.get_submodule("model.layers.0.mlp.up_proj").b.weight, factor)
    after = frozen_state(model)
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert "model.layers.1.self_attn.v_proj.weight" in frozen and "lm_head.weight" in frozen
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert read_splits and set(read_splits) == {("wikitext2", "validation")}


@pytest.mark.parametrize("dataset, split", [("wikitext2", "test"), ("wikitext-2", "test"),
                                            ("wikitext2-detok", "test")])
def test_the_evaluation_split_is_refused_before_any_text_is_read(dataset, split, corpus, read_splits):
    config = RecoveryConfig(dataset=dataset, split=split, **FAST)
    with pytest.raises(RecoveryError, match="evaluation text"):
        training_windows(ByteTokenizer(), config)
    assert read_splits == []


def test_a_path_to_the_evaluation_file_is_refused(corpus, read_splits):
    config = RecoveryConfig(dataset=str(corpus / "wiki.test.raw"), split="train", **FAST)
    with pytest.raises(RecoveryError, match="evaluation text of wikitext2 \\(the same file\\)"):
        training_windows(ByteTokenizer(), config)


def test_another_evaluation_dataset_leaves_its_own_split_free(corpus, read_splits):
    config = RecoveryConfig(**FAST)
    with pytest.raises(RecoveryError, match="evaluation text"):
        training_windows(ByteTokenizer(), config, evaluation=("wikitext2", str(corpus / "wiki.valid.raw")))
    assert training_windows(ByteTokenizer(), config, evaluation=("ptb",)).shape == (60, 32)


def test_merged_adapters_give_the_adapter_models_logits(corpus, tmp_path, one_thread):
    from lems_core.compression import load_compressed

    model, tok = compressed_tiny(), ByteTokenizer()
    config = RecoveryConfig(lr=LR["lora"], **FAST)
    windows = training_windows(tok, config)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    keys = set(model.state_dict())
    with torch.no_grad():
        untrained_logits = model(ids).logits
    with trainable(model, config) as prepared:
        result = train(prepared, windows, config)
        with torch.no_grad():
            adapter_logits = prepared.module(input_ids=ids).logits
        assert prepared.module.get_base_model() is model
    with torch.no_grad():
        merged_logits = model(ids).logits
    assert set(model.state_dict()) == keys  # the adapters merged into the factors, nothing added
    # The merge reorders the sums of the factor products: a few float32 ulps per dot product of hidden length.
    tol = 8 * torch.finfo(torch.float32).eps * model.config.hidden_size * adapter_logits.abs().max().item()
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=tol)
    assert (adapter_logits - untrained_logits).abs().max() > 100 * tol  # the adapters did change the model

    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    folder = recovery.save_healed(model, tok, ranks, result, tmp_path / "healed")[0]
    reloaded, _, saved_ranks, meta = load_compressed(folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapter_logits, rtol=0, atol=tol)
    assert {n: r for n, r in saved_ranks.items() if r} == ranks and meta["recovery"]["mode"] == "lora"
    assert meta["recovery"]["steps_done"] == 30 and meta["recovery"]["loss_last"] < meta["recovery"]["loss_first"]


def test_cancel_stops_recovery_and_leaves_the_model_as_it_was(corpus, one_thread):
    model, tok = compressed_tiny(), ByteTokenizer()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cancel, seen = threading.Event(), []

    def progress(fraction, message):
        seen.append(message)
        if len(seen) == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        recover(model, tok, RecoveryConfig(lr=LR["lora"], **FAST), Run(progress=progress, cancel=cancel))
    assert len(seen) == 2 and "ETA" in seen[0] and "step 1/30" in seen[0]
    assert model.state_dict().keys() == state.keys()  # the adapters are gone, not merged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_trains_the_same_steps(corpus, one_thread):
    """Recomputing the activations in the backward pass changes the memory, not the losses."""
    config = RecoveryConfig(lr=LR["lora"], **{**FAST, "steps": 3})
    runs, checkpointed = [], []
    for flag in (False, True):
        model = compressed_tiny()
        seen = Run(progress=lambda f, m: checkpointed.append((flag, model.is_activation_checkpointing)))
        runs.append(recover(model, ByteTokenizer(), replace(config, gradient_checkpointing=flag), seen).losses)
        assert not model.is_activation_checkpointing  # switched off again after the run
    assert set(checkpointed) == {(False, False), (True, True)}
    assert runs[0] == pytest.approx(runs[1], rel=1e-5) and runs[0][0] != runs[0][-1]


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_its_floor():
    factors = [lr_factor(s, 4, 20, 0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and factors[-1] > 0.1
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.55)  # halfway through the cosine


@pytest.mark.parametrize("change, message", [
    ({"mode": "full"}, "mode must be one of lora, factors"), ({"steps": 0}, "steps must be an integer >= 1"),
    ({"lr": -1.0}, "lr must be a finite number > 0"), ({"seq_len": 1}, "seq_len must be at least 2"),
    ({"min_lr_fraction": 2.0}, "min_lr_fraction must be in"), ({"seed": 1.5}, "seed must be an integer"),
])
def test_bad_settings_are_refused_by_name(change, message):
    with pytest.raises(RecoveryError, match=message):
        RecoveryConfig(**change)


def test_factors_mode_refuses_half_precision_factors():
    model = compressed_tiny().half()
    with pytest.raises(RecoveryError, match="load the model in float32"):
        with trainable(model, RecoveryConfig(mode="factors")):
            pass


def test_a_dense_model_has_nothing_to_heal():
    with pytest.raises(RecoveryError, match="no low-rank layer"):
        with trainable(tiny_model("llama"), RecoveryConfig()):
            pass


def test_results_record_the_recovery_settings(tmp_path):
    from lems_core.results import ResultsFileError, ResultStore, validate_results_document

    healed = recovery.RecoveryResult([3.0, 2.0], 2, 1.5, 128, 64, "cpu", RecoveryConfig(steps=2).to_dict())
    record = {"method": "lems", "decomposition": "kfac", "fingerprint": "f", "budget": 0.8, "realised_ratio": 0.8,
              "ppl": {"wikitext2": 20.0}, "dense_ppl": {"wikitext2": 18.0}, "kl": 0.1, "params_kept": 8,
              "params_total": 10, "settings": {}}
    record = recovery.healed_meta(record, healed)
    ResultStore(tmp_path / "cache").add(record)
    stored = ResultStore(tmp_path / "cache").all()[0]["recovery"]
    assert stored["mode"] == "lora" and stored["steps"] == 2 and stored["lr"] == 2e-4
    assert (stored["loss_first"], stored["loss_last"]) == (3.0, 2.0)
    doc = {"schema": "lems-results/1", "results": [record]}
    assert validate_results_document(doc)["results"][0]["recovery"]["seed"] == 0
    with pytest.raises(ResultsFileError, match="'recovery' must be an object or null"):
        validate_results_document({**doc, "results": [{**record, "recovery": [1]}]})
