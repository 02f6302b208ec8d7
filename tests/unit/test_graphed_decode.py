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
from cald_scale.generation.graphs import GraphedDecode

MIXERS = ["mamba2", "mamba"]
HOST_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item", "allclose"}


def _student(mixer: str, attention_layers=(), family: str = "llama"):
    teacher = tiny_teacher(family, layers=3)
    return with_memory(convert_teacher(teacher, ConversionConfig(mixer=mixer, attention_layers=list(attention_layers))).eval())


def _prefilled(student, prompt):
    cache = student.new_cache()
    with torch.no_grad():
        logits = student(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return cache, logits


def _states(cache):
    return [t for layer in cache.layers for t in (*layer.conv_states.values(), *layer.recurrent_states.values())]


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


def test_refuses_a_hybrid_an_empty_cache_and_graphs_off_cuda():
    hybrid = _student("mamba2", attention_layers=[1])
    cache, _ = _prefilled(hybrid, torch.randint(3, 256, (1, 5)))
    with pytest.raises(ValueError, match="mixers only"):
        GraphedDecode(hybrid, cache, batch=1)
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
