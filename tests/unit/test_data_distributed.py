# Two CPU ranks (gloo): only rank 0 tokenises; rank 1 waits for it outside any collective
# (tokenising takes longer than the process group's timeout here) and opens the same cache.
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os

import pytest

from cald_scale.data import DataConfig, iter_documents, tokenise
from cald_scale.data.megatron import megatron_indexed

EOS = "<|endoftext|>"


def _worker(rank: int, world_size: int, init_file: str, tokenizer_dir: str, cfg: dict, out: str):
    import torch.distributed as dist
    from transformers import PreTrainedTokenizerFast

    from cald_scale.data import build_indexed_dataset

    import time
    from datetime import timedelta

    # A collective that waits longer than 3 s fails: rank 1 must not wait inside one.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=3)
    )
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        calls = []
        encode = tokenise._encode

        def slow_encode(tok, texts):
            if not calls:
                time.sleep(6)  # a corpus that takes longer to tokenise than the collective timeout
            calls.append(len(texts))
            return encode(tok, texts)

        tokenise._encode = slow_encode
        corpus = build_indexed_dataset(DataConfig(**cfg), tokenizer, is_rank0=rank == 0)
        dist.barrier()  # the group is still healthy
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"encoded": sum(calls), "corpus": dataclasses.asdict(corpus)}, f)
    finally:
        dist.destroy_process_group()


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
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, 2, str(tmp_path / "pg"), tokenizer_dir, cfg, str(tmp_path)),
        )
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]

    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0]["encoded"] == 60  # rank 0 tokenised every document once
    assert results[1]["encoded"] == 0  # rank 1 none
    assert results[0]["corpus"] == results[1]["corpus"]
    assert results[1]["corpus"]["num_train_docs"] == 54
