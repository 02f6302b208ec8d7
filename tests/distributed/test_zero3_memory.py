"""ZeRO-3 memory behaviour with the real launcher and 2 CPU ranks: partitioned construction,
streamed == naive, shared frozen weights, prefetch."""

from __future__ import annotations

import glob
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from launcher import free_port, launcher_env, run
from tiny_models import tiny_teacher

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def small_vocab_teacher(tmp_path_factory):
    """An 8-layer tiny Llama whose blocks, not its embedding, hold most of its weights."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("teacher8")
    model = tiny_teacher("llama", vocab=256, layers=8)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(255)} | {"<eos>": 255}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="<eos>")
    tok.save_pretrained(folder)
    return folder


# construction first: it measures the peak of live tensors, before any other check has run.
CHECK_ORDER = ("construction", "streamed_vs_naive", "shared_frozen", "prefetch", "fp32_master", "unchanged_persistent", "chunked_head_frozen", "vocab_streamed_head", "fused_head_trained", "zero3_leaves", "graph_free_linear", "stale_grads", "outside_still", "eval_padding", "padded_layer_weight", "partitioned_reads")


@pytest.fixture(scope="module")
def checks(small_vocab_teacher, tmp_path_factory) -> Path:
    """Every check of zero3_checks.py in one launch (each launch costs ~30 s before its first step)."""
    out = tmp_path_factory.mktemp("zero3_checks")
    launcher = str(Path(sys.executable).parent / "deepspeed")
    port = free_port()
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(port), "tests/distributed/zero3_checks.py", "--check", *CHECK_ORDER, "--teacher", str(small_vocab_teacher), "--out", str(out)]
    proc = run(cmd, launcher_env(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # DeepSpeed's CPU shared-memory buffers (69 MB per rank) must not outlive the job.
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    return out


def _check(name: str, out: Path) -> list[dict]:
    ranks = [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert "error" not in rank, rank.get("error")
    return ranks


def test_each_rank_reads_only_its_partition_of_the_checkpoint(checks):
    """Under ZeRO-3 every rank used to read every tensor whole and keep half: N ranks read the
    checkpoint N times. Each now reads its partition's range (a MoE's stacked experts: those the
    range covers), and the models gather to from_pretrained's values, odd sizes and padded
    last partitions included."""
    ranks = _check("partitioned_reads", checks)
    for rank in ranks:
        for name, bound in (("llama", 0.52), ("mixtral", 0.8)):
            r = rank[name]
            assert r["unequal"] == [], (name, r["unequal"])
            assert r["persistent"] == 0 and r["odd_tensors"] >= 5, r
            assert r["bytes_read"] <= bound * r["checkpoint_bytes"], (name, r)
        assert rank["mixtral"]["stacked_experts"] == 4
        # Built, a model holds no partition: each is made when first written (none for a parameter
        # dropped before, as a tied model's untied head or the student's copies of what it shares).
        assert rank["llama"]["partition_bytes_at_construction"] == 0 and rank["mixtral"]["partition_bytes_at_construction"] == 0
        # The mixers' attention init reads the rows of Q/K/V/O this rank's partitions are made of.
        student = rank["llama"]["student"]
        assert student["mixers_unequal"] == [] and student["mixer_tensors"] >= 10, student
        assert student["attention_share_read"] <= 0.75, student  # (1.0 when read whole; 0.33 and 0.71 here: Q lies in one rank's range)
        assert rank["unwritten_refused"].startswith("the test model: 1 parameter(s) were never written after construction (model.embed_tokens.weight)")
    for name in ("llama", "mixtral"):  # between them the ranks read every byte (at least)
        assert sum(rank[name]["bytes_read"] for rank in ranks) >= ranks[0][name]["checkpoint_bytes"]
    assert sum(rank["llama"]["student"]["attention_share_read"] for rank in ranks) >= 1.0 - 1e-9


def test_streamed_equals_naive_under_zero3(checks):
    for rank in _check("streamed_vs_naive", checks):
        naive, streamed = rank["naive"], rank["streamed"]
        assert naive["losses"] == streamed["losses"] and naive["per_layer"] == streamed["per_layer"]
        assert naive["losses"]["kl"] > 0 and len(naive["per_layer"]) == 7
        assert naive["grads"].keys() == streamed["grads"].keys() and len(naive["grads"]) > 20
        for name in naive["grads"]:
            torch.testing.assert_close(torch.tensor(streamed["grads"][name]), torch.tensor(naive["grads"][name]), rtol=0, atol=0, msg=name)


def test_construction_never_holds_a_whole_model(checks):
    for rank in _check("construction", checks):
        whole = rank["full_teacher_bytes"] + rank["full_student_bytes"]
        assert rank["all_partitioned"] and rank["teacher_equals_plain_load"]
        assert rank["family_module_fresh"] and rank["family_module_imported_before_zero_init"]
        # Each rank keeps half of every tensor (plus alignment padding)...
        assert rank["local_teacher_bytes"] + rank["local_student_bytes"] <= 0.52 * whole
        # ...and never held more than its half plus about one layer in flight.
        in_flight = rank["largest_block_bytes"] + rank["largest_tensor_bytes"]
        assert rank["peak_live_bytes"] <= 0.52 * whole + in_flight, rank
        assert rank["peak_live_bytes"] < 0.7 * whole


def test_frozen_copied_weights_are_shared_with_the_teacher(checks):
    for rank in _check("shared_frozen", checks):
        assert rank["copied"] > 10 and rank["same_object"] and rank["shared"] == rank["copied"]
        assert rank["copied_unchanged_after_training"] and rank["mixers_changed"]


def test_zero3_trace_completes_and_blocks_are_prefetched(checks):
    for rank in _check("prefetch", checks):
        assert rank["student_trace_complete"] and rank["teacher_trace_complete"]
        first, last = rank["gathered_ahead_per_step"][0], rank["gathered_ahead_per_step"][-1]
        # Without a trace every gather is synchronous: each block starts with its parameters absent.
        assert len(first) == 8 and max(first) == 0.0
        # With it, every block after the first finds its parameters gathered (or in flight) ahead of its forward.
        assert min(last[1:]) > 0.5, last


def test_fp32_parameters_as_their_own_master_train_identically(checks):
    for rank in _check("fp32_master", checks):
        two, one = rank["two_copies"], rank["aliased"]
        assert one["aliased"] and not two["aliased"]
        assert one["grads_read_in_place"] and all(one["grads_read_in_place"]) and not any(two["grads_read_in_place"])
        assert one["losses"] == two["losses"] and one["losses"][-1] < one["losses"][0]
        assert one["checksum"] == two["checksum"]


def test_a_step_regathering_only_what_it_changes_trains_as_deepspeeds(checks):
    """Two ranks: a trained parameter's update is spread over the ranks, so the step gathers every
    trained persistent parameter again; only the frozen ones stay gathered."""
    for rank in _check("unchanged_persistent", checks):
        assert_unchanged_persistent_trains_the_same(rank, regathered=lambda deepspeed: deepspeed["persistent_trained"])


@pytest.mark.parametrize(("bf16", "ds_config"), [(False, "zero3.json"), (True, "zero3.json"), (False, "zero3_offload.json")], ids=["fp32", "bf16", "offload"])
def test_one_rank_keeps_its_trained_persistent_parameters_gathered_and_trains_the_same(small_vocab_teacher, tmp_path, bf16, ds_config):
    """One rank: a trained persistent parameter's gathered tensor is its partition, which the step
    writes in place (fp32: the master itself; bf16: copied from the fp32 master; offloaded: copied
    from the CPU optimizer's), so the step regathers nothing. The offload case is also the test
    suite's run of the shipped ds_configs/zero3_offload.json (parameters and optimizer on the CPU,
    DeepSpeed's CPU Adam, which it compiles on first use)."""
    result = _one_rank_check("unchanged_persistent", small_vocab_teacher, tmp_path, CALD_CHECK_BF16="1" if bf16 else "0", CALD_CHECK_DS_CONFIG=ds_config)
    assert result["bf16"] == bf16 and result["kept"]["dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
    assert result["offloaded"] == (["offload_optimizer", "offload_param"] if ds_config == "zero3_offload.json" else [])
    assert_unchanged_persistent_trains_the_same(result, regathered=lambda deepspeed: 0)
    # A step that moved the partitions: the kept trained parameters are gathered from them again.
    moved, ds = result["moved"], result["deepspeed"]
    assert moved["losses"] == ds["losses"] and moved["checksum"] == ds["checksum"]


def _one_rank_check(name: str, teacher: Path, tmp_path: Path, **env_extra: str) -> dict:
    """``zero3_checks.py --check name`` in one process of one rank (no launcher): its result."""
    env = launcher_env(tmp_path) | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "tests/distributed/zero3_checks.py", "--check", name, "--teacher", str(teacher), "--out", str(tmp_path)]
    proc = run(cmd, env | env_extra, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / f"{name}_rank0.json").read_text())
    assert "error" not in result, result.get("error")
    return result


def test_models_built_for_bf16_engines_keep_float32_rotary_frequencies(small_vocab_teacher, tmp_path):
    """zero.Init casts every float tensor made inside it to bf16, the rotary inv_freq buffers too:
    the teacher and a hybrid's kept attention then computed other angles than the model a user
    loads (mean |logit| change 0.037 at positions 1-2k on SmolLM2-135M). They are rebuilt in float32."""
    result = _one_rank_check("bf16_rotary", small_vocab_teacher, tmp_path)
    assert result["bf16"] and set(result["plain"].values()) == {"torch.float32"}
    for label in ("teacher", "student"):
        found = result[label]
        assert found["parameter_dtype"] == "torch.bfloat16" and found["dtypes"], found
        assert set(found["dtypes"].values()) == {"torch.float32"} and all(found["equal_to_plain"].values()), found


def assert_unchanged_persistent_trains_the_same(result: dict, regathered) -> None:
    """``check_unchanged_persistent``'s two runs: the same training, with fewer parameters regathered per step."""
    ds, kept = result["deepspeed"], result["kept"]
    assert ds["persistent"] > ds["persistent_trained"] > 0  # frozen and trained persistent parameters both
    assert ds["regathered_per_step"] == [ds["persistent"]] * 4
    # NOTE: the first pass records ZeRO-3's trace, and releases persistent parameters too.
    assert kept["regathered_per_step"] == [ds["persistent"]] + [regathered(ds)] * 3
    assert kept["losses"] == ds["losses"] and kept["losses"][-1] < kept["losses"][0]
    assert kept["checksum"] == ds["checksum"] and kept["trained_checksum"] == ds["trained_checksum"]


def test_a_block_skipped_for_a_nan_is_not_stepped_with_its_last_gradient(checks):
    for rank in _check("stale_grads", checks):
        first, poisoned = rank["first"], rank["poisoned"]
        assert first["finite"] and first["block0"] > 0 and first["block1"] > 0
        assert rank["buffer_after_step"] == 0.0
        # Stage 0 non-finite: skipped on every rank; block 0's partitions hold no gradient (they held
        # the last step's, clipped, before), block 1 learns, and the logged loss is the finite stages'.
        assert not poisoned["finite"] and poisoned["skipped"] == 1
        assert poisoned["block0"] == 0.0 and poisoned["block1"] > 0 and math.isfinite(poisoned["loss"])


def test_a_teacher_forced_phase_training_every_weight_leaves_embedding_norm_and_head_still(checks):
    for rank in _check("outside_still", checks):
        assert rank["groups"] == ["mixers", "mixers_no_decay", "copied", "outside"]
        assert rank["lr"]["e2e"]["outside"] == rank["lr"]["e2e"]["copied"] > 0
        assert rank["lr"]["tf"]["outside"] == 0.0 and rank["lr"]["tf"]["copied"] > 0
        # End to end everything moves; teacher-forced the blocks' copied weights still train while
        # the parts outside them stay bit for bit (they moved ~1e-3 by decay and momentum before).
        assert rank["outside_moved"]["e2e"] > 0 and rank["inside_moved"]["e2e"] > 0
        assert rank["outside_moved"]["tf"] == 0.0 and rank["inside_moved"]["tf"] > 0
        assert rank["joined_groups"] == ["mixers", "mixers_no_decay", "copied"]


def test_held_out_perplexity_does_not_depend_on_how_the_sequences_shard(checks):
    ranks = _check("eval_padding", checks)
    assert [r["shard"] for r in ranks] == [[0, 1, 2, -1], [3, 4, 5, 6]]
    for rank in ranks:
        for which in ("student", "teacher"):
            padded, every = rank[which]["padded"], rank[which]["every_sequence"]
            assert padded["ppl"] == pytest.approx(every["ppl"], rel=1e-9) and padded["tokens"] == 7 * 31
            assert every["tokens"] == 2 * 7 * 31  # each rank scored all 7: the sums double, the mean does not


def test_chunked_head_losses_with_a_frozen_shared_head(checks):
    for rank in _check("chunked_head_frozen", checks):
        whole, chunked = rank["null"], rank["16"]
        for key in ("loss", "ce", "kl", "layer"):
            assert chunked["losses"][key] == pytest.approx(whole["losses"][key], rel=1e-5)
        assert whole["grads"].keys() == chunked["grads"].keys() and all(".mixer." in n for n in whole["grads"])
        for name in whole["grads"]:
            torch.testing.assert_close(torch.tensor(chunked["grads"][name]), torch.tensor(whole["grads"][name]), rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_head_streamed_by_vocabulary_pieces_matches_the_gathered_head(checks):
    for rank in _check("vocab_streamed_head", checks):
        streamed, gathered = rank["True"], rank["False"]
        for key in ("loss", "ce", "layer"):
            assert streamed["losses"][key] == pytest.approx(gathered["losses"][key], rel=1e-5)
        assert streamed["grads"].keys() == gathered["grads"].keys() and all(".mixer." in n for n in streamed["grads"])
        for name in streamed["grads"]:
            torch.testing.assert_close(torch.tensor(streamed["grads"][name]), torch.tensor(gathered["grads"][name]), rtol=1e-4, atol=1e-6, msg=name)


def test_trained_tied_head_with_one_weight_gradient_matches_the_head_module(checks):
    for rank in _check("fused_head_trained", checks):
        module, fused = rank["module"], rank["fused"]
        assert module["tied"] and fused["tied"]
        assert module["fused_calls"] == 0 and fused["fused_calls"] == 3  # one per step
        for step, (before, after) in enumerate(zip(module["losses"], fused["losses"])):
            # The same weights at step 0; after it, Adam at lr 1e-2 amplifies last-bit gradient differences.
            for key in ("loss", "ce", "kl", "layer"):
                assert after[key] == pytest.approx(before[key], rel=1e-5 if step == 0 else 1e-3), (step, key)
        assert module["losses"][-1]["loss"] < module["losses"][0]["loss"]
        assert module["grads"].keys() == fused["grads"].keys() and any("embed_tokens" in name for name in fused["grads"])
        for name in module["grads"]:
            torch.testing.assert_close(torch.tensor(fused["grads"][name]), torch.tensor(module["grads"][name]), rtol=1e-4, atol=1e-6, msg=name)
        # Adam at lr 1e-2 turns last-bit gradient differences into updates of up to ~lr on entries
        # whose gradient is near zero; the losses after the steps above agree to 1e-5.
        assert fused["head_checksum"] == pytest.approx(module["head_checksum"], abs=1e-3)


def test_blocks_or_frozen_parts_gathered_as_leaves_train_exactly_as_hooked_submodules(checks):
    for rank in _check("zero3_leaves", checks):
        for scenario in ("end_to_end", "teacher_forced", "all_trainable_hybrid"):
            hooks, frozen, blocks = (rank[f"{scenario}_{mode}"] for mode in ("none", "frozen", "blocks"))
            assert hooks["leaves"] == {"teacher": [], "student": []}
            # The frozen teacher's blocks whole; of the student's, what never trains (its copied
            # MLPs while the mixers train; nothing when everything does) ...
            mixers_only = scenario != "all_trainable_hybrid"
            assert frozen["leaves"] == {"teacher": ["LlamaDecoderLayer"], "student": ["LlamaMLP"] if mixers_only else []}, (scenario, frozen["leaves"])
            # ... or every student block, trainable or not.
            assert blocks["leaves"] == {"teacher": ["LlamaDecoderLayer"], "student": blocks["block_types"]}, (scenario, blocks["leaves"])
            student_hooks = [mode["hooked_modules"]["student"] for mode in (hooks, frozen, blocks)]
            assert student_hooks[2] < student_hooks[0] and student_hooks[1] <= student_hooks[0], (scenario, student_hooks)
            assert frozen["hooked_modules"]["teacher"] == blocks["hooked_modules"]["teacher"] < hooks["hooked_modules"]["teacher"], scenario
            assert hooks["losses"][-1] < hooks["losses"][0], scenario
            # Frozen leaves change nothing in the arithmetic: bit for bit.
            for key in ("losses", "first_grad_norms", "trained_checksums"):
                assert frozen[key] == hooks[key], (scenario, key)
            # Whole blocks: DeepSpeed's hooks no longer put an autograd node on each submodule's
            # input, so a tensor used three times in a block (the residual stream into an RMSNorm)
            # sums its gradients in another order: the same first loss, gradients to ~1e-7, and
            # weights after three Adam steps at lr 1e-2 (which turn last-bit differences of
            # near-zero gradients into updates of up to ~lr) to 1e-3 per tensor's sum. A block
            # whose gradients were lost (reduced before its backward) moved every weight by ~lr.
            assert blocks["losses"][0] == hooks["losses"][0], scenario
            assert blocks["first_grad_norms"] == pytest.approx(hooks["first_grad_norms"], rel=1e-5, abs=1e-9), scenario
            assert blocks["losses"] == pytest.approx(hooks["losses"], rel=1e-5), scenario
            assert blocks["trained_checksums"] == pytest.approx(hooks["trained_checksums"], abs=1e-3), scenario
            assert frozen["leaf_owner_references"] == blocks["leaf_owner_references"] == 0, scenario


def test_linear_saves_no_gathered_weight_and_skips_autograd_where_nothing_is_saved(checks):
    for rank in _check("graph_free_linear", checks):
        assert rank["installed"]
        ours, deepspeed, torch_own = rank["graph_free"], rank["deepspeed"], rank["torch"]
        # torch's own F.linear saves a view of each frozen, gathered MLP weight for the input's
        # gradient: that storage outlives ZeRO-3's release until backward. DeepSpeed's saves the
        # parameter itself, and so does ours wherever a gradient flows.
        assert torch_own["saved_aliases_of_gathered_weights"] > 0, torch_own
        assert ours["saved_aliases_of_gathered_weights"] == deepspeed["saved_aliases_of_gathered_weights"] == 0, (ours, deepspeed)
        assert ours["saved_tensors"] == deepspeed["saved_tensors"]
        # The same step: the no-grad teacher through torch's linear, the student through ParamSavingLinear
        # (ours) and through DeepSpeed's own Function, bit for bit.
        assert ours["loss"] == deepspeed["loss"] == torch_own["loss"]
        assert ours["grad_norms"] == deepspeed["grad_norms"] and min(ours["grad_norms"]) > 0
        for key in ("teacher_output", "teacher_output_abs"):
            assert ours[key] == torch_own[key] == deepspeed[key]


def test_padded_layer_loss_weighs_every_real_token_of_the_global_batch_alike(checks):
    for rank in _check("padded_layer_weight", checks):
        assert rank["tokens"] == 20.0 and rank["params"] > 20  # (8 + 32) real tokens over 2 micro-batches
        # Per-rank means would weigh rank 0's 8 tokens as much as rank 1's 32: far off here.
        assert rank["rel_global_vs_per_rank_means"] > 0.05
        assert rank["rel_to_global_mean"] < 1e-4
