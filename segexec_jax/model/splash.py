"""The `splash` attention backend: Pallas TPU splash attention behind `attend`.

Splash takes a static block-sparse mask and per-token segment ids: a key is visible to a
query iff the static mask allows it and both carry the same id. Every mask kind other than
"general" (see `attention.py`) lays its keys out as [prefix of P entries at time -1, the
queries' own tokens at times 0..Tq-1], so its visibility is exactly
    static mask   CausalMask((Tq, Tk), offset=P): key j is visible to query i iff j <= i + P,
    segment ids   the document ids (an invalid prefix entry's -1 is no query's id).
"causal" rows hold one document and need no ids, which lets the kernel skip the
element-wise mask on blocks below the diagonal.

A "general" mask promises no layout and runs on the `xla` backend instead, with a
`SplashFallback` warning (at trace time). The one "general" call of the segment operator is
the chunked `refresh` attention: each chunk's queries start at a different time of the
segment, so its causal offset depends on the chunk, which `chunked_attention` folds into
the batch axis; one static mask per call cannot say that.

Lengths: splash tiles both sequences in blocks (multiples of 128), so queries and keys are
zero-padded to multiples of 128 and the output sliced back. The padded keys get an id no
token has; they also lie past every real query's causal horizon (i + P <= Tk - 1). Padded
queries may see nothing: splash's finite mask value keeps their rows finite, and their
outputs are dropped (so their gradients are zero).

GQA: the kernel runs per row and per KV group as MQA (one KV head and its query heads),
vmapped over groups and rows, so K and V are never repeated.

Meshes: XLA cannot partition a Pallas call, so inside `jax.set_mesh` the kernel runs under
`shard_map`, each device on its own rows and KV groups (see `_sharded`).

Off a TPU the kernel runs only in Pallas interpret mode (slow; for tests), and only when
asked: set `segexec_jax.model.splash.INTERPRET = True` before tracing, or the environment
variable SEGEXEC_SPLASH_INTERPRET=1 before importing, or pass `interpret=True` to
`splash_attention`. Otherwise `attention.backend=splash` off a TPU is a clear error.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as kernels,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as masks,
)
from jax._src import config as jax_config  # (the device context: no public way to leave it)
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float

from . import numerics, sharding
from .masks import AttentionMask
from .platform import target

# Kinds whose keys are [prefix at time -1, the queries' own tokens]: see the module docstring.
KINDS = ("causal", "prefix_causal", "prefix_packed")
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
LANES = 128  # splash's blocks are multiples of this; sequences are padded to it
BLOCKS = (512, 256, 128)  # preferred block sizes, largest first

INTERPRET = os.environ.get("SEGEXEC_SPLASH_INTERPRET", "0") not in ("", "0")


class SplashFallback(UserWarning):
    """A mask that splash cannot express ran on the xla backend."""


def takes(mask: AttentionMask) -> bool:
    """Whether splash computes this mask itself (else `attend` falls back to xla)."""
    return mask.kind in KINDS


def fallback(mask: AttentionMask) -> str:
    """The backend for a mask splash cannot express, said out loud."""
    warnings.warn(f"attention.backend=splash: a {mask.kind!r} mask (query length {mask.q_doc.shape[1]}, "
                  f"key length {mask.k_doc.shape[1]}) has no static splash form and runs on the xla "
                  "backend (see segexec_jax/splash.py)", SplashFallback, stacklevel=3)
    return "xla"


def _round_up(n: int) -> int:
    return -(-n // LANES) * LANES


def _block(n: int) -> int:
    """The largest preferred block size dividing n (a multiple of LANES)."""
    return next(b for b in BLOCKS if n % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(Tq: int, Tk: int, offset: int, heads: int, interpret: bool):
    """The MQA kernel for padded lengths (Tq, Tk), a causal offset and `heads` query heads
    per KV head; built once per shape (its block-sparsity tables are numpy work)."""
    bq, bk = _block(Tq), _block(Tk)
    sizes = kernels.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                               block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                               block_q_dq=bq, block_kv_dq=bk)
    mask = masks.MultiHeadMask([masks.CausalMask((Tq, Tk), offset=offset)] * heads)
    # concrete tables, even when first built under a trace, and on no mesh: made inside one
    # shard_map they would carry its manual mesh, and a cached kernel runs under any mesh
    # and on no devices of a mesh: under `jax.set_mesh` of a slice compiled for ahead of time
    # (compile-only devices) the eager table building would try to run there
    devices = jax_config.device_context.swap_local(None)
    try:
        with jax.ensure_compile_time_eval(), jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            return kernels.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                           interpret=interpret)
    finally:
        jax_config.device_context.set_local(devices)


def _interpret(interpret: bool | None) -> bool:
    interpret = INTERPRET if interpret is None else interpret
    if not interpret and target() != "tpu":
        raise RuntimeError(
            f"attention.backend=splash needs a TPU (the platform is {target()!r}); "
            "to run the kernel in Pallas interpret mode elsewhere (slow, for tests) set "
            "segexec_jax.model.splash.INTERPRET = True or SEGEXEC_SPLASH_INTERPRET=1")
    return interpret


def _pad_time(x: Array, length: int, value=0) -> Array:
    pad = length - x.shape[1]
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value) if pad else x


def splash_attention(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk G D"],
    v: Float[Array, "B Tk G D"],
    mask: AttentionMask,
    interpret: bool | None = None,
) -> Float[Array, "B Tq H D"]:
    """Softmax attention of q over (k, v) under a mask of a kind in `KINDS`. Inside
    `jax.set_mesh` (more than one device) every device runs the kernel on its own rows and
    heads: see `_sharded`."""
    if not takes(mask):
        raise ValueError(f"splash attention cannot express a {mask.kind!r} mask (kinds: {', '.join(KINDS)})")
    if jnp.dtype(q.dtype) not in DTYPES:
        raise ValueError(f"splash attention takes bfloat16, float16 or float32 inputs, got {q.dtype} "
                         "(use attention.backend=xla or reference)")
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"a {mask.kind!r} mask has at least as many keys as queries, got {k.shape[1]} < {q.shape[1]}")
    interpret = _interpret(interpret)
    mesh = jax.sharding.get_abstract_mesh()
    # (inside a caller's own shard_map, its axes are manual: the caller has split the arrays)
    if mesh.empty or mesh.size == 1 or getattr(mesh, "manual_axes", ()):
        return _local(q, k, v, mask, interpret)
    return _sharded(q, k, v, mask, interpret, mesh)


def _sharded(q, k, v, mask: AttentionMask, interpret: bool, mesh) -> Array:
    """`_local` under `shard_map`. XLA cannot partition the kernel's custom call: left to
    itself it would gather q, k and v whole onto every device. Rows go where `sharding.spec`
    puts the batch, heads over `tensor` where it divides both H and G (a device then holds
    whole KV groups with their query heads); the time axes stay whole, since a query needs
    every key. The mask's [B, T] arrays follow the rows."""
    q_spec = sharding.spec(("batch", None, "q_heads", None), q.shape, mesh)
    k_spec = sharding.spec(("batch", None, "kv_heads", None), k.shape, mesh)
    rows = q_spec[0]
    heads = q_spec[2] if q_spec[2] == k_spec[2] else None
    qkv = PartitionSpec(rows, None, heads, None)
    local = functools.partial(_local, interpret=interpret)
    return _shard_map(local, mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(rows)), out_specs=qkv)(q, k, v, mask)


def _shard_map(f, mesh, in_specs, out_specs):
    """`jax.shard_map` (jax >= 0.7; earlier, jax.experimental.shard_map) over the mesh set by
    `jax.set_mesh`. The varying-axes check is off: splash's pallas_call declares its outputs
    without the varying axes that check asks for (jax 0.10 refuses them otherwise)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _local(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk G D"],
    v: Float[Array, "B Tk G D"],
    mask: AttentionMask,
    interpret: bool,
) -> Float[Array, "B Tq H D"]:
    """The kernel on the arrays as given (one device's rows and heads under `_sharded`)."""
    B, Tq, H, D = q.shape
    Tk, G = k.shape[1], k.shape[2]
    P = Tk - Tq
    r = H // G
    Tq_pad, Tk_pad = _round_up(Tq), _round_up(Tk)
    kernel = _kernel(Tq_pad, Tk_pad, P, r, interpret)

    # splash does not scale the logits: scale the queries (in float32, then back)
    q = (q.astype(jnp.float32) * D ** -0.5).astype(q.dtype)
    q = _pad_time(q, Tq_pad).reshape(B, Tq_pad, G, r, D).transpose(0, 2, 3, 1, 4)  # [B G r Tq D]
    k, v = (_pad_time(a, Tk_pad).transpose(0, 2, 1, 3) for a in (k, v))  # [B G Tk D]
    ids = None
    if mask.kind != "causal":
        nobody = jnp.minimum(mask.q_doc.min(), mask.k_doc.min()) - 1  # no token's document
        ids = kernels.SegmentIds(_pad_time(mask.q_doc, Tq_pad, nobody), _pad_time(mask.k_doc, Tk_pad, nobody))

    per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV groups; ids shared
    # float32 products at HIGHEST (`numerics`); the kernels' backward pass is traced later,
    # outside this scope, and keeps Mosaic's default precision
    with numerics.matmul_scope(q, k):
        out = jax.vmap(per_group)(q, k, v, ids)  # over rows: [B G r Tq D]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tq_pad, H, D)[:, :Tq]
