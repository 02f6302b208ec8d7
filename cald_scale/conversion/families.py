"""Built-in family adapters: llama, mistral, qwen2 (separate q/k/v/o) and gpt_neox (fused QKV)."""

from __future__ import annotations

from torch import nn

from .registry import AttentionWeights, BambaLayout, FamilyAdapter, register_family


def _read_separate_qkvo(attn: nn.Module, config) -> AttentionWeights:
    return AttentionWeights(
        q=attn.q_proj.weight,
        k=attn.k_proj.weight,
        v=attn.v_proj.weight,
        o=attn.o_proj.weight,
        q_bias=attn.q_proj.bias,
        k_bias=attn.k_proj.bias,
        v_bias=attn.v_proj.bias,
        o_bias=attn.o_proj.bias,
    )


def _read_gpt_neox(attn: nn.Module, config) -> AttentionWeights:
    # NOTE: GPT-NeoX fuses QKV per head: rows are [q_h, k_h, v_h] for each head h in turn.
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    w = attn.query_key_value.weight.view(heads, 3, head_dim, -1)
    b = attn.query_key_value.bias
    b = b.view(heads, 3, head_dim) if b is not None else None

    def part(i):
        return w[:, i].reshape(heads * head_dim, -1), (b[:, i].reshape(-1) if b is not None else None)

    (q, qb), (k, kb), (v, vb) = part(0), part(1), part(2)
    return AttentionWeights(q=q, k=k, v=v, o=attn.dense.weight, q_bias=qb, k_bias=kb, v_bias=vb, o_bias=attn.dense.bias)


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
            read_attention=_read_separate_qkvo,
            bamba=_BAMBA[_model_type],
        )
    )

register_family(
    FamilyAdapter(
        model_type="gpt_neox",
        attention_attr="attention",
        final_norm_attr="final_layer_norm",
        read_attention=_read_gpt_neox,
        embed_dropout_attr="emb_dropout",
        bamba_refusal="gpt_neox blocks (LayerNorm, attention and MLP side by side on one residual) have no Bamba equivalent",
    )
)
