"""The decode attention kernel alone (model/decode_attention.py `part_attention`) against the
xla einsum path, at the LLaMA-2-7B shapes of issue 14 (32 layers, 32 KV heads of 128, r = 1):

  segmented: 27 rows, each layer's parts as a segmented step reads them: the segment
             [32 27 4096 32 128] (the token `--seg-seen` slots in), the tail [32 27 512 32 128]
             (local heads only), the sinks [32 27 4 32 128], the retrieved prefix
             [4 27 512 4 128] (4 long KV heads, the last 4 layers' slots); keys pre-RoPE;
  full:      1 row, 131072 slots [32 1 131072 32 128], keys stored rotated.

One timed call runs the 32 layers' attention in a scan (as a decode step does), so the
milliseconds are a step's attention; GB/s counts the key and value bytes the token sees
(what a read-bound kernel must read), not the whole buffers. `max|pallas - xla|` is a sanity
check (the xla path rounds to bf16 as the decode does). About 40 s on an H200:

    python benchmarks/decode_kernel_bench.py [--only segmented|full] [--iters 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from segexec_jax.model import decode_attention as da
from segexec_jax.model.rope import inverse_frequencies

L, G, D = 32, 32, 128
INV = inverse_frequencies(D, 10000.0)
SIZES = dict(S=4096, M=512, n=4, R=512)  # segment, tail, sinks, retrieved
INTERPRET = False  # --smoke: tiny shapes in interpret mode (a check of this script on a CPU)


def xla_part(q, part: da.Part, rope_table=None, **_):
    """The xla path of a decode step: the layer's slice, keys rotated (bf16), einsums in bf16
    with float32 results, masked softmax; one split."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    k, v = (jax.lax.dynamic_index_in_dim(x, part.layer, keepdims=False) for x in (part.k, part.v))
    if part.k_scale is not None:
        k = k.astype(bf16) * jax.lax.dynamic_index_in_dim(part.k_scale, part.layer, keepdims=False).astype(bf16)
        v = v.astype(bf16) * jax.lax.dynamic_index_in_dim(part.v_scale, part.layer, keepdims=False).astype(bf16)
    k, v = k.astype(bf16), v.astype(bf16)
    K = k.shape[1]
    t = jnp.arange(K, dtype=jnp.int32)[None, :, None]
    per_head = lambda a: jnp.take(a, part.head_class, axis=1)[:, None, :]  # [B 1 G]
    visible = (t >= per_head(part.lo)) & (t < per_head(part.hi))  # [B K G]
    if part.pos0 is not None:
        ang = (per_head(part.pos0) + t).astype(f32)[..., None] * jnp.asarray(INV, f32)  # [B K G Dh]
        k1, k2 = jnp.split(k.astype(f32), 2, axis=-1)
        cos, sin = jnp.cos(ang), jnp.sin(ang)
        k = jnp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], -1).astype(bf16)
    s = jnp.einsum("bgrd,bkgd->bgrk", q.astype(bf16), k, preferred_element_type=f32) / np.sqrt(D)
    s = jnp.where(jnp.swapaxes(visible, 1, 2)[:, :, None], s, da.NEG_INF)
    m = s.max(-1, keepdims=True)
    w = jnp.exp(s - jnp.where(m == da.NEG_INF, 0.0, m))
    total = w.sum(-1)
    o = jnp.einsum("bgrk,bkgd->bgrd", w.astype(bf16), v, preferred_element_type=f32)
    o = o / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, m[..., 0] + jnp.log(jnp.where(total > 0, total, 1.0)), da.NEG_INF)
    return o[:, None], lse[:, None]


def pallas_part(q, part, rope_table=None, block_k=None, block_h=None, prefetch=False):
    return da.part_attention(q, part, INV, kernel="gpu", interpret=INTERPRET, block_k=block_k, block_h=block_h,
                             rope_table=rope_table, prefetch=prefetch)


def _buffers(shape, dtype, quant):
    """Small random-ish values (the kernel's time does not depend on them)."""
    data = (jnp.arange(np.prod(shape[-3:]), dtype=jnp.float32).reshape(shape[-3:]) % 7 - 3) / 4
    if quant:
        data = jnp.broadcast_to((data * 30).astype(jnp.int8), shape)
        scale = jnp.full(shape[:-1] + (1,), 1 / 120, jnp.float32)
        return data + 0, scale
    return jnp.broadcast_to(data.astype(dtype), shape) + jnp.zeros((), dtype), None


def segmented_setup(B: int, seen: int, quant: bool):
    """Per layer: [(part, q, layer -> layer index of its buffers)] and the bytes the token sees."""
    S, M, n, R, n_long = SIZES["S"], SIZES["M"], SIZES["n"], SIZES["R"], 4
    dt = jnp.int8 if quant else jnp.bfloat16
    item = 1 if quant else 2
    cls = jnp.zeros((G,), jnp.int32).at[jnp.arange(0, G, G // n_long)].set(1)  # 4 long KV heads
    rows = lambda *xs: jnp.asarray(np.tile(np.array(xs, np.int32), (B, 1)))
    parts = []
    # (name, buffers shape, class spans lo, hi, pos0 [per class], visible (row, head, slot) entries)
    specs = [("segment", (L, B, S, G, D), (0, 0), (seen, seen), (n + M, R), B * G * seen),
             ("tail", (L, B, M, G, D), (0, 0), (M, 0), (n, 0), B * (G - n_long) * M),
             ("sinks", (L, B, n, G, D), (0, 0), (n, 0), (0, 0), B * (G - n_long) * n)]
    for name, shape, lo, hi, pos0, entries in specs:
        (k, ks), (v, vs) = _buffers(shape, dt, quant), _buffers(shape, dt, quant)
        parts.append((name, da.Part(k, v, ks, vs, jnp.int32(0), cls, rows(*lo), rows(*hi), rows(*pos0)),
                      G, lambda layer: layer, entries))
    (k, ks), (v, vs) = _buffers((4, B, R, n_long, D), dt, quant), _buffers((4, B, R, n_long, D), dt, quant)
    parts.append(("retrieved", da.Part(k, v, ks, vs, jnp.int32(0), jnp.zeros((n_long,), jnp.int32), rows(0),
                                       rows(R), rows(0)), n_long, lambda layer: layer % 4, B * n_long * R))
    per_entry = 2 * D * item + (8 if quant else 0)
    table = da.rope_table(INV, n + M + R + S)
    return parts, {name: entries * per_entry for name, *_, entries in parts}, table


def full_setup(B: int, C: int):
    (k, _), (v, _) = _buffers((L, B, C, G, D), jnp.bfloat16, False), _buffers((L, B, C, G, D), jnp.bfloat16, False)
    zero = jnp.zeros((B, 1), jnp.int32)
    part = da.Part(k, v, None, None, jnp.int32(0), jnp.zeros((G,), jnp.int32), zero, zero + C, None)
    return [("cache", part, G, lambda layer: layer, B * G * C)], {"cache": B * G * C * 2 * D * 2}, None


def step_fn(parts, attend, table, **kw):
    """The attention of all 32 layers (one query a row and head per layer), summed."""
    parts = [(name, None, Gp, at, entries) for name, _, Gp, at, entries in parts]  # the buffers come as arguments

    def f(q, bufs, table):
        def layer_fn(total, layer):
            outs = []
            for (name, _, Gp, at, _), part in zip(parts, bufs):
                p = da.Part(part.k, part.v, part.k_scale, part.v_scale, at(layer), part.head_class, part.lo, part.hi,
                            part.pos0)
                outs.append(da.combine([attend(q[:, :Gp], p, rope_table=table, **kw)]).sum(1))
            return total + sum(outs), None
        return jax.lax.scan(layer_fn, jnp.zeros(q.shape[:1] + q.shape[2:], jnp.float32), jnp.arange(L))[0]
    jitted = jax.jit(f)
    return lambda q, bufs: jitted(q, bufs, table)


def timed(fn, args, iters: int) -> float:
    out = jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def run(label, parts, seen_bytes, table, B, variants, iters, xla=True):
    q = jnp.asarray(np.random.default_rng(0).normal(size=(B, G, 1, D)), jnp.float32)
    bufs = [p for _, p, *_ in parts]
    total = sum(seen_bytes.values()) * L
    results = []
    ref = None
    if xla:
        f = step_fn(parts, xla_part, None)
        ms = 1000 * timed(f, (q, bufs), iters)
        ref = f(q, bufs)
        results.append(dict(shape=label, kernel="xla", ms=round(ms, 3), gb_s=round(total / ms / 1e6, 1)))
        print(json.dumps(results[-1]), flush=True)
    for name, kw in variants:
        t0 = time.perf_counter()
        try:
            f = step_fn(parts, pallas_part, kw.pop("table", table), **kw)
            ms = 1000 * timed(f, (q, bufs), iters)
            err = None if ref is None else float(jnp.abs(f(q, bufs) - ref).max())
            row = dict(shape=label, kernel=f"pallas {name}", ms=round(ms, 3), gb_s=round(total / ms / 1e6, 1),
                       max_abs_vs_xla=err, compile_and_time_s=round(time.perf_counter() - t0, 1))
        except Exception as e:  # one variant that fails to compile does not hide the others
            row = dict(shape=label, kernel=f"pallas {name}", error=f"{type(e).__name__}: {str(e)[:300]}")
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(dict(shape=label, seen_gb_per_step=round(total / 1e9, 3),
                          floor_ms_at_4_8_TB_s=round(total / 4.8e9, 3),
                          per_part_gb=({k: round(v * L / 1e9, 3) for k, v in seen_bytes.items()}))), flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["segmented", "full"], default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=27)
    ap.add_argument("--seg-seen", type=int, default=12, help="segment slots the token sees (bench: ~3..19)")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (on a CPU)")
    args = ap.parse_args()
    if args.smoke:
        global L, G, D, INV, INTERPRET
        L, G, D, INTERPRET = 2, 8, 16, True
        INV = inverse_frequencies(D, 10000.0)
        SIZES.update(S=64, M=16, n=2, R=8)
        args.batch, args.context, args.seg_seen, args.iters = 2, 256, 5, 1
    print(json.dumps(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__)), flush=True)
    t_start = time.perf_counter()
    if args.only in (None, "segmented"):
        parts, seen, table = segmented_setup(args.batch, args.seg_seen, quant=False)
        run("segmented bf16", parts, seen, table, args.batch, [
            ("default, rope table", {}),
            ("default, angles computed", dict(table=None)),
            ("default, prefetch", dict(prefetch=True)),
            ("bk16 bh4", dict(block_k=16, block_h=4)),
            ("bk64 bh1", dict(block_k=64, block_h=1)),
        ], args.iters)
        del parts
        gc.collect()
        parts, seen, table = segmented_setup(args.batch, args.seg_seen, quant=True)
        run("segmented int8", parts, seen, table, args.batch, [("default, rope table", {})], args.iters)
        del parts
        gc.collect()
    if args.only in (None, "full"):
        parts, seen, table = full_setup(1, args.context)
        run("full bf16 batch 1", parts, seen, table, 1, [
            ("default", {}), ("default, prefetch", dict(prefetch=True)), ("bk128 bh1", dict(block_k=128, block_h=1)),
            ("bk32 prefetch", dict(block_k=32, prefetch=True)),
        ], args.iters)
    print(json.dumps(dict(total_s=round(time.perf_counter() - t_start, 1))), flush=True)


if __name__ == "__main__":
    main()
