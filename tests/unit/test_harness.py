"""`cald-scale evaluate --tasks`: lm-eval-harness tasks on a tiny teacher and its converted
student, side by side, with a local multiple-choice task written on the spot (CPU, no hub)."""

from __future__ import annotations

import json
import shutil
import sys

import datasets
import huggingface_hub
import pytest
import torch
from tiny_models import save_tiny_teacher, train_tokenizer

from cald_scale import evaluate as evaluate_module
from cald_scale.cli import main
from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.conversion.teacher import TeacherConfig, load_teacher
from cald_scale.data import BUILTIN_CORPORA
from cald_scale.eval import harness

NUM_DOCS, LIMIT, BATCH = 8, 6, 3
WORDS = ["seven", "crown", "sword", "night"]

TASK_YAML = """\
task: {name}
dataset_path: {dataset_path}
dataset_kwargs:
  data_files:
    test: {data_file}
  cache_dir: {cache_dir}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _write_task(folder, name, *, dataset_path="json", data_file=None, rows=NUM_DOCS):
    """A task YAML (and its JSONL data, unless `data_file` is given) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if data_file is None:
        data_file = folder / f"{name}.jsonl"
        docs = [
            {
                "question": f"Which word follows {WORDS[i % 4]} number {i}?",
                "choices": [f"{word} {i}" for word in WORDS],
                "answer": (i * 3) % 4,
            }
            for i in range(rows)
        ]
        data_file.write_text("\n".join(json.dumps(doc) for doc in docs) + "\n")
    path = folder / f"{name}.yaml"
    path.write_text(TASK_YAML.format(name=name, dataset_path=dataset_path, data_file=data_file, cache_dir=folder / "hf_cache"))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(teacher folder, student folder, tokenizer, task YAML): a 2-layer llama teacher, its
    Mamba2 student exported like a run's, and an 8-doc, 4-choice local task."""
    root = tmp_path_factory.mktemp("harness")
    works = BUILTIN_CORPORA["shakespeare"].load()[:2]
    tokenizer = train_tokenizer(works, vocab_size=400)
    teacher_dir = save_tiny_teacher(root / "teacher", "llama", tokenizer, layers=2)
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    student = convert_teacher(teacher, ConversionConfig(), teacher_name_or_path=str(teacher_dir))
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return teacher_dir, root / "student", tokenizer, _write_task(root / "tasks", "tiny_quiz")


@torch.no_grad()
def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens, in one plain forward."""
    context_ids = tokenizer(context).input_ids
    continuation_ids = tokenizer(context + continuation).input_ids[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(ids[:, :-1]).logits[0].float(), dim=-1)[len(context_ids) - 1:]
    return logprobs[torch.arange(len(continuation_ids)), torch.tensor(continuation_ids)].sum().item()


def test_teacher_and_student_side_by_side_on_a_local_task(models, tmp_path, monkeypatch, capsys):
    teacher_dir, student_dir, tokenizer, task_yaml = models
    # NOTE: lm-eval's per-request samples are kept so the scores can be checked one by one.
    runs, calls = [], []
    run_tasks = harness.run_tasks
    monkeypatch.setattr(
        harness, "run_tasks",
        lambda *args, **kw: calls.append(kw) or runs.append(run_tasks(*args, **{**kw, "log_samples": True})) or runs[-1],
    )
    out = tmp_path / "tasks.json"
    argv = ["--limit", str(LIMIT), "--batch_size", str(BATCH), "--json", str(out)]
    assert main(["evaluate", str(student_dir), "--tasks", str(task_yaml), *argv]) == 0

    result = json.loads(out.read_text())
    assert (result["teacher"], result["tasks"], result["limit"]) == (str(teacher_dir), ["tiny_quiz"], LIMIT)
    rows = {row["metric"]: row for row in result["results"]}
    assert set(rows) == {"acc", "acc_norm"} and {row["task"] for row in rows.values()} == {"tiny_quiz"}
    for row in rows.values():
        assert row["docs"] == LIMIT
        for model in ("teacher", "student"):
            assert 0 <= row[model] <= 1 and (row[model] * LIMIT) == pytest.approx(round(row[model] * LIMIT))
    for model in ("teacher", "student"):
        assert result["raw"][model]["n-samples"]["tiny_quiz"] == {"original": NUM_DOCS, "effective": LIMIT}

    # each column is its own model: lm-eval's loglikelihoods are the model's log-probs,
    # request by request (batched and padded there, one at a time here), and its acc follows
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    student = evaluate_module.AutoModelForCausalLM.from_pretrained(student_dir)
    assert len(runs) == 2
    # both models cut prompts at the teacher's context length (the student's config names none)
    assert [kw["max_length"] for kw in calls] == [teacher.config.max_position_embeddings] * 2
    assert [kw["batch_size"] for kw in calls] == [BATCH] * 2
    reported = {}
    for model_name, model, run in zip(("teacher", "student"), (teacher, student), runs):
        samples = run["samples"]["tiny_quiz"]
        assert [sample["doc_id"] for sample in samples] == list(range(LIMIT))
        correct = 0
        for sample in samples:
            lls = [response[0] for response in sample["filtered_resps"]]
            direct = [_loglikelihood(model.eval(), tokenizer, *request) for request in sample["arguments"]]
            assert lls == pytest.approx(direct, rel=1e-5, abs=1e-5)
            correct += int(max(range(len(direct)), key=direct.__getitem__) == sample["doc"]["answer"])
        assert rows["acc"][model_name] == pytest.approx(correct / LIMIT)
        reported[model_name] = lls
    assert reported["student"] != pytest.approx(reported["teacher"], rel=1e-3)

    table = capsys.readouterr().out.splitlines()
    header = ["task", "metric", "docs", "teacher", "student", "student - teacher"]
    assert [cell.strip() for cell in table[0].split("|")] == header
    assert table[1].split("|")[0].strip() == "tiny_quiz" and f"{rows['acc']['student']:.4f}" in table[1]


def test_run_folder_task_folder_student_alone(models, tmp_path, monkeypatch):
    teacher_dir, student_dir, _, task_yaml = models
    calls, run_tasks = [], harness.run_tasks
    monkeypatch.setattr(harness, "run_tasks", lambda *args, **kw: calls.append(kw) or run_tasks(*args, **kw))
    run = tmp_path / "runs" / "r1"
    shutil.copytree(student_dir, run / "student")
    config = {"teacher": {"name_or_path": str(teacher_dir)}, "data": {}, "eval": {"micro_batch_size": 2}}
    (run / "config.json").write_text(json.dumps(config))
    tasks = tmp_path / "tasks"
    _write_task(tasks, "tiny_quiz_a")
    _write_task(tasks / "more", "tiny_quiz_b", rows=4)
    out = tmp_path / "tasks.json"
    # a folder of tasks, a fraction of each task's docs, the student alone; a repeated task runs once
    argv = [str(run), "--tasks", f"{tasks},tiny_quiz_a", "--limit", "0.5", "--no_teacher", "--json", str(out)]
    assert evaluate_module.main(argv) == 0

    result = json.loads(out.read_text())
    assert result["teacher"] is None and result["tasks"] == ["tiny_quiz_a", "tiny_quiz_b"]
    assert set(result["raw"]) == {"student"}
    docs = {row["task"]: row["docs"] for row in result["results"]}
    assert docs == {"tiny_quiz_a": NUM_DOCS // 2, "tiny_quiz_b": 2}
    assert all("teacher" not in row and 0 <= row["student"] <= 1 for row in result["results"])
    # alone, the student still gets the teacher's context length (its own config names none): its
    # scores do not depend on whether the teacher ran beside it
    assert [kw["max_length"] for kw in calls] == [512]

    # The run's Bamba export alone (output.export_bamba): the same length from its own config, and
    # its student's scores (a traceback once: its config has no teacher_hf_config).
    from cald_scale.export.bamba import export_bamba

    export_bamba(run / "student", run / "bamba")
    bamba_out = tmp_path / "bamba_tasks.json"
    assert evaluate_module.main([str(run / "bamba"), *argv[1:-1], str(bamba_out)]) == 0
    assert calls[-1]["max_length"] == 512
    by_task = {row["task"]: row["student"] for row in json.loads(bamba_out.read_text())["results"]}
    assert by_task == pytest.approx({row["task"]: row["student"] for row in result["results"]})


def test_task_errors_are_one_line_before_any_model_loads(models, tmp_path, monkeypatch, capsys):
    _, student_dir, _, task_yaml = models
    # NOTE: offline, as HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 make it: a hub dataset must not be fetched.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    missing_data = _write_task(tmp_path / "broken", "tiny_missing", data_file=tmp_path / "gone.jsonl")
    from_hub = _write_task(tmp_path / "hub", "tiny_hub", dataset_path="cald-scale-tests/no-such-dataset", data_file="test.jsonl")
    load = lambda *args, **kw: pytest.fail("a model was loaded")  # noqa: E731
    monkeypatch.setattr(evaluate_module, "load_teacher", load)
    monkeypatch.setattr(evaluate_module, "_load_student", load)
    cases = [
        (["--tasks", "hellaswg"], "unknown lm-eval task 'hellaswg'"),
        (["--tasks", str(tmp_path / "nope.yaml")], "no such task file or folder"),
        (["--tasks", str(missing_data)], "task 'tiny_missing': its data could not be read"),
        (["--tasks", str(from_hub)], "task 'tiny_hub': its data could not be read"),
        (["--tasks", str(task_yaml), "--corpus", "wiki"], "do not apply to --tasks"),
        (["--limit", "3"], "apply to lm-eval tasks"),
    ]
    for argv, message in cases:
        assert main(["evaluate", str(student_dir), *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cald-scale evaluate: error:") and message in err[0], err
        if argv[1] == "hellaswg":  # lm-eval's own tasks are indexed too
            assert "did you mean hellaswag" in err[0]

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    assert main(["evaluate", str(student_dir), "--tasks", str(task_yaml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'lm-eval>=" in err[0]



def test_a_task_name_is_a_name_beside_a_folder_of_that_name(models, tmp_path, monkeypatch):
    """`--tasks NAME` from a folder holding a `NAME/` (results, data) is lm-eval's task, not that
    folder; `./NAME` is the folder."""
    _, _, _, task_yaml = models
    local = tmp_path / "tiny_choice"
    shutil.copytree(task_yaml.parent, local)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arc_easy").mkdir()  # a folder named like one of lm-eval's own tasks, no task in it
    assert harness.select_tasks(["arc_easy"], check_data=False).names == ("arc_easy",)
    assert harness.select_tasks(["./tiny_choice"], check_data=False).names == (task_yaml.stem,)
    with pytest.raises(ValueError, match=r"give \./tiny_choice"):
        harness.select_tasks(["tiny_choice"], check_data=False)
    with pytest.raises(FileNotFoundError, match="no such task file or folder: ./nothing"):
        harness.select_tasks(["./nothing"], check_data=False)


def test_a_yaml_beside_a_given_task_cannot_replace_lm_evals_task_of_the_same_name(models, tmp_path):
    """Giving a task file indexes its whole folder: a YAML there that defines `arc_easy` replaced
    lm-eval's own when `arc_easy` was named too, with no word (and a task YAML may run Python;
    helper-91). The name is now ambiguous and refused; the file's path selects it."""
    _, _, _, task_yaml = models
    shared = tmp_path / "shared"
    shutil.copytree(task_yaml.parent, shared)
    shadow = shared / "shadow.yaml"
    shadow.write_text((shared / task_yaml.name).read_text().replace(f"task: {task_yaml.stem}", "task: arc_easy"))
    with pytest.raises(ValueError, match=r"lm-eval task 'arc_easy' is also defined by .*shadow.yaml"):
        harness.select_tasks([str(shared / task_yaml.name), "arc_easy"], check_data=False)
    assert harness.select_tasks([str(shadow)], check_data=False).names == ("arc_easy",)  # asked for by path
    assert harness.select_tasks([str(shared / task_yaml.name)], check_data=False).names == (task_yaml.stem,)
