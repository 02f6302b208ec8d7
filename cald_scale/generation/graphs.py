"""One-token decode of a mixers-only student, replayed as a CUDA graph.

At batch 1-8 a decode step is bound by the host, not the GPU: on an H200 the SmolLM2-135M
student made 21-26 tokens/s at batch 1, whatever the context (benchmarks/results/
gpu_h200_2026-12-04_second), that is about 1.3 ms of Python and kernel launches per layer. A
CUDA graph records the step's kernels once and launches them together after that.

A graph replays fixed addresses, so every tensor a step reads or writes must stay where it is.
transformers' ``LinearAttentionLayer`` keeps the conv and SSM states in place (it copies each
new state into the tensors it allocated at prefill), so a student made of mixers alone
qualifies; a kept attention layer's KV cache grows every step, so a hybrid does not (it
decodes eagerly, as ``generate`` does). The step must not wait on the host either (no
``.item()``, no data-dependent branch): tests/unit/test_graphed_decode.py checks both on CPU.
"""

from __future__ import annotations

import torch

from .cache import StudentCache

__all__ = ["GraphedDecode"]


class GraphedDecode:
    """``decode(token_ids) -> logits`` for one new token per sequence, over a prefilled cache.

    On CUDA the first call runs eagerly on a side stream (it warms up: lazy allocations,
    Triton's compilation), the second records the graph and replays it, every later call only
    replays. Elsewhere every call runs eagerly, with the same bookkeeping, so the CPU tests
    check what the graph replays. The cache advances one token per call; the logits returned
    are a copy (the graph writes its output buffer again at the next replay).
    """

    def __init__(self, model: torch.nn.Module, cache: StudentCache, batch: int, use_graph: bool | None = None):
        if not isinstance(cache, StudentCache):
            raise TypeError(f"GraphedDecode steps a StudentCache (model.new_cache()), got {type(cache).__name__}")
        if cache.has_attention:
            raise ValueError(
                "GraphedDecode needs a student of mixers only: a kept attention layer's KV cache grows every step, so its "
                "addresses move and a CUDA graph cannot replay it; decode a hybrid eagerly (model.generate)"
            )
        if cache.tokens_seen == 0:
            raise ValueError("GraphedDecode continues from a prefilled cache: run the prompt through the model first")
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {self.device}")
        self.input_ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self.calls = 0

    def _forward(self) -> torch.Tensor:
        return self.model(self.input_ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.cache.check_usable()
        self.input_ids.copy_(token_ids.reshape(self.input_ids.shape))
        if not self.use_graph:
            logits = self._forward()
        elif self.calls == 0:
            # NOTE: warm-up on a side stream, as torch's capture requires of what it records.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                logits = self._forward()
            torch.cuda.current_stream(self.device).wait_stream(stream)
        elif self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                # Recorded, not run; the forward's host bookkeeping (the cache's token count)
                # happens here once, for the replay just below.
                self._logits = self._forward()
            self.graph.replay()
            logits = self._logits
        else:
            self.graph.replay()
            self.cache.advance(1)
            logits = self._logits
        self.calls += 1
        return logits.clone()
