"""Attention readers for the common projection layouts, and the hand-written family adapters.

Most families are discovered (``discovery.py``) and read with one of the readers here.
Hand-written adapters remain for llama, mistral and qwen2, which carry their Bamba
export layouts.
"""

from __future__ import annotations

from torch import nn

from .modeling import teacher_geometry
from .registry import AttentionWeights, BambaLayout, FamilyAdapter, register_family

__all__ = ["read_separate_qkvo", "read_separate_qkv_out_proj", "read_separate_qkv_dense", "read_fused_qkv", "read_gpt2_conv1d", "read_c_attn_linear", "read_query_key_value", "read_query_key_value_dense"]


def _read_separate(attn: nn.Module, out: str) -> AttentionWeights:
    o = getattr(attn, out)
    return AttentionWeights(
        q=attn.q_proj.weight,
        k=attn.k_proj.weight,
        v=attn.v_proj.weight,
        o=o.weight,
        q_bias=attn.q_proj.bias,
        k_bias=attn.k_proj.bias,
        v_bias=attn.v_proj.bias,
        o_bias=o.bias,
    )


def read_separate_qkvo(attn: nn.Module, config) -> AttentionWeights:
    """``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` (Llama and most decoders)."""
    return _read_separate(attn, "o_proj")


def read_separate_qkv_out_proj(attn: nn.Module, config) -> AttentionWeights:
    """``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` (LFM2; the BART-style attention of
    OPT, XGLM and of wav2vec2, HuBERT and Whisper's encoders)."""
    return _read_separate(attn, "out_proj")


def read_separate_qkv_dense(attn: nn.Module, config) -> AttentionWeights:
    """``q_proj``, ``k_proj``, ``v_proj`` and ``dense`` (Phi-1, Phi-1.5 and Phi-2)."""
    return _read_separate(attn, "dense")


def _read_fused(attn: nn.Module, config, fused: str, out: str, *, conv1d: bool = False) -> AttentionWeights:
    """One fused projection whose outputs are ``[q | k | v]`` (all heads of each in turn) and an
    output projection; ``conv1d``: transformers' ``Conv1D`` layers (GPT-2), whose weights are
    (in, out), transposed to the (out, in) of ``nn.Linear``."""
    _, heads, kv_heads, head_dim = teacher_geometry(config)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv, o = getattr(attn, fused), getattr(attn, out)
    weight, o_weight = (qkv.weight.t(), o.weight.t()) if conv1d else (qkv.weight, o.weight)
    q, k, v = weight.split(sizes)
    qb, kb, vb = qkv.bias.split(sizes) if qkv.bias is not None else (None, None, None)
    return AttentionWeights(q=q, k=k, v=v, o=o_weight, q_bias=qb, k_bias=kb, v_bias=vb, o_bias=o.bias)


def read_fused_qkv(attn: nn.Module, config) -> AttentionWeights:
    """One ``qkv_proj`` whose rows are ``[q | k | v]``, and ``o_proj`` (Phi-3)."""
    return _read_fused(attn, config, "qkv_proj", "o_proj")


def read_gpt2_conv1d(attn: nn.Module, config) -> AttentionWeights:
    """GPT-2's ``c_attn`` ([q | k | v] columns) and ``c_proj``, ``Conv1D`` layers."""
    return _read_fused(attn, config, "c_attn", "c_proj", conv1d=True)


def read_c_attn_linear(attn: nn.Module, config) -> AttentionWeights:
    """``c_attn`` and ``c_proj`` as ``nn.Linear`` (GPTBigCode: StarCoder, SantaCoder): rows
    ``[q | k | v]`` with one K/V head (``multi_query``), else ``[q_h, k_h, v_h]`` head by head,
    the grouped order's one group and one group per head (``_read_grouped``)."""
    return _read_grouped(attn.c_attn, attn.c_proj, config)


def read_query_key_value(attn: nn.Module, config) -> AttentionWeights:
    """BERT's ``query``, ``key`` and ``value``; O is ``attention.output.dense``, outside the slot (o=None)."""
    return AttentionWeights(
        q=attn.query.weight,
        k=attn.key.weight,
        v=attn.value.weight,
        o=None,
        q_bias=attn.query.bias,
        k_bias=attn.key.bias,
        v_bias=attn.value.bias,
    )


def read_query_key_value_dense(attn: nn.Module, config) -> AttentionWeights:
    """``query_key_value`` and ``dense`` (GPT-NeoX, Falcon, Persimmon), in the grouped order
    (``_read_grouped``): Falcon-40B, -180B and Falcon2 have a few groups; Falcon-7B's
    multi_query one; GPT-NeoX, Persimmon and Falcon without multi_query one per head.
    NOTE: a family with these names but plain ``[q | k | v]`` rows and as many K/V heads as query
    heads would be read in the wrong order: discovery's tiny-copy check refuses it (none in
    transformers 5.25 is; tests/unit/test_families.py)."""
    return _read_grouped(attn.query_key_value, attn.dense, config)


def _read_grouped(qkv: nn.Module, out: nn.Module, config) -> AttentionWeights:
    """A fused projection whose rows are, for each K/V group g, ``[q_g1 .. q_gn, k_g, v_g]``:
    query head h is in group h // n, as grouped-query attention repeats K/V. One group is
    ``[q | k | v]`` with one K/V head; one group per head is ``[q_h, k_h, v_h]`` head by head.
    The config's K/V head count says which."""
    _, heads, kv_heads, head_dim = teacher_geometry(config)
    w = qkv.weight.view(kv_heads, heads // kv_heads + 2, head_dim, -1)
    b = qkv.bias.view(kv_heads, heads // kv_heads + 2, head_dim) if qkv.bias is not None else None

    def rows(part, n):  # part of each group -> (n * head_dim, in) weight rows and their biases
        return w[:, part].reshape(n * head_dim, -1), (b[:, part].reshape(-1) if b is not None else None)

    (q, qb), (k, kb), (v, vb) = rows(slice(0, -2), heads), rows(-2, kv_heads), rows(-1, kv_heads)
    return AttentionWeights(q=q, k=k, v=v, o=out.weight, q_bias=qb, k_bias=kb, v_bias=vb, o_bias=out.bias)


# Llama-shaped blocks -> Bamba: the mixer sits where attention sat, the MLP is Bamba's
# feed_forward behind pre_ff_layernorm, the final norm is final_layernorm.
_LLAMA_TO_BAMBA = (
    (r"^model\.norm\.", "model.final_layernorm."),
    (r"\.self_attn\.mixer\.", ".mamba."),
    (r"\.post_attention_layernorm\.", ".pre_ff_layernorm."),
    (r"\.mlp\.", ".feed_forward."),
)

_BAMBA = {
    "llama": BambaLayout(_LLAMA_TO_BAMBA, attention_bias=lambda c: bool(getattr(c, "attention_bias", False))),
    "mistral": BambaLayout(_LLAMA_TO_BAMBA, attention_bias=lambda c: False),
    # Qwen2 has q/k/v biases and a bias-free o_proj.
    "qwen2": BambaLayout(_LLAMA_TO_BAMBA, attention_bias=lambda c: True, zero_filled=(".self_attn.o_proj.bias",)),
}

for _model_type in ("llama", "mistral", "qwen2"):
    register_family(
        FamilyAdapter(
            model_type=_model_type,
            attention_attr="self_attn",
            final_norm_attr="norm",
            read_attention=read_separate_qkvo,
            bamba=_BAMBA[_model_type],
        )
    )
