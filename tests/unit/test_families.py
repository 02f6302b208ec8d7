"""Conversion is generic over model families: adapters discovered from the modeling code.

Every family is a tiny random model built from its config (no hub). The contract per
decoder family: running it block by block equals its own forward (also past a sliding
window), conversion copies every non-attention tensor bitwise, the student runs; an
unconvertible layout is refused before any weight is read.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import with_memory
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from cald_scale.conversion.families import read_fused_qkv
from cald_scale.conversion.modeling import ConversionConfig, MixerAsAttention
from cald_scale.conversion.registry import get_adapter, supported_families
from cald_scale.conversion.surgery import attention_prefixes, build_student, convert_teacher
from cald_scale.conversion.weights import StateDictReader, TensorTree
from cald_scale.distill.stages import LayerwiseModel

WINDOW = 8
SEQ = 3 * WINDOW  # longer than every sliding window below

_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

# model_type -> extra config fields. Layer types: llama, qwen3, olmo2, phi3 full; mistral all
# sliding; qwen2 full then sliding (max_window_layers); gemma2 and olmo3 alternate (layer_types).
DECODERS = {
    "llama": {},
    "qwen3": {"head_dim": 16},  # q_norm / k_norm per head inside attention
    "olmo2": {},  # q_norm / k_norm over the full width inside attention
    "phi3": {},  # fused qkv_proj, fused gate_up_proj
    "phi": {"partial_rotary_factor": 0.5},  # o is "dense"; attention and MLP side by side on one residual
    "lfm2": {"layer_types": ["full_attention"] * 4},  # o is "out_proj", with q/k norms
    "gptj": {"rotary_dim": 8, "num_key_value_heads": 4},  # o is "out_proj"; rotary on part of each head; no GQA
    # Absolute positions added to the embeddings: a learned table (GPT-2, with Conv1D projections), sinusoidal (XGLM).
    "gpt2": {"num_key_value_heads": 4},
    "xglm": {"num_key_value_heads": 4},
    "opt": {"num_key_value_heads": 4},  # its final_layer_norm is registered before its blocks
    "gpt_bigcode": {"multi_query": True, "num_key_value_heads": 1},  # c_attn as nn.Linear, one K/V head (StarCoder, SantaCoder)
    # A fused query_key_value with dense, in Falcon's three orders: one K/V head (Falcon-7B; attention
    # and MLP side by side), K/V groups (Falcon-40B, -180B, Falcon2), head by head (Persimmon, with q/k norms).
    "falcon": {"multi_query": True, "num_key_value_heads": 1},
    "falcon-grouped": {"model_type": "falcon", "new_decoder_architecture": True, "num_kv_heads": 2},
    "persimmon": {"num_key_value_heads": 4},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "gemma2": {"head_dim": 16, "sliding_window": WINDOW},  # soft-capped attention and logits, eager only
    "olmo3": {"sliding_window": WINDOW},  # rotary embeddings per layer type
    # Scales the forward applies outside any module: on the embeddings and the logits (Granite), the logits (Cohere).
    "granite": {"embedding_multiplier": 3.0, "logits_scaling": 4.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3},
    "cohere": {"logit_scale": 0.5},
    "hyperclovax": {"embedding_multiplier": 4.0, "logits_scaling": 0.5},  # its logits_scaling multiplies, Granite's divides
}
SLIDING = ("mistral", "qwen2", "gemma2", "olmo3")


def tiny(model_type: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    fields = {**_COMMON, **DECODERS[model_type]}
    config = AutoConfig.for_model(fields.pop("model_type", model_type), **fields)
    return AutoModelForCausalLM.from_config(config).eval()


def ids(vocab: int = _COMMON["vocab_size"]) -> torch.Tensor:
    return torch.randint(3, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_layerwise_equals_forward_past_the_window(model_type):
    model = tiny(model_type)
    lw = LayerwiseModel(model)
    assert lw.adapter is get_adapter(model.config)
    with torch.no_grad():
        expected = model(ids()).logits
        torch.testing.assert_close(lw.logits(ids()), expected, rtol=1e-5, atol=1e-5)
        if model_type in SLIDING:
            assert "sliding_attention" in lw.layer_types and SEQ > model.config.sliding_window
            lw.layer_types = ["full_attention"] * lw.num_layers  # what one full causal mask computes
            assert not torch.allclose(lw.logits(ids()), expected, atol=1e-3)


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gpt2", "xglm"])
def test_hybrid_student_layerwise_equals_forward(model_type):
    # The kept attention layers (gemma2: one sliding, one full) get their own masks too; GPT-2 and XGLM add positions.
    student = convert_teacher(tiny(model_type), ConversionConfig(attention_layers=[0, 1])).eval()  # GPT-2 and XGLM have dropout
    with torch.no_grad():
        torch.testing.assert_close(LayerwiseModel(student).logits(ids()), student(ids()).logits, rtol=1e-5, atol=1e-5)


def test_a_kept_sliding_window_layer_caches_only_its_window():
    """A hybrid that keeps Gemma2's sliding layer 0 and full layer 1: generation past the window
    equals recomputing, with the growing and the preallocated cache, and the sliding layer holds
    only its window (it held every position, as the full layer does)."""
    student = with_memory(convert_teacher(tiny("gemma2"), ConversionConfig(attention_layers=[0, 1])).eval())
    assert student.config.layer_types == ["sliding_attention", "full_attention", "linear_attention", "linear_attention"]
    prompt, greedy = ids()[:, :12], dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    recomputed = student.generate(prompt, use_cache=False, **greedy)
    for implementation in ("dynamic", "static"):
        out = student.generate(prompt, use_cache=True, cache_implementation=implementation, return_dict_in_generate=True, **greedy)
        assert torch.equal(out.sequences, recomputed), implementation
    sliding, full = out.past_key_values.layers[:2]  # static: preallocated, the window's rows only
    assert sliding.keys.shape[-2] == WINDOW < full.keys.shape[-2]
    cache = student.generate(prompt, use_cache=True, return_dict_in_generate=True, **greedy).past_key_values
    assert cache.layers[0].keys.shape[-2] < WINDOW and cache.layers[1].keys.shape[-2] == 12 + 10 - 1
    from cald_scale.generation.graphs import graph_unsupported

    assert "sliding-window attention layer rolls its preallocated cache" in graph_unsupported(student)


def test_a_window_past_the_last_position_is_kept_as_full_attention():
    """Phi-3-128k sets a window of 262144 over 131072 positions: never reached, so a kept layer is
    full attention (a plain KV cache, CUDA-graph decode allowed), not a sliding one."""
    from cald_scale.generation.graphs import graph_unsupported

    config = AutoConfig.for_model("phi3", **{**_COMMON, "sliding_window": 512})  # max_position_embeddings 256
    torch.manual_seed(0)
    student = convert_teacher(AutoModelForCausalLM.from_config(config).eval(), ConversionConfig(attention_layers=[1])).eval()
    assert student.config.layer_types == ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    assert graph_unsupported(student) is None
    assert type(student.new_cache(64).layers[1]).__name__ == "StaticLayer"


@pytest.mark.parametrize("model_type", ["stablelm", "nemotron", "llama"])
@pytest.mark.parametrize("mixer", ["mamba2", "mamba"])
def test_left_padding_reaches_the_mixers_whether_or_not_the_layer_hands_on_keywords(model_type, mixer):
    """StableLM's and Nemotron's decoder layers call their attention with named arguments only, so
    the padding mask given as a keyword never reached their mixers: pads leaked into the state.
    A left-padded prompt must give the logits and the greedy tokens of the same prompt alone."""
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **_COMMON)).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = convert_teacher(teacher, ConversionConfig(mixer=mixer)).eval()
    prompt = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.full((1, 5), 7), prompt], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(student(padded, attention_mask=mask).logits[:, 5:], student(prompt).logits, rtol=1e-5, atol=1e-5)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = student.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)[:, 10:]
    assert torch.equal(student.generate(padded, attention_mask=mask, **greedy)[:, 15:], alone)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_under_the_same_padding(use_reentrant):
    """StableLM's layers drop the padding keyword, so its mixers read the mask from the forward's
    context; HF gradient checkpointing recomputes outside it. Non-reentrant it then failed
    (another number of saved tensors), reentrant it trained on gradients 24 off."""
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("stablelm", **_COMMON)).eval()
    student = with_memory(convert_teacher(teacher, ConversionConfig(mixer="mamba2"))).train()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 7, 0
    labels = ids.masked_fill(mask == 0, -100)

    def gradients(checkpointed: bool) -> torch.Tensor:
        student.zero_grad()
        if checkpointed:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:
            student.gradient_checkpointing_disable()
        student(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    plain = gradients(False)
    torch.testing.assert_close(gradients(True), plain, rtol=1e-5, atol=1e-6 * plain.abs().max().item())


@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_conversion_copies_every_non_attention_tensor(model_type):
    teacher = tiny(model_type)
    adapter = get_adapter(teacher.config)
    student = convert_teacher(teacher, ConversionConfig())
    slots = attention_prefixes(teacher, adapter)
    assert len(slots) == teacher.config.num_hidden_layers

    t_state, s_state = teacher.state_dict(), student.backbone.state_dict()
    copied = [k for k in t_state if not k.startswith(slots)]
    for key in copied:
        assert torch.equal(t_state[key], s_state[key]), key
    # Nothing else survives: the student adds only mixers in the attention slots.
    assert {k for k in s_state if not k.startswith(slots)} == set(copied)
    assert all(".mixer." in k for k in s_state if k.startswith(slots))
    assert all(isinstance(adapter.attention(layer), MixerAsAttention) for layer in adapter.layers(student.backbone))
    if model_type in ("qwen3", "olmo2"):  # q/k norms are attention weights: dropped with it
        assert any(".self_attn.q_norm." in k for k in t_state) and not any("q_norm" in k for k in s_state)

    with torch.no_grad():
        logits = student(ids()).logits
    assert logits.shape == (2, SEQ, teacher.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", ["phi", "gptj", "lfm2", "gpt2", "xglm", "opt", "gpt_bigcode", "falcon", "falcon-grouped", "persimmon"])
def test_discovered_layouts_generate_with_the_cache_and_round_trip(model_type, tmp_path):
    """The layouts whose output projection is ``dense`` (Phi) or ``out_proj`` (GPT-J, LFM2,
    XGLM, OPT), and GPT-2's Conv1D: a hybrid student generates with the recurrent cache what it
    generates recomputing, a left-padded row what its prompt alone does (an absolute position
    table numbers it from its first real token), and saves and reloads (GPT-J's config keeps
    hidden_size as n_embd)."""
    teacher = tiny(model_type)
    student = convert_teacher(teacher, ConversionConfig(attention_layers=[1])).eval()
    assert student.config.hidden_size == teacher.config.hidden_size == 64
    prompt, greedy = ids()[:, :9], dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = student.generate(prompt, use_cache=True, **greedy)
    assert torch.equal(cached, student.generate(prompt, use_cache=False, **greedy))
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    scored = dict(greedy, output_scores=True, return_dict_in_generate=True)
    padded = student.generate(prompt.masked_fill(mask == 0, 0), attention_mask=mask, **scored)
    alone = student.generate(prompt[:1, 4:], **scored)
    assert torch.equal(padded.sequences[0, 4:], alone.sequences[0])
    for step in (0, -1):  # the logits, not only the tokens (a tiny random model may repeat one)
        torch.testing.assert_close(padded.scores[step][0], alone.scores[step][0], rtol=1e-4, atol=1e-4)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, student(prompt).logits)


def test_fused_qkv_is_read_as_q_k_v_rows():
    teacher = tiny("phi3")
    adapter = get_adapter(teacher.config)
    assert adapter.read_attention is read_fused_qkv
    attn = adapter.attention(adapter.layers(teacher)[1])
    weights = adapter.read_attention(attn, teacher.config)
    q_rows, kv_rows = 4 * 16, 2 * 16
    fused = attn.qkv_proj.weight
    assert torch.equal(weights.q, fused[:q_rows])
    assert torch.equal(weights.k, fused[q_rows : q_rows + kv_rows])
    assert torch.equal(weights.v, fused[q_rows + kv_rows :])
    assert torch.equal(weights.o, attn.o_proj.weight)
    # The same from a checkpoint, one tensor at a time.
    prefix = attention_prefixes(teacher, adapter)[1]
    from_file = adapter.read_attention(TensorTree(StateDictReader(teacher.state_dict()), prefix), teacher.config)
    assert torch.equal(from_file.k, weights.k)


def test_gpt2_conv1d_projections_are_read_in_linear_layout():
    """GPT-2's Conv1D computes x @ W + b with W (in, out): read as nn.Linear's (out, in), the
    projections give what c_attn and c_proj give (o is square, so only values can tell)."""
    teacher = tiny("gpt2")
    adapter = get_adapter(teacher.config)
    attn = adapter.attention(adapter.layers(teacher)[1])
    weights = adapter.read_attention(attn, teacher.config)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    q, k, v = attn.c_attn(x).split(64, dim=-1)
    for got, (w, b) in zip((q, k, v), ((weights.q, weights.q_bias), (weights.k, weights.k_bias), (weights.v, weights.v_bias))):
        assert torch.allclose(got, nn.functional.linear(x, w, b), atol=1e-6)
    assert torch.allclose(attn.c_proj(x), nn.functional.linear(x, weights.o, weights.o_bias), atol=1e-6)
    prefix = attention_prefixes(teacher, adapter)[1]
    from_file = adapter.read_attention(TensorTree(StateDictReader(teacher.state_dict()), prefix), teacher.config)
    assert torch.equal(from_file.o, weights.o) and torch.equal(from_file.v, weights.v)


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
def test_gpt_bigcode_c_attn_is_read_as_its_attention_splits_it(multi_query):
    """GPTBigCode's Linear c_attn is [q | k | v] with one K/V head (StarCoder), but [q_h, k_h, v_h]
    head by head without multi_query: the same sizes, so only values can tell the layouts apart."""
    config = AutoConfig.for_model("gpt_bigcode", **{**_COMMON, "multi_query": multi_query, "num_key_value_heads": 1 if multi_query else 4})
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    adapter = get_adapter(config)
    attn = adapter.attention(adapter.layers(teacher)[0])
    weights = adapter.read_attention(attn, config)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    fused = attn.c_attn(x)
    if multi_query:
        q, k, v = fused.split((64, 16, 16), dim=-1)
    else:
        q, k, v = (t.reshape(3, 64) for t in fused.view(3, 4, 48).split(16, dim=-1))
    for got, (w, b) in zip((q, k, v), ((weights.q, weights.q_bias), (weights.k, weights.k_bias), (weights.v, weights.v_bias))):
        torch.testing.assert_close(got, nn.functional.linear(x, w, b))


# query_key_value orders: (model type, config fields, K/V heads); 4 query heads of 16.
QKV_ORDERS = {
    "falcon-multi-query": ("falcon", {"multi_query": True, "bias": True}, 1),  # [q | k | v], one K/V head
    "falcon-grouped": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "bias": True}, 2),  # per group: 2 q, k, v
    "falcon-per-head": ("falcon", {"multi_query": False, "bias": True}, 4),  # q_h, k_h, v_h
    "gpt_neox": ("gpt_neox", {}, 4),  # q_h, k_h, v_h, with biases
    "persimmon": ("persimmon", {}, 4),
}


@pytest.mark.parametrize("case", sorted(QKV_ORDERS))
def test_query_key_value_is_read_in_the_order_its_attention_splits_it(case):
    """GPT-NeoX's, Falcon's and Persimmon's query_key_value: [q | k | v] with one K/V head, K/V
    groups, or head by head. Head by head has the size [q | k | v] would have with as many K/V
    heads: only values tell them apart. The reader's rows and biases give what the modeling code's
    split gives, also read from a checkpoint. (Configs as published: no num_key_value_heads given.)"""
    model_type, fields, kv = QKV_ORDERS[case]
    torch.manual_seed(0)
    common = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **common, **fields)).eval()
    adapter, config = get_adapter(teacher.config), teacher.config
    attn = adapter.attention(adapter.layers(teacher)[1])
    weights = adapter.read_attention(attn, config)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    fused = attn.query_key_value(x)
    if kv == 4:  # per head: q_h, k_h, v_h
        q, k, v = (t.reshape(3, 64) for t in fused.view(3, 4, 3, 16).unbind(2))
    else:  # per K/V group: its 4 // kv queries, its key, its value
        grouped = fused.view(3, kv, 4 // kv + 2, 16)
        q, k, v = grouped[:, :, :-2].reshape(3, 64), grouped[:, :, -2].reshape(3, 16 * kv), grouped[:, :, -1].reshape(3, 16 * kv)
    for got, (w, b) in zip((q, k, v), ((weights.q, weights.q_bias), (weights.k, weights.k_bias), (weights.v, weights.v_bias))):
        torch.testing.assert_close(got, nn.functional.linear(x, w, b))
    assert (weights.q_bias is not None) == (attn.query_key_value.bias is not None)
    assert weights.o is attn.dense.weight
    prefix = attention_prefixes(teacher, adapter)[1]
    from_file = adapter.read_attention(TensorTree(StateDictReader(teacher.state_dict()), prefix), config)
    assert torch.equal(from_file.q, weights.q) and torch.equal(from_file.v, weights.v)


def test_a_reader_that_splits_a_fused_projection_in_another_order_is_refused():
    """Head by head and [q | k | v] have the same size when every head has its own K/V: the
    tiny-copy check compares the reader's value and output rows with what the attention computes
    over one token, so a reader of the wrong order is refused instead of starting every mixer
    from the wrong rows (helper-100)."""
    import dataclasses

    from cald_scale.conversion import families
    from cald_scale.conversion.discovery import check_block_by_block, discover_adapter

    config = AutoConfig.for_model("gpt_neox", **{k: v for k, v in _COMMON.items() if k != "num_key_value_heads"})
    right = discover_adapter(config, [])
    assert check_block_by_block(config, right, []) == right
    as_q_k_v = dataclasses.replace(right, read_attention=lambda attn, c: families._read_fused(attn, c, "query_key_value", "dense"))
    with pytest.raises(ValueError, match=r"'gpt_neox': its attention projections are not read as its forward uses them \(on one token"):
        check_block_by_block(config, as_q_k_v, [])


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "persimmon", "cohere", "olmo2"])
def test_a_reader_that_swaps_q_and_k_or_reorders_their_heads_is_refused(model_type):
    """Over one token at position 0 rotary is the identity, so the query and key states the
    attention hands its kernel are its Q and K rows applied to the input (through its q/k norms:
    Qwen3's RMSNorm, Persimmon's LayerNorm): a reader that swaps Q and K, or reads Q's heads in
    another order, is refused instead of starting every mixer from the wrong rows. The V/O
    check alone passed both."""
    import dataclasses

    from cald_scale.conversion.discovery import check_block_by_block, discover_adapter

    extra = {"persimmon": {"qk_layernorm": True}, "cohere": {"use_qk_norm": True}}.get(model_type, {})
    config = AutoConfig.for_model(model_type, **{**_COMMON, "num_key_value_heads": _COMMON["num_attention_heads"], **extra})
    right = discover_adapter(config, [])
    assert check_block_by_block(config, right, []) == right and (model_type == "llama" or right.attention_extras)

    def swapped(attn, c):
        w = right.read_attention(attn, c)
        return dataclasses.replace(w, q=w.k, k=w.q, q_bias=w.k_bias, k_bias=w.q_bias)

    def heads_reordered(attn, c):
        w = right.read_attention(attn, c)
        heads = w.q.unflatten(0, (c.num_attention_heads, -1))
        return dataclasses.replace(w, q=heads.roll(1, 0).flatten(0, 1), q_bias=None if w.q_bias is None else w.q_bias.unflatten(0, (c.num_attention_heads, -1)).roll(1, 0).flatten())

    for wrong, name in ((swapped, "query"), (heads_reordered, "query")):
        with pytest.raises(ValueError, match=rf"{model_type}'?: its attention projections are not read as its forward uses them \(on one token, a {name} head's rows read point elsewhere"):
            check_block_by_block(config, dataclasses.replace(right, read_attention=wrong), [])
    # The recording kernel stays registered with transformers, but refuses to run for anyone else.
    from transformers import AutoModelForCausalLM

    tiny = AutoModelForCausalLM.from_config(config, attn_implementation="cald_scale_capture")
    with pytest.raises(RuntimeError, match="recording kernel for its conversion checks, not an attention implementation"):
        tiny(input_ids=torch.tensor([[5, 6]]))


def test_published_falcon_geometries_are_checked_on_their_tiny_copies(caplog):
    """Falcon-7B (71 heads of 64, one K/V head) and Falcon-40B (128 heads, 8 K/V groups): their
    tiny copies keep one K/V head and K/V groups, with Falcon's own num_kv_heads and its derived
    head_dim, so the block-by-block check runs instead of being skipped with a warning."""
    import logging

    falcon_7b = AutoConfig.for_model("falcon", hidden_size=4544, num_attention_heads=71, num_hidden_layers=32, multi_query=True, parallel_attn=True)
    falcon_40b = AutoConfig.for_model(
        "falcon", hidden_size=8192, num_attention_heads=128, num_kv_heads=8, num_hidden_layers=60, new_decoder_architecture=True,
    )
    with caplog.at_level(logging.WARNING, logger="cald_scale.conversion.discovery"):
        for config in (falcon_7b, falcon_40b):
            assert get_adapter(config).attention_attr == "self_attention"
    assert "could not check" not in caplog.text


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_encoder_adapter_reads_qkv_and_leaves_o_outside(model_type):
    torch.manual_seed(0)
    common = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}
    config = AutoConfig.for_model(model_type, **common)
    model = AutoModelForMaskedLM.from_config(config)
    adapter = get_adapter(config)
    assert (adapter.layers_attr, adapter.attention_attr, adapter.final_norm_attr) == ("encoder.layer", "attention.self", None)
    base = getattr(model, model_type)
    assert adapter.layers(model) is base.encoder.layer and adapter.final_norm(model) is None
    state = StateDictReader(model.state_dict())
    for i, layer in enumerate(adapter.layers(model)):
        slot = adapter.attention(layer)
        assert slot is layer.attention.self
        for read in (adapter.read_attention(slot, config), adapter.read_attention(TensorTree(state, f"{model_type}.encoder.layer.{i}.attention.self."), config)):
            for name in ("query", "key", "value"):
                tensor = getattr(slot, name)
                assert torch.equal(getattr(read, name[0]), tensor.weight) and torch.equal(getattr(read, f"{name[0]}_bias"), tensor.bias)
            assert read.o is None and read.o_bias is None  # O stays in attention.output.dense
    assert attention_prefixes(model, adapter)[1] == f"{model_type}.encoder.layer.1.attention.self."


# -- refusals ---------------------------------------------------------------------------------
class _NoQKVConfig(PretrainedConfig):
    model_type = "cald_test_no_qkv"

    def __init__(self, vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        super().__init__(**kwargs)


class _NoQKVBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_mix = nn.Linear(config.hidden_size, config.hidden_size)  # no q/k/v anywhere
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 32), nn.Linear(32, config.hidden_size))


class _NoQKVForCausalLM(PreTrainedModel):
    config_class = _NoQKVConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(_NoQKVBlock(config) for _ in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()


AutoConfig.register(_NoQKVConfig.model_type, _NoQKVConfig, exist_ok=True)
AutoModelForCausalLM.register(_NoQKVConfig, _NoQKVForCausalLM, exist_ok=True)


class _UnreadableWeights:
    """A checkpoint that fails the test if conversion touches it."""

    def keys(self):
        raise AssertionError("weights were read before the family was refused")

    shape = get = keys


def test_unconvertible_layout_is_refused_before_weights_are_read():
    with pytest.raises(ValueError) as err:
        build_student(_NoQKVConfig(), _UnreadableWeights(), ConversionConfig())
    message = str(err.value)
    assert "\n" not in message
    assert "'cald_test_no_qkv'" in message
    assert "no attention module with q/k/v projections found in layer 0; found children [token_mix, mlp (0, 1)]" in message
    assert "hand-written: llama, mistral, qwen2" in message


def test_real_families_with_other_layouts_are_refused_by_name():
    # ALiBi: the view builds no position bias (Bloom hands it to every block, Falcon-RW adds it to the mask).
    for alibi in ("bloom", AutoConfig.for_model("falcon", **{**_COMMON, "alibi": True, "multi_query": False})):
        with pytest.raises(ValueError, match=r"'(bloom|falcon)': its attention takes an ALiBi position bias, which the layerwise view") as err:
            get_adapter(alibi)
        assert "hand-written" not in str(err.value)  # no adapter would help
    # GPT-NeoX-Japanese's attention returns its output projection's bias too, which no mixer gives.
    with pytest.raises(ValueError, match=r"'gpt_neox_japanese': its attention \(GPTNeoXJapaneseAttention\) returns 3 values to its block"):
        get_adapter(AutoConfig.for_model("gpt_neox_japanese", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128))
    with pytest.raises(ValueError, match=r"'t5': several \(encoder.block, decoder.block\) nn.ModuleList"):
        get_adapter("t5")
    with pytest.raises(ValueError, match="'no_such_family'.*transformers has no config"):
        get_adapter("no_such_family")
    # LFM2 as released: short convolutions first, attention in some later layers.
    lfm2 = AutoConfig.for_model("lfm2", **{**_COMMON, "layer_types": ["conv", "full_attention", "conv", "full_attention"]})
    with pytest.raises(ValueError, match=r"'lfm2': layer 1 has attention at \[self_attn\] but layer 0 has none \(a hybrid or mixed-block family\)"):
        get_adapter(lfm2)


@pytest.mark.parametrize("model_type,why", [("bert", "'BertModel' object has no attribute 'rotary_emb'"), ("openai-gpt", "unexpected keyword argument 'position_ids'")])
def test_a_family_the_layerwise_view_cannot_run_is_refused_at_discovery(model_type, why):
    """BERT as a decoder has neither rotary nor a position table the view finds, and GPT-1's
    blocks take no position_ids: refused by name when the adapter is asked for, where such a
    family was once taken with a warning and failed in the first training step."""
    common = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}
    config = AutoConfig.for_model(model_type, **common, **({"is_decoder": True} if model_type == "bert" else {}))
    with pytest.raises(ValueError, match=rf"^cannot convert model type '{model_type}': its blocks cannot be run one at a time by the layerwise view .*{why}") as err:
        get_adapter(config)
    assert "\n" not in str(err.value)


def test_a_config_whose_forward_does_more_is_refused_where_its_family_converts():
    """OPT-350m projects its embeddings in and its last hidden state out (word_embed_proj_dim),
    and is post-LN: the view runs neither projection, so that config is refused by the tiny copy's
    check while the other OPT sizes convert (the check is per config, not per family)."""
    # As published: every OPT config.json stores word_embed_proj_dim, equal to the width but in opt-350m.
    opt_125m = AutoConfig.for_model("opt", hidden_size=768, word_embed_proj_dim=768, ffn_dim=3072, num_attention_heads=12, num_hidden_layers=12)
    assert get_adapter(opt_125m).final_norm_attr == "decoder.final_layer_norm"
    opt_350m = AutoConfig.for_model(
        "opt", hidden_size=1024, word_embed_proj_dim=512, ffn_dim=4096, num_attention_heads=16, num_hidden_layers=24, do_layer_norm_before=False,
    )
    with pytest.raises(ValueError, match=r"^cannot convert model type 'opt': its blocks cannot be run one at a time .*hidden_size 1024->64.* tensor a \(512\)"):
        get_adapter(opt_350m)


def test_a_student_with_its_teachers_position_table_takes_no_longer_context():
    """A mixers-only student has no context limit, unless it adds its teacher's table of absolute
    positions (GPT-2's wpe): then it is refused past them by name, as the teacher is."""
    from cald_scale.generation.context import check_context, max_context

    gpt2 = convert_teacher(tiny("gpt2"), ConversionConfig())
    llama = convert_teacher(tiny("llama"), ConversionConfig())
    assert max_context(llama) is None and max_context(gpt2) == _COMMON["max_position_embeddings"] == 256
    assert max_context(convert_teacher(tiny("xglm"), ConversionConfig())) is None  # its sinusoidal table has no last row
    check_context(gpt2, 256)
    with pytest.raises(ValueError, match=r"257 tokens exceeds the student's max_position_embeddings \(256\): its position table has that many rows"):
        check_context(gpt2, 257, "the student")


class _CountingReader:
    """A weight reader that records the keys it reads."""

    def __init__(self, reader, reads: list):
        self._reader, self._reads = reader, reads

    def keys(self):
        return self._reader.keys()

    def shape(self, key):
        return self._reader.shape(key)

    def get(self, key):
        self._reads.append(key)
        return self._reader.get(key)


MOES = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # w1/w3 -> gate_up_proj, renamed block_sparse_moe -> mlp
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}


@pytest.mark.parametrize("model_type", sorted(MOES))
def test_a_moe_checkpoint_with_a_tensor_per_expert_loads_as_from_pretrained_loads_it(model_type, tmp_path):
    """A MoE checkpoint keeps one tensor per expert (as published, and as save_pretrained writes
    it), which transformers stacks into one at load (gate and up concatenated). Read tensor by
    tensor, a fused tensor is built from its layer's experts alone, in expert order: the teacher
    equals from_pretrained's, tensor for tensor, and its student converts every layer."""
    from cald_scale.conversion.teacher import TeacherSource, build_teacher
    from cald_scale.conversion.weights import RenamedReader, open_weights

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**_COMMON, **MOES[model_type], "num_hidden_layers": 2})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reader = RenamedReader(open_weights(tmp_path), reference)
    fused = [k for k in reference.state_dict() if k.endswith("experts.gate_up_proj")]
    assert len(fused) == 2 and reader.shape(fused[1]) == tuple(reference.state_dict()[fused[1]].shape) == (4, 2 * config.moe_intermediate_size if model_type == "qwen2_moe" else 2 * 96, 64)
    # Stacked and joined one expert at a time into the tensor they make (not transformers' stack, then join).
    assert reader._stack_plan(*reader._to_checkpoint[fused[0]]) is not None
    # A range of the flattened tensor (a ZeRO-3 rank's partition) reads only the experts it covers.
    reads = []
    counting = RenamedReader(_CountingReader(open_weights(tmp_path), reads), reference)
    for key in [k for k in reference.state_dict() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        whole = reference.state_dict()[key].reshape(-1)
        per_expert = whole.numel() // 4
        for start, stop in ((0, whole.numel()), (per_expert - 5, per_expert + 7), (2 * per_expert + 3, 2 * per_expert + 4), (whole.numel() - 9, whole.numel())):
            reads.clear()
            assert torch.equal(counting.get_flat(key, start, stop), whole[start:stop]), (key, start, stop)
            experts = range(start // per_expert, -(-stop // per_expert))
            assert len(reads) == len(experts) * (2 if key.endswith("gate_up_proj") else 1), (key, start, stop, reads)
    teacher = build_teacher(TeacherSource(name=str(tmp_path), kind="folder", folder=tmp_path, config=reference.config, dtype=torch.float32))
    for key, value in reference.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(LayerwiseModel(teacher).logits(ids()), reference(ids()).logits, rtol=1e-5, atol=1e-5)
    student = build_student(reference.config, open_weights(tmp_path), ConversionConfig())
    assert all(isinstance(get_adapter(config).attention(layer), MixerAsAttention) for layer in get_adapter(config).layers(student.backbone))
    assert torch.equal(student.backbone.state_dict()[fused[0]], reference.state_dict()[fused[0]])
    student.eval().save_pretrained(tmp_path / "student")  # and back, as generate and evaluate load it
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()(ids()).logits, student(ids()).logits)


def test_families_discovery_cannot_take_are_refused_in_one_line_before_any_weight_is_read():
    """A config of per-layer geometry (gemma4_text), which raised transformers' own error as a traceback."""
    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    # Sarvam-MoE's checkpoint fuses q/k/v, which transformers splits at load by the model's own sizes.
    with pytest.raises(ValueError, match=r"'sarvam_moe': its checkpoints keep tensors that transformers converts at load \(\['query_key_value'\] -> \['q_proj', 'k_proj', 'v_proj'\] by Split\)"):
        get_adapter(AutoConfig.for_model("sarvam_moe", **small))
    with pytest.raises(ValueError, match=r"'gemma4_text': its config does not describe one decoder stack \(AmbiguousGlobalPerLayerAttributeError"):
        get_adapter(AutoConfig.for_model("gemma4_text", **small))


def test_supported_families_names_adapters_and_discovery():
    get_adapter(tiny("qwen3").config)
    text = supported_families()
    assert "hand-written adapters for llama, mistral, qwen2" in text
    assert "any other family is discovered" in text and "qwen3" in text
    assert get_adapter(tiny("qwen3").config) is get_adapter(tiny("qwen3", seed=1).config)  # cached per model type and config
    assert get_adapter("qwen3") == get_adapter(tiny("qwen3").config)
    assert get_adapter("llama").bamba is not None and get_adapter("qwen3").bamba is None


def test_a_family_whose_forward_does_more_than_its_blocks_is_refused():
    """Doge's forward gives other logits than its embedding, blocks, norm and head run one after
    the other: its layer targets would be wrong, so discovery refuses it (checked on a tiny copy)."""
    config = AutoConfig.for_model("doge", **_COMMON)
    with pytest.raises(ValueError, match=r"cannot convert model type 'doge': its forward does more than its embedding, blocks"):
        get_adapter(config)
    granite = AutoConfig.for_model("granite", **_COMMON, **DECODERS["granite"])
    assert (get_adapter(granite).embed_multiplier, get_adapter(granite).logit_multiplier) == (3.0, 0.25)
    hyperclovax = AutoConfig.for_model("hyperclovax", **_COMMON, **DECODERS["hyperclovax"])
    assert (get_adapter(hyperclovax).embed_multiplier, get_adapter(hyperclovax).logit_multiplier) == (4.0, 0.5)


def test_the_block_by_block_check_holds_where_model_construction_is_patched():
    """transformers' from_pretrained under DeepSpeed ZeRO-3 builds a model inside no_init_weights
    (and a skeleton may be built on the meta device): the check's tiny copy draws its own
    weights, where it once ran on uninitialised memory, got NaN logits and refused the family."""
    from transformers.initialization import no_init_weights

    config = AutoConfig.for_model("stablelm", **{**_COMMON, "hidden_size": 48, "num_key_value_heads": 4})  # not cached yet
    with torch.device("meta"), no_init_weights():
        adapter = get_adapter(config)
    assert adapter.model_type == "stablelm"


def test_a_sliding_window_family_is_checked_when_first_seen_by_from_pretrained(caplog, tmp_path):
    """Gemma2's forward made its sliding-window cache on the meta device of from_pretrained, so
    a student loaded there skipped the check with a warning; the family without sdpa also
    loads under the default kernel (sdpa asked: eager run)."""
    import logging

    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **{**_COMMON, **DECODERS["gemma2"], "hidden_size": 80, "head_dim": 20}))
    convert_teacher(teacher, ConversionConfig(attention_layers=[0])).save_pretrained(tmp_path)
    from cald_scale.conversion.registry import _DISCOVERED

    _DISCOVERED.clear()  # first seen by from_pretrained
    with caplog.at_level(logging.WARNING, logger="cald_scale.conversion.discovery"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "could not check" not in caplog.text
    assert loaded.config._attn_implementation == "eager"


def test_a_conversion_says_when_an_attention_holds_more_than_its_projections(caplog, tmp_path):
    """Qwen3 normalises q and k per head (q_norm, k_norm): the init maps the projections alone,
    which the conversion says; loading the converted student (generate, evaluate) does not."""
    import logging

    from transformers import LlamaConfig, Qwen3Config

    from cald_scale.conversion.discovery import discover_adapter

    geometry = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=100, head_dim=16)
    assert discover_adapter(LlamaConfig(**geometry), []).attention_extras == ()
    assert discover_adapter(Qwen3Config(**geometry), []).attention_extras == ("q_norm", "k_norm")
    with caplog.at_level(logging.WARNING, logger="cald_scale.conversion"):
        student = convert_teacher(tiny("qwen3"), ConversionConfig())
        assert "qwen3's attention has weights besides its projections (q_norm, k_norm)" in caplog.text
        caplog.clear()
        convert_teacher(tiny("qwen3"), ConversionConfig(attention_init=False))
        student.save_pretrained(tmp_path)
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "besides its projections" not in caplog.text


@pytest.mark.parametrize("model_type", ["gpt2", "xglm", "biogpt", "opt"])
def test_block_by_block_training_drops_out_what_the_forward_does(model_type):
    """In training mode too, the view computes the family's forward: GPT-2's embedding dropout is
    a module; XGLM's and BioGPT's a call in their forward, at their blocks' owner's rate, which the
    view makes the same way; OPT holds such a rate and never uses it. Same seed, same masks: the
    same logits (the view once skipped XGLM's and BioGPT's, and warned for OPT)."""
    from cald_scale.conversion.discovery import discover_adapter

    fields = {**_COMMON, "num_key_value_heads": 4, "dropout": 0.3, "attention_dropout": 0.0, "activation_dropout": 0.0}
    if model_type == "gpt2":
        fields.update(embd_pdrop=0.3, resid_pdrop=0.0, attn_pdrop=0.0)
    if model_type == "biogpt":
        fields.update(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.0, scale_embedding=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields)).train()
    adapter = get_adapter(model.config)
    expected = {"gpt2": 0.0, "xglm": 0.3, "biogpt": 0.3, "opt": 0.0}[model_type]
    assert adapter.embed_dropout_outside == expected
    if model_type == "opt":  # the rate is there, as discovery alone sees it: the tiny copy's forward says it is unused
        assert discover_adapter(model.config, []).embed_dropout_outside == 0.3
        # ...also when the forward draws for other reasons in training (LayerDrop; helper-101)
        assert get_adapter(AutoConfig.for_model("opt", **fields, layerdrop=0.5)).embed_dropout_outside == 0.0
    torch.manual_seed(5)
    forward = model(ids(), use_cache=False).logits
    torch.manual_seed(5)
    view = LayerwiseModel(model).logits(ids())
    torch.testing.assert_close(view, forward, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the dropout draws: not the eval logits
        assert not torch.allclose(forward, model.eval()(ids()).logits, atol=1e-3)


@pytest.mark.parametrize("rotary", [1.0, 0.75], ids=["full", "partial"])
def test_the_block_by_block_check_runs_on_a_long_context_phi3_config(caplog, rotary):
    """Phi-3-128k's longrope factors are one per rotary frequency of its 96-wide heads: the tiny
    copy's narrower heads take their first ones (the check was skipped, with a warning, on the
    copy's shape error). That it runs shows in what it catches: a wrong logit scale is refused."""
    import dataclasses
    import logging

    from transformers import Phi3Config

    from cald_scale.conversion.discovery import check_block_by_block

    half = int(96 * rotary) // 2
    config = Phi3Config(
        hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192, num_hidden_layers=32,
        vocab_size=32064, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 32.0, "partial_rotary_factor": rotary,
                         "long_factor": [1.0 + 0.1 * i for i in range(half)], "short_factor": [1.0] * half},
    )
    adapter = get_adapter("phi3")
    with caplog.at_level(logging.WARNING, logger="cald_scale.conversion.discovery"):
        assert check_block_by_block(config, adapter, []) is adapter
        with pytest.raises(ValueError, match="its forward does more than its embedding, blocks"):
            check_block_by_block(config, dataclasses.replace(adapter, logit_multiplier=2.0), [])
    assert "could not check" not in caplog.text
    assert len(config.rope_parameters["long_factor"]) == half  # the teacher's own config is untouched
