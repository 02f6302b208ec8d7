"""The CALD loss parts against their definitions."""

from __future__ import annotations

import pytest
import torch

from cald_scale.distill.losses import (
    LossConfig,
    distilled_layers,
    layer_loss,
    layer_loss_reference,
    lm_cross_entropy,
    lm_head_losses,
    logit_kl,
)


def test_layer_loss_is_mse_of_parameter_free_layernorm():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    def ln(x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)

    torch.testing.assert_close(layer_loss(s, t), ((ln(s) - ln(t)) ** 2).mean())
    # Scale-invariant per token: a student off by a positive scale has zero layer loss.
    assert layer_loss(3.0 * t, t).item() < 1e-6


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 4, 11)
    assert logit_kl(logits, logits, 2.0).abs().item() < 1e-6
    other = torch.randn(2, 4, 11)
    p_t = torch.softmax(other / 2.0, -1)
    manual = (p_t * (torch.log_softmax(other / 2.0, -1) - torch.log_softmax(logits / 2.0, -1))).sum(-1).mean() * 4.0
    torch.testing.assert_close(logit_kl(logits, other, 2.0), manual)


def test_lm_cross_entropy_shifts_labels():
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 5), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # predicts the next token perfectly
    assert lm_cross_entropy(logits, ids).item() < 1e-4


def test_distilled_layers_and_validation():
    assert distilled_layers(4, LossConfig()) == [0, 1, 2]
    assert distilled_layers(4, LossConfig(skip_last=False, skip_first=1)) == [1, 2, 3]
    with pytest.raises(ValueError, match="covers no block"):
        distilled_layers(1, LossConfig())
    with pytest.raises(ValueError, match="a_layer"):
        LossConfig(a_layer=-1)
    with pytest.raises(ValueError, match="zero"):
        LossConfig(a_ce=0, a_layer=0, a_kl=0)


def test_layer_loss_gradient_equals_autograd():
    s = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: layer_loss(x, t), (s,))
    (g_ref,) = torch.autograd.grad(layer_loss_reference(s, t), s)
    (g,) = torch.autograd.grad(layer_loss(s, t), s)
    torch.testing.assert_close(g, g_ref)
    # fp32 value equals the reference definition.
    s32, t32 = s.detach().float(), t.float()
    torch.testing.assert_close(layer_loss(s32, t32), layer_loss_reference(s32, t32))


def test_layer_loss_keeps_one_tensor_in_the_student_dtype():
    s = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 5, 8, dtype=torch.float32)  # a teacher in another dtype
    loss = layer_loss(s, t)
    saved = loss.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].dtype == torch.bfloat16 and saved[0].shape == s.shape
    (g,) = torch.autograd.grad(loss, s)
    (g_ref,) = torch.autograd.grad(layer_loss_reference(s, t), s)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_chunked_head_losses_equal_whole_logits(chunk):
    torch.manual_seed(0)
    batch, seqlen, hidden, vocab = 2, 12, 16, 50
    s_head, t_head = torch.nn.Linear(hidden, vocab), torch.nn.Linear(hidden, vocab)
    s_h = torch.randn(batch, seqlen, hidden, requires_grad=True)
    t_h = torch.randn(batch, seqlen, hidden)
    ids = torch.randint(0, vocab, (batch, seqlen))
    ce_ref = lm_cross_entropy(s_head(s_h), ids)
    kl_ref = logit_kl(s_head(s_h), t_head(t_h), 2.0)
    g_ref = torch.autograd.grad(ce_ref + 0.5 * kl_ref, [s_h, s_head.weight])
    ce, kl = lm_head_losses(s_h, ids, s_head, want_ce=True, teacher_h=t_h, teacher_head=t_head, temperature=2.0, chunk_tokens=chunk)
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(kl, kl_ref)
    g = torch.autograd.grad(ce + 0.5 * kl, [s_h, s_head.weight])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    assert t_head.weight.grad is None


def test_head_chunk_size_follows_the_vocabulary():
    assert LossConfig().chunk_tokens(49152) == 341
    assert LossConfig().chunk_tokens(151936) == 110
    assert LossConfig(head_chunk_tokens=100).chunk_tokens(151936) == 100
    with pytest.raises(ValueError, match="head_chunk_tokens"):
        LossConfig(head_chunk_tokens=0)


def test_vocab_streamed_cross_entropy_equals_the_whole_head():
    """Row pieces in any order (as ranks' partitions arrive) give the whole head's CE and gradients."""
    from cald_scale.distill.losses import vocab_streamed_cross_entropy

    torch.manual_seed(0)
    vocab, hidden, batch, seqlen = 101, 16, 2, 7
    weight = torch.randn(vocab, hidden, dtype=torch.float64)
    h = torch.randn(batch, seqlen, hidden, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, seqlen))
    order = torch.randperm(vocab)
    walks = []

    def pieces():
        walks.append(1)
        for start in range(0, vocab, 13):  # the last piece is short
            rows = order[start : start + 13]
            yield rows, weight[rows]

    ce = vocab_streamed_cross_entropy(h, ids, pieces)
    logits = h @ weight.T
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(ce, reference)
    grad, = torch.autograd.grad(ce, h)
    grad_ref, = torch.autograd.grad(reference, h)
    torch.testing.assert_close(grad, grad_ref)
    assert len(walks) == 1  # one walk, in forward (backward scales the gradient it computed)
    assert torch.autograd.gradcheck(lambda x: vocab_streamed_cross_entropy(x, ids, pieces), (h,))
