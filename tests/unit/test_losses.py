"""The CALD loss parts against their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cald_scale.distill.losses import (
    LossConfig,
    distilled_layers,
    layer_loss,
    layer_loss_reference,
    lm_cross_entropy,
    linear_head_losses,
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


def test_a_padded_layer_loss_divides_by_the_tokens_it_is_given():
    """Two padded micro-batches (2 and 8 real tokens) divided by their mean, 5: their average
    is the mean over all 10 real tokens, where each micro-batch's own mean weighed a token of
    the first 4x as much as one of the second."""
    torch.manual_seed(0)
    s = torch.randn(2, 1, 8, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 1, 8, 16, dtype=torch.float64)
    masks = torch.tensor([[[1, 1, 0, 0, 0, 0, 0, 0]], [[1] * 8]])
    pooled = sum(layer_loss(s[i], t[i], masks[i], tokens=5.0) for i in range(2)) / 2
    whole = layer_loss_reference(s.flatten(0, 1), t.flatten(0, 1), masks.flatten(0, 1))
    torch.testing.assert_close(pooled, whole.double())
    (g,) = torch.autograd.grad(pooled, s)
    (g_ref,) = torch.autograd.grad(whole, s)
    torch.testing.assert_close(g, g_ref)
    assert layer_loss_reference(s[0], t[0], masks[0], tokens=5.0).item() == pytest.approx(layer_loss(s[0], t[0], masks[0], tokens=5.0).item())
    own = sum(layer_loss(s[i], t[i], masks[i]) for i in range(2)) / 2
    assert abs(own.item() - whole.item()) > 0.01


def test_an_fp16_layer_loss_gradient_survives_a_large_layer():
    """The gradient is divided by the element count before the loss scale multiplies it: held
    in fp16 as such it flushed to zero on a large layer (here 1M elements, hidden std 16)."""
    torch.manual_seed(0)
    s32 = torch.randn(2, 512, 1024) * 16
    t32 = s32 + 0.3 * torch.randn_like(s32) * 16
    loss_scale = 2.0**10
    s = s32.half().requires_grad_()
    (layer_loss(s, t32.half()) * loss_scale).backward()
    ref = s32.double().requires_grad_()
    (g_ref,) = torch.autograd.grad(layer_loss_reference(ref, t32.half().double()), ref)
    g = s.grad.double() / loss_scale
    assert (g == 0).double().mean() < 0.01
    assert ((g - g_ref).norm() / g_ref.norm()) < 0.01
    # A loss scale that fp16 itself cannot hold (2**16 x 2) still gives finite gradients.
    s.grad = None
    (layer_loss(s, t32.half()) * 2.0**17).backward()
    assert torch.isfinite(s.grad).all()


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


@pytest.mark.parametrize("chunk", [None, 5, 64])
@pytest.mark.parametrize("want_ce,want_kl", [(True, True), (True, False), (False, True)])
def test_linear_head_losses_equal_the_module_path(chunk, want_ce, want_kl):
    """The fused path (one weight gradient for all chunks) gives the checkpointed module path's
    losses and gradients: hidden states, the head's weight (tied to an embedding that is also
    used, as in SmolLM2 and Qwen2.5) and the final norm before the head."""
    torch.manual_seed(0)
    batch, seqlen, hidden, vocab = 2, 11, 16, 50
    embed = torch.nn.Embedding(vocab, hidden)
    norm = torch.nn.LayerNorm(hidden)
    t_head = torch.nn.Linear(hidden, vocab, bias=False)
    ids = torch.randint(0, vocab, (batch, seqlen))
    t_h = torch.randn(batch, seqlen, hidden)
    h = torch.randn(batch, seqlen, hidden, requires_grad=True)
    kw = dict(want_ce=want_ce, teacher_h=t_h if want_kl else None, teacher_head=t_head if want_kl else None, temperature=2.0, chunk_tokens=chunk)
    params = [h, embed.weight, norm.weight]

    def total(ce, kl):  # the embedding's own use puts a second gradient on the tied matrix
        return (ce if ce is not None else 0) + 0.5 * (kl if kl is not None else 0) + embed(ids).square().mean()

    ce_ref, kl_ref = lm_head_losses(h, ids, lambda x: F.linear(norm(x), embed.weight), **kw)
    g_ref = torch.autograd.grad(total(ce_ref, kl_ref), params)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    head.weight = embed.weight
    ce, kl = linear_head_losses(norm(h), ids, head, **kw)
    for a, b in ((ce, ce_ref), (kl, kl_ref)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    g = torch.autograd.grad(total(ce, kl), params)
    for name, a, b in zip(("hidden", "tied weight", "norm"), g, g_ref):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_linear_head_losses_hold_one_weight_gradient_in_backward():
    """The point of the fused path: backward allocates the (vocab, hidden) weight gradient
    once, however many chunks there are, where the module path makes one per chunk."""
    torch.manual_seed(0)
    hidden, vocab = 64, 2048  # the weight: 8x a chunk's logits (8 tokens), the largest tensor here
    head = torch.nn.Linear(hidden, vocab, bias=False)
    weight = head.weight
    x = torch.randn(1, 40, hidden, requires_grad=True)
    ids = torch.randint(0, vocab, (1, 40))

    class NewWeightSizedTensors(TorchDispatchMode):
        """Counts ops that return a new tensor as large as the weight (not in place, not a view)."""

        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            fresh = all(r.alias_info is None for r in func._schema.returns)
            if fresh and isinstance(out, torch.Tensor) and out.numel() >= vocab * hidden:
                self.count += 1
            return out

    def weight_sized_allocations(losses) -> int:
        ce, _ = losses()
        with NewWeightSizedTensors() as mode:
            ce.backward()
        return mode.count

    fused = weight_sized_allocations(lambda: linear_head_losses(x, ids, head, want_ce=True, chunk_tokens=8))
    weight.grad = None
    chunked = weight_sized_allocations(lambda: lm_head_losses(x, ids, lambda a: F.linear(a, weight), want_ce=True, chunk_tokens=8))
    assert chunked >= 5, chunked  # one per chunk of the 5
    assert fused == 1, fused


def test_head_chunk_size_follows_the_vocabulary():
    assert LossConfig().chunk_tokens(49152) == 341
    assert LossConfig().chunk_tokens(151936) == 110
    assert LossConfig(head_chunk_tokens=100).chunk_tokens(151936) == 100
    with pytest.raises(ValueError, match="head_chunk_tokens"):
        LossConfig(head_chunk_tokens=0)


def test_vocab_streamed_cross_entropy_equals_the_whole_head():
    """Row pieces in any order, of rows from anywhere in the head (each piece's ids ascending, as
    ``RowPieces`` asks), give the whole head's CE and gradients."""
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
            rows = order[start : start + 13].sort().values
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


def test_a_whole_head_read_in_row_pieces_covers_each_row_once_within_the_piece_size():
    """Pipeline mode's frozen head (whole on its stage): pieces of at most ``piece_bytes``, each
    row once, in order, views of the weight (no copy); its CE is the whole head's."""
    from cald_scale.distill.losses import vocab_streamed_cross_entropy
    from cald_scale.engines.partitioned import whole_row_pieces

    torch.manual_seed(0)
    weight = torch.randn(101, 16, dtype=torch.float64)
    pieces = list(whole_row_pieces(weight, piece_bytes=13 * 16 * 8)())
    assert [len(ids) for ids, _ in pieces] == [13] * 7 + [10]
    assert torch.equal(torch.cat([ids for ids, _ in pieces]), torch.arange(101))
    assert all(rows.data_ptr() == weight[ids[0]].data_ptr() and torch.equal(rows, weight[ids]) for ids, rows in pieces)
    assert len(list(whole_row_pieces(weight, piece_bytes=1)())) == 101  # a row at least
    h, ids = torch.randn(2, 7, 16, dtype=torch.float64), torch.randint(0, 101, (2, 7))
    reference = torch.nn.functional.cross_entropy((h @ weight.T)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(vocab_streamed_cross_entropy(h, ids, whole_row_pieces(weight, piece_bytes=13 * 16 * 8)), reference)


def test_vocab_streamed_cross_entropy_multiplies_in_the_model_dtype():
    """bf16 hidden states and head: the head's matmuls run in bf16 (tensor cores on a GPU; in
    float32 an H200 ran them on its CUDA cores), the online softmax in float32, and CE and
    gradient agree with the head module's own path (bf16 logits, then float32 CE)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cald_scale.distill.losses import vocab_streamed_cross_entropy

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.seen.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    vocab, hidden, batch, seqlen = 300, 32, 2, 9
    weight = (torch.randn(vocab, hidden) / hidden**0.5).to(torch.bfloat16)
    h = torch.randn(batch, seqlen, hidden, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, seqlen))

    def pieces():
        for start in range(0, vocab, 64):
            rows = torch.arange(start, min(start + 64, vocab))
            yield rows, weight[rows]

    with MatmulDtypes() as recorded:
        ce = vocab_streamed_cross_entropy(h, ids, pieces)
    assert ce.dtype == torch.float32
    assert recorded.seen and set(recorded.seen) == {torch.bfloat16}, recorded.seen
    logits = (h @ weight.T).float()
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(ce, reference, rtol=1e-3, atol=1e-3)
    grad, = torch.autograd.grad(ce, h)
    grad_ref, = torch.autograd.grad(reference, h)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=2e-2, atol=2e-3)


def test_a_bf16_head_weight_gradient_is_summed_over_chunks_in_float32():
    """Each chunk's product in bf16, their sum in float32: summed in bf16, 128 chunks took the
    gradient 5x further from the float64 one (0.0135 against 0.0026 here)."""
    torch.manual_seed(0)
    hidden, vocab, tokens = 64, 512, 4096
    head = torch.nn.Linear(hidden, vocab, bias=False).to(torch.bfloat16)
    x = torch.randn(1, tokens, hidden).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (1, tokens))
    ce, _ = linear_head_losses(x, ids, head, want_ce=True, chunk_tokens=32)
    ce.backward()
    assert head.weight.grad.dtype == torch.bfloat16
    exact = head.weight.detach().double().requires_grad_()
    F.cross_entropy(x[0, :-1].double() @ exact.t(), ids[0, 1:]).backward()
    assert ((head.weight.grad.double() - exact.grad).norm() / exact.grad.norm()).item() < 0.005
