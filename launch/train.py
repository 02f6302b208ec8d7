"""Entry point: `deepspeed launch/train.py --ds_config ds_configs/zero3.json [--recipe R.yaml] [key.path=value ...]`.

The training command itself is ``cald_scale.launch`` (`--help` describes it); this script adds
only that SLURM's warning signal and SIGTERM are recorded from the very start.
"""

from __future__ import annotations

import signal

# NOTE: first, before the imports below (torch, DeepSpeed, transformers: ~10 s a rank, longer on a
# shared file system), so not cald_scale.launch.record_early_signals: importing it is that wait. Until the run's PreemptionWatch takes over, SLURM's warning signal or a
# SIGTERM is recorded here instead of ending the rank by its default action: the job then stops
# cleanly with the preempted exit code and is requeued, not failed.
_EARLY_SIGNALS: list[str] = []


def _record_early(number: int, frame) -> None:
    _EARLY_SIGNALS.append(signal.Signals(number).name)


for _number in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(_number, _record_early)

from cald_scale.launch import finish, main  # noqa: E402

if __name__ == "__main__":
    finish(lambda: main(early_signals=_EARLY_SIGNALS))
