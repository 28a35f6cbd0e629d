"""Hugging Face and GGUF Llama-family import, Hugging Face export, one tensor at a time
(the command line: `python -m segexec_jax.convert`, segexec_jax/convert.py).

Supported: Llama, Llama-2, Llama-3 (with its `rope_scaling`), Mistral and Qwen2 (q/k/v
biases); tied or untied embeddings; single or sharded safetensors; llama.cpp GGUF files of
the `llama` architecture (every tensor type the `gguf` package dequantizes, byte-level BPE
tokenizers). A converted checkpoint is a directory the rest of the package reads like a
run directory (`load_checkpoint`, `infer.py`, `eval`, `train.init_from`):

  config.yaml          our config (model shape and segment defaults, overridable)
  meta.json            format, the source config.json, each tensor's layout
  params*.safetensors  our parameters, one tensor per layer ("blocks.wq.3"), [+ index]
  tokenizer files      copied from the Hugging Face directory (or built from the GGUF's
                       metadata), with the chat template; used by train/infer/eval

Host memory stays near the largest tensor: tensors are read (dequantized), transposed and
written one at a time. `from-hf` then `to-hf` reproduces every tensor exactly. A GGUF goes
through the same path: `gguf_io.GGUFModel` presents it as a Hugging Face model (its
config.json, its tensors in Hugging Face layout), written in float32 unless
`model.param_dtype` says otherwise.

`to-hf` writes what Hugging Face's config fields cannot say (the segment, attention and
inference sections, the compute dtype, the model keys Llama's config lacks) into a
`segexec` block of config.json, which `from-hf` reads back: `to-hf` then `from-hf` returns
the same config. A byte-level model gets a byte-level tokenizer.json that transformers
loads, a trained run the tokenizer files it trained with. transformers runs the exported
model with full causal attention, so a segmented model gets a `FullAttentionWarning`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml

from ..config import Config, ConfigError, config_from_dict, load_config
from . import safetensors_io as st

FORMAT = "segexec_jax/safetensors-1"
SUPPORTED = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
HF_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


class ConvertError(ValueError):
    """The model cannot be converted; the message says which tensor or field is wrong."""


class FullAttentionWarning(UserWarning):
    """An exported segmented model will run with full attention under transformers."""


# --------------------------------------------------------------------------- configs

PAPER_LONG_LAYERS = (6, 8, 11, 18)  # of LLaMA-2-7B's 32 layers


def default_segment(n_layers: int, context: int | None) -> dict:
    """Segment settings a converted model starts with, until `calibrate` picks its heads.

    - S, M, R: the paper's 4096 / 512 / 512, halved together until S + max(M + sinks, R)
      fits the native context: run segmented without training, the model then never meets
      a position it was not trained on (LLaMA-2's 4K context gets 2048 / 256 / 256; the
      paper's recipe file sets its own values for training).
    - Long-range layers: the paper's {6, 8, 11, 18} of 32, at the same relative depths.
    - Long-range heads: KV group 0 of those layers only, written as a per-layer map. A plain
      list would make its groups segment-only heads (no tail) in every other layer too;
      with few KV groups the paper's four placeholder heads were every group (SmolLM2 has
      3), so no head anywhere kept a tail. Group 0 is a placeholder: the map keeps every
      other (layer, group) a tail head until calibration names the real retrieval heads.
    - Sinks 4: a model trained with full attention needs them when run segmented (SmolLM2
      answers no passkey at 1K without sinks, every one with 4).
    """
    S, M, R, sinks = 4096, 512, 512, 4
    while context and S > 64 and S + max(M + sinks, R) > context:
        S, M, R = S // 2, M // 2, R // 2
    layers = sorted({min(n_layers - 1, round(x * n_layers / 32)) for x in PAPER_LONG_LAYERS})
    return dict(len=S, tail=M, long_layers=layers, long_heads={layer: [0] for layer in layers}, sinks=sinks,
                retrieval=dict(budget=R, query_window=min(64, S), block_size=min(64, R)))


def config_from_hf(hf: dict, overrides: list[str] = ()) -> Config:
    model_type = hf.get("model_type") or ""
    if model_type not in SUPPORTED:
        arch = (hf.get("architectures") or [model_type or "unknown"])[0]
        raise ConvertError(f"unsupported architecture {arch!r} (model_type {model_type!r}); "
                           f"supported: {', '.join(SUPPORTED)}")
    if hf.get("mlp_bias"):
        raise ConvertError("unsupported: mlp_bias=true")
    rope = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = dict(hf.get("rope_scaling") or {})
    if not scaling and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("linear", "llama3", "default"):
        raise ConvertError(f"unsupported rope scaling {scaling}")
    scaling = {k: v for k, v in scaling.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    dtype = HF_DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), "float32")
    L = hf["num_hidden_layers"]
    preset = load_config("llama2_7b").to_dict()["segment"]  # the paper's segment defaults (policy, K)
    ours = default_segment(L, hf.get("max_position_embeddings"))
    data = {
        "model": dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=L, n_heads=heads,
                      n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                      d_ff=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      dtype="bfloat16", param_dtype=dtype, rope_theta=float(theta),
                      rope_scaling=scaling if scaling.get("rope_type", scaling.get("type")) not in (None, "default") else {},
                      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                      qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False))),
        "segment": dict(preset, **dict(ours, retrieval=dict(preset["retrieval"], **ours["retrieval"]))),
        "inference": {"max_len": int(hf.get("max_position_embeddings", 32768))},
    }
    _apply_segexec_block(data, hf)
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConvertError(f"the converted config is invalid: {e}") from None


# Model keys a Hugging Face Llama config has no field for (head_dim: null or a number, where
# config.json always holds the number; param_dtype is config.json's torch_dtype, repeated).
SEGEXEC_MODEL_KEYS = ("dtype", "param_dtype", "head_dim", "init_std", "remat")
SEGEXEC_SECTIONS = ("segment", "attention", "inference")


def segexec_block(cfg: Config, tokenizer: str | None = None) -> dict:
    """Our settings that config.json's Hugging Face fields do not carry, written into it as
    `"segexec": {...}` by `to-hf` and read back by `from-hf` (`_apply_segexec_block`).
    transformers keeps unknown config.json keys, so a model saved again keeps the block."""
    data = cfg.to_dict()
    block = {"model": {k: data["model"][k] for k in SEGEXEC_MODEL_KEYS}}
    block.update({section: data[section] for section in SEGEXEC_SECTIONS})
    if tokenizer == "bytes":  # data.tokenizer: the exported tokenizer.json stands for ByteTokenizer
        block["tokenizer"] = "bytes"
    return block


def _apply_segexec_block(data: dict, hf: dict) -> None:
    """Our settings from config.json's `segexec` block (written by `to-hf`), over the defaults
    `config_from_hf` derived: each key given replaces the derived one (`segment.retrieval`
    key by key), so a block written by hand may hold only some keys."""
    block = hf.get("segexec")
    if block is None:
        return
    if not isinstance(block, dict):
        raise ConvertError(f"config.json: 'segexec' must be a mapping, got {block!r}")
    for section, values in block.items():
        if section == "tokenizer":
            continue
        if section not in ("model",) + SEGEXEC_SECTIONS or not isinstance(values, dict):
            raise ConvertError(f"config.json: bad 'segexec.{section}' (a mapping under one of: model, "
                               f"{', '.join(SEGEXEC_SECTIONS)}, or 'tokenizer')")
        values = dict(values)
        if section == "model" and "head_dim" in values and values["head_dim"] is None:
            if data["model"]["head_dim"] * data["model"]["n_heads"] != data["model"]["d_model"]:
                del values["head_dim"]  # null means d_model // n_heads; config.json's number says otherwise
        target = data.setdefault(section, {})
        if isinstance(values.get("retrieval"), dict) and isinstance(target.get("retrieval"), dict):
            values["retrieval"] = dict(target["retrieval"], **values["retrieval"])
        target.update(values)


def hf_config_from(cfg: Config, model_type: str = "llama") -> dict:
    """A config.json for a model that did not come from Hugging Face."""
    m = cfg.model
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    out = dict(architectures=[arch], model_type=model_type, vocab_size=m.vocab_size, hidden_size=m.d_model,
               num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
               head_dim=m.dim_head, intermediate_size=m.d_ff, tie_word_embeddings=m.tie_embeddings,
               rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, hidden_act="silu",
               max_position_embeddings=cfg.inference.max_len, torch_dtype=m.param_dtype,
               attention_bias=m.qkv_bias and model_type != "qwen2")
    if m.rope_scaling:
        out["rope_scaling"] = dict(m.rope_scaling)
    return out


# --------------------------------------------------------------------------- tensor layouts


def _hf_names(cfg: Config) -> list[tuple[str, str, int | None]]:
    """(hf name, our parameter, layer) for every tensor, in writing order."""
    m = cfg.model
    out = [("model.embed_tokens.weight", "embed", None)]
    for i in range(m.n_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", "attn_norm.scale", i),
                (p + "self_attn.q_proj.weight", "wq", i), (p + "self_attn.k_proj.weight", "wk", i),
                (p + "self_attn.v_proj.weight", "wv", i), (p + "self_attn.o_proj.weight", "wo", i)]
        if m.qkv_bias:
            out += [(p + "self_attn.q_proj.bias", "bq", i), (p + "self_attn.k_proj.bias", "bk", i),
                    (p + "self_attn.v_proj.bias", "bv", i)]
        out += [(p + "post_attention_layernorm.weight", "mlp_norm.scale", i),
                (p + "mlp.gate_proj.weight", "w_gate", i), (p + "mlp.up_proj.weight", "w_up", i),
                (p + "mlp.down_proj.weight", "w_down", i)]
    out.append(("model.norm.weight", "final_norm.scale", None))
    if not m.tie_embeddings:
        out.append(("lm_head.weight", "unembed", None))
    return out


def _ours(name: str, layer: int | None) -> str:
    return name if layer is None else f"blocks.{name}.{layer}"


def _to_ours(cfg: Config, param: str, w: np.ndarray) -> np.ndarray:
    """A Hugging Face tensor in our layout (exact: transposes and reshapes only)."""
    m = cfg.model
    H, G, D, d = m.n_heads, m.n_kv_heads, m.dim_head, m.d_model
    if param == "wq":
        return w.T.reshape(d, H, D)
    if param in ("wk", "wv"):
        return w.T.reshape(d, G, D)
    if param == "wo":
        return w.T.reshape(H, D, d)
    if param == "bq":
        return w.reshape(H, D)
    if param in ("bk", "bv"):
        return w.reshape(G, D)
    if param in ("w_gate", "w_up", "w_down", "unembed"):
        return w.T
    return w


def _to_hf(cfg: Config, param: str, w: np.ndarray) -> np.ndarray:
    m = cfg.model
    H, G, D, d = m.n_heads, m.n_kv_heads, m.dim_head, m.d_model
    if param == "wq":
        return w.reshape(d, H * D).T
    if param in ("wk", "wv"):
        return w.reshape(d, G * D).T
    if param == "wo":
        return w.reshape(H * D, d).T
    if param in ("bq", "bk", "bv"):
        return w.reshape(-1)
    if param in ("w_gate", "w_up", "w_down", "unembed"):
        return w.T
    return w


def _our_shape(cfg: Config, param: str) -> tuple[int, ...]:
    m = cfg.model
    H, G, D, d, F, V = m.n_heads, m.n_kv_heads, m.dim_head, m.d_model, m.d_ff, m.vocab_size
    return {"embed": (V, d), "attn_norm.scale": (d,), "mlp_norm.scale": (d,), "final_norm.scale": (d,),
            "wq": (d, H, D), "wk": (d, G, D), "wv": (d, G, D), "wo": (H, D, d), "bq": (H, D), "bk": (G, D),
            "bv": (G, D), "w_gate": (d, F), "w_up": (d, F), "w_down": (F, d), "unembed": (d, V)}[param]


def _hf_shape(cfg: Config, param: str) -> tuple[int, ...]:
    return tuple(_to_hf(cfg, param, np.zeros(_our_shape(cfg, param), np.int8)).shape)


# --------------------------------------------------------------------------- from / to Hugging Face


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, mult in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def from_hf(hf_dir: str | Path, out: str | Path, overrides: list[str] = (), max_shard_bytes: int = 5 * 2**30) -> Config:
    hf_dir, out = Path(hf_dir), Path(out)
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{hf_dir}: cannot read config.json: {e}") from None
    cfg = config_from_hf(hf, list(overrides))
    try:
        reader = st.Reader.open(hf_dir)
    except st.SafetensorsError as e:
        raise ConvertError(str(e)) from None
    names = _hf_names(cfg)
    for hf_name, param, _ in names:
        if hf_name not in reader.where:
            raise ConvertError(f"missing tensor {hf_name!r} in {hf_dir}")
        got, want = tuple(reader.info(hf_name)["shape"]), _hf_shape(cfg, param)
        if got != want:
            raise ConvertError(f"tensor {hf_name!r} has shape {got}, the config needs {want}")
    # every tensor keeps the dtype it has in the checkpoint (exact round trips)
    dtypes = [np.dtype(st.DTYPES[reader.info(hf_name)["dtype"]]) for hf_name, _, _ in names]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    for f in TOKENIZER_FILES:
        if (hf_dir / f).is_file():
            shutil.copy(hf_dir / f, out / f)
            if f in ("tokenizer.json", "tokenizer.model") and tokenizer is None:
                tokenizer = f
    if (hf.get("segexec") or {}).get("tokenizer") == "bytes":
        tokenizer = None  # our own export of a byte-level model: ByteTokenizer itself (same ids)
    return _write_converted(out, cfg, hf, reader.__getitem__, dtypes, tokenizer, {"source": "huggingface"},
                            max_shard_bytes)


def from_gguf(path: str | Path, out: str | Path, overrides: list[str] = (), max_shard_bytes: int = 5 * 2**30) -> Config:
    """A llama.cpp GGUF file -> a converted checkpoint, through the Hugging Face path: the
    file's metadata becomes a config.json, each tensor is dequantized (float32) and its
    q/k rows put back in Hugging Face order, and the tokenizer is rebuilt as tokenizer.json.
    Parameters are written in `model.param_dtype` (float32 unless overridden)."""
    from .gguf_io import GGUFError, GGUFModel

    path, out = Path(path), Path(out)
    try:
        model = GGUFModel(path)
        hf = model.hf_config()
        cfg = config_from_hf(hf, list(overrides))
        model.check([(hf_name, _hf_shape(cfg, param)) for hf_name, param, _ in _hf_names(cfg)])
        tokenizer_files = model.tokenizer()
    except GGUFError as e:
        raise ConvertError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files.items():
        (out / name).write_text(text, encoding="utf-8")
    dtype = np.dtype(ml_dtypes.bfloat16) if cfg.model.param_dtype == "bfloat16" else np.dtype(cfg.model.param_dtype)
    types: dict[str, int] = {}
    for t in model.tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    source = {"source": "gguf", "gguf": {"file": path.name, "name": model.metadata.get("general.name"),
                                         "architecture": model.arch, "tensor_types": types}}
    try:
        return _write_converted(out, cfg, hf, model.tensor, [dtype] * len(_hf_names(cfg)), "tokenizer.json", source,
                                max_shard_bytes)
    except GGUFError as e:
        raise ConvertError(str(e)) from None


def _write_converted(out: Path, cfg: Config, hf: dict, read: Callable[[str], np.ndarray], dtypes: list[np.dtype],
                     tokenizer: str | None, source: dict, max_shard_bytes: int) -> Config:
    """Write a converted checkpoint from Hugging Face tensors (`read(hf_name)`, one at a time):
    our parameters in `dtypes`, config.yaml and meta.json. Tokenizer files are already in `out`."""
    names = _hf_names(cfg)
    specs = [(_ours(param, layer), dtypes[i], _our_shape(cfg, param)) for i, (_, param, layer) in enumerate(names)]

    def tensors() -> Iterator[np.ndarray]:
        for hf_name, param, _ in names:
            yield _to_ours(cfg, param, read(hf_name))

    out.mkdir(parents=True, exist_ok=True)
    st.write(out, "params", specs, tensors(), max_shard_bytes=max_shard_bytes)
    cfg = config_from_dict(cfg.to_dict(), [f"model.param_dtype={_dtype_name(dtypes[0])}"])
    data = cfg.to_dict()
    if tokenizer:
        data["data"]["tokenizer"] = str(out.resolve())
    (out / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    meta = {"format": FORMAT, **source, "hf_config": hf, "tokenizer": tokenizer or "bytes",
            "params": {name: {"dtype": _dtype_name(dt), "shape": list(shape)} for name, dt, shape in specs}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return cfg


def _dtype_name(dt) -> str:
    return "bfloat16" if np.dtype(dt) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dt).name


def is_converted(path: str | Path) -> bool:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except json.JSONDecodeError:
        return False


def _open_converted(path: Path) -> tuple[Config, dict, st.Reader]:
    """(config, meta, parameter reader) of a converted checkpoint."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
        reader = st.Reader.open(path, "params")
    except (OSError, json.JSONDecodeError, yaml.YAMLError, st.SafetensorsError) as e:
        raise ConvertError(f"{path}: damaged converted checkpoint: {e}") from None
    return cfg, meta, reader


def _set(tree: dict, param: str, value) -> None:
    node, *rest = param.split(".")
    if rest:
        tree.setdefault(node, {})[rest[0]] = value
    else:
        tree[node] = value


def _leaf(tree: dict, param: str):
    node, *rest = param.split(".")
    return tree[node][rest[0]] if rest else tree[node]


def read_converted(path: str | Path) -> tuple[Config, dict, dict]:
    """(config, meta, parameters as numpy, stacked over layers) of a converted checkpoint."""
    cfg, meta, reader = _open_converted(Path(path))
    params: dict = {"blocks": {}}
    for _, param, layer in _hf_names(cfg):
        if layer is None:
            _set(params, param, reader[param])
        elif layer == 0:
            _set(params["blocks"], param, np.stack([reader[_ours(param, i)] for i in range(cfg.model.n_layers)]))
    return cfg, meta, params


def _our_tensors(path: Path, trained: tuple[Config, dict, dict] | None) -> tuple[Config, dict, callable]:
    """(config, meta, get(name, layer) -> numpy) for a converted checkpoint, or for a trained
    one given as `trained` = (config, meta, params) (restored whole, written tensor by tensor)."""
    if is_converted(path):
        cfg, meta, reader = _open_converted(path)
        return cfg, meta, lambda param, layer: reader[_ours(param, layer)]
    if trained is None:
        raise ConvertError(f"{path} is not a converted checkpoint: export a trained run with "
                           "segexec_jax.convert.to_hf, which restores it first")
    cfg, meta, params = trained

    def get(param, layer):
        if layer is None:
            return np.asarray(_leaf(params, param))
        return np.asarray(_leaf(params["blocks"], param)[layer])

    return cfg, meta, get


def _tensor_dtypes(meta: dict, names, get) -> list[np.dtype]:
    recorded = meta.get("params", {})
    out = []
    for _, param, layer in names:
        rec = recorded.get(_ours(param, layer), {}).get("dtype")
        if rec in ("bfloat16", "float16", "float32", "float64"):
            out.append(np.dtype(ml_dtypes.bfloat16) if rec == "bfloat16" else np.dtype(rec))
        else:  # a trained checkpoint: ask the tensor (one at a time)
            out.append(get(param, layer).dtype)
    return out


def _byte_chars() -> list[str]:
    """The printable character that stands for each byte in a byte-level BPE vocabulary
    (the alphabet of `tokenizers.pre_tokenizers.ByteLevel`): printable Latin-1 bytes stand
    for themselves, the others (controls, space, 0x7f-0xa0, 0xad) for U+0100 onwards, in
    byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0
    for b in range(256):
        out.append(chr(b) if b in printable else chr(0x100 + extra))
        extra += b not in printable
    return out


def byte_tokenizer_files(max_len: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json of `tokenization.ByteTokenizer` for
    transformers: id b is byte b of the UTF-8 text (no special tokens, none added), decoding
    joins the bytes back (invalid UTF-8 becomes U+FFFD, as ByteTokenizer.decode does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from ..data.tokenization import ByteTokenizer

    chars = _byte_chars()
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(chars)}, merges=[]))  # no merges: one id a byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    assert tok.get_vocab_size() == ByteTokenizer.vocab_size
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, "added_tokens_decoder": {}}
    return {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2)}


def _export_tokenizer(checkpoint: Path, meta: dict, cfg: Config, out: Path) -> None:
    """Write the checkpoint's tokenizer files into `out`: a converted checkpoint's own files;
    for a trained run, byte-level files or the files beside the tokenizer it trained with."""
    name = meta.get("tokenizer", cfg.data.tokenizer)
    if is_converted(checkpoint):  # the files it was converted with (a byte export's included)
        source = checkpoint
    elif name == "bytes":
        for f, text in byte_tokenizer_files(cfg.inference.max_len).items():
            (out / f).write_text(text, encoding="utf-8")
        return
    else:  # a trained run records the tokenizer file it used (e.g. a converted checkpoint's)
        own = Path(name)
        source = own.parent
        if own.is_file() and own.name not in TOKENIZER_FILES:
            shutil.copy(own, out / ("tokenizer.json" if own.suffix == ".json" else "tokenizer.model"))
    for f in TOKENIZER_FILES:
        if (source / f).is_file():
            shutil.copy(source / f, out / f)


def to_hf(checkpoint: str | Path, out: str | Path, model_type: str | None = None,
          max_shard_bytes: int = 5 * 2**30, trained: tuple[Config, dict, dict] | None = None) -> Path:
    """Export a converted checkpoint, or a trained one restored as `trained` = (config, meta,
    params), as a Hugging Face directory: safetensors, config.json (with our settings in its
    `segexec` block) and the tokenizer files."""
    checkpoint, out = Path(checkpoint), Path(out)
    cfg, meta, get = _our_tensors(checkpoint, trained)
    if cfg.attention.mode == "segmented":
        warnings.warn(FullAttentionWarning(
            f"transformers will run {out} with full causal attention, not the segmented operator "
            f"this model is configured for (attention.mode=segmented, segment.len={cfg.segment.len}): "
            f"beyond {cfg.segment.len} tokens its outputs differ from segexec_jax's"), stacklevel=2)
    hf = dict(meta.get("hf_config") or hf_config_from(cfg, model_type or ("qwen2" if cfg.model.qkv_bias else "llama")))
    hf["segexec"] = segexec_block(cfg, meta.get("tokenizer", cfg.data.tokenizer))
    names = _hf_names(cfg)
    dtypes = _tensor_dtypes(meta, names, get)
    specs = [(hf_name, dtypes[i], _hf_shape(cfg, param)) for i, (hf_name, param, _) in enumerate(names)]

    def tensors() -> Iterator[np.ndarray]:
        for _, param, layer in names:
            yield _to_hf(cfg, param, get(param, layer))

    out.mkdir(parents=True, exist_ok=True)
    st.write(out, "model", specs, tensors(), max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    _export_tokenizer(checkpoint, meta, cfg, out)
    return out
