# Two CPU ranks (gloo): only rank 0 tokenises; rank 1 waits for it outside any collective
# (tokenising takes longer than the process group's timeout here) and opens the same cache.
from __future__ import annotations

import dataclasses
import json

import pytest
from gloo_ranks import run_on_ranks

from cald_scale.data import DataConfig, iter_documents, tokenise
from cald_scale.data.megatron import megatron_indexed

EOS = "<|endoftext|>"


def _worker(rank: int, tokenizer_dir: str, cfg: dict) -> dict:
    """One rank building the corpus; rank 0's first encode call outlasts the group's 5 s timeout."""
    import time

    import torch.distributed as dist
    from transformers import PreTrainedTokenizerFast

    from cald_scale.data import build_indexed_dataset

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    calls = []
    encode = tokenise._encode

    def slow_encode(tok, texts):
        if not calls:
            time.sleep(10)  # a corpus that takes longer to tokenise than the collective timeout
        calls.append(len(texts))
        return encode(tok, texts)

    tokenise._encode = slow_encode
    corpus = build_indexed_dataset(DataConfig(**cfg), tokenizer, is_rank0=rank == 0)
    dist.barrier()  # the group is still healthy
    return {"encoded": sum(calls), "corpus": dataclasses.asdict(corpus)}


@pytest.fixture(autouse=True)
def _no_process_group_left():
    yield
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())


def test_only_rank0_tokenises(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    leads = list(iter_documents(DataConfig(corpus="wiki")))[:60]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        leads,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer_dir = str(tmp_path / "tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(tokenizer_dir)
    corpus = tmp_path / "leads.jsonl"
    corpus.write_text("".join(json.dumps({"text": lead}) + "\n" for lead in leads))
    cfg = {"corpus": str(corpus), "cache_dir": str(tmp_path / "cache"), "eval_fraction": 0.1}

    # NOTE: fork, after importing what the ranks need here: a fresh interpreter spends
    # ~8 s importing megatron.core, and tests share 2 cores.
    megatron_indexed()
    # A collective that waits longer than 5 s fails: rank 1 must not wait inside one (rank 0 waits
    # under 1 s in the last barrier, for rank 1's poll of the cache).
    results = run_on_ranks(_worker, tmp_path / "ranks", tokenizer_dir, cfg, start="fork", timeout_s=5)
    assert results[0]["encoded"] == 60  # rank 0 tokenised every document once
    assert results[1]["encoded"] == 0  # rank 1 none
    assert results[0]["corpus"] == results[1]["corpus"]
    assert results[1]["corpus"]["num_train_docs"] == 54
