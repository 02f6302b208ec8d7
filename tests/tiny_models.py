"""Tiny teachers built from configs: one per supported family, random but seeded weights;
a small byte-level BPE tokenizer trained on the spot (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    ElectraConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
)

FAMILY_CONFIGS = {
    "llama": lambda vocab, layers: LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
    ),
    "mistral": lambda vocab, layers: MistralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
    "qwen2": lambda vocab, layers: Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
    "gpt_neox": lambda vocab, layers: GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=512,
    ),
}


# Encoder families (the encoder track): bare encoders, as pretrained checkpoints like MiniLM are.
ENCODER_CONFIGS = {
    "bert": lambda vocab, layers: BertConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ),
    "roberta": lambda vocab, layers: RobertaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=130, pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ),
    # Embeddings narrower than the blocks, as ELECTRA-small's (128 -> 256): projected up.
    "electra": lambda vocab, layers: ElectraConfig(
        vocab_size=vocab, embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ),
}


def tiny_encoder(family: str, vocab: int = 256, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = ENCODER_CONFIGS[family](vocab, layers)
    config._attn_implementation = "sdpa"
    bare = {} if family == "electra" else {"add_pooling_layer": False}  # ELECTRA has no pooler
    return AutoModel.from_config(config, **bare).eval()


def save_tiny_encoder(folder: Path, family: str, tokenizer, layers: int = 3, seed: int = 0) -> Path:
    """A tiny pretrained-encoder folder (a bare BertModel/RobertaModel) with a real tokenizer."""
    model = tiny_encoder(family, vocab=len(tokenizer), layers=layers, seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_teacher(family: str, vocab: int = 256, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family](vocab, layers)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


def with_memory(student, seed: int = 0):
    """``student`` with mixers whose recurrent state carries the prompt into the logits.

    A fresh tiny student's states stay about 1e-6 (weights of std 0.02, mamba_ssm's dt init),
    below any test's tolerance: a decode that dropped the prompt's state generated the same
    tokens. Larger projections and dt about 1 make the state matter (0.6 in the logits). The
    conv's bias, zero as converted and not after training, is drawn too: at a left pad the conv
    then writes silu(bias) into the state unless the step masks its output.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mixer in student.mixers():
            for name, param in mixer.named_parameters():
                if name.endswith(("in_proj.weight", "x_proj.weight", "conv1d.weight")):
                    param.normal_(0.0, 0.3, generator=generator)
                elif name.endswith("conv1d.bias"):
                    param.normal_(0.0, 0.5, generator=generator)
                elif name.endswith(("dt_bias", "dt_proj.bias")):
                    param.fill_(0.5)
    return student


def save_tiny_teacher(folder: Path, family: str, tokenizer, layers: int = 3, seed: int = 0) -> Path:
    """A tiny teacher folder with a real tokenizer (vocab sized to the tokenizer)."""
    model = tiny_teacher(family, vocab=len(tokenizer), layers=layers, seed=seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with EOS as its eos token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


class CountingReader:
    """A weight reader that counts the bytes of each key it hands out, whole or by range (of
    the keys ``only`` when given)."""

    def __init__(self, reader, only: set[str] | None = None):
        self._reader, self._only, self.read = reader, only, {}

    @property
    def total(self) -> int:
        return sum(self.read.values())

    def keys(self):
        return self._reader.keys()

    def shape(self, key):
        return self._reader.shape(key)

    def _count(self, key, tensor):
        if self._only is None or key in self._only:
            self.read[key] = self.read.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor

    def get(self, key):
        return self._count(key, self._reader.get(key))

    def get_flat(self, key, start, stop):
        return self._count(key, self._reader.get_flat(key, start, stop))


def attention_read_by_ranks(config, open_reader, conversion, ranks: int = 3, checked: list[int] | None = None) -> list[float]:
    """Each of ``ranks`` ranks' (or of those ``checked``) share of the teacher's attention weights
    read while its student is built keeping ``1/ranks`` of each mixer weight (the range a ZeRO-3
    partition keeps, with a plain placement); what each keeps is checked equal to the whole
    conversion's."""
    import dataclasses

    from cald_scale.conversion.placement import PLAIN
    from cald_scale.conversion.surgery import attention_prefixes, build_student

    whole = build_student(config, open_reader(), conversion)
    prefixes = attention_prefixes(whole.backbone, whole.adapter)
    reader = open_reader()
    attention = {k: t.numel() * t.element_size() for k in reader.keys() if k.startswith(prefixes) and (t := reader.get(k)).dim() == 2}
    shares = []
    for rank in range(ranks) if checked is None else checked:

        def kept(tensor, rank=rank):
            size = -(-tensor.numel() // ranks)
            return min(rank * size, tensor.numel()), min((rank + 1) * size, tensor.numel())

        counting = CountingReader(open_reader())
        student = build_student(config, counting, conversion, placement=dataclasses.replace(PLAIN, kept=kept))
        for mine, ref in zip(student.mixers(), whole.mixers()):
            for (name, got), want in zip(mine.state_dict().items(), ref.state_dict().values()):
                start, stop = kept(got)
                assert torch.equal(got.reshape(-1)[start:stop], want.reshape(-1)[start:stop]), (conversion.mixer, rank, name)
        shares.append(sum(counting.read.get(k, 0) for k in attention) / sum(attention.values()))
    return shares
