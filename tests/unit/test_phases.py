"""Phases: lengths, per-phase settings, LR schedule, waypoint switching, guidance decisions."""

from __future__ import annotations

import math

import pytest

from cald_scale.config import load_run_config
from cald_scale.config_loader import ConfigError
from cald_scale.distill.guidance import Guide


def _plan(phases: str, *overrides: str, world_size: int = 1):
    return load_run_config(overrides=[f"phases={phases}", *overrides]).plan(world_size)


def test_lengths_from_steps_tokens_fractions_and_the_rest():
    plan = _plan("[{name: a, steps: 3}, {name: b, tokens: 2048}, {name: c, fraction: 0.25}, {name: d}]", "train.max_steps=20")
    # 4 x 256 tokens per step: 2048 tokens are 2 steps; 0.25 of 20 is 5; d takes the other 10.
    assert [(p.name, p.start, p.end) for p in plan.phases] == [("a", 0, 3), ("b", 3, 5), ("c", 5, 10), ("d", 10, 20)]
    assert [plan.at(s).name for s in (0, 2, 3, 9, 10, 19)] == ["a", "a", "b", "c", "d", "d"]
    fixed = _plan("[{name: a, steps: 3}, {name: b, steps: 4}]", "train.max_steps=null")
    assert fixed.total_steps == 7


@pytest.mark.parametrize(
    "phases, overrides, message",
    [
        ("[{name: a, steps: 2}, {name: b, steps: 2}]", ["train.max_steps=5"], "phases add up to 4 steps but train.max_steps=5"),
        ("[{name: a}, {name: b}]", [], "only one phase may take the rest"),
        ("[{name: a, steps: 50}, {name: b}]", ["train.max_steps=50"], "nothing is left for phase 'b'"),
        ("[{name: a, steps: 2, fraction: 0.5}]", [], "give one of steps, tokens or fraction"),
        ("[{name: a, guidance: waypoint}]", [], "needs a non-empty waypoints list"),
        ("[{name: a, guidance: none, mode: teacher_forced}]", [], "teacher_forced needs a teacher"),
        ("[{name: a, guidance: target, waypoints: [x]}]", [], "only read with guidance: waypoint"),
        ("[{name: a, trainable: all}]", ["student.trainable=mixers"], "trains all weights but student.trainable=mixers"),
        ("[{name: a, mode: teacher_forced, a_layer: 0}]", [], "a_layer must be > 0"),
        ("[{name: a, guidance: none, a_ce: 0}]", [], "all loss weights are zero"),
        ("[{name: a, guidanse: none}]", [], "guidanse"),
    ],
)
def test_bad_phases_fail_on_load_naming_the_problem(phases, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(overrides=[f"phases={phases}", *overrides])


def test_phase_settings_default_to_the_run_and_guidance_sets_the_loss():
    plan = _plan(
        "[{name: tf, steps: 4, mode: teacher_forced, trainable: mixers, lr: 5.0e-3}, {name: e2e, steps: 4, a_kl: 1.0}, {name: ce, steps: 2, guidance: none}]",
        "train.max_steps=null", "train.lr=1e-3", "train.warmup_steps=3", "loss.a_layer=15",
    )
    tf, e2e, ce = plan.phases
    assert (tf.lr, e2e.lr) == (5e-3, 1e-3)
    assert (tf.loss.a_ce, tf.loss.a_layer, tf.loss.a_kl) == (0.0, 15.0, 0.0)  # teacher-forced: the layer loss alone
    assert (e2e.loss.a_ce, e2e.loss.a_layer, e2e.loss.a_kl) == (1.0, 15.0, 1.0)
    assert (ce.loss.a_ce, ce.loss.a_layer, ce.loss.a_kl) == (1.0, 0.0, 0.0)  # no teacher: the task loss alone
    assert [p.warmup_steps for p in plan.phases] == [2, 2, 1]  # clamped to half of each phase
    assert plan.uses_teacher and plan.teacher_needed_from(7) and not plan.teacher_needed_from(8)


def test_lr_warms_up_then_decays_to_the_floor_within_each_phase():
    (phase,) = _plan("[{name: a, steps: 10, warmup_steps: 2}]", "train.max_steps=null", "train.min_lr_ratio=0.1").phases
    factors = [phase.lr_factor(s) for s in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_a_continued_phase_goes_on_with_the_schedule_before_it():
    """A hybrid that drops the teacher's losses at step 4 of 10: with lr_schedule continue the
    LR does not warm up again at the switch; it follows one cosine over all 10 steps."""
    base = "[{name: guided, steps: 4, warmup_steps: 2}, {name: alone, steps: 6, guidance: none%s}]"
    own = _plan(base % "", "train.max_steps=null", "train.min_lr_ratio=0.1").phases
    cont = _plan(base % ", lr_schedule: continue", "train.max_steps=null", "train.min_lr_ratio=0.1").phases
    (whole,) = _plan("[{name: one, steps: 10, warmup_steps: 2}]", "train.max_steps=null", "train.min_lr_ratio=0.1").phases
    by_step = lambda phases: [next(p for p in phases if p.start <= s < p.end).lr_factor(s) for s in range(10)]  # noqa: E731
    assert by_step(cont) == pytest.approx([whole.lr_factor(s) for s in range(10)])
    assert by_step(own)[4] < by_step(own)[3]  # its own schedule: a warmup from the bottom again at the switch
    assert by_step(cont)[4] < by_step(cont)[3] and by_step(cont)[4] > 0.7
    assert cont[1].loss.a_layer == 0.0  # the switch itself still drops the teacher's losses
    assert "LR schedule continued from step 1" in cont[1].describe()
    # The warmup is clamped to half the shared span, not to half the first phase.
    long = _plan("[{name: a, steps: 4, warmup_steps: 10}, {name: b, steps: 96, guidance: none, lr_schedule: continue}]", "train.max_steps=null").phases
    assert [p.warmup_steps for p in long] == [10, 10]


@pytest.mark.parametrize(
    "phases, message",
    [
        ("[{name: a, lr_schedule: continue}]", "lr_schedule continue needs a phase before it"),
        ("[{name: a, steps: 2}, {name: b, lr_schedule: continue, warmup_steps: 1}]", "drop warmup_steps"),
        ("[{name: a, steps: 2}, {name: b, lr_schedule: continue, lr: 0.5}]", "peak LR 0.001, and this phase sets 0.5"),
    ],
)
def test_a_continued_schedule_is_refused_where_it_cannot_apply(phases, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(overrides=[f"phases={phases}"])


def test_a_continued_phase_without_an_lr_goes_on_at_the_schedules_peak():
    """The default recipe's end_to_end phase continued from its align phase (peak 5e-3): it used
    to take train.lr (1e-3) and be refused, telling the user to drop an lr it did not set (helper-104)."""
    cfg = load_run_config(overrides=["phases.1.lr_schedule=continue"])
    align, end_to_end = cfg.plan(world_size=1).phases
    assert align.lr == end_to_end.lr == 5e-3 and end_to_end.schedule_start == align.start


def test_waypoints_switch_at_equal_shares_of_the_phase():
    plan = _plan("[{name: warm, steps: 2}, {name: w, steps: 6, guidance: waypoint, waypoints: [a, b, c]}]", "train.max_steps=null")
    assert [plan.at(s).waypoint_at(s) for s in range(2, 8)] == ["a", "a", "b", "b", "c", "c"]
    assert plan.swaps_teacher and plan.waypoints == ["a", "b", "c"]


def test_indexed_overrides_edit_the_default_phases():
    cfg = load_run_config(overrides=["phases.1.lr=2e-4", "phases.0.fraction=0.5", "train.max_steps=10"])
    assert [(p.name, p.steps, p.lr) for p in cfg.plan(1).phases] == [("align", 5, 5e-3), ("end_to_end", 5, 2e-4)]
    with pytest.raises(ConfigError, match="not an index of a 2-item list"):
        load_run_config(overrides=["phases.2.lr=1e-3"])


class _RecordingTeacher:
    """Stands in for ``engines.teacher.ManagedTeacher`` to check the guidance policy alone
    (the real engine is exercised by tests/distributed/test_guidance.py)."""

    def __init__(self, base):
        self.loaded, self.layerwise, self.calls = base, object(), []

    def load(self, folder):  # as the real one: loading what is already there is a no-op
        if folder == self.loaded:
            return
        self.calls.append(("load", folder))
        self.loaded = folder

    def set_lr(self, lr, weight_decay):
        self.calls.append(("lr", lr))

    def train_step(self, batch):  # as the real one: the weights are no folder's any more
        self.loaded = None

    def release(self, keep):
        self.calls.append(("release",))
        return {"freed_partition_bytes": 1, "teacher_params_alive": 0, "rss_before": 2, "rss_after": 1}


def test_guide_swaps_waypoints_returns_to_the_target_and_releases_at_the_switch():
    plan = _plan(
        "[{name: w, steps: 4, guidance: waypoint, waypoints: [a, b]}, {name: t, steps: 2}, "
        "{name: traj, steps: 2, guidance: trajectory, trajectory: {lr: 1.0e-5, update_every: 2}}, {name: ce, steps: 2, guidance: none}]",
        "train.max_steps=null",
    )
    teacher = _RecordingTeacher("base")
    guide = Guide(plan, teacher, base_weights="base")
    seen = [guide.enter(step) is not None for step in range(10)]
    assert seen == [True] * 8 + [False] * 2
    assert teacher.calls == [("load", "a"), ("load", "b"), ("load", "base"), ("lr", 1e-5), ("lr", 1e-5), ("release",)]
    assert guide.teacher is None and guide.release_stats["step"] == 8
    traj = plan.phases[2]
    assert [guide.updates_teacher(traj, s) for s in (6, 7)] == [False, True]  # every 2nd step of the phase


def test_a_target_phase_after_a_trajectory_guides_with_the_pretrained_teacher_again():
    """Target guidance is the pretrained teacher: after a trajectory phase trained it in place,
    its weights are loaded back; a second trajectory phase goes on from its own training."""
    plan = _plan(
        "[{name: traj, steps: 2, guidance: trajectory}, {name: t, steps: 2}, {name: traj2, steps: 2, guidance: trajectory}]",
        "train.max_steps=null",
    )
    teacher = _RecordingTeacher("base")
    guide = Guide(plan, teacher, base_weights="base")
    guide.enter(0)
    guide.after_micro_batch(plan.phases[0], 0, {})  # a trajectory update
    guide.enter(1)
    assert teacher.calls == [("lr", 1e-4), ("lr", 1e-4)]  # fine-tunes from the pretrained weights it holds
    guide.enter(2)
    assert teacher.calls[-1] == ("load", "base") and teacher.loaded == "base"
    teacher.train_step({})  # traj2 trains it again, then keeps going from there
    guide.enter(4)
    guide.enter(5)
    assert teacher.calls[-2:] == [("lr", 1e-4), ("lr", 1e-4)] and teacher.loaded is None


def test_phase_fractions_that_make_the_whole_round_to_it():
    # Each boundary is its share of the run rounded (round half to even, as Python does): four
    # quarters of 10 end at 2, 5, 8 and 10. Rounded one by one they were 2, 2, 2 and 4.
    cases = ((25, (0.3, 0.7), [8, 17]), (5, (0.5, 0.5), [2, 3]), (10, (0.25, 0.25, 0.5), [2, 3, 5]), (10, (0.25,) * 4, [2, 3, 3, 2]),
             (7, (1 / 3,) * 3, [2, 3, 2]), (20, (0.01, 0.49, 0.5), [1, 9, 10]))
    for total, fractions, lengths in cases:
        phases = "[" + ", ".join(f"{{name: p{i}, fraction: {f}}}" for i, f in enumerate(fractions)) + "]"
        plan = _plan(phases, f"train.max_steps={total}")
        assert [p.end - p.start for p in plan.phases] == lengths and plan.total_steps == total, (total, fractions)
    # a fixed phase between them keeps its length, and moves the boundaries after it
    plan = _plan("[{name: a, fraction: 0.25}, {name: b, steps: 3}, {name: c, fraction: 0.45}]", "train.max_steps=10")
    assert [p.end - p.start for p in plan.phases] == [2, 3, 5]
    with pytest.raises(ConfigError, match="phases add up to 3 steps but train.max_steps=10"):
        _plan("[{name: a, fraction: 0.1}, {name: b, fraction: 0.2}]", "train.max_steps=10")  # not the whole: refused


def test_a_teacher_forced_phase_trains_the_last_block_too():
    """End to end the task loss trains the last block (skip_last leaves it out of the layer
    loss); teacher-forced, the layer loss is all there is, so every block is in it."""
    from cald_scale.distill.losses import distilled_layers

    tf, e2e = _plan("[{name: tf, steps: 2, mode: teacher_forced}, {name: e2e, steps: 2}]", "train.max_steps=null").phases
    assert distilled_layers(4, tf.loss) == [0, 1, 2, 3] and distilled_layers(4, e2e.loss) == [0, 1, 2]
    # End to end with neither CE nor KL, the layer loss is all there is too.
    [layer_only] = _plan("[{name: e2e, steps: 2, a_ce: 0, a_kl: 0}]", "train.max_steps=null").phases
    assert distilled_layers(4, layer_only.loss) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "phases, overrides, message",
    [
        ("[{name: a, guidance: none, a_layer: 5}]", [], "a_layer and a_kl need a teacher, and guidance is none"),
        ("[{name: a, mode: teacher_forced, a_ce: 2}]", [], "mode teacher_forced trains on the layer loss alone; a_ce and a_kl"),
        ("[{name: a, trajectory: {lr: 0.5}}]", [], "trajectory settings are only read with guidance: trajectory"),
        ("[{name: a, copied_lr_scale: -1}]", [], "copied_lr_scale must be >= 0"),
        ("[{name: a}]", ["train.copied_lr_scale=-0.5"], "train.copied_lr_scale must be >= 0"),
    ],
)
def test_phase_settings_that_would_be_ignored_or_reversed_are_refused(phases, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(overrides=[f"phases={phases}", *overrides])


def test_unguided_runs_need_no_teacher():
    plan = _plan("[{name: u, guidance: none}]")
    assert not plan.uses_teacher
    assert Guide(plan, None, base_weights="x").enter(0) is None
    with pytest.raises(ValueError, match="need a teacher"):
        Guide(_plan("[{name: t}]"), None, base_weights="x")


def test_a_phase_in_tokens_is_checked_on_the_runs_own_number_of_ranks():
    """With the global batch left to micro-batch x ranks, a tokens phase's length depends on the
    ranks: 1.6M tokens is 391 steps on one rank and 49 on eight, so loading the config must not
    refuse it as if there were one rank; the run's own plan decides."""
    from cald_scale.config import load_run_config

    overrides = [
        "phases=[{name: a, tokens: 1600000}, {name: b, guidance: none}]", "train.max_steps=100", "train.micro_batch_size=4",
        "train.global_batch_size=null", "data.seq_len=1024",
    ]
    cfg = load_run_config(overrides=overrides)
    assert [p.steps for p in cfg.plan(world_size=8).phases] == [49, 51]
    with pytest.raises(ValueError, match="nothing is left for phase 'b'"):
        cfg.plan(world_size=1)


def test_a_waypoint_phase_shorter_than_its_waypoints_is_refused():
    from cald_scale.config import load_run_config

    with pytest.raises(ValueError, match="has 3 waypoints but 2 step"):
        load_run_config(overrides=["phases=[{name: w, steps: 2, guidance: waypoint, waypoints: [a, b, c]}, {name: rest, guidance: none}]", "train.max_steps=10"])


def test_waypoint_paths_expand_the_home_folder():
    """As run_dir, cache_dir, the teacher and the corpus do: ~/gen/teacher was reported missing."""
    import os

    from cald_scale.distill.phases import PhaseConfig

    phase = PhaseConfig(name="w", guidance="waypoint", waypoints=["~/gen/step_1", "/abs/step_2"])
    assert phase.waypoints == [os.path.expanduser("~/gen/step_1"), "/abs/step_2"]
