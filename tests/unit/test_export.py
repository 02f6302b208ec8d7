"""Native Bamba export: stock transformers loads it (no cald_scale), same logits, same generations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_teacher, train_tokenizer, with_memory

from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.export.bamba import BambaExportError, export_bamba

# Runs in a fresh interpreter: only transformers, never cald_scale.
_STOCK_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
cases = json.loads(sys.argv[1])
out = {}
for name, case in cases.items():
    model = AutoModelForCausalLM.from_pretrained(case["folder"]).eval()
    ids = torch.tensor(case["ids"])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    out[name] = {"class": type(model).__name__, "logits": logits.tolist(), "generated": generated.tolist(),
                 "use_cache": model.config.use_cache, "attn_layer_indices": model.config.attn_layer_indices,
                 "special_tokens": [model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id]}
assert not any(m.startswith("cald_scale") for m in sys.modules), "cald_scale was imported"
print(json.dumps(out))
"""

CASES = {
    "llama-all-mamba2": ("llama", []),
    "llama-hybrid": ("llama", [1]),
    "qwen2-hybrid": ("qwen2", [0, 2]),
}


def test_bamba_export_loads_in_stock_transformers_with_equal_logits(tmp_path):
    students, cases = {}, {}
    for name, (family, kept) in CASES.items():
        teacher = tiny_teacher(family, layers=3)
        teacher.config.bos_token_id, teacher.config.eos_token_id, teacher.config.pad_token_id = 1, 2, 0  # distinct: a swapped id shows
        student = with_memory(convert_teacher(teacher, ConversionConfig(attention_layers=kept)).eval())
        # NOTE: noise on every weight: a fresh student's norms, D and gated-norm weights are all 1
        # and its conv bias 0, so a mapping that swapped two of them would still match.
        generator = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for param in student.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        export_bamba(student, tmp_path / name)
        ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(len(name)))
        students[name] = (student, ids, [teacher.config.bos_token_id, teacher.config.eos_token_id, teacher.config.pad_token_id])
        cases[name] = {"folder": str(tmp_path / name), "ids": ids.tolist()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _STOCK_LOADER, json.dumps(cases)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (student, ids, special_tokens) in students.items():
        got = loaded[name]
        assert got["class"] == "BambaForCausalLM"
        assert got["special_tokens"] == special_tokens and len(set(special_tokens)) == 3, (got["special_tokens"], special_tokens)  # config.json's, read by serving tools
        assert got["attn_layer_indices"] == CASES[name][1]
        with torch.no_grad():
            expected = student(ids).logits
        # NOTE: float32 rounding of two scan orders over states that matter (with_memory); a mapping error is 0.1 or more.
        torch.testing.assert_close(torch.tensor(got["logits"]), expected, rtol=1e-4, atol=1e-4)
        ours = student.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
        assert torch.equal(torch.tensor(got["generated"]), ours)
        # Bamba in transformers cannot build its cache without an attention layer: uncached then.
        assert got["use_cache"] == bool(CASES[name][1])


def test_bamba_export_refuses_what_bamba_cannot_express(tmp_path):
    neox = convert_teacher(tiny_teacher("gpt_neox"), ConversionConfig(mixer="mamba2"))
    with pytest.raises(BambaExportError, match="gpt_neox has no Bamba layout: Bamba's blocks are llama-shaped.*import cald_scale"):
        export_bamba(neox, tmp_path / "neox")
    # A saved student is refused from its config, before its weights are read.
    neox.save_pretrained(tmp_path / "neox_student")
    (tmp_path / "neox_student" / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(BambaExportError, match="gpt_neox has no Bamba layout"):
        export_bamba(tmp_path / "neox_student", tmp_path / "neox")
    mamba1 = convert_teacher(tiny_teacher("llama"), ConversionConfig(mixer="mamba"))
    with pytest.raises(BambaExportError, match="Mamba2.*'mamba'"):
        export_bamba(mamba1, tmp_path / "mamba1")
    clamped = ConversionConfig(attention_layers=[1])
    clamped.mamba2.time_step_limit = (0.0, 0.1)
    hybrid = convert_teacher(tiny_teacher("llama", layers=3), clamped)
    with pytest.raises(BambaExportError, match=r"clamp the time step to \(0.0, 0.1\).*cached decoding"):
        export_bamba(hybrid, tmp_path / "clamped")
    # A kept attention with a sliding window (a Mistral hybrid's exported logits were 0.16 off without this refusal).
    windowed = tiny_teacher("mistral", layers=3)
    windowed.config.sliding_window = 8
    with pytest.raises(BambaExportError, match=r"kept attention uses a sliding window \(8\)"):
        export_bamba(convert_teacher(windowed, ConversionConfig(attention_layers=[1])), tmp_path / "windowed")
    # Qwen2 slides only from max_window_layers on: a hybrid keeping a full layer below it exports
    # (it was refused for the teacher's window), one keeping a sliding layer does not.
    from transformers import AutoConfig, AutoModelForCausalLM, BambaForCausalLM

    torch.manual_seed(0)
    qwen2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        use_sliding_window=True, sliding_window=8, max_window_layers=2, max_position_embeddings=512,
    )).eval()
    with pytest.raises(BambaExportError, match=r"kept attention uses a sliding window \(8\)"):
        export_bamba(convert_teacher(qwen2, ConversionConfig(attention_layers=[2])), tmp_path / "qwen2_sliding")
    kept_full = convert_teacher(qwen2, ConversionConfig(attention_layers=[1])).eval()
    assert kept_full.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    bamba = BambaForCausalLM.from_pretrained(export_bamba(kept_full, tmp_path / "qwen2_full")).eval()
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bamba(ids).logits, kept_full(ids).logits, rtol=1e-4, atol=1e-5)
    # Bamba's convolution and gated norm follow the teacher's MLP activation and rms_norm_eps.
    gelu = tiny_teacher("llama", layers=3)
    gelu.config.hidden_act = "gelu"
    with pytest.raises(BambaExportError, match=r"MLP activation, which is 'gelu', not silu"):
        export_bamba(convert_teacher(gelu, ConversionConfig(attention_layers=[1])), tmp_path / "gelu")
    eps = convert_teacher(tiny_teacher("llama", layers=3), ConversionConfig(attention_layers=[1]))
    eps.config.conversion = {**eps.config.conversion, "mamba2": {**eps.config.conversion["mamba2"], "norm_eps": 1e-3}}
    with pytest.raises(BambaExportError, match=r"gated norm uses rms_norm_eps \(1e-0\d\), the mixers use norm_eps 0.001"):
        export_bamba(eps, tmp_path / "eps")
    assert not any((tmp_path / name).exists() for name in ("neox", "mamba1", "clamped", "windowed", "gelu", "eps"))


def test_export_from_a_student_folder_keeps_the_tokenizer(tmp_path):
    tokenizer = train_tokenizer(["to be or not to be, that is the question"] * 4, vocab_size=300)
    student = convert_teacher(tiny_teacher("llama", vocab=len(tokenizer)), ConversionConfig(attention_layers=[0]))
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    export_bamba(tmp_path / "student", tmp_path / "bamba")
    config = json.loads((tmp_path / "bamba" / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["attn_layer_indices"] == [0]
    assert (tmp_path / "bamba" / "tokenizer.json").is_file() and (tmp_path / "bamba" / "model.safetensors").is_file()


def test_export_replaces_only_an_earlier_export(tmp_path, monkeypatch):
    """A Bamba export removes the folder it writes to only when that folder is empty or an earlier
    Bamba export: never a user's folder, the student's own folder or the working directory."""
    tokenizer = train_tokenizer(["to be or not to be, that is the question"] * 4, vocab_size=300)
    student_dir = tmp_path / "run" / "student"
    convert_teacher(tiny_teacher("llama", vocab=len(tokenizer)), ConversionConfig(attention_layers=[0])).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty and not an earlier export"):
        export_bamba(student_dir, notes)
    for holder in (student_dir, tmp_path / "run"):
        with pytest.raises(FileExistsError, match="holds the student being exported"):
            export_bamba(student_dir, holder)
    monkeypatch.chdir(notes)
    with pytest.raises(FileExistsError, match="holds the working directory"):
        export_bamba(student_dir, ".")
    assert (notes / "keep.txt").read_text() == "keep" and (student_dir / "config.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # an empty working directory too: the export would be renamed over it
    with pytest.raises(FileExistsError, match="holds the working directory"):
        export_bamba(student_dir, ".")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the student named through "..": still inside the target
    with pytest.raises(FileExistsError, match="holds the student being exported"):
        export_bamba("../run/student", tmp_path / "run")

    target = tmp_path / "bamba"
    export_bamba(student_dir, target)
    (target / "stale.txt").write_text("from the last export")
    export_bamba(student_dir, target)  # an earlier export: replaced whole
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask  # readable by others as the umask allows, not mkdtemp's 0700
    with pytest.raises(ValueError, match="is not a cald_scale student .*model_type 'bamba'"):
        export_bamba(target, tmp_path / "again")


def test_replacing_an_export_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """The old folder is moved aside, not deleted, before the new one's rename: a rename that
    fails puts it back, and one that succeeds leaves nothing aside."""
    from cald_scale import fileio

    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("old")
    replace = os.replace

    def rename_fails_for_the_new_folder(src, dst):
        if os.path.basename(src).startswith(".export.tmp-") and not str(src).endswith(".old"):
            raise OSError("disk gone")
        return replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", rename_fails_for_the_new_folder)
    with pytest.raises(OSError, match="disk gone"):
        with fileio.atomic_dir(target, replace=True, replaceable=lambda _: True) as tmp:
            (tmp / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "old"
    monkeypatch.setattr(fileio.os, "replace", replace)
    with fileio.atomic_dir(target, replace=True, replaceable=lambda _: True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_all_mamba2_student_with_a_time_step_limit_exports_with_it():
    """The dt-limit refusal is for hybrids (the only exports that decode with Bamba's cache, whose
    step does not clamp); an all-Mamba2 export runs uncached, clamping as the student does."""
    import tempfile

    from transformers import AutoModelForCausalLM

    clamped = ConversionConfig(attention_layers=[])
    clamped.mamba2.time_step_limit = (0.0, 0.05)
    student = with_memory(convert_teacher(tiny_teacher("llama", layers=3), clamped)).eval()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        export_bamba(student, folder)
        bamba = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert tuple(bamba.config.time_step_limit) == (0.0, 0.05)
        with torch.no_grad():
            torch.testing.assert_close(bamba(ids, use_cache=False).logits, student(ids).logits, rtol=1e-4, atol=1e-4)
