"""End-to-end on the real demo model (SmolLM2-135M-Instruct GGUF): slow, ~1-2 minutes."""
import math

import pytest

from lems_core.calibration import CalibrationConfig
from lems_core.cli import main
from lems_core.compression import compress_model
from lems_core.data import load_text
from lems_core.evaluation import perplexity, token_windows
from lems_core.pipeline import calibration_windows, get_model, statistics_for
from lems_core.run import Run
from lems_core.decompositions import Decomposer
from lems_core.model import compressible_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    return get_model("demo", "cpu")


def test_demo_layers_and_cli(demo, capsys):
    layers = compressible_layers(demo.model)
    assert len(layers) == 210 and max(l.block for l in layers) == 29
    assert main(["layers", "--model", "demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert demo.fingerprint in out and "210 compressible Linears" in out


def test_demo_svd_llm_at_0_8_end_to_end(demo, tmp_path):
    cfg = CalibrationConfig(n_samples=2, seq_len=256, n_search=1)
    calib, _ = calibration_windows(demo, cfg)
    stats = statistics_for(demo, calib, cfg, "svd_llm", run=Run(cache_dir=tmp_path))
    text, _ = load_text("wikitext2", "test")
    windows = token_windows(demo.tokenizer, text, 256, max_windows=2)
    dense = perplexity(demo.model, windows).ppl
    decomposer = Decomposer("svd_llm", )
    layers = compressible_layers(demo.model)
    ranks = {l.name: int(0.8 * l.eq_rank) for l in layers}
    originals = {l.name: demo.model.get_submodule(l.name) for l in layers}
    try:
        compress_model(demo.model, ranks,
                       lambda l: decomposer(l, originals[l.name].weight, stats.inputs[l.name]))
        compressed = perplexity(demo.model, windows).ppl
    finally:
        from lems_core.compression import restore_dense
        restore_dense(demo.model, originals)
    assert math.isfinite(compressed) and compressed > dense
    assert 5 < dense < 100  # SmolLM2-135M on WikiText-2 (256-token windows)
    assert perplexity(demo.model, windows).ppl == pytest.approx(dense, rel=1e-6)  # restored
