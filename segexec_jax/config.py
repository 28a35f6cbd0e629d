"""Typed configuration: one frozen dataclass per concern, YAML presets, dotted overrides.

A config is built from plain data (a YAML preset plus `key=value` overrides) by walking
the dataclass type hints: unknown keys, wrong types and impossible combinations raise one
`ConfigError` that names the offending key. Configs are frozen and hashable, so they can
be passed to `jax.jit` as static arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from etils import epath

# The YAML presets ship inside the package (package data), so they load from a wheel too;
# the repository's top-level configs/ is a link to this folder.
PRESET_DIR = Path(str(resources.files(__package__) / "configs"))


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names the key."""


class FrozenMap(Mapping):
    """A hashable read-only mapping, so configs holding maps stay hashable."""

    def __init__(self, items: Mapping | None = None):
        self._d = dict(items or {})

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._d.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 128
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    rope_theta: float = 10000.0
    # RoPE frequency scaling of long-context checkpoints: {"rope_type": "linear", "factor": 8}
    # or Llama-3's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; empty: none.
    rope_scaling: FrozenMap = FrozenMap()
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # layer remat policy in full mode; auto: "full" where attention runs unfused (the xla or
    # reference backend), "none" where a fused kernel (cuDNN, splash) keeps memory linear
    remat: Literal["auto", "none", "full", "dots", "dots_no_batch", "attn_out"] = "auto"

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    policy: str = "topk"  # a registered policy (retrieval.POLICIES): topk, topk_block, all, none
    budget: int = 512  # R: tokens retrieved per segment and head
    query_window: int = 64  # last tokens of the previous segment that form the query
    block_size: int = 64  # for topk_block
    # Query-aware variant (ours, SPEC §2): inside a segment the long-range heads select again
    # every `refresh` tokens, with the query of the `query_window` tokens before each chunk.
    # null: the paper's rule (one selection per segment, from the previous segment's end).
    refresh: int | None = None


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    len: int = 4096  # S
    tail: int = 512  # M
    long_layers: tuple[int, ...] = ()
    # KV-group indices of the long-range heads: one list for every layer, or a map
    # {layer: [groups]} (layers absent from the map have none).
    long_heads: tuple[int, ...] | FrozenMap = ()
    retrieval: RetrievalConfig = RetrievalConfig()
    grad_horizon: int | Literal["chain"] = 1
    sinks: int = 0
    # the registered role (roles.ROLES) of each slot: local (default tail), long (retrieval),
    # long_elsewhere (segment: long heads outside the long-range layers)
    roles: FrozenMap = FrozenMap()
    # Remat policy of the layers inside a segment's backward step (as `model.remat`, auto
    # included). The step already recomputes its segment from the saved tail, so with a
    # fused kernel "none" is cheap; unfused attention keeps S x (P + S) scores per layer.
    remat: Literal["auto", "none", "full", "dots", "dots_no_batch", "attn_out"] = "auto"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    mode: Literal["segmented", "full", "streaming"] = "segmented"  # streaming: inference only
    backend: Literal["auto", "reference", "xla", "cudnn", "splash"] = "auto"


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    max_len: int = 32768  # longest prompt + generation: the pool's (or full mode's KV cache's) capacity
    pool_on_host: bool = False  # keep the retrieval pool in host memory (contexts beyond device memory)
    stream_sinks: int = 4  # streaming mode (StreamingLLM): attention sinks
    stream_window: int = 4096  # streaming mode: recent tokens kept
    # keys and values kept by segmented and full inference (segment, tail, sinks, retrieved, pool):
    # null: the compute dtype (model.dtype); int8 and float8_e4m3fn: 8 bits with a float32 scale
    # per entry and KV head, quantized on write, dequantized on read
    kv_dtype: Literal["float32", "bfloat16", "float8_e4m3fn", "int8"] | None = None
    # the attention of a segmented or full decode step: pallas (model/decode_attention.py: reads
    # each cache entry once, RoPE and 8-bit dequantization inside); xla (rotated, dequantized
    # and concatenated copies, then an einsum); auto: pallas on a GPU or TPU, xla on the CPU
    decode_kernel: Literal["auto", "xla", "pallas"] = "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 1024
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    grad_accum: int = 1
    seed: int = 0
    init_from: str | None = None  # start from these parameters (a checkpoint, e.g. converted from HF)
    log_every: int = 10
    max_nonfinite: int = 5  # stop (with a checkpoint) after this many non-finite losses in a row


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps
    keep: int = 3
    # also save when this many minutes have passed since the last save (0 or null: never);
    # in a multi-process run, process 0's clock decides for all
    every_minutes: float | None = 30.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 500
    batches: int = 4


@dataclasses.dataclass(frozen=True)
class DataConfig:
    files: tuple[str, ...] = ()  # empty: the embedded corpus (Python's standard library)
    tokenizer: str = "bytes"  # "bytes", a tokenizer.json, or a SentencePiece .model
    synthetic: FrozenMap = FrozenMap()  # task name -> share of the training tokens
    # a synthetic document's length, as a fraction of the row, drawn uniformly from this range
    synthetic_length: tuple[float, ...] = (0.25, 1.0)
    # true: a document no longer than a row never splits across rows (where it does not fit in
    # what is left of the row, it starts the next one); false: it continues in the next row
    whole_documents: bool = False
    val_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    # step: gather FSDP shards once per micro-batch, before the segment loop (fast; holds the
    # whole model in the compute dtype); layer: at each use, per segment and layer (least memory)
    fsdp_gather: Literal["step", "layer"] = "step"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    segment: SegmentConfig = SegmentConfig()
    attention: AttentionConfig = AttentionConfig()
    inference: InferenceConfig = InferenceConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def to_dict(self) -> dict:
        return _to_plain(self)

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------- building


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_describe(typing.get_args(tp)[0])}"
    if tp is FrozenMap:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# types a value must already have (YAML gives them as such): what to call them, the test
_EXACT = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _coerce(value, alt, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        raise ConfigError(f"config key '{key}': expected one of {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}': expected null, got {value!r}")
    if tp in _EXACT:
        what, accepts = _EXACT[tp]
        if accepts(value):
            return value
        raise ConfigError(f"config key '{key}': expected {what}, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
        raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
    if tp is FrozenMap:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return FrozenMap({_map_key(k, key): _map_value(v, f"{key}.{k}") for k, v in value.items()})
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this file


def _map_key(k: Any, key: str) -> Any:
    if isinstance(k, str) and k.lstrip("-").isdigit():
        return int(k)
    if isinstance(k, (int, str)) and not isinstance(k, bool):
        return k
    raise ConfigError(f"config key '{key}': bad map key {k!r}")


def _map_value(v: Any, key: str) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_map_value(x, f"{key}[{i}]") for i, x in enumerate(v))
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"config key '{key}': expected a number, string or list, got {v!r}")
    return v


def _build(cls: type, data: Mapping, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(
                f"unknown config key '{prefix}{k}' (known under '{prefix or '.'}': {', '.join(names)})"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge(dst: dict, src: Mapping) -> dict:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = _deep_copy(v)
    return dst


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `section.key=value` items in order; an item that is a .yaml file (for example
    the heads chosen by `segexec_jax.calibrate`) is merged in as a partial config."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item and item.endswith((".yaml", ".yml")):
            try:
                part = yaml.safe_load(Path(item).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"override file {item!r}: {e}") from None
            if not isinstance(part, Mapping):
                raise ConfigError(f"override file {item!r} must hold a mapping of sections")
            _merge(data, part)
            continue
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def preset_names() -> list[str]:
    """The presets that load by name: the YAML files in the package's configs/ folder."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(path_or_name: str | Path) -> Path:
    """A preset name, a YAML path, or a directory holding config.yaml (a run or a converted
    checkpoint)."""
    path = Path(path_or_name)
    candidates = [path / "config.yaml"] if path.is_dir() else [path]
    if path.suffix == "":
        candidates += [path.with_suffix(".yaml"), PRESET_DIR / f"{path_or_name}.yaml"]
    else:
        candidates.append(PRESET_DIR / path.name)
    for c in candidates:
        if c.is_file():
            return c
    presets = preset_names()
    if not presets:
        raise ConfigError(f"config {str(path_or_name)!r} not found, and the package's presets folder "
                          f"{str(PRESET_DIR)!r} holds none: an install without its package data?")
    raise ConfigError(f"config {str(path_or_name)!r} not found (presets: {', '.join(presets)})")


def config_from_dict(data: Mapping, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(Config, apply_overrides(dict(data), list(overrides)))
    validate(cfg)
    return cfg


def load_config(
    path_or_name: str | Path | None = "tiny", overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """A preset name (`tiny`, `1b`, `llama2_7b`, ...), a YAML path or a directory with a
    config.yaml, plus `key=value` overrides (and YAML override files)."""
    data: dict = {}
    if path_or_name is not None:
        with open(resolve_preset(path_or_name)) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config {str(path_or_name)!r} is not valid YAML: {e}") from None
    return config_from_dict(data, overrides)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML; `path` may be local or a URI etils reaches (gs://...)."""
    epath.Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- validation


def require(cond: bool, key: str, message: str) -> None:
    """Raise the one clear error: ConfigError naming the key, unless cond holds."""
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


# Checks of names that live in the layers above this module (a retrieval policy, a head role,
# a synthetic task): each layer registers its check where its registry is, and `validate` runs
# them all last, so that this module imports nothing of the package.
CHECKS: list[Callable[[Config], None]] = []


def register_check(check: Callable[[Config], None]) -> Callable[[Config], None]:
    CHECKS.append(check)
    return check


def _positive(section: Any, prefix: str, names: list[str]) -> None:
    for n in names:
        v = getattr(section, n)
        require(v > 0, f"{prefix}.{n}", f"must be positive, got {v}")


def long_heads_by_layer(cfg: Config) -> tuple[tuple[int, ...], ...]:
    """The long-range KV groups of every layer (retrieval in long layers, segment elsewhere)."""
    heads = cfg.segment.long_heads
    L = cfg.model.n_layers
    if isinstance(heads, Mapping):
        return tuple(tuple(sorted(set(heads.get(layer, ())))) for layer in range(L))
    return tuple(tuple(sorted(set(heads))) for _ in range(L))


def validate(cfg: Config) -> None:
    m, s, r = cfg.model, cfg.segment, cfg.segment.retrieval
    _positive(m, "model", ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"])
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
             f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    if m.head_dim is None:
        require(m.d_model % m.n_heads == 0, "model.d_model",
                 f"must be divisible by model.n_heads ({m.n_heads}) when model.head_dim is unset")
    else:
        require(m.head_dim > 0, "model.head_dim", f"must be positive, got {m.head_dim}")
    require(m.dim_head % 2 == 0, "model.head_dim", f"RoPE needs an even head dimension, got {m.dim_head}")
    require(m.rope_theta > 0, "model.rope_theta", "must be positive")
    if m.rope_scaling:
        kind = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
        require(kind in ("linear", "llama3", "default"), "model.rope_scaling",
                 f"rope_type must be linear, llama3 or default, got {kind!r}")
        need = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"]}.get(kind, [])
        for k in need:
            require(isinstance(m.rope_scaling.get(k), (int, float)), f"model.rope_scaling.{k}",
                     f"is required for rope_type {kind}")
    require(m.norm_eps > 0, "model.norm_eps", "must be positive")

    _positive(s, "segment", ["len"])
    require(0 <= s.tail <= s.len, "segment.tail",
             f"the tail M ({s.tail}) must be between 0 and segment.len S ({s.len})")
    require(0 <= s.sinks <= s.len, "segment.sinks", f"must be between 0 and segment.len ({s.len})")
    for layer in s.long_layers:
        require(0 <= layer < m.n_layers, "segment.long_layers",
                 f"layer {layer} is out of range for model.n_layers={m.n_layers}")
    require(len(set(s.long_layers)) == len(s.long_layers), "segment.long_layers", "has duplicates")
    if isinstance(s.long_heads, Mapping):
        for layer, groups in s.long_heads.items():
            require(isinstance(layer, int) and 0 <= layer < m.n_layers, "segment.long_heads",
                     f"layer key {layer!r} is out of range for model.n_layers={m.n_layers}")
            require(isinstance(groups, tuple) and all(isinstance(g, int) and not isinstance(g, bool) for g in groups),
                     f"segment.long_heads.{layer}", "must be a list of KV-group indices")
    for layer, groups in enumerate(long_heads_by_layer(cfg)):
        for g in groups:
            require(0 <= g < m.n_kv_heads, "segment.long_heads",
                     f"KV group {g} (layer {layer}) is out of range for model.n_kv_heads={m.n_kv_heads}")
    gh = s.grad_horizon
    require(gh == "chain" or gh >= 0, "segment.grad_horizon", f"must be >= 0 or 'chain', got {gh!r}")
    require(r.budget >= 0, "segment.retrieval.budget", f"must be >= 0, got {r.budget}")
    require(1 <= r.query_window <= s.len, "segment.retrieval.query_window",
             f"must be between 1 and segment.len ({s.len}), got {r.query_window}")
    require(r.block_size > 0, "segment.retrieval.block_size", "must be positive")
    if r.refresh is not None:
        require(0 < r.refresh <= s.len and s.len % r.refresh == 0, "segment.retrieval.refresh",
                 f"must divide segment.len ({s.len}), got {r.refresh}")
        # each chunk's query window then lies inside the segment, before the chunk
        require(r.refresh >= r.query_window, "segment.retrieval.refresh",
                 f"must be at least segment.retrieval.query_window ({r.query_window}), got {r.refresh}")

    _positive(cfg.inference, "inference", ["max_len", "stream_window"])
    require(0 <= cfg.inference.stream_sinks <= cfg.inference.stream_window, "inference.stream_sinks",
             f"must be between 0 and inference.stream_window ({cfg.inference.stream_window})")
    require(cfg.inference.kv_dtype is None or cfg.attention.mode != "streaming", "inference.kv_dtype",
             "applies to the segmented and full caches; streaming keeps the compute dtype (leave it null)")
    require(cfg.inference.decode_kernel != "pallas" or cfg.attention.mode != "streaming", "inference.decode_kernel",
            "pallas applies to the segmented and full decode steps; streaming has its own (auto or xla)")
    require(cfg.inference.decode_kernel != "pallas" or cfg.model.dtype != "float64", "inference.decode_kernel",
            "the pallas kernels compute in float32; a float64 model decodes with xla (auto or xla)")

    t = cfg.train
    _positive(t, "train", ["steps", "batch_size", "seq_len", "grad_accum", "log_every", "max_nonfinite"])
    require(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _positive(cfg.checkpoint, "checkpoint", ["every", "keep"])
    minutes = cfg.checkpoint.every_minutes
    require(minutes is None or (math.isfinite(minutes) and minutes >= 0), "checkpoint.every_minutes",
             f"must be >= 0 (0 or null: no time cadence), got {minutes}")
    _positive(cfg.eval, "eval", ["every", "batches"])
    require(0 <= cfg.data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
    lo_hi = cfg.data.synthetic_length
    require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1, "data.synthetic_length",
             f"must be [low, high] with 0 < low <= high <= 1 (fractions of train.seq_len), got {list(lo_hi)}")
    for name, w in cfg.data.synthetic.items():
        require(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0,
                 f"data.synthetic.{name}", "weight must be a number >= 0")
    require(sum(cfg.data.synthetic.values()) <= 1.0, "data.synthetic",
             "weights are shares of the training tokens and must sum to at most 1")
    mesh = cfg.mesh
    require(mesh.data == -1 or mesh.data > 0, "mesh.data", "must be positive or -1 (all devices)")
    _positive(mesh, "mesh", ["fsdp", "tensor"])
    require(m.n_kv_heads % mesh.tensor == 0, "mesh.tensor",
             f"must divide model.n_kv_heads ({m.n_kv_heads}), got {mesh.tensor}")
    for check in CHECKS:
        check(cfg)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`python -m segexec_jax.config --print [--config NAME] [key=value ...]`."""
    import sys

    from .cli import ArgumentParser

    parser = ArgumentParser(prog="python -m segexec_jax.config",
                            description="Print a resolved config (preset or YAML file, then overrides) as YAML.")
    parser.add_argument("--print", action="store_true", required=True, help="print the resolved config as YAML")
    parser.add_argument("--config", default="tiny",
                        help=f"preset ({', '.join(preset_names())}), YAML path or run directory")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. segment.len=1024")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


# `python -m segexec_jax.config` runs this file a second time, as __main__, after the package
# imported it: use the package's copy (one ConfigError class), and keep runpy's warning about
# that second copy quiet (the filter is set by the first copy, before runpy checks).
warnings.filterwarnings("ignore", message="'segexec_jax.config' found in sys.modules", category=RuntimeWarning)
if __name__ == "__main__":
    from segexec_jax.config import main as _main

    raise SystemExit(_main())
