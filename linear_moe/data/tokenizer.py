"""Tokenizers for preprocessing and for Megatron's GPTDataset: a byte tokenizer that needs no download, and a local
HF `tokenizer.json` through the optional `tokenizers` package.

Both expose what Megatron's dataset code reads: `vocab_size`, `eod`, `pad`, `unique_identifiers` (hashed into the
dataset cache name), plus `tokenize(text) -> list[int]`, `tokenize_array(text) -> np.ndarray` and
`detokenize(ids) -> str`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

# Megatron's "no pad token" id (megatron.core.datasets.megatron_dataset._PAD_TOKEN_ID): never present in the data,
# so GPTDataset masks nothing as padding.
NO_PAD = -1

# Looked up in this order in a tokenizer.json for the end-of-document token.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document 256; vocab_size 257.

    There is no pad id in the vocabulary: `pad` is -1, Megatron's sentinel for "no padding in the data".
    """

    vocab_size = 257
    eod = 256
    pad = NO_PAD

    def __init__(self) -> None:
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local HF `tokenizer.json` (the `tokenizers` package); eod is the first of EOD_CANDIDATES it defines."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} not found; use 'byte' or a path to tokenizer.json")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(
                f"tokenizer {str(path)!r} needs the optional 'tokenizers' package (pip install tokenizers); "
                "or use the 'byte' tokenizer") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        # tokenizers raises a bare Exception for a malformed file.
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"tokenizer file {str(path)!r} could not be loaded: {e}") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eod = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise ValueError(
                f"tokenizer {str(path)!r} defines no end-of-document token; looked for {', '.join(EOD_CANDIDATES)}")
        self.eod = eod
        self.pad = next((vocab[t] for t in PAD_CANDIDATES if t in vocab), NO_PAD)
        digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        self.unique_identifiers = {"class": type(self).__name__, "path": str(path.resolve()), "md5": digest}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenize(text), dtype=np.int32)

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'byte' or a path to a local tokenizer.json (the value of data.tokenizer / --tokenizer)."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
