"""The one DeepSpeed release cald_scale is tested on, checked before any engine is built.

The engines read and wrap ZeRO-3 internals (``ds_tensor``, ``ds_status``, the parameter
coordinator, the optimizer's step and gradient buffers) that DeepSpeed changes within a minor
series, patch by patch: on 0.19.0-0.19.2 bf16 engines round the rotary frequencies, activation
checkpointing fails at its first backward, and the persistent-parameter trim turns itself off,
none of them with an error (helper-86, stop 55). pyproject pins the tested release; this check
names it for an environment that installed another one by other means.
"""

from __future__ import annotations

import logging

from ..fileio import env_flag

__all__ = ["TESTED_DEEPSPEED", "ALLOW_ENV", "UntestedDeepSpeedError", "check_deepspeed_version", "is_tested"]

logger = logging.getLogger("cald_scale.engines")

TESTED_DEEPSPEED = "0.19.8"
ALLOW_ENV = "CALD_ALLOW_UNTESTED_DEEPSPEED"


class UntestedDeepSpeedError(RuntimeError):
    """The installed DeepSpeed is not the release the engines were tested on."""


def is_tested(installed: str) -> bool:
    """Whether DeepSpeed release ``installed`` (a local build's ``+suffix`` aside) is the tested one."""
    return installed.split("+")[0] == TESTED_DEEPSPEED


def check_deepspeed_version(installed: str | None = None) -> None:
    """Refuse a DeepSpeed other than ``TESTED_DEEPSPEED`` (``CALD_ALLOW_UNTESTED_DEEPSPEED=1``,
    or true/yes/on, turns the refusal into a warning, for whoever wants to try one)."""
    if installed is None:
        import deepspeed

        installed = deepspeed.__version__
    if is_tested(installed):
        return
    message = (
        f"DeepSpeed {installed} is installed; cald_scale's ZeRO-3 engines are tested on {TESTED_DEEPSPEED} only (each 0.19 "
        f"patch release changed the internals they use, some silently): pip install deepspeed=={TESTED_DEEPSPEED}"
    )
    if env_flag(ALLOW_ENV):
        logger.warning("%s. Going on: %s is set", message, ALLOW_ENV)
        return
    raise UntestedDeepSpeedError(f"{message}, or set {ALLOW_ENV}=1 to run on {installed} regardless")
