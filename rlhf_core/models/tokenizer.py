"""Tokenizers: a byte-level BPE trained on the prepared corpus, or a model's own tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rlhf_core.data.tokenize import HH_CHAT_TEMPLATE
from rlhf_core.errors import RLHFError
from rlhf_core.models.loading import from_pretrained

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHAT_TEMPLATE = HH_CHAT_TEMPLATE  # the built-in tokenizer's, and any model's that has none


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE with digits split one by one (so arithmetic stays learnable) and pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def load_pretrained_tokenizer(name_or_path: str):
    """A model's own tokenizer; a pad token distinct from EOS is added when it has none."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, name_or_path, "tokenizer", "model.name_or_path", padding_side="left")
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise RLHFError(f"model.name_or_path={name_or_path!r}: the tokenizer needs bos and eos tokens")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise RLHFError(f"tokenizer not found: {path} (run `rlhf prepare` first)")
    return from_pretrained(AutoTokenizer, path, "tokenizer", padding_side="left")
