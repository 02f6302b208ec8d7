"""One-token decode of a converted student, replayed as a CUDA graph.

At batch 1-8 a decode step is bound by the host, not the GPU: on an H200 the SmolLM2-135M
student made 21-26 tokens/s at batch 1, whatever the context (benchmarks/results/
gpu_h200_2026-12-04_second), that is about 1.3 ms of Python and kernel launches per layer. A
CUDA graph records the step's kernels once and launches them together after that.

A graph replays fixed addresses and reads nothing from the host, so every tensor a step reads
or writes must stay where it is, and whatever changes from step to step must live on the device:
- a mixer's decode step updates the conv and SSM states the cache allocated at prefill in place;
- a hybrid's kept attention layers need a preallocated KV cache (``model.new_cache(max_cache_len=)``,
  transformers' ``StaticLayer``): it writes each token in place at a position counted on the
  device, and the attention mask is built from that count (``StudentCache.get_query_offset``);
  the default growing cache reallocates every step and is refused;
- the rotary positions and the padding mask are tensors of the decoder's own, written before
  each replay.
The step must not wait on the host either (no ``.item()``, no data-dependent branch):
tests/unit/test_graphed_decode.py checks all of this on CPU, where the same bookkeeping runs
eagerly.
"""

from __future__ import annotations

import torch

from .cache import StudentCache

__all__ = ["GraphedDecode", "generate_graphed", "graph_unsupported", "prompt_positions"]

# Attention whose mask is a tensor built on the device from the cache's device count. Flash
# attention takes the padding mask to the host instead (it unpads the batch by ``nonzero``).
REPLAYABLE_ATTENTION = ("sdpa", "eager")


def graph_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model``'s decode step cannot be replayed as a CUDA graph; None when it can."""
    # NOTE: dynamic RoPE compares the position with its cached length on the host every step (the
    # rotary embedding runs whether or not an attention layer is kept); "longrope" does it on the device.
    for module in model.modules():
        rope = getattr(module, "rope_type", None)
        if rope == "dynamic" or (isinstance(rope, dict) and "dynamic" in rope.values()):
            return "the teacher's dynamic RoPE rescales its frequencies on the host at every step, which a CUDA graph cannot replay"
    if not getattr(model.config, "kept_attention", False):
        return None
    if "sliding_attention" in model.config.layer_types:
        return (
            "a kept sliding-window attention layer rolls its preallocated cache by a count kept on the host "
            "(transformers' StaticSlidingWindowLayer), which a CUDA graph cannot replay"
        )
    backbone = getattr(model, "backbone", model)
    implementation = getattr(backbone.config, "_attn_implementation", None)
    if implementation not in REPLAYABLE_ATTENTION:
        return (
            f"the kept attention layers run {implementation!r}, which reads the padding mask on the host and cannot be "
            f"replayed as a CUDA graph; load the student with attn_implementation='sdpa' (or decode eagerly)"
        )
    return None


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded prompt's tokens as ``generate`` gives them: counted from each
    row's first real token (pads at 1, as transformers fills them; they are masked)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


class GraphedDecode:
    """``decode(token_ids) -> logits`` for one new token per sequence, over a prefilled cache.

    On CUDA the first call runs eagerly on a side stream (it warms up: lazy allocations,
    Triton's compilation), the second records the graph and replays it, every later call only
    replays. Elsewhere every call runs eagerly, with the same bookkeeping, so the CPU tests
    check what the graph replays. The cache advances one token per call; the logits returned
    are a copy (the graph writes its output buffer again at the next replay).

    ``attention_mask``: the prompt's padding mask (batch, tokens in the cache): each row's
    positions start at its first real token, and a hybrid's kept attention layers skip the pads;
    the new tokens are never padding. The prompt must have been run with the same numbering,
    ``position_ids=prompt_positions(attention_mask)``, as ``generate`` and ``generate_graphed``
    run it.
    """

    def __init__(
        self, model: torch.nn.Module, cache: StudentCache, batch: int, use_graph: bool | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        if not isinstance(cache, StudentCache):
            raise TypeError(f"GraphedDecode steps a StudentCache (model.new_cache()), got {type(cache).__name__}")
        if (why_not := graph_unsupported(model)) is not None:
            raise ValueError(f"GraphedDecode: {why_not}")
        if cache.has_attention and cache.max_cache_len is None:
            raise ValueError(
                "GraphedDecode replays a hybrid's kept attention layers over a preallocated KV cache: make it with "
                "model.new_cache(max_cache_len=<prompt + new tokens>) (this one grows, reallocating every step)"
            )
        if cache.tokens_seen == 0:
            raise ValueError("GraphedDecode continues from a prefilled cache: run the prompt through the model first")
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {self.device}")
        if attention_mask is not None and attention_mask.shape != (batch, cache.tokens_seen):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; the cache holds {cache.tokens_seen} tokens of "
                f"{batch} sequences, so it should be ({batch}, {cache.tokens_seen})"
            )
        self.input_ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        # NOTE: each row's position, as generate() numbers it: from the row's first real token (a
        # left-padded row's pads are not counted, which an absolute position table needs). A
        # replay cannot read the cache's host count: written before each step instead.
        self.position_ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self._pads = torch.zeros((batch, 1), dtype=torch.long, device=self.device)  # pads before each row's first token
        if attention_mask is not None:
            self._pads.copy_(cache.tokens_seen - attention_mask.sum(-1, keepdim=True))
        self.attention_mask = None
        if cache.has_attention:
            # The whole preallocated length: the prompt's padding, then the new tokens (never padding;
            # positions not written yet are masked by causality, from the cache's device count).
            self.attention_mask = torch.ones((batch, cache.max_cache_len), dtype=torch.long, device=self.device)
            if attention_mask is not None:
                self.attention_mask[:, : cache.tokens_seen] = attention_mask
        self.graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self.calls = 0

    def _forward(self) -> torch.Tensor:
        return self.model(
            self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids, cache=self.cache,
            use_cache=True, logits_to_keep=1,
        ).logits[:, -1]

    @torch.no_grad()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.cache.check_usable()
        # NOTE: checked here, on the host: a replay past a preallocated KV cache would write out of
        # its bounds on the device (the forward's own check runs only when it is recorded).
        self.cache.check_room(1)
        self.input_ids.copy_(token_ids.reshape(self.input_ids.shape))
        torch.sub(self.cache.tokens_seen, self._pads, out=self.position_ids)
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


def _generation_setup(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask, logits_processor, kwargs: dict):
    """(generation config, logits processors) exactly as ``generate`` resolves them for this call:
    the call's settings over the model's generation config (a converted student carries its
    teacher's: repetition penalty, sampling, suppressed tokens...) over transformers' defaults,
    and transformers' own processors and warpers in ``generate``'s order. Only greedy search and
    sampling of one sequence per prompt replay as a graph; anything else is refused by name."""
    from transformers import LogitsProcessorList
    from transformers.generation.configuration_utils import GenerationMode

    config, unused = model._prepare_generation_config(None, **kwargs)
    if unused:
        raise ValueError(f"generate_graphed: unknown generation arguments {sorted(unused)}")
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"generate_graphed decodes by greedy search or sampling, not {mode.value}; use model.generate")
    if (config.num_return_sequences or 1) != 1 or config.stop_strings or config.max_time:
        raise ValueError(
            "generate_graphed: num_return_sequences, stop_strings and max_time are not supported "
            "(repeat the prompt in the batch, or use model.generate)"
        )
    # Lengths count the prompt, as generate's _prepare_generated_length sets them (processors such
    # as a forced eos at max_length read them).
    config.max_length = config.max_new_tokens + input_ids.shape[1]
    if config.min_new_tokens is not None:
        config.min_length = config.min_new_tokens + input_ids.shape[1]
    model._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device, batch_size=input_ids.shape[0])
    processors = model._get_logits_processor(
        config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        logits_processor=LogitsProcessorList(logits_processor or []), device=input_ids.device, model_kwargs={},
    )
    return config, processors


@torch.no_grad()
def generate_graphed(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    use_graph: bool | None = None,
    cache: StudentCache | None = None,
    logits_processor: list | None = None,
    **generation_kwargs,
) -> torch.Tensor:
    """The new tokens (batch, <= max_new_tokens) of a converted student, decoded by ``GraphedDecode``.

    What ``model.generate`` does for greedy search and sampling, with the decode step replayed as
    a CUDA graph: the prompt (left-padded; ``attention_mask``, inferred from the pad token as
    ``generate`` infers it when not given, keeps the pads out of the states)
    fills a fresh cache in one forward, then one graphed step per token. ``generation_kwargs``
    (do_sample, temperature, top_k, repetition_penalty, eos_token_id, pad_token_id, ...) and the
    model's generation config resolve as in ``generate``, through transformers' own logits
    processors and warpers, so a seed gives the same tokens. Sequences that reach an eos token
    continue as the pad token (the eos token when none is set), and decoding stops once every
    sequence has ended. ``cache``: an empty ``model.new_cache()`` to fill (the caller reads what
    it holds afterwards; a hybrid's preallocates its KV: ``new_cache(max_cache_len=)``); a new one
    by default. ``logits_processor``: more transformers logits
    processors, placed as ``generate`` places them.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if (why_not := graph_unsupported(model)) is not None:  # before the prefill, not after it
        raise ValueError(f"generate_graphed: {why_not}")
    config, processors = _generation_setup(model, input_ids, attention_mask, logits_processor, {**generation_kwargs, "max_new_tokens": max_new_tokens})
    eos, pad = config._eos_token_tensor, config._pad_token_tensor
    if attention_mask is None:  # as generate infers it: pad tokens in the prompt are padding (unless pad is eos)
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, config, {})
    needed = input_ids.shape[1] + max_new_tokens - 1  # positions stepped: the last token is sampled, not fed back
    if cache is None:  # a hybrid's kept attention: a KV cache preallocated for the whole generation (mixers alone ignore it)
        cache = model.new_cache(needed + 1)
    elif cache.has_attention and (cache.max_cache_len is None or cache.max_cache_len < needed):
        # Refused before the prefill, as generate refuses it, not tokens into the generation.
        held = "grows (it is not preallocated)" if cache.max_cache_len is None else f"preallocates {cache.max_cache_len} positions"
        raise ValueError(
            f"generate_graphed: the cache given {held}; a hybrid's kept attention replays over one of at least {needed} "
            f"positions here (model.new_cache(max_cache_len={needed + 1}))"
        )
    positions = prompt_positions(attention_mask)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    decode = GraphedDecode(model, cache, batch=input_ids.shape[0], use_graph=use_graph, attention_mask=attention_mask)
    sequences, ended = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        scores = processors(sequences, logits.float())
        token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1) if config.do_sample else scores.argmax(-1)
        if eos is not None:
            token = torch.where(ended, pad, token)
            ended |= torch.isin(token, eos)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        # NOTE: one host sync a token, outside the graph (generate's stopping criteria do the same).
        if step + 1 == max_new_tokens or (eos is not None and bool(ended.all())):
            break
        logits = decode(token[:, None])
    return sequences[:, input_ids.shape[1] :]
