import json

import numpy as np
import pytest
import torch

from lems_core.cache import load_tensors, save_tensors
from lems_core.calibration import CalibrationConfig
from lems_core.model import LoadedModel, model_fingerprint, tiny_model
from lems_core.pipeline import build_profile, factorizations_for
from lems_core.profile import Profile, ProfileError


class ByteTokenizer:
    """Bytes as tokens (vocab 256), enough for the tiny models."""

    def __call__(self, text, return_tensors=None):
        class Out:
            input_ids = torch.tensor([list(text.encode("utf-8", "replace"))]) % 256
        return Out()


@pytest.fixture()
def loaded():
    model = tiny_model("llama", seed=8)
    return LoadedModel(model, ByteTokenizer(), "tiny-llama", model_fingerprint(model))


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "model", "rank", "layer", "the", "of", "and"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    return path


def _cfg(corpus):
    return CalibrationConfig(dataset=str(corpus), split="train", n_samples=3, seq_len=48, seed=1, n_search=2)


def test_profile_is_built_cached_and_reloaded(loaded, corpus, tmp_path):
    cache = tmp_path / "cache"
    stages = []
    folder = build_profile(loaded, "kfac", _cfg(corpus), extra_ratios=(0.5,), cache_dir=cache,
                           progress=lambda f, m: stages.append(f))
    profile = Profile.load(folder)
    assert len(profile.layers) == 21 and profile.decomposition == "kfac"
    assert profile.kl_ref.shape == (21,) and np.all(profile.kl_ref > 0)
    assert set(profile.measured) == {0.5}
    # less compression hurts less, for most layers
    assert np.mean(profile.measured[0.5] < profile.kl_ref) > 0.8
    assert stages[-1] == 1.0 and all(a <= b + 1e-9 for a, b in zip(stages, stages[1:]))
    factors = factorizations_for(loaded, _cfg(corpus), "kfac", cache_dir=cache)
    name = profile.layers[3].name
    assert np.allclose(profile.spectra[name], factors[name].sigma)
    before = (folder / "profile.json").stat().st_mtime_ns
    assert build_profile(loaded, "kfac", _cfg(corpus), extra_ratios=(0.5,), cache_dir=cache) == folder
    assert (folder / "profile.json").stat().st_mtime_ns == before  # reused, not recomputed


def test_corrupt_profile_is_detected_and_rebuilt(loaded, corpus, tmp_path):
    cache = tmp_path / "cache"
    folder = build_profile(loaded, "svd_llm", _cfg(corpus), measure_scale=False, cache_dir=cache)
    spectra = folder / "spectra.safetensors"
    spectra.write_bytes(spectra.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(ProfileError, match="checksum"):
        Profile.load(folder)
    assert build_profile(loaded, "svd_llm", _cfg(corpus), measure_scale=False, cache_dir=cache) == folder
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
