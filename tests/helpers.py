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


def word_corpus(path, lines: int = 400):
    """A seeded text file of 12-word lines over a 10-word vocabulary: calibration / evaluation text for tiny models."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "model", "rank", "layer", "the", "of", "and"]
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(lines)))
    return path


def uniform_ranks(model, keep: float) -> dict:
    """rank = max(1, int(keep * eq)) for every compressible Linear."""
    return {l.name: max(1, int(keep * l.eq_rank)) for l in compressible_layers(model)}


WORD_SPECIALS = ("<unk>", "<eos>")


def word_tokenizer(vocab_size: int = 256):
    """A real (fast) Hugging Face tokenizer built in memory: ids 0/1 are <unk>/<eos>, then words w2 .. w{V-1}.

    Whitespace-split words map to one id each, so texts and continuations tokenise
    predictably; it saves and reloads with the other tokenizer files of a model folder.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(WORD_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(WORD_SPECIALS), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def word_loaded(seed: int, arch: str = "llama", **overrides) -> LoadedModel:
    """A tiny random model with the in-memory word tokenizer (for lm-eval and the Hugging Face export)."""
    model = tiny_model(arch, seed=seed, **overrides)
    return LoadedModel(model, word_tokenizer(model.config.vocab_size), f"tiny-{arch}", model_fingerprint(model))


def error_within(seconds: float, fn):
    """The exception ``fn()`` raises (None when it returns), failing if it runs longer than ``seconds``.

    ``fn`` runs in a daemon thread, so a regression that blocks forever (opening a FIFO,
    reading /dev/zero) fails the test instead of hanging the suite.
    """
    import threading

    outcome = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: blocked on its input"
    return outcome.get("error")
