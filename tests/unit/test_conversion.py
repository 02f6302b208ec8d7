"""Conversion: one generic surgery for every family; copied weights exact; HF round trip."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, attention_read_by_ranks, tiny_teacher
from transformers import AutoModelForCausalLM

from cald_scale.conversion.modeling import (
    CaldStudentForCausalLM,
    ConversionConfig,
    MixerAsAttention,
)
from cald_scale.conversion.registry import get_adapter, supported_families
from cald_scale.conversion.surgery import convert_teacher, copied_tensors_match
from cald_scale.conversion.weights import StateDictReader
from cald_scale.distill.stages import LayerwiseModel

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", ["mamba2", "mamba"])
def test_convert_copies_every_non_attention_tensor(family, mixer):
    teacher = tiny_teacher(family)
    student = convert_teacher(teacher, ConversionConfig(mixer=mixer))
    adapter = get_adapter(family)
    assert copied_tensors_match(teacher, student)
    # Every attention became a mixer; nothing else changed type.
    for t_layer, s_layer in zip(adapter.layers(teacher), adapter.layers(student.backbone)):
        assert isinstance(adapter.attention(s_layer), MixerAsAttention)
        assert type(s_layer.mlp) is type(t_layer.mlp)
    teacher_keys = set(teacher.state_dict())
    student_keys = set(student.backbone.state_dict())
    attn = adapter.attention_attr
    assert {k for k in teacher_keys - student_keys} == {k for k in teacher_keys if f".{attn}." in k}
    assert all(f".{attn}.mixer." in k for k in student_keys - teacher_keys)
    assert student.config.teacher_family == family and student.config.mixer == mixer


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("mixer", ["mamba2", "mamba"])
def test_save_pretrained_round_trip(tmp_path, family, mixer):
    student = convert_teacher(tiny_teacher(family), ConversionConfig(mixer=mixer))
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = student(ids).logits
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, CaldStudentForCausalLM)
    assert loaded.config.teacher_family == family and loaded.config.mixer == mixer
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_layerwise_pieces_equal_full_forward():
    for model in (tiny_teacher("llama"), convert_teacher(tiny_teacher("llama"), ConversionConfig())):
        ids = torch.randint(0, 256, (2, 20))
        with torch.no_grad():
            torch.testing.assert_close(LayerwiseModel(model).logits(ids), model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_attention_init_maps_qkvo(family):
    teacher = tiny_teacher(family)
    student = convert_teacher(teacher, ConversionConfig(mixer="mamba2", attention_init=True))
    adapter = get_adapter(family)
    attn = adapter.read_attention(adapter.attention(adapter.layers(teacher)[0]), teacher.config)
    mixer = student.mixers()[0]
    width = mixer.config.num_heads * mixer.config.head_dim
    heads, kv = teacher.config.num_attention_heads, getattr(teacher.config, "num_key_value_heads", None) or teacher.config.num_attention_heads
    w = mixer.in_proj.weight
    v_rep = attn.v.view(kv, -1, attn.v.shape[1]).repeat_interleave(heads // kv, 0).reshape(width, -1)
    k_rep = attn.k.view(kv, -1, attn.k.shape[1]).repeat_interleave(heads // kv, 0).reshape(width, -1)
    assert torch.equal(w[width : 2 * width], v_rep)
    assert torch.equal(w[2 * width : 3 * width], k_rep)
    assert torch.equal(w[3 * width : 4 * width], attn.q)
    assert torch.equal(mixer.out_proj.weight, attn.o)
    # With the flag off the mixer is a fresh init.
    fresh = convert_teacher(teacher, ConversionConfig(mixer="mamba2", attention_init=False)).mixers()[0]
    assert not torch.equal(fresh.in_proj.weight[3 * width : 4 * width], attn.q)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_mamba_attention_init_carries_the_value_output_map(family):
    """Mamba-1 has no Q/K slots: V fills the x branch, tiled over its wider inner width, and O the
    out_proj, scaled by the tiles, so that the x branch's linear map (out_proj . in_proj_x) is the
    attention's O . V, the map a head attending to one token applies; the z gate and the SSM
    stay fresh."""
    teacher = tiny_teacher(family)
    student = convert_teacher(teacher, ConversionConfig(mixer="mamba", attention_init=True))
    adapter = get_adapter(family)
    attn = adapter.read_attention(adapter.attention(adapter.layers(teacher)[0]), teacher.config)
    mixer = student.mixers()[0]
    d_inner = mixer.out_proj.weight.shape[1]
    heads, kv = teacher.config.num_attention_heads, getattr(teacher.config, "num_key_value_heads", None) or teacher.config.num_attention_heads
    v_rep = attn.v.view(kv, -1, attn.v.shape[1]).repeat_interleave(heads // kv, 0).reshape(-1, attn.v.shape[1])
    assert d_inner > v_rep.shape[0]  # tiled (expand 2)
    torch.testing.assert_close(mixer.out_proj.weight @ mixer.in_proj.weight[:d_inner], attn.o @ v_rep)
    fresh = convert_teacher(teacher, ConversionConfig(mixer="mamba", attention_init=False)).mixers()[0]
    assert not torch.allclose(fresh.out_proj.weight @ fresh.in_proj.weight[:d_inner], attn.o @ v_rep)


def test_teacher_matched_mamba2_geometry():
    teacher = tiny_teacher("llama")
    cfg = ConversionConfig().resolved(teacher.config).mamba2
    assert (cfg.num_heads, cfg.head_dim, cfg.d_state, cfg.n_groups, cfg.expand) == (4, 16, 16, 4, 1)


def test_unconvertible_family_lists_supported():
    # bert, gpt2 and falcon are discovered now (tests/unit/test_families.py); MPT's Wqkv is not.
    with pytest.raises(ValueError, match="'mpt': no attention module with q/k/v projections") as err:
        get_adapter("mpt")
    for family in ("llama", "mistral", "qwen2"):
        assert family in str(err.value)
    for family in FAMILIES:  # hand-written, or listed once discovered
        get_adapter(FAMILY_CONFIGS[family](64, 2))
        assert family in supported_families()


def test_teacher_tensor_without_student_slot_is_a_clear_error():
    teacher = tiny_teacher("llama")
    teacher.model.layers[0].mlp.extra_scale = torch.nn.Parameter(torch.ones(4))  # not in the config's architecture
    with pytest.raises(RuntimeError, match="teacher/student mismatch.*extra_scale"):
        convert_teacher(teacher, ConversionConfig())


@pytest.mark.parametrize("cycle", [False, True], ids=["refcounted", "in_a_reference_cycle"])
def test_each_replaced_attention_is_freed_before_the_next_mixer_is_built(monkeypatch, cycle):
    """At most one replaced attention is alive while mixers are built (a large model's layers
    are freed one by one), and a full garbage collection runs only for one that refcounting
    could not free (a reference cycle, as hooks that capture parameters make)."""
    import gc
    import weakref

    from cald_scale.conversion import modeling

    teacher = tiny_teacher("llama", layers=3)
    adapter = get_adapter("llama")
    attentions = [adapter.attention(layer) for layer in adapter.layers(teacher)]
    if cycle:
        for attn in attentions:
            attn.self_ref = attn  # a cycle: only the collector can free it
        del attn
    refs = [weakref.ref(attn) for attn in attentions]
    del attentions
    collected, alive_at_build = [], []
    real_collect, real_build = gc.collect, modeling.build_mixer
    monkeypatch.setattr(modeling.gc, "collect", lambda *a: collected.append(1) or real_collect(*a))

    def build_mixer(*args, **kwargs):
        alive_at_build.append(sum(ref() is not None for ref in refs))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(modeling, "build_mixer", build_mixer)
    modeling.replace_attention(teacher.model, adapter, ConversionConfig(), teacher.config)
    # Before the k-th mixer is built, the first k attentions are gone.
    assert alive_at_build == [2, 1, 0]
    assert len(collected) == (3 if cycle else 0)


def test_the_teachers_attention_biases_go_where_their_weights_go(caplog):
    """qwen2 has q/k/v biases (gpt_neox and BERT too): a mixer with proj_bias takes them in the
    same rows as the weights (C <- q, B <- k, x <- v); one without says it drops them."""
    import logging

    from cald_scale.mixers.config import Mamba2Config, MambaConfig

    teacher = tiny_teacher("qwen2", layers=2)
    attn = teacher.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.bias.normal_()
    heads, kv_heads = teacher.config.num_attention_heads, teacher.config.num_key_value_heads
    repeat = lambda b: b.view(kv_heads, -1).repeat_interleave(heads // kv_heads, dim=0).flatten()  # noqa: E731
    student = convert_teacher(teacher, ConversionConfig(mixer="mamba2", mamba2=Mamba2Config(proj_bias=True)))
    mixer = student.mixers()[0]
    width, state = mixer.num_heads * mixer.head_dim, mixer.n_groups * mixer.d_state
    bias = mixer.in_proj.bias
    assert torch.equal(bias[width : 2 * width], repeat(attn.v_proj.bias))
    assert torch.equal(bias[2 * width : 2 * width + state], repeat(attn.k_proj.bias))
    assert torch.equal(bias[2 * width + state : 2 * width + 2 * state], attn.q_proj.bias)
    assert not bias[:width].any() and not bias[2 * width + 2 * state :].any() and not mixer.out_proj.bias.any()
    mamba = convert_teacher(teacher, ConversionConfig(mixer="mamba", mamba=MambaConfig(proj_bias=True))).mixers()[0]
    d_inner = mamba.out_proj.weight.shape[1]
    assert torch.equal(mamba.in_proj.bias[:d_inner], repeat(attn.v_proj.bias).repeat(d_inner // (heads * attn.head_dim)))
    import cald_scale.conversion.init as init_module

    init_module._warned_dropped_bias = False
    with caplog.at_level(logging.WARNING, logger="cald_scale.conversion.init"):
        convert_teacher(teacher, ConversionConfig(mixer="mamba2"))
    assert "drops them (set the mixer's proj_bias: true" in caplog.text
    # Linformer (BERT's q/k/v biases) says so too, where it dropped them unsaid.
    from cald_scale.conversion.init import init_mixer_from_attention
    from cald_scale.conversion.registry import AttentionWeights
    from cald_scale.mixers import build_mixer
    from cald_scale.mixers.config import LinformerConfig

    init_module._warned_dropped_bias = False
    caplog.clear()
    hidden = teacher.config.hidden_size
    linformer = build_mixer("linformer", LinformerConfig(num_heads=heads, head_dim=hidden // heads, k=8, max_positions=32, proj_bias=False), hidden)
    weights = AttentionWeights(q=attn.q_proj.weight, k=attn.q_proj.weight, v=attn.q_proj.weight, o=None, q_bias=attn.q_proj.bias)
    config = copy.deepcopy(teacher.config)
    config.num_key_value_heads = heads  # k and v above are full-width
    with caplog.at_level(logging.WARNING, logger="cald_scale.conversion.init"):
        init_mixer_from_attention(linformer, weights, config)
    assert f"this {type(linformer).__name__} mixer (no proj_bias) cannot take" in caplog.text


@pytest.mark.parametrize("head_dim", [8, 24], ids=["narrower", "wider"])
def test_a_teacher_attention_width_no_multiple_of_hidden_converts_with_its_attention_init(tmp_path, head_dim):
    """4 heads x head_dim 8 = 32 or x 24 = 96 against hidden 64 (Gemma-2-2B's 8 x 256 in 2304, Qwen3-4B's
    32 x 128 in 2560): the default conversion takes the attention's width as the mixer's (it refused
    before, or converted only with a fresh mixer), fills it from Q/K/V/O, saves, reloads and decodes
    with its cache; Bamba, whose width is an integer multiple of hidden, refuses it by name."""
    from tiny_models import with_memory
    from transformers import LlamaConfig, LlamaForCausalLM

    from cald_scale.export.bamba import BambaExportError, bamba_config

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim))
    cfg = ConversionConfig().resolved(teacher.config).mamba2
    assert (cfg.num_heads, cfg.head_dim, cfg.d_state, cfg.n_groups, cfg.expand, cfg.intermediate_size) == (4, head_dim, head_dim, 4, 1, 4 * head_dim)
    student = convert_teacher(teacher, ConversionConfig())
    assert copied_tensors_match(teacher, student)
    adapter = get_adapter("llama")
    attn = adapter.read_attention(adapter.attention(adapter.layers(teacher)[0]), teacher.config)
    mixer, width = student.mixers()[0], 4 * head_dim
    assert mixer.intermediate_size == width and mixer.in_proj.weight.shape == (width + width + 2 * width + 4, 64)
    assert torch.equal(mixer.in_proj.weight[3 * width : 4 * width], attn.q) and torch.equal(mixer.out_proj.weight, attn.o)
    student = with_memory(student.eval())
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = student.generate(ids, use_cache=True, **greedy)
    assert torch.equal(cached, student.generate(ids, use_cache=False, **greedy))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    with pytest.raises(BambaExportError, match=rf"integer mamba_expand x hidden_size \(64\); this student's is {width}"):
        bamba_config(student)
    # Given both ways of saying the width, the mixer config refuses rather than picks one.
    with pytest.raises(ValueError, match="expand=2 and intermediate_size=96 both give the inner width"):
        dataclasses.replace(cfg, expand=2, intermediate_size=96)


def test_an_explicit_mamba2_geometry_keeps_the_init_from_the_teachers_attention_only_when_it_is_the_teachers():
    """With teacher matching off, the init from Q/K/V with a geometry of other heads is refused
    before any weight is read; one that is the teacher's keeps it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match=r"needs 4 heads and groups of head_dim = d_state = 8; the mamba2 geometry given has 1 heads"):
        ConversionConfig(match_teacher_geometry=False).resolved(teacher.config)
    student = convert_teacher(teacher, ConversionConfig(match_teacher_geometry=False, attention_init=False))
    assert copied_tensors_match(teacher, student) and student(torch.randint(0, 256, (1, 8))).logits.isfinite().all()
    explicit = ConversionConfig(match_teacher_geometry=False, attention_layers=[], mixer="mamba2")
    explicit.mamba2 = dataclasses.replace(explicit.mamba2, num_heads=4, n_groups=4, head_dim=8, d_state=8, intermediate_size=32)
    assert explicit.resolved(teacher.config).mamba2.num_heads == 4
    student = convert_teacher(teacher, explicit)
    assert student.mixers()[0].intermediate_size == 32


def test_attention_weights_the_init_reads_are_checked_against_the_config():
    from cald_scale.conversion.surgery import build_student
    from cald_scale.conversion.weights import StateDictReader

    teacher = tiny_teacher("llama")
    missing = {k: v for k, v in teacher.state_dict().items() if ".self_attn.q_proj" not in k}
    with pytest.raises(ValueError, match=r"lack a projection of layer 0's attention \(model.layers.0.self_attn.\) that attention_init reads"):
        build_student(teacher.config, StateDictReader(missing), ConversionConfig())
    other = dict(teacher.state_dict(), **{"model.layers.1.self_attn.k_proj.weight": torch.randn(64, 64)})
    with pytest.raises(ValueError, match=r"do not fit its config at layer 1's attention .*: k \(64, 64\) != \(32, 64\)"):
        build_student(teacher.config, StateDictReader(other), ConversionConfig())


def test_a_hybrids_kept_attention_runs_the_attention_kernel_asked_for(tmp_path):
    """The teacher's kernel (teacher.attn_implementation) in the converted student, and
    from_pretrained's attn_implementation on a saved one: the backbone's own config, rebuilt
    from a dict, had dropped it (sdpa, whatever was asked)."""
    teacher = tiny_teacher("llama", layers=2)
    teacher.config._attn_implementation = "eager"
    student = convert_teacher(teacher, ConversionConfig(attention_layers=[1]))
    assert student.backbone.config._attn_implementation == "eager"
    ids = torch.randint(0, teacher.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(LayerwiseModel(student).logits(ids), student(ids).logits, rtol=0, atol=0)
    student.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").backbone.config._attn_implementation == "eager"
    assert AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").backbone.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("tied", [True, False])
def test_a_student_resized_for_new_tokens_saves_and_reloads(tmp_path, tied):
    """Adding a special token (a chat template's): resize_token_embeddings grows the embedding and
    the head (tied or not) and the saved student reloads with the new vocabulary."""
    teacher = tiny_teacher("llama", layers=2)
    teacher.config.tie_word_embeddings = tied
    student = convert_teacher(teacher, ConversionConfig(attention_layers=[1]))
    old = student.config.vocab_size
    student.resize_token_embeddings(old + 4)
    assert student.get_input_embeddings().weight.shape[0] == student.get_output_embeddings().weight.shape[0] == old + 4
    assert (student.get_input_embeddings().weight is student.get_output_embeddings().weight) == tied
    ids = torch.tensor([[old + 3, 5, old + 1]])
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.shape[-1] == old + 4
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.vocab_size == old + 4
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits)



def _teacher_of(layout: str):
    from transformers import GPT2Config, Phi3Config

    if layout == "phi3":  # one qkv_proj, [q | k | v]
        config = Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    elif layout == "gpt2":  # Conv1D weights, stored (in, out): no rows to select
        config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    else:
        return tiny_teacher(layout, layers=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "layout, mixer, bound, used",
    [
        ("llama", "mamba2", 0.6, 1.0),
        ("llama", "mamba", 0.6, 0.5),  # Mamba takes V and O alone (half of this GQA attention's rows)
        ("gpt_neox", "mamba2", 0.6, 1.0),
        ("phi3", "mamba2", 0.6, 1.0),
        ("gpt2", "mamba2", 1.0, 1.0),
    ],
)
def test_a_rank_keeping_part_of_each_mixer_weight_reads_only_the_attention_rows_it_needs(layout, mixer, bound, used):
    """Under ZeRO-3 each rank keeps a range of every mixer weight; it used to read each layer's
    attention whole to initialise them. Now it reads the rows of Q/K/V/O its range is made of
    (GQA's repeated heads, a fused query_key_value in grouped order, a qkv_proj split by sizes),
    and what it keeps equals the whole conversion's. GPT-2's Conv1D weights, stored transposed,
    are still read whole."""
    teacher = _teacher_of(layout)
    state = teacher.state_dict()
    shares = attention_read_by_ranks(teacher.config, lambda: StateDictReader(state), ConversionConfig(mixer=mixer, attention_init=True))
    assert max(shares) <= bound, shares
    assert sum(shares) >= used - 1e-9  # between them the ranks read every row the init uses
    if bound < 1.0:
        assert sum(shares) <= 1.35, shares  # GQA's shared K/V heads are read by each rank that repeats them


def test_row_reads_follow_a_family_reader_that_selects_rows_and_refuse_one_that_computes():
    """Which checkpoint rows make each projection row is learnt by running the family's reader on
    numbered stand-ins, then on their complements. A reader that reorders rows is followed; one
    that computes on its weights, which could still give valid row numbers (abs, +1 and a clamp
    of o's numbers do), is found out by the second run, and read whole."""
    from cald_scale.conversion.attention_rows import StoredAttention, WholeAttention, read_attention_rows
    from cald_scale.conversion.families import read_separate_qkvo
    from cald_scale.conversion.registry import AttentionWeights

    teacher = tiny_teacher("llama", layers=1)
    reader = StateDictReader(teacher.state_dict())
    prefix = "model.layers.0.self_attn."

    def reordered(attn, config):
        w = read_separate_qkvo(attn, config)
        return dataclasses.replace(w, q=w.q.flip(0), k=torch.cat([w.k[16:], w.k[:16]]))

    def computed(op):
        def read(attn, config):
            w = read_separate_qkvo(attn, config)
            return AttentionWeights(q=w.q, k=w.k, v=w.v, o=op(w.o))  # o's numbers stay valid rows of o_proj

        return read

    rows = read_attention_rows(reordered, reader, prefix, teacher.config, by_rows=True)
    whole = reordered(teacher.model.layers[0].self_attn, teacher.config)
    assert isinstance(rows, StoredAttention)
    for field in ("q", "k", "v", "o"):
        index = torch.tensor([0, 3, 17, 31])
        assert torch.equal(rows.rows(field, index), getattr(whole, field)[index]), field
    for op in (torch.abs, lambda o: o + 1, lambda o: o.clamp(min=0)):
        assert isinstance(read_attention_rows(computed(op), reader, prefix, teacher.config, by_rows=True), WholeAttention)


def _layout_configs():
    from transformers import BertConfig, FalconConfig, GPT2Config, GPTBigCodeConfig, GPTNeoXConfig, LlamaConfig, OPTConfig, Phi3Config, PhiConfig

    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    return {
        "llama q/k/v/o_proj, grouped": LlamaConfig(**small, intermediate_size=64, num_key_value_heads=2, attention_bias=True),
        "opt q/k/v/out_proj": OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
        "phi q/k/v_proj, dense": PhiConfig(**small, intermediate_size=64),
        "phi3 qkv_proj": Phi3Config(**small, intermediate_size=64, num_key_value_heads=2, pad_token_id=0),
        "gpt2 Conv1D c_attn": GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4),
        "gpt_bigcode c_attn, multi-query": GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, multi_query=True),
        "gpt_bigcode c_attn, head by head": GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, multi_query=False),
        "gpt_neox query_key_value": GPTNeoXConfig(**small, intermediate_size=64),
        "falcon query_key_value, multi-query": FalconConfig(**small, multi_query=True, new_decoder_architecture=False),
        "falcon query_key_value, grouped": FalconConfig(**small, num_kv_heads=2, new_decoder_architecture=True),
        "bert query/key/value": BertConfig(**small, intermediate_size=64),
    }


@pytest.mark.parametrize("layout", sorted(_layout_configs()))
def test_every_projection_layout_read_by_rows_gives_what_its_reader_reads(layout):
    """Each layout conversion reads (discovery.PROJECTION_LAYOUTS and the hand-written adapters),
    read row by row as a ZeRO-3 rank reads it, gives every row of Q/K/V/O and every bias its
    reader gives from the module; GPT-2's transposed Conv1D is read whole."""
    from transformers import AutoModel

    from cald_scale.conversion.attention_rows import StoredAttention, WholeAttention, read_attention_rows
    from cald_scale.conversion.surgery import attention_prefixes
    from cald_scale.conversion.weights import RenamedReader

    config = _layout_configs()[layout]
    torch.manual_seed(0)
    model = (AutoModel if config.model_type == "bert" else AutoModelForCausalLM).from_config(config).eval()
    adapter = get_adapter(config)
    prefix = attention_prefixes(model, adapter)[0]
    rows = read_attention_rows(adapter.read_attention, RenamedReader(StateDictReader(model.state_dict()), model), prefix, config, by_rows=True)
    assert isinstance(rows, WholeAttention if layout.startswith("gpt2") else StoredAttention)
    whole = adapter.read_attention(adapter.attention(adapter.layers(model)[0]), config)
    for field in ("q", "k", "v", "o"):
        want = getattr(whole, field)
        assert (rows.shape(field) is None) == (want is None), field
        if want is not None:
            assert torch.equal(rows.rows(field, torch.arange(want.shape[0])), want), field
        assert (rows.bias(field) is None) == (getattr(whole, f"{field}_bias") is None), field
        if rows.bias(field) is not None:
            assert torch.equal(rows.bias(field), getattr(whole, f"{field}_bias")), field


def test_row_reads_on_one_rank_and_on_more_ranks_than_rows():
    """One rank keeps every row (and reads each once); with more ranks than a weight has
    elements, some ranks keep nothing of it (an empty range) and read nothing for it."""
    teacher = tiny_teacher("llama", layers=2)
    state = teacher.state_dict()
    conversion = ConversionConfig(mixer="mamba2", attention_init=True)
    assert attention_read_by_ranks(teacher.config, lambda: StateDictReader(state), conversion, ranks=1) == [1.0]
    shares = attention_read_by_ranks(teacher.config, lambda: StateDictReader(state), conversion, ranks=100_000, checked=[0, 1, 99_999])
    assert 0 < shares[0] < 0.01 and 0 < shares[1] < 0.01 and shares[2] == 0.0, shares
