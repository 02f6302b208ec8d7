# Classification batches: tokenised examples (unpadded) -> length-bucketed, resumable
# training batches per rank, length-ordered eval batches per rank, padded by the collate.
"""Tokenised classification examples and the batches each data-parallel rank reads.

Training (`BucketedBatches`) groups examples of similar length so little of a batch is
padding, and like `ShardedBatches` it is a pure function of (seed, step, micro step): a
resumed run reads exactly the batches it would have read. Evaluation
(`eval_batches_by_length`) walks a split once, longest first, so that confusion matrices
summed over ranks count every example exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cald_scale.data.classification import ClassificationData, ClassificationSplit
from cald_scale.data.sampler import ShardedBatches

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "BucketedBatches",
    "EvalBatch",
    "TokenizedSplit",
    "collate_classification",
    "eval_batches_by_length",
    "tokenize_split",
    "tokenize_splits",
]

IGNORE_INDEX = -100
"""Label of a filler example (see `EvalBatch`): skipped by `F.cross_entropy` and by
`eval.classification.confusion_matrix`."""

_TOKENIZE_CHUNK = 1024


# ---------------------------------------------------------------------------------------
# Tokenised examples
# ---------------------------------------------------------------------------------------


@dataclass
class TokenizedSplit:
    """A split's token ids, unpadded, in one flat array: example i is
    tokens[offsets[i]:offsets[i + 1]] (special tokens included)."""

    tokens: np.ndarray
    offsets: np.ndarray
    """(n + 1,) int64 start of each example in `tokens`."""
    labels: np.ndarray
    """(n,) int64 label ids."""
    pad_token_id: int
    token_type_ids: np.ndarray | None = None
    """Segment ids in the layout of `tokens`; only for sentence pairs (BERT-style models)."""
    num_at_max_length: int = 0
    """Examples exactly max_length long: truncated (or exactly that long)."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, b = self.offsets[i], self.offsets[i + 1]
        example: dict[str, Any] = {"input_ids": self.tokens[a:b], "labels": int(self.labels[i])}
        if self.token_type_ids is not None:
            example["token_type_ids"] = self.token_type_ids[a:b]
        return example

    def batch(self, indices: Sequence[int], num_valid: int | None = None) -> dict[str, torch.Tensor]:
        """The padded batch of `indices`; the labels of positions from `num_valid` on
        (an `EvalBatch`'s filler) become IGNORE_INDEX."""
        out = collate_classification([self[int(i)] for i in indices], self.pad_token_id)
        if num_valid is not None:
            out["labels"][num_valid:] = IGNORE_INDEX
        return out


def tokenize_split(
    split: ClassificationSplit, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedSplit:
    """Tokenise with the model's special tokens, truncated to `max_length`, unpadded."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token: set one before batching")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 1_000_000 and max_length > model_max:
        # NOTE: longer inputs would index past the position embeddings.
        raise ValueError(
            f"classification.max_length={max_length} exceeds the tokenizer's model_max_length "
            f"{model_max} ({tokenizer.name_or_path!r})"
        )
    pairs = split.text_pairs is not None
    special = tokenizer.num_special_tokens_to_add(pair=pairs)
    if max_length <= special + pairs:  # NOTE: the tokenizer would not truncate then, only warn
        raise ValueError(
            f"classification.max_length={max_length} leaves no token of text: {tokenizer.name_or_path!r} adds {special} special "
            f"tokens to each {'sentence pair' if pairs else 'text'}; give at least {special + pairs + 1}"
        )
    ids: list[list[int]] = []
    types: list[list[int]] = []
    for start in range(0, len(split), _TOKENIZE_CHUNK):
        end = start + _TOKENIZE_CHUNK
        enc = tokenizer(
            split.texts[start:end],
            text_pair=split.text_pairs[start:end] if pairs else None,
            truncation=True, max_length=max_length, padding=False,
            return_attention_mask=False, return_token_type_ids=pairs, verbose=False,
        )
        ids.extend(enc["input_ids"])
        if pairs and "token_type_ids" in enc:
            types.extend(enc["token_type_ids"])
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    dtype = np.int32 if len(tokenizer) < 2**31 else np.int64
    flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(lengths.sum()))
    flat_types = np.fromiter((t for x in types for t in x), dtype=np.int8, count=int(lengths.sum())) if types else None
    return TokenizedSplit(
        tokens=flat,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        labels=np.asarray(split.labels, dtype=np.int64),
        pad_token_id=int(tokenizer.pad_token_id),
        token_type_ids=flat_types,
        num_at_max_length=int((lengths >= max_length).sum()),
    )


def tokenize_splits(
    data: ClassificationData, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, TokenizedSplit]:
    """`tokenize_split` over every split of `data`."""
    return {name: tokenize_split(split, tokenizer, max_length) for name, split in data.splits.items()}


def collate_classification(examples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids (b, t) with `pad_token_id`,
    attention_mask (b, t) 1 on tokens, labels (b,), and token_type_ids (b, t, padded 0)
    when the examples carry them."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    with_types = "token_type_ids" in examples[0]
    token_type_ids = torch.zeros((len(examples), width), dtype=torch.long) if with_types else None
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.as_tensor(np.asarray(ex["input_ids"], dtype=np.int64))
        attention_mask[row, :n] = 1
        if token_type_ids is not None:
            token_type_ids[row, :n] = torch.as_tensor(np.asarray(ex["token_type_ids"], dtype=np.int64))
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([int(ex["labels"]) for ex in examples], dtype=torch.long),
    }
    if token_type_ids is not None:
        out["token_type_ids"] = token_type_ids
    return out


# ---------------------------------------------------------------------------------------
# Training: length-bucketed, resumable, sharded over data-parallel ranks
# ---------------------------------------------------------------------------------------


class BucketedBatches(ShardedBatches):
    """Deterministic, resumable training batches of similar-length examples.

    Epoch e (steps [e * steps_per_epoch, (e + 1) * steps_per_epoch)):
      1. permute all examples with a generator seeded by (seed, e), dropping the last
         len % global_batch_size of the permutation (different ones each epoch);
      2. cut into mega-batches of `mega_batch_size` global batches and sort each by length
         (stable), so a global batch holds neighbours in length;
      3. cut into global batches and shuffle their order with the same generator, so
         lengths do not rise and fall with the step.
    Within a global batch the ranks and micro steps read `ShardedBatches`' slices: every
    rank reads micro_batch_size examples per micro step, the ranks of one micro step read
    neighbouring lengths (similar compute), and nothing is read twice in an epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        *,
        grad_accum: int = 1,
        mega_batch_size: int = 50,
    ):
        if mega_batch_size < 1:
            raise ValueError(f"mega_batch_size must be >= 1, got {mega_batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.mega_batch_size = mega_batch_size
        super().__init__(
            len(self.lengths), micro_batch_size, rank, world_size, seed, grad_accum=grad_accum,
            what="training examples", remedy="use more data (classification.max_train_examples) or a smaller batch",
        )

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.global_batch_size]
            mega = self.mega_batch_size * self.global_batch_size
            for start in range(0, len(order), mega):
                chunk = order[start : start + mega]
                order[start : start + mega] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches = order.reshape(self.steps_per_epoch, self.global_batch_size)
            self._epoch, self._order = epoch, batches[rng.permutation(self.steps_per_epoch)].reshape(-1)
        return self._order


# ---------------------------------------------------------------------------------------
# Evaluation: every example exactly once over all ranks, longest first
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalBatch:
    """One rank's eval batch: run the model on `indices`, score only the first `num_valid`.

    `num_valid < len(indices)` only for a filler: a rank with no example left in the last
    global batch still runs one (a repeat of the shortest example), because under ZeRO-3
    every rank must take part in every forward's parameter gathers. `TokenizedSplit.batch`
    labels it IGNORE_INDEX, so it adds nothing to the confusion matrix or the loss.
    """

    indices: list[int]
    num_valid: int


def eval_batches_by_length(
    lengths: Sequence[int] | np.ndarray, micro_batch_size: int, rank: int, world_size: int
) -> list[EvalBatch]:
    """This rank's eval batches. The split, sorted by length (longest first, so an
    out-of-memory shows on the first batch; ties by index), is cut into global batches of
    micro_batch_size x world_size, and rank r takes the r-th slice of each. The last,
    uneven global batch is dealt out as evenly as possible (ranks below
    remainder % world_size take one more); a rank left with none gets a filler. So every
    rank runs the same number of batches and the ranks' valid examples are exactly the
    split, each once: confusion matrices summed over ranks are exact.
    """
    if micro_batch_size < 1 or world_size < 1:
        raise ValueError(f"micro_batch_size ({micro_batch_size}) and world_size ({world_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        raise ValueError("cannot evaluate an empty split")
    order = np.argsort(-lengths, kind="stable")
    global_batch = micro_batch_size * world_size
    num_full, remainder = divmod(len(order), global_batch)
    batches = []
    for b in range(num_full):
        start = b * global_batch + rank * micro_batch_size
        batches.append(EvalBatch(order[start : start + micro_batch_size].tolist(), micro_batch_size))
    if remainder:
        base, extra = divmod(remainder, world_size)
        start = num_full * global_batch + rank * base + min(rank, extra)
        mine = order[start : start + base + (rank < extra)].tolist()
        batches.append(EvalBatch(mine, len(mine)) if mine else EvalBatch([int(order[-1])], 0))
    return batches
