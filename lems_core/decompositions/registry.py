"""One registry of every decomposition, and the Decomposer that runs a static one.

Static methods factorise each layer once from calibration statistics; any rank is a
slice of those factors (cached per model, calibration, method and options).
Rank-dependent methods compute factors for one plan's ranks (closed loop, block
training, residual stages); their profiles use the spectra of their ``base`` static
method, and the pipeline caches their factors per plan.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator

import torch

from ..model import LayerInfo
from ..statistics import InputStats
from .asvd import Asvd
from .base import (DecompositionOptions, Factorization, LayerStats, NonFiniteFactorsError, RankDependent, StaticMethod,
                   Whitener, check_finite_factors, factorize, keep_of, single_threaded_lapack)
from .erc import ErcOptions, factorizations as erc_for_plan
from .fwsvd import Fwsvd
from .kfac import Kfac
from .lcsvd import LcOptions, factorizations as lcsvd_for_plan
from .saes import SaesOptions, factorizations as saes_for_plan
from .svd import Svd
from .svd_llm import SvdLlm
from .svd_llm_v2 import SvdLlmV2

MethodOptions = DecompositionOptions | SaesOptions | ErcOptions | LcOptions  # one type per method family


@dataclass(frozen=True)
class DecompositionSpec:
    """One decomposition: what it reads, its options (``options`` are its defaults) and how it runs.

    Static: ``method`` builds its whiteners; ``needs`` are the statistics
    ``pipeline.statistics_for`` collects for it. Rank-dependent: ``factorizations``
    gets a plan's ranks; ``base`` is the static method whose spectra its profiles use
    (and whose statistics ``needs`` repeats); ``base_factors`` asks the pipeline for
    that method's static factors as input (ERC's first stage).
    """

    name: str
    rank_dependent: bool
    needs: frozenset[str]
    options: MethodOptions
    method: StaticMethod | None = None
    factorizations: RankDependent | None = None
    base: str | None = None
    base_factors: bool = False
    summary: str = ""

    def __post_init__(self):
        if self.rank_dependent != (self.factorizations is not None) or self.rank_dependent == (self.method is not None):
            raise ValueError(f"{self.name}: a static spec has a method, a rank-dependent one factorizations")
        if self.rank_dependent and self.base is None:
            raise ValueError(f"{self.name}: a rank-dependent decomposition names its base static method")


_INPUTS = SvdLlm.needs  # the rank-dependent methods' base is svd_llm
_DEFAULTS = DecompositionOptions()  # shared by the six static methods

SPECS: dict[str, DecompositionSpec] = {s.name: s for s in (
    DecompositionSpec("svd", False, Svd.needs, _DEFAULTS, Svd(), summary="plain SVD (docs/reference/methods.md §3.1)"),
    DecompositionSpec("asvd", False, Asvd.needs, _DEFAULTS, Asvd(), summary="activation-aware scaling (docs/reference/methods.md §3.2)"),
    DecompositionSpec("fwsvd", False, Fwsvd.needs, _DEFAULTS, Fwsvd(), summary="Fisher-weighted scaling (docs/reference/methods.md §3.3)"),
    DecompositionSpec("svd_llm", False, SvdLlm.needs, _DEFAULTS, SvdLlm(), summary="Cholesky input whitening (docs/reference/methods.md §3.5)"),
    DecompositionSpec("svd_llm_v2", False, SvdLlmV2.needs, _DEFAULTS, SvdLlmV2(), summary="eigen whitening (docs/reference/methods.md §3.6)"),
    DecompositionSpec("kfac", False, Kfac.needs, _DEFAULTS, Kfac(), summary="K-FAC two-sided whitening (docs/reference/methods.md §2)"),
    DecompositionSpec("saes", True, _INPUTS, SaesOptions(), factorizations=saes_for_plan, base="svd_llm",
                      summary="SAES-SVD closed loop, adaptive alignment (docs/reference/other-seed-methods.md §1)"),
    DecompositionSpec("erc", True, _INPUTS, ErcOptions(), factorizations=erc_for_plan, base="svd_llm",
                      base_factors=True, summary="ERC-SVD residual compensation (docs/reference/other-seed-methods.md §2.2)"),
    DecompositionSpec("lcsvd", True, _INPUTS, LcOptions(), factorizations=lcsvd_for_plan, base="svd_llm",
                      summary="LC-SVD block-collaborative subspaces (docs/reference/other-seed-methods.md §3)"),
)}

METHODS = tuple(n for n, s in SPECS.items() if not s.rank_dependent)  # the static ones (Decomposer's)
RANK_DEPENDENT = tuple(n for n, s in SPECS.items() if s.rank_dependent)
BASE_DECOMPOSITION = MappingProxyType({n: SPECS[n].base for n in RANK_DEPENDENT})  # e.g. "saes" -> "svd_llm"


def decomposition_names() -> list[str]:
    """Every decomposition a plan can be factorised with: the static ones, then the rank-dependent ones."""
    return list(SPECS)


def check_decomposition(decomposition: str) -> str:
    """``decomposition`` if it is known, else a ValueError naming the known ones."""
    if decomposition not in SPECS:
        raise ValueError(f"unknown decomposition {decomposition!r}; known: {', '.join(SPECS)}")
    return decomposition


def spec_of(decomposition: str) -> DecompositionSpec:
    """The registry entry of a known decomposition (ValueError as ``check_decomposition``)."""
    return SPECS[check_decomposition(decomposition)]


def base_of(decomposition: str) -> str:
    """The static method whose spectra a profile of ``decomposition`` holds (itself when static)."""
    return spec_of(decomposition).base or decomposition


# ============================================================ static methods, layer by layer
_MISSING = {"inputs": "input statistics", "fisher": "Fisher statistics", "grads": "the output-gradient Gram"}
_INPUT_NAMES = {"weight": "weight", "inputs": "input Gram", "grads": "output-gradient Gram", "fisher": "Fisher rows"}


class SharedWhiteners:
    """The right whiteners of the inputs being factorised, built once per input and shared by its layers.

    An input's whitener is kept while a layer reading it is being factorised, and the
    newest one also after (the next layer usually reads the same input: q/k/v, gate/up).
    Any other is dropped, so one thread in order holds one whitener at a time, and
    threads factorising neighbouring layers at once (``decomposed_layers``) hold those
    they use. Building happens under the lock: a second thread wanting the same input waits
    for it instead of building it again. An input is known by its Gram object (``owner``),
    checked through a weak reference, so a new Gram at a freed one's address is not taken
    for it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[int, list] = {}  # id(owner) -> [whitener, layers using it now, weakref to owner]
        self._newest: int | None = None

    @contextlib.contextmanager
    def use(self, owner: object, build: Callable[[], Whitener]) -> Iterator[Whitener]:
        key = id(owner)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[2]() is not owner:
                entry = self._entries[key] = [build(), 0, weakref.ref(owner)]
                self._newest = key
            entry[1] += 1
            self._drop_unused()
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                self._drop_unused()

    def _drop_unused(self) -> None:
        for key in [k for k, (_, users, _) in self._entries.items() if users == 0 and k != self._newest]:
            del self._entries[key]


class Decomposer:
    """Decomposes layers with one static method, reusing whitening shared by layers with one input.

    q/k/v (and gate/up) share one input Gram, so their Cholesky/eigh factor is
    computed once (``SharedWhiteners``); this and a float64 SVD per layer are the whole
    cost. Calls from several threads at once are safe.
    """

    def __init__(self, method: str, options: DecompositionOptions | None = None):
        if method not in METHODS:
            raise ValueError(f"Unknown decomposition {method!r}: choose from {METHODS}")
        self.method = method
        self.options = options or DecompositionOptions()
        self._static = SPECS[method].method
        self._whiteners = SharedWhiteners()

    def __call__(
        self,
        layer: LayerInfo,
        weight: torch.Tensor,
        inputs: InputStats | None = None,
        grad_gram: torch.Tensor | None = None,
        fisher: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> Factorization:
        """Factorise one layer; `keep` components (default: the break-even rank)."""
        stats = LayerStats(inputs, grad_gram, fisher)
        self._check(layer, stats)
        self._check_finite(layer, weight, stats)
        with single_threaded_lapack(weight.device):
            w = weight.detach().to(self.options.dtype)
            left = self._static.left(stats, self.options, w.device)
            with self._right(stats, w.device) as right:
                f = factorize(w, left, right, keep_of(layer, keep))
        check_finite_factors(layer.name, f.left, f.right, f"{self.method} decomposition", f.sigma)
        return f

    def _check(self, layer: LayerInfo, stats: LayerStats) -> None:
        given = {"inputs": stats.inputs, "fisher": stats.fisher, "grads": stats.grad_gram}
        for need, what in _MISSING.items():
            if need in self._static.needs and given[need] is None:
                raise ValueError(f"{self.method} needs {what} for {layer.name}")

    def _check_finite(self, layer: LayerInfo, weight: torch.Tensor, stats: LayerStats) -> None:
        """NonFiniteFactorsError naming the layer when its weight or a statistic the method reads holds NaN or inf
        (LAPACK would otherwise fail or return NaN factors, differently on each machine)."""
        given = {"weight": weight, "inputs": stats.inputs.gram if stats.inputs is not None else None,
                 "grads": stats.grad_gram, "fisher": stats.fisher}
        read = {"weight"} | set(self._static.needs)
        bad = [name for name, t in given.items() if name in read and t is not None and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteFactorsError(f"layer {layer.name}: {self.method} cannot factorise it: its "
                                        f"{' and '.join(_INPUT_NAMES[b] for b in bad)} hold NaN or inf")

    def _right(self, stats: LayerStats, device: torch.device) -> contextlib.AbstractContextManager[Whitener]:
        if not self._static.shares_input:
            return contextlib.nullcontext(self._static.right(stats, self.options, device))
        return self._whiteners.use(stats.inputs.gram, lambda: self._static.right(stats, self.options, device))
