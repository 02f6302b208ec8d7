# Data pipeline: corpus -> tokenised megatron indexed datasets (cached once) -> packed
# fixed-length sequences -> deterministic per-rank batches.
from cald_scale.data.config import DataConfig
from cald_scale.data.corpora import BUILTIN_CORPORA, iter_documents
from cald_scale.data.heldout import held_out_sequences
from cald_scale.data.indexed import IndexedCorpus, build_indexed_dataset, cache_key
from cald_scale.data.packing import PackedSequences, check_vocab
from cald_scale.data.sampler import ShardedBatches, eval_batches

__all__ = [
    "BUILTIN_CORPORA",
    "DataConfig",
    "IndexedCorpus",
    "PackedSequences",
    "ShardedBatches",
    "build_indexed_dataset",
    "cache_key",
    "check_vocab",
    "eval_batches",
    "held_out_sequences",
    "iter_documents",
]
