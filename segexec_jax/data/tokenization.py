"""Tokenizers: UTF-8 bytes by default, a Hugging Face `tokenizer.json`, or a SentencePiece
model. All expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eos_id`
(None where the tokenizer has none) and `chat_template` (None where there is none), the
Jinja template of a chat model, read from `chat_template.jinja` or `tokenizer_config.json`
beside the tokenizer file and applied by `apply_chat_template` as transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Protocol


class TokenizerError(ValueError):
    """The tokenizer named in the config cannot be loaded or does not fit the model."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """Token i is byte i of the UTF-8 encoding: 256 ids, no unknowns, no training."""

    vocab_size = 256
    eos_id = None
    chat_template = None
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
        config = _tokenizer_config(path.parent)
        self.special_tokens = _special_tokens(config)
        self.eos_id = _special_id(self._tok, self.special_tokens.get("eos_token"))
        self.chat_template = _chat_template(path.parent, config)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _tokenizer_config(directory: Path) -> dict:
    """tokenizer_config.json beside a tokenizer file ({} where there is none)."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: {e}") from None


def _special_tokens(config: dict) -> dict[str, str]:
    """{bos_token, eos_token, unk_token, pad_token: text} as tokenizer_config.json names them."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def _special_id(tok, eos: str | None) -> int | None:
    """The end-of-sequence id: tokenizer_config.json's eos_token, else a common name."""
    for name in [eos, "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"]:
        if name and tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return None


def _chat_template(directory: Path, config: dict) -> str | None:
    """chat_template.jinja beside the tokenizer, else tokenizer_config.json's `chat_template`
    (a string, or named templates of which `default` is taken)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) and template else None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render a chat template as transformers does: a sandboxed Jinja environment with
    trimmed blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` filter."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **variables)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"the chat template failed: {e}") from None


def apply_chat_template(tokenizer: Tokenizer, prompt: str, system: str | None = None) -> str:
    """The text a chat model expects for one user turn (and an optional system turn),
    ending with the assistant's generation prompt."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise TokenizerError(f"the tokenizer {getattr(tokenizer, 'name', '?')!r} has no chat template (no "
                             "chat_template.jinja, no 'chat_template' in tokenizer_config.json); drop --chat "
                             "or add one")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return render_chat(template, messages, add_generation_prompt=True, **getattr(tokenizer, "special_tokens", {}))


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        self.name = str(path)
        eos = self._sp.eos_id()
        self.eos_id = eos if eos >= 0 else None
        config = _tokenizer_config(path.parent)
        self.special_tokens = _special_tokens(config)
        self.chat_template = _chat_template(path.parent, config)

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
