"""StepState: the counters a checkpoint carries and the non-finite policy."""

from __future__ import annotations

import pytest

from cald_scale.distill.progress import NonFiniteLossError, StepState


def test_optimizer_steps_skipped_for_non_finite_gradients_are_counted_and_stop_the_run_in_a_row():
    """DeepSpeed skips an update whose gradients are not finite even when every loss was finite;
    such steps count, survive a checkpoint, and max_consecutive_nan of them in a row stop the run."""
    state = StepState({}, last_saved=4, max_consecutive_nan=2, ckpt_dir="ckpt")
    state.optimizer_step(applied=False, step=5, loss_scaling=False)
    state.optimizer_step(applied=True, step=6, loss_scaling=False)  # an applied step ends the streak
    state.optimizer_step(applied=False, step=7, loss_scaling=False)
    assert state.steps_skipped == 2 and StepState(state.as_dict()).steps_skipped == 2
    with pytest.raises(NonFiniteLossError, match=r"2 optimizer steps in a row skipped .* at step 8 .*step 4\) in ckpt"):
        state.optimizer_step(applied=False, step=8, loss_scaling=False)


def test_fp16_loss_scale_search_skips_steps_without_stopping_the_run():
    state = StepState({}, max_consecutive_nan=1)
    for step in range(1, 6):  # the dynamic loss scaler halving its way down
        state.optimizer_step(applied=False, step=step, loss_scaling=True)
    assert state.steps_skipped == 5


def test_a_stop_before_any_checkpoint_does_not_name_one():
    state = StepState({}, max_consecutive_nan=1, ckpt_dir="ckpt")
    with pytest.raises(NonFiniteLossError, match=r"at step 1 .*No checkpoint was saved yet \(in ckpt\).*it starts over") as err:
        state.nonfinite(step=1)
    assert "step 0" not in str(err.value)


def test_the_runs_peak_memory_is_the_largest_rank_over_every_session():
    """A resumed session (or one that only evaluates a finished run) peaks lower than training
    did: the report gives the largest rank's peak over all sessions, carried by the checkpoint."""
    first = StepState({})
    first.record_peak([{"cpu_max_rss_bytes": 800}, {"cpu_max_rss_bytes": 900, "gpu_max_allocated_bytes": 50}])
    resumed = StepState(first.as_dict())
    assert resumed.record_peak([{"cpu_max_rss_bytes": 700}]) == {"cpu_max_rss_bytes": 900, "gpu_max_allocated_bytes": 50}
    assert resumed.record_peak([{"cpu_max_rss_bytes": 950}])["cpu_max_rss_bytes"] == 950
    assert StepState({"micro_cursor": 3}).peak_memory == {}  # a checkpoint from before the record


def test_a_stop_right_after_the_checkpoint_a_session_resumed_from_says_its_weights_diverged():
    """A checkpoint is saved after its step's update, which can be the one that blew the weights
    up (its loss was finite). Resumed from it, the first step fails whatever the LR: the message
    says so and names the tag to move aside, instead of "intact; rerun to resume" (a loop)."""
    resumed = StepState({}, last_saved=4, max_consecutive_nan=1, ckpt_dir="ckpt")
    with pytest.raises(NonFiniteLossError, match=r"resumed from the checkpoint at step 4 and its first step already failed.*Move ckpt/step_00000004 aside") as err:
        resumed.nonfinite(step=5)
    assert "intact" not in str(err.value)
    skipped = StepState({}, last_saved=4, max_consecutive_nan=1, ckpt_dir="ckpt")  # the gradients, not the loss
    with pytest.raises(NonFiniteLossError, match=r"its first step already failed"):
        skipped.optimizer_step(applied=False, step=5, loss_scaling=False)
    # Within a session that trained: the checkpoint just saved may be the bad one; said as a maybe.
    trained = StepState({}, last_saved=4, max_consecutive_nan=1, ckpt_dir="ckpt")
    trained.optimizer_step(applied=True, step=5, loss_scaling=False)
    trained.last_saved = 6
    with pytest.raises(NonFiniteLossError, match=r"checkpoint \(step 6\) in ckpt is the step just before.*If the rerun stops at its first step again.*ckpt/step_00000006"):
        trained.nonfinite(step=7)
    with pytest.raises(NonFiniteLossError, match=r"checkpoint \(step 6\) in ckpt is intact"):
        trained.nonfinite(step=9)
