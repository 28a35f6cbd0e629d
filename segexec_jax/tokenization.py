"""Tokenizers: UTF-8 bytes by default, a Hugging Face `tokenizer.json`, or a SentencePiece
model. All expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size` and
`eos_id` (None where the tokenizer has none)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class TokenizerError(ValueError):
    """The tokenizer named in the config cannot be loaded or does not fit the model."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """Token i is byte i of the UTF-8 encoding: 256 ids, no unknowns, no training."""

    vocab_size = 256
    eos_id = None
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (no special tokens added on encode)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = str(path)
        self.eos_id = _special_id(path, self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _special_id(path: Path, tok) -> int | None:
    """The end-of-sequence id from a neighbouring tokenizer_config.json, else a common name."""
    names = []
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        names.append(eos.get("content") if isinstance(eos, dict) else eos)
    names += ["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"]
    for name in names:
        if name and tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return None


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        self.name = str(path)
        eos = self._sp.eos_id()
        self.eos_id = eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(spec: str, search: Path | None = None) -> Tokenizer:
    """`bytes`, a path to tokenizer.json / a SentencePiece .model, or a directory holding one
    (a converted checkpoint). Relative paths are also tried under `search`."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists() and search is not None and (search / spec).exists():
        path = search / spec
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise TokenizerError(f"config key 'data.tokenizer': tokenizer {spec!r} not found "
                             "(use 'bytes', a tokenizer.json, or a SentencePiece .model)")
    try:
        if path.suffix == ".json":
            return HFTokenizer(path)
        return SentencePieceTokenizer(path)
    except Exception as e:  # the libraries raise assorted types for damaged files
        raise TokenizerError(f"config key 'data.tokenizer': cannot load {str(path)!r}: {e}") from None


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(
            f"config key 'model.vocab_size': the tokenizer has {tokenizer.vocab_size} ids, "
            f"more than model.vocab_size={vocab_size}")
