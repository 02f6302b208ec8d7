"""DeepSpeed ZeRO-3 engines: a training engine for the student, an inference-only one for the teacher.

What trains in which optimizer group (``param_groups``), which modules ZeRO-3 gathers whole
(``mark_leaves``), and the engines built on them. The ds_config they take is read, checked and
filled from the run config in ``engines/ds_config.py``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from ..conversion.placement import rotary_in_float32

__all__ = [
    "build_training_engine",
    "clear_grads_after_step",
    "keep_unchanged_persistent",
    "build_teacher_engine",
    "param_groups",
    "parameter_kinds",
    "register_mixer_params",
    "mark_leaves",
    "needs_grad_input",
    "forget_leaf_owners",
    "graph_free_linear",
    "ParamSavingLinear",
    "use_graph_free_linear",
    "begin_step",
]

logger = logging.getLogger("cald_scale.engines")


def parameter_kinds(student: nn.Module, blocks: nn.Module | None = None) -> Callable[[nn.Parameter], str]:
    """``kind(p)`` of the student's parameters: "mixers" (the new mixers), "copied" (from the
    teacher, inside ``blocks``) or "outside" (copied, outside ``blocks``: embedding, final norm,
    head); without ``blocks`` every copied weight is "copied"."""
    mixer_ids = {id(p) for p in student.mixer_parameters()}
    inside = {id(p) for p in blocks.parameters()} if blocks is not None else None

    def kind(p: nn.Parameter) -> str:
        if id(p) in mixer_ids:
            return "mixers"
        return "copied" if inside is None or id(p) in inside else "outside"

    return kind


def param_groups(student: nn.Module, lr: float, copied_lr_scale: float, weight_decay: float, *, blocks: nn.Module | None = None) -> list[dict]:
    """Mixers at the peak LR, copied teacher weights at a scaled LR; frozen weights left out.

    ``blocks``: the copied weights outside these (embedding, final norm, head) get groups of
    their own, named ``outside``, which a teacher-forced phase holds at LR 0
    (``distill.phases.set_phase_lr``). That phase never reaches them, and a zero gradient
    alone does not keep them still: AdamW's decay and an earlier phase's momentum move any
    weight whose LR is above 0. Parameters marked ``_no_weight_decay`` (Mamba's A_log, D,
    dt_bias) get no weight decay.
    """
    kind = parameter_kinds(student, blocks)
    groups = []
    for name, scale in (("mixers", 1.0), ("copied", copied_lr_scale), ("outside", copied_lr_scale)):
        params = [p for p in student.parameters() if p.requires_grad and kind(p) == name]
        decay = [p for p in params if not getattr(p, "_no_weight_decay", False)]
        no_decay = [p for p in params if getattr(p, "_no_weight_decay", False)]
        if decay:
            groups.append({"params": decay, "lr": lr * scale, "weight_decay": weight_decay, "name": name})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr * scale, "weight_decay": 0.0, "name": f"{name}_no_decay"})
    if not groups:
        raise ValueError("the student has no trainable parameter")
    return groups


def register_mixer_params(model: nn.Module) -> None:
    """Let ZeRO-3 gather the parameters a mixer reads from its children without calling them.

    Mixers hand ``conv1d.weight`` (and Mamba's ``dt_proj``) straight to scan kernels, so the
    child's own pre-forward hook never fires; registering them as external parameters of
    the mixer makes the mixer's hook gather them.
    """
    import deepspeed

    mixers = model.mixers() if hasattr(model, "mixers") else []
    for mixer in mixers:
        own = {id(p) for p in mixer.parameters(recurse=False)}
        for param in mixer.parameters():
            if id(param) not in own:
                deepspeed.zero.register_external_parameter(mixer, param)


def mark_leaves(blocks, mode: str = "blocks") -> list[nn.Module]:
    """Make whole blocks (``mode="blocks"``) or the largest parts of each block that hold no
    trainable parameter (``"frozen"``) ZeRO-3 leaf modules; ``"none"`` marks nothing.

    DeepSpeed hooks every submodule: a gather before its forward, a release after, the same
    around its backward, each wrapping its outputs in autograd functions. At 512 tokens that
    host work was most of a distillation step (2.5x the teacher's forward plus the student's
    forward and backward on an H200). A leaf gathers all its parameters in one hook, and its
    children get none.

    A trainable leaf has one condition: DeepSpeed reduces its gradients in its full backward
    hook, and PyTorch fires that hook before the leaf's own backward when no input of the leaf
    requires grad (a student block fed by a frozen embedding, or by the teacher in a
    teacher-forced phase). ``LayerwiseModel.block`` gives such a block an input that requires
    grad (``needs_grad_input``). Call this before the engine is built, once trainability is
    final for the run (a frozen part must never train later). Returns the leaves.

    A parameter that several blocks share (a Linformer's one length projection, ``sharing:
    layer``) is never inside a leaf: DeepSpeed would reduce it once, in the last such leaf's
    backward hook, before the other blocks add their parts, and its gradient came out zero.
    Such a block's other parts become leaves; the shared module keeps its own hooks.
    """
    from deepspeed.utils import set_z3_leaf_module

    if mode not in ("blocks", "frozen", "none"):
        raise ValueError(f"unknown ZeRO-3 leaf mode {mode!r}; use 'blocks', 'frozen' or 'none'")
    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
    leaves: list[nn.Module] = []
    blocks = list(blocks)
    in_blocks = Counter(id(p) for block in blocks for p in block.parameters())  # parameters() lists a shared one once per block
    shared = {pid for pid, count in in_blocks.items() if count > 1}

    def visit(module: nn.Module, whole: bool) -> None:
        params = list(module.parameters())
        if not params:
            return
        # NOTE: a module without children gets one hook pair either way; containers are never called.
        callable_parent = next(module.children(), None) is not None and not isinstance(module, containers)
        holds_shared = any(id(p) in shared for p in params)
        if callable_parent and not holds_shared and (whole or not any(p.requires_grad for p in params)):
            set_z3_leaf_module(module, True)
            leaves.append(module)
            return
        for child in module.children():
            visit(child, whole and holds_shared)

    if mode != "none":
        for block in blocks:
            visit(block, mode == "blocks")
    return leaves


def needs_grad_input(block: nn.Module) -> bool:
    """Whether ``block`` is a trainable ZeRO-3 leaf, whose input must require grad for DeepSpeed
    to reduce its gradients after its backward, not before (see ``mark_leaves``)."""
    # NOTE: DeepSpeed's mark (deepspeed.utils.z3_leaf_module reads the same attribute; read here
    # directly, so running blocks needs no DeepSpeed import).
    return getattr(block, "_z3_leaf", False) and any(p.requires_grad for p in block.parameters())


def forget_leaf_owners(leaves: list[nn.Module]) -> None:
    """Drop the reference to its leaf module that DeepSpeed leaves on each leaf's parameters.

    DeepSpeed reads ``param.ds_z3_leaf_module`` once, when its optimizer builds the gradient
    hooks, and only for trainable parameters, which a frozen leaf never holds. Kept, it ties a
    parameter to its module: a frozen weight the student shares with the teacher (a norm) then
    kept the teacher's whole block, and its partitions, alive after the teacher was released.
    """
    for leaf in leaves:
        for param in leaf.parameters():
            if getattr(param, "ds_z3_leaf_module", None) is leaf:
                del param.ds_z3_leaf_module


# DeepSpeed's F.linear, which graph_free_linear replaced (set by use_graph_free_linear).
_memory_efficient_linear = None


class ParamSavingLinear(torch.autograd.Function):
    """DeepSpeed's memory-efficient linear (``LinearFunctionForZeroStage3``): the same arithmetic,
    saving the weight parameter itself for backward, in the ``forward(ctx, ...)`` form.

    NOTE: DeepSpeed's Function defines ``setup_context``, so torch's ``Function.apply`` binds its
    arguments through ``inspect.signature`` on every call, and its backward enters an autocast
    context: 130 us against 75 us a forward and backward at width 64 on one CPU thread, 150
    times a step on the narrow proxy of ``benchmarks/train_speed.py``. Under autocast,
    ``graph_free_linear`` still calls DeepSpeed's, which replays the forward's autocast state, and
    under functorch transforms (``torch.func``), which need ``setup_context``. Its forward ran
    with autocast off, so its backward does too, as DeepSpeed's would (a backward called inside
    an autocast region would otherwise compute in the region's dtype).
    """

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The parameter, not a view of its gathered data: ZeRO-3's release then frees that data.
        ctx.save_for_backward(input, weight, bias)
        if input.dim() == 2 and bias is not None:
            return torch.addmm(bias, input, weight.t())
        output = input.matmul(weight.t())
        if bias is not None:
            output += bias
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        device_type = grad_output.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return ParamSavingLinear._backward(ctx, grad_output)
        return ParamSavingLinear._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output: torch.Tensor):
        input, weight, bias = ctx.saved_tensors
        # A weight released since forward (its module's backward hook did not gather it) is
        # gathered for this product alone, as DeepSpeed's Function does.
        released = getattr(getattr(weight, "ds_status", None), "name", None) == "NOT_AVAILABLE"
        if released:
            weight.all_gather()
        try:
            grad_input = grad_weight = grad_bias = None
            dim = grad_output.dim()
            if ctx.needs_input_grad[0]:
                grad_input = grad_output.matmul(weight)
            if ctx.needs_input_grad[1]:
                if dim > 2:
                    grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(input.reshape(-1, input.shape[-1]))
                elif dim == 1:
                    grad_weight = grad_output.unsqueeze(-1) * input.unsqueeze(0)
                else:
                    grad_weight = grad_output.t().matmul(input)
            if bias is not None and ctx.needs_input_grad[2]:
                grad_bias = grad_output.sum(list(range(dim - 1))) if dim > 1 else grad_output
            return grad_input, grad_weight, grad_bias
        finally:
            if released:
                weight.partition()


def graph_free_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` under ZeRO-3: a linear that saves the weight parameter (not a view of its
    gathered data) when autograd will save tensors for backward, torch's own when it will not
    (no grad, or nothing requiring it).

    DeepSpeed replaces ``F.linear`` with an autograd Function that saves the weight parameter
    rather than a view of its gathered data (a view would keep every gathered weight alive
    until backward). It does so for every call, and that Function's ``apply`` binds its
    arguments with ``inspect.signature`` each time. A frozen teacher's forward runs under
    no grad and saves nothing, so there it is pure host work: 30% of the teacher's forward in
    the narrow (host-bound) distillation step (``benchmarks/train_speed.py --narrow``).
    Where a gradient flows, ``ParamSavingLinear`` does what DeepSpeed's does, with less host work.
    """
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        if torch.is_autocast_enabled(input.device.type) or torch._C._are_functorch_transforms_active():
            return _memory_efficient_linear(input, weight, bias)
        return ParamSavingLinear.apply(input, weight, bias)
    return torch._C._nn.linear(input, weight, bias)


def use_graph_free_linear() -> None:
    """Put ``graph_free_linear`` in place of DeepSpeed's ``F.linear`` where DeepSpeed installed
    its own (ZeRO-3's ``memory_efficient_linear``, on by default; it stays installed for the
    process). A config that turned it off keeps torch's ``F.linear``."""
    global _memory_efficient_linear
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    if torch.nn.functional.linear is zero3_linear_wrap:
        _memory_efficient_linear = zero3_linear_wrap
        torch.nn.functional.linear = graph_free_linear


def _initialize(model: nn.Module, ds_config: dict, leaf_blocks=None, leaves: str = "blocks", **kwargs):
    """``deepspeed.initialize`` with ``leaf_blocks`` (or their frozen parts) as ZeRO-3 leaves:
    marked before DeepSpeed registers its hooks, their parameters' leaf references dropped after
    (DeepSpeed has read the trainable ones by then)."""
    import deepspeed

    marked = mark_leaves(leaf_blocks, leaves) if leaf_blocks is not None else []
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kwargs)
    forget_leaf_owners(marked)
    use_graph_free_linear()
    # NOTE: DeepSpeed 0.19.0-0.19.1 cast a bf16 engine's buffers too, rotary tables included.
    rotary_in_float32(engine.module)
    return engine


def build_training_engine(model: nn.Module, ds_config: dict, groups: list[dict], *, shares_weights_with=None, leaf_blocks=None, leaves: str = "blocks"):
    """A training engine (the student's; a trajectory teacher's). ``shares_weights_with``:
    the teacher engine whose parameters the student uses for its frozen copied weights.
    ``leaf_blocks``: blocks that become ZeRO-3 leaves, whole or their frozen parts as
    ``leaves`` says (``mark_leaves``)."""
    if shares_weights_with is not None:
        # NOTE: both engines gather the shared parameters; one in-flight registry lets
        # either engine wait on a gather (prefetch) that the other one started.
        model.ds_inflight_param_registry = shares_weights_with.module.ds_inflight_param_registry
    engine = _initialize(model, ds_config, leaf_blocks, leaves, model_parameters=groups)
    if engine.zero_optimization_partition_weights():
        register_mixer_params(engine.module)
        share_fp32_master(engine.optimizer)
        read_fp32_grads_in_place(engine.optimizer)
        if not clear_grads_after_step(engine.optimizer):  # a correctness fix, not a speed-up: never skipped unsaid
            import deepspeed

            raise RuntimeError(
                f"DeepSpeed {deepspeed.__version__}'s ZeRO-3 optimizer has no step or grad_partitions_flat_buffer to clear "
                "after each step: engines/zero3.clear_grads_after_step needs porting to this release"
            )
        keep_unchanged_persistent(engine.optimizer)
    return engine


def clear_grads_after_step(optimizer) -> bool:
    """Zero ZeRO-3's gradient partitions after every optimizer step.

    DeepSpeed writes (or, after the first micro-batch, adds) a parameter's gradient partition
    only when a backward reached it, yet its step reads every trainable parameter's partition.
    A trainable parameter no backward reached in a step (a teacher-forced stage skipped for a
    non-finite loss; a block no loss term reaches) would be stepped again with the gradient
    it had at its last update, already clipped. Zeroed, it is stepped with no gradient.
    Returns whether the step was wrapped."""
    step = getattr(optimizer, "step", None)
    if step is None or not hasattr(optimizer, "grad_partitions_flat_buffer"):
        return False

    def stepped(*args, **kwargs):
        out = step(*args, **kwargs)
        # NOTE: read at each step: DeepSpeed rebinds the buffer (offload, reload_states).
        if optimizer.grad_partitions_flat_buffer is not None:
            optimizer.grad_partitions_flat_buffer.zero_()
        for flat in getattr(optimizer, "fp32_partitioned_groups_flat", []):  # an offloaded optimizer's own fp32 gradients
            if flat.grad is not None:
                flat.grad.zero_()
        return out

    optimizer.step = stepped
    return True


class _ParamList:
    """The two module methods ZeRO-3's ``release_and_reset_all`` reads, over chosen parameters."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params

    def named_parameters(self, recurse: bool = True):
        return ((str(i), p) for i, p in enumerate(self.params))

    def ds_external_parameters(self):
        return iter(())


def keep_unchanged_persistent(optimizer) -> bool:
    """Let ZeRO-3's optimizer step release and regather only the parameters it changes.

    ZeRO-3 keeps small parameters (under ``stage3_param_persistence_threshold``) gathered
    through forward and backward, but every optimizer step releases every parameter, then
    gathers the persistent ones again so that each rank sees their update. A persistent
    parameter outside the optimizer's groups (frozen: norms, a frozen student's copied
    weights) comes back unchanged; on one rank, a trained one whose gathered tensor is its
    partition (a view, not a copy) already holds its update when the step writes the
    partition in place. Their round trip is host work per parameter at every step (361 of the
    student's 392 parameters are persistent on the narrow proxy of ``benchmarks/train_speed.py``,
    whose ``--compare-zero3`` times the step both ways: 1.072x). The step keeps those gathered
    and releases and regathers the rest as DeepSpeed does; the state after it is the same.
    Returns whether the step was wrapped."""
    step = getattr(optimizer, "step", None)
    offload = getattr(optimizer, "parameter_offload", None)
    persistent = getattr(optimizer, "persistent_parameters", None)
    if step is None or offload is None or not persistent or not hasattr(optimizer, "fp16_groups"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    stepped_ids = {id(p) for group in optimizer.fp16_groups for p in group}
    # NOTE: listed once: walking the module tree for them took 1.5 ms a step on the narrow proxy.
    # DeepSpeed's own lists (its groups, its hooks) are fixed at the engine's construction too.
    every_param = list(iter_params(offload.module, recurse=True))

    def unchanged_by_step(p: nn.Parameter) -> bool:
        if p.ds_status != ZeroParamStatus.AVAILABLE:
            return False
        if id(p) not in stepped_ids:
            return True
        # NOTE: checked at each step: the partition must be the very tensor the forward reads (one
        # rank; not on another device, as a partition offloaded from a GPU is, nor quantised or swapped).
        partition = p.ds_tensor
        return (
            getattr(p, "ds_zero_partition_world_size", None) == 1
            and partition is not None
            and p.data.data_ptr() == partition.data_ptr()
            and p.data.device == partition.device
            and p.data.dtype == partition.dtype
        )

    def stepped(*args, **kwargs):
        kept = [p for p in persistent if unchanged_by_step(p)]
        if not kept:
            return step(*args, **kwargs)
        kept_ids = {id(p) for p in kept}
        for p in kept:
            p.ds_active_sub_modules.clear()  # as DeepSpeed's release does for every parameter
        released = [p for p in every_param if id(p) not in kept_ids]
        coordinator = offload.get_param_coordinator()
        optimizer._partition_all_parameters = lambda: coordinator.release_and_reset_all(_ParamList(released))
        optimizer.persistent_parameters = [p for p in persistent if id(p) not in kept_ids]  # what the step gathers again
        try:
            out = step(*args, **kwargs)
        finally:
            del optimizer._partition_all_parameters  # DeepSpeed's own again (checkpoints release everything)
            optimizer.persistent_parameters = persistent
        # A step that moved a kept trained parameter's partition elsewhere (none known) left its
        # gathered tensor stale: gather it from the partition, as DeepSpeed would have.
        moved = [p for p in kept if id(p) in stepped_ids and p.data.data_ptr() != p.ds_tensor.data_ptr()]
        if moved:
            for p in moved:
                p.partition()
            moved[0].all_gather(moved)
        return out

    optimizer.step = stepped
    return True


def share_fp32_master(optimizer) -> int:
    """Let ZeRO-3 update fp32 parameters in place instead of through a second fp32 copy.

    DeepSpeed keeps an fp32 "master" copy of every partition, and means to skip it when the
    parameters already are fp32 on the optimizer's device; but it compares a tensor's
    ``torch.device`` with a device *name* string, which is never equal, so fp32 training
    holds every trainable parameter twice (4 bytes each: 2.2 GB at 0.5B). Aliasing the
    master to the partition is what DeepSpeed's own branch does; returns the bytes freed.
    """
    freed = 0
    low = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    master = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if not low or not master:
        return 0
    for flat, fp32 in zip(low, master):
        if flat is None or fp32 is flat or fp32.numel() == 0:
            continue
        if flat.dtype == fp32.dtype and flat.device == fp32.device and flat.shape == fp32.shape and flat.data_ptr() != fp32.data_ptr():
            freed += fp32.numel() * fp32.element_size()
            fp32.data = flat.data  # the optimizer keeps this same tensor object; it now updates the partition itself
    if freed:
        logger.info("ZeRO-3: fp32 parameters are their own master copy (%.2f GB not duplicated)", freed / 1e9)
    return freed


def read_fp32_grads_in_place(optimizer) -> bool:
    """Let ZeRO-3's optimizer step read each sub-group's gradient partitions where they lie.

    Before updating a sub-group, DeepSpeed flattens its gradient partitions into a new tensor:
    a copy of every trainable gradient at every step (0.2 s a step for SmolLM2-135M's mixers on
    one CPU core, and a transient of the gradients' size at the memory peak). In fp32 without an
    offloaded optimizer those partitions already lie end to end in one flat buffer, in the
    sub-group's order, so the flattened tensor can be a view of it. The step scales that view in
    place (clipping), which is harmless: the next backward overwrites the buffer before it adds
    to it. A sub-group whose partitions do not lie so (a frozen parameter's zeros, another
    dtype) takes DeepSpeed's own copy. Returns whether the step was rerouted.
    """
    original = getattr(optimizer, "_prepare_fp32_grad_for_sub_group", None)
    needed = ("averaged_gradients", "fp32_partitioned_groups_flat")
    if original is None or not all(hasattr(optimizer, name) for name in needed) or getattr(optimizer, "offload_optimizer", False):
        return False

    def prepare(sub_group_id: int) -> None:
        # NOTE: read at each step: DeepSpeed rebinds averaged_gradients (after an overflow, on reload_states).
        grads, master = optimizer.averaged_gradients, optimizer.fp32_partitioned_groups_flat[sub_group_id]
        view = _consecutive_view(grads.get(sub_group_id), master)
        if view is None:
            original(sub_group_id)
            return
        master.grad = view
        grads[sub_group_id] = None  # as DeepSpeed does once it has read them

    optimizer._prepare_fp32_grad_for_sub_group = prepare
    return True


def _consecutive_view(parts: list[torch.Tensor] | None, like: torch.Tensor) -> torch.Tensor | None:
    """One flat view over ``parts`` when they lie end to end in one storage and match ``like``'s
    dtype, device and element count; else None."""
    if not parts or like.dim() != 1:
        return None
    first = parts[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for part in parts:
        if part.dtype != like.dtype or part.device != like.device or not part.is_contiguous():
            return None
        if part.untyped_storage().data_ptr() != storage or part.storage_offset() != offset:
            return None
        offset += part.numel()
    if offset - first.storage_offset() != like.numel():
        return None
    return first.as_strided((like.numel(),), (1,), first.storage_offset())


def build_teacher_engine(teacher: nn.Module, ds_config: dict, *, leaf_blocks=None, leaves: str = "blocks"):
    """An inference-only engine for a frozen teacher; ``leaf_blocks``: its blocks, each then
    gathered whole in one hook unless ``leaves`` is "none" (``mark_leaves``)."""
    teacher.eval().requires_grad_(False)
    engine = _initialize(teacher, ds_config, leaf_blocks, leaves)
    engine.eval()
    return engine


def _param_coordinator(engine):
    """The ZeRO-3 coordinator that gathers, prefetches and releases an engine's parameters."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    offload = engine.optimizer if isinstance(engine.optimizer, DeepSpeedZeRoOffload) else getattr(engine.optimizer, "parameter_offload", None)
    return offload.get_param_coordinator() if offload is not None else None


def begin_step(*engines) -> None:
    """Mark the start of a forward(+backward) pass for ZeRO-3's parameter trace and prefetch.

    DeepSpeed records the order in which submodules gather their parameters during one
    pass and, once that order repeats, prefetches the next ones while the current one
    computes. It marks pass boundaries in a hook on the root module's forward, which the
    stage-by-stage schedule never calls (it calls blocks one by one), so the trace would
    stay invalid and every gather would be synchronous. Calling this before each pass
    does what that hook does.
    """
    for engine in engines:
        if engine is None:
            continue
        if hasattr(engine.optimizer, "clear_backward_seen_flag"):
            # NOTE: engine.forward also advances ZeRO's micro-step counter here (copy, or add to, the
            # gradient partitions); without it each micro-batch's gradient overwrote the previous one's.
            engine.optimizer.clear_backward_seen_flag()
        if engine.zero_optimization_partition_weights():
            coordinator = _param_coordinator(engine)
            if coordinator is not None:
                coordinator.reset_step()
