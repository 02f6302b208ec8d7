"""The encoder track's models: the teacher classifier over a pretrained encoder, its converted
students (Linformer, BiMamba2, a hybrid), the block-by-block view the trainer runs, and the
padding contract, on the real all-MiniLM-L6-v2 and on a tiny RoBERTa built here."""

from __future__ import annotations

import json

import pytest
import torch
from ports import free_port
from tiny_models import attention_read_by_ranks, save_tiny_encoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import build_student, student_config
from cald_scale.conversion.teacher import TeacherConfig, build_teacher, classifier_teacher, open_teacher
from cald_scale.distill.losses import LossConfig, layer_loss, layer_loss_reference
from cald_scale.distill.stages import layerwise
from cald_scale.distill.step import cald_forward, teacher_forced_step
from cald_scale.mixers.config import BiMamba2Config, LinformerConfig

LABELS = ["arts", "history", "science"]
TEXTS = [
    "The Renaissance began in Florence in the fourteenth century.",
    "Photosynthesis turns light into chemical energy.",
    "Rome fell.",
    "A sonnet has fourteen lines and a fixed rhyme scheme, often ending in a couplet.",
]

STUDENTS = {
    "linformer": ConversionConfig(mixer="linformer", linformer=LinformerConfig(k=16)),
    "linformer_kv": ConversionConfig(mixer="linformer", linformer=LinformerConfig(k=16, sharing="kv")),
    "linformer_layer": ConversionConfig(mixer="linformer", linformer=LinformerConfig(k=16, sharing="layer")),
    "bimamba2": ConversionConfig(mixer="bimamba2", bimamba2=BiMamba2Config()),
    "bimamba2_hybrid": ConversionConfig(mixer="bimamba2", attention_layers=[1]),
}


@pytest.fixture(scope="module")
def minilm():
    """The real teacher: all-MiniLM-L6-v2 with a new 3-class head, and its tokenizer."""
    source, tokenizer = open_teacher(TeacherConfig(name_or_path="all-minilm-l6-v2"))
    source = classifier_teacher(source, LABELS, seed=0)
    return source, tokenizer


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory, minilm):
    folder = save_tiny_encoder(tmp_path_factory.mktemp("roberta"), "roberta", minilm[1])
    source, tokenizer = open_teacher(TeacherConfig(name_or_path=str(folder)))
    return classifier_teacher(source, LABELS, pooling="cls", seed=0), tokenizer


def _batch(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([0, 2, 1, 0][: len(texts)])}


def _copied_keys_match(teacher, student) -> tuple[int, list[str]]:
    """(tensors copied bitwise, teacher tensors outside attention slots that differ or are missing)."""
    t, s = teacher.state_dict(), student.state_dict()
    slots = [f"{name}." for name, m in teacher.named_modules() if name.endswith("attention.self")]
    kept = [f"encoder.encoder.layer.{i}.attention.self." for i in student.config.attention_layers]
    converted = [p for p in slots if p not in kept]
    outside = [k for k in t if not k.startswith(tuple(converted))]
    bad = [k for k in outside if k not in s or not torch.equal(t[k], s[k])]
    return len(outside) - len(bad), bad


def test_the_teacher_is_the_pretrained_encoder_with_a_seeded_new_head(minilm):
    source, tokenizer = minilm
    teacher = build_teacher(source)
    again = build_teacher(source)
    assert torch.equal(teacher.classifier.weight, again.classifier.weight)  # every rank draws the same head
    assert teacher.classifier.weight.std().item() == pytest.approx(0.02, rel=0.2)
    plain = AutoModelForSequenceClassification.from_config(teacher.config)  # nothing but the classes' registration
    assert type(plain).__name__ == "CaldEncoderForSequenceClassification"
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(source.folder)
    assert torch.equal(teacher.encoder.encoder.layer[3].attention.self.query.weight, bert.encoder.layer[3].attention.self.query.weight)
    assert teacher.config.id2label == dict(enumerate(LABELS))


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_conversion_copies_every_non_attention_weight_and_the_view_equals_the_model(minilm, name):
    source, tokenizer = minilm
    teacher = build_teacher(source)
    student = build_student(source.config, source.weights(), STUDENTS[name], seed=0).eval()
    copied, bad = _copied_keys_match(teacher, student)
    assert not bad and copied > 60
    batch = _batch(tokenizer)
    view = layerwise(student)
    assert type(view).__name__ == "EncoderLayerwise"
    full = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(view.logits({k: batch[k] for k in ("input_ids", "attention_mask")}), full, atol=1e-5, rtol=1e-5)
    # Attention-informed init: the Linformer keeps the teacher's Q/K/V exactly.
    if name.startswith("linformer"):
        mixer = student.encoder.encoder.layer[2].attention.self.mixer
        assert torch.equal(mixer.q_proj.weight, teacher.encoder.encoder.layer[2].attention.self.query.weight)
        assert torch.equal(mixer.v_proj.bias, teacher.encoder.encoder.layer[2].attention.self.value.bias)


@pytest.mark.parametrize("name", ["linformer", "linformer_layer", "bimamba2", "bimamba2_hybrid"])
def test_padded_batches_score_every_sequence_as_if_alone(minilm, name):
    source, tokenizer = minilm
    student = build_student(source.config, source.weights(), STUDENTS[name], seed=1).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        together = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        for i, text in enumerate(TEXTS):
            alone = student(**{k: v for k, v in tokenizer([text], return_tensors="pt").items() if k != "token_type_ids"}, output_hidden_states=True)
            n = int(batch["attention_mask"][i].sum())
            # NOTE: float32 sums in another order with the thread count (one thread: 3.2e-5 in a
            # BiMamba2 hybrid's last hidden state); pads read into a sequence moved its logits by 0.04 or more.
            torch.testing.assert_close(together.logits[i], alone.logits[0], atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(together.hidden_states[-1][i, :n], alone.hidden_states[-1][0], atol=5e-5, rtol=1e-4)


def test_an_electra_teacher_with_narrower_embeddings_converts_and_its_view_equals_the_model(minilm, tmp_path):
    """ELECTRA (no pooler; embeddings projected up to the blocks' width): teacher and students
    build, and the block-by-block view the trainer runs gives the HF forward's logits."""
    folder = save_tiny_encoder(tmp_path / "electra", "electra", minilm[1])
    source, tokenizer = open_teacher(TeacherConfig(name_or_path=str(folder)))
    source = classifier_teacher(source, LABELS, seed=0)
    batch = _batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for model in (build_teacher(source), build_student(source.config, source.weights(), STUDENTS["bimamba2"], seed=0)):
        model.eval()
        with torch.no_grad():
            view = layerwise(model).logits({k: inputs[k] for k in ("input_ids", "attention_mask")})
            torch.testing.assert_close(view, model(**inputs).logits)


def test_a_roberta_teacher_converts_and_its_students_save_and_reload(tiny_roberta, tmp_path):
    source, tokenizer = tiny_roberta
    teacher = build_teacher(source)
    for name in ("linformer_layer", "bimamba2"):
        student = build_student(source.config, source.weights(), STUDENTS[name], seed=0).eval()
        copied, bad = _copied_keys_match(teacher, student)
        assert not bad and copied > 20
        student.save_pretrained(tmp_path / name)
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / name).eval()
        batch = _batch(tokenizer)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        torch.testing.assert_close(reloaded(**inputs).logits, student(**inputs).logits)
        # return_dict=False gives HF's tuple (loss first with labels), as BertForSequenceClassification does.
        labels = torch.zeros(len(batch["input_ids"]), dtype=torch.long)
        loss, logits = reloaded(**inputs, labels=labels, return_dict=False)[:2]
        torch.testing.assert_close(logits, reloaded(**inputs).logits)
        assert loss.ndim == 0
        # Reloaded in another dtype, the encoder comes in it too (not the one its config records).
        in_bf16 = AutoModelForSequenceClassification.from_pretrained(tmp_path / name, dtype=torch.bfloat16).eval()
        assert {p.dtype for p in in_bf16.parameters()} == {torch.bfloat16}
        assert in_bf16(**inputs).logits.dtype == torch.bfloat16
    # The one length projection of sharing="layer" is saved once and shared again after loading.
    layers = reloaded_layers = AutoModelForSequenceClassification.from_pretrained(tmp_path / "linformer_layer").encoder.encoder.layer
    assert layers[0].attention.self.mixer.E is reloaded_layers[2].attention.self.mixer.E


def test_distillation_step_runs_on_padded_batches_with_class_losses(minilm):
    source, tokenizer = minilm
    teacher = layerwise(build_teacher(source))
    student_model = build_student(source.config, source.weights(), STUDENTS["bimamba2"], seed=0)
    student = layerwise(student_model)
    batch = _batch(tokenizer)
    parts = cald_forward(teacher, student, batch, LossConfig(a_ce=1.0, a_layer=15.0, a_kl=1.0))
    assert set(parts.terms) == {"ce", "layer", "kl"} and len(parts.per_layer) == 5
    parts.total.backward()
    assert all(p.grad is not None for p in student_model.mixer_parameters())
    student_model.zero_grad()
    tf = teacher_forced_step(teacher, student, batch, LossConfig(), backward=lambda loss: loss.backward())
    assert set(tf.terms) == {"layer"} and tf.total.item() > 0


def test_the_layer_loss_of_a_padded_batch_ignores_pads():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = layer_loss(s, t, mask)
    torch.testing.assert_close(loss, layer_loss_reference(s, t, mask))
    loss.backward()
    assert torch.all(s.grad[0, 3:] == 0)
    moved = t.clone()
    moved[0, 3:] += 100.0
    torch.testing.assert_close(layer_loss(s.detach(), moved, mask), loss.detach())
    ref = s.detach().clone().requires_grad_(True)
    layer_loss_reference(ref, t, mask).backward()
    torch.testing.assert_close(s.grad, ref.grad)


def test_a_non_finite_state_at_a_pad_stays_out_of_the_layer_loss():
    """A pad's hidden state can be non-finite (a row that attends to nothing): the masked loss
    and its gradient read only the real tokens, on both sides."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    clean = s.clone().requires_grad_(True)
    expected = layer_loss(clean, t, mask)
    expected.backward()
    poisoned_s, poisoned_t = s.clone(), t.clone()
    poisoned_s[0, 3], poisoned_t[0, 4] = float("nan"), float("inf")
    poisoned_s.requires_grad_(True)
    loss = layer_loss(poisoned_s, poisoned_t, mask)
    loss.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(poisoned_s.grad, clean.grad)


def test_mismatches_are_refused_before_any_weight_is_read(minilm, tiny_roberta, tmp_path):
    source, _ = minilm
    with pytest.raises(ValueError, match=r"fine-tuned for labels \['a', 'b'\], but the task has labels"):
        built = build_teacher(classifier_teacher(open_teacher(TeacherConfig(name_or_path="all-minilm-l6-v2"))[0], ["a", "b"], seed=0))
        built.save_pretrained(tmp_path / "two_labels")
        AutoTokenizer.from_pretrained(source.folder).save_pretrained(tmp_path / "two_labels")
        classifier_teacher(open_teacher(TeacherConfig(name_or_path=str(tmp_path / "two_labels")))[0], LABELS)
    llm, _ = open_teacher(TeacherConfig())  # the SmolLM2 causal LM
    with pytest.raises(ValueError, match="sequence classification takes an encoder"):
        classifier_teacher(llm, LABELS)
    with pytest.raises(ValueError, match="is bidirectional: it can replace an encoder's attention, not a causal LM's"):
        student_config(llm.config, ConversionConfig(mixer="linformer"))
    for causal in ("mamba2", "mamba"):  # and the other way round
        with pytest.raises(ValueError, match=f"mixer='{causal}' is causal: it cannot replace an encoder's attention"):
            student_config(source.config, ConversionConfig(mixer=causal))
    # a fine-tuned classifier's head pools one way: another task.pooling is refused, not ignored
    with pytest.raises(ValueError, match="fine-tuned with 'mean' pooling: set task.pooling=mean"):
        classifier_teacher(open_teacher(TeacherConfig(name_or_path=str(tmp_path / "two_labels")))[0], ["a", "b"], pooling="cls")


def test_a_task_models_checkpoint_is_a_teacher_like_the_bare_encoder(minilm, tmp_path):
    """Hub encoders are mostly saved as task models (BertForMaskedLM: ``bert.*`` and the MLM head
    ``cls.*``): the teacher reads the same encoder tensors as from the bare model's folder."""
    from transformers import AutoConfig, AutoModel, BertForMaskedLM

    tokenizer = minilm[1]
    bare = save_tiny_encoder(tmp_path / "bare", "bert", tokenizer)
    mlm = BertForMaskedLM(AutoConfig.from_pretrained(bare))
    missing, unexpected = mlm.bert.load_state_dict(AutoModel.from_pretrained(bare).state_dict(), strict=False)
    assert all(k.startswith("pooler.") for k in [*missing, *unexpected])
    mlm.save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    readers = {name: classifier_teacher(open_teacher(TeacherConfig(name_or_path=str(tmp_path / name)))[0], LABELS, seed=0).weights() for name in ("bare", "mlm")}
    assert sorted(readers["mlm"].keys()) == sorted(readers["bare"].keys())
    assert not any(k.startswith(("encoder.cls.", "encoder.bert.")) for k in readers["mlm"].keys())
    for key in readers["bare"].keys():
        assert torch.equal(readers["mlm"].get(key), readers["bare"].get(key)), key
    teacher = build_teacher(classifier_teacher(open_teacher(TeacherConfig(name_or_path=str(tmp_path / "mlm")))[0], LABELS, seed=0))
    assert teacher(**_batch(tokenizer)).logits.shape == (4, len(LABELS))


def test_a_tokenizer_larger_than_the_encoders_embedding_is_named_when_the_data_opens(minilm, tmp_path):
    """A 256-token BERT saved with MiniLM's 30522-token tokenizer: the task names the teacher's
    tokenizer when it tokenises the splits (the embedding's IndexError, a multi-line traceback
    in the starting point's evaluation, before)."""
    from tiny_models import tiny_encoder

    from cald_scale.config import load_run_config
    from cald_scale.tasks import open_task

    folder = tmp_path / "small_vocab"
    tiny_encoder("bert", vocab=256).save_pretrained(folder)
    minilm[1].save_pretrained(folder)
    task = open_task(load_run_config(overrides=[
        "task.kind=classification", "classification.dataset=wiki_topic", "classification.max_train_examples=64",
        f"classification.cache_dir={tmp_path / 'data'}", "student.conversion.mixer=linformer", f"teacher.name_or_path={folder}",
    ]), is_main=True)
    with pytest.raises(ValueError, match=r"its tokenizer gives token id \d+ in the \w+ split, but the encoder embeds 256 \(vocab_size\)"):
        task.open_data()


def test_a_max_length_past_the_encoders_positions_is_refused_before_tokenising(minilm, tmp_path):
    from cald_scale.config import load_run_config
    from cald_scale.tasks import open_task

    tokenizer = minilm[1]
    common = ["task.kind=classification", "classification.dataset=wiki_topic", "classification.max_train_examples=64",
              f"classification.cache_dir={tmp_path / 'data'}", "student.conversion.mixer=linformer"]
    from transformers import AutoConfig

    for family in ("bert", "roberta"):
        folder = save_tiny_encoder(tmp_path / family, family, tokenizer)
        config = AutoConfig.from_pretrained(folder)
        # RoBERTa's position ids start after its padding index
        limit = config.max_position_embeddings - (config.pad_token_id + 1 if family == "roberta" else 0)
        cfg = load_run_config(overrides=[*common, f"teacher.name_or_path={folder}", f"classification.max_length={limit + 1}"])
        with pytest.raises(ValueError, match=f"max_length={limit + 1} exceeds what teacher .* has positions for \\({limit}"):
            open_task(cfg, is_main=True)
        open_task(load_run_config(overrides=[*common, f"teacher.name_or_path={folder}", f"classification.max_length={limit}"]), is_main=True)


def test_hidden_state_drift_is_zero_for_the_same_model_and_grows_with_the_change(minilm):
    from cald_scale.eval.drift import hidden_state_drift

    source, tokenizer = minilm
    teacher = layerwise(build_teacher(source))
    batch = _batch(tokenizer)
    same = hidden_state_drift(teacher, layerwise(build_teacher(source)), [batch])
    assert same["mean"] == pytest.approx(0.0, abs=1e-6) and same["tokens"] == int(batch["attention_mask"].sum())
    drifts = []
    for scale in (0.01, 0.05):
        moved = build_teacher(source)
        with torch.no_grad():
            moved.encoder.encoder.layer[3].output.dense.weight.add_(scale * torch.randn_like(moved.encoder.encoder.layer[3].output.dense.weight, generator=torch.Generator().manual_seed(0)))
        drifts.append(hidden_state_drift(teacher, layerwise(moved), [batch]))
    # Blocks before the changed one do not move; it and the blocks after it do, more for a larger change.
    assert all(d["per_layer"][i] == pytest.approx(0.0, abs=1e-6) for d in drifts for i in range(3))
    assert 0 < drifts[0]["per_layer"][3] < drifts[1]["per_layer"][3] and drifts[1]["mean"] > drifts[0]["mean"]
    # A sentence pair is embedded with its segments, as in training: a change to the second
    # segment's embedding moves every block (read without segment ids, it moved nothing).
    pair = tokenizer(["Rome fell."], ["It was 476."], return_tensors="pt")
    moved = build_teacher(source)
    with torch.no_grad():
        moved.encoder.embeddings.token_type_embeddings.weight[1].add_(torch.randn(source.config.teacher_hf_config().hidden_size, generator=torch.Generator().manual_seed(1)))
    segments = hidden_state_drift(teacher, layerwise(moved), [dict(pair)])
    assert min(segments["per_layer"]) > 1e-4


def test_student_init_from_converts_another_checkpoint_while_the_teacher_guides(minilm, tmp_path):
    """The paper's encoder runs: the student starts from the pretrained encoder while a fine-tuned
    one (here: another tiny BERT of the same geometry) is the teacher; a foreign geometry is refused."""
    from cald_scale.config import load_run_config
    from cald_scale.conversion.weights import WeightsMismatchError
    from cald_scale.tasks import open_task

    tokenizer = minilm[1]
    tuned = save_tiny_encoder(tmp_path / "tuned", "bert", tokenizer, seed=0)
    pretrained = save_tiny_encoder(tmp_path / "pretrained", "bert", tokenizer, seed=1)
    common = ["task.kind=classification", "classification.dataset=wiki_topic", "classification.max_train_examples=64",
              f"classification.cache_dir={tmp_path / 'data'}", "student.conversion.mixer=linformer", "student.conversion.linformer.k=16"]
    task = open_task(load_run_config(overrides=[*common, f"teacher.name_or_path={tuned}", f"student.init_from={pretrained}"]), is_main=True)
    assert task.source.name == str(tuned) and task.student_source.name == str(pretrained)
    teacher_w, init_w = task.source.weights(), task.student_source.weights()
    key = "encoder.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(teacher_w.get(key), init_w.get(key))
    # Both got the same seeded new head: the task's labels, the run's seed.
    assert torch.equal(teacher_w.get("classifier.weight"), init_w.get("classifier.weight"))

    student = build_student(task.student_source.config, init_w, STUDENTS["linformer"])
    assert torch.equal(student.state_dict()[key], init_w.get(key))
    assert open_task(load_run_config(overrides=[*common, f"teacher.name_or_path={tuned}"]), is_main=True).student_source is None

    shallow = save_tiny_encoder(tmp_path / "shallow", "bert", tokenizer, layers=2)
    with pytest.raises(WeightsMismatchError, match=r"student.init_from .*shallow.* does not match the teacher .*num_hidden_layers: 2 vs 3"):
        open_task(load_run_config(overrides=[*common, f"teacher.name_or_path={tuned}", f"student.init_from={shallow}"]), is_main=True)
    # Another vocabulary of the same size (two tokens' ids swapped) passes the geometry check; its
    # embedding rows would be read with the teacher's ids (accepted silently before).
    from transformers import BertTokenizer

    from cald_scale.config_loader import ConfigError

    vocab = dict(tokenizer.get_vocab())
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    swapped = save_tiny_encoder(tmp_path / "swapped", "bert", BertTokenizer(vocab=vocab), seed=1)
    with pytest.raises(ConfigError, match=r"student.init_from .*swapped.* has another tokenizer than the teacher .*: 2 of the tokens both have carry other ids"):
        open_task(load_run_config(overrides=[*common, f"teacher.name_or_path={tuned}", f"student.init_from={swapped}"]), is_main=True)


def test_geometry_check_counts_a_classifier_head_but_not_an_lm_label_count():
    """Waypoints and student.init_from are checked on block geometry; a classifier's label
    count and pooling count too, while the num_labels every HF config carries does not."""
    from transformers import BertConfig, LlamaConfig

    from cald_scale.conversion.classifier import classifier_config
    from cald_scale.engines.teacher import geometry_mismatch

    lm = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=100)
    assert geometry_mismatch(LlamaConfig(**lm, num_labels=7), LlamaConfig(**lm)) == []
    assert geometry_mismatch(LlamaConfig(**{**lm, "num_hidden_layers": 3}), LlamaConfig(**lm)) == ["num_hidden_layers: 3 vs 2"]

    encoder = BertConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=100)
    mean3 = classifier_config(encoder, 3, pooling="mean")
    assert geometry_mismatch(classifier_config(encoder, 3, pooling="mean"), mean3) == []
    assert geometry_mismatch(classifier_config(encoder, 3, pooling="cls"), mean3) == ["pooling: cls vs mean"]
    assert geometry_mismatch(classifier_config(encoder, 12, pooling="mean"), mean3) == ["num_labels: 12 vs 3"]
    # As many classes of another task: paired up by position, they would guide the wrong ones.
    sentiment = classifier_config(encoder, 3, label_names=["neg", "neu", "pos"])
    topics = classifier_config(encoder, 3, label_names=["arts", "history", "science"])
    assert geometry_mismatch(sentiment, topics) == ["labels: ['neg', 'neu', 'pos'] vs ['arts', 'history', 'science']"]


def test_a_transformers_fine_tuned_classifier_is_refused_not_given_a_random_head(minilm, tmp_path):
    """A BertForSequenceClassification's head pools through BERT's pooler, which this task's head
    does not: it cannot be read, and a new head would make the "fine-tuned" teacher guess."""
    from transformers import AutoConfig, BertForSequenceClassification

    bare = save_tiny_encoder(tmp_path / "bare", "bert", minilm[1])
    BertForSequenceClassification(AutoConfig.from_pretrained(bare, num_labels=len(LABELS))).save_pretrained(tmp_path / "sst")
    minilm[1].save_pretrained(tmp_path / "sst")
    source, _ = open_teacher(TeacherConfig(name_or_path=str(tmp_path / "sst")))
    with pytest.raises(ValueError, match="is a transformers BertForSequenceClassification: its fine-tuned head is not read"):
        classifier_teacher(source, LABELS, seed=0)


def test_a_new_head_must_train(minilm):
    """Converted from an encoder without a head for the task, the student's head is new: under
    student.trainable=mixers it would never train, so that is refused; a fine-tuned classifier's
    head (head_seed None) may stay frozen."""
    import dataclasses

    from cald_scale.engines.models import check_new_head_trains

    encoder = minilm[0]
    assert encoder.head_seed is not None
    with pytest.raises(ValueError, match="its classification head is new; with student.trainable=mixers"):
        check_new_head_trains("mixers", encoder)
    check_new_head_trains("all", encoder)
    check_new_head_trains("mixers", dataclasses.replace(encoder, head_seed=None))


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_the_encoder_runs_the_attention_kernel_asked_for(kernel):
    source, tokenizer = open_teacher(TeacherConfig(name_or_path="all-minilm-l6-v2", attn_implementation=kernel))
    teacher = build_teacher(classifier_teacher(source, LABELS, seed=0))
    assert teacher.encoder.config._attn_implementation == kernel
    assert teacher(**_batch(tokenizer)).logits.shape == (4, len(LABELS))


def test_each_task_refuses_the_other_tracks_teacher_by_name(minilm, tmp_path):
    """The causal-LM task given an encoder says to set task.kind=classification (it built a
    "causal" BERT, or failed inside transformers); classification given the default GGUF LM
    teacher refuses it before de-quantising it."""
    from cald_scale.config import load_run_config
    from cald_scale.tasks import open_task

    with pytest.raises(ValueError, match="'all-minilm-l6-v2' is a bert encoder, not a causal LM: set task.kind=classification"):
        open_task(load_run_config(overrides=["teacher.name_or_path=all-minilm-l6-v2"]), is_main=True)
    cfg = load_run_config(overrides=["task.kind=classification", "classification.dataset=wiki_topic", f"classification.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match="is a GGUF checkpoint, a causal LM: sequence classification takes an encoder"):
        open_task(cfg, is_main=True)


_SHARED_PROJECTION_GRADIENTS = r"""
import json, os, sys

import torch

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import build_student
from cald_scale.conversion.teacher import TeacherConfig, classifier_teacher, open_teacher
from cald_scale.distill.losses import LossConfig
from cald_scale.distill.stages import layerwise
from cald_scale.distill.step import cald_forward
from cald_scale.engines.distributed import init_distributed
from cald_scale.engines.models import block_numel
from cald_scale.engines.partitioned import zero3_placement
from cald_scale.engines.ds_config import size_zero_buffers
from cald_scale.engines.zero3 import begin_step, build_training_engine, param_groups
from cald_scale.mixers.config import LinformerConfig

init_distributed()
source, tokenizer = open_teacher(TeacherConfig(name_or_path="all-minilm-l6-v2"))
source = classifier_teacher(source, ["a", "b", "c"], seed=0)
conversion = ConversionConfig(mixer="linformer", linformer=LinformerConfig(k=16, sharing="layer"))
enc = tokenizer(["The Renaissance began in Florence.", "A sonnet has fourteen lines and a rhyme."], padding=True, return_tensors="pt")
batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([0, 2])}
loss = LossConfig(a_ce=1.0, a_layer=0.0)
reference = build_student(source.config, source.weights(), conversion, seed=0).eval()
cald_forward(None, layerwise(reference), batch, loss).total.backward()
expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
zero = {"stage": 3, **dict.fromkeys(("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance"), "auto")}
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": zero,
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
student = build_student(source.config, source.weights(), conversion, seed=0, placement=zero3_placement(ds))
blocks = layerwise(student).blocks
# The trainer's bucket: one block's worth, so each block's hook flushes the one before.
ds = size_zero_buffers(ds, block_numel(student, blocks), 1, prefetch=False)
engine = build_training_engine(student, ds, param_groups(student, 1e-4, 1.0, 0.0, blocks=blocks), leaf_blocks=blocks, leaves="blocks")
engine.eval()
begin_step(engine)
engine.backward(cald_forward(None, layerwise(engine.module), batch, loss).total)
errors = {}
for name, param in engine.module.named_parameters():
    if name in expected:
        grad = param._z3_optimizer.get_fp32_grad_for_param(param).view(expected[name].shape)
        errors[name] = ((grad - expected[name]).norm() / expected[name].norm().clamp(min=1e-12)).item()
print("ERRORS " + json.dumps(errors))
from cald_scale.launch import leave
leave()  # as a training rank ends: no interpreter finalization under gloo
"""


def test_a_projection_every_block_shares_gets_its_whole_gradient_under_zero3_block_leaves():
    """Linformer's sharing=layer: one length projection in every block. With blocks as ZeRO-3
    leaves (the default) DeepSpeed reduced it in the last block's hook, before the others added
    their parts: its gradient came out zero. Every gradient equals plain torch's."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.run([sys.executable, "-c", _SHARED_PROJECTION_GRADIENTS, str(port)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ERRORS "))[len("ERRORS "):])
    shared = [name for name in errors if ".E." in name or name.endswith(".E.weight")]
    assert shared and len(errors) > 20
    assert max(errors.values()) < 1e-4, {k: v for k, v in errors.items() if v >= 1e-4}


def test_a_classifier_of_an_encoder_without_sdpa_reloads_eager(tmp_path):
    """from_pretrained asks the classifier class for sdpa; MegatronBERT's encoder has none, so a
    saved classifier of it did not reload. BERT keeps sdpa."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from cald_scale.conversion.classifier import CaldEncoderForSequenceClassification, classifier_config
    from cald_scale.conversion.modeling import ConversionConfig

    for family, kernel in (("megatron-bert", "eager"), ("bert", "sdpa")):
        encoder = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
        student = CaldEncoderForSequenceClassification(classifier_config(encoder, 2).as_student(ConversionConfig(mixer="bimamba2")))
        student.save_pretrained(tmp_path / family)
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / family)
        assert loaded.config._attn_implementation == kernel, family


@pytest.mark.parametrize("name", ["linformer", "bimamba2"])
def test_a_rank_keeping_part_of_each_mixer_weight_reads_only_the_encoders_attention_rows_it_needs(minilm, name):
    """As for causal LMs (test_conversion.py): under ZeRO-3 a rank reads the rows of BERT's
    query/key/value its range of each mixer weight is made of, not each layer's attention whole;
    the out_proj that starts as the identity reads none."""
    source, _ = minilm
    shares = attention_read_by_ranks(source.config, source.weights, STUDENTS[name])
    assert max(shares) <= 0.5 and sum(shares) >= 1.0 - 1e-9, shares
