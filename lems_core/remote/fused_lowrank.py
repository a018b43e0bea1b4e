"""Inference preparation of a low-rank model (torch only): what makes the factorised model faster.

A factorised projection runs two thin GEMMs instead of one, each with its own module
call and kernel launch; at one token per step those overheads and a poor memory layout
eat the saving in bytes. `prepare_for_inference` applies four fixes in place:

- `fuse_shared_inputs`: q, k and v read the same hidden states, and so do gate and up.
  Their first factors (and the whole weight of a member kept dense) are stacked into
  one matrix, so a prompt (at least GROUP_MIN_ROWS rows) runs one wider GEMM per group
  and each member reads its slice. Only `a`, or a dense member, becomes a
  `SharedInputLinear` (an `nn.Linear`); its weight becomes a view into the stack, so
  in-place edits are seen, and a replaced weight (loading, ``model.to(dtype)``) is
  noticed by its data pointer and the stack rebuilt on the next call. Where gradients
  are wanted each member runs on its own weight.
- `lay_out_factors`: second factors (rank -> out, out > rank) are stored column-major,
  so a one-token matrix-vector product streams long contiguous rows.
- each low-rank module multiplies by its factors directly instead of calling `a` and
  `b` as modules (unless they carry hooks or were wrapped, e.g. by adapters).
- `own_memory`: weights a loader left inside a memory-mapped checkpoint file (safetensors
  hands out tensors at the file's unaligned offsets, in file-backed pages) are copied
  into memory PyTorch allocates, where the matrix-vector products read them faster.

Module names and classes, the state dict and the saved format do not change; logits are
those of the unprepared model up to float round-off. Copied next to the weights of a
Hugging Face export (beside `modeling_lowrank.py`, which applies it after loading).
"""
import torch
import torch.nn.functional as F
from torch import nn

# Projections of one block that are called on the very same input tensor.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Below this many input rows a group's members use their own first factor: a matrix-vector product
# reads the same bytes stacked or not, so stacking saves nothing there and its bookkeeping costs; from a
# prompt's width on, the wider GEMM runs faster (bench/inference.py, measured on the demo's shapes).
GROUP_MIN_ROWS = 32


class SharedInputGroup:
    """The stacked first factors of a group and the last input's product, read in slices by the members.

    The product is kept until every member has read its slice (or a new input arrives),
    so a block's q, k, v calls pay for one GEMM between them. Which members have read
    it is a bit mask: this runs once per projection call, so it is kept to a few
    integer operations.
    """

    def __init__(self, members):
        self.members = list(members)
        self.sizes = [m.out_features for m in self.members]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.everyone = (1 << len(self.members)) - 1
        self.weight, self.pointers = None, ()
        self._input, self._product, self._served = None, None, 0

    def is_current(self):
        """Whether every member's weight is still its view into the stacked matrix."""
        for member, pointer in zip(self.members, self.pointers):
            if member.weight.data_ptr() != pointer:
                return False
        return self.weight is not None

    def needs_grad(self):
        return any(m.weight.requires_grad for m in self.members)

    def rebuild(self):
        """Stack the members' current weights and make each weight a view into the stack."""
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in self.members])
            for member, offset, size in zip(self.members, self.offsets, self.sizes):
                member.weight.data = weight[offset:offset + size]
        self.weight, self.pointers = weight, tuple(m.weight.data_ptr() for m in self.members)

    def part(self, x, index):
        """Member ``index``'s product (bias excluded) for input ``x``; one GEMM serves the whole group."""
        bit = 1 << index
        if x is not self._input or self._served & bit:
            if not self.is_current():
                self.rebuild()
            self._input, self._product, self._served = x, F.linear(x, self.weight), 0
        self._served |= bit
        part = self._product.narrow(-1, self.offsets[index], self.sizes[index])
        if self._served == self.everyone:
            self._input = self._product = None
        return part


class SharedInputLinear(nn.Linear):
    """A Linear whose product comes from its group's stacked GEMM (the bias is added here)."""

    group = None
    index = 0

    def product(self, x):
        """``x @ weight^T`` (no bias): the group's slice, or this Linear's own GEMM for a few rows (a one-token
        step) or where gradients are wanted."""
        group = self.group
        if (group is None or x.numel() < GROUP_MIN_ROWS * self.in_features
                or (torch.is_grad_enabled() and group.needs_grad())):
            return F.linear(x, self._parameters["weight"])
        return group.part(x, self.index)

    def forward(self, x):
        out = self.product(x)
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


def _is_low_rank(module):
    return isinstance(getattr(module, "a", None), nn.Linear) and isinstance(getattr(module, "b", None), nn.Linear)


def low_rank_forward(self, x):
    """``b(a(x))`` without the two submodule calls (their Python overhead is much of a one-token step's cost
    for small factors); factors that carry hooks or were wrapped (adapters) are called as modules.

    This runs for every projection of every generated token, so its checks are written out
    inline: submodules and parameters are read from their dicts (not through
    ``nn.Module.__getattr__``), and a one-token step skips the group's product method.
    """
    a, b = self._modules["a"], self._modules["b"]
    kind = type(a)
    if (type(b) is not nn.Linear or (kind is not nn.Linear and kind is not SharedInputLinear)
            or a._parameters["bias"] is not None or a._forward_hooks or a._forward_pre_hooks or b._forward_hooks
            or b._forward_pre_hooks or "_hf_hook" in a.__dict__ or "_hf_hook" in b.__dict__):
        return b(a(x))
    if kind is SharedInputLinear and x.numel() >= GROUP_MIN_ROWS * a.in_features:
        h = a.product(x)
    else:
        h = F.linear(x, a._parameters["weight"])
    return F.linear(h, b._parameters["weight"], b._parameters["bias"])


def column_major(weight):
    """``weight`` (out x in) stored transposed: x @ W^T then streams W^T row by row, what a one-token
    matrix-vector product wants when out > in (the GEMV reads long contiguous rows)."""
    return weight.t().contiguous().t()


def lay_out_factors(model):
    """Store each low-rank module's second factor (rank -> out, out > rank) column-major; returns how many.

    Shapes, values and the state dict are unchanged; only the strides differ.
    """
    count = 0
    with torch.no_grad():
        for module in model.modules():
            b = getattr(module, "b", None)
            if (_is_low_rank(module) and b.out_features > b.in_features and type(b.weight.data) is torch.Tensor
                    and b.weight.device.type != "meta" and b.weight.stride(0) != 1):
                b.weight.data = column_major(b.weight.data)
                count += 1
    return count


def own_memory(model):
    """Copy each CPU parameter whose memory PyTorch did not allocate into memory it does; returns how many.

    A model loaded from safetensors holds its weights inside the memory-mapped file, at the
    file's offsets (often not 64-byte aligned) and in file-backed pages; a one-token step,
    which streams every weight once, reads them measurably slower there than from the
    allocator's aligned memory. Such storage is the one that cannot be resized. Values,
    shapes and strides are kept, and each Parameter object is copied once, so tied
    weights stay tied.
    """
    count = 0
    with torch.inference_mode(False), torch.no_grad():
        for parameter in model.parameters():
            data = parameter.data
            if (type(data) is torch.Tensor and data.device.type == "cpu" and data.numel()
                    and not data.untyped_storage().resizable()):
                parameter.data = data.clone()
                count += 1
    return count


def call_factors_directly(module):
    """Make a low-rank module multiply by its factors without calling them as modules (``low_rank_forward``)."""
    module.forward = low_rank_forward.__get__(module)


def prepare_modules(model, modules):
    """Prepare only ``modules`` (low-rank modules inside ``model``) as `prepare_for_inference` would; returns counts.

    A q/k/v or gate/up group is stacked only where every member is one of ``modules`` (its
    first factors then live inside them), so no other module of ``model`` changes: a timing
    that swaps these modules and their dense twins in and out in turns (``latency``) runs
    the compressed turn on the path an export runs, and leaves the dense turn as it was.
    """
    chosen = {id(m) for m in modules if _is_low_rank(m)}
    groups = 0
    for parent in list(model.modules()):
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if all(id(m) in chosen for m in members):
                groups += fuse_group(parent, names)
    laid_out = direct = 0
    for module in modules:
        if id(module) in chosen:
            laid_out += lay_out_factors(module)
            call_factors_directly(module)
            direct += 1
    return {"groups": groups, "column_major": laid_out, "direct": direct}


def prepare_for_inference(model):
    """Group shared-input projections, lay out second factors for the matvec, call factors directly and give
    memory-mapped weights memory of their own.

    Applied in place after compression or loading; logits stay those of the unprepared
    model up to float round-off, module names, classes and the state dict are unchanged.
    Returns {"groups": ..., "column_major": ..., "direct": ..., "owned": ...} counts.
    """
    groups, laid_out, direct = fuse_shared_inputs(model), lay_out_factors(model), 0
    for module in model.modules():
        if _is_low_rank(module):
            call_factors_directly(module)
            direct += 1
    return {"groups": groups, "column_major": laid_out, "direct": direct, "owned": own_memory(model)}
