"""Generation with the recurrent-state cache, and hybrid layouts (layers that keep attention)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_teacher, with_memory
from transformers import AutoModelForCausalLM
from transformers.cache_utils import StaticLayer

from cald_scale.conversion.modeling import ConversionConfig, MixerAsAttention
from cald_scale.conversion.registry import get_adapter
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.generation import StudentCache
from cald_scale.generation.cache import state_bytes

LAYOUTS = [
    pytest.param("llama", "mamba2", [], id="llama-mamba2"),
    pytest.param("llama", "mamba", [], id="llama-mamba"),
    pytest.param("llama", "mamba2", [1], id="llama-mamba2-hybrid"),
    pytest.param("gpt_neox", "mamba", [0], id="gpt_neox-mamba-hybrid"),
]
GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)


def _student(family: str, mixer: str, attention_layers: list[int], layers: int = 3):
    teacher = tiny_teacher(family, layers=layers)
    return with_memory(convert_teacher(teacher, ConversionConfig(mixer=mixer, attention_layers=attention_layers)).eval())


def _left_padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0: a 5-token prompt, left-padded
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("family,mixer,attention_layers", LAYOUTS)
def test_cached_generation_equals_recompute(family, mixer, attention_layers):
    student = _student(family, mixer, attention_layers)
    ids, mask = _left_padded_batch()
    cached = student.generate(ids, attention_mask=mask, use_cache=True, **GREEDY)
    recomputed = student.generate(ids, attention_mask=mask, use_cache=False, **GREEDY)
    assert torch.equal(cached, recomputed)
    # A left-padded row generates what the same prompt alone generates.
    alone = student.generate(ids[:1, 4:], attention_mask=mask[:1, 4:], use_cache=True, **GREEDY)
    assert torch.equal(cached[0, 4:], alone[0])


@pytest.mark.parametrize("family,mixer,attention_layers", [LAYOUTS[2], LAYOUTS[3]])
def test_a_hybrid_with_a_static_kv_cache_generates_what_the_dynamic_one_does(family, mixer, attention_layers):
    student = _student(family, mixer, attention_layers)
    ids, mask = _left_padded_batch()
    dynamic = student.generate(ids, attention_mask=mask, use_cache=True, **GREEDY)
    out = student.generate(
        ids, attention_mask=mask, use_cache=True, cache_implementation="static", return_dict_in_generate=True, **GREEDY
    )
    assert torch.equal(out.sequences, dynamic)
    kept = out.cache.layers[attention_layers[0]]
    assert isinstance(kept, StaticLayer) and kept.max_cache_len >= ids.shape[1] + GREEDY["max_new_tokens"] - 1
    # A prompt given as embeddings: generate's max_length does not count it, the cache must.
    embeds = student.get_input_embeddings()(ids)
    from_embeds = student.generate(inputs_embeds=embeds, attention_mask=mask, cache_implementation="static", **GREEDY)
    assert torch.equal(from_embeds, dynamic[:, ids.shape[1] :])
    # Preallocated and written in place: the kept layer's keys keep their address while decoding,
    # and hold the whole generation's positions from the start.
    cache = student.new_cache(max_cache_len=20)
    with torch.no_grad():
        student(ids, attention_mask=mask, cache=cache, use_cache=True)
        kept = cache.layers[attention_layers[0]]
        address, full = kept.keys.data_ptr(), state_bytes(cache)["kv"]
        for t in range(3):
            student(ids[:, t : t + 1], attention_mask=torch.cat([mask, torch.ones(3, t + 1, dtype=mask.dtype)], 1),
                    cache=cache, use_cache=True)
    assert kept.keys.data_ptr() == address and state_bytes(cache)["kv"] == full and kept.keys.shape[2] == 20
    # The cache's own count (no read of a device tensor) agrees with the static layer's.
    assert cache.get_seq_length(attention_layers[0]) == int(kept.get_seq_length()) == 12
    # Past the preallocated length: refused before any layer runs, the cache left as it was.
    with pytest.raises(ValueError, match="preallocates 20 positions"), torch.no_grad():
        student(torch.randint(3, 256, (3, 9)), cache=cache, use_cache=True)
    assert cache.tokens_seen == 12 and cache.get_seq_length(attention_layers[0]) == 12
    # A preallocated cache too short for the generation asked: refused before the first token.
    with pytest.raises(ValueError, match="preallocates 10 positions .* needs 20"):
        student.generate(ids, attention_mask=mask, cache=student.new_cache(max_cache_len=10), **GREEDY)
    with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
        student.generate(ids, attention_mask=mask, cache_implementation="offloaded", **GREEDY)


@pytest.mark.parametrize("family,mixer,attention_layers", LAYOUTS)
def test_step_logits_equal_full_forward(family, mixer, attention_layers):
    student = _student(family, mixer, attention_layers)
    ids = torch.randint(3, 256, (2, 16))
    with torch.no_grad():
        full = student(ids).logits
        cache = student.new_cache()
        prefix = student(ids[:, :10], cache=cache, use_cache=True).logits
        steps = [student(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(10, 16)]
        context_free = student(ids[:, -1:]).logits
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 16
    # The state carries the prompt (with_memory): a step that lost it could not pass the check above.
    states = [cache.get_recurrent_state(i) for i, kind in enumerate(student.config.layer_types) if kind == "linear_attention"]
    assert min(state.abs().max().item() for state in states) > 1e-2
    assert (context_free[:, -1] - full[:, -1]).abs().max() > 1e-2


def test_sampling_with_a_seed_matches_recompute():
    student = _student("llama", "mamba2", [])
    ids, mask = _left_padded_batch(1)
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(student.generate(ids, attention_mask=mask, use_cache=use_cache, do_sample=True, top_k=20,
                                     temperature=0.9, max_new_tokens=10, pad_token_id=0))
    assert torch.equal(*outs)


@pytest.mark.parametrize("family,mixer,attention_layers", LAYOUTS[:1] + LAYOUTS[2:3])
def test_beam_search_with_the_cache_equals_recompute(family, mixer, attention_layers):
    # Beam search reorders every layer's cache rows by the surviving beams at each step (the
    # mixers' conv and SSM states, a kept layer's KV); a missed reorder changes the beams.
    student = _student(family, mixer, attention_layers)
    ids, mask = _left_padded_batch(2)
    beams = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0, early_stopping=True)
    cached = student.generate(ids, attention_mask=mask, use_cache=True, **beams)
    recomputed = student.generate(ids, attention_mask=mask, use_cache=False, **beams)
    assert cached.shape[0] == 2 * ids.shape[0] and torch.equal(cached, recomputed)


def test_decoding_runs_one_token_per_mixer_call_and_state_is_constant():
    student = _student("llama", "mamba2", [1])
    mixer_layer = student.mixers()[0]
    prefills, steps = [], []
    orig_prefill, orig_step = mixer_layer.prefill, mixer_layer.step
    mixer_layer.prefill = lambda h, *a: (prefills.append(h.shape[1]), orig_prefill(h, *a))[1]
    mixer_layer.step = lambda h, *a, **kw: (steps.append(h.shape[1]), orig_step(h, *a, **kw))[1]
    student.generate(torch.randint(3, 256, (1, 11)), use_cache=True, **GREEDY)
    # The prompt goes through the mixer once (prefill); every later token is one step.
    assert prefills == [11] and steps == [1] * (GREEDY["max_new_tokens"] - 1)

    sizes = {}
    for context in (8, 64):
        cache = student.new_cache()
        with torch.no_grad():
            student(torch.randint(3, 256, (2, context)), cache=cache, use_cache=True)
        sizes[context] = state_bytes(cache)
    assert sizes[8]["recurrent"] == sizes[64]["recurrent"] > 0
    assert sizes[64]["kv"] == 8 * sizes[8]["kv"] > 0  # the kept attention layer's KV grows


def test_hybrid_keeps_the_teachers_attention_and_round_trips(tmp_path):
    teacher = tiny_teacher("llama", layers=4)
    student = convert_teacher(teacher, ConversionConfig(mixer="mamba2", attention_layers=[1, 3]))
    adapter = get_adapter("llama")
    kinds = [type(adapter.attention(layer)) for layer in adapter.layers(student.backbone)]
    assert kinds[0] is MixerAsAttention and kinds[2] is MixerAsAttention
    assert kinds[1] is type(adapter.attention(adapter.layers(teacher)[1])) and kinds[3] is kinds[1]
    assert [m.layer_idx for m in student.mixers()] == [0, 2]
    assert student.config.layer_types == ["linear_attention", "full_attention"] * 2
    teacher_state, student_state = teacher.state_dict(), student.backbone.state_dict()
    kept = [k for k in teacher_state if ".layers.1.self_attn." in k or ".layers.3.self_attn." in k]
    assert kept and all(torch.equal(teacher_state[k], student_state[k]) for k in kept)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.attention_layers == [1, 3]
    ids = torch.randint(3, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


@pytest.mark.parametrize("bad", [[3], [-1], [0, 0], [0, 1, 2]])
def test_bad_attention_layers_are_refused(bad):
    with pytest.raises(ValueError, match="attention_layers"):
        convert_teacher(tiny_teacher("llama", layers=3), ConversionConfig(attention_layers=bad))


def test_attention_every_spreads_the_kept_layers_over_any_depth():
    # layers 1, 1 + k, ...: the 25% hybrid keeps 8 of SmolLM2's 30 layers, the 50% the odd ones.
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert ConversionConfig(attention_every=4).resolved(smollm2).attention_layers == [1, 5, 9, 13, 17, 21, 25, 29]
    assert ConversionConfig(attention_every=2).resolved(smollm2).attention_layers == list(range(1, 30, 2))
    assert ConversionConfig().resolved(smollm2).attention_layers == []  # outside a run config: every layer converted
    student = convert_teacher(tiny_teacher("llama", layers=5), ConversionConfig(attention_every=2))
    assert student.config.attention_layers == [1, 3] and [m.layer_idx for m in student.mixers()] == [0, 2, 4]
    # The saved config lists the layers; reloading it converts the same ones.
    assert student.config.conversion["attention_every"] == 0
    with pytest.raises(ValueError, match="attention_every=2 and attention_layers=.*set one"):
        convert_teacher(tiny_teacher("llama", layers=3), ConversionConfig(attention_every=2, attention_layers=[0]))
    with pytest.raises(ValueError, match="attention_every must be >= 0"):
        convert_teacher(tiny_teacher("llama", layers=3), ConversionConfig(attention_every=-1))
    # Layer 0 always converts, so a spread never keeps every layer.
    assert [m.layer_idx for m in convert_teacher(tiny_teacher("llama", layers=2), ConversionConfig(attention_every=1)).mixers()] == [0]


def test_student_refuses_a_foreign_cache():
    from transformers import DynamicCache

    student = _student("llama", "mamba2", [])
    with pytest.raises(TypeError, match="StudentCache"):
        student(torch.randint(3, 256, (1, 4)), cache=DynamicCache(), use_cache=True)
    assert isinstance(student.new_cache(), StudentCache)


def test_a_cropped_cache_is_refused_not_silently_wrong():
    # Assisted and speculative decoding take tokens back with crop(); a mixer's state cannot be
    # rolled back, so stepping on from a cropped cache must fail, not continue from the wrong state.
    student = _student("llama", "mamba2", [1])
    ids = torch.randint(3, 256, (1, 8))
    cache = student.new_cache()
    with torch.no_grad():
        student(ids, cache=cache, use_cache=True)
        assert not cache.is_croppable
        assert cache.get_seq_length(0) == cache.get_seq_length(1) == 8  # a mixer layer and the kept attention agree
        cache.crop(0)  # nothing taken back: still usable
        student(ids[:, :1], cache=cache, use_cache=True)
        cache.crop(-1)
        with pytest.raises(RuntimeError, match="cannot be rolled back"):
            student(ids[:, :1], cache=cache, use_cache=True)
        state = cache.get_recurrent_state(0)
        cache.reset()  # a reset cache starts over, exactly like a new one, in the same tensors (a captured graph's)
        torch.testing.assert_close(student(ids, cache=cache, use_cache=True).logits, student(ids, cache=student.new_cache(), use_cache=True).logits)
        assert cache.get_recurrent_state(0).data_ptr() == state.data_ptr()
        # Another number of sequences: refused by name on a cache in use, fine after a reset.
        three = torch.randint(3, 256, (3, 8))
        with pytest.raises(ValueError, match="holds the states of 1 sequences; a forward of 3"):
            student(three, cache=cache, use_cache=True)
        cache.reset()
        torch.testing.assert_close(student(three, cache=cache, use_cache=True).logits, student(three, cache=student.new_cache(), use_cache=True).logits)


def test_assisted_generation_stops_with_a_clear_error():
    student = _student("llama", "mamba2", [])
    ids, mask = _left_padded_batch()
    # transformers refuses a cache that is not croppable (5.25), or the first step after a crop is ours to refuse.
    with pytest.raises((RuntimeError, ValueError), match="can be cropped|cannot be rolled back"):
        student.generate(ids[:1], attention_mask=mask[:1], assistant_model=student, **GREEDY)


def test_a_mixer_layer_refuses_inputs_it_cannot_honour():
    student = _student("llama", "mamba2", [])
    layer = student.adapter.attention(student.adapter.layers(student.backbone)[0])
    h = torch.randn(1, 4, student.config.hidden_size)
    with pytest.raises(TypeError, match="cu_seq_lens_q"):
        layer(h, cu_seq_lens_q=torch.tensor([0, 2, 4]))
    out, _ = layer(h, attention_mask=torch.ones(1, 1, 4, 4), position_ids=torch.arange(4)[None], use_cache=False)
    assert out.shape == h.shape


@pytest.mark.parametrize("mixer", ["mamba2", "mamba"])
@pytest.mark.parametrize("chunks", [(2, 7), (1,) * 9], ids=["two_chunks", "token_by_token"])
def test_a_left_padded_prompt_in_chunks_equals_one_prefill(mixer, chunks):
    """Left padding longer than the first chunk: the pads after it run as steps on a cache and
    must leave the state as one prefill does. Token by token (generate(prefill_chunk_size=1), a
    loop feeding the prompt) every pad after the first is a one-token step, whose mask was
    once dropped: the conv bias alone wrote silu(bias) terms into the state. Those terms decay
    within a few tokens (a Mamba2's last logits moved by 1e-5 only), so the state is checked
    where they land: a row holds nothing after its pads."""
    student = _student("llama", mixer, [])
    ids, mask = _left_padded_batch()  # row 0 has 4 pads
    pads = int((mask[0] == 0).sum())
    with torch.no_grad():
        whole_cache = student.new_cache()
        whole = student(ids, attention_mask=mask, cache=whole_cache, use_cache=True).logits[:, -1]
        cache, end = student.new_cache(), 0
        for size in chunks:
            end += size
            last = student(ids[:, end - size : end], attention_mask=mask[:, :end], cache=cache, use_cache=True).logits[:, -1]
            if end == pads:  # row 0 has read pads only
                for idx in range(len(student.mixers())):
                    assert not cache.get_recurrent_state(idx)[0].any() and not cache.get_conv_state(idx)[0].any(), idx
    torch.testing.assert_close(last, whole, rtol=1e-4, atol=1e-5)

    def close(got, expected):  # to float32 rounding of the state's own scale (steps and one scan sum in other orders)
        assert expected.abs().max() > 1e-2  # a state that matters (with_memory), so a lost one fails
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4 * expected.abs().max().item())

    for idx in range(len(student.mixers())):
        close(cache.get_recurrent_state(idx), whole_cache.get_recurrent_state(idx))
        close(cache.get_conv_state(idx), whole_cache.get_conv_state(idx))
    if len(chunks) > 2:
        plain = student.generate(ids, attention_mask=mask, **GREEDY)
        assert torch.equal(student.generate(ids, attention_mask=mask, prefill_chunk_size=1, **GREEDY), plain)


def test_generate_compiles_the_student_only_on_request(monkeypatch):
    """transformers compiles generate's forward on a GPU for any compileable cache, and a cache of
    mixers alone is one; the student opts out unless a compile_config asks for it. The model
    reports a CUDA device here (transformers' check reads only ``device.type``), so the
    criteria are the GPU's."""
    from transformers import CompileConfig, GenerationConfig

    student = _student("llama", "mamba2", [])
    monkeypatch.setattr(type(student), "device", property(lambda self: torch.device("cuda")))
    kwargs = {"cache": student.new_cache()}
    assert kwargs["cache"].is_compileable  # what transformers would go by
    assert super(type(student), student)._valid_auto_compile_criteria(kwargs, GenerationConfig()) is True  # its default on a GPU
    assert student._valid_auto_compile_criteria(kwargs, GenerationConfig()) is False
    assert student._valid_auto_compile_criteria(kwargs, GenerationConfig(compile_config=CompileConfig())) is True


def test_a_bf16_hybrid_keeps_the_teachers_float32_rotary_frequencies():
    """A bf16 teacher holds its rotary inv_freq in float32; the student's kept attention must too,
    or every position's angle is rounded and the kept layer no longer computes the teacher's."""
    teacher = tiny_teacher("llama", layers=3).eval()
    for param in teacher.parameters():  # as from_pretrained(dtype=bfloat16) leaves it: buffers in float32
        param.data = param.data.to(torch.bfloat16)
    student = convert_teacher(teacher, ConversionConfig(mixer="mamba2", attention_layers=[0])).eval()
    assert student.backbone.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 256, (1, 64))
    with torch.no_grad():
        ours = student.backbone.model.layers[0](student.backbone.model.embed_tokens(ids), position_embeddings=student.backbone.model.rotary_emb(student.backbone.model.embed_tokens(ids), torch.arange(64)[None]))
        theirs = teacher.model.layers[0](teacher.model.embed_tokens(ids), position_embeddings=teacher.model.rotary_emb(teacher.model.embed_tokens(ids), torch.arange(64)[None]))
    ours, theirs = (o[0] if isinstance(o, tuple) else o for o in (ours, theirs))
    assert torch.equal(ours, theirs)


def test_rotary_tables_built_on_meta_are_computed_again_where_asked():
    """Pipeline stages build with their buffers where the weights are not; ``rotary_in_float32``
    with a device computes every rotary table there, in float32, equal to a plainly built one's."""
    from accelerate import init_empty_weights

    from cald_scale.conversion.placement import rotary_in_float32

    plain = tiny_teacher("llama", layers=2)
    with init_empty_weights(include_buffers=True):
        empty = type(plain)(plain.config)
    assert empty.model.rotary_emb.inv_freq.is_meta
    assert rotary_in_float32(empty) == 0  # nothing rounded, no device: untouched
    assert rotary_in_float32(empty, "cpu") == 1
    assert empty.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(empty.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
