"""Statistics + decomposition under a memory budget, block window after block window.

The classic path (``pipeline.artefacts.statistics_for`` then ``factorizations_for``) holds every
Gram of the model at once: about 59 GB fp32 of KFAC output-gradient Grams for
Llama-3-8B. Here the Grams of one window of consecutive blocks are alive at a time
(``memory.plan_windows``), each layer is decomposed as soon as its block's Grams are
complete, its Grams are released right after, and each block's factors go to disk
(``factor_store``), so peak memory does not grow with depth.

Budget: ``max_memory`` is what statistics + decomposition may use on top of the
loaded model (default: what the device has free). The decomposition's own float64
work arrays for the largest layer (``decomposition_workspace``) are set aside
first, and so are one block's full-rank factors (``block_factor_bytes``: held
in float32 from its decomposition until its block file is written, counted in the
ledger under the block's prefix); the rest is the Gram budget. FWSVD's Fisher rows stream the same way
(``statistics.window_fisher_rows``): its windows count the rows and one layer's
weight gradient, the transient each row is reduced from.

Under torch.distributed each rank decomposes only the layers it ``owns``; the
statistics (forward/backward passes) are computed on every rank, so no Gram ever
crosses the network: only spectra and KL values are merged (``distributed``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import torch

from .cache import default_cache_dir, key_of
from .decompositions import DecompositionOptions, Decomposer, spec_of
from .factor_store import FactorShards, finish, is_complete, write_block, check_factor_dtype
from .memory import (DEFAULT_FRACTION, INPUT_GROUP, BlockWindow, GramLedger, MemoryBudgetError,  # noqa: F401
                     budget_or_default, format_bytes, plan_windows)
from .model import LayerInfo, LoadedModel, compressible_layers
from .offload import module_weight
from .run import DEFAULT_RUN, Run
from .statistics import gram_key, iter_block_statistics


@dataclass(frozen=True)
class StreamPlan:
    """How a streamed build will run: the Gram budget, the windows, what was set aside."""

    max_memory: int
    workspace: int
    windows: tuple[BlockWindow, ...]
    factors: int = 0  # one block's full-rank factors, alive until the block file is written
    reserve: int = 0  # what the process held beyond the weights before the build (memory.process_overhead)

    @property
    def gram_budget(self) -> int:
        """What the ledger may hold: Grams of a window plus one block's factors."""
        return self.max_memory - self.workspace - self.reserve

    @property
    def passes(self) -> int:
        """Backward passes over the calibration set (one per window) when G is needed."""
        return len(self.windows)


def decomposition_workspace(layers: list[LayerInfo], dtype: torch.dtype = torch.float64) -> int:
    """Bytes the decomposition of the largest layer needs beyond its Grams.

    The side whitener's square matrix in ``dtype`` (its Cholesky factor is computed in
    place) plus the weight, the whitened matrix and the two factors (each m x n or
    less) in ``dtype``.
    """
    item = torch.finfo(dtype).bits // 8
    side = max(max(l.out_features, l.in_features) ** 2 for l in layers)
    weight = max(l.params for l in layers)
    return item * (side + 4 * weight)


def block_factor_bytes(layers: list[LayerInfo]) -> int:
    """Bytes of the largest block's full-rank float32 factors (left m x k, right k x n, k = min(m, n)).

    A block's factors stay in memory until its block file is written, so the plan sets
    them aside beside the Grams.
    """
    per_block: dict[int, int] = {}
    for l in layers:
        k = min(l.out_features, l.in_features)
        per_block[l.block] = per_block.get(l.block, 0) + 4 * k * (l.out_features + l.in_features)
    return max(per_block.values(), default=0)


def plan_stream(layers: list[LayerInfo], decomposition: str, max_memory: int | None, device,
                options: DecompositionOptions | None = None, reserve: int = 0) -> StreamPlan:
    """The windows for ``max_memory`` bytes (None: DEFAULT_FRACTION of what ``device`` has free).

    ``reserve`` bytes are set aside first: what the process already holds beyond the
    weights (``memory.process_overhead``), so the budget bounds the whole process.
    """
    options = options or DecompositionOptions()
    budget = budget_or_default(max_memory, device)
    workspace = decomposition_workspace(layers, options.dtype)
    factors = block_factor_bytes(layers)
    if budget <= reserve + workspace + factors:
        held = f"what the process already holds ({format_bytes(reserve)}), " if reserve else ""
        raise MemoryBudgetError(f"memory budget {format_bytes(budget)} is below {held}the decomposition's work arrays "
                                f"for the largest layer and one block's factors ({format_bytes(reserve + workspace + factors)} "
                                f"in all); raise --max-memory")
    needs = spec_of(decomposition).needs & {"inputs", "grads", "fisher"}
    windows = plan_windows(layers, needs, budget - reserve - workspace - factors)
    return StreamPlan(budget, workspace, tuple(windows), factors, reserve)


def streamed_dir(loaded: LoadedModel, stats_key: dict, decomposition: str, options: dict, factor_dtype: str,
                 cache_dir: Path | None, shard: tuple[int, int] | None = None) -> Path:
    """Cache folder of a streamed build's block files; a rank's partial shard has its own key."""
    key = key_of(loaded.fingerprint, stats_key, decomposition, options, "streamed", factor_dtype, shard)
    return (cache_dir or default_cache_dir()) / "tensors" / "factor_blocks" / key


def streamed_factorizations(
    loaded: LoadedModel, calib_ids: torch.Tensor | None, decomposition: str, options: DecompositionOptions,
    folder: Path, plan: StreamPlan, owned: Collection[str] | None = None, ledger: GramLedger | None = None, *,
    run: Run = DEFAULT_RUN,
) -> FactorShards:
    """Factorise every layer (or only ``owned``) window by window, freeing Grams as it goes.

    Returns the on-disk factors in ``run.factor_dtype`` (reused when ``folder`` is complete
    and intact). ``ledger`` (default: a new one limited to the plan's Gram budget) counts
    every Gram allocated and released.
    """
    factor_dtype = run.factor_dtype
    check_factor_dtype(factor_dtype)
    if is_complete(folder):
        shards = FactorShards(folder, loaded.device)
        if shards.verify():
            return shards
    layers = compressible_layers(loaded.model)
    mine = [l for l in layers if owned is None or l.name in owned]
    needs = spec_of(decomposition).needs
    ledger = ledger if ledger is not None else GramLedger(limit=plan.gram_budget)
    stats = iter_block_statistics(loaded.model, calib_ids, layers, needs, list(plan.windows), ledger,
                                  progress=run.progress, grad_layers=mine)
    group_of = {l.name: INPUT_GROUP[l.kind] for l in layers}
    for block in stats:
        _decompose_block(loaded, block, [l for l in mine if l.block == block.block], group_of, decomposition, options,
                         folder, factor_dtype, ledger)
    finish(folder, {l.name: l.block for l in mine}, factor_dtype,
           {"decomposition": decomposition, "max_memory": plan.max_memory, "windows": len(plan.windows),
            "gram_peak": ledger.peak})
    return FactorShards(folder, loaded.device)


def _decompose_block(loaded: LoadedModel, block, layers: list[LayerInfo], group_of: dict[str, str], decomposition: str,
                     options: DecompositionOptions, folder: Path, factor_dtype: str, ledger: GramLedger) -> None:
    """Decompose one block's layers, releasing each Gram once no later layer of the block reads it."""
    decomposer = Decomposer(decomposition, options)  # fresh: it holds no whitener of an earlier block
    last_reader = {INPUT_GROUP[l.kind]: l.name for l in layers}
    factors = {}
    for layer in layers:
        grad = block.grad_gram.pop(layer.name, None)
        with module_weight(loaded.model, layer.name) as weight:
            factors[layer.name] = decomposer(layer, weight, block.inputs.get(layer.name), grad,
                                             block.fisher.pop(layer.name, None))
        _count_factors(ledger, block.block, layer.name, factors[layer.name])
        del grad
        ledger.release(gram_key(block.block, "G", layer.name))
        ledger.release(gram_key(block.block, "F", layer.name))
        group = INPUT_GROUP[layer.kind]
        if last_reader[group] == layer.name:
            for name in [n for n in block.inputs if group_of[n] == group]:
                del block.inputs[name]
            decomposer = Decomposer(decomposition, options)  # drop the cached whitener of that input
            ledger.release(gram_key(block.block, "A", group))
    block.inputs.clear()
    write_block(folder, block.block, factors, factor_dtype)
    factors.clear()
    ledger.release_prefix(f"{block.block}.")  # this block's factors, and Grams of layers this rank does not own


def _count_factors(ledger: GramLedger, block: int, name: str, factors) -> None:
    """Count a layer's factors in the ledger until its block file is written (they are part of the budget)."""
    ledger.take(gram_key(block, "U", name), factors.left)
    ledger.take(gram_key(block, "V", name), factors.right)
