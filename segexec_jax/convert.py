"""Conversion between our checkpoints and Hugging Face / llama.cpp files (the library:
`segexec_jax.interop.hf`, which describes the formats):

  python -m segexec_jax.convert from-hf --hf-dir DIR --out CKPT [key=value ...]
  python -m segexec_jax.convert from-gguf --gguf FILE --out CKPT [key=value ...]
  python -m segexec_jax.convert to-hf --checkpoint CKPT --out DIR

`from-hf` and `from-gguf` write a converted checkpoint (safetensors, our config, the
tokenizer files), which `load_checkpoint`, `infer.py`, `eval` and `train.init_from` read like
a run directory. `to-hf` exports a converted checkpoint or a trained run; transformers then
runs it with full causal attention (a segmented model gets a `FullAttentionWarning`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from .cli import ArgumentParser
from .config import ConfigError
from .interop import hf
from .interop.hf import (
    SUPPORTED,
    ConvertError,
    FullAttentionWarning,
    _parse_size,
    config_from_hf,
    from_gguf,
    from_hf,
    is_converted,
    read_converted,
)
from .interop.safetensors_io import SafetensorsError
from .segment.roles import describe
from .training.checkpoint import CheckpointError, load_checkpoint, read_meta

__all__ = ["ConvertError", "FullAttentionWarning", "config_from_hf", "from_gguf", "from_hf", "is_converted",
           "read_converted", "to_hf", "main"]


def to_hf(checkpoint: str | Path, out: str | Path, model_type: str | None = None,
          max_shard_bytes: int = 5 * 2**30) -> Path:
    """Export a converted checkpoint or a trained run (a run or step directory) as a Hugging
    Face directory: safetensors, config.json (our settings in its `segexec` block), tokenizer."""
    trained = None
    if not is_converted(checkpoint):
        cfg, params = load_checkpoint(checkpoint)
        trained = (cfg, read_meta(checkpoint), params)
    return hf.to_hf(checkpoint, out, model_type, max_shard_bytes, trained)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m segexec_jax.convert", description=__doc__)  # --help shows defaults
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face directory -> converted checkpoint")
    a.add_argument("--hf-dir", required=True)
    g = sub.add_parser("from-gguf", help="llama.cpp GGUF file -> converted checkpoint (dequantized)")
    g.add_argument("--gguf", required=True, help="a .gguf file of the llama architecture")
    for p in (a, g):
        p.add_argument("--out", required=True)
        p.add_argument("--max-shard-size", default="5GB")
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. segment.len=4096 model.param_dtype=bfloat16")
    b = sub.add_parser("to-hf", help="checkpoint (converted or trained) -> Hugging Face directory")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--arch", choices=SUPPORTED, default=None, help="for models not converted from HF")
    b.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        if args.command in ("from-hf", "from-gguf"):
            source = args.hf_dir if args.command == "from-hf" else args.gguf
            convert = from_hf if args.command == "from-hf" else from_gguf
            cfg = convert(source, args.out, args.overrides, _parse_size(args.max_shard_size))
            m = cfg.model
            print(f"converted {source} -> {args.out} ({m.n_layers} layers, d {m.d_model}, {m.n_heads} heads / "
                  f"{m.n_kv_heads} KV groups, vocab {m.vocab_size}, {m.param_dtype})")
            print(describe(cfg))
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FullAttentionWarning)
                to_hf(args.checkpoint, args.out, args.arch, _parse_size(args.max_shard_size))
            for w in caught:  # ours as one line; any other warning as Python shows it
                if issubclass(w.category, FullAttentionWarning):
                    print(f"warning: {w.message}", file=sys.stderr)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            print(f"exported {args.checkpoint} -> {args.out}")
    except (ConvertError, ConfigError, CheckpointError, SafetensorsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
