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

__all__ = ["GraphedDecode", "generate_graphed"]


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
        else:
            # NOTE: the model's device made current: a capture records on a stream of the current
            # device, so a model on cuda:1 captured from cuda:0 would record nothing.
            with torch.cuda.device(self.device):
                logits = self._graph_step()
        self.calls += 1
        return logits.clone()

    def _graph_step(self) -> torch.Tensor:
        if self.calls == 0:
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
        return logits


def _sampling_parameters(model: torch.nn.Module, **given) -> tuple:
    """(temperature, top_k, top_p) as ``generate`` resolves them: what the call gives, else the
    model's generation config, else transformers' global defaults (top-k 50 among them)."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None) or GenerationConfig()
    defaults = GenerationConfig._get_default_generation_params()
    resolved = []
    for name in ("temperature", "top_k", "top_p"):
        value = given[name] if given[name] is not None else getattr(config, name, None)
        resolved.append(value if value is not None else defaults[name])
    return tuple(resolved)


@torch.no_grad()
def generate_graphed(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    use_graph: bool | None = None,
    cache: StudentCache | None = None,
    logits_processor: list | None = None,
) -> torch.Tensor:
    """The new tokens (batch, <= max_new_tokens) of a mixers-only student, decoded by ``GraphedDecode``.

    What ``model.generate`` does for greedy search and sampling, with the decode step replayed as
    a CUDA graph: the prompt (left-padded; ``attention_mask`` keeps the pads out of the states)
    fills a fresh cache in one forward, then one graphed step per token. Sampling takes
    transformers' own temperature, top-k and top-p warpers, resolved and drawn as ``generate``
    does them, so a seed gives the same tokens. Sequences that reach ``eos_token_id`` continue as
    ``pad_token_id``, and decoding stops once every sequence has ended. ``cache``: an empty
    ``model.new_cache()`` to fill (the caller reads what it holds afterwards); a new one by default.
    ``logits_processor``: transformers logits processors, run before the sampling warpers as in
    ``generate``.
    """
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    warpers = LogitsProcessorList(logits_processor or [])
    if do_sample:
        temperature, top_k, top_p = _sampling_parameters(model, temperature=temperature, top_k=top_k, top_p=top_p)
        if temperature is not None and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=input_ids.device)
    if len(eos) and pad_token_id is None:
        raise ValueError("generate_graphed: pass pad_token_id, what an ended sequence continues with")
    cache = model.new_cache() if cache is None else cache
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    decode = GraphedDecode(model, cache, batch=input_ids.shape[0], use_graph=use_graph)
    sequences, ended = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        scores = warpers(sequences, logits.float())
        token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1) if do_sample else scores.argmax(-1)
        if len(eos):
            token = torch.where(ended, pad_token_id, token)
            ended |= torch.isin(token, eos)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        # NOTE: one host sync a token, outside the graph (generate's stopping criteria do the same).
        if step + 1 == max_new_tokens or (len(eos) and bool(ended.all())):
            break
        logits = decode(token[:, None])
    return sequences[:, input_ids.shape[1] :]
