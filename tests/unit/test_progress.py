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
