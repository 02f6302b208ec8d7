"""The engines run on the DeepSpeed release they are tested on, or say which one that is."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import deepspeed
import pytest

from cald_scale.engines.deepspeed_version import ALLOW_ENV, TESTED_DEEPSPEED, UntestedDeepSpeedError, check_deepspeed_version
from cald_scale.errors import user_errors

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_release_is_the_tested_one_and_the_pin():
    check_deepspeed_version()  # what init_distributed checks first
    assert deepspeed.__version__.split("+")[0] == TESTED_DEEPSPEED
    assert re.search(rf'^\s*"deepspeed=={re.escape(TESTED_DEEPSPEED)}",', (REPO / "pyproject.toml").read_text(), re.M)  # (tomllib: Python 3.11+)
    assert re.search(rf'DEEPSPEED_VERSION:-{re.escape(TESTED_DEEPSPEED)}\}}', (REPO / "launch" / "build_gpu_wheels.sh").read_text())


def test_another_release_is_refused_in_one_line_unless_allowed(monkeypatch, caplog):
    check_deepspeed_version(f"{TESTED_DEEPSPEED}+cu130")  # a local build of the same release
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UntestedDeepSpeedError, match=rf"DeepSpeed 0\.19\.0 is installed.*tested on {re.escape(TESTED_DEEPSPEED)}.*{ALLOW_ENV}=1"):
        check_deepspeed_version("0.19.0")
    assert UntestedDeepSpeedError in user_errors()  # the entry points print it without a traceback
    for no in ("0", "false", "no", ""):
        monkeypatch.setenv(ALLOW_ENV, no)
        with pytest.raises(UntestedDeepSpeedError):
            check_deepspeed_version("0.20.0")
    monkeypatch.setenv(ALLOW_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="cald_scale.engines"):
        check_deepspeed_version("0.20.0")
    assert "DeepSpeed 0.20.0 is installed" in caplog.text and f"Going on: {ALLOW_ENV} is set" in caplog.text


def test_the_pre_launch_config_check_names_another_release(monkeypatch):
    """`launch/train.py --print_config` (what the SLURM scripts run before they launch) checks
    the release too, so a cluster module's DeepSpeed stops the job before its ranks start."""
    from cald_scale.config import load_run_config
    from cald_scale.train import check_ds_config

    cfg = load_run_config()
    check_ds_config(cfg, REPO / "ds_configs" / "zero3.json")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.setattr(deepspeed, "__version__", "0.19.2")  # what a cluster's module might provide
    with pytest.raises(UntestedDeepSpeedError, match=r"DeepSpeed 0\.19\.2 is installed"):
        check_ds_config(cfg, REPO / "ds_configs" / "zero3.json")
