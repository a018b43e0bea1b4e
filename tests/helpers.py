"""Small shared test helpers (the fixtures are in conftest.py)."""
import torch

from lems_core.model import LoadedModel, compressible_layers, model_fingerprint, tiny_model


class ByteTokenizer:
    """Bytes as tokens (vocab 256), enough for the tiny models."""

    def __call__(self, text, return_tensors=None):
        class Out:
            input_ids = torch.tensor([list(text.encode("utf-8", "replace"))]) % 256
        return Out()

    def save_pretrained(self, folder):
        """Nothing to save (lets compress/save_compressed run on tiny models)."""


def tiny_loaded(seed: int, arch: str = "llama") -> LoadedModel:
    """A tiny random model wrapped like a loaded one (byte tokenizer, real fingerprint)."""
    model = tiny_model(arch, seed=seed)
    return LoadedModel(model, ByteTokenizer(), f"tiny-{arch}", model_fingerprint(model))


def uniform_ranks(model, keep: float) -> dict:
    """rank = max(1, int(keep * eq)) for every compressible Linear."""
    return {l.name: max(1, int(keep * l.eq_rank)) for l in compressible_layers(model)}
