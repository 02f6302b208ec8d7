# Data pipeline: corpus -> tokenised megatron indexed datasets (cached once) -> packed
# fixed-length sequences -> deterministic per-rank batches; and labelled examples ->
# fixed splits -> length-bucketed batches for the encoder track's classification task.
from cald_scale.data.classification import (
    BUILTIN_CLASSIFICATION,
    ClassificationData,
    ClassificationDataConfig,
    ClassificationSplit,
    load_classification_data,
)
from cald_scale.data.classification_batches import (
    IGNORE_INDEX,
    BucketedBatches,
    EvalBatch,
    TokenizedSplit,
    collate_classification,
    eval_batches_by_length,
    tokenize_split,
    tokenize_splits,
)
from cald_scale.data.config import DataConfig
from cald_scale.data.corpora import BUILTIN_CORPORA, iter_documents
from cald_scale.data.heldout import held_out_sequences
from cald_scale.data.indexed import IndexedCorpus, build_indexed_dataset, cache_key
from cald_scale.data.packing import PackedSequences, check_vocab
from cald_scale.data.sampler import ShardedBatches, eval_batches

__all__ = [
    "BUILTIN_CLASSIFICATION",
    "BUILTIN_CORPORA",
    "IGNORE_INDEX",
    "BucketedBatches",
    "ClassificationData",
    "ClassificationDataConfig",
    "ClassificationSplit",
    "DataConfig",
    "EvalBatch",
    "IndexedCorpus",
    "PackedSequences",
    "ShardedBatches",
    "TokenizedSplit",
    "build_indexed_dataset",
    "cache_key",
    "check_vocab",
    "collate_classification",
    "eval_batches",
    "eval_batches_by_length",
    "held_out_sequences",
    "iter_documents",
    "load_classification_data",
    "tokenize_split",
    "tokenize_splits",
]
