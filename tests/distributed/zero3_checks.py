"""ZeRO-3 checks run under the real deepspeed launcher (2 CPU ranks); each rank writes <out>/<check>_rank<r>.json.

    deepspeed --num_gpus 2 tests/distributed/zero3_checks.py --check NAME [NAME ...] --teacher DIR --out DIR

Several checks share one launch (a launch costs ~30 s before its first step on 2 cores), one
after the other; a check that raises writes its traceback as {"error": ...} and the rest still run.

Checks:
  streamed_vs_naive  the streamed and the naive schedule give the same losses and gradients
  construction       building teacher and student never holds a whole model on a rank
  shared_frozen      frozen copied weights are the teacher's tensors, and stay so through training
  prefetch           the parameter trace completes and the next block is gathered ahead of its forward
  chunked_head_frozen  chunked CE/KL equal whole logits with a frozen, teacher-shared head
  fp32_master        fp32 parameters as their own master, gradients read in place: trains exactly as with copies
  unchanged_persistent  the optimizer step regathering only the small parameters it changes trains exactly as DeepSpeed's
                     (also run on one rank, in fp32, bf16 and with zero3_offload.json, by test_zero3_memory.py)
  bf16_rotary        models built in bf16 under zero.Init keep the float32 rotary frequencies of a model loaded plainly
                     (one rank, by test_zero3_memory.py)
  vocab_streamed_head  a frozen head read a piece of rows at a time gives the gathered head's CE and gradients
  zero3_leaves       whole blocks, or their frozen parts, gathered as ZeRO-3 leaves train exactly as with a hook per submodule
  graph_free_linear  F.linear under ZeRO-3: torch's where nothing is saved for backward, ParamSavingLinear (DeepSpeed's arithmetic, no gathered weight kept) where it is
  stale_grads        a block no backward reached in a step is stepped with a zero gradient, not its last one
  outside_still      a teacher-forced phase that trains every weight leaves the embedding, final norm and head as they were
  eval_padding       held-out perplexity over shards padded to equal length equals every rank scoring every sequence
  padded_layer_weight  padded batches with more padding on one rank: the layer loss's gradient is the global token mean's
  partitioned_reads  every tensor partitioned: each rank reads only its partition's range of the checkpoint (a MoE's
                     stacked experts: those its range covers), and the models gather to from_pretrained's values
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch

from cald_scale.config import load_run_config
from cald_scale.conversion.teacher import build_teacher, open_teacher
from cald_scale.engines.distributed import barrier, init_distributed
from cald_scale.engines.models import build_models
from cald_scale.engines.ds_config import load_ds_config, resolve_ds_config
from cald_scale.engines.zero3 import begin_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import CountingReader  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _configs(teacher_dir: str, overrides: list[str], *, ds_name: str = "zero3.json", bf16_here: bool | None = None):
    """(env, run config, ds_config); ``bf16_here``: whether the engines may compute in bf16 (as
    ``resolve_ds_config``: None, this machine's answer; True runs bf16 engines on CPU too, the GPU's precision)."""
    env = init_distributed()
    cfg = load_run_config(overrides=[f"teacher.name_or_path={teacher_dir}", "train.global_batch_size=4", "train.max_steps=10", "train.warmup_steps=1", "phases=[{name: target, guidance: target}]", "student.trainable=all", "student.conversion.attention_every=0", *overrides])
    return env, cfg, resolve_ds_config(load_ds_config(REPO / "ds_configs" / ds_name), cfg.train, env.world_size, bf16_here=bf16_here)


def _setup(teacher_dir: str, overrides: list[str], **kwargs):
    """``_configs`` and the teacher source (opening it imports the family's modeling module)."""
    env, cfg, ds_config = _configs(teacher_dir, overrides, **kwargs)
    source, _ = open_teacher(cfg.teacher)
    return env, cfg, ds_config, source


def _batch(vocab: int, env, seqlen: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (env.world_size * 2, seqlen), generator=gen)
    return ids[env.rank * 2 : (env.rank + 1) * 2]


def check_streamed_vs_naive(args) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from cald_scale.distill.step import cald_forward

    env, cfg, ds_config, source = _setup(args.teacher, ["loss.a_kl=0.5", "loss.head_chunk_tokens=24"])
    out = {}
    for schedule in ("naive", "streamed"):
        models = build_models(cfg, ds_config, source)
        ids = _batch(source.config.vocab_size, env)
        begin_step(models.teacher_engine, models.student_engine)
        parts = cald_forward(models.teacher, models.student, ids, cfg.loss, schedule=schedule)
        models.student_engine.backward(parts.total)
        grads = {n: safe_get_full_grad(p) for n, p in models.student_engine.module.named_parameters() if p.requires_grad}
        out[schedule] = {"losses": parts.as_floats(), "per_layer": parts.per_layer, "grads": {n: g.tolist() for n, g in grads.items() if g is not None}}
    return out


def check_construction(args) -> dict:
    from cald_scale.conversion.surgery import build_student
    from cald_scale.engines.partitioned import placement_for
    from cald_scale.eval.memory import LiveTensorLedger

    from transformers import AutoConfig

    env, cfg, ds_config = _configs(args.teacher, [])
    placement = placement_for(ds_config)
    # A family's modeling file imported first inside zero.Init would lose its class decorators
    # on exit (transformers 5.25's kernel hooks): construct() must import it before entering.
    # Checked before the teacher is opened (open_teacher imports it, asking for its kernels).
    config = AutoConfig.from_pretrained(args.teacher)
    family_module = f"transformers.models.{config.model_type}.modeling_{config.model_type}"
    family_module_fresh = family_module not in sys.modules
    with placement.construct(config):
        family_module_imported_first = family_module in sys.modules
    source, _ = open_teacher(cfg.teacher)
    ledger = LiveTensorLedger(track_everything=True)
    with ledger.watch():
        teacher = build_teacher(source, placement)
        student = build_student(source.config, source.weights(), cfg.student.conversion, placement=placement)
    full = lambda model: sum(math.prod(p.ds_shape) * p.element_size() for p in model.parameters())  # noqa: E731
    local = lambda model: sum(p.ds_tensor.numel() * p.element_size() for p in model.parameters())  # noqa: E731
    largest = max(math.prod(p.ds_shape) * p.element_size() for m in (teacher, student) for p in m.parameters())
    block = max(sum(math.prod(p.ds_shape) * p.element_size() for p in layer.parameters()) for m in (teacher, student.backbone) for layer in m.model.layers)
    # The same models built whole, for the values.
    plain_teacher = build_teacher(source)
    with __import__("deepspeed").zero.GatheredParameters(list(teacher.parameters())):
        teacher_equal = all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), plain_teacher.state_dict().values()))
    return {
        "peak_live_bytes": ledger.peak_bytes,
        "full_teacher_bytes": full(teacher),
        "full_student_bytes": full(student),
        "local_teacher_bytes": local(teacher),
        "local_student_bytes": local(student),
        "largest_tensor_bytes": largest,
        "largest_block_bytes": block,
        "all_partitioned": all(hasattr(p, "ds_id") for m in (teacher, student) for p in m.parameters()),
        "teacher_equals_plain_load": teacher_equal,
        "family_module_fresh": family_module_fresh,
        "family_module_imported_before_zero_init": family_module_imported_first,
    }


def check_shared_frozen(args) -> dict:
    import deepspeed

    env, cfg, ds_config, source = _setup(args.teacher, ["student.trainable=mixers", "train.lr=1e-2", "loss.head_chunk_tokens=16"])
    models = build_models(cfg, ds_config, source)
    student, teacher = models.student_engine.module, models.teacher_engine.module
    mixer_ids = {id(p) for p in student.mixer_parameters()}
    copied = [(n, p) for n, p in student.backbone.named_parameters() if id(p) not in mixer_ids]
    teacher_params = dict(teacher.named_parameters())
    same_object = all(p is teacher_params[n] for n, p in copied)
    teacher_ids = {id(p) for p in teacher.parameters()}
    shared_storages = sum(1 for n, p in copied if id(p) in teacher_ids)
    plain = build_teacher(source)  # the checkpoint's values
    with deepspeed.zero.GatheredParameters(list(student.mixer_parameters())):
        mixers_before = [p.detach().clone() for p in student.mixer_parameters()]
    from cald_scale.train import forward_backward

    for step in range(3):
        ids = _batch(source.config.vocab_size, env)
        parts, finite = forward_backward(models, models.teacher, cfg.plan(env.world_size).phases[0], ids, cfg)
        models.student_engine.step()
    with deepspeed.zero.GatheredParameters([p for _, p in copied]):
        copied_unchanged = all(torch.equal(p, plain.get_parameter(n)) for n, p in copied)
    with deepspeed.zero.GatheredParameters(list(student.mixer_parameters())):
        mixers_changed = any(not torch.equal(a, b) for a, b in zip(mixers_before, student.mixer_parameters()))
    return {
        "copied": len(copied),
        "same_object": same_object,
        "shared": shared_storages,
        "copied_unchanged_after_training": copied_unchanged,
        "mixers_changed": mixers_changed,
        "loss": parts.total.item(),
    }


def check_prefetch(args) -> dict:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from cald_scale.engines.zero3 import _param_coordinator
    from cald_scale.train import forward_backward

    env, cfg, ds_config, source = _setup(args.teacher, [])
    # NOTE: in so small a model most tensors fall under the persistence threshold (never partitioned).
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 64
    # As on a GPU (on CPU "auto" turns prefetch off): about one block ahead.
    ds_config["zero_optimization"]["stage3_prefetch_bucket_size"] = 50_000
    ds_config["zero_optimization"]["stage3_max_live_parameters"] = 1_000_000
    models = build_models(cfg, ds_config, source)
    seen: list[float] = []

    def record(block, inputs):
        params = [p for p in block.parameters() if not p.ds_persist]
        seen.append(sum(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in params) / len(params))

    # Registered first on each block, so it runs before any DeepSpeed gather inside the block.
    hooks = [block.register_forward_pre_hook(record, prepend=True) for block in models.student.blocks]
    statuses = []
    for step in range(4):
        seen.clear()
        ids = _batch(source.config.vocab_size, env)
        forward_backward(models, models.teacher, cfg.plan(env.world_size).phases[0], ids, cfg)
        models.student_engine.step()
        statuses.append(list(seen))
    for h in hooks:
        h.remove()
    return {
        "student_trace_complete": _param_coordinator(models.student_engine).is_complete_trace(),
        "teacher_trace_complete": _param_coordinator(models.teacher_engine).is_complete_trace(),
        "gathered_ahead_per_step": statuses,
    }


def check_fp32_master(args) -> dict:
    """Training with the fp32 master aliased to the parameters, and the step reading the gradient
    partitions in place, equals DeepSpeed's two-copy path (gradient clipping on, so the step
    scales the gradients it reads)."""
    from cald_scale.engines import zero3

    env, cfg, ds_config, source = _setup(args.teacher, ["train.lr=1e-2", "train.grad_clip=0.05"])
    out = {}
    originals = zero3.share_fp32_master, zero3.read_fp32_grads_in_place
    for mode in ("two_copies", "aliased"):
        if mode == "two_copies":
            zero3.share_fp32_master, zero3.read_fp32_grads_in_place = (lambda optimizer: 0), (lambda optimizer: False)
        torch.manual_seed(0)
        try:
            models = build_models(cfg, ds_config, source)
        finally:  # the checks after this one share the process
            zero3.share_fp32_master, zero3.read_fp32_grads_in_place = originals
        opt = models.student_engine.optimizer
        aliased = all(a.data_ptr() == b.data_ptr() for a, b in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat))
        prepare, in_place = opt._prepare_fp32_grad_for_sub_group, []

        def recording(sub_group_id, prepare=prepare, opt=opt):
            prepare(sub_group_id)
            grad = opt.fp32_partitioned_groups_flat[sub_group_id].grad
            in_place.append(grad.untyped_storage().data_ptr() == opt.grad_partitions_flat_buffer.untyped_storage().data_ptr())

        opt._prepare_fp32_grad_for_sub_group = recording
        out[mode] = {"aliased": aliased, "grads_read_in_place": in_place, **_train_steps(models, cfg, env, source)}
    return out


def _train_steps(models, cfg, env, source, steps: int = 4) -> dict:
    """``steps`` training steps of the first phase: their losses, and checksums of the student's
    weights after them (all of them, and the trained ones)."""
    import deepspeed

    from cald_scale.train import forward_backward

    losses = []
    for _ in range(steps):
        parts, _ = forward_backward(models, models.teacher, cfg.plan(env.world_size).phases[0], _batch(source.config.vocab_size, env), cfg)
        models.student_engine.step()
        losses.append(parts.total.item())
    params = list(models.student_engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        checksum = float(sum(p.double().sum() for p in params))
        trained = float(sum(p.double().sum() for p in params if p.requires_grad))
    return {"losses": losses, "checksum": checksum, "trained_checksum": trained}


def check_unchanged_persistent(args) -> dict:
    """The optimizer step that keeps gathered the persistent parameters it leaves unchanged
    (``keep_unchanged_persistent``) against DeepSpeed's, which releases every parameter and gathers
    the persistent ones again: the same losses and trained weights, with weight decay on, so a
    kept parameter whose update went missing (or a frozen one the step moved) shows. bf16 when
    CALD_CHECK_BF16=1 (the engines run it on CPU too; it is the GPU's precision); another shipped
    ds_config than zero3.json when CALD_CHECK_DS_CONFIG names it (zero3_offload.json)."""
    from cald_scale.engines import zero3

    bf16 = os.environ.get("CALD_CHECK_BF16") == "1"
    ds_name = os.environ.get("CALD_CHECK_DS_CONFIG", "zero3.json")
    overrides = ["student.trainable=mixers", "train.lr=1e-2", "train.weight_decay=0.1", f"teacher.dtype={'bfloat16' if bf16 else 'float32'}"]
    env, cfg, ds_config, source = _setup(args.teacher, overrides, ds_name=ds_name, bf16_here=bf16)
    out = {"bf16": ds_config["bf16"]["enabled"], "ds_config": ds_name, "offloaded": sorted(k for k, v in ds_config["zero_optimization"].items() if k.startswith("offload_") and v.get("device") != "none")}
    original = zero3.keep_unchanged_persistent
    # "moved": the step leaves each partition in a new tensor (no DeepSpeed path known to do so), so a
    # kept parameter's gathered tensor is stale after it, and must be gathered again (one rank).
    for mode in ("deepspeed", "kept", *(["moved"] if env.world_size == 1 else [])):
        if mode == "deepspeed":
            zero3.keep_unchanged_persistent = lambda optimizer: False
        torch.manual_seed(0)
        try:
            models = build_models(cfg, ds_config, source)
        finally:  # the checks after this one share the process
            zero3.keep_unchanged_persistent = original
        opt = models.student_engine.optimizer
        post_step, regathered = opt._post_step, []

        def recording(*a, post_step=post_step, opt=opt, **k):
            regathered.append(len(opt.persistent_parameters))
            return post_step(*a, **k)

        def moving(sub_group_id, unflatten=opt._unflatten_partitioned_parameters, opt=opt):
            unflatten(sub_group_id)
            for partition in opt.fp16_partitioned_groups[sub_group_id]:
                partition.data = partition.data.clone()

        opt._post_step = recording
        if mode == "moved":
            opt._unflatten_partitioned_parameters = moving
        trained = _train_steps(models, cfg, env, source)
        params = list(models.student_engine.module.parameters())
        persistent = [p for p in params if p.ds_persist]
        out[mode] = {
            **trained, "regathered_per_step": regathered, "persistent": len(persistent),
            "persistent_trained": sum(p.requires_grad for p in persistent), "dtype": str(params[0].dtype),
        }
    return out


def check_bf16_rotary(args) -> dict:
    """Teacher and hybrid student built for bf16 engines (zero.Init casts every float tensor made
    inside it, buffers too): their rotary frequencies against a plainly built teacher's (float32,
    as transformers computes them whatever the model's dtype)."""
    env, cfg, ds_config, source = _setup(args.teacher, ["student.conversion.attention_every=2", "teacher.dtype=bfloat16"], bf16_here=True)
    models = build_models(cfg, ds_config, source)

    def rotary(module) -> dict:
        return {name: b for name, b in module.named_buffers() if name.endswith("inv_freq")}

    plain = rotary(build_teacher(source))
    out = {"bf16": ds_config["bf16"]["enabled"], "plain": {n: str(b.dtype) for n, b in plain.items()}}
    for label, module in (("teacher", models.teacher_engine.module), ("student", models.student_engine.module)):
        buffers = rotary(module)
        out[label] = {
            "dtypes": {n: str(b.dtype) for n, b in buffers.items()},
            "equal_to_plain": {n: torch.equal(b, plain[n.removeprefix("backbone.")]) for n, b in buffers.items()},
            "parameter_dtype": str(next(module.parameters()).dtype),
        }
    return out


def check_chunked_head_frozen(args) -> dict:
    """CE/KL over token chunks (recomputed in backward) give the whole-logits gradients, also with a frozen shared head."""
    from deepspeed.utils import safe_get_full_grad

    from cald_scale.distill.step import cald_forward

    out = {}
    for chunk in ("null", "16"):
        env, cfg, ds_config, source = _setup(args.teacher, ["student.trainable=mixers", "loss.a_kl=0.5", f"loss.head_chunk_tokens={chunk}"])
        models = build_models(cfg, ds_config, source)
        begin_step(models.teacher_engine, models.student_engine)
        parts = cald_forward(models.teacher, models.student, _batch(source.config.vocab_size, env), cfg.loss)
        models.student_engine.backward(parts.total)
        grads = {n: safe_get_full_grad(p) for n, p in models.student_engine.module.named_parameters() if p.requires_grad}
        out[chunk] = {"losses": parts.as_floats(), "grads": {n: g.tolist() for n, g in grads.items() if g is not None}}
    return out


def check_vocab_streamed_head(args) -> dict:
    """A frozen head read a piece of rows at a time gives the gathered head's CE and gradients."""
    from deepspeed.utils import safe_get_full_grad

    from cald_scale.distill.step import cald_forward
    from cald_scale.engines.partitioned import frozen_row_pieces

    out = {}
    for streamed in (True, False):
        env, cfg, ds_config, source = _setup(args.teacher, ["student.trainable=mixers", "loss.head_chunk_tokens=null"])
        models = build_models(cfg, ds_config, source)
        head = models.student.head_weight
        assert models.student.head_pieces is not None, "a frozen ZeRO-3 head should be streamed"
        if streamed:  # pieces of 10 rows per rank: 13 all-gathers per walk, the last one short
            models.student.head_pieces = frozen_row_pieces(head, piece_bytes=10 * 2 * head.ds_shape[1] * 4)
        else:
            models.student.head_pieces = None  # the gathered-head path, for reference
        begin_step(models.teacher_engine, models.student_engine)
        parts = cald_forward(models.teacher, models.student, _batch(source.config.vocab_size, env), cfg.loss)
        models.student_engine.backward(parts.total)
        grads = {n: safe_get_full_grad(p) for n, p in models.student_engine.module.named_parameters() if p.requires_grad}
        out[str(streamed)] = {"losses": parts.as_floats(), "grads": {n: g.tolist() for n, g in grads.items() if g is not None}}
    return out


def _tied_teacher(args) -> str:
    """The checks' teacher with its LM head tied to the embedding (SmolLM2's and Qwen2.5's layout)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(args.out) / "tied_teacher"
    if int(os.environ.get("RANK", "0")) == 0:
        model = AutoModelForCausalLM.from_pretrained(args.teacher, tie_word_embeddings=True)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(args.teacher).save_pretrained(folder)
    dist.barrier()
    return str(folder)


def check_fused_head_trained(args) -> dict:
    """A trained head tied to the embedding: CE and KL with one weight gradient for all chunks
    (the head's weight gathered by hand) give the head module's path: losses, every gradient,
    and the losses after the optimizer's steps."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from cald_scale.train import forward_backward

    from cald_scale.distill import losses as loss_module

    init_distributed()
    teacher = _tied_teacher(args)
    out = {}
    original = loss_module._call_as_forward
    calls = []
    loss_module._call_as_forward = lambda *a: (calls.append(1), original(*a))[1]  # counts the fused path's uses
    for path in ("module", "fused"):
        calls.clear()
        env, cfg, ds_config, source = _setup(teacher, ["loss.a_kl=0.5", "loss.head_chunk_tokens=16", "train.lr=1e-2"])
        torch.manual_seed(0)
        models = build_models(cfg, ds_config, source)
        lm = models.student.lm
        tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        if path == "module":  # the head module's path (chunks checkpointed through it) for reference
            models.student.__class__ = type("ModuleHead", (type(models.student),), {"head_weight": property(lambda self: None)})
        losses, grads = [], {}
        for step in range(3):
            parts, _ = forward_backward(models, models.teacher, cfg.plan(env.world_size).phases[0], _batch(source.config.vocab_size, env), cfg)
            if step == 0:
                named = models.student_engine.module.named_parameters()
                grads = {n: safe_get_full_grad(p).tolist() for n, p in named if p.requires_grad and safe_get_full_grad(p) is not None}
            models.student_engine.step()
            losses.append(parts.as_floats())
        head = lm.get_output_embeddings().weight
        with deepspeed.zero.GatheredParameters([head]):
            head_checksum = float(head.double().sum())
        out[path] = {"tied": tied, "losses": losses, "grads": grads, "head_checksum": head_checksum, "fused_calls": len(calls)}
    loss_module._call_as_forward = original
    return out


# (scenario, overrides): block 0's input (a frozen embedding's output) needs no grad with
# activation checkpointing; no block input does teacher-forced; with everything trainable (a
# hybrid, whose kept attention blocks train too) every input does.
LEAF_SCENARIOS = {
    "end_to_end": ["student.trainable=mixers", "student.activation_checkpointing=true"],
    "teacher_forced": ["student.trainable=mixers", "phases=[{name: tf, mode: teacher_forced}]"],
    "all_trainable_hybrid": ["student.trainable=all", "student.conversion.attention_every=2"],
}


def check_zero3_leaves(args) -> dict:
    """train.zero3_leaves none, frozen and blocks: the same gradients, losses and trained weights
    (frozen: bit for bit), with fewer hooked modules each (see LEAF_SCENARIOS)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from cald_scale.train import forward_backward

    out = {}
    for scenario, extra in LEAF_SCENARIOS.items():
        for mode in ("none", "frozen", "blocks"):
            env, cfg, ds_config, source = _setup(args.teacher, ["train.lr=1e-2", f"train.zero3_leaves={mode}", *extra])
            # NOTE: in so small a model most tensors fall under the persistence threshold (never partitioned).
            ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 64
            torch.manual_seed(0)
            models = build_models(cfg, ds_config, source)
            student, teacher = models.student_engine.module, models.teacher_engine.module
            trained = [p for p in student.parameters() if p.requires_grad]
            losses, grad_norms = [], []
            for step in range(3):
                parts, _ = forward_backward(models, models.teacher, cfg.plan(env.world_size).phases[0], _batch(source.config.vocab_size, env), cfg)
                if step == 0:  # every trained weight's gradient, before any update
                    grad_norms = [float(safe_get_full_grad(p).double().norm()) for p in trained]
                models.student_engine.step()
                losses.append(parts.total.item())
            with deepspeed.zero.GatheredParameters(trained):
                checksums = [float(p.double().sum()) for p in trained]
            out[f"{scenario}_{mode}"] = {
                "losses": losses,
                "first_grad_norms": grad_norms,
                "trained_checksums": checksums,
                "leaves": {name: sorted({type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)}) for name, model in (("teacher", teacher), ("student", student))},
                "block_types": sorted({type(b).__name__ for b in models.student.blocks}),
                "hooked_modules": {name: sum(1 for m in model.modules() if m._forward_pre_hooks) for name, model in (("teacher", teacher), ("student", student))},
                # DeepSpeed's reference from a parameter to its leaf (a shared norm kept the teacher alive)
                "leaf_owner_references": sum(hasattr(p, "ds_z3_leaf_module") for model in (teacher, student) for p in model.parameters()),
            }
            del models, student, teacher
            gc.collect()
    return out


def check_graph_free_linear(args) -> dict:
    """The F.linear the engines install (``graph_free_linear``) against DeepSpeed's and torch's own:
    what a distillation forward saves for backward, the teacher's outputs, the first loss and
    gradients."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.utils import safe_get_full_grad

    from cald_scale.engines.zero3 import graph_free_linear
    from cald_scale.train import forward_backward

    env, cfg, ds_config, source = _setup(args.teacher, ["student.trainable=mixers"])
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 64  # partition the tiny model's weights
    models = build_models(cfg, ds_config, source)
    out = {"installed": torch.nn.functional.linear is graph_free_linear}
    student = models.student_engine.module
    matrices = [p for model in (student, models.teacher_engine.module) for p in model.parameters() if len(p.ds_shape) == 2 and not p.ds_persist]
    trained = [p for p in student.parameters() if p.requires_grad]
    phase = cfg.plan(env.world_size).phases[0]
    ids = _batch(source.config.vocab_size, env)

    def aliases_of_gathered_weights(tensor: torch.Tensor) -> bool:
        # A tensor saved for backward that shares a gathered ZeRO-3 linear weight's storage but is
        # not the parameter itself (whose data ZeRO-3 swaps out on release) keeps that gathered
        # storage alive. (Other ops save views of their small weights too: a mixer's 4-wide conv
        # kernel, norms' weights, which the shipped persistence threshold rarely partitions.)
        if hasattr(tensor, "ds_id") or tensor.untyped_storage().nbytes() == 0:
            return False
        ptr = tensor.untyped_storage().data_ptr()
        return any(p.untyped_storage().nbytes() and p.untyped_storage().data_ptr() == ptr for p in matrices)

    linears = {"graph_free": graph_free_linear, "deepspeed": zero3_linear_wrap, "torch": torch._C._nn.linear}
    for name, linear in linears.items():
        torch.nn.functional.linear = linear
        saved = []

        def pack(tensor):
            saved.append(aliases_of_gathered_weights(tensor))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            parts, _ = forward_backward(models, models.teacher, phase, ids, cfg)
        with torch.no_grad():
            begin_step(models.teacher_engine)
            teacher = models.teacher
            hidden = teacher.embed(ids)
            for hidden in teacher.blocks_iter(hidden, teacher.context(hidden, ids), range(teacher.num_layers)):
                pass
        out[name] = {
            "saved_tensors": len(saved),
            "saved_aliases_of_gathered_weights": sum(saved),
            "loss": parts.total.item(),
            "grad_norms": [float(safe_get_full_grad(p).double().norm()) for p in trained],
            "teacher_output": hidden.double().sum().item(),
            "teacher_output_abs": hidden.double().abs().sum().item(),
        }
        models.student_engine.optimizer.zero_grad()
    torch.nn.functional.linear = graph_free_linear
    return out


def check_stale_grads(args) -> dict:
    """A block no backward reached in a step (a teacher-forced stage skipped for a non-finite
    loss) meets a zero gradient partition at the optimizer step, not the gradient it had at its
    last update: every partition is zero after a step."""
    from cald_scale.train import forward_backward

    phases = "phases=[{name: align, guidance: target, mode: teacher_forced}]"
    env, cfg, ds_config, source = _setup(args.teacher, ["student.trainable=mixers", phases, "train.grad_clip=0.05"])
    models = build_models(cfg, ds_config, source)
    opt, phase = models.student_engine.optimizer, cfg.plan(env.world_size).phases[0]
    partition = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition

    def block_grad(i: int) -> float:
        return sum(float(partition[p.ds_id].abs().sum()) for p in models.student.blocks[i].parameters() if p.requires_grad)

    batch, out = _batch(source.config.vocab_size, env), {}
    parts, finite = forward_backward(models, models.teacher, phase, batch, cfg)
    out["first"] = {"finite": finite, "block0": block_grad(0), "block1": block_grad(1)}
    models.student_engine.step()
    out["buffer_after_step"] = float(opt.grad_partitions_flat_buffer.abs().sum())
    parts, finite = forward_backward(models, models.teacher, phase, batch, cfg, poison=True)  # stage 0 is NaN
    out["poisoned"] = {"finite": finite, "skipped": parts.skipped_stages, "block0": block_grad(0), "block1": block_grad(1), "loss": parts.total.item()}
    models.student_engine.step()
    return out


def check_outside_still(args) -> dict:
    """End to end, then teacher-forced with every weight training (weight decay on): the second
    phase never reaches the embedding, final norm or head, so they must not move, though the
    AdamW momentum of the first phase and the decay would move them at any LR above 0."""
    import deepspeed

    from cald_scale.distill.phases import set_phase_lr
    from cald_scale.train import forward_backward

    phases = "phases=[{name: e2e, steps: 2, a_kl: 1.0}, {name: tf, steps: 2, mode: teacher_forced, trainable: all}]"
    env, cfg, ds_config, source = _setup(args.teacher, [phases, "train.max_steps=4", "train.lr=1e-2", "train.weight_decay=0.1"])
    plan = cfg.plan(env.world_size)
    models = build_models(cfg, ds_config, source, plan)
    blocks = {id(p) for p in models.student.blocks.parameters()}
    outside = [p for p in models.student_engine.module.parameters() if id(p) not in blocks]
    inside = [p for p in models.student.blocks.parameters() if ".mixer." not in _name(models, p)]

    def snapshot(params) -> list[torch.Tensor]:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]

    out, seen = {"groups": [g.get("name") for g in models.student_engine.optimizer.param_groups], "lr": {}}, {}
    for step in range(plan.total_steps):
        phase = plan.at(step)
        if step == phase.start:
            models.apply_phase(phase, cfg.student.trainable)
            seen[phase.name] = (snapshot(outside), snapshot(inside))
        set_phase_lr(models.student_engine, phase, step)
        out["lr"][phase.name] = {g.get("name"): g["lr"] for g in models.student_engine.optimizer.param_groups}
        forward_backward(models, models.teacher, phase, _batch(source.config.vocab_size, env), cfg)
        models.student_engine.step()
    after = snapshot(outside), snapshot(inside)
    moved = lambda a, b: max(float((x - y).abs().max()) for x, y in zip(a, b))  # noqa: E731
    out["outside_moved"] = {"e2e": moved(seen["e2e"][0], seen["tf"][0]), "tf": moved(seen["tf"][0], after[0])}
    out["inside_moved"] = {"e2e": moved(seen["e2e"][1], seen["tf"][1]), "tf": moved(seen["tf"][1], after[1])}
    del models
    gc.collect()
    joined = build_models(cfg, ds_config, source, plan, outside_groups=False)  # the layout of a checkpoint saved before the split
    out["joined_groups"] = [g.get("name") for g in joined.student_engine.optimizer.param_groups]
    return out


def check_eval_padding(args) -> dict:
    """7 held-out sequences on 2 ranks: shards of 4, the first padded with a forward that counts
    for nothing (ZeRO-3 needs every rank in every forward); the same perplexity as each rank
    scoring all 7 (the all-reduce then doubles the sums and the token count alike)."""
    from cald_scale.eval.perplexity import eval_indices

    env, cfg, ds_config, source = _setup(args.teacher, [])
    models = build_models(cfg, ds_config, source)
    gen = torch.Generator().manual_seed(7)
    dataset = {"held": [{"input_ids": torch.randint(0, source.config.vocab_size, (32,), generator=gen)} for _ in range(7)]}
    shard = eval_indices(7, 7, env.rank, env.world_size)
    out = {"shard": shard}
    for which in ("student", "teacher"):
        out[which] = {
            "padded": models.perplexity(which, dataset, {"held": shard}, 2)["held"],
            "every_sequence": models.perplexity(which, dataset, {"held": list(range(7))}, 2)["held"],
        }
    return out


def check_padded_layer_weight(args) -> dict:
    """Rank 0 holds 8 real tokens, rank 1 holds 32 (right-padded). Each rank's own-mean
    gradient g_r is measured alone (the other rank back-propagates zero, so DeepSpeed's
    average gives g_r / 2); the step with ``padded_layer_tokens`` must give the global token
    mean's gradient, sum_r n_r g_r / N, where per-rank means gave (g_0 + g_1) / 2."""
    from deepspeed.utils import safe_get_full_grad

    from cald_scale.distill.step import cald_forward
    from cald_scale.train import forward_backward, padded_layer_tokens

    from transformers import AutoTokenizer

    from cald_scale.conversion.teacher import classifier_teacher

    from tiny_models import save_tiny_encoder

    # Padded batches are the classification task's: a tiny BERT, written by rank 0 (transformers'
    # save_pretrained may write on the main process alone once a process group is up).
    env = init_distributed()
    encoder = Path(args.out) / "encoder"
    if env.is_main:
        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        tokenizer.pad_token = "<eos>"
        save_tiny_encoder(encoder, "bert", tokenizer)
    barrier()
    env, cfg, ds_config, _ = _setup(str(encoder), ["task.kind=classification", "loss.a_ce=0", "loss.a_kl=0", "student.conversion.mixer=bimamba2"])
    source = classifier_teacher(open_teacher(cfg.teacher)[0], ["a", "b", "c"], pooling=cfg.task.pooling, seed=cfg.train.seed)
    ids = _batch(source.config.vocab_size, env, seqlen=16)
    real = [[3, 5], [16, 16]][env.rank]
    mask = torch.tensor([[1] * n + [0] * (16 - n) for n in real])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([env.rank, 2])}
    phase = cfg.plan(env.world_size).phases[0]

    def grads(models) -> dict[str, torch.Tensor]:
        return {n: safe_get_full_grad(p).clone() for n, p in models.student_engine.module.named_parameters() if p.requires_grad and safe_get_full_grad(p) is not None}

    alone = []
    for r in range(env.world_size):
        models = build_models(cfg, ds_config, source)
        begin_step(models.teacher_engine, models.student_engine)
        parts = cald_forward(models.teacher, models.student, batch, phase.loss)
        models.student_engine.backward(parts.total * (1.0 if env.rank == r else 0.0))
        alone.append(grads(models))
        del models
        gc.collect()
    models = build_models(cfg, ds_config, source)
    tokens = padded_layer_tokens([batch], models.student_engine.device, models.student.token_mask)
    forward_backward(models, models.teacher, phase, batch, cfg, layer_tokens=tokens)
    weighted = grads(models)
    counts = [8, 32]
    expect = {n: sum(2 * counts[r] / sum(counts) * alone[r][n] for r in range(2)) for n in weighted}
    per_rank_means = {n: alone[0][n] + alone[1][n] for n in weighted}
    rel = lambda a, b: max(float((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-30)) for n in b)  # noqa: E731
    return {"tokens": tokens, "params": len(weighted), "rel_to_global_mean": rel(weighted, expect), "rel_global_vs_per_rank_means": rel(expect, per_rank_means)}


def _name(models, param) -> str:
    return next(n for n, p in models.student.blocks.named_parameters() if p is param)


def _partitioned_student_reads(placement, config, folder: Path) -> dict:
    """A Mamba2 student built partitioned from ``folder``'s odd-sized Llama: the share of the
    teacher's attention bytes this rank read to initialise its mixers, and whether its mixers
    gather to the plain conversion's."""
    import deepspeed

    from cald_scale.conversion.modeling import ConversionConfig
    from cald_scale.conversion.surgery import attention_prefixes, build_student
    from cald_scale.conversion.weights import open_weights

    conversion = ConversionConfig(mixer="mamba2", attention_init=True)
    plain = build_student(config, open_weights(folder), conversion)
    prefixes = attention_prefixes(plain.backbone, plain.adapter)
    files = open_weights(folder)
    attention = [k for k in files.keys() if k.startswith(prefixes)]

    reader = CountingReader(files, only=set(attention))
    student = build_student(config, reader, conversion, placement=placement)
    mixers = [p for m in student.mixers() for p in m.parameters()]
    with deepspeed.zero.GatheredParameters(mixers):
        unequal = [n for (n, got), want in zip(
            ((n, p) for m in student.mixers() for n, p in m.named_parameters()), (p for m in plain.mixers() for p in m.parameters())
        ) if not torch.equal(got, want)]  # fmt: skip
    total = sum(files.get(k).numel() * files.get(k).element_size() for k in attention)
    return {"attention_share_read": reader.total / total, "mixers_unequal": unequal, "mixer_tensors": len(mixers)}


def check_partitioned_reads(args) -> dict:
    import copy

    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig
    from transformers.initialization import no_init_weights

    from cald_scale.conversion.weights import RenamedReader, load_weights, open_weights
    from cald_scale.engines.partitioned import zero3_placement

    env, _, ds_config = _configs(args.teacher, [])
    ds_config = copy.deepcopy(ds_config)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every tensor partitioned
    placement = zero3_placement(ds_config)
    # Odd sizes, so most tensors have an odd number of elements and the last partition is padded.
    common = dict(hidden_size=45, intermediate_size=75, num_attention_heads=5, num_key_value_heads=1, head_dim=8, vocab_size=251, num_hidden_layers=2)
    out = {}
    for name, config in (("llama", LlamaConfig(**common)), ("mixtral", MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))):
        folder = Path(args.out) / f"odd_{name}"
        if env.is_main:
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        barrier()
        reference = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        reader = CountingReader(open_weights(folder))
        with placement.construct(config), no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
        # Nothing is resident before it is written: no partition exists yet.
        constructed = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters() if p.ds_tensor is not None)
        load_weights(model, reader, placement.assign, shape_of=placement.shape_of)
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            unequal = [k for k, v in model.state_dict().items() if not torch.equal(v, reference[k])]
        out[name] = {
            "unequal": unequal,
            "bytes_read": reader.total,
            "checkpoint_bytes": sum(v.numel() * v.element_size() for v in reference.values()),
            "odd_tensors": sum(math.prod(p.ds_shape) % 2 for p in params),
            "persistent": sum(bool(getattr(p, "ds_persist", False)) for p in params),
            "stacked_experts": sum(k.endswith(("gate_up_proj", "down_proj")) and ".experts." in k for k in reference),
            "partition_bytes_at_construction": constructed,
        }
        if name == "llama":
            out[name]["student"] = _partitioned_student_reads(placement, config, folder)
        del model
        gc.collect()
    # Built without zero.Init's broadcast from rank 0, a model keeps no value it was built with:
    # one with a parameter nothing wrote is refused by name.
    with placement.construct(config), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    reader = RenamedReader(open_weights(Path(args.out) / "odd_mixtral"), model)
    for name, param in list(model.named_parameters())[1:]:  # all but the embedding
        placement.assign(param, reader.get(name))
    try:
        placement.check_written(model, "the test model")
        out["unwritten_refused"] = None
    except RuntimeError as err:
        out["unwritten_refused"] = str(err)
    return out


CHECKS = {
    "streamed_vs_naive": check_streamed_vs_naive,
    "construction": check_construction,
    "shared_frozen": check_shared_frozen,
    "prefetch": check_prefetch,
    "fp32_master": check_fp32_master,
    "unchanged_persistent": check_unchanged_persistent,
    "bf16_rotary": check_bf16_rotary,
    "chunked_head_frozen": check_chunked_head_frozen,
    "vocab_streamed_head": check_vocab_streamed_head,
    "fused_head_trained": check_fused_head_trained,
    "zero3_leaves": check_zero3_leaves,
    "graph_free_linear": check_graph_free_linear,
    "stale_grads": check_stale_grads,
    "outside_still": check_outside_still,
    "eval_padding": check_eval_padding,
    "padded_layer_weight": check_padded_layer_weight,
    "partitioned_reads": check_partitioned_reads,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", nargs="+", choices=sorted(CHECKS), required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in args.check:
        try:
            result = CHECKS[name](args)
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it; the next checks still run
            result = {"error": traceback.format_exc()}
        gc.collect()  # the check's engines, before the next one builds its own
        (Path(args.out) / f"{name}_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from cald_scale.launch import finish

    finish(main)  # leave as a training rank does: no interpreter finalization under gloo
