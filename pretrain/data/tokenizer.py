"""Byte-level BPE tokenizer (GPT-2 style) built with HF `tokenizers`.

Byte-level means every string maps to bytes before BPE, so there is no unknown token and
decode(encode(text)) == text for any unicode input. `<|endoftext|>` is the one special token; the
data pipeline appends it after every document so the model learns where documents end.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pretrain.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"

# 256 byte symbols + the EOS token: a smaller vocabulary cannot represent every input.
MIN_VOCAB_SIZE = 257


def train_tokenizer_from_iterator(texts: Iterable[str], vocab_size: int, out_path: Path) -> Tokenizer:
    """Train a byte-level BPE on `texts` and save it as a `tokenizer.json` at `out_path`."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the mapping exact: no space is invented in front of a document.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Seed the vocabulary with all 256 byte symbols, even those absent from the training text,
        # so that any later input can still be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return tok


def train_tokenizer(files: list[Path], vocab_size: int, out_path: Path) -> Tokenizer:
    """Train on plain-text files (each file's full content is one text) and save to `out_path`."""

    def texts():
        for f in files:
            yield Path(f).read_text(encoding="utf-8")

    return train_tokenizer_from_iterator(texts(), vocab_size, out_path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise DataError(f"{path} is not a valid tokenizers JSON file: {e}") from None


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS_TOKEN)
    if i is None:
        raise DataError(f"tokenizer has no {EOS_TOKEN} token, which the data pipeline uses as end-of-document")
    return i
