"""Inference grouping of the low-rank projections that share their input (q/k/v, gate/up).

`fuse_shared_inputs(model)` runs after compression or loading: each group's first
factors (and any member kept dense) become one wider GEMM, split per member. Module
names, classes of the projections, the state dict and the saved format stay as they
are; logits equal the ungrouped model's up to float round-off. The implementation
lives in `remote/fused_lowrank.py` (torch only) because a Hugging Face export ships it
beside `modeling_lowrank.py`, which applies it too.
"""
from .remote.fused_lowrank import SHARED_INPUT_GROUPS, SharedInputGroup, SharedInputLinear, fuse_shared_inputs

__all__ = ["SHARED_INPUT_GROUPS", "SharedInputGroup", "SharedInputLinear", "fuse_shared_inputs"]
