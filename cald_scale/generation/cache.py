"""``StudentCache``: what a converted student carries from one token to the next.

A mixer layer keeps a convolution state and an SSM state whose size does not depend on the
context length; a layer that kept the teacher's attention (a hybrid) keeps its KV cache:
grown by concatenation (transformers' ``DynamicLayer``, which copies the layer's whole keys
and values at every token), or preallocated for ``max_cache_len`` positions and written in
place (``StaticLayer``, what ``generate(cache_implementation="static")`` gives a teacher);
a kept sliding-window layer keeps only its window, as the teacher's own cache does.
Both are transformers cache layers, so ``generate`` (greedy, sampling, beams, left-padded
batches) drives the cache as it drives any other.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

__all__ = ["StudentCache", "state_bytes"]


class StudentCache(DynamicCache):
    """Per layer: ``LinearAttentionLayer`` (conv + SSM state) for a mixer; for kept attention
    ``DynamicLayer`` (KV grown token by token), or ``StaticLayer`` holding ``max_cache_len``
    positions when that is given (their sliding-window kinds for a kept sliding layer). Also
    counts the tokens it has seen, which a cache of mixers alone cannot read off any tensor
    (positions and mask sizes need it)."""

    def __init__(self, layer_types: list[str], max_cache_len: int | None = None, sliding_window: int | None = None):
        if max_cache_len is not None and max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive number of positions, got {max_cache_len}")
        if "sliding_attention" in layer_types and not sliding_window:
            raise ValueError("a kept sliding-window attention layer needs the teacher's sliding_window")
        self._layout = (list(layer_types), max_cache_len, sliding_window)
        # NOTE: DynamicCache.__init__ would build the layers from a config; ours come from the
        # student's layout, so the base Cache constructor is called directly.
        super(DynamicCache, self).__init__(layers=self._new_layers())
        self.max_cache_len = max_cache_len if any(kind != "linear_attention" for kind in layer_types) else None
        self.tokens_seen = 0
        self.rolled_back = False

    def _new_layers(self) -> list:
        layer_types, max_cache_len, window = self._layout

        def layer(kind: str):
            if kind == "linear_attention":
                return LinearAttentionLayer()
            if kind == "sliding_attention":  # as the teacher's own cache: only the window is kept
                return DynamicSlidingWindowLayer(window) if max_cache_len is None else StaticSlidingWindowLayer(max_cache_len, window)
            return DynamicLayer() if max_cache_len is None else StaticLayer(max_cache_len)

        return [layer(kind) for kind in layer_types]

    @property
    def has_attention(self) -> bool:
        return any(isinstance(layer, CacheLayerMixin) for layer in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Every layer has seen the same tokens, counted here (``advance``, at the end of each
        # forward). A mixer layer's states cannot say (transformers 5.25 counts conv-state widths
        # there), and a StaticLayer counts in a device tensor: reading it would wait on the GPU.
        return self.tokens_seen if layer_idx < len(self.layers) else 0

    def get_query_offset(self, layer_idx: int = 0) -> int | torch.Tensor:
        # The attention mask's first query position. A preallocated KV cache gives its own
        # device-side count (a tensor, as transformers' static layers give it): the mask built from
        # it then follows the cache when a decode step is replayed as a CUDA graph, where the host
        # count would stay at the value seen when the graph was recorded.
        for layer in self.layers:
            # NOTE: not a sliding one: its device count stops once the window is full.
            if isinstance(layer, StaticLayer) and not layer.is_sliding and layer.is_initialized:
                return layer.cumulative_length
        return self.tokens_seen

    @property
    def is_croppable(self) -> bool:
        # NOTE: a mixer keeps only its latest state, no history to roll back to (transformers
        # >= 5.25 calls linear-attention layers croppable; ours are not).
        return False

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the last ``-tokens_to_remove`` tokens: a mixer cannot, so the cache is
        marked unusable instead. Generation that drops its cache afterwards (a stop decided
        one step late) is unaffected; stepping on from it is refused (``check_usable``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove < 0:
            self.rolled_back = True

    def check_usable(self) -> None:
        if self.rolled_back:
            raise RuntimeError(
                "this StudentCache was cropped (tokens taken back, as assisted or speculative decoding does): a mixer's "
                "recurrent state cannot be rolled back, so generation cannot continue from it; start from a new cache "
                "(model.new_cache()) and generate without an assistant model"
            )

    def check_room(self, num_tokens: int) -> None:
        """Refuse, before any layer runs, a forward that would go past a preallocated KV cache
        (a static layer would fail halfway, its mixers' states already advanced)."""
        if self.max_cache_len is not None and self.tokens_seen + num_tokens > self.max_cache_len:
            raise ValueError(
                f"this StudentCache preallocates {self.max_cache_len} positions for its attention layers; it holds "
                f"{self.tokens_seen} and {num_tokens} more do not fit. Make a longer one (model.new_cache(max_cache_len=...), "
                "generate(..., max_cache_len=...)) or use the growing cache (model.new_cache())"
            )

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if not self.has_attention:
            # No layer reads the mask; give the sizes a full cache would have.
            return self.tokens_seen + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def advance(self, num_tokens: int) -> None:
        """Record that a forward pass consumed ``num_tokens`` more positions."""
        self.tokens_seen += num_tokens

    def check_batch(self, batch_size: int) -> None:
        """Before a forward of ``batch_size`` sequences: a reset cache whose states were sized for
        another number makes new ones; one in use refuses by name (it failed deep in a layer's
        state update)."""
        held = self._batch_size()
        if held is None or held == batch_size:
            return
        if self.tokens_seen == 0:
            self.layers = self._new_layers()  # NOTE: only then: a reset keeps its tensors (a captured graph's addresses)
            return
        raise ValueError(
            f"this StudentCache holds the states of {held} sequences; a forward of {batch_size} cannot continue from "
            "them. Start from a new cache (model.new_cache()) or cache.reset()"
        )

    def _batch_size(self) -> int | None:
        for layer in self.layers:
            states = layer.conv_states.values() if isinstance(layer, LinearAttentionLayer) else [getattr(layer, "keys", None)]
            for state in states:
                if isinstance(state, torch.Tensor) and state.dim() > 0:
                    return state.shape[0]
        return None

    def reset(self) -> None:
        """Start over, keeping the state tensors where they are (zeroed); the next prompt may be
        of another number of sequences (``check_batch``)."""
        super().reset()
        self.tokens_seen = 0
        self.rolled_back = False


def state_bytes(cache: DynamicCache) -> dict[str, int]:
    """Bytes a cache holds: ``recurrent`` (conv + SSM states) and ``kv`` (attention keys and values)."""
    recurrent = kv = 0
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionLayer):
            for states in (layer.conv_states, layer.recurrent_states):
                recurrent += sum(t.numel() * t.element_size() for t in states.values() if isinstance(t, torch.Tensor))
        if isinstance(layer, CacheLayerMixin):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    kv += t.numel() * t.element_size()
    return {"recurrent": recurrent, "kv": kv}
