"""Low-rank causal LMs for `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Copied next to the weights by `lems_core` (`compress --format hf`). Self-contained:
it needs torch and transformers only. `config.json` lists the factorised Linears
under `lems_low_rank` ({module name: rank}); each is replaced by two Linears
(in -> rank -> out, parameters `a` and `b`) before the weights are loaded, so the
checkpoint keeps its low-rank size in memory. The listed ranks are checked against
the Linears the config builds (known projection names, integer ranks in
[1, min(out, in)]) before any low-rank layer is allocated.
"""
import re

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

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
    """Swap the Linears named in `config.lems_low_rank` for LowRankLinear after the base builds them."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name, rank in checked_ranks(self, getattr(config, RANKS_KEY, None) or {}).items():
            linear = self.get_submodule(name)
            parent, _, child = name.rpartition(".")
            low_rank = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None,
                                     linear.weight.device, linear.weight.dtype)
            setattr(self.get_submodule(parent) if parent else self, child, low_rank)


def checked_ranks(model, listed):
    """``config.lems_low_rank`` if every entry names a projection Linear of ``model`` with a rank it can hold."""
    if not isinstance(listed, dict):
        raise ValueError(f"config.json {RANKS_KEY} must be an object {{module name: rank}}, "
                         f"got {type(listed).__name__}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and PROJECTION.match(name)}
    for name, rank in listed.items():
        linear = linears.get(name)
        if linear is None:
            raise ValueError(f"config.json {RANKS_KEY}: {name!r} is not a projection Linear of this "
                             f"{type(model).__name__} (as its config.json describes it)")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"config.json {RANKS_KEY}: {name}: rank must be an integer, got {rank!r}")
        upper = min(linear.in_features, linear.out_features)
        if not 1 <= rank <= upper:
            raise ValueError(f"config.json {RANKS_KEY}: {name}: rank {rank} out of range [1, {upper}] for a "
                             f"{linear.out_features}x{linear.in_features} matrix")
    return dict(listed)


class LowRankLlamaForCausalLM(LowRankMixin, LlamaForCausalLM):
    pass


class LowRankMistralForCausalLM(LowRankMixin, MistralForCausalLM):
    pass


class LowRankQwen2ForCausalLM(LowRankMixin, Qwen2ForCausalLM):
    pass


class LowRankQwen3ForCausalLM(LowRankMixin, Qwen3ForCausalLM):
    pass
