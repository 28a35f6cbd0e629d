"""A deliberately plain JAX training step of the 1b preset's shape: the bar that SPEC §8 sets
for `python -m segexec_jax.bench train --mode full` ("at least as fast as a plain
hand-written JAX step of the same shape").

No flax, no package code: a LLaMA-style decoder (RMSNorm in float32, GQA, RoPE (rotate
halves, base 10000), SwiGLU, tied embeddings), float32 parameters cast to bfloat16 at their
use, cuDNN causal attention (`jax.nn.dot_product_attention(is_causal=True)`), `lax.scan`
over the layers with `jax.checkpoint` per layer (remat "layer" = our preset's
`model.remat: full`, nothing saved but the layer inputs), a next-token cross entropy on
bf16 logits upcast to float32, and optax AdamW with our `train.*` hyperparameters (global
norm clipping 1.0, warmup + cosine, weight decay 0.1 on matrices only), in one jitted step
with the state donated.

  python benchmarks/plain_step.py --seq-len 8192 --batch 1 --steps 5 --warmup 2 --remat layer

prints one JSON line like `bench train` (median step time, tokens/s, MFU by 6·N·tokens
over --peak-tflops, peak bytes from `memory_stats()`), appended to --out. `--profile DIR`
also traces one more step into DIR (jax.profiler) and `--hlo FILE` writes the optimized HLO.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

GIB = 2**30
PRESET = Path(__file__).resolve().parents[1] / "configs" / "1b.yaml"


@dataclass(frozen=True)
class Shape:
    """The model and optimizer settings; defaults are segexec_jax's `ModelConfig` and
    `TrainConfig` defaults, and `from_yaml` lays the preset's own keys over them."""

    vocab: int = 32000
    d_model: int = 2048
    n_layers: int = 22
    n_heads: int = 16
    n_kv_heads: int = 4
    d_ff: int = 5632
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute; parameters are float32
    lr: float = 3e-4
    warmup_steps: int = 100
    steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @staticmethod
    def from_yaml(path: Path = PRESET) -> Shape:
        import yaml

        cfg = yaml.safe_load(Path(path).read_text())
        m, t = cfg.get("model", {}), cfg.get("train", {})
        if not m.get("tie_embeddings", True) or m.get("qkv_bias") or m.get("head_dim") or m.get("rope_scaling"):
            raise SystemExit(f"{path}: the plain step has tied embeddings, no biases, no RoPE scaling")
        keys = dict(vocab="vocab_size", d_model="d_model", n_layers="n_layers", n_heads="n_heads",
                    n_kv_heads="n_kv_heads", d_ff="d_ff", rope_theta="rope_theta", norm_eps="norm_eps",
                    init_std="init_std", dtype="dtype")
        shape = replace(Shape(), **{k: type(getattr(Shape(), k))(m[v]) for k, v in keys.items() if v in m})
        tkeys = ("lr", "warmup_steps", "steps", "min_lr_ratio", "weight_decay", "grad_clip", "b1", "b2")
        return replace(shape, **{k: type(getattr(shape, k))(t[k]) for k in tkeys if k in t})


# --------------------------------------------------------------------------- the model


def init_params(s: Shape, seed: int = 0) -> dict:
    """float32 parameters; layer weights stacked on a leading layer axis (for `lax.scan`)."""
    L, d, H, G, Dh, F = s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff
    k = iter(jax.random.split(jax.random.key(seed), 8))
    normal = lambda shape, std: std * jax.random.normal(next(k), shape, jnp.float32)
    out_std = s.init_std / math.sqrt(2 * L)
    return dict(
        embed=normal((s.vocab, d), s.init_std),
        layers=dict(
            attn_norm=jnp.ones((L, d), jnp.float32),
            wq=normal((L, d, H * Dh), s.init_std), wk=normal((L, d, G * Dh), s.init_std),
            wv=normal((L, d, G * Dh), s.init_std), wo=normal((L, H * Dh, d), out_std),
            mlp_norm=jnp.ones((L, d), jnp.float32),
            w_gate=normal((L, d, F), s.init_std), w_up=normal((L, d, F), s.init_std),
            w_down=normal((L, F, d), out_std)),
        final_norm=jnp.ones((d,), jnp.float32),
    )


def rms_norm(x, scale, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale).astype(x.dtype)


def rope_tables(s: Shape, T: int):
    inv = 1.0 / (s.rope_theta ** (np.arange(0, s.head_dim, 2, dtype=np.float64) / s.head_dim))
    angles = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]  # [T, Dh/2], constants
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def rope(x, cos, sin):
    """Rotate halves (Llama): pairs (i, i + Dh/2) share a frequency; in float32."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def layer(s: Shape, attention: str, x, w, cos, sin):
    B, T, _ = x.shape
    dt = x.dtype
    h = rms_norm(x, w["attn_norm"], s.norm_eps)
    q = (h @ w["wq"].astype(dt)).reshape(B, T, s.n_heads, s.head_dim)
    k = (h @ w["wk"].astype(dt)).reshape(B, T, s.n_kv_heads, s.head_dim)
    v = (h @ w["wv"].astype(dt)).reshape(B, T, s.n_kv_heads, s.head_dim)
    o = jax.nn.dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True,
                                     implementation=attention)
    x = x + o.reshape(B, T, -1) @ w["wo"].astype(dt)
    h = rms_norm(x, w["mlp_norm"], s.norm_eps)
    return x + (jax.nn.silu(h @ w["w_gate"].astype(dt)) * (h @ w["w_up"].astype(dt))) @ w["w_down"].astype(dt)


def hidden(s: Shape, params, tokens, remat: str = "layer", attention: str = "xla"):
    """The final hidden states (before the final norm) [B T d] in the compute dtype."""
    dt = jnp.dtype(s.dtype)
    cos, sin = rope_tables(s, tokens.shape[1])
    x = params["embed"].astype(dt)[tokens]

    def body(x, w):
        return layer(s, attention, x, w, cos, sin), None

    if remat == "layer":
        body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return x


def loss_fn(s: Shape, params, tokens, remat: str = "layer", attention: str = "xla"):
    """Mean next-token cross entropy over the positions 0..T-2 of every row."""
    dt = jnp.dtype(s.dtype)
    h = rms_norm(hidden(s, params, tokens, remat, attention), params["final_norm"], s.norm_eps)
    logits = (h @ params["embed"].astype(dt).T).astype(jnp.float32)  # [B T V]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def optimizer(s: Shape) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, s.warmup_steps, s.steps, s.lr * s.min_lr_ratio)
    # decay on every matrix, not on the norm scales (as segexec_jax.training.optim.decay_mask)
    decay = lambda p: {**jax.tree.map(lambda _: True, p), "final_norm": False,
                       "layers": {**jax.tree.map(lambda _: True, p["layers"]), "attn_norm": False, "mlp_norm": False}}
    return optax.chain(optax.clip_by_global_norm(s.grad_clip),
                       optax.adamw(schedule, b1=s.b1, b2=s.b2, weight_decay=s.weight_decay, mask=decay))


def make_step(s: Shape, opt, remat: str, attention: str):
    def step(state, tokens):
        params, opt_state = state
        value, grads = jax.value_and_grad(lambda p: loss_fn(s, p, tokens, remat, attention))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return jax.jit(step, donate_argnums=(0,))


# --------------------------------------------------------------------------- the benchmark


def _commit() -> str:
    if os.environ.get("SEGEXEC_COMMIT"):
        return os.environ["SEGEXEC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args) -> dict:
    s = Shape.from_yaml(args.config)
    if args.n_layers:
        s = replace(s, n_layers=args.n_layers)
    attention = args.attention if args.attention != "auto" else (
        "cudnn" if jax.default_backend() == "gpu" else "xla")
    B, T = args.batch, args.seq_len
    opt = optimizer(s)
    state = jax.jit(lambda: (lambda p: (p, opt.init(p)))(init_params(s)))()
    n_params = sum(int(x.size) for x in jax.tree.leaves(state[0]))
    step = make_step(s, opt, args.remat, attention)
    rng = np.random.default_rng(0)
    batches = [jax.device_put(rng.integers(0, s.vocab, (B, T), dtype=np.int32)) for _ in range(2)]
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    if args.hlo:
        opener = gzip.open if args.hlo.endswith(".gz") else open
        with opener(args.hlo, "wt") as f:
            f.write(compiled.as_text())
    mem = compiled.memory_analysis()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, value = compiled(state, batches[i % 2])
        jax.block_until_ready((state, value))
        losses.append(float(value))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if args.profile:
        with jax.profiler.trace(args.profile):
            state, value = compiled(state, batches[0])
            jax.block_until_ready((state, value))
    step_s = statistics.median(times)
    tokens = B * T
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return dict(
        bench="plain_train", mode="plain", seq_len=T, batch=B, remat=args.remat, attention=attention,
        n_layers=s.n_layers, dtype=s.dtype, param_dtype="float32", params=n_params,
        compile_s=round(compile_s, 2), step_s=round(step_s, 4), step_s_all=[round(t, 4) for t in times],
        tokens_per_s=round(tokens / step_s, 1),
        mfu=round(6 * n_params * tokens / step_s / (args.peak_tflops * 1e12), 4),
        loss_first=losses[0], loss_last=losses[-1],
        temp_gib=round(mem.temp_size_in_bytes / GIB, 3) if mem else None,
        peak_gib=round(peak / GIB, 3) if peak else None,
        device=str(jax.devices()[0].device_kind), jax=jax.__version__, commit=_commit(),
        xla_flags=os.environ.get("XLA_FLAGS", ""), date=time.strftime("%Y-%m-%d"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(PRESET), help="a segexec_jax preset YAML (model.* and train.* keys)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--remat", choices=["layer", "none"], default="layer",
                   help="layer: jax.checkpoint around each layer (nothing saved inside it)")
    p.add_argument("--attention", choices=["auto", "cudnn", "xla"], default="auto",
                   help="auto: cudnn on a GPU, else xla")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator (as bench train)")
    p.add_argument("--profile", default=None, help="trace one more step into this directory")
    p.add_argument("--hlo", default=None, help="write the optimized HLO text here (.gz: compressed)")
    p.add_argument("--out", default=None, help="append the JSON result to this file")
    args = p.parse_args(argv)
    line = json.dumps(run(args))
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
