"""Where a run stands between optimizer steps: the data cursor and the counters a checkpoint carries."""

from __future__ import annotations

from pathlib import Path

__all__ = ["StepState", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


class StepState:
    """The data cursor (micro-batches consumed on each rank), tokens seen, skipped
    non-finite micro-batches, optimizer steps DeepSpeed skipped, training seconds and peak memory;
    ``as_dict`` goes into every checkpoint.
    ``last_saved`` (the step of the last complete checkpoint) and the non-finite policy are
    what an error that stops the run must name."""

    def __init__(self, saved: dict, *, last_saved: int = 0, max_consecutive_nan: int = 1, ckpt_dir: Path | None = None):
        self.cursor = int(saved.get("micro_cursor", 0))
        self.tokens_seen = int(saved.get("tokens_seen", 0))
        self.nan_skipped = int(saved.get("nan_skipped", 0))
        self.steps_skipped = int(saved.get("steps_skipped", 0))
        self.train_seconds = float(saved.get("train_seconds", 0.0))
        self.peak_memory: dict[str, int] = dict(saved.get("peak_memory", {}))
        self.consecutive_nan = 0
        self.consecutive_skipped_steps = 0
        self.last_saved = last_saved
        self.resumed_at = last_saved  # the checkpoint this session started from (0: none)
        self.steps_applied = 0  # optimizer steps applied in this session
        self.max_consecutive_nan = max_consecutive_nan
        self.ckpt_dir = ckpt_dir

    def as_dict(self) -> dict:
        return {
            "micro_cursor": self.cursor, "tokens_seen": self.tokens_seen, "nan_skipped": self.nan_skipped,
            "steps_skipped": self.steps_skipped, "train_seconds": self.train_seconds, "peak_memory": self.peak_memory,
        }

    def record_peak(self, per_rank: list[dict[str, int]]) -> dict[str, int]:
        """The run's peak memory so far, of the largest rank in any session: what the checkpoint
        carries with ``per_rank`` (this session's peaks, rank by rank) folded in."""
        for peaks in per_rank:
            for key, value in peaks.items():
                self.peak_memory[key] = max(self.peak_memory.get(key, 0), int(value))
        return dict(self.peak_memory)

    def _where_to_resume(self, step: int) -> str:
        """What the stop at ``step`` leaves and what to do. A checkpoint is saved after its step's
        update, which may be the one that diverged (its loss was finite; the weights it left are
        not): then every rerun from it stops at the next step whatever the LR."""
        if not self.last_saved:
            return f"No checkpoint was saved yet (in {self.ckpt_dir}); lower the LR or check the data, then rerun (it starts over)."
        tag = Path(self.ckpt_dir or ".") / f"step_{self.last_saved:08d}"
        if step == self.last_saved + 1 and self.resumed_at == self.last_saved and not self.steps_applied:
            return (
                f"This session resumed from the checkpoint at step {self.last_saved} and its first step already failed: the weights "
                f"saved there likely diverged (the update that made them was the bad one), and then no LR helps from it. Move {tag} "
                f"aside to resume from an older checkpoint in {self.ckpt_dir} (output.keep_last keeps that many), or start a new run; "
                "if an older one stops here too, check the data of this step"
            )
        if step == self.last_saved + 1:
            return (
                f"The last complete checkpoint (step {self.last_saved}) in {self.ckpt_dir} is the step just before; lower the LR or "
                f"check the data, then rerun to resume. If the rerun stops at its first step again, the weights saved there diverged: "
                f"move {tag} aside to resume from an older checkpoint"
            )
        return f"The last complete checkpoint (step {self.last_saved}) in {self.ckpt_dir} is intact; lower the LR or check the data, then rerun to resume."

    def finite(self) -> None:
        self.consecutive_nan = 0

    def nonfinite(self, *, step: int) -> None:
        """Count one skipped micro-step of step ``step`` (numbered from 1, as metrics and the
        progress bar number steps); stop the run once ``max_consecutive_nan`` came in a row."""
        self.nan_skipped += 1
        self.consecutive_nan += 1
        if self.consecutive_nan >= self.max_consecutive_nan:
            raise NonFiniteLossError(
                f"{self.consecutive_nan} non-finite losses in a row at step {step} (train.max_consecutive_nan="
                f"{self.max_consecutive_nan}); stopped. {self._where_to_resume(step)}"
            )

    def optimizer_step(self, *, applied: bool, step: int, loss_scaling: bool) -> None:
        """Whether DeepSpeed applied step ``step``'s update. It skips one whose gradients are not
        finite, finite losses or not (an overflow in backward), and the step still counts (the LR
        schedule moves on): counted in ``steps_skipped``, and the run stops once
        ``max_consecutive_nan`` come in a row, except under fp16's dynamic loss scaling, whose
        search for a scale skips steps by design."""
        if applied:
            self.consecutive_skipped_steps = 0
            self.steps_applied += 1
            return
        self.steps_skipped += 1
        if loss_scaling:
            return
        self.consecutive_skipped_steps += 1
        if self.consecutive_skipped_steps >= self.max_consecutive_nan:
            raise NonFiniteLossError(
                f"{self.consecutive_skipped_steps} optimizer steps in a row skipped by DeepSpeed for non-finite gradients, "
                f"at step {step} (train.max_consecutive_nan={self.max_consecutive_nan}); stopped. {self._where_to_resume(step)}"
            )
