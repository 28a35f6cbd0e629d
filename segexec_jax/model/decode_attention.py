"""Decode attention kernels: one query token a row over the parts of a cache, each entry read once.

A decoding query attends over a few parts of the cache: in segmented mode the sinks, the tail,
the retrieved prefix and the current segment; in full mode the KV cache. A `Part` is one
buffer as the cache keeps it, every layer at once ([L B K G D]: the kernel reads layer `layer`
itself, so no per-layer slice is copied), in the compute dtype or 8-bit with a float32 scale
per entry and KV head (dequantized in the kernel), and what one query sees of it:

  head_class [G]   the class of each KV head (segmented: 0 local heads, 1 long-range heads);
  lo, hi [B NC]    per row and class, the visible slots [lo, hi);
  pos0 [B NC]      per row and class, the RoPE position of slot 0: slot t sits at pos0 + t
                   (keys stored pre-RoPE are rotated in the kernel, block by block); None:
                   the keys are stored rotated (full mode).

`part_attention` gives, for every query head, the softmax average over the part's visible
keys and its log-sum-exp; `combine` merges parts by their log-sum-exp, which is attention
over their union with nothing concatenated. The query comes rotated already, [B G r D] (the
r query heads of KV head g are g*r .. g*r+r-1). Everything is computed in float32.

Two kernels behind one function: Triton on a GPU (grid rows x head blocks x key splits, each
program walking its split in blocks of 32-64 keys, loads masked per head so a head that sees
nothing of a block reads nothing; pre-RoPE keys' angles read from a `rope_table` when given;
float32 sums on the CUDA cores, no dot; the splits are merged like parts) and Mosaic on a TPU
(grid rows x key blocks, blocks outside a row's visible span neither fetched nor computed).
On the CPU either runs in interpret mode; `reference_part` is the slow float32 jnp rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .platform import target
from .rope import apply_rope

NEG_INF = -jnp.inf
ROPE_PAD = 128  # zero rows before position 0 in a `rope_table` (at least the Triton kernel's key block)
# Interpret mode on the CPU runs this flavour ("gpu": the Triton kernel, "tpu": the Mosaic one).
CPU_FLAVOUR = "gpu"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Part:
    k: Array  # [L B K G D] keys as stored: float, or 8-bit data with k_scale
    v: Array  # [L B K G D]
    k_scale: Float[Array, "L B K G 1"] | None
    v_scale: Float[Array, "L B K G 1"] | None
    layer: Int[Array, ""]  # which layer of the buffers this call reads
    head_class: Int[Array, "G"]
    lo: Int[Array, "B NC"]
    hi: Int[Array, "B NC"]
    pos0: Int[Array, "B NC"] | None  # None: keys stored rotated

    @property
    def n_classes(self) -> int:
        return self.lo.shape[1]


Result = tuple[Float[Array, "B n G r D"], Float[Array, "B n G r"]]  # per split: output, log-sum-exp


# --------------------------------------------------------------------------- the slow rule


def reference_part(q: Float[Array, "B G r D"], part: Part, inv_freq: np.ndarray) -> Result:
    """Dense float32: dequantize the layer, rotate every key at its position, mask, softmax."""
    f32 = jnp.float32
    k, v = (jax.lax.dynamic_index_in_dim(x, part.layer, keepdims=False).astype(f32) for x in (part.k, part.v))
    if part.k_scale is not None:
        k = k * jax.lax.dynamic_index_in_dim(part.k_scale, part.layer, keepdims=False)
        v = v * jax.lax.dynamic_index_in_dim(part.v_scale, part.layer, keepdims=False)
    K, D = k.shape[1], k.shape[3]
    t = jnp.arange(K, dtype=jnp.int32)[None, :, None]  # [1 K 1]
    per_head = lambda a: jnp.take(a, part.head_class, axis=1)[:, None, :]  # [B NC] -> [B 1 G]
    visible = (t >= per_head(part.lo)) & (t < per_head(part.hi))  # [B K G]
    if part.pos0 is not None:
        pos = per_head(part.pos0) + t  # [B K G]
        k = jax.vmap(lambda kg, pg: apply_rope(kg[:, :, None], pg, inv_freq)[:, :, 0], in_axes=(2, 2), out_axes=2)(k, pos)
    exact = jax.lax.Precision.HIGHEST  # a GPU's DEFAULT float32 dot is TF32 (10-bit mantissas)
    scores = jnp.einsum("bgrd,bkgd->bgrk", q.astype(f32), k, precision=exact) / jnp.sqrt(jnp.asarray(D, f32))
    scores = jnp.where(jnp.swapaxes(visible, 1, 2)[:, :, None], scores, NEG_INF)
    m = scores.max(-1, keepdims=True)
    w = jnp.exp(scores - jnp.where(m == NEG_INF, 0.0, m))
    total = w.sum(-1)
    o = jnp.einsum("bgrk,bkgd->bgrd", w, v, precision=exact) / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, m[..., 0] + jnp.log(total), NEG_INF)
    return o[:, None], lse[:, None]


def combine(results: list[Result]) -> Float[Array, "B G r D"]:
    """Attention over the union of the parts (and splits) from each one's output and lse."""
    o = jnp.concatenate([r[0] for r in results], axis=1)
    lse = jnp.concatenate([r[1] for r in results], axis=1)
    m = lse.max(1, keepdims=True)
    w = jnp.exp(lse - jnp.where(m == NEG_INF, 0.0, m))  # [B n G r]
    total = w.sum(1)
    return (w[..., None] * o).sum(1) / jnp.where(total > 0, total, 1.0)[..., None]


def scatter_groups(result: Result, groups: Int[Array, "Gl"], G: int) -> Result:
    """A part over some KV groups (the retrieved prefix's Gl) as one over all G: the others see nothing.
    `groups` may hold G for slots that no group uses (dropped)."""
    o, lse = result
    B, n, _, r, D = o.shape
    o_all = jnp.zeros((B, n, G, r, D), o.dtype).at[:, :, groups].set(o, mode="drop")
    lse_all = jnp.full((B, n, G, r), NEG_INF, lse.dtype).at[:, :, groups].set(lse, mode="drop")
    return o_all, lse_all


# --------------------------------------------------------------------------- entry point


def flavour() -> tuple[str, bool]:
    """(kernel flavour, interpret): the target's own kernel, or interpret mode on the CPU."""
    platform = target()
    if platform in ("gpu", "tpu"):
        return platform, False
    return CPU_FLAVOUR, True


def resolve(setting: str, n_heads: int, n_kv_heads: int, dim_head: int, dtype: str) -> str:
    """`inference.decode_kernel` made concrete: auto is pallas on a GPU or TPU where the kernel
    takes the shapes (float64 stays on xla), else xla; pallas on the CPU runs interpreted."""
    if setting != "auto":
        return setting
    platform = target()
    ok = platform in ("gpu", "tpu") and dtype != "float64" and supports(n_heads, n_kv_heads, dim_head, platform)
    return "pallas" if ok else "xla"


def supports(n_heads: int, n_kv_heads: int, dim_head: int, platform: str) -> bool:
    """Shapes the kernel of `platform` takes (Triton's blocks are powers of two)."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0
    if dim_head % 2 or n_heads % n_kv_heads:
        return False
    return platform != "gpu" or (pow2(n_heads // n_kv_heads) and pow2(dim_head // 2))


def rope_table(inv_freq: np.ndarray, n_positions: int) -> tuple[Float[Array, "P Dh"], Float[Array, "P Dh"]]:
    """cos and sin of positions 0 .. n_positions - 1 for the Triton kernel's pre-RoPE keys
    (the angles `apply_rope` takes, so the values are the same), after ROPE_PAD zero rows: a
    key block that starts before position 0 still reads one slice. Positions of a segmented
    window are small (< sinks + tail + retrieved + segment): made once a step, shared by every
    part and layer, it spares the kernel a sin and a cos per key."""
    angles = jnp.arange(n_positions, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    pad = lambda x: jnp.pad(x, ((ROPE_PAD, 0), (0, 0)))
    return pad(jnp.cos(angles)), pad(jnp.sin(angles))


def part_attention(q: Float[Array, "B G r D"], part: Part, inv_freq: np.ndarray, *, kernel: str | None = None,
                   interpret: bool | None = None, block_k: int | None = None, block_h: int | None = None,
                   rope_table: tuple[Array, Array] | None = None, prefetch: bool = False) -> Result:
    """One part's attention (output and lse per split) by the kernel of `kernel` ("gpu",
    "tpu", or "reference"; default: `flavour()`). `rope_table` (from `rope_table`, covering
    every position pos0 + slot of the part) lets the Triton kernel read its pre-RoPE keys'
    angles instead of computing them; positions past it see zero angles' rows (masked out),
    so it must cover them. `block_k`, `block_h`: the Triton kernel's key block and KV heads a
    program (default `triton_blocks`); `prefetch`: it loads block i + 1 before block i's
    arithmetic (for when Triton does not pipeline loads that feed no dot)."""
    if kernel is None:
        kernel, default_interpret = flavour()
        interpret = default_interpret if interpret is None else interpret
    if kernel == "reference":
        return reference_part(q, part, inv_freq)
    inv = jnp.asarray(np.asarray(inv_freq, np.float64), jnp.float32)
    if kernel == "gpu":
        return _triton_part(q.astype(jnp.float32), part, inv, bool(interpret), block_k, block_h, rope_table,
                            prefetch)
    if kernel == "tpu":
        return _mosaic_part(q.astype(jnp.float32), part, inv, bool(interpret), block_k)
    raise ValueError(f"unknown decode kernel {kernel!r} (gpu, tpu or reference)")


def _per_head(cls, values: list):
    """values[class of each head]: a select over the (few, static) classes."""
    out = jnp.full(cls.shape, values[0], jnp.int32) if not hasattr(values[0], "shape") else values[0]
    for c in range(1, len(values)):
        out = jnp.where(cls == c, values[c], out)
    return out


# --------------------------------------------------------------------------- GPU (Triton)


def _triton_kernel(*refs, NC: int, Gh: int, r: int, D: int, bk: int, chunk: int, rotate: bool, table: bool,
                   quant: bool, prefetch: bool):
    """One program: row b, KV heads hb*Gh .. +Gh, keys of split sp, walked in blocks of bk.
    Everything is elementwise float32 on the CUDA cores (no tl.dot: one query row a head is
    [1, D] x [D, bk], which tensor cores do not help; nothing is rounded to TF32)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    layer_ref, cls_ref, lo_ref, hi_ref, pos_ref, *rest = refs
    if rotate and table:
        cos_ref, sin_ref, *rest = rest
    elif rotate:
        inv_ref, *rest = rest
    q_ref, k_ref, v_ref, *rest = rest
    ks_ref, vs_ref, o_ref, lse_ref = rest if quant else (None, None, *rest)
    b, hb, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    Dh = D // 2
    f32 = jnp.float32
    layer = layer_ref[0]
    heads = pl.ds(hb * Gh, Gh)
    cls = cls_ref[heads]  # [Gh]
    lo_h = _per_head(cls, [lo_ref[b, c] for c in range(NC)])
    hi_h = _per_head(cls, [hi_ref[b, c] for c in range(NC)])
    empty = hi_h <= lo_h
    # the union of this program's heads' spans inside its split: blocks outside it are not visited
    start = jnp.maximum(jnp.min(jnp.where(empty, chunk * (sp + 1), lo_h)), sp * chunk)
    end = jnp.minimum(jnp.max(jnp.where(empty, 0, hi_h)), (sp + 1) * chunk)
    first = start // bk
    last = jnp.maximum((end + bk - 1) // bk, first)
    if rotate:  # halves: Triton slices no registers, so they are loaded apart
        q1, q2 = q_ref[b, heads, :, pl.ds(0, Dh)], q_ref[b, heads, :, pl.ds(Dh, Dh)]  # [Gh r Dh]
        pos_c = [pos_ref[b, c] for c in range(NC)]
        # a class's angles are loaded (or computed) only where one of these heads has it
        has_c = [jnp.max(jnp.where((cls == c) & ~empty, 1, 0)) > 0 for c in range(NC)]
        if table:
            P = cos_ref.shape[0] - ROPE_PAD  # positions the table holds
        else:
            inv = inv_ref[...]  # [Dh]
    else:
        q = q_ref[b, heads, :, :]  # [Gh r D]

    def load(ref, t0, visible, lanes, width):
        # per-head masks: a head whose span misses this block (a long-range head in the tail)
        # costs no memory traffic
        idx = (layer, b, pl.ds(t0, bk), heads, pl.ds(lanes, width))
        mask = jnp.broadcast_to(visible[:, :, None], (bk, Gh, width))
        zero = 0 if jnp.issubdtype(ref.dtype, jnp.integer) else 0.0  # (an int 0 does not cast to float8)
        return plgpu.load(ref.at[idx], mask=mask, other=zero)

    def angles(t0, t, needed):
        """cos, sin [bk Gh Dh] (or [bk 1 Dh] with one class) of each head's key positions
        (`needed` [bk]: the table's rows that are read)."""
        cos = sin = None
        for c in range(NC):
            if table:  # the rows of positions pos0 + t0 .. + bk: consecutive, read from L2
                p = pos_c[c] + t
                ok = jnp.broadcast_to(((p >= 0) & (p < P) & has_c[c] & needed)[:, None], (bk, Dh))
                rows = pl.ds(ROPE_PAD + pos_c[c] + t0, bk)
                cc = plgpu.load(cos_ref.at[rows, :], mask=ok, other=0.0)
                ss = plgpu.load(sin_ref.at[rows, :], mask=ok, other=0.0)
            else:
                ang = (pos_c[c] + t).astype(f32)[:, None] * inv[None, :]  # [bk Dh]
                cc, ss = jnp.cos(ang), jnp.sin(ang)
            cc, ss = cc[:, None, :], ss[:, None, :]
            if NC == 1:
                return cc, ss
            pick = (cls == c)[None, :, None]
            cc, ss = jnp.broadcast_to(cc, (bk, Gh, Dh)), jnp.broadcast_to(ss, (bk, Gh, Dh))
            cos, sin = (cc, ss) if c == 0 else (jnp.where(pick, cc, cos), jnp.where(pick, ss, sin))
        return cos, sin

    def visible_at(kb):
        t = kb * bk + jnp.arange(bk, dtype=jnp.int32)
        inside = (t >= start) & (t < end)
        return t, inside[:, None] & (t[:, None] >= lo_h[None]) & (t[:, None] < hi_h[None])  # [bk Gh]

    def fetch(kb):
        """Block kb's tiles as stored (past `end`: masked, no memory traffic)."""
        t0, (t, visible) = kb * bk, visible_at(kb)
        tiles = dict(v=load(v_ref, t0, visible, 0, D))
        if rotate:
            tiles.update(k1=load(k_ref, t0, visible, 0, Dh), k2=load(k_ref, t0, visible, Dh, Dh))
            if table:
                tiles["cos"], tiles["sin"] = angles(t0, t, jnp.max(jnp.where(visible, 1, 0), axis=1) > 0)
        else:
            tiles["k"] = load(k_ref, t0, visible, 0, D)
        if quant:
            tiles["ks"], tiles["vs"] = (plgpu.load(ref.at[layer, b, pl.ds(t0, bk), heads], mask=visible, other=0.0)
                                        for ref in (ks_ref, vs_ref))
        return tiles

    def step(kb, tiles, carry):
        m, l, acc = carry
        t, visible = visible_at(kb)
        if rotate:
            k1, k2 = tiles["k1"].astype(f32), tiles["k2"].astype(f32)
            cos, sin = (tiles["cos"], tiles["sin"]) if table else angles(kb * bk, t, None)
            kr1, kr2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
            s = (kr1[:, :, None, :] * q1[None]).sum(-1) + (kr2[:, :, None, :] * q2[None]).sum(-1)  # [bk Gh r]
        else:
            s = (tiles["k"].astype(f32)[:, :, None, :] * q[None]).sum(-1)
        s = s / math.sqrt(D)
        if quant:
            s = s * tiles["ks"][:, :, None]
        s = jnp.where(visible[:, :, None], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(0))
        m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use[None])
        l = alpha * l + p.sum(0)
        if quant:
            p = p * tiles["vs"][:, :, None]
        acc = alpha[:, :, None] * acc + (p[:, :, :, None] * tiles["v"].astype(f32)[:, :, None, :]).sum(0)
        return m_new, l, acc

    init = (jnp.full((Gh, r), NEG_INF, f32), jnp.zeros((Gh, r), f32), jnp.zeros((Gh, r, D), f32))
    if prefetch:  # block kb + 1's loads are issued before block kb's arithmetic (two tiles in registers)
        def body(kb, carry):
            *carry, tiles = carry
            nxt = fetch(kb + 1)
            return (*step(kb, tiles, carry), nxt)

        m, l, acc, _ = jax.lax.fori_loop(first, last, body, (*init, fetch(first)))
    else:
        m, l, acc = jax.lax.fori_loop(first, last, lambda kb, carry: step(kb, fetch(kb), carry), init)
    o_ref[b, sp, heads, :, :] = acc / jnp.where(l > 0, l, 1.0)[:, :, None]
    lse_ref[b, sp, heads, :] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_most(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def triton_blocks(G: int, r: int, D: int, K: int, rotate: bool) -> tuple[int, int]:
    """(key block, KV heads a program): a key tile [bk, Gh, D] of about 8K float32 (64
    registers a thread at 4 warps); pre-RoPE keys share their angles over 2 heads."""
    Gh = _pow2_at_most(G, 2 if rotate and r == 1 else 1)
    bk = min(64, max(16, 8192 // (Gh * r * D)))
    return min(bk, max(16, 1 << (K - 1).bit_length())), Gh


def _triton_part(q, part: Part, inv, interpret: bool, bk: int | None, Gh: int | None, rope_table,
                 prefetch: bool = False, target_programs: int = 1024, num_warps: int = 4) -> Result:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    B, G, r, D = q.shape
    K = part.k.shape[2]
    rotate = part.pos0 is not None
    auto_bk, auto_Gh = triton_blocks(G, r, D, K, rotate)
    bk, Gh = bk or auto_bk, Gh or auto_Gh
    # key splits: about `target_programs` programs (132 SMs, a few each), none shorter than 4 blocks
    n_split = max(1, min(_cdiv(target_programs, B * (G // Gh)), _cdiv(K, 4 * bk)))
    chunk = bk * _cdiv(_cdiv(K, n_split), bk)  # a whole number of blocks
    n_split = _cdiv(K, chunk)
    quant = part.k_scale is not None
    table = rotate and rope_table is not None
    if table and bk > ROPE_PAD:
        raise ValueError(f"block_k {bk} > ROPE_PAD {ROPE_PAD}: a first block would start before the table")
    NC = part.n_classes
    pos0 = part.pos0 if rotate else jnp.zeros_like(part.lo)
    args = [jnp.reshape(part.layer, (1,)).astype(jnp.int32), part.head_class.astype(jnp.int32),
            part.lo.astype(jnp.int32), part.hi.astype(jnp.int32), pos0.astype(jnp.int32)]
    if table:
        args += [rope_table[0].astype(jnp.float32), rope_table[1].astype(jnp.float32)]
    elif rotate:
        args += [inv]
    args += [q, part.k, part.v]
    if quant:
        args += [part.k_scale[..., 0], part.v_scale[..., 0]]
    kernel = functools.partial(_triton_kernel, NC=NC, Gh=Gh, r=r, D=D, bk=bk, chunk=chunk, rotate=rotate,
                               table=table, quant=quant, prefetch=prefetch)
    out_shape = (jax.ShapeDtypeStruct((B, n_split, G, r, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, n_split, G, r), jnp.float32))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(B, G // Gh, n_split), interpret=interpret,
                          compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
                          name="decode_attention")(*args)


# --------------------------------------------------------------------------- TPU (Mosaic)


def _mosaic_kernel(layer_ref, first_ref, last_ref, lo_ref, hi_ref, pos_ref, cls_ref, inv_ref, q_ref, k_ref, v_ref,
                   *rest, NC: int, r: int, D: int, K: int, bk: int, rotate: bool, quant: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    ks_ref, vs_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = rest if quant else (None, None, *rest)
    b, kb = pl.program_id(0), pl.program_id(1)
    f32 = jnp.float32

    @pl.when(kb == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, f32)
        l_ref[...] = jnp.zeros(l_ref.shape, f32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

    @pl.when((kb >= first_ref[b]) & (kb < last_ref[b]))
    def _():
        cls = cls_ref[...]  # [1 G 1]
        G = cls.shape[1]
        t = kb * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1, 1), 0)
        lo_h = _per_head(cls, [lo_ref[b * NC + c] for c in range(NC)])
        hi_h = _per_head(cls, [hi_ref[b * NC + c] for c in range(NC)])
        visible = (t >= lo_h) & (t < hi_h)  # [bk G 1]
        k = k_ref[...].astype(f32)  # [bk G D]
        v = v_ref[...].astype(f32)
        if K % bk:  # the last block runs past the buffer: what lies there is not data
            k = jnp.where(t < K, k, 0.0)
            v = jnp.where(t < K, v, 0.0)
        if rotate:  # k * cos + swap_halves(k) * (-sin, sin): RoPE's halves on whole lanes
            lane = jax.lax.broadcasted_iota(jnp.int32, (1, 1, D), 2)
            sign = jnp.where(lane < D // 2, -1.0, 1.0).astype(f32)
            cos = sin = None
            for c in range(NC):
                ang = (pos_ref[b * NC + c] + t).astype(f32) * inv_ref[...]  # [bk 1 D]
                cc, ss = jnp.cos(ang), jnp.sin(ang) * sign
                if c == 0:
                    cos, sin = jnp.broadcast_to(cc, (bk, G, D)), jnp.broadcast_to(ss, (bk, G, D))
                else:
                    cos, sin = jnp.where(cls == c, cc, cos), jnp.where(cls == c, ss, sin)
            k = k * cos + pltpu.roll(k, D // 2, 2) * sin
        ks = ks_ref[...] if quant else None  # [bk G 1]
        vs = vs_ref[...] if quant else None
        if quant and K % bk:
            ks, vs = jnp.where(t < K, ks, 0.0), jnp.where(t < K, vs, 0.0)
        for i in range(r):
            s = jnp.sum(k * q_ref[i][None], axis=-1, keepdims=True) / math.sqrt(D)  # [bk G 1]
            if quant:
                s = s * ks
            s = jnp.where(visible, s, NEG_INF)
            m_old = m_ref[i]  # [G 1]
            m_new = jnp.maximum(m_old, s.max(0))
            m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
            alpha = jnp.exp(m_old - m_use)
            p = jnp.exp(s - m_use[None])
            l_ref[i] = alpha * l_ref[i] + p.sum(0)
            if quant:
                p = p * vs
            acc_ref[i] = alpha * acc_ref[i] + (p * v).sum(0)
            m_ref[i] = m_new

    @pl.when(kb == pl.num_programs(1) - 1)
    def _():
        l = l_ref[...]
        o_ref[...] = acc_ref[...] / jnp.where(l > 0, l, 1.0)
        lse_ref[...] = jnp.where(l > 0, m_ref[...] + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)


def _mosaic_part(q, part: Part, inv, interpret: bool, bk: int | None) -> Result:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    B, G, r, D = q.shape
    K = part.k.shape[2]
    if bk is None:  # about 512 KiB of float32 per key block in VMEM
        bk = max(8, min(512, (1 << 17) // (G * D)))
    bk = min(bk, max(8, pl.next_power_of_2(K)))
    nK = -(-K // bk)
    NC = part.n_classes
    quant = part.k_scale is not None
    rotate = part.pos0 is not None
    lo, hi = part.lo.astype(jnp.int32), part.hi.astype(jnp.int32)
    empty = hi <= lo
    row_lo = jnp.where(empty, K, lo).min(1)
    row_hi = jnp.where(empty, 0, hi).max(1)
    first = jnp.minimum(row_lo // bk, nK - 1)
    last = jnp.where(row_hi > row_lo, -(-row_hi // bk), first)
    pos0 = part.pos0 if rotate else jnp.zeros_like(lo)
    prefetch = [jnp.reshape(part.layer, (1,)).astype(jnp.int32), first.astype(jnp.int32), last.astype(jnp.int32),
                lo.reshape(-1), hi.reshape(-1), pos0.astype(jnp.int32).reshape(-1)]

    def kv_block(b, kb, layer, first, last, *_):  # blocks outside the span repeat a fetched one
        return (layer[0], b, jnp.clip(kb, first[b], jnp.maximum(last[b] - 1, first[b])), 0, 0)

    kv_spec = pl.BlockSpec((None, None, bk, G, D), kv_block)
    full = lambda shape: pl.BlockSpec(shape, lambda b, kb, *_: (0,) * len(shape))
    in_specs = [full((1, G, 1)), full((1, 1, D)), pl.BlockSpec((None, r, G, D), lambda b, kb, *_: (b, 0, 0, 0)),
                kv_spec, kv_spec]
    args = [part.head_class.astype(jnp.int32).reshape(1, G, 1), jnp.concatenate([inv, inv]).reshape(1, 1, D),
            jnp.swapaxes(q, 1, 2), part.k, part.v]
    if quant:
        in_specs += [pl.BlockSpec((None, None, bk, G, 1), kv_block)] * 2
        args += [part.k_scale, part.v_scale]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(B, nK), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, r, G, D), lambda b, kb, *_: (b, 0, 0, 0)),
                   pl.BlockSpec((None, r, G, 1), lambda b, kb, *_: (b, 0, 0, 0))],
        scratch_shapes=[pltpu.VMEM((r, G, 1), jnp.float32), pltpu.VMEM((r, G, 1), jnp.float32),
                        pltpu.VMEM((r, G, D), jnp.float32)])
    kernel = functools.partial(_mosaic_kernel, NC=NC, r=r, D=D, K=K, bk=bk, rotate=rotate, quant=quant)
    o, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec, interpret=interpret, name="decode_attention",
        out_shape=(jax.ShapeDtypeStruct((B, r, G, D), jnp.float32), jax.ShapeDtypeStruct((B, r, G, 1), jnp.float32)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    )(*prefetch, *args)
    return jnp.swapaxes(o, 1, 2)[:, None], jnp.swapaxes(lse[..., 0], 1, 2)[:, None]
