"""Low-rank LMs for `AutoModelForCausalLM` / `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

Copied next to the weights by `lems_core` (`compress --format hf`). Self-contained:
it needs torch and transformers only. `config.json` lists the factorised Linears
under `lems_low_rank` ({module name: rank}); each is replaced by two Linears
(in -> rank -> out, submodules `a` and `b`) before the weights are loaded, so the
checkpoint keeps its low-rank size in memory. The listed ranks are checked against
the Linears the config builds (known projection names, integer ranks in
[1, min(out, in)]) before any low-rank layer is allocated.

The swap happens inside the *base* model (`LlamaModel`, ...), so `AutoModel` builds the
low-rank decoder on its own: serving engines that bring their own head and attention
(vLLM's and SGLang's Transformers backends) load that class. Attention is the stock
module's, which runs through transformers' `ALL_ATTENTION_FUNCTIONS` interface
(`_supports_attention_backend`); `config.json`'s `base_model_tp_plan` shards the factors.

A CausalLM's `from_pretrained` then prepares it for inference (`fused_lowrank.py`, copied beside
this file) exactly as `lems_core.fused.prepare_for_inference` prepares a model in memory:
projections sharing an input run one first-factor GEMM, second factors are stored for the
matvec, factors are called directly, and the weights leave the memory-mapped checkpoint for
memory of their own; same modules, same logits.
"""
import re

from torch import nn
from transformers import (LlamaForCausalLM, LlamaModel, MistralForCausalLM, MistralModel, Qwen2ForCausalLM,
                          Qwen2Model, Qwen3ForCausalLM, Qwen3Model)

from .fused_lowrank import prepare_for_inference

RANKS_KEY = "lems_low_rank"
PROJECTION = re.compile(r"^(?:.*\.)?layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")


class LowRankLinear(nn.Module):
    """y = b(a(x)): a is in -> rank without bias, b is rank -> out with the original bias."""

    def __init__(self, in_features, out_features, rank, bias, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.b(self.a(x))


class LowRankMixin:
    """Swap the Linears named in `config.lems_low_rank` for LowRankLinear inside the base model after it is built.

    The names are the causal LM's (`model.layers.0.self_attn.q_proj`); the base model
    drops its prefix (`model.`), so a CausalLM and a bare base model read the same config.
    """

    _supports_attention_backend = True  # attention goes through ALL_ATTENTION_FUNCTIONS (the stock modules')

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The loaded model; a CausalLM is prepared for inference (shared-input projections grouped, factors laid
        out for the matvec and called directly, weights copied out of the memory-mapped file). A bare base model
        keeps plain Linears: serving engines load it and shard them by the TP plan."""
        model = super().from_pretrained(*args, **kwargs)
        if model.base_model is not model:
            prepare_for_inference(model)
        return model

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        base, prefix = self.base_model, f"{self.base_model_prefix}."
        for name, rank in checked_ranks(base, getattr(config, RANKS_KEY, None) or {}, prefix).items():
            inner = name[len(prefix):]
            linear = base.get_submodule(inner)
            parent, _, child = inner.rpartition(".")
            low_rank = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None,
                                     linear.weight.device, linear.weight.dtype)
            setattr(base.get_submodule(parent) if parent else base, child, low_rank)


def checked_ranks(base, listed, prefix=""):
    """``config.lems_low_rank`` if every entry (``prefix`` + a name in ``base``) names a projection Linear of the
    base model with a rank it can hold."""
    if not isinstance(listed, dict):
        raise ValueError(f"config.json {RANKS_KEY} must be an object {{module name: rank}}, "
                         f"got {type(listed).__name__}")
    linears = {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear) and PROJECTION.match(name)}
    for name, rank in listed.items():
        linear = linears.get(name[len(prefix):]) if isinstance(name, str) and name.startswith(prefix) else None
        if linear is None:
            raise ValueError(f"config.json {RANKS_KEY}: {name!r} is not a projection Linear of this "
                             f"{type(base).__name__} (as its config.json describes it)")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"config.json {RANKS_KEY}: {name}: rank must be an integer, got {rank!r}")
        upper = min(linear.in_features, linear.out_features)
        if not 1 <= rank <= upper:
            raise ValueError(f"config.json {RANKS_KEY}: {name}: rank {rank} out of range [1, {upper}] for a "
                             f"{linear.out_features}x{linear.in_features} matrix")
    return dict(listed)


class LowRankLlamaModel(LowRankMixin, LlamaModel):
    pass


class LowRankLlamaForCausalLM(LowRankMixin, LlamaForCausalLM):
    pass


class LowRankMistralModel(LowRankMixin, MistralModel):
    pass


class LowRankMistralForCausalLM(LowRankMixin, MistralForCausalLM):
    pass


class LowRankQwen2Model(LowRankMixin, Qwen2Model):
    pass


class LowRankQwen2ForCausalLM(LowRankMixin, Qwen2ForCausalLM):
    pass


class LowRankQwen3Model(LowRankMixin, Qwen3Model):
    pass


class LowRankQwen3ForCausalLM(LowRankMixin, Qwen3ForCausalLM):
    pass
