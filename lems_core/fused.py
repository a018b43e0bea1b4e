"""Inference preparation of a compressed model: grouped shared-input GEMMs, factor layout, direct calls.

`prepare_for_inference(model)` runs after compression or loading:

- `fuse_shared_inputs`: q/k/v, and gate/up, read the same input; their first factors
  (and any member kept dense) become one wider GEMM per prompt, split per member;
- `lay_out_factors`: second factors (rank -> out, out > rank) are stored column-major,
  which a one-token matrix-vector product reads in long contiguous rows;
- each low-rank module multiplies by its factors directly, without calling them as
  modules (two module calls per projection are much of a one-token step's cost);
- `own_memory`: weights still inside a memory-mapped checkpoint (a model loaded from
  safetensors) are copied into allocated, aligned memory, which a matvec reads faster.

`prepare_modules(model, modules)` does the same to chosen low-rank modules only (groups
whose members are all among them), leaving every other module as it is: the latency
timing of `evaluate --measure-latency` runs its compressed turn on the export's path.

Module names, the projections' classes, the state dict and the saved format stay as
they are; logits equal the unprepared model's up to float round-off. The code lives in
`remote/fused_lowrank.py` (torch only) because a Hugging Face export ships it beside
`modeling_lowrank.py`, whose CausalLM applies it after loading.
"""
from .remote.fused_lowrank import (GROUP_MIN_ROWS, SHARED_INPUT_GROUPS, SharedInputGroup, SharedInputLinear,
                                   fuse_shared_inputs, lay_out_factors, own_memory, prepare_for_inference,
                                   prepare_modules)

__all__ = ["GROUP_MIN_ROWS", "SHARED_INPUT_GROUPS", "SharedInputGroup", "SharedInputLinear", "fuse_shared_inputs",
           "lay_out_factors", "own_memory", "prepare_for_inference", "prepare_modules"]
