"""Inference grouping of low-rank projections that read the same input (torch only).

q, k and v read the same hidden states, and so do gate and up. Once factorised, each
starts with its own thin GEMM ``x @ A_i^T`` (in -> rank_i): small GEMMs that use the
cores poorly and cost a kernel launch and a few module calls each. `fuse_shared_inputs`
stacks the first factors of a group (and the whole weight of a member kept dense) into
one matrix, so the group runs one wider GEMM per input and each member reads its
slice of the result.

Nothing visible changes: every module keeps its name and class (`q_proj` stays a
LowRankLinear with `a` and `b`; only `a`, or a dense member itself, becomes a
`SharedInputLinear`, an `nn.Linear`), and the state dict keeps its keys and shapes.
The members' weights become views into the stacked matrix, so in-place edits of a
weight are seen by the fused GEMM. A weight that is replaced (loading weights,
``model.to(dtype)``) is noticed by its data pointer and the stack is rebuilt on the
next call. With gradients wanted for a member's weight, each member runs on its own.

Copied next to the weights of a Hugging Face export (beside `modeling_lowrank.py`).
"""
import torch
import torch.nn.functional as F
from torch import nn

# Projections of one block that are called on the very same input tensor.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputGroup:
    """The stacked first factors of a group and the last input's result, split per member.

    The result is kept until every member has read its slice of it (or a new input
    arrives), so a block's q, k, v calls pay for one GEMM between them.
    """

    def __init__(self, members):
        self.members = list(members)
        self.sizes = [m.out_features for m in self.members]
        self.weight, self.pointers = None, ()
        self._clear()

    def _clear(self):
        self._input, self._parts, self._served = None, (), set()

    def is_current(self):
        """Whether every member's weight is still its view into the stacked matrix."""
        return self.weight is not None and all(
            m.weight.data_ptr() == p for m, p in zip(self.members, self.pointers))

    def needs_grad(self):
        return any(m.weight.requires_grad for m in self.members)

    def rebuild(self):
        """Stack the members' current weights and make each weight a view into the stack."""
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in self.members])
            offset = 0
            for member, size in zip(self.members, self.sizes):
                member.weight.data = weight[offset:offset + size]
                offset += size
        self.weight, self.pointers = weight, tuple(m.weight.data_ptr() for m in self.members)

    def part(self, x, index):
        """Member ``index``'s output (bias excluded) for input ``x``; one GEMM serves the whole group."""
        if x is not self._input or index in self._served:
            if not self.is_current():
                self.rebuild()
            self._input, self._served = x, set()
            self._parts = F.linear(x, self.weight).split(self.sizes, dim=-1)
        self._served.add(index)
        part = self._parts[index]
        if len(self._served) == len(self.members):
            self._clear()
        return part


class SharedInputLinear(nn.Linear):
    """A Linear whose product comes from its group's stacked GEMM (the bias is added here)."""

    group = None
    index = 0

    def forward(self, x):
        group = self.group
        if group is None or (torch.is_grad_enabled() and group.needs_grad()):
            return super().forward(x)
        out = group.part(x, self.index)
        return out if self.bias is None else out + self.bias


def _first_linear(member):
    """The Linear a member's input goes through first: ``a`` of a low-rank module, or the member if dense."""
    a, b = getattr(member, "a", None), getattr(member, "b", None)
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        return a
    return member if isinstance(member, nn.Linear) else None


def _shared(linear, group, index):
    """``linear`` as a SharedInputLinear holding the same Parameter objects."""
    if isinstance(linear, SharedInputLinear):
        shared = linear
    else:
        shared = SharedInputLinear(linear.in_features, linear.out_features, bias=False, device="meta")
        shared.weight, shared.bias = linear.weight, linear.bias
        shared.train(linear.training)
    shared.group, shared.index = group, index
    return shared


def fuse_group(parent, names):
    """Group ``parent``'s projections ``names``; returns whether it did (some member factorised, all fusable)."""
    members = [getattr(parent, n, None) for n in names]
    firsts = [_first_linear(m) if m is not None else None for m in members]
    if any(f is None or getattr(m, "_hf_hook", None) is not None for f, m in zip(firsts, members)):
        return False  # an unknown member, or one accelerate offloads: left as it is
    if all(f is m for f, m in zip(firsts, members)):
        return False  # all dense: not a compressed group
    weights = [f.weight for f in firsts]
    if any(type(w.data) is not torch.Tensor for w in weights):
        return False  # sharded (DTensor) or otherwise wrapped weights: not ours to restack
    if len({(w.dtype, w.device, f.in_features) for w, f in zip(weights, firsts)}) != 1:
        return False
    group = SharedInputGroup(firsts)
    for i, (name, member, first) in enumerate(zip(names, members, firsts)):
        shared = _shared(first, group, i)
        group.members[i] = shared
        if first is member:
            setattr(parent, name, shared)
        else:
            member.a = shared
    return True


def fuse_shared_inputs(model):
    """Group, in place, the projections of each block that share their input; returns how many groups.

    Apply after compression (or after loading), for inference: logits are those of the
    ungrouped model up to float round-off. Calling it again regroups from scratch.
    """
    count = 0
    for module in list(model.modules()):
        for names in SHARED_INPUT_GROUPS:
            if all(hasattr(module, n) for n in names):
                count += fuse_group(module, names)
    return count
