import math

import pytest
import torch

from lems_core.evaluation import Cancelled, kl_from_logits, kl_to_reference, model_logits, perplexity, token_windows
from lems_core.model import tiny_model


def test_perplexity_is_exp_mean_nll(tiny_llama, tiny_ids):
    result = perplexity(tiny_llama, tiny_ids, batch_size=3)
    with torch.no_grad():
        logits = tiny_llama(tiny_ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tiny_ids[:, 1:].flatten())
    assert result.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert result.tokens == tiny_ids.shape[0] * (tiny_ids.shape[1] - 1)


def test_progress_and_cancel(tiny_llama, tiny_ids):
    import threading

    seen = []
    perplexity(tiny_llama, tiny_ids, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and len(seen) == tiny_ids.shape[0]
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        perplexity(tiny_llama, tiny_ids, cancel=event)


def test_kl_is_zero_for_the_same_model_and_positive_otherwise(tiny_llama, tiny_ids):
    ref = model_logits(tiny_llama, tiny_ids, dtype=torch.float32)
    assert kl_to_reference(tiny_llama, tiny_ids, ref) == pytest.approx(0.0, abs=1e-6)
    other = tiny_model("llama", seed=5)
    assert kl_to_reference(other, tiny_ids, ref) > 1e-3


def test_kl_skips_the_first_eighth_of_positions():
    ref = torch.zeros(1, 16, 4)
    out = torch.zeros(1, 16, 4)
    out[0, :2, 0] = 10.0  # differences only in the skipped positions
    total, count = kl_from_logits(ref, out)
    assert total == pytest.approx(0.0, abs=1e-7) and count == 14


def test_token_windows_drop_the_remainder():
    class Tok:
        def __call__(self, text, return_tensors=None):
            class O:
                input_ids = torch.arange(len(text)).view(1, -1)
            return O()
    w = token_windows(Tok(), "x" * 103, 10, max_windows=None)
    assert w.shape == (10, 10)
    assert token_windows(Tok(), "x" * 103, 10, max_windows=3).shape == (3, 10)


def test_protocols_are_named_and_old_results_are_recognised():
    from lems_core.evaluation import QUICK_EVAL, REFERENCE_EVAL, EvalProtocol, protocol_name

    assert (REFERENCE_EVAL.seq_len, REFERENCE_EVAL.max_windows, REFERENCE_EVAL.name) == (2048, None, "reference")
    assert (QUICK_EVAL.seq_len, QUICK_EVAL.max_windows, QUICK_EVAL.name) == (512, 8, "quick")
    assert EvalProtocol(2048, 4).name == "custom"
    assert protocol_name({"protocol": EvalProtocol(2048, None).to_dict()}) == "reference"
    assert protocol_name({"seq_len": 512, "max_windows": 16}) == "quick-16"  # stored before the field existed, when quick was 16 windows
    assert protocol_name({}) == "unknown"
