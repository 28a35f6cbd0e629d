"""GGUF files (llama.cpp): metadata, tensors and tokenizer, seen as a Hugging Face model.

`GGUFModel(path)` reads a Llama-family GGUF and answers in Hugging Face terms, so that
`convert.from_gguf` can reuse the `from-hf` path unchanged:

  hf_config()      the config.json a Hugging Face Llama with these weights would have
  tensor(hf_name)  one tensor, dequantized to float32 and in Hugging Face layout
                   (llama.cpp's rotary row order of q/k undone)
  tokenizer()      tokenizer.json, tokenizer_config.json and the chat template

Tensors are dequantized one at a time from the memory-mapped file (`gguf.quants`:
F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, and whatever else the
installed `gguf` package can read back).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

SUPPORTED = ("llama",)

# Hugging Face name -> GGUF name, per layer and outside the layers
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's frequency scaling, stored as a tensor

# How text is split before BPE, by `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names).
_GPT2, _DIGITS, _LLAMA3 = "gpt2", "digits", "llama3"
PRE_TOKENIZERS = {None: _GPT2, "default": _GPT2, "gpt2": _GPT2, "gpt-2": _GPT2,
                  "smollm": _DIGITS, "starcoder": _DIGITS, "refact": _DIGITS,
                  "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type codes


class GGUFError(ValueError):
    """The GGUF file cannot be converted; the message names the key, tensor or type."""


def hf_to_gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise GGUFError(f"no GGUF tensor corresponds to {hf_name!r}")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Hugging Face Llama rotates the pair (i, i + D/2) of
    each head; llama.cpp's converter reorders every head's rows so that the pair becomes
    (2i, 2i + 1). Row 2i + j of a head in the file is row j * D/2 + i in Hugging Face."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field) -> Any:
    """A metadata value as Python: str, int, float, bool, or a list of them."""
    types = list(field.types)

    def scalar(kind, part):
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        value = np.asarray(part).reshape(-1)
        return value.tolist() if value.size != 1 else value[0].item()

    if types and types[0] == gguf.GGUFValueType.ARRAY:
        kind = types[-1]
        if kind == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not field.data:
            return []
        values = np.concatenate([np.asarray(field.parts[i]).reshape(-1) for i in field.data])
        return values.tolist()
    return scalar(types[0], field.parts[field.data[0]])


def _can_dequantize(qtype) -> bool:
    """Whether the installed gguf package can read this type back (tried on one zero block)."""
    try:
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


class GGUFModel:
    """A Llama-family GGUF file, read lazily (the file is memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        try:
            reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises assorted types for damaged files and unknown types
            raise GGUFError(f"{self.path}: not a readable GGUF file: {e}") from None
        try:
            self.metadata = {name: _field_value(f) for name, f in reader.fields.items()}
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: a metadata string is not UTF-8: {e}") from None
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in SUPPORTED:
            raise GGUFError(f"{self.path}: unsupported GGUF architecture {self.arch!r}; supported: "
                            f"{', '.join(SUPPORTED)}")
        self._heads: tuple[int, int] | None = None

    # ----------------------------------------------------------------------- metadata

    def _key(self, name: str, default: Any = KeyError) -> Any:
        key = f"{self.arch}.{name}"
        if key in self.metadata:
            return self.metadata[key]
        if default is KeyError:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return default

    def hf_config(self) -> dict:
        """The Hugging Face config.json of a Llama with these weights."""
        heads = int(self._key("attention.head_count"))
        kv = self._key("attention.head_count_kv", heads)
        if isinstance(kv, list):  # per-layer counts: only a uniform model is a Llama
            if len(set(kv)) != 1:
                raise GGUFError(f"{self.path}: {self.arch}.attention.head_count_kv differs between layers ({kv})")
            kv = kv[0]
        d = int(self._key("embedding_length"))
        head_dim = int(self._key("attention.key_length", d // heads))
        rot = int(self._key("rope.dimension_count", head_dim))
        if rot != head_dim:
            raise GGUFError(f"{self.path}: {self.arch}.rope.dimension_count={rot} rotates part of a head "
                            f"(head size {head_dim}); unsupported")
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        embed = self.tensors.get("token_embd.weight")
        vocab = self._key("vocab_size", len(tokens) if tokens else int(embed.shape[-1]) if embed is not None else None)
        if vocab is None:
            raise GGUFError(f"{self.path}: cannot tell the vocabulary size ({self.arch}.vocab_size, "
                            "tokenizer.ggml.tokens and token_embd.weight are all missing)")
        theta = float(self._key("rope.freq_base", 10000.0))
        hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=int(vocab), hidden_size=d,
                  intermediate_size=int(self._key("feed_forward_length")),
                  num_hidden_layers=int(self._key("block_count")), num_attention_heads=heads,
                  num_key_value_heads=int(kv), head_dim=head_dim,
                  rms_norm_eps=float(self._key("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
                  max_position_embeddings=int(self._key("context_length", 4096)),
                  tie_word_embeddings="output.weight" not in self.tensors,
                  attention_bias="blk.0.attn_q.bias" in self.tensors, hidden_act="silu", torch_dtype="float32")
        scaling = self._rope_scaling(theta, head_dim)
        if scaling:
            hf["rope_scaling"] = scaling
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            if f"tokenizer.ggml.{key}" in self.metadata:
                hf[key.replace("padding", "pad")] = int(self.metadata[f"tokenizer.ggml.{key}"])
        self._heads = (heads, int(kv))
        return hf

    def _rope_scaling(self, theta: float, head_dim: int) -> dict:
        kind = self._key("rope.scaling.type", None)
        factor = self._key("rope.scaling.factor", self._key("rope.scale_linear", None))
        if ROPE_FREQS in self.tensors:
            if kind not in (None, "none"):
                raise GGUFError(f"{self.path}: both {ROPE_FREQS} and {self.arch}.rope.scaling.type={kind!r}")
            return self._llama3_scaling(theta, head_dim)
        if kind in (None, "none") and factor in (None, 1.0):
            return {}
        if kind in (None, "linear"):
            return {"rope_type": "linear", "factor": float(factor)}
        raise GGUFError(f"{self.path}: unsupported rope scaling {self.arch}.rope.scaling.type={kind!r} "
                        "(supported: none, linear, and Llama 3's rope_freqs)")

    def _llama3_scaling(self, theta: float, head_dim: int) -> dict:
        """Llama 3.1's scaling from the per-frequency divisors llama.cpp stores in rope_freqs.

        Llama 3's rule divides long wavelengths by `factor`, keeps short ones, and blends
        linearly in 1/wavelength between: divisor = 1 / ((1 - s) / factor + s) with
        s = (old / wavelength - low) / (high - low). The divisors fix `factor` and the line
        s(1/wavelength) only, so `original_max_position_embeddings` is taken from the file
        (or 8192) and the low/high factors solved from the line: the frequencies are exact.
        """
        from ..model.rope import inverse_frequencies

        div = np.asarray(self.tensor_raw(ROPE_FREQS), np.float64).reshape(-1)
        inv = inverse_frequencies(head_dim, theta)
        if div.shape != inv.shape:
            raise GGUFError(f"{self.path}: {ROPE_FREQS} has {div.size} entries, the head needs {inv.size}")
        if np.allclose(div, 1.0, rtol=0, atol=1e-7):
            return {}
        factor = float(div.max())
        x = inv / (2 * np.pi)  # 1 / wavelength
        s = (1 / div - 1 / factor) / (1 - 1 / factor)  # the blend weight each divisor implies
        ones, full = div <= 1 + 1e-6, div >= factor * (1 - 1e-6)
        mid = ~ones & ~full
        if not ones.any() and not mid.any():  # every frequency divided: linear scaling
            return {"rope_type": "linear", "factor": factor}
        if mid.sum() >= 2:
            a, b = np.polyfit(x[mid], s[mid], 1)  # s = a x + b
        else:  # too few blended frequencies to fit: any line through them that keeps the ends works
            x_lo = x[full].max() if full.any() else None  # the highest fully divided frequency: s <= 0
            x_hi = x[ones].min() if ones.any() else None  # the lowest kept frequency: s >= 1
            if mid.any():
                xm, sm = x[mid][0], s[mid][0]
                slopes = ([sm / (xm - x_lo)] if x_lo is not None else []) + \
                         ([(1 - sm) / (x_hi - xm)] if x_hi is not None else [])
                a = max(slopes, default=1 / xm)
                b = sm - a * xm
            else:
                a = 1 / (x_hi - x_lo)
                b = -a * x_lo
        old = float(self._key("rope.scaling.original_context_length", 8192))
        width = old / a  # high - low, from s = old * x / (high - low) - low / (high - low)
        low = -b * width
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                   "high_freq_factor": float(low + width), "original_max_position_embeddings": int(old)}
        got = inv / inverse_frequencies(head_dim, theta, scaling)
        if not np.allclose(got, div, rtol=1e-5, atol=0):
            raise GGUFError(f"{self.path}: {ROPE_FREQS} does not follow Llama 3's frequency scaling "
                            f"(largest mismatch {np.abs(got / div - 1).max():.2e})")
        return scaling

    # ----------------------------------------------------------------------- tensors

    def check(self, hf_names_shapes: list[tuple[str, tuple[int, ...]]]) -> None:
        """Every tensor the config needs is present, of that shape and of a readable type, and
        the file holds no tensor that this mapping would leave out."""
        wanted = set()
        unreadable: dict[str, str] = {}
        readable: dict = {}
        for hf_name, shape in hf_names_shapes:
            name = hf_to_gguf_name(hf_name)
            wanted.add(name)
            t = self.tensors.get(name)
            if t is None:
                raise GGUFError(f"{self.path}: missing tensor {name!r} (for {hf_name})")
            got = tuple(int(n) for n in reversed(t.shape.tolist()))
            if got != tuple(shape):
                raise GGUFError(f"{self.path}: tensor {name!r} has shape {got}, the config needs {tuple(shape)}")
            if t.tensor_type not in readable:
                readable[t.tensor_type] = _can_dequantize(t.tensor_type)
            if not readable[t.tensor_type]:
                unreadable.setdefault(t.tensor_type.name, name)
        if unreadable:
            kind, name = next(iter(unreadable.items()))
            raise GGUFError(f"{self.path}: tensor {name!r} has type {kind}, which the installed gguf package "
                            f"cannot dequantize (types in question: {', '.join(unreadable)})")
        extra = sorted(set(self.tensors) - wanted - {ROPE_FREQS})
        if extra:
            raise GGUFError(f"{self.path}: unexpected tensor {extra[0]!r} for a {self.arch} model"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

    def tensor_raw(self, gguf_name: str) -> np.ndarray:
        """One tensor dequantized to float32, in the file's row order (numpy shape: the
        reverse of GGUF's dimension list, i.e. Hugging Face's [out, in])."""
        t = self.tensors[gguf_name]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {gguf_name!r} has type {t.tensor_type.name}, which the installed "
                            "gguf package cannot dequantize") from None
        return np.asarray(w, np.float32).reshape(shape)

    def tensor(self, hf_name: str) -> np.ndarray:
        """One tensor as Hugging Face stores it (float32)."""
        if self._heads is None:
            self.hf_config()
        w = self.tensor_raw(hf_to_gguf_name(hf_name))
        heads, kv = self._heads
        if ".q_proj." in hf_name:
            w = unpermute_rope_rows(w, heads)
        elif ".k_proj." in hf_name:
            w = unpermute_rope_rows(w, kv)
        return w

    # ----------------------------------------------------------------------- tokenizer

    def tokenizer(self) -> dict[str, str]:
        """{file name: text} of a Hugging Face tokenizer: tokenizer.json, tokenizer_config.json
        and, where the file has one, chat_template.jinja."""
        md = self.metadata
        model = md.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in md:
            raise GGUFError(f"{self.path}: the file holds no tokenizer (tokenizer.ggml.model / tokens missing)")
        if model != "gpt2":
            raise GGUFError(f"{self.path}: unsupported tokenizer model tokenizer.ggml.model={model!r} "
                            "(supported: 'gpt2', byte-level BPE)")
        pre = md.get("tokenizer.ggml.pre")
        if pre not in PRE_TOKENIZERS:
            known = ", ".join(sorted(str(k) for k in PRE_TOKENIZERS if k))
            raise GGUFError(f"{self.path}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} (supported: {known})")
        tok = _byte_level_bpe(md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.merges") or [],
                              md.get("tokenizer.ggml.token_type") or [], PRE_TOKENIZERS[pre],
                              bool(md.get("tokenizer.ggml.add_space_prefix", False)))
        tokens = md["tokenizer.ggml.tokens"]

        def token(key):
            i = md.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False))
        if add_bos and token("bos_token_id") is not None:
            from tokenizers import processors

            bos = token("bos_token_id")
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, md["tokenizer.ggml.bos_token_id"])])
        template = md.get("tokenizer.chat_template")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos_token_id"),
                  "eos_token": token("eos_token_id"), "unk_token": token("unknown_token_id"),
                  "pad_token": token("padding_token_id"), "add_bos_token": add_bos,
                  "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
                  "clean_up_tokenization_spaces": False,
                  "model_max_length": int(self._key("context_length", 4096))}
        config = {k: v for k, v in config.items() if v is not None}
        files = {"tokenizer.json": tok.to_str(), "tokenizer_config.json": None}
        if template:
            config["chat_template"] = template
            files["chat_template.jinja"] = template
        files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False)
        return files


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], split: str, prefix_space: bool):
    """A `tokenizers` byte-level BPE with llama.cpp's vocabulary, merges and splitting rule;
    control tokens become special added tokens, user-defined ones plain added tokens (both
    matched whole in the text, as llama.cpp does)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated token keeps its first id
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFError(f"damaged merge {m!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                               ignore_merges=split == _LLAMA3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=split != _LLAMA3)
    if split == _DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split == _LLAMA3:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kinds = list(types) + [1] * (len(tokens) - len(types))
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, kinds) if k == _USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok
