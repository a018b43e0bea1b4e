"""ARS configuration: the hyper-parameters of a training run, the budget rules and the presets.

Every field of ``ARSConfig`` is part of the cache key of a trained plan. The budget
rule (``RULES``) is the set of fields in ``LEGACY_FIELDS``: "reference" follows the
reference implementation, "legacy" the earlier one-sided rule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

METHOD = "ars"


@dataclass(frozen=True)
class ARSConfig:
    """Hyper-parameters of one ARS training run; all of them are part of the cache key."""

    steps: int = 2000  # hypernetwork updates (docs/reference/methods.md §4.6 step 5: 2000 for LLMs); with early stopping, a cap
    batch_windows: int = 2  # calibration windows per step (third-party default batch size 2)
    seq_len: int | None = None  # crop windows to this many tokens (None: the calibration length)
    lam: float = 16.0  # weight of the budget penalty R(T(m), p T_c)
    gamma_align: float = 10.0  # weight of the alignment term
    lr: float = 1e-3  # Adam learning rate
    tau: float = 0.4  # Gumbel-sigmoid temperature
    logit_bias: float = 3.0  # added to every logit so training starts with (almost) all components kept
    threshold: float = 0.5  # hard mask = sigmoid(.) > threshold
    noise: str = "gumbel"  # "gumbel" (reference implementation) or "logistic" (binary Concrete)
    z_size: int = 32  # width of the fixed random GRU input
    hidden_size: int = 64  # GRU hidden size
    rank_multiple: int = 8  # final ranks are multiples of this (docs/reference/methods.md §1.4)
    fill_budget: bool = True  # spend budget left unused after training (see fill_to_budget)
    seed: int = 42
    # The budget rule: the reference's (sidhantls, docs/reference/methods.md §9 "ARS"); LEGACY_FIELDS gives the earlier one.
    bidirectional: bool = True  # one bidirectional GRU over the layers (reference); False: one direction
    p_param: float | None = 0.4  # penalty log(max(a, p)/p), a = compressible kept fraction (reference
    #                              --p_param; capped at the budget); None: p = the budget (one-sided)
    budget_scope: str = "model"  # kept fraction of the lam band and early stop: "model" (whole model,
    #                              reference) or "compressible" (the compressible Linears)
    lambda_off_within: float = 0.002  # lam = 0 for a step whose kept fraction is this close to the target (0: never)
    early_stop_window: int = 100  # stop after more than this many steps once their mean kept fraction
    early_stop_tol: float = 0.003  # ... is less than this above the target (reference main); window 0: never

    def __post_init__(self):
        if self.lambda_off_within < 0 or self.early_stop_window < 0 or self.early_stop_tol < 0:
            raise ValueError("lambda_off_within, early_stop_window and early_stop_tol must be >= 0")
        if self.p_param is not None and not 0.0 < self.p_param <= 1.0:
            raise ValueError(f"p_param must lie in (0, 1] or be None, got {self.p_param}")
        if self.budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"budget_scope must be one of {BUDGET_SCOPES}, got {self.budget_scope!r}")

    @property
    def rule(self) -> dict:
        """The budget-rule fields (those of LEGACY_FIELDS) and their values."""
        return {k: getattr(self, k) for k in LEGACY_FIELDS}

    @property
    def rule_name(self) -> str:
        """"reference", "legacy" or "custom": which budget rule (``RULES``) this config trains under."""
        return next((name for name, rule in RULES.items() if rule == self.rule), "custom")

    def to_dict(self) -> dict:
        """All fields, except rule fields at their legacy value (so configs, and cache keys,
        of runs made before these fields existed are unchanged)."""
        d = asdict(self)
        if self.rule_name == "legacy":
            for k in LEGACY_FIELDS:
                del d[k]
        return d

    @staticmethod
    def from_dict(d: dict) -> "ARSConfig":
        """The config of a stored dict; a rule field it lacks (written before the field
        existed) takes its legacy value, the behaviour of the run that wrote it."""
        values = {f.name: d[f.name] for f in fields(ARSConfig) if f.name in d}
        return ARSConfig(**{**LEGACY_FIELDS, **values})


BUDGET_SCOPES = ("model", "compressible")

# The rule before the reference's was followed: one-direction GRU, the penalty against the
# budget itself (one-sided), lam always on, a fixed number of steps, the compressible Linears
# only (preset "cpu-small-legacy", or these overrides). early_stop_tol is unused at window 0.
LEGACY_FIELDS = {"bidirectional": False, "p_param": None, "budget_scope": "compressible",
                 "lambda_off_within": 0.0, "early_stop_window": 0, "early_stop_tol": 0.0015}


def _default_rule() -> dict:
    return {f.name: f.default for f in fields(ARSConfig) if f.name in LEGACY_FIELDS}


# Named budget rules; the ``ars`` allocator serves plans of one rule ("reference" by default).
RULES = {"reference": _default_rule(), "legacy": dict(LEGACY_FIELDS)}


# Presets. "reference": the reference's settings (at most 2000 steps, lr 1e-3, 2 windows).
# "cpu-small": a short run for the demo model (SmolLM2-135M) on a shared 2-core CPU, under the
# reference rule: ~3.5-4.3 s per step at 128 tokens on one thread (6.8 s at 256 tokens; the
# bidirectional GRU adds ~0.08 s at the demo's 210 layers). The 10x higher learning rate makes
# up for the far fewer steps: logits start at +3 and must cross ~-0.37 for a component to be
# dropped, which takes ~15 steps at lr 1e-2 (~150 at 1e-3). Early stopping needs more than
# 100 steps, so a run is 101-200 steps (~6-15 min per ratio on the demo).
# "<name>-legacy": the same settings under the legacy rule; "cpu-small-legacy" is exactly the
# earlier "cpu-small" (80 fixed steps), with its cache keys.
_CPU_SMALL = dict(batch_windows=1, seq_len=128, lr=1e-2)
PRESETS = {
    "reference": ARSConfig(),
    "reference-legacy": ARSConfig(**LEGACY_FIELDS),
    "cpu-small": ARSConfig(steps=200, **_CPU_SMALL),
    "cpu-small-legacy": ARSConfig(steps=80, **_CPU_SMALL, **LEGACY_FIELDS),
}


def preset(name: str, **overrides) -> ARSConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown ARS preset {name!r}: choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
