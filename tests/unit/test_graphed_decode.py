"""GraphedDecode (cald_scale.generation.graphs): what a CUDA graph of a decode step relies on,
checked on CPU, where the same bookkeeping runs eagerly.

A graph replays fixed addresses without the host: so the decoded tokens must equal the model's
own cached steps, every state tensor must keep its address from step to step, and a step must
run no op that waits on the host (``.item()``, ``bool(tensor)``, ``nonzero``).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_teacher, with_memory
from torch.utils._python_dispatch import TorchDispatchMode

from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.generation.graphs import GraphedDecode, prompt_positions

MIXERS = ["mamba2", "mamba"]
HOST_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item", "allclose"}


def _student(mixer: str, attention_layers=(), family: str = "llama"):
    teacher = tiny_teacher(family, layers=3)
    return with_memory(convert_teacher(teacher, ConversionConfig(mixer=mixer, attention_layers=list(attention_layers))).eval())


def _prefilled(student, prompt, mask=None, max_cache_len=None):
    """The prompt in a new cache, its positions as generate gives them (from each row's first real token)."""
    cache = student.new_cache(max_cache_len)
    positions = prompt_positions(mask) if mask is not None else None
    with torch.no_grad():
        logits = student(prompt, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return cache, logits


def _left_padded(batch=2, length=7, pads=3, seed=0):
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[0, :pads], mask[0, :pads] = 0, 0  # the first prompt is shorter, left-padded
    return ids, mask


def _states(cache):
    mixers = [layer for layer in cache.layers if hasattr(layer, "conv_states")]
    return [t for layer in mixers for t in (*layer.conv_states.values(), *layer.recurrent_states.values())]


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_equals_the_models_own_cached_steps(mixer):
    student = _student(mixer)
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    ref_cache, ref_logits = _prefilled(student, prompt)
    cache, logits = _prefilled(student, prompt)
    decode = GraphedDecode(student, cache, batch=2)
    assert not decode.use_graph  # CPU: the eager path with the graph's bookkeeping
    for _ in range(5):
        token = ref_logits.argmax(-1, keepdim=True)
        assert torch.equal(logits.argmax(-1, keepdim=True), token)
        with torch.no_grad():
            ref_logits = student(token, cache=ref_cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        logits = decode(token)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert cache.tokens_seen == ref_cache.tokens_seen == 12


@pytest.mark.parametrize("mixer", MIXERS)
def test_states_keep_their_addresses_and_change_in_place(mixer):
    student = _student(mixer)
    cache, logits = _prefilled(student, torch.randint(3, 256, (1, 5)))
    before = _states(cache)
    addresses, values = [t.data_ptr() for t in before], [t.clone() for t in before]
    assert len(before) == 2 * 3
    decode = GraphedDecode(student, cache, batch=1)
    for _ in range(3):
        logits = decode(logits.argmax(-1))
    after = _states(cache)
    assert [t.data_ptr() for t in after] == addresses, "a state tensor moved: a CUDA graph would read the old one"
    assert all(not torch.equal(a, v) for a, v in zip(after, values)), "a decode step left a state unchanged"


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mixer", MIXERS)
def test_a_decode_step_never_waits_on_the_host(mixer):
    student = _student(mixer)
    cache, logits = _prefilled(student, torch.randint(3, 256, (2, 5)))
    decode = GraphedDecode(student, cache, batch=2)
    decode(logits.argmax(-1))  # the warm-up call on CUDA
    with _OpNames() as ops:
        decode(logits.argmax(-1))
    assert ops.names, "no op recorded: the check saw nothing"
    assert not ops.names & HOST_SYNC_OPS, f"host-synchronising ops in a decode step: {sorted(ops.names & HOST_SYNC_OPS)}"


def test_refuses_a_growing_kv_cache_an_empty_cache_and_graphs_off_cuda():
    hybrid = _student("mamba2", attention_layers=[1])
    cache, _ = _prefilled(hybrid, torch.randint(3, 256, (1, 5)))
    with pytest.raises(ValueError, match=r"preallocated KV cache: make it with model.new_cache\(max_cache_len="):
        GraphedDecode(hybrid, cache, batch=1)
    cache, _ = _prefilled(hybrid, torch.randint(3, 256, (2, 5)), max_cache_len=8)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); .* should be \(2, 5\)"):
        GraphedDecode(hybrid, cache, batch=2, attention_mask=torch.ones(2, 4, dtype=torch.long))
    student = _student("mamba2")
    with pytest.raises(ValueError, match="prefilled cache"):
        GraphedDecode(student, student.new_cache(), batch=1)
    cache, _ = _prefilled(student, torch.randint(3, 256, (1, 5)))
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedDecode(student, cache, batch=1, use_graph=True)


@pytest.mark.parametrize("mixer", MIXERS)
def test_generate_graphed_gives_generates_tokens(mixer):
    """Greedy and sampled completions of a left-padded batch equal transformers' own generate,
    token for token (sampling with the same seed), through the graph's eager bookkeeping on CPU."""
    from cald_scale.generation.graphs import generate_graphed

    student = _student(mixer)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # the first prompt is 3 tokens shorter, left-padded
    for sampling in ({}, {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}, {"do_sample": True}):
        torch.manual_seed(5)
        reference = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **sampling)[:, ids.shape[1]:]
        torch.manual_seed(5)
        tokens = generate_graphed(student, ids, mask, max_new_tokens=6, pad_token_id=0, **sampling)
        assert torch.equal(tokens, reference), (sampling, tokens, reference)
    # No mask given: both infer it from the pad token (the pads ran as tokens, and other tokens came).
    reference = student.generate(input_ids=ids, max_new_tokens=6, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(generate_graphed(student, ids, max_new_tokens=6, pad_token_id=0), reference)


def test_generate_graphed_numbers_a_left_padded_gpt2_row_as_generate_does():
    """A GPT-2 student adds its teacher's position table at every token, mixers alone too: the
    graphed decode numbers a left-padded row from its first real token, as generate does (it
    counted the pads, and the row's tokens changed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cald_scale.generation.graphs import generate_graphed

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=64, initializer_range=0.3)
    student = with_memory(convert_teacher(AutoModelForCausalLM.from_config(config).eval(), ConversionConfig()).eval())
    ids, mask = _left_padded(length=9, pads=4)
    reference = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(generate_graphed(student, ids, mask, max_new_tokens=6, pad_token_id=0), reference)
    alone = student.generate(input_ids=ids[:1, 4:], max_new_tokens=6, pad_token_id=0)[:, 5:]
    assert torch.equal(reference[:1], alone) and len(set(alone[0].tolist())) > 1  # tokens that vary


def test_generate_graphed_stops_when_every_sequence_has_ended():
    """An ended sequence continues with the pad token, and decoding stops once all have ended, as
    in generate: here the first greedy token is made the end-of-sequence token."""
    from cald_scale.generation.graphs import generate_graphed

    student = _student("mamba2")
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    greedy = generate_graphed(student, ids, max_new_tokens=4)
    assert greedy.shape == (2, 4)
    eos = int(greedy[0, 0])
    tokens = generate_graphed(student, ids, max_new_tokens=4, eos_token_id=eos, pad_token_id=1)
    reference = student.generate(input_ids=ids, max_new_tokens=4, eos_token_id=eos, pad_token_id=1)[:, ids.shape[1]:]
    assert torch.equal(tokens, reference)
    assert tokens[0, 0] == eos and (tokens[0, 1:] == 1).all()
    # Without a pad token an ended sequence continues with the eos token, as in generate.
    tokens = generate_graphed(student, ids, max_new_tokens=4, eos_token_id=eos)
    assert torch.equal(tokens, student.generate(input_ids=ids, max_new_tokens=4, eos_token_id=eos)[:, ids.shape[1]:])
    assert (tokens[0] == eos).all()


def test_generate_graphed_follows_the_models_generation_config():
    """A converted student carries its teacher's generation config (Qwen2.5-Instruct's sets a
    repetition penalty and sampling): the graphed decode applies all of it, as generate does, and
    refuses the modes it cannot replay."""
    from cald_scale.generation.graphs import generate_graphed

    student = _student("mamba2")
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    plain = generate_graphed(student, ids, max_new_tokens=10)
    student.generation_config.update(
        repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3, suppress_tokens=[int(plain[0, 0])], forced_eos_token_id=7, eos_token_id=7,
    )
    for call in ({}, {"do_sample": True, "top_k": 10}):
        torch.manual_seed(7)
        reference = student.generate(input_ids=ids, max_new_tokens=10, **call)[:, ids.shape[1]:]
        torch.manual_seed(7)
        tokens = generate_graphed(student, ids, max_new_tokens=10, **call)
        assert torch.equal(tokens, reference), (call, tokens, reference)
    assert not torch.equal(generate_graphed(student, ids, max_new_tokens=10), plain)  # the config changed the tokens
    student.generation_config.update(do_sample=True, temperature=0.8)  # sampling by default, as generate reads it
    torch.manual_seed(9)
    reference = student.generate(input_ids=ids, max_new_tokens=5)[:, ids.shape[1]:]
    torch.manual_seed(9)
    assert torch.equal(generate_graphed(student, ids, max_new_tokens=5), reference)
    with pytest.raises(ValueError, match="greedy search or sampling, not beam_search"):
        generate_graphed(student, ids, max_new_tokens=2, do_sample=False, num_beams=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate_graphed(student, ids, max_new_tokens=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="unknown generation arguments"):
        generate_graphed(student, ids, max_new_tokens=2, not_an_argument=1)


# --- a hybrid: kept attention layers over a preallocated KV cache ---------------------------


def _stepped_reference(student, ids, mask, tokens, max_cache_len):
    """The model's own cached steps over the same preallocated cache, its padding mask grown a
    column a token, as generate grows it."""
    cache, logits = _prefilled(student, ids, mask, max_cache_len)
    out = []
    with torch.no_grad():
        for token in tokens:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1  # the new token's, as generate numbers it
            logits = student(token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            out.append(logits)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_hybrid_decode_equals_the_models_own_cached_steps(family):
    """A hybrid's kept attention, left-padded prompt, 5 steps: the decoder's own position and
    padding-mask tensors give exactly what the model's cached steps give."""
    student = _student("mamba2", attention_layers=[1], family=family)
    ids, mask = _left_padded()
    tokens = torch.randint(3, 256, (5, 2, 1), generator=torch.Generator().manual_seed(4))
    reference = _stepped_reference(student, ids, mask, tokens, max_cache_len=12)
    cache, _ = _prefilled(student, ids, mask, max_cache_len=12)
    decode = GraphedDecode(student, cache, batch=2, attention_mask=mask)
    for token, expected in zip(tokens, reference):
        torch.testing.assert_close(decode(token), expected, rtol=0, atol=0)
    (static,) = [layer for layer in cache.layers if hasattr(layer, "cumulative_length")]
    assert cache.tokens_seen == int(static.cumulative_length) == 12


def test_hybrid_step_reads_its_position_from_the_device_not_the_host():
    """A replayed graph runs the kernels recorded with the host's values of the time: here every
    step's forward sees the host count frozen at its first step's value, as a replay would, and
    must still give the model's own logits. The mask's query position comes from the KV cache's
    device count (``StudentCache.get_query_offset``) and the rotary position from the decoder's
    own tensor; built from the host count, the mask would hide the newest keys and the rotary
    positions would stand still."""
    student = _student("mamba2", attention_layers=[1])
    ids, mask = _left_padded()
    tokens = torch.randint(3, 256, (4, 2, 1), generator=torch.Generator().manual_seed(6))
    reference = _stepped_reference(student, ids, mask, tokens, max_cache_len=12)
    cache, _ = _prefilled(student, ids, mask, max_cache_len=12)
    decode = GraphedDecode(student, cache, batch=2, attention_mask=mask)
    recorded = cache.tokens_seen  # the host's count when the step was recorded
    forward = decode._forward

    def as_replayed():
        now = cache.tokens_seen
        cache.tokens_seen = recorded
        try:
            return forward()
        finally:
            cache.tokens_seen = now + 1

    decode._forward = as_replayed
    for step, (token, expected) in enumerate(zip(tokens, reference)):
        torch.testing.assert_close(decode(token), expected, rtol=0, atol=0, msg=f"step {step}")
    assert cache.tokens_seen == 7 + 4


def test_hybrid_keys_values_and_states_keep_their_addresses():
    student = _student("mamba2", attention_layers=[1])
    ids, mask = _left_padded()
    cache, logits = _prefilled(student, ids, mask, max_cache_len=10)
    (static,) = [layer for layer in cache.layers if hasattr(layer, "cumulative_length")]
    tensors = [static.keys, static.values, static.cumulative_length, *_states(cache)]
    addresses = [t.data_ptr() for t in tensors]
    decode = GraphedDecode(student, cache, batch=2, attention_mask=mask)
    for _ in range(3):
        logits = decode(logits.argmax(-1))
    after = [static.keys, static.values, static.cumulative_length, *_states(cache)]
    assert [t.data_ptr() for t in after] == addresses, "a KV or state tensor moved: a CUDA graph would read the old one"
    assert int(static.cumulative_length) == 10
    with pytest.raises(ValueError, match="preallocates 10 positions"):  # refused on the host, before any kernel
        decode(logits.argmax(-1))
    assert int(static.cumulative_length) == 10 and cache.tokens_seen == 10


def test_hybrid_step_never_waits_on_the_host():
    student = _student("mamba2", attention_layers=[1])
    ids, mask = _left_padded()
    cache, logits = _prefilled(student, ids, mask, max_cache_len=12)
    decode = GraphedDecode(student, cache, batch=2, attention_mask=mask)
    decode(logits.argmax(-1))  # the warm-up call on CUDA
    with _OpNames() as ops:
        decode(logits.argmax(-1))
    assert "index_copy_" in ops.names, "the step did not write the preallocated KV cache"
    assert not ops.names & HOST_SYNC_OPS, f"host-synchronising ops in a decode step: {sorted(ops.names & HOST_SYNC_OPS)}"


def test_hybrid_with_flash_attention_is_refused_by_name():
    from cald_scale.generation.graphs import graph_unsupported

    student = _student("mamba2", attention_layers=[1])
    assert graph_unsupported(student) is None and graph_unsupported(_student("mamba2")) is None
    student.backbone.config._attn_implementation = "flash_attention_2"
    cache, _ = _prefilled(_student("mamba2", attention_layers=[1]), torch.randint(3, 256, (1, 5)), max_cache_len=8)
    with pytest.raises(ValueError, match="'flash_attention_2', which reads the padding mask on the host.*attn_implementation='sdpa'"):
        GraphedDecode(student, cache, batch=1)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_graphed_gives_a_hybrids_generate_tokens(cache_implementation):
    """A hybrid's greedy and sampled completions of a left-padded batch equal generate's, with
    its growing KV cache or its preallocated one (generate_graphed preallocates its own)."""
    from cald_scale.generation.graphs import generate_graphed

    student = _student("mamba2", attention_layers=[1])
    ids, mask = _left_padded(length=9, seed=1)
    named = {"cache_implementation": cache_implementation} if cache_implementation else {}
    for sampling in ({}, {"do_sample": True, "temperature": 0.7, "top_k": 20}):
        torch.manual_seed(5)
        reference = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **named, **sampling)[:, ids.shape[1]:]
        torch.manual_seed(5)
        cache = student.new_cache(ids.shape[1] + 6)
        tokens = generate_graphed(student, ids, mask, max_new_tokens=6, pad_token_id=0, cache=cache, **sampling)
        assert torch.equal(tokens, reference), (sampling, tokens, reference)
        assert cache.tokens_seen == ids.shape[1] + 5  # the last token is sampled, not stepped
    assert torch.equal(generate_graphed(student, ids, mask, max_new_tokens=6, pad_token_id=0), reference if not sampling else
                       student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)[:, ids.shape[1]:])


def test_the_inference_benchmark_graphs_a_hybrid_over_its_preallocated_cache():
    """benchmarks/inference_speed.py's graphed decode (what gpu_check's inference_speed_hybrid step
    runs on a GPU), on a tiny hybrid: its random KV cache preallocated with room for the checked
    and timed steps, the graphed steps equal to the eager model's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import inference_speed

    student = _student("mamba2", attention_layers=[1])
    teacher_config = tiny_teacher("llama", layers=3).config
    room = 2 + inference_speed.GRAPH_CHECKED_STEPS + 1
    out = inference_speed.graphed_decode(
        student, lambda b, c: inference_speed.student_cache(student, b, c, teacher_config, room=room), 16, [1, 2], torch.device("cpu"), steps=2,
    )
    assert out["error"] is None, out["error"]
    assert out["max_rel_diff_vs_eager"] == {"1": 0.0, "2": 0.0} and out["decode_tok_s"]["2"]["16"] > 0
    short = inference_speed.graphed_decode(
        student, lambda b, c: inference_speed.student_cache(student, b, c, teacher_config, room=2), 16, [1], torch.device("cpu"), steps=2,
    )
    assert "preallocates 18 positions" in short["error"]["error"], short["error"]  # refused by name, recorded


def test_generate_graphed_refuses_before_the_prefill_what_it_cannot_replay():
    """A hybrid's cache that grows, or is preallocated too short for the generation, and a
    teacher's dynamic RoPE (its frequencies rescaled on the host every step) are refused before
    the prompt is run, not after it or tokens into the generation (helper-79)."""
    from cald_scale.generation.graphs import generate_graphed, graph_unsupported

    hybrid = _student("mamba2", attention_layers=[1])
    ids, mask = _left_padded(length=7)
    for cache, message in ((hybrid.new_cache(), "grows"), (hybrid.new_cache(max_cache_len=9), "preallocates 9 positions")):
        with pytest.raises(ValueError, match=rf"the cache given {message}.* at least 12 positions here \(model.new_cache\(max_cache_len=13\)\)"):
            generate_graphed(hybrid, ids, mask, max_new_tokens=6, pad_token_id=0, cache=cache)
        assert cache.tokens_seen == 0, "the prompt ran before the refusal"
    assert generate_graphed(hybrid, ids, mask, max_new_tokens=6, pad_token_id=0, cache=hybrid.new_cache(max_cache_len=12)).shape == (2, 6)

    teacher = tiny_teacher("llama", layers=3)
    teacher.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    dynamic = with_memory(convert_teacher(type(teacher)(teacher.config), ConversionConfig(mixer="mamba2")).eval())
    assert "dynamic RoPE" in graph_unsupported(dynamic)
    cache = dynamic.new_cache()
    with pytest.raises(ValueError, match="dynamic RoPE rescales its frequencies on the host"):
        generate_graphed(dynamic, ids, max_new_tokens=2, cache=cache)
    assert cache.tokens_seen == 0
