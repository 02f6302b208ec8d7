"""Teacher-derived memory of each schedule, on the same model and batch, counted honestly.

    python benchmarks/streaming_memory.py [--quick] [--out FILE]

"Held" is every byte derived from the teacher that is alive at the worst stage boundary:
teacher hidden states, fp32 copies, LayerNorm outputs, loss values, and whatever autograd
saved for backward (cald_scale/eval/memory.py counts storages, not Python references).

- naive: the whole teacher first; every block output is kept, plus one loss tensor per layer.
- streamed (end to end, the default): each distilled layer's loss must keep one
  hidden-state-sized tensor until backward (its gradient); the teacher state the next
  stage starts from is the "+1". Target: <= (distilled layers + 1) hidden states in the
  student's dtype, plus the per-layer loss scalars.
- teacher_forced (backward per stage): target <= 2 hidden states, whatever the depth.

The autograd layer loss (what the job used before) is measured too: it keeps fp32 LN(teacher)
per layer, which in a bf16 student is twice the budget, and the ledger shows it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llama_teacher, machine, output_file, write_result  # noqa: E402

from cald_scale.conversion.modeling import ConversionConfig  # noqa: E402
from cald_scale.conversion.surgery import convert_teacher  # noqa: E402
from cald_scale.distill import step as step_module  # noqa: E402
from cald_scale.distill.losses import LossConfig, layer_loss, layer_loss_reference  # noqa: E402
from cald_scale.distill.stages import LayerwiseModel  # noqa: E402
from cald_scale.distill.step import cald_forward, teacher_forced_step  # noqa: E402
from cald_scale.eval.memory import LiveTensorLedger  # noqa: E402


def measure(teacher, student, ids, schedule: str, stage_size: int) -> tuple[dict, list[torch.Tensor]]:
    ledger = LiveTensorLedger()
    t_lw = LayerwiseModel(teacher, scope=ledger.source_scope)
    s_lw = LayerwiseModel(student, scope=ledger.sink_scope)
    cfg = LossConfig()
    with ledger.watch():
        if schedule == "teacher_forced":
            parts = teacher_forced_step(t_lw, s_lw, ids, cfg, backward=lambda loss: loss.backward(), stage_size=stage_size, on_boundary=ledger.on_boundary())
        else:
            parts = cald_forward(t_lw, s_lw, ids, cfg, stage_size=stage_size, schedule=schedule, on_boundary=ledger.on_boundary())
            parts.total.backward()
    grads = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
    student.zero_grad(set_to_none=True)
    worst = max(ledger.samples, key=lambda s: s[1])
    return {"held_bytes": ledger.peak_held_bytes, "worst_boundary": worst[0], "peak_bytes_incl_transients": ledger.peak_bytes, "loss": parts.total.item()}, grads


def run(layers: int, batch: int, seqlen: int, dtype: torch.dtype, device: torch.device) -> dict:
    teacher = llama_teacher(layers).to(dtype)
    student = convert_teacher(teacher, ConversionConfig(mixer="mamba2")).train().to(device)
    teacher = teacher.to(device)
    ids = torch.randint(0, teacher.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    hidden = batch * seqlen * teacher.config.hidden_size * dtype.itemsize
    distilled = layers - 1
    scalars = 8 * layers
    naive, naive_grads = measure(teacher, student, ids, "naive", 1)
    out = {"dtype": str(dtype), "one_hidden_state_bytes": hidden, "distilled_layers": distilled, "naive": naive, "streamed": {}}
    for stage_size in (1, 2, 4):
        streamed, grads = measure(teacher, student, ids, "streamed", stage_size)
        streamed["hidden_states_held"] = streamed["held_bytes"] / hidden
        streamed["ratio_to_naive"] = streamed["held_bytes"] / naive["held_bytes"]
        streamed["same_loss_and_grads_as_naive"] = streamed["loss"] == naive["loss"] and all(torch.equal(a, b) for a, b in zip(grads, naive_grads))
        out["streamed"][f"stage_size_{stage_size}"] = streamed
    forced, _ = measure(teacher, student, ids, "teacher_forced", 1)
    forced["hidden_states_held"] = forced["held_bytes"] / hidden
    out["teacher_forced"] = forced
    naive["hidden_states_held"] = naive["held_bytes"] / hidden
    # The autograd layer loss, for comparison (the ledger must see what autograd keeps).
    step_module.layer_loss = layer_loss_reference
    try:
        reference, _ = measure(teacher, student, ids, "streamed", 1)
    finally:
        step_module.layer_loss = layer_loss
    reference["hidden_states_held"] = reference["held_bytes"] / hidden
    out["streamed_with_autograd_layer_loss"] = reference
    one = out["streamed"]["stage_size_1"]
    out["targets"] = {
        "streamed_held": {"target": f"<= (distilled + 1) = {distilled + 1} hidden states (+ loss scalars)", "value": one["hidden_states_held"], "pass": one["held_bytes"] <= (distilled + 1) * hidden + scalars},
        "teacher_forced_held": {"target": "<= 2 hidden states (+ loss scalars)", "value": forced["hidden_states_held"], "pass": forced["held_bytes"] <= 2 * hidden + scalars},
        "streamed_equals_naive": {"target": "same losses and gradients, bitwise, for stages of 1, 2, 4", "value": all(s["same_loss_and_grads_as_naive"] for s in out["streamed"].values()), "pass": all(s["same_loss_and_grads_as_naive"] for s in out["streamed"].values())},
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 layers, batch 2 x 128")
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    layers, batch, seqlen = (12, 2, 128) if args.quick else (30, 4, 256)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = {"float32": run(layers, batch, seqlen, torch.float32, device), "bfloat16": run(layers, batch, seqlen, torch.bfloat16, device)}
    result = {
        "benchmark": "streaming_memory",
        "machine": machine(),
        "device": str(device),
        "shapes": {"layers": layers, "batch": batch, "seq_len": seqlen, "hidden": 576},
        "runs": runs,
        "pass": all(t["pass"] for r in runs.values() for t in r["targets"].values()),
    }
    write_result("streaming_memory" + ("_quick" if args.quick else ""), result, args.out)


if __name__ == "__main__":
    main()
