"""`heal`: a compressed folder fine-tuned on calibration text and saved in both formats; bad input exits 2."""
import json

import numpy as np
import pytest
import torch

from lems_core.cli import main
from lems_core.compression import LowRankLinear, load_compressed

from helpers import word_loaded

HEAL = ["--steps", "6", "--seq-len", "16", "--batch", "2", "--lr", "0.01", "--lora-rank", "2", "--warmup", "1",
        "--seed", "1", "--device", "cpu"]


@pytest.fixture()
def compressed_folder(tmp_path, monkeypatch):
    """A tiny llama (word tokenizer) compressed by `compress` at keep 0.4, and local WikiText-2 files of its words."""
    import lems_core.pipeline as pipeline
    from lems_core.model import compressible_layers
    from lems_core.plan import from_loadconfig

    loaded = word_loaded(5, tie_word_embeddings=True)
    monkeypatch.setattr(pipeline, "get_model", lambda source, device=None, offload=None: loaded)
    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data" / "wikitext-2-raw"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        (data / name).write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(2, 40, 12)) for _ in range(300)))
    monkeypatch.setenv("LEMS_DATA_DIR", str(tmp_path / "data"))
    layers = compressible_layers(loaded.model)
    plan = from_loadconfig({l.name: 0.4 for l in layers}, layers, "tiny-llama", loaded.fingerprint,
                           method="uniform", decomposition="svd")
    plan_path = plan.save(tmp_path / "plan.json")
    assert main(["compress", "--plan", str(plan_path), "-o", str(tmp_path / "compressed"), "--device", "cpu"]) == 0
    return tmp_path / "compressed"


def test_heal_saves_the_healed_model_in_both_formats_with_the_same_ranks(compressed_folder, tmp_path, capsys):
    out, hf = tmp_path / "healed", tmp_path / "healed-hf"
    assert main(["heal", "--model", str(compressed_folder), "-o", str(out), "--hf-output", str(hf), *HEAL]) == 0
    assert "loss" in capsys.readouterr().out
    before, _, ranks, _ = load_compressed(compressed_folder)
    healed, _, healed_ranks, meta = load_compressed(out)
    from_hf, _, hf_ranks, _ = load_compressed(hf)
    assert healed_ranks == hf_ranks == ranks
    recovery = meta["recovery"]
    assert (recovery["mode"], recovery["steps_done"], recovery["seq_len"], recovery["split"]) == ("lora", 6, 16,
                                                                                                   "validation")
    ids = torch.randint(2, 40, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_hf(ids).logits, healed(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(healed(ids).logits, before(ids).logits)
    assert sum(isinstance(m, LowRankLinear) for m in healed.modules()) == sum(r is not None for r in ranks.values())
    config = json.loads((hf / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_lowrank.LowRankLlamaModel"


def test_heal_refuses_the_evaluation_split(compressed_folder, tmp_path, capsys):
    code = main(["heal", "--model", str(compressed_folder), "-o", str(tmp_path / "h"), "--calib-split", "test", *HEAL])
    assert code == 2 and "is the evaluation text of wikitext2" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_heal_refuses_writing_over_its_input(compressed_folder, capsys):
    assert main(["heal", "--model", str(compressed_folder), "-o", str(compressed_folder), *HEAL]) == 2
    assert "is the model folder being healed" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--mode", "full"), ("--lr", "nan"), ("--seq-len", "-4")])
def test_heal_bad_option_values_exit_2(option, value, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["heal", "--model", str(tmp_path), "-o", str(tmp_path / "h"), option, value])
    assert exit_info.value.code == 2


def test_heal_hf_output_needs_the_recorded_plan(compressed_folder, tmp_path, capsys):
    ranks_file = compressed_folder / "ranks.json"
    doc = json.loads(ranks_file.read_text())
    doc["meta"].pop("plan")
    ranks_file.write_text(json.dumps(doc))
    code = main(["heal", "--model", str(compressed_folder), "-o", str(tmp_path / "h"), "--hf-output",
                 str(tmp_path / "hf"), *HEAL])
    assert code == 2 and "--hf-output needs the plan" in capsys.readouterr().err
